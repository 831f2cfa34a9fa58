"""AlpacaEval 2 as canonical frames for the evaluation benchmarks (a stand-in for the store).

Reads ``annotations_long.parquet`` (annotator ``weighted_alpaca_eval_gpt4_turbo``, reference
gpt4_1106_preview): 805 instructions in 5 source datasets. Models ``example``, ``gpt4_gamed``
and ``gpt4_1106_preview`` (judged against itself) are left out, leaving 55. ``value`` is
preference − 1 ∈ [0, 1] (its mean is AlpacaEval's win rate), ``y`` = preference > 1.5 (the
default rule ``alpaca_eval/*`` of ``transforms/binarize.py``); preferences of 0 or NaN (no
valid judgement) are missing labels. The input text is the instruction.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl

from benchroute.transforms.ids import input_id
import mmlu_pro_data
from mmlu_pro_data import CACHE

RAW = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "raw" / "alpaca_eval"
ANNOTATOR = "weighted_alpaca_eval_gpt4_turbo"
DROP = ("example", "gpt4_gamed", "gpt4_1106_preview")


def canonical_tables(raw: Path = RAW) -> tuple[pl.DataFrame, pl.DataFrame, pl.DataFrame, pl.DataFrame]:
    """(inputs, memberships, labels, models); sizes unknown (params_b null)."""
    a = pl.read_parquet(raw / "annotations_long.parquet",
                        columns=["annotator_dir", "dataset", "instruction", "model", "preference"])
    a = a.filter((pl.col("annotator_dir") == ANNOTATOR) & ~pl.col("model").is_in(DROP))
    texts = a["instruction"].unique().to_list()
    ids = {t: input_id(t) for t in texts}
    a = a.with_columns(input_id=pl.col("instruction").replace_strict(ids),
                       dataset=pl.lit("alpaca_eval/") + pl.col("dataset"))
    ok = a.filter(pl.col("preference").is_not_null() & ~pl.col("preference").is_nan()
                  & (pl.col("preference") >= 1))
    labels = (
        ok.group_by("input_id", "dataset", "model")
        .agg(pl.col("preference").mean(), pl.len().cast(pl.Int32).alias("n_outcomes"))
        .select(
            "input_id", "dataset", "model",
            metric=pl.lit("alpaca_eval/" + ANNOTATOR),
            value=pl.col("preference") - 1.0,
            y=(pl.col("preference") > 1.5).cast(pl.Int8),
            rule=pl.lit("threshold(alpaca_eval/* > 1.5)"),
            n_outcomes="n_outcomes",
        )
        .sort("dataset", "input_id", "model")
    )
    memberships = a.select("input_id", "dataset").unique().with_columns(source=pl.lit("alpaca_eval"))
    inputs = a.select("input_id", text="instruction").unique("input_id").sort("input_id")
    models = labels.select("model").unique().sort("model").with_columns(params_b=pl.lit(None, pl.Float64))
    return inputs, memberships.sort("dataset", "input_id"), labels, models


def cached_embeddings(inputs: pl.DataFrame, cache: Path = CACHE) -> np.ndarray:
    """MiniLM embeddings of ``inputs.text`` in row order, cached by the ids' hash (the MMLU-Pro
    loader's cache, under an ``alpaca_eval`` prefix)."""
    return mmlu_pro_data.cached_embeddings(inputs, cache, prefix="alpaca_eval")
