"""The HELM run-folder reader: values against json.load, fallbacks, perturbations, bad input."""

from __future__ import annotations

import io
import json
import math
import shutil
from collections import defaultdict
from pathlib import Path

import fsspec
import ijson
import polars as pl
import pytest

from benchroute.schemas import OUTCOME_KEY
from benchroute.transforms.ids import ModelNames, input_id
from benchroute.transforms.ingest import discover, helm
from benchroute.transforms.ingest.base import UnknownLayout, UnreadableSource

FIXTURES = Path(__file__).parent / "fixtures" / "helm"
V4 = FIXTURES / "helm_safety_v4" / "runs" / "v4"
V1 = FIXTURES / "helm_bbq_v1" / "runs" / "v1"
BBQ = "bbq:subject=all,method=multiple_choice_joint,model="
BBQ_LLAMA_V4 = V4 / f"{BBQ}meta_llama-3-8b"
BBQ_GPT4O_V4 = V4 / f"{BBQ}openai_gpt-4o-2024-05-13"
BBQ_LLAMA_V1 = V1 / f"{BBQ}meta_llama-3-8b"
BBQ_TURBO_V1 = V1 / f"{BBQ}openai_gpt-4-turbo-2024-04-09"
SST = V4 / "simple_safety_tests:model=openai_gpt-4o-2024-05-13"
HARM_NO_STATE = V4 / "harm_bench:model=mistralai_mixtral-8x22b-instruct-v0.1"
HARM_SIBLING = V4 / "harm_bench:model=google_gemini-1.5-pro-001"
BBQ_RUNS = [BBQ_LLAMA_V4, BBQ_GPT4O_V4, BBQ_LLAMA_V1, BBQ_TURBO_V1]
BBQ_METRICS = {
    "exact_match",
    "exact_match@5",
    "quasi_exact_match",
    "quasi_exact_match@5",
    "prefix_exact_match",
    "prefix_exact_match@5",
    "quasi_prefix_exact_match",
    "quasi_prefix_exact_match@5",
    "logprob",
    *helm.USAGE,  # num_output_tokens, num_prompt_tokens: kept for costs, never labels
}
RAW = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "raw"
NAMES = ModelNames()


def read(run: Path):
    return helm.read(str(run), names=NAMES)


def load(path: Path):
    return json.loads(path.read_text())


def dump(path: Path, obj) -> None:
    """Write JSON as HELM does (``json.dumps(indent=2)``, which writes bare NaN)."""
    path.write_text(json.dumps(obj, indent=2))


def copy_run(run: Path, tmp_path: Path, suite: str = "v4") -> Path:
    """A writable copy of a fixture run under ``tmp_path/<suite>/<run name>``."""
    dst = tmp_path / suite / run.name
    shutil.copytree(run, dst)
    return dst


def expected_values(run: Path) -> dict[tuple[str, str], float]:
    """(input text, metric) -> mean, computed with json.load and no reader code."""
    states = load(run / "scenario_state.json")["request_states"]
    text = {s["instance"]["id"]: s["instance"]["input"]["text"] for s in states}
    out = {}
    for entry in load(run / "per_instance_stats.json"):
        for stat in entry["stats"]:
            if stat["name"]["name"] in BBQ_METRICS | {
                "sst_score",
                "sst_gpt_score",
                "sst_claude_score",
                *helm.USAGE,
            }:
                out[(text[entry["instance_id"]], stat["name"]["name"])] = stat["mean"]
    return out


def quarantine_rows(result) -> list[dict]:
    return result.quarantine.to_dicts()


# --- discovery ---------------------------------------------------------------------------------


def test_find_units_lists_every_run_folder():
    fs = fsspec.filesystem("file")
    units = helm.find_units(fs, str(FIXTURES))
    assert len(units) == 7
    assert str(BBQ_TURBO_V1) in units
    assert helm.find_units(fs, str(SST)) == [str(SST)]
    assert helm.find_units(fs, str(SST / "run_spec.json")) == []


def test_discover_claims_helm_runs():
    units = discover([str(V1)], kinds=["helm"])
    assert [u.url for u in units] == sorted([str(BBQ_LLAMA_V1), str(BBQ_TURBO_V1)])
    assert all(u.kind == "helm" and len(u.fingerprint) == 64 for u in units)


# --- values ------------------------------------------------------------------------------------


@pytest.mark.parametrize("run", BBQ_RUNS, ids=lambda p: f"{p.parent.name}-{p.name[-25:]}")
def test_bbq_values_match_json_load(run: Path):
    result = read(run)
    expected = expected_values(run)
    got = {
        (text, metric): value
        for text, metric, value in result.outcomes.join(result.inputs, on="input_id")
        .select("text", "metric", "value")
        .iter_rows()
    }
    assert got == pytest.approx(expected)
    assert set(result.outcomes["metric"]) == BBQ_METRICS
    n = len(load(run / "scenario_state.json")["request_states"])
    assert result.inputs.height == n
    assert result.outcomes.filter(metric="exact_match").height == n
    assert result.quarantine.height == 0
    spec = load(run / "run_spec.json")
    assert set(result.outcomes["source_model"]) == {spec["adapter_spec"]["model"]}
    assert set(result.outcomes["run_id"]) == {f"{run.parent.name}/{spec['name']}"}
    assert set(result.outcomes["dataset"]) == {"helm/bbq"}
    assert result.outcomes["perturbation"].null_count() == result.outcomes.height


def test_whole_run_exact_match_equals_stats_json():
    result = read(BBQ_TURBO_V1)
    stats = load(BBQ_TURBO_V1 / "stats.json")
    expected = next(
        s["mean"] for s in stats if s["name"] == {"name": "exact_match", "split": "test"}
    )
    assert result.outcomes.filter(metric="exact_match")["value"].mean() == expected


def test_memberships_and_inputs():
    result = read(BBQ_LLAMA_V4)
    states = load(BBQ_LLAMA_V4 / "scenario_state.json")["request_states"]
    assert set(result.inputs["input_id"]) == {
        input_id(s["instance"]["input"]["text"]) for s in states
    }
    assert set(result.memberships["source_instance_id"]) == {s["instance"]["id"] for s in states}
    assert set(result.memberships["split"]) == {"test"}
    assert result.models["model"].to_list() == ["meta/llama-3-8b"]


def test_safety_run_merges_its_two_entries_per_instance():
    entries = load(SST / "per_instance_stats.json")
    assert len(entries) == 20 and len({e["instance_id"] for e in entries}) == 10
    result = read(SST)
    assert result.inputs.height == 10
    assert result.outcomes.height == 10 * 5
    assert set(result.outcomes["metric"]) == {"sst_score", "sst_gpt_score", "sst_claude_score",
                                              *helm.USAGE}
    got = {
        (t, m): v
        for t, m, v in result.outcomes.join(result.inputs, on="input_id")
        .select("text", "metric", "value")
        .iter_rows()
    }
    assert got == pytest.approx(expected_values(SST))
    assert result.quarantine.height == 0


def test_stats_without_mean_use_sum_over_count(tmp_path):
    run = copy_run(BBQ_GPT4O_V4, tmp_path)
    entries = load(run / "per_instance_stats.json")
    for entry in entries:
        for stat in entry["stats"]:
            if stat["name"]["name"] == "exact_match":
                for key in ("mean", "min", "max", "variance", "stddev"):
                    stat.pop(key)
                stat["sum"], stat["count"] = stat["sum"] * 2, 2
    dump(run / "per_instance_stats.json", entries)
    before = read(BBQ_GPT4O_V4).outcomes.filter(metric="exact_match").sort("input_id")
    after = read(run)
    assert after.outcomes.filter(metric="exact_match").sort("input_id")["value"].to_list() == (
        before["value"].to_list()
    )
    assert after.quarantine.height == 0  # training_co2_cost (count 0, no mean) skipped silently


# --- texts from elsewhere ------------------------------------------------------------------------


def sibling_texts() -> dict[str, str]:
    states = load(HARM_SIBLING / "scenario_state.json")["request_states"]
    return {s["instance"]["id"]: s["instance"]["input"]["text"] for s in states}


def test_missing_scenario_state_takes_texts_from_sibling_run():
    assert not (HARM_NO_STATE / "scenario_state.json").exists()
    result = read(HARM_NO_STATE)
    assert result.quarantine.height == 0
    assert result.inputs.height == 10
    assert set(result.inputs["text"]) == set(sibling_texts().values())
    assert result.outcomes.height == 10 * 5  # 3 harm_bench scores and 2 token counts
    assert set(result.outcomes["source_model"]) == {"mistralai/mixtral-8x22b-instruct-v0.1"}
    expected = {
        (sibling_texts()[e["instance_id"]], s["name"]["name"]): s["mean"]
        for e in load(HARM_NO_STATE / "per_instance_stats.json")
        for s in e["stats"]
        if s["name"]["name"].startswith("harm_bench") or s["name"]["name"] in helm.USAGE
    }
    got = {
        (t, m): v
        for t, m, v in result.outcomes.join(result.inputs, on="input_id")
        .select("text", "metric", "value")
        .iter_rows()
    }
    assert got == pytest.approx(expected)


def test_missing_scenario_state_prefers_instances_json(tmp_path):
    run = copy_run(HARM_NO_STATE, tmp_path)  # no sibling in tmp_path
    states = load(HARM_SIBLING / "scenario_state.json")["request_states"]
    dump(run / "instances.json", [s["instance"] for s in states])
    result = read(run)
    assert result.quarantine.height == 0
    assert set(result.inputs["text"]) == set(sibling_texts().values())
    assert result.outcomes.height == 10 * 5


def test_missing_scenario_state_without_fallback_quarantines_every_entry(tmp_path):
    run = copy_run(HARM_NO_STATE, tmp_path)
    result = read(run)
    assert result.outcomes.height == 0 and result.inputs.height == 0
    rows = quarantine_rows(result)
    assert len(rows) == len(load(run / "per_instance_stats.json")) == 20
    assert {r["reason"] for r in rows} == {helm.NO_TEXT_SOURCE}
    assert {r["file"] for r in rows} == {str(run / "per_instance_stats.json")}
    assert rows[0]["record"].startswith("0/")


def test_scenario_key_and_model_from_run_name():
    name = f"{BBQ}meta_llama-3-8b"
    assert helm.scenario_key(name) == "bbq:subject=all,method=multiple_choice_joint"
    assert helm.scenario_key("harm_bench:model=a_b") == helm.scenario_key("harm_bench:model=c_d")
    assert helm.model_from_run_name(name) == "meta/llama-3-8b"


def test_model_falls_back_to_the_run_name(tmp_path):
    run = copy_run(BBQ_TURBO_V1, tmp_path)
    spec = load(run / "run_spec.json")
    del spec["adapter_spec"]["model"], spec["adapter_spec"]["model_deployment"]
    dump(run / "run_spec.json", spec)
    assert set(read(run).outcomes["source_model"]) == {"openai/gpt-4-turbo-2024-04-09"}


# --- suites, trials, perturbations ---------------------------------------------------------------


def test_same_run_name_in_two_suites_keeps_both_observations():
    v1, v4 = read(BBQ_LLAMA_V1), read(BBQ_LLAMA_V4)
    assert v1.outcomes["run_id"][0] != v4.outcomes["run_id"][0]
    both = pl.concat([v1.outcomes, v4.outcomes])
    shared = set(v1.inputs["input_id"]) & set(v4.inputs["input_id"])
    assert len(shared) == 10
    assert both.select(pl.struct(OUTCOME_KEY).is_unique().all()).item()


def test_train_trials_are_averaged(tmp_path):
    run = copy_run(BBQ_TURBO_V1, tmp_path)
    state = load(run / "scenario_state.json")
    second = json.loads(json.dumps(state["request_states"][0]))
    second["train_trial_index"] = 1
    state["request_states"].append(second)
    dump(run / "scenario_state.json", state)
    entries = load(run / "per_instance_stats.json")
    other = json.loads(json.dumps(entries[0]))
    other["train_trial_index"] = 1
    for stat in other["stats"]:
        if stat["name"]["name"] == "exact_match":
            stat["mean"] = stat["sum"] = (
                1
                - entries[0]["stats"][
                    [s["name"]["name"] for s in entries[0]["stats"]].index("exact_match")
                ]["mean"]
            )
    entries.append(other)
    dump(run / "per_instance_stats.json", entries)
    result = read(run)
    assert result.quarantine.height == 0
    assert result.outcomes.filter(metric="exact_match")["value"].to_list() == [0.5]


TYPOS = {
    "name": "typos",
    "robustness": True,
    "fairness": False,
    "computed_on": "perturbed",
    "prob": 0.1,
}


def add_perturbed_copies(run: Path, n: int) -> dict[str, str]:
    """Add perturbed instances the way HELM serialises them; returns id -> perturbed text."""
    state = load(run / "scenario_state.json")
    entries = load(run / "per_instance_stats.json")
    texts = {}
    for original in state["request_states"][:n]:
        perturbed = json.loads(json.dumps(original))
        perturbed["instance"]["perturbation"] = TYPOS
        perturbed["instance"]["input"]["text"] = "tpyo " + original["instance"]["input"]["text"]
        texts[original["instance"]["id"]] = perturbed["instance"]["input"]["text"]
        state["request_states"].append(perturbed)
    for entry in [e for e in entries if e["instance_id"] in texts]:
        copy = json.loads(json.dumps(entry))
        copy["perturbation"] = TYPOS
        for stat in copy["stats"]:
            stat["name"]["perturbation"] = TYPOS
            if stat["name"]["name"] == "exact_match":
                stat["mean"] = stat["sum"] = 0.25  # recognisable
        worst = json.loads(json.dumps(copy["stats"][0]))
        worst["name"]["perturbation"] = {**TYPOS, "computed_on": "worst"}
        copy["stats"].append(worst)  # derived stat: skipped
        entries.append(copy)
    dump(run / "scenario_state.json", state)
    dump(run / "per_instance_stats.json", entries)
    return texts


def test_perturbed_instances_are_separate_outcomes(tmp_path):
    run = copy_run(BBQ_GPT4O_V4, tmp_path)
    texts = add_perturbed_copies(run, 3)
    result = read(run)
    assert result.quarantine.height == 0
    original = read(BBQ_GPT4O_V4).outcomes.drop("run_id").sort(["input_id", "metric"])
    untouched = result.outcomes.filter(pl.col("perturbation").is_null())
    assert untouched.drop("run_id").sort(["input_id", "metric"]).equals(original)
    perturbed = result.outcomes.filter(pl.col("perturbation").is_not_null())
    assert set(perturbed["perturbation"]) == {"typos(prob=0.1)"}
    assert perturbed.height == 3 * len(BBQ_METRICS)
    assert set(perturbed.filter(metric="exact_match")["value"]) == {0.25}
    assert set(perturbed["input_id"]) == {input_id(t) for t in texts.values()}
    members = result.memberships.filter(pl.col("input_id").is_in(perturbed["input_id"].implode()))
    assert set(members["source_instance_id"]) == set(texts)


def test_perturbation_label():
    assert helm.perturbation_label(None) is None
    assert helm.perturbation_label(TYPOS) == "typos(prob=0.1)"
    assert helm.perturbation_label({"name": "lowercase", "robustness": True}) == "lowercase"
    assert helm.perturbation_label({**TYPOS, "seed": 2}) == "typos(prob=0.1,seed=2)"
    with pytest.raises(ValueError):
        helm.perturbation_label({"robustness": True})


# --- older and newer instance formats ------------------------------------------------------------


def test_input_text_variants():
    assert helm.input_text("plain 2022 input")[0] == "plain 2022 input"
    assert helm.input_text({"text": "q"}) == ("q", "input.text", None)
    media = {
        "text": "",
        "multimedia_content": {
            "media_objects": [
                {"content_type": "text/plain", "text": "a "},
                {"content_type": "text/plain", "text": "b"},
            ]
        },
    }
    assert helm.input_text(media)[0] == "a b"
    image = {
        "text": "",
        "multimedia_content": {
            "media_objects": [
                {"content_type": "image/png", "location": "x.png"},
                {"content_type": "text/plain", "text": "b"},
            ]
        },
    }
    assert "not text-only" in helm.input_text(image)[2]
    chat = {"text": "", "messages": [{"role": "user", "content": "hi"}]}
    assert helm.input_text(chat)[0] == "hi"
    assert helm.input_text({})[2] == "input text missing"


def test_old_plain_string_inputs_and_null_fields(tmp_path):
    run = copy_run(BBQ_TURBO_V1, tmp_path, suite="v1")
    state = load(run / "scenario_state.json")
    for s in state["request_states"]:
        text = s["instance"]["input"]["text"]
        s["instance"]["input"] = text  # 2022 layout
        s["instance"]["perturbation"] = None  # old dumps wrote nulls
        for ref in s["instance"]["references"]:
            ref["output"] = ref["output"]["text"]
    dump(run / "scenario_state.json", state)
    entries = load(run / "per_instance_stats.json")
    for e in entries:
        e["perturbation"] = None
    dump(run / "per_instance_stats.json", entries)
    result = read(run)
    assert result.quarantine.height == 0
    assert result.outcomes.equals(read(BBQ_TURBO_V1).outcomes)


# --- bad input -----------------------------------------------------------------------------------


def test_truncated_per_instance_stats_keeps_earlier_records(tmp_path):
    run = copy_run(BBQ_LLAMA_V4, tmp_path)
    raw = (run / "per_instance_stats.json").read_bytes()
    entries = load(run / "per_instance_stats.json")
    cut = len(json.dumps(entries[:5], indent=2)) + 300  # inside record 5
    (run / "per_instance_stats.json").write_bytes(raw[:cut])
    result = read(run)
    assert result.inputs.height == 5
    assert result.outcomes.height == 5 * len(BBQ_METRICS)
    [row] = quarantine_rows(result)
    assert row["file"] == str(run / "per_instance_stats.json")
    assert row["record"] == "5"
    assert "invalid JSON in record 5" in row["reason"]


def test_truncated_scenario_state_quarantines_the_rest(tmp_path):
    run = copy_run(BBQ_LLAMA_V4, tmp_path)
    state = load(run / "scenario_state.json")
    text = json.dumps(state, indent=2)
    first_ids = [s["instance"]["id"] for s in state["request_states"][:3]]
    marker = text.index(json.dumps(state["request_states"][3]["instance"]["id"]))
    (run / "scenario_state.json").write_text(text[:marker])
    result = read(run)
    assert set(result.memberships["source_instance_id"]) == set(first_ids)
    rows = quarantine_rows(result)
    broke = [r for r in rows if r["file"].endswith("scenario_state.json")]
    assert [r["record"] for r in broke] == ["3"]
    missing = [r for r in rows if r["file"].endswith("per_instance_stats.json")]
    assert len(missing) == 17 and all("is not in" in r["reason"] for r in missing)


def test_missing_fields_quarantine_the_record(tmp_path):
    run = copy_run(BBQ_LLAMA_V4, tmp_path)
    state = load(run / "scenario_state.json")
    del state["request_states"][1]["instance"]["id"]
    del state["request_states"][2]["instance"]["input"]["text"]
    dump(run / "scenario_state.json", state)
    entries = load(run / "per_instance_stats.json")
    del entries[4]["instance_id"]
    dump(run / "per_instance_stats.json", entries)
    rows = {
        (Path(r["file"]).name, r["record"], r["field"], r["reason"])
        for r in quarantine_rows(read(run))
    }
    iid2 = state["request_states"][2]["instance"]["id"]
    assert ("scenario_state.json", "1", "instance.id", "instance id missing") in rows
    assert ("scenario_state.json", f"2/{iid2}", "instance.input.text", "input text missing") in rows
    assert ("per_instance_stats.json", "4", "instance_id", "instance_id missing") in rows


def test_nan_and_non_numeric_values_are_quarantined(tmp_path):
    run = copy_run(BBQ_LLAMA_V4, tmp_path)
    entries = load(run / "per_instance_stats.json")
    for entry, bad in ((entries[2], math.nan), (entries[6], "abc"), (entries[8], -math.inf)):
        for stat in entry["stats"]:
            if stat["name"]["name"] == "exact_match":
                stat["mean"] = bad
    dump(run / "per_instance_stats.json", entries)  # writes bare NaN / -Infinity
    assert b"NaN" in (run / "per_instance_stats.json").read_bytes()
    result = read(run)
    rows = quarantine_rows(result)
    assert [(r["record"].split("/")[0], r["field"]) for r in rows] == [
        ("2", "exact_match"),
        ("6", "exact_match"),
        ("8", "exact_match"),
    ]
    assert "not a finite number" in rows[0]["reason"]
    assert result.outcomes.filter(metric="exact_match").height == 17
    assert result.outcomes.height == 20 * len(BBQ_METRICS) - 3


def test_nan_then_truncation(tmp_path):
    run = copy_run(BBQ_LLAMA_V4, tmp_path)
    entries = load(run / "per_instance_stats.json")
    for stat in entries[1]["stats"]:
        if stat["name"]["name"] == "exact_match":
            stat["mean"] = math.nan
    text = json.dumps(entries, indent=2)
    (run / "per_instance_stats.json").write_text(
        text[: len(json.dumps(entries[:9], indent=2)) + 50]
    )
    result = read(run)
    rows = quarantine_rows(result)
    assert [r["record"].split("/")[0] for r in rows] == ["1", "9"]
    assert (
        "not a finite number" in rows[0]["reason"]
        and "invalid JSON in record 9" in rows[1]["reason"]
    )
    assert result.inputs.height == 9


def test_duplicate_request_states_are_quarantined(tmp_path):
    run = copy_run(BBQ_LLAMA_V4, tmp_path)
    state = load(run / "scenario_state.json")
    state["request_states"].append(state["request_states"][0])
    dump(run / "scenario_state.json", state)
    result = read(run)
    [row] = quarantine_rows(result)
    iid = state["request_states"][0]["instance"]["id"]
    assert row["file"] == str(run / "scenario_state.json")
    assert row["record"] == f"20/{iid}" and "duplicate request state" in row["reason"]
    assert result.inputs.height == 20


def test_two_instances_with_one_text_keep_the_first(tmp_path):
    run = copy_run(BBQ_LLAMA_V4, tmp_path)
    state = load(run / "scenario_state.json")
    first, other = state["request_states"][0]["instance"], state["request_states"][5]["instance"]
    other["input"]["text"] = first["input"]["text"] + "  "  # same after normalisation
    dump(run / "scenario_state.json", state)
    result = read(run)
    [row] = quarantine_rows(result)
    assert row["record"] == f"5/{other['id']}" and "same text" in row["reason"]
    assert result.inputs.height == 19
    assert result.outcomes.height == 19 * len(BBQ_METRICS)


def test_conflicting_repeated_metric_is_quarantined(tmp_path):
    run = copy_run(SST, tmp_path)
    entries = load(run / "per_instance_stats.json")
    extra = json.loads(json.dumps(entries[0]))
    extra["stats"][0]["mean"] = 0.123  # sst_score again, another value
    entries.append(extra)
    dump(run / "per_instance_stats.json", entries)
    [row] = quarantine_rows(read(run))
    assert row["record"] == f"20/{extra['instance_id']}" and row["field"] == "sst_score"


@pytest.mark.parametrize("name", ["per_instance_stats.json", "scenario_state.json"])
def test_empty_file_is_unreadable(tmp_path, name):
    run = copy_run(BBQ_TURBO_V1, tmp_path)
    (run / name).write_bytes(b"")
    with pytest.raises(UnreadableSource, match=f"{name}: empty file"):
        read(run)


def test_utf16_file_is_unreadable(tmp_path):
    run = copy_run(BBQ_TURBO_V1, tmp_path)
    text = (run / "scenario_state.json").read_text()
    (run / "scenario_state.json").write_bytes(text.encode("utf-16"))
    with pytest.raises(UnreadableSource, match="scenario_state.json: not a UTF-8 file"):
        read(run)


def test_non_utf8_bytes_mid_file_quarantine_from_that_record(tmp_path):
    run = copy_run(BBQ_LLAMA_V4, tmp_path)
    state = load(run / "scenario_state.json")
    state["request_states"][12]["instance"]["input"]["text"] += " caf\u00e9"
    text = json.dumps(state, indent=2, ensure_ascii=False)
    (run / "scenario_state.json").write_bytes(text.encode("latin-1"))
    result = read(run)
    assert result.inputs.height == 12
    broke = [r for r in quarantine_rows(result) if r["file"].endswith("scenario_state.json")]
    assert [r["record"] for r in broke] == ["12"]


def test_json_broken_before_first_record_is_unreadable(tmp_path):
    run = copy_run(BBQ_TURBO_V1, tmp_path)
    (run / "per_instance_stats.json").write_text('[{"instance_id": ')
    with pytest.raises(UnreadableSource, match="per_instance_stats.json: invalid JSON"):
        read(run)


def test_missing_per_instance_stats_is_unreadable(tmp_path):
    run = copy_run(BBQ_TURBO_V1, tmp_path)
    (run / "per_instance_stats.json").unlink()
    with pytest.raises(UnreadableSource, match="per_instance_stats.json: file missing"):
        read(run)


def test_unparseable_run_spec_is_unreadable(tmp_path):
    run = copy_run(BBQ_TURBO_V1, tmp_path)
    (run / "run_spec.json").write_text('{"name": "bbq')
    with pytest.raises(UnreadableSource, match="run_spec.json: not a JSON file"):
        read(run)


def test_unknown_layouts(tmp_path):
    run = copy_run(BBQ_TURBO_V1, tmp_path)
    spec = load(run / "run_spec.json")
    dump(run / "run_spec.json", {k: v for k, v in spec.items() if k != "adapter_spec"})
    with pytest.raises(UnknownLayout, match="run_spec.json: no 'adapter_spec'"):
        read(run)
    dump(run / "run_spec.json", spec)
    dump(run / "per_instance_stats.json", {"stats": []})
    with pytest.raises(UnknownLayout, match="per_instance_stats.json: top level is not a list"):
        read(run)
    shutil.copyfile(BBQ_TURBO_V1 / "per_instance_stats.json", run / "per_instance_stats.json")
    dump(run / "scenario_state.json", {"adapter_spec": {}, "states": []})
    with pytest.raises(UnknownLayout, match="scenario_state.json: no 'request_states' list"):
        read(run)


def test_nan_tolerant_reader_across_chunk_boundaries():
    doc = b'[{"a": NaN, "s": "NaN \\" Infinity", "b": -Infinity}, {"c": Infinity, "d": [1, NaN]}]'
    expected = [
        {"a": "NaN", "s": 'NaN " Infinity', "b": "-Infinity"},
        {"c": "Infinity", "d": [1, "NaN"]},
    ]
    for chunk in (1, 2, 3, 5, 7, 64):
        reader = helm.NanTolerantReader(io.BytesIO(doc), chunk=chunk)
        assert list(ijson.items(reader, "item", use_float=True)) == expected


# --- other filesystems ---------------------------------------------------------------------------


def test_reads_through_a_memory_filesystem():
    fs = fsspec.filesystem("memory")
    root = "/helm-test/runs/v4"
    try:
        for run in (HARM_NO_STATE, HARM_SIBLING):
            for f in run.iterdir():
                fs.pipe(f"{root}/{run.name}/{f.name}", f.read_bytes())
        units = helm.find_units(fs, "/helm-test")
        assert units == sorted(f"{root}/{r.name}" for r in (HARM_NO_STATE, HARM_SIBLING))
        result = helm.read(f"memory://{root}/{HARM_NO_STATE.name}", names=NAMES)
        local = read(HARM_NO_STATE)
        assert result.outcomes.sort(["input_id", "metric"]).equals(
            local.outcomes.sort(["input_id", "metric"])
        )
        assert result.quarantine.height == 0
    finally:
        fs.rm("/helm-test", recursive=True)


# --- all the real HELM data ----------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.skipif(not RAW.is_dir(), reason=f"{RAW} not present")
def test_every_real_helm_run():
    fs = fsspec.filesystem("file")
    units = {
        suite: helm.find_units(fs, str(RAW / suite)) for suite in ("helm_safety_v4", "helm_bbq_v1")
    }
    assert len(units["helm_safety_v4"]) == 57 and len(units["helm_bbq_v1"]) == 11
    results = {suite: [helm.read(u, names=NAMES) for u in us] for suite, us in units.items()}
    v4 = pl.concat([r.outcomes for r in results["helm_safety_v4"]])
    assert v4["source_model"].n_unique() == 12
    assert v4.filter(dataset="helm/bbq", metric="exact_match").height == 1200
    for suite, rs in results.items():
        for r in rs:
            assert r.quarantine.height == 0, r.unit
            n = r.memberships.height
            if suite == "helm_safety_v4":
                assert n == 100, r.unit
            else:
                assert n == (1 if "gpt-4-turbo" in r.unit else 50), r.unit
            _check_main_score_against_stats_json(Path(r.unit), r.outcomes)
    everything = pl.concat([r.outcomes for rs in results.values() for r in rs])
    assert everything.select(pl.struct(OUTCOME_KEY).is_unique().all()).item()


def _check_main_score_against_stats_json(run: Path, outcomes: pl.DataFrame) -> None:
    """The run's mean per-instance score equals HELM's own aggregate in stats.json."""
    by_name = defaultdict(dict)
    for s in load(run / "stats.json"):
        if set(s["name"]) == {"name", "split"} and s["name"]["split"] == "test" and s["count"]:
            by_name[s["name"]["name"]] = s["mean"]
    scenario = run.name.split(":")[0]
    metric = {
        "bbq": "exact_match",
        "anthropic_red_team": "art_score",
        "harm_bench": "harm_bench_score",
        "simple_safety_tests": "sst_score",
        "xstest": "xst_score",
    }[scenario]
    values = outcomes.filter(metric=metric)["value"]
    assert values.mean() == pytest.approx(by_name[metric]), (run.name, metric)
