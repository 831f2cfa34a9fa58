"""The paper's LODO evaluation on real data, printed beside the paper's numbers.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/evaluate_lodo.py [--data mmlu_pro|alpaca_eval]
        [--k 10] [--weights uniform] [--json out.json]

``mmlu_pro``: all of MMLU-Pro, 14 categories × 28 models (``correct_rx``), each category held out
in turn. ``alpaca_eval``: AlpacaEval 2's 805 instructions in 5 source datasets × 55 models
(win against gpt4_1106_preview; quality = preference − 1). Embeds the texts with
all-MiniLM-L6-v2 on first use (cached under ``$BENCHROUTE_CACHE``, default
/tmp/benchroute-cache), runs ``transforms.evaluate.evaluate_lodo`` and prints Table 1 (both tie
rules) next to the paper's HELM numbers (docs/method.md#reference-numbers), the predictor accuracy and kernel MAE,
the α curve and the per-input routing table (Table 2).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import polars as pl

sys.path.insert(0, str(Path(__file__).resolve().parent))

from benchroute.transforms.paper import (  # noqa: E402
    PAPER_ALPHA_PRED_ACC,
    PAPER_KERNEL_MAE,
    PAPER_PREDICTOR_ACC,
)
from benchroute.transforms.paper import table1_beside_paper as _beside  # noqa: E402


def table1_beside_paper(table1: pl.DataFrame, ties: str) -> str:
    return _beside(table1.filter(pl.col("ties") == ties).to_dicts())


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", choices=["mmlu_pro", "alpaca_eval"], default="mmlu_pro")
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--weights", choices=["uniform", "distance"], default="uniform")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--drop-models", metavar="REGEX",
                    help="leave out the models whose canonical name matches (e.g. 'gpt-4o|gemini')")
    ap.add_argument("--json", type=Path, help="write all tables here")
    args = ap.parse_args(argv)

    if args.data == "mmlu_pro":
        import mmlu_pro_data as mp
    else:
        import alpaca_eval_data as mp

    from benchroute.transforms.evaluate import BenchmarkArrays, EvalConfig, evaluate_lodo

    inputs, memberships, labels, models = mp.canonical_tables()
    if args.drop_models:
        labels = labels.filter(~pl.col("model").str.contains(args.drop_models))
        models = models.filter(~pl.col("model").str.contains(args.drop_models))
    emb = mp.cached_embeddings(inputs)
    bench = BenchmarkArrays.from_frames(emb, inputs["input_id"].to_list(), labels, memberships, models)
    cfg = EvalConfig(k=args.k, weights=args.weights, seed=args.seed)
    t0 = time.perf_counter()
    ev = evaluate_lodo(bench, cfg)
    secs = time.perf_counter() - t0
    s = ev.summary
    dropped = f" (left out: /{args.drop_models}/)" if args.drop_models else ""
    print(f"{args.data}{dropped}: {s['n_inputs']} inputs, {s['n_models']} models, {s['n_tasks']} held-out "
          f"datasets; k = {cfg.k}, weights = {cfg.weights}; evaluation {secs:.1f} s\n")
    for ties in ("expectation", "train_acc"):
        print(f"### Table 1 — ties {ties}\n")
        print(table1_beside_paper(ev.table1, ties) + "\n")
    print(f"predictor accuracy (mean p(d', m)): {s['predictor_accuracy']:.3f} (paper {PAPER_PREDICTOR_ACC})")
    print(f"kernel MAE |p̂ − p|: {s['kernel_mae']:.3f} (paper {PAPER_KERNEL_MAE}); "
          f"constant mean-p estimate: {s['constant_mae']:.3f}; "
          f"neighbour-share estimate (ours): {s['neighbor_share_mae']:.3f}\n")
    print("### α curve (ties broken by training accuracy)\n")
    a = ev.alpha.filter(pl.col("ties") == "train_acc")
    wide = a.pivot(on="method", index="alpha", values="acc").sort("alpha")
    extra = a.group_by("alpha").agg(pl.col("predictor_accuracy").first(),
                                    pl.col("p_mae").first()).sort("alpha")
    wide = wide.join(extra, on="alpha")
    cols = wide.columns
    print("| " + " | ".join(cols) + " |")
    print("|---" * len(cols) + "|")
    for r in wide.iter_rows():
        print("| " + " | ".join(f"{v:.3f}" if isinstance(v, float) else str(v) for v in r) + " |")
    print(f"\n(paper: predictor accuracy {PAPER_PREDICTOR_ACC} → {PAPER_ALPHA_PRED_ACC} with α = 0.05)\n")
    quality = "correct_rx" if args.data == "mmlu_pro" else "preference − 1 (win rate vs gpt4_1106_preview)"
    print(f"### Table 2 — per-input routing over all held-out inputs (quality = {quality})\n")
    t2 = ev.table2.sort("quality", descending=True)
    print("| router | ties | quality | model calls per input |")
    print("|---|---|---|---|")
    for r in t2.iter_rows(named=True):
        print(f"| {r['router']} | {r['ties']} | {r['quality']:.4f} | {r['mcpi']:.0f} |")
    print(f"\n(n = {t2['n_inputs'][0]} inputs; the paper's Table 2 is MixInstruct BERTScore: "
          "router 74.75 vs oracle 77.67)\n")
    chosen = (ev.per_task.filter((pl.col("ties") == "train_acc") & (pl.col("method") != "Random"))
              .pivot(on="method", index="dataset", values="model"))
    print("### Chosen model per held-out dataset (ties broken by training accuracy)\n")
    with pl.Config(tbl_rows=30, tbl_cols=20, fmt_str_lengths=40, tbl_width_chars=250):
        print(chosen)
    out = {"summary": s, "seconds": secs, "table1": ev.table1.to_dicts(),
           "alpha": ev.alpha.to_dicts(), "table2": ev.table2.to_dicts(),
           "per_task": ev.per_task.to_dicts()}
    if args.json:
        args.json.write_text(json.dumps(out, indent=1, default=str))
    return out


if __name__ == "__main__":
    main()
