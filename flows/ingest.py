"""The ``ingest`` Prefect flow: source dumps -> validated canonical tables -> labels.

Wiring only: discovery, reading, committing and labels are ``artifacts.stages.ingest``; the
store's model card is ``artifacts.model_cards`` (``flows.pipeline.cards_task``).
"""

from __future__ import annotations

import time

import polars as pl
from prefect import flow, get_run_logger, task

from benchroute.artifacts.stages import ingest as stage
from benchroute.artifacts.store import Store
from benchroute.flows.pipeline import cards_task, relabel_task
from benchroute.flows.runtime import read_ahead
from benchroute.transforms.ingest import Unit, discover, find_cards


# Units read ahead of the one being committed (each unit's frames wait in memory until then).
READ_AHEAD = 4


@task(retries=2, retry_delay_seconds=2)
def discover_task(sources: list[str], kinds: list[str] | None) -> list[Unit]:
    return discover(sources, kinds)


@task(retries=2, retry_delay_seconds=2, persist_result=False)
def read_task(unit: Unit, aliases: str | None, rules: str | None) -> dict[str, pl.DataFrame] | str:
    """One unit -> canonical frames (``stage.read_tables``); an unparseable unit's message is a
    result, not a failure (retries are for I/O errors only)."""
    return stage.read_tables(unit, aliases, rules)


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
        reads = read_ahead(plan.todo, lambda u: read_task.submit(u, aliases, rules), READ_AHEAD)
        stage.commit_reads(target, reads, summary, log, progress=progress, total=len(plan.todo))
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
