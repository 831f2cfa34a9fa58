"""Thresholds of a strong/weak router: the α that sends a target share of queries to the strong
model (docs/method.md#thresholds-and-calibration: "calibrate α on held-out data so a target call share is met").

A router sends a query to the strong model when its score p ≥ α (RouteLLM's rule). Routers whose
scores take few values (a kNN difference of counts) put many queries on the same score, and no α
then gives a share inside such a block. A threshold is therefore a pair (α, τ): strong when
p > α, or p = α and the query's key u < τ, with u = ``pair_routers.query_keys`` (a uniform
number hashed from the query's embedding, so the same query always gets the same answer). τ = 1
is RouteLLM's p ≥ α; a continuous score never needs another τ.

For a target share s on calibration scores (no labels needed), k = round(s·n) queries must go
strong: α is the k-th highest score; τ splits the queries at α between the two keys that leave
exactly k strong on the calibration set (without keys: τ = 1, and α moves to the next float above
when that gives a share nearer to s). RouteLLM calibrates the same way, ``quantile(1 − s)`` of its
scores on Arena prompts.

- ``calibrate(scores, shares, keys=None)``: rows {target_share, alpha, tau, share, n}.
- ``decide(scores, alpha, tau=1, keys=None)``, ``share_at``: the decisions, and their share.
- ``recalibrate(scores, table, keys=None)``: on a user's own unlabelled queries, per target share:
  the share the stored (α, τ) gives them and their own (α, τ) with its share.
- ``threshold_for(table, s)``: (α, τ) for a share between the stored ones (α linear in the share).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

DEFAULT_SHARES: tuple[float, ...] = tuple(round(0.05 * i, 2) for i in range(1, 20))  # .05 … .95


class CalibrationError(ValueError):
    """A calibration request that cannot be answered (message says why)."""


def _scores(scores, keys=None) -> tuple[np.ndarray, np.ndarray | None]:
    s = np.asarray(scores, np.float64).ravel()
    k = None if keys is None else np.asarray(keys, np.float64).ravel()
    if k is not None and k.shape != s.shape:
        raise CalibrationError(f"{s.size} scores but {k.size} keys")
    ok = np.isfinite(s)
    s = s[ok]
    k = None if k is None else k[ok]
    if s.size == 0:
        raise CalibrationError("no finite router scores to calibrate on")
    return s, k


def _share(value) -> float:
    try:
        s = float(value)
    except (TypeError, ValueError):
        raise CalibrationError(f"a share must be a number in [0, 1], got {value!r}") from None
    if not 0.0 <= s <= 1.0:
        raise CalibrationError(f"a share must be in [0, 1], got {value!r}")
    return s


def decide(scores, alpha: float, tau: float = 1.0, keys=None) -> np.ndarray:
    """(n,) bool: send to the strong model (p > α, or p = α and key < τ; no keys: p = α goes
    strong when τ ≥ ½)."""
    p = np.asarray(scores, np.float64)
    at = p == float(alpha)
    if keys is None:
        tie = at if tau >= 0.5 else np.zeros_like(at)
    else:
        tie = at & (np.asarray(keys, np.float64) < float(tau))
    return (p > float(alpha)) | tie


def share_at(scores, alpha: float, tau: float = 1.0, keys=None) -> float:
    """Share of the queries ``decide`` sends to the strong model."""
    s, k = _scores(scores, keys)
    return float(np.mean(decide(s, alpha, tau, k)))


def threshold_for_share(scores, share: float, keys=None) -> tuple[float, float]:
    """(α, τ) for ``share`` on these scores (module doc)."""
    s, k = _scores(scores, keys)
    target = _share(share)
    n = s.size
    m = int(np.clip(int(np.floor(target * n + 0.5)), 0, n))
    desc = np.sort(s)[::-1]
    if m == 0:
        return float(np.nextafter(desc[0], np.inf)), 1.0
    alpha = float(desc[m - 1])
    above = int(np.sum(s > alpha))
    at = s == alpha
    n_at = int(at.sum())
    need = m - above  # 1 … n_at queries at α must go strong
    if need >= n_at:
        return alpha, 1.0
    if k is None:
        lo, hi = above / n, (above + n_at) / n
        if abs(lo - target) < abs(hi - target):
            return float(np.nextafter(alpha, np.inf)), 1.0
        return alpha, 1.0
    kk = np.sort(k[at])
    return alpha, float(0.5 * (kk[need - 1] + kk[need]))


def calibrate(scores, shares: Sequence[float] = DEFAULT_SHARES, keys=None) -> list[dict]:
    """Rows {target_share, alpha, tau, share, n} for each target share (see module doc)."""
    s, k = _scores(scores, keys)
    rows = []
    for t in shares:
        a, tau = threshold_for_share(s, t, k)
        rows.append({"target_share": _share(t), "alpha": a, "tau": tau,
                     "share": float(np.mean(decide(s, a, tau, k))), "n": int(s.size)})
    return rows


def threshold_for(table: Sequence[Mapping], share: float) -> tuple[float, float]:
    """(α, τ) for ``share`` from a calibration table: the stored pair at a stored share; between
    two stored shares α is interpolated linearly and τ = 1 (clamped at the ends)."""
    target = _share(share)
    if not table:
        raise CalibrationError("the calibration table is empty")
    t = np.array([float(r["target_share"]) for r in table])
    hit = np.flatnonzero(np.isclose(t, target, atol=1e-12))
    if hit.size:
        r = table[int(hit[0])]
        return float(r["alpha"]), float(r.get("tau", 1.0))
    a = np.array([float(r["alpha"]) for r in table])
    order = np.argsort(t)
    return float(np.interp(target, t[order], a[order])), 1.0


def recalibrate(scores, table: Sequence[Mapping] | None = None, *, keys=None,
                shares: Sequence[float] | None = None) -> list[dict]:
    """On a user's queries' scores: per target share (``shares``, else the stored table's, else
    the defaults) the user's own (α, τ) and its share on these queries, and — with a stored
    ``table`` — the share its (α, τ) gives them (``stored_share``)."""
    s, k = _scores(scores, keys)
    if shares is not None:
        targets = [float(x) for x in shares]
    elif table:
        targets = [float(r["target_share"]) for r in table]
    else:
        targets = list(DEFAULT_SHARES)
    out = []
    for t in targets:
        a, tau = threshold_for_share(s, t, k)
        row = {"target_share": _share(t), "alpha": a, "tau": tau,
               "share": float(np.mean(decide(s, a, tau, k))), "n": int(s.size),
               "stored_alpha": None, "stored_tau": None, "stored_share": None}
        if table:
            sa, st = threshold_for(table, t)
            row.update(stored_alpha=sa, stored_tau=st, stored_share=float(np.mean(decide(s, sa, st, k))))
        out.append(row)
    return out
