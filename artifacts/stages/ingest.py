"""The ingest stage: source dumps -> validated canonical tables in the store -> labels.

``plan_ingest`` says which of the discovered units the store does not hold yet (and accounts for
every other file); ``read_tables`` reads one unit into canonical frames with out-of-range values
quarantined; ``commit_reads`` commits what was read in batches (a crash keeps every committed
batch); ``relabel`` brings the labels up to date (appending those of new outcome parts when
that equals a full recompute, else recomputing them), ``stale_labels`` says when they must be. Discovery and
reading live in ``transforms.ingest``, range checks and labels in ``transforms.binarize``,
storage in ``artifacts.store``; the ``ingest`` flow only sequences these.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import polars as pl
from tqdm.auto import tqdm

from benchroute import code_version
from benchroute.artifacts.store import Appender, Commit, Store, concat_tables, new_batch
from benchroute.faults import crash_point
from benchroute.schemas import KEYS, empty
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

log = logging.getLogger(__name__)

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
    total: int | None = None,
) -> None:
    """Commit what was read, a batch of about ``BATCH_OUTCOME_ROWS`` outcomes at a time.

    ``reads``: each unit with a function returning its ``read_tables`` (a task's result),
    consumed one at a time (a generator may read them as they are asked for; ``total`` is their
    number, for the progress bar): an exception from it (retries spent on an I/O error) leaves
    the unit uncommitted, to be read again next run; an unreadable unit's message is committed as
    its quarantine record.
    """
    appender = Appender(target)
    pending: list[tuple[Unit, dict[str, pl.DataFrame]]] = []
    bar = tqdm(total=total, unit="unit", desc="ingest", disable=not progress)
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
LABELS = "labels"


@functools.cache
def labels_code() -> str:
    """What the labels' computation reads besides the data: the binarization module and its
    shipped main-metric table. Labels appended under other code would differ from a full
    relabel's, so an append needs the same (``append_plan``)."""
    return digest(Path(bz.__file__).read_bytes().decode(), bz.HELM_MAIN_METRICS_CSV.read_text())


@dataclass(frozen=True)
class AppendPlan:
    """New outcome parts whose labels can be computed alone and appended (``append_plan``)."""

    last: Commit  # the labels commit the append extends
    new_parts: tuple[str, ...]  # outcome parts committed since that commit's basis
    fresh_models: frozenset[str]  # models first committed with those parts (no older outcome)


def relabel(store_url: str, rules: str | None, logger=None) -> int:
    """Bring the labels up to the store's outcomes; returns the number of labels.

    Appends the labels of the outcome parts committed since the last labels commit when
    ``append_plan`` and ``append_labels`` show they are exactly what a full relabel would add;
    otherwise recomputes the whole table from every outcome (``full_relabel``). ``logger``: where
    progress goes (a flow's run logger; default this module's)."""
    log_ = logger or log
    s = Store(store_url)
    commits = s.commits()  # one snapshot: basis, parts read and hints all come from it
    plan = append_plan(s, rules, commits)
    if isinstance(plan, AppendPlan):
        n = append_labels(s, rules, commits, plan)
        if isinstance(n, int):
            return n
        plan = n
    log_.info("full relabel: %s", plan)
    return full_relabel(s, rules, commits, logger=log_)


def full_relabel(s: Store, rules: str | None, commits: list[Commit], *, logger=None) -> int:
    """Recompute the labels table from every outcome of ``commits`` (replaces the old one), in
    bounded memory: the rules come from the outcomes' (dataset, metric) pairs, read a batch at a
    time; the labels from one bucket of inputs at a time (``labels_by_bucket``), each written
    as a part of its own, all made visible by one commit."""
    basis = labels_basis(s, rules, commits)
    parts = s.parts("outcomes", commits)
    pairs = metric_pairs_of_parts(s, parts)
    hints = bz.main_metric_hints(commits)
    rule_list = bz.effective_rules(bz.pairs_frame(pairs), bz.load_rules(rules), hints)
    primary = bz.primary_metrics(bz.pairs_frame(pairs), rule_list)
    batch = new_batch()
    written: list[str] = []
    n = 0
    for labels in labels_by_bucket(s, parts, rule_list, primary, logger=logger):
        if labels.height:
            written.append(s.write_part(LABELS, labels, batch))
            n += labels.height
    s.commit_parts(batch, replace={LABELS: written},
                   info=_labels_info(basis, rule_list, commits, pairs, n, None))
    crash_point("ingest.labelled")
    return n


# A full relabel holds about this many outcome rows in memory at once; above it the outcomes
# are split by input into buckets on local disk and each bucket is labelled alone (every label
# comes from the rows of one input: ``transforms.binarize.labels_of``).
RELABEL_BUCKET_ROWS = 4_000_000
# The outcome columns a label is computed from.
LABEL_SOURCE_COLUMNS = ["input_id", "dataset", "model", "metric", "value", "perturbation"]


def metric_pairs_of_parts(s: Store, parts: list[str]) -> dict[str, list[str]]:
    """``binarize.metric_pairs`` of the outcomes in ``parts``, read a batch at a time."""
    seen: list[pl.DataFrame] = []
    for rel in parts:
        for batch in s.iter_batches(rel, ["dataset", "metric"]):
            seen.append(batch.unique())
        if len(seen) > 64:
            seen = [pl.concat(seen).unique()]
    frame = pl.concat(seen).unique() if seen else pl.DataFrame(
        schema={"dataset": pl.String, "metric": pl.String})
    return bz.metric_pairs(frame)


def labels_by_bucket(s: Store, parts: list[str], rule_list, primary: pl.DataFrame,
                     bucket_rows: int | None = None, *, logger=None):
    """The labels of the outcomes in ``parts`` (``binarize.labels_of``), a frame per bucket of
    inputs: one bucket when they hold at most ``bucket_rows`` (``RELABEL_BUCKET_ROWS``) rows,
    else the rows that can make a label (unperturbed, of a primary metric) are first spread by
    a hash of their input over buckets of about that size in a local temporary folder, one
    Parquet writer per bucket, then labelled a bucket at a time. Every label groups rows of one
    input, so the buckets' labels are exactly the labels of all the rows."""
    import math
    import tempfile

    import pyarrow.parquet as pq

    log_ = logger or log
    limit = bucket_rows or RELABEL_BUCKET_ROWS
    total = sum(s.part_rows(rel) for rel in parts)
    k = max(1, math.ceil(total / limit))
    if k == 1:
        yield bz.labels_of(s.read_parts("outcomes", parts, LABEL_SOURCE_COLUMNS), rule_list, primary)
        return
    keep = primary.select("dataset", "metric")
    log_.info("relabel: %d outcomes in %d buckets of inputs", total, k)
    with tempfile.TemporaryDirectory(prefix="benchroute-relabel-") as tmp:
        writers: dict[int, pq.ParquetWriter] = {}
        try:
            t0 = time.perf_counter()
            for i, rel in enumerate(parts, 1):
                if i % max(1, len(parts) // 10) == 0:
                    log_.info("relabel: spread %d of %d outcome parts over the buckets (%.0f parts/s)",
                             i, len(parts), i / (time.perf_counter() - t0))
                for batch in s.iter_batches(rel, LABEL_SOURCE_COLUMNS):
                    batch = batch.filter(pl.col("perturbation").is_null()).join(
                        keep, on=["dataset", "metric"], how="semi")
                    batch = batch.with_columns(
                        _bucket=(pl.col("input_id").hash(seed=0) % k).cast(pl.Int64))
                    for (b,), rows in batch.partition_by("_bucket", as_dict=True).items():
                        table = rows.drop("_bucket").to_arrow()
                        if b not in writers:
                            writers[b] = pq.ParquetWriter(f"{tmp}/{b:06d}.parquet", table.schema)
                        writers[b].write_table(table.cast(writers[b].schema))
        finally:
            for w in writers.values():
                w.close()
        t0 = time.perf_counter()
        for i, b in enumerate(sorted(writers), 1):
            yield bz.labels_of(pl.read_parquet(f"{tmp}/{b:06d}.parquet"), rule_list, primary)
            if i % max(1, len(writers) // 10) == 0:
                log_.info("relabel: labelled %d of %d buckets (%.1f s a bucket)", i, len(writers),
                         (time.perf_counter() - t0) / i)


def _labels_info(basis: str, rule_list, commits: list[Commit], pairs: dict, n: int,
                 extends: int | None) -> dict:
    """A labels commit's info: what ``stale_labels`` checks (``basis``) and what the next
    ``append_plan`` needs (the last commit of the basis, every dataset's label-capable metrics,
    the label count, the labels code, and for an append the labels commit it extends)."""
    info = {"kind": LABELS, "basis": basis, "rules": bz.rules_to_json(rule_list),
            "code_version": code_version(), "labels_code": labels_code(),
            "outcomes_seq": commits[-1].seq if commits else 0, "metrics": pairs, "n_labels": n}
    if extends is not None:
        info["mode"], info["extends"] = "append", extends
    return info


def _labels_commits(commits: list[Commit]) -> list[Commit]:
    """The labels commits since (and with) the last one that replaced the table."""
    out: list[Commit] = []
    for c in commits:
        if LABELS in c.replace:
            out = [c]
        elif LABELS in c.append:
            out.append(c)
    return out


def _broken_chain(chain: list[Commit]) -> str | None:
    """Why the appends since the last full relabel do not each extend the labels commit before
    them (two runs appending at once would hold the same rows twice), or None."""
    for prev, c in zip(chain, chain[1:]):
        if c.info.get("extends") != prev.seq:
            return f"labels commit {c.seq} does not extend {prev.seq} (concurrent relabels?)"
    return None


def append_plan(s: Store, rules: str | None, commits: list[Commit]) -> AppendPlan | str:
    """Whether the labels can be brought up to date by appending those of the new outcome parts
    alone, as far as the commit log tells (the data's part is ``append_labels``); else why not.

    Needs: a labels commit with an incremental record, made by the same labels code, whose basis
    is the basis of the commits up to its ``outcomes_seq`` under these ``rules`` (so the stored
    labels are exactly those of the outcome parts then, under the same rules file and hints);
    outcomes only appended since, and at least one part new."""
    chain = _labels_commits(commits)
    if not chain:
        return "no labels yet"
    last = chain[-1]
    info = last.info
    if any(k not in info for k in ("basis", "outcomes_seq", "metrics", "rules", "n_labels")):
        return "the last labels commit has no incremental record"
    if info.get("labels_code") != labels_code():
        return "the binarization code changed"
    if broken := _broken_chain(chain):
        return broken
    prefix = [c for c in commits if c.seq <= info["outcomes_seq"]]
    if labels_basis(s, rules, prefix) != info["basis"]:
        return "the rules asked for, the hints or the outcomes the labels came from changed"
    old_parts, all_parts = s.parts("outcomes", prefix), s.parts("outcomes", commits)
    if all_parts[: len(old_parts)] != old_parts:
        return "outcome parts were replaced"
    new_parts = tuple(all_parts[len(old_parts):])
    if not new_parts:
        return "no new outcomes (a recompute was asked for)"
    old_models, all_models = s.parts("models", prefix), s.parts("models", commits)
    fresh: frozenset[str] = frozenset()
    if all_models[: len(old_models)] == old_models:
        # Readers commit a models row with a model's first outcomes (``from_frames``): a model
        # whose first row came after the prefix has no older outcome. Rows of models the prefix
        # already holds (two writers adding the same model at once) are not fresh.
        added = set(s.read_parts("models", all_models[len(old_models):], ["model"])["model"])
        before = set(s.read_parts("models", old_models, ["model"])["model"]) if old_models else set()
        fresh = frozenset(added - before)
    return AppendPlan(last, new_parts, fresh)


def append_labels(s: Store, rules: str | None, commits: list[Commit], plan: AppendPlan) -> int | str:
    """Append the labels of ``plan.new_parts`` (reading only them) if they are exactly the rows
    a full relabel would add to the stored labels, changing none; returns the label count, or
    why not (the caller then recomputes everything).

    The rows are the same when: the effective rules of all (dataset, metric) pairs (recorded
    pairs and new ones) and the hints are the recorded rules; no dataset that had outcomes
    changes its primary metric (a new metric can outrank the old one; a dataset without one can
    gain one, whose older outcomes would then need labels); and the new labels' groups are new:
    no (input, dataset, model) already labelled (a second run of a model on an input is averaged
    with the first), and for ``relative_to_best``/``top_k`` datasets no (input, dataset) already
    labelled (a new model moves the others' labels)."""
    info = plan.last.info
    outcomes = s.read_parts("outcomes", list(plan.new_parts))
    new_pairs = bz.metric_pairs(outcomes)
    old_pairs: dict[str, list[str]] = info["metrics"]
    pairs = {d: sorted(set(old_pairs.get(d, ())) | set(new_pairs.get(d, ())))
             for d in sorted(set(old_pairs) | set(new_pairs))}
    hints = bz.main_metric_hints(commits)
    rule_list = bz.effective_rules(bz.pairs_frame(pairs), bz.load_rules(rules), hints)
    if bz.rules_to_json(rule_list) != info["rules"]:
        return "the effective rules changed (a new dataset's or hint's main metric?)"
    touched = {d: pairs[d] for d in new_pairs}
    primary = bz.primary_metrics(bz.pairs_frame(touched), rule_list)
    before = bz.primary_metrics(bz.pairs_frame({d: old_pairs[d] for d in touched if d in old_pairs}),
                                rule_list)
    now = {d: (m, i) for d, m, i in primary.iter_rows()}
    then = {d: (m, i) for d, m, i in before.iter_rows()}
    for d in touched:
        if d in old_pairs and then.get(d) != now.get(d):
            return f"dataset {d}'s primary metric changes ({then.get(d)} -> {now.get(d)})"
    labels = bz.labels_of(outcomes, rule_list, primary)
    del outcomes
    if why := _overlap(s, commits, labels, rule_list, primary, plan):
        return why
    basis = labels_basis(s, rules, commits)
    n = int(info["n_labels"]) + labels.height
    s.commit(append={LABELS: labels},
             info=_labels_info(basis, rule_list, commits, pairs, n, plan.last.seq))
    crash_point("ingest.labelled")
    log.info("appended %d labels of %d new outcome parts", labels.height, len(plan.new_parts))
    return n


def _overlap(s: Store, commits: list[Commit], labels: pl.DataFrame, rule_list, primary: pl.DataFrame,
             plan: AppendPlan) -> str | None:
    """Why ``labels`` (of new parts) are not all new groups of the stored labels, or None.

    Rows of models first committed with the new parts cannot repeat a stored key; the others
    (and every row of a dataset whose rule compares models) are looked up in the stored labels,
    one batch of their key columns at a time."""
    relative = [d for d, _, i in primary.iter_rows() if rule_list[i].kind != "threshold"]
    by_key = labels.filter(~pl.col("model").is_in(list(plan.fresh_models))).select(KEYS[LABELS])
    by_group = labels.filter(pl.col("dataset").is_in(relative)).select("input_id", "dataset").unique()
    if by_key.height == 0 and by_group.height == 0:
        return None
    datasets = pl.concat([by_key["dataset"], by_group["dataset"]]).unique()
    for rel in s.parts(LABELS, commits):
        for batch in s.iter_batches(rel, KEYS[LABELS]):
            batch = batch.filter(pl.col("dataset").is_in(datasets.implode()))
            if by_key.height and batch.join(by_key, on=KEYS[LABELS], how="semi").height:
                return "new outcomes re-state labelled (input, dataset, model) keys"
            if by_group.height and batch.join(by_group, on=["input_id", "dataset"], how="semi").height:
                return "a dataset whose rule compares models gains a model on labelled inputs"
    return None


def label_count(store: Store) -> int:
    chain = _labels_commits(store.commits())
    if chain and "n_labels" in chain[-1].info:
        return int(chain[-1].info["n_labels"])
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
    chain = _labels_commits(commits)
    last = chain[-1] if chain else None
    if last is None:
        return "no labels yet" if store.parts("outcomes", commits) else None
    basis = last.info.get("basis")
    if basis is None:  # labels from before bases were recorded: outcomes committed since?
        later = any(c.seq > last.seq and ("outcomes" in c.append or "outcomes" in c.replace)
                    for c in commits)
        return "outcomes were committed after the labels" if later else None
    if broken := _broken_chain(chain):
        return broken
    if basis != labels_basis(store, rules, commits):
        return "the labels are not those of the stored outcomes and these rules"
    return None
