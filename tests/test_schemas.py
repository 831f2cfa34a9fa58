"""The canonical schemas reject bad rows into quarantine with file, record and field."""

from __future__ import annotations

import json

import polars as pl
import pytest

from benchroute.schemas import SchemaError, validate


def _outcome(**kw):
    base = {
        "input_id": "a" * 32,
        "dataset": "d",
        "model": "m",
        "metric": "exact_match",
        "value": 1.0,
        "run_id": "r",
        "source": "s",
        "perturbation": None,
        "source_model": "m",
    }
    return {**base, **kw}


def test_bad_outcomes_are_quarantined_with_field_and_record():
    df = pl.DataFrame(
        [
            _outcome(),
            _outcome(input_id="b" * 32, value=float("nan")),
            _outcome(input_id="c" * 32, value=float("inf")),
            _outcome(input_id="not-a-hash"),
            _outcome(input_id="d" * 32, model=""),
        ],
        schema_overrides={"perturbation": pl.String},
    )
    valid, bad = validate("outcomes", df, source="src", file="f.json")
    assert valid.height == 1
    assert bad.height == 4
    assert set(bad["file"]) == {"f.json"} and set(bad["source"]) == {"src"}
    fields = sorted(bad["field"].to_list())
    assert fields == ["input_id", "model", "value", "value"]
    nan_row = bad.filter(pl.col("record").str.contains("b" * 32)).row(0, named=True)
    assert nan_row["record"] == f"r/{'b' * 32}/m/exact_match"
    assert json.loads(nan_row["value"])["model"] == "m"


def test_duplicate_observations_are_quarantined_but_perturbations_are_distinct():
    df = pl.DataFrame(
        [_outcome(), _outcome(value=0.0), _outcome(input_id="e" * 32), _outcome(input_id="e" * 32, perturbation="typos")],
        schema_overrides={"perturbation": pl.String},
    )
    valid, bad = validate("outcomes", df)
    assert valid.height == 2
    assert set(bad["field"]) == {"unique_observation"}


def test_missing_columns_are_a_reader_bug():
    with pytest.raises(SchemaError, match="lacks columns"):
        validate("inputs", pl.DataFrame({"input_id": ["a" * 32]}), file="x.json")
