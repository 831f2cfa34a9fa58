"""The MixInstruct reader on a hand-written fixture in the published format (no real copy)."""

from __future__ import annotations

import json
import math
import tracemalloc
from pathlib import Path

import fsspec
import polars as pl
import pytest
from fsspec.core import url_to_fs

from benchroute.transforms.ids import ModelNames, input_id
from benchroute.transforms.ingest import mixinstruct
from benchroute.transforms.ingest.base import UnreadableSource

FIXTURE = Path(__file__).parent / "fixtures" / "mixinstruct" / "test_data_prepared.json"
NAMES = ModelNames()


def read(path: Path | str):
    return mixinstruct.read(str(path), names=NAMES)


def records() -> list[dict]:
    return json.loads(FIXTURE.read_text())


def write(
    tmp_path: Path, recs, name: str = "test_data_prepared.json", raw: bytes | None = None
) -> Path:
    path = tmp_path / name
    if raw is not None:
        path.write_bytes(raw)
    elif name.endswith(".jsonl"):
        path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    else:
        path.write_text(json.dumps(recs, indent=1))  # Python's json: NaN/Infinity as bare words
    return path


def text_of(rec: dict) -> str:
    extra = rec.get("input") or ""
    return rec["instruction"] + ("\n" + extra if extra.strip() else "")


@pytest.fixture(scope="module")
def result():
    return read(FIXTURE)


# ------------------------------------------------------------------------------ discovery
def test_find_units_peeks_at_the_first_record(tmp_path):
    fs, root = url_to_fs(str(FIXTURE.parent))
    assert mixinstruct.find_units(fs, root) == [str(FIXTURE)]
    write(tmp_path, [{"id": "a", "instruction": "x"}], name="other.json")
    # a valid first record followed by garbage: found without reading the rest
    good = json.dumps(records()[0])
    write(tmp_path, None, name="big.json", raw=f"[{good}, {{broken".encode())
    write(tmp_path, records()[:2], name="val_data.jsonl")
    (tmp_path / "notes.txt").write_text("candidates")
    fs, root = url_to_fs(str(tmp_path))
    assert sorted(Path(p).name for p in mixinstruct.find_units(fs, root)) == [
        "big.json",
        "val_data.jsonl",
    ]


def test_split_and_dataset_names():
    assert mixinstruct.split_of("train_data_prepared.json") == "train"
    assert mixinstruct.split_of("val_data_prepared.json") == "val"
    assert mixinstruct.split_of("test_data_prepared.jsonl") == "test"
    assert mixinstruct.split_of("mine.json") is None
    assert mixinstruct.dataset_of("sharegpt/123") == "mixinstruct/sharegpt"
    assert mixinstruct.dataset_of("12345") == "mixinstruct"


# ------------------------------------------------------------------------------- values
def test_outcomes_equal_json_load(result):
    expected = {}
    for rec in records():
        for cand in rec.get("candidates", []):
            for metric, value in cand["scores"].items():
                if isinstance(value, (int, float)) and math.isfinite(value):
                    key = (
                        input_id(text_of(rec)),
                        f"mixinstruct/{rec['id'].split('/')[0]}",
                        cand["model"],
                        metric,
                    )
                    expected[key] = float(value)
    got = {
        (o["input_id"], o["dataset"], o["source_model"], o["metric"]): o["value"]
        for o in result.outcomes.iter_rows(named=True)
    }
    assert got == expected
    assert result.outcomes.height == 11 * 5 * 7 + 2 * 5 - 1
    assert set(result.outcomes["run_id"]) == {"mixinstruct:test_data_prepared.json:top_p_sampling"}
    assert result.models.height == 5


def test_inputs_and_memberships(result):
    recs = [r for r in records() if "candidates" in r]
    texts = dict(result.inputs.iter_rows())
    assert len(texts) == len(recs) == 11
    for rec in recs:
        assert texts[input_id(text_of(rec))] == text_of(rec)
    translate = next(r for r in recs if r["id"] == "unified_chip2/11408")
    assert text_of(translate) == translate["instruction"] + "\n" + translate["input"]
    blank = next(r for r in recs if r["id"] == "laion/60077")
    assert texts[input_id(blank["instruction"])] == blank["instruction"]
    m = result.memberships
    assert set(m["split"]) == {"test"}
    assert set(m["source_instance_id"]) == {r["id"] for r in recs}
    assert m.group_by("dataset").len().sort("dataset").rows() == [
        ("mixinstruct/dolly", 2),
        ("mixinstruct/itwgpt4", 2),
        ("mixinstruct/laion", 2),
        ("mixinstruct/sharegpt", 3),
        ("mixinstruct/unified_chip2", 2),
    ]


def test_fixture_bad_records_are_quarantined(result):
    q = {r["record"]: r for r in result.quarantine.iter_rows(named=True)}
    null_score = "record 4 (id sharegpt/8812, model koala-7B-HF)"
    assert set(q) == {null_score, "record 12 (id laion/70001)"}
    assert q[null_score]["field"] == "candidates[2].scores.bertscore"
    assert q[null_score]["reason"] == "score is not a finite number"
    assert q["record 12 (id laion/70001)"]["reason"] == "no candidates list"


# ---------------------------------------------------------------------------- bad input
def test_bad_records(tmp_path):
    recs = records()[:11]
    recs[0]["candidates"][0]["scores"]["bleu"] = math.nan  # written as NaN
    recs[0]["candidates"][1]["scores"]["bleu"] = math.inf  # written as Infinity
    recs[1]["candidates"][0]["scores"]["rouge1"] = "high"
    del recs[2]["candidates"][1]["model"]
    recs[3]["candidates"].append(dict(recs[3]["candidates"][0]))  # same model twice
    del recs[4]["id"]
    del recs[5]["instruction"]
    recs[6] = "not a record"
    recs.append(dict(records()[7]))  # repeated id
    recs.append(dict(records()[8], id="laion/1"))  # same text as record 9 under another id
    res = read(write(tmp_path, recs))
    q = {(r["record"], r["field"]): r["reason"] for r in res.quarantine.iter_rows(named=True)}
    m = [c["model"] for c in records()[0]["candidates"]]
    assert (
        "not a finite number"
        in q[f"record 1 (id unified_chip2/69962, model {m[0]})", "candidates[0].scores.bleu"]
    )
    assert (f"record 1 (id unified_chip2/69962, model {m[1]})", "candidates[1].scores.bleu") in q
    assert (f"record 2 (id unified_chip2/11408, model {m[0]})", "candidates[0].scores.rouge1") in q
    assert ("record 3 (id sharegpt/42137)", "candidates[1].model") in q
    assert (
        "duplicate candidate"
        in q[f"record 4 (id sharegpt/8812, model {m[0]})", "candidates[5].model"]
    )
    assert ("record 5", "id") in q
    assert ("record 6 (id itwgpt4/7730)", "instruction") in q
    assert "not an object" in q["record 7", None]
    assert q["record 12 (id dolly/3321) (repeats record 8 (id dolly/3321))", "id"].startswith(
        "duplicate id"
    )
    assert q[
        "record 13 (id laion/1) (repeats record 9 (id laion/55012))", "instruction"
    ].startswith("same text as an earlier record")
    # still read: everything else
    assert res.inputs.height == 11 - 3  # records 5, 6, 7 lost
    lost_scores = 1 + 1 + 1 + 1 * 7  # nan, inf, "high", the candidate without a model
    per_record = {r["id"]: 5 * len(r["candidates"][0]["scores"]) for r in records()[:11]}
    kept = sum(
        v for k, v in per_record.items() if k not in ("itwgpt4/2051", "itwgpt4/7730", "dolly/1045")
    )
    assert res.outcomes.height == kept - lost_scores - 1  # record 4 also has the null bertscore


def test_jsonl_bad_line_loses_only_that_line(tmp_path):
    path = write(tmp_path, records()[:4], name="val_data.jsonl")
    lines = path.read_text().splitlines()
    lines[1] = lines[1][:40]
    path.write_text("\n".join(lines) + "\n")
    res = read(path)
    assert res.inputs.height == 3
    assert set(res.memberships["split"]) == {"val"}
    (bad,) = res.quarantine.filter(pl.col("reason").str.contains("invalid JSON")).iter_rows(
        named=True
    )
    assert bad["record"] == "line 2"


def test_truncated_array_keeps_records_before_the_break(tmp_path):
    text = json.dumps(records(), indent=1).encode()
    cut = text.index(b'"id": "dolly/1045"')
    res = read(write(tmp_path, None, raw=text[:cut]))
    assert res.inputs.height == 6  # records 1-6 came before the break
    q = res.quarantine.filter(pl.col("reason").str.contains("invalid JSON"))
    assert q["record"].to_list() == ["record 7"]


def test_invalid_utf8_inside_the_array_quarantines_that_record_only(tmp_path):
    text = json.dumps(records(), indent=1, ensure_ascii=False).encode()
    (tmp_path / "good").mkdir()
    (tmp_path / "bad").mkdir()
    good = read(write(tmp_path / "good", None, raw=text))
    at = text.index(b"Who wrote")
    res = read(write(tmp_path / "bad", None, raw=text[:at] + b"\xc3\x28" + text[at:]))
    assert res.inputs.height == good.inputs.height - 1  # every record after it is still read
    bad = res.quarantine.filter(pl.col("reason").str.contains("not valid UTF-8"))
    assert bad.height == 1 and bad["field"][0] == "instruction"
    assert bad["record"][0].startswith("record 7 (id ")
    assert "\ufffd(Who wrote" in bad["value"][0]
    assert not res.quarantine["reason"].str.contains("invalid JSON").any()


@pytest.mark.parametrize(
    "raw, match",
    [
        (b"", "empty"),
        (b"hello", "not JSON"),
        (b'[{"id": ', "not valid JSON"),
        (b"{broken\n{also broken\n", "no valid JSON record"),
    ],
)
def test_unreadable_files(tmp_path, raw, match):
    with pytest.raises(UnreadableSource, match=match) as err:
        read(write(tmp_path, None, raw=raw))
    assert "test_data_prepared.json" in str(err.value)


def test_streaming_keeps_memory_flat(tmp_path):
    """A 20 MB file of long candidate texts is read with a few MB of Python memory."""
    base = records()[0]
    big = "lorem ipsum " * 3_400  # ~40 KB per candidate text
    recs = []
    for i in range(100):
        cands = [dict(c, text=big) for c in base["candidates"]]
        recs.append(dict(base, id=f"sharegpt/{i}", instruction=f"question {i}", candidates=cands))
    path = write(tmp_path, recs, name="train_data_prepared.json")
    assert path.stat().st_size > 19_000_000
    tracemalloc.start()
    res = read(path)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert res.outcomes.height == 100 * 5 * 7
    assert peak < 4_000_000, f"peak Python memory {peak / 1e6:.1f} MB"


# -------------------------------------------------------------------------------- memory
def test_reads_from_memory_filesystem(memory_url, result):
    fs = fsspec.filesystem("memory")
    root = fs._strip_protocol(memory_url)
    fs.pipe_file(f"{root}/mix/{FIXTURE.name}", FIXTURE.read_bytes())
    (unit,) = mixinstruct.find_units(fs, root)
    got = mixinstruct.read(fs.unstrip_protocol(unit), names=NAMES)
    assert got.outcomes.equals(result.outcomes)
    assert got.counts() == result.counts()


# --------------------------------------------------------------------------- real source
@pytest.mark.slow
def test_whole_real_source(raw_data):
    """A real MixInstruct copy, if one is ever placed under raw/mixinstruct."""
    src = raw_data / "mixinstruct"
    if not src.is_dir():
        pytest.skip("no real MixInstruct copy is available offline (see ../shared/data/README.md)")
    fs, root = url_to_fs(str(src))
    for unit in mixinstruct.find_units(fs, root):
        res = mixinstruct.read(unit, names=ModelNames.default())
        assert res.models.height == 11, unit
        assert res.outcomes.height > 0


def test_reads_from_s3(s3_server, tmp_path):
    """JSON array and JSON Lines through s3fs (buffered remote files, no local path)."""
    fs, bucket = url_to_fs(s3_server)
    lines = write(tmp_path, records()[:3], name="val_data.jsonl")
    root = f"{bucket}/mixinstruct-{tmp_path.name}"
    fs.put_file(str(FIXTURE), f"{root}/{FIXTURE.name}")
    fs.put_file(str(lines), f"{root}/{lines.name}")
    units = sorted(mixinstruct.find_units(fs, root))
    assert [Path(u).name for u in units] == [FIXTURE.name, "val_data.jsonl"]
    got = mixinstruct.read(f"s3://{units[0]}", names=NAMES)
    assert got.outcomes.equals(read(FIXTURE).outcomes)
    assert mixinstruct.read(f"s3://{units[1]}", names=NAMES).inputs.height == 3
