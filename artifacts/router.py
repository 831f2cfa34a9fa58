"""The consumer side of a router bundle: ``load_router`` / ``Router.score_task`` / ``Router.route``.

A consumer needs numpy, pyarrow and fsspec (sentence-transformers only to embed raw text; never
torch: every predictor predicts with numpy). The bundle's files (written by ``bundle_files``):

    index/embeddings.npy   n × d, L2-normalised (float16 by default, float32 on request)
    index/labels_*.npy     n × M labels bit-packed (``artifacts.label_pack``: value and known bits,
                           exceptions for means that are neither 0 nor 1); older bundles:
                           index/labels.npy, n × M float32 with NaN where a model has no label
    index/ann_*            optional HNSW graph over the embeddings (``artifacts.ann_index``:
                           params.json and checked .npy arrays), searched instead of the exact scan
    index/members.npy      n × D bool, the datasets of each index row
    index/input_ids.json   the input id of each row
    kernel/p.npy           D × M leave-one-dataset-out accuracies p(d, m) (NaN = none)
    kernel/u.npy           D descriptors u(d)
    predictor/params.json  the per-query correctness predictor (class and hyper-parameters)
    predictor/*.npy        its fitted arrays (the kNN predictors read the index above)
    routing/settings.json  reference model and cost, typical input tokens, coverage k
    routing/curve.parquet  the cost–quality curve measured on held-out inputs (rule, value,
                           cost_share, quality, quality_loss)
    models.parquet         model cards (prices, size, rule that priced them), expected output
                           tokens, training accuracy
    datasets.json          the D dataset names
    build/lodo_*.npy       the neighbours p(d, m) was measured with (``router_fit.LodoNeighbors``):
                           what extending the bundle by a model needs (``artifacts.router_extend``)
    pairs/…                optional strong/weak pair routers and their calibration
                           (``transforms.pair_serving``; ``pairs/quality.npy`` the compared
                           quality when it is not ``index/labels.npy``)

Both answers go through ``transforms.policy`` — the code the evaluation measures.
"""

from __future__ import annotations

import io
import threading
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from benchroute.artifacts.bundle import VerifiedBundle, json_bytes, npy_bytes, open_bundle
from benchroute.transforms import costs as costs_
from benchroute.transforms import policy
from benchroute.transforms.kernel import NadarayaWatson, mean_knn_distance, neighbor_share_estimate
from benchroute.transforms.knn import (
    COVERAGE_K,
    KNNCorrectness,
    Neighbors,
    covered,
    is_row_source,
    normalize_rows,
)
from benchroute.transforms.predictors import predictor_from_state
from benchroute.transforms.scores import task_scores

INDEX_DTYPES = {"float16": np.float16, "float32": np.float32}


class RouteError(ValueError):
    """A request the router cannot answer (bad input, no model left after the filters)."""


# ------------------------------------------------------------------------------ writing
MODEL_COLUMNS = [
    ("model", pa.string()),
    ("display_name", pa.string()),
    ("params_b", pa.float64()),
    ("open_weights", pa.bool_()),
    ("context_window", pa.int64()),
    ("usd_per_1m_input", pa.float64()),
    ("usd_per_1m_output", pa.float64()),
    ("price_rule", pa.string()),
    ("price_source", pa.string()),
    ("price_as_of", pa.string()),
    ("expected_output_tokens", pa.float64()),
    ("train_acc", pa.float64()),
]


def model_rows(fit, cards: list[dict]) -> list[dict]:
    """One row per fitted model: its card (null where unknown), expected output tokens and
    training accuracy."""
    by_name = {c["model"]: c for c in cards}
    rows = []
    for j, name in enumerate(fit.models):
        c = by_name.get(name, {})
        row = {col: c.get(col) for col, _ in MODEL_COLUMNS}
        row.update(
            model=name,
            display_name=c.get("display_name") or name,
            usd_per_1m_input=_num(fit.cost.price_in[j]),
            usd_per_1m_output=_num(fit.cost.price_out[j]),
            price_rule=c.get("price_rule") or "unknown: no model card",
            expected_output_tokens=float(fit.decision.exp_out_tokens[j]),
            train_acc=float(fit.train_acc[j]),
        )
        rows.append(row)
    return rows


def bundle_files(fit, cards: list[dict], curve: list[dict] | None = None, *,
                 index_dtype: str = "float16", index_search: str = "auto") -> dict[str, bytes]:
    """The bundle's data files from a ``transforms.router_fit.RouterFit``, the model cards
    (``transforms.model_cards`` columns) and the measured cost–quality curve. The labels are
    bit-packed (``artifacts.label_pack``); ``index_search`` (``artifacts.ann_index``: ``auto``,
    ``exact``, ``hnsw``) adds an HNSW graph over the stored rows (``auto``: above
    ``ann_index.EXACT_MAX_ROWS`` rows)."""
    if index_dtype not in INDEX_DTYPES:
        raise ValueError(f"index dtype must be one of {list(INDEX_DTYPES)}")
    from benchroute.artifacts import ann_index, label_pack
    table = pa.Table.from_pylist(model_rows(fit, cards), schema=pa.schema(MODEL_COLUMNS))
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")
    curve_tab = pa.Table.from_pylist(
        [{k: p[k] for k in CURVE_COLUMNS} for p in (curve or [])],
        schema=pa.schema([(c, pa.string() if c == "rule" else pa.float64()) for c in CURVE_COLUMNS]),
    )
    cbuf = io.BytesIO()
    pq.write_table(curve_tab, cbuf, compression="zstd")
    params, arrays = fit.predictor.to_state(include_index=False)  # the index is stored once, below
    dec = fit.decision
    X_stored = fit.X.astype(INDEX_DTYPES[index_dtype])
    files = {
        "index/embeddings.npy": npy_bytes(X_stored),
        **label_pack.pack(fit.Y).to_files(LABELS_PREFIX),  # packs a block of rows at a time
        "index/members.npy": npy_bytes(fit.member.astype(bool)),
        "index/input_ids.json": json_bytes(list(fit.input_ids)),
        "kernel/p.npy": npy_bytes(fit.P.astype(np.float64)),
        "kernel/u.npy": npy_bytes(fit.u.astype(np.float64)),
        "predictor/params.json": json_bytes(params),
        "routing/settings.json": json_bytes({
            "predictor": fit.predictor_name,
            "reference_model": None if dec.reference is None else fit.models[dec.reference],
            "reference_cost_usd": _num(dec.reference_cost),
            "typical_input_tokens": float(dec.typical_in_tokens),
            "chars_per_token": costs_.CHARS_PER_TOKEN,
            "coverage_k": COVERAGE_K,
        }),
        "routing/curve.parquet": cbuf.getvalue(),
        "models.parquet": buf.getvalue(),
        "datasets.json": json_bytes(list(fit.datasets)),
    }
    for name, arr in arrays.items():
        files[f"predictor/{name}.npy"] = npy_bytes(arr)
    if getattr(fit, "lodo", None) is not None:  # what extending the bundle by a model needs
        for name in LODO_FILES:
            files[f"{LODO_PREFIX}{name}.npy"] = npy_bytes(getattr(fit.lodo, name))
    if ann_index.chosen_kind(len(X_stored), index_search) == "hnsw":  # the exact scan needs no file
        files.update(ann_index.build_index(X_stored, "hnsw").to_files(ANN_PREFIX))
    return files


LODO_PREFIX = "build/lodo_"  # the neighbours p(d, m) was measured with (router_fit.LodoNeighbors)
LODO_FILES = ("datasets", "offsets", "rows", "indices", "similarities")
LABELS_PREFIX = "index/labels_"  # bit-packed labels (artifacts.label_pack)
ANN_PREFIX = "index/ann_"  # the HNSW graph over index/embeddings.npy (artifacts.ann_index)
# Labels of a loaded bundle are unpacked to a dense float matrix up to this many cells (n × M;
# 8 bytes each); above it the router reads only the neighbours' rows from the packed bits.
DENSE_LABEL_CELLS = 16 * 2**20


def predictor_arrays(bundle: VerifiedBundle) -> dict[str, np.ndarray]:
    """The predictor's fitted arrays of a verified bundle (``predictor/<name>.npy`` by name)."""
    return {rel[len("predictor/"):-4]: bundle.npy(rel) for rel in bundle.files
            if rel.startswith("predictor/") and rel.endswith(".npy")}


CURVE_COLUMNS = ("rule", "value", "cost_share", "quality", "quality_loss")


def router_parameters(fit) -> dict:
    return {
        "k": fit.k,
        "k_descriptor": fit.k_descriptor,
        "weights": fit.weights,
        "fallback": fit.fallback,
        "bandwidth": fit.bandwidth,
        "kernel_loo_mae": None if fit.kernel_loo_mae != fit.kernel_loo_mae else fit.kernel_loo_mae,
        "descriptor": "mean cosine distance of a task's inputs to their k_descriptor nearest index rows",
        "predictor": fit.predictor_name,
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
    open_weights: bool | None
    context_window: int | None
    usd_per_1m_input: float | None
    usd_per_1m_output: float | None
    price_rule: str | None
    price_source: str | None
    price_as_of: str | None
    expected_output_tokens: float
    train_acc: float


class Router:
    """A loaded, verified bundle that scores tasks and routes queries."""

    def __init__(self, bundle: VerifiedBundle):
        self.bundle = bundle
        self.manifest = bundle.manifest
        params = self.manifest.get("parameters", {})
        X = bundle.npy("index/embeddings.npy").astype(np.float32)
        Y = self._labels(bundle)
        self.member = bundle.npy("index/members.npy")
        self.settings = bundle.json("routing/settings.json")
        self.k = int(params.get("k", 10))
        self.k_descriptor = int(params.get("k_descriptor", self.k))
        self.coverage_k = int(self.settings.get("coverage_k", COVERAGE_K))
        # One search serves the kNN scores (k), the task descriptor and the coverage check.
        self.knn = KNNCorrectness(
            max(self.k, self.k_descriptor, self.coverage_k), weights=params.get("weights", "uniform"),
            fallback=params.get("fallback", "train_mean"),
        ).fit(X, Y)
        self.ann = self._ann(bundle, X)
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
        arrays = predictor_arrays(bundle)
        pstate = bundle.json("predictor/params.json")
        labels = self.knn.Y_
        if is_row_source(labels) and _needs_index(pstate):  # a kNN predictor over the index: dense
            labels = labels.unpack(np.float32)
        self.predictor = predictor_from_state(pstate, arrays, index=(self.knn.X_, labels))
        curve = pq.ParquetFile(io.BytesIO(bundle.files["routing/curve.parquet"])).read().to_pylist()
        self.curve = [policy.CurvePoint(**row) for row in curve]
        self._train_acc = np.array([m.train_acc for m in self.models])
        self._price_in = np.array([np.nan if m.usd_per_1m_input is None else m.usd_per_1m_input
                                   for m in self.models])
        self._price_out = np.array([np.nan if m.usd_per_1m_output is None else m.usd_per_1m_output
                                    for m in self.models])
        self._exp_out = np.array([m.expected_output_tokens for m in self.models])
        ref = self.settings.get("reference_cost_usd")
        self._ref_cost = float(ref) if ref else float("nan")
        self._params_b = np.array([np.nan if m.params_b is None else m.params_b for m in self.models])
        self._embedder = None
        self._embed_lock = threading.Lock()
        self.pairs = self._load_pairs(bundle, Y)

    @staticmethod
    def _labels(bundle: VerifiedBundle):
        """The index labels: dense float64 up to ``DENSE_LABEL_CELLS`` cells, else the packed
        bits (``transforms.knn`` reads only the neighbours' rows of them)."""
        if "index/labels.npy" in bundle.files:  # a bundle written before labels were packed
            return bundle.npy("index/labels.npy").astype(np.float64)
        from benchroute.artifacts.label_pack import PackedLabels

        names = [rel for rel in bundle.files if rel.startswith(LABELS_PREFIX) and rel.endswith(".npy")]
        try:  # (open_bundle refused object arrays already; the loader reads allow_pickle=False)
            packed = PackedLabels.from_files({rel: bundle.files[rel] for rel in names}, LABELS_PREFIX)
        except (KeyError, ValueError) as exc:
            raise RouteError(f"{bundle.url}: unreadable index labels: {exc}") from exc
        n, m = packed.shape
        return packed.unpack(np.float64) if n * m <= DENSE_LABEL_CELLS else packed

    @staticmethod
    def _ann(bundle: VerifiedBundle, X: np.ndarray):
        """The bundle's HNSW graph over its embeddings (checked before use), or None."""
        if f"{ANN_PREFIX}params.json" not in bundle.files:
            return None
        from benchroute.artifacts.ann_index import load_index_files

        try:  # no digest of the rows: the verified manifest binds the graph to these embeddings
            return load_index_files(bundle.files, ANN_PREFIX, X, verify=False)
        except ValueError as exc:
            raise RouteError(f"{bundle.url}: unusable nearest-neighbour index: {exc}") from exc

    def kneighbors(self, X: np.ndarray) -> Neighbors:
        """The k nearest index rows of each query: the bundle's HNSW graph when it has one,
        else the exact scan (``transforms.knn``)."""
        if self.ann is None:
            return self.knn.kneighbors(X)
        sims, rows = self.ann.search(X, self.knn.n_neighbors)
        return Neighbors(rows, sims)

    def _load_pairs(self, bundle: VerifiedBundle, Y: np.ndarray):
        """The bundle's pair routers (``transforms.pair_serving.PairRouting``) or None; the
        similarity-weighted ones read this router's index and the compared quality."""
        if "pairs/settings.json" not in bundle.files:
            return None
        from benchroute.transforms.pair_serving import PairRouting

        names = list(bundle.files)
        if "pairs/quality.npy" in bundle.files:
            Q = bundle.npy("pairs/quality.npy")
        else:
            Q = Y.unpack(np.float32) if is_row_source(Y) else Y
        settings = bundle.json("pairs/settings.json")
        shared = {n: (self.knn.X_, Q) for n, cls in settings.get("routers", {}).items()
                  if cls == "SWRankingRouter"}
        try:
            return PairRouting.from_files(bundle.files.__getitem__, names, index=shared)
        except (KeyError, ValueError) as exc:
            raise RouteError(f"{bundle.url}: unreadable pair routers: {exc}") from exc

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

    def _embeddings(self, inputs, single: bool) -> tuple[np.ndarray, np.ndarray | None]:
        """(embeddings, estimated input tokens of each text or None when given embeddings)."""
        if isinstance(inputs, str):
            inputs = [inputs]
        tokens = None
        if isinstance(inputs, np.ndarray) or (
            isinstance(inputs, Sequence) and inputs and not isinstance(inputs[0], str)
        ):
            try:
                X = np.asarray(inputs, dtype=np.float32)
            except (ValueError, TypeError) as exc:
                raise RouteError(f"embeddings must be a list of equal-length number lists: {exc}") from exc
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
            tokens = costs_.input_tokens(texts)
            X = self.embed(texts)
        if single and X.shape[0] != 1:
            raise RouteError(f"route takes one query, got {X.shape[0]}")
        if X.shape[0] == 0:
            raise RouteError("no inputs")
        return X, tokens

    def _mask(self, models, max_params_b, max_cost, expected_cost) -> np.ndarray:
        mask = np.ones(len(self.models), bool)
        if models is not None:
            unknown = sorted(set(models) - set(self.model_names))
            if unknown:
                raise RouteError(f"unknown models: {unknown}")
            mask &= np.isin(self.model_names, list(models))
        if max_params_b is not None:
            mask &= ~np.isnan(self._params_b) & (self._params_b <= max_params_b)
        if max_cost is not None:
            mask &= ~np.isnan(expected_cost) & (expected_cost <= max_cost)
        if not mask.any():
            raise RouteError("no model satisfies the filters (models / size / cost budget)")
        return mask

    def _point(self, lam, delta, max_cost_share, max_quality_loss) -> policy.Point:
        try:
            return policy.operating_point(self.curve, lam=lam, delta=delta, max_cost_share=max_cost_share,
                                          max_quality_loss=max_quality_loss)
        except policy.PolicyError as exc:
            raise RouteError(str(exc)) from exc

    def _priced_only(self, mask: np.ndarray, point_options) -> np.ndarray:
        """A cost-aware request (any operating-point option given) chooses among the allowed
        models with a known price, as the evaluation that measured the curve did; without one
        (or without a reference cost) it is refused rather than silently ignored."""
        if all(o is None for o in point_options):
            return mask
        priced = mask & ~np.isnan(self._price_in) & ~np.isnan(self._price_out)
        if not priced.any() or not self._ref_cost > 0:
            raise RouteError("lambda, delta, max_cost_share and max_quality_loss need prices: none of "
                             "the allowed models has a known price in this bundle's model cards")
        return priced

    def _tokens(self, tokens: np.ndarray | None, n: int, input_tokens: float | None) -> np.ndarray:
        if input_tokens is not None:
            if not np.isfinite(input_tokens) or input_tokens <= 0:
                raise RouteError("input_tokens must be a positive number")
            return np.full(n, float(input_tokens))
        if tokens is not None:
            return tokens
        return np.full(n, float(self.settings.get("typical_input_tokens") or 1.0))

    def expected_costs(self, in_tokens: np.ndarray) -> np.ndarray:
        """(n × M) expected USD of each request on each model (NaN = unknown price)."""
        return costs_.request_costs(in_tokens, self._exp_out, self._price_in, self._price_out)

    def _relative(self, usd: np.ndarray) -> np.ndarray:
        return usd / self._ref_cost if self._ref_cost > 0 else np.full(usd.shape, np.nan)

    # ---------------------------------------------------------------- answers
    def predict(self, X: np.ndarray) -> tuple[np.ndarray, Neighbors]:
        """ĝ (n × M) of the bundle's predictor, NaN where no neighbour is labelled for the model
        (as ``transforms.routing_eval.predict_with_coverage``), and the neighbours."""
        X = normalize_rows(X)
        neigh = self.kneighbors(X)
        k_pred = getattr(self.predictor, "n_neighbors", None)
        if k_pred is not None and k_pred <= self.knn.n_neighbors and hasattr(
            self.predictor, "predict_from_neighbors"
        ):  # a kNN predictor over the bundle's index: reuse the one search
            G = self.predictor.predict_from_neighbors(_first(neigh, k_pred))
        else:
            G = self.predictor.predict_proba(X)
        cov = covered(_first(neigh, self.coverage_k), self.knn.Y_)
        return np.where(cov, np.asarray(G, np.float64), np.nan), neigh

    def score_task(
        self,
        inputs,
        *,
        models: Sequence[str] | None = None,
        max_params_b: float | None = None,
        max_cost: float | None = None,
        lam: float | None = None,
        delta: float | None = None,
        max_cost_share: float | None = None,
        max_quality_loss: float | None = None,
        input_tokens: float | None = None,
    ) -> list[dict]:
        """S1, S2, S3, p̂ and expected cost for every allowed model on a task given its inputs
        (texts or embeddings), best first.

        The kNN predictor gives S1/S2 (``transforms.scores``; ``coverage`` is the share of inputs
        with a labelled neighbour for the model, and S1/S2 average over those) and S3 uses the
        kernel's p̂. The order is ``transforms.policy.rank`` of S3 and the task's mean relative cost
        at the operating point asked for (λ = 0: best S3), models covering less than half of the
        task last. ``max_cost`` bounds the expected USD per input.
        """
        X, tokens = self._embeddings(inputs, single=False)
        point = self._point(lam, delta, max_cost_share, max_quality_loss)
        usd = self.expected_costs(self._tokens(tokens, X.shape[0], input_tokens)).mean(axis=0)
        mask = self._mask(models, max_params_b, max_cost, usd)
        mask = self._priced_only(mask, (lam, delta, max_cost_share, max_quality_loss))
        neigh = self.kneighbors(X)
        first = _first(neigh, self.k)
        cov = covered(_first(neigh, self.coverage_k), self.knn.Y_)
        G = np.where(cov, self.knn.predict_from_neighbors(first), np.nan)
        u_new = mean_knn_distance(neigh, self.k_descriptor)
        if self._task_kernel is not None:
            p_hat = self._task_kernel.predict(u_new)[0]
        else:
            p_hat = np.full(len(self.models), np.nan)
        p_share = neighbor_share_estimate(first, self.member, self.kernel.P_)
        p_hat = np.where(np.isnan(p_hat), p_share, p_hat)
        p_hat = np.where(np.isnan(p_hat), self._train_acc, p_hat)
        ts = task_scores(G, p_hat)
        coverage = cov.mean(axis=0)
        s3_rankable = np.where(coverage >= 0.5, ts.s3, np.nan)
        order = policy.rank(s3_rankable[None, :], self._relative(usd)[None, :], point, allowed=mask,
                            tiebreak=self._train_acc)[0]
        rows = []
        for j in order:
            if not mask[j]:
                continue
            info = self.models[j]
            rows.append({
                "model": info.model,
                "S1": _num(ts.s1[j]),
                "S2": _num(ts.s2[j]),
                "S3": _num(ts.s3[j]),
                "p_hat": _num(p_hat[j]),
                "coverage": float(coverage[j]),
                "expected_cost_usd": _num(usd[j]),
                "params_b": info.params_b,
            })
        return rows

    def route(
        self,
        query,
        *,
        models: Sequence[str] | None = None,
        max_params_b: float | None = None,
        max_cost: float | None = None,
        lam: float | None = None,
        delta: float | None = None,
        max_cost_share: float | None = None,
        max_quality_loss: float | None = None,
        input_tokens: float | None = None,
        top: int = 3,
        strong: str | None = None,
        weak: str | None = None,
        strong_share: float | None = None,
        threshold: float | None = None,
        pair_router: str | None = None,
    ) -> dict:
        """The model to send one query (text or embedding) to: ``transforms.policy`` over the
        bundle's predictor ĝ and each model's expected cost, at the operating point asked for
        (``lam``/``delta``, or ``max_cost_share``/``max_quality_loss`` read from the stored curve;
        none = best ĝ over every model). A cost-aware request chooses among the models with a known
        price. Models with no labelled neighbour (``g`` null) come last. ``max_cost``
        bounds the expected USD of this request; ``input_tokens`` overrides the estimate (the
        text's length, or the bundle's typical request when given an embedding).

        With ``strong`` and ``weak`` it is the pair decision instead (``route_pair``)."""
        if strong is not None or weak is not None:
            others = dict(models=models, max_params_b=max_params_b, max_cost=max_cost, lam=lam, delta=delta,
                          max_cost_share=max_cost_share, max_quality_loss=max_quality_loss,
                          input_tokens=input_tokens)
            given = sorted(k for k, v in others.items() if v is not None)
            if given:
                raise RouteError(f"a strong/weak pair decision takes no {', '.join(given)}")
            return self.route_pair(query, strong=strong, weak=weak, strong_share=strong_share,
                                   threshold=threshold, router=pair_router)
        if strong_share is not None or threshold is not None or pair_router is not None:
            raise RouteError("strong_share, threshold and pair_router need strong and weak")
        X, tokens = self._embeddings(query, single=True)
        point = self._point(lam, delta, max_cost_share, max_quality_loss)
        usd = self.expected_costs(self._tokens(tokens, 1, input_tokens))
        mask = self._mask(models, max_params_b, max_cost, usd[0])
        mask = self._priced_only(mask, (lam, delta, max_cost_share, max_quality_loss))
        with one_blas_thread(tokens is not None):  # just embedded here: torch's threads still spin
            G, _ = self.predict(X)
        order = [j for j in policy.rank(G, self._relative(usd), point, allowed=mask,
                                        tiebreak=self._train_acc)[0] if mask[j]]
        g = G[0]
        best = order[0]
        return {
            "model": self.model_names[best],
            "g": _num(g[best]),
            "expected_cost_usd": _num(usd[0, best]),
            "operating_point": point.to_dict(),
            "candidates": [
                {"model": self.model_names[j], "g": _num(g[j]), "expected_cost_usd": _num(usd[0, j]),
                 "train_acc": float(self._train_acc[j])}
                for j in order[:top]
            ],
            "bundle_version": self.version,
        }


    # ---------------------------------------------------------------- strong/weak pairs
    def _pairs(self, strong, weak):
        if self.pairs is None:
            raise RouteError("this bundle has no pair routers (publish with --pair strong,weak)")
        if not strong or not weak:
            raise RouteError("give both strong and weak")
        return self.pairs

    def route_pair(self, query, *, strong: str, weak: str, strong_share: float | None = None,
                   threshold: float | None = None, router: str | None = None) -> dict:
        """Strong or weak for one query (text or embedding): the pair router's win probability
        P(strong is needed) against α, the stored threshold of ``strong_share`` (calibrated when
        the bundle was built) or ``threshold`` itself (``transforms.pair_serving``)."""
        pairs = self._pairs(strong, weak)
        X, _ = self._embeddings(query, single=True)
        try:
            out = pairs.route(X, strong, weak, strong_share=strong_share, threshold=threshold, router=router)
        except ValueError as exc:
            raise RouteError(str(exc)) from exc
        return {**out, "bundle_version": self.version}

    def calibrate_pair(self, queries, *, strong: str, weak: str, shares: Sequence[float] | None = None,
                       router: str | None = None) -> list[dict]:
        """Thresholds recomputed on a user's own unlabelled queries (texts or embeddings), per
        target share, with the share the stored threshold gives on them."""
        pairs = self._pairs(strong, weak)
        X, _ = self._embeddings(queries, single=False)
        try:
            return pairs.calibrate(X, strong, weak, shares=shares, router=router)
        except ValueError as exc:
            raise RouteError(str(exc)) from exc


def _needs_index(state) -> bool:
    """Whether a predictor state (or one nested in it, e.g. a calibrated kNN) was stored without
    its index (``fitted.include_index`` false) and so reads the bundle's."""
    if isinstance(state, dict):
        fitted = state.get("fitted")
        if isinstance(fitted, dict) and fitted.get("include_index") is False:
            return True
        return any(_needs_index(v) for v in state.values())
    if isinstance(state, list):
        return any(_needs_index(v) for v in state)
    return False


_BLAS = None


@contextmanager
def one_blas_thread(active: bool = True):
    """BLAS (numpy's search and predictor products) limited to one thread inside the block.

    Right after the embedder's forward pass torch's OpenMP threads still spin on the cores; a
    two-thread BLAS search then fights them for the 2 cores and a text route took 2.7× its floor
    (forward pass + bare search) on the full-data bundle (benchmarks/bundle.py). One BLAS thread
    runs beside them. Queries given as embeddings keep every BLAS thread (their search is faster
    with two)."""
    global _BLAS
    if not active:
        yield
        return
    if _BLAS is None:
        from threadpoolctl import ThreadpoolController  # comes with scikit-learn

        _BLAS = ThreadpoolController()
    with _BLAS.limit(limits=1, user_api="blas"):
        yield


def _num(x) -> float | None:
    x = float(x)
    return x if x == x else None


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
        "routing": router.settings,
        "curve": [vars(p) for p in router.curve],
        "evaluation": m.get("evaluation", {}),
    }
