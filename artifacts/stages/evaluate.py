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
    SelectedLabels,
    cost_data,
    evaluation_entry,
    stability_too_big,
    token_frames,
    unperturbed_outcomes,
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
from benchroute.transforms.fingerprints import group_fingerprint, labels_digest
from benchroute.transforms.lodo_groups import Group, group_filter, group_shapes
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


def loglik_frame(store: Store) -> pl.DataFrame:
    """Per-input log-likelihoods where the data has them (HELM's unperturbed ``logprob``), for
    the LL baseline, read a batch at a time (``router_build.unperturbed_outcomes``)."""
    outcomes = unperturbed_outcomes(store, ["logprob"], ["input_id", "dataset", "model", "value"])
    return outcomes.group_by("input_id", "dataset", "model").agg(pl.col("value").mean())


def group_arrays(store: Store, embedder_id: str, labels: SelectedLabels, group: Group,
                 models: pl.DataFrame) -> BenchmarkArrays:
    """One group's ``BenchmarkArrays``, its labels streamed a part at a time (``labels.batches``)."""
    return BenchmarkArrays.from_batches(
        lambda ids: emb_store.read_matrix(store, embedder_id, ids)[0],
        labels.batches(group_filter(group)), labels.memberships, models)


def store_groups(labels: SelectedLabels, *, sources: list[str] | None = None,
                 exclude_models: list[str] | None = None, min_datasets: int = 3) -> list[Group]:
    """The source groups of the selected labels (``lodo_groups.group_shapes`` of their
    coverage: no labels held), only ``sources`` where given."""
    groups = group_shapes(labels.coverage, labels.memberships, exclude_models=exclude_models or [],
                          min_datasets=min_datasets)
    return [g for g in groups if not sources or g.name in sources]


def evaluate_groups(
    store: Store,
    embedder_id: str,
    labels: SelectedLabels,
    models: pl.DataFrame,
    config: EvalConfig,
    *,
    sources: list[str] | None = None,
    exclude_models: list[str] | None = None,
    loglik: pl.DataFrame | None = None,
    stability_B: int = 0,
    log=None,
) -> tuple[dict[str, Evaluation], dict[str, str]]:
    """Evaluate each source group of ``labels``, its arrays built a group at a time; returns the
    evaluations and the reasons groups were skipped. ``stability_B`` > 0: each choice's
    ``flip_task`` from that many resamples (``evaluate_lodo``)."""
    groups = store_groups(labels, sources=sources, exclude_models=exclude_models)
    skipped = {g.name: g.skipped for g in groups if g.skipped}
    results: dict[str, Evaluation] = {}
    for g in (g for g in groups if not g.skipped):
        t = time.perf_counter()
        bench = group_arrays(store, embedder_id, labels, g, models)
        ll = None
        if loglik is not None:
            ll = loglik.filter(pl.col("dataset").is_in(g.datasets) & pl.col("model").is_in(g.models))
        ev = evaluate_lodo(bench, config, loglik=ll if ll is not None and ll.height else None,
                           stability_B=stability_B)
        if ev.table1.height == 0:
            skipped[g.name] = f"no held-out dataset has {config.min_inputs}+ inputs labelled for every model"
            continue
        if g.dropped_datasets:  # a complete block of a partly covered source (lodo_groups)
            ev.summary["datasets_dropped"] = len(g.dropped_datasets)
        results[g.name] = ev
        if log:
            log.info(
                "evaluated %s: %d datasets, %d models, %d inputs in %.1f s (dropped: %d models, "
                "%d datasets)", g.name, len(g.datasets), len(g.models), bench.X.shape[0],
                time.perf_counter() - t, len(g.dropped_models), len(g.dropped_datasets),
            )
        del bench
    return results, skipped


def routing_groups(
    store: Store,
    embedder_id: str,
    labels: SelectedLabels,
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
    groups = [g for g in store_groups(labels, sources=sources, exclude_models=exclude_models,
                                      min_datasets=1) if not g.skipped]
    if not groups:
        return {}
    out: dict[str, dict[str, RoutingResult]] = {}
    tokens = token_frames(store)  # read once for every group
    for g in groups:
        bench = group_arrays(store, embedder_id, labels, g, models)
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
    labels = SelectedLabels(store, Selection())
    memberships = labels.memberships
    models = store.read("models")
    loglik = loglik_frame(store)
    results, skipped = evaluate_groups(
        store, embedder_id, labels, models, config,
        sources=sources, exclude_models=exclude_models, loglik=loglik, stability_B=stability_B,
        log=log,
    )
    routing = routing_groups(
        store, embedder_id, labels, models, predictors or ["knn", DEFAULT_PREDICTOR],
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
    too_big = stability_too_big(store) if stability_B > 0 else None
    if too_big:
        meta["stability"] = too_big
    elif stability_B > 0:
        datasets = (memberships.filter(pl.col("source").is_in(sources))["dataset"].unique().to_list()
                    if sources else None)
        kept = labels.coverage.filter(~pl.col("model").is_in(exclude_models or []))["model"].unique()
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
        "stability": meta.get("stability", "computed" if stability is not None else "not asked"),
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
    """The evaluation groups with their fingerprints; ``None`` without labels. The labels are
    read a part at a time (``SelectedLabels``), each group's once more for its fingerprint."""
    store = Store(store_url)
    labels = SelectedLabels(store, sel)
    if labels.rows == 0:
        return None
    models = store.read("models")
    params = eval_params(embedder_id, router.k, router.weights)
    groups = []
    for g in store_groups(labels, exclude_models=list(sel.exclude_models or [])):
        if g.skipped:  # its inputs counted, nothing hashed
            ids = pl.concat([b["input_id"].unique() for b in
                             labels.batches(group_filter(g), ["input_id"])()]).unique()
            fingerprint = None
        else:
            fingerprint, ids = _group_fingerprint(labels, g, models, params)
        groups.append(GroupPlan(g.name, len(g.datasets), len(g.models), ids.len(),
                                g.skipped or None, fingerprint))
    return RefitPlan(tuple(groups), labels.input_ids.len(), labels.coverage["model"].n_unique(),
                     labels.coverage["dataset"].n_unique())


def _group_fingerprint(labels: SelectedLabels, group: Group, models: pl.DataFrame,
                       params: dict) -> tuple[str, pl.Series]:
    """(``group_fingerprint`` of one group, its input ids), its labels read a part at a time."""
    label_digest, ids = labels_digest(labels.batches(group_filter(group))())
    return group_fingerprint(label_digest, ids, labels.memberships, models, datasets=group.datasets,
                             model_names=group.models, params=params), ids


def evaluate_group(
    store_url: str, embedder_id: str, group: str, fingerprint: str, sel: Selection,
    router: RouterSpec, *, log=None,
) -> dict:
    """Evaluate one source group (its ``evaluation_entry``, or ``{"skipped": why}``); refuses
    when the store no longer matches ``fingerprint`` (it changed since the plan: a cached result
    under that key would be wrong)."""
    store = Store(store_url)
    labels = SelectedLabels(store, sel)
    models = store.read("models")
    exclude = list(sel.exclude_models or [])
    found = store_groups(labels, sources=[group], exclude_models=exclude)
    now = found and _group_fingerprint(
        labels, found[0], models, eval_params(embedder_id, router.k, router.weights))[0]
    if now != fingerprint:
        raise PipelineError(
            f"{store_url}: group {group!r} changed while this run was planning it (another "
            "writer, or the code of this worker differs from the planner's); run again"
        )
    results, skipped = evaluate_groups(
        store, embedder_id, labels, models, EvalConfig(k=router.k, weights=router.weights),
        sources=[group], exclude_models=exclude, log=log,
    )
    if group in results:
        return evaluation_entry(results[group])
    return {"skipped": skipped.get(group, "not evaluated")}


def evaluate_all(
    store: Store, embedder_id: str, sel: Selection, router: RouterSpec, *, log=None,
    labels: SelectedLabels | None = None,
) -> dict:
    """Every source group of the selection evaluated here and now (no cache): the evaluation a
    bundle carries, ``{group: evaluation_entry or {"skipped": why}}``. ``labels``: the
    selection's ``SelectedLabels`` when the caller has read them already."""
    labels = labels if labels is not None else SelectedLabels(store, sel)
    results, skipped = evaluate_groups(
        store, embedder_id, labels, store.read("models"), EvalConfig(k=router.k, weights=router.weights),
        exclude_models=list(sel.exclude_models) if sel.exclude_models else None, log=log,
    )
    evaluation = {g: {"skipped": why} for g, why in skipped.items()}
    evaluation.update({g: evaluation_entry(ev) for g, ev in results.items()})
    return evaluation
