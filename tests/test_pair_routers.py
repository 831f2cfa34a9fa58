"""Strong/weak routers (issue 14): each learns where the strong model is needed, is seeded, and
round-trips through numpy arrays + JSON (no pickles, no torch to predict)."""

import io
import json
import subprocess
import sys

import numpy as np
import pytest

from benchroute.transforms.pair_labels import PairError, WinData
from benchroute.transforms.pair_routers import (
    PAIR_ROUTERS,
    DiffRouter,
    EnsembleRouter,
    IRTRouter,
    MFRouter,
    OracleRouter,
    RandomRouter,
    SWRankingRouter,
    bradley_terry,
    fit_irt,
    make_pair_router,
    pair_router_from_state,
    rank_cdf,
)
from benchroute.transforms.predictors import make_predictor

MODELS = ["strong", "weak", "mid", "other"]


def synthetic(n=600, d=16, seed=0):
    """Three clusters of queries: 0 = only the strong model is right, 1 = both right, 2 = the
    weak one is right as often as the strong one. 'mid' follows strong on cluster 0; 'other'
    labels half the inputs only."""
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((3, d)) * 3
    cl = rng.integers(0, 3, n)
    X = (centers[cl] + rng.standard_normal((n, d))).astype(np.float32)
    p_strong = np.array([0.95, 0.95, 0.5])[cl]
    p_weak = np.array([0.1, 0.95, 0.5])[cl]
    Y = np.empty((n, 4))
    Y[:, 0] = rng.random(n) < p_strong
    Y[:, 1] = rng.random(n) < p_weak
    Y[:, 2] = np.where(cl == 0, Y[:, 0], rng.random(n) < 0.5)
    Y[:, 3] = np.where(rng.random(n) < 0.5, rng.random(n) < 0.7, np.nan)
    data = WinData([f"{i:064x}" for i in range(n)], list(MODELS), ["d"], Y.copy(), Y.copy(),
                   np.ones((n, 1), bool))
    return X, data, cl


def fitted(name, X, data, **params):
    if name == "mf":
        params = {"dim": 8, "max_epochs": 30, "patience": 3, "lr": 1e-2, **params}
    return make_pair_router(name, **params).fit(X, data, pair=("strong", "weak"))


def roundtrip(params, arrays):
    """Through the bytes a bundle would hold: JSON and .npy without pickles."""
    params = json.loads(json.dumps(params))
    out = {}
    for k, v in arrays.items():
        buf = io.BytesIO()
        np.save(buf, v, allow_pickle=False)
        buf.seek(0)
        out[k] = np.load(buf, allow_pickle=False)
    return params, out


@pytest.mark.parametrize("name", ["sw_ranking", "mf", "diff", "ensemble"])
def test_router_scores_cluster_where_strong_is_needed_highest(name):
    X, data, cl = synthetic()
    tr, te = np.arange(400), np.arange(400, 600)
    r = fitted(name, X[tr], data.rows(tr))
    p = r.predict_proba(X[te])
    assert p.shape == (te.size,) and np.all((p >= 0) & (p <= 1))
    means = [p[cl[te] == k].mean() for k in range(3)]
    assert means[0] > means[1] + 0.1 and means[0] > means[2] + 0.1, means
    # The same router answers the swapped pair with the complementary view.
    q = r.predict_proba(X[te], strong="weak", weak="strong") if name not in ("diff", "ensemble") else 1 - p
    assert np.allclose(p + q, 1.0, atol=1e-6)


@pytest.mark.parametrize("name", sorted(PAIR_ROUTERS))
def test_state_roundtrip_predicts_identically(name):
    X, data, _ = synthetic(300)
    r = fitted(name, X, data)
    params, arrays = roundtrip(*r.to_state())
    assert all(isinstance(a, np.ndarray) and a.dtype != object for a in arrays.values())
    r2 = pair_router_from_state(params, arrays)
    assert type(r2) is type(r) and r2.pair_ == ("strong", "weak")
    assert np.array_equal(r.predict_proba(X[:50]), r2.predict_proba(X[:50]))


def test_index_can_be_left_to_the_bundle():
    X, data, _ = synthetic(300)
    sw = fitted("sw_ranking", X, data)
    params, arrays = sw.to_state(include_index=False)
    assert arrays == {}
    with pytest.raises(ValueError):
        pair_router_from_state(params, arrays)
    sw2 = pair_router_from_state(params, arrays, index=(X / np.linalg.norm(X, axis=1, keepdims=True), data.Q))
    assert np.allclose(sw.predict_proba(X[:40]), sw2.predict_proba(X[:40]), atol=1e-6)
    diff = fitted("diff", X, data, predictor="knn", predictor_params={"n_neighbors": 5})
    params, arrays = diff.to_state(include_index=False)
    assert "predictor.X_" not in arrays
    Xn = X / np.linalg.norm(X, axis=1, keepdims=True)
    d2 = pair_router_from_state(params, arrays, index=(Xn, data.Y))  # rows_/cols_ select the pair's
    assert np.allclose(diff.predict_proba(X[:40]), d2.predict_proba(X[:40]))


def test_restoring_and_predicting_do_not_import_torch(tmp_path):
    X, data, _ = synthetic(200)
    params, arrays = fitted("mf", X, data, max_epochs=3).to_state()
    path = tmp_path / "mf_state.npz"
    np.savez(path, **arrays)  # npz of plain arrays: no pickles
    code = (
        "import json, sys, numpy as np\n"
        "from benchroute.transforms.pair_routers import pair_router_from_state\n"
        f"params = json.loads({json.dumps(json.dumps(params))})\n"
        f"arrays = dict(np.load({str(path)!r}, allow_pickle=False))\n"
        "r = pair_router_from_state(params, arrays)\n"
        "r.predict_proba(np.ones((2, arrays['W1_'].shape[0]), np.float32))\n"
        "assert 'torch' not in sys.modules, 'torch imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_mf_is_seeded_and_stops_early():
    X, data, _ = synthetic(300)
    a = fitted("mf", X, data, seed=3)
    b = fitted("mf", X, data, seed=3)
    c = fitted("mf", X, data, seed=4)
    assert np.array_equal(a.W1_, b.W1_) and not np.array_equal(a.W1_, c.W1_)
    assert a.n_epochs_ <= 30 and 0 <= a.best_epoch_ < a.n_epochs_
    assert len(a.history_["val"]) == a.n_epochs_
    # s(m, q) = w2ᵀ(v̂_m ⊙ (W1ᵀ q + b)) with unit-norm model vectors.
    assert np.allclose(np.linalg.norm(a.V_, axis=1), 1.0, atol=1e-5)
    with pytest.raises(ValueError):
        MFRouter(ties="coin").fit(X, data)


def test_sw_bradley_terry():
    # Two models, 3 wins to 1: σ(ξ0 − ξ1) = .75 (no ridge).
    xi = bradley_terry(np.array([[[0.0, 3.0], [1.0, 0.0]]]), 1e-12)
    assert 1 / (1 + np.exp(-(xi[0, 0] - xi[0, 1]))) == pytest.approx(0.75, abs=1e-6)
    # Transitive: a beats b, b beats c, never met: a over c > a over b.
    C = np.zeros((1, 3, 3))
    C[0, 0, 1], C[0, 1, 0], C[0, 1, 2], C[0, 2, 1] = 8, 2, 8, 2
    xi = bradley_terry(C, 1e-6)[0]
    assert xi[0] > xi[1] > xi[2]
    # The router links a pair that never ran on the same inputs through a bridge model.
    rng = np.random.default_rng(0)
    n = 300
    X = rng.standard_normal((n, 8)).astype(np.float32)
    Q = np.full((n, 3), np.nan)
    Q[:150, 0], Q[:150, 2] = 1, (rng.random(150) < 0.5)  # strong vs bridge
    Q[150:, 1], Q[150:, 2] = 0, (rng.random(150) < 0.5)  # weak vs bridge
    data = WinData([f"{i:064x}" for i in range(n)], ["s", "w", "b"], ["d"], Q, Q.copy(), np.ones((n, 1), bool))
    sw = SWRankingRouter().fit(X, data, pair=("s", "w"))
    assert np.all(sw.predict_proba(X[:20]) > 0.8)
    alone = SWRankingRouter(n_bridge=0).fit(X, data, pair=("s", "w"))
    assert np.allclose(alone.predict_proba(X[:5]), 0.5)  # no comparison between them at all


def test_diff_router_is_the_difference_of_the_predictors():
    X, data, _ = synthetic(300)
    r = DiffRouter(predictor="knn", predictor_params={"n_neighbors": 7}).fit(X, data, pair=("strong", "weak"))
    G = make_predictor("knn", n_neighbors=7).fit(X, data.Y[:, :2]).predict_proba(X[:30])
    assert np.allclose(r.predict_proba(X[:30]), (1 + G[:, 0] - G[:, 1]) / 2)
    with pytest.raises(PairError):
        r.predict_proba(X[:3], strong="mid", weak="weak")  # fitted for its pair only
    anyp = DiffRouter(predictor="knn", models="all").fit(X, data)
    assert anyp.predict_proba(X[:3], strong="mid", weak="other").shape == (3,)
    with pytest.raises(PairError):
        DiffRouter().fit(X, data)  # models="pair" needs the pair


def test_random_router_is_a_fixed_uniform_draw_per_query():
    X, data, _ = synthetic(2000)
    r = RandomRouter(seed=1).fit(X, data, pair=("strong", "weak"))
    p = r.predict_proba(X)
    assert np.array_equal(p, r.predict_proba(X)) and np.array_equal(p[:5], r.predict_proba(X[:5]))
    assert abs(p.mean() - 0.5) < 0.03 and np.unique(p).size > 1990
    assert not np.array_equal(p, RandomRouter(seed=2).fit(X, data, pair=("strong", "weak")).predict_proba(X))


def test_oracle_looks_up_the_labels():
    X, data, _ = synthetic(200)
    o = OracleRouter().fit(X, data, pair=("strong", "weak"))
    expected = 0.5 * (1 + data.Q[:, 0] - data.Q[:, 1])
    got = o.predict_proba(X)
    ok = np.isfinite(expected)
    assert np.allclose(got[ok], expected[ok])
    assert np.allclose(o.predict_proba(np.ones((2, X.shape[1]), np.float32) * 1e3), 0.5)  # unknown query


def test_bad_requests_are_refused():
    X, data, _ = synthetic(100)
    r = SWRankingRouter().fit(X, data)  # no pair: name one on each call
    with pytest.raises(PairError):
        r.predict_proba(X[:2])
    with pytest.raises(PairError):
        r.predict_proba(X[:2], strong="strong", weak="strong")
    with pytest.raises(PairError):
        r.predict_proba(X[:2], strong="strong", weak="nobody")
    with pytest.raises(ValueError):
        r.predict_proba(X[:2, :4], strong="strong", weak="weak")
    with pytest.raises(ValueError):
        make_pair_router("bert")


def rasch(n=800, d=8, seed=0):
    """Rasch data: difficulty β_i a function of the embedding, 12 models of abilities θ (strong 2,
    weak −1), 30 % of the labels missing."""
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((n, d)).astype(np.float32)
    beta = 1.5 * X[:, 0] / np.linalg.norm(X, axis=1) * np.sqrt(d)
    theta = np.concatenate([[2.0, -1.0], np.linspace(-2, 3, 10)])
    M = theta.size
    Y = (rng.random((n, M)) < 1 / (1 + np.exp(-(theta[None] - beta[:, None])))).astype(float)
    Y[rng.random((n, M)) < 0.3] = np.nan
    models = ["strong", "weak"] + [f"m{j}" for j in range(M - 2)]
    data = WinData([f"{i:064x}" for i in range(n)], models, ["d"], Y.copy(), Y.copy(), np.ones((n, 1), bool))
    return X, data, beta, theta


def test_irt_recovers_abilities_and_difficulties():
    X, data, beta, theta = rasch()
    th, b, info = fit_irt(data.Y, reg_item=0.5, reg_model=0.01)
    assert np.corrcoef(th, theta)[0, 1] > 0.98 and th[0] > th[1]
    assert np.corrcoef(b, beta)[0, 1] > 0.8
    assert np.all(info > 0.5)  # reg_item plus the Fisher information of the labels
    r = IRTRouter(n_neighbors=10).fit(X[:600], data.rows(np.arange(600)), pair=("strong", "weak"))
    # The query's difficulty comes from its neighbours: it tracks the true β of unseen inputs.
    assert np.corrcoef(r.difficulty(X[600:]), beta[600:])[0, 1] > 0.7
    p = r.predict_proba(X[600:])
    gain = 1 / (1 + np.exp(-(r.theta_[0] - r.difficulty(X[600:])))) - 1 / (1 + np.exp(-(r.theta_[1] - r.difficulty(X[600:]))))
    assert np.allclose(p, (1 + gain) / 2)
    # Most needed between the two abilities: the easiest inputs (both right) score lower.
    bt = beta[600:]
    mid = (bt > -1) & (bt < 2)
    assert p[mid].mean() > p[bt < np.quantile(bt, 0.1)].mean() + 0.03
    assert np.allclose(r.predict_proba(X[600:], strong="weak", weak="strong"), 1 - p)
    with pytest.raises(ValueError):
        IRTRouter(reg_item=0).fit(X, data)


def test_ensemble_averages_rank_normalised_members_and_is_batch_independent():
    X, data, _ = synthetic(400)
    members = [["diff", {"predictor": "knn", "predictor_params": {"n_neighbors": 7}, "models": "all"}],
               ["sw_ranking", {}]]
    e = EnsembleRouter(members=members, n_reference=300).fit(X, data, pair=("strong", "weak"))
    p = e.predict_proba(X[:60])
    assert np.all((p >= 0) & (p <= 1))
    assert np.allclose(p[:7], e.predict_proba(X[:7]), atol=1e-6)  # a query's score ignores the rest of the batch
    cdfs = [rank_cdf(m.predict_proba(e.X_ref_), m.predict_proba(X[:60])) for m in e.members_]
    assert np.allclose(p, np.mean(cdfs, axis=0))
    # rank_cdf: mid-ranks at the reference values, linear between, 0 and 1 outside.
    assert np.allclose(rank_cdf(np.array([0.1, 0.2, 0.2, 0.4]), [0.1, 0.2, 0.3, 0.0, 0.5]),
                       [0.125, 0.5, 0.6875, 0.0, 1.0])
    # One member: the ensemble keeps that member's order of the queries.
    one = EnsembleRouter(members=members[:1], n_reference=300).fit(X, data, pair=("strong", "weak"))
    s = one.members_[0].predict_proba(X[:60])
    q = one.predict_proba(X[:60])
    assert np.all(np.diff(q[np.argsort(s, kind="stable")]) >= -1e-12)
    # Weights: a zero weight removes the member.
    w = EnsembleRouter(members=members, weights=[1.0, 0.0], n_reference=300).fit(X, data, pair=("strong", "weak"))
    assert np.allclose(w.predict_proba(X[:60]), cdfs[0])
    with pytest.raises(ValueError):
        EnsembleRouter(members=[["oracle", {}]]).fit(X, data)
    with pytest.raises(ValueError):
        EnsembleRouter(members=members, weights=[1.0]).fit(X, data)


def test_diff_router_imputes_a_missing_model_from_the_model_of_closest_ability():
    X, data, _, _ = rasch()
    Y = data.Y.copy()
    Y[:400, 0] = np.nan  # the strong model never ran on these inputs
    data = WinData(data.input_ids, data.models, data.datasets, Y.copy(), Y, data.member)
    r = DiffRouter(predictor="knn", predictor_params={"n_neighbors": 5}, models="all", impute=True).fit(
        X, data, pair=("strong", "weak"))
    # θ_strong = 2: the closest of linspace(−2, 3, 10) is m7 (1.89); θ_weak = −1: m1 or m2 (−1.44, −0.89).
    assert r.proxies_["strong"] == "m7" and r.proxies_["weak"] in ("m1", "m2")
    Yfit = r.predictor_.Y_  # the index the kNN predictor was fitted on (rows_ of all columns)
    row_pos = {int(i): k for k, i in enumerate(r.rows_)}
    m7 = data.models.index("m7")
    for i in range(400):
        if not np.isnan(data.Y[i, m7]):
            assert Yfit[row_pos[i], 0] == data.Y[i, m7]
    own = [i for i in range(400, 800) if not np.isnan(data.Y[i, 0])]
    assert all(Yfit[row_pos[i], 0] == data.Y[i, 0] for i in own)  # its own labels are kept
    plain = DiffRouter(predictor="knn", predictor_params={"n_neighbors": 5}, models="all").fit(
        X, data, pair=("strong", "weak"))
    assert plain.proxies_ == {} and np.isnan(plain.predictor_.Y_[[row_pos[i] for i in range(10)], 0]).any()
    # The imputed labels travel with the state (the bundle's own index would not hold them).
    params, arrays = roundtrip(*r.to_state(include_index=False))
    r2 = pair_router_from_state(params, arrays)
    assert r2.proxies_ == r.proxies_ and np.array_equal(r.predict_proba(X[:30]), r2.predict_proba(X[:30]))
