"""Task scores S1, S2, S3 of every model for a new task (docs/method.md#task-scores-s1-s2-s3).

Given g (n × M: g_m(x_i) for the task's n inputs) and p (M: accuracy of the binarized
predictor of each model on the task, estimated or measured):

- S1(m) = mean_i g_m(x_i)
- S2(m) = mean_i 1[g_m(x_i) > 0.5]
- S3(m) = S2(m)·p(m) + (1 − S2(m))·(1 − p(m))

NaN entries of g (a model with no labelled neighbour and ``fallback="nan"``) are left out of
the means. With a few labelled in-task inputs (the paper's α), ``score_task`` adds them to the
index and measures p directly on them (each predicted by leave-one-out).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from benchroute.transforms.knn import KNNCorrectness, normalize_rows
from benchroute.transforms.label_matrix import RowsOf


def s1(G: np.ndarray) -> np.ndarray:
    """Mean predicted correctness per model (NaN entries skipped)."""
    return _nanmean(np.asarray(G, np.float64))


def s2(G: np.ndarray) -> np.ndarray:
    """Share of inputs predicted correct, 1[g > 0.5], per model (NaN entries skipped)."""
    G = np.asarray(G, np.float64)
    with np.errstate(invalid="ignore"):
        hits = np.where(np.isnan(G), np.nan, (G > 0.5).astype(np.float64))
    return _nanmean(hits)


def s3(s2_scores: np.ndarray, p: np.ndarray) -> np.ndarray:
    """S2·p + (1 − S2)·(1 − p): the expected accuracy when the binarized predictor is right
    with probability p."""
    s2_scores = np.asarray(s2_scores, np.float64)
    p = np.asarray(p, np.float64)
    return s2_scores * p + (1.0 - s2_scores) * (1.0 - p)


def binarized_accuracy(G: np.ndarray, Y: np.ndarray) -> np.ndarray:
    """p(m): share of inputs where 1[g_m > 0.5] equals the label, over inputs where both exist
    (NaN for a model with none)."""
    G = np.asarray(G, np.float64)
    Y = np.asarray(Y, np.float64)
    ok = ~np.isnan(G) & ~np.isnan(Y)
    with np.errstate(invalid="ignore"):
        hit = np.where(ok, ((G > 0.5) == (Y > 0.5)).astype(np.float64), np.nan)
    return _nanmean(hit)


@dataclass(frozen=True)
class TaskScores:
    """S1, S2, S3 (each of shape M), the p used by S3, and g on the scored inputs."""

    s1: np.ndarray
    s2: np.ndarray
    s3: np.ndarray
    p: np.ndarray
    g: np.ndarray


def task_scores(G: np.ndarray, p: np.ndarray) -> TaskScores:
    """S1, S2, S3 from g (n × M) and p (M)."""
    a, b = s1(G), s2(G)
    return TaskScores(a, b, s3(b, p), np.asarray(p, np.float64), np.asarray(G, np.float64))


def score_task(
    knn: KNNCorrectness,
    X_task: np.ndarray,
    p: np.ndarray,
    *,
    X_labelled: np.ndarray | None = None,
    Y_labelled: np.ndarray | None = None,
) -> TaskScores:
    """Score every model on a new task from its inputs' embeddings ``X_task``.

    Without labelled inputs, g comes from the fitted ``knn`` and S3 uses the given ``p``
    (e.g. the kernel estimate p̂(d', m)). With labelled in-task inputs (``X_labelled`` n_l × d,
    ``Y_labelled`` n_l × M, NaN allowed) they join the index, g of ``X_task`` is read through
    the enlarged index, and p is measured on the labelled inputs: each is predicted from the
    enlarged index without itself, and p(m) is the binarized accuracy (the given ``p`` is used
    for a model with no labelled in-task input). ``knn`` must be fitted on the benchmark
    only (no input of the task itself).
    """
    if X_labelled is None or len(X_labelled) == 0:
        return task_scores(knn.predict_proba(X_task), p)
    Y_labelled = np.asarray(Y_labelled, np.float64)
    if Y_labelled.ndim == 1:
        Y_labelled = Y_labelled[:, None]
    # a row view over the index's labels (``RowsOf``) grows without a copy of them
    Y_aug = knn.Y_.stack(Y_labelled) if isinstance(knn.Y_, RowsOf) else np.vstack([knn.Y_, Y_labelled])
    aug = KNNCorrectness(
        knn.n_neighbors, weights=knn.weights, fallback=knn.fallback,
        max_block_bytes=knn.max_block_bytes,
    ).fit(np.vstack([knn.X_, normalize_rows(X_labelled)]), Y_aug)
    self_rows = knn.X_.shape[0] + np.arange(len(X_labelled))
    G_lab = aug.predict_proba(X_labelled, self_rows=self_rows)
    measured = binarized_accuracy(G_lab, Y_labelled)
    p_used = np.where(np.isnan(measured), np.asarray(p, np.float64), measured)
    return task_scores(aug.predict_proba(X_task), p_used)


def _nanmean(A: np.ndarray) -> np.ndarray:
    counts = (~np.isnan(A)).sum(axis=0)
    sums = np.nansum(A, axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(counts > 0, sums / np.maximum(counts, 1), np.nan)
