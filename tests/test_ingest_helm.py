"""The HELM run-folder reader: values against json.load, fallbacks, perturbations, bad input."""

from __future__ import annotations

import json
import math
import shutil
from collections import defaultdict
from pathlib import Path

import fsspec
import polars as pl
import pytest

from benchroute.schemas import OUTCOME_KEY, validate
from benchroute.transforms import binarize as bz
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
BBQ_DATASET = "helm/bbq/subject=all"  # scenario_spec.args = {"subject": "all"}
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
    "gold_position",  # answer positions of the multiple-choice states (RStd), never labels
    "pred_position",
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
    for s in states:  # answer positions: letters of output_mapping, in order
        if s.get("output_mapping") and s.get("train_trial_index", 0) == 0:
            letters = list(s["output_mapping"])
            right = next(r["output"]["text"] for r in s["instance"]["references"]
                         if "correct" in r["tags"])
            gold = [k for k in letters if s["output_mapping"][k] == right][0]
            said = s["result"]["completions"][0]["text"].strip()
            t = s["instance"]["input"]["text"]
            out[(t, "gold_position")] = letters.index(gold)
            out[(t, "pred_position")] = letters.index(said) if said in letters else -1
    return out


def values_by_text(result) -> dict[tuple[str, str], float]:
    """(input text, metric) -> value of each outcome read."""
    rows = result.outcomes.join(result.inputs, on="input_id").select("text", "metric", "value")
    return {(text, metric): value for text, metric, value in rows.iter_rows()}


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
    assert values_by_text(result) == pytest.approx(expected)
    assert set(result.outcomes["metric"]) == BBQ_METRICS
    n = len(load(run / "scenario_state.json")["request_states"])
    assert result.inputs.height == n
    assert result.outcomes.filter(metric="exact_match").height == n
    assert result.quarantine.height == 0
    spec = load(run / "run_spec.json")
    assert set(result.outcomes["source_model"]) == {spec["adapter_spec"]["model"]}
    assert set(result.outcomes["run_id"]) == {f"{run.parent.name}/{spec['name']}"}
    assert set(result.outcomes["dataset"]) == {BBQ_DATASET}
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
    assert values_by_text(result) == pytest.approx(expected_values(SST))
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
    assert values_by_text(result) == pytest.approx(expected)


def test_answer_positions_only_from_the_runs_own_state(tmp_path):
    """A sibling's scenario_state gives texts but holds another model's answers: no positions."""
    own = copy_run(BBQ_LLAMA_V4, tmp_path)
    copy_run(BBQ_GPT4O_V4, tmp_path)
    (own / "scenario_state.json").unlink()
    result = read(own)
    assert result.outcomes.height > 0
    assert not {"gold_position", "pred_position"} & set(result.outcomes["metric"])
    # with its own state: one pair per instance, pred == gold exactly where exact_match is 1
    wide = read(BBQ_LLAMA_V4).outcomes.pivot(on="metric", index="input_id", values="value")
    assert wide["gold_position"].null_count() == 0
    assert ((wide["gold_position"] == wide["pred_position"]) == (wide["exact_match"] == 1)).all()


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


@pytest.mark.parametrize(
    ("name", "damage", "message"),
    [
        pytest.param("per_instance_stats.json", lambda p: p.write_bytes(b""), "empty file",
                     id="empty-per_instance_stats"),
        pytest.param("scenario_state.json", lambda p: p.write_bytes(b""), "empty file",
                     id="empty-scenario_state"),
        pytest.param("scenario_state.json", lambda p: p.write_bytes(p.read_text().encode("utf-16")),
                     "not a UTF-8 file", id="utf16"),
        pytest.param("per_instance_stats.json", lambda p: p.write_text('[{"instance_id": '),
                     "invalid JSON", id="json-broken-before-first-record"),
        pytest.param("per_instance_stats.json", Path.unlink, "file missing", id="missing"),
        pytest.param("run_spec.json", lambda p: p.write_text('{"name": "bbq'), "not a JSON file",
                     id="unparseable-run-spec"),
    ],
)
def test_damaged_file_is_unreadable(tmp_path, name, damage, message):
    run = copy_run(BBQ_TURBO_V1, tmp_path)
    damage(run / name)
    with pytest.raises(UnreadableSource, match=f"{name}: {message}"):
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


# --- text that is not UTF-8 (issue item 8) ---------------------------------------------------


def _write_with_bytes(path: Path, obj, marker: str, raw: bytes) -> None:
    """Write ``obj`` as HELM does, then put ``raw`` (not UTF-8) where ``marker`` was."""
    path.write_bytes(json.dumps(obj, indent=2).encode().replace(marker.encode(), raw))


@pytest.mark.parametrize("k", [0, 12])
def test_non_utf8_byte_in_one_text_quarantines_that_instance_only(tmp_path, k):
    run = copy_run(BBQ_LLAMA_V4, tmp_path)
    state = load(run / "scenario_state.json")
    inst = state["request_states"][k]["instance"]
    inst["input"]["text"] += " @@BAD@@"
    _write_with_bytes(run / "scenario_state.json", state, "@@BAD@@", b"caf\xe9")  # Latin-1 é
    result = read(run)
    [row] = quarantine_rows(result)  # its stats entry is not quarantined a second time
    assert row["file"] == str(run / "scenario_state.json")
    assert row["record"] == f"{k}/{inst['id']}"
    assert row["field"] == "instance.input.text" and "UTF-8" in row["reason"]
    assert result.inputs.height == 19
    assert result.outcomes.height == 19 * len(BBQ_METRICS)
    assert inst["id"] not in set(result.memberships["source_instance_id"])


def test_lone_surrogate_escape_in_one_text_quarantines_that_instance_only(tmp_path):
    run = copy_run(BBQ_LLAMA_V4, tmp_path)
    state = load(run / "scenario_state.json")
    inst = state["request_states"][3]["instance"]
    inst["input"]["text"] += " \udc80"  # json.dumps writes the escape; yajl stops at it
    dump(run / "scenario_state.json", state)
    result = read(run)
    [row] = quarantine_rows(result)
    assert (row["record"], row["field"]) == (f"3/{inst['id']}", "instance.input.text")
    assert result.inputs.height == 19


def test_non_utf8_byte_in_per_instance_stats_costs_one_entry(tmp_path):
    run = copy_run(BBQ_LLAMA_V4, tmp_path)
    entries = load(run / "per_instance_stats.json")
    iid = entries[0]["instance_id"]
    entries[0]["instance_id"] = iid + "@@BAD@@"
    j = next(j for j, s in enumerate(entries[5]["stats"]) if s["name"]["name"] == "exact_match")
    entries[5]["stats"][j]["name"]["name"] += "@@BAD@@"
    _write_with_bytes(run / "per_instance_stats.json", entries, "@@BAD@@", b"\xff")
    result = read(run)
    rows = quarantine_rows(result)
    assert [(r["record"].split("/")[0], r["field"]) for r in rows] == [
        ("0", "instance_id"),
        ("5", f"stats[{j}].name.name"),
    ]
    assert all(r["file"] == str(run / "per_instance_stats.json") for r in rows)
    assert all("UTF-8" in r["reason"] for r in rows)
    assert result.inputs.height == 19  # entry 0 was instance 0's only entry
    assert result.outcomes.height == 19 * len(BBQ_METRICS) - 1  # entry 5 lost one stat


# --- dataset identity (issue item 9) -------------------------------------------------------------


def make_run(
    tmp_path: Path,
    name: str,
    args: dict | None,
    *,
    groups: list[str] | None = None,
    model: str | None = None,
    method: str | None = None,
    suite: str = "v4",
) -> Path:
    """A copy of the llama BBQ run under another run name, scenario args (``None``: the run spec
    has no ``scenario_spec``), groups, model or method."""
    dst = tmp_path / suite / name
    shutil.copytree(BBQ_LLAMA_V4, dst)
    spec = load(dst / "run_spec.json")
    spec["name"] = name
    if args is None:
        del spec["scenario_spec"]
    else:
        spec["scenario_spec"]["args"] = args
    if groups is not None:
        spec["groups"] = groups
    if model:
        spec["adapter_spec"]["model"] = model
    if method:
        spec["adapter_spec"]["method"] = method
    dump(dst / "run_spec.json", spec)
    return dst


def datasets(*runs: Path) -> list[set[str]]:
    return [set(read(r).outcomes["dataset"]) for r in runs]


def test_different_dataset_args_are_different_datasets(tmp_path):
    runs = [
        make_run(
            tmp_path,
            f"commonsense:dataset={d},method=multiple_choice_separate_original,"
            "model=meta_llama-3-8b",
            {"dataset": d},
            groups=[d],
        )
        for d in ("hellaswag", "openbookqa")
    ]
    assert datasets(*runs) == [
        {"helm/commonsense/dataset=hellaswag"},
        {"helm/commonsense/dataset=openbookqa"},
    ]


def test_model_and_method_args_do_not_split_a_dataset(tmp_path):
    a = make_run(
        tmp_path,
        "mmlu:subject=anatomy,method=multiple_choice_joint,model=meta_llama-3-8b",
        {"subject": "anatomy"},
    )
    b = make_run(
        tmp_path,
        "mmlu:subject=anatomy,method=multiple_choice_separate_original,max_train_instances=0,"
        "model=openai_gpt-4o-2024-05-13",
        {"subject": "anatomy", "model": "openai/gpt-4o-2024-05-13", "tokenizer": "x/y"},
        model="openai/gpt-4o-2024-05-13",
        method="multiple_choice_separate_original",
    )
    c = make_run(
        tmp_path,
        "mmlu:subject=college_physics,method=multiple_choice_joint,model=meta_llama-3-8b",
        {"subject": "college_physics"},
    )
    assert datasets(a, b, c) == [
        {"helm/mmlu/subject=anatomy"},
        {"helm/mmlu/subject=anatomy"},
        {"helm/mmlu/subject=college_physics"},
    ]
    assert {m for r in (a, b) for m in read(r).outcomes["source_model"]} == {
        "meta/llama-3-8b",
        "openai/gpt-4o-2024-05-13",
    }


def test_dataset_from_the_run_name_when_the_run_spec_has_no_scenario_args(tmp_path):
    run = make_run(
        tmp_path,
        "mmlu:subject=anatomy,method=multiple_choice_joint,max_train_instances=5,num_outputs=1,"
        "stop=hash,data_augmentation=canonical,model=meta_llama-3-8b,model_deployment=together_x",
        None,
    )
    assert datasets(run) == [{"helm/mmlu/subject=anatomy"}]


def test_dataset_id_is_canonical_escaped_and_a_valid_name():
    def args(a: dict) -> tuple:
        return helm.dataset_args({"name": "s:x=1", "scenario_spec": {"args": a}})

    assert args({"b": "2", "a": True, "c": None, "model": "m"}) == (("a", "True"), ("b", "2"))
    assert args({"b": "2", "a": True}) == args({"a": True, "b": "2"})
    tricky = helm.dataset_id("wmt_14", args({"language_pair": "de-en", "data_path": "/d/../x,y=z"}))
    assert tricky == "helm/wmt_14/data_path=%2Fd%2F%2E%2E%2Fx%2Cy%3Dz,language_pair=de-en"
    names = [tricky, helm.dataset_id(".."), helm.dataset_id("a/b", (("k", ".."),))]
    assert all(".." not in n and n.count("/") <= 2 for n in names)
    rows = pl.DataFrame(
        {
            "input_id": [input_id("x")] * len(names),
            "dataset": names,
            "source": ["helm"] * len(names),
            "split": [None] * len(names),
            "source_instance_id": [None] * len(names),
        }
    )
    valid, bad = validate("memberships", rows, source="helm")
    assert bad.height == 0 and valid.height == len(names)


# --- main metrics and labels (issue item 9) ------------------------------------------------------


def narrative_qa_run(tmp_path: Path, schema_main: str | None = None) -> Path:
    """The llama BBQ run as a narrative_qa run: each instance also gets ``f1_score`` (1 where
    exact_match is 1, else 0.6), so labels on F1 (t = 0.5) are all 1 and on exact match not."""
    run = make_run(tmp_path, "narrative_qa:model=meta_llama-3-8b", {}, groups=["narrative_qa"])
    entries = load(run / "per_instance_stats.json")
    for entry in entries:
        em = next(s["mean"] for s in entry["stats"] if s["name"]["name"] == "exact_match")
        f1 = 1.0 if em else 0.6
        entry["stats"].append(
            {
                "name": {"name": "f1_score", "split": "test"},
                "count": 1, "sum": f1, "sum_squared": f1 * f1, "min": f1, "max": f1, "mean": f1,
            }
        )  # fmt: skip
    dump(run / "per_instance_stats.json", entries)
    if schema_main:
        write_schema(run.parent, {"narrative_qa": schema_main})
    return run


def write_schema(suite: Path, mains: dict[str, str]) -> None:
    """A suite ``schema.json`` as HELM's summarizer writes it (the parts that matter here)."""
    groups = [
        {"name": g, "metric_groups": ["accuracy"], "environment": {"main_name": m, "main_split": "test"}}
        for g, m in mains.items()
    ]
    dump(suite / "schema.json", {"metric_groups": [], "run_groups": groups})


def labels_of(result, rules=bz.DEFAULT_RULES) -> pl.DataFrame:
    return bz.binarize(result.outcomes, rules, result.main_metrics)


def test_narrative_qa_is_labelled_on_its_main_metric_f1(tmp_path):
    result = read(narrative_qa_run(tmp_path))
    assert result.main_metrics == (("helm/narrative_qa", "f1_score", "table"),)
    # Before: the earliest default rule that matches wins, exact_match.
    assert bz.primary_metrics(result.outcomes, bz.DEFAULT_RULES)["metric"].to_list() == [
        "exact_match"
    ]
    labels = labels_of(result)
    assert set(labels["metric"]) == {"f1_score"}
    assert set(labels["rule"]) == {"threshold(f1_score >= 0.5)"}
    assert labels["y"].sum() == labels.height == 20
    # Without the reader's hints the shipped table still applies, by scenario name.
    assert bz.binarize(result.outcomes)["metric"].unique().to_list() == ["f1_score"]
    # A user's '*' rule for the main metric tunes it without choosing it.
    tuned = labels_of(result, (bz.Rule("f1_score", "threshold", t=0.7),) + bz.DEFAULT_RULES)
    em = result.outcomes.filter(metric="exact_match").select("input_id", em="value")
    assert tuned.join(em, on="input_id").select((pl.col("y") == pl.col("em")).all()).item()


def test_schema_main_metric_overrides_the_table_and_a_user_rule_overrides_both(tmp_path):
    result = read(narrative_qa_run(tmp_path, schema_main="exact_match"))
    assert result.main_metrics == (
        ("helm/narrative_qa", "exact_match", "schema"),
        ("helm/narrative_qa", "f1_score", "table"),
    )
    labels = labels_of(result)
    assert set(labels["metric"]) == {"exact_match"} and labels["y"].sum() < labels.height
    user = (bz.Rule("quasi_exact_match", "threshold", t=0.5, dataset="helm/narrative_qa"),)
    assert set(labels_of(result, user + bz.DEFAULT_RULES)["metric"]) == {"quasi_exact_match"}
    effective = bz.effective_rules(result.outcomes, bz.DEFAULT_RULES, result.main_metrics)
    assert effective[0] == bz.Rule(
        "exact_match", "threshold", t=0.5, lo=0, hi=1, dataset="helm/narrative_qa"
    )
    assert bz.effective_rules(result.outcomes, effective, result.main_metrics) == effective


def test_a_schema_main_metric_without_per_instance_values_falls_through(tmp_path):
    """HELM Safety's schema names ``bbq_accuracy``, a whole-run statistic: the table's
    ``quasi_exact_match`` (HELM classic's schema) is used instead."""
    run = copy_run(BBQ_LLAMA_V4, tmp_path)
    write_schema(run.parent, {"bbq": "bbq_accuracy"})
    result = read(run)
    assert result.main_metrics[0] == (BBQ_DATASET, "bbq_accuracy", "schema")
    assert set(labels_of(result)["metric"]) == {"quasi_exact_match"}


def test_broken_schema_is_reported_and_the_table_used(tmp_path):
    run = narrative_qa_run(tmp_path)
    (run.parent / "schema.json").write_text("{not json")
    result = read(run)
    [row] = quarantine_rows(result)
    assert row["file"] == str(run.parent / "schema.json") and "schema not readable" in row["reason"]
    assert set(labels_of(result)["metric"]) == {"f1_score"}


def test_ingest_flow_keeps_the_hints_and_relabels_with_them(tmp_path):
    """The hints travel in the ingest commit; the labels commit records the rule they made."""
    from benchroute.artifacts.store import Store
    from benchroute.flows.ingest import ingest_flow

    run = narrative_qa_run(tmp_path / "src", schema_main="exact_match")
    url = str(tmp_path / "store")
    summary = ingest_flow(sources=[str(run.parent)], store=url, kinds=["helm"], progress=False)
    assert summary["units_failed"] == {}
    store = Store(url)
    assert bz.main_metric_hints(store.commits()) == [
        ("helm/narrative_qa", "exact_match", "schema"),
        ("helm/narrative_qa", "f1_score", "table"),
    ]
    assert set(store.read("labels")["metric"]) == {"exact_match"}
    labels_commit = next(c for c in reversed(store.commits()) if "labels" in c.replace)
    assert labels_commit.info["rules"][0] == {
        "metric": "exact_match", "kind": "threshold", "t": 0.5, "op": ">=",
        "dataset": "helm/narrative_qa", "lo": 0, "hi": 1,
    }  # fmt: skip


def test_lodo_holds_out_every_mmlu_subject_together():
    """Subjects split MMLU into datasets; leave-one-dataset-out still holds MMLU out whole."""
    import numpy as np

    from benchroute.transforms.evaluate import BenchmarkArrays, EvalConfig, evaluate_lodo
    from benchroute.transforms.lodo_groups import dataset_family
    from benchroute.transforms.routing_eval import folds

    anatomy, physics = "helm/mmlu/subject=anatomy", "helm/mmlu/subject=college_physics"
    hella, obqa = "helm/commonsense/dataset=hellaswag", "helm/commonsense/dataset=openbookqa"
    assert dataset_family(anatomy) == dataset_family(physics) == "helm/mmlu"
    assert dataset_family(hella) != dataset_family(obqa)
    assert dataset_family("mmlu_pro/law") == "mmlu_pro/law"

    names = [anatomy, physics, "helm/xstest", hella]
    rng = np.random.default_rng(0)
    rows = [
        (input_id(f"{d} question {i}"), d, m, int(rng.integers(0, 2)))
        for d in names
        for i in range(12)
        for m in ("a", "b", "c")
    ]
    labels = pl.DataFrame(rows, schema=["input_id", "dataset", "model", "y"], orient="row")
    labels = labels.with_columns(value=pl.col("y").cast(pl.Float64))
    ids = sorted(set(labels["input_id"]))
    bench = BenchmarkArrays.from_frames(
        rng.normal(size=(len(ids), 8)), ids, labels, labels.select("input_id", "dataset")
    )
    d = {name: bench.datasets.index(name) for name in names}
    rows_of = {name: set(bench.dataset_rows[d[name]]) for name in names}
    by_name = {f.name: f for f in folds(bench, "lodo", min_inputs=5)}
    train = set(by_name[anatomy].train)
    assert not train & (rows_of[anatomy] | rows_of[physics])
    assert rows_of["helm/xstest"] | rows_of[hella] <= train
    assert rows_of[anatomy] <= set(by_name["helm/xstest"].train)
    families = bench.families()
    assert families[d[anatomy]].tolist() == [n in (anatomy, physics) for n in bench.datasets]
    ev = evaluate_lodo(bench, EvalConfig(k=3, min_inputs=5, alphas=(0.0,)))
    assert set(ev.per_task["dataset"]) == set(names)


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
    assert v4.filter(dataset=BBQ_DATASET, metric="exact_match").height == 1200
    assert set(v4["dataset"]) == {
        BBQ_DATASET,
        "helm/anthropic_red_team",
        "helm/harm_bench",
        "helm/simple_safety_tests",
        "helm/xstest",
    }
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
