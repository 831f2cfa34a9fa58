"""Nearest-neighbour index over the bundle's embeddings: exact below a size, HNSW above it.

The router finds a query's k nearest index rows by cosine similarity (``transforms.knn``: exact,
blocked matrix products). That is a full pass over n × d per query: fine at today's 28.5k rows,
a cost at 100k+ (issue 16). This module puts an approximate index behind the same answer:

- ``kind="exact"``: numpy inner products over the L2-normalised float32 rows, exactly
  ``transforms.knn.cosine_topk`` (same neighbours, same tie rule);
- ``kind="hnsw"``: a faiss ``IndexHNSWFlat`` (inner product) over the same rows;
- ``kind="auto"``: exact up to ``EXACT_MAX_ROWS`` rows, HNSW above.

Results follow ``transforms.knn.Neighbors``: ``(sims, rows)``, each q × k, most similar first,
rows -1 and sims -inf where fewer than k neighbours were found.

Files: ``Index.to_files(prefix)`` is ``<prefix>params.json`` (kind, parameters, n, d and a
digest of the rows) and, for HNSW, the graph as plain ``.npy`` arrays (``neighbors`` int32,
``offsets`` uint64, ``levels`` int32, ``entry`` int64) *without* the vectors: they are the
bundle's ``index/embeddings.npy`` already, so ``load_index_files(files, prefix, X)`` takes them
back from the caller and checks them against the digest. The graph never goes through faiss's
own reader (C++ that trusts its bytes): every array is checked first (``_check_graph``: each
neighbour id in range, the offsets the running sum of each node's slots, the level schedule of
the stored M from faiss itself), then copied into a fresh faiss index. Nothing is pickled.
``to_bytes()`` / ``load_index(bytes, X)`` are the same files in one ``.npz`` (read with
``allow_pickle=False``).

Determinism: the graph is built on one thread with a seeded level generator, so one (X, params,
seed) gives byte-identical ``to_bytes()`` (``threads > 1`` builds faster, not reproducibly).
Searching uses any number of threads; each query's answer is independent of the others.

    index = build_index(X, kind="auto")          # X: the bundle's float16/float32 rows
    sims, rows = index.search(Q, 10)
    data = index.to_bytes(); index2 = load_index(data, X)
    recall_at_k(index, X, Q, 10)                 # share of the exact top-10 found
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import struct
import threading
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Literal

import numpy as np

from benchroute.io import npy_bytes
from benchroute.transforms.knn import cosine_topk, max_norm, normalize_rows

Kind = Literal["auto", "exact", "hnsw"]
# Exact search up to this many index rows. benchmarks/scale.py, d = 384, one thread on a busy
# 2-core machine: one exact query takes 1.5-4 ms at 10k rows, 2-8 ms at 20k, ~50 ms at 100k
# (linear in n); HNSW 0.2-0.3 ms at recall@10 >= 0.999 but ~0.35-0.9 s of single-thread build per
# 1k rows. On the full-data bundle (28.5k rows; benchmarks/bundle.py) the exact scan routes an
# embedding in 6.6 / 9.4 ms p50 / p99 and the graph in 1.1 / 1.5 ms at recall@10 .998: above
# 20k rows the graph is the default (issue 13's p99 <= 2 ms), with its recall in the manifest.
EXACT_MAX_ROWS = 20_000
DEFAULT_M = 32  # graph degree (level 0 keeps 2M links: ~256 bytes a row at M=32)
DEFAULT_EF_CONSTRUCTION = 200
DEFAULT_EF_SEARCH = 128
DEFAULT_SEED = 0

_OMP_LOCK = threading.Lock()  # faiss's thread count is process-wide


@dataclass(frozen=True)
class IndexParams:
    kind: str  # "exact" or "hnsw" (never "auto")
    n: int
    d: int
    digest: str  # of the prepared float32 rows (``rows_digest``)
    m: int | None = None
    ef_construction: int | None = None
    ef_search: int | None = None
    seed: int | None = None
    library: str | None = None  # e.g. "faiss 1.15.1" (informative)


def prepare(X: np.ndarray) -> np.ndarray:
    """The rows as searched: float32, L2-normalised (as the router's ``KNNCorrectness.fit``)."""
    X = np.asarray(X)
    if X.ndim != 2:
        raise ValueError(f"expected a 2-d matrix of rows, got shape {X.shape}")
    return np.ascontiguousarray(normalize_rows(X.astype(np.float32, copy=False)), np.float32)


def rows_digest(prepared: np.ndarray) -> str:
    """32 hex of blake2b over the prepared rows' bytes and shape."""
    h = hashlib.blake2b(digest_size=16)
    h.update(struct.pack("<qq", *prepared.shape))
    h.update(memoryview(np.ascontiguousarray(prepared, np.float32)).cast("B"))
    return h.hexdigest()




def _faiss():
    import faiss

    return faiss


class Index:
    """A built or loaded index over prepared rows ``X`` (n × d). Use ``build_index`` or
    ``load_index``, not the constructor."""

    def __init__(self, params: IndexParams, X: np.ndarray, hnsw=None, storage=None):
        self.params = params
        self.X = X
        self._x_norm = None  # max_norm(X), on the first exact search
        self._hnsw = hnsw
        self._storage = storage  # keeps the flat storage alive while the graph points at it

    @property
    def kind(self) -> str:
        return self.params.kind

    def __len__(self) -> int:
        return self.params.n

    def search(self, Q: np.ndarray, k: int, *, ef_search: int | None = None
               ) -> tuple[np.ndarray, np.ndarray]:
        """``(sims, rows)`` of the k nearest rows of each query (q × k float32 / int64, best
        first; -inf / -1 where fewer were found). Queries are L2-normalised here."""
        Q = np.asarray(Q)
        if Q.ndim == 1:
            Q = Q[None, :]
        if Q.shape[1] != self.params.d:
            raise ValueError(f"queries have dimension {Q.shape[1]}, the index {self.params.d}")
        if k <= 0:
            raise ValueError("k must be positive")
        Q = prepare(Q)
        if self._hnsw is None or k >= self.params.n:
            if self._x_norm is None:
                self._x_norm = max_norm(self.X)
            neigh = cosine_topk(Q, self.X, k, x_norm=self._x_norm)
            return neigh.similarities, neigh.indices
        faiss = _faiss()
        ef = max(int(ef_search or self.params.ef_search or DEFAULT_EF_SEARCH), k)
        sims, rows = self._hnsw.search(Q, k, params=faiss.SearchParametersHNSW(efSearch=ef))
        rows = rows.astype(np.int64, copy=False)
        sims = np.where(rows >= 0, sims, -np.inf).astype(np.float32)
        return sims, rows

    def to_files(self, prefix: str = "") -> dict[str, bytes]:
        """``<prefix>params.json`` and, for HNSW, the graph arrays as ``.npy`` (module doc)."""
        files = {f"{prefix}params.json": json.dumps(asdict(self.params), sort_keys=True).encode()}
        for name, a in graph_arrays(self).items():
            files[f"{prefix}{name}.npy"] = npy_bytes(a)
        return files

    def to_bytes(self) -> bytes:
        """``to_files()`` in one ``.npz`` (params as a uint8 array of its JSON)."""
        import zipfile

        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as z:  # fixed times: equal graphs, equal bytes
            for rel, data in sorted(self.to_files().items()):
                name = "params.npy" if rel == "params.json" else rel
                if rel == "params.json":
                    data = npy_bytes(np.frombuffer(data, np.uint8))
                z.writestr(zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0)), data)
        return buf.getvalue()

    def save(self, url: str) -> None:
        """Write ``to_bytes()`` to a path or fsspec URL."""
        import fsspec

        with fsspec.open(url, "wb") as f:
            f.write(self.to_bytes())

    @property
    def nbytes(self) -> int:
        """Bytes of the serialised index (the vectors are not in it)."""
        return len(self.to_bytes())


def chosen_kind(n_rows: int, kind: Kind = "auto", exact_max_rows: int = EXACT_MAX_ROWS) -> str:
    """``exact`` or ``hnsw``: what ``kind`` means for an index of ``n_rows`` rows."""
    if kind not in ("auto", "exact", "hnsw"):
        raise ValueError(f"kind must be 'auto', 'exact' or 'hnsw', got {kind!r}")
    if kind == "auto":
        return "exact" if n_rows <= exact_max_rows else "hnsw"
    return kind


def build_index(
    X: np.ndarray,
    kind: Kind = "auto",
    *,
    exact_max_rows: int = EXACT_MAX_ROWS,
    m: int = DEFAULT_M,
    ef_construction: int = DEFAULT_EF_CONSTRUCTION,
    ef_search: int = DEFAULT_EF_SEARCH,
    seed: int = DEFAULT_SEED,
    threads: int = 1,
) -> Index:
    """An index over the rows of ``X`` (n × d; normalised here). ``kind="auto"``: exact when
    n <= ``exact_max_rows``, else HNSW with degree ``m``, ``ef_construction`` and a default
    ``ef_search`` (overridable per search), built on ``threads`` threads (1: reproducible)."""
    P = prepare(X)
    n, d = P.shape
    kind = chosen_kind(n, kind, exact_max_rows)
    digest = rows_digest(P)
    if kind == "exact":
        return Index(IndexParams("exact", n, d, digest), P)
    if n == 0:
        raise ValueError("cannot build an HNSW index over no rows")
    faiss = _faiss()
    params = IndexParams("hnsw", n, d, digest, int(m), int(ef_construction), int(ef_search),
                         int(seed), f"faiss {faiss.__version__}")
    hnsw = faiss.IndexHNSWFlat(d, int(m), faiss.METRIC_INNER_PRODUCT)
    hnsw.hnsw.efConstruction = int(ef_construction)
    hnsw.hnsw.efSearch = int(ef_search)
    hnsw.hnsw.rng = faiss.RandomGenerator(int(seed))  # the levels of the inserted rows
    with _OMP_LOCK:
        before = faiss.omp_get_max_threads()
        faiss.omp_set_num_threads(max(1, int(threads)))
        try:
            hnsw.add(P)
        finally:
            faiss.omp_set_num_threads(before)
    return Index(params, P, hnsw, hnsw.storage)


# ---------------------------------------------------------------------------- graph as arrays
GRAPH_ARRAYS = ("neighbors", "offsets", "levels")


def graph_arrays(index: Index) -> dict[str, np.ndarray]:
    """The HNSW graph as plain arrays (``neighbors`` int32, ``offsets`` uint64, ``levels`` int32,
    ``entry`` int64 [entry point, max level]); empty for an exact index."""
    if index._hnsw is None:
        return {}
    faiss = _faiss()
    h = index._hnsw.hnsw
    out = {name: faiss.vector_to_array(getattr(h, name)).copy() for name in GRAPH_ARRAYS}
    out["entry"] = np.array([h.entry_point, h.max_level], np.int64)
    return out


def _check_graph(params: IndexParams, arrays: Mapping[str, np.ndarray], cum: np.ndarray):
    """The graph arrays, each checked against ``params`` so that no search can leave them:
    every node's level count within the schedule of M, the offsets the running sum of each
    node's slots, every neighbour id in [-1, n), the entry point a node of the top level."""
    n = params.n
    try:
        neighbors, offsets, levels, entry = (np.asarray(arrays[k]) for k in (*GRAPH_ARRAYS, "entry"))
    except KeyError as exc:
        raise ValueError(f"the HNSW graph lacks its {exc.args[0]!r} array") from None
    if (neighbors.dtype, offsets.dtype, levels.dtype, entry.dtype) != (
            np.dtype(np.int32), np.dtype(np.uint64), np.dtype(np.int32), np.dtype(np.int64)):
        raise ValueError("the HNSW graph arrays have the wrong dtypes")
    if levels.shape != (n,) or offsets.shape != (n + 1,) or entry.shape != (2,) or neighbors.ndim != 1:
        raise ValueError(f"the HNSW graph arrays do not describe {n} nodes")
    if n and (int(levels.min()) < 1 or int(levels.max()) >= cum.size):
        raise ValueError("an HNSW node has more levels than its degree allows")
    if offsets[0] != 0 or not np.array_equal(np.diff(offsets), cum[levels].astype(np.uint64)):
        raise ValueError("the HNSW offsets do not match the nodes' levels")
    if neighbors.size != int(offsets[-1]):
        raise ValueError("the HNSW neighbour list has the wrong length")
    if neighbors.size and (int(neighbors.min()) < -1 or int(neighbors.max()) >= n):
        raise ValueError("an HNSW neighbour id is out of range")
    ep, top = int(entry[0]), int(entry[1])
    if n and not (0 <= ep < n and top == int(levels.max()) - 1 and int(levels[ep]) - 1 == top):
        raise ValueError("the HNSW entry point is not a node of the top level")
    return neighbors, offsets, levels, ep, top


def _from_arrays(params: IndexParams, arrays: Mapping[str, np.ndarray], P: np.ndarray) -> Index:
    if params.kind == "exact":
        return Index(params, P)
    if params.kind != "hnsw":
        raise ValueError(f"unknown index kind {params.kind!r}")
    if not isinstance(params.m, int) or not 2 <= params.m <= 512:
        raise ValueError(f"HNSW degree m={params.m!r} out of range")
    faiss = _faiss()
    hnsw = faiss.IndexHNSWFlat(params.d, params.m, faiss.METRIC_INNER_PRODUCT)
    h = hnsw.hnsw
    cum = faiss.vector_to_array(h.cum_nneighbor_per_level)  # the schedule of M: faiss's, not the file's
    neighbors, offsets, levels, ep, top = _check_graph(params, arrays, cum)
    for name, a in (("neighbors", neighbors), ("offsets", offsets), ("levels", levels)):
        faiss.copy_array_to_vector(np.ascontiguousarray(a), getattr(h, name))
    h.entry_point, h.max_level = ep, top
    h.efConstruction = int(params.ef_construction or DEFAULT_EF_CONSTRUCTION)
    h.efSearch = int(params.ef_search or DEFAULT_EF_SEARCH)
    hnsw.storage.add(P)
    hnsw.ntotal = params.n
    return Index(params, P, hnsw, hnsw.storage)


def _params(raw) -> IndexParams:
    try:
        fields = json.loads(bytes(raw))
        return IndexParams(**fields)
    except (ValueError, TypeError) as exc:
        raise ValueError(f"unreadable ANN index parameters ({exc})") from None


def _prepared(params: IndexParams, X: np.ndarray, verify: bool) -> np.ndarray:
    P = prepare(X)
    if P.shape != (params.n, params.d):
        raise ValueError(f"the index was built on {params.n} × {params.d} rows, got {P.shape}")
    if verify and rows_digest(P) != params.digest:
        raise ValueError("these rows are not the ones the index was built on (digest differs)")
    return P


def load_index_files(files: Mapping[str, bytes], prefix: str, X: np.ndarray, *, verify: bool = True) -> Index:
    """The index of ``to_files(prefix)`` over ``X``, the rows it was built on (module doc)."""
    if f"{prefix}params.json" not in files:
        raise ValueError(f"no {prefix}params.json")
    params = _params(files[f"{prefix}params.json"])
    P = _prepared(params, X, verify)
    arrays = {}
    for name in (*GRAPH_ARRAYS, "entry"):
        rel = f"{prefix}{name}.npy"
        if rel in files:
            arrays[name] = np.load(io.BytesIO(files[rel]), allow_pickle=False)
    return _from_arrays(params, arrays, P)


def load_index(data: bytes | str | os.PathLike, X: np.ndarray, *, verify: bool = True) -> Index:
    """The index of ``to_bytes()`` (bytes, or a path / fsspec URL to them) over ``X``, the same
    rows it was built on. ``verify`` checks them against the digest (``ValueError`` on other
    rows); the graph is checked before faiss sees it."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        import fsspec

        with fsspec.open(os.fspath(data), "rb") as f:
            data = f.read()
    try:
        with np.load(io.BytesIO(bytes(data)), allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except (ValueError, OSError, EOFError) as exc:
        raise ValueError(f"not a benchroute ANN index ({exc})") from None
    if "params" not in arrays:
        raise ValueError("not a benchroute ANN index (no params)")
    params = _params(arrays.pop("params").tobytes())
    return _from_arrays(params, arrays, _prepared(params, X, verify))


def recall_at_k(index: Index, X: np.ndarray, queries: np.ndarray, k: int = 10, *,
                ef_search: int | None = None, own_rows: np.ndarray | None = None) -> float:
    """Mean share of each query's exact top-k rows (``transforms.knn.cosine_topk`` over ``X``)
    that ``index`` returns in its top k. ``own_rows``: each query's own index row, left out of
    both answers (index rows used as queries stand for new queries near the data)."""
    Q = prepare(queries)
    extra = 0 if own_rows is None else 1
    exact = cosine_topk(Q, prepare(X), k + extra).indices
    _, got = index.search(Q, k + extra, ef_search=ef_search)
    own = np.full(len(Q), -1) if own_rows is None else np.asarray(own_rows)
    hits = total = 0
    for e, g, r in zip(exact, got, own):
        e = e[(e >= 0) & (e != r)][:k]
        g = g[(g >= 0) & (g != r)][:k]
        hits += np.intersect1d(e, g).size
        total += e.size
    return hits / total if total else 1.0
