"""MMLU-Pro per-question results (TIGER-AI-Lab/MMLU-Pro ``eval_results/``, flattened).

A unit is a folder holding ``questions.parquet`` and ``results.parquet`` (and optionally
``question_variants.parquet``); see ``raw/mmlu_pro/SOURCE.md`` for the columns.

- Input text: the question, a newline, then the options as ``A. …`` lines (letters A-J), in the
  version the model saw: a result row with ``qvar = 0`` saw the ``questions.parquet`` row, one
  with ``qvar > 0`` the ``question_variants.parquet`` row with the same (question_id, qvar).
  Text normalisation collapses whitespace, so a variant that differs only in whitespace is the
  same input; one with permuted or edited options is a different input.
- Dataset ``mmlu_pro/<category>``; ``source_instance_id`` is the question id (``<id>#v<qvar>`` for
  a variant); ``run_id`` is ``mmlu_pro:<model>``.
- Metrics ``correct_rx`` (one extraction rule for every model: the one to label with) and
  ``correct`` (the repo's stored prediction), each 1.0/0.0; a null is quarantined. Plus
  ``output_chars``, the length of the model's output (``out_chars``, when the column is there):
  a usage measure, never a label; a missing, non-finite or negative length is not emitted.
- Answer positions (issue 15, for the selection-bias measure RStd; never labels), when the
  columns are there: ``gold_position``, the 0-based index in A-J of ``graded_answer`` (the
  correct letter of the version the model saw), and ``pred_position``, the index of ``pred_rx``
  (the letter behind ``correct_rx``), -1 when no letter was extracted. A row without a valid
  ``graded_answer`` gets neither.
- MMLU-Pro holds questions with the same text under two ids (159 pairs). They are one input;
  for each model the result of the lowest question id is kept and the other is quarantined
  (one row per dropped question: record ``question_id=894 (same text as question_id=893)``,
  value ``28 result rows in mmlu_pro/law``).

Everything is vectorised (joins on the id columns); only the distinct texts are hashed.
"""

from __future__ import annotations

import posixpath

import polars as pl

from benchroute.schemas import empty
from benchroute.transforms.ids import ModelNames, input_ids

from .source_files import (
    ROW,
    Check,
    apply_checks,
    base_name,
    drop_duplicates,
    empty_text,
    not_parquet_reason,
    open_url,
    parquet_columns,
    quarantine_rows,
    read_parquet,
    require_types,
)
from .base import IngestResult, UnreadableSource, from_frames

KIND = "mmlu_pro"

QUESTIONS = "questions.parquet"
RESULTS = "results.parquet"
VARIANTS = "question_variants.parquet"
LETTERS = "ABCDEFGHIJ"
METRICS = ("correct_rx", "correct")
OUTPUT_CHARS = "output_chars"  # metric name of ``out_chars``, the output's length in characters
GOLD_POSITION, PRED_POSITION = "gold_position", "pred_position"  # answer positions (never labels)
_OPTIONAL_COLS = ("out_chars", "graded_answer", "pred_rx")
_QUESTION_COLS = ["question_id", "category", "question", "options"]
_RESULT_COLS = ["question_id", "model", "qvar", *METRICS]


def find_units(fs, root: str) -> list[str]:
    """Folders that hold both ``questions.parquet`` and ``results.parquet``.

    Either may be anything by that name (a folder, a dangling link): the folder is still a unit,
    and reading it reports what is wrong, instead of the folder being passed over in silence.
    """
    if fs.isfile(root):
        return []
    entries = set(fs.find(root, withdirs=True))
    return sorted(
        posixpath.dirname(p)
        for p in entries
        if base_name(p) == QUESTIONS and posixpath.join(posixpath.dirname(p), RESULTS) in entries
    )


def read(url: str, *, names: ModelNames) -> IngestResult:
    """One MMLU-Pro folder -> canonical tables."""
    fs, root = open_url(url)
    root = root.rstrip("/")
    label = str(url).rstrip("/")
    r_file = f"{label}/{RESULTS}"
    versions, bad = _all_versions(fs, root, label)
    quarantine = [bad]

    optional = [c for c in _OPTIONAL_COLS if c in parquet_columns(fs, f"{root}/{RESULTS}")]
    results = _load(fs, f"{root}/{RESULTS}", r_file, _RESULT_COLS + optional)
    results, bad = _results(results, versions, r_file)
    quarantine.append(bad)

    results, bad = _drop_same_text_repeats(results, r_file)
    quarantine.append(bad)

    outcomes, bad = _outcomes(results, r_file)
    quarantine.append(bad)
    used = versions.join(results.select("qid", "qvar").unique(), on=["qid", "qvar"], how="semi")
    used = used.sort("qid", "qvar")
    return from_frames(
        source=KIND,
        unit=label,
        file=r_file,
        names=names,
        inputs=used.select("input_id", "text"),
        memberships=used.select(
            "input_id",
            "dataset",
            pl.lit(None, pl.String).alias("split"),
            "source_instance_id",
        ),
        outcomes=outcomes,
        quarantine=pl.concat(quarantine, how="vertical_relaxed"),
    )


def _all_versions(fs, root: str, label: str) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Every question version a model can have seen: canonical (qvar 0) and variants."""
    q_file, v_file = f"{label}/{QUESTIONS}", f"{label}/{VARIANTS}"
    questions = _load(fs, f"{root}/{QUESTIONS}", q_file, _QUESTION_COLS)
    versions, bad = _versions(questions.with_columns(qvar=pl.lit(0, pl.Int8)), q_file)
    if not _entry_exists(fs, f"{root}/{VARIANTS}"):
        return versions, bad
    variants = _load(fs, f"{root}/{VARIANTS}", v_file, [*_QUESTION_COLS, "qvar"])
    more, more_bad = _versions(variants, v_file)
    versions = pl.concat([versions, more.filter(pl.col("qvar") > 0)], how="vertical_relaxed")
    return versions, pl.concat([bad, more_bad], how="vertical_relaxed")


def _entry_exists(fs, path: str) -> bool:
    """Whether anything is at ``path``: a file, a folder, or a link whose target is missing."""
    if fs.exists(path):
        return True
    try:
        return path in fs.find(posixpath.dirname(path), maxdepth=1, withdirs=True)
    except OSError:
        return False


_TYPES = {
    "question_id": "int",
    "qvar": "int",
    "category": "text",
    "question": "text",
    "options": "text_list",
    "model": "text",
    "correct_rx": "flag",
    "correct": "flag",
    "out_chars": "number",
    "graded_answer": "text",
    "pred_rx": "text",
}


def _load(fs, path: str, label: str, columns: list[str]) -> pl.DataFrame:
    """The needed columns of one Parquet table; a missing column or one of the wrong type makes
    the unit unreadable (naming the file and the column)."""
    present = parquet_columns(fs, path)
    if not present:
        raise UnreadableSource(f"{label}: {not_parquet_reason(fs, path)}")
    missing = [c for c in columns if c not in present]
    if missing:
        raise UnreadableSource(f"{label}: missing column(s) {', '.join(missing)}")
    return require_types(read_parquet(fs, path, label, columns), _TYPES, label)


def _checked_unique(
    df: pl.DataFrame, checks: list[Check], key: list[str], what: str, *, file: str, record: pl.Expr
) -> tuple[pl.DataFrame, pl.DataFrame]:
    """The rows passing ``checks``, the first of each ``key`` (a repeat is quarantined as a
    repeated ``what`` in the field question_id), and the quarantine rows."""
    df, bad = apply_checks(df, checks, source=KIND, file=file, record=record)
    df, dup = drop_duplicates(
        df, key, source=KIND, file=file, record=record, field="question_id", what=what
    )
    return df, pl.concat([bad, dup], how="vertical_relaxed")


def _versions(df: pl.DataFrame, file: str) -> tuple[pl.DataFrame, pl.DataFrame]:
    """One row per (question, version): qid, qvar, text, input_id, dataset, source_instance_id."""
    n_options = pl.col("options").list.len()
    df, bad = _checked_unique(
        df.with_columns(
            pl.col("question_id").cast(pl.Int64).alias("qid"), pl.col("qvar").cast(pl.Int64)
        ),
        [
            Check(pl.col("qid").is_null(), "question_id", "missing question_id"),
            Check(empty_text("question"), "question", "question text is empty", pl.col("question")),
            Check(empty_text("category"), "category", "missing category"),
            Check(pl.col("options").is_null() | (n_options == 0), "options", "no options"),
            Check(
                n_options > len(LETTERS),
                "options",
                f"more than {len(LETTERS)} options (letters A-J)",
                n_options,
            ),
            Check(
                pl.col("options").list.eval(pl.element().is_null()).list.any(),
                "options",
                "an option is null",
            ),
        ],
        ["qid", "qvar"],
        "question",
        file=file,
        record=_qrecord(),
    )
    letter = pl.lit(LETTERS).str.slice(pl.int_range(pl.len()), 1)
    options = pl.col("options").list.eval(pl.format("{}. {}", letter, pl.element())).list.join("\n")
    df = df.with_columns(text=pl.format("{}\n{}", pl.col("question"), options))
    df = df.with_columns(
        input_id=input_ids(df["text"]),
        dataset=pl.format("mmlu_pro/{}", pl.col("category").str.strip_chars()),
        source_instance_id=pl.when(pl.col("qvar") == 0)
        .then(pl.col("qid").cast(pl.String))
        .otherwise(pl.format("{}#v{}", "qid", "qvar")),
    )
    cols = ["qid", "qvar", "text", "input_id", "dataset", "source_instance_id"]
    return df.select(cols), bad


def _results(results: pl.DataFrame, versions: pl.DataFrame, file: str):
    """Result rows joined to the question version each model saw (unmatched ones quarantined)."""
    results = results.with_columns(
        pl.col("question_id").cast(pl.Int64).alias("qid"),
        pl.col("qvar").cast(pl.Int64).fill_null(0),
    )
    results, bad = _checked_unique(
        results,
        [
            Check(pl.col("qid").is_null(), "question_id", "missing question_id"),
            Check(empty_text("model"), "model", "missing model name"),
        ],
        ["qid", "model"],
        "result row (same question and model)",
        file=file,
        record=_rrecord(),
    )
    joined = results.join(versions, on=["qid", "qvar"], how="left")
    missing = joined.filter(pl.col("input_id").is_null())
    reason = (
        pl.when(pl.col("qvar") == 0)
        .then(pl.lit(f"question not in {QUESTIONS}"))
        .otherwise(pl.format(f"question variant {{}} not in {VARIANTS}", "qvar"))
    )
    unmatched = quarantine_rows(
        missing,
        source=KIND,
        file=file,
        record=_rrecord(),
        field="question_id",
        reason=reason,
        value=pl.col("qid"),
    )
    kept = joined.filter(pl.col("input_id").is_not_null())
    return kept, pl.concat([bad, unmatched], how="vertical_relaxed")


def _drop_same_text_repeats(results: pl.DataFrame, file: str):
    """Per (input, dataset, model) keep the lowest question id; quarantine the other ids."""
    group = ["input_id", "dataset", "model"]
    shared = (
        results.group_by("input_id", "dataset")
        .agg(pl.col("qid").n_unique().alias("n"))
        .filter(pl.col("n") > 1)
        .select("input_id", "dataset")
    )
    if shared.height == 0:
        return results, empty("quarantine")
    affected = results.join(shared, on=["input_id", "dataset"], how="semi").sort("qid", "qvar", ROW)
    affected = affected.with_columns(
        __rank=pl.int_range(pl.len()).over(group), __kept=pl.col("qid").first().over(group)
    )
    dropped = affected.filter(pl.col("__rank") > 0)
    per_question = dropped.group_by("qid", "qvar", "__kept", "dataset").agg(pl.len().alias("n"))
    bad = quarantine_rows(
        per_question.sort("qid"),
        source=KIND,
        file=file,
        record=pl.format("question_id={} (same text as question_id={})", "qid", "__kept"),
        field="question",
        reason=pl.lit(
            "same text as a lower question id of the dataset: this question's result rows are not "
            "kept where that question has the model's result"
        ),
        value=pl.format("{} result rows in {}", "n", "dataset"),
    )
    kept = pl.concat(
        [
            results.join(shared, on=["input_id", "dataset"], how="anti"),
            affected.filter(pl.col("__rank") == 0).drop("__rank", "__kept"),
        ]
    )
    return kept, bad


def _outcomes(results: pl.DataFrame, file: str) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Long outcomes: one row per (result row, metric), nulls quarantined."""
    long = results.select(ROW, "qid", "model", "input_id", "dataset", *METRICS).unpivot(
        index=[ROW, "qid", "model", "input_id", "dataset"],
        on=list(METRICS),
        variable_name="metric",
        value_name="flag",
    )
    long, bad = apply_checks(
        long,
        [Check(pl.col("flag").is_null(), pl.col("metric"), "correctness is null")],
        source=KIND,
        file=file,
        record=_rrecord(),
    )
    outcomes = long.select(
        "input_id",
        "dataset",
        "metric",
        pl.col("flag").cast(pl.Float64).alias("value"),
        pl.format(f"{KIND}:{{}}", "model").alias("run_id"),
        pl.col("model").alias("source_model"),
    )
    if "out_chars" in results.columns:
        chars = pl.col("out_chars").cast(pl.Float64)
        lengths = results.filter(chars.is_finite() & (chars >= 0)).select(
            "input_id",
            "dataset",
            pl.lit(OUTPUT_CHARS).alias("metric"),
            chars.alias("value"),
            pl.format(f"{KIND}:{{}}", "model").alias("run_id"),
            pl.col("model").alias("source_model"),
        )
        outcomes = pl.concat([outcomes, lengths])
    if {"graded_answer", "pred_rx"} <= set(results.columns):
        outcomes = pl.concat([outcomes, _positions(results)])
    return outcomes, bad


def _positions(results: pl.DataFrame) -> pl.DataFrame:
    """``gold_position`` and ``pred_position`` outcomes of the rows with a valid gold letter."""
    def index(column: str) -> pl.Expr:  # 0-based index in A-J of a one-letter value, else null
        letter = pl.col(column).str.strip_chars()
        return pl.when(letter.str.len_chars() == 1).then(
            pl.lit(LETTERS).str.find(letter, literal=True))

    rows = results.with_columns(__gold=index("graded_answer"), __pred=index("pred_rx").fill_null(-1))
    rows = rows.filter(pl.col("__gold").is_not_null())
    return pl.concat(
        rows.select(
            "input_id",
            "dataset",
            pl.lit(metric).alias("metric"),
            pl.col(column).cast(pl.Float64).alias("value"),
            pl.format(f"{KIND}:{{}}", "model").alias("run_id"),
            pl.col("model").alias("source_model"),
        )
        for metric, column in ((GOLD_POSITION, "__gold"), (PRED_POSITION, "__pred"))
    )


def _qrecord() -> pl.Expr:
    return pl.format("row {} (question_id={}, qvar={})", ROW, "question_id", "qvar")


def _rrecord() -> pl.Expr:
    return pl.format("row {} (question_id={}, model={})", ROW, "qid", "model")
