"""Strong/weak routers on held-out benchmarks, beside RouteLLM's published numbers (issue 14).

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/pair_routers.py --store STORE [--out DIR]
        [--only mmlu --only gsm8k ...] [--router sw_ranking --router mf ...] [--n-boot 1000]

Evaluations (``transforms.pair_eval.evaluate_pair``: train on everything else, near duplicates
of held-out inputs dropped from training):

- ``mmlu``: RouteLLM's 57 MMLU subjects held out, pair gpt-4-1106-preview / Mixtral-8x7B-Instruct
  (the pair RouteLLM published). MMLU-Pro questions taken from MMLU (``src`` = ori_mmlu in
  ``<raw>/mmlu_pro/questions.parquet``) are excluded from training as well;
- ``gsm8k``, ``mt_bench``: the same pair, that benchmark held out (MT-Bench quality = the GPT-4
  judge's 1–10 score, as RouteLLM reports it);
- ``mmlu+10%``, ``gsm8k+10%``: RouteLLM's protocol for MMLU (its routers trained on golden labels
  of MMLU's validation questions): a seeded 10 % of the benchmark's questions join the training
  data with their labels, the other 90 % are tested;
- ``mmlu_pro_a`` / ``mmlu_pro_b``: half of MMLU-Pro's 14 categories held out (the other half and
  the other sources train; RouteLLM's MMLU excluded from training), pairs gpt-4o against cheaper
  models.

Unless ``--no-select``, each evaluation also picks one router by *training-only* validation
(``transforms.pair_select.select_router``: validation tasks carved from its training pool, one
per dataset family, the held-out benchmark never read) and reports it again as
``selected=<name>``: the number to quote, since picking the best held-out row would tune on test.

Prints the table and writes ``--out`` (Parquet, Markdown, HTML with the PGR-vs-call-share plot).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import polars as pl

from benchroute.transforms.pair_eval import (
    DEFAULT_ROUTERS,
    evaluate_pair,
    load_store_data,
    markdown_table,
    table_rows,
    training_pool,
    write_pair_report,
)
from benchroute.transforms.pair_select import candidate_routers, select_router

GPT4 = "openai/gpt-4-1106-preview"
MIXTRAL = "mistralai/mixtral-8x7b-instruct-v0.1"
GPT4O = "openai/gpt-4o-2024-05-13"
MMLU_PRO_CATEGORIES = ["biology", "business", "chemistry", "computer science", "economics", "engineering",
                       "health", "history", "law", "math", "other", "philosophy", "physics", "psychology"]
RAW = Path(__file__).resolve().parents[2] / "shared" / "data" / "raw"


def mmlu_pro_from_mmlu(store_url: str, data) -> np.ndarray:
    """(n,) bool: MMLU-Pro inputs whose question comes from MMLU (``src`` ori_mmlu)."""
    from benchroute.artifacts.store import Store

    q = pl.read_parquet(RAW / "mmlu_pro" / "questions.parquet", columns=["question_id", "src"])
    ori = set(q.filter(pl.col("src").str.starts_with("ori_mmlu"))["question_id"].cast(pl.String).to_list())
    mem = Store(store_url).read("memberships").filter(pl.col("dataset").str.starts_with("mmlu_pro/"))
    qid = mem["source_instance_id"].cast(pl.String).str.split("#").list.first()
    ids = set(mem.filter(qid.is_in(list(ori)))["input_id"].to_list())
    return np.array([i in ids for i in data.input_ids], bool)


def evaluations(data, store_url: str) -> list[dict]:
    from_mmlu = mmlu_pro_from_mmlu(store_url, data) if (RAW / "mmlu_pro").exists() else None
    half_a = [f"mmlu_pro/{c}" for c in MMLU_PRO_CATEGORIES[0::2]]
    half_b = [f"mmlu_pro/{c}" for c in MMLU_PRO_CATEGORIES[1::2]]
    routellm_mmlu = data.in_datasets(["mmlu/*"])
    evals = [
        {"name": "mmlu", "ref": "mmlu", "pairs": [(GPT4, MIXTRAL)], "heldout": ["mmlu/*"], "exclude": from_mmlu},
        {"name": "gsm8k", "ref": "gsm8k", "pairs": [(GPT4, MIXTRAL)], "heldout": ["gsm8k"], "exclude": None},
        {"name": "mt_bench", "ref": "mt_bench", "pairs": [(GPT4, MIXTRAL)], "heldout": ["mt_bench"], "exclude": None},
        # RouteLLM's protocol for MMLU: golden labels of other questions of the benchmark in training.
        {"name": "mmlu+10%", "ref": "mmlu", "pairs": [(GPT4, MIXTRAL)], "heldout": ["mmlu/*"], "exclude": from_mmlu,
         "augment": 0.1},
        {"name": "gsm8k+10%", "ref": "gsm8k", "pairs": [(GPT4, MIXTRAL)], "heldout": ["gsm8k"], "exclude": None,
         "augment": 0.1},
    ]
    cheap = ["mistralai/mixtral-8x7b-instruct-v0.1", "meta/llama-3.1-8b", "mistralai/mistral-7b-instruct-v0.2"]
    for tag, half in (("a", half_a), ("b", half_b)):
        evals.append({"name": f"mmlu_pro_{tag}", "ref": None, "pairs": [(GPT4O, c) for c in cheap],
                      "heldout": half, "exclude": routellm_mmlu})
    return evals


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--store", required=True)
    ap.add_argument("--out")
    ap.add_argument("--only", action="append", help="evaluation names (mmlu, gsm8k, mt_bench, mmlu+10%%, gsm8k+10%%, mmlu_pro_a, mmlu_pro_b)")
    ap.add_argument("--router", action="append", dest="routers", help=f"of {sorted(DEFAULT_ROUTERS)}")
    ap.add_argument("--n-boot", type=int, default=1000)
    ap.add_argument("--max-models", type=int, default=24)
    ap.add_argument("--dedup", type=float, default=0.95)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-select", action="store_true",
                    help="skip the training-only validation that picks the 'selected' router")
    args = ap.parse_args()

    t0 = time.perf_counter()
    data, X = load_store_data(args.store)
    print(f"loaded {len(data.input_ids)} inputs × {len(data.models)} models, {len(data.datasets)} datasets "
          f"in {time.perf_counter() - t0:.1f}s", flush=True)
    routers = {k: v for k, v in DEFAULT_ROUTERS.items() if not args.routers or k in args.routers}
    results, reference = [], {}
    for ev in evaluations(data, args.store):
        if args.only and ev["name"] not in args.only:
            continue
        for strong, weak in ev["pairs"]:
            if strong not in data.models or weak not in data.models:
                print(f"skip {ev['name']} {strong} / {weak}: not in the store", flush=True)
                continue
            name = ev["name"] if len(ev["pairs"]) == 1 else f"{ev['name']}:{weak.split('/')[-1]}"
            t1 = time.perf_counter()
            run_routers, chosen, val = dict(routers), None, None
            cands = candidate_routers(routers)
            if not args.no_select and len(cands) > 1:
                # Validation inside the training pool only: the held-out labels never pick.
                held = data.in_datasets(ev["heldout"])
                both = ~np.isnan(data.Q[:, data.model_index(strong)]) & ~np.isnan(data.Q[:, data.model_index(weak)])
                pool = training_pool(X, held, np.flatnonzero(held & both), ev["exclude"], ev.get("augment", 0.0),
                                     args.dedup, args.seed)[0]
                chosen, val = select_router(data, X, pool, strong, weak, cands, dedup=args.dedup,
                                            max_models=args.max_models, seed=args.seed,
                                            log=lambda m: print(m, flush=True))
                if chosen is not None:
                    run_routers[f"selected={chosen}"] = routers[chosen]
                    print(f"{name}: training-only validation selects {chosen}", flush=True)
            res = evaluate_pair(data, X, strong, weak, ev["heldout"], name=name, routers=run_routers,
                                exclude=ev["exclude"], augment=ev.get("augment", 0.0), dedup=args.dedup,
                                max_models=args.max_models,
                                n_boot=args.n_boot, seed=args.seed, log=lambda m: print(m, flush=True))
            print(f"{name}: {json.dumps({k: v for k, v in res.info.items() if k != 'models'}, default=str)} "
                  f"({time.perf_counter() - t1:.0f}s)", flush=True)
            if val is not None:
                res.info["selected"] = chosen
                res.info["validation"] = val.to_dicts()
            results.append(res)
            if ev["ref"]:
                reference[name] = ev["ref"]
    if not results:
        print("nothing evaluated")
        return 1
    print(markdown_table(table_rows(results, reference)))
    if args.out:
        paths = write_pair_report(args.out, results, reference,
                                  meta={"store": args.store, "n_boot": args.n_boot, "seed": args.seed,
                                        "max_models": args.max_models, "dedup": args.dedup})
        print("wrote", paths.get("pair_report.html"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
