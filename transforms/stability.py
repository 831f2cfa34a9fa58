"""How far a leaderboard and a routing choice can be trusted (docs/method.md#ranking-stability; issue 15).

Pure numpy functions, no store access. Four measures:

1. **Rankings with uncertainty** (``ranking_stability``): per-model accuracy on a labels matrix
   Y (n inputs × M models, NaN = no label) with percentile bootstrap confidence intervals over
   inputs (optionally stratified, e.g. by dataset), rank intervals, the probability of being
   the best, and Kendall τ-b between the full-data accuracies and each resample's.
2. **Format sensitivity** (``format_sensitivity``): the same items scored under several formats
   (scoring rules, perturbations, runs): accuracy delta per model against the original, τ-b
   between the original ranking and each variant's, and the largest rank moves.
3. **Selection bias** (``rstd``): RStd, the standard deviation over answer positions of the
   per-position recall (Zheng et al. 2024, used by Alzahrani et al. 2024).
4. **Routing-choice stability** (``choice_stability``, ``mean_score_choices``,
   ``bootstrap_knn_scores``): how often a model choice changes under resampling or variants.

Conventions, used everywhere below:

- **Missing labels.** Models are compared on the inputs they share: ``complete_case`` keeps
  the models labelled on at least ``min_coverage`` of the inputs, then the inputs labelled for
  every kept model (the dropped models are reported, never silently ranked on other inputs).
  The bootstrap functions also accept NaN (each model's mean over its own labelled resampled
  inputs: a paired bootstrap over inputs), for callers that choose that on purpose.
- **Ranks** are competition ranks: 1 + the number of models with a strictly higher accuracy
  (``selection.ranks``), so tied models share the better rank. Accuracies within ``ATOL`` are
  ties. P(best) splits a tie for first equally between the tied models (P sums to 1).
- **Kendall τ-b** is computed on the accuracy vectors themselves (rank transforms do not change
  it), with ties as in ``scipy.stats.kendalltau`` (variant "b"); NaN where one side is constant.
- Every random draw comes from ``numpy.random.default_rng(seed)``: results are deterministic.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

ATOL = 1e-12  # accuracies closer than this are ties (exact-count ties are equal floats)


# ---------------------------------------------------------------------------- Kendall τ-b
def kendall_tau_b(x: np.ndarray, y: np.ndarray) -> float:
    """Kendall τ-b of two vectors (pairs with a NaN on either side are left out)."""
    return float(kendall_tau_b_rows(np.asarray(x, np.float64), np.asarray(y, np.float64)[None])[0])


def kendall_tau_b_rows(ref: np.ndarray, R: np.ndarray, *, chunk: int = 256) -> np.ndarray:
    """τ-b between ``ref`` (M,) and every row of ``R`` (B × M), vectorised over rows.

    τ-b = (C − D) / sqrt((n0 − n1)(n0 − n2)) over the pairs i < j where all four values are
    finite: C − D = Σ sign(ref_i − ref_j)·sign(R_i − R_j), n1 / n2 the pairs tied in ``ref`` /
    in the row. NaN where a side has no untied pair.
    """
    ref = np.asarray(ref, np.float64)
    R = np.atleast_2d(np.asarray(R, np.float64))
    iu, ju = np.triu_indices(ref.size, k=1)
    out = np.full(R.shape[0], np.nan)
    if iu.size == 0:
        return out
    fa = np.isfinite(ref)
    sa = _sign(ref[iu] - ref[ju])
    va = fa[iu] & fa[ju]
    for start in range(0, R.shape[0], chunk):
        Rb = R[start : start + chunk]
        fb = np.isfinite(Rb)
        v = va[None] & fb[:, iu] & fb[:, ju]
        sb = np.where(v, _sign(np.where(v, Rb[:, iu] - Rb[:, ju], 0.0)), 0.0)
        n0 = v.sum(axis=1)
        n1 = (v & (sa == 0)[None]).sum(axis=1)
        n2 = (v & (sb == 0)).sum(axis=1)
        num = (np.where(v, sa[None] * sb, 0.0)).sum(axis=1)
        den = np.sqrt((n0 - n1).astype(np.float64) * (n0 - n2).astype(np.float64))
        with np.errstate(invalid="ignore", divide="ignore"):
            out[start : start + chunk] = np.where(den > 0, num / np.where(den > 0, den, 1.0), np.nan)
    return out


def _sign(d: np.ndarray) -> np.ndarray:
    return np.where(d > ATOL, 1.0, np.where(d < -ATOL, -1.0, 0.0))


# ---------------------------------------------------------------------------- ranks
def competition_ranks(A: np.ndarray) -> np.ndarray:
    """Rank of each model in each row of A (… × M), 1 = best; ties share the better rank;
    NaN accuracies get NaN ranks and beat nobody."""
    A = np.asarray(A, np.float64)
    filled = np.where(np.isnan(A), -np.inf, A)
    better = (filled[..., None, :] > filled[..., :, None] + ATOL).sum(axis=-1)
    return np.where(np.isnan(A), np.nan, 1.0 + better)


def best_shares(A: np.ndarray) -> np.ndarray:
    """(… × M) 1/k for each of the k models tied for the best accuracy in a row, else 0."""
    A = np.asarray(A, np.float64)
    filled = np.where(np.isnan(A), -np.inf, A)
    top = filled >= filled.max(axis=-1, keepdims=True) - ATOL
    top &= ~np.isnan(A)
    k = top.sum(axis=-1, keepdims=True)
    return np.where(k > 0, top / np.maximum(k, 1), 0.0)


# ---------------------------------------------------------------------------- missing labels
@dataclass(frozen=True)
class CompleteCase:
    """Rows and models kept by ``complete_case``."""

    rows: np.ndarray  # (n_kept,) indices of inputs labelled for every kept model
    models: np.ndarray  # (M_kept,) indices of kept models
    dropped: np.ndarray  # indices of models below ``min_coverage``
    coverage: np.ndarray  # (M,) share of inputs labelled, per model


def complete_case(Y: np.ndarray, min_coverage: float = 0.8) -> CompleteCase:
    """Keep models labelled on ≥ ``min_coverage`` of the inputs, then inputs complete for them.

    Coverage is relative to the best-covered model (so a matrix whose rows were gathered from
    several sources does not drop everyone).
    """
    Y = np.asarray(Y, np.float64)
    have = ~np.isnan(Y)
    cnt = have.sum(axis=0)
    cov = cnt / max(int(cnt.max()) if cnt.size else 0, 1)
    models = np.flatnonzero(cov >= min_coverage)
    rows = np.flatnonzero(have[:, models].all(axis=1)) if models.size else np.zeros(0, np.int64)
    return CompleteCase(rows, models, np.flatnonzero(cov < min_coverage), cov)


# ---------------------------------------------------------------------------- bootstrap
def bootstrap_counts(
    n: int, B: int, seed: int | np.random.Generator = 0, strata: np.ndarray | None = None
) -> np.ndarray:
    """(B × n) float32 multiplicities of each input in B bootstrap resamples.

    With ``strata`` (n int codes), each stratum is resampled to its own size (stratified
    bootstrap: a resample keeps every dataset's weight).
    """
    rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
    W = np.zeros((B, n), np.float32)
    groups = [np.arange(n)] if strata is None else [
        np.flatnonzero(strata == s) for s in np.unique(strata)
    ]
    for g in groups:
        if g.size == 0:
            continue
        for b in range(B):
            W[b, g] += np.bincount(rng.integers(0, g.size, g.size), minlength=g.size)
    return W


def weighted_means(Y: np.ndarray, W: np.ndarray) -> np.ndarray:
    """(B × M) Σ_i W_bi·Y_im / Σ_i W_bi·[Y_im known]: each model's mean over its labelled
    resampled inputs (NaN where it has none)."""
    Y = np.asarray(Y, np.float64)
    have = ~np.isnan(Y)
    W = np.asarray(W, np.float64)
    num = W @ np.where(have, Y, 0.0)
    den = W @ have.astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, num / np.where(den > 0, den, 1.0), np.nan)


def _quantiles(A: np.ndarray, level: float, method: str = "linear") -> tuple[np.ndarray, np.ndarray]:
    lo = (1.0 - level) / 2.0
    with np.errstate(invalid="ignore"):
        q = np.nanquantile(A, [lo, 1.0 - lo], axis=0, method=method)
    return q[0], q[1]


@dataclass(frozen=True)
class RankingStability:
    """Per model (aligned to ``models``): ``acc``, percentile CI ``acc_lo``/``acc_hi``, full-data
    ``rank``, rank interval ``rank_lo``/``rank_hi`` (the same percentiles of the bootstrap
    ranks, rounded outward to whole ranks), ``p_best``; per resample ``tau`` (τ-b full vs
    resample); ``n_inputs``, ``B``, ``level``."""

    models: list[str]
    acc: np.ndarray
    acc_lo: np.ndarray
    acc_hi: np.ndarray
    rank: np.ndarray
    rank_lo: np.ndarray
    rank_hi: np.ndarray
    p_best: np.ndarray
    tau: np.ndarray
    n_inputs: int
    B: int
    level: float
    dropped: list[str] = field(default_factory=list)

    def rows(self) -> list[dict]:
        """One dict per model, best first."""
        order = np.lexsort((np.arange(len(self.models)), -np.nan_to_num(self.acc, nan=-1)))
        return [
            {"model": self.models[i], "acc": float(self.acc[i]), "acc_lo": float(self.acc_lo[i]),
             "acc_hi": float(self.acc_hi[i]), "rank": int(self.rank[i]),
             "rank_lo": int(self.rank_lo[i]), "rank_hi": int(self.rank_hi[i]),
             "p_best": float(self.p_best[i])}
            for i in order
        ]

    def summary(self) -> dict:
        """τ over resamples (mean, 5th percentile), the widest rank interval, the top model."""
        tau = self.tau[np.isfinite(self.tau)]
        width = self.rank_hi - self.rank_lo
        top = int(np.nanargmax(self.acc)) if np.isfinite(self.acc).any() else None
        widest = int(np.argmax(width)) if width.size else None
        return {
            "n_inputs": self.n_inputs, "n_models": len(self.models), "B": self.B,
            "tau_mean": float(tau.mean()) if tau.size else float("nan"),
            "tau_p05": float(np.quantile(tau, 0.05)) if tau.size else float("nan"),
            "best": self.models[top] if top is not None else None,
            "p_best_top": float(self.p_best[top]) if top is not None else float("nan"),
            "max_rank_width": int(width.max()) if width.size else 0,
            "widest": self.models[widest] if widest is not None else None,
            "mean_rank_width": float(width.mean()) if width.size else float("nan"),
            "dropped": list(self.dropped),
        }


def ranking_stability(
    Y: np.ndarray,
    models: Sequence[str],
    *,
    B: int = 1000,
    seed: int = 0,
    strata: np.ndarray | None = None,
    level: float = 0.95,
    dropped: Sequence[str] = (),
) -> RankingStability:
    """Bootstrap over inputs (rows of Y, n × M in {0, 1} or [0, 1], NaN = none) of the
    per-model accuracy; see ``RankingStability``. Pass a complete matrix (``complete_case``)
    to compare models on the same inputs."""
    Y = np.asarray(Y, np.float64)
    n, M = Y.shape
    if len(models) != M:
        raise ValueError(f"{len(models)} model names for {M} columns")
    if n == 0 or M == 0:
        raise ValueError("ranking_stability needs at least one input and one model")
    full = weighted_means(Y, np.ones((1, n)))[0]
    A = weighted_means(Y, bootstrap_counts(n, B, seed, strata))
    R = competition_ranks(A)
    acc_lo, acc_hi = _quantiles(A, level)
    r_lo, r_hi = _quantiles(R, level)
    return RankingStability(
        models=list(models), acc=full, acc_lo=acc_lo, acc_hi=acc_hi,
        rank=competition_ranks(full), rank_lo=np.floor(r_lo), rank_hi=np.ceil(r_hi),
        p_best=best_shares(A).mean(axis=0), tau=kendall_tau_b_rows(full, A), n_inputs=n, B=B,
        level=level, dropped=list(dropped),
    )


# ---------------------------------------------------------------------------- format variants
@dataclass(frozen=True)
class VariantComparison:
    """One variant against the original on the items and models both have (complete case)."""

    variant: str
    models: list[str]
    acc_original: np.ndarray
    acc_variant: np.ndarray
    n_items: int
    dropped: list[str]

    @property
    def delta(self) -> np.ndarray:
        return self.acc_variant - self.acc_original

    @property
    def rank_original(self) -> np.ndarray:
        return competition_ranks(self.acc_original)

    @property
    def rank_variant(self) -> np.ndarray:
        return competition_ranks(self.acc_variant)

    @property
    def rank_move(self) -> np.ndarray:
        """Positive = the model moves down (a worse rank) under the variant."""
        return self.rank_variant - self.rank_original

    @property
    def tau(self) -> float:
        return kendall_tau_b(self.acc_original, self.acc_variant)

    def summary(self) -> dict:
        move = np.abs(self.rank_move)
        i = int(np.argmax(move)) if move.size else None
        best_o = int(np.argmax(self.acc_original)) if move.size else None
        best_v = int(np.argmax(self.acc_variant)) if move.size else None
        return {
            "variant": self.variant, "n_items": self.n_items, "n_models": len(self.models),
            "tau": self.tau,
            "max_rank_move": int(move.max()) if move.size else 0,
            "max_mover": self.models[i] if i is not None else None,
            "mean_abs_delta": float(np.abs(self.delta).mean()) if move.size else float("nan"),
            "best_original": self.models[best_o] if best_o is not None else None,
            "best_variant": self.models[best_v] if best_v is not None else None,
            "dropped": list(self.dropped),
        }


def compare_variant(
    Y_original: np.ndarray,
    Y_variant: np.ndarray,
    models: Sequence[str],
    variant: str,
    *,
    min_coverage: float = 0.8,
) -> VariantComparison:
    """Accuracies of the original and a variant (both n items × M models, rows aligned, NaN =
    none) on the items labelled for every kept model in both; a model is kept when it covers
    ≥ ``min_coverage`` of the items in both."""
    Yo = np.asarray(Y_original, np.float64)
    Yv = np.asarray(Y_variant, np.float64)
    if Yo.shape != Yv.shape:
        raise ValueError(f"original {Yo.shape} and variant {Yv.shape} are not aligned")
    both = np.where(np.isnan(Yo) | np.isnan(Yv), np.nan, 0.0)
    cc = complete_case(both, min_coverage)
    kept = cc.models
    rows = cc.rows
    ones = np.ones((1, rows.size))
    return VariantComparison(
        variant=variant,
        models=[models[j] for j in kept],
        acc_original=weighted_means(Yo[np.ix_(rows, kept)], ones)[0] if rows.size else np.full(kept.size, np.nan),
        acc_variant=weighted_means(Yv[np.ix_(rows, kept)], ones)[0] if rows.size else np.full(kept.size, np.nan),
        n_items=int(rows.size),
        dropped=[models[j] for j in cc.dropped],
    )


# ---------------------------------------------------------------------------- RStd
@dataclass(frozen=True)
class RStd:
    """Selection bias of one model: per-position ``recall`` (NaN where no item has its gold
    there), ``n_gold`` per position, ``pred_share`` (share of answered items predicting each
    position), ``rstd`` (population std of the recalls over positions with ≥ ``min_gold``
    gold items), ``noise`` (the RStd an unbiased model of the same accuracy would show from
    sampling alone, ≈ sqrt((J−1)/J · mean_j acc(1−acc)/n_j)), ``acc`` and ``n``."""

    recall: np.ndarray
    n_gold: np.ndarray
    pred_share: np.ndarray
    rstd: float
    noise: float
    acc: float
    n: int
    n_unanswered: int


def rstd(
    gold: np.ndarray,
    predicted: np.ndarray,
    n_positions: int | None = None,
    *,
    min_gold: int = 1,
) -> RStd:
    """RStd of one model from 0-based ``gold`` and ``predicted`` answer positions per item
    (``predicted`` < 0 or NaN = no valid answer: counted as a miss, never as a position).

    Recall of position j = #(predicted = j and gold = j) / #(gold = j); RStd is their standard
    deviation (ddof 0) over the positions that hold at least ``min_gold`` gold answers.
    """
    g = np.asarray(gold, np.float64)
    p = np.asarray(predicted, np.float64)
    if g.shape != p.shape:
        raise ValueError("gold and predicted must have the same length")
    if np.any(np.isnan(g)) or np.any(g < 0):
        raise ValueError("every item needs a gold position >= 0")
    g = g.astype(np.int64)
    answered = np.isfinite(p) & (p >= 0)
    pi = np.where(answered, p, -1).astype(np.int64)
    J = int(max(g.max(initial=-1), pi.max(initial=-1)) + 1) if n_positions is None else int(n_positions)
    n_gold = np.bincount(g, minlength=J)[:J]
    hits = np.bincount(g[pi == g], minlength=J)[:J]
    with np.errstate(invalid="ignore", divide="ignore"):
        recall = np.where(n_gold > 0, hits / np.maximum(n_gold, 1), np.nan)
    n_pred = np.bincount(pi[answered], minlength=J)[:J]
    share = n_pred / max(int(answered.sum()), 1)
    use = n_gold >= max(min_gold, 1)
    acc = float((pi == g).mean()) if g.size else float("nan")
    if use.sum() >= 2:
        value = float(np.std(recall[use]))
        Jn = int(use.sum())
        noise = float(np.sqrt((Jn - 1) / Jn * np.mean(acc * (1 - acc) / n_gold[use])))
    else:
        value, noise = float("nan"), float("nan")
    return RStd(recall, n_gold, share, value, noise, acc, int(g.size), int((~answered).sum()))


# ---------------------------------------------------------------------------- routing choices
def argmax_choices(S: np.ndarray, tiebreak: np.ndarray | None = None) -> np.ndarray:
    """(…,) index of the chosen model in each row of S (… × M): the highest score (NaN never
    wins unless all are NaN), ties to the higher ``tiebreak`` (M, or broadcastable to S), then
    the lower index — the served router's rule at λ = 0 (``policy.choose`` without costs)."""
    S = np.asarray(S, np.float64)
    filled = np.where(np.isnan(S), -np.inf, S)
    top = filled >= filled.max(axis=-1, keepdims=True) - 1e-9
    if tiebreak is not None:
        tb = np.asarray(tiebreak, np.float64)
        tbm = np.where(top, np.where(np.isnan(tb), -np.inf, tb), -np.inf)
        top &= tbm >= tbm.max(axis=-1, keepdims=True)
    return np.argmax(top, axis=-1)


@dataclass(frozen=True)
class ChoiceStability:
    """A choice on the full data against the choices on resamples (or variants)."""

    choice: int
    choices: np.ndarray  # (B,) the choice on each resample

    @property
    def flip_rate(self) -> float:
        """Share of resamples whose choice differs from the full-data choice."""
        return float((self.choices != self.choice).mean()) if self.choices.size else float("nan")

    def shares(self, M: int) -> np.ndarray:
        """(M,) share of resamples choosing each model."""
        return np.bincount(self.choices, minlength=M)[:M] / max(self.choices.size, 1)


def choice_stability(
    pick: Callable[[np.ndarray], int],
    Y: np.ndarray,
    *,
    B: int = 200,
    seed: int = 0,
    strata: np.ndarray | None = None,
) -> ChoiceStability:
    """Any model-choosing rule ``pick(Y_rows) -> model index`` (e.g. best training accuracy, or
    a task score computed from the labels) applied to the full labels matrix and to B bootstrap
    resamples of its rows (duplicated rows repeated). Loops over resamples: for rules that are
    means over inputs use ``mean_score_choices`` (vectorised)."""
    Y = np.asarray(Y)
    W = bootstrap_counts(Y.shape[0], B, seed, strata).astype(np.int64)
    choices = np.empty(B, np.int64)
    idx = np.arange(Y.shape[0])
    for b in range(B):
        choices[b] = pick(Y[np.repeat(idx, W[b])])
    return ChoiceStability(int(pick(Y)), choices)


def mean_score_choices(
    S: np.ndarray, W: np.ndarray, tiebreak: np.ndarray | None = None
) -> ChoiceStability:
    """Choices by the per-model mean of S (n × M, e.g. g for S1, 1[g > .5] for S2, y for the
    oracle) on the full data and under the resample weights W (B × n)."""
    full = argmax_choices(weighted_means(S, np.ones((1, S.shape[0])))[0], tiebreak)
    return ChoiceStability(int(full), argmax_choices(weighted_means(S, W), tiebreak))


def bootstrap_knn_scores(
    neighbor_indices: np.ndarray,
    Y: np.ndarray,
    counts: np.ndarray,
    k: int,
    *,
    fallback: np.ndarray | None = None,
) -> np.ndarray:
    """g under bootstrap resamples of the kNN index, exactly (uniform weights): (B × n × M).

    ``neighbor_indices`` (n × K, K > k, nearest first, -1 = none) are the K nearest index rows
    of each query in the full index; ``counts`` (B × n_index) the multiplicity of each index row
    in each resample. The k nearest of a resample are the first k copies along the full order,
    so a row drawn c times weighs min(c, what is left of k). As in ``knn.aggregate_labels``, a
    neighbour without a label for a model is skipped for that model, and a model with no
    labelled neighbour gets ``fallback[m]`` (NaN if None). K must leave room for rows drawn 0
    times (K = 3k runs out with probability < 1e-6 for k = 10).
    """
    idx = np.asarray(neighbor_indices)
    Y = np.asarray(Y, np.float64)
    valid = idx >= 0
    safe = np.where(valid, idx, 0)
    L = Y[safe]  # (n, K, M)
    have = valid[:, :, None] & ~np.isnan(L)
    Lz = np.where(have, L, 0.0)
    hz = have.astype(np.float64)
    fb = np.full(Y.shape[1], np.nan) if fallback is None else np.asarray(fallback, np.float64)
    C = np.where(valid[None], np.asarray(counts)[:, safe], 0.0)  # (B, n, K)
    before = np.cumsum(C, axis=2) - C
    w = np.clip(np.minimum(C, k - before), 0.0, None)
    wt = np.ascontiguousarray(w.transpose(1, 0, 2))  # (n, B, K): one matmul per query
    num = np.matmul(wt, Lz).transpose(1, 0, 2)  # (B, n, M)
    den = np.matmul(wt, hz).transpose(1, 0, 2)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, num / np.where(den > 0, den, 1.0), fb[None, None, :])
