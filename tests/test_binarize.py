"""Binarization rules on tiny hand-checkable tables."""

from __future__ import annotations

import json

import polars as pl
import pytest

from benchroute.transforms import binarize as bz

IID = ["a" * 32, "b" * 32]


def _outcomes(rows) -> pl.DataFrame:
    """rows: (input index, dataset, model, metric, value[, run_id[, perturbation]])."""
    recs = []
    for r in rows:
        i, ds, m, metric, v, *rest = r
        recs.append(
            {
                "input_id": IID[i],
                "dataset": ds,
                "model": m,
                "metric": metric,
                "value": float(v),
                "run_id": rest[0] if rest else "run",
                "source": "test",
                "perturbation": rest[1] if len(rest) > 1 else None,
                "source_model": m,
            }
        )
    return pl.DataFrame(recs, schema_overrides={"perturbation": pl.String})


def _y(labels: pl.DataFrame) -> dict:
    return {(IID.index(r["input_id"]), r["model"]): r["y"] for r in labels.iter_rows(named=True)}


def test_threshold_and_primary_metric_choice():
    o = _outcomes(
        [
            (0, "d", "m1", "exact_match", 1),
            (0, "d", "m2", "exact_match", 0),
            (0, "d", "m1", "quasi_exact_match", 0),  # lower priority: ignored
            (1, "d", "m1", "exact_match", 0.5),  # t = 0.5 with >=: correct
        ]
    )
    labels = bz.binarize(o)
    assert _y(labels) == {(0, "m1"): 1, (0, "m2"): 0, (1, "m1"): 1}
    assert set(labels["metric"]) == {"exact_match"}
    assert set(labels["rule"]) == {"threshold(exact_match >= 0.5)"}


def test_strict_threshold_for_preferences():
    rule = bz.Rule("alpaca_eval/*", "threshold", t=1.5, op=">")
    o = _outcomes([(0, "d", "m1", "alpaca_eval/x", 1.5), (0, "d", "m2", "alpaca_eval/x", 1.51)])
    assert _y(bz.binarize(o, (rule,))) == {(0, "m1"): 0, (0, "m2"): 1}


def test_relative_to_best_is_per_input():
    rule = bz.Rule("bertscore", "relative_to_best", eps=0.05)
    o = _outcomes(
        [
            (0, "d", "m1", "bertscore", 0.80),
            (0, "d", "m2", "bertscore", 0.76),
            (0, "d", "m3", "bertscore", 0.70),
            (1, "d", "m1", "bertscore", 0.50),
            (1, "d", "m3", "bertscore", 0.60),
        ]
    )
    assert _y(bz.binarize(o, (rule,))) == {
        (0, "m1"): 1,
        (0, "m2"): 1,
        (0, "m3"): 0,
        (1, "m1"): 0,
        (1, "m3"): 1,
    }


def test_top_k_counts_ties_at_the_boundary():
    rule = bz.Rule("s", "top_k", k=1)
    o = _outcomes([(0, "d", "m1", "s", 3), (0, "d", "m2", "s", 3), (0, "d", "m3", "s", 1)])
    assert _y(bz.binarize(o, (rule,))) == {(0, "m1"): 1, (0, "m2"): 1, (0, "m3"): 0}


def test_runs_are_averaged_and_perturbations_ignored():
    o = _outcomes(
        [
            (0, "d", "m1", "exact_match", 1, "suite_a"),
            (0, "d", "m1", "exact_match", 0, "suite_b"),
            (0, "d", "m1", "exact_match", 0, "suite_a", "typos"),
        ]
    )
    labels = bz.binarize(o)
    row = labels.row(0, named=True)
    assert labels.height == 1 and row["value"] == 0.5 and row["n_outcomes"] == 2 and row["y"] == 1


def test_dataset_glob_limits_a_rule():
    rules = (bz.Rule("score", "threshold", t=5, dataset="mt_*"), bz.Rule("score", "threshold", t=1))
    o = _outcomes([(0, "mt_bench", "m", "score", 4), (0, "other", "m", "score", 4)])
    labels = bz.binarize(o, rules)
    got = {r["dataset"]: r["y"] for r in labels.iter_rows(named=True)}
    assert got == {"mt_bench": 0, "other": 1}


def test_datasets_without_a_rule_get_no_labels():
    o = _outcomes([(0, "d", "m", "num_tokens", 12)])
    assert bz.binarize(o).height == 0


def test_check_ranges_quarantines_out_of_range_values():
    o = _outcomes([(0, "d", "m1", "exact_match", 1), (0, "d", "m2", "exact_match", 2)])
    ok, bad = bz.check_ranges(o, file="f.json")
    assert ok["model"].to_list() == ["m1"]
    assert bad.height == 1
    row = bad.row(0, named=True)
    assert row["file"] == "f.json" and row["field"] == "exact_match" and "outside" in row["reason"]


def test_user_rules_come_first(tmp_path):
    path = tmp_path / "rules.json"
    path.write_text(json.dumps({"rules": [{"metric": "exact_match", "kind": "threshold", "t": 1}]}))
    rules = bz.load_rules(str(path))
    assert rules[0].t == 1 and len(rules) == len(bz.DEFAULT_RULES) + 1
    path.write_text(json.dumps({"rules": [{"metric": "x", "kind": "top_k"}]}))
    with pytest.raises(ValueError, match="needs 'k'"):
        bz.load_rules(str(path))


def test_answer_positions_never_become_labels():
    """gold/pred positions are no scores: never primary (even under a catch-all user rule),
    never range-checked."""
    o = _outcomes(
        [
            (0, "d", "m1", "gold_position", 3),
            (0, "d", "m1", "pred_position", -1),
            (0, "e", "m1", "gold_position", 2),
            (0, "e", "m1", "exact_match", 1),
        ]
    )
    catch_all = (bz.Rule("*", "threshold", t=0.5, lo=0, hi=1),)
    for rules in (bz.DEFAULT_RULES, catch_all):
        labels = bz.binarize(o, rules)
        assert labels.select("dataset", "metric").rows() == [("e", "exact_match")]
    kept, bad = bz.check_ranges(o, catch_all)
    assert bad.height == 0 and kept.height == o.height


def test_sample_labels_are_the_same_with_and_without_answer_positions():
    """The readers' position outcomes change no label of the shipped sample (MMLU-Pro, HELM BBQ)."""
    from pathlib import Path

    from benchroute.transforms.ids import ModelNames
    from benchroute.transforms.ingest import helm, mmlu_pro

    sample = Path(__file__).resolve().parents[1] / "sample"
    names = ModelNames()
    runs = sorted((sample / "helm").glob("*/runs/*/bbq:*"))
    outcomes = pl.concat(
        [mmlu_pro.read(str(sample / "mmlu_pro"), names=names).outcomes]
        + [helm.read(str(r), names=names).outcomes for r in runs]
    )
    positions = outcomes.filter(pl.col("metric").is_in(bz.POSITION_METRICS))
    assert positions.height > 0
    assert set(positions["dataset"].str.split("/").list.first()) == {"mmlu_pro", "helm"}
    # outcomes carry the canonical model under the column "model" once stored; use source names
    o = outcomes.with_columns(model=pl.col("source_model"))
    with_pos = bz.binarize(o)
    without = bz.binarize(o.filter(~pl.col("metric").is_in(bz.POSITION_METRICS)))
    assert with_pos.height > 0 and with_pos.equals(without)
