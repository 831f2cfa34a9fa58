"""Strong/weak pair routers in a published bundle (issue 14, item 5): the bundle built from a real
store carries them (JSON / .npy / Parquet, hash-covered), the loaded router answers the same
decisions the builder calibrated, and the CLI's ``route --strong/--weak`` and ``calibrate``
answer from the bundle."""

from __future__ import annotations

import json

import numpy as np
import pytest
from benchroute.artifacts.bundle import open_bundle
from benchroute.artifacts.router import RouteError, load_router
from benchroute.artifacts.router_build import pair_list, served_index
from benchroute.artifacts.specs import RouterSpec
from benchroute.artifacts.stages.fit import FitOptions
from benchroute.flows.cli import main as cli
from benchroute.flows.publish import publish_store
from benchroute.transforms.pair_calibration import share_at
from benchroute.transforms.pair_routers import query_keys

GPT4 = "openai/gpt-4-1106-preview"
MIXTRAL = "mistralai/mixtral-8x7b-instruct-v0.1"


@pytest.fixture(scope="module")
def pair_bundle(embedded_sample_store):
    result = publish_store(embedded_sample_store, "pairs",
                           FitOptions(router=RouterSpec(pairs=[f"{GPT4},{MIXTRAL}"]), evaluate=False))
    return embedded_sample_store, result


def test_pair_list_orders_pairs_among_models_by_accuracy():
    models = ["a/x", "b/y", "c/z"]
    assert pair_list(models, ["a/x,b/y"]) == [("a/x", "b/y")]
    among = pair_list(models, None, ["a/x", "b/y", "c/z"], train_acc=[0.5, 0.9, 0.7])
    assert among == [("b/y", "c/z"), ("b/y", "a/x"), ("c/z", "a/x")]
    assert pair_list(models, [("a/x", "b/y")], ["a/x", "b/y"], train_acc=[0.9, 0.1]) == [("a/x", "b/y")]
    with pytest.raises(ValueError, match="two different"):
        pair_list(models, ["a/x,a/x"])


def test_bundle_carries_pair_routers_without_pickles(pair_bundle):
    store, _ = pair_bundle
    b = open_bundle(store, "pairs")
    pair_files = [rel for rel in b.files if rel.startswith("pairs/")]
    assert "pairs/settings.json" in pair_files and "pairs/calibration.parquet" in pair_files
    assert {rel.rsplit(".", 1)[1] for rel in pair_files} <= {"npy", "json", "parquet"}
    # The similarity-weighted router reads the bundle's index, not a second copy of it.
    assert not any(rel.startswith("pairs/sw_ranking/X_") for rel in pair_files)
    # MT-Bench's judge scores are the compared quality, not the 0/1 labels: stored beside them.
    assert "pairs/quality.npy" in pair_files
    params = b.manifest["parameters"]["pairs"]
    assert params["pairs"] == [[GPT4, MIXTRAL]] and params["default_router"] in params["routers"]
    assert all(rel in b.manifest["files"] for rel in pair_files)


def test_loaded_router_answers_what_was_calibrated(pair_bundle):
    store, _ = pair_bundle
    router = load_router(store, "pairs")
    cal = [r for r in router.pairs.calibration if r["router"] == router.pairs.default_router]
    rows = np.setdiff1d(np.arange(len(router.knn.X_)), router.pairs.fit_rows)
    X = router.knn.X_[rows]
    for name in router.pairs.routers:
        p = router.pairs.scores(X, GPT4, MIXTRAL, router=name)
        assert np.all((p >= 0) & (p <= 1)), name
    # The stored (α, τ) of each target share gives that share on the calibration rows it was
    # computed on — through the loaded bundle (float16 index read back), not the builder.
    p = router.pairs.scores(X, GPT4, MIXTRAL)
    for r in cal:
        if r["strong"] == GPT4:
            assert share_at(p, r["alpha"], r["tau"], query_keys(X)) == pytest.approx(r["share"], abs=1e-9)
    out = router.route(X[0], strong=GPT4, weak=MIXTRAL, strong_share=0.5)
    assert out["model"] in (GPT4, MIXTRAL) and out["decision"] in ("strong", "weak")
    assert out["bundle_version"] == router.version
    again = router.route(X[0], strong=GPT4, weak=MIXTRAL, threshold=out["win_probability"] - 1e-9)
    assert again["decision"] == "strong"
    assert router.route(X[0], strong=GPT4, weak=MIXTRAL, threshold=1.0)["decision"] == "weak"


def test_pair_requests_are_checked(pair_bundle):
    store, _ = pair_bundle
    router = load_router(store, "pairs")
    x = router.knn.X_[0]
    with pytest.raises(RouteError, match="exactly one"):
        router.route(x, strong=GPT4, weak=MIXTRAL)
    with pytest.raises(RouteError, match="takes no lam"):
        router.route(x, strong=GPT4, weak=MIXTRAL, strong_share=0.5, lam=1.0)
    with pytest.raises(RouteError, match="unknown model"):
        router.route(x, strong="no/such-model", weak=MIXTRAL, threshold=0.5)
    with pytest.raises(RouteError, match="need strong and weak"):
        router.route(x, strong_share=0.5)
    with pytest.raises(RouteError, match="both strong and weak"):
        router.route(x, strong=GPT4, strong_share=0.5)
    with pytest.raises(RouteError, match="no stored calibration"):  # the reverse pair was not built
        router.route(x, strong=MIXTRAL, weak=GPT4, strong_share=0.5)


def test_bundle_without_pairs_says_so(embedded_sample_store):
    result = publish_store(embedded_sample_store, "nopairs", FitOptions(evaluate=False))
    router = load_router(embedded_sample_store, "nopairs")
    assert router.pairs is None and "pairs" not in open_bundle(embedded_sample_store, "nopairs").manifest[
        "parameters"]
    with pytest.raises(RouteError, match="no pair routers"):
        router.route(router.knn.X_[0], strong=GPT4, weak=MIXTRAL, strong_share=0.5)
    assert result["created"]


def test_served_index_is_what_the_loaded_router_holds(pair_bundle):
    store, _ = pair_bundle
    router = load_router(store, "pairs")
    X16 = open_bundle(store, "pairs").npy("index/embeddings.npy")
    np.testing.assert_array_equal(served_index(X16, "float16"), router.knn.X_)


def test_cli_routes_a_pair_and_recalibrates_on_a_users_queries(pair_bundle, tmp_path, capsys):
    store, _ = pair_bundle
    q = "What is the derivative of x squared?"
    assert cli(["route", "--bundle", store, "--name", "pairs", "--strong", GPT4, "--weak", MIXTRAL,
                "--strong-share", "0.3", q]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["strong"] == GPT4 and out["model"] in (GPT4, MIXTRAL) and 0 <= out["win_probability"] <= 1
    queries = tmp_path / "mine.jsonl"
    texts = [f"Question {i}: how many apples are left if I eat {i} of {i + 7}?" for i in range(30)]
    texts += [f"Explain the history of topic number {i} in economics." for i in range(30)]
    queries.write_text("\n".join(json.dumps(t if i % 2 else {"text": t}) for i, t in enumerate(texts)) + "\n")
    assert cli(["calibrate", "--bundle", store, "--name", "pairs", "--queries", str(queries), "--strong", GPT4,
                "--weak", MIXTRAL, "--share", "0.2", "--share", "0.5", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["target_share"] for r in rows] == [0.2, 0.5]
    for r in rows:  # the user's own threshold gives their target share on their queries
        assert abs(r["share"] - r["target_share"]) <= 1 / 60 + 1e-9
        assert r["stored_share"] is not None and 0 <= r["stored_share"] <= 1
    bad = tmp_path / "bad.jsonl"
    bad.write_text('"ok"\n{"text": 3}\n')
    assert cli(["calibrate", "--bundle", store, "--name", "pairs", "--queries", str(bad), "--strong", GPT4,
                "--weak", MIXTRAL]) == 2
    assert "line 2" in capsys.readouterr().err


def test_http_route_and_calibrate_a_pair(pair_bundle):
    from benchroute.artifacts.service import create_app
    from fastapi.testclient import TestClient

    store, _ = pair_bundle
    router = load_router(store, "pairs")
    x = router.knn.X_[5].tolist()
    with TestClient(create_app(store, "pairs", poll_seconds=60, warm=False)) as client:
        r = client.post("/v1/route", json={"embedding": x, "strong": GPT4, "weak": MIXTRAL, "strong_share": 0.4})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body == router.route(np.array(x), strong=GPT4, weak=MIXTRAL, strong_share=0.4)
        r = client.post("/v1/route", json={"text": "What is 17 times 23?", "strong": GPT4, "weak": MIXTRAL,
                                           "threshold": 0.5})
        assert r.status_code == 200 and r.json()["threshold"] == 0.5
        # Refused: a share outside [0, 1], a pair request with a cost option, a half pair.
        assert client.post("/v1/route", json={"embedding": x, "strong": GPT4, "weak": MIXTRAL,
                                              "strong_share": 1.5}).status_code == 422
        assert client.post("/v1/route", json={"embedding": x, "strong": GPT4, "weak": MIXTRAL,
                                              "strong_share": 0.5, "lambda": 1.0}).status_code == 400
        assert client.post("/v1/route", json={"embedding": x, "weak": MIXTRAL, "threshold": 0.5}).status_code == 400
        emb = router.knn.X_[:40].tolist()
        r = client.post("/v1/calibrate", json={"embeddings": emb, "strong": GPT4, "weak": MIXTRAL,
                                               "shares": [0.25, 0.5]})
        assert r.status_code == 200, r.text
        rows = r.json()["thresholds"]
        assert rows == router.calibrate_pair(np.array(emb), strong=GPT4, weak=MIXTRAL, shares=[0.25, 0.5])
        assert [abs(x["share"] - x["target_share"]) <= 1 / 40 + 1e-9 for x in rows] == [True, True]
        assert client.post("/v1/calibrate", json={"embeddings": emb, "strong": GPT4}).status_code == 422


def test_pairs_report_writes_the_pgr_plot_and_table(embedded_sample_store, tmp_path, capsys):
    out = tmp_path / "report"
    assert cli(["pairs-report", "--store", embedded_sample_store, "--out", str(out), "--pair", f"{GPT4},{MIXTRAL}",
                "--heldout", "gsm8k", "--router", "random", "--router", "oracle", "--n-boot", "30"]) == 0
    page = (out / "pair_report.html").read_text()
    assert "data:image/png;base64," in page and "PGR" in page
    import polars as pl

    table = pl.read_parquet(out / "pair_table.parquet")
    apgr = dict(zip(table["router"], table["apgr"]))
    assert apgr["oracle"] > apgr["random"]
    assert "gsm8k-gpt-4-1106-preview-vs-mixtral-8x7b-instruct-v0.1" in capsys.readouterr().out
    assert cli(["pairs-report", "--store", embedded_sample_store, "--out", str(out), "--pair", f"{GPT4},{MIXTRAL}",
                "--heldout", "gsm8k", "--router", "no-such-router"]) == 2
