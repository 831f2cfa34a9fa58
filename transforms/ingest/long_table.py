"""The generic long table: bring any benchmark's per-input results without writing code.

Format
------
A CSV (UTF-8, comma-separated, with a header row) or a Parquet file with one row per
(input, model, metric):

=====================  ========  ===============================================================
column                 required  meaning
=====================  ========  ===============================================================
``input``              yes       the input text exactly as the model saw it (the prompt)
``dataset``            yes       the dataset (task) it belongs to, e.g. ``my_suite/qa``
``model``              yes       the model's name (mapped to a canonical name by the alias table)
``metric``             yes       the metric's name, e.g. ``exact_match`` or ``judge_score``
``value``              yes       the metric value, a finite number (``1``/``0``, ``0.73``;
                                 ``true``/``false`` are read as 1/0)
``split``              no        ``train``/``test``/…
``source_instance_id`` no        your id for the input (kept with its dataset membership)
``run_id``             no        names the run; default: the file's name. Two runs that scored
                                 the same model on the same input keep both values
``perturbation``       no        empty for the original input, else the perturbation's name
=====================  ========  ===============================================================

Other columns are ignored. Example (CSV)::

    input,dataset,model,metric,value
    "What is 2+2?",toy/arith,my-model-7b,exact_match,1
    "What is 2+2?",toy/arith,other-model,exact_match,0

The input id is a hash of the whitespace-normalised text, so the same question in your table and
in another source is one input. The labels stage binarizes ``value`` with the rule declared for
the metric (``--rules``); choose metric names that have one, or declare your own.

Checks: a missing required column makes the file unreadable (the error names the file and the
column). Row by row, an empty ``input``/``dataset``/``model``/``metric``, or a ``value`` that is
empty, not a number, NaN or infinite, sends the row to quarantine (file, ``row N`` counted from
1 after the header, field, reason); a second row with the same (input, dataset, model, metric,
run_id, perturbation) is quarantined as a duplicate (the first is kept). Everything else is read.

``find_units`` picks ``*.csv`` and ``*.parquet`` files whose header (CSV: the first line; Parquet:
the schema in the footer) names ``input`` and at least two more of the required columns; nothing
else of the file is read. One that lacks some is reported unreadable, naming the missing
columns (a table meant as a long table is not skipped in silence). A Parquet column of a type
that is not text or a number (a list, a struct) makes the file unreadable, naming the column.
Compressed CSVs are not recognised.
"""

from __future__ import annotations

import polars as pl

from benchroute.transforms.ids import ModelNames

from .source_files import (
    require_types,
    Check,
    apply_checks,
    base_name,
    csv_header,
    drop_duplicates,
    empty_text,
    list_files,
    open_url,
    parquet_columns,
    read_csv_strings,
    read_parquet,
    row_label,
    with_input_ids,
)
from .base import IngestResult, UnreadableSource, from_frames

KIND = "long_table"

REQUIRED = ("input", "dataset", "model", "metric", "value")
OPTIONAL = ("split", "source_instance_id", "run_id", "perturbation")
_TEXT_COLUMNS = ("input", "dataset", "model", "metric")
_PARQUET_TYPES = {
    **{c: "scalar_text" for c in (*_TEXT_COLUMNS, *OPTIONAL)},
    "value": "number_or_text",
}


# A header naming ``input`` and at least this many of the required columns in all is a long
# table with a column missing: it is a unit, so that reading it reports the missing column.
# (Without ``input`` it is some other table, e.g. a canonical outcomes table: not a unit, and
# discovery reports it as not a benchmark layout.)
NEAR_MISS = 3


def find_units(fs, root: str) -> list[str]:
    """CSV and Parquet files whose header names the required columns (``input`` and
    ``NEAR_MISS`` of them in all, at least: reading one that lacks some reports which)."""
    return [p for p in list_files(fs, root) if _near(set(_columns(fs, p)))]


def _near(columns: set[str]) -> bool:
    return "input" in columns and len(set(REQUIRED) & columns) >= NEAR_MISS


def _columns(fs, path: str) -> list[str]:
    """Column names from a CSV's first line or a Parquet footer ([] for other files)."""
    name = base_name(path).lower()
    if name.endswith(".csv"):
        return [c.strip() for c in csv_header(fs, path)]
    if name.endswith(".parquet"):
        return parquet_columns(fs, path)
    return []


def read(url: str, *, names: ModelNames) -> IngestResult:
    """One long-table file -> canonical tables."""
    fs, path = open_url(url)
    if base_name(path).lower().endswith(".parquet"):
        df, bad_rows = read_parquet(fs, path, url), None
        df = require_types(df, _PARQUET_TYPES, url)
    else:
        df, bad_rows = read_csv_strings(fs, path, url, source=KIND)
        df = df.rename({c: c.strip() for c in df.columns})
    missing = [c for c in REQUIRED if c not in df.columns]
    if missing:
        raise UnreadableSource(
            f"{url}: missing required column(s) {', '.join(repr(c) for c in missing)} "
            f"(a long table needs {', '.join(REQUIRED)})"
        )
    df = _with_optional(df, default_run=base_name(path))
    df = df.with_columns(number=_as_number(pl.col("value")))
    record = row_label()
    df, bad = apply_checks(df, _checks(), source=KIND, file=url, record=record)
    df = with_input_ids(df, "input")
    key = ["input_id", "dataset", "model", "metric", "run_id", "perturbation"]
    df, dup = drop_duplicates(
        df,
        key,
        source=KIND,
        file=url,
        record=record,
        field="input",
        what="row (same input, dataset, model, metric, run and perturbation)",
        value="number",
    )
    quarantine = [q for q in (bad_rows, bad, dup) if q is not None]
    return from_frames(
        source=KIND,
        unit=url,
        file=url,
        names=names,
        inputs=df.select("input_id", pl.col("input").alias("text")),
        memberships=df.select("input_id", "dataset", "split", "source_instance_id"),
        outcomes=df.select(
            "input_id",
            "dataset",
            "metric",
            pl.col("number").alias("value"),
            "run_id",
            "perturbation",
            pl.col("model").alias("source_model"),
        ),
        quarantine=pl.concat(quarantine, how="vertical_relaxed"),
    )


def _with_optional(df: pl.DataFrame, *, default_run: str) -> pl.DataFrame:
    """Optional columns filled in: nulls where absent, ``run_id`` defaulting to the file name."""
    for col in OPTIONAL:
        if col not in df.columns:
            df = df.with_columns(pl.lit(None, pl.String).alias(col))
        else:
            df = df.with_columns(pl.col(col).cast(pl.String))
    blank = lambda c: pl.when(pl.col(c).str.strip_chars() == "").then(None).otherwise(pl.col(c))  # noqa: E731
    return df.with_columns(
        blank("split").alias("split"),
        blank("source_instance_id").alias("source_instance_id"),
        blank("perturbation").alias("perturbation"),
        blank("run_id").fill_null(pl.lit(default_run)).alias("run_id"),
        *(pl.col(c).str.strip_chars() for c in ("dataset", "model", "metric")),
    )


def _as_number(value: pl.Expr) -> pl.Expr:
    """Numbers as they are; text parsed as a float, ``true``/``false`` as 1/0."""
    text = value.cast(pl.String).str.strip_chars()
    lower = text.str.to_lowercase()
    return (
        pl.when(lower == "true")
        .then(1.0)
        .when(lower == "false")
        .then(0.0)
        .otherwise(text.cast(pl.Float64, strict=False))
    )


def _checks() -> list[Check]:
    """Row rules: the four text columns non-empty, ``value`` a finite number."""
    number = pl.col("number")
    value_text = pl.col("value").cast(pl.String).str.strip_chars()
    return [
        *(Check(empty_text(c), c, f"{c} is empty", pl.col(c)) for c in _TEXT_COLUMNS),
        Check(value_text.is_null() | (value_text == ""), "value", "value is empty"),
        Check(number.is_null(), "value", "value is not a number", pl.col("value")),
        Check(~number.is_finite(), "value", "value is NaN or infinite", pl.col("value")),
    ]
