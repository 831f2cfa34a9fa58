"""Correctness predictors g_m(x) = P(y(x, m) = 1 | x) for M models at once, behind one interface.

Every predictor follows scikit-learn's conventions: hyper-parameters only in ``__init__``,
``fit(X, Y)`` returns ``self``, learned state lives in attributes ending with ``_``, and
``predict_proba(X)`` returns an (n × M) float64 matrix. ``X`` holds sentence embeddings (n × d; rows
are L2-normalised here, as in ``transforms.knn``), ``Y`` (n × M) float labels in {0, 1} (a mean
such as 0.5 is allowed: an input labelled in several datasets) with NaN where model m has no label
on input i. Missing labels are skipped, never counted as 0. A model with no training label at all
gets NaN from every predictor.

- ``KNNPredictor``: the paper's kNN (docs/method.md#the-shared-knn-search), a thin wrapper of
  ``transforms.knn.KNNCorrectness`` with fallback NaN (no labelled neighbour → NaN).
- ``ShrunkKNNPredictor``: kNN shrunk toward the model's prior accuracy,
  g = (Σ_j y_jm + a·prior_m) / (n_jm + a) over the labelled neighbours (docs/method.md#other-predictors).
- ``MLPPredictor``: a multi-output network (one logit per model), masked BCE, early stopping.
- ``FactorizedPredictor``: P(y=1|x,m) = σ(⟨φ(x), ψ_m⟩ + b_m) (EmbedLLM / IRT-Router), ψ_m and b_m
  penalised toward their mean over models, so a model with few labels borrows strength.
- ``CalibratedPredictor``: out-of-fold Platt scaling per model on top of any of the above.

The networks train with torch (CPU, one thread: these matmuls are small, and two threads
collapse when the CPU is shared; seeded through a forked RNG, deterministic algorithms on, both
settings restored afterwards), imported lazily inside ``fit``;
after training their weights are copied into float32 numpy arrays and *both* the fitted and a
restored predictor predict with the same numpy forward pass. Importing this module, restoring a
predictor and predicting never import torch.

Storage without pickles: ``to_state()`` gives ``(params, arrays)``: a JSON-able dict (format,
class name, hyper-parameters, fitted metadata) and named float32/float64 numpy arrays (each saves
with ``np.save(..., allow_pickle=False)``); ``predictor_from_state(params, arrays)`` rebuilds a
fitted predictor that predicts identically. The kNN predictors' state is their index (``X_``,
``Y_``); ``to_state(include_index=False)`` leaves it out so a bundle that already stores the index
(``index/embeddings.npy``, ``index/labels.npy``) passes it back with
``predictor_from_state(params, arrays, index=(X, Y))``.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from benchroute.transforms.knn import (
    DEFAULT_BLOCK_BYTES,
    KNNCorrectness,
    Neighbors,
    max_norm,
    normalize_rows,
)
from benchroute.transforms.label_matrix import column_means, labelled_counts, rows_with_label, value_range

STATE_FORMAT = 1
PLATT_EPS = 1e-4  # base probabilities are clipped to [eps, 1 - eps] before the logit
MAX_TORCH_THREADS = 1  # tiny matmuls: 2 threads gain little and collapse when the CPU is shared
# A network with this many outputs or more (a leaderboard's models) trains on up to
# ``WIDE_TORCH_THREADS`` threads: its output layer and loss dominate an epoch, and 2 threads took
# 0.67x the time of 1 at 40k rows x 4,000 models (benchmarks/mlp_threads.py). Equal threads give
# equal weights; 1 and 2 threads may differ in the last bits (equal at that size, not at every
# size), so a wide network built on a one-core machine may differ from a 2+ core machine's.
WIDE_OUTPUTS = 1024
WIDE_TORCH_THREADS = 2


def torch_threads(n_outputs: int) -> int:
    """The most threads a network with ``n_outputs`` outputs trains on."""
    return WIDE_TORCH_THREADS if n_outputs >= WIDE_OUTPUTS else MAX_TORCH_THREADS


class NotFittedError(RuntimeError):
    """``predict_proba`` / ``to_state`` called on a predictor that was never fitted."""


# ------------------------------------------------------------------------------ helpers
def _labels(Y: np.ndarray, n_rows: int | None = None) -> np.ndarray:
    """``Y`` checked: float64, or float32 as given (a leaderboard's labels are not copied)."""
    Y = np.asarray(Y)
    Y = Y if Y.dtype in (np.float32, np.float64) else Y.astype(np.float64)
    if Y.ndim == 1:
        Y = Y[:, None]
    if Y.ndim != 2:
        raise ValueError(f"expected labels of shape (n, M), got {Y.shape}")
    if n_rows is not None and Y.shape[0] != n_rows:
        raise ValueError(f"{n_rows} embeddings but {Y.shape[0]} label rows")
    span = value_range(Y)
    if span is not None and (span[0] < 0 or span[1] > 1):
        raise ValueError("labels must lie in [0, 1] (NaN for missing)")
    return Y


def label_counts_and_means(Y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per model: the number of labels and their mean (NaN for a model with none)."""
    return column_means(Y)


def sigmoid(z: np.ndarray) -> np.ndarray:
    """σ(z) in float64 without overflow warnings."""
    z = np.asarray(z, dtype=np.float64)
    return np.exp(-np.logaddexp(0.0, -z))


def logit(p: np.ndarray, eps: float = PLATT_EPS) -> np.ndarray:
    p = np.clip(np.asarray(p, dtype=np.float64), eps, 1.0 - eps)
    return np.log(p) - np.log1p(-p)


def _check_X(est, X: np.ndarray) -> np.ndarray:
    X = normalize_rows(X)
    if X.shape[1] != est.n_features_in_:
        raise ValueError(
            f"{type(est).__name__} was fitted on {est.n_features_in_}-d embeddings, got {X.shape[1]}-d"
        )
    return X


def _jsonable(value: Any) -> Any:
    """Hyper-parameter values as JSON: estimators as {"class", "params"}, tuples as lists."""
    if isinstance(value, BasePredictor):
        return {"class": type(value).__name__, "params": _jsonable(value.get_params())}
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating, float)):
        v = float(value)
        return v if math.isfinite(v) else None
    return value


def _from_jsonable_params(params: Mapping[str, Any]) -> dict:
    out = {}
    for k, v in params.items():
        if isinstance(v, Mapping) and "class" in v and "params" in v:
            v = _class_of(v["class"])(**_from_jsonable_params(v["params"]))
        out[k] = v
    return out


def _finite_list(values) -> list:
    return [float(v) if math.isfinite(float(v)) else None for v in values]


def clone(estimator: Any) -> Any:
    """A new, unfitted estimator with the same hyper-parameters (read back from ``__init__``'s
    parameters; nested estimators are cloned too)."""
    if hasattr(estimator, "get_params"):
        params = estimator.get_params()
    else:
        params = _init_params(estimator)
    return type(estimator)(
        **{k: clone(v) if hasattr(v, "fit") and hasattr(v, "predict_proba") else copy.deepcopy(v)
           for k, v in params.items()}
    )


def _init_params(obj: Any) -> dict:
    sig = inspect.signature(type(obj).__init__)
    names = [
        n for n, p in sig.parameters.items()
        if n != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
    ]
    return {n: getattr(obj, n) for n in names}


class BasePredictor:
    """Shared plumbing: ``get_params``/``set_params``/``clone``, ``predict``, state helpers."""

    def get_params(self, deep: bool = False) -> dict:
        return _init_params(self)

    def set_params(self, **params) -> BasePredictor:
        valid = self.get_params()
        for k, v in params.items():
            if k not in valid:
                raise ValueError(f"{type(self).__name__} has no parameter {k!r}; it has {sorted(valid)}")
            setattr(self, k, v)
        return self

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.get_params().items())
        return f"{type(self).__name__}({args})"

    def _check_fitted(self) -> None:
        if not hasattr(self, "n_outputs_"):
            raise NotFittedError(f"{type(self).__name__} is not fitted; call fit(X, Y) first")

    def predict(self, X: np.ndarray, **kwargs) -> np.ndarray:
        """Binarized predictions 1[g_m(x) > 0.5] (int8; NaN counts as 0)."""
        with np.errstate(invalid="ignore"):
            return (self.predict_proba(X, **kwargs) > 0.5).astype(np.int8)

    def _state_params(self, fitted: dict) -> dict:
        self._check_fitted()
        return {
            "format": STATE_FORMAT,
            "class": type(self).__name__,
            "params": _jsonable(self.get_params()),
            "fitted": {"n_features_in_": int(self.n_features_in_), "n_outputs_": int(self.n_outputs_), **fitted},
        }

    @classmethod
    def _new_from_state(cls, params: Mapping) -> BasePredictor:
        est = cls(**_from_jsonable_params(params["params"]))
        est.n_features_in_ = int(params["fitted"]["n_features_in_"])
        est.n_outputs_ = int(params["fitted"]["n_outputs_"])
        return est


# ------------------------------------------------------------------------------ kNN
class _KNNBase(BasePredictor):
    """One exact cosine search shared by the M models; the index is the state.

    Learned: ``X_`` (n × d float32, L2-normalised), ``Y_`` (n × M float32, NaN = missing),
    ``knn_`` (the ``KNNCorrectness`` searching it), ``prior_`` and ``n_labels_`` per model."""

    def _fit_index(self, X: np.ndarray, Y: np.ndarray, weights: str) -> None:
        X = normalize_rows(X)
        Y = _labels(Y, X.shape[0])
        counts, prior = label_counts_and_means(Y)
        self._set_index(X, Y.astype(np.float32), weights)
        self.n_labels_ = counts
        self.prior_ = prior

    def _set_index(self, X: np.ndarray, Y: np.ndarray, weights: str) -> None:
        """Install an index as is (no renormalisation: a restored index predicts like the fitted
        one). ``Y`` is kept as float32, the precision a bundle stores."""
        knn = KNNCorrectness(
            self.n_neighbors, weights=weights, fallback="nan", max_block_bytes=DEFAULT_BLOCK_BYTES
        )
        knn.X_ = np.ascontiguousarray(X, dtype=np.float32)
        knn.x_norm_ = max_norm(knn.X_)  # once per index, not per search
        self.Y_ = np.asarray(Y, dtype=np.float32)
        knn.Y_ = self.Y_.astype(np.float64)
        knn.train_mean_ = label_counts_and_means(knn.Y_)[1]
        knn.n_features_in_ = knn.X_.shape[1]
        knn.n_outputs_ = knn.Y_.shape[1]
        self.knn_ = knn
        self.X_ = knn.X_
        self.n_features_in_ = knn.n_features_in_
        self.n_outputs_ = knn.n_outputs_

    def kneighbors(
        self, X: np.ndarray, *, exclude: np.ndarray | None = None, self_rows: np.ndarray | None = None
    ) -> Neighbors:
        """The shared k nearest index rows of each query (``transforms.knn.cosine_topk``)."""
        self._check_fitted()
        return self.knn_.kneighbors(_check_X(self, X), exclude=exclude, self_rows=self_rows)

    def predict_proba(
        self, X: np.ndarray, *, exclude: np.ndarray | None = None, self_rows: np.ndarray | None = None
    ) -> np.ndarray:
        """g (n × M) from one neighbour search (``exclude``/``self_rows`` as in ``cosine_topk``)."""
        return self.predict_from_neighbors(self.kneighbors(X, exclude=exclude, self_rows=self_rows))

    def to_state(
        self, include_index: bool = True, index_dtype: str = "float32"
    ) -> tuple[dict, dict[str, np.ndarray]]:
        """``(params, arrays)``; the index (``X_`` as float32 or float16, ``Y_`` float32) only with
        ``include_index`` (a float16 index predicts within float16 precision of the fitted one)."""
        if index_dtype not in ("float32", "float16"):
            raise ValueError(f"index_dtype must be 'float32' or 'float16', got {index_dtype!r}")
        params = self._state_params(
            {"n_index": int(self.X_.shape[0]), "include_index": bool(include_index),
             "n_labels_": [int(c) for c in self.n_labels_]}
        )
        arrays = {"prior_": np.asarray(self.prior_, np.float64)}
        if include_index:
            arrays["X_"] = self.X_.astype(index_dtype)
            arrays["Y_"] = self.Y_.astype(np.float32)
        return params, arrays

    @classmethod
    def _from_state(cls, params, arrays, index=None):
        est = cls._new_from_state(params)
        if index is not None:
            X, Y = index
        elif "X_" in arrays and "Y_" in arrays:
            X, Y = arrays["X_"], arrays["Y_"]
        else:
            raise ValueError(
                f"the {cls.__name__} state holds no index: pass index=(X, Y) "
                "(e.g. the bundle's index/embeddings.npy and index/labels.npy)"
            )
        X = np.asarray(X, dtype=np.float32)
        Y = np.asarray(Y, dtype=np.float32)
        if Y.ndim == 1:
            Y = Y[:, None]
        f = params["fitted"]
        if X.shape != (f["n_index"], f["n_features_in_"]) or Y.shape != (f["n_index"], f["n_outputs_"]):
            raise ValueError(
                f"index of shape X {X.shape}, Y {Y.shape}; the predictor was fitted on "
                f"{f['n_index']} rows of {f['n_features_in_']}-d embeddings and {f['n_outputs_']} models"
            )
        est._set_index(X, Y, est._weights())
        est.n_labels_ = np.asarray(f["n_labels_"], np.int64)
        est.prior_ = np.asarray(arrays["prior_"], np.float64)
        return est


class KNNPredictor(_KNNBase):
    """The paper's kNN: g_m(x) = mean label of m over the shared k nearest neighbours of x that
    have a label for m (``weights="distance"``: weighted by 1 / cosine distance); NaN where none
    has. Wraps ``transforms.knn.KNNCorrectness`` (``knn_``)."""

    def __init__(self, n_neighbors: int = 10, weights: str = "uniform"):
        self.n_neighbors = n_neighbors
        self.weights = weights

    def _weights(self) -> str:
        return self.weights

    def fit(self, X: np.ndarray, Y: np.ndarray) -> KNNPredictor:
        if self.n_neighbors < 1:
            raise ValueError("n_neighbors must be >= 1")
        if self.weights not in ("uniform", "distance"):
            raise ValueError(f"weights must be 'uniform' or 'distance', got {self.weights!r}")
        self._fit_index(X, Y, self.weights)
        return self

    def predict_from_neighbors(self, neighbors: Neighbors) -> np.ndarray:
        """g (n × M) from neighbours already found in this index (e.g. by ``kneighbors``)."""
        self._check_fitted()
        return self.knn_.predict_from_neighbors(neighbors)


class ShrunkKNNPredictor(_KNNBase):
    """kNN shrunk toward the model's prior: g_m(x) = (Σ_j y_jm + a·prior_m) / (n_jm + a) over the
    neighbours j of x labelled for m (n_jm of them), a = ``strength``, prior_m = m's mean training
    label. Never NaN for a model with any training label; NaN for a model with none."""

    def __init__(self, n_neighbors: int = 10, strength: float = 5.0):
        self.n_neighbors = n_neighbors
        self.strength = strength

    def _weights(self) -> str:
        return "uniform"

    def fit(self, X: np.ndarray, Y: np.ndarray) -> ShrunkKNNPredictor:
        if self.n_neighbors < 1:
            raise ValueError("n_neighbors must be >= 1")
        if not self.strength >= 0:
            raise ValueError(f"strength must be >= 0, got {self.strength!r}")
        self._fit_index(X, Y, "uniform")
        return self

    def predict_from_neighbors(self, neighbors: Neighbors, chunk: int = 4096) -> np.ndarray:
        """g (n × M) from neighbours already found in this index."""
        self._check_fitted()
        Y = self.knn_.Y_
        a = float(self.strength)
        n, M = len(neighbors), Y.shape[1]
        G = np.empty((n, M), np.float64)
        prior = np.asarray(self.prior_, np.float64)
        for start in range(0, n, chunk):
            idx = neighbors.indices[start : start + chunk]
            L = Y[np.where(idx >= 0, idx, 0)]  # (b, k, M)
            avail = (idx >= 0)[:, :, None] & ~np.isnan(L)
            s = np.where(avail, L, 0.0).sum(axis=1)
            c = avail.sum(axis=1).astype(np.float64)
            with np.errstate(invalid="ignore", divide="ignore"):
                G[start : start + chunk] = (s + a * prior) / (c + a)
        # a = 0 and no labelled neighbour: 0/0 → the prior (NaN only for a model with no label)
        return np.where(np.isnan(G), prior, G)


# ------------------------------------------------------------------------------ networks
def dense_forward(
    X: np.ndarray, layers: Sequence[tuple[np.ndarray, np.ndarray]], activations: Sequence[str]
) -> np.ndarray:
    """Logits of a stack of affine layers h ← act(h @ W + b), in float32 (numpy only)."""
    h = np.asarray(X, dtype=np.float32)
    for (W, b), act in zip(layers, activations):
        h = h @ W
        h += b
        if act == "relu":
            np.maximum(h, 0.0, out=h)
        elif act != "linear":
            raise ValueError(f"unknown activation {act!r}")
    return h


def _hidden_sizes(hidden) -> list[int]:
    sizes = [int(hidden)] if isinstance(hidden, (int, np.integer)) else [int(h) for h in hidden]
    if not sizes or min(sizes) < 1:
        raise ValueError(f"hidden must be a positive int or a list of them, got {hidden!r}")
    return sizes


def _hidden_stack(nn, d: int, hidden, dropout) -> tuple[list, int]:
    """The hidden layers (Linear, ReLU, then Dropout where ``dropout``) from ``d`` inputs, and
    the width of the last one."""
    mods, prev = [], d
    for h in _hidden_sizes(hidden):
        mods += [nn.Linear(prev, h), nn.ReLU()]
        if dropout:
            mods.append(nn.Dropout(float(dropout)))
        prev = h
    return mods, prev


def _linear_arrays(linears) -> list[tuple[np.ndarray, np.ndarray]]:
    """(Wᵀ, b) of each torch Linear layer, as numpy copies."""
    return [(m.weight.detach().numpy().T.copy(), m.bias.detach().numpy().copy()) for m in linears]


def validation_split(
    rng: np.random.Generator, rows: np.ndarray, val_fraction: float
) -> tuple[np.ndarray, np.ndarray]:
    """``rows`` shuffled by ``rng`` into sorted ``(validation, training)`` rows:
    round(``val_fraction`` · n) validation rows, none where that would leave no training row."""
    perm = rng.permutation(rows)
    n_val = int(round(val_fraction * perm.size))
    if perm.size - n_val < 1:
        n_val = 0
    return np.sort(perm[:n_val]), np.sort(perm[n_val:])


@contextlib.contextmanager
def seeded_torch(seed: int, threads: int | None = None):
    """Torch on a forked CPU RNG seeded with ``seed``, on ``threads`` threads (default
    ``MAX_TORCH_THREADS``) or as many cores as this process may use if fewer
    (``embedder.available_cores``: the affinity mask and CPU quota, not torch's current setting,
    which whatever ran before in the process may have changed) and with deterministic
    algorithms; the caller's RNG, threads and setting are restored after."""
    import torch

    from benchroute.transforms.embedder import available_cores

    prev_threads = torch.get_num_threads()
    prev_det = torch.are_deterministic_algorithms_enabled()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        torch.set_num_threads(max(1, min(MAX_TORCH_THREADS if threads is None else threads, available_cores())))
        torch.use_deterministic_algorithms(True)
        try:
            yield
        finally:
            torch.set_num_threads(prev_threads)
            torch.use_deterministic_algorithms(prev_det)


def train_early_stopping(module, opt, rng: np.random.Generator, train_rows: np.ndarray,
                         val_rows: np.ndarray, *, max_epochs: int, patience: int, batch_size: int,
                         batch_loss: Callable, val_loss: Callable[[], float],
                         min_delta: float = 0.0) -> tuple[dict[str, list], int]:
    """Minibatch training with early stopping (the network predictors and the MF router).

    Each epoch shuffles ``train_rows`` with ``rng`` and, per batch of ``batch_size`` rows,
    ``batch_loss(rows as a tensor)`` gives ``(loss, summed, count)`` (the loss ``opt`` minimises,
    and the summed loss and count the epoch's mean training loss is made of) or None to skip the
    batch. With validation rows, ``val_loss()`` (in eval mode, without gradients) is the epoch's
    validation loss; training stops after ``patience`` epochs that do not improve on the best by
    more than ``min_delta``, and the best epoch's weights are loaded back into ``module``.

    Returns ``(history, best_epoch)``: the per-epoch ``"train"`` and ``"val"`` losses (``"val"``
    None without validation rows: then every epoch runs and the last is the best).
    """
    import torch

    history: dict[str, list] = {"train": [], "val": []}
    best, best_epoch, best_state, bad = math.inf, -1, None, 0
    bs = int(batch_size)
    for epoch in range(int(max_epochs)):
        module.train()
        order = train_rows[rng.permutation(train_rows.size)]
        tot, cnt = 0.0, 0.0
        for s in range(0, order.size, bs):
            step = batch_loss(torch.from_numpy(order[s : s + bs]))
            if step is None:
                continue
            loss, summed, count = step
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            tot += float(summed.detach())
            cnt += float(count)
        history["train"].append(tot / max(cnt, 1.0))
        if not val_rows.size:
            history["val"].append(None)
            continue
        module.eval()
        with torch.no_grad():
            v = val_loss()
        history["val"].append(v)
        if v < best - min_delta:
            best, best_epoch, bad = v, epoch, 0
            best_state = {k: t.detach().clone() for k, t in module.state_dict().items()}
        else:
            bad += 1
            if bad >= patience:
                break
    if best_state is not None:
        module.load_state_dict(best_state)
    else:
        best_epoch = len(history["train"]) - 1
    return history, best_epoch


class _NetworkPredictor(BasePredictor):
    """Shared by the MLP and the factorised model: the torch training loop and the numpy forward.

    Training: the rows with any label are split (seeded) into ``val_fraction`` validation rows
    (``val_rows_``, indices into the fitted X) and training rows; AdamW on minibatches of the
    training rows, loss = BCE averaged over the labelled entries of the batch (+ the model's
    penalty); after each epoch the validation BCE is recorded (``history_["train"|"val"]``) and
    training stops ``patience`` epochs after the best one, whose weights are restored
    (``best_epoch_``, 0-based; ``n_epochs_`` run). ``val_fraction=0``: no early stopping.

    Learned: ``layers_`` (list of float32 (W, b)), ``activations_``, ``prior_`` and ``n_labels_``
    per model, ``n_features_in_``, ``n_outputs_``."""

    _activations: tuple[str, ...]

    # subclasses: _build(torch, d, M, prior) -> module; _penalty(module) -> tensor | None;
    # _extract(module) -> list of (W, b) numpy float32 layers, with self.activations_ set.

    def fit(self, X: np.ndarray, Y: np.ndarray) -> _NetworkPredictor:
        X = normalize_rows(X)
        Y = _labels(Y, X.shape[0])
        counts, prior = label_counts_and_means(Y)
        self.n_features_in_ = X.shape[1]
        self.n_outputs_ = Y.shape[1]
        self.n_labels_ = counts
        self.prior_ = prior
        self._train(X, Y)
        return self

    def _train(self, X: np.ndarray, Y: np.ndarray) -> None:
        import torch

        if self.max_epochs < 1 or self.batch_size < 1 or self.patience < 1:
            raise ValueError("max_epochs, batch_size and patience must be >= 1")
        if not 0 <= self.val_fraction < 1:
            raise ValueError(f"val_fraction must be in [0, 1), got {self.val_fraction!r}")
        rng = np.random.default_rng(self.seed)
        labelled = np.flatnonzero(rows_with_label(Y))  # rows with no label teach nothing
        val_rows, train_rows = validation_split(rng, labelled, self.val_fraction)
        if val_rows.size and not labelled_counts(Y, val_rows).any():
            val_rows, train_rows = val_rows[:0], labelled
        self.val_rows_ = val_rows

        with seeded_torch(self.seed, torch_threads(Y.shape[1])):
            module = self._build(torch, X.shape[1], Y.shape[1], self.prior_)
            history, best_epoch = self._loop(torch, module, X, Y, train_rows, val_rows, rng)
            layers = self._extract(module)
        self.layers_ = [(np.ascontiguousarray(W, np.float32), np.ascontiguousarray(b, np.float32))
                        for W, b in layers]
        self.history_ = history
        self.best_epoch_ = best_epoch
        self.n_epochs_ = len(history["train"])

    def _loop(self, torch, module, X, Y, train_rows, val_rows, rng):
        F = torch.nn.functional
        Xt = torch.from_numpy(np.ascontiguousarray(X, np.float32))
        opt = torch.optim.AdamW(module.parameters(), lr=self.lr, weight_decay=self.weight_decay)

        def targets(rows: np.ndarray):
            """(targets, mask) of ``rows`` as float32 tensors, made per batch from Y: a
            leaderboard's n × M targets and mask are never held whole."""
            yb = Y[rows]
            known = ~np.isnan(yb)
            return (torch.from_numpy(np.where(known, yb, 0.0).astype(np.float32)),
                    torch.from_numpy(known.astype(np.float32)))

        def masked_bce(logits, t, m):
            return (F.binary_cross_entropy_with_logits(logits, t, reduction="none") * m).sum()

        if val_rows.size:
            Xv = Xt[torch.from_numpy(val_rows)]
            Tv, Mv = targets(val_rows)
            n_val_labels = float(Mv.sum())
        pen_scale = 1.0 / max(float(labelled_counts(Y, train_rows).sum()), 1.0)  # penalties in units of one label

        def batch_loss(bi):
            xb = Xt[bi]
            tb, mb = targets(bi.numpy())
            n_lab = mb.sum()
            bce = masked_bce(module(xb), tb, mb)
            loss = bce / n_lab.clamp_min(1.0)
            pen = self._penalty(module, pen_scale)
            if pen is not None:
                loss = loss + pen
            return loss, bce, n_lab

        def val_loss():
            return float(masked_bce(module(Xv), Tv, Mv)) / n_val_labels

        history, best_epoch = train_early_stopping(
            module, opt, rng, train_rows, val_rows, max_epochs=self.max_epochs,
            patience=self.patience, batch_size=self.batch_size, batch_loss=batch_loss, val_loss=val_loss,
        )
        module.eval()
        return history, best_epoch

    def decision_function(self, X: np.ndarray) -> np.ndarray:
        """Logits (n × M, float32) from the numpy forward pass."""
        self._check_fitted()
        return dense_forward(_check_X(self, X), self.layers_, self.activations_)

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        """g (n × M, float64): σ(logits); NaN for a model with no training label."""
        P = sigmoid(self.decision_function(X))
        P[:, self.n_labels_ == 0] = np.nan
        return P

    def to_state(self, include_index: bool = True, index_dtype: str = "float32") -> tuple[dict, dict[str, np.ndarray]]:
        """State as JSON params and arrays; ``include_index``/``index_dtype`` are the kNN
        predictors' options (a network keeps no index), accepted so every predictor (and a
        calibrated one around it) is stored by the same call."""
        params = self._state_params({
            "activations": list(self.activations_),
            "n_layers": len(self.layers_),
            "n_labels_": [int(c) for c in self.n_labels_],
            "best_epoch_": int(self.best_epoch_),
            "n_epochs_": int(self.n_epochs_),
            "history_": {k: _finite_list(v if v is not None else math.nan for v in vals)
                         for k, vals in self.history_.items()},
        })
        arrays = {"prior_": np.asarray(self.prior_, np.float64)}
        for i, (W, b) in enumerate(self.layers_):
            arrays[f"W{i}"] = W
            arrays[f"b{i}"] = b
        return params, arrays

    @classmethod
    def _from_state(cls, params, arrays, index=None):
        est = cls._new_from_state(params)
        f = params["fitted"]
        est.activations_ = tuple(f["activations"])
        est.layers_ = [
            (np.ascontiguousarray(arrays[f"W{i}"], np.float32), np.ascontiguousarray(arrays[f"b{i}"], np.float32))
            for i in range(int(f["n_layers"]))
        ]
        est.n_labels_ = np.asarray(f["n_labels_"], np.int64)
        est.prior_ = np.asarray(arrays["prior_"], np.float64)
        est.best_epoch_ = int(f["best_epoch_"])
        est.n_epochs_ = int(f["n_epochs_"])
        est.history_ = {k: list(v) for k, v in f["history_"].items()}
        est._restored_extra(arrays)
        return est

    def _restored_extra(self, arrays) -> None:
        pass


def _prior_logits(prior: np.ndarray) -> np.ndarray:
    p = np.clip(np.nan_to_num(prior, nan=0.5), 0.01, 0.99)
    return (np.log(p) - np.log1p(-p)).astype(np.float32)


class MLPPredictor(_NetworkPredictor):
    """A multi-output network on the embedding: d → hidden (ReLU, dropout) → M logits, one per
    model, trained with BCE over the labelled entries only (``hidden`` may be a list for several
    hidden layers). Output biases start at the models' prior logits."""

    def __init__(
        self,
        hidden: int | Sequence[int] = 256,
        dropout: float = 0.1,
        lr: float = 1e-3,
        weight_decay: float = 1e-4,
        max_epochs: int = 200,
        patience: int = 10,
        batch_size: int = 256,
        val_fraction: float = 0.1,
        seed: int = 0,
    ):
        self.hidden = hidden
        self.dropout = dropout
        self.lr = lr
        self.weight_decay = weight_decay
        self.max_epochs = max_epochs
        self.patience = patience
        self.batch_size = batch_size
        self.val_fraction = val_fraction
        self.seed = seed

    def _build(self, torch, d, M, prior):
        nn = torch.nn
        mods, prev = _hidden_stack(nn, d, self.hidden, self.dropout)
        out = nn.Linear(prev, M)
        with torch.no_grad():
            out.bias.copy_(torch.from_numpy(_prior_logits(prior)))
        mods.append(out)
        return nn.Sequential(*mods)

    def _penalty(self, module, scale):
        return None

    def _extract(self, module):
        import torch

        linears = [m for m in module if isinstance(m, torch.nn.Linear)]
        self.activations_ = tuple(["relu"] * (len(linears) - 1) + ["linear"])
        return _linear_arrays(linears)


class FactorizedPredictor(_NetworkPredictor):
    """P(y=1 | x, m) = σ(⟨φ(x), ψ_m⟩ + b_m): φ a small network (d → hidden, ReLU, dropout →
    ``rank``), ψ_m (``model_embeddings_``, M × rank) and b_m (``model_bias_``) learned per model.
    The training objective is Σ_{labelled (i, m)} BCE + ``model_l2`` · Σ_m (‖ψ_m − ψ̄‖² + (b_m − b̄)²)
    (minimised per batch as the mean BCE plus the penalty divided by the number of training
    labels): ``model_l2`` is a prior precision in units of one label, independent of the data
    size, so a model with few labels stays near the average model (borrows strength) and one with
    thousands is hardly shrunk."""

    def __init__(
        self,
        rank: int = 32,
        hidden: int | Sequence[int] = 256,
        lr: float = 1e-3,
        weight_decay: float = 1e-4,
        model_l2: float = 100.0,
        max_epochs: int = 200,
        patience: int = 10,
        batch_size: int = 256,
        val_fraction: float = 0.1,
        seed: int = 0,
        dropout: float = 0.1,
    ):
        self.rank = rank
        self.hidden = hidden
        self.lr = lr
        self.weight_decay = weight_decay
        self.model_l2 = model_l2
        self.max_epochs = max_epochs
        self.patience = patience
        self.batch_size = batch_size
        self.val_fraction = val_fraction
        self.seed = seed
        self.dropout = dropout

    def _build(self, torch, d, M, prior):
        nn = torch.nn
        if int(self.rank) < 1:
            raise ValueError(f"rank must be >= 1, got {self.rank!r}")
        mods, prev = _hidden_stack(nn, d, self.hidden, self.dropout)
        rank = int(self.rank)
        mods.append(nn.Linear(prev, rank))

        class Factorized(nn.Module):
            def __init__(self):
                super().__init__()
                self.phi = nn.Sequential(*mods)
                self.psi = nn.Parameter(torch.randn(M, rank) / math.sqrt(rank))
                self.bias = nn.Parameter(torch.from_numpy(_prior_logits(prior)))

            def forward(self, x):
                return self.phi(x) @ self.psi.T + self.bias

        return Factorized()

    def _penalty(self, module, scale):
        if not self.model_l2:
            return None
        dpsi = module.psi - module.psi.mean(dim=0, keepdim=True)
        db = module.bias - module.bias.mean()
        return float(self.model_l2) * scale * ((dpsi * dpsi).sum() + (db * db).sum())

    def _extract(self, module):
        import torch

        linears = [m for m in module.phi if isinstance(m, torch.nn.Linear)]
        self.activations_ = tuple(["relu"] * (len(linears) - 1) + ["linear", "linear"])
        layers = _linear_arrays(linears)
        layers.append((module.psi.detach().numpy().T.copy(), module.bias.detach().numpy().copy()))
        return layers

    @property
    def model_embeddings_(self) -> np.ndarray:
        """ψ (M × rank)."""
        self._check_fitted()
        return self.layers_[-1][0].T

    @property
    def model_bias_(self) -> np.ndarray:
        """b (M,)."""
        self._check_fitted()
        return self.layers_[-1][1]

    def embed(self, X: np.ndarray) -> np.ndarray:
        """φ(x) (n × rank, float32)."""
        self._check_fitted()
        return dense_forward(_check_X(self, X), self.layers_[:-1], self.activations_[:-1])


# ------------------------------------------------------------------------------ calibration
def platt_fit(
    p: np.ndarray, y: np.ndarray, prior_strength: float = 5.0, max_iter: int = 100
) -> tuple[float, float]:
    """(a, b) minimising Σ_i BCE(y_i, σ(a·logit(p_i) + b)) + (λ/2)·((a − 1)² + b²), λ =
    ``prior_strength`` (a light prior toward the identity a = 1, b = 0). Damped Newton steps."""
    z = logit(p)
    y = np.asarray(y, dtype=np.float64)
    lam = float(prior_strength)
    if z.size == 0:
        return 1.0, 0.0

    def objective(a, b):
        s = a * z + b
        return float(np.sum(np.logaddexp(0.0, s) - y * s) + 0.5 * lam * ((a - 1.0) ** 2 + b**2))

    a, b = 1.0, 0.0
    f = objective(a, b)
    for _ in range(max_iter):
        q = sigmoid(a * z + b)
        r = q - y
        g = np.array([np.dot(r, z) + lam * (a - 1.0), r.sum() + lam * b])
        w = q * (1.0 - q)
        H = np.array([[np.dot(w, z * z) + lam, np.dot(w, z)], [np.dot(w, z), w.sum() + lam]])
        H += 1e-9 * np.eye(2)
        step = np.linalg.solve(H, g)
        t = 1.0
        while t > 1e-8:
            a2, b2 = a - t * step[0], b - t * step[1]
            f2 = objective(a2, b2)
            if f2 <= f + 1e-12:
                break
            t *= 0.5
        else:
            break
        done = abs(f - f2) < 1e-12 * max(1.0, abs(f)) or np.max(np.abs(t * step)) < 1e-10
        a, b, f = a2, b2, f2
        if done:
            break
    return float(a), float(b)


class CalibratedPredictor(BasePredictor):
    """Per-model Platt scaling of ``base`` on out-of-fold probabilities.

    ``fit``: the rows are split into ``n_folds`` seeded folds; a fresh ``clone(base)`` fitted on
    the other folds predicts each fold → ``oof_proba_`` (n × M, the base's out-of-fold
    probabilities; NaN where it gave none); per model m, (a_m, b_m) minimise the BCE of
    σ(a·logit(p) + b) over m's labelled rows plus ``prior_strength``/2 · ((a − 1)² + b²) (a model
    with few labels stays near the identity); then ``base_`` = ``clone(base)`` refitted on all rows.
    ``predict_proba`` = σ(a_m·logit(base_.predict_proba(x)) + b_m). ``oof_calibrated_`` holds the
    calibrated out-of-fold probabilities (their calibration was fitted on the same rows)."""

    def __init__(self, base: BasePredictor, n_folds: int = 5, seed: int = 0, prior_strength: float = 5.0):
        self.base = base
        self.n_folds = n_folds
        self.seed = seed
        self.prior_strength = prior_strength

    def fit(self, X: np.ndarray, Y: np.ndarray) -> CalibratedPredictor:
        X = np.asarray(X)
        Y = _labels(Y, X.shape[0])
        n, M = Y.shape
        K = int(self.n_folds)
        if K < 2 or n < K:
            raise ValueError(f"n_folds must be >= 2 and at most the number of rows ({n}), got {K}")
        rng = np.random.default_rng(self.seed)
        fold = np.empty(n, np.int64)
        fold[rng.permutation(n)] = np.arange(n) % K
        oof = np.full((n, M), np.nan)
        for k in range(K):
            test = fold == k
            est = clone(self.base).fit(X[~test], Y[~test])
            oof[test] = est.predict_proba(X[test])
        self.oof_proba_ = oof
        a = np.ones(M)
        b = np.zeros(M)
        n_cal = np.zeros(M, np.int64)
        for m in range(M):
            ok = ~np.isnan(Y[:, m]) & np.isfinite(oof[:, m])
            n_cal[m] = int(ok.sum())
            a[m], b[m] = platt_fit(oof[ok, m], Y[ok, m], self.prior_strength)
        self.platt_a_, self.platt_b_, self.n_calibration_ = a, b, n_cal
        self.oof_calibrated_ = self._calibrate(oof)
        self.base_ = clone(self.base).fit(X, Y)
        self.n_features_in_ = self.base_.n_features_in_
        self.n_outputs_ = M
        return self

    def _calibrate(self, P: np.ndarray) -> np.ndarray:
        with np.errstate(invalid="ignore"):
            out = sigmoid(self.platt_a_ * logit(P) + self.platt_b_)
        return np.where(np.isnan(P), np.nan, out)

    def predict_proba(self, X: np.ndarray, **kwargs) -> np.ndarray:
        """Calibrated g (n × M); NaN where the base gives NaN."""
        self._check_fitted()
        return self._calibrate(self.base_.predict_proba(X, **kwargs))

    def kneighbors(self, X: np.ndarray, **kwargs) -> Neighbors:
        return self.base_.kneighbors(X, **kwargs)

    def predict_from_neighbors(self, neighbors: Neighbors) -> np.ndarray:
        """Calibrated g from neighbours already found (a kNN base only)."""
        return self._calibrate(self.base_.predict_from_neighbors(neighbors))

    def to_state(self, **kwargs) -> tuple[dict, dict[str, np.ndarray]]:
        """``kwargs`` (``include_index``, ``index_dtype``) go to a kNN base's ``to_state``."""
        base_params, base_arrays = self.base_.to_state(**kwargs)
        params = self._state_params({
            "base_state": base_params,
            "n_calibration_": [int(c) for c in self.n_calibration_],
        })
        arrays = {"platt_a_": self.platt_a_.astype(np.float64), "platt_b_": self.platt_b_.astype(np.float64)}
        arrays.update({f"base.{k}": v for k, v in base_arrays.items()})
        return params, arrays

    @classmethod
    def _from_state(cls, params, arrays, index=None):
        est = cls._new_from_state(params)
        f = params["fitted"]
        base_arrays = {k[len("base."):]: v for k, v in arrays.items() if k.startswith("base.")}
        est.base_ = predictor_from_state(f["base_state"], base_arrays, index=index)
        est.platt_a_ = np.asarray(arrays["platt_a_"], np.float64)
        est.platt_b_ = np.asarray(arrays["platt_b_"], np.float64)
        est.n_calibration_ = np.asarray(f["n_calibration_"], np.int64)
        return est


# ------------------------------------------------------------------------------ registry, state
def _calibrated(base: type[BasePredictor]) -> Callable[..., BasePredictor]:
    """A constructor of ``CalibratedPredictor(base(**params))`` (out-of-fold Platt scaling)."""

    def make(n_folds: int = 5, seed: int = 0, prior_strength: float = 5.0, **params) -> BasePredictor:
        return CalibratedPredictor(base(**params), n_folds=n_folds, seed=seed, prior_strength=prior_strength)

    make.__name__ = f"calibrated_{base.__name__}"
    return make


PREDICTORS: dict[str, Callable[..., BasePredictor]] = {
    "knn": KNNPredictor,
    "knn_shrunk": ShrunkKNNPredictor,
    "mlp": MLPPredictor,
    "factorized": FactorizedPredictor,
    "mlp_calibrated": _calibrated(MLPPredictor),
    "factorized_calibrated": _calibrated(FactorizedPredictor),
}

_CLASSES: dict[str, type[BasePredictor]] = {
    c.__name__: c
    for c in (KNNPredictor, ShrunkKNNPredictor, MLPPredictor, FactorizedPredictor, CalibratedPredictor)
}


def _class_of(name: str) -> type[BasePredictor]:
    try:
        return _CLASSES[name]
    except KeyError:
        raise ValueError(f"unknown predictor class {name!r}; known: {', '.join(sorted(_CLASSES))}") from None


def make_predictor(name: str, **overrides) -> BasePredictor:
    """A new predictor from ``PREDICTORS`` by short name, with hyper-parameter overrides."""
    try:
        ctor = PREDICTORS[name]
    except KeyError:
        raise ValueError(f"unknown predictor {name!r}; known: {', '.join(sorted(PREDICTORS))}") from None
    try:
        return ctor(**overrides)
    except TypeError as e:
        valid = sorted(inspect.signature(ctor).parameters)
        raise ValueError(f"bad parameters for {name!r} ({e}); it takes {', '.join(valid)}") from None


def predictor_from_state(
    params: Mapping, arrays: Mapping[str, np.ndarray], index: tuple[np.ndarray, np.ndarray] | None = None
) -> BasePredictor:
    """A fitted predictor rebuilt from ``to_state()``'s output (numpy only, no torch). ``index``:
    ``(X, Y)`` for a kNN predictor (or a calibrated one around it) stored without its index."""
    fmt = params.get("format")
    if fmt != STATE_FORMAT:
        raise ValueError(f"predictor state format {fmt!r}; this code reads format {STATE_FORMAT}")
    return _class_of(params["class"])._from_state(params, arrays, index)
