"""The canonical tables of benchroute (docs/formats.md#canonical-tables), each declared once.

Every reader maps its source to these tables and nothing else; every stage after ingest reads
only these. ``validate`` is the one check used at every boundary: rows that break a rule are
split off into the quarantine table, with the file, the record and the rule that failed.
"""

from __future__ import annotations

import dataframely as dy
import polars as pl

INPUT_ID_PATTERN = r"^[0-9a-f]{32}$"

# Characters a dataset name may not hold: a backslash (a Windows path separator) and control
# characters (line breaks, NUL, escape sequences...).
_UNSAFE_NAME_CHARS = r"[\\\p{Cc}]"
SAFE_NAME_RULE = (
    "a dataset name is '/'-separated segments, none empty, '.' or '..' (no leading, trailing "
    "or doubled '/'), with no backslash or control character"
)


def safe_name(name: pl.Expr) -> pl.Expr:
    """True where ``name`` is a safe dataset name (``SAFE_NAME_RULE``).

    Dataset names become parts of paths and keys downstream (bundles, reports, store
    partitions), so ``helm/../../../outside`` or ``/etc`` is refused where every reader's output
    enters the canonical tables (``validate``): such rows go to quarantine, naming the field
    ``dataset``. They are refused rather than normalised: a rewritten name could silently merge
    two datasets.
    """
    bad_segment = pl.element().is_in(["", ".", ".."])
    return ~name.str.contains(_UNSAFE_NAME_CHARS) & ~name.str.split("/").list.eval(
        bad_segment
    ).list.any()


class Inputs(dy.Schema):
    """One row per distinct input text; ``input_id`` is a hash of its normalised text."""

    input_id = dy.String(primary_key=True, regex=INPUT_ID_PATTERN)
    text = dy.String(min_length=1)


class Memberships(dy.Schema):
    """Which dataset (and source) an input belongs to; one text can sit in several datasets."""

    input_id = dy.String(primary_key=True, regex=INPUT_ID_PATTERN)
    dataset = dy.String(primary_key=True, min_length=1, check={"safe_name": safe_name})
    source = dy.String(primary_key=True, min_length=1)
    split = dy.String(nullable=True)
    source_instance_id = dy.String(nullable=True)


class Outcomes(dy.Schema):
    """One metric value of one model on one input, as the benchmark reported it.

    ``run_id`` names the run that produced it (a HELM run name, a file), so two suites that
    scored the same model on the same input keep both observations. ``perturbation`` is null
    for the original instance and names the perturbation otherwise.
    """

    input_id = dy.String(regex=INPUT_ID_PATTERN)
    dataset = dy.String(min_length=1, check={"safe_name": safe_name})
    model = dy.String(min_length=1)
    metric = dy.String(min_length=1)
    value = dy.Float64()  # finite: NaN and inf are rejected
    run_id = dy.String(min_length=1)
    source = dy.String(min_length=1)
    perturbation = dy.String(nullable=True)
    source_model = dy.String(min_length=1)

    @dy.rule()
    def unique_observation(cls) -> pl.Expr:
        return pl.struct(OUTCOME_KEY).is_unique()


OUTCOME_KEY = ["input_id", "dataset", "model", "metric", "run_id", "perturbation"]


class Labels(dy.Schema):
    """Binarized correctness y(x, m) per dataset, with the metric and rule that produced it."""

    input_id = dy.String(primary_key=True, regex=INPUT_ID_PATTERN)
    dataset = dy.String(primary_key=True, min_length=1)
    model = dy.String(primary_key=True, min_length=1)
    metric = dy.String(min_length=1)
    value = dy.Float64()
    y = dy.Int8(min=0, max=1)
    rule = dy.String(min_length=1)
    n_outcomes = dy.Int32(min=1)


class Models(dy.Schema):
    """Every model seen, under its canonical name."""

    model = dy.String(primary_key=True, min_length=1)
    display_name = dy.String(min_length=1)
    params_b = dy.Float64(nullable=True, min_exclusive=0.0)
    cost_per_1k_tokens = dy.Float64(nullable=True, min=0.0)  # deprecated, always null: see model_cards
    source = dy.String(min_length=1)


PRICE_RULE_PATTERN = (
    r"^(api_list_price|card|open_weights_tier:(dense|moe):[0-9.]+-[0-9.]+B|unknown: .+)$"
)
DATE_PATTERN = r"^[0-9]{4}-[0-9]{2}(-[0-9]{2})?$"


class ModelCards(dy.Schema):
    """What is known of each model beyond the benchmarks: size, openness, context, price.

    Prices are USD per 1M tokens; ``price_rule`` says how the price was set (``api_list_price``,
    ``open_weights_tier:<architecture>:<lo>-<hi>B``, ``card`` for a price a user's card gave
    without a source, or ``unknown: <why>`` with null prices). ``params_b`` is the total size;
    ``active_params_b`` the parameters used per token of a mixture of experts.
    """

    model = dy.String(primary_key=True, min_length=1)
    display_name = dy.String(nullable=True)
    params_b = dy.Float64(nullable=True, min_exclusive=0.0)
    active_params_b = dy.Float64(nullable=True, min_exclusive=0.0)
    architecture = dy.String(nullable=True, regex=r"^(dense|moe)$")
    open_weights = dy.Bool(nullable=True)
    context_window = dy.Int64(nullable=True, min_exclusive=0)
    usd_per_1m_input = dy.Float64(nullable=True, min=0.0)  # finite: NaN and inf are rejected
    usd_per_1m_output = dy.Float64(nullable=True, min=0.0)
    price_rule = dy.String(regex=PRICE_RULE_PATTERN)
    price_source = dy.String(nullable=True)
    price_as_of = dy.String(nullable=True, regex=DATE_PATTERN)

    @dy.rule()
    def active_within_total(cls) -> pl.Expr:
        return (pl.col("active_params_b") <= pl.col("params_b")).fill_null(True)

    @dy.rule()
    def unknown_rule_has_no_price(cls) -> pl.Expr:
        priced = pl.col("usd_per_1m_input").is_not_null() | pl.col("usd_per_1m_output").is_not_null()
        return ~(priced & pl.col("price_rule").str.starts_with("unknown"))


class Quarantine(dy.Schema):
    """Records that failed validation: where they came from and why."""

    source = dy.String()
    file = dy.String()
    record = dy.String(nullable=True)
    field = dy.String(nullable=True)
    reason = dy.String(min_length=1)
    value = dy.String(nullable=True)


TABLES: dict[str, type[dy.Schema]] = {
    "inputs": Inputs,
    "memberships": Memberships,
    "outcomes": Outcomes,
    "labels": Labels,
    "models": Models,
    "model_cards": ModelCards,
    "quarantine": Quarantine,
}

# The columns that identify a row of each table (used to deduplicate appends).
KEYS: dict[str, list[str]] = {
    "inputs": ["input_id"],
    "memberships": ["input_id", "dataset", "source"],
    "outcomes": OUTCOME_KEY,
    "labels": ["input_id", "dataset", "model"],
    "models": ["model"],
    "model_cards": ["model"],
    "quarantine": ["source", "file", "record", "field", "reason"],
}

# The columns that best name a failing record in a quarantine entry.
_RECORD_COLUMNS: dict[str, list[str]] = {
    "inputs": ["input_id"],
    "memberships": ["source_instance_id", "input_id"],
    "outcomes": ["run_id", "input_id", "model", "metric"],
    "labels": ["input_id", "model"],
    "models": ["model"],
    "model_cards": ["model"],
    "quarantine": ["record"],
}


def empty(table: str) -> pl.DataFrame:
    """An empty frame with the table's columns and types."""
    return TABLES[table].create_empty()


def validate(
    table: str, df: pl.DataFrame, *, source: str = "", file: str = ""
) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Check ``df`` against the table's schema.

    Returns ``(valid, quarantined)``: valid rows cast to the declared types, and one quarantine
    row per failing record naming the file, the record, the failing fields and the rules broken.
    Missing columns or uncastable types raise ``SchemaError`` naming the table and file: that is
    a bug in a reader, not bad data.
    """
    schema = TABLES[table]
    missing = [c for c in schema.column_names() if c not in df.columns]
    if missing:
        raise SchemaError(f"{table}: frame from {file or source or '?'} lacks columns {missing}")
    df = df.select(schema.column_names())
    try:
        valid, failure = schema.filter(df, cast=True)
    except Exception as exc:  # dtype casts that cannot succeed
        raise SchemaError(f"{table}: frame from {file or source or '?'} does not fit: {exc}") from exc
    if failure.counts():
        bad = _failures_to_quarantine(table, failure.details(), source=source, file=file)
    else:
        bad = empty("quarantine")
    return valid.lazy().collect() if isinstance(valid, pl.LazyFrame) else pl.DataFrame(valid), bad


class SchemaError(ValueError):
    """A frame does not have the shape of its canonical table."""


# Rules whose name alone does not say what is wrong: the quarantine reason adds this.
_RULE_HELP = {"dataset|check__safe_name": SAFE_NAME_RULE}


def _failures_to_quarantine(
    table: str, details: pl.DataFrame, *, source: str, file: str
) -> pl.DataFrame:
    columns = TABLES[table].column_names()
    rule_cols = [c for c in details.columns if c not in columns]
    record_cols = [c for c in _RECORD_COLUMNS[table] if c in columns]
    failed = pl.concat_list(
        [pl.when(pl.col(r) == "invalid").then(pl.lit(r)).otherwise(None) for r in rule_cols]
    ).list.drop_nulls()
    fields = failed.list.eval(pl.element().str.split("|").list.first()).list.unique(
        maintain_order=True
    )
    explained = failed.list.eval(
        pl.element().replace({rule: f"{rule} ({why})" for rule, why in _RULE_HELP.items()})
    )
    out = details.select(
        pl.lit(source).alias("source"),
        pl.lit(file).alias("file"),
        pl.concat_str([pl.col(c).cast(pl.String).fill_null("") for c in record_cols], separator="/")
        .alias("record"),
        fields.list.join(",").alias("field"),
        (pl.lit(f"{table}: broke ") + explained.list.join(", ")).alias("reason"),
        pl.struct(columns).struct.json_encode().alias("value"),
    )
    return Quarantine.validate(out, cast=True)
