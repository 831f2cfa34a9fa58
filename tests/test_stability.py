"""Leaderboard and router stability (issue 15): τ against scipy, RStd and rank intervals on
hand-made cases, the exact kNN bootstrap, the router's choices, and the store-level tables."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest
from scipy.stats import kendalltau

from benchroute.schemas import validate
from benchroute.transforms import stability as st
from benchroute.transforms.knn import Neighbors, aggregate_labels, cosine_topk, normalize_rows
from benchroute.transforms.selection import choose_rows
from benchroute.transforms.stability_summary import (
    format_tables,
    positions_from_outcomes,
    ranking_tables,
    rstd_table,
    variant_sets,
)


# ---------------------------------------------------------------------------- Kendall τ-b
@pytest.mark.parametrize("levels", [2, 3, 5, 1000])
def test_kendall_tau_b_matches_scipy_with_ties(levels):
    rng = np.random.default_rng(levels)
    ref = rng.integers(0, levels, 12).astype(float)
    R = rng.integers(0, levels, (40, 12)).astype(float)
    R[0] = ref  # identical
    R[1] = -ref  # reversed
    got = st.kendall_tau_b_rows(ref, R)
    for b in range(R.shape[0]):
        want = kendalltau(ref, R[b], variant="b").statistic
        if np.isnan(want):
            assert np.isnan(got[b])
        else:
            assert got[b] == pytest.approx(want, abs=1e-12)


def test_kendall_tau_b_nan_pairs_are_left_out_and_constant_is_nan():
    x = np.array([0.1, 0.5, np.nan, 0.3, 0.9])
    y = np.array([0.2, 0.4, 0.7, np.nan, 0.8])
    ok = ~np.isnan(x) & ~np.isnan(y)
    assert st.kendall_tau_b(x, y) == pytest.approx(kendalltau(x[ok], y[ok]).statistic)
    assert np.isnan(st.kendall_tau_b([1, 2, 3], [5, 5, 5]))


# ---------------------------------------------------------------------------- ranks
def test_competition_ranks_share_the_better_rank_and_best_shares_split_ties():
    A = np.array([[0.5, 0.9, 0.9, 0.1], [0.3, np.nan, 0.2, 0.3]])
    assert st.competition_ranks(A)[0].tolist() == [3, 1, 1, 4]
    r1 = st.competition_ranks(A)[1]
    assert r1[[0, 2, 3]].tolist() == [1, 3, 1] and np.isnan(r1[1])
    assert st.best_shares(A).tolist() == [[0, 0.5, 0.5, 0], [0.5, 0, 0, 0.5]]


def test_complete_case_drops_low_coverage_models_then_incomplete_inputs():
    Y = np.array([[1, 0, np.nan], [1, 1, np.nan], [0, np.nan, np.nan], [1, 1, 1.0]])
    cc = st.complete_case(Y, min_coverage=0.6)
    assert cc.models.tolist() == [0, 1] and cc.dropped.tolist() == [2]
    assert cc.rows.tolist() == [0, 1, 3]


# ---------------------------------------------------------------------------- bootstrap
def test_bootstrap_counts_are_deterministic_and_stratified():
    strata = np.array([0] * 7 + [1] * 3)
    W = st.bootstrap_counts(10, 50, 3, strata)
    assert W.shape == (50, 10)
    assert (W[:, :7].sum(1) == 7).all() and (W[:, 7:].sum(1) == 3).all()
    assert np.array_equal(W, st.bootstrap_counts(10, 50, 3, strata))
    assert not np.array_equal(W, st.bootstrap_counts(10, 50, 4, strata))


def test_weighted_means_skip_missing_labels():
    Y = np.array([[1, np.nan], [0, 1], [1, 0]])
    W = np.array([[1, 1, 1], [0, 2, 0], [1, 0, 0]], float)
    got = st.weighted_means(Y, W)
    assert got[0].tolist() == pytest.approx([2 / 3, 0.5])
    assert got[1].tolist() == [0.0, 1.0]
    assert got[2, 0] == 1.0 and np.isnan(got[2, 1])


def test_rank_intervals_on_hand_made_cases():
    n = 200
    Y = np.zeros((n, 4))
    Y[:, 0] = 1  # always right: rank 1 in every resample
    Y[: n // 2, 1] = 1  # 0.5
    Y[: n // 2, 2] = 1  # the same labels as model 1: tied in every resample
    Y[:10, 3] = 1  # 0.05: last in every resample
    rs = st.ranking_stability(Y, ["a", "b", "c", "d"], B=300, seed=1)
    assert rs.rank.tolist() == [1, 2, 2, 4]
    assert rs.rank_lo.tolist() == [1, 2, 2, 4] and rs.rank_hi.tolist() == [1, 2, 2, 4]
    assert rs.p_best.tolist() == [1, 0, 0, 0]
    assert np.allclose(rs.tau, 1.0)
    assert rs.acc_lo[1] < 0.5 < rs.acc_hi[1] and rs.acc_lo[0] == rs.acc_hi[0] == 1
    rows = rs.rows()
    assert [r["model"] for r in rows] == ["a", "b", "c", "d"]


def test_close_models_get_wide_rank_intervals_and_split_p_best():
    rng = np.random.default_rng(0)
    Y = (rng.random((60, 3)) < [0.50, 0.52, 0.9]).astype(float)
    Y[:, 0], Y[:, 1] = Y[:, 1].copy(), Y[:, 0].copy()  # whatever the draw, two are close
    rs = st.ranking_stability(Y, ["x", "y", "z"], B=500, seed=0)
    assert rs.rank_lo[:2].min() == 2 and rs.rank_hi[:2].max() == 3
    assert rs.p_best[2] > 0.99 and abs(rs.p_best.sum() - 1) < 1e-9
    assert rs.summary()["tau_mean"] < 1.0


# ---------------------------------------------------------------------------- variants
def test_compare_variant_deltas_tau_and_moves():
    Yo = np.array([[1, 1, 0], [1, 0, 0], [1, 1, 1], [0, 0, 0]], float)  # acc .75 .5 .25
    Yv = np.array([[0, 1, 1], [0, 0, 1], [1, 1, 1], [0, 1, 0]], float)  # acc .25 .75 .75
    vc = st.compare_variant(Yo, Yv, ["a", "b", "c"], "v")
    assert vc.delta.tolist() == pytest.approx([-0.5, 0.25, 0.5])
    assert vc.rank_original.tolist() == [1, 2, 3] and vc.rank_variant.tolist() == [3, 1, 1]
    assert vc.rank_move.tolist() == [2, -1, -2]
    assert vc.tau == pytest.approx(kendalltau([0.75, 0.5, 0.25], [0.25, 0.75, 0.75]).statistic)
    s = vc.summary()
    assert s["max_rank_move"] == 2 and s["max_mover"] == "a" and s["best_variant"] == "b"


def test_compare_variant_uses_only_items_both_versions_label():
    Yo = np.array([[1, 0], [1, 0], [np.nan, 1]])
    Yv = np.array([[1, 1], [np.nan, 0], [0, 1]])
    vc = st.compare_variant(Yo, Yv, ["a", "b"], "v", min_coverage=0.3)
    assert st.compare_variant(Yo, Yv, ["a", "b"], "v", min_coverage=0.5).dropped == ["a"]
    assert vc.n_items == 1 and vc.acc_original.tolist() == [1, 0] and vc.acc_variant.tolist() == [1, 1]


# ---------------------------------------------------------------------------- RStd
def test_rstd_on_hand_made_cases():
    gold = np.repeat(np.arange(4), 5)
    perfect = st.rstd(gold, gold)
    assert perfect.rstd == 0 and perfect.acc == 1
    always_a = st.rstd(gold, np.zeros(20))  # recall [1, 0, 0, 0]
    assert always_a.recall.tolist() == [1, 0, 0, 0]
    assert always_a.rstd == pytest.approx(np.std([1, 0, 0, 0]))  # = sqrt(3)/4
    assert always_a.pred_share.tolist() == [1, 0, 0, 0]
    # recalls .8 .6 .4 .2: misses at positions 1..3 go to A
    pred = gold.copy()
    for j, miss in ((0, 1), (1, 2), (2, 3), (3, 4)):
        pred[np.flatnonzero(gold == j)[:miss]] = (j + 1) % 4
    r = st.rstd(gold, pred)
    assert r.recall.tolist() == pytest.approx([0.8, 0.6, 0.4, 0.2])
    assert r.rstd == pytest.approx(np.std([0.8, 0.6, 0.4, 0.2]))


def test_rstd_unanswered_is_a_miss_and_empty_positions_are_skipped():
    gold = np.array([0, 0, 2, 2])  # nobody's gold is B
    r = st.rstd(gold, np.array([0, -1, 2, np.nan]), n_positions=3)
    assert r.recall[0] == 0.5 and np.isnan(r.recall[1]) and r.recall[2] == 0.5
    assert r.rstd == 0 and r.n_unanswered == 2 and r.acc == 0.5
    assert r.pred_share.tolist() == [0.5, 0, 0.5]
    assert np.isnan(st.rstd([1, 1], [1, 0]).rstd)  # one position: undefined
    with pytest.raises(ValueError):
        st.rstd([0, np.nan], [0, 0])


# ---------------------------------------------------------------------------- choices
def test_argmax_choices_is_the_served_tie_rule():
    rng = np.random.default_rng(2)
    S = rng.integers(0, 3, (200, 5)).astype(float) / 2
    S[rng.random(S.shape) < 0.1] = np.nan
    S[0] = np.nan
    tb = np.array([0.3, 0.9, 0.9, 0.1, np.nan])
    want = choose_rows(S, "train_acc", tb).argmax(axis=1)
    assert np.array_equal(st.argmax_choices(S, tb), want)
    assert np.array_equal(st.argmax_choices(S, np.broadcast_to(tb, S.shape)), want)


def test_choice_stability_generic_and_vectorised_agree():
    rng = np.random.default_rng(5)
    Y = (rng.random((80, 4)) < [0.6, 0.62, 0.3, 0.2]).astype(float)
    generic = st.choice_stability(lambda y: int(np.argmax(y.mean(0))), Y, B=100, seed=9)
    W = st.bootstrap_counts(80, 100, 9)
    fast = st.mean_score_choices(Y, W)
    assert generic.choice == fast.choice
    assert np.array_equal(generic.choices, fast.choices)
    assert 0 < fast.flip_rate < 1
    assert fast.shares(4).sum() == pytest.approx(1) and fast.shares(4)[2:].sum() == 0


def test_bootstrap_knn_scores_equal_a_search_on_the_resampled_index():
    rng = np.random.default_rng(0)
    X = normalize_rows(rng.normal(size=(40, 6)))
    Q = normalize_rows(rng.normal(size=(7, 6)))
    Y = (rng.random((40, 3)) < 0.5).astype(float)
    Y[rng.random(Y.shape) < 0.2] = np.nan
    k, K = 4, 40
    nb = cosine_topk(Q, X, K)
    ones = np.ones((1, 40))
    full = st.bootstrap_knn_scores(nb.indices, Y, ones, k)[0]
    want = aggregate_labels(Neighbors(nb.indices[:, :k], nb.similarities[:, :k]), Y)
    assert np.allclose(full, want, equal_nan=True)
    counts = st.bootstrap_counts(40, 5, 1)
    got = st.bootstrap_knn_scores(nb.indices, Y, counts, k, fallback=np.array([9.0, 9, 9]))
    for b in range(5):
        rows = np.repeat(np.arange(40), counts[b].astype(int))
        nb_b = cosine_topk(Q, X[rows], k)  # the resampled index itself (copies in row order)
        g = aggregate_labels(Neighbors(rows[nb_b.indices], nb_b.similarities), Y,
                             fallback=np.array([9.0, 9, 9]))
        assert np.allclose(got[b], g, equal_nan=True)


# ---------------------------------------------------------------------------- router
def _clustered_inputs(rng, ids, X, n_datasets, per_dataset, spread, id_format):
    """``(dataset number, input number, input id)`` of ``per_dataset`` inputs around each of
    ``n_datasets`` random 8-d centres; each input's id and embedding are appended to ``ids`` and
    ``X`` before it is yielded, so the caller's draws from ``rng`` come between them as before."""
    for d in range(n_datasets):
        centre = rng.normal(size=8)
        for i in range(per_dataset):
            iid = id_format.format(d, i)
            ids.append(iid)
            X.append(centre + spread * rng.normal(size=8))
            yield d, i, iid


def _toy_bench():
    from benchroute.transforms.evaluate import BenchmarkArrays

    rng = np.random.default_rng(3)
    rows, ids, X = [], [], []
    skill = {"m0": [0.8, 0.3, 0.6, 0.5], "m1": [0.4, 0.7, 0.6, 0.55], "m2": [0.5, 0.5, 0.5, 0.5]}
    for d, _, iid in _clustered_inputs(rng, ids, X, 4, 30, 0.6, "{:02d}{:030d}"):
        for m, p in skill.items():
            rows.append({"input_id": iid, "dataset": f"src/d{d}", "model": m,
                         "y": int(rng.random() < p[d]), "value": 0.0})
    labels = pl.DataFrame(rows)
    memberships = labels.select("input_id", "dataset").unique().with_columns(source=pl.lit("src"))
    return BenchmarkArrays.from_frames(np.array(X, np.float32), ids, labels, memberships), labels


def test_router_stability_full_choices_are_the_evaluations():
    from benchroute.transforms.evaluate import EvalConfig, evaluate_lodo
    from benchroute.transforms.stability_router import router_stability, variant_arrays

    bench, labels = _toy_bench()
    cfg = EvalConfig(k=5, alphas=(0.0,), min_inputs=10)
    ev = evaluate_lodo(bench, cfg)
    flipped = labels.with_columns(y=1 - pl.col("y"))
    rs = router_stability(bench, cfg, B=30, seed=0,
                          variants={"same": variant_arrays(bench, labels),
                                    "flipped": variant_arrays(bench, flipped)})
    want = ev.per_task.filter(pl.col("ties") == "train_acc").select(
        pl.col("dataset").alias("task"), "method", pl.col("model").alias("want"))
    got = rs.tasks.join(want, on=["task", "method"])
    assert got.height == 4 * 5
    assert (got["model"] == got["want"]).all()
    assert (got["flip_same"] == 0).all()  # the variant equal to the labels changes nothing
    assert ((got["flip_task"] >= 0) & (got["flip_all"] <= 1)).all()
    assert rs.queries.height == 4 and (rs.queries["flip_same"] == 0).all()
    assert rs.models["queries_routed"].sum() == 4 * 30
    assert rs.tasks.filter(pl.col("method") == "Oracle")["flip_flipped"].sum() > 0


def test_evaluation_flip_rates_are_the_routers_task_resample_flips():
    """evaluate_lodo(stability_B) and router_stability share the task setup and the seeds: the
    per-choice flip_task (ties by training accuracy) equals the router table's flip_task."""
    from benchroute.transforms.evaluate import EvalConfig, evaluate_lodo
    from benchroute.transforms.stability_router import router_stability

    bench, _ = _toy_bench()
    cfg = EvalConfig(k=5, alphas=(0.0,), min_inputs=10)
    ev = evaluate_lodo(bench, cfg, stability_B=30)
    plain = evaluate_lodo(bench, cfg)
    assert ev.table1.equals(plain.table1)  # the flips add a column, change nothing else
    rs = router_stability(bench, cfg, B=30, seed=cfg.seed)
    got = ev.per_task.filter(pl.col("ties") == "train_acc").select(
        pl.col("dataset").alias("task"), "method", "flip_task")
    both = rs.tasks.select("task", "method", pl.col("flip_task").alias("want")).join(
        got, on=["task", "method"])
    assert both.height == 4 * 5
    assert np.allclose(both["flip_task"].to_numpy(), both["want"].to_numpy())
    bma = ev.per_task.filter(pl.col("method") == "BMA")["flip_task"]
    assert (bma == 0).all()
    assert ev.per_task.filter(pl.col("method") == "Random")["flip_task"].is_nan().all()


# ---------------------------------------------------------------------------- store tables
def _outcomes(rows):
    base = {"run_id": "r", "source": "src", "perturbation": None, "source_model": "x"}
    return pl.DataFrame([{**base, **r} for r in rows], schema_overrides={"perturbation": pl.String})


def test_variant_and_ranking_tables_on_a_small_store():
    rng = np.random.default_rng(1)
    rows = []
    for i in range(30):
        iid = f"{i:032x}"
        for j, m in enumerate(["a", "b", "c"]):
            strict = float(rng.random() < [0.8, 0.5, 0.2][j])
            loose = 1.0 if j == 2 else strict  # c gains everything under the loose rule
            rows += [
                {"input_id": iid, "dataset": "src/d", "model": m, "metric": "correct_rx", "value": strict},
                {"input_id": iid, "dataset": "src/d", "model": m, "metric": "correct", "value": loose},
                {"input_id": iid, "dataset": "src/d", "model": m, "metric": "output_chars", "value": 10.0},
            ]
    outcomes = _outcomes(rows)
    from benchroute.transforms.binarize import binarize

    labels = binarize(outcomes)
    memberships = outcomes.select("input_id", "dataset", "source").unique().with_columns(
        source_instance_id=pl.col("input_id"))
    sets = variant_sets(outcomes, labels, memberships)
    assert [(s.family, s.reference, sorted(s.frames)) for s in sets] == [
        ("metric", "metric:correct_rx", ["metric:correct", "metric:correct_rx"])]
    per_variant, per_model = format_tables(sets, memberships)
    assert per_variant.height == 1 and per_variant["best_variant"][0] == "c"
    assert per_model.filter(pl.col("model") == "c")["rank_move"][0] == -2
    models, scopes = ranking_tables(labels, memberships, B=100)
    assert scopes["scope"].to_list() == ["src/d"] and models.height == 3
    assert models["rank_lo"].min() >= 1 and (models["rank_lo"] <= models["rank"]).all()


def test_answer_positions_survive_the_outcomes_schema_and_give_rstd():
    rows = []
    for i in range(8):
        iid = f"{i:032x}"
        gold = i % 4
        for m, pred in (("biased", 0), ("fair", gold)):
            rows += [
                {"input_id": iid, "dataset": "src/mc", "model": m, "metric": "gold_position", "value": float(gold)},
                {"input_id": iid, "dataset": "src/mc", "model": m, "metric": "pred_position", "value": float(pred)},
            ]
    valid, bad = validate("outcomes", _outcomes(rows))
    assert bad.height == 0 and valid.height == len(rows)
    pos = positions_from_outcomes(valid)
    table = rstd_table(pos, min_gold=1).filter(pl.col("scope_kind") == "dataset")
    assert rstd_table(pos)["rstd"].is_nan().all()  # 2 gold answers per position: too few
    got = dict(zip(table["model"], table["rstd"]))
    assert got["fair"] == 0 and got["biased"] == pytest.approx(np.std([1, 0, 0, 0]))
    assert positions_from_outcomes(valid.filter(pl.col("metric") == "gold_position")) is None


def test_variant_names_pool_across_datasets():
    from benchroute.transforms.stability_summary import pool_key

    assert pool_key("art_score", "art_gpt_score") == pool_key("xst_score", "xst_gpt_score") == "metric:gpt_score"
    assert pool_key("correct_rx", "correct") == "metric:correct"
    assert pool_key("exact_match", "exact_match@5") == "metric:exact_match@5"
    assert pool_key("exact_match", "quasi_exact_match") == "metric:quasi_exact_match"


def test_stability_summary_driver_end_to_end_on_a_small_store():
    import json

    from benchroute.transforms.binarize import binarize
    from benchroute.transforms.stability_summary import stability_summary

    rng = np.random.default_rng(4)
    rows, ids, X = [], [], []
    for d, i, iid in _clustered_inputs(rng, ids, X, 3, 25, 0.5, "{:02d}{:030x}"):
        for j, m in enumerate(["a", "b", "c"]):
            y = float(rng.random() < [0.7, 0.5, 0.4][j])
            rows += [{"input_id": iid, "dataset": f"src/d{d}", "model": m, "metric": "correct_rx", "value": y},
                     {"input_id": iid, "dataset": f"src/d{d}", "model": m, "metric": "correct",
                      "value": y if rng.random() < 0.8 else 1 - y},
                     {"input_id": iid, "dataset": f"src/d{d}", "model": m, "metric": "gold_position",
                      "value": float(i % 4)},
                     {"input_id": iid, "dataset": f"src/d{d}", "model": m, "metric": "pred_position",
                      "value": float(i % 4 if y else 0)}]
    outcomes = _outcomes(rows)

    class Tables:
        def __init__(self, **t):
            self.t = t

        def read(self, name):
            return self.t[name]

    store = Tables(outcomes=outcomes, labels=binarize(outcomes), memberships=outcomes.select(
        "input_id", "dataset", "source").unique().with_columns(source_instance_id=pl.col("input_id")))
    s = stability_summary(store, B=50, embeddings=(np.array(X, np.float32), ids), router_B=20)
    assert s.ranking_scopes.filter(pl.col("scope_kind") == "group")["scope"].to_list() == ["src"]
    assert set(s.variants["scope_kind"]) == {"dataset", "group"}
    assert s.rstd.filter(pl.col("scope_kind") == "group").height == 3
    assert s.router_tasks["task"].n_unique() == 3 and "flip_metric_correct" in s.router_tasks.columns
    md = s.markdown()
    for title in ("Rankings per source group", "Format sensitivity", "Selection bias", "Task routing"):
        assert title in md
    manifest = json.loads(json.dumps(s.manifest()))
    assert manifest["groups"]["src"]["n_models"] == 3
    assert set(manifest["models"]) == {"a", "b", "c"} and "routing" in manifest["models"]["a"]
