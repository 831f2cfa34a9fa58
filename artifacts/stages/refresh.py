"""Whether a refresh has anything to do, decided before any Prefect run starts.

A refresh with nothing new (the scheduled case, most hours) used to start a temporary Prefect
server, run every task and find each cached: ~17 s for nothing. ``check`` decides it from what
is cheap to read: the landing zone's fingerprints, the labels' basis, the model card, and the
store's data key (``stages.fit.data_key``: the commit log's parts, the ingested units, both specs,
the code version) against the key the last refresh recorded with the bundle version it left
``latest``. ``record`` writes that key after a refresh; the record is read back from the store, so
it counts only when its HMAC tag verifies under this machine's key (``benchroute.sealing``, the
key of the Prefect cache records) and the bundle version it names is still the bundle's
``latest``.

The key is taken before the refit (``data_key_now``) and recorded after it: a store that changed
in between leaves an older key, so the next refresh runs (never the reverse).
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from benchroute.artifacts.specs import EmbedSpec, RouterSpec, Selection
from benchroute.artifacts.store import Store
from benchroute import sealing
from benchroute.io import atomic_put
from fsspec.core import url_to_fs

RECORD_DIR = "_cache/refresh"


@dataclass(frozen=True)
class RefreshCheck:
    """``noop``: nothing to ingest, relabel, re-card, embed or refit, and the bundle that holds
    it is ``latest``; ``reason``: why not, or what stays; ``units``: run dumps found."""

    noop: bool
    reason: str
    units: int = 0
    version: str | None = None


def _record_path(store_url: str, name: str) -> str:
    return f"{store_url.rstrip('/')}/{RECORD_DIR}/{name}.json"


def data_key_now(store_url: str, embed: EmbedSpec, router: RouterSpec) -> str:
    """The data key a refresh's bundle is built under (the whole store, ``Selection()``)."""
    from benchroute.artifacts.stages.fit import data_key
    from benchroute.transforms.embedder import resolve

    _, identity = resolve(embed.embedder)  # no model load where the width is known
    return data_key(Store(store_url), identity.id, Selection(), router)


def _fields(name: str, key: str, version: str) -> dict:
    return {"name": name, "data_key": key, "version": version}


def _body(fields: dict) -> bytes:
    """The bytes a record's tag covers."""
    return json.dumps(fields, sort_keys=True).encode()


def record(store_url: str, name: str, key: str, version: str) -> None:
    """Remember that bundle ``name`` ``version`` holds the data under ``key``, tagged
    (``benchroute.sealing``: an HMAC under a key that is not in the store)."""
    fs, path = url_to_fs(_record_path(store_url, name))
    fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
    fields = _fields(name, key, version)
    tag = sealing.tag(f"refresh/{name}", _body(fields)).decode()
    atomic_put(fs, path, json.dumps({**fields, "tag": tag}).encode())


def _recorded(store_url: str, name: str) -> dict | None:
    """The last record, or ``None`` when absent, not the shape ``record`` writes, or not tagged
    under this machine's key (written by someone else: the refresh then runs)."""
    fs, path = url_to_fs(_record_path(store_url, name))
    try:
        rec = json.loads(fs.cat_file(path))
    except (FileNotFoundError, ValueError, UnicodeDecodeError):
        return None
    ok = (isinstance(rec, dict) and rec.get("name") == name
          and all(isinstance(rec.get(k), str) for k in ("data_key", "version", "tag")))
    if not ok or not sealing.verifies(f"refresh/{name}", _body(_fields(name, rec["data_key"], rec["version"])),
                                      rec["tag"].encode()):
        return None
    return rec


def check(
    landing: str, store_url: str, name: str, embed: EmbedSpec, router: RouterSpec, *,
    kinds: list[str] | None = None, rules: str | None = None, model_cards: str | None = None,
) -> RefreshCheck:
    """Whether a refresh of ``landing`` into ``store_url`` would change nothing (see the module)."""
    from benchroute.artifacts.bundle import BundleError, BundleStore
    from benchroute.artifacts.model_cards import sync_cards
    from benchroute.artifacts.stages.ingest import (
        discover_landing,
        new_units,
        stale_labels,
    )
    from benchroute.transforms.ingest import find_cards

    rec = _recorded(store_url, name)
    if rec is None:
        return RefreshCheck(False, "no refresh recorded for this bundle")
    store = Store(store_url)
    units = discover_landing(landing, kinds)
    new = new_units(store, units)
    if new:
        return RefreshCheck(False, f"{len(new)} new run dumps", len(units))
    stale = stale_labels(store, rules)
    if stale:
        return RefreshCheck(False, f"labels are stale ({stale})", len(units))
    cards = sync_cards(store_url, find_cards([landing]), model_cards, write=False)
    if cards["changed"] or cards["files_changed"]:
        return RefreshCheck(False, "the model card changed", len(units))
    bundles = BundleStore(store_url)
    try:
        latest = bundles.resolve(name, "latest")
    except (BundleError, FileNotFoundError, ValueError):
        return RefreshCheck(False, "no latest bundle", len(units))
    if latest != rec["version"] or latest not in bundles.versions(name):
        return RefreshCheck(False, f"latest is {latest}, not the recorded {rec['version']}", len(units))
    if data_key_now(store_url, embed, router) != rec["data_key"]:
        return RefreshCheck(False, "the data, the specs or the code changed", len(units))
    return RefreshCheck(True, f"nothing new; {name} stays at {latest}", len(units), latest)


def bundle_info(store_url: str, name: str, version: str) -> dict:
    """What a refresh reports of a bundle version it left as it was (as ``publish_content``)."""
    from benchroute.artifacts.bundle import BundleStore

    bs = BundleStore(store_url)
    manifest = bs.manifest(name, version)
    files = manifest["files"]
    return {"name": name, "version": version, "url": bs.version_url(name, version), "created": False,
            "latest": version, "recovered": [], "files": len(files),
            "bytes": sum(int(f["size"]) for f in files.values()),
            "models": len(manifest.get("models", []))}


def noop_summary(landing: str, store_url: str, name: str, checked: RefreshCheck, seconds: float,
                 flow_run_id: str | None = None) -> dict:
    """What a refresh that found nothing to do reports (the keys of a full run's summary that
    apply, with ``noop`` and ``reason``)."""
    return {
        "flow_run_id": flow_run_id, "noop": True, "reason": checked.reason, "landing": landing,
        "store": store_url, "units": {"found": checked.units, "new": 0, "new_keys": []},
        "ingest": None, "cards": None,
        "embed": {"new": 0, "already_present": None, "partitions": 0, "seconds": 0.0,
                  "inputs_per_s": 0.0, "threads": [], "precision": []},
        "evaluation": {"ran": [], "cached": [], "skipped": []}, "fit_cached": None,
        "published": False, "bundle": bundle_info(store_url, name, checked.version),
        "seconds": seconds, "timings": {"check": seconds, "total": seconds},
    }


def noop_lines(summary: dict) -> list[str]:
    """A no-op refresh for a person."""
    b = summary["bundle"]
    return [f"refresh: {summary['units']['found']} run dumps in the landing zone, none new; "
            f"{summary['reason']} ({b['models']} models, {b['bytes']:,} bytes); {summary['seconds']} s",
            f"bundle: {b['url']}"]
