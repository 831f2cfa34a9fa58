"""The router bundle manifest: its schema version and the JSON Schema that validates it."""

from __future__ import annotations

import json
from functools import lru_cache
from importlib import resources

import jsonschema

SCHEMA_VERSION = 1
KNOWN_SCHEMA_VERSIONS = frozenset({1})
MANIFEST_FILE = "manifest.json"
ALLOWED_SUFFIXES = (".parquet", ".npy", ".json")


class ManifestError(ValueError):
    """A manifest that is not valid (message names the bundle and the problem)."""


@lru_cache(maxsize=1)
def json_schema() -> dict:
    text = resources.files("benchroute.schemas").joinpath("manifest.schema.json").read_text()
    return json.loads(text)


def check_manifest(manifest: dict, where: str = "") -> dict:
    """Validate a manifest dict; unknown schema versions and unsafe file paths are refused."""
    label = where or manifest.get("name", "?")
    version = manifest.get("schema_version")
    if version not in KNOWN_SCHEMA_VERSIONS:
        raise ManifestError(
            f"{label}: manifest schema_version {version!r} is not one this benchroute knows "
            f"({sorted(KNOWN_SCHEMA_VERSIONS)}); upgrade benchroute to read it"
        )
    try:
        jsonschema.validate(manifest, json_schema())
    except jsonschema.ValidationError as exc:
        path = "/".join(str(p) for p in exc.absolute_path) or "(top)"
        raise ManifestError(f"{label}: manifest.json invalid at {path}: {exc.message}") from exc
    for rel in manifest["files"]:
        check_relpath(rel, label)
    return manifest


def check_relpath(rel: str, label: str = "") -> str:
    """A file path inside a bundle: relative, no ``..``, no backslashes, an allowed suffix."""
    parts = rel.split("/")
    if (
        not rel
        or rel.startswith("/")
        or "\\" in rel
        or ":" in rel
        or any(p in ("", ".", "..") for p in parts)
        or rel == MANIFEST_FILE
    ):
        raise ManifestError(f"{label}: file path {rel!r} escapes the bundle folder or is not allowed")
    if not rel.endswith(ALLOWED_SUFFIXES):
        raise ManifestError(f"{label}: file {rel!r} is not Parquet, .npy or JSON")
    return rel
