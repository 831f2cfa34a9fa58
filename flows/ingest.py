"""The ``ingest`` Prefect flow: source dumps -> validated canonical tables -> labels.

Wiring only: discovery, reading, committing and labels are ``artifacts.stages.ingest``; the
store's model card is ``artifacts.model_cards`` (``flows.pipeline.cards_task``).
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import ThreadPoolExecutor

import polars as pl
from prefect import flow, get_run_logger, task

from benchroute.artifacts.stages import ingest as stage
from benchroute.artifacts.store import Store
from benchroute.flows.pipeline import cards_task, relabel_task
from benchroute.flows.runtime import passing_io_error, read_ahead
from benchroute.transforms.ingest import Unit, discover, find_cards


# Units read ahead of the one being committed (each unit's frames wait in memory until then),
# on this many threads, each tried this many times on a passing I/O error.
READ_AHEAD = 4
READ_THREADS = 2
READ_TRIES = 3
READ_RETRY_SECONDS = 2.0


@task(retries=2, retry_delay_seconds=2)
def discover_task(sources: list[str], kinds: list[str] | None) -> list[Unit]:
    return discover(sources, kinds)


def read_retrying(unit: Unit, aliases: str | None, rules: str | None) -> dict[str, pl.DataFrame] | str:
    """One unit -> canonical frames (``stage.read_tables``), tried up to ``READ_TRIES`` times on
    an I/O error that may pass; an unparseable unit's message is a result, not a failure.

    Units are read on a plain thread pool, not as Prefect tasks: measured on 10 units of 1.5 M
    outcomes, a run's memory grew by ~300 MB a unit with Prefect task runs (6.5 GB peak and
    rising) against a flat 3.7 GB on a thread pool; the flow logs each commit instead."""
    for attempt in range(1, READ_TRIES + 1):
        try:
            return stage.read_tables(unit, aliases, rules)
        except Exception as exc:
            if not passing_io_error(exc) or attempt == READ_TRIES:
                raise
            logging.getLogger(__name__).warning("reading %s failed (%r), try %d of %d", unit.url,
                                                exc, attempt + 1, READ_TRIES)
            time.sleep(READ_RETRY_SECONDS * attempt)
    raise AssertionError("unreachable")


@flow(name="ingest", log_prints=False)
def ingest_flow(
    sources: list[str],
    store: str,
    kinds: list[str] | None = None,
    aliases: str | None = None,
    rules: str | None = None,
    progress: bool = True,
    units: list[Unit] | None = None,
    model_cards: str | None = None,
) -> dict:
    """Ingest every unit under ``sources`` that the store does not hold yet, then relabel, then
    update the store's model card.

    ``kinds`` restricts the readers tried; ``aliases`` is a model-alias CSV extending the shipped
    one; ``rules`` a binarization-rule JSON; ``units``: what a caller already discovered under
    ``sources`` (discovery hashes every file, so it is not done twice); ``model_cards``: a card
    file (CSV/YAML) over the defaults and the ``model_cards.*`` files under ``sources``; a bad
    card fails the run before anything is written. Returns the summary.
    """
    log = get_run_logger()
    t0 = time.perf_counter()
    summary = stage.IngestSummary(store=store)
    target = Store(store)
    cards = find_cards(sources)
    cards_task(store, cards, model_cards, write=False)
    if units is None:
        units = discover_task(sources, kinds)
    plan = stage.plan_ingest(target, sources, units, kinds)
    summary.units_found, summary.units_skipped = len(plan.units), plan.skipped
    summary.not_benchmark, summary.ignored = plan.not_benchmark, plan.ignored
    for path, why in plan.not_benchmark.items():
        log.warning("not a benchmark layout: %s: %s", path, why)
    log.info("found %d units, %d already ingested, %d to read", len(plan.units), plan.skipped,
             len(plan.todo))

    if plan.todo:
        with ThreadPoolExecutor(READ_THREADS, thread_name_prefix="benchroute-read") as pool:
            reads = read_ahead(plan.todo, lambda u: pool.submit(read_retrying, u, aliases, rules),
                               READ_AHEAD)
            stage.commit_reads(target, reads, summary, log, progress=progress,
                               total=len(plan.todo))
    summary.relabelled = stage.stale_labels(target, rules)
    if summary.relabelled:
        if not plan.todo:
            log.warning("relabelling: %s (a run killed before its relabel?)", summary.relabelled)
        summary.labels = relabel_task(store, rules)
    else:
        summary.labels = stage.label_count(target)
    summary.cards = cards_task(store, cards, model_cards)
    summary.seconds = time.perf_counter() - t0
    log.info("ingest done in %.1f s: %s", summary.seconds, summary.to_dict())
    return summary.to_dict()
