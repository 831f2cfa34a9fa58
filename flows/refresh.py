"""The ``refresh`` flow (docs/operations.md#refresh): scheduled, incremental.

It watches a landing location (any fsspec URL) where new benchmark run dumps are dropped as
folders or files, and on each run:

1. finds the dumps whose content fingerprint the store does not hold (``transforms.ingest``);
2. ingests them (the ``ingest`` flow, as a subflow; labels are recomputed);
3. embeds only the inputs without a vector, in partitions (``flows.pipeline.embed_step``);
4. evaluates only the source groups whose data changed (the others are cached by fingerprint);
5. fits and publishes a new bundle version only when the data changed.

With ``incremental`` (a leaderboard-size store) step 4 is skipped and step 5 extends the latest
version by the models added since it, without a refit, where ``artifacts.router_extend`` allows
(else it builds in full, without evaluation).

A run with nothing new reads fingerprints and the commit log, finds every step cached and
publishes nothing. ``python -m benchroute.flows.refresh LANDING --store URL`` runs it once.
"""

from __future__ import annotations

import sys
import time

from benchroute.artifacts.specs import EmbedSpec, RouterSpec, Selection
from benchroute.artifacts.stages import refresh as refresh_stage
from benchroute.artifacts.stages.ingest import new_units, stale_labels
from benchroute.artifacts.store import Store
from benchroute.flows.ingest import ingest_flow
from benchroute.flows.params import (
    BundleName,
    Kind,
    Partitions,
    Positive,
    Url,
)
from benchroute.flows.pipeline import (
    cards_task,
    discover_landing_task,
    embed_step,
    evaluation_status,
    publish_artifacts,
    refit_step,
)
from benchroute.flows.runtime import cache_storage, command_name, transient_io
from benchroute.flows.scale import task_runner
from benchroute.transforms.ingest import find_cards
from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.runtime import flow_run


@flow(name="refresh", task_runner=task_runner(0), log_prints=False)
def refresh_flow(
    landing: Url,
    store: Url,
    name: BundleName = "default",
    embed: EmbedSpec = EmbedSpec(),
    router: RouterSpec = RouterSpec(),
    partitions: Partitions = 4,
    embed_concurrency: Positive = 1,
    embed_threads: Positive | None = None,
    kinds: list[Kind] | None = None,
    aliases: str | None = None,
    rules: str | None = None,
    cache: str | None = None,
    model_cards: str | None = None,
    full: bool = False,
    incremental: bool = False,
) -> dict:
    """Ingest what is new under ``landing`` into ``store``, embed new inputs (as ``embed``
    says), refit what changed and publish bundle ``name`` (fitted as ``router`` says) if the data
    or the specs changed.

    ``partitions``: embedding partitions (run in parallel on a Dask task runner);
    ``embed_concurrency``: partitions embedding at once (a global concurrency limit);
    ``embed_threads``: cores per partition (default: all the worker may use); ``kinds``,
    ``aliases``, ``rules``: as for ``ingest``; ``cache``: where task results persist (default
    ``<store>/_cache/prefect``); ``model_cards``: a card file over the defaults and the landing
    zone's ``model_cards.*`` (a changed card refits and publishes). Unless ``full``, a run that
    finds nothing new (``artifacts.stages.refresh.check``) stops there, before any other task
    (its summary has ``noop`` and ``reason``, zero counts, and makes no artifact).
    ``incremental``: no per-group evaluation; the latest version is extended by the models added
    since it where that equals what a full build keeps (``artifacts.router_extend``), else built
    in full. Returns what it did (also a ``refresh-bundle`` artifact).
    """
    log = get_run_logger()
    t0 = time.perf_counter()
    if not full:
        checked = refresh_check_task(landing, store, name, embed, router, kinds, rules, model_cards)
        if checked.noop:
            log.info("refresh: %s (%d run dumps, none new): nothing to run", checked.reason,
                     checked.units)
            return refresh_stage.noop_summary(landing, store, name, checked,
                                              round(time.perf_counter() - t0, 2), str(flow_run.id))
        log.info("refresh: %s", checked.reason)
    storage = cache_storage(store, cache)
    timings: dict[str, float] = {}

    units = discover_landing_task(landing, kinds)
    new = new_units(Store(store), units)
    timings["discover"] = round(time.perf_counter() - t0, 2)
    if not units:
        log.warning("%s holds no benchmark run dumps yet", landing)
    log.info("landing %s: %d run dumps, %d new%s", landing, len(units), len(new),
             "".join(f"\n  new: {u.key}" for u in new[:20]))

    cards = find_cards([landing])
    cards_task(store, cards, model_cards, write=False)  # a bad card fails before any write
    ingest = None
    # Stale labels with nothing new: a run killed between its ingest commit and its relabel (or
    # other rules); the ingest flow then only relabels.
    stale = None if new else stale_labels(Store(store), rules)
    if new or stale:
        if stale:
            log.warning("labels are stale (%s): relabelling", stale)
        t = time.perf_counter()
        ingest = ingest_flow(sources=[landing], store=store, kinds=kinds, aliases=aliases,
                             rules=rules, progress=False, units=units, model_cards=model_cards)
        timings["ingest"] = round(time.perf_counter() - t, 2)
        total = ingest["added"].get("_total", {})
        outcomes = sum(v.get("new_outcomes", 0) for s, v in ingest["added"].items() if s != "_total")
        log.info("ingest: %d units, %d new inputs, %d new models, %d new outcomes in %.1f s "
                 "(%.0f outcomes/s)", len(new), total.get("new_inputs", 0),
                 total.get("new_models", 0), outcomes, timings["ingest"],
                 outcomes / max(timings["ingest"], 1e-9))

    card = cards_task(store, cards, model_cards)  # after an ingest: already written, no change
    if card["written"]:
        log.info("model cards changed: %s", card["rules"])

    embedded = embed_step(store, embed, partitions=partitions, concurrency=embed_concurrency,
                          threads=embed_threads, storage=storage, log=log)
    timings["embed"] = embedded["seconds"]
    key = refresh_stage.data_key_now(store, embed, router)  # before the refit: see stages.refresh
    refit = refit_step(store, name, embedded["embedder_id"], Selection(), router, storage=storage,
                       log=log, incremental=incremental)
    if refit["bundle"] is not None:
        refresh_stage.record(store, name, key, refit["bundle"]["version"])
    timings["evaluate"] = refit.get("evaluate_seconds", 0.0)
    timings["refit_total"] = refit.get("seconds", 0.0)
    timings["total"] = round(time.perf_counter() - t0, 2)

    summary = {
        "flow_run_id": str(flow_run.id),
        "landing": landing,
        "store": store,
        "units": {"found": len(units), "new": len(new), "new_keys": [u.key for u in new]},
        "ingest": ingest,
        "cards": ingest["cards"] if ingest else card,
        "embed": embedded,
        "evaluation": evaluation_status(refit),
        "fit_cached": refit.get("fit_cached"),
        "published": refit["published"],
        "bundle": refit["bundle"],
        "seconds": timings["total"],
        "timings": timings,
    }
    publish_artifacts("refresh", store, refit, [
        f"- landing `{landing}`: {len(units)} run dumps, {len(new)} new",
        f"- embedded {embedded['new']:,} new inputs ({embedded['already_present']:,} already had "
        f"a vector) in {embedded['seconds']} s",
        f"- evaluation groups: ran {summary['evaluation']['ran'] or '-'}, cached "
        f"{summary['evaluation']['cached'] or '-'}",
        f"- timings (s): {timings}",
    ])
    log.info("refresh done in %.1f s: %s", timings["total"],
             "published " + refit["bundle"]["version"] if refit["published"] else "nothing published")
    return summary


@task(name="check-refresh", cache_policy=NO_CACHE, persist_result=False, retries=2,
      retry_delay_seconds=2, retry_condition_fn=transient_io)
def refresh_check_task(landing: str, store: str, name: str, embed: EmbedSpec, router: RouterSpec,
                       kinds, rules, model_cards) -> refresh_stage.RefreshCheck:
    return refresh_stage.check(landing, store, name, embed, router, kinds=kinds, rules=rules,
                               model_cards=model_cards)


def print_summary(s: dict, store: str) -> None:
    """What a person wants to know after a run: what happened, where the bundle is, how to use it."""
    if s.get("noop"):
        print("\n".join(refresh_stage.noop_lines(s)))
        return
    e, ev = s["embed"], s["evaluation"]
    names = lambda groups: ", ".join(groups) or "-"  # noqa: E731
    print(f"refresh: {s['units']['found']} run dumps in the landing zone, {s['units']['new']} new; "
          f"embedded {e['new']:,} inputs ({e['already_present']:,} already had vectors); "
          f"groups evaluated: {names(ev['ran'])}; cached: {names(ev['cached'])}; "
          f"too small for leave-one-dataset-out: {names(ev['skipped'])}; {s['seconds']} s")
    cards = s.get("cards") or {}
    if cards.get("written"):
        print(f"model cards updated ({', '.join(f'{n} {r}' for r, n in cards['rules'].items())})")
    b = s["bundle"]
    if b is None:
        print("no labels in the store yet: nothing to publish")
        return
    if b["version"] in b.get("recovered", []):
        state = "finished an interrupted publish: latest moved to "
    elif s["published"] and b.get("extended"):
        state = f"extended version {b['extended']} without a refit: published "
    else:
        state = "published new version " if s["published"] else "data unchanged; latest stays "
    print(state + f"{b['name']} {b['version']} ({b['models']} models, {b['bytes']:,} bytes)")
    print(f"bundle: {b['url']}")
    cmd = command_name()
    print(f'route a query:  {cmd} route --bundle {store} --name {b["name"]} "your question"')
    print(f"serve over HTTP: {cmd} serve --bundle {store} --name {b['name']}")
    print(f"in Python: from benchroute.artifacts.router import load_router; "
          f"load_router({store!r}, {b['name']!r}).route('your question')")


def main(argv: list[str] | None = None) -> int:
    """``benchroute refresh …`` (``python -m benchroute.flows.refresh …``): the options are the CLI's."""
    from benchroute.flows.cli import main as cli

    return cli(["refresh", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
