"""Summaries of the canonical tables, for ``benchroute inspect`` and the run reports."""

from __future__ import annotations

from collections.abc import Iterable

import polars as pl


def outcome_counts(batches: Iterable[pl.DataFrame]) -> pl.DataFrame:
    """``source, dataset, model, metric, n``: the outcomes counted a batch at a time (a
    leaderboard's hundreds of millions of rows come down to a row per model and dataset)."""
    keys = ["source", "dataset", "model", "metric"]
    return _reduce(batches, keys, [pl.len().alias("n")], [pl.col("n").sum()])


def label_counts(batches: Iterable[pl.DataFrame]) -> pl.DataFrame:
    """``dataset, model, n, y_sum``: the labels counted a batch at a time."""
    return _reduce(batches, ["dataset", "model"],
                   [pl.len().alias("n"), pl.col("y").cast(pl.Int64).sum().alias("y_sum")],
                   [pl.col("n").sum(), pl.col("y_sum").sum()])


def _reduce(batches, keys: list[str], first: list[pl.Expr], merge: list[pl.Expr]) -> pl.DataFrame:
    out: pl.DataFrame | None = None
    for batch in batches:
        part = batch.group_by(keys).agg(first)
        out = part if out is None else pl.concat([out, part]).group_by(keys).agg(merge)
    if out is None:
        schema = {k: pl.String for k in keys} | {e.meta.output_name(): pl.Int64 for e in first}
        out = pl.DataFrame(schema=schema)
    return out.cast({e.meta.output_name(): pl.Int64 for e in first}).sort(keys)


def per_source(
    memberships: pl.DataFrame,
    outcomes: pl.DataFrame,
    labels: pl.DataFrame,
    quarantine: pl.DataFrame,
) -> pl.DataFrame:
    """One row per source: inputs, datasets, models, outcomes, labels, quarantined rows.

    ``outcomes`` and ``labels`` are the counts ``outcome_counts`` and ``label_counts`` make of
    those tables. A label counts for every source that contributed outcomes to its dataset. The
    last row (``source = "all"``) counts distinct values over the whole store.
    """
    dataset_source = outcomes.select("dataset", "source").unique()
    lab = labels.join(dataset_source, on="dataset", how="inner")

    def counts(m, o, lab_, q) -> dict:
        n_labels = int(lab_["n"].sum()) if lab_.height else 0
        return {
            "inputs": m["input_id"].n_unique(),
            "datasets": m["dataset"].n_unique(),
            "models": o["model"].n_unique(),
            "metrics": o["metric"].n_unique(),
            "outcomes": int(o["n"].sum()) if o.height else 0,
            "labels": n_labels,
            "label_mean": round(int(lab_["y_sum"].sum()) / n_labels, 3) if n_labels else None,
            "quarantined": q.height,
        }

    sources = sorted(
        set(memberships["source"].to_list())
        | set(outcomes["source"].to_list())
        | set(quarantine["source"].to_list())
    )
    rows = []
    for s in sources:
        rows.append(
            {
                "source": s,
                **counts(
                    memberships.filter(pl.col("source") == s),
                    outcomes.filter(pl.col("source") == s),
                    lab.filter(pl.col("source") == s),
                    quarantine.filter(pl.col("source") == s),
                ),
            }
        )
    rows.append({"source": "all", **counts(memberships, outcomes, labels, quarantine)})
    return pl.DataFrame(rows)


def label_balance(labels: pl.DataFrame) -> pl.DataFrame:
    """Per model: labelled inputs, datasets, share of y = 1 (from ``label_counts``)."""
    return (
        labels.group_by("model")
        .agg(
            pl.col("n").sum().alias("labels"),
            pl.col("dataset").n_unique().alias("datasets"),
            (pl.col("y_sum").sum() / pl.col("n").sum()).round(3).alias("share_correct"),
        )
        .sort("model")
    )


def quarantine_reasons(quarantine: pl.DataFrame, top: int = 20) -> pl.DataFrame:
    """The most frequent quarantine reasons per source."""
    return (
        quarantine.group_by("source", "reason")
        .len()
        .sort("len", descending=True)
        .head(top)
    )
