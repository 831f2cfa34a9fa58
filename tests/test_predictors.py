"""Correctness predictors behind one interface: hand-checked kNN values, missing labels, the
networks against a constant prior, early stopping, Platt calibration, borrowing strength,
pickle-free state round trips, and restoring without torch.

Synthetic data (``_synthetic``): clustered 32-d embeddings and IRT-like models,
logit P(y=1 | x, m) = ability_m − difficulty(x) + 0.3·⟨u_m, v(x)⟩ with difficulty and v linear
in x (so accuracies depend on the cluster). Models share the difficulty term — as benchmark
models do (hard questions are hard for all) — which is what lets a new model with few labels
borrow strength from the others.
"""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from benchroute.transforms.knn import normalize_rows
from benchroute.transforms.predictors import (
    PREDICTORS,
    BasePredictor,
    CalibratedPredictor,
    FactorizedPredictor,
    KNNPredictor,
    MLPPredictor,
    NotFittedError,
    ShrunkKNNPredictor,
    clone,
    make_predictor,
    platt_fit,
    predictor_from_state,
)

N_TRAIN = 2000


def _synthetic(seed=0, n=3000, d=32, M=6, C=8, missing=0.3, spec=0.3):
    """(X, Y_train_with_missing, Y_full, P): M + 1 models (the last one is 'new': the tests give
    it few labels or drop it)."""
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(C, d))
    X = normalize_rows(centers[rng.integers(C, size=n)] + 0.7 * rng.normal(size=(n, d)))
    difficulty = 2.0 * (X @ rng.normal(size=d))
    V = X @ rng.normal(size=(d, 3))
    U = rng.normal(size=(M + 1, 3))
    ability = rng.normal(0.3, 0.7, M + 1)
    P = 1.0 / (1.0 + np.exp(-(ability - difficulty[:, None] + spec * V @ U.T)))
    Y_full = (rng.random(P.shape) < P).astype(np.float64)
    Y = Y_full.copy()
    Y[rng.random(P.shape) < missing] = np.nan
    return X, Y, Y_full, P


def _log_loss(G, Y):
    ok = ~np.isnan(Y) & ~np.isnan(G)
    p = np.clip(G[ok], 1e-6, 1 - 1e-6)
    y = Y[ok]
    return float(-np.mean(y * np.log(p) + (1 - y) * np.log1p(-p)))


@pytest.fixture(scope="module")
def data():
    X, Y, Y_full, P = _synthetic()
    return {
        "Xtr": X[:N_TRAIN], "Ytr": Y[:N_TRAIN, :6],
        "Xte": X[N_TRAIN:], "Yte": Y_full[N_TRAIN:, :6], "Pte": P[N_TRAIN:, :6],
    }


@pytest.fixture(scope="module")
def fitted(data):
    """One fitted predictor of each kind (the networks are the slow part: fitted once here)."""
    return {
        "knn": KNNPredictor().fit(data["Xtr"], data["Ytr"]),
        "knn_shrunk": ShrunkKNNPredictor().fit(data["Xtr"], data["Ytr"]),
        "mlp": MLPPredictor().fit(data["Xtr"], data["Ytr"]),
        "factorized": FactorizedPredictor().fit(data["Xtr"], data["Ytr"]),
    }


# ------------------------------------------------------------------ kNN, by hand
# Five index rows on the unit circle, two models; query at angle 0. Cosine similarity to the
# query = cos(angle): rows by angle 0.1 (row 2), 0.2 (row 0), 0.5 (row 3), 1.0 (row 1), 3.0 (row 4).
_ANGLES = np.array([0.2, 1.0, 0.1, 0.5, 3.0])
_X_TINY = np.column_stack([np.cos(_ANGLES), np.sin(_ANGLES)])
_Y_TINY = np.array([
    [1.0, np.nan],
    [0.0, 1.0],
    [1.0, np.nan],
    [np.nan, np.nan],
    [0.0, 0.0],
])
_Q_TINY = np.array([[1.0, 0.0]])


def test_knn_hand_checked_and_missing_labels_skipped():
    knn = KNNPredictor(n_neighbors=3).fit(_X_TINY, _Y_TINY)
    nb = knn.kneighbors(_Q_TINY)
    assert nb.indices.tolist() == [[2, 0, 3]]
    # model 0: rows 2, 0 labelled (1, 1), row 3 missing → 2/2; model 1: no labelled neighbour → NaN
    g = knn.predict_proba(_Q_TINY)
    assert g[0, 0] == 1.0 and np.isnan(g[0, 1])
    np.testing.assert_array_equal(knn.predict_from_neighbors(nb), g)
    g4 = KNNPredictor(n_neighbors=4).fit(_X_TINY, _Y_TINY).predict_proba(_Q_TINY)
    np.testing.assert_allclose(g4, [[2 / 3, 1.0]])  # rows 2, 0, 3, 1: (1+1+0)/3 and 1/1
    assert g4.dtype == np.float64


def test_shrunk_knn_hand_checked():
    a = 2.0
    est = ShrunkKNNPredictor(n_neighbors=3, strength=a).fit(_X_TINY, _Y_TINY)
    prior = np.array([2 / 4, 1 / 2])  # model 0: labels 1, 0, 1, 0; model 1: 1, 0
    np.testing.assert_allclose(est.prior_, prior)
    g = est.predict_proba(_Q_TINY)
    # model 0: neighbours 2, 0 labelled (sum 2, n 2); model 1: none labelled → the prior
    np.testing.assert_allclose(g, [[(2 + a * 0.5) / (2 + a), 0.5]])
    g4 = ShrunkKNNPredictor(n_neighbors=4, strength=a).fit(_X_TINY, _Y_TINY).predict_proba(_Q_TINY)
    np.testing.assert_allclose(g4, [[(2 + a * 0.5) / (3 + a), (1 + a * 0.5) / (1 + a)]])
    g0 = ShrunkKNNPredictor(n_neighbors=3, strength=0.0).fit(_X_TINY, _Y_TINY).predict_proba(_Q_TINY)
    np.testing.assert_allclose(g0, [[1.0, 0.5]])  # no shrinkage: plain kNN, prior where no label
    # a model with no label at all: NaN
    Y = np.column_stack([_Y_TINY, np.full(5, np.nan)])
    assert np.isnan(ShrunkKNNPredictor(3).fit(_X_TINY, Y).predict_proba(_Q_TINY)[0, 2])


@pytest.mark.parametrize("name", ["knn", "knn_shrunk", "mlp", "factorized"])
def test_missing_labels_are_not_zeros(name):
    """A model correct on every input it was run on, with 70% of its labels missing: every
    predictor must stay near 1 (counting missing as 0 would give about 0.3)."""
    X, Y, _, _ = _synthetic(seed=3, n=600)
    rng = np.random.default_rng(3)
    Y = Y[:, :3].copy()
    Y[:, 0] = np.where(rng.random(len(Y)) < 0.7, np.nan, 1.0)
    extra = {"max_epochs": 30} if name in ("mlp", "factorized") else {}
    g = make_predictor(name, **extra).fit(X[:500], Y[:500]).predict_proba(X[500:])
    assert np.nanmin(g[:, 0]) > 0.8
    assert np.isfinite(g[:, 1:]).all()


# ------------------------------------------------------------------ networks
@pytest.mark.parametrize("name", ["mlp", "factorized"])
def test_networks_beat_the_constant_prior(data, fitted, name):
    est = fitted[name]
    prior = np.nanmean(data["Ytr"], axis=0)
    base = _log_loss(np.broadcast_to(prior, data["Yte"].shape), data["Yte"])
    ll = _log_loss(est.predict_proba(data["Xte"]), data["Yte"])
    oracle = _log_loss(data["Pte"], data["Yte"])
    assert ll < base - 0.1, (ll, base, oracle)
    assert ll < oracle + 0.05, (ll, oracle)
    assert est.predict_proba(data["Xte"]).dtype == np.float64
    assert 0 <= est.best_epoch_ < est.n_epochs_ <= est.max_epochs


@pytest.mark.parametrize("name", ["mlp", "factorized"])
def test_networks_are_deterministic_under_a_seed(data, fitted, name):
    again = make_predictor(name).fit(data["Xtr"], data["Ytr"])
    np.testing.assert_array_equal(again.predict_proba(data["Xte"]), fitted[name].predict_proba(data["Xte"]))
    assert again.history_ == fitted[name].history_
    other = make_predictor(name, seed=1, max_epochs=3).fit(data["Xtr"], data["Ytr"])
    first = make_predictor(name, seed=0, max_epochs=3).fit(data["Xtr"], data["Ytr"])
    assert not np.array_equal(other.predict_proba(data["Xte"]), first.predict_proba(data["Xte"]))


@pytest.mark.parametrize("name", ["mlp", "factorized"])
def test_networks_fit_float32_labels_exactly_as_float64(data, fitted, name):
    """A leaderboard's labels come as float32 (``evaluate.dense_dtype``) and are read a batch at
    a time, never cast whole: 0/1 labels give the very same network as float64 ones."""
    Y32 = data["Ytr"].astype(np.float32)
    est = make_predictor(name).fit(data["Xtr"], Y32)
    np.testing.assert_array_equal(est.predict_proba(data["Xte"]), fitted[name].predict_proba(data["Xte"]))
    assert est.history_ == fitted[name].history_


def test_network_fit_leaves_torch_settings_alone(data):
    import torch

    threads = torch.get_num_threads()
    state = torch.get_rng_state()
    MLPPredictor(max_epochs=2).fit(data["Xtr"][:300], data["Ytr"][:300])
    assert torch.get_num_threads() == threads
    assert torch.equal(torch.get_rng_state(), state)
    assert not torch.are_deterministic_algorithms_enabled()


def test_wide_networks_train_on_two_threads_narrow_ones_on_one(data, monkeypatch):
    """Threads while training, by the number of outputs and the cores the process may use (not
    torch's setting before the fit); the same threads give the same weights (1 and 2 threads may
    differ in the last bits)."""
    import torch

    from benchroute.transforms import predictors

    assert predictors.torch_threads(predictors.WIDE_OUTPUTS - 1) == 1
    assert predictors.torch_threads(predictors.WIDE_OUTPUTS) == 2
    seen = []
    real = predictors.MLPPredictor._loop

    def spy(self, *args, **kwargs):
        seen.append(torch.get_num_threads())
        return real(self, *args, **kwargs)

    monkeypatch.setattr(predictors.MLPPredictor, "_loop", spy)
    X, Y = data["Xtr"][:300], data["Ytr"][:300]
    from benchroute.transforms import embedder

    caller = torch.get_num_threads()
    monkeypatch.setattr(embedder, "available_cores", lambda: 2)
    try:
        torch.set_num_threads(1)  # e.g. left so by an embedder on one core: not a cap
        narrow = MLPPredictor(max_epochs=2).fit(X, Y)
        monkeypatch.setattr(predictors, "WIDE_OUTPUTS", Y.shape[1])
        wide = MLPPredictor(max_epochs=2).fit(X, Y)
        again = MLPPredictor(max_epochs=2).fit(X, Y)
        monkeypatch.setattr(embedder, "available_cores", lambda: 1)  # one core: one thread
        capped = MLPPredictor(max_epochs=2).fit(X, Y)
    finally:
        torch.set_num_threads(caller)
    assert seen == [1, 2, 2, 1]
    for a, b, c, d in zip(wide.layers_, again.layers_, narrow.layers_, capped.layers_):
        np.testing.assert_array_equal(a[0], b[0])
        np.testing.assert_array_equal(c[0], d[0])


def test_early_stopping_restores_the_best_epoch():
    """A wide net with a high learning rate on 300 rows overfits: training stops `patience`
    epochs after the best validation loss, and the weights kept are that epoch's."""
    X, Y, _, _ = _synthetic(seed=1, n=300)
    Y = Y[:, :6]
    est = MLPPredictor(hidden=512, dropout=0.0, lr=1e-2, weight_decay=0.0, patience=5,
                       batch_size=32, val_fraction=0.3).fit(X, Y)
    val = est.history_["val"]
    assert est.n_epochs_ == est.best_epoch_ + 1 + est.patience < est.max_epochs
    assert val[est.best_epoch_] == min(val)
    assert val[-1] > val[est.best_epoch_]
    # the kept weights give the best epoch's validation loss (numpy forward vs torch: float32)
    rows = est.val_rows_
    G = est.predict_proba(X[rows])
    ok = ~np.isnan(Y[rows])
    p = np.clip(G[ok], 1e-12, 1 - 1e-12)
    y = Y[rows][ok]
    recomputed = float(-np.mean(y * np.log(p) + (1 - y) * np.log1p(-p)))
    assert recomputed == pytest.approx(val[est.best_epoch_], rel=1e-4)


def test_factorized_borrows_strength_for_a_model_with_few_labels():
    """A 7th model with labels on only 20 training inputs: the factorised model (ψ_new shrunk
    toward the average model, whose difficulty term all models share) predicts it better on held-
    out inputs than the MLP (whose output head for it learns from those 20 labels alone)."""
    X, Y, Y_full, P = _synthetic(seed=0)
    rng = np.random.default_rng(100)
    Ytr = Y[:N_TRAIN].copy()
    few = rng.choice(N_TRAIN, 20, replace=False)
    Ytr[:, 6] = np.nan
    Ytr[few, 6] = Y_full[few, 6]
    Xte, yte = X[N_TRAIN:], Y_full[N_TRAIN:, 6:]
    fac = FactorizedPredictor().fit(X[:N_TRAIN], Ytr).predict_proba(Xte)[:, 6:]
    mlp = MLPPredictor().fit(X[:N_TRAIN], Ytr).predict_proba(Xte)[:, 6:]
    ll_fac, ll_mlp = _log_loss(fac, yte), _log_loss(mlp, yte)
    ll_prior = _log_loss(np.full_like(yte, np.nanmean(Ytr[:, 6])), yte)
    assert ll_fac < ll_mlp - 0.02, (ll_fac, ll_mlp, ll_prior)
    assert ll_fac < ll_prior - 0.1, (ll_fac, ll_prior)


# ------------------------------------------------------------------ calibration
class _Oracle(BasePredictor):
    """Test base: the true P(y=1|x) = σ(x·w) for every model, raised to ``power``."""

    def __init__(self, w=(), power=1.0):
        self.w = w
        self.power = power

    def fit(self, X, Y):
        self.n_features_in_ = X.shape[1]
        self.n_outputs_ = Y.shape[1]
        return self

    def predict_proba(self, X):
        p = 1.0 / (1.0 + np.exp(-(np.asarray(X) @ np.asarray(self.w))))
        return np.repeat(p[:, None], self.n_outputs_, axis=1) ** self.power


def _oracle_data(seed=0, n=4000, d=8):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, d))
    w = rng.normal(size=d) * 0.8
    p = 1.0 / (1.0 + np.exp(-(X @ w)))
    Y = (rng.random((n, 2)) < p[:, None]).astype(np.float64)
    Y[5:, 1] = np.nan  # model 1: only 5 labels
    return X, Y, tuple(w.tolist())


def test_platt_is_identity_for_a_calibrated_base():
    X, Y, w = _oracle_data()
    cal = CalibratedPredictor(_Oracle(w), n_folds=5).fit(X, Y)
    assert cal.platt_a_[0] == pytest.approx(1.0, abs=0.1)
    assert cal.platt_b_[0] == pytest.approx(0.0, abs=0.1)
    assert cal.n_calibration_.tolist() == [4000, 5]
    assert abs(cal.platt_a_[1] - 1.0) < 0.2 and abs(cal.platt_b_[1]) < 0.3  # 5 labels: the prior holds
    assert cal.oof_proba_.shape == (4000, 2)


def test_platt_corrects_a_miscalibrated_base_and_few_labels_stay_near_identity():
    X, Y, w = _oracle_data()
    Xte = _oracle_data(seed=1)[0]  # another draw of inputs; labels from the same w below
    rng = np.random.default_rng(7)
    p_true = 1.0 / (1.0 + np.exp(-(Xte @ np.asarray(w))))
    yte = (rng.random(len(p_true)) < p_true).astype(np.float64)[:, None]
    cubed = _Oracle(w, power=3.0)
    cal = CalibratedPredictor(cubed, n_folds=5).fit(X, Y)
    assert abs(cal.platt_a_[0] - 1.0) + abs(cal.platt_b_[0]) > 0.5  # a real correction
    raw = cubed.fit(X, Y).predict_proba(Xte)[:, :1]
    fixed = cal.predict_proba(Xte)[:, :1]
    ll_raw, ll_fixed, ll_true = _log_loss(raw, yte), _log_loss(fixed, yte), _log_loss(p_true[:, None], yte)
    assert ll_fixed < ll_raw - 0.05
    assert ll_fixed < ll_true + 0.02
    # mean predicted probability now matches the base rate (p^3 under-predicts badly)
    assert abs(fixed.mean() - yte.mean()) < 0.02 < abs(raw.mean() - yte.mean())
    # the model with 5 labels: the prior keeps it much nearer the identity than the full one
    assert abs(cal.platt_a_[1] - 1.0) + abs(cal.platt_b_[1]) < 0.5 * (
        abs(cal.platt_a_[0] - 1.0) + abs(cal.platt_b_[0])
    )


def test_platt_fit_recovers_known_parameters():
    rng = np.random.default_rng(0)
    z = rng.normal(size=20000) * 2
    y = (rng.random(z.size) < 1 / (1 + np.exp(-(0.5 * z - 0.7)))).astype(float)
    a, b = platt_fit(1 / (1 + np.exp(-z)), y, prior_strength=1.0)
    assert a == pytest.approx(0.5, abs=0.03) and b == pytest.approx(-0.7, abs=0.05)
    assert platt_fit(np.array([]), np.array([])) == (1.0, 0.0)


def test_calibrated_knn_keeps_nan_and_neighbour_reuse(data):
    cal = CalibratedPredictor(KNNPredictor(n_neighbors=5), n_folds=3).fit(_X_TINY.repeat(2, 0), _Y_TINY.repeat(2, 0))
    nb = cal.kneighbors(_Q_TINY)
    np.testing.assert_array_equal(cal.predict_from_neighbors(nb), cal.predict_proba(_Q_TINY))
    cal = CalibratedPredictor(KNNPredictor(), n_folds=3).fit(data["Xtr"], data["Ytr"])
    g = cal.predict_proba(data["Xte"])
    assert np.isfinite(g).all()
    assert _log_loss(g, data["Yte"]) < _log_loss(KNNPredictor().fit(data["Xtr"], data["Ytr"]).predict_proba(data["Xte"]), data["Yte"])


# ------------------------------------------------------------------ state, registry
def _save_and_load(params, arrays, folder):
    """Through JSON and plain .npy files, pickles refused both ways."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "params.json").write_text(json.dumps(params, allow_nan=False))
    for name, arr in arrays.items():
        assert arr.dtype in (np.float32, np.float64, np.float16), (name, arr.dtype)
        np.save(folder / f"{name}.npy", arr, allow_pickle=False)
    params = json.loads((folder / "params.json").read_text())
    arrays = {p.stem: np.load(p, allow_pickle=False) for p in folder.glob("*.npy")}
    return params, arrays


def test_round_trip_every_predictor(data, fitted, tmp_path):
    Xte = data["Xte"]
    cases = dict(fitted)
    cases["calibrated_knn"] = CalibratedPredictor(KNNPredictor(), n_folds=3).fit(data["Xtr"], data["Ytr"])
    cases["calibrated_mlp"] = CalibratedPredictor(MLPPredictor(max_epochs=3), n_folds=2).fit(data["Xtr"], data["Ytr"])
    for name, est in cases.items():
        params, arrays = _save_and_load(*est.to_state(), tmp_path / name)
        restored = predictor_from_state(params, arrays)
        assert type(restored) is type(est)
        assert restored.get_params().keys() == est.get_params().keys()
        np.testing.assert_array_equal(restored.predict_proba(Xte), est.predict_proba(Xte), err_msg=name)
    # a restored network keeps its training record
    r = predictor_from_state(*cases["mlp"].to_state())
    assert r.best_epoch_ == cases["mlp"].best_epoch_ and r.history_ == cases["mlp"].history_


@pytest.mark.parametrize("name", ["knn", "knn_shrunk"])
def test_knn_state_without_index(data, fitted, tmp_path, name):
    est = fitted[name]
    params, arrays = _save_and_load(*est.to_state(include_index=False), tmp_path)
    assert "X_" not in arrays and "Y_" not in arrays
    with pytest.raises(ValueError, match="index"):
        predictor_from_state(params, arrays)
    # the bundle's index files: embeddings (here float32) and labels float32
    index = (est.X_.astype(np.float32), est.Y_.astype(np.float32))
    restored = predictor_from_state(params, arrays, index=index)
    np.testing.assert_array_equal(restored.predict_proba(data["Xte"]), est.predict_proba(data["Xte"]))
    with pytest.raises(ValueError, match="fitted on"):
        predictor_from_state(params, arrays, index=(index[0][:10], index[1][:10]))
    # a float16 index predicts within float16 precision
    half = predictor_from_state(*est.to_state(index_dtype="float16"))
    assert half.X_.dtype == np.float32
    diff = np.abs(half.predict_proba(data["Xte"]) - est.predict_proba(data["Xte"]))
    assert np.nanmean(diff) < 0.01
    # calibrated kNN: the index passes through to the base
    cal = CalibratedPredictor(est, n_folds=2).fit(data["Xtr"], data["Ytr"])
    p, a = cal.to_state(include_index=False)
    assert not any(k.endswith(("X_", "Y_")) for k in a)
    np.testing.assert_array_equal(
        predictor_from_state(p, a, index=index).predict_proba(data["Xte"]), cal.predict_proba(data["Xte"])
    )


def test_restoring_and_predicting_never_imports_torch(data, fitted, tmp_path):
    for name in ("mlp", "factorized", "knn"):
        _save_and_load(*fitted[name].to_state(), tmp_path / name)
    np.save(tmp_path / "queries.npy", data["Xte"], allow_pickle=False)
    code = f"""
import json, sys
from pathlib import Path
import numpy as np
from benchroute.transforms.predictors import predictor_from_state
root = Path({str(tmp_path)!r})
Q = np.load(root / "queries.npy", allow_pickle=False)
for name in ("mlp", "factorized", "knn"):
    params = json.loads((root / name / "params.json").read_text())
    arrays = {{p.stem: np.load(p, allow_pickle=False) for p in (root / name).glob("*.npy")}}
    np.save(root / name / "pred.out.npy", predictor_from_state(params, arrays).predict_proba(Q))
assert "torch" not in sys.modules, "torch was imported"
print("ok")
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr
    for name in ("mlp", "factorized", "knn"):
        # Another process may split BLAS work over another number of threads: equal to float32
        # precision (in one process the round trip is bit-identical, test above).
        np.testing.assert_allclose(
            np.load(tmp_path / name / "pred.out.npy", allow_pickle=False), fitted[name].predict_proba(data["Xte"]),
            rtol=1e-5, atol=1e-7,
        )


def test_registry_make_predictor_and_clone():
    assert set(PREDICTORS) == {"knn", "knn_shrunk", "mlp", "factorized", "mlp_calibrated",
                               "factorized_calibrated"}
    assert isinstance(make_predictor("mlp_calibrated", hidden=8).base, MLPPredictor)
    assert isinstance(make_predictor("knn"), KNNPredictor)
    est = make_predictor("mlp", hidden=64, dropout=0.0)
    assert isinstance(est, MLPPredictor) and est.hidden == 64 and est.dropout == 0.0
    with pytest.raises(ValueError, match="factorized, factorized_calibrated, knn, knn_shrunk, mlp, mlp_calibrated"):
        make_predictor("forest")
    with pytest.raises(ValueError, match="rank"):
        make_predictor("factorized", depth=3)
    cal = CalibratedPredictor(MLPPredictor(hidden=8), n_folds=3)
    twin = clone(cal)
    assert twin is not cal and twin.base is not cal.base
    assert twin.get_params()["n_folds"] == 3 and twin.base.get_params() == cal.base.get_params()
    assert repr(twin.base) == repr(cal.base)


def test_unfitted_and_wrong_dimension_errors(data, fitted):
    for name in PREDICTORS:
        with pytest.raises(NotFittedError):
            make_predictor(name).predict_proba(data["Xte"])
    for name in fitted:
        with pytest.raises(ValueError, match="32-d"):
            fitted[name].predict_proba(data["Xte"][:, :16])
    with pytest.raises(ValueError, match="labels must lie"):
        KNNPredictor().fit(data["Xtr"], data["Ytr"] * 2)


def test_every_predictor_stores_without_its_index_by_one_call(data):
    """A bundle stores the kNN index once and calls ``to_state(include_index=False)`` on whatever
    predictor it holds, a network or a calibrated one around a network included."""
    for name in ("mlp", "mlp_calibrated", "knn_shrunk"):
        est = make_predictor(name, **({} if name.startswith("knn") else {"hidden": 8, "max_epochs": 3}))
        est.fit(data["Xtr"], data["Ytr"])
        params, arrays = est.to_state(include_index=False)
        restored = predictor_from_state(params, arrays, index=(est_index(est)))
        np.testing.assert_allclose(restored.predict_proba(data["Xte"]), est.predict_proba(data["Xte"]))


def est_index(est):
    """The (X, Y) index a bundle would pass back (only kNN predictors use it)."""
    base = getattr(est, "base_", est)
    return (base.X_, base.Y_) if hasattr(base, "X_") else None
