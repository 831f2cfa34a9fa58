"""Choosing one model from scores, with declared tie rules, and the metrics of a choice.

A choice is a probability vector w over the M models, so a tie can be resolved in expectation:

- ``ties="expectation"``: every model whose score is within ``atol`` of the best is equally
  likely (what a random tie-break gives on average); a metric of the choice is its w-weighted
  mean.
- ``ties="train_acc"``: the served router's rule (``transforms.policy`` at λ = 0): among the
  models tied on the score (to 1e-9), the one with the highest ``tiebreak`` value (training
  accuracy: the mean over the training datasets of the model's accuracy on each); remaining ties
  go to the first model in model order.

NaN scores never win unless every score is NaN (then all models tie).
"""

from __future__ import annotations

from typing import Literal

import numpy as np

from benchroute.transforms import policy

Ties = Literal["expectation", "train_acc"]
TIE_RULES: tuple[Ties, ...] = ("expectation", "train_acc")
ATOL = 1e-9


def best_set(scores: np.ndarray, atol: float = ATOL) -> np.ndarray:
    """Mask of the models whose score is within ``atol`` of the best (NaN = never best)."""
    s = np.asarray(scores, np.float64)
    if np.all(np.isnan(s)):
        return np.ones(s.shape, bool)
    s = np.where(np.isnan(s), -np.inf, s)
    return s >= s.max() - atol


def choose(
    scores: np.ndarray, ties: Ties = "expectation", tiebreak: np.ndarray | None = None,
    atol: float = ATOL,
) -> np.ndarray:
    """w (M,): the probability of picking each model under the tie rule."""
    tied = best_set(scores, atol)
    if ties == "expectation":
        return tied / tied.sum()
    if ties != "train_acc":
        raise ValueError(f"ties must be one of {TIE_RULES}, got {ties!r}")
    # The served router's ordering (transforms.policy at λ = 0): best score, then tiebreak.
    w = np.zeros(tied.shape)
    w[policy.choose(np.asarray(scores, np.float64)[None, :], None, policy.Point(), tiebreak=tiebreak)[0]] = 1.0
    return w


def choose_rows(
    scores: np.ndarray, ties: Ties = "expectation", tiebreak: np.ndarray | None = None,
    atol: float = ATOL,
) -> np.ndarray:
    """``choose`` for each row of an (n × M) score matrix (per-input routing): W (n × M)."""
    S = np.asarray(scores, np.float64)
    allnan = np.all(np.isnan(S), axis=1, keepdims=True)
    S = np.where(np.isnan(S), -np.inf, S)
    S = np.where(allnan, 0.0, S)
    tied = S >= S.max(axis=1, keepdims=True) - atol
    if ties == "expectation":
        return tied / tied.sum(axis=1, keepdims=True)
    if ties != "train_acc":
        raise ValueError(f"ties must be one of {TIE_RULES}, got {ties!r}")
    W = np.zeros(S.shape)
    W[np.arange(S.shape[0]), policy.choose(scores, None, policy.Point(), tiebreak=tiebreak)] = 1.0
    return W


def ranks(acc: np.ndarray, atol: float = ATOL) -> np.ndarray:
    """Rank of each model by accuracy, 1 = best; ties share the best rank (1 + number of models
    strictly better)."""
    a = np.asarray(acc, np.float64)
    return 1.0 + (a[None, :] > a[:, None] + atol).sum(axis=1)


def choice_metrics(
    w: np.ndarray,
    acc: np.ndarray,
    *,
    w_bma: np.ndarray,
    params_b: np.ndarray,
    scores: np.ndarray | None = None,
) -> dict[str, float]:
    """Metrics of a choice w on one task with true accuracies ``acc`` (all shape M).

    acc, ratio_to_best (acc / best acc), rank, pct_bma (probability of picking the same model as
    the BMA choice ``w_bma``), params_b (mean size over the choice's models with a known size;
    NaN if none), and if ``scores`` are given, pearson and spearman between scores and acc (NaN
    when either is constant).
    """
    acc = np.asarray(acc, np.float64)
    best = acc.max()
    chosen = float(w @ acc)
    known = ~np.isnan(params_b)
    wk = w[known].sum()
    out = {
        "acc": chosen,
        "ratio_to_best": chosen / best if best > 0 else float("nan"),
        "rank": float(w @ ranks(acc)),
        "pct_bma": float(w @ w_bma),
        "params_b": float(w[known] @ params_b[known] / wk) if wk > 0 else float("nan"),
        "pearson": float("nan"),
        "spearman": float("nan"),
    }
    if scores is not None:
        out["pearson"] = pearson(scores, acc)
        out["spearman"] = spearman(scores, acc)
    return out


def pearson(a: np.ndarray, b: np.ndarray) -> float:
    """Pearson correlation over entries finite in both; NaN if fewer than 2 or one is constant."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    ok = np.isfinite(a) & np.isfinite(b)
    a, b = a[ok], b[ok]
    if a.size < 2:
        return float("nan")
    a, b = a - a.mean(), b - b.mean()
    den = np.sqrt((a * a).sum() * (b * b).sum())
    return float((a * b).sum() / den) if den > 0 else float("nan")


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman rank correlation (average ranks for ties), as Pearson of the ranks."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    ok = np.isfinite(a) & np.isfinite(b)
    return pearson(_average_ranks(a[ok]), _average_ranks(b[ok]))


def _average_ranks(x: np.ndarray) -> np.ndarray:
    order = np.argsort(x, kind="stable")
    xs = x[order]
    r = np.empty(x.size)
    i = 0
    while i < x.size:
        j = i
        while j + 1 < x.size and xs[j + 1] == xs[i]:
            j += 1
        r[order[i : j + 1]] = (i + j) / 2.0 + 1.0
        i = j + 1
    return r
