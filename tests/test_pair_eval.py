"""The pair-router evaluation driver on a real store (the MMLU-Pro evaluation fixture): trains on
everything but the held-out datasets, reports APGR/CPT per router, calibration, and a report."""

from pathlib import Path

import numpy as np
import polars as pl
import pytest

from benchroute.artifacts.embeddings import vectors_frame, write_part
from benchroute.artifacts.store import Store
from benchroute.schemas.embeddings import EmbedderIdentity
from benchroute.transforms import pair_metrics as pm
from benchroute.transforms.pair_eval import evaluate_pair, load_store_data, near_duplicates, write_pair_report
from benchroute.transforms.pair_labels import PairError

FIX = Path(__file__).parent / "fixtures" / "eval"
STRONG, WEAK = "openai/gpt-4o-2024-05-13", "meta/llama-2-70b"
ROUTERS = {
    "sw_ranking": ("sw_ranking", {}),
    "mf": ("mf", {"dim": 16, "max_epochs": 8, "patience": 2, "lr": 1e-2}),
    "diff_knn": ("diff", {"predictor": "knn", "predictor_params": {"n_neighbors": 10}}),
    "random": ("random", {}),
    "oracle": ("oracle", {}),
}


@pytest.fixture(scope="module")
def store_url(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("pairstore") / "store"
    store = Store(str(root))
    store.commit(append={"labels": pl.read_parquet(FIX / "labels.parquet"),
                         "memberships": pl.read_parquet(FIX / "memberships.parquet")})
    ids = pl.read_parquet(FIX / "inputs.parquet")["input_id"].to_list()
    X = np.load(FIX / "embeddings.npy").astype(np.float32)
    ident = EmbedderIdentity("all-MiniLM-L6-v2", X.shape[1], "ab" * 32)
    write_part(store, ident, vectors_frame(ident, ids, X), precision="fp32")
    return str(root)


def test_evaluate_pair_on_a_held_out_dataset(store_url, tmp_path):
    data, X = load_store_data(store_url)
    assert X.shape == (len(data.input_ids), 384) and len(data.models) == 28
    res = evaluate_pair(data, X, STRONG, WEAK, ["mmlu_pro/law", "mmlu_pro/history"], routers=ROUTERS,
                        n_boot=100, max_models=8, name="law+history")
    info = res.info
    assert info["n_test"] == 80 and info["n_train"] + info["n_calibration"] + info["n_near_duplicates_dropped"] == 120
    assert info["models"][:2] == [STRONG, WEAK] and len(info["models"]) == 8
    s = res.summary
    assert s["router"].to_list() == list(ROUTERS)
    for col in ("apgr", "apgr_lo", "apgr_hi", "cpt50", "cpt80", "cpt50_lo", "cpt80_hi", "share_error_stored_mean",
                "share_error_recalibrated_max"):
        assert col in s.columns
    oracle = s.filter(pl.col("router") == "oracle").row(0, named=True)
    assert oracle["apgr"] == pytest.approx(info["oracle_apgr_analytic"], abs=1e-9)
    assert oracle["apgr"] == pytest.approx(pm.oracle_apgr_binary(info["p_strong_only"], info["p_weak_only"]))
    rnd = s.filter(pl.col("router") == "random").row(0, named=True)
    assert rnd["apgr_lo"] <= 0.5 <= rnd["apgr_hi"]
    # A recalibrated threshold meets the target on the queries it was computed on.
    assert s["share_error_recalibrated_max"].max() <= 0.02
    # 19 target shares per router; the RouteLLM curve has 11 points.
    assert res.calibration.height == 19 * len(ROUTERS)
    assert res.curves.filter(pl.col("router") == "mf").height == 11
    # Deterministic.
    again = evaluate_pair(data, X, STRONG, WEAK, ["mmlu_pro/law", "mmlu_pro/history"], routers=ROUTERS,
                          n_boot=100, max_models=8, name="law+history")
    assert again.summary.drop("fit_s", "predict_s").equals(s.drop("fit_s", "predict_s"))
    paths = write_pair_report(str(tmp_path / "report"), [res], meta={"store": store_url})
    html = Path(paths["pair_report.html"]).read_text()
    assert "data:image/png;base64," in html and "law+history" in html
    assert pl.read_parquet(paths["pair_table.parquet"]).height == len(ROUTERS)


def test_held_out_inputs_never_train_and_near_duplicates_are_dropped(store_url):
    data, X = load_store_data(store_url)
    Xd = X.copy()
    held = data.in_datasets(["mmlu_pro/law"])
    # Make one training input a near copy of a held-out one: it must be dropped.
    i_train, i_test = int(np.flatnonzero(~held)[0]), int(np.flatnonzero(held)[0])
    Xd[i_train] = X[i_test] + 1e-3
    dup = near_duplicates(Xd[~held], Xd[held], 0.95)
    assert dup[0] and dup.sum() >= 1
    res = evaluate_pair(data, Xd, STRONG, WEAK, ["mmlu_pro/law"], routers={"random": ("random", {})}, n_boot=20)
    assert res.info["n_near_duplicates_dropped"] >= 1
    with pytest.raises(PairError):
        evaluate_pair(data, X, STRONG, WEAK, ["no_such/*"], routers={"random": ("random", {})})
    # RouteLLM's augmentation protocol: a share of the held-out benchmark trains, the rest tests.
    aug = evaluate_pair(data, X, STRONG, WEAK, ["mmlu_pro/law"], routers={"random": ("random", {})}, n_boot=20,
                        augment=0.25)
    assert aug.info["n_augment"] == 10 and aug.info["n_test"] == 30
