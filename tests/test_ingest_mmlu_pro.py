"""The MMLU-Pro reader: texts and values against the raw tables, variants, duplicates, bad input."""

from __future__ import annotations

import shutil
from pathlib import Path

import fsspec
import polars as pl
import pytest
from fsspec.core import url_to_fs

from benchroute.transforms.ids import ModelNames, input_id, normalize_text
from benchroute.transforms.ingest import mmlu_pro
from benchroute.transforms.ingest.base import UnreadableSource

FIXTURE = Path(__file__).parent / "fixtures" / "mmlu_pro"
NAMES = ModelNames()
LETTERS = "ABCDEFGHIJ"
RAW_METRICS = {"correct_rx": "correct_rx", "correct": "correct", "output_chars": "out_chars"}
POSITIONS = ("gold_position", "pred_position")  # answer positions: from graded_answer / pred_rx
N_METRICS = len(RAW_METRICS) + len(POSITIONS)  # outcomes per result row


def read(folder: Path | str):
    return mmlu_pro.read(str(folder), names=NAMES)


def text_of(row: dict) -> str:
    """The input text, built independently of the reader."""
    options = "\n".join(f"{LETTERS[i]}. {o}" for i, o in enumerate(row["options"]))
    return f"{row['question']}\n{options}"


def tables(folder: Path = FIXTURE):
    return tuple(
        pl.read_parquet(folder / f"{t}.parquet")
        for t in ("questions", "results", "question_variants")
    )


@pytest.fixture
def copy(tmp_path) -> Path:
    dst = tmp_path / "mmlu_pro"
    shutil.copytree(FIXTURE, dst)
    return dst


@pytest.fixture(scope="module")
def result():
    return read(FIXTURE)


def variant_kind(question: dict, variant: dict) -> str:
    same_q = normalize_text(question["question"]) == normalize_text(variant["question"])
    opts = [normalize_text(o) for o in question["options"]]
    vopts = [normalize_text(o) for o in variant["options"]]
    if same_q and opts == vopts:
        return "whitespace"
    if sorted(opts) == sorted(vopts) and opts != vopts:
        return "permuted"
    return "edited"


# ------------------------------------------------------------------------------ discovery
def test_find_units(tmp_path):
    fs, root = url_to_fs(str(FIXTURE.parent))
    assert mmlu_pro.find_units(fs, root) == [str(FIXTURE)]
    shutil.copy(FIXTURE / "questions.parquet", tmp_path / "questions.parquet")
    assert mmlu_pro.find_units(fs, str(tmp_path)) == []  # no results.parquet beside it


# ------------------------------------------------------------------------- texts, values
def test_outcomes_equal_the_raw_results(result):
    q, r, v = tables()
    canon = {row["question_id"]: row for row in q.iter_rows(named=True)}
    variants = {(row["question_id"], row["qvar"]): row for row in v.iter_rows(named=True)}
    expected: dict = {}
    for row in r.sort("question_id").iter_rows(named=True):
        src = (
            canon[row["question_id"]]
            if row["qvar"] == 0
            else variants[row["question_id"], row["qvar"]]
        )
        dataset = f"mmlu_pro/{src['category']}"
        values = {metric: float(row[column]) for metric, column in RAW_METRICS.items()}
        values["gold_position"] = float(LETTERS.index(row["graded_answer"]))
        values["pred_position"] = float(LETTERS.index(row["pred_rx"]) if row["pred_rx"] else -1)
        for metric, value in values.items():
            # same-text questions: the lowest id's result stands (setdefault keeps the first)
            expected.setdefault((input_id(text_of(src)), dataset, row["model"], metric), value)
    got = {
        (o["input_id"], o["dataset"], o["source_model"], o["metric"]): o["value"]
        for o in result.outcomes.iter_rows(named=True)
    }
    assert got == expected
    assert set(result.outcomes["run_id"]) == {f"mmlu_pro:{m}" for m in r["model"].unique()}
    assert result.models.height == r["model"].n_unique() == 28


def test_input_text_is_question_then_lettered_options(result):
    q, _, _ = tables()
    row = q.row(0, named=True)
    texts = dict(result.inputs.iter_rows())
    text = texts[input_id(text_of(row))]
    assert text.startswith(row["question"] + "\nA. " + row["options"][0] + "\nB. ")
    assert text.endswith(f"\n{LETTERS[len(row['options']) - 1]}. {row['options'][-1]}")


def test_accuracy_per_model_matches_polars(result):
    _, r, _ = tables()
    dropped = {894, 896, 6554}  # the second question of each same-text pair
    want = (
        r.filter(~pl.col("question_id").is_in(list(dropped)))
        .group_by("model")
        .agg(pl.col("correct_rx").cast(pl.Float64).mean())
    )
    got = (
        result.outcomes.filter(pl.col("metric") == "correct_rx")
        .group_by("source_model")
        .agg(pl.col("value").mean())
    )
    assert dict(got.iter_rows()) == pytest.approx(dict(want.iter_rows()))


def test_same_text_questions_are_one_input(result):
    q, r, _ = tables()
    pairs = {893: 894, 895: 896, 6553: 6554}
    by_id = {row["question_id"]: row for row in q.iter_rows(named=True)}
    for kept, dropped in pairs.items():
        assert input_id(text_of(by_id[kept])) == input_id(text_of(by_id[dropped]))
    quarantined = {row["record"]: row for row in result.quarantine.iter_rows(named=True)}
    assert set(quarantined) == {
        f"question_id={d} (same text as question_id={k})" for k, d in pairs.items()
    }
    for kept, dropped in pairs.items():
        row = quarantined[f"question_id={dropped} (same text as question_id={kept})"]
        n = r.filter(pl.col("question_id") == dropped).height
        assert row["reason"].startswith("same text as a lower question id")
        assert row["value"] == f"{n} result rows in mmlu_pro/{by_id[kept]['category']}"
    ids = set(result.memberships["source_instance_id"])
    assert {str(k) for k in pairs} <= ids and not {str(d) for d in pairs.values()} & ids


def test_variants_map_to_the_version_each_model_saw(result):
    q, r, v = tables()
    canon = {row["question_id"]: row for row in q.iter_rows(named=True)}
    seen = r.filter(pl.col("qvar") > 0).select("question_id", "qvar").unique()
    kinds = {}
    for row in v.join(seen, on=["question_id", "qvar"], how="semi").iter_rows(named=True):
        kinds[row["question_id"], row["qvar"]] = (variant_kind(canon[row["question_id"]], row), row)
    # the 28 models' variants change whitespace or edit text; permuted ones: see the next test
    assert {k for k, _ in kinds.values()} == {"whitespace", "edited"}
    members = dict(zip(result.memberships["source_instance_id"], result.memberships["input_id"]))
    outcome_ids = set(result.outcomes["input_id"])
    for (qid, qvar), (kind, row) in kinds.items():
        vid, cid = input_id(text_of(row)), input_id(text_of(canon[qid]))
        assert vid in outcome_ids
        if kind == "whitespace":
            assert vid == cid  # the same input: its membership is the canonical question's
            assert f"{qid}#v{qvar}" not in members
        else:
            assert vid != cid
            assert members[f"{qid}#v{qvar}"] == vid
        models = r.filter((pl.col("question_id") == qid) & (pl.col("qvar") == qvar))["model"]
        mine = result.outcomes.filter(pl.col("input_id") == vid)
        assert set(models) <= set(mine["source_model"])


def test_options_permuted_variant_is_another_input(copy):
    """Question 6554 v1 permutes the options (graded only for a held-back model): add a row."""
    q, r, v = tables(copy)
    canon = q.filter(pl.col("question_id") == 6554).row(0, named=True)
    variant = v.filter((pl.col("question_id") == 6554) & (pl.col("qvar") == 1)).row(0, named=True)
    assert variant_kind(canon, variant) == "permuted"
    row = r.filter(pl.col("question_id") == 6554).row(0, named=True) | {
        "qvar": 1,
        "model": "new-model",
    }
    pl.concat([r, pl.DataFrame([row], schema=r.schema)]).write_parquet(copy / "results.parquet")
    res = read(copy)
    vid = input_id(text_of(variant))
    assert vid != input_id(text_of(canon))
    members = dict(zip(res.memberships["source_instance_id"], res.memberships["input_id"]))
    assert members["6554#v1"] == vid
    new = res.outcomes.filter(pl.col("source_model") == "new-model")
    assert set(new["input_id"]) == {vid} and new.height == N_METRICS


def test_variant_text_keeps_its_own_category(result):
    q, _, _ = tables()
    cats = set(result.memberships["dataset"])
    assert cats == {f"mmlu_pro/{c}" for c in q["category"].unique()}


def test_output_length_is_kept_only_where_recorded(copy):
    _, r, _ = tables(copy)
    r = r.with_columns(
        pl.when(pl.int_range(pl.len()) == 0).then(None).otherwise(pl.col("out_chars")).alias("out_chars")
    )
    r.write_parquet(copy / "results.parquet")
    base, res = read(FIXTURE), read(copy)
    lengths = res.outcomes.filter(pl.col("metric") == "output_chars")
    assert lengths.height == base.outcomes.filter(pl.col("metric") == "output_chars").height - 1
    assert res.quarantine.height == base.quarantine.height  # a missing length is not bad data
    r.drop("out_chars").write_parquet(copy / "results.parquet")  # an older dump: no column
    res = read(copy)
    assert "output_chars" not in set(res.outcomes["metric"]) and res.quarantine.height == base.quarantine.height


def test_answer_positions_are_the_letters_of_the_version_seen(copy):
    """gold/pred positions: graded_answer and pred_rx as 0-based indices (pred -1 = none); a row
    with a gold that is no letter gets neither; a dump without the columns gets none."""
    from benchroute.transforms.stability_summary import positions_from_outcomes

    _, r, _ = tables(copy)
    r = r.with_columns(
        pl.when(pl.int_range(pl.len()) == 0).then(pl.lit("?")).otherwise(pl.col("graded_answer"))
        .alias("graded_answer"))
    r.write_parquet(copy / "results.parquet")
    base, res = read(FIXTURE), read(copy)
    gold = res.outcomes.filter(pl.col("metric") == "gold_position")
    assert gold.height == base.outcomes.filter(pl.col("metric") == "gold_position").height - 1
    assert res.quarantine.height == base.quarantine.height  # no gold position is not bad data
    pos = positions_from_outcomes(base.outcomes)
    assert pos.height == base.outcomes.filter(pl.col("metric") == "correct_rx").height
    # pred == gold exactly where correct_rx (pred_rx is the letter correct_rx was graded on)
    wide = base.outcomes.filter(pl.col("metric").is_in(["gold_position", "pred_position",
                                                       "correct_rx"])).pivot(
        on="metric", index=["input_id", "dataset", "run_id"], values="value")
    assert ((wide["gold_position"] == wide["pred_position"]) == (wide["correct_rx"] == 1)).all()
    r.drop("graded_answer", "pred_rx").write_parquet(copy / "results.parquet")
    assert not set(read(copy).outcomes["metric"]) & set(POSITIONS)


# ----------------------------------------------------------------------------- bad input
def test_bad_rows_are_quarantined(copy):
    q, r, v = tables(copy)
    r = r.with_columns(pl.col("correct_rx").cast(pl.Boolean))
    first = r.row(0, named=True)
    extra = pl.DataFrame(
        [
            {**first, "question_id": 999_999},  # no such question
            {**first, "qvar": 2, "model": "another-model"},  # no such variant
            {**first},  # the same (question, model) again
        ],
        schema=r.schema,
    )
    r = pl.concat(
        [
            r.with_columns(
                pl.when(pl.int_range(pl.len()) == 1)
                .then(None)
                .otherwise(pl.col("correct_rx"))
                .alias("correct_rx")
            ),
            extra,
        ]
    )
    r.write_parquet(copy / "results.parquet")
    too_many = q.row(0, named=True) | {
        "question_id": 123_456,
        "options": [f"o{i}" for i in range(11)],
    }
    blank = q.row(1, named=True) | {"question_id": 123_457, "question": "  "}
    pl.concat([q, pl.DataFrame([too_many, blank], schema=q.schema)]).write_parquet(
        copy / "questions.parquet"
    )
    res = read(copy)
    reasons = res.quarantine["reason"].to_list()
    fields = dict(zip(res.quarantine["reason"], res.quarantine["field"]))
    assert any("question not in questions.parquet" in x for x in reasons)
    assert any("question variant 2 not in question_variants.parquet" in x for x in reasons)
    assert any(x.startswith("duplicate result row") for x in reasons)
    assert fields["correctness is null"] == "correct_rx"
    assert any("more than 10 options" in x for x in reasons)
    assert any("question text is empty" in x for x in reasons)
    base = read(FIXTURE)
    # one correct_rx value lost; everything else as before
    assert res.outcomes.height == base.outcomes.height - 1
    assert res.quarantine.height == base.quarantine.height + 6
    assert res.quarantine["file"].str.starts_with(str(copy)).all()


def test_missing_variants_file_quarantines_only_variant_rows(copy):
    (copy / "question_variants.parquet").unlink()
    _, r, _ = tables(FIXTURE)
    res = read(copy)
    lost = res.quarantine.filter(pl.col("reason").str.contains("not in question_variants"))
    assert lost.height == r.filter(pl.col("qvar") > 0).height
    assert res.outcomes.height == read(FIXTURE).outcomes.height - N_METRICS * lost.height


@pytest.mark.parametrize("damage", ["missing_column", "not_parquet", "empty", "no_file"])
def test_unreadable_tables_name_the_file(copy, damage):
    target = copy / "results.parquet"
    if damage == "missing_column":
        pl.read_parquet(target).drop("correct_rx").write_parquet(target)
        match = "results.parquet: missing column.*correct_rx"
    elif damage == "not_parquet":
        target.write_bytes(b"question_id,model\n1,x\n")
        match = "results.parquet: not a readable Parquet"
    elif damage == "empty":
        target.write_bytes(b"")
        match = "results.parquet: file is empty"
    else:
        (copy / "questions.parquet").unlink()
        match = "questions.parquet: file not found"
    with pytest.raises(UnreadableSource, match=match):
        read(copy)


# -------------------------------------------------------------------------------- memory
def test_reads_from_memory_filesystem(memory_url, result):
    fs = fsspec.filesystem("memory")
    root = fs._strip_protocol(memory_url) + "/mmlu_pro"
    for p in FIXTURE.glob("*.parquet"):
        fs.pipe_file(f"{root}/{p.name}", p.read_bytes())
    (unit,) = mmlu_pro.find_units(fs, fs._strip_protocol(memory_url))
    got = mmlu_pro.read(fs.unstrip_protocol(unit), names=NAMES)
    assert got.counts() == result.counts()
    assert got.outcomes.sort(pl.all()).equals(result.outcomes.sort(pl.all()))


# --------------------------------------------------------------------------- real source
@pytest.mark.slow
def test_whole_real_source(raw_data):
    """All of raw/mmlu_pro: 28 models, 12,032 questions, gpt-4o correct_rx 74.04 % (SOURCE.md)."""
    src = raw_data / "mmlu_pro"
    res = mmlu_pro.read(str(src), names=ModelNames.default())
    results = pl.read_parquet(src / "results.parquet")
    assert res.models.height == 28
    assert set(res.outcomes["source_model"]) == set(results["model"])
    # every question is a membership, or a same-text twin of one (quarantined with its id)
    twins = res.quarantine.filter(pl.col("reason").str.starts_with("same text as"))
    member_ids = {s.split("#")[0] for s in res.memberships["source_instance_id"]}
    twin_ids = {r.removeprefix("question_id=").split(" ")[0] for r in twins["record"]}
    assert len(member_ids | twin_ids) == 12_032 and not member_ids & twin_ids
    assert res.quarantine.height == twins.height == 159
    assert res.memberships["dataset"].n_unique() == 14
    # each result row gives five outcomes unless its question's twin already holds the model's
    dropped = sum(int(v.split(" ")[0]) for v in twins["value"])
    assert res.outcomes.height == N_METRICS * (results.height - dropped)
    rx = res.outcomes.filter(pl.col("metric") == "correct_rx")
    acc = dict(rx.group_by("source_model").agg(pl.col("value").mean() * 100).iter_rows())
    assert acc["gpt-4o-2024-05-13"] == pytest.approx(74.04, abs=0.1)  # 74.11 without the twins
    raw_acc = results.group_by("model").agg(pl.col("correct_rx").mean() * 100)
    for model, value in raw_acc.iter_rows():
        assert acc[model] == pytest.approx(value, abs=0.5)


def test_reads_from_s3(s3_server, tmp_path, result):
    fs, bucket = url_to_fs(s3_server)
    root = f"{bucket}/mmlu_pro-{tmp_path.name}"
    for p in FIXTURE.glob("*.parquet"):
        fs.put_file(str(p), f"{root}/{p.name}")
    (unit,) = mmlu_pro.find_units(fs, root)
    got = mmlu_pro.read(f"s3://{unit}", names=NAMES)
    assert got.outcomes.sort(pl.all()).equals(result.outcomes.sort(pl.all()))
