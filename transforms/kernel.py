"""Estimating p(d', m): the accuracy of a model's binarized predictor on a new task (docs/method.md#estimating-predictor-accuracy-on-a-new-task).

- ``lodo_accuracies``: for each benchmark dataset d, the predictors fitted on the *other*
  datasets (and never on a held-out one) are scored on d: p(d, m) = binarized accuracy, and the
  task descriptor u(d) = mean over d's inputs of the mean cosine distance to their k nearest
  neighbours in those other datasets. Uses one grouped neighbour search for every fold (or, where
  those lists would not fit, a search per fold; nested folds narrow ``lodo_base``'s).
- ``NadarayaWatson``: p̂(u) = Σ_d K_h(u − u(d)) p(d, ·) / Σ_d K_h(u − u(d)), K_h Gaussian,
  with the bandwidth h chosen from a grid by leave-one-dataset-out error (mean absolute error by
  default; ties go to the larger h). Models with no p on a dataset (NaN) are averaged over the
  datasets that have one.
- ``mean_knn_distance``: u for a new task from its inputs' neighbours alone.
- ``neighbor_share_estimate``: an alternative to the kernel (ours, not the paper's): p̂(d', m) =
  Σ_d s_d p(d, m) / Σ_d s_d with s_d the share of the new task's neighbours that belong to d —
  the accuracy on the datasets the task's inputs actually resemble. No bandwidth to choose.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

from benchroute.transforms.knn import (
    GroupedNeighbors,
    Neighbors,
    Weights,
    aggregate_labels,
    covered,
    narrowed,
)
from benchroute.transforms.label_matrix import column_counts_sums, column_means, means_of
from benchroute.transforms.scores import binarized_accuracy


def mean_knn_distance(neighbors: Neighbors, k: int | None = None) -> float:
    """u: mean over queries of the mean cosine distance to their first ``k`` neighbours."""
    d = neighbors.distances if k is None else neighbors.distances[:, :k]
    ok = ~np.isnan(d)
    n = ok.sum(axis=1)
    per_query = np.where(ok, d, 0.0).sum(axis=1)[n > 0] / n[n > 0]
    return float(per_query.mean()) if per_query.size else float("nan")


def neighbor_share_estimate(
    neighbors: Neighbors, row_members: np.ndarray, P: np.ndarray
) -> np.ndarray:
    """p̂ (M,): p(d, ·) averaged with weights = share of the neighbours that lie in each d.

    ``row_members`` (n_index × D bool): the datasets of each index row (a row in two datasets
    counts for both); ``P`` (D × M) with NaN rows for datasets without an estimate.
    """
    idx = neighbors.indices[neighbors.valid]
    share = row_members[idx].sum(axis=0).astype(np.float64)  # (D,)
    avail = ~np.isnan(P)
    num = share @ np.where(avail, P, 0.0)
    den = share @ avail.astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, num / np.where(den > 0, den, 1.0), np.nan)


def lodo_accuracies(
    grouped: GroupedNeighbors,
    group_members: np.ndarray,
    row_groups: np.ndarray,
    Y: np.ndarray,
    dataset_rows: Sequence[np.ndarray],
    dataset_labels: Sequence[np.ndarray],
    *,
    k: int,
    weights: Weights = "uniform",
    fallback: Literal["train_mean", "nan"] = "train_mean",
    k_descriptor: int | None = None,
    held_out: np.ndarray | None = None,
    families: np.ndarray | None = None,
    kept: dict | None = None,
    base: LodoBase | None = None,
    totals=None,
) -> tuple[np.ndarray, np.ndarray]:
    """p(d, m) (D × M) and u(d) (D,) by leave-one-dataset-out.

    ``grouped``: top-k of every index row (as a query) within each group of rows;
    ``group_members`` (G × D bool): the datasets of each group; ``row_groups`` (n,): the group of
    each index row; ``Y`` (n × M): training labels of the rows (NaN = none);
    ``dataset_rows[d]``: the index rows of d's inputs and ``dataset_labels[d]`` their labels in d.
    ``held_out`` (D bool): datasets that are never neighbours (and get NaN rows in the output);
    an input of d that also belongs to a held-out dataset is left out of d's p and u too.
    ``families`` (D × D bool, ``lodo_groups.same_family``): d's p and u are measured with the
    whole of d's family left out of the neighbours (None: d alone). ``kept``: a dict that gets,
    per scored dataset d, ``(rows, neighbours)`` (its scored index rows and their k neighbours:
    what a model added later needs to get its p(d, m) without a search, ``router_fit.LodoNeighbors``).
    ``base`` (``lodo_base``: the folds without ``held_out``): each nested list is narrowed
    from its lists (``knn.narrowed``), searched again only where a neighbour is now held out;
    a dataset none of whose lists changed, none of whose inputs is held out and none of whose
    labels came from the fallback (the one thing the held-out rows still change) keeps its p
    and u. ``totals``: ``fallback_totals(Y, Y.nbytes)`` when the caller has it (one pass over Y
    per call otherwise) (``base`` must come from the same index, labels and ``families``, with the same
    k, weights, fallback and k_descriptor: the last four are checked). The same neighbours
    either way (``knn``'s canonical order does not depend on which queries are searched
    together); p equal up to the last bits of a distance weight.
    """
    if base is not None and kept is not None:
        raise ValueError("kept lists are not recorded when folds come from a base")
    if base is not None and base.P is not None and base.params != (k, weights, fallback, k_descriptor):
        raise ValueError(f"the base folds were measured with (k, weights, fallback, k_descriptor) = "
                         f"{base.params}, not {(k, weights, fallback, k_descriptor)}")
    D = group_members.shape[1]
    M = Y.shape[1]
    held = np.zeros(D, bool) if held_out is None else np.asarray(held_out, bool)
    P = np.full((D, M), np.nan)
    u = np.full(D, np.nan)
    banned = group_members[:, held].any(axis=1)
    if totals is None and fallback == "train_mean":
        totals = fallback_totals(Y, Y.nbytes)
    # DatasetRows (a leaderboard's labels as Y's rows) takes the kept rows in one copy
    take = None if isinstance(dataset_labels, np.ndarray) else getattr(dataset_labels, "take", None)
    for d in range(D):
        keep = ~banned[row_groups[dataset_rows[d]]]  # d's inputs that are not held out
        if held[d] or not keep.any():
            continue
        own = group_members[:, families[d] if families is not None else d]
        own = own.any(axis=1) if own.ndim == 2 else own
        allowed = ~(banned | own)
        if base is not None:
            rows = dataset_rows[d][keep]
            listed = base.neighbours[d].take(keep)
            neigh = narrowed(listed, allowed[row_groups],
                             lambda at, rows=rows, allowed=allowed: grouped.merge(allowed, rows=rows[at]))
            if (base.P is not None and neigh is listed and keep.all()
                    and (fallback != "train_mean" or base.fallback_free[d])):
                P[d], u[d] = base.P[d], base.u[d]  # the same neighbours, labels and fallback-free
                continue
        else:
            neigh = grouped.merge(allowed, rows=dataset_rows[d][keep])
        fb = train_mean(Y, allowed[row_groups], totals) if fallback == "train_mean" else None
        first_k = Neighbors(neigh.indices[:, :k], neigh.similarities[:, :k])
        if kept is not None:
            kept[d] = (dataset_rows[d][keep], first_k)
        G = aggregate_labels(first_k, Y, weights=weights, fallback=fb)
        P[d] = binarized_accuracy(G, take(d, keep) if take else dataset_labels[d][keep])
        u[d] = mean_knn_distance(neigh, k_descriptor or k)
    return P, u


@dataclass(frozen=True)
class LodoBase:
    """Leave-one-dataset-out with nothing else held out, for nested folds to start from
    (``lodo_accuracies``' ``base``): per dataset d the neighbours of all its index rows among the
    rows of no dataset of d's family (as many as the search holds), and, where computed, its p
    (D × M) and u (D,) and whether none of its labels came from the fallback (D bool)."""

    neighbours: dict
    P: np.ndarray | None = None
    u: np.ndarray | None = None
    fallback_free: np.ndarray | None = None
    params: tuple | None = None  # (k, weights, fallback, k_descriptor) its p was measured with


def lodo_base(grouped: GroupedNeighbors, group_members: np.ndarray, row_groups: np.ndarray,
              Y: np.ndarray, dataset_rows: Sequence[np.ndarray],
              dataset_labels: Sequence[np.ndarray], *, k: int, weights: Weights = "uniform",
              fallback: Literal["train_mean", "nan"] = "train_mean",
              k_descriptor: int | None = None, families: np.ndarray | None = None) -> LodoBase:
    """The ``LodoBase`` of an index: one search of every row where each merge searches
    (``knn.SearchedNeighbors``, a leaderboard) instead of one per nested fold, and the folds'
    p and u, which a nested fold keeps wherever it changes nothing."""
    lists = {}
    for d in range(group_members.shape[1]):
        own = group_members[:, families[d] if families is not None else d]
        own = own.any(axis=1) if own.ndim == 2 else own
        lists[d] = grouped.merge(~own, rows=dataset_rows[d])
    P, u = lodo_accuracies(grouped, group_members, row_groups, Y, dataset_rows, dataset_labels,
                           k=k, weights=weights, fallback=fallback, k_descriptor=k_descriptor,
                           families=families, base=LodoBase(lists))
    free = np.array([bool(covered(Neighbors(n.indices[:, :k], n.similarities[:, :k]), Y).all())
                     for n in lists.values()], bool)
    return LodoBase(lists, P, u, free, (k, weights, fallback, k_descriptor))


class NadarayaWatson:
    """Gaussian-kernel regression of p(d, ·) on a 1-D descriptor u(d).

    Parameters: ``bandwidth`` (fixed h; None = choose by leave-one-out), ``grid`` (candidate
    bandwidths as multiples of the descriptor's scale, the median pairwise |u_i − u_j|),
    ``loss`` (``"mae"`` or ``"mse"`` for the leave-one-out choice).
    Learned: ``u_``, ``P_``, ``bandwidth_``, ``loo_error_`` (the chosen h's error),
    ``grid_bandwidths_``, ``grid_errors_``.
    """

    def __init__(
        self,
        bandwidth: float | None = None,
        *,
        grid: Sequence[float] | None = None,
        loss: Literal["mae", "mse"] = "mae",
    ):
        self.bandwidth = bandwidth
        self.grid = grid
        self.loss = loss

    def fit(self, u: np.ndarray, P: np.ndarray) -> NadarayaWatson:
        u = np.asarray(u, np.float64).ravel()
        P = np.asarray(P, np.float64)
        if P.ndim == 1:
            P = P[:, None]
        if P.shape[0] != u.size:
            raise ValueError(f"{u.size} descriptors but {P.shape[0]} rows of accuracies")
        if self.loss not in ("mae", "mse"):
            raise ValueError(f"loss must be 'mae' or 'mse', got {self.loss!r}")
        self.u_, self.P_ = u, P
        if self.bandwidth is not None:
            self.grid_bandwidths_ = np.array([float(self.bandwidth)])
        else:
            diffs = np.abs(u[:, None] - u[None, :])[~np.eye(u.size, dtype=bool)]
            scale = float(np.median(diffs)) if diffs.size and np.median(diffs) > 0 else 1.0
            mult = np.geomspace(1e-2, 1e2, 41) if self.grid is None else np.asarray(self.grid)
            self.grid_bandwidths_ = scale * np.asarray(mult, np.float64)
        errors = np.array([self._loo_error(h) for h in self.grid_bandwidths_])
        self.grid_errors_ = errors
        finite = np.where(np.isfinite(errors), errors, np.inf)
        best = np.flatnonzero(finite <= finite.min() + 1e-12)
        i = best[-1] if best.size else len(errors) - 1  # ties: the smoothest
        self.bandwidth_ = float(self.grid_bandwidths_[i])
        self.loo_error_ = float(errors[i])
        return self

    @classmethod
    def from_fitted(cls, u: np.ndarray, P: np.ndarray, bandwidth: float) -> NadarayaWatson:
        """A fitted smoother rebuilt from stored state (a bundle's u(d), p(d, m) and h)."""
        self = cls(bandwidth)
        self.u_ = np.asarray(u, np.float64).ravel()
        self.P_ = np.asarray(P, np.float64).reshape(self.u_.size, -1)
        self.bandwidth_ = float(bandwidth)
        return self

    def predict(self, u_new: np.ndarray | float) -> np.ndarray:
        """p̂ (n × M) at each new descriptor value."""
        u_new = np.atleast_1d(np.asarray(u_new, np.float64))
        return _smooth(u_new, self.u_, self.P_, self.bandwidth_, leave_out=False)

    def loo_predict(self) -> np.ndarray:
        """p̂(d, ·) for each training dataset from the others (D × M) at the chosen bandwidth."""
        return _smooth(self.u_, self.u_, self.P_, self.bandwidth_, leave_out=True)

    def _loo_error(self, h: float) -> float:
        err = _smooth(self.u_, self.u_, self.P_, h, leave_out=True) - self.P_
        err = np.abs(err) if self.loss == "mae" else err**2
        return float(np.nanmean(err)) if np.isfinite(err).any() else float("nan")


def _smooth(
    u_new: np.ndarray, u: np.ndarray, P: np.ndarray, h: float, *, leave_out: bool
) -> np.ndarray:
    """Nadaraya–Watson estimate; weights normalised in log space (no underflow at small h)."""
    logw = -0.5 * ((u_new[:, None] - u[None, :]) / h) ** 2  # (n, D)
    if leave_out:
        np.fill_diagonal(logw, -np.inf)
    top = logw.max(axis=1, keepdims=True)
    w = np.exp(logw - np.where(np.isfinite(top), top, 0.0))  # a row with no other dataset: w = 0
    avail = ~np.isnan(P)  # (D, M)
    num = w @ np.where(avail, P, 0.0)
    den = w @ avail.astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, num / np.where(den > 0, den, 1.0), np.nan)


# Label matrices above this many bytes take each fold's fallback from column totals less the
# rows the fold leaves out; smaller ones sum the fold's rows (numpy's order, bit for bit). A
# pass per fold over 100k × 400 labels made 80 % of a leave-one-dataset-out evaluation's time.
FOLD_TOTALS_BYTES = 64 * 2**20


def fallback_totals(Y: np.ndarray, matrix_bytes: int):
    """Column totals of ``Y`` (``column_counts_sums``) when the label matrix it belongs to
    (``matrix_bytes``) is larger than ``FOLD_TOTALS_BYTES``, else None: then each fold's
    fallback is its totals less the few rows the fold leaves out, not a pass over every allowed
    row. (0/1 labels sum to integers, exact either way; a row's mean over several datasets,
    e.g. 1/3, can differ in the last bits.)"""
    return column_counts_sums(Y) if matrix_bytes > FOLD_TOTALS_BYTES else None


def train_mean(Y: np.ndarray, rows: np.ndarray, totals=None) -> np.ndarray:
    """Each column's mean label over ``rows`` (n bool); with ``totals`` (``column_counts_sums``
    of all of Y) as the totals less the rows left out."""
    if totals is None:
        return column_means(Y, rows)[1]  # a block of rows at a time: no copy of Y[rows]
    return means_of(*fold_counts_sums(Y, rows, totals))


def fold_counts_sums(Y: np.ndarray, rows: np.ndarray, totals) -> tuple[np.ndarray, np.ndarray]:
    """Each column's label count and sum over ``rows`` (n bool): ``totals``
    (``fallback_totals``) less the rows left out."""
    counts, sums = column_counts_sums(Y, ~rows)
    return totals[0] - counts, totals[1] - sums
