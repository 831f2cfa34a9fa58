"""Incremental labels (issue 16 item 5): new outcome parts get their labels appended when that is
exactly what a full relabel would add; anything else falls back to the full relabel. The stages
are driven directly (no Prefect): read, commit, then ``relabel`` as the ingest flow does."""

from __future__ import annotations

import functools
import importlib.util
import json
import logging
import shutil
import sys
from pathlib import Path

import polars as pl
import pytest
from conftest import REPO

from benchroute.artifacts.stages import ingest as stage
from benchroute.artifacts.store import Store
from benchroute.transforms import binarize as bz
from benchroute.transforms.ingest import discover

_spec = importlib.util.spec_from_file_location("synth", REPO / "benchmarks" / "synth.py")
synth = importlib.util.module_from_spec(_spec)
sys.modules["synth"] = synth
_spec.loader.exec_module(synth)

LOG = logging.getLogger("test_incremental_labels")
SAMPLE = REPO / "sample"
COLS = ["input_id", "dataset", "model", "metric", "value", "n_outcomes", "y", "rule"]
HEADER = "input,dataset,model,metric,value"


def ingest(url: str, paths: list[Path], rules: str | None = None, *, label: bool = True) -> str:
    """The ingest flow's steps without Prefect: commit the new units, relabel when stale.
    Returns how the labels were brought up to date ("append", "replace" or "current")."""
    s = Store(url)
    units = stage.new_units(s, discover([str(p) for p in paths]))
    summary = stage.IngestSummary(store=url)
    reads = [(u, functools.partial(stage.read_tables, u, None, rules)) for u in units]
    stage.commit_reads(s, reads, summary, LOG)
    assert not summary.units_failed, summary.units_failed
    if not label or not stage.stale_labels(s, rules):
        return "current"
    stage.relabel(url, rules)
    return last_labels_mode(url)


def last_labels_mode(url: str) -> str:
    last = [c for c in Store(url).commits() if "labels" in c.append or "labels" in c.replace][-1]
    return "append" if "labels" in last.append else "replace"


def full_labels(url: str, rules: str | None = None) -> pl.DataFrame:
    """What a full relabel of the store's outcomes gives (today's path, nothing committed)."""
    s = Store(url)
    outcomes = s.read("outcomes")
    rule_list = bz.effective_rules(outcomes, bz.load_rules(rules), bz.main_metric_hints(s.commits()))
    return bz.binarize(outcomes, rule_list).select(COLS).sort(COLS)


def assert_labels_are_full(url: str, rules: str | None = None) -> None:
    s = Store(url)
    stored = s.read("labels").select(COLS)
    assert stored.select(stage.KEYS["labels"]).is_duplicated().sum() == 0
    assert stored.sort(COLS).equals(full_labels(url, rules))
    assert stage.stale_labels(s, rules) is None
    assert stage.label_count(s) == stored.height


def long_table(path: Path, rows: list[tuple]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [HEADER] + [",".join(json.dumps(x) if isinstance(x, str) else str(x) for x in r) for r in rows]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


# ------------------------------------------------------------------------------ grown stores
def grown(tmp_path: Path, parts: list[Path], *, label_all: bool = False) -> str:
    """A store that ingested ``parts`` one by one, each from a landing folder of its own; only
    the first ingest labels unless ``label_all`` (the later outcomes wait for a relabel)."""
    url = str(tmp_path / "store")
    for i, part in enumerate(parts):
        step = tmp_path / f"src{i}"
        step.mkdir()
        shutil.copy(part, step / part.name)
        ingest(url, [step], label=label_all or i == 0)
    return url


@pytest.fixture(scope="module")
def synth_parts(tmp_path_factory) -> list[Path]:
    """A small synthetic leaderboard, one file per block of models (each a new-models step)."""
    out = tmp_path_factory.mktemp("synth")
    spec = synth.SynthSpec(inputs=200, models=10, seed=3, topics=4, benchmarks=2, queries=5,
                           rows_per_part=300)
    synth.generate(spec, out)
    return sorted((out / synth.SOURCE_DIR).glob("*.parquet"))


def test_new_models_are_appended_and_equal_the_full_relabel(synth_parts, tmp_path):
    assert len(synth_parts) >= 4
    url = str(tmp_path / "store")
    modes = []
    for i, part in enumerate(synth_parts):
        step = tmp_path / f"src{i}"
        step.mkdir()
        shutil.copy(part, step / part.name)
        modes.append(ingest(url, [step]))
        assert_labels_are_full(url)
    assert modes[0] == "replace" and set(modes[1:]) == {"append"}, modes
    commits = Store(url).commits()
    appended = [c for c in commits if "labels" in c.append]
    assert all(c.info["mode"] == "append" and c.info["rules"] == appended[0].info["rules"]
               for c in appended)


def test_sample_sources_in_steps_equal_the_full_relabel(tmp_path):
    """Real readers: each sample source lands in its own run (new datasets, new inputs, HELM
    hints, MixInstruct's relative rules); the labels always equal a full relabel's."""
    url = str(tmp_path / "store")
    modes = []
    for source in ("mmlu_pro", "routellm", "mixinstruct", "alpaca_eval", "helm"):
        modes.append(ingest(url, [SAMPLE / source]))
        assert_labels_are_full(url)
    assert modes[0] == "replace"
    assert "append" in modes, modes


def test_a_full_relabel_in_buckets_equals_the_in_memory_one(tmp_path, monkeypatch):
    """Out of core: with buckets far smaller than the store, a full relabel spreads the outcomes
    of every sample source (HELM perturbations and hints, MixInstruct's relative rules) over
    buckets of inputs, never reads a whole outcome table, writes a labels part per bucket in one
    commit, and gives exactly the in-memory labels."""
    url = str(tmp_path / "store")
    ingest(url, [SAMPLE / s for s in ("mmlu_pro", "routellm", "mixinstruct", "alpaca_eval", "helm")],
           label=False)
    s = Store(url)
    total = sum(s.part_rows(p) for p in s.parts("outcomes"))
    monkeypatch.setattr(stage, "RELABEL_BUCKET_ROWS", total // 7)
    real = Store.read_parts

    def no_whole_outcomes(self, table, parts, columns=None):
        assert table != "outcomes", "the bucketed relabel read whole outcome parts"
        return real(self, table, parts, columns)

    monkeypatch.setattr(Store, "read_parts", no_whole_outcomes)
    n = stage.relabel(url, None)
    monkeypatch.setattr(Store, "read_parts", real)
    last = s.commits()[-1]
    assert "mode" not in last.info  # a replacement, not an append
    assert len(last.replace["labels"]) >= 7  # a part per bucket, all in one commit
    assert n == s.read("labels").height
    assert_labels_are_full(url)


# ------------------------------------------------------------------------------ fallbacks
def test_a_second_run_on_labelled_keys_falls_back(tmp_path):
    """A second run of a model on a labelled input is averaged with the first: full relabel."""
    url = str(tmp_path / "store")
    rows = [(f"q{i}", "toy/a", m, "exact_match", (i + j) % 2) for i in range(6)
            for j, m in enumerate(["m1", "m2"])]
    assert ingest(url, [long_table(tmp_path / "a" / "run1.csv", rows)]) == "replace"
    again = [(f"q{i}", "toy/a", "m1", "exact_match", 1) for i in range(3)]
    assert ingest(url, [long_table(tmp_path / "b" / "run2.csv", again)]) == "replace"
    assert_labels_are_full(url)
    assert Store(url).read("labels").filter(pl.col("n_outcomes") == 2).height == 3
    # An old model on new inputs only is appended (its keys are looked up, none is stored).
    fresh = [(f"q{i}", "toy/a", "m2", "exact_match", 1) for i in range(6, 9)]
    assert ingest(url, [long_table(tmp_path / "c" / "run3.csv", fresh)]) == "append"
    assert_labels_are_full(url)


def test_a_new_model_on_a_relative_rule_falls_back(tmp_path):
    """relative_to_best compares the models on an input: a new one moves the others' labels."""
    url = str(tmp_path / "store")
    rows = [(f"q{i}", "toy/gen", m, "bertscore", v) for i in range(4)
            for m, v in (("m1", 0.80), ("m2", 0.85))]
    assert ingest(url, [long_table(tmp_path / "a" / "r.csv", rows)]) == "replace"
    best = [(f"q{i}", "toy/gen", "m3", "bertscore", 0.95) for i in range(4)]
    assert ingest(url, [long_table(tmp_path / "b" / "r.csv", best)]) == "replace"
    assert_labels_are_full(url)
    assert Store(url).read("labels").filter(pl.col("model") == "m2")["y"].sum() == 0
    # ... but a relative dataset on new inputs only is appended.
    other = [(f"n{i}", "toy/gen", "m3", "bertscore", 0.5) for i in range(4)]
    assert ingest(url, [long_table(tmp_path / "c" / "r.csv", other)]) == "append"
    assert_labels_are_full(url)


def test_a_dataset_whose_primary_metric_changes_falls_back(tmp_path):
    """A new part brings a metric that outranks the dataset's primary one (exact_match comes
    before f1_score in the rules): every label of the dataset changes."""
    url = str(tmp_path / "store")
    f1 = [(f"q{i}", "toy/qa", m, "f1_score", 0.2 * i) for i in range(5) for m in ("m1", "m2")]
    assert ingest(url, [long_table(tmp_path / "a" / "r.csv", f1)]) == "replace"
    assert set(Store(url).read("labels")["metric"]) == {"f1_score"}
    em = [(f"q{i}", "toy/qa", "m3", "exact_match", 1) for i in range(5)]
    assert ingest(url, [long_table(tmp_path / "b" / "r.csv", em)]) == "replace"
    assert set(Store(url).read("labels")["metric"]) == {"exact_match"}
    assert_labels_are_full(url)


def test_a_dataset_gaining_its_first_label_metric_falls_back(tmp_path):
    """A dataset whose outcomes had no rule (only an unknown metric) gains a labelled metric: its
    older outcomes make labels too, so a full relabel."""
    url = str(tmp_path / "store")
    rows = [(f"q{i}", "toy/x", "m1", "my_metric", 1) for i in range(3)]
    rows += [(f"q{i}", "toy/y", "m1", "exact_match", 1) for i in range(3)]
    assert ingest(url, [long_table(tmp_path / "a" / "r.csv", rows)]) == "replace"
    rules = tmp_path / "rules.json"
    rules.write_text(json.dumps({"rules": [{"metric": "my_metric", "kind": "threshold", "t": 0.5}]}))
    # Other rules asked for: the basis changes, full relabel.
    assert stage.stale_labels(Store(url), str(rules))
    assert ingest(url, [], str(rules)) == "replace"
    assert_labels_are_full(url, str(rules))
    assert "toy/x" in set(Store(url).read("labels")["dataset"])


def test_new_hint_changing_effective_rules_falls_back(tmp_path):
    """A new dataset whose main metric a hint names adds a dataset rule: the effective rules
    change, so the labels are recomputed (and their commit records the new rules)."""
    url = str(tmp_path / "store")
    assert ingest(url, [SAMPLE / "mmlu_pro"]) == "replace"
    before = Store(url).commits()[-1].info["rules"]
    assert ingest(url, [SAMPLE / "helm"]) == "replace"
    after = [c for c in Store(url).commits() if "labels" in c.replace][-1].info["rules"]
    assert after != before
    assert_labels_are_full(url)


def test_a_killed_relabel_is_repaired_by_an_append(synth_parts, tmp_path):
    """Outcomes committed, labels not (a run killed in between): stale; the next relabel
    appends the missing parts' labels, two steps at once."""
    url = grown(tmp_path, synth_parts[:3])
    s = Store(url)
    assert stage.stale_labels(s, None)
    stage.relabel(url, None)
    assert last_labels_mode(url) == "append"
    assert_labels_are_full(url)


def test_concurrent_appends_are_stale_and_repaired(synth_parts, tmp_path):
    """Two appends extending the same labels commit (two relabels at once) would hold rows
    twice: stale, and the next relabel recomputes everything."""
    url = grown(tmp_path, synth_parts[:2])
    s = Store(url)
    commits = s.commits()
    plan = stage.append_plan(s, None, commits)
    assert isinstance(plan, stage.AppendPlan)
    stage.append_labels(s, None, commits, plan)
    stage.append_labels(s, None, commits, plan)  # a second run on the same snapshot
    assert "concurrent" in stage.stale_labels(s, None)
    assert not isinstance(stage.append_plan(s, None, s.commits()), stage.AppendPlan)
    stage.relabel(url, None)
    assert last_labels_mode(url) == "replace"
    assert_labels_are_full(url)


def test_other_binarization_code_falls_back(synth_parts, tmp_path, monkeypatch):
    url = grown(tmp_path, synth_parts[:2])
    monkeypatch.setattr(stage, "labels_code", lambda: "other")
    assert stage.append_plan(Store(url), None, Store(url).commits()) == "the binarization code changed"
    stage.relabel(url, None)
    assert last_labels_mode(url) == "replace"
    assert_labels_are_full(url)


def test_the_incremental_path_reads_only_the_new_outcome_parts(synth_parts, tmp_path, monkeypatch):
    url = grown(tmp_path, synth_parts[:2])
    s = Store(url)
    labelled = [c for c in s.commits() if "labels" in c.replace][-1].seq
    new = set(s.parts("outcomes")) - set(s.parts("outcomes", [c for c in s.commits()
                                                              if c.seq < labelled]))
    read: list[str] = []
    original = Store.read_parts

    def spy(self, table, parts, columns=None):
        if table == "outcomes":
            read.extend(parts)
        return original(self, table, parts, columns)

    monkeypatch.setattr(Store, "read_parts", spy)
    monkeypatch.setattr(Store, "read", lambda *a, **k: pytest.fail("read a whole table"))
    stage.relabel(url, None)
    monkeypatch.undo()
    assert last_labels_mode(url) == "append"
    assert read and set(read) <= new and len(read) == 1
    assert_labels_are_full(url)
