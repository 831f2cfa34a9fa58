"""HELM run folders -> canonical tables.

A *unit* is one HELM run: a folder holding ``run_spec.json`` (HELM writes
``benchmark_output/runs/<suite>/<run name>/``). ``read`` uses three files of it:

- ``run_spec.json`` (small, ``json.load``): run name, ``adapter_spec.model`` (else the run name's
  ``model=`` argument with its first ``_`` made ``/``), ``adapter_spec.model_deployment`` when
  present. The scenario is the run name before ``:``; the dataset is ``helm/<scenario>``.
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
- **Inputs**: the instances that at least one per-instance entry refers to. Two instances of
  one run with the same normalised text are one input: the first one's outcomes are kept, the
  later instance is quarantined.

Bad input never fails the whole read. A bad record becomes a quarantine row naming the file, the
record (``<index>/<instance id>``) and the field. JSON that breaks mid-file keeps what was parsed
and adds a row naming the record where it broke. A file of which nothing can be parsed (empty,
not UTF-8, broken before its first record) raises ``UnreadableSource``; so does an unparseable
``run_spec.json``. A layout this reader does not know (no ``adapter_spec``, stats not a list...)
raises ``UnknownLayout``.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterator
from dataclasses import dataclass, field

import fsspec
import ijson
from fsspec.core import url_to_fs

from .base import Collector, IngestResult, UnknownLayout, UnreadableSource, to_float

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
# Fields of a PerturbationDescription that do not tell two perturbations apart.
_PERTURBATION_META = ("name", "robustness", "fairness", "computed_on")
_DERIVED_COMPUTED_ON = ("worst", "original")
_MODEL_ARGS = ("model", "model_deployment")
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
    """What ``run_spec.json`` says about a run, plus the suite folder it sits in."""

    name: str
    model: str
    deployment: str | None
    method: str | None
    suite: str

    @property
    def scenario(self) -> str:
        return self.name.split(":", 1)[0]

    @property
    def dataset(self) -> str:
        return f"helm/{self.scenario}"

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


@dataclass
class _Values:
    """The metric values of one (instance, perturbation): metric -> trial -> value."""

    first_record: str
    by_metric: dict[str, dict[int, float]] = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------
# The run


def read(url: str, *, names) -> IngestResult:
    """Read one HELM run folder into canonical frames (see the module docstring)."""
    fs, path = url_to_fs(url)
    path = path.rstrip("/")
    run = read_run_spec(fs, f"{path}/{RUN_SPEC}", suite=_basename(_parent(path)))
    collector = Collector(source=KIND, unit=url, names=names)
    stats_path = f"{path}/{PER_INSTANCE_STATS}"
    stats_label = _label(fs, stats_path)
    if not fs.exists(stats_path):
        raise UnreadableSource(f"{stats_label}: file missing; the run has no per-instance results")
    index = instance_index(fs, path, run, collector)
    values = read_per_instance_stats(fs, stats_path, index, collector)
    _emit(values, index, run, stats_label, collector)
    return collector.result(stats_label)


def read_run_spec(fs: fsspec.AbstractFileSystem, path: str, *, suite: str = "") -> RunInfo:
    """Parse ``run_spec.json``: ``UnreadableSource`` if it is not JSON, ``UnknownLayout`` if odd."""
    label = _label(fs, path)
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
    return RunInfo(name, model, deployment, _str_or_none(adapter.get("method")), suite)


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
        return read_scenario_state(fs, own, run, collector)
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
    fs: fsspec.AbstractFileSystem, path: str, run: RunInfo, collector: Collector
) -> InstanceIndex:
    """Stream ``request_states[]``; quarantine records without id/text and repeated requests."""
    label = _label(fs, path)
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
        parsed = parse_instance(state["instance"], label, i, "instance.", collector)
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
    if records.count == 0 and not records.has_top_key("request_states"):
        raise UnknownLayout(f"{label}: no 'request_states' list")
    return index


def read_instances_json(
    fs: fsspec.AbstractFileSystem, path: str, collector: Collector
) -> InstanceIndex:
    """Stream ``instances.json`` (the list of Instance HELM writes for its web frontend)."""
    label = _label(fs, path)
    index = InstanceIndex(label)
    for i, raw in JsonRecords(fs, path, "item", top="[", collector=collector):
        if not isinstance(raw, dict):
            collector.quarantine(label, i, None, "instance is not an object", raw)
            continue
        parsed = parse_instance(raw, label, i, "", collector)
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
    raw: dict, label: str, i: int, prefix: str, collector: Collector
) -> tuple[Key, InstanceText] | None:
    """Key and text of one serialised Instance, or ``None`` after quarantining it."""
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
    text, where, problem = input_text(raw.get("input"))
    if problem:
        collector.quarantine(label, record, f"{prefix}{where}", problem, raw.get("input"))
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
    label = _label(fs, path)
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
    if not is_score(metric) or _is_derived(name) or to_float(stat.get("count")) == 0:
        return None
    try:
        key = (iid, perturbation_label(name.get("perturbation")) or entry_perturbation)
    except ValueError as exc:
        collector.quarantine(label, record, f"{where}.name.perturbation", str(exc))
        return None
    inst = index.by_key.get(key)
    if inst is None:
        return key
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


# ---------------------------------------------------------------------------------------------
# Streaming JSON


class JsonRecords:
    """The records at ``prefix`` of a JSON file, streamed with ijson (memory flat in file size).

    Iterating yields ``(index, record)``. JSON that breaks after some records ends the iteration
    with a quarantine row naming the record where it broke. A file that is empty, not UTF-8 or
    broken before its first record raises ``UnreadableSource``; one whose top level is not
    ``top`` (``"["`` or ``"{"``) raises ``UnknownLayout``. Bare ``NaN``/``Infinity`` tokens are
    handled by re-reading the file through ``NanTolerantReader`` (about 4x slower) when the fast
    parser trips on an invalid character; records already yielded are not yielded again.
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
        self.label = _label(fs, path)
        self.collector = collector
        self.count = 0

    def __iter__(self) -> Iterator[tuple[int, object]]:
        try:
            yield from self._records(tolerant=False)
        except ijson.JSONError as fast_error:
            if not _maybe_bare_nan(fast_error):
                self._broken(fast_error)
                return
            try:
                yield from self._records(tolerant=True)
            except ijson.JSONError as exc:
                self._broken(exc)

    def _records(self, *, tolerant: bool) -> Iterator[tuple[int, object]]:
        """Parse from the start; records already yielded (``self.count``) are skipped."""
        skip = self.count
        with self.fs.open(self.path, "rb") as raw:
            _check_start(raw, self.label, self.top)
            source = NanTolerantReader(raw) if tolerant else raw
            for i, record in enumerate(ijson.items(source, self.prefix, use_float=True)):
                if i >= skip:
                    self.count = i + 1
                    yield i, record

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
        with self.fs.open(self.path, "rb") as raw:
            _check_start(raw, self.label, self.top)
            try:
                for prefix, event, value in ijson.parse(NanTolerantReader(raw)):
                    if prefix == "" and event == "map_key" and value == key:
                        return True
            except ijson.JSONError:
                return False
        return False


def _maybe_bare_nan(exc: Exception) -> bool:
    """Whether a parse error may come from a bare NaN/Infinity token (yajl: "invalid char")."""
    message = str(exc)
    return "invalid char" in message or "NaN" in message or "Infinity" in message


def _check_start(f, label: str, top: str) -> None:
    """Position ``f`` after any UTF-8 BOM; raise if the file is empty, not UTF-8 or not ``top``."""
    head = f.read(4096)
    if not head.strip():
        raise UnreadableSource(f"{label}: empty file")
    bom = 3 if head.startswith(b"\xef\xbb\xbf") else 0
    if head.startswith((b"\xff\xfe", b"\xfe\xff")) or not _utf8_prefix(head[bom:]):
        raise UnreadableSource(f"{label}: not a UTF-8 file")
    first = head[bom:].lstrip()[:1].decode()
    if first != top:
        kind = {"[": "a list", "{": "an object"}[top]
        raise UnknownLayout(f"{label}: top level is not {kind} (starts with {first!r})")
    f.seek(bom)


def _utf8_prefix(data: bytes) -> bool:
    """Whether ``data`` is UTF-8, allowing one character cut off at its end."""
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as exc:
        return exc.start >= len(data) - 3 and exc.reason == "unexpected end of data"
    return True


class NanTolerantReader:
    """A binary file wrapper that quotes bare ``NaN``, ``Infinity`` and ``-Infinity`` tokens.

    Python's ``json.dumps`` (which HELM uses) writes non-finite floats as these tokens, which are
    not JSON. Outside strings they become ``"NaN"``..., so the value reaches ``to_float`` and is
    quarantined as non-finite instead of breaking the parse. Slower than the raw file: used only
    after the fast parser failed.
    """

    _OUTSIDE = re.compile(rb'"|-?Infinity|NaN')
    _STRING_BODY = re.compile(rb'(?:[^"\\]|\\.)*', re.S)
    _HOLD = 9  # the longest token: a token cut by a chunk boundary waits for the next chunk

    def __init__(self, raw, chunk: int = 1 << 16) -> None:
        self._raw, self._chunk = raw, chunk
        self._buf = b""
        self._in_string = False
        self._eof = False

    def read(self, n: int = -1) -> bytes:
        if n == 0:
            return b""
        out = b""
        while not out and not (self._eof and not self._buf):
            data = b"" if self._eof else self._raw.read(self._chunk)
            self._eof = self._eof or not data
            out = self._convert(self._buf + data)
        return out

    def _convert(self, buf: bytes) -> bytes:
        """Convert what can be converted; keep an unfinished tail in ``self._buf``."""
        out = bytearray()
        pos = 0
        while pos < len(buf):
            if self._in_string:
                end = self._STRING_BODY.match(buf, pos).end()
                if buf[end : end + 1] == b'"':
                    out += buf[pos : end + 1]
                    pos, self._in_string = end + 1, False
                    continue
                end = len(buf) if self._eof else end  # else: a lone backslash waits
                out += buf[pos:end]
                pos = end
                break
            m = self._OUTSIDE.search(buf, pos)
            if m is None:
                end = len(buf) if self._eof else max(pos, len(buf) - self._HOLD)
                out += buf[pos:end]
                pos = end
                break
            out += buf[pos : m.start()]
            token = m.group()
            out += token if token == b'"' else b'"' + token + b'"'
            self._in_string = token == b'"'
            pos = m.end()
        self._buf = buf[pos:]
        return bytes(out)


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


def _label(fs: fsspec.AbstractFileSystem, path: str) -> str:
    """How a file is named in errors and quarantine rows: its path, with protocol if not local."""
    protocol = fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)
    return path if "file" in protocol or "local" in protocol else fs.unstrip_protocol(path)
