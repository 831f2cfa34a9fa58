"""Embed every input of a store that has no vector yet for the chosen embedder (docs/operations.md#prefect-flows).

``embed_store`` is the whole job as a plain function; ``embed_flow`` is the same job as a Prefect
flow of two thin tasks (plan: what is missing; embed: run and write parts). The work itself lives
in ``transforms.embed`` (order, batches, precision), ``transforms.embedder`` (the model) and
``artifacts.embeddings`` (parts in the store).

Each distinct input (``inputs.input_id``, a hash of the normalised text, so one text shared by
several sources or datasets is one input) is embedded once per embedder. A run writes a part
every few thousand vectors; after a crash the next run embeds only what is still missing, and a
run with nothing missing reads two id columns and returns without loading the model.
"""

from __future__ import annotations

import logging
import sys
import time
from dataclasses import dataclass

import polars as pl
from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

from benchroute.artifacts import embeddings as emb_store
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

log = logging.getLogger("benchroute.embed")


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
    part_rows: int = 4096,
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
    part_rows: int = 4096,
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
    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r}: use one of {', '.join(PRECISIONS)}")
    if batch_size <= 0:
        raise ValueError(f"batch size must be positive, got {batch_size}")
    logger = logger or log
    start = time.perf_counter()
    plan = plan_embedding(store, embedder, skip_invalid=skip_invalid)
    _log_plan(plan, logger)
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


def _log_plan(plan: EmbedPlan, logger) -> None:
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


# --------------------------------------------------------------------------- Prefect
# No task caching: what needs embedding depends on the store's contents, not on the arguments;
# the store itself is the cache (vectors already there are never recomputed).
@task(
    name="plan-embedding",
    cache_policy=NO_CACHE,
    persist_result=False,
    retries=2,
    retry_delay_seconds=2,
)
def plan_task(store: str, embedder: str) -> EmbedPlan:
    """Which inputs still need a vector (retried: it only reads the store)."""
    plan = plan_embedding(store, embedder)
    _log_plan(plan, get_run_logger())
    return plan


@task(name="embed-pending", cache_policy=NO_CACHE)
def embed_task(plan: EmbedPlan, precision: str, batch_size: int) -> dict:
    """Embed them, a committed part at a time (not retried as a whole: a rerun resumes)."""
    return run_plan(plan, precision=precision, batch_size=batch_size, logger=get_run_logger())


@flow(name="embed", log_prints=False)
def embed_flow(
    store: str, embedder: str = DEFAULT_EMBEDDER, precision: str = "auto", batch_size: int = 64
) -> dict:
    """Embed every input of the store at ``store`` that has no vector for ``embedder`` yet;
    returns the summary of ``embed_store``."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r}: use one of {', '.join(PRECISIONS)}")
    if batch_size <= 0:
        raise ValueError(f"batch size must be positive, got {batch_size}")
    start = time.perf_counter()
    plan = plan_task(store, embedder)
    summary = embed_task(plan, precision, batch_size)
    summary["seconds"] = round(time.perf_counter() - start, 3)
    get_run_logger().info(format_summary(summary))
    return summary
