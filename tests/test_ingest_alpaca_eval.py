"""The AlpacaEval reader: long table and native annotations.json against polars/json, bad input."""

from __future__ import annotations

import json
import math
from pathlib import Path

import fsspec
import polars as pl
import pytest
from fsspec.core import url_to_fs

from benchroute.transforms.ids import ModelNames, input_id
from benchroute.transforms.ingest import alpaca_eval
from benchroute.transforms.ingest.base import UnreadableSource

FIXTURE = Path(__file__).parent / "fixtures" / "alpaca_eval"
LONG = FIXTURE / "annotations_long.parquet"
NATIVE = FIXTURE / "results" / "minichat-1.5-3b" / "alpaca_eval_gpt4" / "annotations.json"
NAMES = ModelNames()


def read(path: Path | str):
    return alpaca_eval.read(str(path), names=NAMES)


def valid_rows(df: pl.DataFrame) -> pl.DataFrame:
    """Rows with a real judgment of a real model, computed independently of the reader."""
    p = pl.col("preference")
    return df.filter(p.is_not_null() & ~p.is_nan() & (p != 0) & ~not_a_model(df))


def judgements(result) -> pl.DataFrame:
    """The judge preferences of a read (without the output lengths)."""
    return result.outcomes.filter(pl.col("metric") != "output_chars")


def not_a_model(df: pl.DataFrame) -> pl.Expr:
    """AlpacaEval's placeholder rows and the reference judged against itself (SOURCE.md)."""
    self_judged = pl.col("model") == pl.col("reference_model") if "reference_model" in df.columns else pl.lit(False)
    return pl.col("model").is_in(["example", "gpt4_gamed"]) | self_judged


@pytest.fixture(scope="module")
def long_result():
    return read(LONG)


def native_copy(tmp_path: Path, records=None, raw: bytes | None = None) -> Path:
    """A writable ``results/<model>/<annotator>/annotations.json`` under ``tmp_path``."""
    path = tmp_path / "results" / "minichat-1.5-3b" / "alpaca_eval_gpt4" / "annotations.json"
    path.parent.mkdir(parents=True)
    if raw is not None:
        path.write_bytes(raw)
    else:
        path.write_text(
            json.dumps(records if records is not None else json.loads(NATIVE.read_text()), indent=2)
        )
    return path


# ------------------------------------------------------------------------------ discovery
def test_find_units_finds_both_layouts(tmp_path):
    fs, root = url_to_fs(str(FIXTURE))
    assert alpaca_eval.find_units(fs, root) == sorted([str(LONG), str(NATIVE)])
    other = tmp_path / "x" / "annotations.json"
    other.parent.mkdir()
    other.write_text(json.dumps([{"question": "not AlpacaEval"}]))
    assert alpaca_eval.find_units(fs, str(tmp_path)) == []


# ----------------------------------------------------------------------------- long table
def test_long_table_outcomes_equal_polars(long_result):
    raw = pl.read_parquet(LONG)
    good = valid_rows(raw)
    expected = {
        (
            input_id(r["instruction"]),
            f"alpaca_eval/{r['dataset']}",
            r["model"],
            f"alpaca_eval/{r['annotator']}",
            f"alpaca_eval:{r['annotator_dir']}:{r['results_dir']}",
        ): r["preference"]
        for r in good.iter_rows(named=True)
    }
    got = {
        (o["input_id"], o["dataset"], o["source_model"], o["metric"], o["run_id"]): o["value"]
        for o in judgements(long_result).iter_rows(named=True)
    }
    assert len(expected) == good.height  # no key collisions in the source
    assert got == expected
    assert long_result.inputs.height == raw["instruction"].n_unique() == 14
    ids = dict(
        zip(long_result.memberships["input_id"], long_result.memberships["source_instance_id"])
    )
    for r in raw.select("instruction", "instruction_id").unique().iter_rows(named=True):
        assert ids[input_id(r["instruction"])] == r["instruction_id"]


def test_win_rate_per_run_matches_polars(long_result):
    good = valid_rows(pl.read_parquet(LONG))
    want = good.group_by("annotator_dir", "results_dir").agg((pl.col("preference") > 1.5).mean())
    want = {f"alpaca_eval:{a}:{r}": v for a, r, v in want.iter_rows()}
    got = judgements(long_result).group_by("run_id").agg((pl.col("value") > 1.5).mean())
    assert dict(got.iter_rows()) == pytest.approx(want)


def test_one_model_with_two_result_folders_keeps_both_runs(long_result):
    falcon = long_result.outcomes.filter(
        (pl.col("source_model") == "falcon-40b-instruct")
        & (pl.col("metric") == "alpaca_eval/alpaca_eval_gpt4")
    )
    assert set(falcon["run_id"]) == {
        "alpaca_eval:alpaca_eval_gpt4:falcon-40b-instruct",
        "alpaca_eval:alpaca_eval_gpt4:falcon-7b-instruct",
    }


def test_missing_or_zero_preference_is_quarantined(long_result):
    raw = pl.read_parquet(LONG).with_row_index("row", offset=1)
    bad = raw.filter(
        (pl.col("preference").is_null() | pl.col("preference").is_nan() | (pl.col("preference") == 0))
        & ~not_a_model(raw)
    )
    assert bad.height == 16  # the fixture's 2 missing + 14 zero preferences
    q = long_result.quarantine.filter(pl.col("field") == "preference")
    assert q.height == bad.height
    assert set(q["record"]) == {f"row {r}" for r in bad["row"]}
    assert set(q["field"]) == {"preference"}
    assert q["reason"].str.contains("no valid judgment").all()


def test_long_table_bad_values_and_duplicates(tmp_path):
    raw = pl.read_parquet(LONG)
    i = pl.int_range(pl.len())
    bad = raw.with_columns(
        pl.when(i == 0)
        .then(2.5)
        .when(i == 1)
        .then(-1.0)
        .otherwise(pl.col("preference"))
        .alias("preference"),
        pl.when(i == 2).then(pl.lit(None)).otherwise(pl.col("model")).alias("model"),
        pl.when(i == 3).then(pl.lit("  ")).otherwise(pl.col("instruction")).alias("instruction"),
    )
    bad = pl.concat([bad, bad.slice(10, 1)])
    path = tmp_path / "annotations_long.parquet"
    bad.write_parquet(path)
    res = read(path)
    q = {r["record"]: r for r in res.quarantine.iter_rows(named=True)}
    assert "outside [1, 2]" in q["row 1"]["reason"] and q["row 1"]["value"] == "2.5"
    assert "outside [1, 2]" in q["row 2"]["reason"]
    assert q["row 3"]["field"] == "model"
    assert q["row 4"]["field"] == "instruction"
    dup = q[f"row {raw.height + 1} (repeats row 11)"]
    assert dup["reason"].startswith("duplicate judgement")
    assert judgements(res).height == valid_rows(raw).height - 4


def test_long_table_without_a_required_column_is_unreadable(tmp_path):
    path = tmp_path / "annotations_long.parquet"
    pl.read_parquet(LONG).drop("annotator").write_parquet(path)
    with pytest.raises(
        UnreadableSource, match="annotations_long.parquet: missing column.*annotator"
    ):
        read(path)
    path.write_bytes(b"PAR1 not really")
    with pytest.raises(UnreadableSource, match="annotations_long.parquet: not a readable Parquet"):
        read(path)



def test_output_lengths_of_the_judged_rows(long_result, tmp_path):
    """``output_chars`` = the long table's value, once per judged (input, model, run); a missing
    length is not emitted and not quarantined."""
    good = valid_rows(pl.read_parquet(LONG))
    expected = {
        (input_id(r["instruction"]), r["model"], f"alpaca_eval:{r['annotator_dir']}:{r['results_dir']}"):
        float(r["output_chars"])
        for r in good.iter_rows(named=True)
    }
    lengths = long_result.outcomes.filter(pl.col("metric") == "output_chars")
    got = {(o["input_id"], o["source_model"], o["run_id"]): o["value"] for o in lengths.iter_rows(named=True)}
    assert got == expected and lengths.height == len(expected)
    raw = pl.read_parquet(LONG).with_columns(
        pl.when(pl.int_range(pl.len()) < 100).then(None).otherwise(pl.col("output_chars")).alias("output_chars")
    )
    raw.write_parquet(tmp_path / "annotations_long.parquet")
    res = read(tmp_path / "annotations_long.parquet")
    assert 0 < res.outcomes.filter(pl.col("metric") == "output_chars").height < lengths.height
    assert res.quarantine["reason"].to_list() == long_result.quarantine["reason"].to_list()
    assert judgements(res).equals(judgements(long_result))


# --------------------------------------------------------------------------------- native
def test_native_file_equals_the_long_table_rows():
    res = read(NATIVE)
    raw = pl.read_parquet(LONG).filter(
        (pl.col("results_dir") == "minichat-1.5-3b")
        & (pl.col("annotator_dir") == "alpaca_eval_gpt4")
    )
    want = read(LONG).outcomes.filter(
        pl.col("run_id") == "alpaca_eval:alpaca_eval_gpt4:minichat-1.5-3b"
    )
    cols = ["input_id", "dataset", "source_model", "metric", "value", "run_id"]
    assert res.outcomes.select(cols).sort(cols).equals(want.select(cols).sort(cols))
    assert judgements(res).height == valid_rows(raw).height == raw.height - 1
    (q,) = res.quarantine.iter_rows(named=True)
    missing = raw.with_row_index("n", offset=1).filter(
        pl.col("preference").is_nan() | pl.col("preference").is_null()
    )
    assert q["record"] == f"record {missing['n'][0]}" and "no valid judgment" in q["reason"]


def test_native_bad_records_are_quarantined(tmp_path):
    records = json.loads(NATIVE.read_text())
    records[0]["preference"] = 3
    records[1]["preference"] = "abc"
    del records[2]["generator_2"]
    records[3] = ["not", "an", "object"]
    records[4]["instruction"] = ""
    records.append(dict(records[5]))  # a repeated record
    res = read(native_copy(tmp_path, records))
    q = {r["record"]: r for r in res.quarantine.iter_rows(named=True)}
    assert "outside [1, 2]" in q["record 1"]["reason"]
    assert q["record 2"]["reason"] == "preference is not a number"
    assert q["record 3"]["field"] == "generator_2"
    assert "not an object" in q["record 4"]["reason"]
    assert q["record 5"]["field"] == "instruction"
    assert q[f"record {len(records)} (repeats record 6)"]["reason"].startswith(
        "duplicate judgement"
    )
    assert judgements(res).height == 14 - 1 - 5  # 1 missing in the source, 5 broken here


def test_native_nan_literal_is_quarantined_and_the_rest_read(tmp_path):
    """Python's json.dumps writes NaN (not JSON); the stream must go on after it."""
    records = json.loads(NATIVE.read_text())
    records[1]["preference"] = math.nan
    path = native_copy(tmp_path, raw=json.dumps(records, indent=2).encode())
    assert b"NaN" in path.read_bytes()
    res = read(path)
    assert "record 2" in set(res.quarantine["record"])
    assert judgements(res).height == 14 - 2


def test_native_truncated_file_keeps_the_records_before_the_break(tmp_path):
    text = json.dumps(json.loads(NATIVE.read_text()), indent=2).encode()
    cut = text.index(b'"instruction"', len(text) // 2)  # in the middle of the records
    path = native_copy(tmp_path, raw=text[:cut])
    res = read(path)
    q = res.quarantine.filter(pl.col("reason").str.contains("invalid JSON"))
    assert q.height == 1 and q["reason"][0] == "invalid JSON here: the rest of the file is not read"
    assert q["value"][0]  # the parser's message
    n_before = int(q["record"][0].split()[1]) - 1
    assert 0 < n_before < 14
    assert judgements(res).height + res.quarantine.height - 1 == n_before


def test_native_invalid_utf8_quarantines_that_record_only(tmp_path):
    text = json.dumps(json.loads(NATIVE.read_text()), indent=2).encode()
    good = read(native_copy(tmp_path / "good", raw=text))
    at = text.index(b'"instruction": "', len(text) // 2) + len(b'"instruction": "')
    res = read(native_copy(tmp_path / "bad", raw=text[:at] + b"\xff\xfe" + text[at:]))
    bad = res.quarantine.filter(pl.col("reason").str.contains("not valid UTF-8"))
    assert bad.height == 1 and bad["field"][0] == "instruction"
    assert bad["record"][0].startswith("record ") and "\ufffd" in bad["value"][0]
    assert not res.quarantine["reason"].str.contains("invalid JSON").any()
    # Every other record is read as before: one judgement fewer at most.
    assert good.quarantine.height + 1 == res.quarantine.height
    assert judgements(res).height in (judgements(good).height, judgements(good).height - 1)


@pytest.mark.parametrize(
    "raw, match",
    [
        (b"", "empty"),
        (b"  \n", "empty"),
        (b"<html>", "not JSON"),
        (b'[{"instruction": ', "not valid JSON"),
    ],
)
def test_native_unreadable(tmp_path, raw, match):
    path = native_copy(tmp_path, raw=raw)
    with pytest.raises(UnreadableSource, match=match) as err:
        read(path)
    assert "annotations.json" in str(err.value)


# -------------------------------------------------------------------------------- memory
def test_reads_from_memory_filesystem(memory_url, long_result):
    fs = fsspec.filesystem("memory")
    root = fs._strip_protocol(memory_url)
    for p in (LONG, NATIVE):
        fs.pipe_file(f"{root}/{p.relative_to(FIXTURE).as_posix()}", p.read_bytes())
    units = alpaca_eval.find_units(fs, root)
    assert len(units) == 2
    got = {Path(u).name: alpaca_eval.read(fs.unstrip_protocol(u), names=NAMES) for u in units}
    assert got["annotations_long.parquet"].outcomes.equals(long_result.outcomes)
    assert got["annotations.json"].outcomes.equals(read(NATIVE).outcomes)


# --------------------------------------------------------------------------- real source
@pytest.mark.slow
def test_whole_real_source(raw_data):
    """All of raw/alpaca_eval: 805 instructions, 107,055 rows, 261 without a judgment."""
    src = raw_data / "alpaca_eval"
    res = alpaca_eval.read(str(src / "annotations_long.parquet"), names=ModelNames.default())
    assert res.inputs.height == 805
    assert res.memberships["dataset"].n_unique() == 5
    raw = pl.read_parquet(src / "annotations_long.parquet")
    placeholders = raw.filter(not_a_model(raw)).height  # example, gpt4_gamed, reference vs itself
    assert placeholders == 4 * 805
    judged = res.quarantine.filter(pl.col("field") == "preference")
    assert res.quarantine.height == judged.height + placeholders
    assert judgements(res).height == valid_rows(raw).height
    # one output length per judged (input, model, run): every row records one
    assert res.outcomes.filter(pl.col("metric") == "output_chars").height == valid_rows(raw).height
    weighted = res.outcomes.filter(
        pl.col("metric") == "alpaca_eval/weighted_alpaca_eval_gpt4_turbo"
    )
    assert weighted["source_model"].n_unique() == 58 - 3  # less example, gpt4_gamed, the reference
    ae1 = res.outcomes.filter(pl.col("run_id").str.starts_with("alpaca_eval:alpaca_eval_gpt4:"))
    assert ae1["source_model"].n_unique() == 52 and ae1["run_id"].n_unique() == 53
    # win rates (mean preference - 1) equal the published leaderboard where names match
    board = pl.read_csv(
        src / "docs" / "data_AlpacaEval_2" / "weighted_alpaca_eval_gpt4_turbo_leaderboard.csv"
    )
    ours = weighted.group_by("source_model").agg(((pl.col("value") - 1).mean() * 100).alias("ours"))
    both = ours.join(board, left_on="source_model", right_on="name")
    assert both.height >= 5
    for row in both.iter_rows(named=True):
        assert row["ours"] == pytest.approx(row["win_rate"], abs=1e-6)
