"""HMAC tags for what benchroute writes into a store and later trusts: Prefect's cache records
(``flows.cache_records``) and the refresh record (``artifacts.stages.refresh``).

Anyone who can write to a store can write these files too; a tag over the file's name and bytes,
under a key that never lives in the store, tells ours from theirs. The key:
``BENCHROUTE_CACHE_KEY`` (set the same value on every machine that shares a store), else a key
file created once (mode 0600) at ``$XDG_CONFIG_HOME/benchroute/cache.key`` (``~/.config/...``),
else under ``PREFECT_HOME``. What was tagged under another key (another machine, an older
benchroute) does not verify and is recomputed once.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import threading
from pathlib import Path

import fsspec

from benchroute import settings
from benchroute.io import exclusive_put

KEY_ENV = settings.CACHE_KEY

_keys: dict[str, bytes] = {}
_key_lock = threading.Lock()


def key_dirs():
    """Where the key file may live, in order of preference (Prefect's home is looked up only
    when the config dir cannot hold it: importing Prefect costs a no-op refresh a second)."""
    yield settings.config_home() / "benchroute"
    try:
        from prefect.settings import get_current_settings

        yield Path(get_current_settings().home)
    except Exception:  # noqa: BLE001 - no Prefect settings: the config dir alone
        pass


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


def tag(name: str, body: bytes) -> bytes:
    """The hex HMAC-SHA256 of ``name`` and ``body`` under ``cache_key()``."""
    return hmac.new(cache_key(), name.encode() + b"\0" + body, hashlib.sha256).hexdigest().encode()


def verifies(name: str, body: bytes, claimed: bytes) -> bool:
    """Whether ``claimed`` is ``tag(name, body)`` (constant time)."""
    return hmac.compare_digest(claimed, tag(name, body))
