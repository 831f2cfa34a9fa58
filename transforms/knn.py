"""Exact cosine k-nearest-neighbour search shared by every model, and the kNN predictors g_m.

One search serves all M correctness predictors (docs/method.md#the-shared-knn-search): the neighbours of a query are
found once, then every model's label column is read through the same neighbours.

- Search is exact: blocked matrix products of L2-normalised float32 rows (cosine similarity =
  dot product), top-k per query by ``argpartition``. The neighbours are exactly the first k index
  rows in the order (similarity descending, row ascending), so equal similarities at the k-th
  place go to the lower row (real data has them: distinct texts with identical embeddings).
  scikit-learn cuts such ties arbitrarily, so the reference tests use data without them.
- The order is decided by the *canonical* similarity (``canonical_similarity``: float32 products
  summed in one fixed pairwise tree), not by the matrix product's float32 value: BLAS rounds a
  product differently with the other rows of its block (up to ~1e-6 here), so two rows closer
  than that would otherwise order by how the search was cut into blocks, and the searched, stored
  and narrowed paths of leave-one-dataset-out could disagree on a neighbour. Products more than
  twice BLAS's error bound apart (``similarity_tolerance``) order the same either way; only rows
  that close to another candidate are scored again (``exact_order``), so the neighbours and
  their order do not depend on blocking, groups or query batches. A reported similarity is the
  canonical one where it was scored again, else the product's (they differ in the last bits).
- ``exclude`` drops index rows for every query (the rows of a held-out dataset, chosen *by input
  id*: an input that also belongs to the held-out dataset is never a training neighbour), and
  ``self_rows`` drops one row per query (leave-one-out within the index).
- Labels are a float matrix ``Y`` (n_index × M) of 0/1 with NaN where a model has no label on an
  input. Missing labels are skipped, never counted as 0:
  g_m(x) = Σ_j w_j y_jm / Σ_j w_j over the neighbours j of x that have a label for m, with w_j = 1
  (``weights="uniform"``) or 1 / cosine distance (``"distance"``; neighbours at distance 0, if
  any has a label, take all the weight, as in scikit-learn). When no neighbour has a label for m,
  g_m(x) is the ``fallback``: the model's mean training label (``"train_mean"``) or NaN
  (``"nan"``). With complete labels this equals scikit-learn's
  ``KNeighborsClassifier(metric="cosine", algorithm="brute")`` probability of class 1; with
  missing labels scikit-learn fitted per model would reach past the k shared neighbours instead.
- ``grouped_topk`` keeps the top-k of every query within each *group* of index rows (rows with
  the same set of datasets): merging the lists of the allowed groups gives the exact top-k over
  any union of groups, so one pass of matrix products serves every leave-one-dataset-out fold.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

from benchroute.transforms.label_matrix import column_means

DEFAULT_BLOCK_BYTES = 32 * 2**20  # one block of float32 similarities (argpartition adds 2x)
COVERAGE_K = 10  # neighbours that decide whether a model can be judged on a query (``covered``)

Weights = Literal["uniform", "distance"]
Fallback = Literal["train_mean", "nan"]


@dataclass(frozen=True)
class Neighbors:
    """The k nearest index rows of each query: ``indices`` (n × k, -1 where fewer exist) and
    cosine ``similarities`` (n × k, -inf where the index is -1), most similar first."""

    indices: np.ndarray
    similarities: np.ndarray

    @property
    def valid(self) -> np.ndarray:
        return self.indices >= 0

    @property
    def distances(self) -> np.ndarray:
        """Cosine distances 1 - similarity, clipped at 0 (NaN where there is no neighbour)."""
        d = np.clip(1.0 - self.similarities.astype(np.float64), 0.0, None)
        return np.where(self.valid, d, np.nan)

    def __len__(self) -> int:
        return self.indices.shape[0]

    def take(self, rows) -> Neighbors:
        """The lists of queries ``rows`` (positions or a boolean mask)."""
        return Neighbors(self.indices[rows], self.similarities[rows])


def narrowed(base: Neighbors, allowed: np.ndarray, search) -> Neighbors:
    """The top-k among the index rows where ``allowed`` (bool over index rows) holds, from
    ``base``: the exact top-k of the same queries among a superset of those rows. A query
    whose base list holds no row now disallowed keeps it (every allowed row ranked below those
    rows, in the same order: ties go to the lower row either way); the others are searched
    again, ``search(positions)`` giving the new top-k of the queries at those positions. Nested
    leave-one-dataset-out leaves one more dataset out: most lists stay as they were. Exact: the
    lists are in the canonical order (module doc), which does not depend on which queries are
    searched together."""
    idx = base.indices
    stale = ((idx >= 0) & ~allowed[np.maximum(idx, 0)]).any(axis=1)
    if not stale.any():
        return base
    redo = search(np.flatnonzero(stale))
    out_i, out_s = base.indices.copy(), base.similarities.copy()
    out_i[stale], out_s[stale] = redo.indices, redo.similarities
    return Neighbors(out_i, out_s)


def normalize_rows(X: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm, as float32 (a zero row stays zero)."""
    X = np.asarray(X, dtype=np.float32)
    if X.ndim != 2:
        raise ValueError(f"expected a 2-D matrix of embeddings, got shape {X.shape}")
    norms = np.sqrt(np.einsum("ij,ij->i", X, X))[:, None]  # no n x d temporary
    return X / np.where(norms > 0, norms, np.float32(1.0))


def block_rows(n_index: int, max_block_bytes: int = DEFAULT_BLOCK_BYTES) -> int:
    """Query rows per block so that one block of float32 similarities fits ``max_block_bytes``."""
    return max(1, int(max_block_bytes // (4 * max(n_index, 1))))


def topk_of_rows(S: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Column indices and values of the k largest entries of each row of ``S``, best first.

    Exactly the first k columns in the order (value descending, column ascending): equal values
    at the k-th place go to the lower column. Entries equal to -inf are reported as index -1;
    fewer than k columns are padded with -1 / -inf.
    """
    n, c = S.shape
    kk = min(k, c)
    if kk == 0:
        return np.full((n, k), -1, np.int64), np.full((n, k), -np.inf, np.float32)
    if kk < c:
        part = np.argpartition(S, c - kk, axis=1)[:, c - kk :]
        kth = S[np.arange(n), part[:, 0]]  # the kk-th largest value of each row
        tied = np.flatnonzero((S >= kth[:, None]).sum(axis=1) > kk)
        for r in tied:  # rare: equal values straddle the cut; keep the lowest columns
            above = np.flatnonzero(S[r] > kth[r])
            at = np.flatnonzero(S[r] == kth[r])[: kk - above.size]
            part[r] = np.concatenate([above, at])
    else:
        part = np.broadcast_to(np.arange(c), (n, c)).copy()
    vals = np.take_along_axis(S, part, axis=1)
    order = np.lexsort((part, -vals), axis=-1)
    idx = np.take_along_axis(part, order, axis=1).astype(np.int64)
    vals = np.take_along_axis(vals, order, axis=1).astype(np.float32)
    idx[~np.isfinite(vals)] = -1
    if kk < k:
        idx = np.pad(idx, ((0, 0), (0, k - kk)), constant_values=-1)
        vals = np.pad(vals, ((0, 0), (0, k - kk)), constant_values=-np.inf)
    return idx, vals


UNIT_ROUNDOFF = 2.0 ** -24  # float32
SPARE = 8  # candidates past the k-th that the search keeps for ``exact_order``
POOL_BYTES = 32 * 2**20  # grouped_topk: candidate pools of this many bytes ordered in one batch
RESCORE_BYTES = 16 * 2**20  # float32 products of one chunk of pairs scored again


def _gamma(n: int) -> float:
    """Higham's gamma_n = n u / (1 - n u): the relative error bound of an n-term float32 sum."""
    return n * UNIT_ROUNDOFF / (1 - n * UNIT_ROUNDOFF)


def max_norm(X: np.ndarray) -> float:
    """The largest L2 norm of a row of ``X`` (0 for none): what ``similarity_tolerance`` needs of
    an index, computed once per index by the callers that search it many times."""
    # squared norms in float32 err by at most gamma_d relative: similarity_tolerance's 1.001 covers it
    return float(np.sqrt(np.einsum("ij,ij->i", X, X).max())) if X.size else 0.0


def similarity_tolerance(Q: np.ndarray, x_norm: float) -> np.ndarray:
    """Per query, a bound on |product - canonical similarity| against any index row of norm at
    most ``x_norm`` (``max_norm``): float32 dot products of length d err by at most
    gamma_d * |q| * |x| whatever the summation order (BLAS, any blocking), the canonical tree by
    gamma_(log2 d + 1) * |q| * |x|."""
    d = Q.shape[1]
    levels = int(np.ceil(np.log2(max(d, 1)))) + 1
    q = np.sqrt(np.einsum("ij,ij->i", Q, Q).astype(np.float64))
    bound = (_gamma(d) + _gamma(levels)) * 1.001 * q * x_norm
    # a zero query's products and canonical values are all exactly 0: nothing to score again
    return np.where(q > 0, np.maximum(bound, 1e-30), 0.0)


def canonical_similarity(Q: np.ndarray, X: np.ndarray, q_rows: np.ndarray, x_rows: np.ndarray) -> np.ndarray:
    """The dot products of pairs (``Q[q_rows[i]]``, ``X[x_rows[i]]``) in float32: each product
    rounded, then summed in one fixed pairwise tree (zero-padded to a power of two). Every step
    is an elementwise IEEE operation, so a pair's value does not depend on which other pairs,
    blocks or threads it is computed with."""
    q_rows, x_rows = np.asarray(q_rows).ravel(), np.asarray(x_rows).ravel()
    d = Q.shape[1]
    width = 1 << max(int(d) - 1, 0).bit_length()
    out = np.empty(q_rows.size, np.float32)
    step = max(1, RESCORE_BYTES // (4 * width))
    for start in range(0, q_rows.size, step):
        sl = slice(start, start + step)
        P = np.zeros((len(q_rows[sl]), width), np.float32)
        np.multiply(Q[q_rows[sl]], X[x_rows[sl]], out=P[:, :d], dtype=np.float32)
        w = width
        while w > 1:
            w //= 2
            P = P[:, :w] + P[:, w : 2 * w]
        out[sl] = P[:, 0]
    return out


def _by_key(cand: np.ndarray, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each row's candidates in the order (key descending, row ascending; -1 last)."""
    order = np.lexsort((np.where(cand >= 0, cand, np.iinfo(np.int64).max), -keys), axis=-1)
    return np.take_along_axis(cand, order, 1), np.take_along_axis(keys, order, 1)


def exact_order(cand: np.ndarray, keys: np.ndarray, tol: np.ndarray, k: int, score, *,
                presorted: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """The first k candidates of each query in the canonical order (similarity descending, row
    ascending), from candidate rows ``cand`` (n × c, -1 for none) and their approximate
    similarities ``keys`` (-inf for none), each within ``tol`` (n,) of the canonical value;
    ``presorted``: already in the order (key descending, row ascending).

    The candidates must hold each query's canonical top k (the callers ensure it: a search keeps
    every row within 2 tol of its k-th product, a merge each group's canonical top k). Two keys
    more than 2 tol apart order as their canonical values do; within that, both are scored
    again with ``score(query_positions, rows)`` (canonical values). Keys then compare as
    canonical values would, so the cut and the order are exact."""
    n, c = cand.shape
    if c == 0 or n == 0:
        return np.full((n, k), -1, np.int64), np.full((n, k), -np.inf, np.float32)
    keys = np.where(cand >= 0, keys, -np.inf).astype(np.float32)
    span = (2 * tol)[:, None]
    if not presorted and c > 2 * k + SPARE:  # many candidates (merged groups): sort only the head
        kth = -np.partition(-keys, k - 1, axis=1)[:, k - 1]
        head = max(k, int((np.isfinite(keys) & (keys >= (kth[:, None] - span))).sum(axis=1).max()))
        if head < c:
            part = np.argpartition(-keys, head - 1, axis=1)[:, :head]
            cand, keys = np.take_along_axis(cand, part, 1), np.take_along_axis(keys, part, 1)
            c = head
    if not presorted:
        cand, keys = _by_key(cand, keys)
    kth = keys[:, min(k, c) - 1]
    near = np.isfinite(keys) & (keys >= (kth[:, None] - span))  # every possible member of the top k
    width = max(min(k, c), int(near.sum(axis=1).max()))  # near is a prefix: the rest cannot matter
    cand, keys, near = cand[:, :width], keys[:, :width].copy(), near[:, :width]
    with np.errstate(invalid="ignore"):  # -inf - -inf past the candidates
        # in float64: a float32 difference of keys in different binades can round past span
        pair = ((keys[:, :-1].astype(np.float64) - keys[:, 1:]) <= span) & near[:, :-1] & near[:, 1:]
    close = np.zeros_like(near)
    close[:, :-1] |= pair
    close[:, 1:] |= pair
    redo = np.flatnonzero(close.any(axis=1))
    if redo.size:  # rows with keys within 2 tol of each other: scored again, sorted again
        sub = close[redo]
        r, j = np.nonzero(sub)
        sub_keys = keys[redo]
        sub_keys[r, j] = score(redo[r], cand[redo][r, j])
        cand = cand.copy()
        cand[redo], keys[redo] = _by_key(cand[redo], sub_keys)
    out_i, out_s = cand[:, :k].astype(np.int64), keys[:, :k]
    if out_i.shape[1] < k:
        out_i = np.pad(out_i, ((0, 0), (0, k - out_i.shape[1])), constant_values=-1)
        out_s = np.pad(out_s, ((0, 0), (0, k - out_s.shape[1])), constant_values=-np.inf)
    out_i[~np.isfinite(out_s)] = -1
    return out_i, out_s


def candidate_pool(S: np.ndarray, k: int, tol: np.ndarray):
    """The first k + ``SPARE`` columns of each row of the products ``S`` (``topk_of_rows``), and
    which rows they do not cover (``short``: the spare candidates do not reach 2 tol below the
    k-th product, so a row past them may belong to the canonical top k)."""
    n, c = S.shape
    pool_i, pool_s = topk_of_rows(S, k + SPARE)
    kth = pool_s[:, k - 1]
    short = np.isfinite(pool_s[:, -1]) & (pool_s[:, -1] >= kth - 2 * tol) & (c > k + SPARE) & (tol > 0)
    return pool_i, pool_s, short, kth


def wide_topk(S: np.ndarray, Q: np.ndarray, X: np.ndarray, kth: np.ndarray, tol: np.ndarray, k: int):
    """``exact_topk`` of rows the spare candidates do not cover (many near-equal rows, e.g.
    duplicated inputs): every column within 2 tol of the k-th product is a candidate."""
    near = S >= (kth - 2 * tol)[:, None]
    cand_i, cand_s = topk_of_rows(S, int(near.sum(axis=1).max()))
    return exact_order(cand_i, cand_s, tol, k, lambda r, cols: canonical_similarity(Q, X, r, cols),
                       presorted=True)


def exact_topk(S: np.ndarray, Q: np.ndarray, X: np.ndarray, k: int, tol: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``topk_of_rows`` of the products ``S`` (Q × X.T, -inf where excluded) in the canonical
    order: the first k + ``SPARE`` columns by product, then ``exact_order``; rows those do not
    cover by ``wide_topk``."""
    n = S.shape[0]
    pool_i, pool_s, short, kth = candidate_pool(S, k, tol)
    whole = np.flatnonzero(~short)
    res_i = np.empty((n, k), np.int64)
    res_s = np.empty((n, k), np.float32)
    res_i[whole], res_s[whole] = exact_order(
        pool_i[whole], pool_s[whole], tol[whole], k,
        lambda r, cols: canonical_similarity(Q, X, whole[r], cols), presorted=True)
    wide = np.flatnonzero(short)
    if wide.size:
        res_i[wide], res_s[wide] = wide_topk(S[wide], Q[wide], X, kth[wide], tol[wide], k)
    return res_i, res_s


def cosine_topk(
    Q: np.ndarray,
    X: np.ndarray,
    k: int,
    *,
    exclude: np.ndarray | None = None,
    self_rows: np.ndarray | None = None,
    max_block_bytes: int = DEFAULT_BLOCK_BYTES,
    x_norm: float | None = None,
) -> Neighbors:
    """Exact top-k cosine neighbours in ``X`` of each row of ``Q`` (both already L2-normalised).

    ``exclude``: boolean mask over the rows of ``X`` never to return; ``self_rows``: for each query
    one row of ``X`` not to return (-1 for none); ``x_norm``: ``max_norm(X)`` when the caller
    keeps it (else a pass over ``X`` per call).
    """
    Q = np.asarray(Q, dtype=np.float32)
    X = np.asarray(X, dtype=np.float32)
    if Q.shape[1] != X.shape[1]:
        raise ValueError(f"queries have dimension {Q.shape[1]}, the index {X.shape[1]}")
    n = Q.shape[0]
    out_i = np.empty((n, k), np.int64)
    out_s = np.empty((n, k), np.float32)
    tol = similarity_tolerance(Q, max_norm(X) if x_norm is None else x_norm)
    step = block_rows(X.shape[0], max_block_bytes)
    for start in range(0, n, step):
        stop = min(start + step, n)
        S = Q[start:stop] @ X.T
        if exclude is not None:
            S[:, exclude] = -np.inf
        if self_rows is not None:
            rows = np.asarray(self_rows[start:stop])
            hit = rows >= 0
            S[np.nonzero(hit)[0], rows[hit]] = -np.inf
        out_i[start:stop], out_s[start:stop] = exact_topk(S, Q[start:stop], X, k, tol[start:stop])
    return Neighbors(out_i, out_s)


def neighbor_weights(neighbors: Neighbors, weights: Weights) -> np.ndarray:
    """Per-neighbour weights (n × k, float64): 1 or 1/distance; 0 where there is no neighbour.

    With ``"distance"``, neighbours at distance 0 get +inf here; ``aggregate_labels`` gives them
    all the weight (per model, among those that have a label).
    """
    valid = neighbors.valid
    if weights == "uniform":
        return valid.astype(np.float64)
    if weights == "distance":
        with np.errstate(divide="ignore"):
            w = 1.0 / neighbors.distances
        return np.where(valid, w, 0.0)
    raise ValueError(f"weights must be 'uniform' or 'distance', got {weights!r}")


def is_row_source(Y) -> bool:
    """A label matrix kept compressed (e.g. ``artifacts.label_pack.PackedLabels``): not an
    ndarray, it has ``shape`` (n, M), ``rows(idx, dtype)`` (len(idx) × M, NaN where unknown,
    NaN rows for index -1) and ``column_means()``. The kNN code reads only the neighbours' rows
    of it, so a leaderboard-sized index never becomes a dense n × M float matrix."""
    return not isinstance(Y, np.ndarray) and hasattr(Y, "rows") and hasattr(Y, "shape")


CHUNK_BYTES = 64 * 2**20  # float64 bytes of one chunk of neighbours' label rows (b × k × M)


def chunk_rows(rows: int, k: int, M: int) -> int:
    """Query rows per chunk: at most ``rows``, and fewer when b × k × M float64 would exceed
    ``CHUNK_BYTES`` (thousands of models)."""
    return max(1, min(int(rows), CHUNK_BYTES // (8 * max(k, 1) * max(M, 1))))


def label_rows(Y, idx: np.ndarray) -> np.ndarray:
    """``Y[idx]`` as float64 (idx.shape + (M,)) from a dense matrix or a row source."""
    idx = np.asarray(idx)
    if is_row_source(Y):
        return Y.rows(idx.reshape(-1), dtype=np.float64).reshape(*idx.shape, Y.shape[1])
    return np.asarray(Y[idx], dtype=np.float64)


def aggregate_labels(
    neighbors: Neighbors,
    Y: np.ndarray,
    *,
    weights: Weights = "uniform",
    fallback: np.ndarray | None = None,
    chunk: int = 4096,
) -> np.ndarray:
    """g (n_query × M): each model's labels in ``Y`` averaged over the shared neighbours.

    Neighbours without a label for a model (NaN in ``Y``) are skipped for that model. Where no
    neighbour has a label, the entry is ``fallback[m]`` (NaN if ``fallback`` is None).
    """
    if not is_row_source(Y):
        Y = np.asarray(Y)  # float32 or float64: each chunk's rows are read as float64
    n, M = len(neighbors), Y.shape[1]
    W = neighbor_weights(neighbors, weights)
    G = np.empty((n, M), np.float64)
    fb = np.full(M, np.nan) if fallback is None else np.asarray(fallback, np.float64)
    chunk = chunk_rows(chunk, neighbors.indices.shape[1], M)
    for start in range(0, n, chunk):
        sl = slice(start, min(start + chunk, n))
        idx = neighbors.indices[sl]
        L = label_rows(Y, np.where(idx >= 0, idx, 0))  # (b, k, M)
        avail = (idx >= 0)[:, :, None] & ~np.isnan(L)
        w = np.broadcast_to(W[sl][:, :, None], L.shape)
        inf = np.isinf(w) & avail
        exact = inf.any(axis=1, keepdims=True)  # a labelled neighbour at distance 0
        w = np.where(exact, inf.astype(np.float64), np.where(avail, w, 0.0))
        num = (w * np.where(avail, L, 0.0)).sum(axis=1)
        den = w.sum(axis=1)
        with np.errstate(invalid="ignore", divide="ignore"):
            G[sl] = np.where(den > 0, num / np.where(den > 0, den, 1.0), fb)
    return G


class KNNCorrectness:
    """kNN correctness predictors g_m(x) ≈ P(y(x, m) = 1 | x) for M models from one search.

    Parameters: ``n_neighbors`` (k; the paper uses 5-10), ``weights`` (``"uniform"`` or
    ``"distance"``), ``fallback`` (``"train_mean"``: a model with no labelled neighbour gets its
    mean training label; ``"nan"``: NaN), ``max_block_bytes`` (memory of one similarity block).

    ``fit(X, Y)``: X embeddings (n × d), Y labels (n × M) in {0, 1} with NaN for missing.
    Learned: ``X_`` (normalised float32), ``Y_``, ``train_mean_`` (M,), ``n_features_in_``,
    ``n_outputs_``.
    """

    def __init__(
        self,
        n_neighbors: int = 10,
        *,
        weights: Weights = "uniform",
        fallback: Fallback = "train_mean",
        max_block_bytes: int = DEFAULT_BLOCK_BYTES,
    ):
        self.n_neighbors = n_neighbors
        self.weights = weights
        self.fallback = fallback
        self.max_block_bytes = max_block_bytes

    def fit(self, X: np.ndarray, Y: np.ndarray) -> KNNCorrectness:
        X = normalize_rows(X)
        packed = is_row_source(Y)  # kept compressed: only neighbours' rows are ever read
        if not packed:
            Y = np.asarray(Y)
            Y = Y if Y.dtype in (np.float32, np.float64) else Y.astype(np.float64)  # no copy of float32
            if Y.ndim == 1:
                Y = Y[:, None]
        if Y.shape[0] != X.shape[0]:
            raise ValueError(f"{X.shape[0]} embeddings but {Y.shape[0]} label rows")
        if self.n_neighbors < 1:
            raise ValueError("n_neighbors must be >= 1")
        if self.weights not in ("uniform", "distance"):
            raise ValueError(f"weights must be 'uniform' or 'distance', got {self.weights!r}")
        if self.fallback not in ("train_mean", "nan"):
            raise ValueError(f"fallback must be 'train_mean' or 'nan', got {self.fallback!r}")
        self.X_ = X
        self.x_norm_ = max_norm(X)
        self.Y_ = Y
        if packed:
            self.train_mean_ = np.asarray(Y.column_means(), np.float64)
        else:
            self.train_mean_ = column_means(Y)[1]
        self.n_features_in_ = X.shape[1]
        self.n_outputs_ = Y.shape[1]
        return self

    def kneighbors(
        self,
        Q: np.ndarray,
        *,
        exclude: np.ndarray | None = None,
        self_rows: np.ndarray | None = None,
    ) -> Neighbors:
        """The shared k nearest training rows of each query (see ``cosine_topk``)."""
        return cosine_topk(
            normalize_rows(Q), self.X_, self.n_neighbors,
            exclude=exclude, self_rows=self_rows, max_block_bytes=self.max_block_bytes,
            x_norm=getattr(self, "x_norm_", None),
        )

    def predict_from_neighbors(self, neighbors: Neighbors) -> np.ndarray:
        """g (n × M) from neighbours already found in this index."""
        fb = self.train_mean_ if self.fallback == "train_mean" else None
        return aggregate_labels(neighbors, self.Y_, weights=self.weights, fallback=fb)

    def predict_proba(
        self,
        Q: np.ndarray,
        *,
        exclude: np.ndarray | None = None,
        self_rows: np.ndarray | None = None,
    ) -> np.ndarray:
        """g_m(x) for every query and model (n × M), from one neighbour search."""
        return self.predict_from_neighbors(self.kneighbors(Q, exclude=exclude, self_rows=self_rows))

    def predict(self, Q: np.ndarray, **kwargs) -> np.ndarray:
        """Binarized predictions 1[g_m(x) > 0.5] (int8; NaN counts as 0)."""
        with np.errstate(invalid="ignore"):
            return (self.predict_proba(Q, **kwargs) > 0.5).astype(np.int8)


@dataclass(frozen=True)
class GroupedNeighbors:
    """Top-k of every query within each group of index rows: ``indices``/``similarities`` of
    shape (n_query, n_groups, k), padded with -1 / -inf. ``merge`` gives the exact top-k over
    any union of groups (in the canonical order: candidates of different groups closer than the
    tolerance are scored again from the queries ``Q`` and index rows ``X``)."""

    indices: np.ndarray
    similarities: np.ndarray
    Q: np.ndarray
    X: np.ndarray
    tol: np.ndarray

    @property
    def k(self) -> int:
        return self.indices.shape[2]

    def merge(
        self, allowed: np.ndarray, rows: np.ndarray | slice | None = None, k: int | None = None
    ) -> Neighbors:
        """Top-k over the groups where ``allowed`` (bool, n_groups) is true, for query ``rows``."""
        k = self.k if k is None else k
        if k > self.k:
            raise ValueError(f"searched {self.k} per group; cannot merge to {k}")
        sel = slice(None) if rows is None else rows  # a view of every query's lists, not a copy
        rows = np.arange(self.indices.shape[0])[sel]
        allowed = np.asarray(allowed, bool)
        idx = self.indices[sel][:, allowed, :k]
        sim = self.similarities[sel][:, allowed, :k]
        n = idx.shape[0]
        # Each group's list is its canonical top k, so their union holds the union's top k;
        # ``exact_order`` gives the same order and cut as one search over the union of groups.
        out_i, out_s = exact_order(idx.reshape(n, -1), sim.reshape(n, -1), self.tol[rows], k,
                                   lambda r, cols: canonical_similarity(self.Q, self.X, rows[r], cols))
        return Neighbors(out_i, out_s)


def grouped_topk(
    Q: np.ndarray,
    X: np.ndarray,
    groups: np.ndarray,
    k: int,
    *,
    self_rows: np.ndarray | None = None,
    max_block_bytes: int = DEFAULT_BLOCK_BYTES,
) -> GroupedNeighbors:
    """Top-k neighbours of each query within each group of ``X``'s rows (``groups``: int codes
    0..G-1, one per row of ``X``). Q and X already L2-normalised; one matrix product per block."""
    Q = np.asarray(Q, dtype=np.float32)
    X = np.asarray(X, dtype=np.float32)
    groups = np.asarray(groups)
    n_groups = int(groups.max()) + 1 if groups.size else 0
    order = np.argsort(groups, kind="stable")
    Xs = X[order]
    bounds = np.searchsorted(groups[order], np.arange(n_groups + 1))
    pos_of_row = np.empty_like(order)
    pos_of_row[order] = np.arange(order.size)
    n = Q.shape[0]
    out_i = np.full((n, n_groups, k), -1, np.int64)
    out_s = np.full((n, n_groups, k), -np.inf, np.float32)
    tol = similarity_tolerance(Q, max_norm(X))
    step = block_rows(X.shape[0], max_block_bytes)
    for start in range(0, n, step):
        stop = min(start + step, n)
        S = Q[start:stop] @ Xs.T
        if self_rows is not None:
            rows = np.asarray(self_rows[start:stop])
            hit = rows >= 0
            S[np.nonzero(hit)[0], pos_of_row[rows[hit]]] = -np.inf
        Qb, tb = Q[start:stop], tol[start:stop]

        def rows_of(i, lo):  # a group's local columns as X's rows (-1 stays -1)
            return np.where(i >= 0, order[lo + np.maximum(i, 0)], -1)

        pending: list = []  # groups' candidate pools, ordered in one ``exact_order`` per batch

        def flush():
            gs = [g for g, _, _ in pending]
            pi = np.stack([p for _, p, _ in pending], axis=1)  # (b, groups, k + SPARE), global rows
            ps = np.stack([p for _, _, p in pending], axis=1)
            m = len(gs)
            i, s = exact_order(pi.reshape(-1, pi.shape[2]), ps.reshape(-1, ps.shape[2]), np.repeat(tb, m), k,
                               lambda r, cols: canonical_similarity(Qb, X, r // m, cols), presorted=True)
            out_i[start:stop, gs] = i.reshape(-1, m, k)
            out_s[start:stop, gs] = s.reshape(-1, m, k)
            pending.clear()

        wide = []
        for g in range(n_groups):
            lo, hi = bounds[g], bounds[g + 1]
            if hi == lo:
                continue
            # Xs's rows of a group keep X's order (stable sort): local column order = row order
            pi, ps, short, kth = candidate_pool(S[:, lo:hi], k, tb)
            pending.append((g, rows_of(pi, lo), ps))
            if short.any():
                r = np.flatnonzero(short)
                i, s = wide_topk(S[r, lo:hi], Qb[r], Xs[lo:hi], kth[r], tb[r], k)
                wide.append((g, start + r, rows_of(i, lo), s))
            if len(pending) * (stop - start) * (k + SPARE) * 12 >= POOL_BYTES:
                flush()
        if pending:
            flush()
        for g, r, i, s in wide:  # after the pools: these rows' lists come from every close column
            out_i[r, g], out_s[r, g] = i, s
    return GroupedNeighbors(out_i, out_s, Q, X, tol)


GROUPED_MAX_BYTES = 512 * 2**20  # above this, ``self_neighbors`` searches per call instead


@dataclass(frozen=True)
class SearchedNeighbors:
    """``GroupedNeighbors.merge`` answered by a search per call instead of from stored per-group
    lists: the index rows of ``X`` (already L2-normalised) whose group (``groups``) is allowed,
    each query row's own row left out (as ``grouped_topk(X, X, groups, k, self_rows=arange(n))``).
    Used where the per-group lists (n × groups × k) would be too large: a leaderboard's 100k
    inputs in 200 datasets need 2.4 GB of them."""

    X: np.ndarray
    groups: np.ndarray
    k: int
    max_block_bytes: int = DEFAULT_BLOCK_BYTES
    x_norm: float | None = None  # max_norm(X), kept: a leaderboard's LODO merges thousands of times

    def __post_init__(self):
        if self.x_norm is None:
            object.__setattr__(self, "x_norm", max_norm(self.X))

    def merge(self, allowed: np.ndarray, rows: np.ndarray | None = None, k: int | None = None) -> Neighbors:
        k = self.k if k is None else k
        if k > self.k:
            raise ValueError(f"searched {self.k} per group; cannot merge to {k}")
        rows = np.arange(self.X.shape[0]) if rows is None else np.asarray(rows)
        return cosine_topk(self.X[rows], self.X, k, exclude=~np.asarray(allowed, bool)[self.groups],
                           self_rows=rows, max_block_bytes=self.max_block_bytes, x_norm=self.x_norm)


def self_neighbors(X: np.ndarray, groups: np.ndarray, k: int, *,
                   max_bytes: int | None = None) -> GroupedNeighbors | SearchedNeighbors:
    """Every index row's neighbours among the other rows, by group of rows, for
    leave-one-dataset-out: ``grouped_topk`` (one search, lists kept) when its lists fit
    ``max_bytes``, else ``SearchedNeighbors`` (a search per merge; the same neighbours)."""
    groups = np.asarray(groups)
    n_groups = int(groups.max()) + 1 if groups.size else 0
    if X.shape[0] * n_groups * k * 12 <= (GROUPED_MAX_BYTES if max_bytes is None else max_bytes):
        return grouped_topk(X, X, groups, k, self_rows=np.arange(X.shape[0]))
    return SearchedNeighbors(np.asarray(X, np.float32), groups, k)


def covered(neighbors: Neighbors, Y: np.ndarray) -> np.ndarray:
    """(n_query × M) bool: whether any of a query's neighbours has a label for each model.

    A model none of whose neighbours is labelled never ran on anything like the query (in a bundle
    built from several benchmarks, a model of another benchmark): the policy does not pick it while
    a covered model is allowed.
    """
    idx = neighbors.indices
    valid = idx >= 0
    out = np.empty((idx.shape[0], Y.shape[1]), bool)
    step = chunk_rows(4096, idx.shape[1], Y.shape[1])
    for start in range(0, idx.shape[0], step):
        sl = slice(start, start + step)
        labelled = ~np.isnan(label_rows(Y, np.where(valid[sl], idx[sl], 0)))  # (b, k, M): the neighbours' rows
        out[sl] = (labelled & valid[sl][:, :, None]).any(axis=1)
    return out
