"""MixInstruct (LLM-Blender) candidate generations with their automatic scores.

Published format (LLM-Blender's MixInstruct, ``llm-blender/mix-instruct``; the files are read
from the path the caller gives ``find_units``/``read``, none is built in): a JSON
array (``train_data_prepared.json``, 1.7 GB, streamed record by record with ijson, so memory
stays flat while reading) or JSON Lines, of records::

    {"id": "unified_chip2/69962", "instruction": "...", "input": "...", "output": "...",
     "candidates": [{"decoding_method": "top_p_sampling", "model": "koala-7B-HF", "text": "...",
                     "scores": {"logprobs": -0.2, "bleu": 12.1, "bertscore": 0.71,
                                "rouge1": 0.3, "rouge2": 0.1, "rougeL": 0.2,
                                "rougeLsum": 0.2, ...}}, ...],
     "cmp_results": {...}}

Mapping: input = ``instruction`` + ("\\n" + ``input`` when it is not blank); dataset =
``mixinstruct/<id prefix before '/'>`` (``mixinstruct`` for an id without one); split from the file
name (``train…``, ``val…``/``dev…``, ``test…``); every key of a candidate's ``scores`` is a metric
of that name (``bertscore``, ``bleu``, ``logprobs``, ``bartscore``, ``bleurt`` when present…);
model = the candidate's ``model``; ``run_id`` = ``mixinstruct:<file name>[:<decoding_method>]``.
``output`` (the reference) and candidate texts are not stored; ``cmp_results`` (ChatGPT pairwise
comparisons of the test split) are not read.

Quarantined, with the record number and id: a record that is not an object, lacks an id,
instruction or candidate list, repeats an earlier id, or repeats an earlier record's text in the
same dataset (the first is kept); a candidate without a model or scores, or repeating a model
and decoding method; a score that is missing, non-numeric, NaN or infinite. Bytes that are not
valid UTF-8 (or a lone surrogate escape) in the id, instruction or input quarantine that record,
in a model or metric name that candidate or score; every other record is read. A JSON array
that breaks off (truncated, invalid JSON) keeps every record before the break.

``find_units`` picks ``*.json``/``*.jsonl`` files whose first record has a ``candidates`` list,
reading only that first record.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import polars as pl

from benchroute.schemas import empty
from benchroute.transforms.ids import ModelNames, input_id, normalize_text

from .source_files import (
    ParseFailure,
    base_name,
    first_json_record,
    iter_json_records,
    list_files,
    open_url,
)
from .base import IngestResult, from_frames, printable, text_problem, to_float

KIND = "mixinstruct"

_SPLITS = (
    ("train", "train"),
    ("validation", "val"),
    ("val", "val"),
    ("dev", "val"),
    ("test", "test"),
)
_FLUSH_ROWS = 200_000


def find_units(fs, root: str) -> list[str]:
    """JSON / JSON Lines files whose first record has a ``candidates`` list."""
    return [
        p
        for p in list_files(fs, root)
        if p.endswith((".json", ".jsonl")) and _has_candidates(first_json_record(fs, p))
    ]


def _has_candidates(record) -> bool:
    """A MixInstruct record: an object with a ``candidates`` list."""
    return isinstance(record, dict) and isinstance(record.get("candidates"), list)


def split_of(file_name: str) -> str | None:
    """``train`` / ``val`` / ``test`` from a file name such as ``train_data_prepared.json``."""
    lower = file_name.lower()
    return next((split for prefix, split in _SPLITS if lower.startswith(prefix)), None)


def dataset_of(record_id: str) -> str:
    """``mixinstruct/<prefix>`` from an id such as ``sharegpt/1234``."""
    prefix = record_id.split("/", 1)[0] if "/" in record_id else ""
    return f"{KIND}/{prefix}" if prefix else KIND


def input_text(instruction: str, extra: str) -> str:
    """The instruction, plus a newline and the input when the input is not blank."""
    return f"{instruction}\n{extra}" if extra.strip() else instruction


def read(url: str, *, names: ModelNames) -> IngestResult:
    """One MixInstruct JSON / JSON Lines file -> canonical tables, streamed."""
    fs, path = open_url(url)
    acc = _Accumulator(
        file=url, run_prefix=f"{KIND}:{base_name(path)}", split=split_of(base_name(path))
    )
    for record, item in iter_json_records(fs, path, url):
        if isinstance(item, ParseFailure):
            acc.quarantine(record, None, item.reason, item.detail)
        else:
            acc.add_record(record, item)
    inputs, memberships, outcomes, quarantine = acc.frames()
    return from_frames(
        source=KIND,
        unit=url,
        file=url,
        names=names,
        inputs=inputs,
        memberships=memberships,
        outcomes=outcomes,
        quarantine=quarantine,
    )


@dataclass
class _Accumulator:
    """Columnar builder: outcome rows are flushed to polars frames every ``_FLUSH_ROWS``."""

    file: str
    run_prefix: str
    split: str | None
    _ids: dict[str, str] = field(default_factory=dict)
    _texts: dict[tuple[str, str], str] = field(default_factory=dict)
    _inputs: dict[str, str] = field(default_factory=dict)
    _members: list[tuple] = field(default_factory=list)
    _cols: dict[str, list] = field(default_factory=lambda: _empty_columns())
    _parts: list[pl.DataFrame] = field(default_factory=list)
    _quarantine: list[tuple] = field(default_factory=list)

    def quarantine(self, record: str, field_: str | None, reason: str, value=None) -> None:
        """Record one quarantine row for this file."""
        shown = None if value is None else printable(value)
        self._quarantine.append(
            (
                KIND,
                printable(self.file, 10_000),
                printable(record, 10_000),
                None if field_ is None else printable(field_, 10_000),
                reason,
                shown,
            )
        )

    def add_record(self, record: str, item) -> None:
        """Validate one record and add its input, membership and candidate scores."""
        if not isinstance(item, dict):
            self.quarantine(record, None, f"record is {type(item).__name__}, not an object")
            return
        rid = item.get("id")
        if rid is None or (isinstance(rid, str) and not rid.strip()):
            self.quarantine(record, "id", "missing id")
            return
        rid = str(rid)
        if problem := text_problem(rid):
            self.quarantine(record, "id", problem, rid)
            return
        where = f"{record} (id {rid})"
        if rid in self._ids:
            self.quarantine(
                f"{where} (repeats {self._ids[rid]})", "id", "duplicate id; the first is kept", rid
            )
            return
        text = self._text(item, where)
        candidates = item.get("candidates")
        if text is None:
            return
        if not isinstance(candidates, list) or not candidates:
            self.quarantine(where, "candidates", "no candidates list", candidates)
            return
        self._ids[rid] = where
        dataset = dataset_of(rid)
        iid = input_id(text)
        if (iid, dataset) in self._texts:
            self.quarantine(
                f"{where} (repeats {self._texts[iid, dataset]})",
                "instruction",
                "same text as an earlier record of the dataset; the first is kept",
            )
            return
        self._texts[iid, dataset] = where
        self._inputs.setdefault(iid, text)
        self._members.append((iid, dataset, KIND, self.split, rid))
        seen: set[tuple[str, str]] = set()
        for j, cand in enumerate(candidates):
            self._add_candidate(record, rid, j, cand, iid, dataset, seen)
        if len(self._cols["value"]) >= _FLUSH_ROWS:
            self._flush()

    def _text(self, item: dict, where: str) -> str | None:
        """The input text of a record, or None (quarantined) when it has none."""
        instruction, extra = item.get("instruction"), item.get("input")
        if not isinstance(instruction, str):
            self.quarantine(where, "instruction", "missing instruction", instruction)
            return None
        if extra is None:
            extra = ""
        if not isinstance(extra, str):
            self.quarantine(where, "input", f"input is {type(extra).__name__}, not text", extra)
            return None
        for name, value in (("instruction", instruction), ("input", extra)):
            if problem := text_problem(value):
                self.quarantine(where, name, problem, value)
                return None
        text = input_text(instruction, extra)
        if not normalize_text(text):
            self.quarantine(where, "instruction", "input text is empty")
            return None
        return text

    def _add_candidate(
        self, record: str, rid: str, j: int, cand, iid: str, dataset: str, seen: set
    ) -> None:
        """Add one candidate's scores (each bad score, or a bad candidate, is quarantined)."""
        prefix, where = f"candidates[{j}]", f"{record} (id {rid})"
        if not isinstance(cand, dict):
            self.quarantine(where, prefix, f"candidate is {type(cand).__name__}, not an object")
            return
        model, scores = cand.get("model"), cand.get("scores")
        decoding = cand.get("decoding_method")
        if not isinstance(model, str) or not model.strip():
            self.quarantine(where, f"{prefix}.model", "missing model", model)
            return
        if not isinstance(scores, dict) or not scores:
            self.quarantine(
                f"{record} (id {rid}, model {model})",
                f"{prefix}.scores",
                "candidate has no scores",
                scores,
            )
            return
        at = f"{record} (id {rid}, model {model})"
        for name, value in (("model", model), ("decoding_method", decoding)):
            if problem := text_problem(value):
                self.quarantine(at, f"{prefix}.{name}", problem, value)
                return
        run_id = (
            f"{self.run_prefix}:{decoding}"
            if isinstance(decoding, str) and decoding
            else self.run_prefix
        )
        if (model, run_id) in seen:
            self.quarantine(
                at,
                f"{prefix}.model",
                "duplicate candidate (same model and decoding method); the first is kept",
                decoding,
            )
            return
        seen.add((model, run_id))
        for metric, raw in scores.items():
            if problem := text_problem(metric):
                self.quarantine(at, f"{prefix}.scores.{metric}", f"metric name is {problem}", raw)
                continue
            value = to_float(raw)
            if value is None or not math.isfinite(value):
                self.quarantine(
                    at, f"{prefix}.scores.{metric}", "score is not a finite number", raw
                )
                continue
            cols = self._cols
            cols["input_id"].append(iid)
            cols["dataset"].append(dataset)
            cols["metric"].append(metric)
            cols["value"].append(value)
            cols["run_id"].append(run_id)
            cols["source_model"].append(model)

    def _flush(self) -> None:
        if self._cols["value"]:
            self._parts.append(pl.DataFrame(self._cols, schema=_OUTCOME_SCHEMA))
            self._cols = _empty_columns()

    def frames(self) -> tuple[pl.DataFrame, pl.DataFrame, pl.DataFrame, pl.DataFrame]:
        """``inputs, memberships, outcomes, quarantine`` of everything added."""
        self._flush()
        inputs = pl.DataFrame(
            {"input_id": list(self._inputs), "text": list(self._inputs.values())},
            schema={"input_id": pl.String, "text": pl.String},
        )
        members = pl.DataFrame(
            self._members,
            schema={
                c: pl.String
                for c in ("input_id", "dataset", "source", "split", "source_instance_id")
            },
            orient="row",
        )
        outcomes = pl.concat(self._parts) if self._parts else pl.DataFrame(schema=_OUTCOME_SCHEMA)
        quarantine = pl.DataFrame(self._quarantine, schema=empty("quarantine").schema, orient="row")
        return inputs, members, outcomes, quarantine


_OUTCOME_SCHEMA = {
    "input_id": pl.String,
    "dataset": pl.String,
    "metric": pl.String,
    "value": pl.Float64,
    "run_id": pl.String,
    "source_model": pl.String,
}


def _empty_columns() -> dict[str, list]:
    return {name: [] for name in _OUTCOME_SCHEMA}
