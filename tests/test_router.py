"""Publishing a router from a real store and using it as a consumer would."""

from __future__ import annotations

import json

import numpy as np
import polars as pl
import pytest
from benchroute.artifacts.bundle import BundleStore, VerifiedBundle, open_bundle
from benchroute.artifacts.router import (
    RouteError,
    Router,
    bundle_files,
    load_router,
    router_parameters,
)
from benchroute.artifacts.specs import RouterSpec, Selection
from benchroute.artifacts.stages.fit import FitOptions
from benchroute.flows.cli import main as cli
from benchroute.flows.publish import publish_store
from benchroute.transforms.evaluate import BenchmarkArrays
from benchroute.transforms.router_fit import fit_router


@pytest.fixture(scope="module")
def published(embedded_sample_store):
    result = publish_store(embedded_sample_store, "sample")
    return embedded_sample_store, result


def test_publish_is_self_describing_and_idempotent(published):
    store, first = published
    assert first["created"]
    again = publish_store(store, "sample")
    assert not again["created"] and again["version"] == first["version"]
    m = open_bundle(store, "sample").manifest
    assert m["embedder"]["name"] and m["embedder"]["dim"] == 384 and len(m["embedder"]["weights_hash"]) >= 12
    assert any("exact_match" in json.dumps(r) for r in m["binarization_rules"])
    assert m["sources"] and all(s["fingerprint"] for s in m["sources"])
    assert m["parameters"]["k"] == 10 and m["parameters"]["bandwidth"] > 0
    assert "mmlu_pro" in m["evaluation"]
    assert {f.rsplit(".", 1)[1] for f in m["files"]} <= {"npy", "parquet", "json"}
    # the specs it was built from, whole, and valid as specs again
    assert m["spec"] == {"selection": Selection().to_dict(), "router": RouterSpec().to_dict()}
    assert RouterSpec.model_validate(m["spec"]["router"]) == RouterSpec()


def test_route_and_score_task_from_embeddings(published):
    store, _ = published
    router = load_router(store, "sample")
    X = router.knn.X_[:20]
    choice = router.route(X[0])
    assert choice["model"] in router.model_names and choice["bundle_version"] == router.version
    rows = router.score_task(X)
    assert {r["model"] for r in rows} == set(router.model_names)
    assert all(0 <= r["coverage"] <= 1 for r in rows)
    best = rows[0]
    assert best["coverage"] >= 0.5 and best["S3"] is not None


def test_route_restricted_to_models_and_budget(published):
    store, _ = published
    router = load_router(store, "sample")
    x = router.knn.X_[0]
    allowed = ["meta/llama-3-8b", "meta/llama-3-70b"]
    assert router.route(x, models=allowed)["model"] in allowed
    small = router.route(x, max_params_b=10)
    size = next(m.params_b for m in router.models if m.model == small["model"])
    assert size is not None and size <= 10
    with pytest.raises(RouteError, match="unknown models"):
        router.route(x, models=["no-such-model"])
    with pytest.raises(RouteError, match="columns"):
        router.route(np.zeros(7))


def _small_router() -> Router:
    """A router over three models of known size (7, 8 and 70 B) and one of unknown size, built
    in memory from a tiny benchmark (no sample, no embedder): the filters are all it tests."""
    rng = np.random.default_rng(0)
    sizes = {"small": 7.0, "mid": 8.0, "big": 70.0, "unsized": None}
    ids = [f"{i:032x}" for i in range(24)]
    labels = pl.DataFrame(
        [(iid, f"d{i % 3}", m, int(rng.random() < 0.5))
         for i, iid in enumerate(ids) for m in sizes],
        schema=["input_id", "dataset", "model", "y"], orient="row",
    ).with_columns(value=pl.col("y").cast(pl.Float64))
    memberships = labels.select("input_id", "dataset").unique()
    models = pl.DataFrame({"model": list(sizes), "params_b": list(sizes.values())},
                          schema={"model": pl.String, "params_b": pl.Float64})
    bench = BenchmarkArrays.from_frames(rng.normal(size=(24, 8)).astype(np.float32), ids, labels,
                                        memberships, models)
    fit = fit_router(bench, k=3, predictor="knn")
    files = bundle_files(fit, [{"model": m, "params_b": b} for m, b in sizes.items()])
    manifest = {"name": "small", "version": "test", "parameters": router_parameters(fit)}
    return Router(VerifiedBundle("memory://small", manifest, files))


def test_size_bound_is_inclusive():
    router = _small_router()
    x = router.knn.X_[0]
    # A bound equal to a model's size allows it, alone or among others.
    assert router.route(x, models=["small"], max_params_b=7.0)["model"] == "small"
    assert router.route(x, models=["small", "big"], max_params_b=7.0)["model"] == "small"
    assert [r["model"] for r in router.score_task(x[None, :], max_params_b=7.0)] == ["small"]
    assert {r["model"] for r in router.score_task(x[None, :], max_params_b=8.0)} == {"small", "mid"}
    # Just below it, nothing is left; an unknown size never passes a size bound.
    with pytest.raises(RouteError, match="filters"):
        router.route(x, max_params_b=6.99)
    with pytest.raises(RouteError, match="filters"):
        router.route(x, models=["unsized"], max_params_b=1e6)


def test_budget_filter_on_real_prices(published):
    store, _ = published
    router = load_router(store, "sample")
    x = router.knn.X_[0]
    costs = dict(zip(router.model_names, router.expected_costs(np.array([router.settings["typical_input_tokens"]]))[0]))
    priced = sorted(c for c in costs.values() if c == c)
    assert len(priced) >= 10, "the sample's cards price most models"
    budget = priced[len(priced) // 3]
    choice = router.route(x, max_cost=budget)
    assert choice["expected_cost_usd"] is not None and choice["expected_cost_usd"] <= budget
    assert all(c["expected_cost_usd"] <= budget for c in choice["candidates"])
    # The bound is inclusive: the cheapest model alone fits a budget equal to its cost.
    cheapest = min((c, m) for m, c in costs.items() if c == c)
    assert router.route(x, max_cost=cheapest[0], models=[cheapest[1]])["model"] == cheapest[1]
    with pytest.raises(RouteError, match="filters"):
        router.route(x, max_cost=priced[0] / 2)


def test_cost_aware_operating_points(published):
    store, _ = published
    router = load_router(store, "sample")
    assert router.curve, "the bundle carries its measured cost–quality curve"
    X = router.knn.X_[::25]
    spend = {}
    for opts in ({}, {"lam": 0.0}, {"max_cost_share": 0.3}, {"lam": 50.0}, {"delta": 0.2}):
        answers = [router.route(x, **opts) for x in X]
        spend[str(opts)] = np.nanmean([a["expected_cost_usd"] or np.nan for a in answers])
        if opts:  # a cost-aware request picks a priced model
            assert all(a["expected_cost_usd"] is not None for a in answers)
    assert spend["{'lam': 50.0}"] <= spend["{'max_cost_share': 0.3}"] <= spend["{'lam': 0.0}"]
    point = router.route(X[0], max_cost_share=0.3)["operating_point"]
    chosen = [p for p in router.curve if p.rule == point["rule"] and p.value == point["value"]]
    assert chosen and chosen[0].cost_share <= 0.3
    with pytest.raises(RouteError, match="at most one"):
        router.route(X[0], lam=0.1, delta=0.1)
    unpriced = [m.model for m in router.models if m.usd_per_1m_input is None]
    assert unpriced
    with pytest.raises(RouteError, match="need prices"):
        router.route(X[0], models=unpriced[:3], lam=0.1)
    assert router.route(X[0], models=unpriced[:3])["model"] in unpriced  # quality only: fine
    rows = router.score_task(router.knn.X_[:40], lam=1e3)
    covered = [r for r in rows if r["coverage"] >= 0.5 and r["expected_cost_usd"] is not None]
    assert rows[0]["expected_cost_usd"] == min(r["expected_cost_usd"] for r in covered)


def test_route_raw_text_uses_the_bundle_embedder(published):
    store, _ = published
    router = load_router(store, "sample")
    # A real MMLU-Pro-style question: the chosen model has labelled neighbours for it.
    choice = router.route("Which of the following is a prime number?\nA. 21\nB. 23\nC. 25\nD. 27")
    assert choice["g"] is not None


def test_float16_index_keeps_routing_decisions(embedded_sample_store):
    r16 = publish_store(embedded_sample_store, "f16", FitOptions(router=RouterSpec(index_dtype="float16"), evaluate=False))
    r32 = publish_store(embedded_sample_store, "f32", FitOptions(router=RouterSpec(index_dtype="float32"), evaluate=False))
    a, b = load_router(embedded_sample_store, "f16"), load_router(embedded_sample_store, "f32")
    X = b.knn.X_[::7]
    same = np.mean([a.route(x)["model"] == b.route(x)["model"] for x in X])
    assert same >= 0.95
    assert r16["bytes"] < r32["bytes"]


def test_cli_publish_list_route(embedded_sample_store, capsys, tmp_path):
    assert cli(["publish", "--store", embedded_sample_store, "--name", "cli", "--no-evaluate"]) == 0
    assert "bundle:" in capsys.readouterr().out
    assert cli(["bundles", "list", "--store", embedded_sample_store, "--name", "cli"]) == 0
    assert "latest" in capsys.readouterr().out
    tasks = tmp_path / "tasks.jsonl"
    tasks.write_text(json.dumps({"id": "t", "texts": ["What is 2 + 2?", "Name a prime."]}) + "\n")
    assert cli(["route", "--bundle", embedded_sample_store, "--name", "cli", "--file", str(tasks)]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["id"] == "t" and out["choice"]
    assert cli(["route", "--bundle", embedded_sample_store, "--name", "cli", "--max-cost-share", "0.5",
                "What is 2 + 2?"]) == 0
    answer = json.loads(capsys.readouterr().out)
    assert answer["operating_point"]["rule"] in ("utility", "within_delta") and answer["expected_cost_usd"]
    assert cli(["route", "--bundle", embedded_sample_store, "--name", "cli", "--max-cost-share", "1e-9",
                "What is 2 + 2?"]) == 2
    assert "no measured point" in capsys.readouterr().err
    assert BundleStore(embedded_sample_store).ref("cli") is not None
