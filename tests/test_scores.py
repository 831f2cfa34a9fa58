"""S1, S2, S3 and the few-labelled (α) path on hand-checkable arrays."""

from __future__ import annotations

import numpy as np

from benchroute.transforms.knn import KNNCorrectness
from benchroute.transforms.scores import (
    binarized_accuracy,
    s1,
    s2,
    s3,
    score_task,
    task_scores,
)

G = np.array([[0.9, 0.2, 0.5], [0.6, 0.4, np.nan], [0.1, 0.8, 0.7]])


def test_s1_is_mean_g_skipping_nan():
    np.testing.assert_allclose(s1(G), [1.6 / 3, 1.4 / 3, 0.6])


def test_s2_is_share_above_one_half_strictly():
    # 0.5 is not > 0.5; the NaN entry is left out of model 2's mean
    np.testing.assert_allclose(s2(G), [2 / 3, 1 / 3, 0.5])


def test_s3_formula_and_limits():
    a = np.array([0.25, 0.6, 1.0])
    np.testing.assert_allclose(s3(a, np.array([0.8, 0.5, 0.0])), [0.25 * 0.8 + 0.75 * 0.2, 0.5, 0.0])
    np.testing.assert_allclose(s3(a, np.ones(3)), a)  # a perfect predictor: S3 = S2
    np.testing.assert_allclose(s3(a, np.zeros(3)), 1 - a)  # an always-wrong one flips it


def test_binarized_accuracy_by_hand():
    Y = np.array([[1.0, 0.0, 1.0], [1.0, 1.0, 0.0], [0.0, 1.0, np.nan]])
    # model 0: (1>.5)==1, (.6>.5)==1, (.1>.5)==0 -> 3/3; model 1: 0==0, 0!=1, 1==1 -> 2/3;
    # model 2: 0.5->0 vs 1 wrong, NaN g skipped, NaN y skipped -> 0/1
    np.testing.assert_allclose(binarized_accuracy(G, Y), [1.0, 2 / 3, 0.0])


def test_task_scores_bundle():
    ts = task_scores(G, np.array([0.5, 1.0, 0.0]))
    np.testing.assert_allclose(ts.s3, [0.5, 1 / 3, 0.5])
    np.testing.assert_allclose(ts.s1, s1(G))


def _two_cluster_index():
    X = np.array([[1.0, 0.0], [0.0, 1.0]])
    Y = np.array([[1.0], [0.0]])
    return KNNCorrectness(1).fit(X, Y)


def test_score_task_without_labels_uses_the_index_and_given_p():
    knn = _two_cluster_index()
    Xt = np.array([[1.0, 0.1], [0.2, 1.0], [0.9, 0.0]])
    ts = score_task(knn, Xt, np.array([0.7]))
    np.testing.assert_allclose(ts.s2, [2 / 3])
    np.testing.assert_allclose(ts.s3, [2 / 3 * 0.7 + 1 / 3 * 0.3])


def test_score_task_with_labelled_inputs_measures_p_by_leave_one_out():
    knn = _two_cluster_index()
    X_lab = np.array([[0.9, 0.1], [0.1, 0.9]])
    Y_lab = np.array([[0.0], [1.0]])
    # Leave-one-out: each labelled input's nearest other row is the training row of its cluster,
    # which has the opposite label -> both wrong -> p = 0.
    # The task input equals the first labelled input, its nearest neighbour (similarity 1),
    # label 0 -> g = 0 -> S2 = 0 -> S3 = 0·0 + 1·1 = 1.
    ts = score_task(knn, np.array([[0.9, 0.1]]), np.array([0.9]), X_labelled=X_lab, Y_labelled=Y_lab)
    np.testing.assert_allclose(ts.p, [0.0])
    np.testing.assert_allclose(ts.g, [[0.0]])
    np.testing.assert_allclose(ts.s3, [1.0])
    # the fitted index is untouched
    assert knn.X_.shape == (2, 2)


def test_score_task_keeps_given_p_for_models_without_in_task_labels():
    X = np.array([[1.0, 0.0], [0.0, 1.0]])
    knn = KNNCorrectness(1).fit(X, np.array([[1.0, 1.0], [0.0, 0.0]]))
    ts = score_task(knn, np.array([[1.0, 0.2]]), np.array([0.3, 0.4]),
                    X_labelled=np.array([[0.0, 1.0]]), Y_labelled=np.array([[0.0, np.nan]]))
    np.testing.assert_allclose(ts.p, [1.0, 0.4])
