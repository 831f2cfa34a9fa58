"""The ingest flow for real: a Prefect run on the shipped sample, idempotency, new models, all data."""

from __future__ import annotations

import shutil

import polars as pl
import pytest

from benchroute.artifacts.store import Store
from benchroute.flows.cli import main as cli
from benchroute.flows.ingest import ingest_flow

from conftest import SAMPLE


@pytest.fixture(scope="module")
def sample_store(tmp_path_factory):
    """The sample ingested once by a real Prefect flow run (ephemeral server)."""
    url = str(tmp_path_factory.mktemp("store") / "s")
    summary = ingest_flow(sources=[str(SAMPLE)], store=url, progress=False)
    return url, summary


def test_flow_ingests_every_sample_source(sample_store):
    url, summary = sample_store
    assert summary["units_failed"] == {}
    assert {"helm", "routellm", "mmlu_pro", "alpaca_eval", "mixinstruct"} <= set(summary["added"])
    store = Store(url)
    outcomes = store.read("outcomes")
    labels = store.read("labels")
    assert set(outcomes["source"]) >= {"helm", "routellm", "mmlu_pro", "alpaca_eval", "mixinstruct"}
    # Every label points at a stored input, and every dataset with outcomes of a known metric has labels.
    inputs = store.read("inputs")
    assert labels.join(inputs, on="input_id", how="anti").height == 0
    assert labels["y"].is_in([0, 1]).all()
    assert labels.height == summary["labels"] > 0
    assert store.read("models").height == outcomes["model"].n_unique()


def test_second_run_is_a_no_op(sample_store):
    url, _ = sample_store
    store = Store(url)
    before = len(store.commits())
    summary = ingest_flow(sources=[str(SAMPLE)], store=url, progress=False)
    assert summary["units_skipped"] == summary["units_found"] > 0
    assert len(store.commits()) == before


def test_new_models_in_a_changed_dump_append_only_their_rows(tmp_path):
    src = tmp_path / "mmlu_pro"
    shutil.copytree(SAMPLE / "mmlu_pro", src)
    results = pl.read_parquet(src / "results.parquet")
    held_back = sorted(results["model"].unique())[:2]
    results.filter(~pl.col("model").is_in(held_back)).write_parquet(src / "results.parquet")
    url = str(tmp_path / "store")
    first = ingest_flow(sources=[str(src)], store=url, kinds=["mmlu_pro"], progress=False)
    n_before = Store(url).read("outcomes").height

    results.write_parquet(src / "results.parquet")  # the held-back models' results land
    second = ingest_flow(sources=[str(src)], store=url, kinds=["mmlu_pro"], progress=False)
    store = Store(url)
    outcomes = store.read("outcomes")
    new = outcomes.height - n_before
    assert new == second["added"]["mmlu_pro"]["new_outcomes"] > 0
    assert set(outcomes.slice(n_before)["source_model"]) == set(held_back)
    assert second["added"]["_total"]["new_inputs"] == 0
    assert outcomes.unique(["input_id", "dataset", "model", "metric", "run_id"]).height == outcomes.height
    assert first["labels"] < second["labels"]


def test_unreadable_file_is_reported_and_others_still_ingested(tmp_path):
    src = tmp_path / "src"
    shutil.copytree(SAMPLE / "routellm", src / "routellm")
    bad = next((src / "routellm").rglob("mmlu_*.csv"))
    bad.write_bytes(b"\xff\xfe\x00garbage")
    url = str(tmp_path / "store")
    summary = ingest_flow(sources=[str(src)], store=url, progress=False)
    store = Store(url)
    q = store.read("quarantine")
    assert q.filter(pl.col("file").str.contains(bad.name)).height >= 1
    assert store.read("outcomes").height > 0
    assert summary["units_found"] > 1


def test_cli_inspect_prints_the_summary(sample_store, capsys):
    url, _ = sample_store
    assert cli(["inspect", "--store", url, "--labels", "--quarantine"]) == 0
    out = capsys.readouterr().out
    for word in ("per_source", "label_balance", "helm", "mmlu_pro", "quarantine_reasons"):
        assert word in out


def test_ingest_everything_in_shared_data(raw_data, tmp_path):
    """Every source in ../shared/data/raw goes in; headline counts match the SOURCE.md notes."""
    url = str(tmp_path / "store")
    summary = ingest_flow(sources=[str(raw_data)], store=url, progress=False)
    store = Store(url)
    outcomes = store.read("outcomes")
    labels = store.read("labels")
    per_source = outcomes.group_by("source").agg(pl.col("model").n_unique()).to_dict(as_series=False)
    models = dict(zip(per_source["source"], per_source["model"]))
    assert models["mmlu_pro"] == 28
    assert models["routellm"] == 2
    assert summary["units_failed"] == {}
    mmlu_pro = labels.filter(pl.col("dataset").str.starts_with("mmlu_pro/"))
    # 12,032 questions; 159 share their text with another question id (one input each).
    assert mmlu_pro["input_id"].n_unique() == 11_890
    gpt4o = mmlu_pro.filter(pl.col("model") == "openai/gpt-4o-2024-05-13")["y"].mean()
    assert abs(gpt4o - 0.7404) < 0.005


def test_cli_ingest_prints_what_it_added_and_the_totals(tmp_path, capsys):
    """Without reading a table: what this run added per source, then the store's row counts
    from the parts' footers (a leaderboard's outcomes are not scanned after every ingest)."""
    url = str(tmp_path / "store")
    assert cli(["ingest", str(SAMPLE / "mmlu_pro"), "--store", url, "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "added by this run" in out and "mmlu_pro" in out
    s = Store(url)
    assert f"{s.read('outcomes').height:,} outcomes" in out
    assert f"{s.read('labels').height:,} labels" in out
