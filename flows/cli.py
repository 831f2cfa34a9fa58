"""The ``benchroute`` command.

One typer app; the options that choose a run's specs (``--k``, ``--weights``, ``--predictor``,
``--embedder``, ``--precision``, ``--kind``…) are generated from the fields of
``artifacts.specs`` (``flows.spec_options``), so a new field is a new option of every command
that takes the spec. ``main(argv)`` returns the exit code: 2 and a message on stderr for a
usage error.
"""

from __future__ import annotations

import functools
import json
import sys
from typing import Annotated, Optional

import polars as pl
import typer
from benchroute.artifacts.specs import PREDICTOR_NAMES, EmbedSpec, RouterSpec, Selection
from benchroute.flows.deploy import DEFAULT_CRON
from benchroute.flows.runtime import command_name
from benchroute.flows.spec_options import check_choices, spec_options, with_specs

# the commands that run Prefect flows (and so may start a temporary Prefect server)
PREFECT_COMMANDS = ("ingest", "embed", "evaluate", "publish", "refresh", "backfill", "deploy")
HELP = {"help_option_names": ["-h", "--help"]}

app = typer.Typer(name="benchroute", help=__doc__.splitlines()[0], add_completion=False,
                  rich_markup_mode=None, context_settings=HELP, no_args_is_help=True)
cards_app = typer.Typer(help="model cards: sizes, open weights and prices", rich_markup_mode=None,
                        no_args_is_help=True)
bundles_app = typer.Typer(help="the registry of bundle versions", rich_markup_mode=None,
                          no_args_is_help=True)
app.add_typer(cards_app, name="cards")
app.add_typer(bundles_app, name="bundles")


def _opt(*decls: str, **kw) -> typer.models.OptionInfo:
    """``typer.Option`` with argparse's metavar (``--max-cost`` → ``MAX_COST``) unless given."""
    kw.setdefault("metavar", decls[0].lstrip("-").upper().replace("-", "_"))
    return typer.Option(*decls, **kw)


def _arg(name: str, helptext: str) -> typer.models.ArgumentInfo:
    return typer.Argument(help=helptext, metavar=name, show_default=False)


Store = Annotated[str, _opt("--store", help="store root (local path, memory://, s3://…)")]
BundleUrl = Annotated[str, _opt("--bundle", help="store URL, bundle folder or version folder")]
BundleName = Annotated[str, _opt("--name", help="bundle name")]
MaybeName = Annotated[Optional[str], _opt("--name", help="bundle name when --bundle is a store URL")]
Version = Annotated[str, _opt("--version")]
Aliases = Annotated[Optional[str], _opt("--aliases", help="CSV of model aliases (alias,model[,display_name,params_b])")]
Rules = Annotated[Optional[str], _opt("--rules", help="JSON of binarization rules")]
Cards = Annotated[Optional[str], _opt("--models", metavar="CARD", help="model card (CSV or YAML: sizes, prices) over the shipped "
                                                         "and landing-zone cards")]
DaskWorkers = Annotated[int, _opt("--dask-workers", help="run partitions on a local Dask cluster of this many workers")]
DaskAddress = Annotated[Optional[str], _opt("--dask-address", help="or on the Dask scheduler at this address")]
Flag = lambda name, helptext=None: Annotated[bool, typer.Option(name, help=helptext)]  # noqa: E731

KINDS_HELP = "only these source kinds (readers)"
DATA_KINDS_HELP = "only these source kinds' data"


def _usage(ctx: typer.Context, message: str, option: str | None = None):
    return typer.BadParameter(message, ctx=ctx, param_hint=f"'{option}'" if option else None)


def _exclusive(ctx: typer.Context, **given) -> None:
    """argparse's mutually exclusive group: at most one of ``given`` (option → value) is set."""
    set_ = [k for k, v in given.items() if v is not None]
    if len(set_) > 1:
        raise _usage(ctx, f"not allowed with '{set_[0]}'", set_[1])


def _kinds(selection: Selection) -> list[str] | None:
    return list(selection.sources) if selection.sources else None


def _names(v) -> list[str] | None:
    return list(v) if v else None


# ------------------------------------------------------------------------------------ ingest
@app.command("ingest", help="ingest benchmark dumps into a store (Prefect flow)")
@with_specs(selection=spec_options(Selection, only=["sources"], help={"sources": KINDS_HELP}))
def ingest(
    sources: Annotated[list[str], _arg("SOURCES", "files or folders (fsspec URLs) holding run dumps")],
    store: Store,
    selection: Selection = Selection(),
    aliases: Aliases = None,
    rules: Rules = None,
    model_cards: Cards = None,
    no_progress: Flag("--no-progress") = False,
) -> int:
    from benchroute.flows.ingest import ingest_flow

    summary = ingest_flow(sources=sources, store=store, kinds=_kinds(selection), aliases=aliases,
                          rules=rules, progress=not no_progress, model_cards=model_cards)
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
    print_ingested(store, summary)
    return 0


def print_ingested(store: str, summary: dict) -> None:
    """What the run added per source, and the store's row counts from its parts' footers (no
    table is read: ``benchroute inspect`` counts models, metrics and label means)."""
    from benchroute.artifacts.store import Store as StoreReader

    added = {src: n for src, n in summary.get("added", {}).items() if src != "_total"}
    if added:
        cols = sorted({k for n in added.values() for k in n if k != "units"})
        rows = [{"source": src, "units": n.get("units", 0), **{c: n.get(c, 0) for c in cols}}
                for src, n in sorted(added.items())]
        with pl.Config(tbl_rows=200, tbl_cols=20, tbl_width_chars=200):
            print(f"\nadded by this run:\n{pl.DataFrame(rows)}")
    s = StoreReader(store)
    commits = s.commits()  # the log read once, not once per table
    totals = {t: sum(s.part_rows(p) for p in s.parts(t, commits))
              for t in ("inputs", "models", "outcomes", "labels", "quarantine")}
    print("\nstore: " + ", ".join(f"{n:,} {t}" for t, n in totals.items())
          + f"  (details: benchroute inspect --store {store})")


# ----------------------------------------------------------------------------------- inspect
@app.command("inspect", help="summarise what a store holds")
def inspect_store(
    store: Store,
    labels: Flag("--labels", "also show label balance per model") = False,
    quarantine: Flag("--quarantine", "also show quarantine reasons") = False,
    stability: Flag("--stability", "also show how stable the rankings are: bootstrap rank intervals, "
                                   "format variants, selection bias (RStd)") = False,
    B: Annotated[int, _opt("--B", help="bootstrap resamples for --stability")] = 200,
    as_json: Flag("--json", "print JSON instead of tables") = False,
) -> int:
    from benchroute.artifacts.store import Store as StoreReader
    from benchroute.transforms import summary

    s = StoreReader(store)
    tables = {t: s.read(t) for t in ("memberships", "quarantine")}
    # Outcomes and labels are counted a batch at a time (a leaderboard's do not fit in memory).
    tables["outcomes"] = summary.outcome_counts(
        s.batches("outcomes", ["source", "dataset", "model", "metric"]))
    tables["labels"] = summary.label_counts(s.batches("labels", ["dataset", "model", "y"]))
    out = {"per_source": summary.per_source(**tables)}
    if labels:
        out["label_balance"] = summary.label_balance(tables["labels"])
    if quarantine:
        out["quarantine_reasons"] = summary.quarantine_reasons(tables["quarantine"])
    stab = None
    if stability:
        from benchroute.transforms.stability_summary import stability_summary

        stab = stability_summary(s, B=B)
    if as_json:
        data = {k: v.to_dicts() for k, v in out.items()}
        if stab is not None:
            data["stability"] = stab.manifest()
        print(json.dumps(data, indent=1))
        return 0
    with pl.Config(tbl_rows=200, tbl_cols=20, tbl_width_chars=200, fmt_str_lengths=80):
        print(f"store: {store}")
        for name, df in out.items():
            print(f"\n{name}:\n{df}")
    if stab is not None:
        print(f"\nstability (B = {B}):\n\n{stab.markdown()}")
    return 0


# ------------------------------------------------------------------------------------- embed
@app.command("embed", help="embed every input that has no vector yet (Prefect flow)")
@with_specs(embed=EmbedSpec)
def embed(store: Store, embed: EmbedSpec = EmbedSpec()) -> int:
    from benchroute.flows.embed import embed_flow, format_summary

    print(format_summary(embed_flow(store=store, embed=embed)))
    return 0


# ---------------------------------------------------------------------------------- evaluate
@app.command("evaluate", help="leave-one-dataset-out evaluation with a report (Prefect flow)")
@with_specs(
    router=spec_options(RouterSpec, only=["k", "weights", "stability_B"], help={
        "stability_B": "bootstrap resamples of the report's stability section (0 = none)"}),
    selection=spec_options(Selection, only=["sources", "exclude_models"], help={"sources": DATA_KINDS_HELP}),
)
def evaluate(
    store: Store,
    out: Annotated[str, _opt("--out", help="folder (fsspec URL) for the Parquet/Markdown/HTML report")],
    embedder: Annotated[Optional[str], _opt("--embedder", help="embedder id or name (default: the one stored)")] = None,
    router: RouterSpec = RouterSpec(),
    seed: Annotated[int, _opt("--seed")] = 0,
    selection: Selection = Selection(),
    predictors: Annotated[Optional[list[str]], _opt(
        "--predictor", metavar="[" + "|".join(PREDICTOR_NAMES) + "]", callback=check_choices(PREDICTOR_NAMES),
        help="predictors whose cost-aware routers are evaluated (default: knn and the default)")] = None,
    routing_splits: Annotated[Optional[list[str]], _opt(
        "--routing-split", metavar="[random|lodo]", callback=check_choices(("random", "lodo")),
        help="held-out inputs for the routing evaluation (default both)")] = None,
    no_routing: Flag("--no-routing", "skip the cost-aware routing evaluation") = False,
) -> int:
    from benchroute.flows.evaluate import evaluate_flow

    result = evaluate_flow(
        store=store, out=out, embedder=embedder, k=router.k, weights=router.weights, seed=seed,
        sources=_names(selection.sources), exclude_models=_names(selection.exclude_models),
        predictors=predictors or None, routing_splits=[] if no_routing else (routing_splits or None),
        stability_B=router.stability_B,
    )
    for group, s in result["groups"].items():
        print(
            f"{group}: {s.get('n_tasks')} held-out datasets, {s.get('n_models')} models; "
            f"predictor accuracy {s.get('predictor_accuracy', float('nan')):.3f}, "
            f"kernel MAE {s.get('kernel_mae', float('nan')):.3f}"
        )
    for group, why in result["skipped"].items():
        print(f"{group}: not evaluated ({why})")
    if result.get("stability", "").startswith("not computed"):
        print(f"stability: {result['stability']}")
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


# ----------------------------------------------------------------------------------- publish
@app.command("publish", help="fit the router and publish a bundle version (Prefect flow)")
@with_specs(selection=spec_options(Selection, help={"sources": DATA_KINDS_HELP}), router=RouterSpec)
def publish(
    store: Store,
    name: BundleName = "default",
    selection: Selection = Selection(),
    embedder: Annotated[Optional[str], _opt("--embedder", help="embedder id or name (default: the one stored)")] = None,
    router: RouterSpec = RouterSpec(),
    no_evaluate: Flag("--no-evaluate", "skip the evaluation summary") = False,
    model_cards: Annotated[Optional[str], _opt(
        "--models", metavar="CARD", help="model card (CSV or YAML: sizes, prices) over the store's card files")] = None,
    incremental: Flag("--incremental", "extend the latest version by the models added since it, "
                      "without a refit, where possible (with --no-evaluate); else a full build") = False,
) -> int:
    from benchroute.flows.publish import publish_flow

    r = publish_flow(store=store, name=name, selection=selection, embedder=embedder, router=router,
                     evaluate=not no_evaluate, model_cards=model_cards, incremental=incremental)
    if r.get("extended"):
        print(f"extended {r['name']} {r['extended']} by the models added since it (no refit)")
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
    print(f'try:    {command_name()} route --bundle {store} --name {r["name"]} "your question"')
    return 0


# ------------------------------------------------------------------------------------- cards
@cards_app.command("build", help="price every model of a store (or the shipped list) from price lists")
def cards_build(
    prices: Annotated[str, _opt("--prices", help="folder with api_prices.csv and open_weights_tiers.csv")],
    store: Annotated[Optional[str], _opt("--store", help="the store whose models to price (default: every "
                                                         "model of the shipped facts and of api_prices.csv)")] = None,
    facts: Annotated[Optional[str], _opt("--facts", help="CSV of model facts over the shipped model_facts.csv")] = None,
    out: Annotated[Optional[str], _opt("--out", help="CSV file to write (default: standard output)")] = None,
) -> int:
    import fsspec
    from benchroute.artifacts.model_cards import build_store_cards
    from benchroute.transforms.model_cards import rule_counts

    cards = build_store_cards(prices, store, facts)
    if out:
        with fsspec.open(out, "w", encoding="utf-8") as f:
            f.write(cards.write_csv())
    else:
        sys.stdout.write(cards.write_csv())
    counts = rule_counts(cards.with_columns(pl.col("price_rule").str.extract(r"^([a-z_]+)")))
    print(f"{cards.height} model cards{' -> ' + out if out else ''}: "
          + ", ".join(f"{n} {rule}" for rule, n in counts.items()), file=sys.stderr)
    return 0


# ----------------------------------------------------------------------------------- bundles
@bundles_app.command("list", help="versions of a bundle")
def bundles_list(store: Store, name: BundleName = "default") -> int:
    from benchroute.artifacts import registry

    rows = registry.list_versions(store, name)
    with pl.Config(tbl_rows=200, fmt_str_lengths=60, tbl_width_chars=200):
        print(pl.DataFrame(rows) if rows else f"no versions of {name!r}")
    return 0


@bundles_app.command("show", help="one version's manifest")
def bundles_show(
    store: Store,
    name: BundleName = "default",
    version: Version = "latest",
    stability: Flag("--stability", "only the stability summary and the models' stability fields") = False,
) -> int:
    from benchroute.artifacts import registry

    manifest = registry.show(store, name, version)
    if stability:
        fields = ("rank", "rank_lo", "rank_hi", "p_best", "stability_scope", "rstd", "rstd_scope",
                  "task_choice_n", "task_choice_keep", "query_n", "query_keep_rate")
        manifest = {
            "stability": manifest.get("stability"),
            "models": [{"model": m["model"], **{k: m.get(k) for k in fields}}
                       for m in manifest.get("models", [])],
        }
    print(json.dumps(manifest, indent=1))
    return 0


@bundles_app.command("pin", help="point a named ref at a version (kept by gc)")
def bundles_pin(
    version: Annotated[str, _arg("VERSION", "the version")],
    ref: Annotated[str, _arg("REF", "the ref name (prod, …)")],
    store: Store,
    name: BundleName = "default",
) -> int:
    from benchroute.artifacts import registry

    print(registry.pin(store, name, version, ref))
    return 0


@bundles_app.command("rollback", help="move latest back (or to --to)")
def bundles_rollback(store: Store, name: BundleName = "default",
                     to: Annotated[Optional[str], _opt("--to")] = None) -> int:
    from benchroute.artifacts import registry

    print(f"latest -> {registry.rollback(store, name, to)}")
    return 0


@bundles_app.command("gc", help="delete old versions, keeping refs")
def bundles_gc(store: Store, name: BundleName = "default", keep: Annotated[int, _opt("--keep")] = 3,
               dry_run: Flag("--dry-run") = False) -> int:
    from benchroute.artifacts import registry

    removed = registry.gc(store, name, keep=keep, dry_run=dry_run)
    verb = "would remove" if dry_run else "removed"
    print(f"{verb} {len(removed)} version(s)" + "".join(f"\n  {v}" for v in removed))
    return 0


# ------------------------------------------------------------------------------------- route
Strong = Annotated[Optional[str], _opt("--strong", help="a strong/weak decision: the strong (costly) model")]
Weak = Annotated[Optional[str], _opt("--weak", help="the weak (cheap) model")]
PairRouter = Annotated[Optional[str], _opt("--pair-router", help="which pair router (default: the bundle's)")]
Num = lambda name, helptext=None: Annotated[Optional[float], _opt(name, help=helptext)]  # noqa: E731


@app.command("route", help="pick a model for a query, or score tasks from a file")
def route(
    ctx: typer.Context,
    bundle: BundleUrl,
    text: Annotated[Optional[str], _arg("TEXT", "the query")] = None,
    name: MaybeName = None,
    version: Version = "latest",
    file: Annotated[Optional[str], _opt("--file", help='JSONL of tasks: {"id": …, "texts": [...]} per line')] = None,
    models: Annotated[Optional[list[str]], _opt("--model", help="allowed models")] = None,
    max_params_b: Num("--max-params-b") = None,
    max_cost: Num("--max-cost", "at most this expected USD per request") = None,
    lam: Num("--lambda", "utility rule: argmax g - lambda * cost / reference cost") = None,
    delta: Num("--delta", "cheapest model within delta of the best g") = None,
    max_cost_share: Num("--max-cost-share", "best measured quality at most this share of the reference "
                                            "model's cost") = None,
    max_quality_loss: Num("--max-quality-loss", "cheapest measured point within this loss of the best "
                                                "single model") = None,
    input_tokens: Num("--input-tokens", "prompt tokens (default: from the text)") = None,
    strong: Strong = None,
    weak: Weak = None,
    pair_router: PairRouter = None,
    strong_share: Num("--strong-share", "with --strong/--weak: the share of queries the strong model "
                                        "should get") = None,
    threshold: Num("--threshold", "with --strong/--weak: the threshold α itself") = None,
) -> int:
    _exclusive(ctx, **{"--lambda": lam, "--delta": delta, "--max-cost-share": max_cost_share,
                       "--max-quality-loss": max_quality_loss})
    _exclusive(ctx, **{"--strong-share": strong_share, "--threshold": threshold})
    from benchroute.artifacts.bundle import BundleError
    from benchroute.artifacts.router import RouteError, load_router

    try:
        router = load_router(bundle, name, version)
    except BundleError as exc:  # a bad ref, a tampered or missing bundle: a message, not a traceback
        print(f"benchroute route: {exc}", file=sys.stderr)
        return 2
    filters = {"models": models or None, "max_params_b": max_params_b, "max_cost": max_cost,
               "lam": lam, "delta": delta, "max_cost_share": max_cost_share,
               "max_quality_loss": max_quality_loss, "input_tokens": input_tokens}
    pair = {"strong": strong, "weak": weak, "strong_share": strong_share, "threshold": threshold,
            "pair_router": pair_router}
    if any(v is not None for v in pair.values()):
        if file or not text:
            print("a strong/weak decision takes one query text (not --file)", file=sys.stderr)
            return 2
        filters = {k: v for k, v in filters.items() if v is not None}
        filters.update(pair)
    if file:
        import fsspec

        with fsspec.open(file, "rt", encoding="utf-8") as f:
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
    if not text:
        print("give a query text or --file tasks.jsonl", file=sys.stderr)
        return 2
    try:
        print(json.dumps(router.route(text, **filters), indent=1))
    except RouteError as exc:
        print(f"benchroute route: {exc}", file=sys.stderr)
        return 2
    return 0


# ------------------------------------------------------------------------------ pairs-report
@app.command("pairs-report", help="strong/weak pair routers judged on benchmarks they never saw: PGR, APGR, "
                                  "CPT with bootstrap intervals, HTML with the plot")
def pairs_report(
    store: Annotated[str, _opt("--store", help="a store with labels and vectors")],
    out: Annotated[str, _opt("--out", help="folder (fsspec URL) for Parquet, Markdown and HTML")],
    pairs: Annotated[list[str], _opt("--pair", metavar="STRONG,WEAK", help="a strong/weak pair (repeatable)")],
    heldout: Annotated[list[str], _opt(
        "--heldout", metavar="DATASETS", help="one evaluation per option: comma-separated dataset names or "
                                              "globs held out of training and judged (e.g. 'mmlu/*' or 'gsm8k')")],
    routers: Annotated[Optional[list[str]], _opt("--router", help="only these routers")] = None,
    embedder: Annotated[Optional[str], _opt("--embedder")] = None,
    n_boot: Annotated[int, _opt("--n-boot")] = 1000,
    seed: Annotated[int, _opt("--seed")] = 0,
) -> int:
    from benchroute.artifacts.router_build import pair_list
    from benchroute.transforms.pair_eval import chosen_routers, evaluate_pairs, load_store_data, write_pair_report
    from benchroute.transforms.pair_labels import PairError

    try:
        chosen_routers(routers)  # an unknown name fails before the store is read
        pair_tuples = pair_list([], pairs)
        data, X = load_store_data(store, embedder)
        results, reference = evaluate_pairs(data, X, pair_tuples, heldout, routers=routers,
                                            n_boot=n_boot, seed=seed)
    except (PairError, ValueError) as exc:
        print(f"benchroute pairs-report: {exc}", file=sys.stderr)
        return 2
    paths = write_pair_report(out, results, reference=reference,
                              meta={"store": store, "pairs": [list(p) for p in pair_tuples], "heldout": heldout})
    for r in results:
        print(f"\n{r.name}")
        print(r.summary.select([c for c in ("router", "apgr", "apgr_lo", "apgr_hi", "cpt50", "cpt80")
                                if c in r.summary.columns]))
    print("\nreport: " + ", ".join(str(v) for v in paths.values()))
    return 0


# --------------------------------------------------------------------------------- calibrate
@app.command("calibrate", help="a pair router's thresholds recomputed on your own queries")
def calibrate(
    bundle: BundleUrl,
    queries: Annotated[str, _opt("--queries", help='JSONL (fsspec URL): one query per line, a JSON string or '
                                                   '{"text": …}')],
    strong: Annotated[str, _opt("--strong", help="a strong/weak decision: the strong (costly) model")],
    weak: Annotated[str, _opt("--weak", help="the weak (cheap) model")],
    name: MaybeName = None,
    version: Version = "latest",
    pair_router: PairRouter = None,
    shares: Annotated[Optional[list[float]], _opt(
        "--share", help="target strong share (repeatable; default: the bundle's)")] = None,
    as_json: Flag("--json", "print JSON instead of a table") = False,
) -> int:
    import fsspec
    from benchroute.artifacts.bundle import BundleError
    from benchroute.artifacts.router import RouteError, load_router

    texts = []
    with fsspec.open(queries, "rt", encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                q = json.loads(line)
            except json.JSONDecodeError as exc:
                print(f"{queries} line {n}: not JSON ({exc})", file=sys.stderr)
                return 2
            q = q.get("text") if isinstance(q, dict) else q
            if not isinstance(q, str) or not q.strip():
                print(f"{queries} line {n}: expected a string or {{\"text\": string}}", file=sys.stderr)
                return 2
            texts.append(q)
    if not texts:
        print(f"{queries}: no queries", file=sys.stderr)
        return 2
    try:
        router = load_router(bundle, name, version)
        rows = router.calibrate_pair(texts, strong=strong, weak=weak, shares=shares or None,
                                     router=pair_router)
    except (BundleError, RouteError) as exc:
        print(f"benchroute calibrate: {exc}", file=sys.stderr)
        return 2
    if as_json:
        print(json.dumps(rows))
        return 0
    print(f"{len(texts)} queries; {strong} (strong) / {weak} (weak)")
    print(f"{'target':>7} {'your alpha':>11} {'share':>6} {'stored alpha':>13} {'stored share':>13}")
    for r in rows:
        stored = "" if r["stored_alpha"] is None else f"{r['stored_alpha']:13.5f} {r['stored_share']:13.3f}"
        print(f"{r['target_share']:7.2f} {r['alpha']:11.5f} {r['share']:6.3f} {stored}")
    return 0


# ------------------------------------------------------------------------------------- serve
@app.command("serve", help="HTTP service: /v1/route, /v1/score-task, /v1/calibrate, /v1/bundle, /healthz")
def serve(
    bundle: Annotated[str, _opt("--bundle", help="store URL")],
    name: BundleName = "default",
    version: Annotated[str, _opt("--version", help="'latest' follows new versions")] = "latest",
    host: Annotated[str, _opt("--host")] = "127.0.0.1",
    port: Annotated[int, _opt("--port")] = 8000,
    poll_seconds: Annotated[float, _opt("--poll-seconds")] = 5.0,
) -> int:
    import uvicorn
    from benchroute.artifacts.service import create_app

    uvicorn.run(create_app(bundle, name, version, poll_seconds=poll_seconds), host=host, port=port,
                log_level="info")
    return 0


# ----------------------------------------------------------------------------------- refresh
@app.command("refresh", help="ingest what is new in a landing zone, embed, refit, publish if changed "
                             "(Prefect flow)")
@with_specs(embed=EmbedSpec, router=RouterSpec,
            selection=spec_options(Selection, only=["sources"], help={"sources": KINDS_HELP}))
def refresh(
    landing: Annotated[str, _arg("LANDING", "landing location (folder or fsspec URL) holding run dumps")],
    store: Store,
    name: BundleName = "default",
    embed: EmbedSpec = EmbedSpec(),
    router: RouterSpec = RouterSpec(),
    selection: Selection = Selection(),
    aliases: Aliases = None,
    rules: Rules = None,
    model_cards: Cards = None,
    partitions: Annotated[int, _opt("--partitions", help="embedding partitions")] = 4,
    dask_workers: DaskWorkers = 0,
    dask_address: DaskAddress = None,
    as_json: Flag("--json", "print the run's summary as JSON") = False,
    full: Flag("--full", "run every step even when nothing is new (each is then found cached)") = False,
    incremental: Flag("--incremental", "no per-group evaluation; extend the latest version by the models "
                      "added since it without a refit where possible, else build in full") = False,
) -> int:
    import time

    from benchroute.artifacts.stages import refresh as stage

    t0 = time.perf_counter()
    checked = None if full else stage.check(landing, store, name, embed, router, kinds=_kinds(selection),
                                            rules=rules, model_cards=model_cards)
    if checked is not None and checked.noop:  # nothing to run: no Prefect server, no flow run
        summary = stage.noop_summary(landing, store, name, checked, round(time.perf_counter() - t0, 2))
        print(json.dumps(summary, indent=1, default=str) if as_json else "\n".join(stage.noop_lines(summary)))
        return 0
    from benchroute.flows import refresh as mod
    from benchroute.flows.prefect_server import guard
    from benchroute.flows.scale import scale_parameters, with_task_runner

    guard()  # a kill -9 of this command stops its temporary Prefect server too
    run = with_task_runner(mod.refresh_flow, dask_workers, address=dask_address)
    summary = run(landing=landing, store=store, name=name, embed=embed, router=router,
                  partitions=partitions, kinds=_kinds(selection), aliases=aliases, rules=rules,
                  # checked above already (or --full): the flow skips its own check
                  model_cards=model_cards, full=True, incremental=incremental,
                  **scale_parameters(dask_workers, address=dask_address))
    if as_json:
        print(json.dumps(summary, indent=1, default=str))
    else:
        mod.print_summary(summary, store)
    return 0


# ---------------------------------------------------------------------------------- backfill
@app.command("backfill", help="rebuild the store or a selection of it and publish; --dry-run reports "
                              "(Prefect flow)")
@with_specs(selection=spec_options(Selection, help={
    "sources": "only these source kinds: their readers ingest, their data is published"}),
    embed=EmbedSpec, router=RouterSpec)
def backfill(
    store: Store,
    paths: Annotated[Optional[list[str]], _arg(
        "PATHS", "run dumps to ingest (folders, files, fsspec URLs)")] = None,
    name: BundleName = "default",
    selection: Selection = Selection(),
    embed: EmbedSpec = EmbedSpec(),
    router: RouterSpec = RouterSpec(),
    aliases: Aliases = None,
    relabel: Flag("--relabel", "recompute the labels (with --rules)") = False,
    rules: Rules = None,
    model_cards: Annotated[Optional[str], _opt(
        "--models", metavar="CARD", help="model card file (CSV or YAML: sizes, prices); --model selects models")] = None,
    force: Flag("--force", "recompute cached evaluations and fit") = False,
    dry_run: Flag("--dry-run", "report what it would do; write nothing") = False,
    partitions: Annotated[int, _opt("--partitions", help="embedding partitions")] = 4,
    dask_workers: DaskWorkers = 0,
    dask_address: DaskAddress = None,
) -> int:
    from benchroute.flows import backfill as mod
    from benchroute.flows.scale import scale_parameters, with_task_runner

    run = with_task_runner(mod.backfill_flow, dask_workers, address=dask_address)
    r = run(store=store, paths=paths or [], name=name, selection=selection, embed=embed, router=router,
            partitions=partitions, relabel=relabel, rules=rules, aliases=aliases, force=force,
            dry_run=dry_run, model_cards=model_cards,
            **scale_parameters(dask_workers, address=dask_address))
    if r["dry_run"]:
        print(mod.plan_markdown(r["plan"]))
        return 0
    b = r["bundle"]
    print(("published " if r["published"] else "unchanged, latest stays ")
          + f"{b['name']} {b['version']} ({b['models']} models) at {b['url']}")
    return 0


# ------------------------------------------------------------------------------------ deploy
@app.command("deploy", help="start a local Prefect server and serve the scheduled refresh and the backfill")
def deploy(
    landing: Annotated[str, _opt("--landing", help="landing location (folder or fsspec URL)")],
    store: Annotated[str, _opt("--store", help="store root (folder or fsspec URL)")],
    name: BundleName = "default",
    cron: Annotated[str, _opt("--cron", help="refresh schedule")] = DEFAULT_CRON,
    timezone: Annotated[Optional[str], _opt("--timezone")] = None,
    rules: Annotated[Optional[str], _opt("--rules", help="JSON of binarization rules for every run")] = None,
    aliases: Annotated[Optional[str], _opt("--aliases", help="CSV of model aliases for every run")] = None,
    model_cards: Annotated[Optional[str], _opt(
        "--models", metavar="CARD", help="model card (CSV or YAML: sizes, prices) for every run")] = None,
    dask_workers: DaskWorkers = 0,
    dask_address: DaskAddress = None,
    host: Annotated[str, _opt("--host", help="where a started server listens")] = "127.0.0.1",
    port: Annotated[int, _opt("--port")] = 4200,
    run_now: Flag("--run-now", "also trigger one refresh right away") = False,
    incremental: Flag("--incremental", "each scheduled refresh runs as refresh --incremental") = False,
) -> int:
    from benchroute.flows import deploy as mod

    return mod.serve_deployments(landing, store, name=name, cron=cron,
                                 timezone=timezone, rules=rules, aliases=aliases,
                                 model_cards=model_cards, workers=dask_workers, address=dask_address,
                                 host=host, port=port, run_now=run_now, incremental=incremental)


# -------------------------------------------------------------------------------------- main
@functools.cache
def command():
    """The click command typer builds from ``app`` (built once)."""
    return typer.main.get_command(app)


def main(argv: list[str] | None = None) -> int:
    from benchroute import settings

    settings.process_defaults()
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in PREFECT_COMMANDS and argv[0] != "refresh":  # refresh: only when it runs a flow
        from benchroute.flows.prefect_server import guard

        guard()  # a kill -9 of this command stops its temporary Prefect server too
    try:
        rv = command().main(args=argv, prog_name="benchroute", standalone_mode=False)
    except typer.TyperException as exc:  # a usage error: its message on stderr, exit code 2
        show = getattr(exc, "show", None)
        if show is not None:
            show()
        else:
            print(f"Error: {exc.format_message()}", file=sys.stderr)
        return exc.exit_code
    except typer.Abort:
        print("Aborted!", file=sys.stderr)
        return 1
    return rv if isinstance(rv, int) else 0


if __name__ == "__main__":
    raise SystemExit(main())
