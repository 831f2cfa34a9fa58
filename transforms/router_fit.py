"""Fit what a router bundle carries: the kNN index with every model's labels, the kernel
estimator of p(d', m) from leave-one-dataset-out accuracies over the whole benchmark, the default
correctness predictor for per-query routing, and what the cost-aware policy needs (each model's
expected output tokens, the reference model and its cost)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from benchroute.transforms.evaluate import BenchmarkArrays, mean_over_datasets
from benchroute.transforms.kernel import NadarayaWatson, lodo_accuracies
from benchroute.transforms.knn import Fallback, Neighbors, Weights, self_neighbors
from benchroute.transforms.label_matrix import labelled_counts
from benchroute.transforms.predictors import make_predictor
from benchroute.transforms.routing_eval import CostData, DecisionCosts, decision_costs, unrecorded_tokens

DEFAULT_PREDICTOR = "mlp"  # measured best on the targets: benchmarks/cost_routing.py (README, "Cost-aware routing")


@dataclass(frozen=True)
class LodoNeighbors:
    """The neighbours p(d, m) was measured with, kept so that a model added later gets its p(d, m)
    without a search (``artifacts.router_extend``): for each scored dataset d (``datasets``),
    its scored index rows ``rows[offsets[i]:offsets[i + 1]]`` and their ``k`` nearest allowed
    index rows ``indices`` (-1 = none) with cosine ``similarities``."""

    datasets: np.ndarray  # (S,) int64
    offsets: np.ndarray  # (S + 1,) int64
    rows: np.ndarray  # (N,) int32
    indices: np.ndarray  # (N, k) int32
    similarities: np.ndarray  # (N, k) float32

    @classmethod
    def from_kept(cls, kept: dict) -> LodoNeighbors:
        ds = sorted(kept)
        sizes = [len(kept[d][0]) for d in ds]
        k = kept[ds[0]][1].indices.shape[1] if ds else 0
        cat = lambda xs, shape, dt: np.concatenate(xs).astype(dt) if xs else np.empty(shape, dt)  # noqa: E731
        return cls(
            np.asarray(ds, np.int64), np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64),
            cat([kept[d][0] for d in ds], (0,), np.int32),
            cat([kept[d][1].indices for d in ds], (0, k), np.int32),
            cat([kept[d][1].similarities for d in ds], (0, k), np.float32),
        )

    def of(self, i: int) -> tuple[np.ndarray, Neighbors]:
        """(rows, neighbours) of the i-th scored dataset."""
        sl = slice(int(self.offsets[i]), int(self.offsets[i + 1]))
        return self.rows[sl].astype(np.int64), Neighbors(self.indices[sl].astype(np.int64), self.similarities[sl])


@dataclass(frozen=True)
class RouterFit:
    """Arrays of a fitted router.

    ``X`` (n × d) index embeddings, ``Y`` (n × M) labels (NaN = none), ``member`` (n × D) the
    datasets of each row; ``P`` (D × M) leave-one-dataset-out accuracies p(d, m) and ``u`` (D,)
    descriptors (NaN where a dataset could not be scored); ``bandwidth`` of the kernel;
    ``train_acc`` (M,) mean per-dataset accuracy (the tie-break and BMA order).
    """

    input_ids: list[str]
    models: list[str]
    datasets: list[str]
    X: np.ndarray
    Y: np.ndarray
    member: np.ndarray
    P: np.ndarray
    u: np.ndarray
    bandwidth: float
    kernel_loo_mae: float
    train_acc: np.ndarray
    params_b: np.ndarray
    k: int
    k_descriptor: int
    weights: str
    fallback: str
    predictor_name: str = DEFAULT_PREDICTOR
    predictor: object = None  # fitted, with to_state()
    decision: DecisionCosts | None = None  # expected output tokens, reference model and cost
    cost: CostData | None = None
    lodo: LodoNeighbors | None = None


def fit_kernel(u: np.ndarray, P: np.ndarray) -> tuple[np.ndarray, float, float]:
    """(the datasets the kernel is fitted on: a descriptor and some p, its bandwidth chosen by
    leave-one-out, that choice's error) of p(d, ·) on u(d)."""
    ok = np.isfinite(u) & ~np.all(np.isnan(P), axis=1)
    if ok.sum() < 2:  # one dataset: p̂ is its p whatever the bandwidth
        return ok, 1.0, float("nan")
    kern = NadarayaWatson().fit(u[ok], P[ok])
    return ok, kern.bandwidth_, kern.loo_error_


def fit_router(
    bench: BenchmarkArrays,
    *,
    k: int = 10,
    weights: Weights = "uniform",
    fallback: Fallback = "train_mean",
    k_descriptor: int | None = None,
    predictor: str = DEFAULT_PREDICTOR,
    cost: CostData | None = None,
    log=None,
) -> RouterFit:
    """Fit the router on every labelled input of ``bench`` (no dataset held out); ``predictor``
    names the per-query correctness predictor (``transforms.predictors.PREDICTORS``), ``cost``
    the prices and token counts aligned to ``bench`` (None: no prices known); ``log``: a logger
    told each step's time."""
    import time

    t0 = time.perf_counter()

    def step(what: str) -> None:
        nonlocal t0
        if log:
            log.info("router fit: %s in %.1f s", what, time.perf_counter() - t0)
        t0 = time.perf_counter()

    k_desc = k_descriptor or k
    k_search = max(k, k_desc)
    n = len(bench.input_ids)
    grouped = self_neighbors(bench.X, bench.row_groups, k_search)
    step(f"nearest neighbours of {n} index rows within {bench.group_members.shape[0]} dataset groups"
         f" ({type(grouped).__name__})")
    kept: dict = {}
    P, u = lodo_accuracies(
        grouped, bench.group_members, bench.row_groups, bench.Y, bench.dataset_rows,
        bench.dataset_y, k=k, weights=weights, fallback=fallback, k_descriptor=k_desc,
        families=bench.families(), kept=kept,
    )
    ok, bandwidth, loo = fit_kernel(u, P)
    step(f"leave-one-dataset-out accuracies of {len(bench.datasets)} datasets x {len(bench.models)} models")
    train_acc = mean_over_datasets(bench.dataset_accuracy())
    n, M = bench.Y.shape
    if cost is None:
        nan = np.full(M, np.nan)
        cost = CostData(nan, nan, np.ones(n), unrecorded_tokens(n, M))
    est = make_predictor(predictor).fit(bench.X, bench.Y)
    step(f"{predictor} predictor ({getattr(est, 'n_epochs_', 0)} epochs)")
    decision = decision_costs(cost, np.arange(n), train_acc, labelled_counts(bench.Y))
    return RouterFit(
        input_ids=list(bench.input_ids),
        models=list(bench.models),
        datasets=list(bench.datasets),
        X=bench.X.astype(np.float32),
        Y=np.asarray(bench.Y, np.float32),  # no copy when the labels are float32 already
        member=bench.member,
        P=np.where(ok[:, None], P, np.nan),
        u=np.where(ok, u, np.nan),
        bandwidth=float(bandwidth),
        kernel_loo_mae=float(loo),
        train_acc=np.nan_to_num(train_acc, nan=0.0),
        params_b=bench.params_b,
        k=k,
        k_descriptor=k_desc,
        weights=weights,
        fallback=fallback,
        predictor_name=predictor,
        predictor=est,
        decision=decision,
        cost=cost,
        lodo=LodoNeighbors.from_kept(kept),
    )
