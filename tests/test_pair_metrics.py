"""PGR, APGR and CPT on hand-made curves (issue 14), incl. a non-monotone one."""

import numpy as np
import pytest

from benchroute.transforms import pair_metrics as pm


def test_pgr_is_the_share_of_the_gap_recovered():
    assert pm.pgr(0.7, 0.8, 0.6) == pytest.approx(0.5)
    assert np.allclose(pm.pgr([0.6, 0.8, 0.9], 0.8, 0.6), [0.0, 1.0, 1.5])
    assert np.isnan(pm.pgr(0.7, 0.6, 0.6))  # no gap: undefined


def test_apgr_trapezoid_over_call_share():
    # (0, 0) – (.5, .75) – (1, 1): .5·(0 + .75)/2 + .5·(.75 + 1)/2 = .625
    assert pm.apgr([0, 0.5, 1], [0, 0.75, 1]) == pytest.approx(0.625)
    # Order of the points does not matter; the area is divided by the range covered.
    assert pm.apgr([1, 0, 0.5], [1, 0, 0.75]) == pytest.approx(0.625)
    assert pm.apgr([0.2, 0.6], [0.5, 0.5]) == pytest.approx(0.5)
    # The straight line of a random router: 0.5.
    c = np.linspace(0, 1, 11)
    assert pm.apgr(c, c) == pytest.approx(0.5)


def test_cpt_reads_a_non_monotone_curve_as_measured():
    c = np.array([0.0, 0.2, 0.4, 0.6, 0.8, 1.0])
    y = np.array([0.0, 0.6, 0.4, 0.55, 0.9, 1.0])
    # First crossing of .5 is in the first segment: .2 · .5/.6.
    assert pm.cpt(c, y, 0.5) == pytest.approx(0.2 * 0.5 / 0.6)
    # .8: the curve dips to .4 then crosses .8 between .6 (.55) and .8 (.9).
    assert pm.cpt(c, y, 0.8) == pytest.approx(0.6 + 0.2 * (0.8 - 0.55) / 0.35)
    # The order the points come in is irrelevant.
    perm = np.array([3, 0, 5, 1, 4, 2])
    assert pm.cpt(c[perm], y[perm], 0.8) == pytest.approx(pm.cpt(c, y, 0.8))
    # RouteLLM's np.interp(level, pgr, share) assumes a sorted curve: on this one, with a high
    # early peak, it answers .9 where the curve reaches .8 at a share of .2.
    y2 = np.array([0.0, 0.8, 0.3, 0.4, 0.6, 1.0])
    assert pm.cpt(c, y2, 0.8) == pytest.approx(0.2)
    assert pm.cpt_routellm(c, y2, 0.8) == pytest.approx(0.9)
    assert pm.cpt(c, y2, 0.5) == pytest.approx(0.125)
    # A level never reached: NaN; a curve that starts above it: its first share.
    assert np.isnan(pm.cpt(c, y, 1.2))
    assert pm.cpt([0.1, 0.5], [0.7, 0.9], 0.5) == pytest.approx(0.1)


def test_curves_from_scores_hand_made():
    # Top-scored first: gains +1, +1, -1, +1 → PGR 0, .5, 1, .5, 1 (not monotone).
    scores = np.array([0.9, 0.8, 0.3, 0.1])
    qs = np.array([1.0, 1.0, 0.0, 1.0])
    qw = np.array([0.0, 0.0, 1.0, 0.0])
    full = pm.full_curve(scores, qs, qw)
    assert full.r_strong == 0.75 and full.r_weak == 0.25
    assert np.allclose(full.call_share, [0, 0.25, 0.5, 0.75, 1])
    assert np.allclose(full.pgr, [0, 0.5, 1, 0.5, 1])
    assert pm.apgr(full.call_share, full.pgr) == pytest.approx(0.625)
    assert pm.cpt(full.call_share, full.pgr, 0.5) == pytest.approx(0.25)
    assert pm.cpt(full.call_share, full.pgr, 1.0) == pytest.approx(0.5)
    # Equal scores are one step (a threshold cannot split them).
    tied = pm.full_curve([0.5, 0.5, 0.2], [1, 0, 1], [0, 0, 0])
    assert np.allclose(tied.call_share, [0, 2 / 3, 1])
    # The curve at given thresholds: p ≥ α calls the strong model.
    at = pm.curve_at(scores, qs, qw, [0.85, 0.3, 0.0])
    assert np.allclose(at.call_share, [0.25, 0.75, 1.0])
    assert np.allclose(at.quality, [0.5, 0.5, 0.75])


def test_routellm_curve_uses_ten_quantile_bins():
    rng = np.random.default_rng(0)
    n = 1000
    scores = rng.permutation(n) / n
    qs = rng.integers(0, 2, n).astype(float)
    qw = rng.integers(0, 2, n).astype(float)
    cv = pm.routellm_curve(scores, qs, qw)
    assert cv.call_share.size == 11
    assert np.allclose(cv.call_share, np.linspace(1, 0, 11), atol=1.5 / n)
    assert cv.call_share[-1] == 0  # the last edge sends p > max: nobody


def test_oracle_apgr_matches_its_analytic_value_and_random_is_half():
    rng = np.random.default_rng(1)
    n = 4000
    qs = (rng.random(n) < 0.8).astype(float)
    qw = np.where(rng.random(n) < 0.75, qs, 1 - qs)
    p_plus = float(np.mean((qs == 1) & (qw == 0)))
    p_minus = float(np.mean((qs == 0) & (qw == 1)))
    analytic = pm.oracle_apgr_binary(p_plus, p_minus)
    assert pm.oracle_apgr(qs, qw) == pytest.approx(analytic, abs=1e-9)
    # The 10-bin RouteLLM curve of the oracle's three score levels has the same breakpoints.
    m = pm.evaluate_scores(pm.oracle_scores(qs, qw), qs, qw, n_boot=50)
    assert m.apgr == pytest.approx(analytic, abs=1e-9)
    # A random router: APGR near .5 and .5 inside its interval.
    r = pm.evaluate_scores(rng.random(n), qs, qw, n_boot=300, seed=3)
    assert abs(r.apgr - 0.5) < 0.05
    assert r.apgr_ci[0] <= 0.5 <= r.apgr_ci[1]
    assert r.apgr_ci[0] <= r.apgr <= r.apgr_ci[1]
    # Several draws (RouteLLM averages 10): the mean APGR, nearer .5.
    r10 = pm.evaluate_scores(rng.random((10, n)), qs, qw, n_boot=100, seed=3)
    assert abs(r10.apgr - 0.5) < 0.02 and r10.apgr_ci[0] <= 0.5 <= r10.apgr_ci[1]


def test_bootstrap_is_deterministic_and_brackets_the_estimate():
    rng = np.random.default_rng(2)
    n = 500
    qs = (rng.random(n) < 0.8).astype(float)
    qw = (rng.random(n) < 0.6).astype(float)
    p = np.clip(0.5 + 0.3 * (qs - qw) + 0.3 * rng.standard_normal(n), 0, 1)
    a = pm.evaluate_scores(p, qs, qw, n_boot=200, seed=5)
    b = pm.evaluate_scores(p, qs, qw, n_boot=200, seed=5)
    assert a.row() == b.row()
    assert a.apgr > 0.6  # informative scores beat random
    for lv in (0.5, 0.8):
        lo, hi = a.cpt_ci[lv]
        assert lo <= a.cpt[lv] <= hi
    rows = pm.bootstrap_at_thresholds(p, qs, qw, [0.5, 0.7], n_boot=100)
    assert rows[0]["call_share_lo"] <= rows[0]["call_share"] <= rows[0]["call_share_hi"]
    assert rows[0]["call_share"] >= rows[1]["call_share"]


def test_inputs_are_checked():
    with pytest.raises(ValueError):
        pm.full_curve([0.1, 0.2], [1.0], [0.0, 1.0])
    with pytest.raises(ValueError):
        pm.full_curve([0.1, np.nan], [1.0, 1.0], [0.0, 1.0])
