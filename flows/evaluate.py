"""The ``evaluate`` flow: the paper's leave-one-dataset-out evaluation on what the store holds.

Thin wiring: groups from ``transforms.lodo_groups``, arrays and metrics from
``transforms.evaluate``, vectors from ``artifacts.embeddings``, files from ``artifacts.report``.
"""

from __future__ import annotations

import time

import polars as pl
from fsspec.core import url_to_fs
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from benchroute import code_version
from benchroute.artifacts import embeddings as emb_store
from benchroute.artifacts.report import write_report
from benchroute.artifacts.router_build import cost_data, token_frames
from benchroute.artifacts.store import Store
from benchroute.transforms.evaluate import BenchmarkArrays, EvalConfig, Evaluation, evaluate_lodo
from benchroute.transforms.lodo_groups import lodo_groups
from benchroute.transforms.model_cards import cards_for
from benchroute.transforms.predictors import make_predictor
from benchroute.transforms.router_fit import DEFAULT_PREDICTOR
from benchroute.transforms.routing_eval import NoHeldOutInputs, RoutingResult, evaluate_routing
from benchroute.transforms.stability_summary import StoreView, stability_summary

# Bootstrap resamples of the report's stability section (a few seconds on the shipped sample;
# 1000 for tighter interval ends: ``benchmarks/stability.py``).
STABILITY_B = 200


class EvaluationError(RuntimeError):
    """The store cannot be evaluated as asked (message says what is missing)."""


def pick_embedder(store: Store, embedder: str | None) -> str:
    """The embedder id to use: the one asked for (id or name prefix) or the only one stored."""
    ids = emb_store.embedders(store)
    if not ids:
        raise EvaluationError(f"{store.url}: no embeddings yet (run `benchroute embed` first)")
    if embedder:
        slug = embedder.lower().replace("_", "-").replace("/", "-")
        match = [i for i in ids if i == embedder or i.startswith(slug)]
        if not match:
            raise EvaluationError(f"{store.url}: no embeddings of {embedder!r}; stored: {ids}")
        return sorted(match)[-1]
    if len(ids) > 1:
        raise EvaluationError(f"{store.url}: several embedders stored, pick one of {ids}")
    return ids[0]


def loglik_frame(outcomes: pl.DataFrame) -> pl.DataFrame:
    """Per-input log-likelihoods where the data has them (HELM's ``logprob``), for the LL baseline."""
    return (
        outcomes.filter((pl.col("metric") == "logprob") & pl.col("perturbation").is_null())
        .group_by("input_id", "dataset", "model")
        .agg(pl.col("value").mean())
    )


def evaluate_groups(
    store: Store,
    embedder_id: str,
    labels: pl.DataFrame,
    memberships: pl.DataFrame,
    models: pl.DataFrame,
    config: EvalConfig,
    *,
    sources: list[str] | None = None,
    exclude_models: list[str] | None = None,
    loglik: pl.DataFrame | None = None,
    stability_B: int = 0,
    log=None,
) -> tuple[dict[str, Evaluation], dict[str, str]]:
    """Evaluate each source group; returns the evaluations and the reasons groups were skipped.
    ``stability_B`` > 0: each choice's ``flip_task`` from that many resamples (``evaluate_lodo``)."""
    groups = lodo_groups(labels, memberships, exclude_models=exclude_models or [])
    if sources:
        groups = [g for g in groups if g.name in sources]
    skipped = {g.name: g.skipped for g in groups if g.skipped}
    groups = [g for g in groups if not g.skipped]
    needed = sorted(set().union(*(set(g.labels["input_id"]) for g in groups)))
    X, ids = emb_store.read_matrix(store, embedder_id, needed)
    results: dict[str, Evaluation] = {}
    for g in groups:
        t = time.perf_counter()
        bench = BenchmarkArrays.from_frames(X, ids, g.labels, memberships, models)
        ll = None
        if loglik is not None:
            ll = loglik.filter(pl.col("dataset").is_in(g.datasets) & pl.col("model").is_in(g.models))
        ev = evaluate_lodo(bench, config, loglik=ll if ll is not None and ll.height else None,
                           stability_B=stability_B)
        if ev.table1.height == 0:
            skipped[g.name] = f"no held-out dataset has {config.min_inputs}+ inputs labelled for every model"
            continue
        results[g.name] = ev
        if log:
            log.info(
                "evaluated %s: %d datasets, %d models, %d inputs in %.1f s (dropped models: %d)",
                g.name, len(g.datasets), len(g.models), bench.X.shape[0],
                time.perf_counter() - t, len(g.dropped_models),
            )
    return results, skipped


def routing_groups(
    store: Store,
    embedder_id: str,
    labels: pl.DataFrame,
    memberships: pl.DataFrame,
    models: pl.DataFrame,
    predictors: list[str],
    *,
    splits: tuple[str, ...] = ("random", "lodo"),
    seed: int = 0,
    sources: list[str] | None = None,
    exclude_models: list[str] | None = None,
    max_folds: int = 15,
    log=None,
) -> dict[str, dict[str, RoutingResult]]:
    """Per source group and split, each predictor's cost-aware router (``transforms.routing_eval``)."""
    groups = [g for g in lodo_groups(labels, memberships, exclude_models=exclude_models or [],
                                     min_datasets=1) if not g.skipped]
    if sources:
        groups = [g for g in groups if g.name in sources]
    if not groups:
        return {}
    needed = sorted(set().union(*(set(g.labels["input_id"]) for g in groups)))
    X, ids = emb_store.read_matrix(store, embedder_id, needed)
    out: dict[str, dict[str, RoutingResult]] = {}
    tokens = token_frames(store)  # read once for every group
    for g in groups:
        bench = BenchmarkArrays.from_frames(X, ids, g.labels, memberships, models)
        cost = cost_data(store, bench, cards_for(store, list(bench.models)), tokens)
        factories = {p: (lambda p=p: make_predictor(p)) for p in dict.fromkeys(predictors)}
        for split in splits:
            if split == "lodo" and len(g.datasets) < 2:
                continue
            try:
                res = evaluate_routing(bench, cost, factories, split=split, seed=seed,
                                       max_folds=max_folds, log=log)
            except NoHeldOutInputs as exc:
                if log:
                    log.info("no %s routing evaluation for %s: %s", split, g.name, exc)
                continue
            out.setdefault(g.name, {})[split] = res
    return out


def evaluate_store(
    store_url: str,
    out: str,
    *,
    embedder: str | None = None,
    config: EvalConfig = EvalConfig(),
    sources: list[str] | None = None,
    exclude_models: list[str] | None = None,
    predictors: list[str] | None = None,
    routing_splits: tuple[str, ...] = ("random", "lodo"),
    stability_B: int = STABILITY_B,
    log=None,
) -> dict:
    """Evaluate every source group of the store and write the report to ``out``: the paper's
    task-level LODO, and cost-aware per-query routing of each predictor on ``routing_splits``
    (default: the kNN and the default predictor); ``stability_B`` > 0 adds the stability
    section (``transforms.stability_summary`` with that many bootstrap resamples, and each
    choice's flip rate)."""
    t0 = time.perf_counter()
    store = Store(store_url)
    embedder_id = pick_embedder(store, embedder)
    labels = store.read("labels")
    memberships = store.read("memberships")
    models = store.read("models")
    outcomes = store.read("outcomes", columns=["input_id", "dataset", "model", "metric", "value", "perturbation"])
    loglik = loglik_frame(outcomes)
    results, skipped = evaluate_groups(
        store, embedder_id, labels, memberships, models, config,
        sources=sources, exclude_models=exclude_models, loglik=loglik, stability_B=stability_B,
        log=log,
    )
    routing = routing_groups(
        store, embedder_id, labels, memberships, models, predictors or ["knn", DEFAULT_PREDICTOR],
        splits=routing_splits, seed=config.seed, sources=sources, exclude_models=exclude_models,
        log=log,
    ) if routing_splits else {}
    meta = {
        "store": store_url,
        "embedder": embedder_id,
        "k": config.k,
        "weights": config.weights,
        "seed": config.seed,
        "alphas": list(config.alphas),
        "code_version": code_version(),
    }
    meta["predictors"] = ", ".join(dict.fromkeys(predictors or ["knn", DEFAULT_PREDICTOR]))
    stability = None
    if stability_B > 0:
        datasets = (memberships.filter(pl.col("source").is_in(sources))["dataset"].unique().to_list()
                    if sources else None)
        kept = labels.filter(~pl.col("model").is_in(exclude_models or []))["model"].unique()
        stability = stability_summary(StoreView(store, datasets, kept.to_list()), B=stability_B,
                                      seed=config.seed)
        meta["stability_B"] = stability_B
    paths = write_report(out, results, meta, skipped, routing, stability)
    return {
        "out": out,
        "paths": paths,
        "groups": {g: ev.summary for g, ev in results.items()},
        "routing": {g: {sp: r.summary.to_dicts() for sp, r in by.items()} for g, by in routing.items()},
        "skipped": skipped,
        "seconds": round(time.perf_counter() - t0, 2),
    }


@task(cache_policy=NO_CACHE, retries=1)
def evaluate_task(store: str, out: str, embedder: str | None, config: EvalConfig, sources, exclude,
                  predictors=None, routing_splits=("random", "lodo"),
                  stability_B: int = STABILITY_B) -> dict:
    return evaluate_store(
        store, out, embedder=embedder, config=config, sources=sources, exclude_models=exclude,
        predictors=predictors, routing_splits=tuple(routing_splits), stability_B=stability_B,
        log=get_run_logger(),
    )


@flow(name="evaluate")
def evaluate_flow(
    store: str,
    out: str,
    embedder: str | None = None,
    k: int = 10,
    weights: str = "uniform",
    seed: int = 0,
    sources: list[str] | None = None,
    exclude_models: list[str] | None = None,
    predictors: list[str] | None = None,
    routing_splits: list[str] | None = None,
    stability_B: int = STABILITY_B,
) -> dict:
    """Run the evaluation and publish its Markdown report as a Prefect artifact
    (``stability_B`` = 0: no stability section)."""
    config = EvalConfig(k=k, weights=weights, seed=seed)
    splits = ("random", "lodo") if routing_splits is None else tuple(routing_splits)
    result = evaluate_task(store, out, embedder, config, sources, exclude_models, predictors, splits,
                           stability_B)
    fs, _ = url_to_fs(out)
    markdown = fs.cat_file(result["paths"]["markdown"]).decode("utf-8")
    create_markdown_artifact(markdown=markdown[:100_000], key="evaluation", description="LODO evaluation")
    return result
