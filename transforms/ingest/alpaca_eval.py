"""AlpacaEval judge preferences (tatsu-lab/alpaca_eval ``results/<model>/<annotator>/``).

Two layouts, one mapping:

- ``annotations_long.parquet``: the flattened long table described in ``raw/alpaca_eval/
  SOURCE.md``, columns ``instruction, dataset, annotator, results_dir, reference_model, model,
  preference`` (``annotator_dir``, ``instruction_id`` used when present);
- AlpacaEval's native ``annotations.json`` (a JSON array of records ``instruction, output_1,
  generator_1, output_2, generator_2, annotator, preference, dataset, …``) found at
  ``results/<results_dir>/<annotator_dir>/annotations.json``; streamed with ijson.

Mapping: input = ``instruction``; dataset = ``alpaca_eval/<dataset>`` (``alpaca_eval`` when a
record has none); model = ``generator_2`` (``model``), the model being judged against the
reference ``generator_1`` (``reference_model``); metric = ``alpaca_eval/<annotator>``, the judge
config named in the record (it can differ from the folder: e.g. ``alpaca_eval_gpt4_0613``
records in an ``alpaca_eval_gpt4`` folder); value = ``preference`` in [1, 2] (1: the judge
prefers the reference, 2: the model; the weighted annotator gives values in between; 1.5 is a
tie). ``run_id`` = ``alpaca_eval:<annotator_dir>:<results_dir>``, so a model with two result
folders (falcon-40b-instruct) keeps both runs. ``source_instance_id`` = ``instruction_id`` when
present.

Output length: metric ``output_chars`` = the characters of the judged model's output
(``output_chars`` of the long table, ``len(output_2)`` of a native record), one per (input, model,
run) of a kept judgement; a usage measure, never a label. Where it is not recorded (or not a
finite length) nothing is emitted and nothing is quarantined.

Quarantined: preference 0 or missing/NaN (AlpacaEval's "no valid judgment"), outside [1, 2] or
not a number; a missing instruction, model or annotator; a repeated record of the same
(instruction, model, annotator, run).
"""

from __future__ import annotations

import polars as pl

from benchroute.transforms.ids import ModelNames

from .source_files import (
    Check,
    apply_checks,
    base_name,
    drop_duplicates,
    empty_text,
    first_json_record,
    not_parquet_reason,
    list_files,
    open_url,
    parent_name,
    parquet_columns,
    parsed_json_records,
    read_parquet,
    require_types,
    row_label,
    with_input_ids,
)
from .base import Collector, IngestResult, UnreadableSource, from_frames, text_problem, to_float

KIND = "alpaca_eval"

LONG_TABLE = "annotations_long.parquet"
NATIVE = "annotations.json"
REQUIRED = ["instruction", "dataset", "annotator", "results_dir", "model", "preference"]
OPTIONAL = ["annotator_dir", "instruction_id", "reference_model", "output_chars"]
OUTPUT_CHARS = "output_chars"  # metric name of the judged output's length in characters
PREFERENCE_RANGE = (1.0, 2.0)
# Rows that are not a model's judged output (SOURCE.md): AlpacaEval's placeholder "example", the
# adversarial "gpt4_gamed" entry, and a reference model judged against itself (always a tie).
NOT_MODELS = ("example", "gpt4_gamed")
NOT_A_MODEL_REASON = "not a model's judged output (AlpacaEval placeholder, or the reference judged against itself)"


def find_units(fs, root: str) -> list[str]:
    """``annotations_long.parquet`` tables and native ``annotations.json`` files.

    A folder named ``annotations_long.parquet`` is a unit too: reading it says it is a folder
    (a partitioned dataset, a copy gone wrong) instead of its files being passed over.
    """
    if fs.isdir(root):
        folders = [
            p for p in fs.find(root, withdirs=True) if base_name(p) == LONG_TABLE and fs.isdir(p)
        ]
    else:
        folders = []
    return sorted(folders + [p for p in list_files(fs, root) if _is_unit(fs, p)])


def _is_unit(fs, path: str) -> bool:
    """A long table (by its name: one that cannot be read is reported, not skipped), or a native
    file that looks like AlpacaEval's."""
    name = base_name(path)
    if name == LONG_TABLE:
        return True
    return name == NATIVE and _looks_native(fs, path)


def _looks_native(fs, path: str) -> bool:
    """The first record has ``instruction`` and ``preference`` (read from the file's start)."""
    first = first_json_record(fs, path)
    return isinstance(first, dict) and "instruction" in first and "preference" in first


def read(url: str, *, names: ModelNames) -> IngestResult:
    """One long table or one native annotations file -> canonical tables."""
    if base_name(url).endswith(".parquet"):
        return _read_long(url, names)
    return _read_native(url, names)


def metric_name(annotator: str) -> str:
    """The metric of a judge config, e.g. ``alpaca_eval/weighted_alpaca_eval_gpt4_turbo``."""
    return f"{KIND}/{annotator}"


def dataset_name(subset: str | None) -> str:
    """``alpaca_eval/<subset>`` (``alpaca_eval`` when the record names none)."""
    return f"{KIND}/{subset}" if subset else KIND


# ------------------------------------------------------------------------------ long table
def _read_long(url: str, names: ModelNames) -> IngestResult:
    """``annotations_long.parquet`` -> canonical tables (vectorised)."""
    fs, path = open_url(url)
    columns = parquet_columns(fs, path)
    if not columns:
        raise UnreadableSource(f"{url}: {not_parquet_reason(fs, path)}")
    missing = [c for c in REQUIRED if c not in columns]
    if missing:
        raise UnreadableSource(f"{url}: missing column(s) {', '.join(missing)}")
    df = require_types(read_parquet(fs, path, url, REQUIRED + OPTIONAL), _LONG_TYPES, url)
    for col in OPTIONAL:
        if col not in df.columns:
            df = df.with_columns(pl.lit(None, pl.String).alias(col))
    df = df.with_columns(pl.col("output_chars").cast(pl.Float64, strict=False))
    df = df.with_columns(
        pl.col("annotator_dir").fill_null(pl.col("annotator")),
        pl.col("preference").cast(pl.Float64, strict=False).alias("value"),
    )
    record = row_label()
    df, bad = apply_checks(df, _row_checks(), source=KIND, file=url, record=record)
    df = with_input_ids(df, "instruction")
    df = df.with_columns(
        dataset=pl.format(f"{KIND}/{{}}", pl.col("dataset").str.strip_chars()),
        metric=pl.format(f"{KIND}/{{}}", "annotator"),
        run_id=pl.format(f"{KIND}:{{}}:{{}}", "annotator_dir", "results_dir"),
    )
    df, dup = drop_duplicates(
        df,
        ["input_id", "dataset", "model", "metric", "run_id"],
        source=KIND,
        file=url,
        record=record,
        field="instruction",
        what="judgement (same instruction, model, annotator and run)",
        value="value",
    )
    return from_frames(
        source=KIND,
        unit=url,
        file=url,
        names=names,
        inputs=df.select("input_id", pl.col("instruction").alias("text")),
        memberships=df.select(
            "input_id",
            "dataset",
            pl.lit(None, pl.String).alias("split"),
            pl.col("instruction_id").cast(pl.String).alias("source_instance_id"),
        ),
        outcomes=pl.concat([
            df.select(
                "input_id",
                "dataset",
                "metric",
                "value",
                "run_id",
                pl.col("model").alias("source_model"),
            ),
            _output_lengths(df),
        ]),
        quarantine=pl.concat([bad, dup], how="vertical_relaxed"),
    )


_LONG_TYPES = {
    **{c: "text" for c in ("instruction", "dataset", "annotator", "results_dir", "model")},
    **{c: "text" for c in ("annotator_dir", "reference_model")},
    "preference": "number_or_text",
    "instruction_id": "number_or_text",
    "output_chars": "number_or_text",
}


def _output_lengths(df: pl.DataFrame) -> pl.DataFrame:
    """One ``output_chars`` outcome per (input, dataset, model, run) where it is recorded."""
    chars = pl.col("output_chars")
    return (
        df.filter(chars.is_finite() & (chars >= 0))
        .unique(["input_id", "dataset", "model", "run_id"], keep="first", maintain_order=True)
        .select(
            "input_id",
            "dataset",
            pl.lit(OUTPUT_CHARS).alias("metric"),
            chars.alias("value"),
            "run_id",
            pl.col("model").alias("source_model"),
        )
    )


def _row_checks() -> list[Check]:
    """Row rules of the long table: required text present, preference a judgment in [1, 2]."""
    lo, hi = PREFERENCE_RANGE
    value = pl.col("value")
    return [
        Check(empty_text("instruction"), "instruction", "instruction is empty"),
        Check(empty_text("model"), "model", "missing model (generator_2)"),
        Check(empty_text("annotator"), "annotator", "missing annotator"),
        Check(empty_text("results_dir"), "results_dir", "missing results_dir"),
        Check(empty_text("dataset"), "dataset", "missing dataset"),
        Check(
            pl.col("model").is_in(NOT_MODELS)
            | (pl.col("model") == pl.col("reference_model")).fill_null(False),
            "model",
            NOT_A_MODEL_REASON,
            pl.col("model"),
        ),
        Check(
            pl.col("preference").is_not_null() & value.is_null(),
            "preference",
            "preference is not a number",
            pl.col("preference"),
        ),
        Check(
            value.is_null() | value.is_nan() | (value == 0),
            "preference",
            "no valid judgment (preference 0, missing or NaN)",
            pl.col("preference"),
        ),
        Check(
            (value < lo) | (value > hi),
            "preference",
            f"preference outside [{lo:g}, {hi:g}]",
            pl.col("preference"),
        ),
    ]


# ---------------------------------------------------------------------------------- native
def _read_native(url: str, names: ModelNames) -> IngestResult:
    """A native ``results/<results_dir>/<annotator_dir>/annotations.json`` file, streamed."""
    fs, path = open_url(url)
    annotator_dir, results_dir = parent_name(path, 1), parent_name(path, 2)
    run_id = f"{KIND}:{annotator_dir}:{results_dir}"
    col = Collector(KIND, url, names)
    seen: dict[tuple[str, str, str], str] = {}
    lengths: set[tuple[str, str, str]] = set()
    for record, item in parsed_json_records(fs, path, url, col):
        parsed = _native_record(item, col, url, record, annotator_dir)
        if parsed is None:
            continue
        text, dataset, model, annotator, preference = parsed
        iid = col.add_input(text, dataset=dataset, file=url, record=record, field_="instruction")
        if iid is None:
            continue
        if col.repeated(
            seen, (iid, model, annotator), url, record, "instruction",
            "duplicate judgement (same instruction, model and annotator); the first is kept", preference,
        ):
            continue
        col.add_outcome(
            iid,
            dataset=dataset,
            model=model,
            metric=metric_name(annotator),
            value=preference,
            run_id=run_id,
            file=url,
            record=record,
        )
        output = item.get("output_2")
        if isinstance(output, str) and (iid, dataset, model) not in lengths:
            lengths.add((iid, dataset, model))
            col.add_outcome(iid, dataset=dataset, model=model, metric=OUTPUT_CHARS,
                            value=len(output), run_id=run_id, file=url, record=record)
    return col.result(url)


def _native_record(item, col: Collector, url: str, record: str, annotator_dir: str):
    """``(instruction, dataset, model, annotator, preference)`` or None (quarantined)."""
    if not isinstance(item, dict):
        col.quarantine(url, record, None, f"record is {type(item).__name__}, not an object")
        return None
    text, model = item.get("instruction"), item.get("generator_2")
    if not isinstance(text, str) or not text.strip():
        col.quarantine(url, record, "instruction", "missing instruction", text)
        return None
    if not isinstance(model, str) or not model.strip():
        col.quarantine(url, record, "generator_2", "missing model (generator_2)", model)
        return None
    if model in NOT_MODELS or model == item.get("generator_1"):
        col.quarantine(url, record, "generator_2", NOT_A_MODEL_REASON, model)
        return None
    annotator = item.get("annotator") or annotator_dir
    subset = item.get("dataset")
    for name, value in (
        ("instruction", text), ("generator_2", model), ("annotator", annotator), ("dataset", subset)
    ):
        if problem := text_problem(value):
            col.quarantine(url, record, name, problem, value)
            return None
    if not isinstance(annotator, str):
        col.quarantine(url, record, "annotator", "annotator is not text", annotator)
        return None
    raw = item.get("preference")
    preference = to_float(raw)
    lo, hi = PREFERENCE_RANGE
    if raw is not None and preference is None:
        col.quarantine(url, record, "preference", "preference is not a number", raw)
        return None
    if preference is None or preference != preference or preference == 0:
        col.quarantine(
            url, record, "preference", "no valid judgment (preference 0, missing or NaN)", raw
        )
        return None
    if not lo <= preference <= hi:
        col.quarantine(
            url,
            record,
            "preference",
            f"preference outside [{lo:g}, {hi:g}]",
            item.get("preference"),
        )
        return None
    return (
        text,
        dataset_name(subset if isinstance(subset, str) else None),
        model,
        annotator,
        preference,
    )
