"""The served router is the evaluated one: a bundle built without a dataset picks, for every input
of that dataset and at every operating point, the model the evaluation picked for it."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest
from benchroute.artifacts import embeddings as emb_store
from benchroute.artifacts.embeddings import pick_embedder
from benchroute.artifacts.router import load_router
from benchroute.artifacts.router_build import (
    Selection,
    bundle_content,
    cost_data,
    publish_content,
    select_frames,
)
from benchroute.artifacts.specs import RouterSpec
from benchroute.artifacts.store import Store
from benchroute.transforms import policy
from benchroute.transforms.evaluate import BenchmarkArrays
from benchroute.transforms.model_cards import cards_for
from benchroute.transforms.predictors import make_predictor
from benchroute.transforms.router_fit import DEFAULT_PREDICTOR
from benchroute.transforms.routing_eval import evaluate_routing, folds

POINTS = [policy.Point("utility", 0.0), policy.Point("utility", 0.05), policy.Point("utility", 0.5),
          policy.Point("within_delta", 0.1)]


@pytest.mark.parametrize("predictor", sorted({"knn", DEFAULT_PREDICTOR}))
def test_bundle_picks_equal_evaluation_picks(embedded_sample_store, tmp_path, predictor):
    store_url = embedded_sample_store
    store = Store(store_url)
    eid = pick_embedder(store, None)
    labels, memberships, models = select_frames(store, Selection.of(sources=["mmlu_pro"]))
    datasets = sorted(labels["dataset"].unique().to_list())
    ids = sorted(labels["input_id"].unique().to_list())
    X, ids = emb_store.read_matrix(store, eid, ids)
    bench = BenchmarkArrays.from_frames(X, ids, labels, memberships, models)
    cost = cost_data(store, bench, cards_for(store, list(bench.models)))
    assert np.isfinite(cost.price_in).sum() >= 3, "the sample's MMLU-Pro models need prices"

    # The evaluation: every dataset held out in turn; keep each held-out input's pick.
    res = evaluate_routing(bench, cost, {predictor: lambda: make_predictor(predictor)},
                           split="lodo", points=POINTS, keep_choices=True)
    fold = max(folds(bench, "lodo"), key=lambda f: f.test.size)
    held = fold.name
    start = sum(f.test.size for f in folds(bench, "lodo")[: [f.name for f in folds(bench, "lodo")].index(held)])
    rows = res.test_rows[start : start + fold.test.size]
    assert (rows == fold.test).all()

    # The bundle: the same data without the held-out dataset, float32 index (no rounding).
    sel = Selection.of(datasets=[d for d in datasets if d != held])
    content = bundle_content(store_url, f"heldout-{predictor}", eid, sel, {},
                             RouterSpec(index_dtype="float32", predictor=predictor))
    published = publish_content(store_url, content)
    router = load_router(store_url, published["name"])
    assert router.model_names == list(bench.models)
    assert len(router.knn.X_) == fold.train.size  # trained on exactly the evaluation's rows

    # The default request (no cost option): argmax ĝ over every model, priced or not.
    evaluated = res.choices[predictor][("argmax_all", 0.0)][start : start + fold.test.size]
    served = [router.route(bench.X[r])["model"] for r in rows]
    assert served == [bench.models[j] for j in evaluated]
    checked = 0
    for pt in POINTS:
        evaluated = res.choices[predictor][(pt.rule, pt.value)][start : start + fold.test.size]
        kw = {"lam": pt.value} if pt.rule == "utility" else {"delta": pt.value}
        served = [router.route(bench.X[r], input_tokens=float(cost.in_tokens[r]), **kw)["model"]
                  for r in rows]
        assert served == [bench.models[j] for j in evaluated], f"{pt} differs on {held}"
        checked += len(served)
    assert checked >= 4 * 10
    # The curve a caller reads is the evaluation of this bundle's data (a random 20 % held out,
    # the bundle's own costs and models): the same numbers as running that evaluation here.
    own_bench = bench_of(store, eid, labels, memberships, models, held)
    own = evaluate_routing(own_bench, cost_data(store, own_bench, cards_for(store, list(own_bench.models))),
                           {predictor: lambda: make_predictor(predictor)}, split="random",
                           complete_only=False)
    expect = own.points.filter(pl.col("cost_share").is_finite())
    got = pl.DataFrame([vars(p) for p in router.curve])
    assert got.height == expect.height > 0
    assert np.allclose(got["cost_share"].to_numpy(), expect["cost_share"].to_numpy())
    assert np.allclose(got["quality"].to_numpy(), expect["quality"].to_numpy())


def bench_of(store, eid, labels, memberships, models, held):
    """The bundle's benchmark: the labels without the held-out dataset."""
    lab = labels.filter(pl.col("dataset") != held)
    ids = sorted(lab["input_id"].unique().to_list())
    X, ids = emb_store.read_matrix(store, eid, ids)
    return BenchmarkArrays.from_frames(X, ids, lab, memberships, models)
