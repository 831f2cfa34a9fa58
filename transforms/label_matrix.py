"""Per-model statistics of a dense label matrix (n × M, NaN = no label), read a block of rows at a
time.

A leaderboard's label matrix (100k inputs × 4,000 models) is 1.6 GB in float32: a copy of it (a
row selection, ``np.nansum``'s NaN-free copy, a float64 cast) can double a step's memory. These
helpers never copy more than ``BLOCK_BYTES`` of it. A matrix that fits in one block is read in one
go, exactly as ``np.nansum(Y[rows], axis=0)`` would (same order of additions), so small benchmarks
give bit-identical results whichever path computed them.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

# float64 bytes of one block of label rows: every float64 label matrix (evaluate.dense_dtype:
# up to 64 M cells) is one block, so its statistics here are numpy's whole-matrix ones, bit for
# bit (the LODO's fold fallbacks above kernel.FOLD_TOTALS_BYTES come from totals instead).
BLOCK_BYTES = 512 * 2**20


def row_blocks(n_rows: int, n_cols: int, max_bytes: int = BLOCK_BYTES) -> Iterator[slice]:
    """Slices of ``n_rows`` rows, each at most ``max_bytes`` of float64 (at least one row)."""
    step = max(1, int(max_bytes // (8 * max(n_cols, 1))))
    for start in range(0, n_rows, step):
        yield slice(start, min(start + step, n_rows))


def column_counts_sums(Y: np.ndarray, rows: np.ndarray | None = None, *,
                       max_bytes: int = BLOCK_BYTES) -> tuple[np.ndarray, np.ndarray]:
    """Per column: the number of labels (non-NaN entries) and their sum (float64), over ``rows``
    (indices or a boolean mask; None = all rows)."""
    Y = np.asarray(Y)
    if Y.ndim == 1:
        Y = Y[:, None]
    if rows is not None:
        rows = np.asarray(rows)
        rows = np.flatnonzero(rows) if rows.dtype == bool else rows
    n = Y.shape[0] if rows is None else rows.size
    counts = np.zeros(Y.shape[1], np.int64)
    sums = np.zeros(Y.shape[1], np.float64)
    for sl in row_blocks(n, Y.shape[1], max_bytes):
        block = Y[sl] if rows is None else Y[rows[sl]]
        counts += (~np.isnan(block)).sum(axis=0)
        sums += np.nansum(block, axis=0, dtype=np.float64)
    return counts, sums


def column_means(Y: np.ndarray, rows: np.ndarray | None = None, *,
                 max_bytes: int = BLOCK_BYTES) -> tuple[np.ndarray, np.ndarray]:
    """Per column: (number of labels, their mean), the mean NaN where a column has none."""
    counts, sums = column_counts_sums(Y, rows, max_bytes=max_bytes)
    return counts, means_of(counts, sums)


def means_of(counts: np.ndarray, sums: np.ndarray) -> np.ndarray:
    """Each column's mean from its label count and sum (NaN where it has no label)."""
    with np.errstate(invalid="ignore", divide="ignore"):
        means = sums / np.maximum(counts, 1)
    return np.where(counts > 0, means, np.nan)


def labelled_counts(Y: np.ndarray, rows: np.ndarray | None = None, *,
                    max_bytes: int = BLOCK_BYTES) -> np.ndarray:
    """Per column: the number of labels over ``rows`` (see ``column_counts_sums``)."""
    return column_counts_sums(Y, rows, max_bytes=max_bytes)[0]


def rows_with_label(Y: np.ndarray, *, max_bytes: int = BLOCK_BYTES) -> np.ndarray:
    """(n,) bool: the rows with at least one label."""
    Y = np.asarray(Y)
    Y = Y[:, None] if Y.ndim == 1 else Y
    out = np.empty(Y.shape[0], bool)
    for sl in row_blocks(Y.shape[0], Y.shape[1], max_bytes):
        out[sl] = (~np.isnan(Y[sl])).any(axis=1)
    return out


def value_range(Y: np.ndarray) -> tuple[float, float] | None:
    """(min, max) of the labels, ignoring NaN, without a copy; None when there is no label."""
    Y = np.asarray(Y)
    if Y.size == 0:
        return None
    lo, hi = np.fmin.reduce(Y, axis=None), np.fmax.reduce(Y, axis=None)  # NaN only if all are
    return None if np.isnan(lo) else (float(lo), float(hi))


class RowsOf:
    """Rows ``rows`` of a dense label matrix ``Y``, followed by the rows of ``extra`` (a second
    dense matrix with as many columns), as a row source (``knn.is_row_source``): what
    ``Y[rows]`` or ``np.vstack([Y[rows], extra])`` holds, read a neighbours' rows at a time and
    never copied whole (a leaderboard's training index without one held-out task is 1.6 GB).
    ``column_means`` adds the same rows in the same blocks as ``column_means`` of the dense
    float64 stack, so a float64 matrix gives bit-identical means either way; with ``stats``
    (the label counts and sums of Y's ``rows``, known already: a leaderboard's fold totals) it
    adds only the extra rows' to them, no pass over Y's."""

    def __init__(self, Y: np.ndarray, rows: np.ndarray, extra: np.ndarray | None = None,
                 *, stats: tuple[np.ndarray, np.ndarray] | None = None) -> None:
        self.Y = np.asarray(Y)
        self.stats = stats
        rows = np.asarray(rows)
        self.index = np.flatnonzero(rows) if rows.dtype == bool else rows.astype(np.int64)
        M = self.Y.shape[1]
        self.extra = np.zeros((0, M), np.float64) if extra is None else np.asarray(extra, np.float64)
        if self.extra.ndim == 1:
            self.extra = self.extra[:, None]
        if self.extra.shape[1] != M:
            raise ValueError(f"{self.extra.shape[1]} extra columns for a matrix of {M}")
        self.shape = (self.index.size + self.extra.shape[0], M)

    def stack(self, extra: np.ndarray) -> RowsOf:
        """These rows followed by ``extra``'s (after any extra rows already here)."""
        extra = np.asarray(extra, np.float64)
        extra = extra[:, None] if extra.ndim == 1 else extra
        return RowsOf(self.Y, self.index, np.vstack([self.extra, extra]), stats=self.stats)

    def rows(self, idx, dtype=np.float64) -> np.ndarray:
        """Rows ``idx`` (len(idx) × M, NaN rows for index -1), in the order given."""
        idx = np.asarray(idx, np.int64).reshape(-1)
        n_base = self.index.size
        if idx.size and (idx.max() >= self.shape[0] or idx.min() < -1):
            raise IndexError(f"row index out of range for {self.shape[0]} rows")
        out = np.full((idx.size, self.shape[1]), np.nan, dtype)
        base = (idx >= 0) & (idx < n_base)
        out[base] = self.Y[self.index[idx[base]]]
        more = idx >= n_base
        out[more] = self.extra[idx[more] - n_base]
        return out

    def column_means(self, max_bytes: int = BLOCK_BYTES) -> np.ndarray:
        """Each column's mean over the rows that have a label (NaN for none)."""
        n, M = self.shape
        if self.stats is not None:
            more = column_counts_sums(self.extra, max_bytes=max_bytes)
            return means_of(self.stats[0] + more[0], self.stats[1] + more[1])
        counts = np.zeros(M, np.int64)
        sums = np.zeros(M, np.float64)
        for sl in row_blocks(n, M, max_bytes):
            block = self.rows(np.arange(sl.start, sl.stop))
            counts += (~np.isnan(block)).sum(axis=0)
            sums += np.nansum(block, axis=0, dtype=np.float64)
        return means_of(counts, sums)
