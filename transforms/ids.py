"""Input identity, model-name mapping and selecting datasets or models by name.

An input's id is a hash of its normalised text, so the same question from two sources (or two
datasets of one source) is one input. Model names go through one alias table, so HELM's
``meta/llama-3-70b`` and MMLU-Pro's ``Meta-Llama-3-70B`` are one model when the table says so.
"""

from __future__ import annotations

import csv
import hashlib
import io
import re
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass, field
from importlib import resources

import fsspec
import polars as pl


def normalize_text(text: str) -> str:
    """Unicode NFC, whitespace runs collapsed to one space, ends stripped."""
    return " ".join(unicodedata.normalize("NFC", text).split())


def input_id(text: str) -> str:
    """32 hex digits of sha256 over the normalised text (128 bits: no collision in practice)."""
    return hashlib.sha256(normalize_text(text).encode("utf-8")).hexdigest()[:32]


def input_ids(texts: pl.Series) -> pl.Series:
    """``input_id`` over a column of texts (nulls stay null)."""
    return pl.Series(
        texts.name, [None if t is None else input_id(t) for t in texts.to_list()], pl.String
    )


@dataclass(frozen=True)
class ModelNames:
    """Maps raw model names of every source to one canonical name.

    The table has columns ``alias, model`` (and optional ``display_name, params_b``); lookups are
    exact first, then case-insensitive. A name not in the table is its own canonical name.
    """

    aliases: dict[str, str] = field(default_factory=dict)
    params_b: dict[str, float] = field(default_factory=dict)
    display: dict[str, str] = field(default_factory=dict)

    def canonical(self, raw: str) -> str:
        name = raw.strip()
        return self.aliases.get(name) or self.aliases.get(name.lower()) or name

    def canonical_series(self, raw: pl.Series) -> pl.Series:
        uniq = raw.unique().drop_nulls().to_list()
        mapping = {r: self.canonical(r) for r in uniq}
        return raw.replace_strict(mapping, default=None, return_dtype=pl.String)

    @classmethod
    def default(cls) -> ModelNames:
        """The alias table shipped with benchroute (``transforms/model_aliases.csv``)."""
        text = resources.files("benchroute.transforms").joinpath("model_aliases.csv").read_text()
        return cls.from_csv_text(text)

    @classmethod
    def load(cls, url: str | None = None) -> ModelNames:
        """The shipped table, extended (and overridden) by a user's CSV at ``url``."""
        base = cls.default()
        if not url:
            return base
        with fsspec.open(url, "rt", encoding="utf-8") as f:
            extra = cls.from_csv_text(f.read())
        return ModelNames(
            {**base.aliases, **extra.aliases},
            {**base.params_b, **extra.params_b},
            {**base.display, **extra.display},
        )

    @classmethod
    def from_csv_text(cls, text: str) -> ModelNames:
        aliases: dict[str, str] = {}
        params: dict[str, float] = {}
        display: dict[str, str] = {}
        for row in csv.DictReader(io.StringIO(text)):
            alias, model = (row.get("alias") or "").strip(), (row.get("model") or "").strip()
            if not model:
                continue
            if alias:
                aliases[alias] = model
                aliases.setdefault(alias.lower(), model)
            aliases.setdefault(model, model)
            if (p := (row.get("params_b") or "").strip()):
                params[model] = float(p)
            if (d := (row.get("display_name") or "").strip()):
                display[model] = d
        return cls(aliases, params, display)


# ---------------------------------------------------------------------------- name patterns
def glob_expr(column: str, patterns: Sequence[str]) -> pl.Expr:
    """True where ``column`` equals one of ``patterns`` or matches it as a glob (``*``, ``?``)."""
    exact = [p for p in patterns if not any(c in p for c in "*?")]
    expr = pl.col(column).is_in(exact)
    for p in patterns:
        if p not in exact:
            rx = "^" + re.escape(p).replace(r"\*", ".*").replace(r"\?", ".") + "$"
            expr = expr | pl.col(column).str.contains(rx)
    return expr
