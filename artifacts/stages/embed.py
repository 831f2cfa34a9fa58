"""The embed stage: every input of a store that has no vector yet for the chosen embedder
(docs/operations.md#prefect-flows).

``plan_embedding`` finds what is missing, ``run_plan`` embeds it and writes parts, ``embed_store``
is both as one plain function. ``plan_partitions`` cuts the missing inputs into stable partitions
(the only place the partition formula lives) and ``embed_partition`` embeds one of them: the
``embed`` flow runs one partition, the ``refresh`` and ``backfill`` flows several. The work itself
lives in ``transforms.embed`` (order, batches, precision), ``transforms.embedder`` (the model) and
``artifacts.embeddings`` (parts in the store).

Each distinct input (``inputs.input_id``, a hash of the normalised text, so one text shared by
several sources or datasets is one input) is embedded once per embedder. A run writes a part
every few thousand vectors; after a crash the next run embeds only what is still missing, and a
run with nothing missing reads two id columns and returns without loading the model.
"""

from __future__ import annotations

import logging
import math
import sys
import threading
import time
from dataclasses import dataclass

import polars as pl
from benchroute.artifacts import embeddings as emb_store
from benchroute.artifacts.router_build import selected_input_ids
from benchroute.artifacts.specs import Selection
from benchroute.artifacts.store import Store
from benchroute.schemas.embeddings import EmbedderIdentity
from benchroute.transforms.embed import (
    PRECISIONS,
    EmbedInputError,
    EmbedProgress,
    check_inputs,
    describe_bad,
    embed_all,
    format_seconds,
)
from benchroute.transforms.embedder_packages import DEFAULT_EMBEDDER
from benchroute.transforms.fingerprints import digest, partition_ids

log = logging.getLogger("benchroute.embed")

MIN_PARTITION = 256  # fewer pending inputs per partition than this is not worth a partition
PART_ROWS = 4096  # vectors per committed part (a kill loses at most one part per partition)


@dataclass
class EmbedPlan:
    """What a run has to do: the inputs without a vector for ``identity``."""

    store: Store
    identity: EmbedderIdentity
    embedder: str
    total: int
    already_present: int
    pending: pl.DataFrame  # input_id, text
    bad: list

    @property
    def todo(self) -> int:
        return self.pending.height

    @property
    def store_url(self) -> str:
        return self.store.url


def _open(store: str | Store) -> Store:
    return store if isinstance(store, Store) else Store(store)


def plan_embedding(
    store: str | Store,
    embedder: str = DEFAULT_EMBEDDER,
    *,
    skip_invalid: bool = False,
    only: pl.Series | None = None,
) -> EmbedPlan:
    """Find the inputs that still need a vector (reads ids first, texts only if some are missing);
    ``only``: consider just these input ids (a selection of the store).

    Inputs with a null, non-text or blank text raise ``EmbedInputError`` naming them, before
    anything is embedded; with ``skip_invalid`` they are left out and listed in the plan instead.
    """
    from benchroute.transforms.embedder import resolve

    st = _open(store)
    _, identity = resolve(embedder)
    ids = st.read("inputs", columns=["input_id"])["input_id"].unique()
    if only is not None:
        ids = ids.filter(ids.is_in(only.implode()))
    present = emb_store.present_ids(st, identity)
    have = ids.is_in(present.implode())
    already = int(have.sum() or 0)
    pending = pl.DataFrame(schema={"input_id": pl.String, "text": pl.String})
    bad: list = []
    if already < ids.len():
        missing = ids.filter(~have)
        inputs = st.read("inputs", columns=["input_id", "text"])
        inputs = inputs.unique("input_id", keep="first", maintain_order=True)
        inputs = inputs.filter(pl.col("input_id").is_in(missing.implode()))
        pending, bad = check_inputs(inputs)
        if bad and not skip_invalid:
            raise EmbedInputError(
                describe_bad(bad) + "; nothing was embedded (skip_invalid=True embeds the rest)"
            )
    return EmbedPlan(st, identity, embedder, int(ids.len()), already, pending, bad)


class _Reporter:
    """Progress for people (a tqdm bar on stderr) and for logs (a line every ``every`` seconds)."""

    def __init__(self, total: int, logger, *, bar: bool, every: float = 15.0):
        self.logger, self.every, self._last = logger, every, time.monotonic()
        self.bar = None
        if bar and total:
            from tqdm.auto import tqdm

            self.bar = tqdm(
                total=total,
                unit="input",
                desc="embed",
                file=sys.stderr,
                mininterval=0.5,
                smoothing=0.1,
            )

    def __call__(self, p: EmbedProgress) -> None:
        if self.bar is not None:
            self.bar.update(p.done - self.bar.n)
            self.bar.set_postfix_str(f"ETA {format_seconds(p.eta)}", refresh=False)
        now = time.monotonic()
        if now - self._last >= self.every or p.done == p.total:
            self._last = now
            self.logger.info(p.line())

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def run_plan(
    plan: EmbedPlan,
    *,
    precision: str = "auto",
    batch_size: int = 64,
    part_rows: int = PART_ROWS,
    part_seconds: float = 60.0,
    progress: bool = True,
    logger=None,
    device: str | None = None,
) -> dict:
    """Embed the plan's pending inputs into the store; returns the run summary."""
    from benchroute.transforms.embedder import load

    logger = logger or log
    start = time.perf_counter()
    summary = {
        "new": 0,
        "already_present": plan.already_present,
        "total": plan.total,
        "seconds": 0.0,
        "embedder_id": plan.identity.id,
        "precision": None,
        "truncated": 0,
        "skipped": len(plan.bad),
        "inputs_per_s": 0.0,
        "parts": 0,
    }
    if plan.todo == 0:
        summary["seconds"] = round(time.perf_counter() - start, 3)
        return summary
    runner = load(plan.embedder, device=device)
    loaded = time.perf_counter()
    if runner.identity != plan.identity:
        raise RuntimeError(
            f"embedder changed while planning: {plan.identity.id} -> {runner.identity.id}"
        )
    logger.info(
        "embedding %d new inputs with %s on %s (%d threads), batch %d, precision %s",
        plan.todo,
        plan.identity.id,
        runner.device,
        runner.threads,
        batch_size,
        precision,
    )
    writer = emb_store.PartWriter(
        plan.store,
        plan.identity,
        part_rows=part_rows,
        max_seconds=part_seconds,
        info={"batch_size": batch_size},
    )
    reporter = _Reporter(plan.todo, logger, bar=progress)
    try:
        result = embed_all(
            plan.pending["input_id"].to_list(),
            plan.pending["text"].to_list(),
            runner,
            writer.add,
            precision=precision,
            batch_size=batch_size,
            on_progress=reporter,
        )
    finally:
        reporter.close()
        writer.flush()  # every vector computed so far is kept, even when a batch failed
    logger.info("precision %s: %s", result.choice.precision, result.choice.reason)
    seconds = time.perf_counter() - start
    summary.update(
        new=writer.rows_written,
        seconds=round(seconds, 3),
        precision=result.choice.precision,
        precision_reason=result.choice.reason,
        truncated=result.truncated,
        load_seconds=round(loaded - start, 3),
        embed_seconds=round(result.seconds, 3),
        # the steady rate: vectors per second of embedding (model load and planning excluded)
        inputs_per_s=round(writer.rows_written / result.seconds, 2) if result.seconds > 0 else 0.0,
        parts=len(writer.parts),
        device=runner.device,
        threads=runner.threads,
    )
    return summary


def embed_store(
    store: str | Store,
    embedder: str = DEFAULT_EMBEDDER,
    precision: str = "auto",
    batch_size: int = 64,
    *,
    part_rows: int = PART_ROWS,
    part_seconds: float = 60.0,
    progress: bool = True,
    skip_invalid: bool = False,
    device: str | None = None,
    logger=None,
) -> dict:
    """Embed every input of ``store`` without a vector for ``embedder``.

    Returns ``{new, already_present, total, seconds, embedder_id, precision, truncated, skipped,
    inputs_per_s, parts, …}``; ``precision`` is ``None`` when nothing needed embedding.
    """
    check_options(precision, batch_size)
    logger = logger or log
    start = time.perf_counter()
    plan = plan_embedding(store, embedder, skip_invalid=skip_invalid)
    log_plan(plan, logger)
    summary = run_plan(
        plan,
        precision=precision,
        batch_size=batch_size,
        part_rows=part_rows,
        part_seconds=part_seconds,
        progress=progress,
        logger=logger,
        device=device,
    )
    summary["seconds"] = round(time.perf_counter() - start, 3)
    logger.info(format_summary(summary))
    return summary


def log_plan(plan: EmbedPlan, logger) -> None:
    logger.info(
        "%s: %d inputs, %d already embedded with %s, %d to embed",
        plan.store_url,
        plan.total,
        plan.already_present,
        plan.identity.id,
        plan.todo,
    )
    if plan.total == 0:
        logger.warning("%s has no inputs yet: run `benchroute ingest` first", plan.store_url)
    if plan.bad:
        logger.warning("skipping %s", describe_bad(plan.bad))


def format_summary(s: dict) -> str:
    return (
        f"embed {s['embedder_id']}: {s['new']:,} new, {s['already_present']:,} already present, "
        f"{s['total']:,} total, {s['seconds']:.1f}s"
        + (f", {s['inputs_per_s']:.1f} inputs/s at {s['precision']}" if s["new"] else "")
        + (f", {s['truncated']:,} truncated at the model's limit" if s.get("truncated") else "")
        + (f", {s['skipped']:,} skipped" if s.get("skipped") else "")
    )


# --------------------------------------------------------------------------- partitions
@dataclass(frozen=True)
class Partition:
    """One partition of the inputs without a vector: its ids' digest (with the embedder id), size
    and the inputs themselves (``input_id``, ``text``)."""

    digest: str
    size: int
    pending: pl.DataFrame


@dataclass(frozen=True)
class PartitionPlan:
    """The inputs without a vector cut into partitions; invalid texts are counted, not embedded."""

    embedder_id: str
    total: int
    already_present: int
    todo: int
    invalid: int
    invalid_reason: str | None
    parts: tuple[Partition, ...]


def n_partitions(todo: int, partitions: int) -> int:
    """How many partitions ``todo`` inputs are cut into: at most ``partitions``, at least
    ``MIN_PARTITION`` inputs each, 0 when there is nothing to do."""
    return max(1, min(partitions, math.ceil(todo / MIN_PARTITION))) if todo else 0


def selected_ids(store_url: str, sel: Selection | None) -> pl.Series | None:
    """The input ids a selection's bundle is built from (``None``: the whole store)."""
    if sel is None or sel.is_all:
        return None
    return selected_input_ids(Store(store_url), sel)


def plan_partitions(
    store_url: str, embedder: str, partitions: int, sel: Selection | None = None
) -> PartitionPlan:
    """The inputs without a vector (of the selection, if one is given), cut into at most
    ``partitions`` stable partitions (by a hash of the input id, so a sequential and a parallel
    run embed the same batches; fewer when there is little to do). Invalid texts (blank, null,
    not text) are skipped and counted: every flow embeds the rest and warns naming them."""
    plan = plan_embedding(store_url, embedder, skip_invalid=True, only=selected_ids(store_url, sel))
    pending = plan.pending.sort("input_id")
    parts = []
    for ids in partition_ids(pending["input_id"].to_list(), n_partitions(plan.todo, partitions)) if plan.todo else []:
        parts.append(Partition(digest(plan.identity.id, ids), len(ids),
                               pending.filter(pl.col("input_id").is_in(ids))))
    return PartitionPlan(
        embedder_id=plan.identity.id, total=plan.total, already_present=plan.already_present,
        todo=plan.todo, invalid=len(plan.bad),
        invalid_reason=describe_bad(plan.bad) if plan.bad else None, parts=tuple(parts),
    )


_EMBED_LOCK = threading.Lock()


def embed_partition(
    store_url: str, embedder: str, pending: pl.DataFrame, *, precision: str = "auto",
    batch_size: int = 64, part_rows: int | None = None, logger=None,
) -> dict:
    """Embed the partition's inputs that still have no vector (a retry or a second run resumes);
    returns ``run_plan``'s summary."""
    from benchroute.transforms.embedder import resolve

    store = Store(store_url)
    _, identity = resolve(embedder)
    present = emb_store.present_ids(store, identity)
    todo = pending.filter(~pl.col("input_id").is_in(present.implode()))
    plan = EmbedPlan(store, identity, embedder, pending.height, pending.height - todo.height, todo, [])
    # One embedding at a time per process: the loaded model and its fast tokenizer are shared by
    # the process's threads and the tokenizer is not safe to call from two at once.
    with _EMBED_LOCK:
        return run_plan(
            plan, precision=precision, batch_size=batch_size, part_rows=part_rows or PART_ROWS,
            progress=False, logger=logger,
        )


def check_options(precision: str, batch_size: int) -> None:
    """Refuse an unknown precision or a batch size below 1 before anything runs."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r}: use one of {', '.join(PRECISIONS)}")
    if batch_size <= 0:
        raise ValueError(f"batch size must be positive, got {batch_size}")
