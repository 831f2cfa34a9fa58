"""`benchroute evaluate` on a real store: groups, report files, the Prefect flow and its artifact."""

from __future__ import annotations

import json
from pathlib import Path

import polars as pl
import pytest

from benchroute.artifacts.store import Store
from benchroute.flows.cli import main as cli
from benchroute.artifacts.stages.evaluate import EvaluationError, evaluate_store, pick_embedder
from benchroute.transforms.lodo_groups import lodo_groups


def test_groups_are_per_source_with_models_on_every_dataset(embedded_sample_store):
    store = Store(embedded_sample_store)
    groups = {g.name: g for g in lodo_groups(store.read("labels"), store.read("memberships"))}
    assert groups["mmlu_pro"].skipped is None and len(groups["mmlu_pro"].models) == 28
    assert groups["routellm"].skipped is None and len(groups["routellm"].models) == 2
    helm = groups["helm"]
    # Every kept model is labelled on every dataset of the group.
    cover = helm.labels.group_by("model").agg(pl.col("dataset").n_unique())
    assert (cover["dataset"] == len(helm.datasets)).all()


def test_cli_writes_the_report(embedded_sample_store, tmp_path, capsys):
    out = tmp_path / "report"
    assert cli(["evaluate", "--store", embedded_sample_store, "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "mmlu_pro:" in printed and "report:" in printed
    md = (out / "report.md").read_text()
    assert "Table 1" in md and "ours / paper" in md and "0.662" in md  # the paper's S1 beside ours
    html = (out / "report.html").read_text()
    assert html.count("data:image/png;base64,") >= 3  # plots embedded, no external files
    t1 = pl.read_parquet(out / "mmlu_pro" / "table1.parquet")
    assert {"S1", "S2", "S3", "S3_true_p", "BMA", "Oracle"} <= set(t1["method"])
    oracle = t1.filter(pl.col("method") == "Oracle")["acc"].max()
    assert (t1["acc"] <= oracle + 1e-9).all()
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["groups"]) >= {"mmlu_pro", "routellm"}


def test_evaluation_is_deterministic(embedded_sample_store, tmp_path):
    a = evaluate_store(embedded_sample_store, str(tmp_path / "a"), sources=["mmlu_pro"])
    b = evaluate_store(embedded_sample_store, str(tmp_path / "b"), sources=["mmlu_pro"])
    ta = pl.read_parquet(Path(tmp_path / "a" / "mmlu_pro" / "table1.parquet"))
    tb = pl.read_parquet(Path(tmp_path / "b" / "mmlu_pro" / "table1.parquet"))
    assert ta.equals(tb)
    assert a["groups"] == b["groups"]


def test_store_without_embeddings_is_refused(tmp_path):
    with pytest.raises(EvaluationError, match="benchroute embed"):
        pick_embedder(Store(str(tmp_path / "empty")), None)
