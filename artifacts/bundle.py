"""Router bundles: write, publish atomically, read and verify (docs/formats.md#router-bundles).

A bundle lives at ``<store>/bundles/<name>/<version>/``: data files (Parquet, ``.npy``, JSON
only — never pickles) and ``manifest.json``, which lists every file with its sha256 and size.
Publishing writes the data files, reads them back to verify them, and writes the manifest last
(one put, exclusive), so a version folder without a manifest is invisible; the ``latest`` ref
(``refs/latest.json``) moves only after that. A reader therefore sees the old bundle or the new
one, never a mix. Identical content (same files and metadata) publishes no new version.

A publish is also recoverable: before its first file it records its intent
(``<name>/_publishing/<version>.json``) and clears it only after ``latest`` moved. The next
``publish`` (or ``recover``) of the name finishes what a killed publisher left half-done: an
intent whose manifest landed moves ``latest`` there (unless a newer version is latest already),
one without a manifest older than ``STALE_PUBLISH_S`` is rolled back (its folder removed). A
deliberate ``rollback`` clears the intents first, so it is never undone by a later recovery.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import io
import json
import posixpath
import re
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
from fsspec.core import url_to_fs

from benchroute.faults import crash_point
from benchroute.io import atomic_put, exclusive_put, fresh_ls, npy_bytes  # noqa: F401 (npy_bytes: the bundle's encoder, re-exported)
from benchroute.schemas.manifest import (
    MANIFEST_FILE,
    SCHEMA_VERSION,
    ManifestError,
    check_manifest,
    check_relpath,
    json_schema,
)

BUNDLES_DIR = "bundles"
REFS_DIR = "refs"
PENDING_DIR = "_publishing"  # one intent file per publish in progress (or killed)
# A publish whose manifest has not landed this long after it started is dead: rolled back.
STALE_PUBLISH_S = 3600.0


class BundleError(RuntimeError):
    """A bundle that cannot be published or loaded (message names the bundle and file)."""


_PROPS = json_schema()["properties"]
NAME_RE = re.compile(_PROPS["name"]["pattern"])
VERSION_RE = re.compile(_PROPS["version"]["pattern"])
REF_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*$")


def check_name(name, where: str = "") -> str:
    """A bundle name as the manifest schema allows it (one folder, never ``..`` or a path)."""
    if not isinstance(name, str) or not NAME_RE.fullmatch(name):
        raise BundleError(f"{where or 'bundle'}: bad bundle name {name!r}")
    return name


def check_version(version, where: str = "") -> str:
    """A version id as the manifest schema allows it (``<UTC time>Z-<12 hex>``, one folder)."""
    if not isinstance(version, str) or not VERSION_RE.fullmatch(version):
        raise BundleError(f"{where or 'bundle'}: bad version {version!r}")
    return version


# ------------------------------------------------------------------------------ encoding


def parquet_bytes(df) -> bytes:
    """A polars frame as zstd Parquet bytes."""
    buf = io.BytesIO()
    df.write_parquet(buf, compression="zstd")
    return buf.getvalue()


def json_bytes(obj) -> bytes:
    return json.dumps(obj, indent=1, sort_keys=True, allow_nan=False).encode()


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@dataclass(frozen=True)
class BundleContent:
    """What a builder hands to ``publish``: named file bytes plus manifest metadata."""

    name: str
    files: Mapping[str, bytes]
    meta: Mapping = field(default_factory=dict)  # embedder, rules, sources, parameters, …

    def content_hash(self) -> str:
        return content_digest({rel: sha256(data) for rel, data in self.files.items()}, dict(self.meta))


# Manifest keys that describe the publication, not the content (everything else is metadata that
# can change an answer, and is covered by the content hash).
PUBLICATION_KEYS = frozenset({"schema_version", "name", "version", "content_hash", "created",
                              "code_version", "files"})


def content_digest(file_sha256: Mapping[str, str], meta: Mapping) -> str:
    """The content hash of a bundle: every file's path and sha256, and its metadata (embedder,
    rules, sources, parameters, evaluation, stability, models) as canonical JSON."""
    h = hashlib.sha256()
    for rel in sorted(file_sha256):
        h.update(f"{rel}\0{file_sha256[rel]}\n".encode())
    h.update(json_bytes(dict(meta)))
    return h.hexdigest()


def manifest_digest(manifest: Mapping) -> str:
    """The content hash that a manifest's file list and metadata give (what ``publish`` wrote)."""
    meta = {k: v for k, v in manifest.items() if k not in PUBLICATION_KEYS}
    return content_digest({rel: e["sha256"] for rel, e in manifest["files"].items()}, meta)


@dataclass(frozen=True)
class Published:
    name: str
    version: str
    url: str
    created: bool  # False: identical content was already published as this version
    latest: str | None = None  # what ``latest`` names after this call
    # Versions this call made ``latest``, finishing publishes a killed run left half-done.
    recovered: tuple[str, ...] = ()


# ------------------------------------------------------------------------------ locations
class BundleStore:
    """The bundles of one store root (any fsspec URL)."""

    def __init__(self, store_url: str, **storage_options):
        self.url = str(store_url).rstrip("/")
        self.fs, root = url_to_fs(self.url, **storage_options)
        self.root = root.rstrip("/")

    def path(self, *parts: str) -> str:
        return "/".join([self.root, BUNDLES_DIR, *parts])

    def names(self) -> list[str]:
        return sorted(posixpath.basename(p.rstrip("/")) for p in fresh_ls(self.fs, self.path()))

    def versions(self, name: str) -> list[str]:
        """Published versions (folders named as a version id, with a manifest), oldest first
        (version ids sort by time)."""
        out = []
        for p in fresh_ls(self.fs, self.path(check_name(name))):
            v = posixpath.basename(p.rstrip("/"))
            if VERSION_RE.fullmatch(v) and self.fs.exists(f"{p}/{MANIFEST_FILE}"):
                out.append(v)
        return sorted(out)

    # refs ---------------------------------------------------------------------------
    def _ref_path(self, name: str, ref: str) -> str:
        check_name(name)
        if not isinstance(ref, str) or not REF_RE.fullmatch(ref):
            raise BundleError(f"bundle {name}: bad ref name {ref!r}")
        return self.path(name, REFS_DIR, f"{ref}.json")

    def ref(self, name: str, ref: str = "latest") -> str | None:
        """The version a ref names (None when there is no such ref); a ref file that is not
        ``{"version": <version id>}`` is refused, naming the file and the value."""
        p = self._ref_path(name, ref)
        if not self.fs.exists(p):
            return None
        with self.fs.open(p, "rb") as f:
            raw = f.read()
        try:
            version = json.loads(raw)["version"]
        except (ValueError, TypeError, KeyError) as exc:
            raise BundleError(f"ref file {p}: not {{\"version\": …}}: {raw[:200]!r}") from exc
        return check_version(version, f"ref file {p}")

    def refs(self, name: str) -> dict[str, str]:
        out = {}
        for p in fresh_ls(self.fs, self.path(name, REFS_DIR)):
            ref = posixpath.basename(p)
            if ref.endswith(".json"):
                out[ref[:-5]] = self.ref(name, ref[:-5])
        return out

    def set_ref(self, name: str, ref: str, version: str) -> None:
        p = self._ref_path(name, ref)
        if version not in self.versions(name):
            raise BundleError(f"bundle {name}: no published version {version!r}")
        atomic_put(self.fs, p, json_bytes({"version": version}), tmp_dir=_tmp_dir(p))

    def resolve(self, name: str, version: str = "latest") -> str:
        """A version id from a version id or a ref name (``latest``, a pin); only ever a version
        id (the schema's pattern), so the folder it names is one of this bundle's."""
        if version in self.versions(name):
            return version
        if isinstance(version, str) and VERSION_RE.fullmatch(version):
            raise BundleError(f"bundle {name} in {self.url}: no published version {version!r}")
        resolved = self.ref(name, version)
        if resolved is None:
            raise BundleError(f"bundle {name} in {self.url}: no version or ref {version!r}")
        return resolved

    def manifest(self, name: str, version: str) -> dict:
        p = self.path(check_name(name), check_version(version, f"bundle {name}"), MANIFEST_FILE)
        try:
            with self.fs.open(p, "rb") as f:
                data = json.loads(f.read())
        except FileNotFoundError as exc:
            raise BundleError(f"bundle {name}/{version}: no manifest.json") from exc
        except ValueError as exc:
            raise BundleError(f"bundle {name}/{version}: manifest.json is not JSON: {exc}") from exc
        return data

    # interrupted publishes -----------------------------------------------------------
    def _pending_path(self, name: str, version: str) -> str:
        return self.path(check_name(name), PENDING_DIR, f"{check_version(version)}.json")

    def pending(self, name: str) -> list[str]:
        """Versions whose publish recorded its intent and has not cleared it (running or killed)."""
        out = []
        for p in fresh_ls(self.fs, self.path(check_name(name), PENDING_DIR)):
            base = posixpath.basename(p)
            if base.endswith(".json") and VERSION_RE.fullmatch(base[:-5]):
                out.append(base[:-5])
        return sorted(out)

    def clear_pending(self, name: str, version: str | None = None) -> list[str]:
        """Drop the intent of ``version`` (default: of every version whose manifest landed, i.e.
        publishes that only have ``latest`` left to move). Returns the versions dropped."""
        if version is None:
            published = set(self.versions(name))
            versions = [v for v in self.pending(name) if v in published]
        else:
            versions = [version]
        for v in versions:
            p = self._pending_path(name, v)
            if self.fs.exists(p):
                self.fs.rm(p)
        return versions

    def recover(self, name: str, *, stale_after: float = STALE_PUBLISH_S) -> list[dict]:
        """Finish or roll back the publishes of ``name`` a killed run left half-done.

        An intent whose manifest landed: ``latest`` moves to that version unless it already names
        it or a newer one (then the intent is just dropped). An intent without a manifest is a
        publish still writing, or one that died before its manifest: after ``stale_after``
        seconds its folder and intent are removed. Returns ``{"version", "action"}`` per intent
        handled, ``action`` one of ``latest moved``, ``already latest``, ``superseded``,
        ``rolled back``.
        """
        done = []
        published = set(self.versions(name))
        for v in self.pending(name):
            if v in published:
                latest = self.ref(name)
                if latest is None or latest < v:
                    self.set_ref(name, "latest", v)
                    action = "latest moved"
                else:
                    action = "already latest" if latest == v else "superseded"
            elif _age_seconds(v) > stale_after:
                folder = self.path(name, v)
                if self.fs.exists(folder):
                    self.fs.rm(folder, recursive=True)
                action = "rolled back"
            else:
                continue
            self.clear_pending(name, v)
            done.append({"version": v, "action": action})
        return done

    def orphans(self, name: str) -> list[str]:
        """Version folders without a manifest and without a publish intent: left by a killed
        ``gc`` (it removes the manifest first) or a killed publisher of older code; invisible to
        readers, removed by ``registry.gc``. (A live publish always has its intent, written
        before its folder, and the intent is checked before the manifest.)"""
        pending = set(self.pending(name))
        out = []
        for p in fresh_ls(self.fs, self.path(check_name(name))):
            v = posixpath.basename(p.rstrip("/"))
            if (VERSION_RE.fullmatch(v) and v not in pending
                    and not self.fs.exists(self._pending_path(name, v))
                    and not self.fs.exists(f"{p}/{MANIFEST_FILE}")):
                out.append(v)
        return sorted(out)

    # publish ------------------------------------------------------------------------
    def publish(self, content: BundleContent, *, code_version: str) -> Published:
        """Publish ``content`` as a new version (or return the version that already holds it),
        after finishing any publish a killed run left half-done (``recover``)."""
        name = content.name
        for rel in content.files:
            check_relpath(rel, f"bundle {name}")
        recovered = tuple(r["version"] for r in self.recover(name) if r["action"] == "latest moved")
        digest = content.content_hash()
        for v in reversed(self.versions(name)):
            if self.manifest(name, v).get("content_hash") == digest:
                if self.ref(name) is None:
                    self.set_ref(name, "latest", v)
                return Published(name, v, self.version_url(name, v), created=False,
                                 latest=self.ref(name), recovered=recovered)

        now = dt.datetime.now(dt.UTC)
        version = f"{now:%Y%m%dT%H%M%S%fZ}-{digest[:12]}"
        folder = self.path(name, version)
        if self.fs.exists(f"{folder}/{MANIFEST_FILE}"):
            raise BundleError(f"bundle {name}: version {version} exists already")
        intent = self._pending_path(name, version)
        atomic_put(self.fs, intent, json_bytes({"version": version, "content_hash": digest,
                                                "started": now.isoformat()}),
                   tmp_dir=_tmp_dir(intent))
        crash_point("bundle.intent")
        try:
            self._write_version(name, version, folder, content, digest, now, code_version)
        except BaseException:
            self.clear_pending(name, version)  # nothing visible was written; gc removes the files
            raise
        crash_point("bundle.manifest")
        self.set_ref(name, "latest", version)
        crash_point("bundle.ref")
        self.clear_pending(name, version)
        return Published(name, version, self.version_url(name, version), created=True, latest=version,
                         recovered=recovered)

    def _write_version(self, name, version, folder, content, digest, now, code_version) -> None:
        """The data files, verified, then the manifest (exclusive): the version's commit."""
        files = {}
        for rel, data in sorted(content.files.items()):
            target = f"{folder}/{rel}"
            self.fs.makedirs(posixpath.dirname(target), exist_ok=True)
            self.fs.pipe_file(target, data)
            files[rel] = {"sha256": sha256(data), "size": len(data)}
        for rel, entry in files.items():  # verify what landed before making it visible
            with self.fs.open(f"{folder}/{rel}", "rb") as f:
                if sha256(f.read()) != entry["sha256"]:
                    raise BundleError(f"bundle {name}/{version}: {rel} did not verify after write")
        crash_point("bundle.files")
        manifest = {
            "schema_version": SCHEMA_VERSION,
            "name": name,
            "version": version,
            "content_hash": digest,
            "created": now.isoformat(),
            "code_version": code_version,
            **dict(content.meta),
            "files": files,
        }
        check_manifest(manifest, f"bundle {name}/{version}")
        try:
            exclusive_put(self.fs, f"{folder}/{MANIFEST_FILE}", json_bytes(manifest),
                          tmp_dir=_tmp_dir(f"{folder}/{MANIFEST_FILE}"))
        except FileExistsError as exc:
            raise BundleError(
                f"bundle {name}: another publisher wrote version {version} at the same time"
            ) from exc

    def version_url(self, name: str, version: str) -> str:
        """The URL of a version's folder (what ``open_bundle`` and ``load_router`` take)."""
        return f"{self.url}/{BUNDLES_DIR}/{name}/{version}"


def _age_seconds(version: str) -> float:
    """Seconds since a version id's time (its publish started then)."""
    started = dt.datetime.strptime(version.split("-", 1)[0], "%Y%m%dT%H%M%S%fZ")
    return (dt.datetime.now(dt.UTC) - started.replace(tzinfo=dt.UTC)).total_seconds()


# ------------------------------------------------------------------------------ loading
@dataclass(frozen=True)
class VerifiedBundle:
    """A bundle whose every file matched its manifest hash; files are held in memory."""

    url: str
    manifest: dict
    files: Mapping[str, bytes]

    def npy(self, rel: str) -> np.ndarray:
        try:
            return np.load(io.BytesIO(self.files[rel]), allow_pickle=False)
        except ValueError as exc:
            raise BundleError(f"{self.url}/{rel}: not a plain .npy array ({exc})") from exc

    def parquet(self, rel: str):
        """A Parquet file as a pyarrow Table (consumers need no polars)."""
        import pyarrow.parquet as pq

        return pq.ParquetFile(io.BytesIO(self.files[rel])).read()

    def json(self, rel: str):
        return json.loads(self.files[rel])


def open_bundle(url: str, name: str | None = None, version: str = "latest") -> VerifiedBundle:
    """Load and verify a bundle.

    ``url`` is a store root (with ``name``; without one, its ``default`` bundle), a bundle's folder
    (``<store>/bundles/<name>``) or a version folder (``…/<name>/<version>``). Every listed file
    is hashed; an unknown schema version, a file not in the manifest, a path escaping the folder,
    a size or hash mismatch, or a pickle in an ``.npy`` is refused with the file's name. The
    manifest's ``name`` and ``version`` must be the folder's (``…/<name>/<version>``), so a ref
    or a copied manifest cannot make another folder pass for this bundle.
    """
    fs, path = url_to_fs(str(url).rstrip("/"))
    path = path.rstrip("/")
    if fs.exists(f"{path}/{MANIFEST_FILE}"):
        folder = path
    else:
        if name is None and fs.isdir(f"{path}/{BUNDLES_DIR}"):
            name, store_root = "default", path  # a store root without a name: its default bundle
        elif name is None:
            parent, name = posixpath.dirname(path), posixpath.basename(path)
            store_root = posixpath.dirname(parent)
        else:
            store_root = path
        bs = BundleStore.__new__(BundleStore)
        bs.url, bs.fs, bs.root = str(url).rstrip("/"), fs, store_root
        folder = bs.path(name, bs.resolve(name, version))
    label = fs.unstrip_protocol(folder) if hasattr(fs, "unstrip_protocol") else folder
    try:
        with fs.open(f"{folder}/{MANIFEST_FILE}", "rb") as f:
            manifest = json.loads(f.read())
    except (FileNotFoundError, ValueError) as exc:
        raise BundleError(f"{label}: cannot read manifest.json: {exc}") from exc
    try:
        check_manifest(manifest, label)
    except ManifestError as exc:
        raise BundleError(str(exc)) from exc
    where = (posixpath.basename(posixpath.dirname(folder)), posixpath.basename(folder))
    if (manifest["name"], manifest["version"]) != where:
        raise BundleError(
            f"{label}: manifest is bundle {manifest['name']}/{manifest['version']}, "
            f"but was loaded from folder {where[0]}/{where[1]}"
        )
    # Everything that changes an answer (settings, embedder, models, file list) is covered by the
    # content hash, and the version id ends with it: an edited manifest is refused here, before
    # any of its settings is used.
    digest = manifest_digest(manifest)
    if digest != manifest["content_hash"] or not manifest["version"].endswith(f"-{digest[:12]}"):
        raise BundleError(
            f"{label}: manifest.json does not match its content hash (its settings, models or file "
            "list were changed after publishing)"
        )
    listed = set(manifest["files"]) | {MANIFEST_FILE}
    for full in fs.find(folder):
        rel = full[len(folder) + 1 :]
        if rel not in listed:
            raise BundleError(f"{label}: file {rel!r} is not listed in the manifest")
    files = {}
    for rel, entry in manifest["files"].items():
        try:
            with fs.open(f"{folder}/{rel}", "rb") as f:
                data = f.read()
        except FileNotFoundError as exc:
            raise BundleError(f"{label}: listed file {rel!r} is missing") from exc
        if len(data) != entry["size"]:
            raise BundleError(f"{label}: {rel} has {len(data)} bytes, manifest says {entry['size']}")
        if sha256(data) != entry["sha256"]:
            raise BundleError(f"{label}: {rel} does not match its sha256 in the manifest")
        files[rel] = data
    bundle = VerifiedBundle(label, manifest, files)
    for rel in files:
        if rel.endswith(".npy"):
            bundle.npy(rel)  # refuses object arrays (pickles) up front
    return bundle


# ------------------------------------------------------------------------------ puts
def _tmp_dir(path: str) -> str:
    """Where a put's temporary file goes: beside the bundle's folders (``_tmp-…``, skipped by
    every listing)."""
    return posixpath.dirname(posixpath.dirname(path))
