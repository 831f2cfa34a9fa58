"""The consumer side of a router bundle: ``load_router`` / ``Router.score_task`` / ``Router.route``.

A consumer needs numpy, pyarrow and fsspec (sentence-transformers only to embed raw text). The
bundle's files (written by ``bundle_files``):

    index/embeddings.npy   n × d, L2-normalised (float16 by default, float32 on request)
    index/labels.npy       n × M float32, 0/1 with NaN where a model has no label
    index/members.npy      n × D bool, the datasets of each index row
    index/input_ids.json   the input id of each row
    kernel/p.npy           D × M leave-one-dataset-out accuracies p(d, m) (NaN = none)
    kernel/u.npy           D descriptors u(d)
    models.parquet         model, display_name, params_b, cost_per_1k_tokens, train_acc
    datasets.json          the D dataset names
"""

from __future__ import annotations

import io
import json
import threading
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from benchroute.artifacts.bundle import VerifiedBundle, json_bytes, npy_bytes, open_bundle
from benchroute.transforms.kernel import NadarayaWatson, mean_knn_distance, neighbor_share_estimate
from benchroute.transforms.knn import KNNCorrectness, Neighbors
from benchroute.transforms.scores import s3

INDEX_DTYPES = {"float16": np.float16, "float32": np.float32}


class RouteError(ValueError):
    """A request the router cannot answer (bad input, no model left after the filters)."""


# ------------------------------------------------------------------------------ writing
def bundle_files(fit, models_table: list[dict], *, index_dtype: str = "float16") -> dict[str, bytes]:
    """The bundle's data files from a ``transforms.router_fit.RouterFit``."""
    if index_dtype not in INDEX_DTYPES:
        raise ValueError(f"index dtype must be one of {list(INDEX_DTYPES)}")
    by_name = {m["model"]: m for m in models_table}
    rows = []
    for j, name in enumerate(fit.models):
        m = by_name.get(name, {})
        rows.append(
            {
                "model": name,
                "display_name": m.get("display_name") or name,
                "params_b": m.get("params_b"),
                "cost_per_1k_tokens": m.get("cost_per_1k_tokens"),
                "train_acc": float(fit.train_acc[j]),
            }
        )
    table = pa.Table.from_pylist(
        rows,
        schema=pa.schema(
            [
                ("model", pa.string()),
                ("display_name", pa.string()),
                ("params_b", pa.float64()),
                ("cost_per_1k_tokens", pa.float64()),
                ("train_acc", pa.float64()),
            ]
        ),
    )
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")
    return {
        "index/embeddings.npy": npy_bytes(fit.X.astype(INDEX_DTYPES[index_dtype])),
        "index/labels.npy": npy_bytes(fit.Y.astype(np.float32)),
        "index/members.npy": npy_bytes(fit.member.astype(bool)),
        "index/input_ids.json": json_bytes(list(fit.input_ids)),
        "kernel/p.npy": npy_bytes(fit.P.astype(np.float64)),
        "kernel/u.npy": npy_bytes(fit.u.astype(np.float64)),
        "models.parquet": buf.getvalue(),
        "datasets.json": json_bytes(list(fit.datasets)),
    }


def router_parameters(fit) -> dict:
    return {
        "k": fit.k,
        "k_descriptor": fit.k_descriptor,
        "weights": fit.weights,
        "fallback": fit.fallback,
        "bandwidth": fit.bandwidth,
        "kernel_loo_mae": None if fit.kernel_loo_mae != fit.kernel_loo_mae else fit.kernel_loo_mae,
        "descriptor": "mean cosine distance of a task's inputs to their k_descriptor nearest index rows",
        "n_index": len(fit.input_ids),
        "n_models": len(fit.models),
        "n_datasets": len(fit.datasets),
    }


# ------------------------------------------------------------------------------ reading
@dataclass(frozen=True)
class ModelInfo:
    model: str
    display_name: str
    params_b: float | None
    cost_per_1k_tokens: float | None
    train_acc: float


class Router:
    """A loaded, verified bundle that scores tasks and routes queries."""

    def __init__(self, bundle: VerifiedBundle):
        self.bundle = bundle
        self.manifest = bundle.manifest
        params = self.manifest.get("parameters", {})
        X = bundle.npy("index/embeddings.npy").astype(np.float32)
        Y = bundle.npy("index/labels.npy").astype(np.float64)
        self.member = bundle.npy("index/members.npy")
        # No fallback: a model none of whose k neighbours is labelled is *unknown* for that query
        # (in a bundle built from several benchmarks, its training mean is from other data).
        self.knn = KNNCorrectness(
            int(params.get("k", 10)), weights=params.get("weights", "uniform"), fallback="nan"
        ).fit(X, Y)
        self.k_descriptor = int(params.get("k_descriptor", self.knn.n_neighbors))
        self.kernel = NadarayaWatson.from_fitted(
            bundle.npy("kernel/u.npy"), bundle.npy("kernel/p.npy"), float(params.get("bandwidth", 1.0))
        )
        # The smoother over the training datasets that have a descriptor and some p (built once).
        rows = np.isfinite(self.kernel.u_) & ~np.all(np.isnan(self.kernel.P_), axis=1)
        self._task_kernel = (
            NadarayaWatson.from_fitted(self.kernel.u_[rows], self.kernel.P_[rows], self.kernel.bandwidth_)
            if rows.any() else None
        )
        table = pq.ParquetFile(io.BytesIO(bundle.files["models.parquet"])).read().to_pylist()
        self.models = [ModelInfo(**row) for row in table]
        self.model_names = [m.model for m in self.models]
        self.datasets = bundle.json("datasets.json")
        self._train_acc = np.array([m.train_acc for m in self.models])
        self._embedder = None
        self._embed_lock = threading.Lock()

    @property
    def version(self) -> str:
        return self.manifest["version"]

    # ---------------------------------------------------------------- inputs
    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """Embed raw text with the bundle's embedder (its weights hash must match)."""
        with self._embed_lock:  # one model and one fast tokenizer, not safe to share across threads
            return self._embed(list(texts))

    def _embed(self, texts: list[str]) -> np.ndarray:
        if self._embedder is None:
            from benchroute.transforms import embedder as runner

            wanted = self.manifest.get("embedder") or {}
            emb = runner.load(wanted.get("name", runner.DEFAULT_EMBEDDER))
            if emb.identity.weights_hash != wanted.get("weights_hash"):
                raise RouteError(
                    f"the installed {emb.identity.name} ({emb.identity.id}) is not the embedder this "
                    f"bundle was built with ({wanted}); pass embeddings instead of text"
                )
            self._embedder = emb
        out = []
        for start in range(0, len(texts), 64):
            vectors, _ = self._embedder.encode(texts[start : start + 64])
            out.append(vectors)
        return np.vstack(out).astype(np.float32)

    def _embeddings(self, inputs, single: bool) -> np.ndarray:
        if isinstance(inputs, str):
            inputs = [inputs]
        if isinstance(inputs, np.ndarray) or (
            isinstance(inputs, Sequence) and inputs and not isinstance(inputs[0], str)
        ):
            X = np.asarray(inputs, dtype=np.float32)
            if X.ndim == 1:
                X = X[None, :]
            dim = self.knn.n_features_in_
            if X.ndim != 2 or X.shape[1] != dim:
                raise RouteError(f"embeddings must have {dim} columns, got shape {X.shape}")
            if not np.isfinite(X).all():
                raise RouteError("embeddings contain NaN or infinite values")
        else:
            texts = list(inputs)
            if not texts or any(not isinstance(t, str) or not t.strip() for t in texts):
                raise RouteError("inputs must be non-empty strings or embedding vectors")
            X = self.embed(texts)
        if single and X.shape[0] != 1:
            raise RouteError(f"route takes one query, got {X.shape[0]}")
        if X.shape[0] == 0:
            raise RouteError("no inputs")
        return X

    def _mask(self, models, max_params_b, max_cost) -> np.ndarray:
        mask = np.ones(len(self.models), bool)
        if models is not None:
            unknown = sorted(set(models) - set(self.model_names))
            if unknown:
                raise RouteError(f"unknown models: {unknown}")
            mask &= np.isin(self.model_names, list(models))
        if max_params_b is not None:
            mask &= np.array([m.params_b is not None and m.params_b <= max_params_b for m in self.models])
        if max_cost is not None:
            mask &= np.array(
                [m.cost_per_1k_tokens is not None and m.cost_per_1k_tokens <= max_cost for m in self.models]
            )
        if not mask.any():
            raise RouteError("no model satisfies the filters (models / size / cost budget)")
        return mask

    # ---------------------------------------------------------------- answers
    def score_task(
        self,
        inputs,
        *,
        models: Sequence[str] | None = None,
        max_params_b: float | None = None,
        max_cost: float | None = None,
    ) -> list[dict]:
        """S1, S2, S3 and p̂ for every allowed model on a task given its inputs (texts or
        embeddings).

        ``coverage`` is the share of the task's inputs with at least one labelled neighbour for
        the model; S1/S2 average over those inputs. Order: models covering at least half of the
        task first, then best S3, then higher training accuracy.
        """
        mask = self._mask(models, max_params_b, max_cost)
        X = self._embeddings(inputs, single=False)
        neigh = self.knn.kneighbors(X)
        G = self.knn.predict_from_neighbors(_first(neigh, self.knn.n_neighbors))
        u_new = mean_knn_distance(neigh, self.k_descriptor)
        if self._task_kernel is not None:
            p_hat = self._task_kernel.predict(u_new)[0]
        else:
            p_hat = np.full(len(self.models), np.nan)
        p_share = neighbor_share_estimate(_first(neigh, self.knn.n_neighbors), self.member, self.kernel.P_)
        p_hat = np.where(np.isnan(p_hat), p_share, p_hat)
        p_hat = np.where(np.isnan(p_hat), self._train_acc, p_hat)
        known = ~np.isnan(G)
        coverage = known.mean(axis=0)
        with np.errstate(invalid="ignore"):
            s1_ = np.where(coverage > 0, np.nansum(G, axis=0) / np.maximum(known.sum(axis=0), 1), np.nan)
            s2_ = np.where(coverage > 0, (np.where(known, G, 0) > 0.5).sum(axis=0) / np.maximum(known.sum(axis=0), 1), np.nan)
        s3_ = s3(s2_, p_hat)
        rows = []
        for j in np.flatnonzero(mask):
            info = self.models[j]
            rows.append(
                {
                    "model": info.model,
                    "S1": _num(s1_[j]),
                    "S2": _num(s2_[j]),
                    "S3": _num(s3_[j]),
                    "p_hat": _num(p_hat[j]),
                    "coverage": float(coverage[j]),
                    "params_b": info.params_b,
                    "cost_per_1k_tokens": info.cost_per_1k_tokens,
                }
            )
        rows.sort(key=lambda r: _task_order(r, self._train_acc[self.model_names.index(r["model"])]))
        return rows

    def route(
        self,
        query,
        *,
        models: Sequence[str] | None = None,
        max_params_b: float | None = None,
        max_cost: float | None = None,
        top: int = 3,
    ) -> dict:
        """The model to send one query (text or embedding) to: argmax_m g_m(x) among the allowed
        models that have a labelled neighbour (``g`` is null for the others, which come last),
        ties broken by training accuracy; with the ``top`` best as alternatives."""
        mask = self._mask(models, max_params_b, max_cost)
        X = self._embeddings(query, single=True)
        g = self.knn.predict_proba(X)[0]
        known = ~np.isnan(g)
        # Models with a labelled neighbour first, then g desc, then training accuracy desc.
        order = np.lexsort((-self._train_acc, -np.where(known, g, -1.0), ~known))
        order = [j for j in order if mask[j]]
        best = order[0]
        return {
            "model": self.model_names[best],
            "g": _num(g[best]),
            "candidates": [
                {"model": self.model_names[j], "g": _num(g[j]), "train_acc": float(self._train_acc[j])}
                for j in order[:top]
            ],
            "bundle_version": self.version,
        }


def _num(x) -> float | None:
    x = float(x)
    return x if x == x else None


def _task_order(row: dict, train_acc: float) -> tuple:
    s3_ = row["S3"] if row["S3"] is not None else -1.0
    return (row["coverage"] < 0.5, -s3_, -train_acc)


def _first(neigh: Neighbors, k: int) -> Neighbors:
    return Neighbors(neigh.indices[:, :k], neigh.similarities[:, :k])


def load_router(url: str, name: str | None = None, version: str = "latest") -> Router:
    """Load and verify a bundle (see ``artifacts.bundle.open_bundle`` for the URL forms)."""
    return Router(open_bundle(url, name, version))


def describe(router: Router) -> dict:
    m = router.manifest
    return {
        "name": m["name"],
        "version": m["version"],
        "created": m["created"],
        "embedder": m.get("embedder"),
        "parameters": m.get("parameters"),
        "models": [vars(x) for x in router.models],
        "evaluation": m.get("evaluation", {}),
    }


def to_json(obj) -> str:
    return json.dumps(obj, default=float)
