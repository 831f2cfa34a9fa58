"""The evaluation report: tables as Parquet, a Markdown report, and a self-contained HTML report
with plots (matplotlib, images embedded), written to any fsspec folder. With a stability summary
(``transforms.stability_summary``, issue 15) also a "Stability" section: its tables, plots of
the rank intervals per source group, τ per format variant and RStd per model, and
``<out>/stability/<table>.parquet``."""

from __future__ import annotations

import base64
import html
import io
import json
from collections.abc import Mapping

import polars as pl
from fsspec.core import url_to_fs

from benchroute.transforms.evaluate import Evaluation
from benchroute.transforms.route_metrics import upper_hull
from benchroute.transforms.routing_eval import RoutingResult
from benchroute.transforms.paper import (
    PAPER_ALPHA_PRED_ACC,
    PAPER_KERNEL_MAE,
    PAPER_PREDICTOR_ACC,
    PAPER_TABLE2,
    table1_beside_paper,
)

TABLES = ("table1", "per_task", "predictor", "alpha", "table2")
ROUTING_TABLES = ("points", "singles", "predictor_metrics", "summary")
STABILITY_TABLES = ("rankings", "ranking_scopes", "variants", "variant_models", "rstd")
TIES = "train_acc"  # the tie rule shown in the Markdown tables (both are in the Parquet files)


def write_report(
    out_url: str, results: Mapping[str, Evaluation], meta: Mapping, skipped: Mapping[str, str],
    routing: Mapping[str, Mapping[str, RoutingResult]] | None = None,
    stability=None,
) -> dict[str, str]:
    """Write ``<out>/<group>/<table>.parquet``, ``summary.json``, ``report.md``, ``report.html``;
    with ``routing`` (group → split → ``transforms.routing_eval.RoutingResult``) also
    ``<out>/<group>/routing_<split>_<table>.parquet`` and the cost–quality section; with
    ``stability`` (a ``StabilitySummary``) ``<out>/stability/<table>.parquet`` and the stability
    section (its manifest summary in ``summary.json``).

    Returns the written paths by role.
    """
    routing = routing or {}
    fs, root = url_to_fs(str(out_url))
    root = root.rstrip("/")
    fs.makedirs(root, exist_ok=True)
    written: dict[str, str] = {}
    for group, ev in results.items():
        fs.makedirs(f"{root}/{group}", exist_ok=True)
        for name in TABLES:
            with fs.open(f"{root}/{group}/{name}.parquet", "wb") as f:
                getattr(ev, name).write_parquet(f)
        fs.pipe_file(f"{root}/{group}/summary.json", _json(ev.summary))
    for group, by_split in routing.items():
        fs.makedirs(f"{root}/{group}", exist_ok=True)
        for split, res in by_split.items():
            for name in ROUTING_TABLES:
                with fs.open(f"{root}/{group}/routing_{split}_{name}.parquet", "wb") as f:
                    getattr(res, name).write_parquet(f)
    if stability is not None:
        fs.makedirs(f"{root}/stability", exist_ok=True)
        for name in STABILITY_TABLES:
            with fs.open(f"{root}/stability/{name}.parquet", "wb") as f:
                getattr(stability, name).write_parquet(f)
    summary = {
        "meta": dict(meta),
        "skipped": dict(skipped),
        "groups": {g: ev.summary for g, ev in results.items()},
        "routing": {g: {sp: r.summary.to_dicts() for sp, r in by.items()} for g, by in routing.items()},
    }
    if stability is not None:
        summary["stability"] = stability.manifest()
    fs.pipe_file(f"{root}/summary.json", _json(summary))
    md = markdown_report(results, meta, skipped) + routing_markdown(routing) + stability_markdown(stability)
    fs.pipe_file(f"{root}/report.md", md.encode())
    fs.pipe_file(f"{root}/report.html",
                 html_report(results, meta, skipped, md, routing, stability).encode())
    written.update(
        {"summary": f"{root}/summary.json", "markdown": f"{root}/report.md", "html": f"{root}/report.html"}
    )
    return written


def _json(obj) -> bytes:
    return json.dumps(obj, indent=1, sort_keys=True, default=str).encode()


# ------------------------------------------------------------------------------ Markdown
def markdown_report(results: Mapping[str, Evaluation], meta: Mapping, skipped: Mapping[str, str]) -> str:
    lines = [
        "# benchroute evaluation",
        "",
        "Leave-one-dataset-out evaluation of the Shnitzer et al. (2023) router on the store, one "
        "benchmark per source (models compared only where all have labels). Paper numbers are "
        "HELM (29 datasets × 18 open models); ours are on different data, so compare the pattern, "
        "not the level.",
        "",
        "| setting | value |",
        "|---|---|",
    ]
    lines += [f"| {k} | {v} |" for k, v in meta.items()]
    if skipped:
        lines += ["", "Not evaluated:", ""] + [f"- `{g}`: {why}" for g, why in skipped.items()]
    for group, ev in results.items():
        s = ev.summary
        lines += [
            "",
            f"## {group}",
            "",
            f"{s.get('n_inputs')} inputs, {s.get('n_models')} models, {s.get('n_tasks')} held-out "
            f"datasets.",
            "",
            "### Table 1 (ties broken by training accuracy)",
            "",
            table1_beside_paper(ev.table1.filter(pl.col("ties") == TIES).to_dicts()),
            "",
            f"- predictor accuracy: {s.get('predictor_accuracy', float('nan')):.3f} "
            f"(paper {PAPER_PREDICTOR_ACC})",
            f"- kernel MAE of p̂(d', m): {s.get('kernel_mae', float('nan')):.3f} (paper "
            f"{PAPER_KERNEL_MAE}); constant estimate {s.get('constant_mae', float('nan')):.3f}; "
            f"neighbour-share estimate {s.get('neighbor_share_mae', float('nan')):.3f}",
            "",
            "### α curve (in-task labelled share → accuracy of the chosen model)",
            "",
            _alpha_markdown(ev.alpha),
            "",
            f"(paper: predictor accuracy {PAPER_PREDICTOR_ACC} → {PAPER_ALPHA_PRED_ACC} at α = 0.05)",
            "",
            "### Table 2 (per-input routing over all held-out inputs)",
            "",
            _frame_markdown(
                ev.table2.sort("quality", descending=True).select(
                    "router", "ties", pl.col("quality").round(4), pl.col("mcpi"), "n_inputs"
                )
            ),
            "",
            f"(paper, MixInstruct BERTScore: router {PAPER_TABLE2['router']} vs oracle "
            f"{PAPER_TABLE2['oracle']}, {PAPER_TABLE2['router_mcpi']} model calls per input)",
            "",
            "### Chosen model per held-out dataset",
            "",
            _frame_markdown(_chosen(ev)),
        ]
    return "\n".join(lines) + "\n"


def _alpha_markdown(alpha: pl.DataFrame) -> str:
    a = alpha.filter(pl.col("ties") == TIES)
    if a.height == 0:
        return "(no α curve)"
    wide = a.pivot(on="method", index="alpha", values="acc").sort("alpha")
    extra = a.group_by("alpha").agg(
        pl.col("predictor_accuracy").first(), pl.col("p_mae").first()
    )
    return _frame_markdown(wide.join(extra, on="alpha").sort("alpha"))


def _chosen(ev: Evaluation) -> pl.DataFrame:
    """The chosen model per method, and S3's ``flip_task`` beside it when measured."""
    t = ev.per_task.filter((pl.col("ties") == TIES) & (pl.col("method") != "Random"))
    wide = t.pivot(on="method", index="dataset", values="model").sort("dataset")
    if "flip_task" in t.columns:
        flips = t.filter(pl.col("method").is_in(["S3", "Oracle"])).pivot(
            on="method", index="dataset", values="flip_task")
        flips = flips.rename({c: f"{c} flip" for c in flips.columns if c != "dataset"})
        wide = wide.join(flips, on="dataset", how="left")
    return wide


def stability_markdown(stability) -> str:
    """The stability section (``StabilitySummary.markdown``), empty without a summary."""
    if stability is None:
        return ""
    return "\n".join([
        "", "# Stability", "",
        "How far the rankings and choices above can be trusted (issue 15): bootstrap over inputs "
        "(rank intervals, P(best), Kendall τ of the full-data ranking against the resamples), "
        "format variants of the same items (other metrics, suites, perturbations, question "
        "versions), selection bias over answer positions (RStd, with the RStd an unbiased model "
        "would show from sampling alone). `flip` columns in the chosen-model tables: share of "
        "resamples of the task's inputs on which the choice changes.", "",
        stability.markdown(), "",
    ])


def _frame_markdown(df: pl.DataFrame) -> str:
    def cell(v) -> str:
        if isinstance(v, float):
            return "–" if v != v else f"{v:.3f}"
        return "–" if v is None else str(v)

    lines = ["| " + " | ".join(df.columns) + " |", "|---" * df.width + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in df.iter_rows()]
    return "\n".join(lines)


# ------------------------------------------------------------------------------ HTML
SUMMARY_COLUMNS = (
    "predictor", "best_model", "best_quality", "quality_lambda0", "aiq", "aiq_singles",
    "quality_at_best_cost", "quality_at_60pct_cost", "quality_at_20pct_cost",
    "cost_share_within_005", "cost_share_at_95pct_quality", "share_of_range_above_singles",
)


def routing_markdown(routing: Mapping[str, Mapping[str, RoutingResult]]) -> str:
    """The cost–quality section: per group and split, each predictor's router against the single
    models (cost shares relative to the best single model on the held-out inputs)."""
    if not routing:
        return ""
    lines = [
        "",
        "# Cost-aware routing (per query)",
        "",
        "Held-out inputs: `random` = a random 20 % of the inputs of known tasks; `lodo` = each "
        "dataset held out in turn. Quality = mean correctness of the routed answers; cost share = "
        "cost / cost of always calling the best single model (the one with the best held-out "
        "quality among priced models). AIQ = mean of the non-decreasing cost–quality hull over "
        "the single models' cost range (RouterBench). `quality_at_60pct_cost` reads the router's "
        "hull at 60 % of the best model's cost; `cost_share_within_005` is the least cost share "
        "within .005 of the best model's quality.",
    ]
    for group, by_split in routing.items():
        for split, res in by_split.items():
            cols = [c for c in SUMMARY_COLUMNS if c in res.summary.columns]
            singles = res.singles.sort("cost_share", nulls_last=True).select(
                "model", pl.col("cost_share").round(4), pl.col("quality").round(4), "priced", "comparable")
            lines += [
                "", f"## {group} — {split}", "",
                _frame_markdown(res.summary.select(cols)), "",
                "Predictor quality on the held-out labels:", "",
                _frame_markdown(res.predictor_metrics), "",
                "Single models:", "", _frame_markdown(singles),
            ]
    return "\n".join(lines) + "\n"


def html_report(
    results: Mapping[str, Evaluation], meta: Mapping, skipped: Mapping[str, str], markdown: str,
    routing: Mapping[str, Mapping[str, RoutingResult]] | None = None,
    stability=None,
) -> str:
    """Self-contained HTML: the Markdown tables as HTML plus the plots of each group."""
    body = [_markdown_to_html(markdown)]
    if stability is not None:
        body.append("<h2>Plots: stability</h2>")
        for title, png in (
            (f"Rank intervals per source group, best {PLOT_MODELS} models (bootstrap over "
             "inputs; dot = full-data rank)",
             _plot_rank_intervals(stability.rankings)),
            ("Kendall τ of each format variant's ranking vs its reference (grey: mean τ of the "
             "bootstrap resamples)", _plot_variant_tau(stability.variants)),
            (f"RStd per model, largest {PLOT_MODELS} (selection bias over answer positions; × = "
             "RStd of an unbiased model from sampling alone)", _plot_rstd(stability.rstd)),
        ):
            if png:
                b64 = base64.b64encode(png).decode()
                body.append(f"<figure><img alt='{html.escape(title)}' src='data:image/png;base64,{b64}'/>"
                            f"<figcaption>{html.escape(title)}</figcaption></figure>")
    for group, by_split in (routing or {}).items():
        for split, res in by_split.items():
            png = _plot_cost_quality(res)
            if png:
                title = f"Cost–quality: {group}, {split} split (routers by predictor vs single models)"
                b64 = base64.b64encode(png).decode()
                body.append(f"<figure><img alt='{html.escape(title)}' src='data:image/png;base64,{b64}'/>"
                            f"<figcaption>{html.escape(title)}</figcaption></figure>")
    for group, ev in results.items():
        body.append(f"<h2>Plots: {html.escape(group)}</h2>")
        for title, png in (
            ("Accuracy of the chosen model vs the oracle, per held-out dataset", _plot_chosen(ev)),
            ("α curve: accuracy of the chosen model vs in-task labelled share", _plot_alpha(ev)),
            ("Kernel fit: estimated p̂(d', m) vs true p(d', m)", _plot_kernel(ev)),
        ):
            if png:
                b64 = base64.b64encode(png).decode()
                body.append(
                    f"<figure><img alt='{html.escape(title)}' src='data:image/png;base64,{b64}'/>"
                    f"<figcaption>{html.escape(title)}</figcaption></figure>"
                )
    style = (
        "body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em}"
        "table{border-collapse:collapse;margin:1em 0;font-size:13px}"
        "td,th{border:1px solid #ccc;padding:3px 7px;text-align:right}"
        "th{background:#f3f3f3}img{max-width:100%}"
    )
    return (
        "<!doctype html><html><head><meta charset='utf-8'><title>benchroute evaluation</title>"
        f"<style>{style}</style></head><body>{''.join(body)}</body></html>"
    )


def _markdown_to_html(md: str) -> str:
    """The small Markdown subset the report uses: headings, paragraphs, lists, tables."""
    out, table = [], []

    def flush_table():
        if not table:
            return
        rows = [r.strip().strip("|").split("|") for r in table if not set(r) <= set("|-: ")]
        head, *rest = rows
        out.append(
            "<table><tr>"
            + "".join(f"<th>{html.escape(c.strip())}</th>" for c in head)
            + "</tr>"
            + "".join(
                "<tr>" + "".join(f"<td>{html.escape(c.strip())}</td>" for c in r) + "</tr>"
                for r in rest
            )
            + "</table>"
        )
        table.clear()

    for line in md.splitlines():
        if line.startswith("|"):
            table.append(line)
            continue
        flush_table()
        if line.startswith("#"):
            level = len(line) - len(line.lstrip("#"))
            out.append(f"<h{level}>{html.escape(line[level:].strip())}</h{level}>")
        elif line.startswith("- "):
            out.append(f"<li>{html.escape(line[2:])}</li>")
        elif line.strip():
            out.append(f"<p>{html.escape(line)}</p>")
    flush_table()
    return "\n".join(out)


def _figure():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    _figure().close(fig)
    return buf.getvalue()


def _plot_chosen(ev: Evaluation) -> bytes | None:
    t = ev.per_task.filter(pl.col("ties") == TIES)
    if t.height == 0:
        return None
    plt = _figure()
    wide = t.pivot(on="method", index="dataset", values="acc").sort("dataset")
    methods = [m for m in ("S1", "S3", "BMA", "Oracle") if m in wide.columns]
    fig, ax = plt.subplots(figsize=(max(6, 0.45 * wide.height + 2), 4))
    width = 0.8 / max(len(methods), 1)
    xs = range(wide.height)
    for i, m in enumerate(methods):
        ax.bar([x + i * width for x in xs], wide[m].to_list(), width, label=m)
    ax.set_xticks([x + 0.4 - width / 2 for x in xs])
    ax.set_xticklabels([d.split("/", 1)[-1] for d in wide["dataset"]], rotation=60, ha="right", fontsize=7)
    ax.set_ylabel("accuracy on held-out dataset")
    ax.legend(fontsize=8)
    return _png(fig)


def _plot_alpha(ev: Evaluation) -> bytes | None:
    a = ev.alpha.filter(pl.col("ties") == TIES)
    if a.height == 0:
        return None
    plt = _figure()
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for (method,), part in a.group_by("method", maintain_order=True):
        part = part.sort("alpha")
        ax.plot(part["alpha"].to_list(), part["acc"].to_list(), marker="o", label=method)
    ax.set_xlabel("α (share of held-out inputs labelled)")
    ax.set_ylabel("accuracy of the chosen model")
    ax.legend(fontsize=8)
    return _png(fig)


def _plot_kernel(ev: Evaluation) -> bytes | None:
    p = ev.predictor
    if p.height == 0 or "p_hat" not in p.columns:
        return None
    plt = _figure()
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    ax.scatter(p["p_true"].to_list(), p["p_hat"].to_list(), s=8, alpha=0.5, label="kernel p̂")
    if "p_share" in p.columns:
        ax.scatter(p["p_true"].to_list(), p["p_share"].to_list(), s=8, alpha=0.5, label="neighbour share")
    ax.plot([0, 1], [0, 1], color="grey", lw=1)
    ax.set_xlabel("true p(d', m)")
    ax.set_ylabel("estimate")
    ax.legend(fontsize=8)
    return _png(fig)


def _plot_cost_quality(res: RoutingResult) -> bytes | None:
    """Each predictor's router points and hull beside the single models and their hull."""
    s = res.singles.filter(pl.col("priced") & pl.col("comparable"))
    if s.height == 0 or res.points.height == 0:
        return None
    plt = _figure()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    sc, sq = s["cost_share"].to_numpy(), s["quality"].to_numpy()
    ax.scatter(sc, sq, color="black", s=14, zorder=3, label="single models")
    h = upper_hull(sc, sq)
    ax.plot(h[:, 0], h[:, 1], color="black", lw=1, ls="--", label="single-model hull (mixtures)")
    for (name,), part in res.points.group_by("predictor", maintain_order=True):
        rc, rq = part["cost_share"].to_numpy(), part["quality"].to_numpy()
        h = upper_hull(rc, rq)
        line = ax.plot(h[:, 0], h[:, 1], lw=1.5, label=f"router: {name}")[0]
        ax.scatter(rc, rq, s=6, alpha=0.5, color=line.get_color())
    ax.set_xscale("log")
    ax.set_xlabel("cost / cost of the best single model (log)")
    ax.set_ylabel("quality of the routed answers")
    ax.legend(fontsize=7)
    return _png(fig)


PLOT_MODELS = 20  # models per panel of the stability plots (the best ranked / the most biased)


def _scope_panels(sizes: list[int]):
    """A figure of panels stacked one above the other, each as tall as its number of rows
    (``sizes``), and the panels' axes."""
    plt = _figure()
    fig, axes = plt.subplots(len(sizes), 1, squeeze=False,
                             figsize=(7, sum(0.16 * n + 0.8 for n in sizes)),
                             gridspec_kw={"height_ratios": [n + 4 for n in sizes]})
    return fig, axes[:, 0]


def _model_panel(ax, y: list[int], models: list[str], title: str, xlabel: str) -> None:
    """A panel's model names down its y axis (the first on top), its title and x label."""
    ax.set_yticks(y)
    ax.set_yticklabels(models, fontsize=6)
    ax.invert_yaxis()
    ax.set_title(title, fontsize=9)
    ax.set_xlabel(xlabel, fontsize=8)


def _plot_rank_intervals(rankings: pl.DataFrame) -> bytes | None:
    """One panel per source group: the rank interval of each of its best-ranked models."""
    g = rankings.filter(pl.col("scope_kind") == "group") if rankings.height else rankings
    if g.height == 0:
        return None
    g = g.sort("rank", "model").group_by("scope", maintain_order=True).head(PLOT_MODELS)
    scopes = g["scope"].unique(maintain_order=True).to_list()
    fig, axes = _scope_panels([g.filter(pl.col("scope") == sc).height for sc in scopes])
    for ax, sc in zip(axes, scopes):
        part = g.filter(pl.col("scope") == sc).sort("rank", "model")
        y = list(range(part.height))
        r, lo, hi = (part[c].to_numpy() for c in ("rank", "rank_lo", "rank_hi"))
        err = [(r - lo).clip(min=0), (hi - r).clip(min=0)]  # the full-data rank can lie outside
        ax.errorbar(r, y, xerr=err, fmt="o", ms=3, lw=1, capsize=2)
        _model_panel(ax, y, part["model"].to_list(), sc, "rank (1 = best)")
    fig.subplots_adjust(hspace=0.5)
    return _png(fig)


def _plot_variant_tau(variants: pl.DataFrame, top: int = 25) -> bytes | None:
    """τ per variant: the source-group comparisons, then the lowest-τ dataset ones."""
    if variants.height == 0 or "tau" not in variants.columns:
        return None
    v = variants.filter(pl.col("tau").is_not_null() & pl.col("tau").is_not_nan())
    v = pl.concat([v.filter(pl.col("scope_kind") == "group"),
                   v.filter(pl.col("scope_kind") == "dataset").sort("tau").head(top)])
    if v.height == 0:
        return None
    plt = _figure()
    fig, ax = plt.subplots(figsize=(7, 0.2 * v.height + 1))
    labels = [f"{sc} · {var}"[:70] for sc, var in v.select("scope", "variant").iter_rows()]
    y = list(range(v.height))
    ax.barh(y, v["tau"].to_list(), height=0.6)
    if "tau_bootstrap" in v.columns:
        ax.scatter(v["tau_bootstrap"].to_list(), y, color="grey", marker="|", s=80, zorder=3)
    ax.set_yticks(y)
    ax.set_yticklabels(labels, fontsize=6)
    ax.invert_yaxis()
    ax.set_xlim(min(0.0, float(v["tau"].min())), 1.0)
    ax.set_xlabel("Kendall τ-b (variant vs reference ranking)", fontsize=8)
    return _png(fig)


def _plot_rstd(rstd: pl.DataFrame) -> bytes | None:
    """RStd per model with the sampling-noise level, one panel per source group, and per
    dataset of a source without one."""
    if rstd.height == 0:
        return None
    groups = rstd.filter(pl.col("scope_kind") == "group")["scope"].unique().to_list()
    alone = pl.col("scope").str.split("/").list.first().is_in(groups).not_()  # no group panel
    r = rstd.filter(((pl.col("scope_kind") == "group") | alone) & pl.col("rstd").is_not_nan())
    if r.height == 0:
        return None
    scopes = r["scope"].unique(maintain_order=True).to_list()
    fig, axes = _scope_panels([min(r.filter(pl.col("scope") == sc).height, PLOT_MODELS) for sc in scopes])
    for ax, sc in zip(axes, scopes):
        part = r.filter(pl.col("scope") == sc).sort("rstd", descending=True).head(PLOT_MODELS)
        y = list(range(part.height))
        ax.barh(y, part["rstd"].to_list(), height=0.6)
        ax.scatter(part["rstd_noise"].to_list(), y, color="black", marker="x", s=12, zorder=3)
        _model_panel(ax, y, part["model"].to_list(), sc, "RStd (std of per-position recall)")
    fig.subplots_adjust(hspace=0.5)
    return _png(fig)
