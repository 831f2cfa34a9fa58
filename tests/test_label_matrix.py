"""Per-model statistics of a label matrix read a block of rows at a time equal numpy's whole-matrix
results, and the kNN label reads chunked by bytes equal one chunk."""

from __future__ import annotations

import numpy as np
import pytest

from benchroute.transforms import knn
from benchroute.transforms.label_matrix import (
    RowsOf,
    column_counts_sums,
    column_means,
    rows_with_label,
    value_range,
)


def _labels(n=57, M=7, seed=0, dtype=np.float64):
    rng = np.random.default_rng(seed)
    Y = (rng.random((n, M)) < 0.4).astype(dtype)
    Y[rng.random((n, M)) < 0.3] = np.nan
    Y[3] = np.nan  # a row with no label
    Y[:, 5] = np.nan  # a model with none
    return Y


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("max_bytes", [1, 8 * 7 * 5, 2**30])  # a row, 5 rows, everything
def test_blocked_statistics_equal_numpy(dtype, max_bytes):
    Y = _labels(dtype=dtype)
    rows = np.array([0, 3, 8, 9, 10, 40, 41, 56])
    for sel in (None, rows, np.isin(np.arange(Y.shape[0]), rows)):
        Ys = Y if sel is None else Y[sel]
        counts, sums = column_counts_sums(Y, sel, max_bytes=max_bytes)
        np.testing.assert_array_equal(counts, (~np.isnan(Ys)).sum(axis=0))
        np.testing.assert_array_equal(sums, np.nansum(Ys.astype(np.float64), axis=0))
        _, means = column_means(Y, sel, max_bytes=max_bytes)
        with np.errstate(invalid="ignore"):
            np.testing.assert_array_equal(means, np.nansum(Ys, axis=0, dtype=np.float64) / counts)
    np.testing.assert_array_equal(rows_with_label(Y, max_bytes=max_bytes), ~np.isnan(Y).all(axis=1))


@pytest.mark.parametrize("max_bytes", [1, 8 * 7 * 5, 2**30])
def test_a_row_view_reads_as_the_rows_it_stands_for(max_bytes):
    """``RowsOf`` (the evaluation's training index without a copy of Y's rows, grown by a
    task's labelled inputs): its rows and its column means are those of the dense stack, bit
    for bit, in any block size."""
    Y = _labels()
    rows = np.array([0, 3, 8, 9, 10, 40, 41, 56])
    extra = _labels(n=4, seed=1)
    for sel in (rows, np.isin(np.arange(Y.shape[0]), rows)):
        view = RowsOf(Y, sel)
        grown = view.stack(extra[:2]).stack(extra[2:])
        for v, dense in ((view, Y[sel]), (grown, np.vstack([Y[sel], extra]))):
            assert v.shape == dense.shape and knn.is_row_source(v)
            idx = np.array([len(dense) - 1, 0, -1, 2, len(dense) - 1])
            got = v.rows(idx)
            np.testing.assert_array_equal(got[idx >= 0], dense[idx[idx >= 0]])
            assert np.isnan(got[idx < 0]).all()
            np.testing.assert_array_equal(v.column_means(max_bytes),
                                          column_means(dense, max_bytes=max_bytes)[1])
    # with the rows' counts and sums known (fold totals), only the extra rows are summed
    stats = column_counts_sums(Y, rows)
    known = RowsOf(Y, rows, stats=stats).stack(extra)
    np.testing.assert_allclose(known.column_means(max_bytes),
                               column_means(np.vstack([Y[rows], extra]))[1], rtol=1e-12)
    assert known.stats is stats
    with pytest.raises(IndexError):
        RowsOf(Y, rows).rows([len(rows)])
    # the kNN predictor reads it as it reads the dense rows
    X = np.random.default_rng(3).normal(size=(Y.shape[0], 5))
    a = knn.KNNCorrectness(3).fit(X[rows], RowsOf(Y, rows)).predict_proba(X[:9])
    b = knn.KNNCorrectness(3).fit(X[rows], Y[rows]).predict_proba(X[:9])
    np.testing.assert_array_equal(a, b)


def test_value_range_ignores_nan_and_reports_no_label():
    assert value_range(np.array([[np.nan, 0.25], [1.0, np.nan]])) == (0.25, 1.0)
    assert value_range(np.full((3, 2), np.nan)) is None
    assert value_range(np.empty((0, 4))) is None


def test_knn_label_reads_in_small_chunks_equal_one_chunk(monkeypatch):
    rng = np.random.default_rng(1)
    X = rng.normal(size=(80, 6)).astype(np.float32)
    Y = _labels(n=80, M=9, seed=2)
    Q = rng.normal(size=(33, 6)).astype(np.float32)
    est = knn.KNNCorrectness(5, weights="distance").fit(X, Y)
    neigh = est.kneighbors(Q)
    G, cov = est.predict_from_neighbors(neigh), knn.covered(neigh, Y)
    monkeypatch.setattr(knn, "CHUNK_BYTES", 8 * 5 * 9 * 2)  # two query rows a chunk
    assert knn.chunk_rows(4096, 5, 9) == 2
    np.testing.assert_array_equal(est.predict_from_neighbors(neigh), G)
    np.testing.assert_array_equal(knn.covered(neigh, Y), cov)
    # float32 labels are read as they are (no float64 copy) and give the same g
    est32 = knn.KNNCorrectness(5, weights="distance").fit(X, Y.astype(np.float32))
    assert est32.Y_.dtype == np.float32
    np.testing.assert_array_equal(est32.predict_from_neighbors(neigh), G)


def test_held_out_metrics_a_block_at_a_time_equal_the_whole_matrix(monkeypatch):
    from benchroute.transforms import route_metrics
    from benchroute.transforms.routing_eval import _log_loss

    rng = np.random.default_rng(3)
    G = rng.random((300, 50))
    Y = (rng.random((300, 50)) < 0.5).astype(float)
    G[rng.random(G.shape) < 0.1] = np.nan
    Y[rng.random(Y.shape) < 0.2] = np.nan
    ok = ~np.isnan(G) & ~np.isnan(Y)
    p, y = G[ok], Y[ok]
    q = np.clip(p, 1e-6, 1 - 1e-6)
    b = np.minimum((p * 15).astype(int), 14)
    cnt = np.bincount(b, minlength=15)
    sp, sy = np.bincount(b, weights=p, minlength=15), np.bincount(b, weights=y, minlength=15)
    whole = (np.mean((p - y) ** 2), np.mean((p > 0.5) == (y > 0.5)),
             np.sum(np.abs(sy - sp)[cnt > 0]) / p.size, -np.mean(y * np.log(q) + (1 - y) * np.log(1 - q)))

    def metrics():
        return (route_metrics.brier(G, Y), route_metrics.binary_accuracy(G, Y), route_metrics.ece(G, Y),
                _log_loss(G, Y))

    assert metrics() == whole  # one block: numpy's numbers
    monkeypatch.setattr(route_metrics, "METRIC_BLOCK_BYTES", 8 * 50 * 7)  # 7 rows a block
    assert len(list(route_metrics.labelled_pairs(G, Y))) == 43
    np.testing.assert_allclose(metrics(), whole, rtol=1e-12)


def test_policy_choices_a_block_of_rows_at_a_time_equal_one_call(monkeypatch):
    from benchroute.transforms import policy, routing_eval
    from benchroute.transforms.routing_eval import Fold

    rng = np.random.default_rng(4)
    G, C = rng.random((40, 6)), rng.random((40, 6))
    G[rng.random(G.shape) < 0.1] = np.nan
    fs = [Fold("a", np.arange(0), np.arange(25), G[:25]), Fold("b", np.arange(0), np.arange(15), G[25:])]
    accs = [rng.random(6), rng.random(6)]
    pt = policy.Point(rule="utility", value=0.3)
    whole = np.concatenate([policy.choose(G[:25], C[:25], pt, tiebreak=accs[0]),
                            policy.choose(G[25:], C[25:], pt, tiebreak=accs[1])])
    np.testing.assert_array_equal(routing_eval._choose_per_fold(G, C, pt, fs, accs, None), whole)
    monkeypatch.setattr(routing_eval, "CHOOSE_BYTES", 8 * 6 * 4)  # 4 rows a call
    np.testing.assert_array_equal(routing_eval._choose_per_fold(G, C, pt, fs, accs, None), whole)
