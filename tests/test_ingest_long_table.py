"""The generic long-table reader: equal to the RouteLLM reader on the same real rows; bad rows."""

from __future__ import annotations

from pathlib import Path

import fsspec
import polars as pl
import pytest
from fsspec.core import url_to_fs

from benchroute.transforms.ids import ModelNames, input_id
from benchroute.transforms.ingest import long_table, routellm
from benchroute.transforms.ingest.base import UnreadableSource

FIXTURES = Path(__file__).parent / "fixtures"
CSV = FIXTURES / "long_table" / "mmlu_college_physics_long.csv"
PARQUET = FIXTURES / "long_table" / "mmlu_college_physics_long.parquet"
WIDE = (
    FIXTURES / "routellm" / "routellm" / "evals" / "mmlu" / "responses" / "mmlu_college_physics.csv"
)
NAMES = ModelNames()
HEADER = "input,dataset,model,metric,value"


def read(path: Path | str):
    return long_table.read(str(path), names=NAMES)


def write_csv(tmp_path: Path, lines: list[str], name: str = "mine.csv") -> Path:
    path = tmp_path / name
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def result():
    return read(CSV)


# ------------------------------------------------------------------------------ discovery
def test_find_units_reads_only_headers(tmp_path):
    fs, root = url_to_fs(str(FIXTURES))
    assert sorted(long_table.find_units(fs, root)) == sorted([str(CSV), str(PARQUET)])
    write_csv(tmp_path, [HEADER + ",split"])  # header only: still a long table
    (tmp_path / "tail.csv").write_bytes(HEADER.encode() + b"\n\xff\xfe\x00 garbage")
    write_csv(tmp_path, ["input,dataset,model,metric"], name="no_value.csv")
    pl.DataFrame({"input": ["q"], "model": ["m"]}).write_parquet(tmp_path / "short.parquet")
    (tmp_path / "data.txt").write_text(HEADER)
    found = sorted(Path(p).name for p in long_table.find_units(*url_to_fs(str(tmp_path))))
    # A header with ``input`` and most required columns is a long table lacking one: it is a
    # unit, so that reading it names the missing column instead of skipping it in silence.
    assert found == ["mine.csv", "no_value.csv", "tail.csv"]
    with pytest.raises(UnreadableSource, match="no_value.csv: missing required column.*'value'"):
        read(tmp_path / "no_value.csv")


# ------------------------------------------------------------------------------- values
def test_same_outcomes_as_the_routellm_reader(result):
    """The long table was reshaped from a real RouteLLM CSV: both readers must agree."""
    wide = routellm.read(str(WIDE), names=NAMES)
    cols = ["input_id", "dataset", "source_model", "metric", "value"]
    assert result.outcomes.select(cols).sort(cols).equals(wide.outcomes.select(cols).sort(cols))
    assert result.inputs.sort("input_id").equals(wide.inputs.sort("input_id"))
    assert set(result.outcomes["run_id"]) == {CSV.name}
    # the source repeats one prompt (rows 11, 12): its two rows here are duplicates
    q = result.quarantine
    assert q.height == 2 and q["reason"].str.starts_with("duplicate row").all()
    assert q["reason"].str.contains("same value").all()


def test_parquet_equals_csv(result):
    got = read(PARQUET)
    assert got.outcomes.drop("run_id").equals(result.outcomes.drop("run_id"))
    assert set(got.outcomes["run_id"]) == {PARQUET.name}
    assert got.memberships.equals(result.memberships)


def test_memberships_keep_split_and_instance_id(result):
    raw = pl.read_csv(CSV, infer_schema=False).unique("input", keep="first", maintain_order=True)
    want = {(input_id(r["input"]), r["source_instance_id"]) for r in raw.iter_rows(named=True)}
    got = set(zip(result.memberships["input_id"], result.memberships["source_instance_id"]))
    assert got == want
    assert set(result.memberships["split"]) == {"test"}
    assert set(result.memberships["dataset"]) == {"mmlu/college_physics"}


def test_optional_columns(tmp_path):
    path = write_csv(
        tmp_path,
        [
            HEADER + ",run_id,perturbation,split",
            "What is 2+2?,toy/arith,m1,exact_match,1,run-a,,",
            "What is 2+2?,toy/arith,m1,exact_match,0,run-b,,",  # another run: kept
            "What is 2+2?,toy/arith,m1,exact_match,0,run-a,typo,",  # a perturbation: kept
            "What is  2+2? ,toy/arith,m2,exact_match,true,,,train",  # same input (whitespace)
            "What is 2+2?,toy/arith,m3,exact_match,FALSE,,,",
        ],
    )
    res = read(path)
    assert res.quarantine.height == 0
    assert res.inputs.height == 1
    rows = (
        res.outcomes.sort("source_model", "run_id", "perturbation", nulls_last=True)
        .select("source_model", "value", "run_id", "perturbation")
        .rows()
    )
    assert rows == [
        ("m1", 0.0, "run-a", "typo"),
        ("m1", 1.0, "run-a", None),
        ("m1", 0.0, "run-b", None),
        ("m2", 1.0, "mine.csv", None),
        ("m3", 0.0, "mine.csv", None),
    ]


# ---------------------------------------------------------------------------- bad input
def test_bad_rows_are_quarantined(tmp_path):
    path = write_csv(
        tmp_path,
        [
            HEADER,
            "good,d,m,acc,0.5",
            "bad number,d,m,acc,abc",
            "no value,d,m,acc,",
            "nan value,d,m,acc,NaN",
            "inf value,d,m,acc,inf",
            ",d,m,acc,1",
            "no model,d,,acc,1",
            "no dataset,,m,acc,1",
            "no metric,d,m,,1",
            "good,d,m,acc,0.7",  # duplicate of row 1 with another value
        ],
    )
    res = read(path)
    q = {r["record"]: (r["field"], r["reason"]) for r in res.quarantine.iter_rows(named=True)}
    assert q == {
        "row 2": ("value", "value is not a number"),
        "row 3": ("value", "value is empty"),
        "row 4": ("value", "value is NaN or infinite"),
        "row 5": ("value", "value is NaN or infinite"),
        "row 6": ("input", "input is empty"),
        "row 7": ("model", "model is empty"),
        "row 8": ("dataset", "dataset is empty"),
        "row 9": ("metric", "metric is empty"),
        "row 10 (repeats row 1)": (
            "input",
            "duplicate row (same input, dataset, model, metric, "
            "run and perturbation); the first is kept "
            "(different value)",
        ),
    }
    assert res.outcomes.select("value").rows() == [(0.5,)]
    assert res.quarantine["file"].to_list() == [str(path)] * 9


def test_non_utf8_row_is_quarantined(tmp_path):
    path = tmp_path / "mine.csv"
    path.write_bytes(f"{HEADER}\nok,d,m,acc,1\ncaf\xe9,d,m,acc,1\n".encode("latin-1"))
    res = read(path)
    assert res.outcomes.height == 1
    (q,) = res.quarantine.iter_rows(named=True)
    assert q["record"] == "row 2" and "UTF-8" in q["reason"]


@pytest.mark.parametrize(
    "columns, missing",
    [
        ("input,dataset,model,metric", "'value'"),
        ("prompt,dataset,model,metric,value", "'input'"),
    ],
)
def test_missing_required_column_names_file_and_column(tmp_path, columns, missing):
    path = write_csv(tmp_path, [columns, ",".join(["x"] * len(columns.split(",")))])
    with pytest.raises(
        UnreadableSource, match=f"mine.csv: missing required column\\(s\\) {missing}"
    ):
        read(path)


def test_missing_column_in_parquet(tmp_path):
    path = tmp_path / "mine.parquet"
    pl.read_parquet(PARQUET).drop("metric").write_parquet(path)
    with pytest.raises(UnreadableSource, match="mine.parquet: missing required column.*'metric'"):
        read(path)


@pytest.mark.parametrize("content", [b"", b"\n\n"])
def test_empty_file_is_unreadable(tmp_path, content):
    path = tmp_path / "mine.csv"
    path.write_bytes(content)
    with pytest.raises(UnreadableSource, match="mine.csv: file is empty"):
        read(path)


def test_parquet_value_column_of_text(tmp_path):
    path = tmp_path / "mine.parquet"
    pl.DataFrame(
        {
            "input": ["a", "b", "c"],
            "dataset": "d",
            "model": "m",
            "metric": "acc",
            "value": ["1.5", "x", None],
        }
    ).write_parquet(path)
    res = read(path)
    assert res.outcomes["value"].to_list() == [1.5]
    assert sorted(res.quarantine["reason"]) == ["value is empty", "value is not a number"]


# -------------------------------------------------------------------------------- memory
def test_reads_from_memory_filesystem(memory_url, result):
    fs = fsspec.filesystem("memory")
    root = fs._strip_protocol(memory_url)
    fs.pipe_file(f"{root}/{CSV.name}", CSV.read_bytes())
    (unit,) = long_table.find_units(fs, root)
    got = long_table.read(fs.unstrip_protocol(unit), names=NAMES)
    assert got.outcomes.equals(result.outcomes)
    assert got.counts() == result.counts()


# --------------------------------------------------------------------------- real source
@pytest.mark.slow
def test_whole_real_routellm_mmlu_as_a_long_table(raw_data, tmp_path):
    """All 57 RouteLLM MMLU files reshaped into one long table: 14,042 prompts x 2 models."""
    responses = raw_data / "routellm" / "routellm" / "evals" / "mmlu" / "responses"
    parts = []
    for path in sorted(responses.glob("mmlu_*.csv")):
        wide = pl.read_csv(path, infer_schema=False)
        models = [c for c in wide.columns if c != "prompt"]
        parts.append(
            wide.unpivot(
                index="prompt", on=models, variable_name="model", value_name="value"
            ).select(
                pl.col("prompt").alias("input"),
                pl.lit("mmlu/" + path.stem.removeprefix("mmlu_")).alias("dataset"),
                "model",
                pl.lit("correct").alias("metric"),
                "value",
            )
        )
    table = pl.concat(parts)
    assert table.height == 2 * 14_042
    path = tmp_path / "routellm_mmlu.parquet"
    table.write_parquet(path)
    res = read(path)
    assert res.outcomes.height == 2 * (14_042 - 27)  # 27 prompts repeat within their subject
    assert res.quarantine.height == 2 * 27
    assert res.outcomes["dataset"].n_unique() == 57
    assert res.inputs.height == 13_937
    acc = dict(res.outcomes.group_by("source_model").agg(pl.col("value").mean()).iter_rows())
    assert acc["gpt-4-1106-preview"] == pytest.approx(0.806, abs=0.005)
