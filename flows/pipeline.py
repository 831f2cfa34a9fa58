"""The tasks the flows share and the two steps ``refresh`` and ``backfill`` are made of
(docs/operations.md#fingerprints-and-caching): embed what has no vector, evaluate what changed,
fit and publish when the data changed.

Each task is a thin Prefect wrapper around a stage function (``artifacts.stages``); this module
adds what Prefect decides: caching, retries, concurrency and the runs' artifacts. The plumbing
(result storage, retry predicate, core affinity) is in ``flows.runtime``.

What the Prefect cache holds, and under which key (results persist under
``<store>/_cache/prefect`` unless ``cache`` says otherwise, so the cache lives and dies with the
store and is shared by every machine that can reach the store):

- ``embed-partition``: the summary of embedding one partition of the inputs that had no vector;
  key = store, the ``EmbedSpec`` (embedder, precision, batch size), the partition's input ids
  (a digest). The vectors themselves are in the store, which is the real cache: a rerun plans
  only what is still missing, so a finished partition is never even submitted again.
- ``evaluate-group``: one source group's leave-one-dataset-out evaluation (the bundle's small
  summary of it); key = a fingerprint of everything it reads (the group's labels, the
  memberships of its inputs, its models' sizes, the embedder id, k, weights, code version). A
  group whose data did not change is not evaluated again, whatever else changed in the store.
- ``fit-and-publish``: the published version; key = the store's data key (the parts of labels,
  memberships, models and the embedder's vectors, the ingested units' fingerprints), the
  ``Selection`` and ``RouterSpec`` whole, and the evaluation. Unchanged data → a cached state →
  nothing is fitted or published.

Partitions run wherever the flow's task runner sends them: in the flow's process, or on a Dask
cluster (``flows.scale``). Partitioning is by a stable hash of the input id, so a sequential
and a parallel run embed exactly the same batches.
"""

from __future__ import annotations

import time

from benchroute.artifacts.bundle import BundleStore
from benchroute.artifacts.model_cards import sync_cards
from benchroute.artifacts.router_build import finite
from benchroute.artifacts.specs import EmbedSpec, RouterSpec, Selection
from benchroute.artifacts.stages import embed as embed_stage
from benchroute.artifacts.stages import evaluate as evaluate_stage
from benchroute.artifacts.stages import ingest as ingest_stage
from benchroute.artifacts.stages import publish as publish_stage
from benchroute.flows.runtime import (
    EMBED_LIMIT,
    PipelineError,
    cores,
    ensure_limit,
    transient_io,
)
from benchroute.transforms.fingerprints import digest
from benchroute.transforms.ingest import Unit
from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE, TASK_SOURCE, CacheKeyFnPolicy
from prefect.futures import wait


# ============================================================================ Prefect tasks
@task(name="discover-landing", cache_policy=NO_CACHE, persist_result=False, retries=2,
      retry_delay_seconds=2, retry_condition_fn=transient_io)
def discover_landing_task(landing: str, kinds: list[str] | None) -> list[Unit]:
    return ingest_stage.discover_landing(landing, kinds)


@task(cache_policy=NO_CACHE, persist_result=False)
def cards_task(store: str, found: list[str], models: str | None, write: bool = True) -> dict:
    """The store's model card from the defaults, ``found`` card files and the ``models`` card
    (``artifacts.model_cards.sync_cards``); a bad card fails the run, naming file, row and field."""
    return sync_cards(store, found, models, write=write)


@task(retries=2, retry_delay_seconds=2, persist_result=False)
def relabel_task(store: str, rules: str | None) -> int:
    """Bring the labels up to date with the store's outcomes: append the new outcome parts'
    labels when the rules allow it, else recompute them all (``stages.ingest.relabel``)."""
    return ingest_stage.relabel(store, rules, logger=get_run_logger())


@task(name="plan-embedding-partitions", cache_policy=NO_CACHE, persist_result=False, retries=2,
      retry_delay_seconds=2, retry_condition_fn=transient_io)
def plan_partitions_task(store: str, embedder: str, partitions: int,
                         selection: Selection | None = None) -> embed_stage.PartitionPlan:
    return embed_stage.plan_partitions(store, embedder, partitions, selection)


def _partition_key(context, p: dict) -> str:
    """A partition's cache key: the store, the ``EmbedSpec`` and the partition's ids (a digest)."""
    return digest("embed-partition", p["store"], p["spec"].key, p["part"].digest)


@task(name="embed-partition", cache_policy=CacheKeyFnPolicy(cache_key_fn=_partition_key) + TASK_SOURCE,
      persist_result=True, result_serializer="json", retries=1, retry_delay_seconds=5,
      retry_condition_fn=transient_io)
def embed_partition_task(store: str, spec: EmbedSpec, part: embed_stage.Partition,
                         threads: int | None) -> dict:
    """One partition; holds a slot of the ``benchroute-embed`` concurrency limit, on
    ``threads`` cores, while it runs."""
    from prefect.concurrency.sync import concurrency

    with concurrency(EMBED_LIMIT, occupy=1), cores(threads):
        return embed_stage.embed_partition(
            store, spec.embedder, part.pending, precision=spec.precision,
            batch_size=spec.batch_size, logger=get_run_logger(),
        )


@task(name="plan-refit", cache_policy=NO_CACHE, persist_result=False, retries=2,
      retry_delay_seconds=2, retry_condition_fn=transient_io)
def refit_plan_task(store: str, embedder_id: str, selection: Selection,
                    router: RouterSpec) -> evaluate_stage.RefitPlan | None:
    return evaluate_stage.refit_plan(store, embedder_id, selection, router)


def _group_key(context, p: dict) -> str:
    """A group's evaluation is keyed by its fingerprint (its data, the embedder, k, weights and
    the code version), not by the store: equal data, equal result."""
    return digest("evaluate-group", p["group"], p["fingerprint"])


@task(name="evaluate-group", cache_policy=CacheKeyFnPolicy(cache_key_fn=_group_key) + TASK_SOURCE,
      persist_result=True, result_serializer="json", retries=1, retry_delay_seconds=2,
      retry_condition_fn=transient_io)
def evaluate_group_task(store: str, embedder_id: str, group: str, fingerprint: str,
                        selection: Selection, router: RouterSpec) -> dict:
    return evaluate_stage.evaluate_group(store, embedder_id, group, fingerprint, selection, router,
                                         log=get_run_logger())


def _publish_key(context, p: dict) -> str:
    """The bundle's cache key: the store's data key (``stages.fit.data_key``: the commit log's
    parts, the ingested units, both specs, the code version), the name, the evaluation and
    whether an extension was asked for (a full build's key is the one it always was)."""
    from benchroute.artifacts.stages.fit import data_key
    from benchroute.artifacts.store import Store

    key = data_key(Store(p["store"]), p["embedder_id"], p["selection"], p["router"])
    extend = ["incremental"] if p.get("incremental") else []
    return digest("fit-and-publish", p["store"], p["name"], key, p["evaluation"], *extend)


@task(name="fit-and-publish", cache_policy=CacheKeyFnPolicy(cache_key_fn=_publish_key) + TASK_SOURCE,
      persist_result=True, result_serializer="json", retries=1, retry_delay_seconds=2,
      retry_condition_fn=transient_io)
def fit_publish_task(store: str, name: str, embedder_id: str, evaluation: dict,
                     selection: Selection, router: RouterSpec, incremental: bool = False) -> dict:
    return publish_stage.fit_and_publish(store, name, embedder_id, selection, evaluation, router,
                                         log=get_run_logger(), incremental=incremental)


@task(name="has-labels", cache_policy=NO_CACHE, persist_result=False, retries=2,
      retry_delay_seconds=2, retry_condition_fn=transient_io)
def has_labels_task(store: str, selection: Selection) -> bool:
    from benchroute.artifacts.router_build import has_labels
    from benchroute.artifacts.store import Store

    return has_labels(Store(store), selection)


# ============================================================================ steps (in a flow)
def embed_step(
    store: str, spec: EmbedSpec, *, partitions: int, concurrency: int, threads: int | None,
    storage, log, selection: Selection | None = None,
) -> dict:
    """Embed every input (of ``selection``, if given) without a vector, partitioned; invalid
    texts are skipped with a warning naming them. Returns counts, seconds and rate."""
    t0 = time.perf_counter()
    plan = plan_partitions_task(store, spec.embedder, partitions, selection)
    out = {
        "embedder_id": plan.embedder_id, "total": plan.total,
        "already_present": plan.already_present, "new": 0, "invalid": plan.invalid,
        "partitions": len(plan.parts), "cached_partitions": 0, "seconds": 0.0,
        "inputs_per_s": 0.0, "truncated": 0, "threads": [], "precision": [],
    }
    if plan.invalid:
        log.warning("not embedding %d inputs: %s", plan.invalid, plan.invalid_reason)
    if not plan.parts:
        log.info("embed: all %d inputs have a %s vector; nothing to embed", plan.total,
                 plan.embedder_id)
        out["seconds"] = round(time.perf_counter() - t0, 2)
        return out
    ensure_limit(EMBED_LIMIT, concurrency)
    log.info(
        "embed: %d inputs, %d already embedded with %s, %d to embed in %d partitions (%s), "
        "at most %d at a time", plan.total, plan.already_present, plan.embedder_id, plan.todo,
        len(plan.parts), ", ".join(str(p.size) for p in plan.parts), concurrency,
    )
    run = embed_partition_task.with_options(result_storage=storage)
    futures = [run.submit(store, spec, p, threads) for p in plan.parts]
    wait(futures)
    failed = []
    for p, f in zip(plan.parts, futures):
        state = f.state
        if state.is_failed() or not state.is_completed():
            failed.append(f"{p.size} inputs: {state.message}")
            continue
        r = state.result()
        cached = state.name == "Cached"
        out["new"] += 0 if cached else r["new"]
        out["truncated"] += 0 if cached else r.get("truncated", 0)
        out["cached_partitions"] += cached
        for key in ("threads", "precision"):
            if r.get(key) is not None and r[key] not in out[key]:
                out[key].append(r[key])
    seconds = time.perf_counter() - t0
    out["seconds"] = round(seconds, 2)
    out["inputs_per_s"] = round(out["new"] / seconds, 2) if seconds > 0 else 0.0
    if failed:
        raise PipelineError(
            f"embedding failed in {len(failed)} of {len(futures)} partitions ({'; '.join(failed)}); "
            f"{out['new']} new vectors are committed and the next run embeds only the rest"
        )
    log.info("embed: %d new vectors in %.1f s (%.1f inputs/s), %d partitions", out["new"],
             seconds, out["inputs_per_s"], len(futures))
    return out


def refit_step(
    store: str, name: str, embedder_id: str, sel: Selection, router: RouterSpec, *, storage, log,
    force: bool = False, incremental: bool = False,
) -> dict:
    """Evaluate the groups whose data changed (the others come from the cache), then fit and
    publish if the data changed. ``force`` recomputes everything (no cache reads).
    ``incremental``: no evaluation (an extension cannot carry one, and the per-group plan reads
    every label); the latest version is extended by the models added since it where
    ``artifacts.router_extend`` allows, else built in full."""
    t0 = time.perf_counter()
    if incremental:
        plan = evaluate_stage.RefitPlan((), None, None, None) if has_labels_task(store, sel) else None
    else:
        plan = refit_plan_task(store, embedder_id, sel, router)
    if plan is None:
        log.warning("%s: no labels%s yet; nothing to fit or publish", store,
                    "" if sel.is_all else f" in the selection {sel.to_dict()}")
        return {"published": False, "bundle": None, "evaluation": {}, "groups": {},
                "reason": "no labels"}
    evaluate = evaluate_group_task.with_options(result_storage=storage, refresh_cache=force)
    futures = {
        g.name: evaluate.submit(store, embedder_id, g.name, g.fingerprint, sel, router)
        for g in plan.groups if not g.skipped
    }
    wait(list(futures.values()))
    evaluation = {g.name: {"skipped": g.skipped} for g in plan.groups if g.skipped}
    status = {g: "skipped" for g in evaluation}
    failed = []
    for group, f in futures.items():
        state = f.state
        if not state.is_completed():
            failed.append(f"{group}: {state.message}")
            continue
        evaluation[group] = state.result()
        if "skipped" in evaluation[group]:  # found unfit for LODO only once evaluated
            status[group] = "skipped"
        else:
            status[group] = "cached" if state.name == "Cached" else "ran"
    if failed:
        raise PipelineError(f"evaluation failed for {'; '.join(failed)}; the groups that "
                            "finished are cached and a rerun evaluates only the rest")
    t_eval = time.perf_counter() - t0
    ran = sorted(g for g, s in status.items() if s == "ran")
    log.info("evaluate: %d groups ran (%s), %d cached, %d skipped in %.1f s", len(ran),
             ", ".join(ran) or "-", sum(s == "cached" for s in status.values()),
             sum(s == "skipped" for s in status.values()), t_eval)

    publish = fit_publish_task.with_options(result_storage=storage, refresh_cache=force)
    args = (store, name, embedder_id, evaluation, sel, router, incremental)
    state = publish(*args, return_state=True)
    bundle = state.result()  # raises with the task's error when it failed
    cached = state.name == "Cached"
    if cached and bundle["version"] not in BundleStore(store).versions(name):
        log.warning("cached bundle %s/%s is gone (gc?); building it again", name, bundle["version"])
        state = publish.with_options(refresh_cache=True)(*args, return_state=True)
        bundle, cached = state.result(), False
    # A publish a killed run left half-done (manifest, not latest) is finished by this one's.
    recovered = [] if cached else list(bundle.get("recovered", []))
    published = (bool(bundle["created"]) or bundle["version"] in recovered) and not cached
    for v in recovered:
        log.warning("finished an interrupted publish: latest moved to %s version %s", name, v)
    if published and bundle.get("extended"):
        log.info("extended %s version %s by the models added since (no refit)", name, bundle["extended"])
    if published:
        log.info("published %s version %s (%d models, %s bytes) at %s", name, bundle["version"],
                 bundle["models"], f"{bundle['bytes']:,}", bundle["url"])
    else:
        log.info("data unchanged: %s stays at version %s (nothing published)", name,
                 bundle["version"])
    return {
        "published": published,
        "bundle": {**bundle, "created": published, "recovered": recovered},
        "evaluation": evaluation,
        "groups": status,
        "fit_cached": cached,
        "inputs": plan.inputs, "models": plan.models, "datasets": plan.datasets,
        "evaluate_seconds": round(t_eval, 2),
        "seconds": round(time.perf_counter() - t0, 2),
    }


def evaluation_status(refit: dict) -> dict[str, list[str]]:
    """The groups by what happened to them: ran, cached (data unchanged) or skipped."""
    return {s: sorted(g for g, v in refit["groups"].items() if v == s)
            for s in ("ran", "cached", "skipped")}


# ============================================================================ artifacts
def publish_artifacts(prefix: str, store: str, result: dict, summary_lines: list[str]) -> None:
    """The evaluation table and the bundle summary as Prefect artifacts (``<prefix>-evaluation``,
    ``<prefix>-bundle``)."""
    rows = []
    for group, entry in sorted(result.get("evaluation", {}).items()):
        status = result.get("groups", {}).get(group, "")
        if "skipped" in entry:
            rows.append({"group": group, "status": f"skipped: {entry['skipped']}", "method": None,
                         "acc": None, "ratio_to_best": None, "rank": None})
            continue
        for r in entry.get("table1", []):
            rows.append({"group": group, "status": status, **r})
    if rows:
        create_table_artifact(
            key=f"{prefix}-evaluation", table=finite(rows),
            description="Leave-one-dataset-out Table 1 per source group (ties by training "
                        "accuracy); status: ran, cached (data unchanged) or skipped",
        )
    b = result.get("bundle")
    md = [f"# {prefix}: {'new version published' if result.get('published') else 'nothing published'}", ""]
    if b:
        sizes = ", ".join([f"{b['models']} models"] + [  # an incremental refit counts neither
            f"{result[k]:,} {k}" for k in ("inputs", "datasets") if result.get(k) is not None])
        md += [
            f"- bundle **{b['name']}** version `{b['version']}`",
            f"- url: `{b['url']}`",
            f"- {sizes}; {b['files']} files, {b['bytes']:,} bytes",
            *([f"- extends version `{b['extended']}` by the models added since (no refit)"]
              if b.get("extended") else []),
            f"- use it: `benchroute route --bundle {store} --name {b['name']} \"your question\"`",
        ]
    md += ["", *summary_lines]
    create_markdown_artifact(key=f"{prefix}-bundle", markdown="\n".join(md),
                             description="router bundle and what this run did")
