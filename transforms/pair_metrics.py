"""How a strong/weak router is judged (docs/method.md#metrics-pgr-apgr-cpt; RouteLLM, Ong et al. 2024).

On n labelled queries with router scores p_i and qualities q_s(i), q_w(i) of the two models
(0/1 correctness, or a judge score):

- a threshold α gives the call share c(α) = mean 1[p ≥ α] and the quality
  r(α) = mean(q_s where p ≥ α else q_w);
- PGR(α) = (r(α) − r_weak) / (r_strong − r_weak), with r_strong, r_weak the models' mean quality
  on the same queries (NaN when they are equal);
- the curve RouteLLM measures (``routellm_curve``): the thresholds are the 11 edges of 10
  equal-count bins of the scores (``pandas.qcut(scores, 10, retbins=True)``; np.quantile, linear);
  every edge sends p ≥ edge except the last, which sends p > edge (0 calls);
- APGR: the area under PGR over call share by the trapezoid rule over the curve's points sorted
  by call share, divided by the covered call-share range (RouteLLM's
  (AUC − weak AUC) / (strong AUC − weak AUC) is the same number);
- CPT(x): the least call share at which the measured curve reaches PGR x — the curve is walked in
  order of call share and the first segment that crosses x is interpolated. RouteLLM's
  ``np.interp(x, pgr, share)`` assumes PGR increases with the share; on a curve that does not, it
  returns a wrong share (``cpt_routellm`` reproduces it, for comparison only);
- ``full_curve``: every distinct threshold (the exact step curve, n + 1 points at most);
- ``bootstrap``: percentile intervals of APGR, CPT(50 %), CPT(80 %), r and c at given thresholds,
  over queries resampled with replacement (the thresholds of the RouteLLM curve recomputed on
  each resample, as they would be on another sample of queries);
- ``oracle_apgr``: the APGR of the oracle that sends strong-better queries first, exactly
  (integral of its piecewise linear curve); for 0/1 labels with p₊ = P(strong right, weak wrong)
  and p₋ = P(weak right, strong wrong): (p₊ − p₊²/2 − p₋²/2) / (p₊ − p₋).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

N_BINS = 10
CPT_LEVELS = (0.5, 0.8)


@dataclass(frozen=True)
class Curve:
    """Points of a router's curve, in the order measured: ``threshold`` (inf: no call),
    ``call_share`` c, ``quality`` r, ``pgr``; and the single models' qualities."""

    threshold: np.ndarray
    call_share: np.ndarray
    quality: np.ndarray
    pgr: np.ndarray
    r_strong: float
    r_weak: float

    def rows(self) -> list[dict]:
        return [{"threshold": float(t), "call_share": float(c), "quality": float(q), "pgr": float(p)}
                for t, c, q, p in zip(self.threshold, self.call_share, self.quality, self.pgr)]


def _inputs(scores, q_strong, q_weak) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    p = np.asarray(scores, np.float64).ravel()
    qs = np.asarray(q_strong, np.float64).ravel()
    qw = np.asarray(q_weak, np.float64).ravel()
    if not (p.shape == qs.shape == qw.shape):
        raise ValueError(f"scores {p.shape}, q_strong {qs.shape}, q_weak {qw.shape} must match")
    if p.size == 0:
        raise ValueError("no queries")
    if not (np.isfinite(p).all() and np.isfinite(qs).all() and np.isfinite(qw).all()):
        raise ValueError("scores and qualities must be finite (drop unlabelled queries first)")
    return p, qs, qw


def pgr(r, r_strong: float, r_weak: float) -> np.ndarray:
    """(r − r_weak) / (r_strong − r_weak); NaN when the two models are equally good."""
    gap = float(r_strong) - float(r_weak)
    r = np.asarray(r, np.float64)
    if abs(gap) < 1e-12:
        return np.full(r.shape, np.nan)
    return (r - float(r_weak)) / gap


def curve_at(scores, q_strong, q_weak, thresholds, strict: Sequence[bool] | None = None) -> Curve:
    """The curve at the given thresholds (p ≥ α sends to strong; ``strict[i]``: p > α)."""
    p, qs, qw = _inputs(scores, q_strong, q_weak)
    th = np.asarray(thresholds, np.float64).ravel()
    st = np.zeros(th.size, bool) if strict is None else np.asarray(strict, bool)
    sel = np.where(st[:, None], p[None, :] > th[:, None], p[None, :] >= th[:, None])
    c = sel.mean(axis=1)
    r = np.where(sel, qs[None, :], qw[None, :]).mean(axis=1)
    rs, rw = float(qs.mean()), float(qw.mean())
    return Curve(th, c, r, pgr(r, rs, rw), rs, rw)


def routellm_thresholds(scores, n_bins: int = N_BINS) -> np.ndarray:
    """The n_bins + 1 quantile edges RouteLLM evaluates at (``pandas.qcut(..., retbins=True)``)."""
    p = np.asarray(scores, np.float64).ravel()
    return np.quantile(p, np.linspace(0.0, 1.0, int(n_bins) + 1))


def routellm_curve(scores, q_strong, q_weak, n_bins: int = N_BINS) -> Curve:
    """RouteLLM's evaluation curve (see module doc): the last edge sends p > edge."""
    th = routellm_thresholds(scores, n_bins)
    strict = np.zeros(th.size, bool)
    strict[-1] = True
    return curve_at(scores, q_strong, q_weak, th, strict)


def full_curve(scores, q_strong, q_weak) -> Curve:
    """Every distinct threshold, from no strong call to all (the exact step curve)."""
    p, qs, qw = _inputs(scores, q_strong, q_weak)
    order = np.argsort(-p, kind="stable")
    ps = p[order]
    gain = np.concatenate([[0.0], np.cumsum(qs[order] - qw[order])])
    # A threshold can only fall between distinct scores: keep the last index of each score block.
    ends = np.flatnonzero(np.r_[ps[1:] != ps[:-1], True]) + 1
    k = np.concatenate([[0], ends])
    n = p.size
    rs, rw = float(qs.mean()), float(qw.mean())
    r = rw + gain[k] / n
    th = np.concatenate([[np.inf], ps[ends - 1]])
    return Curve(th, k / n, r, pgr(r, rs, rw), rs, rw)


def _sorted_by_share(c, y) -> tuple[np.ndarray, np.ndarray]:
    c = np.asarray(c, np.float64)
    y = np.asarray(y, np.float64)
    ok = np.isfinite(c) & np.isfinite(y)
    c, y = c[ok], y[ok]
    order = np.lexsort((y, c))  # by share; equal shares keep the lower value first
    return c[order], y[order]


def apgr(call_share, pgr_values) -> float:
    """Trapezoid area under PGR over call share / the covered call-share range (NaN if the
    curve covers no range)."""
    c, y = _sorted_by_share(call_share, pgr_values)
    if c.size < 2 or c[-1] - c[0] <= 0:
        return float("nan")
    return float(np.trapezoid(y, c) / (c[-1] - c[0]))


def cpt(call_share, pgr_values, level: float) -> float:
    """The least call share at which the curve as measured reaches PGR ``level`` (see module
    doc); NaN if it never does."""
    c, y = _sorted_by_share(call_share, pgr_values)
    if c.size == 0:
        return float("nan")
    if y[0] >= level:
        return float(c[0])
    hit = np.flatnonzero(y >= level)
    if hit.size == 0:
        return float("nan")
    i = int(hit[0])
    c0, c1, y0, y1 = c[i - 1], c[i], y[i - 1], y[i]
    return float(c0 + (level - y0) * (c1 - c0) / (y1 - y0))


def cpt_routellm(call_share, pgr_values, level: float) -> float:
    """RouteLLM's reading, ``np.interp(level, pgr, share)`` over the points sorted by share: right
    only on a curve whose PGR increases with the share (kept to show the difference)."""
    c = np.asarray(call_share, np.float64)
    y = np.asarray(pgr_values, np.float64)
    order = np.argsort(c, kind="stable")
    return float(np.interp(level, y[order], c[order]))


def oracle_scores(q_strong, q_weak, scale: float | None = None) -> np.ndarray:
    """The oracle router's scores: (1 + (q_s − q_w)/scale)/2."""
    d = np.asarray(q_strong, np.float64) - np.asarray(q_weak, np.float64)
    s = float(scale) if scale else max(float(np.abs(d).max()), 1.0)
    return 0.5 * (1.0 + d / s)


def oracle_apgr(q_strong, q_weak) -> float:
    """The oracle's APGR (strong-better queries first, then ties, then weak-better), exactly."""
    c = full_curve(oracle_scores(q_strong, q_weak), q_strong, q_weak)
    return apgr(c.call_share, c.pgr)


def oracle_apgr_binary(p_plus: float, p_minus: float) -> float:
    """The closed form for 0/1 labels (module doc)."""
    return (p_plus - p_plus**2 / 2 - p_minus**2 / 2) / (p_plus - p_minus)


@dataclass(frozen=True)
class PairMetrics:
    """APGR and CPT of one router on one query set, with bootstrap percentile intervals."""

    n: int
    r_strong: float
    r_weak: float
    apgr: float
    apgr_ci: tuple[float, float]
    cpt: dict[float, float]
    cpt_ci: dict[float, tuple[float, float]]
    cpt_full: dict[float, float]  # CPT read from the exact step curve
    curve: Curve

    def row(self) -> dict:
        out = {"n": self.n, "r_strong": self.r_strong, "r_weak": self.r_weak, "apgr": self.apgr,
               "apgr_lo": self.apgr_ci[0], "apgr_hi": self.apgr_ci[1]}
        for lv in self.cpt:
            tag = f"cpt{int(round(lv * 100))}"
            out[tag] = self.cpt[lv]
            out[f"{tag}_lo"], out[f"{tag}_hi"] = self.cpt_ci[lv]
            out[f"{tag}_full"] = self.cpt_full[lv]
        return out


def _metrics_of(p, qs, qw, n_bins, levels):
    cv = routellm_curve(p, qs, qw, n_bins)
    return apgr(cv.call_share, cv.pgr), [cpt(cv.call_share, cv.pgr, lv) for lv in levels], cv


def _mean_metrics(P, qs, qw, n_bins, levels):
    """APGR and CPTs averaged over the rows of P (several draws of a random router)."""
    out = [_metrics_of(p, qs, qw, n_bins, levels) for p in P]
    with np.errstate(invalid="ignore"):
        return (float(np.mean([o[0] for o in out])),
                [float(np.nanmean([o[1][j] for o in out])) if any(np.isfinite(o[1][j]) for o in out)
                 else float("nan") for j in range(len(levels))],
                out[0][2])


def evaluate_scores(scores, q_strong, q_weak, *, n_bins: int = N_BINS, levels: Sequence[float] = CPT_LEVELS,
                    n_boot: int = 1000, seed: int = 0, ci: float = 0.95) -> PairMetrics:
    """APGR, CPT(levels) on the RouteLLM curve, with percentile bootstrap intervals over queries.
    ``scores`` (R × n) holds R draws of a randomised router: the metrics are their mean (RouteLLM
    averages its random router over 10 draws); the curve shown is the first draw's."""
    S = np.asarray(scores, np.float64)
    P = S.reshape(1, -1) if S.ndim == 1 else S
    for p_ in P:
        _inputs(p_, q_strong, q_weak)
    p, qs, qw = _inputs(P[0], q_strong, q_weak)
    a, cpts, cv = _mean_metrics(P, qs, qw, n_bins, levels)
    full = full_curve(p, qs, qw)
    rng = np.random.default_rng(seed)
    boots_a = np.full(int(n_boot), np.nan)
    boots_c = np.full((int(n_boot), len(levels)), np.nan)
    for b in range(int(n_boot)):
        idx = rng.integers(0, p.size, p.size)
        ba, bc, _ = _mean_metrics(P[:, idx], qs[idx], qw[idx], n_bins, levels)
        boots_a[b] = ba
        boots_c[b] = bc
    lo, hi = 50 * (1 - ci), 50 * (1 + ci)

    def interval(v):
        v = v[np.isfinite(v)]
        return (float(np.percentile(v, lo)), float(np.percentile(v, hi))) if v.size else (np.nan, np.nan)

    return PairMetrics(
        n=int(p.size), r_strong=cv.r_strong, r_weak=cv.r_weak, apgr=a, apgr_ci=interval(boots_a),
        cpt=dict(zip(levels, cpts)), cpt_ci={lv: interval(boots_c[:, j]) for j, lv in enumerate(levels)},
        cpt_full={lv: cpt(full.call_share, full.pgr, lv) for lv in levels}, curve=cv,
    )


def curve_at_decisions(sel: np.ndarray, q_strong, q_weak) -> Curve:
    """The curve from decisions ``sel`` (T × n bool, True = strong) on n queries."""
    qs = np.asarray(q_strong, np.float64)
    qw = np.asarray(q_weak, np.float64)
    c = sel.mean(axis=1)
    r = np.where(sel, qs[None, :], qw[None, :]).mean(axis=1)
    rs, rw = float(qs.mean()), float(qw.mean())
    return Curve(np.full(sel.shape[0], np.nan), c, r, pgr(r, rs, rw), rs, rw)


def bootstrap_at_thresholds(scores, q_strong, q_weak, thresholds, *, keys=None, n_boot: int = 1000,
                            seed: int = 0, ci: float = 0.95) -> list[dict]:
    """c(α), r(α), PGR(α) at fixed thresholds (e.g. the calibrated ones: α or (α, τ) pairs, ties
    split by ``keys`` as ``pair_calibration.decide``) with percentile intervals over resampled
    queries."""
    from benchroute.transforms.pair_calibration import decide

    p, qs, qw = _inputs(scores, q_strong, q_weak)
    pairs = [(float(t[0]), float(t[1])) if np.ndim(t) else (float(t), 1.0) for t in thresholds]
    sel = np.stack([decide(p, a, tau, keys) for a, tau in pairs]) if pairs else np.zeros((0, p.size), bool)
    base = curve_at_decisions(sel, qs, qw)
    rng = np.random.default_rng(seed)
    B = np.full((int(n_boot), 3, len(pairs)), np.nan)
    for b in range(int(n_boot)):
        idx = rng.integers(0, p.size, p.size)
        cv = curve_at_decisions(sel[:, idx], qs[idx], qw[idx])
        B[b] = cv.call_share, cv.quality, cv.pgr
    lo, hi = 50 * (1 - ci), 50 * (1 + ci)
    rows = []
    for j, (t, tau) in enumerate(pairs):
        row = {"alpha": t, "call_share": float(base.call_share[j]), "quality": float(base.quality[j]),
               "pgr": float(base.pgr[j])}
        for k, name in enumerate(("call_share", "quality", "pgr")):
            v = B[:, k, j]
            v = v[np.isfinite(v)]
            row[f"{name}_lo"] = float(np.percentile(v, lo)) if v.size else float("nan")
            row[f"{name}_hi"] = float(np.percentile(v, hi)) if v.size else float("nan")
        rows.append(row)
    return rows
