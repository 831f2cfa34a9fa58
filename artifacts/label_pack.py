"""Correctness labels bit-packed: two bits per (input, model) instead of a float32.

The bundle's label matrix ``Y`` (n inputs × M models) holds 1/0 with NaN where a model has no
label on an input. At the scale of issue 16 (100,000 inputs × 4,000 models) that is 1.6 GB as
float32; packed it is two ``np.packbits`` arrays of n × ceil(M/8) bytes (100 MB together):

- ``value``: bit (i, m) is 1 where the label is 1 (0 where it is 0 *or unknown*: canonical, so
  two packings of one matrix are byte-identical);
- ``known``: bit (i, m) is 1 where a label exists.

Bits run along the model axis (``bitorder="little"``, row-major), so reading the rows of a few
neighbours (what a kNN router does per query) unpacks only those rows.

A label that is neither 0 nor 1 (``BenchmarkArrays.Y`` is the *mean* y over an input's datasets,
so an input in two datasets that disagree has 0.5) is kept exactly as an *exception*: its known
bit is set, its value bit is 0, and (row, column, value) is listed in three sorted arrays that
override the bits on read. Real data has few of them; the round trip is exact for any float
matrix (values are kept as float64).

Stored as plain ``.npy`` (no pickles): ``<prefix>value.npy``, ``<prefix>known.npy`` (uint8,
n × ceil(M/8)), ``<prefix>shape.npy`` (int64 [n, M]) and, only if there are exceptions,
``<prefix>extra_rows.npy`` (int64), ``<prefix>extra_cols.npy`` (int64),
``<prefix>extra_values.npy`` (float64).

API::

    p = pack(Y)                       # or pack_bool(value, known), or from_coo(rows, cols, y, shape)
    p.unpack()                        # n × M float32, NaN where unknown (== Y)
    p.rows(idx)                       # len(idx) × M float32 of the neighbour rows
    p.columns([m1, m2]), p.column(m)  # n × len(cols) / n
    p.label_sums(indices, weights)    # Σ w·y and Σ w over known labels of each query's neighbours
    p.aggregate(indices, weights, fallback)   # == transforms.knn.aggregate_labels(neigh, Y, ...)
    files = p.to_files("index/labels_")   # {name: npy bytes}
    PackedLabels.from_files(files, "index/labels_")
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from benchroute.io import npy_bytes

BITORDER = "little"
SUFFIXES = ("value", "known", "shape")
EXTRA_SUFFIXES = ("extra_rows", "extra_cols", "extra_values")
DEFAULT_CHUNK_ROWS = 8192  # rows packed/unpacked at a time (bounded temporary memory)


_POPCOUNT = np.array([i.bit_count() for i in range(256)], dtype=np.uint8)


def packed_width(n_models: int) -> int:
    return (int(n_models) + 7) // 8




def _npy_load(data: bytes) -> np.ndarray:
    return np.load(io.BytesIO(data), allow_pickle=False)


@dataclass(frozen=True, eq=False)
class PackedLabels:
    """Bit-packed labels of an n × M matrix (see the module doc)."""

    value: np.ndarray  # uint8 (n, ceil(M/8))
    known: np.ndarray  # uint8 (n, ceil(M/8))
    shape: tuple[int, int]
    extra_rows: np.ndarray  # int64 (e,), sorted with extra_cols
    extra_cols: np.ndarray  # int64 (e,)
    extra_values: np.ndarray  # float64 (e,)

    def __post_init__(self) -> None:
        n, m = self.shape
        want = (n, packed_width(m))
        for name in ("value", "known"):
            a = getattr(self, name)
            if a.dtype != np.uint8 or a.shape != want:
                raise ValueError(f"{name}: expected uint8 {want}, got {a.dtype} {a.shape}")
        e = self.extra_rows.shape
        if self.extra_cols.shape != e or self.extra_values.shape != e or len(e) != 1:
            raise ValueError("extra_rows/cols/values must be 1-d arrays of one length")
        if e[0]:
            if self.extra_rows.min() < 0 or self.extra_rows.max() >= n:
                raise ValueError("extra_rows out of range")
            if self.extra_cols.min() < 0 or self.extra_cols.max() >= m:
                raise ValueError("extra_cols out of range")
            key = self.extra_rows * max(m, 1) + self.extra_cols
            if np.any(np.diff(key) <= 0):
                raise ValueError("exceptions must be sorted by (row, column) without repeats")
        # Padding bits past column M must be 0 and value bits only where known (canonical form).
        if m % 8 and n:
            pad = np.uint8((0xFF << (m % 8)) & 0xFF)
            if np.any(self.value[:, -1] & pad) or np.any(self.known[:, -1] & pad):
                raise ValueError("padding bits past the last model must be 0")
        if np.any(self.value & ~self.known):
            raise ValueError("a value bit is set where the label is unknown")

    # ------------------------------------------------------------------ sizes
    @property
    def n_rows(self) -> int:
        return self.shape[0]

    @property
    def n_models(self) -> int:
        return self.shape[1]

    @property
    def nbytes(self) -> int:
        """Bytes of the arrays (what the .npy files hold, less their 128-byte headers)."""
        return int(
            self.value.nbytes + self.known.nbytes + self.extra_rows.nbytes
            + self.extra_cols.nbytes + self.extra_values.nbytes
        )

    @property
    def n_known(self) -> int:
        return int(_POPCOUNT[self.known].sum(dtype=np.int64))  # padding bits are 0

    # ------------------------------------------------------------------ reading
    def _bits(self, a: np.ndarray) -> np.ndarray:
        return np.unpackbits(a, axis=1, count=self.n_models, bitorder=BITORDER).astype(bool)

    def rows(self, idx: Sequence[int] | np.ndarray, dtype=np.float32) -> np.ndarray:
        """The labels of rows ``idx`` (len(idx) × M, NaN where unknown), in the order given.

        An index of -1 (no neighbour, as ``transforms.knn.Neighbors``) gives a row of NaN.
        """
        idx = np.asarray(idx, dtype=np.int64).reshape(-1)
        if idx.size and (idx.max() >= self.n_rows or idx.min() < -1):
            raise IndexError(f"row index out of range for {self.n_rows} rows")
        valid = idx >= 0
        take = np.where(valid, idx, 0)
        out = self._bits(self.value[take]).astype(dtype)
        unknown = ~self._bits(self.known[take])
        unknown[~valid] = True
        out[unknown] = np.nan
        self._apply_extra(out, idx, np.arange(self.n_models))
        return out

    def row_known(self, idx: Sequence[int] | np.ndarray) -> np.ndarray:
        """len(idx) × M booleans: a label exists (False for index -1)."""
        idx = np.asarray(idx, dtype=np.int64).reshape(-1)
        out = self._bits(self.known[np.where(idx >= 0, idx, 0)])
        out[idx < 0] = False
        return out

    def columns(self, cols: Sequence[int] | np.ndarray, dtype=np.float32,
                chunk_rows: int = DEFAULT_CHUNK_ROWS) -> np.ndarray:
        """n × len(cols) labels of models ``cols`` (NaN where unknown), unpacking only the bytes
        that hold them."""
        cols = np.asarray(cols, dtype=np.int64).reshape(-1)
        if cols.size and (cols.min() < 0 or cols.max() >= self.n_models):
            raise IndexError(f"column index out of range for {self.n_models} models")
        uniq, inverse = np.unique(cols, return_inverse=True)
        if uniq.size < cols.size:  # a column asked for twice: read each once
            return self.columns(uniq, dtype, chunk_rows)[:, inverse.reshape(-1)]
        byte, shift = cols // 8, (cols % 8).astype(np.uint8)  # little bit order: bit j = 1 << j
        out = np.empty((self.n_rows, cols.size), dtype=dtype)
        for start in range(0, self.n_rows, chunk_rows):
            sl = slice(start, min(start + chunk_rows, self.n_rows))
            v = (self.value[sl][:, byte] >> shift) & 1
            k = (self.known[sl][:, byte] >> shift) & 1
            block = v.astype(dtype)
            block[k == 0] = np.nan
            out[sl] = block
        self._apply_extra(out, np.arange(self.n_rows), cols)
        return out

    def column(self, m: int, dtype=np.float32) -> np.ndarray:
        return self.columns([m], dtype=dtype)[:, 0]

    def unpack(self, dtype=np.float32, chunk_rows: int = DEFAULT_CHUNK_ROWS) -> np.ndarray:
        """The whole n × M matrix (NaN where unknown)."""
        out = np.empty(self.shape, dtype=dtype)
        for start in range(0, self.n_rows, chunk_rows):
            stop = min(start + chunk_rows, self.n_rows)
            out[start:stop] = self.rows(np.arange(start, stop), dtype=dtype)
        return out

    def _apply_extra(self, out: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> None:
        """Write the exceptions that fall in ``rows`` × ``cols`` into ``out`` (in place)."""
        if not self.extra_rows.size or not out.size:
            return
        # exceptions whose row is asked for: positions in ``rows`` (rows may repeat)
        order = np.argsort(rows, kind="stable")
        srows = rows[order]
        lo = np.searchsorted(self.extra_rows, srows, side="left")
        hi = np.searchsorted(self.extra_rows, srows, side="right")
        hit = hi > lo
        if not hit.any():
            return
        col_pos = np.full(self.n_models, -1, dtype=np.int64)
        col_pos[cols] = np.arange(cols.size)
        for out_row, a, b in zip(order[hit], lo[hit], hi[hit]):
            c = col_pos[self.extra_cols[a:b]]
            ok = c >= 0
            out[out_row, c[ok]] = self.extra_values[a:b][ok]

    # ------------------------------------------------------------------ kNN helper
    def label_sums(self, indices: np.ndarray, weights: np.ndarray | None = None
                   ) -> tuple[np.ndarray, np.ndarray]:
        """For each query (row of ``indices``, q × k neighbour rows, -1 = none): Σ_j w_j y_jm
        and Σ_j w_j over the neighbours j that have a label for model m (q × M each, float64).

        ``weights`` (q × k, default 1) as ``transforms.knn.neighbor_weights``: where a labelled
        neighbour has weight +inf (distance 0), those neighbours alone count, with weight 1 each,
        as in ``transforms.knn.aggregate_labels``.
        """
        indices = np.asarray(indices, dtype=np.int64)
        q, k = indices.shape
        w = np.ones((q, k)) if weights is None else np.asarray(weights, dtype=np.float64)
        L = self.rows(indices.reshape(-1), dtype=np.float64).reshape(q, k, self.n_models)
        avail = ~np.isnan(L)  # False for index -1 too
        wb = np.broadcast_to(w[:, :, None], L.shape)
        inf = np.isinf(wb) & avail
        exact = inf.any(axis=1, keepdims=True)
        wb = np.where(exact, inf.astype(np.float64), np.where(avail, wb, 0.0))
        return (wb * np.where(avail, L, 0.0)).sum(axis=1), wb.sum(axis=1)

    def aggregate(self, indices: np.ndarray, weights: np.ndarray | None = None,
                  fallback: np.ndarray | None = None, chunk: int = 1024) -> np.ndarray:
        """g (q × M): ``transforms.knn.aggregate_labels`` over packed labels, with the same
        neighbours (``Neighbors.indices``), weights (``neighbor_weights``) and fallback."""
        indices = np.asarray(indices, dtype=np.int64)
        q = indices.shape[0]
        fb = np.full(self.n_models, np.nan) if fallback is None else np.asarray(fallback, float)
        G = np.empty((q, self.n_models), np.float64)
        for start in range(0, q, chunk):
            sl = slice(start, min(start + chunk, q))
            num, den = self.label_sums(indices[sl], None if weights is None else weights[sl])
            with np.errstate(invalid="ignore", divide="ignore"):
                G[sl] = np.where(den > 0, num / np.where(den > 0, den, 1.0), fb)
        return G

    def column_means(self, chunk_rows: int = DEFAULT_CHUNK_ROWS) -> np.ndarray:
        """Each model's mean label over the rows that have one (NaN for none): the
        ``train_mean`` fallback of ``transforms.knn.KNNCorrectness``. Counted from the bits (a
        bit position of every byte column at a time, ``chunk_rows`` rows at a time), never
        unpacked to floats: a leaderboard's router loads in a second, not seven. The exceptions
        (known, value bit 0) add their values."""
        W = self.value.shape[1]
        count = np.zeros(8 * W, np.int64)
        ones = np.zeros(8 * W, np.int64)
        for start in range(0, self.n_rows, chunk_rows):
            known, value = self.known[start:start + chunk_rows], self.value[start:start + chunk_rows]
            for b in range(8):  # little bit order: bit b of byte column w is model 8 w + b
                count[b::8] += ((known >> b) & 1).sum(axis=0, dtype=np.int64)
                ones[b::8] += ((value >> b) & 1).sum(axis=0, dtype=np.int64)
        count, total = count[: self.n_models], ones[: self.n_models].astype(np.float64)
        if self.extra_cols.size:
            total += np.bincount(self.extra_cols, weights=self.extra_values, minlength=self.n_models)
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(count > 0, total / np.where(count > 0, count, 1), np.nan)

    # ------------------------------------------------------------------ files
    def to_files(self, prefix: str = "") -> dict[str, bytes]:
        """``{prefix + name + ".npy": bytes}``; the exception files only when there are some."""
        files = {
            f"{prefix}value.npy": npy_bytes(self.value),
            f"{prefix}known.npy": npy_bytes(self.known),
            f"{prefix}shape.npy": npy_bytes(np.asarray(self.shape, dtype=np.int64)),
        }
        if self.extra_rows.size:
            files[f"{prefix}extra_rows.npy"] = npy_bytes(self.extra_rows)
            files[f"{prefix}extra_cols.npy"] = npy_bytes(self.extra_cols)
            files[f"{prefix}extra_values.npy"] = npy_bytes(self.extra_values)
        return files

    @classmethod
    def from_files(cls, files: Mapping[str, bytes], prefix: str = "") -> PackedLabels:
        """Read what ``to_files`` wrote (``allow_pickle=False``)."""
        shape = _npy_load(files[f"{prefix}shape.npy"])
        if shape.shape != (2,) or shape.dtype.kind not in "iu":
            raise ValueError(f"{prefix}shape.npy: expected 2 integers, got {shape!r}")
        if f"{prefix}extra_rows.npy" in files:
            er = _npy_load(files[f"{prefix}extra_rows.npy"]).astype(np.int64, copy=False)
            ec = _npy_load(files[f"{prefix}extra_cols.npy"]).astype(np.int64, copy=False)
            ev = _npy_load(files[f"{prefix}extra_values.npy"]).astype(np.float64, copy=False)
        else:
            er, ec, ev = _empty_extra()
        return cls(
            value=_npy_load(files[f"{prefix}value.npy"]),
            known=_npy_load(files[f"{prefix}known.npy"]),
            shape=(int(shape[0]), int(shape[1])),
            extra_rows=er, extra_cols=ec, extra_values=ev,
        )

    def save(self, folder: str, prefix: str = "labels_") -> list[str]:
        """Write the files under ``folder`` (any fsspec URL); returns their URLs."""
        import fsspec

        fs, root = fsspec.core.url_to_fs(folder)
        fs.makedirs(root, exist_ok=True)
        written = []
        for name, data in self.to_files(prefix).items():
            path = f"{root.rstrip('/')}/{name}"
            with fs.open(path, "wb") as f:
                f.write(data)
            written.append(path)
        return written

    @classmethod
    def load(cls, folder: str, prefix: str = "labels_") -> PackedLabels:
        import fsspec

        fs, root = fsspec.core.url_to_fs(folder)
        files = {}
        for suffix in (*SUFFIXES, *EXTRA_SUFFIXES):
            path = f"{root.rstrip('/')}/{prefix}{suffix}.npy"
            if suffix in SUFFIXES or fs.exists(path):
                with fs.open(path, "rb") as f:
                    files[f"{prefix}{suffix}.npy"] = f.read()
        return cls.from_files(files, prefix)

    def equals(self, other: PackedLabels) -> bool:
        return (
            self.shape == other.shape
            and np.array_equal(self.value, other.value)
            and np.array_equal(self.known, other.known)
            and np.array_equal(self.extra_rows, other.extra_rows)
            and np.array_equal(self.extra_cols, other.extra_cols)
            and np.array_equal(self.extra_values, other.extra_values)
        )


def _empty_extra() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return np.empty(0, np.int64), np.empty(0, np.int64), np.empty(0, np.float64)


def _pack_bits(b: np.ndarray) -> np.ndarray:
    return np.packbits(b, axis=1, bitorder=BITORDER)


# ---------------------------------------------------------------------- building
def pack(Y: np.ndarray, chunk_rows: int = DEFAULT_CHUNK_ROWS) -> PackedLabels:
    """Pack an n × M float matrix of 0/1 with NaN for unknown (other finite values become
    exceptions, kept exactly). Infinite values raise ``ValueError``."""
    Y = np.asarray(Y)
    if Y.ndim != 2:
        raise ValueError(f"labels must be a 2-d matrix, got shape {Y.shape}")
    if Y.dtype.kind not in "fiub":
        raise ValueError(f"labels must be numbers, got dtype {Y.dtype}")
    n, m = Y.shape
    value = np.zeros((n, packed_width(m)), np.uint8)
    known = np.zeros((n, packed_width(m)), np.uint8)
    ext_r, ext_c, ext_v = [], [], []
    for start in range(0, n, chunk_rows):
        stop = min(start + chunk_rows, n)
        block = Y[start:stop].astype(np.float64)
        if np.isinf(block).any():
            raise ValueError("labels must be finite numbers or NaN (found an infinity)")
        k = ~np.isnan(block)
        one = block == 1.0
        other = k & ~one & (block != 0.0)
        value[start:stop] = _pack_bits(one)
        known[start:stop] = _pack_bits(k)
        if other.any():
            r, c = np.nonzero(other)  # row-major: sorted by (row, column)
            ext_r.append(r + start)
            ext_c.append(c)
            ext_v.append(block[r, c])
    er, ec, ev = (
        (np.concatenate(ext_r).astype(np.int64), np.concatenate(ext_c).astype(np.int64),
         np.concatenate(ext_v)) if ext_r else _empty_extra()
    )
    return PackedLabels(value, known, (n, m), er, ec, ev)


def pack_bool(value: np.ndarray, known: np.ndarray) -> PackedLabels:
    """Pack from two n × M boolean arrays (``value`` is ignored where not ``known``)."""
    value, known = np.asarray(value, bool), np.asarray(known, bool)
    if value.shape != known.shape or value.ndim != 2:
        raise ValueError(f"value {value.shape} and known {known.shape} must be one 2-d shape")
    er, ec, ev = _empty_extra()
    return PackedLabels(_pack_bits(value & known), _pack_bits(known), value.shape, er, ec, ev)


def from_coo(rows: np.ndarray, cols: np.ndarray, y: np.ndarray, shape: tuple[int, int]
             ) -> PackedLabels:
    """Pack from long-format labels (row, column, y) without building the dense float matrix
    (what a bundle builder reading the labels table at 100k × 4k needs). A (row, column) given
    twice raises ``ValueError`` (average per input first, as ``BenchmarkArrays.Y`` does)."""
    rows = np.asarray(rows, np.int64)
    cols = np.asarray(cols, np.int64)
    y = np.asarray(y, np.float64)
    n, m = int(shape[0]), int(shape[1])
    if not (rows.shape == cols.shape == y.shape) or rows.ndim != 1:
        raise ValueError("rows, cols and y must be 1-d arrays of one length")
    if rows.size:
        if rows.min() < 0 or rows.max() >= n or cols.min() < 0 or cols.max() >= m:
            raise ValueError(f"a (row, column) is outside the shape {shape}")
        if not np.isfinite(y).all():
            raise ValueError("y must be finite (leave unknown labels out)")
    key = rows * max(m, 1) + cols
    step = np.diff(key)
    if np.any(step < 0):  # not sorted by (row, column) yet
        order = np.argsort(key, kind="stable")
        rows, cols, y, key = rows[order], cols[order], y[order], key[order]
        step = np.diff(key)
    if np.any(step == 0):
        raise ValueError("a (row, column) is given twice")
    w = packed_width(m)
    value = np.zeros((n, w), np.uint8)
    known = np.zeros((n, w), np.uint8)
    one = y == 1.0
    step = max(1, DEFAULT_CHUNK_ROWS * 64 // max(m, 1) * 8)  # rows per dense bool block
    bounds = np.searchsorted(rows, np.arange(0, n + step, step))
    for start, a, b in zip(range(0, n, step), bounds[:-1], bounds[1:]):
        stop = min(start + step, n)
        kb = np.zeros((stop - start, m), bool)
        vb = np.zeros((stop - start, m), bool)
        r, c = rows[a:b] - start, cols[a:b]
        kb[r, c] = True
        vb[r, c] = one[a:b]
        known[start:stop] = _pack_bits(kb)
        value[start:stop] = _pack_bits(vb)
    other = (y != 1.0) & (y != 0.0)
    return PackedLabels(
        value, known, (n, m), rows[other].copy(), cols[other].copy(), y[other].copy(),
    )


def dense_float32_bytes(n: int, m: int) -> int:
    """Bytes of today's ``index/labels.npy`` (n × M float32), for comparison."""
    return int(n) * int(m) * 4


def packed_bytes(n: int, m: int, n_extra: int = 0) -> int:
    """Bytes of the packed arrays for an n × M matrix with ``n_extra`` exceptions."""
    return 2 * int(n) * packed_width(m) + 24 * int(n_extra)


def from_labels_frame(labels, input_ids: Sequence[str], models: Sequence[str]) -> PackedLabels:
    """Pack the store's ``labels`` table (``input_id, model, y``; one row per dataset) for the
    index rows ``input_ids`` and columns ``models``: the mean y over an input's datasets, as
    ``transforms.evaluate.BenchmarkArrays.Y`` (0.5 and the like become exceptions). Labels of
    inputs or models not asked for are left out."""
    import polars as pl

    rows = pl.DataFrame({"input_id": pl.Series(list(input_ids), dtype=pl.String)}).with_row_index("r")
    cols = pl.DataFrame({"model": pl.Series(list(models), dtype=pl.String)}).with_row_index("c")
    hit = (
        labels.lazy()
        .select("input_id", "model", pl.col("y").cast(pl.Float64))
        .join(rows.lazy(), on="input_id", how="inner")
        .join(cols.lazy(), on="model", how="inner")
        .select("r", "c", "y")
        .collect()
    )
    m = max(len(cols), 1)
    key = hit["r"].to_numpy().astype(np.int64) * m + hit["c"].to_numpy().astype(np.int64)
    y = hit["y"].to_numpy()
    order = np.argsort(key, kind="stable")
    key, y = key[order], y[order]
    if key.size:  # mean over the datasets of an (input, model): segments of equal keys
        starts = np.flatnonzero(np.r_[True, np.diff(key) != 0])
        if starts.size < key.size:
            y = np.add.reduceat(y, starts) / np.diff(np.r_[starts, key.size])
            key = key[starts]
    return from_coo(
        key // m, key % m, y,
        (len(rows), len(cols)),
    )
