"""One damaged file beside good ones (issue: hardening, items 6-8).

Each test copies the shipped sample (small real units of every format) into a landing zone,
damages one file, and checks three things: every good unit is read exactly as from the intact
sample (same counts), the damaged file is named, with the record, field and reason where known,
in quarantine, in the unreadable units or in the *not a benchmark layout* list, and every file of
the landing zone is accounted for (nothing is skipped in silence). The last tests run the real
Prefect flow over a landing zone with many damages at once.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import polars as pl
import pytest

from benchroute.schemas.tables import safe_name
from benchroute.transforms.ids import ModelNames
from benchroute.transforms.ingest import (
    Accounting,
    UnreadableSource,
    account,
    discover,
    fingerprint,
    read_unit,
)
from benchroute.transforms.ingest import mmlu_pro as mmlu_pro_reader

from conftest import SAMPLE

NAMES = ModelNames.default()
MMLU = Path("mmlu_pro")
ALPACA = Path("alpaca_eval/annotations_long.parquet")
MIX = Path("mixinstruct/test_data_prepared.json")
EVALS = Path("routellm/routellm/evals")
ALGEBRA = EVALS / "mmlu/responses/mmlu_abstract_algebra.csv"
JUDGEMENTS = EVALS / "mt_bench/judgements.jsonl"
# The side files of the sample (documentation, licences, the MT-Bench questions read with the
# judgements beside them): the only files of the sample that are not part of a unit.
SAMPLE_SIDE_FILES = {
    "alpaca_eval/LICENSE",
    "alpaca_eval/SOURCE.md",
    "helm/SOURCE.md",
    "mixinstruct/SOURCE.md",
    "routellm/LICENSE",
    "routellm/SOURCE.md",
    str(EVALS / "mt_bench/question.jsonl"),
}


@dataclass
class Run:
    """What discovery and reading made of a landing zone (as the ingest flow does, per unit)."""

    root: Path
    counts: dict[str, dict[str, int]] = field(default_factory=dict)  # unit (relative) -> counts
    failed: dict[str, str] = field(default_factory=dict)  # unit (relative) -> message
    quarantine: pl.DataFrame = field(default_factory=pl.DataFrame)
    memberships: pl.DataFrame = field(default_factory=pl.DataFrame)
    outcomes: pl.DataFrame = field(default_factory=pl.DataFrame)
    files: Accounting = field(default_factory=Accounting)

    def q(self, name: str) -> pl.DataFrame:
        """The quarantine rows of files whose path ends with ``name``."""
        return self.quarantine.filter(pl.col("file").str.ends_with(str(name)))

    @property
    def not_benchmark(self) -> dict[str, str]:
        return {self.rel(p): why for p, why in self.files.not_benchmark.items()}

    def rel(self, path: str) -> str:
        return os.path.relpath(path, self.root)


def ingest(root: Path) -> Run:
    units = discover([str(root)])
    run = Run(root=root, files=account([str(root)], units))
    q, m, o = [], [], []
    for unit in units:
        rel = run.rel(unit.url)
        try:
            result = read_unit(unit, NAMES)
        except UnreadableSource as exc:
            run.failed[rel] = str(exc)
            continue
        run.counts[rel] = result.counts()
        q.append(result.quarantine)
        m.append(result.memberships)
        o.append(result.outcomes)
    run.quarantine = pl.concat(q, how="vertical_relaxed")
    run.memberships = pl.concat(m, how="vertical_relaxed")
    run.outcomes = pl.concat(o, how="vertical_relaxed")
    assert_accounted(run)
    return run


def assert_accounted(run: Run) -> None:
    """Every file of the landing zone is in a unit, a side file, or reported by name."""
    units = set(run.counts) | set(run.failed)
    for path in sorted(p for p in run.root.rglob("*") if p.is_file() or p.is_symlink()):
        if path.is_dir():
            continue
        rel = str(path.relative_to(run.root))
        in_unit = any(rel == u or rel.startswith(u.rstrip("/") + "/") for u in units)
        shown = str(path)
        assert (
            in_unit or shown in run.files.ignored or shown in run.files.not_benchmark
        ), f"{rel} is neither read, ignored by a rule, nor reported"


@pytest.fixture(scope="module")
def baseline(tmp_path_factory) -> Run:
    root = tmp_path_factory.mktemp("intact") / "landing"
    shutil.copytree(SAMPLE, root)
    return ingest(root)


@pytest.fixture
def landing(tmp_path) -> Path:
    root = tmp_path / "landing"
    shutil.copytree(SAMPLE, root)
    return root


def assert_others_intact(run: Run, baseline: Run, *damaged: Path) -> None:
    """Every unit but the damaged ones was read exactly as from the intact sample."""
    for unit, counts in baseline.counts.items():
        if any(unit == str(d) or str(d).startswith(unit.rstrip("/") + "/") for d in damaged):
            continue
        assert run.counts.get(unit) == counts, f"{unit} was not read as before"


# ------------------------------------------------------------------------------ the sample
def test_every_sample_file_is_accounted_for(baseline):
    assert baseline.failed == {}
    assert baseline.not_benchmark == {}
    assert {baseline.rel(p) for p in baseline.files.ignored} == SAMPLE_SIDE_FILES
    assert {"helm", "mmlu_pro", "alpaca_eval", "routellm", "mixinstruct"} <= {
        u.split("/")[0] for u in baseline.counts
    }


# ------------------------------------------------------------------- item 6: one bad unit
def test_mmlu_pro_column_of_the_wrong_type(landing, baseline):
    results = landing / MMLU / "results.parquet"
    pl.read_parquet(results).with_columns(
        pl.format("q{}", "question_id").alias("question_id")
    ).write_parquet(results)
    run = ingest(landing)
    assert set(run.failed) == {str(MMLU)}
    message = run.failed[str(MMLU)]
    assert "results.parquet" in message and "'question_id' is String" in message
    assert "expected an integer" in message
    assert_others_intact(run, baseline, MMLU)


@pytest.mark.parametrize("damage", ["dangling_link", "folder"])
def test_mmlu_pro_results_not_a_file(landing, baseline, damage):
    results = landing / MMLU / "results.parquet"
    results.unlink()
    if damage == "dangling_link":
        results.symlink_to(landing / "nowhere.parquet")
        expected = "results.parquet: file not found (a missing file or a dangling link)"
    else:
        results.mkdir()
        (results / "part-0.parquet").write_bytes(b"PAR1")
        expected = "results.parquet: is a folder, not a file"
    run = ingest(landing)
    assert set(run.failed) == {str(MMLU)}
    assert expected in run.failed[str(MMLU)]
    assert_others_intact(run, baseline, MMLU)


def test_dangling_link_beside_good_units_is_reported(landing, baseline):
    (landing / "routellm" / "extra.csv").symlink_to(landing / "gone.csv")
    (landing / ALGEBRA).unlink()
    (landing / ALGEBRA).symlink_to(landing / "gone_too.csv")  # a RouteLLM file by its name
    run = ingest(landing)
    assert run.not_benchmark == {
        "routellm/extra.csv": "cannot be read: a dangling link or a file that vanished"
    }
    assert set(run.failed) == {str(ALGEBRA)}
    assert "mmlu_abstract_algebra.csv: cannot read file" in run.failed[str(ALGEBRA)]
    assert_others_intact(run, baseline, ALGEBRA)


def test_fingerprint_of_a_unit_with_a_dangling_link():
    import fsspec

    fs = fsspec.filesystem("memory")
    fs.pipe("/fp/a.json", b"[]")
    before = fingerprint(fs, "/fp")

    class Broken(type(fs)):
        def open(self, path, *a, **k):
            if path.endswith("b.json"):
                raise FileNotFoundError(path)
            return super().open(path, *a, **k)

    fs.pipe("/fp/b.json", b"[]")
    broken = Broken()
    after = fingerprint(broken, "/fp")
    assert after != before and after == fingerprint(broken, "/fp")
    fs.rm("/fp", recursive=True)


# ------------------------------------------------------- item 7: skipped files are named
def test_empty_alpaca_parquet(landing, baseline):
    (landing / ALPACA).write_bytes(b"")
    run = ingest(landing)
    assert run.failed == {str(ALPACA): f"{landing / ALPACA}: file is empty (0 bytes)"}
    assert_others_intact(run, baseline, ALPACA)


def test_alpaca_parquet_that_is_a_folder(landing, baseline):
    (landing / ALPACA).unlink()
    (landing / ALPACA).mkdir()
    run = ingest(landing)
    assert run.failed == {str(ALPACA): f"{landing / ALPACA}: is a folder, not a file"}
    assert_others_intact(run, baseline, ALPACA)


def test_long_table_csv_missing_a_column(landing, baseline):
    path = landing / "mine" / "results.csv"
    path.parent.mkdir()
    path.write_text('input,dataset,model,metric\n"What is 2+2?",toy/arith,m1,exact_match\n')
    run = ingest(landing)
    assert set(run.failed) == {"mine/results.csv"}
    assert "results.csv: missing required column(s) 'value'" in run.failed["mine/results.csv"]
    assert_others_intact(run, baseline)


def test_files_of_no_known_layout_are_reported_by_name(landing, baseline):
    (landing / "notes.txt").write_text("to do: ask for the 2025 runs")
    (landing / "empty.json").write_bytes(b"")
    (landing / "mixinstruct" / "utf16.json").write_bytes(
        (landing / MIX).read_text().encode("utf-16")
    )
    run = ingest(landing)
    looked = "looked for: helm, mmlu_pro, alpaca_eval, routellm, mixinstruct, long_table"
    assert run.not_benchmark == {
        "notes.txt": f"no known benchmark layout ({looked})",
        "empty.json": f"empty file (0 bytes); no known benchmark layout ({looked})",
        "mixinstruct/utf16.json": f"no known benchmark layout ({looked})",
    }
    assert run.failed == {}
    assert_others_intact(run, baseline)


# ------------------------------------------------------- item 8: one bad text, one record
def test_mixinstruct_one_record_not_utf8(landing, baseline):
    raw = (landing / MIX).read_bytes()
    at = raw.index(b"What are some good ways") + len(b"What are")
    (landing / MIX).write_bytes(raw[:at] + b"\xff" + raw[at:])
    run = ingest(landing)
    q = run.q(str(MIX)).filter(pl.col("reason").str.contains("not valid UTF-8"))
    assert q.select("record", "field").to_dicts() == [
        {"record": "record 1 (id unified_chip2/69962)", "field": "instruction"}
    ]
    assert q["value"][0].startswith("What are\ufffd some good ways")
    before, after = baseline.counts[str(MIX)], run.counts[str(MIX)]
    assert after["inputs"] == before["inputs"] - 1  # the 11 records after it are all read
    assert after["quarantine"] == before["quarantine"] + 1
    assert_others_intact(run, baseline, MIX)


def test_mixinstruct_whole_file_not_utf8(landing, baseline):
    """A Latin-1 file: every record with an accented letter is quarantined by record, the unit
    is not lost, and every record is accounted for."""
    records = json.loads((landing / MIX).read_text())
    for r in records[:10]:
        r["instruction"] = "Café: " + r["instruction"]
    (landing / MIX).write_bytes(json.dumps(records, indent=1, ensure_ascii=False).encode("latin-1"))
    run = ingest(landing)
    q = run.q(str(MIX))
    bad = q.filter(pl.col("reason").str.contains("not valid UTF-8"))
    assert bad["record"].to_list() == [
        f"record {i} (id {r['id']})" for i, r in enumerate(records[:10], start=1)
    ]
    assert set(bad["field"]) == {"instruction"}
    assert (bad["value"].str.starts_with("Caf\ufffd: ")).all()
    # Records 11 and 12 are read as before (record 12 has no candidates: quarantined as before).
    assert run.counts[str(MIX)]["inputs"] == 1
    assert_others_intact(run, baseline, MIX)


def test_mixinstruct_lone_surrogate_escape(landing, baseline):
    """``"\\udcff"`` is valid JSON but not Unicode text: that record only is quarantined."""
    raw = (landing / MIX).read_bytes()
    at = raw.index(b"What are some good ways")
    (landing / MIX).write_bytes(raw[:at] + b"\\udcff" + raw[at:])
    run = ingest(landing)
    q = run.q(str(MIX)).filter(pl.col("reason").str.contains("not valid UTF-8"))
    assert q["record"].to_list() == ["record 1 (id unified_chip2/69962)"]
    assert run.counts[str(MIX)]["inputs"] == baseline.counts[str(MIX)]["inputs"] - 1


def test_routellm_csv_one_record_not_utf8(landing, baseline):
    raw = (landing / ALGEBRA).read_bytes()
    at = raw.index(b"Let p = (1, 2, 5, 4)(2, 3)")
    (landing / ALGEBRA).write_bytes(raw[:at] + b"\xe9" + raw[at:])
    run = ingest(landing)
    q = run.q(str(ALGEBRA))
    reason = "not valid UTF-8 (undecodable bytes in this row)"
    assert q.select("record", "field", "reason").to_dicts() == [
        {"record": "row 2", "field": "row", "reason": reason}
    ]
    before, after = baseline.counts[str(ALGEBRA)], run.counts[str(ALGEBRA)]
    assert after["inputs"] == before["inputs"] - 1
    assert after["outcomes"] == before["outcomes"] - 2  # two models per prompt
    assert_others_intact(run, baseline, ALGEBRA)


def test_routellm_judgement_line_not_utf8(landing, baseline):
    lines = (landing / JUDGEMENTS).read_bytes().splitlines(keepends=True)
    lines[4] = lines[4].replace(b'"model": "', b'"model": "\xff', 1)
    (landing / JUDGEMENTS).write_bytes(b"".join(lines))
    run = ingest(landing)
    q = run.q(str(JUDGEMENTS))
    assert q.filter(pl.col("record") == "line 5")["reason"].to_list() == ["line is not valid UTF-8"]
    before, after = baseline.counts[str(JUDGEMENTS)], run.counts[str(JUDGEMENTS)]
    assert after["outcomes"] < before["outcomes"] and after["inputs"] == before["inputs"]
    assert_others_intact(run, baseline, JUDGEMENTS)


# -------------------------------------------------------------- item 8: unsafe dataset names
UNSAFE = [
    "helm/../../../outside",
    "/etc/passwd",
    "toy//arith",
    "toy/",
    "./toy",
    "toy\\arith",
    "toy/ari\x00th",
    "toy/ari\nth",
    "toy/\x1b[31mred",
]


def test_safe_name_rule():
    safe = ["toy/arith", "mmlu_pro/law", "helm/bbq/subject=all", "a..b/c", "é/ü", "mixinstruct"]
    names = pl.Series(safe + UNSAFE + ["", ".", "..", "a/./b", "a/.."])
    ok = pl.DataFrame({"d": names}).select(safe_name(pl.col("d")))["d"].to_list()
    assert ok == [True] * len(safe) + [False] * (len(names) - len(safe))


def test_long_table_unsafe_dataset_names_are_quarantined(landing, baseline):
    rows = [("What is 2+2?", "toy/arith", "m1", "exact_match", 1)] + [
        (f"Question {i}?", name, "m1", "exact_match", 1) for i, name in enumerate(UNSAFE)
    ]
    columns = ["input", "dataset", "model", "metric", "value"]
    pl.DataFrame(rows, schema=columns, orient="row").write_parquet(landing / "mine.parquet")
    run = ingest(landing)
    counts = run.counts["mine.parquet"]
    assert counts["inputs"] == counts["memberships"] == counts["outcomes"] == 1
    q = run.q("mine.parquet")
    assert set(q["field"]) == {"dataset"}
    assert (q["reason"].str.contains("'..'") & q["reason"].str.contains("backslash")).all()
    refused = q.filter(pl.col("reason").str.starts_with("memberships"))["value"].map_elements(
        lambda v: json.loads(v)["dataset"], return_dtype=pl.String
    )
    assert sorted(refused) == sorted(UNSAFE)
    assert_others_intact(run, baseline)


def test_mixinstruct_id_with_dot_dot_is_quarantined(landing, baseline):
    records = json.loads((landing / MIX).read_text())
    records[0]["id"] = "../../outside/1"
    (landing / MIX).write_text(json.dumps(records, indent=1))
    run = ingest(landing)
    q = run.q(str(MIX)).filter(pl.col("field") == "dataset")  # the id's prefix: "mixinstruct/.."
    assert q.height > 0
    assert q["value"].str.contains('"dataset":"mixinstruct/.."', literal=True).all()
    assert not run.memberships["dataset"].str.contains("..", literal=True).any()
    assert not run.outcomes["dataset"].str.contains("..", literal=True).any()
    assert run.counts[str(MIX)]["inputs"] == baseline.counts[str(MIX)]["inputs"] - 1


def test_mmlu_pro_category_with_dot_dot_is_quarantined(landing, baseline):
    questions = landing / MMLU / "questions.parquet"
    df = pl.read_parquet(questions)
    first = df["category"][0]
    df.with_columns(pl.col("category").replace(first, f"../{first}")).write_parquet(questions)
    run = ingest(landing)
    assert not run.memberships["dataset"].str.contains("..", literal=True).any()
    q = run.q(f"{MMLU}/results.parquet").filter(pl.col("field") == "dataset")
    assert q.height > 0 and q["value"].str.contains(f'"mmlu_pro/../{first}"').all()


def test_helm_run_name_with_dot_dot_is_refused(landing, baseline):
    """HELM's dataset comes from the run name: whether the HELM reader escapes the name or the
    schema boundary refuses it, no dataset name that leaves its folder gets through."""
    spec_path = next((landing / "helm").rglob("run_spec.json"))
    spec = json.loads(spec_path.read_text())
    spec["name"] = "../../../outside:" + spec["name"].split(":", 1)[1]
    spec_path.write_text(json.dumps(spec))
    run = ingest(landing)
    for frame in (run.memberships, run.outcomes):
        assert frame.select(safe_name(pl.col("dataset")).all()).item()
    unit = str(spec_path.parent.relative_to(landing))
    q = run.quarantine.filter(pl.col("field") == "dataset")
    escaped = run.memberships.filter(pl.col("dataset").str.contains("outside"))
    assert unit in run.failed or q.height > 0 or escaped.height > 0


# ----------------------------------------------------------- any error of one unit is its own
def test_any_reader_error_is_that_units_unreadable_source(landing, monkeypatch):
    units = [u for u in discover([str(landing)]) if u.kind == "mmlu_pro"]

    def broken(url, *, names):
        raise pl.exceptions.InvalidOperationError("conversion from `str` to `i64` failed")

    monkeypatch.setattr(mmlu_pro_reader, "read", broken)
    with pytest.raises(UnreadableSource, match="mmlu_pro: InvalidOperationError while reading"):
        read_unit(units[0], NAMES)

    def flaky(url, *, names):
        raise ConnectionResetError("peer went away")

    monkeypatch.setattr(mmlu_pro_reader, "read", flaky)
    with pytest.raises(ConnectionResetError):  # may pass: left to the caller's retries
        read_unit(units[0], NAMES)


# -------------------------------------------------------------------- the real Prefect flow
@pytest.fixture(scope="module")
def damaged_flow(tmp_path_factory):
    """The flow over a landing zone with one damage per format, twice."""
    from benchroute.flows.ingest import ingest_flow

    root = tmp_path_factory.mktemp("flow") / "landing"
    shutil.copytree(SAMPLE, root)
    results = root / MMLU / "results.parquet"
    pl.read_parquet(results).with_columns(pl.col("model").hash()).write_parquet(results)
    (root / ALPACA).write_bytes(b"")
    raw = (root / MIX).read_bytes()
    at = raw.index(b"What are some good ways")
    (root / MIX).write_bytes(raw[:at] + b"\xff" + raw[at:])
    (root / "mine.csv").write_text('input,dataset,model,metric\n"2+2?",toy/arith,m1,em\n')
    (root / "gone.parquet").symlink_to(root / "nowhere.parquet")
    (root / "notes.txt").write_text("not data")
    store = str(tmp_path_factory.mktemp("store") / "s")
    first = ingest_flow(sources=[str(root)], store=store, progress=False)
    second = ingest_flow(sources=[str(root)], store=store, progress=False)
    return root, store, first, second


def test_flow_ingests_the_good_units_and_names_the_bad(damaged_flow):
    from benchroute.artifacts.store import Store

    root, store, summary, _ = damaged_flow
    failed = {k.split(":", 1)[1]: v for k, v in summary["units_failed"].items()}
    assert set(failed) == {str(root / MMLU), str(root / ALPACA), str(root / "mine.csv")}
    wrong = "results.parquet: wrong column type: column 'model' is UInt64"
    assert wrong in failed[str(root / MMLU)]
    assert set(summary["not_benchmark"]) == {str(root / "gone.parquet"), str(root / "notes.txt")}
    assert {os.path.relpath(p, root) for p in summary["ignored"]} == SAMPLE_SIDE_FILES
    s = Store(store)
    q = s.read("quarantine")
    for bad in (root / MMLU, root / ALPACA, root / "mine.csv"):
        row = q.filter(pl.col("file") == str(bad))
        assert row.height == 1 and row["reason"][0].startswith("unreadable: ")
    mix = q.filter(pl.col("file") == str(root / MIX))
    assert mix.filter(pl.col("reason").str.contains("not valid UTF-8"))["record"].to_list() == [
        "record 1 (id unified_chip2/69962)"
    ]
    sources = set(s.read("outcomes")["source"])
    assert {"helm", "routellm", "mixinstruct"} <= sources
    assert not {"mmlu_pro", "alpaca_eval"} & sources


def test_second_flow_run_reads_nothing_again_and_still_reports(damaged_flow):
    _, _, first, second = damaged_flow
    assert second["units_skipped"] == second["units_found"] == first["units_found"]
    assert second["units_failed"] == {}
    assert second["not_benchmark"] == first["not_benchmark"]
