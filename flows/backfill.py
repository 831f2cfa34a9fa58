"""The ``backfill`` flow (docs/operations.md#backfill): manual; rebuilds the store, or a part of it, and publishes.

Parameters select what: ``paths`` (run dumps to ingest, any fsspec URLs; none = only what the
store holds), ``sources`` (source names: which readers ingest and which data the bundle uses),
``datasets`` and ``models`` (names or globs such as ``mmlu_pro/*``), ``exclude_models`` and the
``embedder`` (a new embedder embeds the selected inputs only). ``relabel`` recomputes the labels with
``rules``; ``force`` recomputes cached evaluations and the fit; ``model_cards``: a card file over
the defaults and the ``model_cards.*`` files under ``paths``. Into a fresh ``store`` URL it
rebuilds a whole store from the dumps.

``dry_run`` reports what it would do and writes nothing: the dumps to ingest, the inputs
without a vector, the datasets and models the bundle would hold, and which of the names
asked for match nothing. ``python -m benchroute.flows.backfill --store URL [PATH…] …`` runs it.
"""

from __future__ import annotations

import json
import sys
import time

from benchroute.artifacts.specs import EmbedSpec, RouterSpec, Selection
from benchroute.artifacts.stages.backfill import backfill_plan, plan_markdown
from benchroute.flows.ingest import ingest_flow
from benchroute.flows.params import (
    BundleName,
    Partitions,
    Positive,
    Url,
)
from benchroute.flows.pipeline import (
    cards_task,
    embed_step,
    evaluation_status,
    publish_artifacts,
    refit_step,
    relabel_task,
)
from benchroute.flows.runtime import cache_storage, transient_io
from benchroute.flows.scale import task_runner
from benchroute.transforms.ingest import find_cards
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from prefect.runtime import flow_run


@task(name="plan-backfill", cache_policy=NO_CACHE, persist_result=False, retries=2,
      retry_delay_seconds=2, retry_condition_fn=transient_io)
def backfill_plan_task(store: str, paths: list[str], selection: Selection, embedder: str,
                       kinds, partitions: int, relabel: bool, name: str) -> dict:
    return backfill_plan(store, paths, selection, embedder, kinds=kinds, partitions=partitions,
                         relabel=relabel, name=name)


@flow(name="backfill", task_runner=task_runner(0), log_prints=False)
def backfill_flow(
    store: Url,
    paths: list[Url] | None = None,
    name: BundleName = "default",
    selection: Selection = Selection(),
    embed: EmbedSpec = EmbedSpec(),
    router: RouterSpec = RouterSpec(),
    partitions: Partitions = 4,
    embed_concurrency: Positive = 1,
    embed_threads: Positive | None = None,
    relabel: bool = False,
    rules: str | None = None,
    aliases: str | None = None,
    force: bool = False,
    dry_run: bool = False,
    cache: str | None = None,
    model_cards: str | None = None,
) -> dict:
    """Ingest ``paths`` (only the readers of ``selection.sources`` when given), relabel if asked,
    embed the selected inputs without a vector (as ``embed`` says), evaluate and publish bundle
    ``name`` from the selected datasets and models, fitted as ``router`` says. ``dry_run``: only
    report (artifact ``backfill-plan``)."""
    log = get_run_logger()
    t0 = time.perf_counter()
    paths = list(paths or [])
    sel = selection
    kinds = list(sel.sources) if sel.sources else None
    plan = backfill_plan_task(store, paths, sel, embed.embedder, kinds, partitions, relabel, name)
    if plan["unmatched"]:
        log.warning("these match nothing in the store now: %s", plan["unmatched"])
    cards = find_cards(paths)
    plan["cards"] = cards_task(store, cards, model_cards, write=False)  # a bad card fails here
    if dry_run:
        create_markdown_artifact(key="backfill-plan", markdown=plan_markdown(plan),
                                 description="what the backfill would do")
        log.info("dry run: %s", json.dumps(plan, default=str)[:4000])
        return {"dry_run": True, "plan": plan, "seconds": round(time.perf_counter() - t0, 2)}

    storage = cache_storage(store, cache)
    ingest = None
    if plan["ingest"]["new"]:
        ingest = ingest_flow(sources=paths, store=store, kinds=kinds, aliases=aliases,
                             rules=rules, progress=False, model_cards=model_cards)
    elif relabel:
        log.info("relabel: %d labels", relabel_task(store, rules))
    cards_task(store, cards, model_cards)
    embedded = embed_step(store, embed, partitions=partitions, concurrency=embed_concurrency,
                          threads=embed_threads, storage=storage, log=log, selection=sel)
    refit = refit_step(store, name, embedded["embedder_id"], sel, router, storage=storage, log=log,
                       force=force)
    if refit["bundle"] is None:
        raise ValueError(f"{store}: the selection {sel.to_dict()} holds no labels; nothing to publish "
                         f"(what it matches: run with dry_run=True)")
    summary = {
        "flow_run_id": str(flow_run.id),
        "dry_run": False,
        "plan": plan,
        "ingest": ingest,
        "embed": embedded,
        "evaluation": evaluation_status(refit),
        "published": refit["published"],
        "bundle": refit["bundle"],
        "seconds": round(time.perf_counter() - t0, 2),
    }
    publish_artifacts("backfill", store, refit, [
        f"- selection: {sel.to_dict()}",
        f"- ingested {len(plan['ingest']['new'])} run dumps; embedded {embedded['new']:,} inputs",
        f"- evaluation groups: ran {summary['evaluation']['ran'] or '-'}, cached "
        f"{summary['evaluation']['cached'] or '-'}",
    ])
    return summary


def main(argv: list[str] | None = None) -> int:
    """``benchroute backfill …`` (``python -m benchroute.flows.backfill …``): the options are the CLI's."""
    from benchroute.flows.cli import main as cli

    return cli(["backfill", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
