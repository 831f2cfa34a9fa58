"""Issue 15 wired in: answer positions through ingest and the store, question versions as a
format variant, the stability section of the report, the bundle manifest and the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from benchroute.artifacts.specs import Selection
from benchroute.artifacts.stages.fit import FitOptions
from benchroute.artifacts.store import Store
from benchroute.flows.cli import main as cli
from benchroute.transforms.binarize import POSITION_METRICS
from benchroute.transforms.stability_summary import (
    StoreView,
    format_tables,
    positions_from_outcomes,
    variant_sets,
)

SAMPLE = Path(__file__).resolve().parents[1] / "sample"
LETTERS = "ABCDEFGHIJ"


# ----------------------------------------------------------------------- question versions
def test_question_versions_compare_same_text_questions_with_all():
    """Models that saw another version of some questions (``<id>#v1`` memberships): the ranking
    on every question as seen vs on the questions all models saw in one text."""
    rng = np.random.default_rng(0)
    labels, members = [], []
    for q in range(40):
        text_v1 = q < 10  # questions 0-9: model "late" saw another text
        for m, p in (("strong", 0.8), ("mid", 0.5), ("late", 0.3)):
            iid = f"{q:030x}v1" if text_v1 and m == "late" else f"{q:032x}"
            y = 1 if (text_v1 and m == "late") else int(rng.random() < p)
            labels.append({"input_id": iid, "dataset": "src/d", "model": m, "y": y})
        members.append({"input_id": f"{q:032x}", "dataset": "src/d", "source": "src",
                        "source_instance_id": str(q)})
        if text_v1:
            members.append({"input_id": f"{q:030x}v1", "dataset": "src/d", "source": "src",
                            "source_instance_id": f"{q}#v1"})
    labels = pl.DataFrame(labels).with_columns(metric=pl.lit("correct_rx"),
                                               rule=pl.lit("threshold(correct_rx >= 0.5)"))
    memberships = pl.DataFrame(members)
    outcomes = pl.DataFrame(schema={"input_id": pl.String, "dataset": pl.String, "model": pl.String,
                                    "metric": pl.String, "value": pl.Float64, "run_id": pl.String,
                                    "perturbation": pl.String})
    (vs,) = variant_sets(outcomes, labels, memberships)
    assert (vs.family, vs.reference) == ("version", "version:as_seen")
    assert vs.frames["version:as_seen"].height == 120 and vs.frames["version:same_text"].height == 90
    per_variant, per_model = format_tables([vs], memberships)
    row = per_variant.row(0, named=True)
    assert row["n_items"] == 30 and row["n_models"] == 3
    late = per_model.filter(pl.col("model") == "late").row(0, named=True)
    y = labels.filter(pl.col("model") == "late").sort("input_id")
    same = y.filter(~pl.col("input_id").str.ends_with("v1"))["y"].mean()
    assert late["acc_reference"] == pytest.approx(y["y"].mean())  # 10 free points on v1
    assert late["acc_variant"] == pytest.approx(same) and late["delta"] < 0


# ------------------------------------------------------------------------------ the sample
def test_ingest_round_trip_keeps_answer_positions(embedded_sample_store):
    """The stored MMLU-Pro positions are the raw letters (graded_answer, pred_rx) of every kept
    result row; HELM BBQ's agree with exact_match; positions never become labels."""
    store = Store(embedded_sample_store)
    outcomes = store.read("outcomes")
    mmlu = outcomes.filter(pl.col("source") == "mmlu_pro")
    counts = dict(mmlu.group_by("metric").len().iter_rows())
    assert set(counts) == {"correct_rx", "correct", "output_chars", *POSITION_METRICS}
    assert len(set(counts.values())) == 1  # one of each per kept result row
    twins = store.read("quarantine").filter(pl.col("reason").str.starts_with("same text as"))
    dropped = [int(r.split("=")[1].split(" ")[0]) for r in twins["record"]]
    raw = pl.read_parquet(SAMPLE / "mmlu_pro" / "results.parquet")
    q = pl.concat([
        pl.read_parquet(SAMPLE / "mmlu_pro" / "questions.parquet", columns=["question_id", "category"]),
        pl.read_parquet(SAMPLE / "mmlu_pro" / "question_variants.parquet",
                        columns=["question_id", "category"]),
    ]).unique("question_id")
    names = dict(mmlu.select("source_model", "model").unique().iter_rows())
    want = (
        raw.filter(~pl.col("question_id").is_in(dropped)).join(q, on="question_id")
        .select(pl.format("mmlu_pro/{}", "category").alias("dataset"),
                pl.col("model").replace_strict(names).alias("model"),
                pl.col("graded_answer").map_elements(LETTERS.index, return_dtype=pl.Int64).alias("gold"),
                pl.col("pred_rx").map_elements(LETTERS.index, return_dtype=pl.Int64).fill_null(-1).alias("pred"))
    )
    assert counts["gold_position"] == want.height
    got = positions_from_outcomes(mmlu).with_columns(pl.col("gold", "pred").cast(pl.Int64))
    key = ["dataset", "model", "gold", "pred"]
    assert got.group_by(key).len().sort(key).equals(want.group_by(key).len().sort(key))
    bbq = outcomes.filter(pl.col("dataset").str.starts_with("helm/bbq"))
    wide = bbq.filter(pl.col("metric").is_in(["exact_match", *POSITION_METRICS])).pivot(
        on="metric", index=["input_id", "run_id"], values="value")
    assert wide.height > 0 and wide["gold_position"].null_count() == 0
    assert ((wide["gold_position"] == wide["pred_position"]) == (wide["exact_match"] == 1)).all()
    assert not set(store.read("labels")["metric"]) & set(POSITION_METRICS)


def test_cli_inspect_stability(embedded_sample_store, capsys):
    assert cli(["inspect", "--store", embedded_sample_store, "--stability", "--B", "30", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    st = data["stability"]
    assert {"mmlu_pro", "alpaca_eval"} <= set(st["groups"])
    assert st["most_biased"] and all(r["rstd"] is None or r["rstd"] >= 0 for r in st["most_biased"])
    assert cli(["inspect", "--store", embedded_sample_store, "--stability", "--B", "30"]) == 0
    text = capsys.readouterr().out
    assert "stability (B = 30)" in text and "Rank intervals per source group" in text
    assert "version:same_text" in text and "Selection bias (RStd" in text


def test_report_has_the_stability_section(embedded_sample_store, tmp_path):
    from benchroute.artifacts.stages.evaluate import evaluate_store

    out = tmp_path / "report"
    res = evaluate_store(embedded_sample_store, str(out), sources=["mmlu_pro"], routing_splits=(),
                         stability_B=50)
    assert res["stability"] == "computed"
    md = (out / "report.md").read_text()
    assert "# Stability" in md and "## Rank intervals per source group" in md
    assert "version:same_text" in md and "S3 flip" in md
    html = (out / "report.html").read_text()
    assert "Plots: stability" in html and html.count("data:image/png;base64,") >= 6
    per_task = pl.read_parquet(out / "mmlu_pro" / "per_task.parquet")
    assert per_task["flip_task"].drop_nans().is_between(0, 1).all()
    ranks = pl.read_parquet(out / "stability" / "rankings.parquet")
    assert set(ranks["scope"].str.split("/").list.first()) == {"mmlu_pro"}  # only the sources asked
    assert json.loads((out / "summary.json").read_text())["stability"]["groups"]["mmlu_pro"]


def test_report_skips_stability_past_the_labels_held_in_memory(embedded_sample_store, tmp_path, monkeypatch):
    """The stability section reads every stored label and outcome as one frame: past
    ``FRAME_MAX_LABELS`` the report says why it is missing instead of reading them."""
    from benchroute.artifacts import router_build
    from benchroute.artifacts.stages.evaluate import evaluate_store

    monkeypatch.setattr(router_build, "FRAME_MAX_LABELS", 1000)
    out = tmp_path / "report"
    res = evaluate_store(embedded_sample_store, str(out), sources=["mmlu_pro"], routing_splits=(),
                         stability_B=50)
    assert res["stability"].startswith("not computed: the store holds") and "1,000" in res["stability"]
    assert res["groups"]["mmlu_pro"]["n_tasks"] > 0  # the rest of the evaluation runs
    md = (out / "report.md").read_text()
    assert "# Stability" not in md and "not computed" in md
    assert not (out / "stability").exists()


def test_a_bundle_past_the_limit_says_why_it_has_no_stability_summary(embedded_sample_store, tmp_path, monkeypatch):
    """A publish with evaluation on a store too big for the stability summary still publishes:
    its manifest's stability holds the reason (a valid manifest), not a refusal."""
    from benchroute.artifacts import router_build
    from benchroute.artifacts.bundle import BundleStore, open_bundle
    from benchroute.flows.publish import build_content

    monkeypatch.setattr(router_build, "FRAME_MAX_LABELS", 1000)
    content = build_content(embedded_sample_store, "stab", FitOptions(Selection(sources=["mmlu_pro"])))
    st = content.meta["stability"]
    assert st["groups"] == {} and st["models"] == {} and st["notes"][0].startswith("not computed")
    assert content.meta["evaluation"]["mmlu_pro"]["n_tasks"] > 0
    assert all("rank_lo" not in m for m in content.meta["models"])
    target = str(tmp_path / "bundles")
    BundleStore(target).publish(content, code_version="t")
    assert open_bundle(target, "stab").manifest["stability"] == st


def test_bundle_manifest_holds_the_stability_summary(embedded_sample_store, tmp_path, capsys):
    from benchroute.artifacts.bundle import BundleError, BundleStore, open_bundle
    from benchroute.flows.publish import build_content

    content = build_content(embedded_sample_store, "stab", FitOptions(Selection(sources=["mmlu_pro"])))
    st = content.meta["stability"]
    assert set(st["groups"]) == {"mmlu_pro"} and st["most_biased"]
    models = {m["model"]: m for m in content.meta["models"]}
    assert set(st["models"]) == set(models)  # trimmed to the bundle's models
    assert all(1 <= m["rank_lo"] <= m["rank"] <= m["rank_hi"] and m["rstd"] is not None
               and m["stability_scope"] == m["rstd_scope"] == "mmlu_pro" for m in models.values())
    assert sum(m["p_best"] for m in models.values()) == pytest.approx(1.0)
    target = str(tmp_path / "bundles")
    bs = BundleStore(target)
    v = bs.publish(content, code_version="t").version
    assert open_bundle(target, "stab").manifest["stability"] == st
    assert cli(["bundles", "show", "--store", target, "--name", "stab", "--stability"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["stability"] == st and {m["model"] for m in shown["models"]} == set(models)
    path = bs.path("stab", v, "manifest.json")
    m = json.loads(bs.fs.cat_file(path))
    m["stability"]["groups"]["mmlu_pro"]["best"] = "someone/else"
    bs.fs.pipe_file(path, json.dumps(m).encode())
    with pytest.raises(BundleError, match="does not match its content hash"):
        open_bundle(target, "stab")


def test_bundle_models_hold_their_routing_stability(embedded_sample_store, tmp_path, capsys):
    """Per model: the held-out tasks its S3 choice won and how often that choice survives a
    resample of the task's inputs (1 − flip_task), and the same per query under a resample of
    the kNN index; flip_task per method in the evaluation; all hash-covered and shown."""
    from benchroute.artifacts.bundle import BundleError, BundleStore, open_bundle
    from benchroute.flows.publish import build_content

    content = build_content(embedded_sample_store, "rstab", FitOptions(Selection(sources=["mmlu_pro"])))
    models = {m["model"]: m for m in content.meta["models"]}
    routing = {r["method"]: r for r in content.meta["stability"]["routing"]
               if r["group"] == "mmlu_pro"}
    n_tasks = sum(m["task_choice_n"] for m in models.values())
    assert n_tasks == content.meta["evaluation"]["mmlu_pro"]["n_tasks"] > 0  # one S3 choice each
    for m in models.values():
        assert (m["task_choice_keep"] is None) == (m["task_choice_n"] == 0)
        assert (m["query_keep_rate"] is None) == (m["query_n"] == 0)
        for f in ("task_choice_keep", "query_keep_rate"):
            assert m[f] is None or 0 <= m[f] <= 1
    # consistent with flip_task: the chosen-weighted keep rate is 1 − the mean S3 flip_task
    kept = sum(m["task_choice_n"] * m["task_choice_keep"] for m in models.values() if m["task_choice_n"])
    assert kept / n_tasks == pytest.approx(1 - routing["S3"]["flip_task"])
    assert sum(m["query_n"] for m in models.values()) > 0
    t1 = {r["method"]: r for r in content.meta["evaluation"]["mmlu_pro"]["table1"]}
    assert t1["S3"]["flip_task"] == pytest.approx(routing["S3"]["flip_task"])
    assert t1["BMA"]["flip_task"] == 0 and "flip_task" not in t1["Random"]
    target = str(tmp_path / "bundles")
    bs = BundleStore(target)
    v = bs.publish(content, code_version="t").version
    assert cli(["bundles", "show", "--store", target, "--name", "rstab", "--stability"]) == 0
    shown = {m["model"]: m for m in json.loads(capsys.readouterr().out)["models"]}
    assert all(shown[k][f] == models[k][f] for k in models
               for f in ("task_choice_n", "task_choice_keep", "query_n", "query_keep_rate"))
    path = bs.path("rstab", v, "manifest.json")
    m = json.loads(bs.fs.cat_file(path))
    entry = next(e for e in m["models"] if e["task_choice_n"])
    entry["task_choice_keep"] = 1.0 if entry["task_choice_keep"] < 1 else 0.5
    bs.fs.pipe_file(path, json.dumps(m).encode())
    with pytest.raises(BundleError, match="does not match its content hash"):
        open_bundle(target, "rstab")


def test_store_view_restricts_datasets_and_models(embedded_sample_store):
    view = StoreView(Store(embedded_sample_store), ["mmlu_pro/business"], ["openai/gpt-4o-2024-05-13"])
    assert set(view.read("labels")["dataset"]) == {"mmlu_pro/business"}
    assert set(view.read("outcomes")["model"]) == {"openai/gpt-4o-2024-05-13"}
    assert set(view.read("memberships")["dataset"]) == {"mmlu_pro/business"}
