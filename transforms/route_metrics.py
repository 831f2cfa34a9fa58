"""How a cost-aware router is judged (docs/method.md#how-a-cost-aware-router-is-judged; RouterBench, Hu et al. 2024).

- ``upper_hull(points)``: the non-decreasing concave upper hull of (cost, quality) points: what
  one can reach by mixing the points at random (a mixture of two points lies on the segment
  between them) and never paying more for less. The single models' hull is the baseline a router
  must lie above.
- ``hull_value(hull, c)``: the hull's quality at cost c (flat beyond its last point, NaN before its
  first).
- ``aiq(points, lo, hi)``: area under the hull over [lo, hi] divided by hi − lo.
- ``quality_at_cost`` / ``cost_at_quality``: read a hull at a cost, or the least cost reaching a
  quality (NaN if never).
- ``brier``, ``ece``: calibration of predicted probabilities against 0/1 labels.
"""

from __future__ import annotations

import numpy as np


def upper_hull(costs, qualities) -> np.ndarray:
    """(k × 2) vertices (cost ascending) of the non-decreasing concave upper hull of the points."""
    c = np.asarray(costs, np.float64)
    q = np.asarray(qualities, np.float64)
    ok = np.isfinite(c) & np.isfinite(q)
    pts = sorted(set(zip(c[ok].tolist(), q[ok].tolist())), key=lambda p: (p[0], -p[1]))
    if not pts:
        return np.empty((0, 2))
    # Non-decreasing: drop every point that a cheaper point beats or equals.
    mono = []
    for p in pts:
        if not mono or p[1] > mono[-1][1]:
            mono.append(p)
    hull: list[tuple[float, float]] = []
    for p in mono:  # Andrew's monotone chain, upper part
        while len(hull) >= 2:
            (x1, y1), (x2, y2) = hull[-2], hull[-1]
            if (x2 - x1) * (p[1] - y1) - (y2 - y1) * (p[0] - x1) >= 0:
                hull.pop()
            else:
                break
        hull.append(p)
    return np.array(hull)


def hull_value(hull: np.ndarray, c) -> np.ndarray:
    """The hull's quality at cost(s) ``c``: linear between vertices, flat after the last, NaN
    before the first."""
    c = np.asarray(c, np.float64)
    if hull.shape[0] == 0:
        return np.full(c.shape, np.nan)
    v = np.interp(c, hull[:, 0], hull[:, 1], left=np.nan, right=hull[-1, 1])
    return np.where(c < hull[0, 0], np.nan, v)


def aiq(costs, qualities, lo: float, hi: float, n: int = 2001) -> float:
    """Average quality of the hull over [lo, hi] (the part before its first point counts as 0,
    so a router that cannot reach the cheap end is penalised there)."""
    if not (np.isfinite(lo) and np.isfinite(hi)) or hi <= lo:
        return float("nan")
    hull = upper_hull(costs, qualities)
    grid = np.linspace(lo, hi, n)
    vals = np.nan_to_num(hull_value(hull, grid), nan=0.0)
    return float(np.trapezoid(vals, grid) / (hi - lo))


def quality_at_cost(costs, qualities, c: float) -> float:
    return float(hull_value(upper_hull(costs, qualities), np.array([c]))[0])


def cost_at_quality(costs, qualities, target: float) -> float:
    """Least cost at which the hull reaches ``target`` quality (NaN if it never does)."""
    hull = upper_hull(costs, qualities)
    if hull.shape[0] == 0 or hull[-1, 1] < target - 1e-12:
        return float("nan")
    if hull[0, 1] >= target - 1e-12:
        return float(hull[0, 0])
    i = int(np.argmax(hull[:, 1] >= target - 1e-12))
    (c0, q0), (c1, q1) = hull[i - 1], hull[i]
    return float(c0 + (target - q0) * (c1 - c0) / (q1 - q0))


METRIC_BLOCK_BYTES = 64 * 2**20  # float64 bytes of the predictions one block of a metric reads


def labelled_pairs(p, y, max_bytes: int | None = None):
    """(p, y) as float64 vectors over the entries where both exist, a block of rows at a time
    (``label_matrix.row_blocks``): a leaderboard's held-out n × M predictions are not copied
    whole. A matrix that fits one block gives one pair: numpy's whole-matrix numbers."""
    from benchroute.transforms import label_matrix

    p, y = np.asarray(p), np.asarray(y)
    if p.ndim < 2:
        p, y = p.reshape(1, -1), y.reshape(1, -1)
    for sl in label_matrix.row_blocks(p.shape[0], int(np.prod(p.shape[1:])),
                                      max_bytes or METRIC_BLOCK_BYTES):
        pb, yb = np.asarray(p[sl], np.float64), np.asarray(y[sl], np.float64)
        ok = ~np.isnan(pb) & ~np.isnan(yb)
        yield pb[ok], yb[ok]


def labelled_mean(p, y, f) -> float:
    """The mean of ``f(p, y)`` over the entries where both exist (NaN when none)."""
    total, count = 0.0, 0
    for pb, yb in labelled_pairs(p, y):
        if pb.size:
            total += float(np.add.reduce(f(pb, yb)))
            count += pb.size
    return total / count if count else float("nan")


def brier(p, y) -> float:
    """Mean squared error of probabilities ``p`` against labels ``y`` over entries where both exist."""
    return labelled_mean(p, y, lambda pb, yb: (pb - yb) ** 2)


def ece(p, y, bins: int = 15) -> float:
    """Expected calibration error: Σ_b (n_b / n)·|mean y_b − mean p_b| over equal-width bins."""
    cnt = np.zeros(bins, np.int64)
    sp, sy = np.zeros(bins), np.zeros(bins)
    for pb, yb in labelled_pairs(p, y):
        b = np.minimum((pb * bins).astype(int), bins - 1)
        cnt += np.bincount(b, minlength=bins)
        sp += np.bincount(b, weights=pb, minlength=bins)
        sy += np.bincount(b, weights=yb, minlength=bins)
    if cnt.sum() == 0:
        return float("nan")
    nz = cnt > 0
    return float(np.sum(np.abs(sy[nz] - sp[nz])) / cnt.sum())


def binary_accuracy(p, y) -> float:
    """Share of entries where 1[p > 0.5] equals the label (entries where both exist)."""
    return labelled_mean(p, y, lambda pb, yb: ((pb > 0.5) == (yb > 0.5)).astype(np.float64))
