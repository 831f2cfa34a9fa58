"""The ``benchroute`` command."""

from __future__ import annotations

import argparse
import json
import sys

import polars as pl

from benchroute.flows.params import INDEX_DTYPES, WEIGHTS, kind_option
from benchroute.flows.runtime import command_name
from benchroute.transforms.embed import PRECISIONS
from benchroute.transforms.predictors import PREDICTORS

PREDICTOR_NAMES = sorted(PREDICTORS)
# the commands that run Prefect flows (and so may start a temporary Prefect server)
PREFECT_COMMANDS = ("ingest", "embed", "evaluate", "publish", "refresh", "backfill", "deploy")


def main(argv: list[str] | None = None) -> int:
    from benchroute import settings

    settings.process_defaults()
    parser = argparse.ArgumentParser(prog="benchroute", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("ingest", help="ingest benchmark dumps into a store (Prefect flow)")
    p.add_argument("sources", nargs="+", help="files or folders (fsspec URLs) holding run dumps")
    p.add_argument("--store", required=True, help="store root (local path, memory://, s3://…)")
    kind_option(p, "only these source kinds (readers)", dest="kinds")
    p.add_argument("--aliases", help="CSV of model aliases (alias,model[,display_name,params_b])")
    p.add_argument("--rules", help="JSON of binarization rules")
    p.add_argument("--models", dest="model_cards",
                   help="model card (CSV or YAML: sizes, prices) over the shipped and landing-zone cards")
    p.add_argument("--no-progress", action="store_true")

    p = sub.add_parser("inspect", help="summarise what a store holds")
    p.add_argument("--store", required=True)
    p.add_argument("--labels", action="store_true", help="also show label balance per model")
    p.add_argument("--quarantine", action="store_true", help="also show quarantine reasons")
    p.add_argument("--stability", action="store_true",
                   help="also show how stable the rankings are: bootstrap rank intervals, format "
                        "variants, selection bias (RStd)")
    p.add_argument("--B", type=int, default=200, help="bootstrap resamples for --stability (default 200)")
    p.add_argument("--json", action="store_true", help="print JSON instead of tables")

    p = sub.add_parser("embed", help="embed every input that has no vector yet (Prefect flow)")
    p.add_argument("--store", required=True)
    p.add_argument("--embedder", default=None, help="embedder name (default all-MiniLM-L6-v2)")
    p.add_argument("--precision", choices=PRECISIONS, default="auto")
    p.add_argument("--batch-size", type=int, default=64)

    p = sub.add_parser("evaluate", help="leave-one-dataset-out evaluation with a report (Prefect flow)")
    p.add_argument("--store", required=True)
    p.add_argument("--out", required=True, help="folder (fsspec URL) for the Parquet/Markdown/HTML report")
    p.add_argument("--embedder", default=None, help="embedder id or name (default: the one stored)")
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--weights", choices=WEIGHTS, default="uniform")
    p.add_argument("--seed", type=int, default=0)
    kind_option(p, "only these source kinds' data")
    p.add_argument("--exclude-model", action="append", dest="exclude_models", default=None)
    p.add_argument("--predictor", action="append", dest="predictors", default=None, choices=PREDICTOR_NAMES,
                   help="predictors whose cost-aware routers are evaluated (default: knn and the default)")
    p.add_argument("--routing-split", action="append", dest="routing_splits", default=None,
                   choices=["random", "lodo"], help="held-out inputs for the routing evaluation (default both)")
    p.add_argument("--no-routing", action="store_true", help="skip the cost-aware routing evaluation")
    p.add_argument("--stability-B", type=int, default=None, dest="stability_B",
                   help="bootstrap resamples of the report's stability section (default 200; 0 = none)")

    p = sub.add_parser("publish", help="fit the router and publish a bundle version (Prefect flow)")
    p.add_argument("--store", required=True)
    p.add_argument("--name", default="default", help="bundle name (default: default)")
    kind_option(p, "only these source kinds' data")
    p.add_argument("--exclude-model", action="append", dest="exclude_models", default=None)
    p.add_argument("--embedder", default=None)
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--weights", choices=WEIGHTS, default="uniform")
    p.add_argument("--index-dtype", choices=INDEX_DTYPES, default="float16")
    p.add_argument("--index-search", choices=["auto", "exact", "hnsw"], default="auto",
                   help="nearest-neighbour search of the served router: exact scan, an HNSW graph "
                        "(recall reported in the manifest), or auto (HNSW above 50,000 index rows)")
    p.add_argument("--no-evaluate", action="store_true", help="skip the evaluation summary")
    p.add_argument("--models", dest="model_cards",
                   help="model card (CSV or YAML: sizes, prices) over the store's card files")
    p.add_argument("--predictor", default=None, choices=PREDICTOR_NAMES,
                   help="per-query correctness predictor (knn, knn_shrunk, mlp, factorized; default: the measured best)")
    p.add_argument("--pair", action="append", dest="pairs", default=None, metavar="STRONG,WEAK",
                   help="serve a strong/weak pair router for these two models (repeatable)")
    p.add_argument("--pair-models", action="append", dest="pair_models", default=None, metavar="MODEL",
                   help="serve every pair among these models (the one of higher accuracy is strong)")

    p = sub.add_parser("cards", help="model cards: sizes, open weights and prices")
    csub = p.add_subparsers(dest="action", required=True)
    q = csub.add_parser("build", help="price every model of a store (or the shipped list) from price lists")
    q.add_argument("--prices", required=True,
                   help="folder with api_prices.csv and open_weights_tiers.csv")
    q.add_argument("--store", default=None, help="the store whose models to price (default: "
                   "every model of the shipped facts and of api_prices.csv)")
    q.add_argument("--facts", default=None, help="CSV of model facts over the shipped model_facts.csv")
    q.add_argument("--out", default=None, help="CSV file to write (default: standard output)")

    p = sub.add_parser("bundles", help="the registry of bundle versions")
    bsub = p.add_subparsers(dest="action", required=True)
    for action, helptext in (
        ("list", "versions of a bundle"),
        ("show", "one version's manifest"),
        ("pin", "point a named ref at a version (kept by gc)"),
        ("rollback", "move latest back (or to --to)"),
        ("gc", "delete old versions, keeping refs"),
    ):
        q = bsub.add_parser(action, help=helptext)
        q.add_argument("--store", required=True)
        q.add_argument("--name", default="default")
        if action == "show":
            q.add_argument("--version", default="latest")
            q.add_argument("--stability", action="store_true",
                           help="only the stability summary and the models' stability fields")
        if action == "pin":
            q.add_argument("version")
            q.add_argument("ref")
        if action == "rollback":
            q.add_argument("--to", default=None)
        if action == "gc":
            q.add_argument("--keep", type=int, default=3)
            q.add_argument("--dry-run", action="store_true")

    p = sub.add_parser("route", help="pick a model for a query, or score tasks from a file")
    p.add_argument("--bundle", required=True, help="store URL, bundle folder or version folder")
    p.add_argument("--name", default=None, help="bundle name when --bundle is a store URL")
    p.add_argument("--version", default="latest")
    p.add_argument("--file", help="JSONL of tasks: {\"id\": …, \"texts\": [...]} per line")
    p.add_argument("--model", action="append", dest="models", help="allowed models")
    p.add_argument("--max-params-b", type=float)
    p.add_argument("--max-cost", type=float, help="at most this expected USD per request")
    point = p.add_mutually_exclusive_group()
    point.add_argument("--lambda", type=float, dest="lam",
                       help="utility rule: argmax g - lambda * cost / reference cost")
    point.add_argument("--delta", type=float, help="cheapest model within delta of the best g")
    point.add_argument("--max-cost-share", type=float,
                       help="best measured quality at most this share of the reference model's cost")
    point.add_argument("--max-quality-loss", type=float,
                       help="cheapest measured point within this loss of the best single model")
    p.add_argument("--input-tokens", type=float, help="prompt tokens (default: from the text)")
    pair_options(p)
    share = p.add_mutually_exclusive_group()
    share.add_argument("--strong-share", type=float,
                       help="with --strong/--weak: the share of queries the strong model should get")
    share.add_argument("--threshold", type=float, help="with --strong/--weak: the threshold α itself")
    p.add_argument("text", nargs="?", help="the query")

    p = sub.add_parser("pairs-report", help="strong/weak pair routers judged on benchmarks they never saw: "
                                            "PGR, APGR, CPT with bootstrap intervals, HTML with the plot")
    p.add_argument("--store", required=True, help="a store with labels and vectors")
    p.add_argument("--out", required=True, help="folder (fsspec URL) for Parquet, Markdown and HTML")
    p.add_argument("--pair", action="append", dest="pairs", required=True, metavar="STRONG,WEAK")
    p.add_argument("--heldout", action="append", required=True, metavar="DATASETS",
                   help="one evaluation per option: comma-separated dataset names or globs held out "
                        "of training and judged (e.g. 'mmlu/*' or 'gsm8k')")
    p.add_argument("--router", action="append", dest="routers", default=None, help="only these routers")
    p.add_argument("--embedder", default=None)
    p.add_argument("--n-boot", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)

    p = sub.add_parser("calibrate", help="a pair router's thresholds recomputed on your own queries")
    p.add_argument("--bundle", required=True, help="store URL, bundle folder or version folder")
    p.add_argument("--name", default=None, help="bundle name when --bundle is a store URL")
    p.add_argument("--version", default="latest")
    p.add_argument("--queries", required=True,
                   help="JSONL (fsspec URL): one query per line, a JSON string or {\"text\": …}")
    pair_options(p, required=True)
    p.add_argument("--share", action="append", type=float, dest="shares", default=None,
                   help="target strong share (repeatable; default: the bundle's)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")

    p = sub.add_parser("serve", help="HTTP service: /v1/route, /v1/score-task, /v1/calibrate, /v1/bundle, /healthz")
    p.add_argument("--bundle", required=True, help="store URL")
    p.add_argument("--name", default="default")
    p.add_argument("--version", default="latest", help="'latest' follows new versions")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--poll-seconds", type=float, default=5.0)

    # The orchestration commands keep their own options (their modules' parsers); these entries
    # only list them in --help, main() hands their arguments over before parsing.
    for name, helptext in (
        ("refresh", "ingest what is new in a landing zone, embed, refit, publish if changed (Prefect flow)"),
        ("backfill", "rebuild the store or a selection of it and publish; --dry-run reports (Prefect flow)"),
        ("deploy", "start a local Prefect server and serve the scheduled refresh and the backfill"),
    ):
        p = sub.add_parser(name, help=helptext, add_help=False)
        p.add_argument("rest", nargs=argparse.REMAINDER)

    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in PREFECT_COMMANDS:
        from benchroute.flows.prefect_server import guard

        guard()  # a kill -9 of this command stops its temporary Prefect server too
    if argv and argv[0] in ("refresh", "backfill", "deploy"):
        import importlib

        return importlib.import_module(f"benchroute.flows.{argv[0]}").main(argv[1:])
    args = parser.parse_args(argv)
    commands = {
        "ingest": _ingest,
        "inspect": _inspect,
        "embed": _embed,
        "evaluate": _evaluate,
        "publish": _publish,
        "bundles": _bundles,
        "cards": _cards,
        "route": _route,
        "calibrate": _calibrate,
        "pairs-report": _pairs_report,
        "serve": _serve,
    }
    return commands[args.command](args)


def pair_options(p, required: bool = False) -> None:
    p.add_argument("--strong", required=required, help="a strong/weak decision: the strong (costly) model")
    p.add_argument("--weak", required=required, help="the weak (cheap) model")
    p.add_argument("--pair-router", default=None, help="which pair router (default: the bundle's)")


def _publish(args) -> int:
    from benchroute.flows.publish import publish_flow

    r = publish_flow(
        store=args.store,
        name=args.name,
        sources=args.sources,
        exclude_models=args.exclude_models,
        embedder=args.embedder,
        k=args.k,
        weights=args.weights,
        index_dtype=args.index_dtype,
        evaluate=not args.no_evaluate,
        model_cards=args.model_cards,
        pairs=args.pairs,
        pair_models=args.pair_models,
        index_search=args.index_search,
        **({"predictor": args.predictor} if args.predictor else {}),
    )
    for v in r.get("recovered", []):
        print(f"finished an interrupted publish: latest moved to {r['name']} {v}")
    if r["created"]:
        state = "published"
    elif r["version"] in r.get("recovered", []):
        state = "unchanged since the interrupted publish, now latest"
    elif r.get("latest") not in (None, r["version"]):
        state = f"unchanged (latest stays at {r['latest']}); this content is"
    else:
        state = "unchanged, latest stays"
    print(f"{state}: {r['name']} {r['version']} ({r['files']} files, {r['bytes']:,} bytes)")
    print(f"bundle: {r['url']}")
    print(f'try:    {command_name()} route --bundle {args.store} --name {r["name"]} "your question"')
    return 0


def _cards(args) -> int:
    import fsspec

    from benchroute.artifacts.model_cards import build_store_cards
    from benchroute.transforms.model_cards import rule_counts

    cards = build_store_cards(args.prices, args.store, args.facts)
    if args.out:
        with fsspec.open(args.out, "w", encoding="utf-8") as f:
            f.write(cards.write_csv())
    else:
        sys.stdout.write(cards.write_csv())
    counts = rule_counts(cards.with_columns(pl.col("price_rule").str.extract(r"^([a-z_]+)")))
    print(f"{cards.height} model cards{' -> ' + args.out if args.out else ''}: "
          + ", ".join(f"{n} {rule}" for rule, n in counts.items()), file=sys.stderr)
    return 0


def _bundles(args) -> int:
    from benchroute.artifacts import registry

    if args.action == "list":
        rows = registry.list_versions(args.store, args.name)
        with pl.Config(tbl_rows=200, fmt_str_lengths=60, tbl_width_chars=200):
            print(pl.DataFrame(rows) if rows else f"no versions of {args.name!r}")
    elif args.action == "show":
        manifest = registry.show(args.store, args.name, args.version)
        if args.stability:
            fields = ("rank", "rank_lo", "rank_hi", "p_best", "stability_scope", "rstd", "rstd_scope",
                      "task_choice_n", "task_choice_keep", "query_n", "query_keep_rate")
            manifest = {
                "stability": manifest.get("stability"),
                "models": [{"model": m["model"], **{k: m.get(k) for k in fields}}
                           for m in manifest.get("models", [])],
            }
        print(json.dumps(manifest, indent=1))
    elif args.action == "pin":
        print(registry.pin(args.store, args.name, args.version, args.ref))
    elif args.action == "rollback":
        print(f"latest -> {registry.rollback(args.store, args.name, args.to)}")
    else:
        removed = registry.gc(args.store, args.name, keep=args.keep, dry_run=args.dry_run)
        verb = "would remove" if args.dry_run else "removed"
        print(f"{verb} {len(removed)} version(s)" + "".join(f"\n  {v}" for v in removed))
    return 0


def _route(args) -> int:
    from benchroute.artifacts.bundle import BundleError
    from benchroute.artifacts.router import RouteError, load_router

    try:
        router = load_router(args.bundle, args.name, args.version)
    except BundleError as exc:  # a bad ref, a tampered or missing bundle: a message, not a traceback
        print(f"benchroute route: {exc}", file=sys.stderr)
        return 2
    filters = {"models": args.models, "max_params_b": args.max_params_b, "max_cost": args.max_cost,
               "lam": args.lam, "delta": args.delta, "max_cost_share": args.max_cost_share,
               "max_quality_loss": args.max_quality_loss, "input_tokens": args.input_tokens}
    pair = {"strong": args.strong, "weak": args.weak, "strong_share": args.strong_share,
            "threshold": args.threshold, "pair_router": args.pair_router}
    if any(v is not None for v in pair.values()):
        if args.file or not args.text:
            print("a strong/weak decision takes one query text (not --file)", file=sys.stderr)
            return 2
        filters = {k: v for k, v in filters.items() if v is not None}
        filters.update(pair)
    if args.file:
        import fsspec

        with fsspec.open(args.file, "rt", encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                task = json.loads(line)
                try:
                    rows = router.score_task(task["texts"], **filters)
                except RouteError as exc:
                    print(f"task {task.get('id', n)}: {exc}", file=sys.stderr)
                    return 2
                print(json.dumps({"id": task.get("id", n), "choice": rows[0]["model"], "scores": rows}))
        return 0
    if not args.text:
        print("give a query text or --file tasks.jsonl", file=sys.stderr)
        return 2
    try:
        print(json.dumps(router.route(args.text, **filters), indent=1))
    except RouteError as exc:
        print(f"benchroute route: {exc}", file=sys.stderr)
        return 2
    return 0


def _pairs_report(args) -> int:
    import re

    from benchroute.artifacts.router_build import pair_list
    from benchroute.transforms.pair_eval import DEFAULT_ROUTERS, evaluate_pair, load_store_data, write_pair_report
    from benchroute.transforms.pair_labels import PairError

    routers = None
    if args.routers:
        unknown = sorted(set(args.routers) - set(DEFAULT_ROUTERS))
        if unknown:
            print(f"unknown routers {unknown}; choose from {sorted(DEFAULT_ROUTERS)}", file=sys.stderr)
            return 2
        routers = {r: DEFAULT_ROUTERS[r] for r in args.routers}
    try:
        pairs = pair_list([], args.pairs)
        data, X = load_store_data(args.store, args.embedder)
        results, reference = [], {}
        for held in args.heldout:
            patterns = [x.strip() for x in held.split(",") if x.strip()]
            for strong, weak in pairs:
                name = re.sub(r"[^A-Za-z0-9_.+-]+", "-", f"{patterns[0].split('/')[0]}-{strong.split('/')[-1]}"
                                                          f"-vs-{weak.split('/')[-1]}")
                res = evaluate_pair(data, X, strong, weak, patterns, name=name, routers=routers,
                                    n_boot=args.n_boot, seed=args.seed)
                results.append(res)
                ref = patterns[0].split("/")[0]
                if ref in ("mmlu", "gsm8k", "mt_bench"):  # RouteLLM's published benchmarks
                    reference[name] = ref
    except (PairError, ValueError) as exc:
        print(f"benchroute pairs-report: {exc}", file=sys.stderr)
        return 2
    paths = write_pair_report(args.out, results, reference=reference,
                              meta={"store": args.store, "pairs": [list(p) for p in pairs], "heldout": args.heldout})
    for r in results:
        print(f"\n{r.name}")
        print(r.summary.select([c for c in ("router", "apgr", "apgr_lo", "apgr_hi", "cpt50", "cpt80")
                                if c in r.summary.columns]))
    print("\nreport: " + ", ".join(str(v) for v in paths.values()))
    return 0


def _calibrate(args) -> int:
    import fsspec

    from benchroute.artifacts.bundle import BundleError
    from benchroute.artifacts.router import RouteError, load_router

    queries = []
    with fsspec.open(args.queries, "rt", encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                q = json.loads(line)
            except json.JSONDecodeError as exc:
                print(f"{args.queries} line {n}: not JSON ({exc})", file=sys.stderr)
                return 2
            q = q.get("text") if isinstance(q, dict) else q
            if not isinstance(q, str) or not q.strip():
                print(f"{args.queries} line {n}: expected a string or {{\"text\": string}}", file=sys.stderr)
                return 2
            queries.append(q)
    if not queries:
        print(f"{args.queries}: no queries", file=sys.stderr)
        return 2
    try:
        router = load_router(args.bundle, args.name, args.version)
        rows = router.calibrate_pair(queries, strong=args.strong, weak=args.weak, shares=args.shares,
                                     router=args.pair_router)
    except (BundleError, RouteError) as exc:
        print(f"benchroute calibrate: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(rows))
        return 0
    print(f"{len(queries)} queries; {args.strong} (strong) / {args.weak} (weak)")
    print(f"{'target':>7} {'your alpha':>11} {'share':>6} {'stored alpha':>13} {'stored share':>13}")
    for r in rows:
        stored = "" if r["stored_alpha"] is None else f"{r['stored_alpha']:13.5f} {r['stored_share']:13.3f}"
        print(f"{r['target_share']:7.2f} {r['alpha']:11.5f} {r['share']:6.3f} {stored}")
    return 0


def _serve(args) -> int:
    import uvicorn

    from benchroute.artifacts.service import create_app

    app = create_app(args.bundle, args.name, args.version, poll_seconds=args.poll_seconds)
    uvicorn.run(app, host=args.host, port=args.port, log_level="info")
    return 0


def _embed(args) -> int:
    from benchroute.flows.embed import embed_flow, format_summary
    from benchroute.transforms.embedder_packages import DEFAULT_EMBEDDER

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
        predictors=args.predictors,
        routing_splits=[] if args.no_routing else args.routing_splits,
        **({"stability_B": args.stability_B} if args.stability_B is not None else {}),
    )
    for group, s in result["groups"].items():
        print(
            f"{group}: {s.get('n_tasks')} held-out datasets, {s.get('n_models')} models; "
            f"predictor accuracy {s.get('predictor_accuracy', float('nan')):.3f}, "
            f"kernel MAE {s.get('kernel_mae', float('nan')):.3f}"
        )
    for group, why in result["skipped"].items():
        print(f"{group}: not evaluated ({why})")
    for group, by_split in result.get("routing", {}).items():
        for split, rows in by_split.items():
            for r in rows:
                print(
                    f"{group}/{split} routing with {r['predictor']}: quality {r.get('quality_lambda0', float('nan')):.3f} "
                    f"at λ=0 (best model {r.get('best_model')} {r.get('best_quality', float('nan')):.3f}); "
                    f"AIQ {r.get('aiq', float('nan')):.3f} vs single models {r.get('aiq_singles', float('nan')):.3f}"
                )
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
        model_cards=args.model_cards,
    )
    print(
        f"ingest: {summary['units_found']} units found, {summary['units_skipped']} already in the "
        f"store, {len(summary['units_failed'])} unreadable, {summary['labels']} labels, "
        f"{summary['seconds']} s"
    )
    if summary.get("relabelled") and summary["units_skipped"] == summary["units_found"]:
        print(f"  relabelled although no unit was new: {summary['relabelled']}")
    for key, why in summary["units_failed"].items():
        print(f"  unreadable: {key}: {why}", file=sys.stderr)
    for path, why in summary.get("not_benchmark", {}).items():
        print(f"  not a benchmark layout: {path}: {why}", file=sys.stderr)
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
    stability = None
    if getattr(args, "stability", False):
        from benchroute.transforms.stability_summary import stability_summary

        stability = stability_summary(store, B=args.B)
    if args.json:
        data = {k: v.to_dicts() for k, v in out.items()}
        if stability is not None:
            data["stability"] = stability.manifest()
        print(json.dumps(data, indent=1))
        return 0
    with pl.Config(tbl_rows=200, tbl_cols=20, tbl_width_chars=200, fmt_str_lengths=80):
        print(f"store: {args.store}")
        for name, df in out.items():
            print(f"\n{name}:\n{df}")
    if stability is not None:
        print(f"\nstability (B = {args.B}):\n\n{stability.markdown()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
