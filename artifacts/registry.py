"""The registry of bundle versions: list, show, pin, roll back, garbage-collect.

Each of these is one atomic put or delete, except ``rollback`` and ``gc``, which are ordered so
that a kill between their steps is harmless or finished by the next run: ``rollback`` clears the
intents of interrupted publishes before it moves ``latest`` (so a later ``publish`` never moves
it forward again), ``gc`` removes a version's manifest before its folder (a killed ``gc`` leaves
an invisible folder that the next ``gc`` removes as an orphan).
"""

from __future__ import annotations

from benchroute.artifacts.bundle import BundleError, BundleStore
from benchroute.faults import crash_point


def list_versions(store_url: str, name: str) -> list[dict]:
    """Every published version of ``name``, oldest first, with its refs and size."""
    bs = BundleStore(store_url)
    refs = bs.refs(name)
    out = []
    for v in bs.versions(name):
        m = bs.manifest(name, v)
        out.append(
            {
                "version": v,
                "created": m.get("created"),
                "content_hash": m.get("content_hash", "")[:12],
                "files": len(m.get("files", {})),
                "bytes": sum(f["size"] for f in m.get("files", {}).values()),
                "refs": sorted(r for r, rv in refs.items() if rv == v),
            }
        )
    return out


def show(store_url: str, name: str, version: str = "latest") -> dict:
    bs = BundleStore(store_url)
    return bs.manifest(name, bs.resolve(name, version))


def pin(store_url: str, name: str, version: str, ref: str) -> str:
    """Point the ref ``ref`` (e.g. ``prod``) at a version; pinned versions survive ``gc``."""
    if ref == "latest":
        raise BundleError("use rollback to move 'latest'")
    bs = BundleStore(store_url)
    resolved = bs.resolve(name, version)
    bs.set_ref(name, ref, resolved)
    return resolved


def rollback(store_url: str, name: str, to: str | None = None) -> str:
    """Move ``latest`` to ``to`` (a version or ref), or to the version before the current one.

    A deliberate move: a publish that was killed after its manifest and before moving ``latest``
    is dropped first, so no later run completes it over this rollback."""
    bs = BundleStore(store_url)
    versions = bs.versions(name)
    if to is not None:
        target = bs.resolve(name, to)
    else:
        current = bs.ref(name)
        older = [v for v in versions if current is None or v < current]
        if not older:
            raise BundleError(f"bundle {name}: no version older than {current} to roll back to")
        target = older[-1]
    bs.clear_pending(name)
    crash_point("rollback.cleared")
    bs.set_ref(name, "latest", target)
    return target


def gc(store_url: str, name: str, keep: int = 3, dry_run: bool = False) -> list[str]:
    """Delete versions beyond the newest ``keep``, never one a ref (latest or a pin) points at
    nor one an interrupted publish is still to make ``latest``; and the orphaned folders a killed
    ``gc`` or publisher left (``BundleStore.orphans``). Returns both, versions first."""
    bs = BundleStore(store_url)
    protected = set(bs.refs(name).values()) | set(bs.pending(name))
    versions = bs.versions(name)
    doomed = [v for v in versions[: max(len(versions) - keep, 0)] if v not in protected]
    if not dry_run:
        for v in doomed:
            # The manifest goes first, so a half-deleted version is invisible, never half-readable.
            bs.fs.rm(bs.path(name, v, "manifest.json"))
            crash_point("gc.manifest_removed")
            bs.fs.rm(bs.path(name, v), recursive=True)
    orphans = bs.orphans(name)
    if not dry_run:
        for v in orphans:
            bs.fs.rm(bs.path(name, v), recursive=True)
    return doomed + [v for v in orphans if v not in doomed]
