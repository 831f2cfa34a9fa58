"""The ingest stage: source dumps -> validated canonical tables in the store -> labels.

``plan_ingest`` says which of the discovered units the store does not hold yet (and accounts for
every other file); ``read_tables`` reads one unit into canonical frames with out-of-range values
quarantined; ``commit_reads`` commits what was read in batches (a crash keeps every committed
batch); ``relabel`` recomputes the labels, ``stale_labels`` says when they must be. Discovery and
reading live in ``transforms.ingest``, range checks and labels in ``transforms.binarize``,
storage in ``artifacts.store``; the ``ingest`` flow only sequences these.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import polars as pl
from tqdm.auto import tqdm

from benchroute import code_version
from benchroute.artifacts.store import Appender, Store, concat_tables
from benchroute.faults import crash_point
from benchroute.schemas import empty
from benchroute.transforms import binarize as bz
from benchroute.transforms.fingerprints import digest
from benchroute.transforms.ids import ModelNames
from benchroute.transforms.ingest import (
    Unit,
    UnknownLayout,
    UnreadableSource,
    account,
    discover,
    read_unit,
)

# Commit after this many outcome rows (or at the end): a crash keeps every committed batch.
BATCH_OUTCOME_ROWS = 250_000
# Not a table: the readers' main-metric hints, kept in the ingest commit's info for relabelling.
MAIN_METRICS = "main_metrics"


@dataclass
class IngestSummary:
    """What one ingest run did, per source, plus the units it skipped or could not read.

    ``not_benchmark``: files under the sources that no reader took (path -> why); ``ignored``:
    side files a format documents as not read (path -> rule). With the units and the model
    cards, they account for every file under the sources.
    """

    store: str
    units_found: int = 0
    units_skipped: int = 0
    units_failed: dict[str, str] = field(default_factory=dict)
    not_benchmark: dict[str, str] = field(default_factory=dict)
    ignored: dict[str, str] = field(default_factory=dict)
    added: dict[str, dict[str, int]] = field(default_factory=dict)
    labels: int = 0
    relabelled: str | None = None  # why the labels were recomputed (None: they were current)
    cards: dict = field(default_factory=dict)
    seconds: float = 0.0

    def add(self, source: str, counts: dict[str, int]) -> None:
        row = self.added.setdefault(source, {})
        for k, v in counts.items():
            row[k] = row.get(k, 0) + v

    def to_dict(self) -> dict:
        return {
            "store": self.store,
            "units_found": self.units_found,
            "units_skipped": self.units_skipped,
            "units_failed": self.units_failed,
            "not_benchmark": self.not_benchmark,
            "ignored": self.ignored,
            "added": self.added,
            "labels": self.labels,
            "relabelled": self.relabelled,
            "cards": self.cards,
            "seconds": round(self.seconds, 2),
        }


@dataclass(frozen=True)
class IngestPlan:
    """The units found under the sources, those the store does not hold yet, and the files that
    are no unit (``not_benchmark``: path -> why; ``ignored``: path -> documented rule)."""

    units: tuple[Unit, ...]
    todo: tuple[Unit, ...]
    not_benchmark: dict[str, str]
    ignored: dict[str, str]

    @property
    def skipped(self) -> int:
        return len(self.units) - len(self.todo)


def discover_landing(landing: str, kinds: list[str] | None = None) -> list[Unit]:
    """Every run dump under the landing location (none yet is not an error)."""
    try:
        return discover([landing], kinds)
    except UnknownLayout:
        return []


def new_units(store: Store, units: Iterable[Unit]) -> list[Unit]:
    """The units whose content fingerprint the store does not hold."""
    known = set(store.units().values())
    return [u for u in units if u.fingerprint not in known]


def plan_ingest(store: Store, sources: list[str], units: list[Unit], kinds: list[str] | None) -> IngestPlan:
    """What an ingest of ``units`` (discovered under ``sources``) has to read."""
    files = account(sources, units, kinds)
    return IngestPlan(tuple(units), tuple(new_units(store, units)), files.not_benchmark, files.ignored)


def read_tables(unit: Unit, aliases: str | None, rules: str | None) -> dict[str, pl.DataFrame] | str:
    """One unit -> canonical frames, with out-of-range values moved to quarantine.

    A unit that cannot be parsed at all is an expected outcome, not a failure: its error message
    is returned instead (I/O errors that may pass propagate, for the caller to retry).
    """
    try:
        result = read_unit(unit, ModelNames.load(aliases))
    except UnreadableSource as exc:
        return str(exc)
    tables = result.tables()
    in_range, bad = bz.check_ranges(tables["outcomes"], bz.load_rules(rules), file=unit.url)
    tables["outcomes"] = in_range
    tables["quarantine"] = pl.concat([tables["quarantine"], bad], how="vertical_relaxed")
    hints = getattr(result, "main_metrics", ())  # a reader's main-metric hints (HELM schemas)
    if hints:
        tables[MAIN_METRICS] = pl.DataFrame(
            list(hints), schema=["dataset", "metric", "origin"], orient="row"
        )
    return tables


def commit_reads(
    target: Store,
    reads: Iterable[tuple[Unit, Callable[[], dict[str, pl.DataFrame] | str]]],
    summary: IngestSummary,
    log,
    *,
    progress: bool = False,
) -> None:
    """Commit what was read, a batch of about ``BATCH_OUTCOME_ROWS`` outcomes at a time.

    ``reads``: each unit with a function returning its ``read_tables`` (a task's result): an
    exception from it (retries spent on an I/O error) leaves the unit uncommitted, to be read
    again next run; an unreadable unit's message is committed as its quarantine record.
    """
    reads = list(reads)
    appender = Appender(target)
    pending: list[tuple[Unit, dict[str, pl.DataFrame]]] = []
    bar = tqdm(total=len(reads), unit="unit", desc="ingest", disable=not progress)
    for unit, result in reads:
        try:
            tables = result()
        except Exception as exc:  # noqa: BLE001 - retries spent on an I/O error: not committed
            summary.units_failed[unit.key] = (
                f"{unit.url}: {type(exc).__name__}: {exc} (not committed: read again next run)"
            )
            log.warning("could not read %s: %r", unit.url, exc)
            bar.update(1)
            continue
        if isinstance(tables, str):
            summary.units_failed[unit.key] = tables
            log.warning("could not read %s: %s", unit.url, tables)
            tables = {"quarantine": unreadable_row(unit, tables)}
        pending.append((unit, tables))
        bar.update(1)
        if sum(t["outcomes"].height for _, t in pending if "outcomes" in t) >= BATCH_OUTCOME_ROWS:
            commit_batch(appender, pending, summary, log)
            pending = []
    bar.close()
    commit_batch(appender, pending, summary, log)


def unreadable_row(unit: Unit, message: str) -> pl.DataFrame:
    """The quarantine record for a unit that could not be parsed at all (kept until it changes)."""
    row = {
        "source": unit.kind,
        "file": unit.url,
        "record": None,
        "field": None,
        "reason": f"unreadable: {message}",
        "value": None,
    }
    return pl.DataFrame([row], schema=empty("quarantine").schema)


def commit_batch(appender: Appender, pending, summary: IngestSummary, log) -> None:
    """One commit of the units read (their tables appended, their fingerprints recorded)."""
    if not pending:
        return
    t0 = time.perf_counter()
    rows = sum(t["outcomes"].height for _, t in pending if "outcomes" in t)
    tables = concat_tables(t for _, t in pending)
    info = {"kind": "ingest", "units": [u.key for u, _ in pending], "code_version": code_version()}
    if MAIN_METRICS in tables:
        hints = tables.pop(MAIN_METRICS).unique(maintain_order=True)
        info[MAIN_METRICS] = [list(r) for r in hints.rows()]
    fresh = appender.append(tables, units={u.key: u.fingerprint for u, _ in pending}, info=info)
    crash_point("ingest.appended")
    for unit, _ in pending:
        summary.add(unit.kind, {"units": 1})
    for name in ("memberships", "outcomes", "quarantine"):
        for source, n in fresh[name].group_by("source").len().iter_rows():
            summary.add(source, {f"new_{name}": n})
    summary.add("_total", {"new_inputs": fresh["inputs"].height, "new_models": fresh["models"].height})
    log.info(
        "committed %d units: %d new inputs, %d new outcomes (%d read) in %.1f s",
        len(pending),
        fresh["inputs"].height,
        fresh["outcomes"].height,
        rows,
        time.perf_counter() - t0,
    )


# --------------------------------------------------------------------------- labels
def relabel(store_url: str, rules: str | None) -> int:
    """Recompute the labels table from every outcome in the store (replaces the old one);
    returns the number of labels."""
    s = Store(store_url)
    basis = labels_basis(s, rules)  # before reading: a later append makes the labels stale
    outcomes = s.read("outcomes")
    hints = bz.main_metric_hints(s.commits())
    rule_list = bz.effective_rules(outcomes, bz.load_rules(rules), hints)
    labels = bz.binarize(outcomes, rule_list)
    s.commit(
        replace={"labels": labels},
        info={"kind": "labels", "basis": basis, "rules": bz.rules_to_json(rule_list),
              "code_version": code_version()},
    )
    crash_point("ingest.labelled")
    return labels.height


def label_count(store: Store) -> int:
    return store.read("labels", columns=["y"]).height


def labels_basis(store: Store, rules: str | None, commits=None) -> str:
    """What the labels are derived from: the outcomes' parts (immutable, so their names stand
    for their content), the rules asked for and the readers' main-metric hints. Recorded in the
    labels commit (``info["basis"]``) so that any run can tell stale labels from current ones."""
    commits = store.commits() if commits is None else commits
    hints = [c.info[MAIN_METRICS] for c in commits if c.info.get(MAIN_METRICS)]
    return digest(store.parts("outcomes", commits), bz.rules_to_json(bz.load_rules(rules)), hints)


def stale_labels(store: Store, rules: str | None) -> str | None:
    """Why the stored labels are not those of the store's outcomes under ``rules``, or None.

    Labels are a derived table written by a commit of their own after the outcomes' commits; a
    run killed in between (or a change of rules) leaves them stale, and the next ingest or
    refresh recomputes them whether or not it has new units."""
    commits = store.commits()
    last = next((c for c in reversed(commits) if "labels" in c.replace), None)
    if last is None:
        return "no labels yet" if store.parts("outcomes", commits) else None
    basis = last.info.get("basis")
    if basis is None:  # labels from before bases were recorded: outcomes committed since?
        later = any(c.seq > last.seq and ("outcomes" in c.append or "outcomes" in c.replace)
                    for c in commits)
        return "outcomes were committed after the labels" if later else None
    if basis != labels_basis(store, rules, commits):
        return "the labels are not those of the stored outcomes and these rules"
    return None
