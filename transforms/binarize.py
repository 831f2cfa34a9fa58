"""Binarization: metric values s(x, m) -> correctness labels y(x, m) in {0, 1} (docs/method.md#correctness-labels).

Rules are declared, never implied. A rule names a metric (a glob), optionally the datasets it
applies to (a glob), its kind and parameters, and the metric's valid range:

- ``threshold``: y = 1 if s >= t (or s > t with ``op: ">"``);
- ``relative_to_best``: y = 1 if s >= max over models of s on the same input - eps;
- ``top_k``: y = 1 for the k best models on the input (ties at the boundary all count).

For each dataset the *primary* metric is the one matched by the earliest rule in the list; that
metric alone makes the dataset's labels. Usage measures (``USAGE_METRICS``: output length and
token counts) and answer positions (``POSITION_METRICS``) are never primary and never
range-checked, whatever the rules say. Several runs of one model on one input (two suites of
the same benchmark) are averaged first; perturbed outcomes never make labels. The rule's text is
stored with every label.

**Main metrics** (``effective_rules``, applied by ``binarize``). A benchmark can say which of its
metrics is the one it is judged on: HELM's schema names a *main metric* per run group
(``run_groups[].environment.main_name``; narrative_qa's is ``f1_score`` although its instances
also carry ``exact_match``). The primary metric of a dataset is chosen, first match wins:

1. an explicit user rule: a rule whose ``dataset`` glob is not ``*`` and that matches one of the
   dataset's metrics;
2. the data's own schema: ``main_metrics`` hints with origin ``schema`` (the HELM reader reads
   the suite's ``schema.json``/``schema*.yaml`` and the run's groups);
3. the shipped table: hints with origin ``table`` (the reader looks the run's groups up in
   ``helm_main_metrics.csv``), then, for a ``helm/<scenario>[/...]`` dataset without hints, the
   table row of ``<scenario>``;
4. the default: the earliest rule that matches one of the dataset's metrics.

A main metric counts only if the dataset has it per input and some rule matches it (that rule,
the first in the list that matches, gives kind, threshold and range: a user's ``*`` rule for the
metric tunes it); otherwise the next candidate is tried. Steps 2-3 are written out as a
dataset-specific copy of that rule, placed after the explicit user rules and before all ``*``
rules, so the list of rules stored with the labels says exactly what was done.
"""

from __future__ import annotations

import csv
import fnmatch
import functools
import json
import re
from collections.abc import Iterable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Literal

import fsspec
import polars as pl

from benchroute.schemas import empty, validate

RuleKind = Literal["threshold", "relative_to_best", "top_k"]
# What a request used, not how good the answer was (the readers' ``output_chars``, HELM's counts).
USAGE_METRICS = ("output_chars", "num_output_tokens", "num_prompt_tokens")
# Answer positions of multiple-choice items (which option was right, which one the model picked;
# the selection-bias measure of ``transforms.stability``): never scores, like the usage measures.
POSITION_METRICS = ("gold_position", "pred_position")
NOT_LABEL_METRICS = (*USAGE_METRICS, *POSITION_METRICS)


@dataclass(frozen=True)
class Rule:
    metric: str
    kind: RuleKind
    t: float | None = None
    op: Literal[">=", ">"] = ">="
    eps: float | None = None
    k: int | None = None
    dataset: str = "*"
    lo: float | None = None
    hi: float | None = None

    def __post_init__(self) -> None:
        needs = {"threshold": "t", "relative_to_best": "eps", "top_k": "k"}
        if self.kind not in needs:
            raise ValueError(f"rule for {self.metric!r}: unknown kind {self.kind!r}")
        if getattr(self, needs[self.kind]) is None:
            raise ValueError(f"rule for {self.metric!r}: kind {self.kind} needs {needs[self.kind]!r}")
        if self.op not in (">=", ">"):
            raise ValueError(f"rule for {self.metric!r}: op must be '>=' or '>'")

    def matches(self, dataset: str, metric: str) -> bool:
        return fnmatch.fnmatchcase(metric, self.metric) and fnmatch.fnmatchcase(dataset, self.dataset)

    def describe(self) -> str:
        """The rule as stored with each label, e.g. ``threshold(exact_match >= 0.5)``."""
        if self.kind == "threshold":
            return f"threshold({self.metric} {self.op} {self.t:g})"
        if self.kind == "relative_to_best":
            return f"relative_to_best({self.metric} >= best - {self.eps:g})"
        return f"top_k({self.metric}, k={self.k})"


# Defaults for the metrics in our data, most trusted first (docs/method.md#correctness-labels; the SOURCE.md notes).
DEFAULT_RULES: tuple[Rule, ...] = (
    # Exact-match style 0/1 scores (HELM, MMLU-Pro, RouteLLM CSVs).
    Rule("exact_match", "threshold", t=0.5, lo=0, hi=1),
    Rule("quasi_exact_match", "threshold", t=0.5, lo=0, hi=1),
    Rule("prefix_exact_match", "threshold", t=0.5, lo=0, hi=1),
    Rule("correct_rx", "threshold", t=0.5, lo=0, hi=1),
    Rule("correct", "threshold", t=0.5, lo=0, hi=1),
    # HELM safety judge scores in [0, 1] (mean of two judges, steps of 0.25): "safe" when both
    # judges lean safe.
    Rule("art_score", "threshold", t=0.75, lo=0, hi=1),
    Rule("harm_bench_score", "threshold", t=0.75, lo=0, hi=1),
    Rule("sst_score", "threshold", t=0.75, lo=0, hi=1),
    Rule("xst_score", "threshold", t=0.75, lo=0, hi=1),
    # AlpacaEval: preference in [1, 2] against a fixed reference; > 1.5 = the model wins. The
    # AlpacaEval 2 judge (58 models against gpt-4-1106-preview) first, then any other annotator.
    Rule("alpaca_eval/weighted_alpaca_eval_gpt4_turbo", "threshold", t=1.5, op=">", lo=1, hi=2),
    Rule("alpaca_eval/*", "threshold", t=1.5, op=">", lo=1, hi=2),
    # MT-Bench single-answer grading, 1-10.
    Rule("judge_score", "threshold", t=8, lo=1, hi=10),
    Rule("judge_score_turn1", "threshold", t=8, lo=1, hi=10),
    Rule("judge_score_turn2", "threshold", t=8, lo=1, hi=10),
    # MixInstruct generation quality: close to the best candidate on the same input.
    Rule("bertscore", "relative_to_best", eps=0.01),
    Rule("bleurt", "relative_to_best", eps=0.05),
    Rule("bartscore", "relative_to_best", eps=0.5),
    # Other HELM scores.
    Rule("f1_score", "threshold", t=0.5, lo=0, hi=1),
    Rule("rouge_l", "top_k", k=3, lo=0, hi=1),
    # HELM main metrics (helm_main_metrics.csv) that are 0/1 per instance; last, so they only
    # decide where a schema or the table names them, or where nothing above matches.
    Rule("quasi_prefix_exact_match", "threshold", t=0.5, lo=0, hi=1),
    Rule("exact_match_indicator", "threshold", t=0.5, lo=0, hi=1),
    Rule("final_number_exact_match", "threshold", t=0.5, lo=0, hi=1),
    Rule("math_equiv", "threshold", t=0.5, lo=0, hi=1),
    Rule("math_equiv_chain_of_thought", "threshold", t=0.5, lo=0, hi=1),
    Rule("chain_of_thought_correctness", "threshold", t=0.5, lo=0, hi=1),
    # HELM safety's later judge score, same scale as the scenario-specific ones above.
    Rule("safety_score", "threshold", t=0.75, lo=0, hi=1),
)

# Each HELM run group's main metric(s), from HELM's schema files (stanford-crfm/helm
# src/helm/benchmark/static/schema_*.yaml at 63754d05d) and the schema.json of the HELM suites
# in our data; a group with several (schemas disagree) lists them most-agreed first.
HELM_MAIN_METRICS_CSV = Path(__file__).with_name("helm_main_metrics.csv")
HELM_PREFIX = "helm/"


@functools.cache
def helm_main_metrics() -> dict[str, tuple[str, ...]]:
    """Run group -> its main metric candidates, from ``helm_main_metrics.csv``."""
    table: dict[str, list[str]] = {}
    with HELM_MAIN_METRICS_CSV.open(newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            table.setdefault(row["run_group"], []).append(row["metric"])
    return {g: tuple(ms) for g, ms in table.items()}


def load_rules(url: str | None = None) -> tuple[Rule, ...]:
    """Defaults, or a user's JSON file: ``{"rules": [{...}], "replace_defaults": false}``.

    The user's rules come first (so they win the choice of primary metric).
    """
    if not url:
        return DEFAULT_RULES
    with fsspec.open(url, "rt", encoding="utf-8") as f:
        data = json.load(f)
    try:
        user = tuple(Rule(**r) for r in data.get("rules", []))
    except TypeError as exc:
        raise ValueError(f"{url}: bad binarization rule: {exc}") from exc
    return user if data.get("replace_defaults") else user + DEFAULT_RULES


def rules_to_json(rules: tuple[Rule, ...]) -> list[dict]:
    return [{k: v for k, v in asdict(r).items() if v is not None} for r in rules]


def primary_metrics(outcomes: pl.DataFrame, rules: tuple[Rule, ...]) -> pl.DataFrame:
    """For each dataset, the metric that makes its labels and the rule's index.

    Returns columns ``dataset, metric, rule_index``; datasets with no matching metric are absent.
    """
    pairs = (
        outcomes.select("dataset", "metric")
        .unique()
        .filter(~pl.col("metric").is_in(NOT_LABEL_METRICS))
        .sort("dataset", "metric")
    )
    chosen: dict[str, tuple[str, int]] = {}
    for dataset, metric in pairs.iter_rows():
        for i, rule in enumerate(rules):
            if rule.matches(dataset, metric):
                if dataset not in chosen or i < chosen[dataset][1]:
                    chosen[dataset] = (metric, i)
                break
    return pl.DataFrame(
        {
            "dataset": list(chosen),
            "metric": [m for m, _ in chosen.values()],
            "rule_index": [i for _, i in chosen.values()],
        },
        schema={"dataset": pl.String, "metric": pl.String, "rule_index": pl.Int64},
    )


MainMetricHint = tuple[str, str, str]  # (dataset, metric, origin: "schema" | "table")


def effective_rules(
    outcomes: pl.DataFrame,
    rules: tuple[Rule, ...] = DEFAULT_RULES,
    main_metrics: Iterable[MainMetricHint] | None = None,
) -> tuple[Rule, ...]:
    """``rules`` with each dataset's main metric written in as a rule (module docstring).

    Returns: the explicit user rules (``dataset`` not ``*``), one rule per dataset whose primary
    metric comes from a main metric (a copy of the first rule matching that metric, restricted
    to the dataset), then the remaining rules in their order. Applying it twice changes nothing.
    """
    explicit = [r for r in rules if r.dataset != "*"]
    general = [r for r in rules if r.dataset == "*"]
    hinted = _hint_candidates(main_metrics or ())
    pairs = (
        outcomes.select("dataset", "metric")
        .unique()
        .filter(~pl.col("metric").is_in(NOT_LABEL_METRICS))
        .group_by("dataset")
        .agg(pl.col("metric"))
        .sort("dataset")
    )
    derived = []
    for dataset, metrics in pairs.iter_rows():
        present = set(metrics)
        if any(r.matches(dataset, m) for r in explicit for m in present):
            continue
        for metric in hinted.get(dataset, ()) + _table_candidates(dataset):
            if metric not in present:
                continue
            template = next((r for r in rules if r.matches(dataset, metric)), None)
            if template is not None:
                derived.append(
                    replace(template, metric=_glob_escape(metric), dataset=_glob_escape(dataset))
                )
                break
    return tuple(explicit + derived + general)


def _hint_candidates(hints: Iterable[MainMetricHint]) -> dict[str, tuple[str, ...]]:
    """Dataset -> hinted main metrics: every ``schema`` one (in the given order), then ``table``."""
    by_origin: dict[str, dict[str, list[str]]] = {"schema": {}, "table": {}}
    for dataset, metric, origin in hints:
        by_origin.get(origin, by_origin["table"]).setdefault(dataset, []).append(metric)
    out: dict[str, tuple[str, ...]] = {}
    for origin in ("schema", "table"):
        for dataset, metrics in by_origin[origin].items():
            out[dataset] = tuple(dict.fromkeys(out.get(dataset, ()) + tuple(metrics)))
    return out


def _table_candidates(dataset: str) -> tuple[str, ...]:
    """The shipped table's main metrics for ``helm/<scenario>[/...]`` (by the scenario name)."""
    if not dataset.startswith(HELM_PREFIX):
        return ()
    scenario = dataset[len(HELM_PREFIX) :].split("/", 1)[0]
    return helm_main_metrics().get(scenario, ())


def _glob_escape(text: str) -> str:
    """``text`` as an fnmatch pattern that matches only itself."""
    return re.sub(r"([*?\[])", r"[\1]", text)


def main_metric_hints(commits: Iterable) -> list[MainMetricHint]:
    """The main-metric hints recorded by ingest commits (``info["main_metrics"]``), in order."""
    hints: list[MainMetricHint] = []
    for commit in commits:
        for row in (getattr(commit, "info", None) or {}).get("main_metrics", ()):
            if isinstance(row, (list, tuple)) and len(row) == 3:
                if all(isinstance(x, str) for x in row):
                    hints.append((row[0], row[1], row[2]))
    return hints


def binarize(
    outcomes: pl.DataFrame,
    rules: tuple[Rule, ...] = DEFAULT_RULES,
    main_metrics: Iterable[MainMetricHint] | None = None,
) -> pl.DataFrame:
    """The labels table: one row per (input, dataset, model) of every dataset with a rule.

    The rules are first completed with the datasets' main metrics (``effective_rules``).
    """
    rules = effective_rules(outcomes, rules, main_metrics)
    return labels_of(outcomes, rules, primary_metrics(outcomes, rules))


def labels_of(outcomes: pl.DataFrame, rules: tuple[Rule, ...], primary: pl.DataFrame) -> pl.DataFrame:
    """``binarize``'s labels of ``outcomes`` given the effective ``rules`` and each dataset's
    primary metric (``primary_metrics``' frame, possibly chosen from more outcomes than these:
    an incremental relabel labels new outcomes under the choices the whole store makes)."""
    if primary.height == 0:
        return empty("labels")
    values = (
        outcomes.filter(pl.col("perturbation").is_null())
        .join(primary, on=["dataset", "metric"], how="inner")
        .group_by("input_id", "dataset", "model", "metric", "rule_index")
        .agg(pl.col("value").mean(), pl.len().cast(pl.Int32).alias("n_outcomes"))
    )
    frames = []
    for i, rule in enumerate(rules):
        part = values.filter(pl.col("rule_index") == i)
        if part.height:
            frames.append(
                part.with_columns(
                    y=_label_expr(rule).cast(pl.Int8), rule=pl.lit(rule.describe())
                )
            )
    if not frames:
        return empty("labels")
    # On one thread: 1.5 s against 21 s multithreaded for 4.4 M labels on a busy 2-core machine.
    labels = pl.concat(frames).drop("rule_index").sort(
        "dataset", "input_id", "model", multithreaded=False)
    valid, bad = validate("labels", labels, source="binarize")
    if bad.height:  # cannot happen for validated outcomes; fail loudly if it does
        raise AssertionError(f"binarize produced invalid labels: {bad.head(3)}")
    return valid


def metric_pairs(outcomes: pl.DataFrame) -> dict[str, list[str]]:
    """Dataset -> its sorted metrics that could make labels (usage and position measures left
    out): all that ``effective_rules`` and ``primary_metrics`` look at in the outcomes."""
    pairs = (
        outcomes.lazy().select("dataset", "metric").unique()
        .filter(~pl.col("metric").is_in(NOT_LABEL_METRICS))
        .group_by("dataset").agg(pl.col("metric").sort())
        .sort("dataset").collect()
    )
    return {d: list(ms) for d, ms in pairs.iter_rows()}


def pairs_frame(pairs: dict[str, Iterable[str]]) -> pl.DataFrame:
    """``metric_pairs``' mapping back as a ``dataset, metric`` frame (what ``effective_rules``
    and ``primary_metrics`` accept in place of the outcomes)."""
    rows = [(d, m) for d, ms in pairs.items() for m in ms]
    return pl.DataFrame(rows, schema={"dataset": pl.String, "metric": pl.String}, orient="row")


def _label_expr(rule: Rule) -> pl.Expr:
    v = pl.col("value")
    group = ["input_id", "dataset"]
    if rule.kind == "threshold":
        return v > rule.t if rule.op == ">" else v >= rule.t
    if rule.kind == "relative_to_best":
        return v >= v.max().over(group) - rule.eps
    return v.rank(method="min", descending=True).over(group) <= rule.k


def check_ranges(
    outcomes: pl.DataFrame, rules: tuple[Rule, ...] = DEFAULT_RULES, *, file: str = ""
) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Split off outcomes outside their metric's declared range (first matching rule's range).

    Returns ``(in_range, quarantine_rows)``.
    """
    if outcomes.height == 0:
        return outcomes, empty("quarantine")
    pairs = outcomes.select("dataset", "metric").unique().filter(~pl.col("metric").is_in(NOT_LABEL_METRICS))
    bounds = []
    for dataset, metric in pairs.iter_rows():
        rule = next((r for r in rules if r.matches(dataset, metric)), None)
        if rule is not None and (rule.lo is not None or rule.hi is not None):
            bounds.append((dataset, metric, rule.lo, rule.hi))
    if not bounds:
        return outcomes, empty("quarantine")
    b = pl.DataFrame(bounds, schema=["dataset", "metric", "lo", "hi"], orient="row").cast(
        {"lo": pl.Float64, "hi": pl.Float64}
    )
    joined = outcomes.join(b, on=["dataset", "metric"], how="left")
    bad_mask = (pl.col("lo").is_not_null() & (pl.col("value") < pl.col("lo"))) | (
        pl.col("hi").is_not_null() & (pl.col("value") > pl.col("hi"))
    )
    bad = joined.filter(bad_mask)
    quarantine = bad.select(
        pl.col("source"),
        pl.lit(file).alias("file") if file else pl.col("run_id").alias("file"),
        pl.concat_str(["run_id", "input_id", "model"], separator="/").alias("record"),
        pl.col("metric").alias("field"),
        pl.format("value {} outside the metric's range [{}, {}]", "value", "lo", "hi").alias(
            "reason"
        ),
        pl.col("value").cast(pl.String).alias("value"),
    )
    return joined.filter(~bad_mask).drop("lo", "hi"), quarantine
