"""The p-estimator: LODO accuracies, the kNN-distance descriptor and the Gaussian kernel."""

from __future__ import annotations

import numpy as np
import pytest

from benchroute.transforms.kernel import (
    lodo_base,
    NadarayaWatson,
    lodo_accuracies,
    mean_knn_distance,
    neighbor_share_estimate,
)
from benchroute.transforms.knn import KNNCorrectness, Neighbors, grouped_topk, normalize_rows
from benchroute.transforms.scores import binarized_accuracy


def test_kernel_prediction_by_hand():
    nw = NadarayaWatson(bandwidth=1.0).fit(np.array([0.0, 1.0]), np.array([[0.2], [0.8]]))
    np.testing.assert_allclose(nw.predict(0.5), [[0.5]])
    w = np.exp(-0.5)
    np.testing.assert_allclose(nw.predict(0.0), [[(0.2 + 0.8 * w) / (1 + w)]])


def test_kernel_tiny_bandwidth_is_nearest_dataset_without_underflow():
    nw = NadarayaWatson(bandwidth=1e-3).fit(np.array([0.0, 100.0]), np.array([[0.2, 0.1], [0.8, 0.9]]))
    np.testing.assert_allclose(nw.predict([1.0, 99.0, 500.0]), [[0.2, 0.1], [0.8, 0.9], [0.8, 0.9]])


def test_kernel_skips_missing_accuracies():
    P = np.array([[0.2, np.nan], [0.6, 0.5]])
    nw = NadarayaWatson(bandwidth=10.0).fit(np.array([0.0, 0.1]), P)
    pred = nw.predict(0.05)
    assert pred[0, 0] == pytest.approx(0.4, abs=1e-3)
    assert pred[0, 1] == pytest.approx(0.5)


def test_bandwidth_is_chosen_by_leave_one_out_error():
    u = np.array([0.0, 0.1, 0.2, 1.0, 1.1, 1.2])
    P = np.array([[0.3], [0.3], [0.35], [0.8], [0.8], [0.85]])
    grid = [0.01, 0.1, 1.0, 10.0]
    nw = NadarayaWatson(grid=grid).fit(u, P)
    scale = np.median(np.abs(u[:, None] - u[None, :])[~np.eye(6, dtype=bool)])
    # brute-force leave-one-out MAE for each bandwidth
    errs = []
    for h in scale * np.array(grid):
        e = []
        for i in range(6):
            j = np.arange(6) != i
            w = np.exp(-0.5 * ((u[i] - u[j]) / h) ** 2)
            e.append(abs((w @ P[j, 0]) / w.sum() - P[i, 0]))
        errs.append(np.mean(e))
    np.testing.assert_allclose(nw.grid_errors_, errs, rtol=1e-9)
    assert nw.bandwidth_ == pytest.approx(scale * grid[int(np.argmin(errs))])
    assert nw.loo_error_ == pytest.approx(min(errs))
    # clustered data: a small bandwidth beats the global mean
    assert nw.loo_error_ < errs[-1]


def test_mean_knn_distance_by_hand():
    nb = Neighbors(np.array([[0, 1], [2, -1]]), np.array([[0.9, 0.7], [0.6, -np.inf]], np.float32))
    # query 0: (0.1 + 0.3) / 2 = 0.2; query 1: 0.4 (one neighbour) -> mean 0.3
    assert mean_knn_distance(nb) == pytest.approx(0.3, abs=1e-6)
    assert mean_knn_distance(nb, k=1) == pytest.approx((0.1 + 0.4) / 2, abs=1e-6)


@pytest.mark.parametrize("block_bytes", [None, 0])
def test_lodo_accuracies_equal_separate_fits_per_fold(block_bytes, monkeypatch):
    """``block_bytes=0``: the label matrix counts as large, so each fold's fallback (the
    models' mean training label) is the column totals less the rows the fold leaves out."""
    import benchroute.transforms.kernel as kernel_mod

    if block_bytes is not None:
        monkeypatch.setattr(kernel_mod, "FOLD_TOTALS_BYTES", block_bytes)
    rng = np.random.default_rng(2)
    n, D, M, k = 90, 3, 4, 5
    X = normalize_rows(rng.normal(size=(n, 6)))
    member = np.zeros((n, D), bool)
    member[np.arange(n), rng.integers(0, D, n)] = True
    member[:4, 2] = True  # four inputs sit in two datasets
    Y = (rng.random((n, M)) < 0.5).astype(float)
    Y[rng.random((n, M)) < 0.1] = np.nan
    Y[rng.random(n) < 0.9, 3] = np.nan  # a model seldom labelled: the fallback decides often
    sigs, groups = np.unique(member, axis=0, return_inverse=True)
    groups = groups.ravel()
    rows = [np.flatnonzero(member[:, d]) for d in range(D)]
    labels = [Y[r] for r in rows]
    grouped = grouped_topk(X, X, groups, k, self_rows=np.arange(n))
    held = np.array([False, False, True])
    P, u = lodo_accuracies(grouped, sigs, groups, Y, rows, labels, k=k, held_out=held)
    # narrowed from the folds without a held-out dataset (a leaderboard's nested LODO): the same
    # (dataset 1 keeps its base p where its lists and fallback-free labels allow it)
    base = lodo_base(grouped, sigs, groups, Y, rows, labels, k=k)
    np.testing.assert_array_equal(base.P, lodo_accuracies(grouped, sigs, groups, Y, rows, labels, k=k)[0])
    P_b, u_b = lodo_accuracies(grouped, sigs, groups, Y, rows, labels, k=k, held_out=held, base=base)
    np.testing.assert_array_equal(P_b, P)
    np.testing.assert_array_equal(u_b, u)
    assert member[rows[0], 2].any() or member[rows[1], 2].any()  # the case is exercised
    assert np.isnan(P[2]).all() and np.isnan(u[2])
    for d in (0, 1):
        train = ~(member[:, d] | member[:, 2])  # never d, never the held-out dataset
        keep = ~member[rows[d], 2]  # d's inputs that also sit in the held-out one: left out
        knn = KNNCorrectness(k).fit(X[train], Y[train])
        G = knn.predict_proba(X[rows[d][keep]])
        np.testing.assert_allclose(P[d], binarized_accuracy(G, labels[d][keep]))
        nb = knn.kneighbors(X[rows[d][keep]])
        assert u[d] == pytest.approx(mean_knn_distance(nb), abs=1e-6)


def test_neighbor_share_estimate_by_hand():
    member = np.array([[1, 0, 0], [1, 0, 0], [0, 1, 0], [0, 1, 1]], bool)
    P = np.array([[0.9, 0.5], [0.3, np.nan], [np.nan, np.nan]])
    nb = Neighbors(np.array([[0, 1, 2], [3, -1, -1]]), np.zeros((2, 3), np.float32))
    # neighbours: rows 0, 1 (d0), 2 (d1), 3 (d1 and d2) -> shares d0: 2, d1: 2, d2: 1
    # model 0: (2·0.9 + 2·0.3) / 4 (d2 has no p); model 1: only d0 -> 0.5
    np.testing.assert_allclose(neighbor_share_estimate(nb, member, P), [0.6, 0.5])


def test_a_nested_fold_keeps_its_base_p_only_where_the_fallback_played_no_part():
    """``lodo_base``: a dataset whose lists do not change when another is held out keeps its p,
    unless a label of its came from the fallback (the models' mean label over the allowed rows),
    which holding out another dataset changes. A's neighbours are A' rows, unlabelled for model
    1: A's model-1 predictions are the fallback, 0.625 over B and C (predict 1), 0.25 over B
    alone once C is held out (predict 0); A's model-1 labels are all 1."""
    rng = np.random.default_rng(0)
    n_d, dim = 20, 6
    e1 = np.eye(dim)[0] * 5
    X = normalize_rows(np.vstack([e1 + rng.normal(size=(n_d, dim)) * 0.3 for _ in range(2)]
                                 + [-e1 + rng.normal(size=(n_d, dim)) * 0.3 for _ in range(2)]))
    rows = [np.arange(d * n_d, (d + 1) * n_d) for d in range(4)]  # A, A', B, C
    groups = np.repeat(np.arange(4), n_d)
    sigs = np.eye(4, dtype=bool)
    Y = np.zeros((4 * n_d, 2))
    Y[:, 0] = rng.random(4 * n_d) < 0.5
    Y[rows[0], 1] = 1.0
    Y[rows[1], 1] = np.nan
    Y[rows[2], 1] = (np.arange(n_d) < n_d // 4).astype(float)  # a quarter of B
    Y[rows[3], 1] = 1.0
    labels = [Y[r] for r in rows]
    grouped = grouped_topk(X, X, groups, 3, self_rows=np.arange(len(X)))
    base = lodo_base(grouped, sigs, groups, Y, rows, labels, k=3)
    assert not base.fallback_free[0] and base.fallback_free[1]  # A' rows' neighbours are labelled A rows
    held = np.array([False, False, False, True])
    P, _ = lodo_accuracies(grouped, sigs, groups, Y, rows, labels, k=3, held_out=held)
    P_b, _ = lodo_accuracies(grouped, sigs, groups, Y, rows, labels, k=3, held_out=held, base=base)
    assert base.P[0, 1] == 1.0 and P[0, 1] == 0.0  # the fallback turned
    np.testing.assert_array_equal(P_b, P)
    # a base measured otherwise would give another p: refused
    for other in ({"k": 1}, {"k": 3, "fallback": "nan"}, {"k": 3, "weights": "distance"}):
        with pytest.raises(ValueError, match="base folds were measured with"):
            lodo_accuracies(grouped, sigs, groups, Y, rows, labels, held_out=held, base=base, **other)
