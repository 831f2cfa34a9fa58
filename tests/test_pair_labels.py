"""Win labels for model pairs (issue 14): golden labels, judge scores, RouteLLM's tie rules."""

import numpy as np
import polars as pl
import pytest

from benchroute.transforms.pair_labels import (
    PairError,
    apply_ties,
    battles,
    bridge_models,
    outcomes,
    pair_wins,
    win_data_from_frames,
)

IDS = [f"{c}" * 64 for c in "abcd"]


def labels_frame() -> pl.DataFrame:
    rows = []

    def add(i, dataset, model, metric, value, y):
        rows.append({"input_id": IDS[i], "dataset": dataset, "model": model, "metric": metric,
                     "value": float(value), "y": y, "rule": "r", "n_outcomes": 1})

    # Golden labels (RouteLLM MMLU CSV): correct 0/1.
    add(0, "mmlu/x", "strong", "correct", 1, 1)
    add(0, "mmlu/x", "weak", "correct", 0, 0)
    add(1, "mmlu/x", "strong", "correct", 1, 1)
    add(1, "mmlu/x", "weak", "correct", 1, 1)
    add(2, "mmlu/x", "strong", "correct", 0, 0)
    add(2, "mmlu/x", "weak", "correct", 1, 1)
    # MT-Bench: judge scores 1–10 (y = score ≥ 8): both y = 1, but strong scored higher.
    add(3, "mt_bench", "strong", "judge_score", 9.5, 1)
    add(3, "mt_bench", "weak", "judge_score", 8.0, 1)
    add(3, "mt_bench", "other", "judge_score", 8.0, 1)
    return pl.DataFrame(rows)


def test_outcomes_and_tie_rules():
    o = outcomes([1, 0, 1, 0, np.nan], [0, 1, 1, 0, 1])
    assert np.array_equal(o[:4], [1, 0, 0.5, 0.5]) and np.isnan(o[4])
    assert np.array_equal(outcomes([8.5], [8.0], tie_eps=1.0), [0.5])
    half = apply_ties(o, "half")
    assert np.array_equal(half[:4], [1, 0, 0.5, 0.5])
    drop = apply_ties(o, "drop")  # RouteLLM's MF: battles without a winner are left out
    assert np.array_equal(drop[:2], [1, 0]) and np.isnan(drop[2:]).all()
    weak = apply_ties(o, "weak")  # RouteLLM's classifiers: a tie means the strong model is not needed
    assert np.array_equal(weak[:4], [1, 0, 0, 0])
    with pytest.raises(ValueError):
        apply_ties(o, "coin")


def test_win_data_uses_judge_scores_where_they_exist():
    data = win_data_from_frames(labels_frame())
    assert data.models == ["other", "strong", "weak"]
    assert data.score_datasets == ("mt_bench",)
    s = data.model_index("strong")
    assert data.Q[3, s] == 9.5 and data.Y[3, s] == 1.0  # Q: the judge score, Y: the label
    wins = pair_wins(data, "strong", "weak")
    assert list(wins.rows) == [0, 1, 2, 3]
    assert list(wins.outcome) == [1.0, 0.5, 0.0, 1.0]  # MT-Bench: 9.5 > 8 is a win though both y = 1
    assert wins.counts() == {"strong": "strong", "weak": "weak", "n": 4, "strong_wins": 2,
                             "weak_wins": 1, "ties": 1}
    assert list(wins.strong_needed) == [1.0, 0.0, 0.0, 1.0]
    assert data.in_datasets(["mt_*"]).tolist() == [False, False, False, True]
    assert data.in_datasets(["^mmlu/"]).tolist() == [True, True, True, False]
    with pytest.raises(PairError):
        pair_wins(data, "strong", "strong")
    with pytest.raises(PairError):
        pair_wins(data, "strong", "nobody")


def test_an_input_in_two_datasets_averages_and_is_one_row():
    lab = labels_frame()
    extra = lab.filter((pl.col("input_id") == IDS[0]) & (pl.col("model") == "weak")).with_columns(
        dataset=pl.lit("mmlu/y"), value=pl.lit(1.0), y=pl.lit(1, pl.Int64))
    data = win_data_from_frames(pl.concat([lab, extra], how="vertical_relaxed"))
    assert len(data.input_ids) == 4
    assert data.Q[0, data.model_index("weak")] == 0.5
    assert data.member[0].sum() == 2


def test_battles_cover_every_pair_and_bridges_rank_by_shared_inputs():
    data = win_data_from_frames(labels_frame())
    b = battles(data)
    # strong–weak on 4 inputs, other–strong and other–weak on input 3.
    assert len(b) == 6
    b_drop = battles(data, ties="drop")
    assert len(b_drop) == 6 - 2  # the strong/weak tie on input 1 and other/weak on input 3
    Q = np.array([[1, 0, 1, np.nan], [1, 1, np.nan, 0], [0, 1, 1, 1]], float)
    assert bridge_models(Q, 0, 1, 2) == [0, 1, 2, 3]
    assert bridge_models(Q, 0, 1, 1) == [0, 1, 2]  # ties to the lower column
    assert bridge_models(Q, 0, 1, 2, min_colabels=3) == [0, 1]
