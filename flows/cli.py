"""The ``benchroute`` command."""

from __future__ import annotations

import argparse
import json
import os
import sys

import polars as pl


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    parser = argparse.ArgumentParser(prog="benchroute", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("ingest", help="ingest benchmark dumps into a store (Prefect flow)")
    p.add_argument("sources", nargs="+", help="files or folders (fsspec URLs) holding run dumps")
    p.add_argument("--store", required=True, help="store root (local path, memory://, s3://…)")
    p.add_argument("--kind", action="append", dest="kinds", help="only these source kinds")
    p.add_argument("--aliases", help="CSV of model aliases (alias,model[,display_name,params_b])")
    p.add_argument("--rules", help="JSON of binarization rules")
    p.add_argument("--no-progress", action="store_true")

    p = sub.add_parser("inspect", help="summarise what a store holds")
    p.add_argument("--store", required=True)
    p.add_argument("--labels", action="store_true", help="also show label balance per model")
    p.add_argument("--quarantine", action="store_true", help="also show quarantine reasons")
    p.add_argument("--json", action="store_true", help="print JSON instead of tables")

    p = sub.add_parser("embed", help="embed every input that has no vector yet (Prefect flow)")
    p.add_argument("--store", required=True)
    p.add_argument("--embedder", default=None, help="embedder name (default all-MiniLM-L6-v2)")
    p.add_argument("--precision", choices=["auto", "bf16", "fp32"], default="auto")
    p.add_argument("--batch-size", type=int, default=64)

    p = sub.add_parser("evaluate", help="leave-one-dataset-out evaluation with a report (Prefect flow)")
    p.add_argument("--store", required=True)
    p.add_argument("--out", required=True, help="folder (fsspec URL) for the Parquet/Markdown/HTML report")
    p.add_argument("--embedder", default=None, help="embedder id or name (default: the one stored)")
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--weights", choices=["uniform", "distance"], default="uniform")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--source", action="append", dest="sources", help="only these sources")
    p.add_argument("--exclude-model", action="append", dest="exclude_models", default=None)

    args = parser.parse_args(argv)
    commands = {
        "ingest": _ingest,
        "inspect": _inspect,
        "embed": _embed,
        "evaluate": _evaluate,
    }
    return commands[args.command](args)


def _embed(args) -> int:
    from benchroute.flows.embed import embed_flow, format_summary
    from benchroute.transforms.weights import DEFAULT_EMBEDDER

    summary = embed_flow(
        store=args.store,
        embedder=args.embedder or DEFAULT_EMBEDDER,
        precision=args.precision,
        batch_size=args.batch_size,
    )
    print(format_summary(summary))
    return 0


def _evaluate(args) -> int:
    from benchroute.flows.evaluate import evaluate_flow

    result = evaluate_flow(
        store=args.store,
        out=args.out,
        embedder=args.embedder,
        k=args.k,
        weights=args.weights,
        seed=args.seed,
        sources=args.sources,
        exclude_models=args.exclude_models,
    )
    for group, s in result["groups"].items():
        print(
            f"{group}: {s.get('n_tasks')} held-out datasets, {s.get('n_models')} models; "
            f"predictor accuracy {s.get('predictor_accuracy', float('nan')):.3f}, "
            f"kernel MAE {s.get('kernel_mae', float('nan')):.3f}"
        )
    for group, why in result["skipped"].items():
        print(f"{group}: not evaluated ({why})")
    print(f"report: {result['paths']['markdown']} and {result['paths']['html']}")
    return 0


def _ingest(args) -> int:
    from benchroute.flows.ingest import ingest_flow

    summary = ingest_flow(
        sources=args.sources,
        store=args.store,
        kinds=args.kinds,
        aliases=args.aliases,
        rules=args.rules,
        progress=not args.no_progress,
    )
    print(
        f"ingest: {summary['units_found']} units found, {summary['units_skipped']} already in the "
        f"store, {len(summary['units_failed'])} unreadable, {summary['labels']} labels, "
        f"{summary['seconds']} s"
    )
    for key, why in summary["units_failed"].items():
        print(f"  unreadable: {key}: {why}", file=sys.stderr)
    _inspect(argparse.Namespace(store=args.store, labels=False, quarantine=False, json=False))
    return 0


def _inspect(args) -> int:
    from benchroute.artifacts.store import Store
    from benchroute.transforms import summary

    store = Store(args.store)
    tables = {t: store.read(t) for t in ("memberships", "outcomes", "labels", "quarantine")}
    out = {"per_source": summary.per_source(**tables)}
    if args.labels:
        out["label_balance"] = summary.label_balance(tables["labels"])
    if args.quarantine:
        out["quarantine_reasons"] = summary.quarantine_reasons(tables["quarantine"])
    if args.json:
        print(json.dumps({k: v.to_dicts() for k, v in out.items()}, indent=1))
        return 0
    with pl.Config(tbl_rows=200, tbl_cols=20, tbl_width_chars=200, fmt_str_lengths=80):
        print(f"store: {args.store}")
        for name, df in out.items():
            print(f"\n{name}:\n{df}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
