"""HELM run folders -> canonical tables.

A *unit* is one HELM run: a folder holding ``run_spec.json`` (HELM writes
``benchmark_output/runs/<suite>/<run name>/``). ``read`` uses three files of it:

- ``run_spec.json`` (small, ``json.load``): run name, ``adapter_spec.model`` (else the run name's
  ``model=`` argument with its first ``_`` made ``/``), ``adapter_spec.model_deployment`` when
  present, ``scenario_spec.args``, ``groups``. The scenario is the run name before ``:``.
- ``scenario_state.json`` (streamed, ``request_states[]``): ``instance.input.text``,
  ``instance.id``, ``instance.split``, ``instance.perturbation``, ``train_trial_index``. Without
  it the texts come from ``instances.json`` in the run folder, else from a sibling run of the same
  suite folder whose run name minus its ``model=`` argument is the same and that has a
  ``scenario_state.json``; with neither, every per-instance entry is quarantined.
- ``per_instance_stats.json`` (streamed, a list of ``{instance_id, train_trial_index,
  perturbation?, stats: [Stat]}``): the outcomes.

Formats (checked against stanford-crfm/helm): ``input`` as ``{"text": ...}`` (v0.2 onwards) or a
plain string (2022 dumps); an empty ``input.text`` with ``input.multimedia_content`` (v0.5+: text
parts joined; inputs with image/audio parts are quarantined) or ``input.messages`` (contents
joined); ``extra_data``, ``sub_split``, ``contrast_*``, ``annotations`` and references are ignored.
A key whose value is ``null`` counts as absent (HELM writes with ``asdict_without_nones``; older
dumps wrote ``null``s). The bare ``NaN``/``Infinity`` tokens of Python's ``json.dumps`` are read
as non-finite values and quarantined.

Decisions:

- **Dataset**: a HELM run name is ``<scenario>:<arg>=<value>,...`` and mixes three kinds of
  argument: the model (``model``, ``model_deployment``), the adapter (``method``,
  ``max_train_instances``, ``num_outputs``, ``stop``... : HELM's run expanders) and the data
  (``dataset``, ``subject``, ``subset``, ``task``, ``language``...). Only the data arguments
  make the dataset: ``helm/<scenario>/<arg>=<value>,...``, sorted by name
  (``helm/commonsense/dataset=hellaswag``, ``helm/mmlu/subject=abstract_algebra``), or
  ``helm/<scenario>`` without any (``helm/xstest``). They are read from
  ``scenario_spec.args`` (the arguments HELM built the scenario with), minus ``MODEL_ARGS``;
  a run spec without that object falls back on the run name minus ``MODEL_ARGS`` and
  ``ADAPTER_ARGS``. Names and values are percent-escaped (``dataset_id``): no ``/``, ``,``,
  ``=`` or ``..`` inside a part. Runs of two models, or two methods, on one scenario setup are
  one dataset; two subjects are two.
- **Main metric** (``HelmResult.main_metrics``, used by ``binarize.effective_rules``): the
  suite's schema (``schema.json`` in the suite folder, as HELM's summarizer writes it, else
  ``schema*.yaml``) names each run group's main metric (``run_groups[].environment.main_name``);
  the run's groups are ``run_spec.groups``. Those come first (origin ``schema``), then the shipped
  table ``transforms/helm_main_metrics.csv`` (HELM's own schema files) for the groups and the
  scenario name (origin ``table``). The ingest flow stores them with its commit; the labels stage
  uses the first one the dataset has per instance (narrative_qa: ``f1_score``, not
  ``exact_match``).
- **Metrics kept**: every per-instance stat except bookkeeping, i.e. names matching
  ``BOOKKEEPING`` (``num_*``, ``finish_reason_*``, ``inference_*``, ``training_*``, ``batch_*``,
  ``prompt_truncated``, ``max_prob``, ``predicted_index``). ``logprob`` is kept: it is the
  per-instance log-likelihood the LL baseline needs. ``num_output_tokens`` and
  ``num_prompt_tokens`` (``USAGE``) are kept too: the tokens a request used, for its cost
  (usage measures, never labels). Stats derived across perturbations
  (``name.perturbation.computed_on`` ``worst``/``original``) are skipped.
- **Value**: the stat's ``mean``, else ``sum / count``; ``count == 0`` is skipped silently
  (``training_co2_cost``).
- **Split**: a stat whose ``name.split`` is not its instance's split is quarantined.
- **Repeated entries**: entries with the same (instance, perturbation, trial) are merged (the
  safety scenarios write two per instance); a metric read twice with different values is
  quarantined and the first kept.
- **Trials**: the train trials of one (instance, perturbation, metric) are averaged into one
  outcome (HELM's own aggregate is a mean over trials, too).
- **Perturbations**: a perturbed instance is its own input (the perturbed text); its outcomes
  carry ``perturbation = name(arg=value,...)`` (e.g. ``typos(prob=0.1)``: every field of HELM's
  description except ``name/robustness/fairness/computed_on``); originals have ``null``.
- **run_id**: ``<suite>/<run name>``, the suite being the run folder's parent folder (HELM's
  ``runs/<suite>/``). One run name can sit in several suites (``bbq:...,model=anthropic_claude-
  3-opus-20240229`` is in both ``v1`` and ``v4``) and the outcome key must keep both.
- **Answer positions** (issue 15, for the selection-bias measure RStd; never labels): for a
  request state with an ``output_mapping`` (HELM's ``multiple_choice_joint``: letter -> option
  text) in the run's own ``scenario_state.json`` (a sibling run's holds another model's
  answers), train trial 0: ``gold_position``, the index among the mapping's letters of the first
  reference tagged ``correct``, and ``pred_position``, the index of the completion's text
  (stripped) among them, -1 when it is no letter. No correct reference in the mapping: neither.
- **Inputs**: the instances that at least one per-instance entry refers to. Two instances of
  one run with the same normalised text are one input: the first one's outcomes are kept, the
  later instance is quarantined.

Bad input never fails the whole read. A bad record becomes a quarantine row naming the file, the
record (``<index>/<instance id>``) and the field. Bytes that are not UTF-8 (or a lone surrogate
escape) inside a string cost only the record whose used field holds them (instance id, input
text, split, perturbation, stat name): ``benchroute.io.TolerantJson`` marks them, the record is quarantined
with that field, and the records before and after it are read. JSON that breaks mid-file keeps
what was parsed and adds a row naming the record where it broke. A file of which nothing can be
parsed (empty, UTF-16/32, broken before its first record) raises ``UnreadableSource``; so does an
unparseable ``run_spec.json``. A layout this reader does not know (no ``adapter_spec``, stats not a list...)
raises ``UnknownLayout``.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import re
from collections.abc import Iterator
from dataclasses import dataclass, field, fields
from typing import BinaryIO

import fsspec
import ijson
from fsspec.core import url_to_fs

from benchroute.io import JSON_PARSE_ERRORS, TolerantJson, display_path, iter_json
from benchroute.transforms.binarize import helm_main_metrics

from .base import (
    Collector,
    IngestResult,
    UnknownLayout,
    UnreadableSource,
    text_problem,
    to_float,
)

KIND = "helm"

RUN_SPEC = "run_spec.json"
SCENARIO_STATE = "scenario_state.json"
PER_INSTANCE_STATS = "per_instance_stats.json"
INSTANCES = "instances.json"

# Per-instance stats that describe the request or the run, not how good the answer was.
BOOKKEEPING = re.compile(
    r"(num_|finish_reason_|inference_|training_|batch_).*|prompt_truncated|max_prob|predicted_index"
)
# Per-instance stats kept although they match BOOKKEEPING: the tokens the request used.
USAGE = ("num_output_tokens", "num_prompt_tokens")
GOLD_POSITION, PRED_POSITION = "gold_position", "pred_position"  # answer positions (never labels)
# Fields of a PerturbationDescription that do not tell two perturbations apart.
_PERTURBATION_META = ("name", "robustness", "fairness", "computed_on")
_DERIVED_COMPUTED_ON = ("worst", "original")
_MODEL_ARGS = ("model", "model_deployment")
# Arguments that pick the model, never part of a dataset's identity (``tokenizer`` is a
# scenario argument of HELM's synthetic efficiency scenario, set per model).
MODEL_ARGS = ("model", "model_deployment", "tokenizer")
# Run-name arguments that set the adapter (HELM's run expanders, src/helm/benchmark/
# run_expander.py, and the run spec functions' ``method``): dropped from the dataset identity
# when it has to come from the run name.
ADAPTER_ARGS = (
    "method", "groups", "instructions", "prompt", "newline", "stop", "add_to_stop",
    "global_prefix", "anthropic", "claude_3", "amazon-nova", "follow_format_instructions",
    "idefics_instruct", "llava", "open_flamingo", "format_prompt", "num_train_trials",
    "max_train_instances", "max_eval_instances", "num_outputs", "num_trials", "eval_split",
    "data_augmentation", "num_output_tokens", "increase_max_tokens", "temperature",
    "increase_temperature", "chatml", "output_format_instructions", "process_output",
)  # fmt: skip
NO_TEXT_SOURCE = "no instance text: scenario_state.json missing"

Key = tuple  # (HELM instance id, perturbation label or None)


# ---------------------------------------------------------------------------------------------
# Discovery


def find_units(fs: fsspec.AbstractFileSystem, root: str) -> list[str]:
    """Every folder at or under ``root`` that holds a ``run_spec.json`` (one HELM run each)."""
    if not fs.isdir(root):
        return []
    files = fs.find(root, withdirs=False)
    return sorted({_parent(p) for p in files if _basename(p) == RUN_SPEC})


# ---------------------------------------------------------------------------------------------
# Records


@dataclass(frozen=True)
class RunInfo:
    """What ``run_spec.json`` says about a run, plus the suite folder it sits in.

    ``scenario_args``: the data-defining arguments, canonical (sorted, values as text; see
    ``dataset_args``); ``groups``: the run groups HELM files the run under (``run_spec.groups``).
    """

    name: str
    model: str
    deployment: str | None
    method: str | None
    suite: str
    scenario_args: tuple[tuple[str, str], ...] = ()
    groups: tuple[str, ...] = ()

    @property
    def scenario(self) -> str:
        return self.name.split(":", 1)[0].strip()

    @functools.cached_property
    def dataset(self) -> str:  # asked once per record: computed once per run
        return dataset_id(self.scenario, self.scenario_args)

    @property
    def run_id(self) -> str:
        return f"{self.suite}/{self.name}" if self.suite else self.name


@dataclass(frozen=True)
class InstanceText:
    """One instance's text, split and id, and the file/record/field it was read from."""

    text: object
    split: str | None
    instance_id: str
    file: str
    record: str
    field: str


@dataclass
class InstanceIndex:
    """A run's instance texts by (instance id, perturbation), and the file they came from."""

    source: str
    by_key: dict[Key, InstanceText] = field(default_factory=dict)
    # Instances quarantined for text that is not valid UTF-8/Unicode: their stats are dropped
    # without a second quarantine row (the instance's row says why).
    rejected: set[Key] = field(default_factory=set)
    # (gold, predicted) answer position of multiple-choice instances, train trial 0 (``answer_positions``)
    positions: dict[Key, tuple[int, int]] = field(default_factory=dict)


@dataclass
class _Values:
    """The metric values of one (instance, perturbation): metric -> trial -> value."""

    first_record: str
    by_metric: dict[str, dict[int, float]] = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------
# The run


@dataclass(frozen=True)
class HelmResult(IngestResult):
    """An ``IngestResult`` plus the run's main-metric hints for the labels stage.

    ``main_metrics``: ``(dataset, metric, origin)`` rows, most trusted first: the suite schema's
    main metric of each of the run's groups (origin ``schema``), then the shipped table's
    (``binarize.helm_main_metrics``, by group, then by scenario name; origin ``table``).
    """

    main_metrics: tuple[tuple[str, str, str], ...] = ()


def read(url: str, *, names) -> HelmResult:
    """Read one HELM run folder into canonical frames (see the module docstring)."""
    fs, path = url_to_fs(url)
    path = path.rstrip("/")
    run = read_run_spec(fs, f"{path}/{RUN_SPEC}", suite=_basename(_parent(path)))
    collector = Collector(source=KIND, unit=url, names=names)
    stats_path = f"{path}/{PER_INSTANCE_STATS}"
    stats_label = display_path(fs, stats_path)
    if not fs.exists(stats_path):
        raise UnreadableSource(f"{stats_label}: file missing; the run has no per-instance results")
    index = instance_index(fs, path, run, collector)
    values = read_per_instance_stats(fs, stats_path, index, collector)
    _emit(values, index, run, stats_label, collector)
    schema = suite_main_metrics(fs, _parent(path), collector)
    result = collector.result(stats_label)
    return HelmResult(
        **{f.name: getattr(result, f.name) for f in fields(result)},
        main_metrics=main_metric_hints(run, schema),
    )


# ---------------------------------------------------------------------------------------------
# Main metrics


SCHEMA_JSON = "schema.json"
_SCHEMA_YAML = re.compile(r"schema.*\.ya?ml")


def suite_main_metrics(
    fs: fsspec.AbstractFileSystem, suite_path: str, collector: Collector | None = None
) -> dict[str, str]:
    """Run group -> main metric, from the suite folder's schema (``schema.json``, which HELM's
    summarizer writes there, else ``schema*.yaml``): ``run_groups[].environment.main_name``.

    ``{}`` when there is no schema; a schema that cannot be read adds a quarantine row (the
    run is still read; its main metrics then come from the shipped table).
    """
    try:
        names = [_basename(p) for p in fs.ls(suite_path, detail=False)]
    except (FileNotFoundError, NotADirectoryError):
        return {}
    found = [n for n in names if n == SCHEMA_JSON] + sorted(
        n for n in names if _SCHEMA_YAML.fullmatch(n)
    )
    if not found:
        return {}
    path = f"{suite_path}/{found[0]}"
    key = (display_path(fs, path), str(fs.info(path).get("size")), str(fs.info(path).get("mtime")))
    if key not in _SCHEMA_CACHE:
        _SCHEMA_CACHE.clear() if len(_SCHEMA_CACHE) > 64 else None
        _SCHEMA_CACHE[key] = _parse_schema(fs, path)
    mains, problem = _SCHEMA_CACHE[key]
    if problem and collector is not None:
        collector.quarantine(key[0], None, "run_groups", f"{problem}; main metrics from the table")
    return mains


_SCHEMA_CACHE: dict[tuple[str, str, str], tuple[dict[str, str], str | None]] = {}


def _parse_schema(fs: fsspec.AbstractFileSystem, path: str) -> tuple[dict[str, str], str | None]:
    try:
        with fs.open(path, "rb") as f:
            raw = f.read().decode("utf-8")
        if path.endswith(".json"):
            doc = json.loads(raw)
        else:
            import yaml  # only for the rare suite that keeps a YAML schema

            doc = yaml.safe_load(raw)
    except ImportError:
        return {}, "schema is YAML and PyYAML is not installed"
    except Exception as exc:  # noqa: BLE001 - any parse error: the schema is just not used
        return {}, f"schema not readable: {type(exc).__name__}: {str(exc)[:120]}"
    groups = doc.get("run_groups") if isinstance(doc, dict) else None
    if not isinstance(groups, list):
        return {}, "schema has no 'run_groups' list"
    mains = {}
    for group in groups:
        env = group.get("environment") if isinstance(group, dict) else None
        main = env.get("main_name") if isinstance(env, dict) else None
        name = group.get("name") if isinstance(group, dict) else None
        if isinstance(name, str) and isinstance(main, str) and main and main != "none":
            if "${" not in main:
                mains[name] = main
    return mains, None


def main_metric_hints(run: RunInfo, schema: dict[str, str]) -> tuple[tuple[str, str, str], ...]:
    """``(dataset, metric, origin)`` rows for the labels stage (``binarize.effective_rules``):
    the schema's main metric of each of the run's groups, then the shipped table's."""
    rows: dict[tuple[str, str], str] = {}
    for group in run.groups:
        if group in schema:
            rows.setdefault((run.dataset, schema[group]), "schema")
    table = helm_main_metrics()
    for group in (*run.groups, run.scenario):
        for metric in table.get(group, ()):
            rows.setdefault((run.dataset, metric), "table")
    return tuple((d, m, origin) for (d, m), origin in rows.items())


def read_run_spec(fs: fsspec.AbstractFileSystem, path: str, *, suite: str = "") -> RunInfo:
    """Parse ``run_spec.json``: ``UnreadableSource`` if it is not JSON, ``UnknownLayout`` if odd."""
    label = display_path(fs, path)
    try:
        with fs.open(path, "rb") as f:
            spec = json.loads(f.read().decode("utf-8"))
    except FileNotFoundError as exc:
        raise UnreadableSource(f"{label}: file missing") from exc
    except (UnicodeDecodeError, ValueError) as exc:
        raise UnreadableSource(f"{label}: not a JSON file: {exc}") from exc
    return run_info(spec, label, suite=suite)


def run_info(spec: object, label: str, *, suite: str = "") -> RunInfo:
    """``RunInfo`` from a parsed run spec (``label`` names the file in errors)."""
    if not isinstance(spec, dict):
        raise UnknownLayout(f"{label}: top level is {type(spec).__name__}, expected an object")
    name, adapter = spec.get("name"), spec.get("adapter_spec")
    if not isinstance(name, str) or not name.strip():
        raise UnknownLayout(f"{label}: no run name ('name')")
    if not isinstance(adapter, dict):
        raise UnknownLayout(f"{label}: no 'adapter_spec' object")
    deployment = _str_or_none(adapter.get("model_deployment"))
    model = _str_or_none(adapter.get("model")) or model_from_run_name(name) or deployment
    if not model:
        raise UnknownLayout(f"{label}: no model (adapter_spec.model, run name model=, deployment)")
    groups = spec.get("groups")
    return RunInfo(
        name,
        model,
        deployment,
        _str_or_none(adapter.get("method")),
        suite,
        dataset_args(spec),
        tuple(g for g in groups if isinstance(g, str) and g) if isinstance(groups, list) else (),
    )


def dataset_args(spec: dict) -> tuple[tuple[str, str], ...]:
    """The run's data-defining arguments, sorted by name, values as text.

    From ``scenario_spec.args`` (the arguments HELM built the scenario with: what defines its
    data) when the run spec has that object, else from the run name. Model arguments
    (``MODEL_ARGS``) are never part of it; from the run name, the adapter and run-expander
    arguments (``ADAPTER_ARGS``) are dropped too. ``null`` arguments count as absent (HELM omits
    them when it writes without nones).
    """
    scenario = spec.get("scenario_spec")
    args = scenario.get("args") if isinstance(scenario, dict) else None
    if isinstance(args, dict):
        pairs = [(str(k), _arg_text(v)) for k, v in args.items() if v is not None]
        drop = MODEL_ARGS
    else:
        pairs = [(k, v or "") for k, v in _run_args(str(spec.get("name", ""))) if k]
        drop = MODEL_ARGS + ADAPTER_ARGS
    return tuple(sorted((k, v) for k, v in pairs if k not in drop))


def dataset_id(scenario: str, args: tuple[tuple[str, str], ...] = ()) -> str:
    """``helm/<scenario>`` or ``helm/<scenario>/<name>=<value>,...`` (args in the given order).

    Names and values are escaped (``_escape``) so the id is one path segment per part: no ``/``,
    ``,``, ``=`` or ``..`` inside them, only ``[A-Za-z0-9_.+-]`` and ``%XX``.
    """
    head = f"helm/{_escape(scenario, segment=True)}"
    if not args:
        return head
    return f"{head}/" + ",".join(f"{_escape(k)}={_escape(v)}" for k, v in args)


_SAFE = re.compile(r"[A-Za-z0-9_.+-]")


def _escape(text: str, *, segment: bool = False) -> str:
    """Percent-encode (UTF-8) every character outside ``[A-Za-z0-9_.+-]``, and dots that form
    ``..`` (or, for a whole path segment, a segment of dots or nothing)."""
    out = "".join(
        c if _SAFE.fullmatch(c) else "".join(f"%{b:02X}" for b in c.encode("utf-8", "replace"))
        for c in text
    )
    out = re.sub(r"\.{2,}", lambda m: "%2E" * len(m.group()), out)
    if segment and out in ("", "."):
        out = "%2E" if out else "%00"
    return out


def _arg_text(value: object) -> str:
    """An argument value as the run name would show it (``True``, ``3``, ``de-en``)."""
    if isinstance(value, (dict, list)):
        return json.dumps(value, sort_keys=True, separators=(",", ":"))
    return str(value)


def model_from_run_name(run_name: str) -> str | None:
    """The run name's ``model=`` as a HELM name: ``meta_llama-3-8b`` -> ``meta/llama-3-8b``."""
    for key, value in _run_args(run_name):
        if key == "model" and value:
            return value.replace("_", "/", 1)
    return None


def scenario_key(run_name: str) -> str:
    """The run name without its model arguments: the runs of one scenario setup share it."""
    head = run_name.partition(":")[0]
    rest = [
        f"{k}={v}" if v is not None else k for k, v in _run_args(run_name) if k not in _MODEL_ARGS
    ]
    return f"{head}:{','.join(rest)}"


def _run_args(run_name: str) -> list[tuple[str, str | None]]:
    args = run_name.partition(":")[2]
    out: list[tuple[str, str | None]] = []
    for part in args.split(",") if args else []:
        key, eq, value = part.partition("=")
        out.append((key.strip(), value.strip() if eq else None))
    return out


# ---------------------------------------------------------------------------------------------
# Instance texts


def instance_index(
    fs: fsspec.AbstractFileSystem, path: str, run: RunInfo, collector: Collector
) -> InstanceIndex | None:
    """The run's instance texts from its own file or a fallback; ``None`` when there is none."""
    own = f"{path}/{SCENARIO_STATE}"
    if fs.exists(own):
        return read_scenario_state(fs, own, run, collector, positions=True)
    local = f"{path}/{INSTANCES}"
    if fs.exists(local):
        return read_instances_json(fs, local, collector)
    sibling = find_sibling_state(fs, path, run.name)
    if sibling is not None:
        return read_scenario_state(fs, sibling, run, collector)
    return None


def find_sibling_state(fs: fsspec.AbstractFileSystem, run_path: str, run_name: str) -> str | None:
    """``scenario_state.json`` of another run in the same suite folder with the same setup."""
    key, run_path = scenario_key(run_name), run_path.rstrip("/")
    found = []
    for entry in fs.ls(_parent(run_path), detail=True):
        other = entry["name"].rstrip("/")
        if entry.get("type") != "directory" or other == run_path:
            continue
        if scenario_key(_basename(other)) == key and fs.exists(f"{other}/{SCENARIO_STATE}"):
            found.append(other)
    return f"{min(found)}/{SCENARIO_STATE}" if found else None


def read_scenario_state(
    fs: fsspec.AbstractFileSystem, path: str, run: RunInfo, collector: Collector,
    *, positions: bool = False,
) -> InstanceIndex:
    """Stream ``request_states[]``; quarantine records without id/text and repeated requests.
    ``positions``: also keep the answer positions (only for the run's own states)."""
    label = display_path(fs, path)
    index = InstanceIndex(label)
    seen: set[tuple] = set()
    repeats_expected = run.method == "language_modeling"  # one request state per window
    records = JsonRecords(fs, path, "request_states.item", top="{", collector=collector)
    for i, state in records:
        if not isinstance(state, dict) or not isinstance(state.get("instance"), dict):
            collector.quarantine(
                label, i, "instance", "request state has no instance object", state
            )
            continue
        parsed = parse_instance(
            state["instance"], label, i, "instance.", collector, index.rejected
        )
        if parsed is None:
            continue
        key, inst = parsed
        trial = _trial(state.get("train_trial_index"))
        request = (key, trial, state.get("reference_index"), state.get("request_mode"))
        if request in seen and not repeats_expected:
            collector.quarantine(
                label,
                inst.record,
                "instance.id",
                f"duplicate request state (instance {key[0]!r}, perturbation {key[1]!r}, "
                f"trial {trial}); the first is kept",
            )
            continue
        seen.add(request)
        _keep_first(index, key, inst, collector)
        if positions and trial == 0 and key not in index.positions:
            found = answer_positions(state)
            if found is not None:
                index.positions[key] = found
    if records.count == 0 and not records.has_top_key("request_states"):
        raise UnknownLayout(f"{label}: no 'request_states' list")
    return index


def answer_positions(state: dict) -> tuple[int, int] | None:
    """(gold, predicted) 0-based answer position of a multiple-choice request state (module
    docstring), or None without an ``output_mapping`` or a correct reference in it."""
    mapping = state.get("output_mapping")
    if not isinstance(mapping, dict) or not mapping:
        return None
    letters = list(mapping)
    refs = state["instance"].get("references") or []
    correct = [  # a reference's output: {"text": ...}, or the text itself (2022 dumps)
        out.get("text") if isinstance(out := r.get("output"), dict) else out
        for r in refs
        if isinstance(r, dict) and isinstance(r.get("tags"), list) and "correct" in r["tags"]
    ]
    if not correct or correct[0] not in mapping.values():
        return None
    gold = list(mapping.values()).index(correct[0])
    result = state.get("result")
    completions = result.get("completions") if isinstance(result, dict) else None
    first = completions[0] if isinstance(completions, list) and completions else None
    text = first.get("text") if isinstance(first, dict) else None
    text = text.strip() if isinstance(text, str) else None
    return gold, letters.index(text) if text in mapping else -1


def read_instances_json(
    fs: fsspec.AbstractFileSystem, path: str, collector: Collector
) -> InstanceIndex:
    """Stream ``instances.json`` (the list of Instance HELM writes for its web frontend)."""
    label = display_path(fs, path)
    index = InstanceIndex(label)
    for i, raw in JsonRecords(fs, path, "item", top="[", collector=collector):
        if not isinstance(raw, dict):
            collector.quarantine(label, i, None, "instance is not an object", raw)
            continue
        parsed = parse_instance(raw, label, i, "", collector, index.rejected)
        if parsed is None:
            continue
        key, inst = parsed
        if key in index.by_key:
            collector.quarantine(
                label,
                inst.record,
                "id",
                f"duplicate instance (id {key[0]!r}, perturbation {key[1]!r}); the first is kept",
            )
            continue
        index.by_key[key] = inst
    return index


def parse_instance(
    raw: dict,
    label: str,
    i: int,
    prefix: str,
    collector: Collector,
    rejected: set[Key] | None = None,
) -> tuple[Key, InstanceText] | None:
    """Key and text of one serialised Instance, or ``None`` after quarantining it (an instance
    whose text or split is not valid text is also added to ``rejected``)."""
    iid = raw.get("id")
    if not isinstance(iid, str) or not iid:
        collector.quarantine(label, i, f"{prefix}id", "instance id missing", iid)
        return None
    record = f"{i}/{iid}"
    try:
        perturbation = perturbation_label(raw.get("perturbation"))
    except ValueError as exc:
        collector.quarantine(
            label, record, f"{prefix}perturbation", str(exc), raw.get("perturbation")
        )
        return None
    if problem := text_problem(iid):
        collector.quarantine(label, record, f"{prefix}id", problem, iid)
        return None
    text, where, problem = input_text(raw.get("input"))
    if problem:
        collector.quarantine(label, record, f"{prefix}{where}", problem, raw.get("input"))
        return None
    for name, value in ((where, text), ("split", raw.get("split"))):
        if problem := text_problem(value):
            collector.quarantine(label, record, f"{prefix}{name}", problem, value)
            if rejected is not None:
                rejected.add((iid, perturbation))
            return None
    inst = InstanceText(
        text, _str_or_none(raw.get("split")), iid, label, record, f"{prefix}{where}"
    )
    return (iid, perturbation), inst


def input_text(raw: object) -> tuple[object, str, str | None]:
    """``(text, field, problem)`` for a serialised ``Instance.input`` of any HELM version.

    A text that is there but not a usable string is returned as is: ``Collector.add_input``
    quarantines it with the reason.
    """
    if isinstance(raw, str):  # 2022 dumps: the input was a plain string
        return raw, "input", None
    if not isinstance(raw, dict):
        return None, "input", "input missing" if raw is None else "input is not an object"
    text = raw.get("text")
    if isinstance(text, str) and text.strip():
        return text, "input.text", None
    if isinstance(raw.get("multimedia_content"), dict):
        return _media_text(raw["multimedia_content"])
    messages = raw.get("messages")
    if isinstance(messages, list) and messages:
        parts = [m.get("content") if isinstance(m, dict) else None for m in messages]
        if all(isinstance(p, str) for p in parts):
            return "\n\n".join(parts), "input.messages", None
        return None, "input.messages", "input messages without text content"
    if text is None:
        return None, "input.text", "input text missing"
    return text, "input.text", None


def _media_text(media: dict) -> tuple[object, str, str | None]:
    """The text of a text-only MultimediaObject; a problem for anything with other media."""
    where = "input.multimedia_content"
    objects = media.get("media_objects")
    if not isinstance(objects, list) or not objects:
        return None, where, "multimedia input without media objects"
    types = [str(o.get("content_type")) if isinstance(o, dict) else "?" for o in objects]
    if not all(t.startswith("text/") for t in types):
        return None, where, f"multimodal input ({', '.join(sorted(set(types)))}) is not text-only"
    return "".join(str(o.get("text") or "") for o in objects), where, None


def perturbation_label(desc: object) -> str | None:
    """``name(arg=value,...)`` for a serialised PerturbationDescription; ``None`` for none."""
    if desc is None:
        return None
    if isinstance(desc, str):
        return desc or None
    if not isinstance(desc, dict) or not isinstance(desc.get("name"), str) or not desc["name"]:
        raise ValueError(f"perturbation is not a description with a name: {desc!r}"[:200])
    args = {k: v for k, v in desc.items() if k not in _PERTURBATION_META and v is not None}
    if not args:
        return desc["name"]
    return f"{desc['name']}({','.join(f'{k}={_arg(v)}' for k, v in sorted(args.items()))})"


def _arg(value: object) -> str:
    if isinstance(value, (dict, list)):
        return json.dumps(value, sort_keys=True, separators=(",", ":"))
    return str(value)


def _keep_first(index: InstanceIndex, key: Key, inst: InstanceText, collector: Collector) -> None:
    """Add an instance text; a later, different text for the same key is quarantined."""
    first = index.by_key.setdefault(key, inst)
    if first is not inst and first.text != inst.text:
        collector.quarantine(
            inst.file,
            inst.record,
            inst.field,
            f"instance {key[0]!r} has another text in record {first.record}; the first is kept",
            inst.text,
        )


# ---------------------------------------------------------------------------------------------
# Per-instance stats


def read_per_instance_stats(
    fs: fsspec.AbstractFileSystem, path: str, index: InstanceIndex | None, collector: Collector
) -> dict[Key, _Values]:
    """Stream the entries and fold them into values per (instance, perturbation) and trial."""
    label = display_path(fs, path)
    values: dict[Key, _Values] = {}
    for i, entry in JsonRecords(fs, path, "item", top="[", collector=collector):
        _add_entry(i, entry, label, index, values, collector)
    return values


def _add_entry(
    i: int,
    entry: object,
    label: str,
    index: InstanceIndex | None,
    values: dict[Key, _Values],
    collector: Collector,
) -> None:
    """Fold one ``PerInstanceStats`` entry into ``values`` (or quarantine it)."""
    if not isinstance(entry, dict):
        collector.quarantine(label, i, None, "per-instance entry is not an object", entry)
        return
    iid = entry.get("instance_id")
    if not isinstance(iid, str) or not iid:
        collector.quarantine(label, i, "instance_id", "instance_id missing", iid)
        return
    record = f"{i}/{iid}"
    if problem := text_problem(iid):
        collector.quarantine(label, record, "instance_id", problem, iid)
        return
    stats = entry.get("stats")
    if not isinstance(stats, list):
        collector.quarantine(label, record, "stats", "stats missing or not a list", stats)
        return
    try:
        entry_perturbation = perturbation_label(entry.get("perturbation"))
    except ValueError as exc:
        collector.quarantine(label, record, "perturbation", str(exc), entry.get("perturbation"))
        return
    if index is None:
        collector.quarantine(label, record, None, NO_TEXT_SOURCE)
        return
    trial = _trial(entry.get("train_trial_index"))
    missing: set[Key] = set()
    for j, stat in enumerate(stats):
        key = _add_stat(
            stat,
            f"stats[{j}]",
            record,
            label,
            iid,
            entry_perturbation,
            trial,
            index,
            values,
            collector,
        )
        if key is not None and key not in missing:
            missing.add(key)
            collector.quarantine(
                label,
                record,
                "instance_id",
                f"instance {key[0]!r} (perturbation {key[1]!r}) is not in {index.source}",
            )


def _add_stat(
    stat: object,
    where: str,
    record: str,
    label: str,
    iid: str,
    entry_perturbation: str | None,
    trial: int,
    index: InstanceIndex,
    values: dict[Key, _Values],
    collector: Collector,
) -> Key | None:
    """Fold one Stat into ``values``; returns the instance key when the instance is unknown."""
    name = stat.get("name") if isinstance(stat, dict) else None
    metric = name.get("name") if isinstance(name, dict) else None
    if not isinstance(metric, str) or not metric:
        collector.quarantine(label, record, f"{where}.name", "stat has no name", stat)
        return None
    if problem := text_problem(metric):
        collector.quarantine(label, record, f"{where}.name.name", problem, metric)
        return None
    if not is_score(metric) or _is_derived(name) or to_float(stat.get("count")) == 0:
        return None
    try:
        key = (iid, perturbation_label(name.get("perturbation")) or entry_perturbation)
    except ValueError as exc:
        collector.quarantine(label, record, f"{where}.name.perturbation", str(exc))
        return None
    inst = index.by_key.get(key)
    if inst is None:
        return None if key in index.rejected else key
    split = _str_or_none(name.get("split"))
    if split is not None and inst.split is not None and split != inst.split:
        collector.quarantine(
            label,
            record,
            metric,
            f"stat split {split!r} is not the instance's split {inst.split!r}",
        )
        return None
    value = stat_value(stat)
    if value is None or not math.isfinite(value):
        raw = stat.get("mean", stat.get("sum"))
        collector.quarantine(
            label, record, metric, f"metric value {raw!r} is not a finite number", raw
        )
        return None
    trials = values.setdefault(key, _Values(record)).by_metric.setdefault(metric, {})
    if trials.setdefault(trial, value) != value:
        collector.quarantine(
            label,
            record,
            metric,
            f"metric read twice with different values ({trials[trial]!r}, then {value!r}); "
            "the first is kept",
            value,
        )
    return None


def is_score(metric: str) -> bool:
    """Whether a per-instance stat becomes an outcome (everything but ``BOOKKEEPING``, except
    the ``USAGE`` token counts)."""
    return metric in USAGE or BOOKKEEPING.fullmatch(metric) is None


def stat_value(stat: dict) -> float | None:
    """A Stat's per-instance value: ``mean``, else ``sum / count``; ``None`` if neither works."""
    mean = stat.get("mean")
    if mean is not None:
        return to_float(mean)
    total, count = to_float(stat.get("sum")), to_float(stat.get("count"))
    if total is None or not count:
        return None
    return total / count


def _is_derived(name: dict) -> bool:
    pert = name.get("perturbation")
    return isinstance(pert, dict) and pert.get("computed_on") in _DERIVED_COMPUTED_ON


# ---------------------------------------------------------------------------------------------
# Output


def _emit(
    values: dict[Key, _Values],
    index: InstanceIndex | None,
    run: RunInfo,
    stats_label: str,
    collector: Collector,
) -> None:
    """One input per referenced instance, one outcome per metric (the mean over trials).

    Two instances of the run with the same text (after normalisation) are one input: the first
    one's outcomes are kept and the later one is quarantined, as the outcome key allows one
    observation per input, model, metric, run and perturbation.
    """
    if index is None:
        return
    emitted: dict[tuple[str, str | None], InstanceText] = {}
    for key, slot in values.items():
        inst = index.by_key[key]
        iid = collector.add_input(
            inst.text,
            dataset=run.dataset,
            file=inst.file,
            record=inst.record,
            field_=inst.field,
            split=inst.split,
            source_instance_id=inst.instance_id,
        )
        if iid is None:
            continue
        first = emitted.setdefault((iid, key[1]), inst)
        if first is not inst:
            collector.quarantine(
                inst.file,
                inst.record,
                inst.field,
                f"instance {inst.instance_id!r} has the same text as instance "
                f"{first.instance_id!r} (record {first.record}); only the first one's outcomes "
                "are kept",
            )
            continue
        for metric, trials in slot.by_metric.items():
            collector.add_outcome(
                iid,
                dataset=run.dataset,
                model=run.model,
                metric=metric,
                value=sum(trials.values()) / len(trials),
                run_id=run.run_id,
                file=stats_label,
                record=slot.first_record,
                perturbation=key[1],
            )
        for metric, value in zip((GOLD_POSITION, PRED_POSITION), index.positions.get(key, ())):
            collector.add_outcome(
                iid,
                dataset=run.dataset,
                model=run.model,
                metric=metric,
                value=float(value),
                run_id=run.run_id,
                file=inst.file,
                record=inst.record,
                perturbation=key[1],
            )


# ---------------------------------------------------------------------------------------------
# Streaming JSON


class JsonRecords:
    """The records at ``prefix`` of a JSON file, streamed by ``benchroute.io.iter_json`` (memory
    flat in file size; its policy for what is not JSON: a bare ``NaN``/``Infinity`` token is read
    as a string that ``to_float`` reads as the non-finite number, text that is not Unicode as
    ``BAD_TEXT``).

    Iterating yields ``(index, record)``. JSON that breaks after some records ends the iteration
    with a quarantine row naming the record where it broke. A file that is empty, UTF-16/32 or
    broken before its first record raises ``UnreadableSource``; one whose top level is not
    ``top`` (``"["`` or ``"{"``) raises ``UnknownLayout``. A string holding ``BAD_TEXT`` reaches
    the record's checks, which quarantine that record alone.
    """

    def __init__(
        self,
        fs: fsspec.AbstractFileSystem,
        path: str,
        prefix: str,
        *,
        top: str,
        collector: Collector,
    ) -> None:
        self.fs, self.path, self.prefix, self.top = fs, path, prefix, top
        self.label = display_path(fs, path)
        self.collector = collector
        self.count = 0

    def __iter__(self) -> Iterator[tuple[int, object]]:
        try:
            for record in iter_json(self._open, self.prefix):
                self.count += 1
                yield self.count - 1, record
        except JSON_PARSE_ERRORS as exc:
            self._broken(exc)

    @contextlib.contextmanager
    def _open(self) -> Iterator[BinaryIO]:
        """The file, checked and positioned after any byte-order mark."""
        with self.fs.open(self.path, "rb") as raw:
            _check_start(raw, self.label, self.top)
            yield raw

    def _broken(self, exc: Exception) -> None:
        message = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        if self.count == 0:
            raise UnreadableSource(f"{self.label}: invalid JSON before the first record: {message}")
        self.collector.quarantine(
            self.label,
            self.count,
            None,
            f"invalid JSON in record {self.count}: {message}; records 0-{self.count - 1} were "
            "read, the rest of the file was not",
        )

    def has_top_key(self, key: str) -> bool:
        """Whether the top-level object has ``key`` (walks the events up to it)."""
        with self._open() as raw:
            try:
                for prefix, event, value in ijson.parse(TolerantJson(raw)):
                    if prefix == "" and event == "map_key" and value == key:
                        return True
            except JSON_PARSE_ERRORS:
                return False
        return False


_BOMS = (b"\x00\x00\xfe\xff", b"\xff\xfe", b"\xfe\xff")  # UTF-32 BE, UTF-16/32 LE, UTF-16 BE


def _check_start(f, label: str, top: str) -> None:
    """Position ``f`` after any UTF-8 BOM; raise if the file is empty, not UTF-8 or not ``top``.

    "Not UTF-8" means a UTF-16/32 byte-order mark or NUL bytes (UTF-16/32 without a mark). Other
    invalid bytes are not the file's problem but the record's: ``TolerantJson`` marks them and
    the record holding them is quarantined, so one bad byte never costs the whole file.
    """
    head = f.read(4096)
    if not head.strip():
        raise UnreadableSource(f"{label}: empty file")
    bom = 3 if head.startswith(b"\xef\xbb\xbf") else 0
    if head.startswith(_BOMS) or b"\x00" in head:
        raise UnreadableSource(f"{label}: not a UTF-8 file")
    first = head[bom:].lstrip()[:1].decode("latin-1")
    if first != top:
        kind = {"[": "a list", "{": "an object"}[top]
        raise UnknownLayout(f"{label}: top level is not {kind} (starts with {first!r})")
    f.seek(bom)


# ---------------------------------------------------------------------------------------------
# Small helpers


def _trial(value: object) -> int:
    number = to_float(value)
    return int(number) if number is not None and math.isfinite(number) else 0


def _str_or_none(value: object) -> str | None:
    return value if isinstance(value, str) and value else None


def _parent(path: str) -> str:
    return path.rstrip("/").rpartition("/")[0]


def _basename(path: str) -> str:
    return path.rstrip("/").rpartition("/")[2]


