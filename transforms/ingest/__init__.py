"""Source readers: each maps one source format to the canonical tables and nothing else.

Every reader module exposes

- ``KIND``: the source name written to the ``source`` column (``"helm"``, ``"mmlu_pro"``…);
- ``find_units(fs, root) -> list[str]``: the units of this format found under ``root`` (a folder
  or a single file), each a path on ``fs``; a unit is what one ``read`` call ingests;
- ``read(url, *, names) -> IngestResult``: read one unit (``url`` is an fsspec URL or path).

``discover`` walks the paths a user gives and returns every unit with a content fingerprint, so
the store can skip units it already holds. Model card files (``model_cards.csv|yaml|yml``) are
not units: ``find_cards`` lists them, and a path holding only cards is not an unknown layout.

Every file under the given paths is accounted for (``account``): it is part of a unit (ingested,
or quarantined when it cannot be read), a model card, a side file that a format documents as
not read (``SIDE_FILES``: licences and notes, HELM's suite summaries, RouteLLM's contamination
lists... each with its reason), or it is reported by name as *not a benchmark layout* with why
(no reader recognises it, empty, a dangling link, a name that is not UTF-8). Nothing is skipped
in silence. A reader's ``find_units`` claims a file by its name or header even when its content
is broken (an empty ``annotations_long.parquet``, a long table lacking a column), so that reading
it says what is wrong.

``read_unit`` turns any error of one unit into ``UnreadableSource`` naming the unit (a polars
type error, invalid bytes, a dangling link, a folder where a file should be): the caller
quarantines that unit and reads the others. Only I/O errors that may pass (network, timeouts)
propagate, for the caller to retry.
"""

from __future__ import annotations

import fnmatch
import hashlib
import importlib
import logging
import posixpath
from dataclasses import dataclass, field
from types import ModuleType

import fsspec
from fsspec.core import url_to_fs

from benchroute.io import display_path
from benchroute.transforms.model_cards import CARD_FILE_NAMES

from .base import IngestResult, UnknownLayout, UnreadableSource, printable, text_problem

log = logging.getLogger(__name__)

# Reader modules in the order discovery tries them; the first that claims a path owns it.
READER_MODULES = ("helm", "mmlu_pro", "alpaca_eval", "routellm", "mixinstruct", "long_table")

# I/O errors that will not pass on a retry: the unit is reported unreadable at once.
PERMANENT_IO_ERRORS = (FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError)


@dataclass(frozen=True)
class SideFile:
    """A file a source format documents as not read, and why.

    ``pattern`` is matched against the last components of a path, one ``fnmatch`` pattern per
    component (``runs/*/schema.json`` matches ``…/runs/v1/schema.json``, never deeper). With
    ``beside``, the rule holds only when one of those files is in the same folder.
    """

    pattern: str
    reason: str
    beside: tuple[str, ...] = ()

    def matches(self, path: str, siblings: set[str]) -> bool:
        parts = self.pattern.split("/")
        tail = path.rstrip("/").split("/")[-len(parts) :]
        if len(tail) < len(parts) or not all(map(fnmatch.fnmatchcase, tail, parts)):
            return False
        return not self.beside or any(b in siblings for b in self.beside)


_DOCS = "documentation or licence, not data"
_HELM_SUITE = "HELM suite summary (helm-summarize output over the runs, not per-instance results)"
SIDE_FILES: tuple[SideFile, ...] = (
    # Any format: notes, licences, hidden files.
    *(SideFile(p, _DOCS) for p in ("LICENSE*", "LICENCE*", "COPYING*", "NOTICE*", "README*")),
    *(SideFile(p, _DOCS) for p in ("*.md", "*.rst")),
    SideFile(".*", "hidden file"),
    # HELM: the files helm-summarize writes beside the run folders of a suite.
    *(
        SideFile(f"runs/*/{name}", _HELM_SUITE)
        for name in (
            "run_specs.json", "runs.json", "schema.json", "summary.json", "groups.json",
            "groups_metadata.json", "costs.json", "runs_to_run_suites.json",
        )
    ),
    SideFile("runs/*/groups/*", _HELM_SUITE),
    SideFile("runs/*/groups/*/*", _HELM_SUITE),
    # RouteLLM (routellm.py: "Not read").
    SideFile(
        "contaminated_prompts.jsonl",
        "RouteLLM's list of prompts near its router training data (not results)",
    ),
    SideFile("gsm8k/test.jsonl", "the GSM8K dataset itself (no model outputs)"),
    SideFile("gsm8k/train.jsonl", "the GSM8K dataset itself (no model outputs)"),
    SideFile(
        "benchmarks/mt-bench/*.jsonl",
        "answers of commercial routers (and their judgements), not of models",
    ),
    SideFile(
        "question.jsonl",
        "MT-Bench questions: read with the judgements beside them",
        beside=("judgements.jsonl", "judgments.jsonl"),
    ),
    # MMLU-Pro: the per-model summary beside the tables.
    SideFile(
        "models.csv",
        "MMLU-Pro per-model summary (aggregates, not per-question results)",
        beside=("questions.parquet",),
    ),
    # AlpacaEval: aggregate leaderboards; outputs that were not judged.
    SideFile("docs/*/*_leaderboard.csv", "AlpacaEval aggregate leaderboard (not per-input)"),
    SideFile("results/*/model_outputs.json", "AlpacaEval model outputs without judgements"),
)


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
    readers would not claim). A path no reader claims raises ``UnknownLayout`` naming it. Files
    under a path that no reader claims are not units: ``account`` reports them.
    """
    units: list[Unit] = []
    for url in urls:
        fs, root = url_to_fs(url)
        if not fs.exists(root):
            raise FileNotFoundError(f"source not found: {url}")
        found: list[Unit] = []
        claimed: set[str] = set()
        for kind in kinds or READER_MODULES:
            for path in _find_units(kind, fs, root):
                if any(path == c or path.startswith(c.rstrip("/") + "/") for c in claimed):
                    continue
                claimed.add(path)
                if text_problem(path):  # reported by ``account``: a unit key must be text
                    continue
                found.append(
                    Unit(kind, display_path(fs, path), f"{kind}:{path}", fingerprint(fs, path))
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
            sorted(display_path(fs, p) for p in files if posixpath.basename(p) in CARD_FILE_NAMES)
        )
    return cards


def _find_units(kind: str, fs: fsspec.AbstractFileSystem, root: str) -> list[str]:
    """One reader's units under ``root``; a reader that fails while looking claims nothing (its
    files are then reported by ``account``) unless the error may pass on a retry."""
    try:
        return reader(kind).find_units(fs, root)
    except OSError as exc:
        if not isinstance(exc, PERMANENT_IO_ERRORS):
            raise
        log.warning("%s reader could not look under %s: %s", kind, root, exc)
    except Exception as exc:  # noqa: BLE001 - one reader's failure must not hide the others
        log.warning("%s reader failed while looking under %s: %r", kind, root, exc)
    return []


@dataclass(frozen=True)
class Accounting:
    """What became of every file under the paths given to ``discover``.

    ``ignored``: side files a format documents as not read (path -> reason); ``not_benchmark``:
    files no reader took (path -> why); ``cards``: model card files. Every other file is part of
    a unit. Paths are shown as text (a name that is not UTF-8 is escaped).
    """

    units: int = 0
    unit_files: int = 0
    cards: list[str] = field(default_factory=list)
    ignored: dict[str, str] = field(default_factory=dict)
    not_benchmark: dict[str, str] = field(default_factory=dict)


def account(
    urls: list[str], units: list[Unit], kinds: list[str] | None = None
) -> Accounting:
    """Sort every file under ``urls`` into: part of one of ``units``, a model card, a side file
    (``SIDE_FILES``), or not a benchmark layout (with the reason). Reads no file's content."""
    unit_paths = {u.key.split(":", 1)[1].rstrip("/") for u in units}
    looked_for = ", ".join(kinds or READER_MODULES)
    result = Accounting(units=len(units))
    n_unit_files = 0
    for url in urls:
        fs, root = url_to_fs(url)
        try:
            files = sorted(fs.find(root)) if fs.isdir(root) else [root]
        except OSError as exc:
            result.not_benchmark[printable(url, 10_000)] = f"cannot be listed: {exc}"
            continue
        by_folder: dict[str, set[str]] = {}
        for f in files:
            by_folder.setdefault(posixpath.dirname(f), set()).add(posixpath.basename(f))
        for f in files:
            shown = printable(display_path(fs, f), 10_000)
            if _in_unit(f, unit_paths):
                n_unit_files += 1
            elif posixpath.basename(f) in CARD_FILE_NAMES:
                result.cards.append(shown)
            elif side := _side_rule(f, by_folder.get(posixpath.dirname(f), set())):
                result.ignored[shown] = side.reason
            else:
                result.not_benchmark[shown] = _why_not(fs, f, looked_for)
    return Accounting(
        units=result.units,
        unit_files=n_unit_files,
        cards=result.cards,
        ignored=result.ignored,
        not_benchmark=result.not_benchmark,
    )


def _in_unit(path: str, unit_paths: set[str]) -> bool:
    p = path.rstrip("/")
    while p and p not in unit_paths:
        parent = posixpath.dirname(p)
        if parent == p:
            return False
        p = parent
    return bool(p)


def _side_rule(path: str, siblings: set[str]) -> SideFile | None:
    return next((r for r in SIDE_FILES if r.matches(path, siblings)), None)


def _why_not(fs: fsspec.AbstractFileSystem, path: str, looked_for: str) -> str:
    """Why no reader took a file, in words."""
    if text_problem(path):
        return "file name is not valid UTF-8"
    try:
        if not fs.exists(path):
            return "cannot be read: a dangling link or a file that vanished"
        if fs.size(path) == 0:
            return f"empty file (0 bytes); no known benchmark layout (looked for: {looked_for})"
    except OSError as exc:
        return f"cannot be read: {exc}"
    return f"no known benchmark layout (looked for: {looked_for})"


def read_unit(unit: Unit, names) -> IngestResult:
    """One unit's canonical frames. Any error of this unit is ``UnreadableSource`` naming it,
    except I/O errors that may pass on a retry (network, timeouts), which propagate."""
    try:
        return reader(unit.kind).read(unit.url, names=names)
    except UnreadableSource:
        raise
    except OSError as exc:
        if not isinstance(exc, PERMANENT_IO_ERRORS):
            raise
        raise UnreadableSource(f"{printable(unit.url, 10_000)}: cannot read: {exc}") from exc
    except Exception as exc:  # noqa: BLE001 - one unit's failure must not stop the others
        detail = printable(str(exc).strip().split("\n")[0], 500)
        raise UnreadableSource(
            f"{printable(unit.url, 10_000)}: {type(exc).__name__} while reading: {detail}"
        ) from exc


def fingerprint(fs: fsspec.AbstractFileSystem, path: str) -> str:
    """sha256 over the names and bytes of every file of a unit (a file or a folder).

    A file that cannot be opened (a dangling link, a folder where a file is expected) adds the
    kind of error instead of its bytes: the unit is still found, and reading it reports the
    error. Errors that may pass on a retry propagate.
    """
    h = hashlib.sha256()
    files = sorted(fs.find(path)) if fs.isdir(path) else [path]
    for f in files:
        h.update(f[len(path) :].encode("utf-8", "surrogateescape"))
        try:
            with fs.open(f, "rb") as fh:
                while chunk := fh.read(1 << 20):
                    h.update(chunk)
        except PERMANENT_IO_ERRORS as exc:
            h.update(f"<cannot read: {type(exc).__name__}>".encode())
    return h.hexdigest()


__all__ = [
    "Accounting",
    "IngestResult",
    "SIDE_FILES",
    "SideFile",
    "READER_MODULES",
    "Unit",
    "UnknownLayout",
    "UnreadableSource",
    "account",
    "discover",
    "find_cards",
    "fingerprint",
    "read_unit",
    "reader",
]
