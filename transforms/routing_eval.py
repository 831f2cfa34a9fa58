"""Cost-aware per-query routing, evaluated on held-out inputs (docs/method.md#how-a-cost-aware-router-is-judged).

For one benchmark (a source group's ``BenchmarkArrays``) and each correctness predictor:

1. Folds. ``split="random"``: a seeded random ``test_fraction`` of the inputs labelled for every
   model is held out ("known task" traffic: the task is in the training data, these inputs are
   not); ``split="lodo"``: each dataset in turn is held out (a new task), its inputs never training
   neighbours (by membership, as in ``transforms.evaluate``); with more than ``max_folds`` datasets,
   datasets are dealt into ``max_folds`` folds.
2. The predictor is fitted on the training rows and predicts ĝ on the held-out rows; models with
   no labelled neighbour among the k nearest training rows are NaN (``knn.covered``) — exactly as
   the served router does.
3. Decisions: ``policy.choose`` at every point of ``policy.sweep_points()`` with the expected cost of
   each request (input tokens of the text, the model's mean *training* output tokens), relative to
   the reference model (best training accuracy among priced models), among the models with a known
   price (as the served router does whenever a caller asks for a cost-aware point).
4. Measured: quality = mean label y of the chosen model; cost = the request's *realised* cost (the
   recorded output tokens of that answer where the data has them). Single models, their hull
   (random mixtures of two models), the router's hull, AIQ of each on the single models' cost range,
   quality at the best model's cost and at 60 % / 20 % of it, cost at the best model's quality; and
   the predictor's accuracy, Brier score, ECE and log-loss on the held-out labels.

Everything is deterministic given the seed (the predictors are seeded).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import warnings

import numpy as np
import polars as pl

from benchroute.transforms import costs as costs_
from benchroute.transforms import policy, route_metrics
from benchroute.transforms.evaluate import BenchmarkArrays, mean_over_datasets
from benchroute.transforms.knn import COVERAGE_K, KNNCorrectness, covered
from benchroute.transforms.label_matrix import labelled_counts, row_blocks


@dataclass(frozen=True)
class CostData:
    """Prices and token counts aligned to a ``BenchmarkArrays``: ``price_in``/``price_out`` (M,)
    USD per 1M tokens (NaN = unknown), ``in_tokens`` (n,), ``out_tokens`` (n × M, NaN = not
    recorded)."""

    price_in: np.ndarray
    price_out: np.ndarray
    in_tokens: np.ndarray
    out_tokens: np.ndarray

    @property
    def priced(self) -> np.ndarray:
        return ~np.isnan(self.price_in) & ~np.isnan(self.price_out)


def unrecorded_tokens(n: int, M: int) -> np.ndarray:
    """An n × M ``out_tokens`` with nothing recorded: a read-only all-NaN view of one value (a
    leaderboard's would otherwise be 3.2 GB of NaN)."""
    return np.broadcast_to(np.float64(np.nan), (n, M))


@dataclass(frozen=True)
class Fold:
    name: str
    train: np.ndarray  # row indices
    test: np.ndarray  # row indices
    Y_test: np.ndarray  # labels of the test rows in the held-out data (n_test × M)


class NoHeldOutInputs(ValueError):
    """A split that leaves no input to evaluate on (message says which)."""


def folds(bench: BenchmarkArrays, split: str, *, seed: int = 0, test_fraction: float = 0.2,
          min_inputs: int = 10, max_folds: int | None = None, complete_only: bool = True) -> list[Fold]:
    """The held-out folds of ``split`` ("random" or "lodo"). ``complete_only=False`` (random
    split only) holds out any labelled input, not only those labelled for every model: a bundle
    of several sources, whose models never ran on each other's inputs."""
    n = len(bench.input_ids)
    if split == "random":
        labelled = ~np.isnan(bench.Y).any(axis=1) if complete_only else ~np.isnan(bench.Y).all(axis=1)
        complete = np.flatnonzero(labelled)
        rng = np.random.default_rng(seed)
        n_test = int(round(test_fraction * complete.size))
        test = np.sort(rng.choice(complete, n_test, replace=False)) if n_test else np.empty(0, np.int64)
        train = np.setdiff1d(np.arange(n), test)
        return [Fold("random", train, test, bench.Y[test])] if test.size else []
    if split != "lodo":
        raise ValueError(f"split must be 'random' or 'lodo', got {split!r}")
    eligible = [d for d in range(len(bench.datasets)) if bench.complete_rows(d).size >= min_inputs]
    if max_folds and len(eligible) > max_folds:
        groups = [eligible[i::max_folds] for i in range(max_folds)]
    else:
        groups = [[d] for d in eligible]
    out = []
    families = bench.families()
    for ds in groups:
        held = np.zeros(n, bool)
        test_parts, y_parts = [], []
        for d in ds:
            held |= bench.member[:, families[d]].any(axis=1)  # d's whole family (lodo_groups)
            local = bench.complete_rows(d)
            test_parts.append(bench.dataset_rows[d][local])
            y_parts.append(bench.dataset_y[d][local])
        name = bench.datasets[ds[0]] if len(ds) == 1 else "+".join(bench.datasets[d] for d in ds)
        out.append(Fold(name, np.flatnonzero(~held), np.concatenate(test_parts), np.vstack(y_parts)))
    return out


@dataclass(frozen=True)
class DecisionCosts:
    """What the policy needs about costs, learned from training rows only."""

    exp_out_tokens: np.ndarray  # (M,)
    reference: int | None  # the reference model (best training accuracy among priced)
    reference_cost: float  # USD of a typical request on it
    typical_in_tokens: float

    def relative(self, cost: CostData, in_tokens: np.ndarray) -> np.ndarray:
        """(n × M) expected cost of each request on each model / reference cost."""
        usd = costs_.request_costs(in_tokens, self.exp_out_tokens, cost.price_in, cost.price_out)
        return usd / self.reference_cost if self.reference_cost > 0 else np.full(usd.shape, np.nan)


def decision_costs(cost: CostData, train_rows: np.ndarray, train_acc: np.ndarray,
                   support: np.ndarray) -> DecisionCosts:
    """Expected output tokens, reference model and cost from the training rows; ``support`` (M,)
    the training labels of each model (the reference needs at least half the best support)."""
    exp_out = costs_.expected_output_tokens_of_rows(cost.out_tokens, train_rows)
    ref = costs_.reference_model(train_acc, cost.price_in, cost.price_out, support)
    typical = float(np.median(cost.in_tokens[train_rows])) if train_rows.size else 1.0
    return DecisionCosts(exp_out, ref, costs_.reference_cost(typical, exp_out, cost.price_in,
                                                             cost.price_out, ref), typical)


def realised_costs(cost: CostData, rows: np.ndarray, exp_out: np.ndarray) -> np.ndarray:
    """(n × M) USD of each held-out request on each model with its recorded output tokens (the
    model's mean where not recorded)."""
    T = cost.out_tokens[rows]
    T = np.where(np.isnan(T), exp_out[None, :], T)
    return costs_.request_costs(cost.in_tokens[rows], T, cost.price_in, cost.price_out)


def train_accuracy(bench: BenchmarkArrays, train_rows: np.ndarray) -> np.ndarray:
    """(M,) mean over datasets of each model's accuracy on the training rows: the tie-break and
    the choice of reference model, as in ``router_fit`` (there over all rows)."""
    held = np.ones(len(bench.input_ids), bool)
    held[train_rows] = False
    return mean_over_datasets(bench.dataset_accuracy(exclude_rows=held))


def predict_with_coverage(predictor, X_train, Y_train, X_test, *, k: int = COVERAGE_K) -> np.ndarray:
    """ĝ of a fitted ``predictor`` on ``X_test``, NaN where no training neighbour of the query is
    labelled for the model (``knn.covered``)."""
    G = np.asarray(predictor.predict_proba(X_test), np.float64)
    if np.isnan(Y_train).any():
        neigh = KNNCorrectness(k, fallback="nan").fit(X_train, Y_train).kneighbors(X_test)
        G = np.where(covered(neigh, Y_train), G, np.nan)
    return G


@dataclass
class RoutingResult:
    """Per predictor: the held-out predictions pooled over folds and what they give."""

    split: str
    models: list[str]
    points: pl.DataFrame  # predictor, rule, value, cost, cost_share, quality, scored, quality_loss
    singles: pl.DataFrame  # model, cost, cost_share, quality, priced
    predictor_metrics: pl.DataFrame  # predictor, accuracy, brier, ece, log_loss, fit_s
    summary: pl.DataFrame  # predictor, aiq, aiq_singles, best_model, best_quality, best_cost, ...
    choices: dict[str, dict[tuple[str, float], np.ndarray]] = field(default_factory=dict)
    test_rows: np.ndarray | None = None


def evaluate_routing(
    bench: BenchmarkArrays,
    cost: CostData,
    predictors: Mapping[str, Callable[[], object]],
    *,
    split: str = "random",
    seed: int = 0,
    test_fraction: float = 0.2,
    max_folds: int | None = None,
    points: list[policy.Point] | None = None,
    keep_choices: bool = False,
    complete_only: bool = True,
    log=None,
) -> RoutingResult:
    """Evaluate each predictor's cost-aware router on the held-out folds of ``split``."""
    import time

    pts = points or policy.sweep_points()
    fs = folds(bench, split, seed=seed, test_fraction=test_fraction, max_folds=max_folds,
               complete_only=complete_only)
    if not fs:
        raise NoHeldOutInputs(f"{split}: no held-out inputs labelled for every model")
    M = len(bench.models)
    # The predictions first: a fit holds a copy of its training labels (80 % of a leaderboard's
    # Y), and the cost matrices below (2 × n_test × M float64) need not be held beside it.
    predictions = {}
    for name, factory in predictors.items():
        t0 = time.perf_counter()
        G = np.vstack([_fold_predictions(factory, bench, f) for f in fs])
        predictions[name] = (G, time.perf_counter() - t0)
        if log:
            log.info("routing %s/%s: %d held-out inputs, %d models, %.1f s", split, name, G.shape[0], M,
                     predictions[name][1])
    test_rows = np.concatenate([f.test for f in fs])
    Y = np.vstack([f.Y_test for f in fs])
    # Costs: realised per held-out request, and the decision costs of each fold (training rows only).
    accs = [train_accuracy(bench, f.train) for f in fs]
    dcs = [decision_costs(cost, f.train, a, labelled_counts(bench.Y, f.train))
           for f, a in zip(fs, accs)]
    R = np.vstack([realised_costs(cost, f.test, dc.exp_out_tokens) for f, dc in zip(fs, dcs)])
    Crel = np.vstack([dc.relative(cost, cost.in_tokens[f.test]) for f, dc in zip(fs, dcs)])
    # The best single model on the held-out data (among priced models labelled on at least half of
    # the held-out inputs): the cost shares' denominator and the quality to match.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        quality_single = np.nanmean(Y, axis=0)
    support = (~np.isnan(Y)).sum(axis=0)
    priced = cost.priced
    ref_cost = np.nan
    eligible = priced & (support >= 0.5 * support.max())
    best = int(np.flatnonzero(eligible)[np.argmax(quality_single[eligible])]) if eligible.any() else None
    if best is not None:
        ref_cost = float(R[:, best].mean())
    singles = pl.DataFrame({
        "model": bench.models,
        "cost": R.mean(axis=0),
        "cost_share": R.mean(axis=0) / ref_cost if ref_cost == ref_cost else np.full(M, np.nan),
        "quality": quality_single,
        "priced": priced,
        # Labelled on at least half of the held-out inputs: a single model comparable to the rest
        # (in a bundle of several sources a model seen on a few inputs has a quality of its own).
        "comparable": support >= 0.5 * support.max(),
    })
    point_rows, metric_rows, summary_rows = [], [], []
    choices: dict[str, dict] = {}
    for name in predictors:
        G, fit_s = predictions.pop(name)
        per_pred: dict = {}
        # The default request (no cost option): argmax ĝ over every model, priced or not.
        chosen = _choose_per_fold(G, Crel, policy.Point(), fs, accs, None)
        q_all, _ = _scored(Y, R, chosen)
        if keep_choices:
            per_pred[("argmax_all", 0.0)] = chosen
        metric_rows.append({"predictor": name, "quality_argmax_all_models": q_all,
                            "accuracy": route_metrics.binary_accuracy(G, Y),
                            "brier": route_metrics.brier(G, Y), "ece": route_metrics.ece(G, Y),
                            "log_loss": _log_loss(G, Y), "fit_s": fit_s})
        for pt in pts:
            if pt.rule != "utility" or pt.value > 0:
                if not priced.any():
                    continue
            chosen = _choose_per_fold(G, Crel, pt, fs, accs, priced if priced.any() else None)
            q, c = _scored(Y, R, chosen)
            point_rows.append({"predictor": name, "rule": pt.rule, "value": pt.value, "cost": c,
                               "cost_share": c / ref_cost if ref_cost == ref_cost else np.nan,
                               "quality": q,
                               "scored": float((~np.isnan(Y[np.arange(Y.shape[0]), chosen])).mean())})
            if keep_choices:
                per_pred[(pt.rule, pt.value)] = chosen
        choices[name] = per_pred
    pts_df = pl.DataFrame(point_rows) if point_rows else pl.DataFrame(
        schema={"predictor": pl.String, "rule": pl.String, "value": pl.Float64, "cost": pl.Float64,
                "cost_share": pl.Float64, "quality": pl.Float64, "scored": pl.Float64})
    best_q = float(quality_single[best]) if best is not None else float(np.nanmax(quality_single))
    pts_df = pts_df.with_columns(quality_loss=best_q - pl.col("quality"))
    for name in predictors:
        summary_rows.append(_summary(name, pts_df.filter(pl.col("predictor") == name), singles, best,
                                     bench.models, best_q))
    return RoutingResult(split, list(bench.models), pts_df, singles, pl.DataFrame(metric_rows),
                         pl.DataFrame(summary_rows), choices, test_rows)


def _fold_predictions(factory, bench: BenchmarkArrays, f: Fold) -> np.ndarray:
    """ĝ on the fold's held-out rows from a predictor fitted on its training rows (their labels
    copied once: 1.3 GB on a leaderboard)."""
    X_train, Y_train = bench.X[f.train], bench.Y[f.train]
    return predict_with_coverage(factory().fit(X_train, Y_train), X_train, Y_train, bench.X[f.test])


CHOOSE_BYTES = 64 * 2**20  # float64 bytes of the held-out rows one policy call ranks


def _choose_per_fold(G, Crel, pt, fs, accs, allowed) -> np.ndarray:
    """The policy's choice for every held-out row, each fold with its own tie-break, a block of
    rows at a time (a choice depends on its row only; a leaderboard's ranking of every model of
    20k rows at once held 4 GB)."""
    out, start = [], 0
    for f, acc in zip(fs, accs):
        for b in row_blocks(f.test.size, G.shape[1], CHOOSE_BYTES):
            sl = slice(start + b.start, start + b.stop)
            out.append(policy.choose(G[sl], Crel[sl], pt, allowed=allowed, tiebreak=acc))
        start += f.test.size
    return np.concatenate(out) if out else np.empty(0, np.int64)


def _scored(Y: np.ndarray, R: np.ndarray, chosen: np.ndarray) -> tuple[float, float]:
    """Mean quality and mean realised cost of the chosen answers, over the inputs where the chosen
    model has a label (all of them within one source: every model is labelled there)."""
    rows = np.arange(Y.shape[0])
    q = Y[rows, chosen]
    ok = ~np.isnan(q)
    if not ok.any():
        return float("nan"), float("nan")
    return float(q[ok].mean()), float(R[rows, chosen][ok].mean())


def _log_loss(G, Y) -> float:
    def loss(p, y):
        p = np.clip(p, 1e-6, 1 - 1e-6)
        return -(y * np.log(p) + (1 - y) * np.log(1 - p))

    return route_metrics.labelled_mean(G, Y, loss)


def _summary(name, pts: pl.DataFrame, singles: pl.DataFrame, best, models, best_q) -> dict:
    s = singles.filter(pl.col("priced") & pl.col("comparable"))
    out = {"predictor": name, "best_model": models[best] if best is not None else None,
           "best_quality": best_q}
    if s.height == 0 or pts.height == 0:
        q0 = pts.filter((pl.col("rule") == "utility") & (pl.col("value") == 0))["quality"]
        out["quality_lambda0"] = float(q0[0]) if q0.len() else float("nan")
        return out
    sc, sq = s["cost_share"].to_numpy(), s["quality"].to_numpy()
    rc, rq = pts["cost_share"].to_numpy(), pts["quality"].to_numpy()
    lo, hi = float(sc.min()), float(sc.max())
    grid = np.linspace(lo, hi, 401)
    r_h = route_metrics.hull_value(route_metrics.upper_hull(rc, rq), grid)
    s_h = route_metrics.hull_value(route_metrics.upper_hull(sc, sq), grid)
    above = np.nan_to_num(r_h, nan=-np.inf) >= s_h - 1e-9
    q0 = pts.filter((pl.col("rule") == "utility") & (pl.col("value") == 0))["quality"]
    out.update({
        "quality_lambda0": float(q0[0]) if q0.len() else float("nan"),
        "aiq": route_metrics.aiq(rc, rq, lo, hi),
        "aiq_singles": route_metrics.aiq(sc, sq, lo, hi),
        "quality_at_best_cost": route_metrics.quality_at_cost(rc, rq, 1.0),
        "quality_at_60pct_cost": route_metrics.quality_at_cost(rc, rq, 0.6),
        "quality_at_20pct_cost": route_metrics.quality_at_cost(rc, rq, 0.2),
        "cost_share_at_best_quality": route_metrics.cost_at_quality(rc, rq, best_q),
        "cost_share_within_005": route_metrics.cost_at_quality(rc, rq, best_q - 0.005),
        "cost_share_at_95pct_quality": route_metrics.cost_at_quality(rc, rq, 0.95 * best_q),
        "share_of_range_above_singles": float(above.mean()),
    })
    return out
