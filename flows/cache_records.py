"""Prefect result records that are data only: JSON, authenticated, else recomputed.

Prefect reads a result record back with whatever serializer the record itself names, so anyone
who can write to the cache folder (the store's ``_cache/prefect``, often a shared bucket) could
make the next run unpickle their code. The storages here wrap Prefect's local and remote file
systems: on write a record gets a first line with an HMAC-SHA256 tag over its name and bytes; on
read a record whose tag does not verify, that is not JSON, or that names a serializer other than
plain ``json`` is refused *before* Prefect parses it. Prefect's cache lookup
(``ResultStore.exists``) treats any read error as "no record", so a refused record is a cache
miss: the task runs again and writes a good record in its place.

The key never lives in the store (``benchroute.sealing``: ``BENCHROUTE_CACHE_KEY``, else a key
file); records written under another key (another machine, an older benchroute) are recomputed
once.
"""

from __future__ import annotations

import json
import logging
import os
import posixpath

from prefect._internal.compatibility.async_dispatch import async_dispatch
from prefect.filesystems import LocalFileSystem, RemoteFileSystem

from benchroute import sealing

MAGIC = b"benchroute-cache-record/1 hmac-sha256="
KEY_ENV = sealing.KEY_ENV
_JSON_DECODER = "prefect.serializers.prefect_json_object_decoder"

log = logging.getLogger("benchroute.cache")


class UntrustedRecord(ValueError):
    """A cache record that is not ours or not plain JSON; Prefect treats it as missing."""


def seal(name: str, body: bytes) -> bytes:
    """The record as stored: the tag line, then Prefect's bytes unchanged."""
    return MAGIC + sealing.tag(name, body) + b"\n" + body


def open_record(name: str, data: bytes) -> bytes:
    """Prefect's bytes of a stored record, or ``UntrustedRecord`` (nothing is deserialized)."""
    header, newline, body = data.partition(b"\n")
    if not newline or not header.startswith(MAGIC):
        raise UntrustedRecord("no authentication tag")
    if not sealing.verifies(name, body, header[len(MAGIC):]):
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
