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

import argparse
import json
import sys
import time

from prefect import flow, get_run_logger, task
from prefect.runtime import flow_run
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from benchroute.artifacts.router_build import Selection
from benchroute.artifacts.stages.backfill import backfill_plan, plan_markdown
from benchroute.flows.ingest import ingest_flow
from benchroute.flows.params import (
    WEIGHTS,
    BatchSize,
    BundleName,
    IndexDtype,
    Kind,
    Partitions,
    Positive,
    Precision,
    Url,
    Weights,
    kind_option,
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
from benchroute.transforms.embedder_packages import DEFAULT_EMBEDDER
from benchroute.transforms.ingest import find_cards


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
    sources: list[Kind] | None = None,
    datasets: list[str] | None = None,
    models: list[str] | None = None,
    exclude_models: list[str] | None = None,
    embedder: str = DEFAULT_EMBEDDER,
    precision: Precision = "auto",
    batch_size: BatchSize = 64,
    k: Positive = 10,
    weights: Weights = "uniform",
    index_dtype: IndexDtype = "float16",
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
    """Ingest ``paths`` (only ``sources``' readers when given), relabel if asked, embed the
    inputs without an ``embedder`` vector, evaluate and publish bundle ``name`` from the
    selected datasets and models. ``dry_run``: only report (artifact ``backfill-plan``)."""
    log = get_run_logger()
    t0 = time.perf_counter()
    paths = list(paths or [])
    sel = Selection.of(sources, datasets, models, exclude_models)
    kinds = list(sources) if sources else None
    plan = backfill_plan_task(store, paths, sel, embedder, kinds, partitions, relabel, name)
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
    embed = embed_step(store, embedder, precision=precision, batch_size=batch_size,
                       partitions=partitions, concurrency=embed_concurrency,
                       threads=embed_threads, storage=storage, log=log, selection=sel)
    refit = refit_step(store, name, embed["embedder_id"], sel, k=k, weights=weights,
                       index_dtype=index_dtype, storage=storage, log=log, force=force)
    if refit["bundle"] is None:
        raise ValueError(f"{store}: the selection {sel.to_dict()} holds no labels; nothing to publish "
                         f"(what it matches: run with dry_run=True)")
    summary = {
        "flow_run_id": str(flow_run.id),
        "dry_run": False,
        "plan": plan,
        "ingest": ingest,
        "embed": embed,
        "evaluation": evaluation_status(refit),
        "published": refit["published"],
        "bundle": refit["bundle"],
        "seconds": round(time.perf_counter() - t0, 2),
    }
    publish_artifacts("backfill", store, refit, [
        f"- selection: {sel.to_dict()}",
        f"- ingested {len(plan['ingest']['new'])} run dumps; embedded {embed['new']:,} inputs",
        f"- evaluation groups: ran {summary['evaluation']['ran'] or '-'}, cached "
        f"{summary['evaluation']['cached'] or '-'}",
    ])
    return summary


def main(argv: list[str] | None = None) -> int:
    from benchroute import settings

    settings.process_defaults()
    ap = argparse.ArgumentParser(prog="benchroute backfill", description=__doc__.splitlines()[0])
    ap.add_argument("paths", nargs="*", help="run dumps to ingest (folders, files, fsspec URLs)")
    ap.add_argument("--store", required=True)
    ap.add_argument("--name", default="default")
    kind_option(ap, "only these source kinds: their readers ingest, their data is published")
    ap.add_argument("--dataset", action="append", dest="datasets", help="name or glob")
    ap.add_argument("--model", action="append", dest="models", help="name or glob")
    ap.add_argument("--exclude-model", action="append", dest="exclude_models")
    ap.add_argument("--embedder", default=DEFAULT_EMBEDDER)
    ap.add_argument("--aliases", default=None, help="CSV of model aliases (as for ingest)")
    ap.add_argument("--k", type=int, default=10, help="neighbours of the kNN router (default 10)")
    ap.add_argument("--weights", choices=WEIGHTS, default="uniform")
    ap.add_argument("--relabel", action="store_true")
    ap.add_argument("--rules", default=None)
    ap.add_argument("--models", dest="model_cards", default=None,
                    help="model card file (CSV or YAML: sizes, prices); --model selects models")
    ap.add_argument("--force", action="store_true", help="recompute cached evaluations and fit")
    ap.add_argument("--dry-run", action="store_true")
    ap.add_argument("--dask-workers", type=int, default=0)
    ap.add_argument("--dask-address", default=None)
    args = ap.parse_args(argv)

    from benchroute.flows.scale import scale_parameters, with_task_runner

    run = with_task_runner(backfill_flow, args.dask_workers, address=args.dask_address)
    r = run(
        store=args.store, paths=args.paths, name=args.name, sources=args.sources,
        datasets=args.datasets, models=args.models, exclude_models=args.exclude_models,
        embedder=args.embedder, relabel=args.relabel, rules=args.rules, aliases=args.aliases,
        k=args.k, weights=args.weights, force=args.force,
        dry_run=args.dry_run, model_cards=args.model_cards,
        **scale_parameters(args.dask_workers, address=args.dask_address),
    )
    if r["dry_run"]:
        print(plan_markdown(r["plan"]))
        return 0
    b = r["bundle"]
    print(("published " if r["published"] else "unchanged, latest stays ")
          + f"{b['name']} {b['version']} ({b['models']} models) at {b['url']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
