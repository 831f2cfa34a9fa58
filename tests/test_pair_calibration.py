"""Thresholds for a target share of strong calls, and recalibration on a user's own queries."""

import numpy as np
import pytest

from benchroute.transforms import pair_calibration as pc
from benchroute.transforms.pair_labels import WinData
from benchroute.transforms.pair_routers import make_pair_router, query_keys


def test_threshold_meets_the_target_share():
    rng = np.random.default_rng(0)
    s = rng.random(1000)
    for row in pc.calibrate(s):
        assert abs(row["share"] - row["target_share"]) <= 0.001 and row["tau"] == 1.0
        assert pc.share_at(s, row["alpha"]) == row["share"]
    assert pc.share_at(s, *pc.threshold_for_share(s, 0.0)) == 0.0
    assert pc.share_at(s, *pc.threshold_for_share(s, 1.0)) == 1.0


def test_tied_scores_are_split_by_the_query_key():
    s = np.array([0.1] * 30 + [0.5] * 40 + [0.9] * 30)
    # Without keys only the shares .3 / .7 / 1 are reachable: the nearest one.
    assert pc.share_at(s, *pc.threshold_for_share(s, 0.3)) == pytest.approx(0.3)
    assert pc.share_at(s, *pc.threshold_for_share(s, 0.45)) == pytest.approx(0.3)
    assert pc.share_at(s, *pc.threshold_for_share(s, 0.6)) == pytest.approx(0.7)
    # With keys any share is met exactly on the calibration set.
    keys = np.random.default_rng(0).random(s.size)
    for row in pc.calibrate(s, keys=keys):
        assert row["share"] == pytest.approx(row["target_share"], abs=0.005)
        assert pc.share_at(s, row["alpha"], row["tau"], keys) == row["share"]
    a, tau = pc.threshold_for_share(s, 0.45, keys)
    assert a == 0.5 and 0 < tau < 1
    assert np.array_equal(pc.decide(s, a, tau, keys), (s > 0.5) | ((s == 0.5) & (keys < tau)))
    with pytest.raises(pc.CalibrationError):
        pc.threshold_for_share(s, 1.5)
    with pytest.raises(pc.CalibrationError):
        pc.calibrate([np.nan])


def test_threshold_between_stored_shares_is_interpolated():
    table = [{"target_share": 0.2, "alpha": 0.8, "tau": 0.3}, {"target_share": 0.4, "alpha": 0.6, "tau": 1.0}]
    assert pc.threshold_for(table, 0.2) == (0.8, 0.3)
    assert pc.threshold_for(table, 0.3) == pytest.approx((0.7, 1.0))
    assert pc.threshold_for(table, 0.9) == (0.6, 1.0)  # clamped


def test_recalibration_on_a_synthetic_user_query_set():
    """A router calibrated on one query mix meets another: the stored threshold misses the
    target share there; recomputed on the user's unlabelled queries it gives the target ±2 points
    on them (exactly, ties split by key) and on new queries of the same mix."""
    rng = np.random.default_rng(1)
    d = 12
    centers = rng.standard_normal((2, d)) * 3

    def draw(n, share0):
        cl = (rng.random(n) >= share0).astype(int)
        X = (centers[cl] + rng.standard_normal((n, d))).astype(np.float32)
        ys = (rng.random(n) < 0.9).astype(float)
        yw = np.where(cl == 0, rng.random(n) < 0.2, rng.random(n) < 0.85).astype(float)
        return X, np.stack([ys, yw], axis=1)

    X, Q = draw(800, 0.5)
    data = WinData([f"{i:064x}" for i in range(800)], ["s", "w"], ["d"], Q, Q.copy(), np.ones((800, 1), bool))
    router = make_pair_router("diff", predictor="knn", predictor_params={"n_neighbors": 15})
    router.fit(X[:600], data.rows(np.arange(600)), pair=("s", "w"))
    table = pc.calibrate(router.predict_proba(X[600:]), keys=query_keys(X[600:]))  # calibration set
    # The user's queries: 90 % from cluster 0 (where the strong model is needed). kNN scores
    # take few values, so many queries share a score.
    Xu, _ = draw(4000, 0.9)
    pu, ku = router.predict_proba(Xu), query_keys(Xu)
    assert np.unique(pu).size < 40
    a, b = slice(0, 2000), slice(2000, 4000)
    rows = pc.recalibrate(pu[a], table, keys=ku[a])
    assert max(abs(r["stored_share"] - r["target_share"]) for r in rows) > 0.1  # stored α: off
    for r in rows:
        assert abs(r["share"] - r["target_share"]) <= 0.001  # on the queries it was computed on
        fresh = pc.share_at(pu[b], r["alpha"], r["tau"], ku[b])  # on new queries of the same mix
        assert abs(fresh - r["target_share"]) <= 0.035, r
    errs = [abs(pc.share_at(pu[b], r["alpha"], r["tau"], ku[b]) - r["target_share"]) for r in rows]
    assert np.mean(errs) <= 0.02
    # Without a stored table: the user's own thresholds only.
    own = pc.recalibrate(pu, shares=[0.5], keys=ku)
    assert own[0]["stored_share"] is None and abs(own[0]["share"] - 0.5) <= 0.001
