"""The one decision rule of benchroute: from predicted correctness, costs and filters to a choice.

The evaluation (``transforms.routing_eval``) and the served router (``artifacts.router``: Python,
CLI, HTTP) both call these functions, so a number in a report is what a bundle does.

Inputs, for n queries and M models:

- ``G`` (n × M): predicted correctness ĝ_m(x); NaN = the model cannot be judged on that query
  (no labelled neighbour: it never ran on anything like it). A NaN model is never chosen while a
  model with a prediction is allowed.
- ``C`` (n × M): the expected cost of sending each query to each model, in units of the bundle's
  reference cost (``costs.reference_cost``: the cost of the best single model on a typical
  request), NaN = unknown price.
- ``allowed`` (M,): the models the caller permits (model list, size and budget filters).
- ``tiebreak`` (M,): higher wins among equal scores (training accuracy); then lower cost, then
  model order.

Rules (docs/method.md#decision-rules), each a ``Point``:

- ``utility``: argmax_m ĝ_m(x) − λ·c_m(x). λ = 0 is the paper's argmax ĝ; at λ > 0 a model of
  unknown price is chosen only when no candidate has a price (the router refuses such a request).
- ``within_delta``: the cheapest model whose ĝ is within δ of the best ĝ among the allowed
  models (unknown prices last among those).

A stored cost–quality curve (one row per point, measured on held-out data) lets a caller pick a
point by ``max_cost_share`` (the best quality at most that share of the reference cost),
``max_quality_loss`` (the cheapest point within that loss of the best single model's quality) or
an explicit ``lambda``/``delta`` (``operating_point``).
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Literal

import numpy as np

Rule = Literal["utility", "within_delta"]
RULES: tuple[Rule, ...] = ("utility", "within_delta")

# The λ and δ swept to draw a router's cost–quality curve (λ in quality per reference cost).
LAMBDA_GRID: tuple[float, ...] = (0.0,) + tuple(float(x) for x in np.round(np.logspace(-3, 1.5, 37), 6))
DELTA_GRID: tuple[float, ...] = tuple(float(x) for x in np.round(np.linspace(0.0, 0.5, 26), 4))


class PolicyError(ValueError):
    """A request for an operating point the policy cannot give (message says why)."""


@dataclass(frozen=True)
class Point:
    """One operating point of the policy: a rule and its parameter (λ or δ)."""

    rule: Rule = "utility"
    value: float = 0.0

    def __post_init__(self) -> None:
        if self.rule not in RULES:
            raise PolicyError(f"rule must be one of {RULES}, got {self.rule!r}")
        v = float(self.value)
        if not np.isfinite(v) or v < 0:
            raise PolicyError(f"{self.rule} needs a finite parameter >= 0, got {self.value!r}")

    def to_dict(self) -> dict:
        return asdict(self)


def sweep_points() -> list[Point]:
    """Every point the evaluation measures (and a bundle's curve holds)."""
    return [Point("utility", v) for v in LAMBDA_GRID] + [Point("within_delta", v) for v in DELTA_GRID]


def _prepared(G, C, allowed, tiebreak):
    G = np.atleast_2d(np.asarray(G, np.float64))
    n, M = G.shape
    C = np.broadcast_to(np.asarray(C, np.float64), (n, M)) if C is not None else np.full((n, M), np.nan)
    ok = np.ones(M, bool) if allowed is None else np.asarray(allowed, bool)
    if ok.shape != (M,):
        raise PolicyError(f"allowed has shape {ok.shape}, expected ({M},)")
    if not ok.any():
        raise PolicyError("no model is allowed")
    tb = np.zeros(M) if tiebreak is None else np.nan_to_num(np.asarray(tiebreak, np.float64), nan=-np.inf)
    return G, C, ok, tb


def scores(G, C, point: Point, allowed=None) -> np.ndarray:
    """The primary sort key of each (query, model) under ``point`` (higher is better; -inf = not
    a candidate). For ``within_delta`` it is minus the cost among the models within δ."""
    G, C, ok, _ = _prepared(G, C, allowed, None)
    known = ~np.isnan(G) & ok[None, :]
    any_known = known.any(axis=1, keepdims=True)
    # A query no allowed model can be judged on: every allowed model is a candidate, at g = 0.
    cand = np.where(any_known, known, ok[None, :])
    g = np.where(np.isnan(G), 0.0, G)
    if point.rule == "utility":
        if point.value == 0:
            return np.where(cand, g, -np.inf)
        priced = cand & ~np.isnan(C)
        cand = np.where(priced.any(axis=1, keepdims=True), priced, cand)
        return np.where(cand, g - point.value * np.nan_to_num(C, nan=0.0), -np.inf)
    best = np.where(cand, g, -np.inf).max(axis=1, keepdims=True)
    near = cand & (g >= best - point.value - 1e-12)
    return np.where(near, -np.where(np.isnan(C), np.inf, C), -np.inf)


def rank(G, C, point: Point, allowed=None, tiebreak=None) -> np.ndarray:
    """(n × M) model indices, best first, for each query; models that are not candidates (not
    allowed, or unjudgeable while another is judgeable) follow in the same order."""
    G, C, ok, tb = _prepared(G, C, allowed, tiebreak)
    # Scores equal to 1e-9 are ties (float sums of the same labels in another order differ in
    # their last bits), broken by the later keys.
    s = np.round(scores(G, C, point, ok), 9)
    g = np.round(np.where(np.isnan(G), -np.inf, G), 9)
    cost = np.where(np.isnan(C), np.inf, C)
    M = G.shape[1]
    col = np.broadcast_to(np.arange(M), G.shape)
    allowed_first = np.broadcast_to(~ok, G.shape)
    # np.lexsort: last key is primary.
    keys = (col, cost, -np.broadcast_to(tb, G.shape), -g, -s, allowed_first)
    return np.lexsort(keys, axis=-1)


def choose(G, C, point: Point, allowed=None, tiebreak=None) -> np.ndarray:
    """(n,) the index of the model chosen for each query."""
    return rank(G, C, point, allowed, tiebreak)[:, 0]


# ------------------------------------------------------------------ operating points
@dataclass(frozen=True)
class CurvePoint:
    """One measured point of a router's cost–quality curve (held-out data)."""

    rule: Rule
    value: float
    cost_share: float  # router cost / cost of always calling the reference (best) model
    quality: float  # mean quality of the routed answers
    quality_loss: float  # quality of the best single model − quality (negative = better)


def operating_point(
    curve: Sequence[CurvePoint] | None,
    *,
    lam: float | None = None,
    delta: float | None = None,
    max_cost_share: float | None = None,
    max_quality_loss: float | None = None,
) -> Point:
    """The point a caller asks for: an explicit λ or δ, or one read from the stored ``curve``
    (best quality within ``max_cost_share``; cheapest within ``max_quality_loss``). At most one
    of the four may be given; none = λ 0 (quality only)."""
    given = {k: v for k, v in {"lambda": lam, "delta": delta, "max_cost_share": max_cost_share,
                              "max_quality_loss": max_quality_loss}.items() if v is not None}
    if len(given) > 1:
        raise PolicyError(f"give at most one of lambda, delta, max_cost_share, max_quality_loss; got {sorted(given)}")
    for k, v in given.items():
        if not isinstance(v, numbers.Real) or isinstance(v, bool) or not np.isfinite(v) or v < 0:
            raise PolicyError(f"{k} must be a finite number >= 0, got {v!r}")
    if lam is not None:
        return Point("utility", float(lam))
    if delta is not None:
        return Point("within_delta", float(delta))
    if max_cost_share is None and max_quality_loss is None:
        return Point("utility", 0.0)
    if not curve:
        raise PolicyError("this bundle has no measured cost–quality curve (no prices or no evaluation); "
                          "pass lambda or delta instead")
    pts = [p for p in curve if np.isfinite(p.cost_share) and np.isfinite(p.quality)]
    if max_cost_share is not None:
        within = [p for p in pts if p.cost_share <= max_cost_share + 1e-12]
        if not within:
            cheapest = min(p.cost_share for p in pts)
            raise PolicyError(f"no measured point costs at most {max_cost_share:g} of the reference "
                              f"model; the cheapest costs {cheapest:.4g}")
        best = max(within, key=lambda p: (p.quality, -p.cost_share))
    else:
        within = [p for p in pts if p.quality_loss <= max_quality_loss + 1e-12]
        if not within:
            least = min(p.quality_loss for p in pts)
            raise PolicyError(f"no measured point loses at most {max_quality_loss:g} quality; the "
                              f"smallest loss is {least:.4g}")
        best = min(within, key=lambda p: (p.cost_share, -p.quality))
    return Point(best.rule, best.value)
