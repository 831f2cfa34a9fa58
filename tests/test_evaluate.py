"""The LODO evaluation: selection and tie rules, the benchmark arrays, and end to end on real data."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl
import pytest
from scipy import stats

from benchroute.transforms.evaluate import (
    BenchmarkArrays,
    EvalConfig,
    evaluate_lodo,
    format_table1,
)
from benchroute.transforms.knn import KNNCorrectness
from benchroute.transforms.scores import binarized_accuracy
from benchroute.transforms.selection import (
    choice_metrics,
    choose,
    choose_rows,
    pearson,
    ranks,
    spearman,
)

FIXTURE = Path(__file__).parent / "fixtures" / "eval"


# ---------------------------------------------------------------- selection and tie rules
def test_choose_ties_in_expectation_and_by_training_accuracy():
    s = np.array([0.5, 0.7, 0.7, np.nan, 0.7 - 1e-12])
    np.testing.assert_allclose(choose(s, "expectation"), [0, 1 / 3, 1 / 3, 0, 1 / 3])
    train = np.array([0.9, 0.1, 0.3, 0.99, 0.3])
    # tied: models 1, 2, 4; best training accuracy 0.3 (2 and 4) -> first in order: 2
    np.testing.assert_allclose(choose(s, "train_acc", train), [0, 0, 1, 0, 0])
    np.testing.assert_allclose(choose(np.full(3, np.nan)), [1 / 3] * 3)


def test_choose_rows_per_input():
    G = np.array([[0.2, 0.8, 0.8], [1.0, 0.0, np.nan]])
    np.testing.assert_allclose(choose_rows(G, "expectation"), [[0, 0.5, 0.5], [1, 0, 0]])
    np.testing.assert_allclose(choose_rows(G, "train_acc", np.array([0.1, 0.2, 0.3])), [[0, 0, 1], [1, 0, 0]])


def test_ranks_share_the_best_rank():
    np.testing.assert_allclose(ranks(np.array([0.5, 0.9, 0.5, 0.1])), [2, 1, 2, 4])


def test_correlations_match_scipy():
    rng = np.random.default_rng(0)
    a, b = rng.random(12), rng.random(12)
    a[3] = a[5]  # a tie for the rank correlation
    assert pearson(a, b) == pytest.approx(stats.pearsonr(a, b).statistic)
    assert spearman(a, b) == pytest.approx(stats.spearmanr(a, b).statistic)
    assert np.isnan(pearson(np.ones(4), b[:4]))


def test_choice_metrics_by_hand():
    acc = np.array([0.6, 0.8, 0.4])
    w = np.array([0.5, 0.5, 0.0])
    m = choice_metrics(w, acc, w_bma=np.array([0, 1.0, 0]), params_b=np.array([7.0, np.nan, 70.0]),
                       scores=np.array([0.1, 0.2, 0.0]))
    assert m["acc"] == pytest.approx(0.7)
    assert m["ratio_to_best"] == pytest.approx(0.7 / 0.8)
    assert m["rank"] == pytest.approx(1.5)
    assert m["pct_bma"] == pytest.approx(0.5)
    assert m["params_b"] == pytest.approx(7.0)  # only the chosen models with a known size
    assert m["pearson"] == pytest.approx(1.0)


# ---------------------------------------------------------------- benchmark arrays
def _frames():
    ids = [f"{i:032x}" for i in range(4)]
    labels = pl.DataFrame(
        {
            "input_id": [ids[0], ids[0], ids[1], ids[1], ids[2], ids[3], ids[3], ids[3]],
            "dataset": ["a", "a", "a", "a", "b", "b", "c", "c"],
            "model": ["m1", "m2", "m1", "m2", "m1", "m1", "m1", "m2"],
            "y": [1, 0, 0, 1, 1, 1, 0, 1],
            "value": [1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 0.0, 1.0],
        }
    )
    memberships = pl.DataFrame({"input_id": ids + [ids[3]], "dataset": ["a", "a", "b", "b", "c"]})
    models = pl.DataFrame({"model": ["m1", "m2"], "params_b": [7.0, None]})
    emb = np.eye(4, 3, dtype=np.float32) + 0.1
    return emb, ids, labels, memberships, models


def test_benchmark_arrays_from_frames():
    emb, ids, labels, memberships, models = _frames()
    b = BenchmarkArrays.from_frames(emb, ids, labels, memberships, models)
    assert b.models == ["m1", "m2"] and b.datasets == ["a", "b", "c"]
    np.testing.assert_array_equal(b.member[3], [False, True, True])
    # input 3 is in b (m1 = 1) and c (m1 = 0, m2 = 1): training label = mean over its datasets
    np.testing.assert_allclose(b.Y[3], [0.5, 1.0])
    np.testing.assert_allclose(b.Y[2], [1.0, np.nan])
    np.testing.assert_allclose(b.params_b, [7.0, np.nan])
    assert b.dataset_rows[1].tolist() == [2, 3]
    np.testing.assert_allclose(b.dataset_y[1], [[1.0, np.nan], [1.0, np.nan]])
    assert b.complete_rows(0).tolist() == [0, 1] and b.complete_rows(1).size == 0
    assert b.row_groups[0] == b.row_groups[1] != b.row_groups[3]
    np.testing.assert_allclose(b.dataset_accuracy(), [[0.5, 0.5], [1.0, np.nan], [0.0, 1.0]])
    # leaving out input 3 (e.g. because it also sits in the held-out dataset)
    np.testing.assert_allclose(b.dataset_accuracy(exclude_rows=np.array([0, 0, 0, 1], bool)),
                               [[0.5, 0.5], [1.0, np.nan], [np.nan, np.nan]])
    with pytest.raises(ValueError, match="no embedding"):
        BenchmarkArrays.from_frames(emb[:3], ids[:3], labels, memberships)


def _synthetic(seed=0, n=300, D=5, M=4):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, 12)).astype(np.float32)
    ds = rng.integers(0, D, n)
    ids = [f"{i:032x}" for i in range(n)]
    recs = []
    for i in range(n):
        for m in range(M):
            y = int(rng.random() < 1 / (1 + np.exp(-(X[i, 0] * (m - 1.5) + 0.4 * m - 0.6))))
            recs.append((ids[i], f"d{ds[i]}", f"m{m}", float(y), y))
    labels = pl.DataFrame(recs, schema=["input_id", "dataset", "model", "value", "y"], orient="row")
    memberships = pl.DataFrame({"input_id": ids, "dataset": [f"d{d}" for d in ds]})
    # the first 6 inputs of d0 also belong to d1 (same text in two datasets)
    shared = [ids[i] for i in np.flatnonzero(ds == 0)[:6]]
    memberships = pl.concat([memberships, pl.DataFrame({"input_id": shared, "dataset": ["d1"] * 6})])
    return X, ids, labels, memberships


def test_held_out_inputs_are_never_neighbours_even_when_shared():
    X, ids, labels, memberships = _synthetic()
    b = BenchmarkArrays.from_frames(X, ids, labels, memberships)
    ev = evaluate_lodo(b, EvalConfig(k=5, alphas=(0.0,)))
    d1 = b.datasets.index("d1")
    local = b.complete_rows(d1)
    rows = b.dataset_rows[d1][local]
    train = ~b.member[:, d1]
    assert train.sum() == len(b.input_ids) - b.member[:, d1].sum()
    # the evaluation's p_true on d1 equals a predictor fitted on the non-d1 rows only
    knn = KNNCorrectness(5).fit(b.X[train], b.Y[train])
    G = knn.predict_proba(b.X[rows])
    got = ev.predictor.filter(pl.col("dataset") == "d1").sort("model")["p_true"].to_numpy()
    np.testing.assert_allclose(got, binarized_accuracy(G, b.dataset_y[d1][local]))
    # ... and that predictor never saw a shared input: none of the 6 is in its index
    shared_rows = np.flatnonzero(b.member[:, 0] & b.member[:, d1])
    assert shared_rows.size == 6 and not train[shared_rows].any()


def _bma_leak_case():
    """Models a and b; the held-out dataset "h" shares all its inputs with "t1".

    On the training data only (t1's own inputs, t2, t4, t5) a is the better model: t1 a 4/6 vs
    b 3/6, the others a 3/6 vs b 3/6. On h's six inputs (also in t1, labelled there too) b is
    right and a wrong, so counting them in t1 (t1: a 4/12 vs b 9/12) or counting h itself would
    make b the BMA.
    """
    rng = np.random.default_rng(0)
    recs, members = [], []

    def add(prefix, n, a_right, b_right, datasets):
        for i in range(n):
            iid = f"{prefix}{i:031x}"
            for d in datasets:
                members.append((iid, d))
                recs.append((iid, d, "a", int(i < a_right)))
                recs.append((iid, d, "b", int(i < b_right)))

    add("1", 6, 4, 3, ["t1"])
    for j in (2, 4, 5):  # neutral training datasets (the kernel needs a few)
        add(str(j), 6, 3, 3, [f"t{j}"])
    add("3", 6, 0, 6, ["h", "t1"])
    labels = pl.DataFrame(recs, schema=["input_id", "dataset", "model", "y"], orient="row")
    labels = labels.with_columns(value=pl.col("y").cast(pl.Float64))
    memberships = pl.DataFrame(members, schema=["input_id", "dataset"], orient="row")
    ids = sorted(labels["input_id"].unique().to_list())
    X = rng.normal(size=(len(ids), 8)).astype(np.float32)
    return BenchmarkArrays.from_frames(X, ids, labels, memberships)


def test_bma_never_counts_the_held_out_inputs():
    b = _bma_leak_case()
    h = b.datasets.index("h")
    # the case is what it claims: with h's inputs counted, b would be the BMA
    leaky = np.nanmean(b.dataset_accuracy(), axis=0)
    assert leaky[b.models.index("b")] > leaky[b.models.index("a")]
    held = b.member[:, h]
    clean = np.nanmean(np.delete(b.dataset_accuracy(exclude_rows=held), h, axis=0), axis=0)
    assert clean[b.models.index("a")] > clean[b.models.index("b")]
    ev = evaluate_lodo(b, EvalConfig(k=3, min_inputs=4, alphas=(0.0,)))
    bma = ev.per_task.filter((pl.col("dataset") == "h") & (pl.col("method") == "BMA"))
    assert bma.height == 2  # both tie rules
    assert bma["model"].to_list() == ["a", "a"]
    assert bma["acc"].to_list() == [0.0, 0.0]  # a is wrong on every input of h: no leak helped


def test_lodo_invariants_and_determinism():
    X, ids, labels, memberships = _synthetic(seed=1)
    b = BenchmarkArrays.from_frames(X, ids, labels, memberships)
    cfg = EvalConfig(k=5, seed=7)
    ev = evaluate_lodo(b, cfg)
    pt = ev.per_task
    for ties in ("expectation", "train_acc"):
        t = pt.filter(pl.col("ties") == ties)
        oracle = t.filter(pl.col("method") == "Oracle").sort("dataset")
        assert (oracle["ratio_to_best"] == 1.0).all() and (oracle["rank"] == 1.0).all()
        for method in ("S1", "S2", "S3", "S3_true_p", "BMA", "Random"):
            acc = t.filter(pl.col("method") == method).sort("dataset")["acc"].to_numpy()
            assert (acc <= oracle["acc"].to_numpy() + 1e-12).all()
    # Random = the mean model's accuracy on the task
    pred = ev.predictor.group_by("dataset").agg(pl.col("acc").mean()).sort("dataset")
    rnd = pt.filter((pl.col("method") == "Random") & (pl.col("ties") == "expectation")).sort("dataset")
    np.testing.assert_allclose(rnd["acc"].to_numpy(), pred["acc"].to_numpy())
    assert ev.table1.filter(pl.col("method") == "BMA")["pct_bma"].to_list() == [1.0, 1.0]
    assert set(ev.alpha["alpha"].unique().to_list()) == {0.0, 0.01, 0.05, 0.1}
    # Table 2: oracle ≥ router ≥ nothing odd; calls per input
    t2 = {(r["router"], r["ties"]): r for r in ev.table2.iter_rows(named=True)}
    assert t2[("oracle", "-")]["quality"] >= t2[("argmax g_m(x)", "train_acc")]["quality"]
    assert t2[("oracle", "-")]["mcpi"] == len(b.models) and t2[("random", "expectation")]["mcpi"] == 1
    again = evaluate_lodo(b, cfg)
    assert again.table1.equals(ev.table1) and again.alpha.equals(ev.alpha)
    assert 0.0 <= ev.summary["kernel_mae"] <= 1.0


def test_log_likelihood_baseline_where_the_data_has_it():
    X, ids, labels, memberships = _synthetic(seed=2)
    b = BenchmarkArrays.from_frames(X, ids, labels, memberships)
    # a log-likelihood that is the label itself: LL's task score is the true accuracy
    loglik = labels.select("input_id", "dataset", "model", value=pl.col("y").cast(pl.Float64))
    ev = evaluate_lodo(b, EvalConfig(k=5, alphas=(0.0,)), loglik=loglik)
    t1 = ev.table1.filter(pl.col("ties") == "train_acc")
    row = dict(zip(t1["method"], t1["acc"]))
    assert row["LL"] == pytest.approx(row["Oracle"])
    assert t1.filter(pl.col("method") == "LL")["pearson"][0] == pytest.approx(1.0)
    assert "LL" not in evaluate_lodo(b, EvalConfig(k=5, alphas=(0.0,))).table1["method"].to_list()


# ---------------------------------------------------------------- the real fixture
@pytest.fixture(scope="module")
def fixture_eval():
    emb = np.load(FIXTURE / "embeddings.npy").astype(np.float32)
    ids = pl.read_parquet(FIXTURE / "inputs.parquet")["input_id"].to_list()
    b = BenchmarkArrays.from_frames(
        emb, ids, pl.read_parquet(FIXTURE / "labels.parquet"),
        pl.read_parquet(FIXTURE / "memberships.parquet"), pl.read_parquet(FIXTURE / "models.parquet"),
    )
    return b, evaluate_lodo(b, EvalConfig(k=5, seed=0))


def test_fixture_end_to_end(fixture_eval):
    b, ev = fixture_eval
    assert len(b.models) == 28 and len(b.datasets) == 5 and len(b.input_ids) == 200
    # DeepSeek-Coder-V2 lacks most chemistry results: only complete inputs are compared
    assert b.complete_rows(b.datasets.index("mmlu_pro/chemistry")).size < 40
    assert ev.summary["n_tasks"] == 5
    t1 = ev.table1.filter(pl.col("ties") == "expectation")
    acc = dict(zip(t1["method"], t1["acc"]))
    assert set(acc) == {"S1", "S2", "S3", "S3_true_p", "BMA", "Oracle", "Random", "S3_nbr_p"}
    assert max(acc.values()) == acc["Oracle"]
    assert acc["S1"] > acc["Random"] + 0.1  # far better than picking at random
    assert 0.5 < ev.summary["predictor_accuracy"] < 0.8
    assert 0.0 < ev.summary["kernel_mae"] < 0.3
    t2 = {(r["router"], r["ties"]): r["quality"] for r in ev.table2.iter_rows(named=True)}
    assert t2[("argmax g_m(x)", "train_acc")] > t2[("random", "expectation")]
    md = format_table1(ev.table1)
    assert md.splitlines()[0].startswith("| metric | S1 | S2 | S3")


@pytest.mark.parametrize("totals", [False, True])
def test_the_searched_neighbour_path_evaluates_as_the_stored_lists(fixture_eval, monkeypatch, totals):
    """Where the per-group lists would not fit (a leaderboard) every merge searches and nested
    LODO narrows each dataset's folds (``kernel.lodo_base``): the same evaluation. ``totals``:
    Y counts as large too, so fallbacks and the α curve's index means come from fold totals."""
    from benchroute.transforms import kernel, knn

    b, ev = fixture_eval
    monkeypatch.setattr(knn, "GROUPED_MAX_BYTES", 0)
    if totals:
        monkeypatch.setattr(kernel, "FOLD_TOTALS_BYTES", 0)
    searched = evaluate_lodo(b, EvalConfig(k=5, seed=0))
    for name in ("table1", "per_task", "predictor", "alpha", "table2"):
        a, c = getattr(ev, name), getattr(searched, name)
        assert a.columns == c.columns and a.height == c.height, name
        for col in a.columns:
            if a[col].dtype.is_float():
                np.testing.assert_allclose(c[col].to_numpy(), a[col].to_numpy(), rtol=1e-6,
                                           atol=1e-9, err_msg=f"{name}.{col}")
            else:
                assert c[col].to_list() == a[col].to_list(), f"{name}.{col}"


# ---------------------------------------------------------------- labels a batch at a time
def _fixture_frames():
    emb = np.load(FIXTURE / "embeddings.npy").astype(np.float32)
    ids = pl.read_parquet(FIXTURE / "inputs.parquet")["input_id"].to_list()
    return (emb, ids, pl.read_parquet(FIXTURE / "labels.parquet"),
            pl.read_parquet(FIXTURE / "memberships.parquet"), pl.read_parquet(FIXTURE / "models.parquet"))


def _rows_of(emb, ids):
    pos = {i: r for r, i in enumerate(ids)}
    return lambda wanted: emb[[pos[i] for i in wanted]]


def _assert_same_arrays(a: BenchmarkArrays, b: BenchmarkArrays, dtype=np.float64):
    assert (a.input_ids, a.models, a.datasets) == (b.input_ids, b.models, b.datasets)
    for name in ("X", "member", "row_groups", "group_members", "params_b"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name), err_msg=name)
    np.testing.assert_array_equal(a.Y.astype(dtype), b.Y)
    assert b.Y.dtype == dtype
    for name in ("dataset_rows", "dataset_y", "dataset_value"):
        for x, y in zip(getattr(a, name), getattr(b, name), strict=True):
            np.testing.assert_array_equal(x if name == "dataset_rows" else x.astype(dtype), y, err_msg=name)


def test_from_batches_equals_from_frames_on_the_real_fixture():
    emb, ids, labels, memberships, models = _fixture_frames()
    whole = BenchmarkArrays.from_frames(emb, ids, labels, memberships, models)
    batches = [labels.slice(s, 97) for s in range(0, labels.height, 97)]  # uneven batches
    streamed = BenchmarkArrays.from_batches(_rows_of(emb, ids), lambda: iter(batches), memberships, models,
                                            dtype=np.float64)
    _assert_same_arrays(whole, streamed)
    small = BenchmarkArrays.from_batches(_rows_of(emb, ids), lambda: iter(batches), memberships, models,
                                         dtype=np.float32)
    _assert_same_arrays(whole, small, np.float32)


def test_dataset_value_is_dataset_y_only_while_every_value_equals_its_y():
    emb, ids, labels, memberships, models = _frames()
    same = BenchmarkArrays.from_frames(emb, ids, labels, memberships, models)
    assert same.dataset_value is same.dataset_y  # not a second copy
    # a value that differs from its y, in the second of two batches: the values made before it
    # are kept and the differing one lands in dataset_value only
    scored = labels.with_columns(value=pl.when(pl.int_range(pl.len()) == 7).then(0.25).otherwise(pl.col("value")))
    b = BenchmarkArrays.from_batches(_rows_of(emb, ids), lambda: [scored.head(5), scored.tail(3)],
                                     memberships, models)
    assert b.dataset_value is not b.dataset_y
    np.testing.assert_array_equal(b.dataset_y[2], [[0.0, 1.0]])
    np.testing.assert_array_equal(b.dataset_value[2], [[0.0, 0.25]])
    for d in (0, 1):
        np.testing.assert_array_equal(b.dataset_value[d], same.dataset_value[d])


def _single_dataset_fixture():
    """The real fixture's inputs that sit in one dataset (a leaderboard's layout)."""
    emb, ids, labels, memberships, models = _fixture_frames()
    single = memberships.group_by("input_id").len().filter(pl.col("len") == 1)["input_id"]
    labels = labels.filter(pl.col("input_id").is_in(single.implode()))
    return emb, ids, labels, memberships.filter(pl.col("input_id").is_in(single.implode())), models


def _scattered(b: BenchmarkArrays, labels: pl.DataFrame, dtype=np.float64):
    """Each dataset's y and value scattered as stored copies (``LabelScatter`` without derive)."""
    from benchroute.transforms.evaluate import LabelScatter

    scatter = LabelScatter(b.input_ids, b.datasets, b.models, b.dataset_rows, dtype)
    scatter.add(labels)
    return scatter.finish()


def test_each_dataset_s_labels_are_y_s_rows_when_every_input_is_in_one_dataset():
    """Not a second copy of every label (1.6 GB on a leaderboard): Y's rows, made when asked
    for, equal to what the scatter stores, bit for bit, in float64 and float32."""
    from benchroute.transforms.evaluate import DatasetRows

    emb, ids, labels, memberships, models = _single_dataset_fixture()
    assert labels.height > 100 and labels["dataset"].n_unique() > 1
    for dtype in (np.float64, np.float32):
        batches = [labels.slice(s, 97) for s in range(0, labels.height, 97)]
        b = BenchmarkArrays.from_batches(_rows_of(emb, ids), lambda: iter(batches), memberships,
                                         models, dtype=dtype)
        assert isinstance(b.dataset_y, DatasetRows) and b.dataset_value is b.dataset_y
        Y, d_y, _ = _scattered(b, labels, dtype)
        np.testing.assert_array_equal(b.Y, Y)
        assert len(b.dataset_y) == len(d_y) == len(b.datasets)
        for d, yd in enumerate(d_y):
            assert b.dataset_y[d].dtype == dtype
            np.testing.assert_array_equal(b.dataset_y[d], yd)
        assert [x.shape for x in b.dataset_y[1:3]] == [x.shape for x in d_y[1:3]]


def test_a_second_label_in_a_cell_or_a_value_other_than_y_scatters_each_dataset_again():
    emb, ids, labels, memberships, models = _single_dataset_fixture()
    # the same input, dataset and model twice: Y averages, the dataset keeps the last label
    first = labels.head(1)
    again = first.with_columns(y=1 - pl.col("y"), value=1 - pl.col("value"))
    twice = pl.concat([labels, again])
    calls = []

    def counted(frame):
        return lambda: calls.append(1) or [frame]

    b = BenchmarkArrays.from_batches(_rows_of(emb, ids), counted(twice), memberships, models)
    assert isinstance(b.dataset_y, list) and len(calls) == 3  # found only after the scatter
    Y, d_y, _ = _scattered(b, twice)
    np.testing.assert_array_equal(b.Y, Y)
    for x, y in zip(b.dataset_y, d_y, strict=True):
        np.testing.assert_array_equal(x, y)
    assert np.nanmax(np.abs(b.Y - 0.5)) == 0.5 and (b.Y == 0.5).sum() == 1
    # a value other than y: dataset_value is its own copy
    scored = labels.with_columns(value=pl.when(pl.int_range(pl.len()) == 7).then(0.25).otherwise(pl.col("value")))
    calls.clear()
    v = BenchmarkArrays.from_batches(_rows_of(emb, ids), counted(scored), memberships, models)
    assert isinstance(v.dataset_y, list) and v.dataset_value is not v.dataset_y
    assert len(calls) == 2  # seen while reading the names: no attempt to derive
    assert sum(int((x == 0.25).sum()) for x in v.dataset_value) == 1


def test_label_counts_past_255_in_one_cell_keep_counting():
    """Y is a mean over a cell's labels, counted in uint8 until a cell needs more: 300 labels of
    one input and model (in three batches) must average, not wrap around at 256."""
    emb, ids, _, memberships, _ = _frames()
    y = (np.arange(300) % 3 == 0).astype(np.int64)  # 100 ones of 300
    labels = pl.DataFrame({"input_id": [ids[0]] * 300, "dataset": [f"d{i}" for i in range(300)],
                           "model": ["m1"] * 300, "y": y, "value": y.astype(float)})
    b = BenchmarkArrays.from_batches(_rows_of(emb, ids), lambda: [labels.slice(s, 100) for s in (0, 100, 200)],
                                     memberships.head(0))
    np.testing.assert_allclose(b.Y, [[100 / 300]])


def test_dense_dtype_is_float32_only_at_leaderboard_size():
    from benchroute.transforms.evaluate import DENSE_FLOAT64_CELLS, dense_dtype

    assert dense_dtype(28_531, 142) == np.float64
    assert dense_dtype(DENSE_FLOAT64_CELLS, 1) == np.float64
    assert dense_dtype(DENSE_FLOAT64_CELLS + 1, 1) == np.float32
