"""Bit-packed labels: exact round trips (property-tested), row/column access, .npy files without
pickles, and the kNN aggregation equal to ``transforms.knn.aggregate_labels`` on the dense matrix."""

from __future__ import annotations

import io

import numpy as np
import pytest
from benchroute.artifacts import label_pack as lp
from benchroute.transforms.knn import (
    KNNCorrectness,
    Neighbors,
    aggregate_labels,
    neighbor_weights,
)
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

# 0/1/NaN mostly, sometimes a fraction (a mean over datasets) to exercise the exceptions
CELL = st.sampled_from([0.0, 1.0, np.nan, 0.0, 1.0, np.nan, 0.5, 1 / 3])
SHAPES = hnp.array_shapes(min_dims=2, max_dims=2, min_side=0, max_side=21)


def label_matrix(draw_dtype=np.float32):
    return SHAPES.flatmap(lambda s: hnp.arrays(draw_dtype, s, elements=CELL))


def same(a: np.ndarray, b: np.ndarray) -> bool:
    return a.shape == b.shape and a.dtype == b.dtype and np.array_equal(a, b, equal_nan=True)


@settings(max_examples=150, deadline=None)
@given(Y=label_matrix())
def test_round_trip_exact(Y):
    p = lp.pack(Y, chunk_rows=4)  # several chunks
    assert same(p.unpack(), Y)
    assert same(p.unpack(chunk_rows=3), Y)
    # through the .npy files (no pickle allowed on load)
    q = lp.PackedLabels.from_files(p.to_files("index/labels_"), "index/labels_")
    assert q.equals(p) and same(q.unpack(), Y)
    # from long format: the same bytes
    r, c = np.nonzero(~np.isnan(Y))
    assert lp.from_coo(r, c, Y[r, c], Y.shape).equals(p)
    assert p.n_known == int((~np.isnan(Y)).sum())


@settings(max_examples=100, deadline=None)
@given(Y=label_matrix(np.float64), data=st.data())
def test_rows_and_columns_match_the_dense_matrix(Y, data):
    p = lp.pack(Y)
    n, m = Y.shape
    if n:
        idx = np.array(data.draw(st.lists(st.integers(-1, n - 1), max_size=12)), dtype=np.int64)
        got = p.rows(idx, dtype=np.float64)
        want = np.where((idx >= 0)[:, None], Y[np.maximum(idx, 0)], np.nan)
        assert same(got, want.reshape(len(idx), m))
        assert np.array_equal(p.row_known(idx), ~np.isnan(want.reshape(len(idx), m)))
    if m:
        cols = np.array(data.draw(st.lists(st.integers(0, m - 1), max_size=8)), dtype=np.int64)
        assert same(p.columns(cols, dtype=np.float64, chunk_rows=5), Y[:, cols])


def test_pack_bool_and_canonical_bits():
    value = np.array([[1, 1, 0, 1, 0, 0, 0, 0, 1]], bool)
    known = np.array([[1, 0, 1, 1, 0, 0, 0, 0, 1]], bool)
    p = lp.pack_bool(value, known)
    assert p.value.shape == (1, 2) and p.value.dtype == np.uint8
    # little bit order along the model axis; a value bit where unknown is dropped
    assert p.value.tolist() == [[0b00001001, 0b1]] and p.known.tolist() == [[0b00001101, 0b1]]
    Y = p.unpack()
    assert np.array_equal(Y, [[1, np.nan, 0, 1, np.nan, np.nan, np.nan, np.nan, 1]], equal_nan=True)
    assert lp.pack(Y).equals(p)
    with pytest.raises(ValueError, match="unknown"):
        lp.PackedLabels(p.known, p.value, p.shape, *lp._empty_extra())  # value outside known


def test_sizes_and_files_hold_no_pickle():
    rng = np.random.default_rng(0)
    Y = (rng.random((1000, 141)) < 0.6).astype(np.float32)
    Y[rng.random(Y.shape) < 0.3] = np.nan
    p = lp.pack(Y)
    assert p.nbytes == 2 * 1000 * 18 == lp.packed_bytes(1000, 141)
    assert Y.nbytes == lp.dense_float32_bytes(1000, 141) > 15 * p.nbytes
    files = p.to_files()
    assert sorted(files) == ["known.npy", "shape.npy", "value.npy"]  # no exceptions, no files
    for data in files.values():
        a = np.load(io.BytesIO(data), allow_pickle=False)
        assert a.dtype != object
    assert np.load(io.BytesIO(files["shape.npy"])).tolist() == [1000, 141]


def test_save_and_load_through_fsspec(memory_url):
    Y = np.array([[1, 0, np.nan], [0.5, np.nan, 1]], np.float32)
    p = lp.pack(Y)
    written = p.save(memory_url + "/bundle/index")
    assert len(written) == 6  # three arrays + three exception arrays
    assert same(lp.PackedLabels.load(memory_url + "/bundle/index").unpack(), Y)


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match="infinity"):
        lp.pack(np.array([[1.0, np.inf]]))
    with pytest.raises(ValueError, match="2-d"):
        lp.pack(np.zeros(3))
    with pytest.raises(ValueError, match="twice"):
        lp.from_coo(np.array([0, 0]), np.array([1, 1]), np.array([1.0, 0.0]), (2, 2))
    with pytest.raises(ValueError, match="outside"):
        lp.from_coo(np.array([2]), np.array([0]), np.array([1.0]), (2, 2))
    p = lp.pack(np.ones((2, 3)))
    with pytest.raises(IndexError):
        p.rows([2])
    with pytest.raises(IndexError):
        p.columns([3])


@pytest.mark.parametrize("weights", ["uniform", "distance"])
def test_aggregate_equals_the_dense_knn(weights):
    """The router's kNN estimate read from packed labels equals the one from the float matrix,
    including neighbours at distance 0, missing neighbours (-1) and models with no labels."""
    rng = np.random.default_rng(1)
    n, m, q, k = 400, 37, 60, 10
    Y = (rng.random((n, m)) < 0.5).astype(np.float64)
    Y[rng.random((n, m)) < 0.4] = np.nan
    Y[:, 5] = np.nan  # a model without labels
    Y[3, 2] = 0.5
    idx = rng.integers(0, n, (q, k))
    idx[0, -3:] = -1
    sims = np.sort(rng.uniform(0.2, 0.9, (q, k)), axis=1)[:, ::-1].astype(np.float32)
    sims[1, 0] = 1.0  # distance 0
    sims[idx < 0] = -np.inf
    neigh = Neighbors(idx, sims)
    fallback = KNNCorrectness(k).fit(rng.standard_normal((n, 4)), Y).train_mean_
    want = aggregate_labels(neigh, Y, weights=weights, fallback=fallback)
    p = lp.pack(Y)
    got = p.aggregate(idx, neighbor_weights(neigh, weights), fallback, chunk=7)
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=0)
    assert np.array_equal(np.isnan(got), np.isnan(want))
    np.testing.assert_allclose(p.column_means(chunk_rows=64), fallback, rtol=1e-12)


def test_from_labels_frame_means_over_datasets():
    import polars as pl

    labels = pl.DataFrame(
        {
            "input_id": ["a", "a", "b", "b", "c"],
            "dataset": ["d1", "d2", "d1", "d1", "d1"],
            "model": ["m1", "m1", "m1", "m2", "m9"],
            "y": [1, 0, 1, 0, 1],
        },
        schema_overrides={"y": pl.Int8},
    )
    p = lp.from_labels_frame(labels, ["b", "a", "z"], ["m2", "m1"])
    assert same(p.unpack(np.float64), np.array([[0, 1], [np.nan, 0.5], [np.nan, np.nan]]))
