"""Prefect result records that are data only: JSON, authenticated, else recomputed.

Prefect reads a result record back with whatever serializer the record itself names, so anyone
who can write to the cache folder (the store's ``_cache/prefect``, often a shared bucket) could
make the next run unpickle their code. The storages here wrap Prefect's local and remote file
systems: on write a record gets a first line with an HMAC-SHA256 tag over its name and bytes; on
read a record whose tag does not verify, that is not JSON, or that names a serializer other than
plain ``json`` is refused *before* Prefect parses it. Prefect's cache lookup
(``ResultStore.exists``) treats any read error as "no record", so a refused record is a cache
miss: the task runs again and writes a good record in its place.

The key never lives in the store: ``BENCHROUTE_CACHE_KEY`` (set the same value on every machine
that shares a cache), else a key file created once (mode 0600) at
``$XDG_CONFIG_HOME/benchroute/cache.key`` (``~/.config/...``), else under ``PREFECT_HOME``.
Records written under another key (another machine, an older benchroute) are recomputed once.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import posixpath
import secrets
import threading
from pathlib import Path

import fsspec
from prefect._internal.compatibility.async_dispatch import async_dispatch
from prefect.filesystems import LocalFileSystem, RemoteFileSystem

from benchroute import settings
from benchroute.io import exclusive_put

MAGIC = b"benchroute-cache-record/1 hmac-sha256="
KEY_ENV = settings.CACHE_KEY
_JSON_DECODER = "prefect.serializers.prefect_json_object_decoder"

log = logging.getLogger("benchroute.cache")


class UntrustedRecord(ValueError):
    """A cache record that is not ours or not plain JSON; Prefect treats it as missing."""


# ============================================================================ the key
_keys: dict[str, bytes] = {}
_key_lock = threading.Lock()


def key_dirs() -> list[Path]:
    """Where the key file may live, in order of preference."""
    dirs = [settings.config_home() / "benchroute"]
    try:
        from prefect.settings import get_current_settings

        dirs.append(Path(get_current_settings().home))
    except Exception:  # noqa: BLE001 - no Prefect settings: the config dir alone
        pass
    return dirs


def cache_key() -> bytes:
    """The HMAC key: ``$BENCHROUTE_CACHE_KEY``, else the key file (created once, 0600)."""
    if env := settings.cache_key():
        return env.encode()
    errors = []
    for d in key_dirs():
        path = d / "cache.key"
        with _key_lock:
            if str(path) in _keys:
                return _keys[str(path)]
            try:
                key = _read_or_create(path)
            except OSError as exc:
                errors.append(f"{path}: {exc}")
                continue
            _keys[str(path)] = key
            return key
    raise RuntimeError(f"no cache key: set {KEY_ENV} ({'; '.join(errors)})")


def _read_or_create(path: Path) -> bytes:
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        try:  # atomic create-if-absent (mode 0600): a concurrent creator's key wins
            exclusive_put(fsspec.filesystem("file"), str(path), secrets.token_hex(32).encode(),
                          mode=0o600)
        except FileExistsError:
            pass
    key = path.read_bytes().strip()
    if len(key) < 32:
        raise OSError(f"key file {path} is too short")
    return key


# ============================================================================ records
def _tag(name: str, body: bytes) -> bytes:
    return hmac.new(cache_key(), name.encode() + b"\0" + body, hashlib.sha256).hexdigest().encode()


def seal(name: str, body: bytes) -> bytes:
    """The record as stored: the tag line, then Prefect's bytes unchanged."""
    return MAGIC + _tag(name, body) + b"\n" + body


def open_record(name: str, data: bytes) -> bytes:
    """Prefect's bytes of a stored record, or ``UntrustedRecord`` (nothing is deserialized)."""
    header, newline, body = data.partition(b"\n")
    if not newline or not header.startswith(MAGIC):
        raise UntrustedRecord("no authentication tag")
    if not hmac.compare_digest(header[len(MAGIC):], _tag(name, body)):
        raise UntrustedRecord("authentication tag does not verify")
    try:
        record = json.loads(body)
        serializer = record["metadata"]["serializer"]
    except (ValueError, TypeError, KeyError):
        raise UntrustedRecord("not a JSON result record") from None
    if not (
        isinstance(serializer, dict) and serializer.get("type") == "json"
        and serializer.get("jsonlib", "json") == "json"
        and serializer.get("object_decoder", _JSON_DECODER) in (_JSON_DECODER, None)
        and not serializer.get("loads_kwargs")
        and isinstance(record.get("result"), str)
    ):
        kind = serializer.get("type") if isinstance(serializer, dict) else type(serializer).__name__
        raise UntrustedRecord(f"serializer {kind!r} is not plain json")
    return body


def _refused(where: str, exc: UntrustedRecord) -> None:
    msg = "cache record %s refused (%s); treating it as missing, the task runs again"
    try:
        from prefect import get_run_logger

        get_run_logger().warning(msg, where, exc)
    except Exception:  # noqa: BLE001 - outside a run: the module logger
        log.warning(msg, where, exc)


class _Guarded:
    """``read_path`` / ``write_path`` over a Prefect file system block, sealed and checked."""

    def _record_name(self, path: str) -> str:
        return posixpath.basename(str(self._resolve_path(path)).replace(os.sep, "/"))

    def _check(self, path: str, data: bytes) -> bytes:
        try:
            return open_record(self._record_name(path), data)
        except UntrustedRecord as exc:
            _refused(str(self._resolve_path(path)), exc)
            raise

    async def aread_path(self, path: str) -> bytes:
        return self._check(path, await super().aread_path(path))

    @async_dispatch(aread_path)
    def read_path(self, path: str) -> bytes:
        return self._check(path, super().read_path(path, _sync=True))

    async def awrite_path(self, path: str, content: bytes) -> str:
        return await super().awrite_path(path, seal(self._record_name(path), content))

    @async_dispatch(awrite_path)
    def write_path(self, path: str, content: bytes) -> str:
        return super().write_path(path, seal(self._record_name(path), content), _sync=True)


class SealedLocalFileSystem(_Guarded, LocalFileSystem):
    """A local folder of sealed, JSON-only result records."""

    _block_type_name = "Benchroute Sealed Local File System"


class SealedRemoteFileSystem(_Guarded, RemoteFileSystem):
    """A remote (fsspec) folder of sealed, JSON-only result records."""

    _block_type_name = "Benchroute Sealed Remote File System"
