"""The ANN index: HNSW finds ≥ 95% of the exact top-10 on clustered text-like vectors, the exact
kind is the router's exact search, bytes round-trip to identical answers, builds are seeded."""

from __future__ import annotations

import io

import numpy as np
import pytest
from benchroute.artifacts import ann_index as ai
from benchroute.transforms.knn import cosine_topk, normalize_rows


def clustered(n: int, q: int, d: int = 48, topics: int = 30, noise: float = 0.8, seed: int = 0):
    """Unit rows around ``topics`` centres (float16, as the bundle stores them) and queries from
    the same mixture."""
    rng = np.random.default_rng(seed)
    C = normalize_rows(rng.standard_normal((topics, d)))
    X = C[rng.integers(0, topics, n)] + noise * rng.standard_normal((n, d)) / np.sqrt(d)
    Q = C[rng.integers(0, topics, q)] + noise * rng.standard_normal((q, d)) / np.sqrt(d)
    return normalize_rows(X).astype(np.float16), normalize_rows(Q).astype(np.float32)


@pytest.fixture(scope="module")
def data():
    return clustered(3000, 200)


@pytest.fixture(scope="module")
def hnsw(data):
    X, _ = data
    return ai.build_index(X, "hnsw", m=16, ef_construction=80, ef_search=64)


def test_hnsw_recall_against_exact(data, hnsw):
    X, Q = data
    assert hnsw.kind == "hnsw"
    r = ai.recall_at_k(hnsw, X, Q, 10)
    assert r >= 0.95, r
    # a starved search finds less: the recall measure is not trivially 1
    assert ai.recall_at_k(hnsw, X, Q, 10, ef_search=10) < r or r == 1.0
    sims, rows = hnsw.search(Q, 10)
    assert sims.shape == rows.shape == (200, 10) and rows.dtype == np.int64
    assert np.all(np.diff(sims, axis=1) <= 1e-6)  # best first
    # similarities are the cosines of the rows returned
    P = ai.prepare(X)
    want = np.einsum("qd,qkd->qk", ai.prepare(Q), P[rows])
    np.testing.assert_allclose(sims, want, atol=1e-5)


def test_recall_measure_counts_misses(data):
    X, Q = data

    class Wrong:  # returns the exact answer shifted by one row: nearly always wrong
        def search(self, Q, k, ef_search=None):
            n = cosine_topk(ai.prepare(Q), ai.prepare(X), k)
            return n.similarities, (n.indices + 1) % len(X)

    assert ai.recall_at_k(Wrong(), X, Q, 10) < 0.2


def test_exact_kind_is_the_routers_search(data):
    X, Q = data
    index = ai.build_index(X, "auto")  # 3000 rows: below the threshold
    assert index.kind == "exact"
    sims, rows = index.search(Q, 7)
    want = cosine_topk(normalize_rows(Q), normalize_rows(X.astype(np.float32)), 7)
    assert np.array_equal(rows, want.indices) and np.array_equal(sims, want.similarities)
    assert ai.recall_at_k(index, X, Q, 10) == 1.0
    assert ai.build_index(X, "auto", exact_max_rows=100).kind == "hnsw"


def test_bytes_round_trip_identical_results(data, hnsw, tmp_path):
    X, Q = data
    blob = hnsw.to_bytes()
    with np.load(io.BytesIO(blob), allow_pickle=False) as z:  # plain arrays, no pickles
        assert set(z.files) == {"params", "neighbors", "offsets", "levels", "entry"}
    assert len(blob) < ai.prepare(X).nbytes  # the graph only: the vectors are not repeated
    for loaded in (ai.load_index(blob, X), ai.load_index(_write(tmp_path / "i.bin", blob), X)):
        assert loaded.kind == "hnsw" and loaded.params == hnsw.params
        for k in (1, 10):
            s1, r1 = hnsw.search(Q, k)
            s2, r2 = loaded.search(Q, k)
            assert np.array_equal(r1, r2) and np.array_equal(s1, s2)
    exact = ai.build_index(X, "exact")
    again = ai.load_index(exact.to_bytes(), X)
    assert np.array_equal(again.search(Q, 5)[1], exact.search(Q, 5)[1])


def test_load_refuses_other_rows_and_bad_bytes(data, hnsw):
    X, _ = data
    other = X.copy()
    other[0, 0] += np.float16(0.25)
    with pytest.raises(ValueError, match="not the ones"):
        ai.load_index(hnsw.to_bytes(), other)
    with pytest.raises(ValueError, match="built on"):
        ai.load_index(hnsw.to_bytes(), X[:-1])
    with pytest.raises(ValueError, match="not a benchroute ANN index"):
        ai.load_index(b"\x80\x04pickle", X)


def test_seeded_deterministic_build():
    X, _ = clustered(800, 1, seed=3)
    a = ai.build_index(X, "hnsw", m=8, ef_construction=40, seed=5).to_bytes()
    b = ai.build_index(X, "hnsw", m=8, ef_construction=40, seed=5).to_bytes()
    c = ai.build_index(X, "hnsw", m=8, ef_construction=40, seed=6).to_bytes()
    assert a == b
    assert a != c


def test_fewer_rows_than_k_pads():
    X, Q = clustered(6, 3, seed=1)
    for kind in ("exact", "hnsw"):
        sims, rows = ai.build_index(X, kind).search(Q, 10)
        assert (rows[:, :6] >= 0).all() and (rows[:, 6:] == -1).all()
        assert np.isneginf(sims[:, 6:]).all()
    with pytest.raises(ValueError, match="dimension"):
        ai.build_index(X).search(np.ones((1, 3)), 2)


def _write(path, blob):
    path.write_bytes(blob)
    return path


def _tampered(files, name, fn):
    a = np.load(io.BytesIO(files[f"index/ann_{name}.npy"]), allow_pickle=False).copy()
    a = fn(a)
    buf = io.BytesIO()
    np.save(buf, a, allow_pickle=False)
    return {**files, f"index/ann_{name}.npy": buf.getvalue()}


def test_graph_files_are_checked_before_faiss_sees_them(data, hnsw):
    """A bundle's graph is untrusted bytes: every way of pointing a search outside the rows
    is refused with a ValueError, and the untouched files load to the same answers."""
    X, Q = data
    files = hnsw.to_files("index/ann_")
    assert set(files) == {f"index/ann_{n}" for n in ("params.json", "neighbors.npy", "offsets.npy",
                                                       "levels.npy", "entry.npy")}
    loaded = ai.load_index_files(files, "index/ann_", X)
    assert np.array_equal(loaded.search(Q, 10)[1], hnsw.search(Q, 10)[1])
    n = len(X)

    def set_at(i, v):
        def f(a):
            a[i] = v
            return a
        return f

    bad = {
        "neighbour out of range": _tampered(files, "neighbors", set_at(3, n)),
        "negative neighbour": _tampered(files, "neighbors", set_at(3, -2)),
        "offsets": _tampered(files, "offsets", set_at(5, 7)),
        "levels": _tampered(files, "levels", set_at(0, 40)),
        "entry point": _tampered(files, "entry", set_at(0, n + 5)),
        "dtype": _tampered(files, "neighbors", lambda a: a.astype(np.int64)),
        "short list": _tampered(files, "neighbors", lambda a: a[:-1]),
    }
    for why, f in bad.items():
        with pytest.raises(ValueError):
            ai.load_index_files(f, "index/ann_", X)
    missing = {k: v for k, v in files.items() if not k.endswith("levels.npy")}
    with pytest.raises(ValueError, match="levels"):
        ai.load_index_files(missing, "index/ann_", X)
