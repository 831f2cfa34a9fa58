"""Summaries of the canonical tables, for ``benchroute inspect`` and the run reports."""

from __future__ import annotations

import polars as pl


def per_source(
    memberships: pl.DataFrame,
    outcomes: pl.DataFrame,
    labels: pl.DataFrame,
    quarantine: pl.DataFrame,
) -> pl.DataFrame:
    """One row per source: inputs, datasets, models, outcomes, labels, quarantined rows.

    A label counts for every source that contributed outcomes to its dataset. The last row
    (``source = "all"``) counts distinct values over the whole store.
    """
    dataset_source = outcomes.select("dataset", "source").unique()
    lab = labels.join(dataset_source, on="dataset", how="inner")

    def counts(m, o, lab_, q) -> dict:
        return {
            "inputs": m["input_id"].n_unique(),
            "datasets": m["dataset"].n_unique(),
            "models": o["model"].n_unique(),
            "metrics": o["metric"].n_unique(),
            "outcomes": o.height,
            "labels": lab_.height,
            "label_mean": round(float(lab_["y"].mean()), 3) if lab_.height else None,
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
    """Per model: labelled inputs, datasets, share of y = 1."""
    return (
        labels.group_by("model")
        .agg(
            pl.len().alias("labels"),
            pl.col("dataset").n_unique().alias("datasets"),
            pl.col("y").mean().round(3).alias("share_correct"),
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
