"""Strong/weak routers: P(the strong model is needed | query) for any pair of models (docs/method.md#pair-routers).

Every router follows one interface (scikit-learn conventions, as ``transforms.predictors``):
hyper-parameters only in ``__init__``; ``fit(X, data, pair=None)`` learns from query embeddings
``X`` (n × d, rows L2-normalised here) and a ``transforms.pair_labels.WinData`` aligned to them
(qualities Q and correctness Y of M models) and returns ``self``; ``predict_proba(X, strong=None,
weak=None)`` returns (n,) float64 scores in [0, 1], higher = send to the strong model, for the
pair named (model names or column indices; default: the ``pair`` given to ``fit``). The
decision is ``score >= alpha`` (RouteLLM's rule); ``transforms.pair_calibration`` chooses alpha.

- ``SWRankingRouter``: similarity-weighted Bradley–Terry, no training (RouteLLM's SW ranking). For
  a query q, every training comparison i (an input where two models both have a result) gets
  weight w_i = γ^(1 + S_i), S_i = cos(q, q_i) / max_j cos(q, q_j) (RouteLLM normalises by the
  query's best similarity over the training prompts), γ = 10; strengths ξ maximise the weighted
  Bradley–Terry log-likelihood with ties as half a win each (RouteLLM's ``compute_elo_mle_with_tie``)
  plus a ridge of ``reg`` average-weight comparisons; P = σ(ξ_strong − ξ_weak). The comparisons are
  those among the pair and up to ``n_bridge`` *bridge* models (those with most inputs in common
  with both), so a pair that rarely ran on the same inputs is linked through models that ran with
  each (RouteLLM links its pair through the whole arena, grouped in tiers). Batched Newton steps.
- ``MFRouter``: RouteLLM's matrix factorisation s(m, q) = w2ᵀ(v̂_m ⊙ (W1ᵀ v_q + b)), v̂_m the
  L2-normalised model vector; P(a beats b | q) = σ(s(a, q) − s(b, q)), trained with BCE on every
  comparison among the training models (ties dropped, as RouteLLM; ``weighting="input"``, the
  default: each input weighs 1 however many models ran on it, so a benchmark with 28 models does
  not drown a pair's own comparisons; with it, APGR .61 on ``mmlu+10%`` of benchmarks/pair_routers.py,
  .48 on MMLU never seen), torch on
  CPU, seeded, AdamW, early stopping on the comparisons of a held-out ``val_fraction`` of the
  *inputs*. Exported to
  numpy (W1, b, v̂, w2); fitted and restored routers predict with the same numpy pass.
- ``DiffRouter``: our correctness predictors (``transforms.predictors``, any registry name):
  score = (1 + ĝ_strong − ĝ_weak)/2, which is exactly P(strong wins) + ½·P(tie) for 0/1 labels
  and orders queries by the expected gain of the strong model. A NaN ĝ (no labelled neighbour)
  falls back to the model's training accuracy.
- ``IRTRouter``: item-response difficulty. A Rasch model P(y = 1) = σ(θ_m − β_i) fitted (MAP,
  Newton) on every training model's correctness labels gives each model an ability and each
  training input a difficulty; a query's difficulty is the information-weighted mean over its
  nearest training inputs, and the score is the strong model's expected gain at that difficulty,
  (1 + σ(θ_s − β) − σ(θ_w − β))/2. The difficulty is learned from all models (28 on MMLU-Pro),
  so the router needs no label of the pair on the kind of question it routes.
- ``EnsembleRouter``: the mean of member routers' scores, each rank-normalised by its empirical
  CDF on a fixed reference sample of training inputs (a query's score does not depend on its
  batch).
- ``RandomRouter``: a uniform score drawn from a hash of the (rounded) embedding and the seed:
  the same query always gets the same score; the baseline whose APGR is 0.5 in expectation.
- ``OracleRouter``: memorises the inputs it was fitted on and scores a query found among them
  (cosine ≥ 1 − 1e-4) by (1 + (q_strong − q_weak)/range)/2: strong-better first, ties in the
  middle, weak-better last. The evaluation's upper bound (fit it on the held-out labels).

Storage without pickles: ``to_state()`` gives ``(params, arrays)`` (JSON-able dict and named
numpy arrays) and ``pair_router_from_state(params, arrays, index=None)`` rebuilds a router that
predicts identically, without torch. The SW and oracle routers' state is their index (X, Q);
``to_state(include_index=False)`` leaves it out so a bundle that stores the index passes it back
as ``index=(X, Q)``; the diff router's predictor follows ``transforms.predictors`` (a kNN
predictor's index is the rows ``rows_`` and columns ``cols_`` of (X, Y)).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from benchroute.transforms.knn import normalize_rows
from benchroute.transforms.pair_labels import TIES, PairError, WinData, bridge_models, colabel_counts
from benchroute.transforms.predictors import (
    _jsonable,
    make_predictor,
    predictor_from_state,
    seeded_torch,
    sigmoid,
    train_early_stopping,
    validation_split,
)

STATE_FORMAT = 1
SIM_BLOCK_BYTES = 64 * 2**20  # one block of float32 similarities in the SW router


class NotFittedError(RuntimeError):
    """``predict_proba`` / ``to_state`` on a router that was never fitted."""


class PairRouter:
    """Shared plumbing: parameters, pair resolution, the state envelope."""

    def get_params(self) -> dict:
        import inspect

        sig = inspect.signature(type(self).__init__)
        return {n: getattr(self, n) for n in sig.parameters if n != "self"}

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in self.get_params().items())})"

    def _check_fitted(self) -> None:
        if not hasattr(self, "models_"):
            raise NotFittedError(f"{type(self).__name__} is not fitted; call fit(X, data) first")

    def _fit_common(self, X: np.ndarray, data: WinData, pair) -> np.ndarray:
        X = normalize_rows(X)
        if X.shape[0] != len(data.input_ids):
            raise ValueError(f"{X.shape[0]} embeddings for {len(data.input_ids)} inputs")
        self.models_ = list(data.models)
        self.n_features_in_ = int(X.shape[1])
        self.pair_ = None
        if pair is not None:
            s, w = (data.model_index(m) for m in pair)
            if s == w:
                raise PairError("strong and weak must be two different models")
            self.pair_ = (self.models_[s], self.models_[w])
        return X

    def pair_indices(self, strong=None, weak=None) -> tuple[int, int]:
        """Column indices of (strong, weak): names or indices, default the fitted pair."""
        self._check_fitted()
        if strong is None and weak is None:
            if self.pair_ is None:
                raise PairError(f"{type(self).__name__} was fitted without a pair: name strong and weak")
            strong, weak = self.pair_
        if strong is None or weak is None:
            raise PairError("give both strong and weak (or neither, for the fitted pair)")
        idx = []
        for m in (strong, weak):
            if isinstance(m, (int, np.integer)):
                if not 0 <= int(m) < len(self.models_):
                    raise PairError(f"model index {m} out of range ({len(self.models_)} models)")
                idx.append(int(m))
            elif m in self.models_:
                idx.append(self.models_.index(m))
            else:
                raise PairError(f"unknown model {m!r}; this router knows {len(self.models_)} models")
        if idx[0] == idx[1]:
            raise PairError("strong and weak must be two different models")
        return idx[0], idx[1]

    def _X(self, X) -> np.ndarray:
        X = normalize_rows(X)
        if X.shape[1] != self.n_features_in_:
            raise ValueError(f"{type(self).__name__} was fitted on {self.n_features_in_}-d embeddings, "
                             f"got {X.shape[1]}-d")
        return X

    def _state(self, fitted: dict) -> dict:
        self._check_fitted()
        return {
            "format": STATE_FORMAT,
            "class": type(self).__name__,
            "params": _jsonable(self.get_params()),
            "fitted": {"models": list(self.models_), "pair": list(self.pair_) if self.pair_ else None,
                       "n_features_in_": int(self.n_features_in_), **fitted},
        }

    @classmethod
    def _new_from_state(cls, params: Mapping) -> PairRouter:
        est = cls(**dict(params["params"]))
        f = params["fitted"]
        est.models_ = list(f["models"])
        est.pair_ = tuple(f["pair"]) if f.get("pair") else None
        est.n_features_in_ = int(f["n_features_in_"])
        return est


def _index_from(cls, params, arrays, index) -> tuple[np.ndarray, np.ndarray]:
    if index is not None:
        X, Q = index
    elif "X_" in arrays and "Q_" in arrays:
        X, Q = arrays["X_"], arrays["Q_"]
    else:
        raise ValueError(f"the {cls.__name__} state holds no index: pass index=(X, Q)")
    X = np.ascontiguousarray(X, np.float32)
    norms = np.sqrt(np.einsum("ij,ij->i", X, X))
    if X.size and np.max(np.abs(norms[norms > 0] - 1.0), initial=0.0) > 1e-3:
        X = normalize_rows(X)  # rows as fitted: L2-normalised (normalised rows are kept bit for bit)
    Q = np.asarray(Q, np.float32)
    f = params["fitted"]
    if X.shape != (f["n_index"], f["n_features_in_"]) or Q.shape != (f["n_index"], len(f["models"])):
        raise ValueError(f"index X {X.shape}, Q {Q.shape}; the router was fitted on {f['n_index']} rows "
                         f"of {f['n_features_in_']}-d embeddings and {len(f['models'])} models")
    return X, Q


# ------------------------------------------------------------------------------ SW ranking
def bradley_terry(C: np.ndarray, lam, max_iter: int = 50, tol: float = 1e-9) -> np.ndarray:
    """Strengths ξ (B × K) maximising Σ_ab C_ab·log σ(ξ_a − ξ_b) − (λ/2)·Σ_a ξ_a² for each of B
    weighted win matrices C (B × K × K, C_ab = weighted wins of a over b, ties already split in
    halves). Batched Newton steps (the objective is strictly concave), steps capped at 4."""
    C = np.asarray(C, np.float64)
    Bn, K, _ = C.shape
    lam = np.broadcast_to(np.asarray(lam, np.float64), (Bn,))
    N = C + C.transpose(0, 2, 1)
    xi = np.zeros((Bn, K))
    diag = np.arange(K)
    for _ in range(max_iter):
        P = sigmoid(xi[:, :, None] - xi[:, None, :])
        g = (C - N * P).sum(axis=2) - lam[:, None] * xi
        Wm = N * P * (1.0 - P)
        H = Wm.copy()
        H[:, diag, diag] = -Wm.sum(axis=2) - lam[:, None]
        step = np.linalg.solve(H, g[..., None])[..., 0]
        step = np.clip(step, -4.0, 4.0)
        xi = xi - step
        if np.max(np.abs(step)) < tol:
            break
    return xi


class SWRankingRouter(PairRouter):
    """Similarity-weighted Bradley–Terry ranking (see the module docstring)."""

    def __init__(self, gamma: float = 10.0, n_bridge: int = 8, min_colabels: int = 20, reg: float = 1.0,
                 max_iter: int = 50, tie_eps: float = 0.0):
        self.gamma = gamma
        self.n_bridge = n_bridge
        self.min_colabels = min_colabels
        self.reg = reg
        self.max_iter = max_iter
        self.tie_eps = tie_eps

    def fit(self, X: np.ndarray, data: WinData, pair=None) -> SWRankingRouter:
        if not self.gamma > 1:
            raise ValueError(f"gamma must be > 1, got {self.gamma!r}")
        X = self._fit_common(X, data, pair)
        self._set_index(X, data.Q)
        return self

    def _set_index(self, X, Q) -> None:
        self.X_ = np.ascontiguousarray(X, np.float32)
        self.Q_ = np.asarray(Q, np.float32)
        self._cache: dict = {}
        self._colabels = None

    def comparisons(self, strong: int, weak: int) -> tuple[list[int], np.ndarray, np.ndarray]:
        """(models, rows, W): the pair and its bridges, the index rows where at least two of them
        have a result, and W (rows × K·K) with W[i, a·K + b] = 1 if a beat b on row i, ½ for a
        tie, 0 otherwise."""
        key = (strong, weak)
        if key not in self._cache:
            if self._colabels is None:
                self._colabels = colabel_counts(self.Q_)
            S = bridge_models(self.Q_, strong, weak, self.n_bridge, self.min_colabels, counts=self._colabels)
            Qs = self.Q_[:, S].astype(np.float64)
            have = ~np.isnan(Qs)
            rows = np.flatnonzero(have.sum(axis=1) >= 2)
            Qr, Hr = Qs[rows], have[rows]
            d = Qr[:, :, None] - Qr[:, None, :]
            both = Hr[:, :, None] & Hr[:, None, :]
            W = np.where(both, np.where(d > self.tie_eps, 1.0, np.where(d < -self.tie_eps, 0.0, 0.5)), 0.0)
            K = len(S)
            W[:, np.arange(K), np.arange(K)] = 0.0
            self._cache = {key: (S, rows, W.reshape(rows.size, K * K).astype(np.float32))}  # one pair at a time
        return self._cache[key]

    def win_matrices(self, X: np.ndarray, strong: int, weak: int) -> tuple[np.ndarray, np.ndarray]:
        """(C, mean weight): the similarity-weighted win matrices (n × K × K) of each query."""
        S, rows, W = self.comparisons(strong, weak)
        K = len(S)
        n = X.shape[0]
        C = np.zeros((n, K, K))
        wbar = np.ones(n)
        if rows.size == 0:
            return C, wbar
        Xi = self.X_[rows]
        step = max(1, int(SIM_BLOCK_BYTES // (4 * rows.size)))
        log_g = np.float32(math.log(self.gamma))
        for s in range(0, n, step):
            sims = X[s:s + step] @ Xi.T
            mx = sims.max(axis=1, keepdims=True)
            norm = np.where(mx > 0, sims / np.where(mx > 0, mx, 1), sims)
            w = np.exp(log_g * (1.0 + norm))
            C[s:s + step] = (w @ W).reshape(-1, K, K)
            wbar[s:s + step] = w.mean(axis=1)
        return C, wbar

    def predict_proba(self, X: np.ndarray, strong=None, weak=None) -> np.ndarray:
        s, w = self.pair_indices(strong, weak)
        X = self._X(X)
        C, wbar = self.win_matrices(X, s, w)
        if not C.any():
            return np.full(X.shape[0], 0.5)
        xi = bradley_terry(C, self.reg * wbar, self.max_iter)
        return sigmoid(xi[:, 0] - xi[:, 1])

    def to_state(self, include_index: bool = True, index_dtype: str = "float32"):
        params = self._state({"n_index": int(self.X_.shape[0]), "include_index": bool(include_index)})
        arrays = {"X_": self.X_.astype(index_dtype), "Q_": self.Q_.astype(np.float32)} if include_index else {}
        return params, arrays

    @classmethod
    def _from_state(cls, params, arrays, index=None):
        est = cls._new_from_state(params)
        est._set_index(*_index_from(cls, params, arrays, index))
        return est


# ------------------------------------------------------------------------------ MF
class MFRouter(PairRouter):
    """RouteLLM's matrix factorisation (see the module docstring)."""

    def __init__(self, dim: int = 64, lr: float = 3e-3, weight_decay: float = 1e-5, noise: float = 0.0,
                 max_epochs: int = 100, patience: int = 5, batch_size: int = 128, val_fraction: float = 0.1,
                 ties: str = "drop", tie_eps: float = 0.0, weighting: str = "input", seed: int = 0):
        self.dim = dim
        self.lr = lr
        self.weight_decay = weight_decay
        self.noise = noise
        self.max_epochs = max_epochs
        self.patience = patience
        self.batch_size = batch_size
        self.val_fraction = val_fraction
        self.ties = ties
        self.tie_eps = tie_eps
        self.weighting = weighting
        self.seed = seed

    def fit(self, X: np.ndarray, data: WinData, pair=None) -> MFRouter:
        import torch

        if self.ties not in TIES:
            raise ValueError(f"ties must be one of {TIES}, got {self.ties!r}")
        if self.weighting not in ("comparison", "input"):
            raise ValueError(f"weighting must be 'comparison' or 'input', got {self.weighting!r}")
        if self.max_epochs < 1 or self.batch_size < 1 or self.patience < 1 or self.dim < 1:
            raise ValueError("dim, max_epochs, batch_size and patience must be >= 1")
        if not 0 <= self.val_fraction < 1:
            raise ValueError(f"val_fraction must be in [0, 1), got {self.val_fraction!r}")
        X = self._fit_common(X, data, pair)
        Q = np.asarray(data.Q, np.float64)
        usable = np.flatnonzero((~np.isnan(Q)).sum(axis=1) >= 2)  # a row with one result compares nothing
        rng = np.random.default_rng(self.seed)
        val_rows, train_rows = validation_split(rng, usable, self.val_fraction)
        self.n_comparable_rows_ = int(usable.size)
        with seeded_torch(self.seed):
            self._train(torch, X, Q, train_rows, val_rows, rng)
        return self

    def _targets(self, torch, Qb):
        """(targets, mask) over ordered pairs (B × M × M) of a batch's qualities."""
        have = ~torch.isnan(Qb)
        d = Qb[:, :, None] - Qb[:, None, :]
        eps = float(self.tie_eps)
        t = torch.where(d > eps, 1.0, torch.where(d < -eps, 0.0, 0.5))
        mask = have[:, :, None] & have[:, None, :]
        M = Qb.shape[1]
        mask &= ~torch.eye(M, dtype=torch.bool)[None]
        tie = t == 0.5
        if self.ties == "drop":
            mask &= ~tie
        elif self.ties == "weak":
            t = torch.where(tie, 0.0, t)  # a tie: neither model "needed" over the other
        return torch.nan_to_num(t, nan=0.0), mask

    def _train(self, torch, X, Q, train_rows, val_rows, rng) -> None:
        nn, F = torch.nn, torch.nn.functional
        d, M, k = X.shape[1], Q.shape[1], int(self.dim)

        class MF(nn.Module):
            def __init__(self):
                super().__init__()
                self.text_proj = nn.Linear(d, k)  # W1ᵀ v_q + b
                self.P = nn.Parameter(torch.randn(M, k) / math.sqrt(k))
                self.w2 = nn.Parameter(torch.randn(k) / math.sqrt(k))

            def forward(self, x):
                h = self.text_proj(x)
                U = F.normalize(self.P, p=2, dim=1) * self.w2
                return h @ U.T  # s(m, q), B × M

        module = MF()
        opt = torch.optim.AdamW(module.parameters(), lr=self.lr, weight_decay=self.weight_decay)
        Xt = torch.from_numpy(np.ascontiguousarray(X, np.float32))
        Qt = torch.from_numpy(Q.astype(np.float32))

        def batch_loss(rows_t, noise: bool):
            xb = Xt[rows_t]
            if noise and self.noise:
                xb = xb + torch.randn_like(xb) * float(self.noise)
            s = module(xb)
            t, m = self._targets(torch, Qt[rows_t])
            logit = s[:, :, None] - s[:, None, :]
            m = m.to(logit.dtype)
            if self.weighting == "input":  # every input weighs 1, shared by its comparisons
                m = m / m.sum(dim=(1, 2), keepdim=True).clamp_min(1.0)
            bce = F.binary_cross_entropy_with_logits(logit, t, reduction="none") * m
            return bce.sum(), m.sum()

        def train_loss(rows_t):
            loss_sum, n_pairs = batch_loss(rows_t, True)
            if float(n_pairs) == 0:
                return None
            return loss_sum / n_pairs, loss_sum, n_pairs

        def val_loss():
            vs, vn = 0.0, 0.0
            for s in range(0, val_rows.size, 1024):
                a, b = batch_loss(torch.from_numpy(val_rows[s:s + 1024]), False)
                vs += float(a)
                vn += float(b)
            return vs / vn if vn else math.nan

        history, best_epoch = train_early_stopping(
            module, opt, rng, train_rows, val_rows, max_epochs=self.max_epochs, patience=self.patience,
            batch_size=self.batch_size, batch_loss=train_loss, val_loss=val_loss, min_delta=1e-6,
        )
        with torch.no_grad():
            self.W1_ = module.text_proj.weight.detach().numpy().T.copy().astype(np.float32)
            self.b1_ = module.text_proj.bias.detach().numpy().copy().astype(np.float32)
            self.V_ = F.normalize(module.P, p=2, dim=1).detach().numpy().copy().astype(np.float32)
            self.w2_ = module.w2.detach().numpy().copy().astype(np.float32)
        self.history_ = history
        self.best_epoch_ = int(best_epoch)
        self.n_epochs_ = len(history["train"])

    def scores(self, X: np.ndarray) -> np.ndarray:
        """s(m, q) (n × M, float32) from the numpy forward pass."""
        self._check_fitted()
        h = self._X(X) @ self.W1_ + self.b1_
        return h @ (self.V_ * self.w2_).T

    def predict_proba(self, X: np.ndarray, strong=None, weak=None) -> np.ndarray:
        s, w = self.pair_indices(strong, weak)
        h = self._X(X) @ self.W1_ + self.b1_
        u = (self.V_[s] - self.V_[w]) * self.w2_
        return sigmoid((h @ u).astype(np.float64))

    def to_state(self, include_index: bool = True, index_dtype: str = "float32"):
        params = self._state({
            "best_epoch_": self.best_epoch_, "n_epochs_": self.n_epochs_,
            "history_": {k: [None if v is None or not math.isfinite(v) else float(v) for v in vals]
                         for k, vals in self.history_.items()},
        })
        return params, {"W1_": self.W1_, "b1_": self.b1_, "V_": self.V_, "w2_": self.w2_}

    @classmethod
    def _from_state(cls, params, arrays, index=None):
        est = cls._new_from_state(params)
        for k in ("W1_", "b1_", "V_", "w2_"):
            setattr(est, k, np.ascontiguousarray(arrays[k], np.float32))
        f = params["fitted"]
        est.best_epoch_, est.n_epochs_ = int(f["best_epoch_"]), int(f["n_epochs_"])
        est.history_ = dict(f["history_"])
        return est


# ------------------------------------------------------------------------------ ĝ difference
class DiffRouter(PairRouter):
    """(1 + ĝ_strong − ĝ_weak) / 2 from a ``transforms.predictors`` predictor (see module doc).

    ``models="pair"``: the predictor is fitted on the pair's two columns over the inputs where
    either has a label (the pair given to ``fit`` is required, and only it can be asked for);
    ``"all"``: on every model's column (any pair)."""

    def __init__(self, predictor: str = "knn_shrunk", predictor_params: Mapping | None = None,
                 models: str = "pair", impute: bool = False, impute_min: int = 50):
        self.predictor = predictor
        self.predictor_params = predictor_params
        self.models = models
        self.impute = impute
        self.impute_min = impute_min

    def fit(self, X: np.ndarray, data: WinData, pair=None) -> DiffRouter:
        if self.models not in ("pair", "all"):
            raise ValueError(f"models must be 'pair' or 'all', got {self.models!r}")
        if self.models == "pair" and pair is None:
            raise PairError("DiffRouter(models='pair') needs the pair to fit")
        X = self._fit_common(X, data, pair)
        if self.models == "pair":
            cols = np.array([data.model_index(m) for m in self.pair_], np.int64)
        else:
            cols = np.arange(len(data.models), dtype=np.int64)
        Y = data.Y[:, cols]
        self.proxies_ = {}
        if self.impute and self.pair_ is not None:
            Y = self._impute(data, cols, Y)
        rows = np.flatnonzero((~np.isnan(Y)).any(axis=1))
        if rows.size == 0:
            raise PairError("no training input has a label for these models")
        self.cols_, self.rows_ = cols, rows
        self.predictor_ = make_predictor(self.predictor, **dict(self.predictor_params or {})).fit(X[rows], Y[rows])
        with np.errstate(invalid="ignore"):
            self.prior_ = np.nanmean(np.where(np.isnan(Y[rows]), np.nan, Y[rows]), axis=0)
        return self

    def _impute(self, data: WinData, cols: np.ndarray, Y: np.ndarray) -> np.ndarray:
        """Y with each of the fitted pair's columns filled, where it has no label, by its *proxy*:
        the model of closest Rasch ability (``fit_irt`` on all labels; abilities are linked
        through the inputs models share) among those with ≥ ``impute_min`` labels where the pair
        model has none. A model that never ran on a kind of question (gpt-4-1106-preview on
        MMLU-like questions in this store) then borrows the labels of the model that is as good
        overall (`proxies_`: pair model → proxy)."""
        Yall = np.asarray(data.Y, np.float64)
        labelled = ~np.isnan(Yall)
        theta, _, _ = fit_irt(Yall[labelled.any(axis=1)])
        Y = Y.copy()
        for name in self.pair_:
            m = data.model_index(name)
            missing = ~labelled[:, m]
            gain = (labelled & missing[:, None]).sum(axis=0)
            ok = gain >= int(self.impute_min)
            ok[m] = False
            if not ok.any():
                continue
            j = int(np.flatnonzero(ok)[np.argmin(np.abs(theta[ok] - theta[m]))])
            self.proxies_[name] = data.models[j]
            c = int(np.flatnonzero(cols == m)[0])
            fill = missing & labelled[:, j]
            Y[fill, c] = Yall[fill, j]
        return Y

    def predict_proba(self, X: np.ndarray, strong=None, weak=None) -> np.ndarray:
        s, w = self.pair_indices(strong, weak)
        pos = {int(c): j for j, c in enumerate(self.cols_)}
        if s not in pos or w not in pos:
            raise PairError(f"this DiffRouter was fitted for {self.pair_} only")
        G = np.asarray(self.predictor_.predict_proba(self._X(X)), np.float64)[:, [pos[s], pos[w]]]
        G = np.where(np.isnan(G), np.nan_to_num(self.prior_[[pos[s], pos[w]]], nan=0.5)[None, :], G)
        return np.clip(0.5 * (1.0 + G[:, 0] - G[:, 1]), 0.0, 1.0)

    def to_state(self, include_index: bool = True, index_dtype: str = "float32"):
        if getattr(self, "proxies_", None):
            include_index = True  # imputed labels: the bundle's index (X, Y) is not what was fitted
        p_params, p_arrays = self.predictor_.to_state(include_index=include_index, index_dtype=index_dtype)
        params = self._state({"predictor_state": p_params, "n_rows": int(self.rows_.size),
                              "proxies_": dict(getattr(self, "proxies_", {}))})
        arrays = {"rows_": self.rows_.astype(np.int64), "cols_": self.cols_.astype(np.int64),
                  "prior_": np.asarray(self.prior_, np.float64)}
        arrays.update({f"predictor.{k}": v for k, v in p_arrays.items()})
        return params, arrays

    @classmethod
    def _from_state(cls, params, arrays, index=None):
        """``index``: (X, Y) of the whole training data (the rows and columns are taken from it)
        for a kNN predictor stored without its index."""
        est = cls._new_from_state(params)
        est.rows_ = np.asarray(arrays["rows_"], np.int64)
        est.cols_ = np.asarray(arrays["cols_"], np.int64)
        est.prior_ = np.asarray(arrays["prior_"], np.float64)
        est.proxies_ = dict(params["fitted"].get("proxies_", {}))
        p_arrays = {k[len("predictor."):]: v for k, v in arrays.items() if k.startswith("predictor.")}
        sub = None
        if index is not None:
            X, Y = index
            sub = (np.asarray(X)[est.rows_], np.asarray(Y)[est.rows_][:, est.cols_])
        est.predictor_ = predictor_from_state(params["fitted"]["predictor_state"], p_arrays, index=sub)
        return est


# ------------------------------------------------------------------------------ IRT difficulty
def fit_irt(Y: np.ndarray, reg_item: float = 1.0, reg_model: float = 0.01, max_iter: int = 200,
            tol: float = 1e-6) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A Rasch (1PL) item-response model of the labels: P(y_im = 1) = σ(θ_m − β_i) over the
    entries of ``Y`` (n × M, values in [0, 1], NaN = none), ridge penalties ``reg_item``·β²/2 and
    ``reg_model``·θ²/2 (maximum a posteriori). Alternating exact Newton steps (each β_i, θ_m is a
    one-dimensional concave problem). Returns (θ (M,), β (n,), information of β (n,) = Σ_m
    p(1 − p) + reg_item, the precision a β estimate carries)."""
    Y = np.asarray(Y, np.float64)
    have = ~np.isnan(Y)
    Yz = np.where(have, Y, 0.0)
    H = have.astype(np.float64)
    n, M = Y.shape
    theta, beta = np.zeros(M), np.zeros(n)
    for _ in range(int(max_iter)):
        P = sigmoid(theta[None, :] - beta[:, None]) * H
        W = P * (1.0 - P)
        gb = (P - Yz).sum(axis=1) - reg_item * beta
        hb = W.sum(axis=1) + reg_item
        sb = np.clip(gb / hb, -2.0, 2.0)
        beta = beta + sb
        P = sigmoid(theta[None, :] - beta[:, None]) * H
        W = P * (1.0 - P)
        gt = (Yz - P).sum(axis=0) - reg_model * theta
        ht = W.sum(axis=0) + reg_model
        st = np.clip(gt / ht, -2.0, 2.0)
        theta = theta + st
        if max(np.max(np.abs(sb), initial=0.0), np.max(np.abs(st), initial=0.0)) < tol:
            break
    P = sigmoid(theta[None, :] - beta[:, None]) * H
    info = (P * (1.0 - P)).sum(axis=1) + reg_item
    return theta, beta, info


class IRTRouter(PairRouter):
    """Item-response difficulty: a Rasch model fitted on every model's correctness labels
    (``fit_irt``: ability θ_m per model, difficulty β_i per training input); a query's difficulty
    β(q) is the information-weighted mean β of its ``n_neighbors`` nearest training inputs, shrunk
    to the mean difficulty with ``shrink`` inputs' worth of information; the score is
    (1 + σ(θ_s − β(q)) − σ(θ_w − β(q)))/2, the expected gain of the strong model on a question of
    that difficulty. The input difficulty is learned from all models (28 on MMLU-Pro), which the
    pair's own labels cannot give on a benchmark they never ran; the pair's abilities come from
    wherever either ran, linked to the others through the shared inputs. The index (X, β, info)
    is the state."""

    def __init__(self, n_neighbors: int = 20, reg_item: float = 1.0, reg_model: float = 0.01,
                 shrink: float = 1.0, max_iter: int = 200):
        self.n_neighbors = n_neighbors
        self.reg_item = reg_item
        self.reg_model = reg_model
        self.shrink = shrink
        self.max_iter = max_iter

    def fit(self, X: np.ndarray, data: WinData, pair=None) -> IRTRouter:
        if self.n_neighbors < 1:
            raise ValueError("n_neighbors must be >= 1")
        if not (self.reg_item > 0 and self.reg_model > 0 and self.shrink >= 0):
            raise ValueError("reg_item and reg_model must be > 0, shrink >= 0")
        X = self._fit_common(X, data, pair)
        Y = np.asarray(data.Y, np.float64)
        rows = np.flatnonzero((~np.isnan(Y)).any(axis=1))
        if rows.size == 0:
            raise PairError("no training input has a label")
        theta, beta, info = fit_irt(Y[rows], self.reg_item, self.reg_model, self.max_iter)
        self.theta_ = theta
        self._set_index(X[rows], beta, info)
        return self

    def _set_index(self, X, beta, info) -> None:
        self.X_ = np.ascontiguousarray(X, np.float32)
        self.beta_ = np.asarray(beta, np.float64)
        self.info_ = np.asarray(info, np.float64)
        self.beta_mean_ = float(np.average(self.beta_, weights=self.info_)) if self.beta_.size else 0.0
        self.info_mean_ = float(self.info_.mean()) if self.info_.size else 1.0

    def difficulty(self, X: np.ndarray) -> np.ndarray:
        """β(q) (n,) of each query (see the class doc)."""
        from benchroute.transforms.knn import cosine_topk

        self._check_fitted()
        X = self._X(X)
        k = min(int(self.n_neighbors), self.X_.shape[0])
        nb = cosine_topk(X.astype(np.float32), self.X_, k)
        idx = nb.indices
        ok = idx >= 0
        j = np.where(ok, idx, 0)
        w = np.where(ok, self.info_[j], 0.0)
        a = float(self.shrink) * self.info_mean_
        return ((w * self.beta_[j]).sum(axis=1) + a * self.beta_mean_) / (w.sum(axis=1) + a)

    def predict_proba(self, X: np.ndarray, strong=None, weak=None) -> np.ndarray:
        s, w = self.pair_indices(strong, weak)
        b = self.difficulty(X)
        gain = sigmoid(self.theta_[s] - b) - sigmoid(self.theta_[w] - b)
        return np.clip(0.5 * (1.0 + gain), 0.0, 1.0)

    def to_state(self, include_index: bool = True, index_dtype: str = "float32"):
        params = self._state({"n_index": int(self.X_.shape[0])})
        return params, {"theta_": self.theta_, "X_": self.X_.astype(index_dtype), "beta_": self.beta_,
                        "info_": self.info_}

    @classmethod
    def _from_state(cls, params, arrays, index=None):
        est = cls._new_from_state(params)
        est.theta_ = np.asarray(arrays["theta_"], np.float64)
        X = np.ascontiguousarray(arrays["X_"], np.float32)
        if X.shape != (params["fitted"]["n_index"], est.n_features_in_):
            raise ValueError(f"index X {X.shape} does not match the fitted router")
        est._set_index(X, arrays["beta_"], arrays["info_"])
        return est


# ------------------------------------------------------------------------------ ensembles
def rank_cdf(ref: np.ndarray, p: np.ndarray) -> np.ndarray:
    """The empirical CDF of the sample ``ref`` at ``p``, continuous: the mid-rank share
    (below + ½·equal)/n at each distinct reference value, linear between them, 0 and 1 beyond
    (a score a rounding error away from a reference value moves by a rounding error)."""
    ref = np.sort(np.asarray(ref, np.float64))
    p = np.asarray(p, np.float64)
    if ref.size == 0:
        return np.full(p.shape, 0.5)
    u, first, counts = np.unique(ref, return_index=True, return_counts=True)
    at = (first + 0.5 * counts) / ref.size
    return np.interp(p, u, at, left=0.0, right=1.0)


class EnsembleRouter(PairRouter):
    """The mean of several routers' rank-normalised scores: each member's score is mapped
    through its empirical CDF on a fixed *reference* sample of ``n_reference`` training inputs
    (seeded; ``rank_cdf``), so members on different scales weigh alike
    (``weights``: relative weights, default equal) and a query's score never depends on the
    other queries of its batch. ``members``: ``[[key, params], ...]`` of ``PAIR_ROUTERS``. The
    state holds every member's state (prefixed ``m<i>.``) and the reference embeddings."""

    def __init__(self, members: Sequence = (("diff", {"predictor": "mlp", "models": "all"}), ("irt", {})),
                 weights: Sequence[float] | None = None, n_reference: int = 512, seed: int = 0):
        self.members = members
        self.weights = weights
        self.n_reference = n_reference
        self.seed = seed

    def _member_specs(self) -> list[tuple[str, dict]]:
        specs = [(str(k), dict(p or {})) for k, p in self.members]
        if not specs:
            raise ValueError("an ensemble needs at least one member")
        if any(k in ("ensemble", "oracle") for k, _ in specs):
            raise ValueError("ensemble members cannot be ensembles or oracles")
        if self.weights is not None and len(self.weights) != len(specs):
            raise ValueError(f"{len(self.weights)} weights for {len(specs)} members")
        return specs

    def fit(self, X: np.ndarray, data: WinData, pair=None) -> EnsembleRouter:
        specs = self._member_specs()
        X = self._fit_common(X, data, pair)
        self.members_ = [make_pair_router(k, **p).fit(X, data, pair) for k, p in specs]
        rng = np.random.default_rng(self.seed)
        n_ref = min(int(self.n_reference), X.shape[0])
        self.X_ref_ = np.ascontiguousarray(X[np.sort(rng.choice(X.shape[0], n_ref, replace=False))], np.float32)
        self._ref_cache: dict = {}
        return self

    def _reference(self, s: int, w: int) -> list[np.ndarray]:
        if (s, w) not in self._ref_cache:
            self._ref_cache = {(s, w): [np.sort(m.predict_proba(self.X_ref_, s, w)) for m in self.members_]}
        return self._ref_cache[(s, w)]

    def predict_proba(self, X: np.ndarray, strong=None, weak=None) -> np.ndarray:
        s, w = self.pair_indices(strong, weak)
        X = self._X(X)
        wts = np.ones(len(self.members_)) if self.weights is None else np.asarray(self.weights, np.float64)
        out = np.zeros(X.shape[0])
        for m, ref, wt in zip(self.members_, self._reference(s, w), wts):
            out += wt * rank_cdf(ref, m.predict_proba(X, s, w))
        return np.clip(out / wts.sum(), 0.0, 1.0)

    def to_state(self, include_index: bool = True, index_dtype: str = "float32"):
        states, arrays = [], {"X_ref_": self.X_ref_.astype(np.float32)}
        for i, m in enumerate(self.members_):
            mp, ma = m.to_state(include_index=True, index_dtype=index_dtype)
            states.append(mp)
            arrays.update({f"m{i}.{k}": v for k, v in ma.items()})
        return self._state({"member_states": states}), arrays

    @classmethod
    def _from_state(cls, params, arrays, index=None):
        est = cls._new_from_state(params)
        est.members_ = []
        for i, mp in enumerate(params["fitted"]["member_states"]):
            pre = f"m{i}."
            est.members_.append(pair_router_from_state(
                mp, {k[len(pre):]: v for k, v in arrays.items() if k.startswith(pre)}))
        est.X_ref_ = np.ascontiguousarray(arrays["X_ref_"], np.float32)
        est._ref_cache = {}
        return est


# ------------------------------------------------------------------------------ baselines
def query_keys(X: np.ndarray, salt: str = "") -> np.ndarray:
    """(n,) a uniform number in [0, 1) per query: a hash (blake2b) of its L2-normalised embedding
    rounded to float16 and ``salt``. The same query always gets the same key, whatever else is
    in the batch (the random router's score; the tie-split of ``transforms.pair_calibration``)."""
    X = normalize_rows(X).astype(np.float16)
    pre = salt.encode()
    out = np.empty(X.shape[0])
    for i, row in enumerate(X):
        h = hashlib.blake2b(pre + row.tobytes(), digest_size=8).digest()
        out[i] = (int.from_bytes(h, "little") >> 11) / float(1 << 53)
    return out


class RandomRouter(PairRouter):
    """A uniform score per query, from a hash of its embedding (rounded to float16) and ``seed``."""

    def __init__(self, seed: int = 0):
        self.seed = seed

    def fit(self, X: np.ndarray, data: WinData, pair=None) -> RandomRouter:
        self._fit_common(X, data, pair)
        return self

    def predict_proba(self, X: np.ndarray, strong=None, weak=None) -> np.ndarray:
        s, w = self.pair_indices(strong, weak)
        salt = f"{int(self.seed)}|{self.models_[s]}|{self.models_[w]}|"
        return query_keys(self._X(X), salt)

    def to_state(self, include_index: bool = True, index_dtype: str = "float32"):
        return self._state({}), {}

    @classmethod
    def _from_state(cls, params, arrays, index=None):
        return cls._new_from_state(params)


class OracleRouter(PairRouter):
    """Looks a query up among the inputs it was fitted on (see the module docstring)."""

    def __init__(self, match: float = 1e-4):
        self.match = match

    def fit(self, X: np.ndarray, data: WinData, pair=None) -> OracleRouter:
        X = self._fit_common(X, data, pair)
        self.scale_ = float(data.quality_range())
        self._set_index(X, data.Q)
        return self

    def _set_index(self, X, Q) -> None:
        self.X_ = np.ascontiguousarray(X, np.float32)
        self.Q_ = np.asarray(Q, np.float32)

    def predict_proba(self, X: np.ndarray, strong=None, weak=None) -> np.ndarray:
        s, w = self.pair_indices(strong, weak)
        X = self._X(X)
        out = np.full(X.shape[0], 0.5)
        step = max(1, int(SIM_BLOCK_BYTES // (4 * max(1, self.X_.shape[0]))))
        for a in range(0, X.shape[0], step):
            sims = X[a:a + step] @ self.X_.T
            j = sims.argmax(axis=1)
            hit = sims[np.arange(j.size), j] >= 1.0 - self.match
            d = (self.Q_[j, s].astype(np.float64) - self.Q_[j, w]) / self.scale_
            out[a:a + step] = np.where(hit & np.isfinite(d), 0.5 * (1.0 + d), 0.5)
        return out

    def to_state(self, include_index: bool = True, index_dtype: str = "float32"):
        params = self._state({"n_index": int(self.X_.shape[0]), "scale_": self.scale_})
        return params, ({"X_": self.X_.astype(index_dtype), "Q_": self.Q_} if include_index else {})

    @classmethod
    def _from_state(cls, params, arrays, index=None):
        est = cls._new_from_state(params)
        est.scale_ = float(params["fitted"]["scale_"])
        est._set_index(*_index_from(cls, params, arrays, index))
        return est


# ------------------------------------------------------------------------------ registry
PAIR_ROUTERS: dict[str, type[PairRouter]] = {
    "sw_ranking": SWRankingRouter,
    "mf": MFRouter,
    "diff": DiffRouter,
    "irt": IRTRouter,
    "ensemble": EnsembleRouter,
    "random": RandomRouter,
    "oracle": OracleRouter,
}
_CLASSES = {c.__name__: c for c in PAIR_ROUTERS.values()}


def make_pair_router(name: str, **params: Any) -> PairRouter:
    """A new router by short name (``PAIR_ROUTERS``) with hyper-parameter overrides."""
    try:
        cls = PAIR_ROUTERS[name]
    except KeyError:
        raise ValueError(f"unknown pair router {name!r}; known: {', '.join(sorted(PAIR_ROUTERS))}") from None
    return cls(**params)


def pair_router_from_state(params: Mapping, arrays: Mapping[str, np.ndarray], index=None) -> PairRouter:
    """A fitted router rebuilt from ``to_state()`` (numpy only, no torch); ``index`` as each
    class's ``_from_state`` documents, for a state stored without its index."""
    if params.get("format") != STATE_FORMAT:
        raise ValueError(f"pair router state format {params.get('format')!r}; this code reads {STATE_FORMAT}")
    try:
        cls = _CLASSES[params["class"]]
    except KeyError:
        raise ValueError(f"unknown pair router class {params['class']!r}") from None
    return cls._from_state(params, arrays, index)


def pair_names(names: Sequence[str]) -> list[tuple[str, str]]:
    """Every ordered (strong, weak) pair of distinct ``names``."""
    return [(a, b) for a in names for b in names if a != b]
