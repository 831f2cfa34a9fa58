"""Source readers: each maps one source format to the canonical tables and nothing else.

Every reader module exposes

- ``KIND``: the source name written to the ``source`` column (``"helm"``, ``"mmlu_pro"``…);
- ``find_units(fs, root) -> list[str]``: the units of this format found under ``root`` (a folder
  or a single file), each a path on ``fs``; a unit is what one ``read`` call ingests;
- ``read(url, *, names) -> IngestResult``: read one unit (``url`` is an fsspec URL or path).

``discover`` walks the paths a user gives and returns every unit with a content fingerprint, so
the store can skip units it already holds. Model card files (``model_cards.csv|yaml|yml``) are
not units: ``find_cards`` lists them, and a path holding only cards is not an unknown layout.
"""

from __future__ import annotations

import hashlib
import importlib
import posixpath
from dataclasses import dataclass
from types import ModuleType

import fsspec
from fsspec.core import url_to_fs

from benchroute.transforms.model_cards import CARD_FILE_NAMES

from .base import IngestResult, UnknownLayout, UnreadableSource

# Reader modules in the order discovery tries them; the first that claims a path owns it.
READER_MODULES = ("helm", "mmlu_pro", "alpaca_eval", "routellm", "mixinstruct", "long_table")


def reader(kind: str) -> ModuleType:
    if kind not in READER_MODULES:
        raise ValueError(f"unknown source kind {kind!r}; known: {', '.join(READER_MODULES)}")
    return importlib.import_module(f"{__name__}.{kind}")


@dataclass(frozen=True)
class Unit:
    """One thing one reader call ingests, with a fingerprint of its content."""

    kind: str
    url: str
    key: str
    fingerprint: str


def discover(urls: list[str], kinds: list[str] | None = None) -> list[Unit]:
    """Every unit under the given files or folders, in a stable order.

    ``kinds`` restricts the formats looked for (e.g. ``["long_table"]`` for a CSV that other
    readers would not claim). A path no reader claims raises ``UnknownLayout`` naming it.
    """
    units: list[Unit] = []
    for url in urls:
        fs, root = url_to_fs(url)
        if not fs.exists(root):
            raise FileNotFoundError(f"source not found: {url}")
        found: list[Unit] = []
        claimed: set[str] = set()
        for kind in kinds or READER_MODULES:
            for path in reader(kind).find_units(fs, root):
                if any(path == c or path.startswith(c.rstrip("/") + "/") for c in claimed):
                    continue
                claimed.add(path)
                found.append(
                    Unit(kind, _unstrip(fs, path), f"{kind}:{path}", fingerprint(fs, path))
                )
        if not found and not find_cards([url]):
            raise UnknownLayout(
                f"{url}: no known benchmark layout found "
                f"(looked for: {', '.join(kinds or READER_MODULES)})"
            )
        units.extend(sorted(found, key=lambda u: u.key))
    return units


def find_cards(urls: list[str]) -> list[str]:
    """The model card files (``model_cards.csv|yaml|yml``) under the given files or folders."""
    cards: list[str] = []
    for url in urls:
        fs, root = url_to_fs(url)
        files = fs.find(root) if fs.isdir(root) else [root] if fs.exists(root) else []
        cards.extend(
            sorted(_unstrip(fs, p) for p in files if posixpath.basename(p) in CARD_FILE_NAMES)
        )
    return cards


def read_unit(unit: Unit, names) -> IngestResult:
    return reader(unit.kind).read(unit.url, names=names)


def fingerprint(fs: fsspec.AbstractFileSystem, path: str) -> str:
    """sha256 over the names and bytes of every file of a unit (a file or a folder)."""
    h = hashlib.sha256()
    files = sorted(fs.find(path)) if fs.isdir(path) else [path]
    for f in files:
        h.update(f[len(path) :].encode())
        with fs.open(f, "rb") as fh:
            while chunk := fh.read(1 << 20):
                h.update(chunk)
    return h.hexdigest()


def _unstrip(fs: fsspec.AbstractFileSystem, path: str) -> str:
    return fs.unstrip_protocol(path) if not _is_local(fs) else path


def _is_local(fs: fsspec.AbstractFileSystem) -> bool:
    protocol = fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)
    return "file" in protocol or "local" in protocol


__all__ = [
    "IngestResult",
    "READER_MODULES",
    "Unit",
    "UnknownLayout",
    "UnreadableSource",
    "discover",
    "find_cards",
    "fingerprint",
    "read_unit",
    "reader",
]
