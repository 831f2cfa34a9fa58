"""The registry of bundle versions: list, show, pin, roll back, garbage-collect."""

from __future__ import annotations

from benchroute.artifacts.bundle import BundleError, BundleStore


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


def unpin(store_url: str, name: str, ref: str) -> None:
    BundleStore(store_url).delete_ref(name, ref)


def rollback(store_url: str, name: str, to: str | None = None) -> str:
    """Move ``latest`` to ``to`` (a version or ref), or to the version before the current one."""
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
    bs.set_ref(name, "latest", target)
    return target


def gc(store_url: str, name: str, keep: int = 3, dry_run: bool = False) -> list[str]:
    """Delete versions beyond the newest ``keep``, never one a ref (latest or a pin) points at."""
    bs = BundleStore(store_url)
    protected = set(bs.refs(name).values())
    versions = bs.versions(name)
    doomed = [v for v in versions[: max(len(versions) - keep, 0)] if v not in protected]
    if not dry_run:
        for v in doomed:
            # The manifest goes first, so a half-deleted version is invisible, never half-readable.
            bs.fs.rm(bs.path(name, v, "manifest.json"))
            bs.fs.rm(bs.path(name, v), recursive=True)
    return doomed
