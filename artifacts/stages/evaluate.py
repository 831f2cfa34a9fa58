"""The evaluate stage: the paper's leave-one-dataset-out evaluation on what the store holds.

``evaluate_store`` evaluates every source group and writes the report (the ``evaluate`` flow);
``refit_plan`` lists the groups with the fingerprint a cached evaluation is keyed by and
``evaluate_group`` evaluates one (the ``refresh`` and ``backfill`` flows); ``evaluate_all`` is the
evaluation a bundle carries (``publish``). Groups from ``transforms.lodo_groups``, arrays and
metrics from ``transforms.evaluate``, vectors from ``artifacts.embeddings``, files from
``artifacts.report``.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import polars as pl
from benchroute import code_version
from benchroute.artifacts import embeddings as emb_store
from benchroute.artifacts.embeddings import EmbedderChoiceError, pick_embedder
from benchroute.artifacts.report import write_report
from benchroute.artifacts.router_build import (
    cost_data,
    evaluation_entry,
    select_frames,
    token_frames,
)
from benchroute.artifacts.specs import STABILITY_B, RouterSpec, Selection
from benchroute.artifacts.stages import PipelineError
from benchroute.artifacts.store import Store
from benchroute.transforms.evaluate import (
    BenchmarkArrays,
    EvalConfig,
    Evaluation,
    evaluate_lodo,
)
from benchroute.transforms.fingerprints import group_fingerprint
from benchroute.transforms.lodo_groups import lodo_groups
from benchroute.transforms.model_cards import cards_for
from benchroute.transforms.predictors import make_predictor
from benchroute.transforms.router_fit import DEFAULT_PREDICTOR
from benchroute.transforms.routing_eval import (
    NoHeldOutInputs,
    RoutingResult,
    evaluate_routing,
)
from benchroute.transforms.stability_summary import StoreView, stability_summary

# What ``pick_embedder`` raises when no stored embedder fits (kept under its old name).
EvaluationError = EmbedderChoiceError


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


# --------------------------------------------------------------------------- per group, cached
def eval_params(embedder_id: str, k: int, weights: str) -> dict:
    """The parameters a group's fingerprint holds besides its data."""
    return {"embedder": embedder_id, "k": k, "weights": weights, "code_version": code_version(),
            "config": asdict(EvalConfig(k=k, weights=weights))}


@dataclass(frozen=True)
class GroupPlan:
    """One source group of a refit: its size, and either why leave-one-dataset-out skips it or
    the ``fingerprint`` (its data and the evaluation parameters) its cached evaluation is keyed by."""

    name: str
    datasets: int
    models: int
    inputs: int
    skipped: str | None = None
    fingerprint: str | None = None


@dataclass(frozen=True)
class RefitPlan:
    """What a refit reads: the groups to evaluate and the selection's size (``None`` where an
    incremental refit did not count it: it plans no evaluation)."""

    groups: tuple[GroupPlan, ...]
    inputs: int | None
    models: int | None
    datasets: int | None


def refit_plan(store_url: str, embedder_id: str, sel: Selection, router: RouterSpec) -> RefitPlan | None:
    """The evaluation groups with their fingerprints; ``None`` without labels."""
    store = Store(store_url)
    labels, memberships, models = select_frames(store, sel)
    if labels.height == 0:
        return None
    params = eval_params(embedder_id, router.k, router.weights)
    groups = []
    for g in lodo_groups(labels, memberships, exclude_models=list(sel.exclude_models or [])):
        fingerprint = None if g.skipped else group_fingerprint(
            g.labels, memberships, models, datasets=g.datasets, model_names=g.models, params=params)
        groups.append(GroupPlan(g.name, len(g.datasets), len(g.models), g.labels["input_id"].n_unique(),
                                g.skipped or None, fingerprint))
    return RefitPlan(tuple(groups), labels["input_id"].n_unique(), labels["model"].n_unique(),
                     labels["dataset"].n_unique())


def evaluate_group(
    store_url: str, embedder_id: str, group: str, fingerprint: str, sel: Selection,
    router: RouterSpec, *, log=None,
) -> dict:
    """Evaluate one source group (its ``evaluation_entry``, or ``{"skipped": why}``); refuses
    when the store no longer matches ``fingerprint`` (it changed since the plan: a cached result
    under that key would be wrong)."""
    store = Store(store_url)
    labels, memberships, models = select_frames(store, sel)
    exclude = list(sel.exclude_models or [])
    found = [g for g in lodo_groups(labels, memberships, exclude_models=exclude) if g.name == group]
    now = found and group_fingerprint(
        found[0].labels, memberships, models, datasets=found[0].datasets,
        model_names=found[0].models, params=eval_params(embedder_id, router.k, router.weights),
    )
    if now != fingerprint:
        raise PipelineError(
            f"{store_url}: group {group!r} changed while this run was planning it "
            "(another writer?); run again"
        )
    results, skipped = evaluate_groups(
        store, embedder_id, labels, memberships, models, EvalConfig(k=router.k, weights=router.weights),
        sources=[group], exclude_models=exclude, log=log,
    )
    if group in results:
        return evaluation_entry(results[group])
    return {"skipped": skipped.get(group, "not evaluated")}


def evaluate_all(
    store: Store, embedder_id: str, sel: Selection, router: RouterSpec, *, log=None,
    frames: tuple[pl.DataFrame, pl.DataFrame, pl.DataFrame] | None = None,
) -> dict:
    """Every source group of the selection evaluated here and now (no cache): the evaluation a
    bundle carries, ``{group: evaluation_entry or {"skipped": why}}``. ``frames``: the
    selection's ``select_frames`` when the caller has read them already."""
    labels, memberships, models = frames if frames is not None else select_frames(store, sel)
    results, skipped = evaluate_groups(
        store, embedder_id, labels, memberships, models, EvalConfig(k=router.k, weights=router.weights),
        exclude_models=list(sel.exclude_models) if sel.exclude_models else None, log=log,
    )
    evaluation = {g: {"skipped": why} for g, why in skipped.items()}
    evaluation.update({g: evaluation_entry(ev) for g, ev in results.items()})
    return evaluation
