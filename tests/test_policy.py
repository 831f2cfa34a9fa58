"""The one decision policy (transforms.policy), costs and route metrics, on hand-checked cases."""

import numpy as np
import pytest

from benchroute.transforms import costs, policy, route_metrics
from benchroute.transforms.policy import CurvePoint, Point, PolicyError

NAN = np.nan
# Three models: a strong costly one, a middle one, a cheap weak one (relative costs 1, .3, .02).
G = np.array([[0.90, 0.85, 0.40],
              [0.60, 0.58, 0.57],
              [0.20, 0.10, 0.05]])
C = np.array([1.0, 0.3, 0.02])


def test_lambda_zero_is_argmax_g():
    assert policy.choose(G, C, Point("utility", 0.0)).tolist() == [0, 0, 0]


def test_utility_trades_quality_for_cost():
    # λ = 0.1: g - 0.1c → row 0: .80, .82, .398 → 1; row 1: .50, .55, .568 → 2; row 2: .10, .07, .048 → 0.
    assert policy.choose(G, C, Point("utility", 0.1)).tolist() == [1, 2, 0]
    # A huge λ always takes the cheapest model.
    assert policy.choose(G, C, Point("utility", 100.0)).tolist() == [2, 2, 2]


def test_within_delta_takes_the_cheapest_near_the_best():
    # δ = .05: row 0 best .90 → {0 (.90), 1 (.85)} → cheaper 1; row 1 → all within → 2; row 2 → 0 only.
    assert policy.choose(G, C, Point("within_delta", 0.05)).tolist() == [1, 2, 0]
    # δ boundary: .85 is exactly .05 below .90 and counts as within.
    assert policy.choose(G[:1], C, Point("within_delta", 0.0499)).tolist() == [0]


def test_nan_prediction_is_never_chosen_while_another_is_known():
    g = np.array([[NAN, 0.2, 0.1]])
    assert policy.choose(g, C, Point()).tolist() == [1]
    # Nothing known: every allowed model is a candidate at g = 0, the tiebreak decides.
    g = np.full((1, 3), NAN)
    assert policy.choose(g, C, Point(), tiebreak=np.array([0.1, 0.9, 0.5])).tolist() == [1]


def test_unknown_price_only_at_lambda_zero():
    c = np.array([NAN, 0.3, 0.02])
    assert policy.choose(G[:1], c, Point("utility", 0.0)).tolist() == [0]
    assert policy.choose(G[:1], c, Point("utility", 0.01)).tolist() == [1]


def test_allowed_mask_and_rank_order():
    allowed = np.array([False, True, True])
    assert policy.choose(G, C, Point(), allowed=allowed).tolist() == [1, 1, 1]
    r = policy.rank(G[:1], C, Point(), allowed=allowed)[0].tolist()
    assert r == [1, 2, 0]  # the disallowed model last
    with pytest.raises(PolicyError):
        policy.choose(G, C, Point(), allowed=np.zeros(3, bool))


def test_ties_go_to_tiebreak_then_cost_then_order():
    g = np.array([[0.5, 0.5, 0.5]])
    assert policy.choose(g, C, Point(), tiebreak=np.array([0.1, 0.3, 0.3])).tolist() == [2]
    assert policy.choose(g, np.array([0.2, 0.2, 0.2]), Point(), tiebreak=np.zeros(3)).tolist() == [0]
    # Within 1e-9 is a tie (last-bit noise of sums), beyond it is not.
    g = np.array([[0.5 + 1e-12, 0.5, 0.1]])
    assert policy.choose(g, None, Point(), tiebreak=np.array([0.0, 1.0, 0.0])).tolist() == [1]
    g = np.array([[0.5 + 1e-6, 0.5, 0.1]])
    assert policy.choose(g, None, Point(), tiebreak=np.array([0.0, 1.0, 0.0])).tolist() == [0]


CURVE = [
    CurvePoint("utility", 0.0, 1.00, 0.76, 0.000),
    CurvePoint("utility", 0.1, 0.55, 0.757, 0.003),
    CurvePoint("utility", 1.0, 0.18, 0.73, 0.030),
    CurvePoint("within_delta", 0.2, 0.05, 0.60, 0.160),
]


def test_operating_point_from_the_curve():
    assert policy.operating_point(CURVE) == Point("utility", 0.0)
    assert policy.operating_point(CURVE, lam=0.3) == Point("utility", 0.3)
    assert policy.operating_point(CURVE, delta=0.1) == Point("within_delta", 0.1)
    assert policy.operating_point(CURVE, max_cost_share=0.6) == Point("utility", 0.1)
    assert policy.operating_point(CURVE, max_cost_share=0.55) == Point("utility", 0.1)  # boundary
    assert policy.operating_point(CURVE, max_cost_share=0.2) == Point("utility", 1.0)
    assert policy.operating_point(CURVE, max_quality_loss=0.005) == Point("utility", 0.1)
    assert policy.operating_point(CURVE, max_quality_loss=1.0) == Point("within_delta", 0.2)
    with pytest.raises(PolicyError, match="cheapest"):
        policy.operating_point(CURVE, max_cost_share=0.01)
    with pytest.raises(PolicyError, match="at most one"):
        policy.operating_point(CURVE, lam=0.1, max_cost_share=0.5)
    with pytest.raises(PolicyError, match="no measured"):
        policy.operating_point([], max_cost_share=0.5)
    for bad in (-1.0, float("nan"), float("inf")):
        with pytest.raises(PolicyError):
            policy.operating_point(CURVE, lam=bad)


def test_request_costs_by_hand():
    # 1,000 prompt tokens and 500 output tokens at $5 / $15 per 1M: 0.005 + 0.0075 = 0.0125.
    usd = costs.request_costs(np.array([1000.0]), np.array([500.0, 500.0]), np.array([5.0, 0.2]),
                              np.array([15.0, 0.2]))
    assert usd[0].tolist() == pytest.approx([0.0125, 0.0003])
    assert costs.input_tokens(["abcd" * 10, ""]).tolist() == [10.0, 1.0]
    T = np.array([[100.0, NAN], [300.0, NAN]])
    assert costs.expected_output_tokens(T).tolist() == [200.0, costs.DEFAULT_OUTPUT_TOKENS]
    assert costs.reference_model(np.array([0.9, 0.8]), np.array([NAN, 1.0]), np.array([NAN, 1.0])) == 1
    assert costs.reference_model(np.array([0.9]), np.array([NAN]), np.array([NAN])) is None


def test_within_delta_with_unknown_costs_and_reference_support():
    # Within δ: model 0 (.90, unknown price) and model 1 (.85, priced): the priced one is cheaper.
    c = np.array([NAN, 0.3, 0.02])
    assert policy.choose(G[:1], c, Point("within_delta", 0.05)).tolist() == [1]
    # Only unpriced models near the best: the best ĝ among them.
    assert policy.choose(G[:1], np.array([NAN, NAN, 0.02]), Point("within_delta", 0.05)).tolist() == [0]
    # The reference needs support: a model seen on 1 input (accuracy 1.0) is not it.
    acc, p = np.array([1.0, 0.8, 0.6]), np.array([1.0, 1.0, 1.0])
    assert costs.reference_model(acc, p, p, support=np.array([1, 900, 1000])) == 1
    assert costs.reference_model(acc, p, p) == 0


def test_hull_is_non_decreasing_and_concave():
    # (cost, quality): a dominated point (.5, .5) and a point under the chord (.6, .62).
    c = [0.1, 0.5, 0.6, 1.0, 0.4]
    q = [0.4, 0.5, 0.62, 0.8, 0.7]
    hull = route_metrics.upper_hull(c, q)
    assert hull.tolist() == [[0.1, 0.4], [0.4, 0.7], [1.0, 0.8]]
    assert route_metrics.hull_value(hull, np.array([0.05, 0.25, 2.0])).tolist()[1:] == pytest.approx([0.55, 0.8])
    assert np.isnan(route_metrics.hull_value(hull, np.array([0.05]))[0])
    # A point that costs more for less quality is not on the hull.
    assert route_metrics.upper_hull([0.1, 0.2], [0.5, 0.4]).tolist() == [[0.1, 0.5]]


def test_aiq_by_hand():
    # Hull (0, .5) → (1, 1): area .75 over [0, 1].
    assert route_metrics.aiq([0.0, 1.0], [0.5, 1.0], 0.0, 1.0) == pytest.approx(0.75, abs=1e-6)
    # Flat after the last point; zero before the first.
    assert route_metrics.aiq([0.5], [1.0], 0.0, 1.0) == pytest.approx(0.5, abs=1e-3)
    assert route_metrics.cost_at_quality([0.0, 1.0], [0.5, 1.0], 0.75) == pytest.approx(0.5)
    assert np.isnan(route_metrics.cost_at_quality([0.0, 1.0], [0.5, 1.0], 1.1))
    assert route_metrics.quality_at_cost([0.0, 1.0], [0.5, 1.0], 0.2) == pytest.approx(0.6)
    # A target a hair above the first point (float noise) is reached there, not interpolated.
    assert route_metrics.cost_at_quality([0.2], [0.7 - 1e-13], 0.7) == pytest.approx(0.2)
    # By hand: hull (.1,.5) (.3,.7) (.6,.75) (1,.8) → AIQ over [.1, 1] = .6475 / .9.
    c, q = [0.1, 0.3, 0.6, 1.0], [0.5, 0.7, 0.75, 0.8]
    assert route_metrics.aiq(c, q, 0.1, 1.0) == pytest.approx(0.6475 / 0.9, abs=1e-5)
    assert route_metrics.cost_at_quality(c, q, 0.78) == pytest.approx(0.84)


def test_calibration_metrics_by_hand():
    p = np.array([0.9, 0.9, 0.1, 0.1, NAN])
    y = np.array([1.0, 0.0, 0.0, 0.0, 1.0])
    assert route_metrics.brier(p, y) == pytest.approx((0.01 + 0.81 + 0.01 + 0.01) / 4)
    # Two bins: p=.9 with mean y .5 (gap .4, weight .5), p=.1 with mean y 0 (gap .1, weight .5).
    assert route_metrics.ece(p, y) == pytest.approx(0.25)
    assert route_metrics.binary_accuracy(p, y) == pytest.approx(0.75)
