"""Property tests of the readers: whatever a file holds, a reader returns frames that pass the
canonical schemas (quarantining what does not) or raises ``UnreadableSource`` naming the file;
it never raises anything else, and no record is lost in silence.

Generated: long tables (CSV with arbitrary text, including lone surrogates written as invalid
bytes; Parquet with NaN, infinities, nulls, numbers as text) and MixInstruct records (JSON array
and JSON Lines; ids, texts, model and metric names with lone surrogates, NaN, huge integers,
wrong types, unsafe dataset names). Each record is checked to be either in the output or named
in quarantine (by its row/record number or its input id), never both; well-formed records round
trip exactly.
"""

from __future__ import annotations

import csv
import io
import json
import math
import re

import polars as pl
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from benchroute.schemas import validate
from benchroute.transforms.ids import ModelNames, input_id, normalize_text
from benchroute.transforms.ingest import long_table, mixinstruct
from benchroute.transforms.ingest.base import UnreadableSource

NAMES = ModelNames()
SETTINGS = settings(
    max_examples=50,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

# Pieces that break things: lone surrogates, replacement and noncharacters, control
# characters, path pieces, whitespace, quotes and separators of the formats.
NASTY = [
    "\udcff", "\ud800", "\udc80", "\ufffd", "\ufdd0", "\x00", "\x1b", "\r", "\n", "\t", " ",
    "..", "/", "\\", '"', ",", "'", "NaN", "é", "😀", "\u0301", "\u2028",
]
nasty_text = st.lists(st.one_of(st.text(max_size=8), st.sampled_from(NASTY)), max_size=5).map(
    "".join
)
clean_text = st.text(
    alphabet=st.characters(exclude_categories=("Cs", "Cc")), min_size=1, max_size=12
).filter(lambda t: normalize_text(t) != "")
dataset_name = st.one_of(
    st.sampled_from(["toy/arith", "qa", "a/b/c", "helm/../../../outside", "/abs", "a//b", "x\\y",
                     "", " ", ".", "a/\x00"]),
    nasty_text,
)
number = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.integers(min_value=-(10**400), max_value=10**400),
    st.booleans(),
    st.none(),
    st.sampled_from(["1", "0.5", "true", "False", "", "abc", "1e999", " 2 ", "\udcff"]),
)


def safe_input_id(text: object) -> str | None:
    try:
        return input_id(text) if isinstance(text, str) and normalize_text(text) else None
    except UnicodeEncodeError:
        return None


def assert_schema_clean(result) -> None:
    """Every output frame passes its canonical schema with nothing left to quarantine."""
    for name in ("inputs", "memberships", "outcomes", "models", "quarantine"):
        _, bad = validate(name, getattr(result, name), source=result.source, file="check")
        assert bad.height == 0, (name, bad.head(3).to_dicts())
    # Every stored text and name can be encoded (polars would not hold it otherwise).
    assert result.inputs["input_id"].to_list() == [input_id(t) for t in result.inputs["text"]]


def mentioned(quarantine: pl.DataFrame, label: str, iid: str | None) -> pl.DataFrame:
    """Quarantine rows naming a record by its label (``row 3``, ``record 3 (id …)``) or its
    input id (rows the schemas refused name the input id)."""
    by_label = pl.col("record").str.contains(f"^{re.escape(label)}(?:$|[ (])")
    by_id = pl.col("record").str.contains(iid, literal=True) if iid else pl.lit(False)
    return quarantine.filter(by_label | by_id)


def to_bytes(text: str) -> bytes:
    """UTF-8, with lone surrogates written as the (invalid) bytes they stand for."""
    return text.encode("utf-8", "surrogatepass")


# ------------------------------------------------------------------------------ long table
def long_row(text_strategy):
    return st.fixed_dictionaries(
        {
            "dataset": dataset_name,
            "model": st.one_of(nasty_text, st.sampled_from(["m1", "m2", " m1 "])),
            "metric": st.one_of(nasty_text, st.sampled_from(["exact_match", "f1"])),
            "value": number,
        }
    )


@st.composite
def long_tables(draw, text=nasty_text):
    n = draw(st.integers(min_value=1, max_value=12))
    # Distinct inputs (after normalisation), so each row is one input id at most.
    texts = draw(
        st.lists(text, min_size=n, max_size=n, unique_by=lambda t: normalize_text(t))
    )
    rows = draw(st.lists(long_row(text), min_size=n, max_size=n))
    return [dict(r, input=t) for t, r in zip(texts, rows)]


def write_long_csv(path, rows) -> None:
    out = io.StringIO()
    w = csv.writer(out, lineterminator="\n")
    w.writerow(["input", "dataset", "model", "metric", "value"])
    for r in rows:
        value = r["value"]
        w.writerow([r["input"], r["dataset"], r["model"], r["metric"],
                    "" if value is None else str(value)])
    path.write_bytes(to_bytes(out.getvalue()))


def check_long_table(result, rows) -> None:
    assert_schema_clean(result)
    out_ids = set(result.outcomes["input_id"])
    assert result.outcomes.height == len(out_ids & {safe_input_id(r["input"]) for r in rows})
    for i, r in enumerate(rows, start=1):
        iid = safe_input_id(r["input"])
        named = mentioned(result.quarantine, f"row {i}", iid)
        if iid in out_ids:
            assert named.height == 0, (i, r, named.to_dicts())  # read, so not quarantined
        else:
            assert named.height > 0, (i, r)  # not read: named in quarantine, with a reason
            assert named["reason"].str.len_chars().min() > 0


@SETTINGS
@given(rows=long_tables())
def test_long_table_csv_any_text(tmp_path_factory, rows):
    path = tmp_path_factory.mktemp("lt") / "t.csv"
    write_long_csv(path, rows)
    try:
        result = long_table.read(str(path), names=NAMES)
    except UnreadableSource as exc:
        assert "t.csv" in str(exc)
        return
    check_long_table(result, rows)


@SETTINGS
@given(rows=long_tables(text=clean_text), numeric=st.booleans())
def test_long_table_parquet_nan_nulls_and_names(tmp_path_factory, rows, numeric):
    """Values as a Float64 column (NaN, infinities, nulls) or as text (anything)."""
    path = tmp_path_factory.mktemp("lt") / "t.parquet"
    def valid(text: str) -> str:  # Parquet holds Unicode only: lone surrogates become "?"
        return text.encode("utf-8", "replace").decode("utf-8")

    def value(v):
        if numeric:
            return v if isinstance(v, float) else None
        return None if v is None else valid(str(v))

    clean = [
        dict(r, **{k: valid(r[k]) for k in ("dataset", "model", "metric")}, value=value(r["value"]))
        for r in rows
    ]
    schema = {c: pl.String for c in ("input", "dataset", "model", "metric")}
    schema["value"] = pl.Float64 if numeric else pl.String
    pl.DataFrame(clean, schema=schema).write_parquet(path)
    try:
        result = long_table.read(str(path), names=NAMES)
    except UnreadableSource as exc:
        pytest.fail(f"a well-typed Parquet long table is readable: {exc}")
    check_long_table(result, clean)


@SETTINGS
@given(
    rows=st.lists(
        st.tuples(clean_text, st.sampled_from(["toy/a", "toy/b"]), st.sampled_from(["m1", "m2"]),
                  st.floats(min_value=-1e6, max_value=1e6)),
        min_size=1, max_size=15, unique_by=lambda r: normalize_text(r[0]),
    )
)
def test_long_table_well_formed_round_trip(tmp_path_factory, rows):
    path = tmp_path_factory.mktemp("lt") / "t.csv"
    write_long_csv(path, [dict(input=t, dataset=d, model=m, metric="f1", value=repr(v))
                          for t, d, m, v in rows])
    result = long_table.read(str(path), names=NAMES)
    assert result.quarantine.height == 0
    got = {(r["input_id"], r["dataset"], r["model"]): r["value"]
           for r in result.outcomes.iter_rows(named=True)}
    assert got == {(input_id(t), d, m): v for t, d, m, v in rows}
    assert result.inputs.height == len(rows)


# ----------------------------------------------------------------------------- MixInstruct
candidate = st.one_of(
    st.fixed_dictionaries(
        {
            "model": st.one_of(st.sampled_from(["koala-7B", "vicuna-13b"]), nasty_text,
                               st.none()),
            "decoding_method": st.one_of(st.sampled_from(["top_p", "beam"]), nasty_text),
            "scores": st.one_of(
                st.dictionaries(st.one_of(st.sampled_from(["bleu", "bertscore"]), nasty_text),
                                number, max_size=3),
                st.none(),
            ),
        }
    ),
    st.sampled_from([None, 3, "x", []]),
)
record_id = st.one_of(
    st.builds(lambda p, i: f"{p}/{i}", st.one_of(st.sampled_from(["sharegpt", "dolly", ".."]),
                                                  nasty_text), st.integers(0, 10**6)),
    st.integers(0, 100),
    st.none(),
)


@st.composite
def mix_records(draw):
    n = draw(st.integers(min_value=1, max_value=8))
    ids = draw(st.lists(record_id, min_size=n, max_size=n, unique_by=str))
    records = []
    for rid in ids:
        rec = {
            "id": rid,
            "instruction": draw(st.one_of(nasty_text, st.none(), st.integers())),
            "input": draw(st.one_of(nasty_text, st.none())),
            "candidates": draw(st.one_of(st.lists(candidate, max_size=3), st.none())),
        }
        records.append(draw(st.one_of(st.just(rec), st.sampled_from([[], 5, "text"]))))
    return records


def write_mix(path, records, *, lines: bool, ascii_only: bool) -> None:
    if lines:
        text = "".join(json.dumps(r, ensure_ascii=ascii_only) + "\n" for r in records)
    else:
        text = json.dumps(records, indent=1, ensure_ascii=ascii_only)
    # ensure_ascii: lone surrogates as "\udcff" escapes; else as invalid bytes.
    path.write_bytes(to_bytes(text))


def record_input_id(rec) -> str | None:
    if not isinstance(rec, dict) or not isinstance(rec.get("instruction"), str):
        return None
    extra = rec.get("input") if isinstance(rec.get("input"), str) else ""
    return safe_input_id(mixinstruct.input_text(rec["instruction"], extra))


@SETTINGS
@given(records=mix_records(), lines=st.booleans(), ascii_only=st.booleans())
def test_mixinstruct_any_record(tmp_path_factory, records, lines, ascii_only):
    # A JSON Lines file whose first line is a list reads as a JSON array: another case.
    assume(not (lines and isinstance(records[0], list)))
    path = tmp_path_factory.mktemp("mix") / ("test.jsonl" if lines else "test.json")
    write_mix(path, records, lines=lines, ascii_only=ascii_only)
    try:
        result = mixinstruct.read(str(path), names=NAMES)
    except UnreadableSource as exc:
        assert path.name in str(exc)
        return
    assert_schema_clean(result)
    kept = dict(zip(result.memberships["source_instance_id"], result.memberships["input_id"]))
    label = "line" if lines else "record"
    for i, rec in enumerate(records, start=1):
        rid = rec.get("id") if isinstance(rec, dict) else None
        iid = record_input_id(rec)
        named = mentioned(result.quarantine, f"{label} {i}", iid)
        if rid is not None and str(rid) in kept and kept[str(rid)] == iid:
            record_level = named.filter(
                pl.col("field").is_null() | pl.col("field").is_in(["id", "instruction", "input",
                                                                  "candidates"])
            )
            assert record_level.height == 0, (i, rec, record_level.to_dicts())
        else:
            assert named.height > 0, (i, rec, result.quarantine.to_dicts())
    # Each outcome is one finite score of a kept record.
    assert result.outcomes["value"].is_finite().all()


good_score = st.floats(min_value=-1e6, max_value=1e6)


@SETTINGS
@given(
    texts=st.lists(clean_text, min_size=1, max_size=8, unique_by=normalize_text),
    scores=st.lists(st.dictionaries(st.sampled_from(["bleu", "bertscore", "rouge1"]), good_score,
                                    min_size=1), min_size=1, max_size=3),
    lines=st.booleans(),
    ascii_only=st.booleans(),
)
def test_mixinstruct_well_formed_round_trip(tmp_path_factory, texts, scores, lines, ascii_only):
    models = ["koala-7B", "vicuna-13b", "alpaca-native"]
    records = [
        {"id": f"sharegpt/{i}", "instruction": t, "input": "",
         "candidates": [{"model": models[j], "decoding_method": "top_p", "scores": s}
                        for j, s in enumerate(scores)]}
        for i, t in enumerate(texts)
    ]
    path = tmp_path_factory.mktemp("mix") / ("test.jsonl" if lines else "test.json")
    write_mix(path, records, lines=lines, ascii_only=ascii_only)
    result = mixinstruct.read(str(path), names=NAMES)
    assert result.quarantine.height == 0
    assert result.memberships.height == len(texts)
    n_scores = len(texts) * sum(len(s) for s in scores)
    assert result.outcomes.height == n_scores
    got = {(r["input_id"], r["source_model"], r["metric"]): r["value"]
           for r in result.outcomes.iter_rows(named=True)}
    want = {(input_id(t), models[j], m): v for t in texts for j, s in enumerate(scores)
            for m, v in s.items()}
    assert got.keys() == want.keys()
    assert all(math.isclose(got[k], want[k], rel_tol=1e-12, abs_tol=1e-12) for k in want)
