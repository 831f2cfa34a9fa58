"""RouteLLM's evaluation data (lm-sys/RouteLLM, ``routellm/evals/``).

Units, found by file name anywhere under the given root (a RouteLLM checkout or a copy):

- ``responses/mmlu_<subject>.csv`` -> dataset ``mmlu/<subject>``;
- ``gsm8k_responses.csv`` -> dataset ``gsm8k``;
- ``judgements.jsonl`` with ``question.jsonl`` beside it (MT-Bench, FastChat single-answer
  grading) -> dataset ``mt_bench``.

CSVs: one row per prompt; column ``prompt`` is the input text, every other column is a model
whose cell is ``True``/``False`` (was its answer correct) -> metric ``correct`` = 1.0/0.0.
Columns ending in ``_response`` hold generated text and are not models. A cell with any other
text (or empty) is quarantined. A prompt repeated within one file (27 times in MMLU, always
with identical correctness) is kept once; the repeat is quarantined as a duplicate. One prompt
can be in two subject files (78 are): that is one input with two memberships.

MT-Bench: the input is the question's two turns joined with a blank line. Each judgement row
(``question_id``, ``model``, ``turn``, ``score``) gives metric ``judge_score_turn1`` or
``judge_score_turn2`` (1-10); ``judge_score`` is the mean of the two turns when both are valid.
``score`` -1 (the judge's output could not be parsed) or anything outside 1-10 is quarantined.

Not read: ``contaminated_prompts.jsonl`` (prompts RouteLLM drops from *its* evaluation because
they are near-duplicates of its router training data; they are ordinary benchmark inputs for
us), ``gsm8k/test.jsonl``/``train.jsonl`` (the dataset, no model outputs) and
``benchmarks/mt-bench/*.jsonl`` (answers of two commercial routers, not of models).
``run_id`` is ``routellm:<file name>``.
"""

from __future__ import annotations

import posixpath
import re

import polars as pl

from benchroute.transforms.ids import ModelNames

from .source_files import (
    ROW,
    Check,
    apply_checks,
    base_name,
    drop_duplicates,
    empty_text,
    list_files,
    open_url,
    parent_name,
    parsed_json_records,
    read_csv_strings,
    row_label,
    with_input_ids,
)
from .base import Collector, IngestResult, UnreadableSource, from_frames, to_float

KIND = "routellm"

_MMLU = re.compile(r"^mmlu_(?P<subject>.+)\.csv$")
_GSM8K = "gsm8k_responses.csv"
_JUDGEMENTS = ("judgements.jsonl", "judgments.jsonl")
_QUESTIONS = "question.jsonl"
PROMPT = "prompt"
SCORE_RANGE = (1.0, 10.0)


def find_units(fs, root: str) -> list[str]:
    """MMLU response CSVs (in a ``responses`` folder), the GSM8K CSV and MT-Bench judgements."""
    return [p for p in list_files(fs, root) if _dataset_of(p) is not None]


def _dataset_of(path: str) -> str | None:
    """The dataset a RouteLLM file holds, from its name (None: not a RouteLLM file)."""
    name = base_name(path)
    if (m := _MMLU.match(name)) and parent_name(path) == "responses":
        return f"mmlu/{m['subject']}"
    if name == _GSM8K:
        return "gsm8k"
    if name in _JUDGEMENTS:
        return "mt_bench"
    return None


def read(url: str, *, names: ModelNames) -> IngestResult:
    """One RouteLLM file -> canonical tables."""
    dataset = _dataset_of(url)
    if dataset is None:
        raise UnreadableSource(
            f"{url}: not a RouteLLM file (expected mmlu_<subject>.csv, "
            f"{_GSM8K} or judgements.jsonl)"
        )
    if dataset == "mt_bench":
        return _read_mt_bench(url, names)
    return _read_csv(url, dataset, names)


# ------------------------------------------------------------------------------------ CSV
def _read_csv(url: str, dataset: str, names: ModelNames) -> IngestResult:
    """A wide correctness CSV (prompt + one boolean column per model) -> long outcomes."""
    fs, path = open_url(url)
    df, bad_rows = read_csv_strings(fs, path, url, source=KIND)
    models = _model_columns(df, url)
    df, bad_prompts = _prompts(df, models, url)
    outcomes, bad_cells = _correctness(df, models, dataset, url)
    return from_frames(
        source=KIND,
        unit=url,
        file=url,
        names=names,
        inputs=df.select("input_id", pl.col(PROMPT).alias("text")),
        memberships=df.select(
            "input_id",
            pl.lit(dataset).alias("dataset"),
            pl.lit(None, pl.String).alias("split"),
            pl.format("{}:{}", pl.lit(base_name(url)), pl.col(ROW)).alias("source_instance_id"),
        ),
        outcomes=outcomes,
        quarantine=pl.concat([bad_rows, bad_prompts, bad_cells], how="vertical_relaxed"),
    )


def _model_columns(df: pl.DataFrame, url: str) -> list[str]:
    """The model columns: all but ``prompt`` and the ``*_response`` text columns."""
    if PROMPT not in df.columns:
        raise UnreadableSource(f"{url}: no {PROMPT!r} column (columns: {df.columns[1:]})")
    models = [c for c in df.columns if c not in (ROW, PROMPT) and not c.endswith("_response")]
    if not models:
        raise UnreadableSource(f"{url}: no model columns besides {PROMPT!r}")
    return models


def _prompts(df: pl.DataFrame, models: list[str], url: str) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Rows with a non-empty prompt, once per prompt text, with ``input_id``; and quarantine."""
    df, empty_prompts = apply_checks(
        df,
        [Check(empty_text(PROMPT), PROMPT, "input text is empty", pl.col(PROMPT))],
        source=KIND,
        file=url,
        record=row_label(),
    )
    cells = pl.concat_str([pl.col(m).fill_null("") for m in models], separator=",")
    df, repeats = drop_duplicates(
        with_input_ids(df, PROMPT).with_columns(__cells=cells),
        ["input_id"],
        source=KIND,
        file=url,
        record=row_label(),
        field=PROMPT,
        what="prompt (same text)",
        value="__cells",
    )
    return df.drop("__cells"), pl.concat([empty_prompts, repeats], how="vertical_relaxed")


def _correctness(
    df: pl.DataFrame, models: list[str], dataset: str, url: str
) -> tuple[pl.DataFrame, pl.DataFrame]:
    """One ``correct`` outcome per (prompt, model) cell; cells not True/False are quarantined."""
    long = df.select(ROW, "input_id", *models).unpivot(
        index=[ROW, "input_id"], on=models, variable_name="source_model", value_name="raw"
    )
    flag = pl.col("raw").str.strip_chars().str.to_lowercase()
    long = long.with_columns(
        value=pl.when(flag == "true").then(1.0).when(flag == "false").then(0.0)
    )
    long, bad = apply_checks(
        long,
        [
            Check(
                pl.col("value").is_null(),
                pl.col("source_model"),
                "correctness is not True/False",
                pl.col("raw"),
            )
        ],
        source=KIND,
        file=url,
        record=row_label(),
    )
    outcomes = long.select(
        "input_id",
        pl.lit(dataset).alias("dataset"),
        pl.lit("correct").alias("metric"),
        "value",
        pl.lit(f"{KIND}:{base_name(url)}").alias("run_id"),
        "source_model",
    )
    return outcomes, bad


# ------------------------------------------------------------------------------- MT-Bench
def _read_mt_bench(url: str, names: ModelNames) -> IngestResult:
    """FastChat single-answer judgements + the questions beside them -> judge scores."""
    fs, path = open_url(url)
    questions_path = posixpath.join(posixpath.dirname(path), _QUESTIONS)
    questions_label = posixpath.join(posixpath.dirname(url), _QUESTIONS)
    if not fs.exists(questions_path):
        raise UnreadableSource(f"{url}: {_QUESTIONS} not found beside it (MT-Bench questions)")
    col = Collector(KIND, url, names)
    texts = _mt_bench_questions(fs, questions_path, questions_label, col)
    run_id = f"{KIND}:{base_name(url)}"
    turns: dict[tuple[str, str], dict[int, float]] = {}
    seen: dict[tuple, str] = {}
    for record, item in parsed_json_records(fs, path, url, col):
        parsed = _judgement(item, texts, col, url, record)
        if parsed is None:
            continue
        qid, model, turn, score = parsed
        if col.repeated(
            seen, (qid, model, turn), url, record, "question_id",
            "duplicate judgement (same question, model and turn); the first is kept",
            f"{qid}/{model}/turn {turn}",
        ):
            continue
        iid = col.add_input(
            texts[qid],
            dataset="mt_bench",
            file=url,
            record=record,
            field_="turns",
            source_instance_id=qid,
        )
        if iid is None:
            continue
        col.add_outcome(
            iid,
            dataset="mt_bench",
            model=model,
            metric=f"judge_score_turn{turn}",
            value=score,
            run_id=run_id,
            file=url,
            record=record,
        )
        turns.setdefault((iid, model), {})[turn] = score
    _add_mean_scores(col, turns, run_id=run_id, file=url)
    return col.result(url)


def _add_mean_scores(
    col: Collector, turns: dict[tuple[str, str], dict[int, float]], *, run_id: str, file: str
) -> None:
    """``judge_score`` = mean of the two turns, for each (question, model) with both valid."""
    for (iid, model), by_turn in turns.items():
        if 1 in by_turn and 2 in by_turn:
            col.add_outcome(
                iid,
                dataset="mt_bench",
                model=model,
                metric="judge_score",
                value=(by_turn[1] + by_turn[2]) / 2,
                run_id=run_id,
                file=file,
                record=None,
            )


def _mt_bench_questions(fs, path: str, label: str, col: Collector) -> dict[str, str]:
    """question_id -> the question's turns joined by a blank line (bad questions quarantined)."""
    texts: dict[str, str] = {}
    for record, item in parsed_json_records(fs, path, label, col):
        qid = item.get("question_id") if isinstance(item, dict) else None
        turns = item.get("turns") if isinstance(item, dict) else None
        if qid is None:
            col.quarantine(label, record, "question_id", "missing question_id")
        elif not isinstance(turns, list) or not turns or not all(isinstance(t, str) for t in turns):
            col.quarantine(
                label, record, "turns", "turns is not a non-empty list of strings", turns
            )
        elif str(qid) in texts:
            col.quarantine(
                label, record, "question_id", "duplicate question_id; the first is kept", qid
            )
        else:
            texts[str(qid)] = "\n\n".join(turns)
    return texts


def _judgement(item, texts: dict[str, str], col: Collector, url: str, record: str):
    """``(question_id, model, turn, score)`` of a valid judgement row, else None (quarantined)."""
    if not isinstance(item, dict):
        col.quarantine(url, record, None, f"record is {type(item).__name__}, not an object")
        return None
    for name in ("question_id", "model", "turn", "score"):
        if item.get(name) is None:
            col.quarantine(url, record, name, f"missing {name}")
            return None
    qid, model, turn = str(item["question_id"]), item["model"], to_float(item["turn"])
    if qid not in texts:
        col.quarantine(url, record, "question_id", f"question {qid} not in {_QUESTIONS}", qid)
        return None
    if not isinstance(model, str) or not model.strip():
        col.quarantine(url, record, "model", "model is not a name", model)
        return None
    if turn not in (1.0, 2.0):
        col.quarantine(url, record, "turn", "turn is not 1 or 2", item["turn"])
        return None
    score = to_float(item["score"])
    lo, hi = SCORE_RANGE
    if score is not None and score == -1:
        col.quarantine(url, record, "score", "judge output could not be parsed (score -1)", -1)
        return None
    if score is None or not (lo <= score <= hi):
        col.quarantine(
            url, record, "score", f"score is not a number in [{lo:g}, {hi:g}]", item["score"]
        )
        return None
    return qid, model, int(turn), score
