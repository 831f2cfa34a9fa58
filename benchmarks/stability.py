"""Stability tables of a store (issue 15): rankings with uncertainty, format sensitivity, RStd,
routing-choice stability.

    PREFECT_HOME=$(mktemp -d) HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/stability.py \
        --store /work/stores/full [--raw ../shared/data/raw] [--B 1000] [--router] \
        [--router-B 200] [--router-source mmlu_pro] [--md out.md] [--json out.json]

Reads the store only (``transforms.stability_summary.stability_summary``). Where the store does
not keep answer positions yet, ``--raw`` computes them from the raw sources for RStd: MMLU-Pro
``results.parquet`` (gold = the ``graded_answer`` letter of the version the model saw, predicted
= ``pred_rx``, the extraction behind the labels; no extracted letter = a miss) and HELM BBQ
``scenario_state.json`` (gold = the letter of ``output_mapping`` holding the reference tagged
``correct``, predicted = the completion's letter). ``--raw`` also adds two MMLU-Pro format
variants the store does not hold: the strict scoring rule (``correct_rx`` and the letter came
from an "answer is" / "Answer:" statement) and the ranking on the questions every model saw in
the same version. ``--router`` needs the store's embeddings (one embedder).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import polars as pl

LETTERS = "ABCDEFGHIJ"


def model_names(outcomes: pl.DataFrame, source: str) -> dict[str, str]:
    """The store's source model name -> canonical model name, for one source."""
    pairs = outcomes.filter(pl.col("source") == source).select("source_model", "model").unique()
    return dict(pairs.iter_rows())


def mmlu_pro_positions(raw: Path, names: dict[str, str]) -> pl.DataFrame:
    """(dataset, model, gold, pred) per MMLU-Pro result row."""
    r = pl.read_parquet(raw / "mmlu_pro" / "results.parquet",
                        columns=["question_id", "model", "pred_rx", "graded_answer"])
    q = pl.read_parquet(raw / "mmlu_pro" / "questions.parquet", columns=["question_id", "category"])
    letter = lambda c: pl.col(c).str.strip_chars().map_elements(  # noqa: E731
        lambda s: LETTERS.find(s) if s else -1, return_dtype=pl.Int64)
    return (r.join(q, on="question_id").filter(pl.col("model").is_in(list(names)))
            .select(pl.format("mmlu_pro/{}", "category").alias("dataset"),
                    pl.col("model").replace_strict(names).alias("model"),
                    letter("graded_answer").alias("gold"),
                    letter("pred_rx").fill_null(-1).alias("pred"))
            .filter(pl.col("gold") >= 0))


def helm_mc_positions(raw: Path, names: dict[str, str]) -> pl.DataFrame:
    """(dataset, model, gold, pred) for every HELM multiple-choice (joint) request state."""
    rows = []
    for state in sorted(raw.glob("helm_*/runs/*/*method=multiple_choice_joint*/scenario_state.json")):
        spec = json.loads((state.parent / "run_spec.json").read_text())
        model = names.get(spec["adapter_spec"]["model"])
        scenario = state.parent.name.split(":")[0]
        if model is None:
            continue
        for rs in json.loads(state.read_text())["request_states"]:
            mapping = rs.get("output_mapping") or {}
            letters = list(mapping)
            correct = [ref["output"]["text"] for ref in rs["instance"]["references"]
                       if "correct" in ref.get("tags", [])]
            gold = [i for i, k in enumerate(letters) if correct and mapping[k] == correct[0]]
            if not gold:
                continue
            comps = (rs.get("result") or {}).get("completions") or [{}]
            text = (comps[0].get("text") or "").strip()
            pred = letters.index(text) if text in letters else -1
            rows.append({"dataset": f"helm/{scenario}", "model": model, "gold": gold[0],
                         "pred": pred, "instance": rs["instance"]["id"],
                         "suite": state.parent.parent.name})
    return pl.DataFrame(rows)


def mmlu_pro_raw_variants(raw: Path, names: dict[str, str], min_coverage: float) -> pl.DataFrame:
    """Variants of the MMLU-Pro ranking the store does not hold (see the module docstring)."""
    from benchroute.transforms.stability import compare_variant, complete_case, kendall_tau_b

    r = pl.read_parquet(raw / "mmlu_pro" / "results.parquet",
                        columns=["question_id", "model", "correct_rx", "extract"])
    q = pl.read_parquet(raw / "mmlu_pro" / "questions.parquet", columns=["question_id", "n_variants"])
    r = r.filter(pl.col("model").is_in(list(names))).with_columns(
        model=pl.col("model").replace_strict(names),
        strict=pl.col("correct_rx") & pl.col("extract").is_in(["answer_is", "answer_colon"]))
    models = sorted(r["model"].unique().to_list())
    piv = lambda col: r.pivot(on="model", index="question_id", values=col).sort("question_id")  # noqa: E731
    a, s = piv("correct_rx"), piv("strict")
    Ya = a.select(models).cast(pl.Float64).to_numpy()
    Ys = s.select(models).cast(pl.Float64).to_numpy()
    out = []
    vc = compare_variant(Ya, Ys, models, "metric:strict (raw)", min_coverage=min_coverage)
    out.append({"scope": "mmlu_pro (raw)", **vc.summary()})
    # same-version questions vs all: the ranking on different item sets
    same = a.join(q, on="question_id")["n_variants"].to_numpy() == 1
    cc = complete_case(Ya, min_coverage)
    Yc = Ya[np.ix_(cc.rows, cc.models)]
    acc_all, acc_same = Yc.mean(0), Yc[same[cc.rows]].mean(0)
    moves = np.abs(np.argsort(np.argsort(-acc_all)) - np.argsort(np.argsort(-acc_same)))
    out.append({"scope": "mmlu_pro (raw)", "variant": "version: questions all models saw identically",
                "n_items": int(same[cc.rows].sum()), "n_models": int(cc.models.size),
                "tau": kendall_tau_b(acc_all, acc_same), "max_rank_move": int(moves.max()),
                "max_mover": models[cc.models[int(np.argmax(moves))]],
                "mean_abs_delta": float(np.abs(acc_same - acc_all).mean())})
    return pl.DataFrame(out)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--store", required=True)
    ap.add_argument("--raw", type=Path, help="raw data folder (for answer positions and MMLU-Pro variants)")
    ap.add_argument("--B", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--min-coverage", type=float, default=0.8)
    ap.add_argument("--router", action="store_true", help="routing-choice stability (needs embeddings)")
    ap.add_argument("--router-B", type=int, default=200)
    ap.add_argument("--router-source", action="append", help="only these source groups (repeatable)")
    ap.add_argument("--embedder", help="embedder id or name prefix (default: the only one stored)")
    ap.add_argument("--embeddings-npz", type=Path, action="append",
                    help="extra vectors (npz with X and ids, the store's embedder) for inputs the "
                         "store has not embedded yet; stored vectors win")
    ap.add_argument("--top", type=int, default=10)
    ap.add_argument("--md", type=Path)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)

    from benchroute.artifacts.store import Store
    from benchroute.transforms.stability_summary import stability_summary

    store = Store(args.store)
    t0 = time.perf_counter()
    positions, raw_variants = None, pl.DataFrame()
    if args.raw:
        outcomes = store.read("outcomes", columns=["source", "source_model", "model"])
        frames = [mmlu_pro_positions(args.raw, model_names(outcomes, "mmlu_pro")),
                  helm_mc_positions(args.raw, model_names(outcomes, "helm"))]
        positions = pl.concat([f.select("dataset", "model", "gold", "pred") for f in frames if f.height])
        raw_variants = mmlu_pro_raw_variants(args.raw, model_names(outcomes, "mmlu_pro"), args.min_coverage)
        del outcomes
    embeddings = None
    if args.router:
        from benchroute.artifacts import embeddings as emb
        ids = emb.embedders(store)
        pick = [i for i in ids if not args.embedder or i.startswith(args.embedder)]
        if len(pick) != 1:
            sys.exit(f"pick one embedder of {ids}")
        X, in_ids = emb.read_matrix(store, pick[0])
        X, in_ids = [np.asarray(X)], list(in_ids)
        seen = set(in_ids)
        for path in args.embeddings_npz or []:
            z = np.load(path)
            keep = [i for i, iid in enumerate(z["ids"].tolist()) if iid not in seen]
            X.append(z["X"][keep])
            in_ids += [z["ids"][i] for i in keep]
            seen.update(in_ids)
        embeddings = (np.vstack(X).astype(np.float32), [str(i) for i in in_ids])
    summary = stability_summary(store, B=args.B, seed=args.seed, min_coverage=args.min_coverage,
                                positions=positions, embeddings=embeddings, router_B=args.router_B,
                                router_sources=args.router_source)
    if raw_variants.height:
        summary.notes.append("MMLU-Pro raw variants (not in the store): " + "; ".join(
            f"{r['variant']}: τ {r['tau']:.3f}, max move {r['max_rank_move']} ({r['max_mover']}), "
            f"{r['n_items']} items" for r in raw_variants.iter_rows(named=True)))
    text = summary.markdown(top=args.top)
    text += f"\n\n({time.perf_counter() - t0:.0f} s; B = {args.B}, router B = {args.router_B})\n"
    print(text)
    if args.md:
        args.md.write_text(text)
    manifest = summary.manifest()
    if args.json:
        args.json.write_text(json.dumps({"manifest": manifest,
                                         "raw_variants": raw_variants.to_dicts()}, indent=1))
    return manifest


if __name__ == "__main__":
    main()
