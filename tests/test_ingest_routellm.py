"""The RouteLLM reader: values against an independent read of the CSVs/JSONL, bad input."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import fsspec
import polars as pl
import pytest
from fsspec.core import url_to_fs

from benchroute.transforms.ids import ModelNames, input_id
from benchroute.transforms.ingest import routellm
from benchroute.transforms.ingest.base import UnreadableSource

FIXTURE = Path(__file__).parent / "fixtures" / "routellm"
EVALS = FIXTURE / "routellm" / "evals"
RESPONSES = EVALS / "mmlu" / "responses"
GSM8K = EVALS / "gsm8k" / "gsm8k_responses.csv"
MT_BENCH = EVALS / "mt_bench"
MODELS = ["mistralai/Mixtral-8x7B-Instruct-v0.1", "gpt-4-1106-preview"]
NAMES = ModelNames()


def read(path: Path | str):
    return routellm.read(str(path), names=NAMES)


def copy_tree(tmp_path: Path) -> Path:
    dst = tmp_path / "copy"
    shutil.copytree(FIXTURE, dst)
    return dst / "routellm" / "evals"


# ------------------------------------------------------------------------------ discovery
def test_find_units_by_file_name():
    fs, root = url_to_fs(str(FIXTURE))
    names = sorted(Path(p).name for p in routellm.find_units(fs, root))
    assert names == [
        "gsm8k_responses.csv",
        "judgements.jsonl",
        "mmlu_clinical_knowledge.csv",
        "mmlu_college_medicine.csv",
        "mmlu_college_physics.csv",
    ]
    one = str(RESPONSES / "mmlu_college_physics.csv")
    assert routellm.find_units(fs, one) == [one]


def test_mmlu_csv_outside_a_responses_folder_is_not_claimed(tmp_path):
    (tmp_path / "mmlu_anatomy.csv").write_text("prompt,m\nq,True\n")
    fs, root = url_to_fs(str(tmp_path))
    assert routellm.find_units(fs, root) == []


# ------------------------------------------------------------------------------------ CSV
@pytest.mark.parametrize("name", ["mmlu_clinical_knowledge.csv", "mmlu_college_medicine.csv"])
def test_mmlu_accuracy_per_model_matches_polars(name):
    result = read(RESPONSES / name)
    raw = pl.read_csv(RESPONSES / name)  # polars infers the True/False columns as Boolean
    assert raw.schema[MODELS[1]] == pl.Boolean
    assert result.quarantine.height == 0
    assert result.inputs.height == result.memberships.height == raw.height
    assert result.outcomes.height == 2 * raw.height
    subject = name.removeprefix("mmlu_").removesuffix(".csv")
    assert set(result.outcomes["dataset"]) == {f"mmlu/{subject}"}
    assert set(result.outcomes["metric"]) == {"correct"}
    assert set(result.outcomes["run_id"]) == {f"routellm:{name}"}
    got = dict(result.outcomes.group_by("source_model").agg(pl.col("value").mean()).iter_rows())
    for model in MODELS:
        assert got[model] == pytest.approx(raw[model].cast(pl.Float64).mean())


def test_values_per_prompt_match_the_csv():
    result = read(RESPONSES / "mmlu_clinical_knowledge.csv")
    raw = pl.read_csv(RESPONSES / "mmlu_clinical_knowledge.csv")
    expected = {
        (input_id(row["prompt"]), model): float(row[model])
        for row in raw.iter_rows(named=True)
        for model in MODELS
    }
    got = {
        (r["input_id"], r["source_model"]): r["value"]
        for r in result.outcomes.iter_rows(named=True)
    }
    assert got == expected
    texts = dict(result.inputs.iter_rows())
    assert texts[input_id(raw["prompt"][0])] == raw["prompt"][0]


def test_a_prompt_in_two_subjects_is_one_input_with_two_memberships():
    a = read(RESPONSES / "mmlu_clinical_knowledge.csv")
    b = read(RESPONSES / "mmlu_college_medicine.csv")
    shared = set(a.inputs["input_id"]) & set(b.inputs["input_id"])
    prompts = [
        set(pl.read_csv(RESPONSES / n)["prompt"])
        for n in ("mmlu_clinical_knowledge.csv", "mmlu_college_medicine.csv")
    ]
    assert shared == {input_id(p) for p in prompts[0] & prompts[1]}
    assert len(shared) >= 5
    members = pl.concat([a.memberships, b.memberships]).filter(
        pl.col("input_id").is_in(list(shared))
    )
    per_input = members.group_by("input_id").agg(pl.col("dataset").sort())
    assert per_input.height == len(shared)
    pairs = per_input["dataset"].to_list()
    assert all(d == ["mmlu/clinical_knowledge", "mmlu/college_medicine"] for d in pairs)


def test_repeated_prompt_in_one_file_is_kept_once():
    raw = pl.read_csv(RESPONSES / "mmlu_college_physics.csv")
    result = read(RESPONSES / "mmlu_college_physics.csv")
    assert raw.height == 12 and raw["prompt"].n_unique() == 11
    assert result.inputs.height == 11
    assert result.outcomes.height == 22
    (q,) = result.quarantine.iter_rows(named=True)
    assert q["field"] == "prompt" and "duplicate prompt" in q["reason"]
    assert "(same value)" in q["reason"]
    second = raw.with_row_index("row", offset=1).filter(pl.col("prompt").is_duplicated())["row"][1]
    first = raw.with_row_index("row", offset=1).filter(pl.col("prompt").is_duplicated())["row"][0]
    assert q["record"] == f"row {second} (repeats row {first})"


def test_gsm8k_response_columns_are_not_models():
    result = read(GSM8K)
    raw = pl.read_csv(GSM8K)
    assert any(c.endswith("_response") for c in raw.columns)
    assert set(result.outcomes["source_model"]) == set(MODELS)
    assert set(result.outcomes["dataset"]) == {"gsm8k"}
    assert result.outcomes.height == 2 * raw.height == 40
    assert result.models.height == 2


def test_bad_cells_are_quarantined_and_the_rest_read(tmp_path):
    raw = pl.read_csv(RESPONSES / "mmlu_clinical_knowledge.csv", infer_schema=False)
    bad = raw.with_columns(
        pl.when(pl.int_range(pl.len()) == 0)
        .then(pl.lit("maybe"))
        .when(pl.int_range(pl.len()) == 1)
        .then(pl.lit(None))
        .otherwise(pl.col(MODELS[0]))
        .alias(MODELS[0]),
        pl.when(pl.int_range(pl.len()) == 2)
        .then(pl.lit("   "))
        .otherwise(pl.col("prompt"))
        .alias("prompt"),
    )
    path = tmp_path / "responses" / "mmlu_clinical_knowledge.csv"
    path.parent.mkdir()
    bad.write_csv(path)
    result = read(path)
    q = {(r["record"], r["field"]): r for r in result.quarantine.iter_rows(named=True)}
    assert set(q) == {("row 1", MODELS[0]), ("row 2", MODELS[0]), ("row 3", "prompt")}
    assert q["row 1", MODELS[0]]["value"] == "maybe"
    assert "True/False" in q["row 1", MODELS[0]]["reason"]
    assert "empty" in q["row 3", "prompt"]["reason"]
    # 19 good prompts x 2 models, less the two bad cells of row 1 and row 2
    assert result.inputs.height == 19
    assert result.outcomes.height == 19 * 2 - 2


def test_non_utf8_row_is_quarantined(tmp_path):
    data = (RESPONSES / "mmlu_college_physics.csv").read_bytes()
    lines = data.split(b"\n")
    lines[1] = lines[1].replace(b"quantum", b"qu\xe9ntum", 1)  # a Latin-1 byte in the first prompt
    path = tmp_path / "responses" / "mmlu_college_physics.csv"
    path.parent.mkdir()
    path.write_bytes(b"\n".join(lines))
    result = read(path)
    reasons = result.quarantine.filter(pl.col("field") == "row")["reason"].to_list()
    assert len(reasons) == 1 and "UTF-8" in reasons[0]
    assert result.inputs.height == 10  # 11 distinct prompts, one lost


@pytest.mark.parametrize(
    "content, match",
    [
        (b"", "empty"),
        (b"\xff\xfe\x00garbage", "prompt"),
        (b"question,gpt-4\nq,True\n", "no 'prompt' column"),
        (b"prompt,gpt-4_response\nq,text\n", "no model columns"),
    ],
)
def test_unreadable_csv_names_the_file(tmp_path, content, match):
    path = tmp_path / "responses" / "mmlu_x.csv"
    path.parent.mkdir()
    path.write_bytes(content)
    with pytest.raises(UnreadableSource, match=match) as err:
        read(path)
    assert "mmlu_x.csv" in str(err.value)


# ------------------------------------------------------------------------------- MT-Bench
def _judgements(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_mt_bench_scores_match_the_judgements():
    result = read(MT_BENCH / "judgements.jsonl")
    questions = {q["question_id"]: q for q in _judgements(MT_BENCH / "question.jsonl")}
    rows = _judgements(MT_BENCH / "judgements.jsonl")
    assert result.quarantine.height == 0
    assert result.inputs.height == 5
    text = dict(result.inputs.iter_rows())
    for q in questions.values():
        assert text[input_id("\n\n".join(q["turns"]))] == "\n\n".join(q["turns"])
    assert set(result.memberships["source_instance_id"]) == {str(q) for q in questions}
    got = {
        (r["input_id"], r["source_model"], r["metric"]): r["value"]
        for r in result.outcomes.iter_rows(named=True)
    }
    expected: dict = {}
    for r in rows:
        iid = input_id("\n\n".join(questions[r["question_id"]]["turns"]))
        expected[iid, r["model"], f"judge_score_turn{r['turn']}"] = float(r["score"])
    for (iid, model, metric), v in list(expected.items()):
        if metric.endswith("turn1"):
            expected[iid, model, "judge_score"] = (
                v + expected[iid, model, "judge_score_turn2"]
            ) / 2
    assert got == expected
    assert set(result.outcomes["dataset"]) == {"mt_bench"}
    assert set(result.outcomes["run_id"]) == {"routellm:judgements.jsonl"}


def test_mt_bench_bad_records(tmp_path):
    evals = copy_tree(tmp_path)
    path = evals / "mt_bench" / "judgements.jsonl"
    rows = _judgements(path)
    lines = [json.dumps(r) for r in rows]
    rows[0]["score"] = -1  # judge parse failure
    rows[1]["score"] = 11  # out of range
    rows[2]["score"] = "ten"
    del rows[3]["model"]
    rows[4]["question_id"] = 999  # not a question
    lines[:5] = [json.dumps(r) for r in rows[:5]]
    lines[5] = lines[5][: len(lines[5]) // 2]  # truncated line
    lines.append(lines[6])  # a repeated judgement
    path.write_text("\n".join(lines) + "\n")
    result = read(path)
    q = {r["record"]: r for r in result.quarantine.iter_rows(named=True)}
    assert "judge output could not be parsed" in q["line 1"]["reason"]
    assert "[1, 10]" in q["line 2"]["reason"] and q["line 2"]["value"] == "11"
    assert "[1, 10]" in q["line 3"]["reason"]
    assert q["line 4"]["field"] == "model"
    assert "not in question.jsonl" in q["line 5"]["reason"]
    assert q["line 6"]["reason"] == "invalid JSON line"
    assert q["line 21 (repeats line 7)"]["reason"].startswith("duplicate judgement")
    assert len(q) == 7
    turns = result.outcomes.filter(pl.col("metric").str.starts_with("judge_score_turn"))
    assert turns.height == 20 - 6
    # judge_score only where both turns of a (question, model) survived
    both = turns.group_by("input_id", "source_model").len().filter(pl.col("len") == 2).height
    assert result.outcomes.filter(pl.col("metric") == "judge_score").height == both


def test_mt_bench_without_questions_is_unreadable(tmp_path):
    path = tmp_path / "judgements.jsonl"
    shutil.copy(MT_BENCH / "judgements.jsonl", path)
    with pytest.raises(UnreadableSource, match="question.jsonl"):
        read(path)


@pytest.mark.parametrize("content, match", [(b"", "empty"), (b"not json at all\n", "not JSON")])
def test_unreadable_judgements(tmp_path, content, match):
    evals = copy_tree(tmp_path)
    path = evals / "mt_bench" / "judgements.jsonl"
    path.write_bytes(content)
    with pytest.raises(UnreadableSource, match=match):
        read(path)


# -------------------------------------------------------------------------------- memory
def test_reads_from_memory_filesystem(memory_url):
    fs = fsspec.filesystem("memory")
    root = fs._strip_protocol(memory_url)
    for p in FIXTURE.rglob("*"):
        if p.is_file():
            fs.pipe_file(f"{root}/{p.relative_to(FIXTURE).as_posix()}", p.read_bytes())
    units = routellm.find_units(fs, root)
    assert len(units) == 5
    for unit in units:
        local = FIXTURE / Path(unit).relative_to(root)
        got = routellm.read(fs.unstrip_protocol(unit), names=NAMES)
        want = read(local)
        assert got.counts() == want.counts()
        assert got.outcomes.drop("run_id").equals(want.outcomes.drop("run_id"))


# --------------------------------------------------------------------------- real source
@pytest.mark.slow
def test_whole_real_source(raw_data):
    """All of raw/routellm: headline counts of its SOURCE.md."""
    fs, root = url_to_fs(str(raw_data / "routellm"))
    units = routellm.find_units(fs, root)
    results = [routellm.read(u, names=ModelNames.default()) for u in units]
    outcomes = pl.concat([r.outcomes for r in results])
    members = pl.concat([r.memberships for r in results])
    quarantine = pl.concat([r.quarantine for r in results])
    mmlu = outcomes.filter(pl.col("dataset").str.starts_with("mmlu/"))
    assert mmlu["dataset"].n_unique() == 57
    # 14,042 rows; 27 repeat a prompt of the same file (identical values): kept once
    dups = quarantine.filter(pl.col("reason").str.contains("duplicate prompt"))
    assert dups.height == 27 and dups["reason"].str.contains("same value").all()
    assert mmlu.height == 2 * (14_042 - 27)
    assert quarantine.height == 27
    mmlu_members = members.filter(pl.col("dataset").str.starts_with("mmlu/"))
    assert mmlu_members["input_id"].n_unique() == 13_937
    assert (mmlu_members.group_by("input_id").len()["len"] == 2).sum() == 78
    acc = dict(mmlu.group_by("source_model").agg(pl.col("value").mean()).iter_rows())
    assert acc["gpt-4-1106-preview"] == pytest.approx(0.806, abs=0.005)
    assert acc["mistralai/Mixtral-8x7B-Instruct-v0.1"] == pytest.approx(0.681, abs=0.005)
    gsm = outcomes.filter(pl.col("dataset") == "gsm8k")
    assert gsm.height == 2 * 1_319
    acc = dict(gsm.group_by("source_model").agg(pl.col("value").mean()).iter_rows())
    assert acc["gpt-4-1106-preview"] == pytest.approx(0.857, abs=0.001)
    assert acc["mistralai/Mixtral-8x7B-Instruct-v0.1"] == pytest.approx(0.638, abs=0.001)
    mt = outcomes.filter(pl.col("dataset") == "mt_bench")
    assert mt.filter(pl.col("metric").str.starts_with("judge_score_turn")).height == 320
    assert mt.filter(pl.col("metric") == "judge_score").height == 160
    assert mt["input_id"].n_unique() == 80


def test_reads_from_s3(s3_server, tmp_path):
    fs, bucket = url_to_fs(s3_server)
    root = f"{bucket}/routellm-{tmp_path.name}"
    for p in FIXTURE.rglob("*"):
        if p.is_file():
            fs.put_file(str(p), f"{root}/{p.relative_to(FIXTURE).as_posix()}")
    units = routellm.find_units(fs, root)
    assert len(units) == 5
    for unit in units:
        got = routellm.read(f"s3://{unit}", names=NAMES)
        want = read(FIXTURE / Path(unit).relative_to(root))
        assert got.outcomes.drop("run_id").equals(want.outcomes.drop("run_id"))
