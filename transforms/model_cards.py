"""Model cards: what is known of each model beyond the benchmarks, and its price.

A card is one row per canonical model name (table ``model_cards``, ``schemas.tables.ModelCards``):
display name, total and active parameters (billions), architecture (``dense``/``moe``), whether
the weights are open, context window, and USD per 1M input and output tokens with the rule that
set the price, its source and date. ``build_cards`` prices models by these rules, in order:

- ``api_list_price``: the model is in ``api_prices.csv`` (its list price, source and date);
- ``open_weights_tier:<architecture>:<lo>-<hi>B``: open weights of known size, priced by the size
  tier of ``open_weights_tiers.csv`` that holds it (dense models by their size, mixtures of
  experts by their total size; the same price for input and output tokens);
- ``unknown: <why>``: neither; the prices stay null. No price is ever guessed.

A user's card (``read_card``: CSV, or YAML as a list of mappings or ``{models: [...]}``) adds or
corrects rows; ``merge_cards`` lays user cards over the built ones, field by field (the price
fields as one group: a user row that gives a price rule replaces the whole price). A user price
without ``price_source`` gets the rule ``card``.

``cards_for(store, models)`` gives one card dict per model from a store's ``model_cards`` table
(the defaults over its models where it has none); ``artifacts.model_cards.sync_cards`` writes
that table.

The shipped defaults, ``model_cards.csv`` beside this module, are built from the price lists in
``../shared/data/prices`` and the facts in ``model_facts.csv``. Rebuild them after changing
either with::

    benchroute cards build --prices ../shared/data/prices --out transforms/model_cards.csv

``model_facts.csv`` was compiled by hand for every canonical model name of ../shared/data as
ingested (MMLU-Pro, AlpacaEval, HELM, RouteLLM: 142 models), of sample/ (MixInstruct adds 5) and
of model_aliases.csv (the 4 MMLU-Pro models held back from the data), from the models' public
model cards, papers and provider pages: open weights true/false, architecture, total and active
parameters, context window. A cell is filled only where the fact is public and certain, and left
empty otherwise (e.g. whether a research fine-tune's weights were released); sizes follow the
nominal sizes of model_aliases.csv. ``note`` says what the name stands for where that matters to
the price (a best-of-16 system, a prompt variant of another model).
"""

from __future__ import annotations

import csv
import io
import math
import re
from collections.abc import Iterable
from importlib import resources

import polars as pl
import yaml
from fsspec.core import url_to_fs

from benchroute.schemas import empty, validate
from benchroute.schemas.tables import DATE_PATTERN, PRICE_RULE_PATTERN
from benchroute.transforms.fingerprints import digest

CARD_FILE_NAMES = ("model_cards.csv", "model_cards.yaml", "model_cards.yml")
SCHEMA = empty("model_cards").schema
CARD_COLUMNS = list(SCHEMA)
PRICE_COLUMNS = ("usd_per_1m_input", "usd_per_1m_output", "price_rule", "price_source", "price_as_of")
FACT_COLUMNS = ("open_weights", "architecture", "params_b", "active_params_b", "context_window")
FACTS_SCHEMA = {
    "model": pl.String,
    **{c: SCHEMA[c] for c in FACT_COLUMNS},
    "note": pl.String,
}
API_SCHEMA = {"model": pl.String, "usd_per_1m_input": pl.Float64, "usd_per_1m_output": pl.Float64,
              "as_of": pl.String, "source": pl.String}
TIER_SCHEMA = {"architecture": pl.String, "min_params_b_exclusive": pl.Float64,
               "max_params_b_inclusive": pl.Float64, "usd_per_1m_tokens": pl.Float64,
               "as_of": pl.String, "source": pl.String}
NO_CARD = "unknown: not in any model card"
NO_PRICE = "unknown: no price in any model card"


class CardError(ValueError):
    """A model card (or price list) that cannot be used; the message names the file, the row,
    the model and the field."""


# ------------------------------------------------------------------------------ user cards
def read_card(url: str) -> pl.DataFrame:
    """A user's card file (``.csv``, ``.yaml`` or ``.yml``, any fsspec URL) as card rows.

    Every column is optional but ``model``; a row that gives no price leaves ``price_rule`` null
    (it changes no price). Unknown columns, bad values and repeated models raise ``CardError``
    listing every problem; nothing of a refused card is used.
    """
    fs, path = url_to_fs(str(url))
    if not fs.exists(path):
        raise CardError(f"{url}: card file not found")
    with fs.open(path, "rb") as f:
        data = f.read()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise CardError(f"{url}: not UTF-8 text ({exc})") from exc
    return parse_card(text, str(url))


def parse_card(text: str, name: str) -> pl.DataFrame:
    """Card rows from the text of a card file; ``name`` (ending ``.csv``/``.yaml``/``.yml``)
    names it in errors."""
    suffix = name.rsplit(".", 1)[-1].lower()
    if suffix == "csv":
        rows = _csv_rows(text, name)
    elif suffix in ("yaml", "yml"):
        rows = _yaml_rows(text, name)
    else:
        raise CardError(f"{name}: a model card is a .csv, .yaml or .yml file")
    errors: list[str] = []
    cards: list[dict] = []
    seen: dict[str, int] = {}
    for n, raw in rows:
        card, bad = _parse_row(raw)
        model = card.get("model")
        where = f"{name}: row {n} (model {model!r})"
        if model in seen:
            bad.append(("model", f"repeats row {seen[model]}"))
        elif model is not None:
            seen[model] = n
        errors.extend(f"{where}: {field}: {reason}" for field, reason in bad)
        cards.append(card)
    if errors:
        raise CardError(f"model card refused ({len(errors)} problem(s)):\n" + "\n".join(errors))
    return pl.DataFrame(cards, schema=SCHEMA, orient="row") if cards else pl.DataFrame(schema=SCHEMA)


def _csv_rows(text: str, name: str) -> list[tuple[int, dict]]:
    reader = csv.DictReader(io.StringIO(text))
    header = [h.strip() for h in reader.fieldnames or []]
    if not header:
        raise CardError(f"{name}: empty card (no header row)")
    unknown = [h for h in header if h not in CARD_COLUMNS]
    if unknown:
        raise CardError(f"{name}: header: unknown column(s) {', '.join(unknown)} "
                        f"(known: {', '.join(CARD_COLUMNS)})")
    if "model" not in header:
        raise CardError(f"{name}: header: no 'model' column")
    reader.fieldnames = header
    rows = []
    for n, row in enumerate(reader, 1):
        extra = row.pop(None, None)
        if extra:
            row["__extra"] = extra
        rows.append((n, row))
    return rows


def _yaml_rows(text: str, name: str) -> list[tuple[int, dict]]:
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise CardError(f"{name}: not valid YAML: {exc}") from exc
    if isinstance(data, dict):
        if set(data) != {"models"}:
            raise CardError(f"{name}: a YAML card is a list of mappings or {{models: [...]}}; "
                            f"found keys {sorted(map(str, data))}")
        data = data["models"]
    if data is None:
        return []
    if not isinstance(data, list):
        raise CardError(f"{name}: a YAML card is a list of mappings or {{models: [...]}}")
    rows = []
    for n, item in enumerate(data, 1):
        if not isinstance(item, dict):
            raise CardError(f"{name}: row {n}: not a mapping ({type(item).__name__})")
        rows.append((n, {str(k): v for k, v in item.items()}))
    return rows


def _parse_row(raw: dict) -> tuple[dict, list[tuple[str, str]]]:
    """One row's typed values and its problems as ``(field, reason)``."""
    bad: list[tuple[str, str]] = []
    if raw.get("__extra"):
        bad.append(("(row)", f"more values than columns: {raw['__extra']}"))
    bad.extend((k, "unknown field") for k in raw if k not in CARD_COLUMNS and k != "__extra")
    card: dict = {}
    for col in CARD_COLUMNS:
        value = raw.get(col)
        if isinstance(value, str):
            value = value.strip()
        if value is None or value == "":
            card[col] = None
            continue
        try:
            card[col] = _PARSERS[col](value)
        except ValueError as exc:
            bad.append((col, str(exc)))
            card[col] = None
    if card["model"] is None and not any(f == "model" for f, _ in bad):
        bad.append(("model", "missing"))
    if card["params_b"] and card["active_params_b"] and card["active_params_b"] > card["params_b"]:
        bad.append(("active_params_b", f"{card['active_params_b']:g} exceeds params_b "
                                       f"{card['params_b']:g}"))
    priced = card["usd_per_1m_input"] is not None or card["usd_per_1m_output"] is not None
    for col, other in (("usd_per_1m_output", "usd_per_1m_input"), ("usd_per_1m_input", "usd_per_1m_output")):
        if card[other] is not None and card[col] is None and not any(f == col for f, _ in bad):
            # A half price would replace the whole price of the built card and un-price the model.
            bad.append((col, f"missing: a price needs both input and output (give {col} = {other} "
                             "if the provider charges one rate)"))
    rule = card["price_rule"]
    if priced and rule and rule.startswith("unknown"):
        bad.append(("price_rule", f"{rule!r} with a price"))
    elif priced and not card["price_source"]:
        card["price_rule"] = "card"
    elif priced and not rule:
        bad.append(("price_rule", "missing (a price with a price_source needs its rule)"))
    elif not priced and rule and not rule.startswith("unknown"):
        bad.append(("price_rule", f"{rule!r} without a price"))
    return card, bad


def _number(value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ValueError(f"{value!r} is not a number")
    try:
        number = float(value)
    except ValueError:
        raise ValueError(f"{value!r} is not a number") from None
    if not math.isfinite(number):
        raise ValueError(f"{value!r} is not a finite number")
    return number


def _positive(value) -> float:
    number = _number(value)
    if number <= 0:
        raise ValueError(f"{value!r} is not positive")
    return number


def _non_negative(value) -> float:
    number = _number(value)
    if number < 0:
        raise ValueError(f"{value!r} is negative")
    return number


def _count(value) -> int:
    number = _positive(value)
    if not number.is_integer():
        raise ValueError(f"{value!r} is not a whole number")
    return int(number)


def _flag(value) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("true", "yes", "1"):
        return True
    if text in ("false", "no", "0"):
        return False
    raise ValueError(f"{value!r} is not true or false")


def _text(value) -> str:
    if isinstance(value, (dict, list)):
        raise ValueError(f"{value!r} is not text")
    return value.isoformat() if hasattr(value, "isoformat") else str(value).strip()


def _matching(pattern: str, what: str):
    def parse(value) -> str:
        text = _text(value)
        if not re.fullmatch(pattern, text):
            raise ValueError(f"{text!r} is not {what}")
        return text

    return parse


_PARSERS = {
    "model": _text,
    "display_name": _text,
    "params_b": _positive,
    "active_params_b": _positive,
    "architecture": _matching(r"dense|moe", "dense or moe"),
    "open_weights": _flag,
    "context_window": _count,
    "usd_per_1m_input": _non_negative,
    "usd_per_1m_output": _non_negative,
    "price_rule": _matching(PRICE_RULE_PATTERN, "a price rule (api_list_price, "
                            "open_weights_tier:<arch>:<lo>-<hi>B, card or 'unknown: <why>')"),
    "price_source": _text,
    "price_as_of": _matching(DATE_PATTERN, "a date YYYY-MM or YYYY-MM-DD"),
}


# ------------------------------------------------------------------------------ built cards
def build_cards(
    models: Iterable[str], api_prices: pl.DataFrame, tiers: pl.DataFrame, facts: pl.DataFrame
) -> pl.DataFrame:
    """A priced card for each model (see the module docstring for the rules), with the facts of
    ``facts`` (``model_facts.csv``'s columns); display names are left null."""
    api = {r["model"]: r for r in api_prices.to_dicts()}
    known = {r["model"]: r for r in facts.to_dicts()}
    rows = []
    for model in dict.fromkeys(models):
        fact = known.get(model, {})
        row = dict.fromkeys(CARD_COLUMNS) | {"model": model}
        row.update({c: fact.get(c) for c in FACT_COLUMNS})
        row.update(_price(model, fact, api, tiers))
        rows.append(row)
    return _valid(pl.DataFrame(rows, schema=SCHEMA, orient="row") if rows else pl.DataFrame(schema=SCHEMA))


def _price(model: str, fact: dict, api: dict, tiers: pl.DataFrame) -> dict:
    if model in api:
        r = api[model]
        return {"usd_per_1m_input": r["usd_per_1m_input"], "usd_per_1m_output": r["usd_per_1m_output"],
                "price_rule": "api_list_price", "price_source": r["source"], "price_as_of": r["as_of"]}
    open_, arch, size = fact.get("open_weights"), fact.get("architecture"), fact.get("params_b")
    if open_ and size is not None and arch is not None:
        tier = tiers.filter(
            (pl.col("architecture") == arch)
            & (pl.col("min_params_b_exclusive") < size)
            & (size <= pl.col("max_params_b_inclusive"))
        )
        if tier.height:
            t = tier.row(0, named=True)
            rule = f"open_weights_tier:{arch}:{t['min_params_b_exclusive']:g}-{t['max_params_b_inclusive']:g}B"
            return {"usd_per_1m_input": t["usd_per_1m_tokens"], "usd_per_1m_output": t["usd_per_1m_tokens"],
                    "price_rule": rule, "price_source": t["source"], "price_as_of": t["as_of"]}
        why = f"open weights, {arch} {size:g}B: no size tier of open_weights_tiers.csv holds it"
    elif open_:
        why = "open weights but size unknown" if size is None else "open weights but architecture unknown"
    elif open_ is False:
        why = "closed model absent from api_prices.csv"
    elif fact:
        why = "not known whether the weights are open"
    else:
        why = "no facts about this model (not in model_facts.csv)"
    if fact.get("note"):
        why += f" ({fact['note']})"
    return {"usd_per_1m_input": None, "usd_per_1m_output": None, "price_rule": f"unknown: {why}",
            "price_source": None, "price_as_of": None}


def read_prices(folder: str) -> tuple[pl.DataFrame, pl.DataFrame]:
    """``api_prices.csv`` and ``open_weights_tiers.csv`` of a prices folder (any fsspec URL)."""
    base = str(folder).rstrip("/")
    return (_read_csv(f"{base}/api_prices.csv", API_SCHEMA),
            _read_csv(f"{base}/open_weights_tiers.csv", TIER_SCHEMA))


def load_facts(url: str | None = None) -> pl.DataFrame:
    """The shipped ``model_facts.csv``; a user's facts CSV at ``url`` replaces its rows by model."""
    text = resources.files("benchroute.transforms").joinpath("model_facts.csv").read_text()
    facts = _csv_frame(text.encode(), FACTS_SCHEMA, "benchroute/transforms/model_facts.csv")
    if url:
        extra = _read_csv(url, FACTS_SCHEMA)
        facts = pl.concat([facts.join(extra, on="model", how="anti"), extra])
    return facts


def _read_csv(url: str, schema: dict) -> pl.DataFrame:
    """A CSV read as text, then cast to ``schema`` (a ``note`` column may be absent)."""
    fs, path = url_to_fs(url)
    if not fs.exists(path):
        raise CardError(f"{url}: not found")
    with fs.open(path, "rb") as f:
        return _csv_frame(f.read(), schema, url)


def _csv_frame(data: bytes, schema: dict, url: str) -> pl.DataFrame:
    df = pl.read_csv(data, infer_schema=False)
    missing = [c for c in schema if c not in df.columns and c != "note"]
    if missing:
        raise CardError(f"{url}: missing column(s) {', '.join(missing)}")
    df = df.with_columns(pl.lit(None, pl.String).alias(c) for c in schema if c not in df.columns)
    try:
        return df.select(_cast(pl.col(c).str.strip_chars(), t).alias(c) for c, t in schema.items())
    except pl.exceptions.InvalidOperationError as exc:
        raise CardError(f"{url}: a value does not fit its column: {exc}") from exc


def _cast(text: pl.Expr, dtype) -> pl.Expr:
    if dtype == pl.Boolean:
        flags = {"true": True, "false": False}
        return text.str.to_lowercase().replace_strict(flags, return_dtype=pl.Boolean)
    return text.cast(dtype)


# ------------------------------------------------------------------------------ merging
def default_cards() -> pl.DataFrame:
    """The cards shipped with benchroute (``transforms/model_cards.csv``)."""
    text = resources.files("benchroute.transforms").joinpath("model_cards.csv").read_text()
    return parse_card(text, "benchroute/transforms/model_cards.csv")


def merge_cards(store_models: pl.DataFrame, cards: pl.DataFrame, *user_cards: pl.DataFrame) -> pl.DataFrame:
    """One card per model of ``store_models`` (the ``models`` table) and per row of the cards.

    ``user_cards`` are laid over ``cards`` in order, field by field; the price fields move as
    one group (a user row with a ``price_rule`` replaces the price, source and date). A store
    model no card names gets ``unknown: not in any model card``; a card's missing display name
    and size come from the store's ``models`` table.
    """
    merged = cards
    for top in user_cards:
        merged = _overlay(merged, top)
    store = store_models.select("model", "display_name", "params_b").unique("model", keep="first")
    absent = store.join(merged.select("model"), on="model", how="anti")["model"].to_list()
    if absent:
        extra = pl.DataFrame([no_card(m) for m in absent], schema=SCHEMA, orient="row")
        merged = pl.concat([merged, extra])
    merged = (
        merged.join(store.rename({"display_name": "_display", "params_b": "_params"}), on="model", how="left")
        .with_columns(
            pl.coalesce("display_name", "_display").alias("display_name"),
            pl.coalesce("params_b", "_params").alias("params_b"),
            pl.col("price_rule").fill_null(NO_PRICE),
        )
        .select(CARD_COLUMNS)
        .sort("model")
    )
    return _valid(merged)


def _overlay(base: pl.DataFrame, top: pl.DataFrame) -> pl.DataFrame:
    """``top``'s values over ``base``'s, field by field (the price fields as one group)."""
    joined = base.join(top, on="model", how="full", coalesce=True, suffix="__top")
    priced = pl.col("price_rule__top").is_not_null()
    return joined.select(
        "model",
        *[
            (pl.when(priced).then(pl.col(f"{c}__top")).otherwise(pl.col(c)) if c in PRICE_COLUMNS
             else pl.coalesce(f"{c}__top", c)).alias(c)
            for c in CARD_COLUMNS
            if c != "model"
        ],
    )


def store_cards(store) -> pl.DataFrame:
    """The cards of a store (an ``artifacts.store.Store``): its ``model_cards`` table, or the
    shipped defaults over its models when it has none yet."""
    if "model_cards" in store.tables():
        return store.read("model_cards")
    return merge_cards(store.read("models"), default_cards())


def cards_for(store, models: list[str]) -> list[dict]:
    """One card (a dict of every card column) per model, in the order given, from the store's
    cards (``store_cards``); a model no card names gets null fields and
    ``price_rule = "unknown: not in any model card"``."""
    by_model = {r["model"]: r for r in store_cards(store).to_dicts()}
    return [by_model.get(m) or no_card(m) for m in models]


def no_card(model: str) -> dict:
    """The card of a model no card names: only its name, and why it has no price."""
    return dict.fromkeys(CARD_COLUMNS) | {"model": model, "price_rule": NO_CARD}


def card_fingerprint(cards: pl.DataFrame) -> str:
    """A digest of a card's content (row order does not matter)."""
    return digest(cards.select(CARD_COLUMNS).sort("model").to_dicts())


def rule_counts(cards: pl.DataFrame) -> dict[str, int]:
    """How many models each price rule priced (every ``unknown: …`` reason counted apart)."""
    return dict(sorted(cards.group_by("price_rule").len().iter_rows()))


def _valid(cards: pl.DataFrame) -> pl.DataFrame:
    valid, bad = validate("model_cards", cards, source="model_cards")
    if bad.height:
        rows = [f"{r['record']}: {r['field']}: {r['reason']}" for r in bad.head(10).to_dicts()]
        raise CardError("model cards break the schema:\n" + "\n".join(rows))
    return valid
