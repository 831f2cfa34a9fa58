"""The reader contract: what every source reader returns, and the helper readers use to build it.

(The registry of readers and ``discover`` are the package's ``__init__``; helpers for reading the
files themselves, CSV, Parquet and JSON records, are ``source_files``.)

A reader maps one *unit* of a source (a HELM run folder, one CSV, one Parquet table…) to the
canonical tables and nothing else. Bad records never raise: they become quarantine rows naming
the file, the record and the field, and the rest of the unit is still read. A unit that cannot be
parsed at all raises ``UnreadableSource`` with the file's name; the caller reports it and goes on.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import polars as pl

# BAD_TEXT (U+FDD0) stands for bytes that were not valid UTF-8 (or a lone surrogate escape) in a
# JSON file (``benchroute.io``'s JSON policy). A noncharacter: never meant for interchange, so it
# does not occur in benchmark texts.
from benchroute.io import BAD_TEXT
from benchroute.schemas import OUTCOME_KEY, empty, validate
from benchroute.transforms.ids import ModelNames, input_id, normalize_text

TABLE_NAMES = ("inputs", "memberships", "outcomes", "models", "quarantine")



def text_problem(value: object) -> str | None:
    """Why a string cannot be stored as text (None when it can, or when it is not a string).

    Polars and the input-id hash need valid Unicode: a lone surrogate (``"\\udcff"`` in JSON,
    or bytes decoded with ``surrogateescape``) cannot be encoded, and ``BAD_TEXT`` marks bytes
    that were not UTF-8 in the file.
    """
    if not isinstance(value, str):
        return None
    if BAD_TEXT in value:
        return "not valid UTF-8 (undecodable bytes or a lone surrogate escape in this text)"
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return "not valid Unicode text (holds a lone surrogate)"
    return None


def printable(value: object, limit: int = 200) -> str:
    """A value as text that can always be stored (quarantine ``value``/``record`` columns)."""
    text = value if isinstance(value, str) else repr(value)
    text = text.replace(BAD_TEXT, "\ufffd").encode("utf-8", "backslashreplace").decode("utf-8")
    return text if len(text) <= limit else text[:limit] + "…"


class UnreadableSource(Exception):
    """A whole file or folder could not be parsed (message names it)."""


class UnknownLayout(UnreadableSource):
    """A source whose layout this version of benchroute does not know."""


@dataclass(frozen=True)
class IngestResult:
    """Canonical frames for one unit of one source, already validated."""

    source: str
    unit: str
    inputs: pl.DataFrame
    memberships: pl.DataFrame
    outcomes: pl.DataFrame
    models: pl.DataFrame
    quarantine: pl.DataFrame

    def tables(self) -> dict[str, pl.DataFrame]:
        return {name: getattr(self, name) for name in TABLE_NAMES}

    def counts(self) -> dict[str, int]:
        return {name: getattr(self, name).height for name in TABLE_NAMES}


def from_frames(
    *,
    source: str,
    unit: str,
    file: str,
    names: ModelNames,
    inputs: pl.DataFrame,
    memberships: pl.DataFrame,
    outcomes: pl.DataFrame,
    quarantine: pl.DataFrame | None = None,
) -> IngestResult:
    """Validate frames built by a vectorised reader and assemble an ``IngestResult``.

    ``outcomes`` carries ``source_model`` (the raw name); ``model`` is filled here through the
    alias table. ``source`` columns are filled when absent. Rows that fail a schema rule move to
    quarantine; outcomes whose input was quarantined follow it.
    """
    q_parts = [quarantine if quarantine is not None else empty("quarantine")]
    if "source" not in memberships.columns:
        memberships = memberships.with_columns(pl.lit(source).alias("source"))
    if "source" not in outcomes.columns:
        outcomes = outcomes.with_columns(pl.lit(source).alias("source"))
    if "perturbation" not in outcomes.columns:
        outcomes = outcomes.with_columns(pl.lit(None, pl.String).alias("perturbation"))
    outcomes = outcomes.with_columns(model=names.canonical_series(outcomes["source_model"]))

    inputs = inputs.unique("input_id", keep="first", maintain_order=True)
    memberships = memberships.unique(
        ["input_id", "dataset", "source"], keep="first", maintain_order=True
    )
    outcomes, dups = _split_repeats(outcomes, file=file, source=source)
    q_parts.append(dups)
    valid: dict[str, pl.DataFrame] = {}
    refused_members = 0
    for name, df in (("inputs", inputs), ("memberships", memberships), ("outcomes", outcomes)):
        valid[name], bad = validate(name, df, source=source, file=file)
        q_parts.append(bad)
        if name == "memberships":
            refused_members = bad.height
    known = valid["inputs"].select("input_id")
    valid["memberships"] = valid["memberships"].join(known, on="input_id", how="semi")
    valid["outcomes"] = valid["outcomes"].join(known, on="input_id", how="semi")
    if refused_members:
        # An input whose membership was quarantined (e.g. a refused dataset name) is not kept
        # in that dataset: its outcomes there go too, and the input if it is in no dataset left.
        members = valid["memberships"].select("input_id", "dataset")
        valid["inputs"] = valid["inputs"].join(members, on="input_id", how="semi")
        valid["outcomes"] = valid["outcomes"].join(
            members, on=["input_id", "dataset"], how="semi"
        )
    models = _models_frame(valid["outcomes"], names, source)
    return IngestResult(
        source=source,
        unit=unit,
        inputs=valid["inputs"],
        memberships=valid["memberships"],
        outcomes=valid["outcomes"],
        models=models,
        quarantine=pl.concat(q_parts, how="vertical_relaxed"),
    )


def _split_repeats(
    outcomes: pl.DataFrame, *, file: str, source: str
) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Keep the first of several outcomes with one key; the repeats go to quarantine."""
    first = pl.struct(OUTCOME_KEY).is_first_distinct()
    repeats = outcomes.filter(~first)
    if repeats.height == 0:
        return outcomes, empty("quarantine")
    bad = repeats.select(
        pl.lit(source).alias("source"),
        pl.lit(file).alias("file"),
        pl.concat_str(["run_id", "input_id", "model", "metric"], separator="/").alias("record"),
        pl.lit("input_id").alias("field"),
        pl.lit(
            "duplicate observation: same input, dataset, model, metric, run and perturbation as "
            "an earlier record (the first is kept)"
        ).alias("reason"),
        pl.col("value").cast(pl.String).alias("value"),
    )
    return outcomes.filter(first), bad


def _models_frame(outcomes: pl.DataFrame, names: ModelNames, source: str) -> pl.DataFrame:
    models = outcomes["model"].unique(maintain_order=True).to_list()
    df = pl.DataFrame(
        {
            "model": models,
            "display_name": [names.display.get(m, m) for m in models],
            "params_b": [names.params_b.get(m) for m in models],
            "cost_per_1k_tokens": [None] * len(models),
            "source": [source] * len(models),
        },
        schema={
            "model": pl.String,
            "display_name": pl.String,
            "params_b": pl.Float64,
            "cost_per_1k_tokens": pl.Float64,
            "source": pl.String,
        },
    )
    return validate("models", df, source=source)[0]


@dataclass
class Collector:
    """Row-by-row builder for streaming readers (HELM, MixInstruct, JSONL).

    ``add_input`` returns the input id (or ``None`` after quarantining a bad text);
    ``add_outcome`` takes a raw model name and any value, and quarantines non-numeric, NaN or
    infinite values with the field that held them. A text or name that is not valid Unicode
    (bytes that were not UTF-8, a lone surrogate: ``text_problem``) is quarantined with
    its field instead of failing the unit; quarantine rows show such values escaped.
    """

    source: str
    unit: str
    names: ModelNames
    _inputs: dict[str, str] = field(default_factory=dict)
    _members: list[tuple] = field(default_factory=list)
    _outcomes: list[tuple] = field(default_factory=list)
    _quarantine: list[tuple] = field(default_factory=list)

    def quarantine(
        self, file: str, record: object, field_: str | None, reason: str, value: object = None
    ) -> None:
        self._quarantine.append(
            (
                self.source,
                printable(file, 10_000),
                None if record is None else printable(record, 10_000),
                None if field_ is None else printable(field_, 10_000),
                reason,
                None if value is None else printable(value),
            )
        )

    def repeated(
        self, seen: dict, key: object, file: str, record: str, field_: str, reason: str, value: object
    ) -> bool:
        """True where ``key`` came before (in ``seen``, which maps it to its first record): the
        record is quarantined as a repeat of that one. Otherwise ``seen`` remembers the record."""
        if key in seen:
            self.quarantine(file, f"{record} (repeats {seen[key]})", field_, reason, value)
            return True
        seen[key] = record
        return False

    def add_input(
        self,
        text: object,
        *,
        dataset: str,
        file: str,
        record: object,
        field_: str = "text",
        split: str | None = None,
        source_instance_id: str | None = None,
    ) -> str | None:
        if not isinstance(text, str):
            self.quarantine(file, record, field_, f"input text is {type(text).__name__}, not str", text)
            return None
        if problem := text_problem(text):
            self.quarantine(file, record, field_, problem, text)
            return None
        if not normalize_text(text):
            self.quarantine(file, record, field_, "input text is empty", text)
            return None
        for name, value in (
            ("dataset", dataset), ("split", split), ("source_instance_id", source_instance_id)
        ):
            if problem := text_problem(value):
                self.quarantine(file, record, name, problem, value)
                return None
        iid = input_id(text)
        self._inputs.setdefault(iid, text)
        self._members.append((iid, dataset, self.source, split, source_instance_id))
        return iid

    def add_outcome(
        self,
        iid: str,
        *,
        dataset: str,
        model: str,
        metric: str,
        value: object,
        run_id: str,
        file: str,
        record: object,
        perturbation: str | None = None,
    ) -> bool:
        for name, text in (
            ("model", model), ("metric", metric), ("dataset", dataset), ("run_id", run_id),
            ("perturbation", perturbation),
        ):
            if problem := text_problem(text):
                self.quarantine(file, record, name, problem, text)
                return False
        number = to_float(value)
        if number is None or not math.isfinite(number):
            self.quarantine(
                file, record, metric, f"metric value {value!r} is not a finite number", value
            )
            return False
        self._outcomes.append(
            (iid, dataset, metric, number, run_id, self.source, perturbation, model)
        )
        return True

    def result(self, file: str) -> IngestResult:
        inputs = pl.DataFrame(
            {"input_id": list(self._inputs), "text": list(self._inputs.values())},
            schema={"input_id": pl.String, "text": pl.String},
        )
        members = pl.DataFrame(
            self._members,
            schema=["input_id", "dataset", "source", "split", "source_instance_id"],
            orient="row",
            schema_overrides={c: pl.String for c in ("split", "source_instance_id")},
        )
        outcomes = pl.DataFrame(
            self._outcomes,
            schema={
                "input_id": pl.String,
                "dataset": pl.String,
                "metric": pl.String,
                "value": pl.Float64,
                "run_id": pl.String,
                "source": pl.String,
                "perturbation": pl.String,
                "source_model": pl.String,
            },
            orient="row",
        )
        quarantine = pl.DataFrame(
            self._quarantine,
            schema=empty("quarantine").schema,
            orient="row",
        )
        return from_frames(
            source=self.source,
            unit=self.unit,
            file=file,
            names=self.names,
            inputs=inputs,
            memberships=members,
            outcomes=outcomes,
            quarantine=quarantine,
        )


def to_float(value: object) -> float | None:
    """A metric value as float: numbers, bools and numeric strings (HELM judges write "1.0")."""
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, float):
        return value
    if isinstance(value, int):
        try:
            return float(value)
        except OverflowError:  # an integer beyond the float range: not a finite number
            return math.inf if value > 0 else -math.inf
    if isinstance(value, str):
        text = value.strip()
        if text.lower() in ("true", "false"):
            return 1.0 if text.lower() == "true" else 0.0
        try:
            return float(text)
        except (ValueError, UnicodeError):
            return None
    try:  # decimal.Decimal from ijson
        return float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError, OverflowError):
        return None


def _short(value: object, limit: int = 200) -> str:
    return printable(value, limit)
