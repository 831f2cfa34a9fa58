"""The bundle format that scales (issue 16, item 3) on the real sample: labels bit-packed and
read back exactly, the packed (leaderboard-size) read path answering like the dense one, an
HNSW graph over the index searched instead of the exact scan with its recall in the manifest,
and bundles written before labels were packed still loading."""

from __future__ import annotations

import io

import numpy as np
import pytest
from benchroute.artifacts import router as router_mod
from benchroute.artifacts.bundle import (
    BundleContent,
    BundleStore,
    npy_bytes,
    open_bundle,
)
from benchroute.artifacts.label_pack import PackedLabels
from benchroute.artifacts.router import LABELS_PREFIX, Router, load_router
from benchroute.artifacts.specs import RouterSpec
from benchroute.artifacts.stages.fit import FitOptions
from benchroute.flows.publish import build_content, publish_store
from benchroute.transforms.knn import is_row_source


@pytest.fixture(scope="module")
def bundles(embedded_sample_store):
    store = embedded_sample_store
    publish_store(store, "exact-scan", FitOptions(router=RouterSpec(index_search="exact"), evaluate=False))
    publish_store(store, "hnsw", FitOptions(router=RouterSpec(index_search="hnsw"), evaluate=False))
    publish_store(store, "knn", FitOptions(router=RouterSpec(index_search="exact", predictor="knn_shrunk"),
                                          evaluate=False))
    return store


def test_labels_are_packed_and_read_back_exactly(bundles):
    b = open_bundle(bundles, "exact-scan")
    assert "index/labels.npy" not in b.files
    packed = PackedLabels.from_files({r: b.files[r] for r in b.files if r.startswith(LABELS_PREFIX)}, LABELS_PREFIX)
    router = load_router(bundles, "exact-scan")
    assert not is_row_source(router.knn.Y_)  # small: unpacked once at load
    np.testing.assert_array_equal(packed.unpack(np.float64), router.knn.Y_)
    dense_bytes = router.knn.Y_.shape[0] * router.knn.Y_.shape[1] * 4
    assert packed.nbytes * 8 < dense_bytes  # 2 bits a cell instead of 32 (plus a few exceptions)
    assert b.manifest["parameters"]["index_search"] == {"kind": "exact"}


@pytest.mark.parametrize("name", ["exact-scan", "knn"])  # the MLP predictor; a kNN one over the index
def test_packed_read_path_answers_like_the_dense_one(bundles, monkeypatch, name):
    dense = load_router(bundles, name)
    monkeypatch.setattr(router_mod, "DENSE_LABEL_CELLS", 0)  # as a leaderboard-size bundle loads
    packed = load_router(bundles, name)
    assert is_row_source(packed.knn.Y_)
    X = dense.knn.X_[::37][:30]
    for x in X:
        assert packed.route(x) == dense.route(x)
    assert packed.score_task(X) == dense.score_task(X)
    np.testing.assert_array_equal(packed.knn.train_mean_, dense.knn.train_mean_)


def test_hnsw_bundle_searches_its_graph_with_reported_recall(bundles):
    b = open_bundle(bundles, "hnsw")
    ann = sorted(r for r in b.files if r.startswith("index/ann_"))
    assert ann == ["index/ann_entry.npy", "index/ann_levels.npy", "index/ann_neighbors.npy",
                   "index/ann_offsets.npy", "index/ann_params.json"]
    search = b.manifest["parameters"]["index_search"]
    assert search["kind"] == "hnsw" and search["recall_at_10"] >= 0.95 and search["recall_queries"] > 0
    exact, approx = load_router(bundles, "exact-scan"), load_router(bundles, "hnsw")
    assert approx.ann is not None and exact.ann is None
    Q = exact.knn.X_[::11] + 0.01  # queries near, not on, the index rows
    a, e = approx.kneighbors(Q), exact.kneighbors(Q)
    found = np.mean([np.intersect1d(x, y).size / y.size for x, y in zip(a.indices, e.indices)])
    assert found >= 0.95
    same = np.mean([approx.route(q)["model"] == exact.route(q)["model"] for q in Q[:40]])
    assert same >= 0.9


def test_bundle_written_before_labels_were_packed_still_loads(bundles):
    content = build_content(bundles, "old-format", FitOptions(router=RouterSpec(index_search="exact"), evaluate=False))
    router = load_router(bundles, "exact-scan")
    files = {r: v for r, v in content.files.items() if not r.startswith(LABELS_PREFIX)}
    files["index/labels.npy"] = npy_bytes(router.knn.Y_.astype(np.float32))
    BundleStore(bundles).publish(BundleContent("old-format", files, content.meta), code_version="old")
    old = load_router(bundles, "old-format")
    x = router.knn.X_[3]
    assert old.route(x) | {"bundle_version": None} == router.route(x) | {"bundle_version": None}


def test_a_damaged_graph_is_refused_with_the_bundle_named(bundles, tmp_path):
    b = open_bundle(bundles, "hnsw")
    files = dict(b.files)
    nb = np.load(io.BytesIO(files["index/ann_neighbors.npy"]), allow_pickle=False).copy()
    nb[0] = len(nb) + 10**6  # a neighbour id past the rows, same size file
    files["index/ann_neighbors.npy"] = npy_bytes(nb)
    store = str(tmp_path / "s")
    from benchroute.artifacts.bundle import PUBLICATION_KEYS

    meta = {k: v for k, v in b.manifest.items() if k not in PUBLICATION_KEYS}
    BundleStore(store).publish(BundleContent("bad", files, meta), code_version="x")
    with pytest.raises(router_mod.RouteError, match="nearest-neighbour index"):
        Router(open_bundle(store, "bad"))
