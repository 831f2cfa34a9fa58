"""Steps shared by the ``refresh`` and ``backfill`` flows (docs/operations.md#fingerprints-and-caching): embed what has no
vector, evaluate what changed, fit and publish when the data changed.

Each step is a plain function (usable without Prefect) plus a thin Prefect task around it. The
work itself lives in ``transforms`` (fingerprints, LODO groups, the fit) and ``artifacts`` (the
store, embeddings, bundles); ``flows.embed`` / ``flows.evaluate`` / ``flows.publish`` are reused.

What the Prefect cache holds, and under which key (results persist under
``<store>/_cache/prefect`` unless ``cache`` says otherwise, so the cache lives and dies with the
store and is shared by every machine that can reach the store):

- ``embed-partition``: the summary of embedding one partition of the inputs that had no vector;
  key = store, embedder, the partition's input ids (a digest), precision, batch size. The
  vectors themselves are in the store, which is the real cache: a rerun plans only what is still
  missing, so a finished partition is never even submitted again.
- ``evaluate-group``: one source group's leave-one-dataset-out evaluation (the bundle's small
  summary of it); key = a fingerprint of everything it reads (the group's labels, the
  memberships of its inputs, its models' sizes, the embedder id, k, weights, code version). A
  group whose data did not change is not evaluated again, whatever else changed in the store.
- ``fit-and-publish``: the published version; key = the store's data key (the parts of labels,
  memberships, models and the embedder's vectors, the ingested units' fingerprints), the
  selection and parameters, and the evaluation. Unchanged data → a cached state → nothing is
  fitted or published.

Partitions run wherever the flow's task runner sends them: in the flow's process, or on a Dask
cluster (``flows.scale``). Partitioning is by a stable hash of the input id, so a sequential
and a parallel run embed exactly the same batches.
"""

from __future__ import annotations

import math
import os
import threading
import time
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path

import polars as pl
from fsspec.core import url_to_fs
from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import INPUTS, NO_CACHE, TASK_SOURCE
from prefect.futures import wait

from benchroute import code_version
from benchroute.io import is_local
from benchroute.artifacts import embeddings as emb_store
from benchroute.artifacts.bundle import BundleStore
from benchroute.artifacts.router_build import (
    Selection,
    bundle_content,
    evaluation_entry,
    finite,
    publish_content,
    select_frames,
)
from benchroute.artifacts.store import Store
from benchroute.flows.embed import EmbedPlan, plan_embedding, run_plan
from benchroute.flows.evaluate import evaluate_groups
from benchroute.schemas.embeddings import table_name
from benchroute.transforms.embed import describe_bad
from benchroute.transforms.evaluate import EvalConfig
from benchroute.transforms.fingerprints import digest, group_fingerprint, partition_ids
from benchroute.transforms.ingest import Unit, UnknownLayout, discover
from benchroute.transforms.lodo_groups import lodo_groups

CACHE_DIR = "_cache/prefect"
EMBED_LIMIT = "benchroute-embed"  # the global concurrency limit every embedding partition takes a slot of
MIN_PARTITION = 256  # fewer pending inputs per partition than this is not worth a partition
PART_ROWS = 4096  # vectors per committed part (a kill loses at most one part per partition)


class PipelineError(RuntimeError):
    """A step failed; the message says which partitions, what is kept and how to resume."""


# ============================================================================ plain functions
def data_key(store: Store, embedder_id: str, sel: Selection, params: dict) -> str:
    """A digest of everything a bundle is built from, read from the commit log alone (parts are
    immutable, so their names stand for their content)."""
    commits = store.commits()
    tables = ["labels", "memberships", "models", table_name(embedder_id)]
    units: dict[str, str] = {}
    for c in commits:
        units.update(c.units)
    return digest(
        {t: store.parts(t, commits) for t in tables}, units, sel.to_dict(), params, code_version()
    )


def refit_plan(store_url: str, embedder_id: str, sel: Selection, k: int, weights: str) -> dict | None:
    """The evaluation groups with their fingerprints, and the data key; ``None`` without labels."""
    store = Store(store_url)
    labels, memberships, models = select_frames(store, sel)
    if labels.height == 0:
        return None
    params = _eval_params(embedder_id, k, weights)
    groups = []
    for g in lodo_groups(labels, memberships, exclude_models=list(sel.exclude_models or [])):
        row = {"name": g.name, "skipped": g.skipped, "fingerprint": None,
               "datasets": len(g.datasets), "models": len(g.models),
               "inputs": g.labels["input_id"].n_unique()}
        if not g.skipped:
            row["fingerprint"] = group_fingerprint(
                g.labels, memberships, models, datasets=g.datasets, model_names=g.models,
                params=params,
            )
        groups.append(row)
    return {
        "groups": groups,
        "data_key": data_key(store, embedder_id, sel, {"k": k, "weights": weights}),
        "inputs": labels["input_id"].n_unique(),
        "models": labels["model"].n_unique(),
        "datasets": labels["dataset"].n_unique(),
    }


def _eval_params(embedder_id: str, k: int, weights: str) -> dict:
    return {"embedder": embedder_id, "k": k, "weights": weights, "code_version": code_version(),
            "config": asdict(EvalConfig(k=k, weights=weights))}


def evaluate_group(
    store_url: str, embedder_id: str, group: str, fingerprint: str, sel: Selection,
    k: int, weights: str, *, log=None,
) -> dict:
    """Evaluate one source group; refuses when the store no longer matches ``fingerprint`` (it
    changed since the plan: a cached result under that key would be wrong)."""
    return _evaluate_group(store_url, embedder_id, group, fingerprint, sel, k, weights, log)


def _evaluate_group(store_url, embedder_id, group, fingerprint, sel, k, weights, log) -> dict:
    store = Store(store_url)
    labels, memberships, models = select_frames(store, sel)
    exclude = list(sel.exclude_models or [])
    found = [g for g in lodo_groups(labels, memberships, exclude_models=exclude) if g.name == group]
    now = found and group_fingerprint(
        found[0].labels, memberships, models, datasets=found[0].datasets,
        model_names=found[0].models, params=_eval_params(embedder_id, k, weights),
    )
    if now != fingerprint:
        raise PipelineError(
            f"{store_url}: group {group!r} changed while this run was planning it "
            "(another writer?); run again"
        )
    results, skipped = evaluate_groups(
        store, embedder_id, labels, memberships, models, EvalConfig(k=k, weights=weights),
        sources=[group], exclude_models=exclude, log=log,
    )
    if group in results:
        return evaluation_entry(results[group])
    return {"skipped": skipped.get(group, "not evaluated")}


def fit_and_publish(
    store_url: str, name: str, embedder_id: str, sel: Selection, evaluation: dict, *,
    k: int, weights: str, index_dtype: str, log=None,
) -> dict:
    """Fit, build and publish (no new version when the content is identical to one published)."""
    t0 = time.perf_counter()
    content = bundle_content(
        store_url, name, embedder_id, sel, evaluation, k=k, weights=weights,
        index_dtype=index_dtype, log=log,
    )
    return publish_content(store_url, content, started=t0)


def selected_ids(store_url: str, sel: Selection | None) -> pl.Series | None:
    """The input ids a selection's bundle is built from (``None``: the whole store)."""
    if sel is None or sel.is_all:
        return None
    return select_frames(Store(store_url), sel)[0]["input_id"].unique()


def plan_partitions(
    store_url: str, embedder: str, partitions: int, sel: Selection | None = None
) -> dict:
    """The inputs without a vector (of the selection, if one is given), cut into at most
    ``partitions`` stable partitions (fewer when there is little to do). Invalid texts (blank,
    null) are skipped and counted."""
    plan = plan_embedding(store_url, embedder, skip_invalid=True, only=selected_ids(store_url, sel))
    n = max(1, min(partitions, math.ceil(plan.todo / MIN_PARTITION)))
    pending = plan.pending.sort("input_id")
    parts = []
    for ids in partition_ids(pending["input_id"].to_list(), n) if plan.todo else []:
        parts.append({
            "digest": digest(plan.identity.id, ids),
            "size": len(ids),
            "pending": pending.filter(pl.col("input_id").is_in(ids)),
        })
    return {
        "embedder_id": plan.identity.id,
        "total": plan.total,
        "already_present": plan.already_present,
        "todo": plan.todo,
        "invalid": len(plan.bad),
        "invalid_reason": describe_bad(plan.bad) if plan.bad else None,
        "parts": parts,
    }


def embed_partition(
    store_url: str, embedder: str, pending: pl.DataFrame, *, precision: str = "auto",
    batch_size: int = 64, threads: int | None = None, part_rows: int | None = None, logger=None,
) -> dict:
    """Embed the partition's inputs that still have no vector (a retry or a second run resumes)."""
    from benchroute.transforms.embedder import resolve

    store = Store(store_url)
    _, identity = resolve(embedder)
    present = emb_store.present_ids(store, identity)
    todo = pending.filter(~pl.col("input_id").is_in(present.implode()))
    plan = EmbedPlan(store, identity, embedder, pending.height, pending.height - todo.height, todo, [])
    # One embedding at a time per process: the loaded model and its fast tokenizer are shared by
    # the process's threads and the tokenizer is not safe to call from two at once.
    with _EMBED_LOCK, cores(threads):
        return run_plan(
            plan, precision=precision, batch_size=batch_size, part_rows=part_rows or PART_ROWS,
            progress=False, logger=logger,
        )


_EMBED_LOCK = threading.Lock()


@contextmanager
def cores(threads: int | None):
    """Run the body on ``threads`` of the cores this thread may use (its affinity mask).

    The embedder takes every core its thread may use (``transforms.embedder.available_cores``
    reads the affinity mask), which is right for one process per machine and oversubscribes
    when several Dask workers share one; here each worker takes its own ``threads`` cores (by
    its worker number), and the mask is restored afterwards.
    """
    if not threads or not hasattr(os, "sched_setaffinity"):
        yield
        return
    before = os.sched_getaffinity(0)
    mine = sorted(before)
    if threads >= len(mine):
        yield
        return
    start = (_worker_slot() * threads) % len(mine)
    os.sched_setaffinity(0, {mine[(start + i) % len(mine)] for i in range(threads)})
    try:
        yield
    finally:
        os.sched_setaffinity(0, before)


def _worker_slot() -> int:
    """This Dask worker's number (0 outside a worker)."""
    try:
        from distributed import get_worker

        name = get_worker().name
    except (ImportError, ValueError):
        return 0
    try:
        return int(name)
    except (TypeError, ValueError):
        return abs(hash(name))


def cache_storage(store_url: str, cache: str | None = None):
    """Where task results persist: a saved file system block (Prefect needs a task's result
    storage to be a saved block) for the local or remote folder. Either one seals what it writes
    and reads back only sealed JSON records (``flows.cache_records``): a record someone else
    wrote into the store is recomputed, never deserialized."""
    from benchroute.flows.cache_records import SealedLocalFileSystem, SealedRemoteFileSystem

    url = (cache or f"{store_url.rstrip('/')}/{CACHE_DIR}").rstrip("/")
    fs, path = url_to_fs(url)
    if is_local(fs):
        Path(path).mkdir(parents=True, exist_ok=True)
        block = SealedLocalFileSystem(basepath=path)
    else:
        block = SealedRemoteFileSystem(basepath=url)
    block.save(f"benchroute-cache-{digest(url)[:16]}", overwrite=True)
    return block


def discover_landing(landing: str, kinds: list[str] | None = None) -> list[Unit]:
    """Every run dump under the landing location (none yet is not an error)."""
    try:
        return discover([landing], kinds)
    except UnknownLayout:
        return []


# ============================================================================ Prefect tasks
_PERMANENT = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)


def transient_io(task, task_run, state) -> bool:
    """Retry condition: retry I/O errors that may pass (network, timeouts), not missing paths,
    bad data or bugs."""
    exc = state.data if isinstance(state.data, BaseException) else None
    return isinstance(exc, (OSError, TimeoutError)) and not isinstance(exc, _PERMANENT)


@task(name="discover-landing", cache_policy=NO_CACHE, persist_result=False, retries=2,
      retry_delay_seconds=2, retry_condition_fn=transient_io)
def discover_landing_task(landing: str, kinds: list[str] | None) -> list[Unit]:
    return discover_landing(landing, kinds)


@task(name="plan-embedding-partitions", cache_policy=NO_CACHE, persist_result=False, retries=2,
      retry_delay_seconds=2, retry_condition_fn=transient_io)
def plan_partitions_task(store: str, embedder: str, partitions: int,
                         selection: Selection | None = None) -> dict:
    return plan_partitions(store, embedder, partitions, selection)


@task(name="embed-partition", cache_policy=INPUTS - "pending" - "threads" + TASK_SOURCE,
      persist_result=True, result_serializer="json", retries=1, retry_delay_seconds=5,
      retry_condition_fn=transient_io)
def embed_partition_task(
    store: str, embedder: str, part_digest: str, pending: pl.DataFrame, precision: str,
    batch_size: int, threads: int | None,
) -> dict:
    """One partition; holds a slot of the ``benchroute-embed`` concurrency limit while it runs."""
    from prefect.concurrency.sync import concurrency

    with concurrency(EMBED_LIMIT, occupy=1):
        return embed_partition(
            store, embedder, pending, precision=precision, batch_size=batch_size,
            threads=threads, logger=get_run_logger(),
        )


@task(name="plan-refit", cache_policy=NO_CACHE, persist_result=False, retries=2,
      retry_delay_seconds=2, retry_condition_fn=transient_io)
def refit_plan_task(store: str, embedder_id: str, selection: Selection, k: int, weights: str):
    return refit_plan(store, embedder_id, selection, k, weights)


@task(name="evaluate-group", cache_policy=INPUTS - "store" + TASK_SOURCE, persist_result=True,
      result_serializer="json", retries=1, retry_delay_seconds=2, retry_condition_fn=transient_io)
def evaluate_group_task(
    store: str, embedder_id: str, group: str, fingerprint: str, selection: Selection,
    k: int, weights: str,
) -> dict:
    """Keyed by the group's fingerprint, not the store: equal data, equal result."""
    return evaluate_group(store, embedder_id, group, fingerprint, selection, k, weights,
                          log=get_run_logger())


@task(name="fit-and-publish", cache_policy=INPUTS + TASK_SOURCE, persist_result=True,
      result_serializer="json", retries=1, retry_delay_seconds=2, retry_condition_fn=transient_io)
def fit_publish_task(
    store: str, name: str, embedder_id: str, key: str, evaluation: dict, selection: Selection,
    k: int, weights: str, index_dtype: str,
) -> dict:
    return fit_and_publish(store, name, embedder_id, selection, evaluation, k=k, weights=weights,
                           index_dtype=index_dtype, log=get_run_logger())


# ============================================================================ steps (in a flow)
def embed_step(
    store: str, embedder: str, *, precision: str, batch_size: int, partitions: int,
    concurrency: int, threads: int | None, storage, log, selection: Selection | None = None,
) -> dict:
    """Embed every input (of ``selection``, if given) without a vector, partitioned; returns
    counts, seconds and rate."""
    t0 = time.perf_counter()
    plan = plan_partitions_task(store, embedder, partitions, selection)
    out = {
        "embedder_id": plan["embedder_id"], "total": plan["total"],
        "already_present": plan["already_present"], "new": 0, "invalid": plan["invalid"],
        "partitions": len(plan["parts"]), "cached_partitions": 0, "seconds": 0.0,
        "inputs_per_s": 0.0, "threads": [], "precision": [],
    }
    if plan["invalid"]:
        log.warning("not embedding %d inputs: %s", plan["invalid"], plan["invalid_reason"])
    if not plan["parts"]:
        log.info("embed: all %d inputs have a %s vector; nothing to embed", plan["total"],
                 plan["embedder_id"])
        out["seconds"] = round(time.perf_counter() - t0, 2)
        return out
    _ensure_limit(EMBED_LIMIT, concurrency)
    log.info(
        "embed: %d of %d inputs have no %s vector; %d partitions (%s), at most %d at a time",
        plan["todo"], plan["total"], plan["embedder_id"], len(plan["parts"]),
        ", ".join(str(p["size"]) for p in plan["parts"]), concurrency,
    )
    run = embed_partition_task.with_options(result_storage=storage)
    futures = [
        run.submit(store, embedder, p["digest"], p["pending"], precision, batch_size, threads)
        for p in plan["parts"]
    ]
    wait(futures)
    failed = []
    for p, f in zip(plan["parts"], futures):
        state = f.state
        if state.is_failed() or not state.is_completed():
            failed.append(f"{p['size']} inputs: {state.message}")
            continue
        r = state.result()
        out["new"] += 0 if state.name == "Cached" else r["new"]
        out["cached_partitions"] += state.name == "Cached"
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
    store: str, name: str, embedder_id: str, sel: Selection, *, k: int, weights: str,
    index_dtype: str, storage, log, force: bool = False,
) -> dict:
    """Evaluate the groups whose data changed (the others come from the cache), then fit and
    publish if the data changed. ``force`` recomputes everything (no cache reads)."""
    t0 = time.perf_counter()
    plan = refit_plan_task(store, embedder_id, sel, k, weights)
    if plan is None:
        log.warning("%s: no labels%s yet; nothing to fit or publish", store,
                    "" if sel.is_all else f" in the selection {sel.to_dict()}")
        return {"published": False, "bundle": None, "evaluation": {}, "groups": {},
                "reason": "no labels"}
    evaluate = evaluate_group_task.with_options(result_storage=storage, refresh_cache=force)
    futures = {
        g["name"]: evaluate.submit(store, embedder_id, g["name"], g["fingerprint"], sel, k, weights)
        for g in plan["groups"] if not g["skipped"]
    }
    wait(list(futures.values()))
    evaluation = {g["name"]: {"skipped": g["skipped"]} for g in plan["groups"] if g["skipped"]}
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
    args = (store, name, embedder_id, plan["data_key"], evaluation, sel, k, weights, index_dtype)
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
        "inputs": plan["inputs"], "models": plan["models"], "datasets": plan["datasets"],
        "evaluate_seconds": round(t_eval, 2),
        "seconds": round(time.perf_counter() - t0, 2),
    }


def _ensure_limit(name: str, limit: int) -> None:
    """Create or resize the global concurrency limit the embedding partitions take slots of."""
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        client.upsert_global_concurrency_limit_by_name(name, limit)


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
        md += [
            f"- bundle **{b['name']}** version `{b['version']}`",
            f"- url: `{b['url']}`",
            f"- {b['models']} models, {result.get('inputs', 0):,} inputs, "
            f"{result.get('datasets', 0)} datasets; {b['files']} files, {b['bytes']:,} bytes",
            f"- use it: `benchroute route --bundle {store} --name {b['name']} \"your question\"`",
        ]
    md += ["", *summary_lines]
    create_markdown_artifact(key=f"{prefix}-bundle", markdown="\n".join(md),
                             description="router bundle and what this run did")
