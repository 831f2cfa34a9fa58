"""``benchroute inspect``'s counts, made a batch at a time, equal the counts of the whole tables."""

from __future__ import annotations

import polars as pl

from benchroute.artifacts.store import Store
from benchroute.transforms import summary


def whole_table_counts(s: Store) -> pl.DataFrame:
    """What the counts are, computed on the whole tables in memory (the definition)."""
    m, o, lab, q = (s.read(t) for t in ("memberships", "outcomes", "labels", "quarantine"))
    lab_src = lab.join(o.select("dataset", "source").unique(), on="dataset")
    rows = []
    for src in sorted(set(m["source"]) | set(o["source"]) | set(q["source"])) + ["all"]:
        pick = (lambda f: f) if src == "all" else (lambda f: f.filter(pl.col("source") == src))
        labels = lab if src == "all" else pick(lab_src)
        rows.append({
            "source": src, "inputs": pick(m)["input_id"].n_unique(), "datasets": pick(m)["dataset"].n_unique(),
            "models": pick(o)["model"].n_unique(), "metrics": pick(o)["metric"].n_unique(),
            "outcomes": pick(o).height, "labels": labels.height,
            "label_mean": round(float(labels["y"].mean()), 3) if labels.height else None,
            "quarantined": pick(q).height,
        })
    return pl.DataFrame(rows)


def test_batched_counts_equal_whole_table_counts(embedded_sample_store):
    s = Store(embedded_sample_store)
    tables = {t: s.read(t) for t in ("memberships", "quarantine")}
    tables["outcomes"] = summary.outcome_counts(
        s.batches("outcomes", ["source", "dataset", "model", "metric"], batch_size=997))
    tables["labels"] = summary.label_counts(s.batches("labels", ["dataset", "model", "y"], batch_size=997))
    got = summary.per_source(**tables)
    assert got.height >= 4
    assert got.equals(whole_table_counts(s).select(got.columns).cast(got.schema))
    balance = summary.label_balance(tables["labels"])
    labels = s.read("labels")
    want = labels.group_by("model").agg(pl.len().alias("labels"), pl.col("dataset").n_unique().alias("datasets"),
                                        pl.col("y").mean().round(3).alias("share_correct")).sort("model")
    assert balance.cast(want.schema).equals(want)


def test_counts_of_no_batches_are_empty():
    assert summary.outcome_counts(iter(())).height == 0
    assert summary.label_counts(iter(())).columns == ["dataset", "model", "n", "y_sum"]
