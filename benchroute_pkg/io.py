"""File access shared by every layer (``benchroute.io``): fsspec helpers and one JSON reader.

It sits below ``schemas``, ``transforms``, ``artifacts`` and ``flows`` and imports none of them.

Files:

- ``is_local(fs)``: whether an fsspec filesystem is the local disk;
- ``display_path(fs, path)``: how a file is named in messages (its path, with the protocol when
  not local);
- ``fresh_ls(fs, path)``: a directory listing that bypasses fsspec's listing cache (other
  processes write the same folders), empty when the folder is absent;
- ``atomic_put(fs, path, data)``: replace ``path`` whole or not at all (a temporary file,
  fsync, rename on the local disk; a single put elsewhere);
- ``exclusive_put(fs, path, data)``: create ``path`` only if it does not exist yet
  (``FileExistsError`` otherwise), whole or not at all on the local disk.

JSON (``iter_json``): the items of a JSON document streamed with ijson, memory flat in file size
(``loads``: one document in memory, such as a JSON Lines line).
The fast parser reads the raw bytes; when it trips on something ``TolerantJson`` repairs, the
file is read again through it and the items already given are skipped. One policy for what is not
JSON, for every reader:

- **Non-finite numbers**: the bare tokens ``NaN``, ``Infinity`` and ``-Infinity`` (Python's
  ``json.dumps`` writes non-finite floats so) are read as the *strings* ``"NaN"``,
  ``"Infinity"`` and ``"-Infinity"``. Nothing is lost (a NaN is not confused with a ``null``,
  +inf not with -inf) and ``float()`` of the string is the number the token names, so a reader
  that takes numbers through ``float``/``to_float`` sees the non-finite value and quarantines
  it as such.
- **Numbers beyond the parser's range** (integers of 19 digits or more, exponents of three
  digits) are read as strings of their text (``"1e999"``); ``float()`` reads them.
- **Text that is not Unicode**: each byte sequence that is not UTF-8, and each lone surrogate
  escape (``"\\udc80"``), is read as ``BAD_TEXT`` (U+FDD0, a noncharacter), so the record
  holding it can be quarantined alone instead of the parse stopping there.

These rewrites are made only outside strings (the tokenizer follows string boundaries), so a
string that holds ``NaN`` or digits is never changed.
"""

from __future__ import annotations

import json
import os
import posixpath
import re
import uuid
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from typing import BinaryIO

import fsspec
import ijson

BAD_TEXT = "\ufdd0"  # stands for text that is not Unicode (a noncharacter: never in real data)


# ============================================================================ files
def is_local(fs: fsspec.AbstractFileSystem) -> bool:
    """Whether ``fs`` is the local disk."""
    protocol = fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)
    return "file" in protocol or "local" in protocol


def display_path(fs: fsspec.AbstractFileSystem, path: str) -> str:
    """How a file is named in messages and quarantine rows: its path, with protocol if not local."""
    return path if is_local(fs) else fs.unstrip_protocol(path)


def fresh_ls(fs: fsspec.AbstractFileSystem, path: str) -> list[str]:
    """The paths in folder ``path``, listed now (not from fsspec's listing cache: other processes
    write here too); empty when the folder is absent."""
    fs.invalidate_cache(path)
    try:
        return fs.ls(path, detail=False)
    except FileNotFoundError:
        return []


def _tmp_path(path: str, tmp_dir: str | None) -> str:
    """A fresh temporary file name: ``<tmp_dir>/_tmp-<hex>`` (default: beside ``path``)."""
    folder = posixpath.dirname(path) if tmp_dir is None else tmp_dir.rstrip("/")
    return f"{folder}/_tmp-{uuid.uuid4().hex}"


def _write_synced(path: str, data: bytes, mode: int) -> None:
    """Create the local file ``path`` (which must not exist) with ``data``, flushed to disk."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_put(
    fs: fsspec.AbstractFileSystem, path: str, data: bytes, *, tmp_dir: str | None = None
) -> None:
    """Replace ``path`` in one step: a reader sees the old content or the new, never a part.

    On the local disk: write a temporary file (in ``tmp_dir``, default beside ``path``; it must
    be on the same disk), fsync it, rename it over ``path``. Elsewhere (object stores, memory):
    one put, which those stores make atomic. The folder of ``path`` is created if missing.
    """
    fs.makedirs(posixpath.dirname(path), exist_ok=True)
    if not is_local(fs):
        fs.pipe_file(path, data)
        return
    tmp = _tmp_path(path, tmp_dir)
    try:
        _write_synced(tmp, data, 0o666)
        os.replace(tmp, path)
    except BaseException:
        if os.path.lexists(tmp):
            os.unlink(tmp)
        raise


def exclusive_put(
    fs: fsspec.AbstractFileSystem,
    path: str,
    data: bytes,
    *,
    tmp_dir: str | None = None,
    mode: int = 0o666,
) -> None:
    """Create ``path`` with ``data`` only if it does not exist yet (``FileExistsError``
    otherwise): of two writers racing for one name, exactly one wins.

    On the local disk the file appears whole or not at all: a temporary file (in ``tmp_dir``,
    default beside ``path``; created with permission bits ``mode``) is written and fsynced, then
    hard-linked to ``path``, which fails if ``path`` exists. Elsewhere: the filesystem's
    exclusive create (``"xb"``) where it has one, else a check then a put (not race-free: such
    a store offers nothing better).
    """
    if is_local(fs):
        tmp = _tmp_path(path, tmp_dir)
        try:
            _write_synced(tmp, data, mode)
            os.link(tmp, path)  # atomic, and fails if path exists
        finally:
            if os.path.lexists(tmp):
                os.unlink(tmp)
        return
    try:
        with fs.open(path, "xb") as f:
            f.write(data)
        return
    except (NotImplementedError, ValueError, TypeError):
        pass  # this filesystem has no exclusive create: check, then write
    if fs.exists(path):
        raise FileExistsError(path)
    fs.pipe_file(path, data)


# ============================================================================ JSON
# ijson's errors; yajl2_c raises UnicodeDecodeError (a ValueError) on a lone low surrogate escape.
JSON_PARSE_ERRORS = (ijson.JSONError, ValueError)


def loads(text: str | bytes) -> object:
    """One JSON document held in memory (a JSON Lines line), under the same policy as
    ``iter_json`` for non-finite tokens: ``NaN``/``Infinity``/``-Infinity`` as those strings."""
    return json.loads(text, parse_constant=str)


class _Repairable(ValueError):
    """Raised by the fast pass where the raw bytes hold what only ``TolerantJson`` reads right."""


def iter_json(
    open_file: Callable[[], AbstractContextManager[BinaryIO]], prefix: str = "item"
) -> Iterator[object]:
    """The items at ijson ``prefix`` of the JSON file that ``open_file()`` opens (positioned
    where the JSON starts), read under the module's policy for what is not JSON.

    Parses the raw bytes first; on an error ``TolerantJson`` repairs, parses again through it
    and skips the items already given. An error it cannot repair is raised (one of
    ``JSON_PARSE_ERRORS``) after the items before it were given, so a caller can keep them.
    """
    given = 0
    try:
        with open_file() as raw:
            for item in ijson.items(_Watched(raw), prefix, use_float=True):
                given += 1
                yield item
        return
    except JSON_PARSE_ERRORS as exc:
        if not tolerant_may_help(exc):
            raise
    with open_file() as raw:
        for i, item in enumerate(ijson.items(TolerantJson(raw), prefix, use_float=True)):
            if i >= given:
                yield item


def tolerant_may_help(exc: Exception) -> bool:
    """Whether a parse error may come from what ``TolerantJson`` repairs: a bare NaN/Infinity
    token (yajl: "invalid char"), a number out of range ("overflow"), bytes that are not UTF-8
    or a surrogate escape."""
    if isinstance(exc, (UnicodeDecodeError, _Repairable)):
        return True
    message = str(exc)
    return any(
        hint in message for hint in ("invalid char", "NaN", "Infinity", "UTF8", "utf-8", "overflow")
    )


class _Watched:
    """The raw file for the fast pass, stopping it (``_Repairable``) at a high surrogate escape:
    yajl would read a lone one as ``?`` without an error, so such files take the tolerant pass
    (which keeps surrogate pairs and marks lone ones)."""

    _HIGH_SURROGATE = re.compile(rb"\\u[dD][89abAB]")

    def __init__(self, raw) -> None:
        self._raw = raw
        self._tail = b""

    def read(self, n: int = -1) -> bytes:
        data = self._raw.read(n)
        if self._HIGH_SURROGATE.search(self._tail + data):
            raise _Repairable("surrogate escape: read through TolerantJson")
        self._tail = data[-5:]
        return data


class TolerantJson:
    """A binary file wrapper that lets ijson parse on past non-JSON tokens and bad text, under
    the policy of the module docstring: outside strings, ``NaN``/``Infinity``/``-Infinity`` and
    numbers beyond yajl's range become strings; inside strings, bytes that are not UTF-8 and
    lone surrogate escapes become the escape of ``BAD_TEXT``. Surrogate pairs, other escapes and
    valid UTF-8 pass through unchanged.

    About 4x slower than the raw file: ``iter_json`` uses it only after the fast parser failed.
    """

    _OUTSIDE = re.compile(
        rb'"|-?Infinity|NaN'
        rb"|(?<![0-9.eE+-])-?(?:\d{19,}(?:\.\d+)?(?:[eE][+-]?\d+)?|\d+(?:\.\d+)?[eE][+-]?\d{3,})"
        rb"(?![0-9.eE+-])"
    )
    _TOKEN_TAIL = re.compile(rb"[0-9A-Za-z.+-]+\Z")  # a token or number the next chunk may go on
    _IN_STRING = re.compile(
        rb"(?P<plain>[^\"\\\x80-\xff]+)"
        rb"|(?P<pair>\\u[dD][89abAB][0-9a-fA-F]{2}\\u[dD][c-fC-F][0-9a-fA-F]{2})"
        rb"|(?P<lone>\\u[dD][89a-fA-F][0-9a-fA-F]{2})"
        rb"|(?P<escape>\\u[0-9a-fA-F]{4}|\\[^u])"
        rb"|(?P<utf8>[\xc2-\xdf][\x80-\xbf]|\xe0[\xa0-\xbf][\x80-\xbf]"
        rb"|[\xe1-\xec\xee\xef][\x80-\xbf]{2}|\xed[\x80-\x9f][\x80-\xbf]"
        rb"|\xf0[\x90-\xbf][\x80-\xbf]{2}|[\xf1-\xf3][\x80-\xbf]{3}|\xf4[\x80-\x8f][\x80-\xbf]{2})"
        rb"|(?P<quote>\")"
        rb"|(?P<bad>[\x80-\xff]+)"
        rb"|(?P<other>\\)",
        re.S,
    )
    _BAD = ("\\u%04x" % ord(BAD_TEXT)).encode()
    _HOLD = 12  # the longest token (a surrogate pair escape) cut by a chunk boundary waits

    def __init__(self, raw, chunk: int = 1 << 16) -> None:
        self._raw, self._chunk = raw, chunk
        self._buf = b""
        self._in_string = False
        self._eof = False

    def read(self, n: int = -1) -> bytes:
        if n == 0:
            return b""
        out = b""
        while not out and not (self._eof and not self._buf):
            data = b"" if self._eof else self._raw.read(self._chunk)
            self._eof = self._eof or not data
            out = self._convert(self._buf + data)
        return out

    def _convert(self, buf: bytes) -> bytes:
        """Convert what can be converted; keep an unfinished tail in ``self._buf``."""
        out = bytearray()
        pos, size = 0, len(buf)
        while pos < size:
            if self._in_string:
                m = self._IN_STRING.match(buf, pos)
                kind = m.lastgroup
                if kind != "plain" and not self._eof and m.start() > size - self._HOLD:
                    break  # the token may continue in the next chunk
                if kind == "quote":
                    self._in_string = False
                    out += b'"'
                elif kind in ("lone", "bad"):
                    out += self._BAD
                else:
                    out += m.group()
                pos = m.end()
                continue
            m = self._OUTSIDE.search(buf, pos)
            if m is None or (not self._eof and m.group() != b'"' and m.end() == size):
                # No token, or one that may go on in the next chunk: keep the tail that may be
                # the start of a token or number.
                end = size if self._eof else max(pos, size - self._HOLD)
                if not self._eof and (tail := self._TOKEN_TAIL.search(buf, pos, end)):
                    end = tail.start()
                if m is not None:
                    end = min(end, m.start())
                out += buf[pos:end]
                pos = end
                break
            out += buf[pos : m.start()]
            token = m.group()
            out += token if token == b'"' else b'"' + token + b'"'
            self._in_string = token == b'"'
            pos = m.end()
        self._buf = buf[pos:]
        return bytes(out)


def npy_bytes(array) -> bytes:
    """``array`` as ``.npy`` bytes, never pickled (``allow_pickle=False``): how every bundle array
    is written."""
    import io as _io

    import numpy as np

    buf = _io.BytesIO()
    np.save(buf, np.ascontiguousarray(array), allow_pickle=False)
    return buf.getvalue()
