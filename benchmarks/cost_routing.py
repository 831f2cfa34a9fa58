"""Cost-aware per-query routing on a store, against the best single model (the named baseline).

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/cost_routing.py --store STORE \
        [--source mmlu_pro --source alpaca_eval] [--predictor knn --predictor mlp ...] \
        [--split random --split lodo] [--out report_dir]

For each source group, split and predictor it runs ``flows.evaluate.routing_groups`` (the code
``benchroute evaluate`` runs; the bundle's curve comes from the same functions) and prints:

- the router's quality at λ = 0 (argmax ĝ) and at 100 %, 60 % and 20 % of the best single model's
  cost, each as a ratio to that model's quality; the least cost share reaching its quality − .005
  and 95 % of it; AIQ of the router's hull and of the single models' hull; the share of the single
  models' cost range where the router's hull is on or above theirs;
- the predictor's held-out accuracy, Brier score, ECE and fit time.

With ``--out`` it also writes the report (Markdown + HTML with the cost–quality plots).
"""

from __future__ import annotations

import argparse
import math
import time

from benchroute.artifacts.report import write_report
from benchroute.artifacts.store import Store
from benchroute.artifacts.router_build import SelectedLabels
from benchroute.artifacts.specs import Selection
from benchroute.flows.evaluate import pick_embedder, routing_groups


def fmt(v, digits=3) -> str:
    return "–" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{digits}f}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--store", required=True)
    ap.add_argument("--source", action="append", dest="sources")
    ap.add_argument("--predictor", action="append", dest="predictors")
    ap.add_argument("--split", action="append", dest="splits")
    ap.add_argument("--max-folds", type=int, default=15)
    ap.add_argument("--seed", type=int, default=0, help="the random split's seed")
    ap.add_argument("--out")
    args = ap.parse_args()
    predictors = args.predictors or ["knn", "knn_shrunk", "mlp", "factorized"]
    splits = tuple(args.splits or ("random", "lodo"))
    store = Store(args.store)
    eid = pick_embedder(store, None)
    t0 = time.perf_counter()
    routing = routing_groups(
        store, eid, SelectedLabels(store, Selection()), store.read("models"), predictors, splits=splits, sources=args.sources, max_folds=args.max_folds, seed=args.seed,
    )
    print(f"# cost-aware routing on {args.store} ({time.perf_counter() - t0:.0f} s)\n")
    print("Baseline: the best single priced model on the held-out inputs (ratio 1.000 at cost share 1).\n")
    print("| group | split | predictor | best model | best q | q(λ=0) | q@100% /best | q@60% /best | "
          "q@20% /best | cost share at q−.005 | at 95% q | AIQ router | AIQ singles | hull ≥ singles | "
          "pred acc | Brier | ECE | fit s |")
    print("|" + "---|" * 18)
    for group, by_split in routing.items():
        for split, res in by_split.items():
            metrics = {r["predictor"]: r for r in res.predictor_metrics.to_dicts()}
            for s in res.summary.to_dicts():
                b = s.get("best_quality") or float("nan")
                m = metrics[s["predictor"]]
                print(
                    f"| {group} | {split} | {s['predictor']} | {s.get('best_model')} | {fmt(b)} | "
                    f"{fmt(s.get('quality_lambda0'))} | {fmt(s.get('quality_at_best_cost', math.nan) / b)} | "
                    f"{fmt(s.get('quality_at_60pct_cost', math.nan) / b)} | "
                    f"{fmt(s.get('quality_at_20pct_cost', math.nan) / b)} | "
                    f"{fmt(s.get('cost_share_within_005'))} | {fmt(s.get('cost_share_at_95pct_quality'))} | "
                    f"{fmt(s.get('aiq'))} | {fmt(s.get('aiq_singles'))} | "
                    f"{fmt(s.get('share_of_range_above_singles'), 2)} | {fmt(m['accuracy'])} | "
                    f"{fmt(m['brier'])} | {fmt(m['ece'])} | {fmt(m['fit_s'], 1)} |"
                )
    if args.out:
        paths = write_report(args.out, {}, {"store": args.store, "predictors": ", ".join(predictors)}, {},
                             routing)
        print(f"\nreport: {paths['html']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
