"""Stability tables of a store: rankings, format sensitivity, selection bias, routing choices.

``stability_summary(store)`` reads the canonical tables (anything with ``read(table)``, e.g.
``artifacts.store.Store``; no other store access) and builds, per dataset and per source group
(the datasets of one source, resampled within each dataset):

- ``rankings`` / ``ranking_scopes``: ``stability.ranking_stability`` on the labels matrix of the
  scope, complete case (models labelled on ≥ ``min_coverage`` of the scope's inputs, then the
  inputs labelled for all of them; the dropped models are listed).
- ``variants`` / ``variant_models``: every other version of the same items the store holds,
  each against its reference (``variant_sets``): other correctness metrics of a dataset
  (``metric:<name>``, reference = the labels), other run suites of the same benchmark
  (``run:<suite>``, reference = the largest suite) and HELM perturbations
  (``perturbation:<name>``, reference = the unperturbed instance, matched on the source instance
  id), and question versions (MMLU-Pro ``question_variants.parquet``: a model that saw another
  version of a question has a membership ``<id>#v<n>``): ``version:same_text``, the ranking on
  the questions every model saw in the same text against ``version:as_seen``, the ranking on
  every question as each model saw it (a subset comparison: each model saw one version). A
  variant name found in several datasets of a source is also compared pooled.
- ``rstd``: selection bias per (scope, model), from answer positions: the outcomes'
  ``gold_position`` / ``pred_position`` metrics (the MMLU-Pro and HELM multiple-choice readers
  keep them), or a ``positions`` frame (dataset, model, gold, pred) given by the caller.
- ``router`` (optional, needs embeddings): ``stability_router.router_stability`` per source
  group, with the metric variants of the group as label variants.

``StabilitySummary.markdown()`` prints the tables (the evaluation report's "Stability" section,
``benchroute inspect --stability``); ``manifest()`` is the small JSON summary in a bundle's
manifest (``stability``) and ``model_fields()`` the per-model fields of its model entries
(``artifacts.router_build``). ``StoreView`` restricts a store to a report's or bundle's datasets
and models.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import numpy as np
import polars as pl

from benchroute.transforms.binarize import (
    DEFAULT_RULES,
    POSITION_METRICS,
    USAGE_METRICS,
    Rule,
    _label_expr,
)
from benchroute.transforms.stability import (
    RankingStability,
    VariantComparison,
    complete_case,
    compare_variant,
    ranking_stability,
    rstd,
)

# Answer positions, as outcomes (never labels): 0-based index of the correct option in the
# version of the item the model saw, and of the option it chose (-1 = no valid answer).
GOLD_POSITION, PRED_POSITION = POSITION_METRICS  # written by the MMLU-Pro and HELM readers
# Metrics that are no correctness score of any kind (never a format variant).
NOT_SCORES = (*USAGE_METRICS, *POSITION_METRICS, "logprob", "n_options")


# ---------------------------------------------------------------------------- frames
class StoreView:
    """A store's tables restricted to some datasets and models (``None`` = all): what a report
    or a bundle covers, read like a store (``read(table)``) by ``stability_summary``."""

    def __init__(self, store, datasets=None, models=None):
        self.store = store
        self.datasets = None if datasets is None else sorted(set(datasets))
        self.models = None if models is None else sorted(set(models))

    def read(self, table: str) -> pl.DataFrame:
        df = self.store.read(table)
        if self.datasets is not None and "dataset" in df.columns:
            df = df.filter(pl.col("dataset").is_in(self.datasets))
        if self.models is not None and "model" in df.columns:
            df = df.filter(pl.col("model").is_in(self.models))
        return df


def dataset_sources(memberships: pl.DataFrame) -> dict[str, str]:
    """dataset -> source (a dataset fed by two sources goes to the first, as ``lodo_groups``)."""
    ds = (memberships.select("dataset", "source").unique().sort("source")
          .unique("dataset", keep="first"))
    return dict(ds.iter_rows())


@dataclass(frozen=True)
class Matrix:
    """Labels as a matrix: ``Y`` (n × M, NaN = none), row keys (``items``: item and dataset
    per row), ``models``, and ``strata`` (n,) the dataset code of each row."""

    Y: np.ndarray
    items: pl.DataFrame
    models: list[str]
    strata: np.ndarray


def matrix(frame: pl.DataFrame, *, item: str = "input_id", value: str = "y",
           models: list[str] | None = None) -> Matrix:
    """Rows = distinct (item, dataset), columns = models; duplicates are averaged."""
    f = frame.group_by(item, "dataset", "model").agg(pl.col(value).cast(pl.Float64).mean())
    items = f.select(item, "dataset").unique().sort("dataset", item)
    models = sorted(f["model"].unique().to_list()) if models is None else list(models)
    items = items.with_row_index("__r")
    f = f.join(items, on=[item, "dataset"]).join(
        pl.DataFrame({"model": models}).with_row_index("__c"), on="model")
    Y = np.full((items.height, len(models)), np.nan)
    Y[f["__r"].to_numpy(), f["__c"].to_numpy()] = f[value].to_numpy()
    strata = items["dataset"].cast(pl.Categorical).to_physical().to_numpy().astype(np.int64)
    return Matrix(Y, items.drop("__r"), models, strata)


# ---------------------------------------------------------------------------- rankings
def _scopes(frame: pl.DataFrame, sources: dict[str, str]):
    """(kind, name, part) for every dataset and every source with ≥ 2 datasets."""
    for (d,), part in sorted(frame.group_by("dataset"), key=lambda x: x[0][0]):
        yield "dataset", d, part
    by_source: dict[str, list[str]] = {}
    for d in frame["dataset"].unique().to_list():
        by_source.setdefault(sources.get(d, d.split("/")[0]), []).append(d)
    for s, ds in sorted(by_source.items()):
        if len(ds) >= 2:
            yield "group", s, frame.filter(pl.col("dataset").is_in(ds))


def ranking_tables(
    labels: pl.DataFrame,
    memberships: pl.DataFrame,
    *,
    B: int = 1000,
    seed: int = 0,
    min_coverage: float = 0.8,
    min_inputs: int = 10,
    level: float = 0.95,
) -> tuple[pl.DataFrame, pl.DataFrame]:
    """(per model, per scope) ranking stability for every dataset and source group."""
    sources = dataset_sources(memberships)
    rows, scopes = [], []
    for kind, name, part in _scopes(labels, sources):
        m = matrix(part)
        cc = complete_case(m.Y, min_coverage)
        base = {"scope_kind": kind, "scope": name}
        if cc.models.size < 2 or cc.rows.size < min_inputs:
            scopes.append({**base, "n_inputs": int(cc.rows.size), "n_models": int(cc.models.size),
                           "skipped": f"{cc.rows.size} complete inputs, {cc.models.size} models"})
            continue
        rs = ranking_stability(
            m.Y[np.ix_(cc.rows, cc.models)], [m.models[j] for j in cc.models], B=B, seed=seed,
            strata=m.strata[cc.rows] if kind == "group" else None, level=level,
            dropped=[m.models[j] for j in cc.dropped],
        )
        rows += [{**base, **r} for r in rs.rows()]
        scopes.append({**base, **_scope_summary(rs), "skipped": None})
    return pl.DataFrame(rows), pl.DataFrame(scopes)


def _scope_summary(rs: RankingStability) -> dict:
    s = rs.summary()
    s["dropped"] = ", ".join(s["dropped"])
    s.pop("B")
    return s


# ---------------------------------------------------------------------------- variants
@dataclass(frozen=True)
class VariantSet:
    """Versions of the same items in one dataset: ``frames[name]`` (item, model, y), compared to
    ``frames[reference]``."""

    dataset: str
    family: str
    reference: str
    frames: dict[str, pl.DataFrame]
    keys: dict[str, str] = field(default_factory=dict)  # name -> the name pooled across datasets

    def key(self, name: str) -> str:
        return self.keys.get(name, name)


def pool_key(primary: str, alt: str) -> str:
    """The part of a variant metric's name that is the same across datasets: the name after the
    prefix it shares with the primary metric, cut at a ``_`` or ``/`` (``art_gpt_score`` of
    ``art_score`` and ``xst_gpt_score`` of ``xst_score`` both pool as ``metric:gpt_score``)."""
    if alt.startswith(primary):  # exact_match@5 of exact_match: its own name
        return f"metric:{alt}"
    i = 0
    while i < min(len(primary), len(alt)) and primary[i] == alt[i]:
        i += 1
    cut = max(primary.rfind("_", 0, i), primary.rfind("/", 0, i))
    return f"metric:{alt[cut + 1:] if cut >= 0 else alt}"


def _rule_for(dataset: str, metric: str, primary: Rule, rules: tuple[Rule, ...]) -> Rule:
    own = next((r for r in rules if r.matches(dataset, metric)), None)
    base = own if own is not None else primary
    return dataclasses.replace(base, metric=metric, dataset=dataset)


def _binarized(outcomes: pl.DataFrame, rule: Rule) -> pl.DataFrame:
    """Labels of one metric's outcomes under ``rule``: ``binarize``'s runs-averaged values and
    label expression, without its rule search and schema check (a variant is built per metric,
    suite and perturbation, so this runs often)."""
    values = outcomes.group_by("input_id", "dataset", "model").agg(pl.col("value").mean())
    return values.select("input_id", "dataset", "model", y=_label_expr(rule).cast(pl.Int8))


def _suite(run_id: pl.Expr) -> pl.Expr:
    """A run's suite: its id without the model part (HELM ``model=...``)."""
    return run_id.str.replace_all(r"model=[^,/]*", "model=*")


def variant_sets(
    outcomes: pl.DataFrame,
    labels: pl.DataFrame,
    memberships: pl.DataFrame,
    rules: tuple[Rule, ...] = DEFAULT_RULES,
) -> list[VariantSet]:
    """Every set of versions of the same items that the store holds (see the module doc)."""
    out: list[VariantSet] = []
    primary = labels.group_by("dataset").agg(pl.col("metric").first(), pl.col("rule").first())
    rule_of = {}
    for d, metric, _ in primary.iter_rows():
        r = next((r for r in rules if r.matches(d, metric)), None)
        if r is not None:
            rule_of[d] = (metric, r)
    plain = outcomes.filter(pl.col("perturbation").is_null())
    # metric variants: another correctness score of the same items
    pairs = plain.select("dataset", "metric").unique().sort("dataset", "metric")
    by_dataset: dict[str, list[str]] = {}
    for d, metric in pairs.iter_rows():
        if d in rule_of and metric != rule_of[d][0] and metric not in NOT_SCORES:
            by_dataset.setdefault(d, []).append(metric)
    for d, metrics in by_dataset.items():
        pm, prule = rule_of[d]
        frames = {f"metric:{pm}": labels.filter(pl.col("dataset") == d).select("input_id", "model", "y")}
        for metric in metrics:
            rule = _rule_for(d, metric, prule, rules)
            part = plain.filter((pl.col("dataset") == d) & (pl.col("metric") == metric))
            if rule.lo is not None and part["value"].min() < rule.lo:
                continue  # not on the primary metric's scale
            if rule.hi is not None and part["value"].max() > rule.hi:
                continue
            frames[f"metric:{metric}"] = _binarized(part, rule).drop("dataset")
        if len(frames) > 1:
            keys = {n: pool_key(pm, n.split(":", 1)[1]) for n in frames if n != f"metric:{pm}"}
            out.append(VariantSet(d, "metric", f"metric:{pm}", frames, keys))
    # run variants: the primary metric in several suites of the same benchmark
    for d, (pm, prule) in sorted(rule_of.items()):
        part = plain.filter((pl.col("dataset") == d) & (pl.col("metric") == pm)).with_columns(
            __suite=_suite(pl.col("run_id")))
        suites = part.group_by("__suite").agg(pl.col("model").n_unique().alias("m"), pl.len().alias("n"))
        if suites.height < 2:
            continue
        shared = part.group_by("model").agg(pl.col("__suite").n_unique().alias("k")).filter(pl.col("k") >= 2)
        if shared.height < 2:
            continue
        order = suites.sort(["n", "__suite"], descending=[True, False])["__suite"].to_list()
        frames = {}
        for s in order:
            sp = part.filter(pl.col("__suite") == s).drop("__suite")
            frames[f"run:{s}"] = _binarized(sp, dataclasses.replace(prule, metric=pm, dataset=d)).drop("dataset")
        out.append(VariantSet(d, "run", f"run:{order[0]}", frames))
    # perturbations: the same source instance, perturbed, matched through the memberships
    out += _version_sets(labels, memberships)
    pert = outcomes.filter(pl.col("perturbation").is_not_null())
    if pert.height:
        inst = memberships.select("input_id", "dataset", "source_instance_id").drop_nulls()
        for d, (pm, prule) in sorted(rule_of.items()):
            pp = pert.filter((pl.col("dataset") == d) & (pl.col("metric") == pm))
            if pp.height == 0:
                continue
            ref = plain.filter((pl.col("dataset") == d) & (pl.col("metric") == pm))
            rule = dataclasses.replace(prule, metric=pm, dataset=d)
            frames = {"perturbation:none": _item(_binarized(ref, rule), inst)}
            for (name,), part in sorted(pp.group_by("perturbation"), key=lambda x: x[0][0]):
                frames[f"perturbation:{name}"] = _item(
                    _binarized(part.with_columns(perturbation=pl.lit(None, pl.String)), rule), inst)
            out.append(VariantSet(d, "perturbation", "perturbation:none", frames))
    return out


VERSION_SUFFIX = r"#v\d+$"  # source instance id of another version of a question (MMLU-Pro)


def _version_sets(labels: pl.DataFrame, memberships: pl.DataFrame) -> list[VariantSet]:
    """Per dataset where models saw some question in different texts (``VERSION_SUFFIX``): the
    labels keyed by question, all of them vs the questions seen in one text by every model."""
    inst = memberships.filter(pl.col("source_instance_id").str.contains(VERSION_SUFFIX))
    if inst.height == 0:
        return []
    datasets = inst["dataset"].unique().to_list()
    keyed = (
        labels.filter(pl.col("dataset").is_in(datasets))
        .join(memberships.select("input_id", "dataset", "source_instance_id"),
              on=["input_id", "dataset"], how="inner")
        .with_columns(question=pl.col("source_instance_id").str.replace(VERSION_SUFFIX, ""))
        .unique(["question", "dataset", "model"], keep="first")
    )
    out = []
    for (d,), part in sorted(keyed.group_by("dataset"), key=lambda x: x[0][0]):
        texts = part.group_by("question").agg(pl.col("input_id").n_unique().alias("n"))
        mixed = texts.filter(pl.col("n") > 1)["question"]
        if mixed.len() == 0:
            continue
        ref = part.select(pl.col("question").alias("input_id"), "model", "y")
        same = ref.filter(~pl.col("input_id").is_in(mixed.implode()))
        out.append(VariantSet(d, "version", "version:as_seen",
                              {"version:as_seen": ref, "version:same_text": same}))
    return out


def _compare_subset(ref: pl.DataFrame, var: pl.DataFrame, name: str, min_coverage: float):
    """The reference's accuracies on all its complete-case items vs on those also in ``var``
    (a subset of the reference's items, e.g. the questions every model saw in one text)."""
    models = sorted(ref["model"].unique().to_list())
    if len(models) < 2:
        return None
    ref = ref.with_columns(dataset=pl.lit(""))
    m = matrix(ref, models=models)
    cc = complete_case(m.Y, min_coverage)
    if cc.models.size < 2:
        return None
    rows = cc.rows
    sub = rows[m.items["input_id"].gather(rows).is_in(var["input_id"].implode()).to_numpy()]
    Y = m.Y[:, cc.models]
    return VariantComparison(
        variant=name, models=[models[j] for j in cc.models],
        acc_original=Y[rows].mean(axis=0) if rows.size else np.full(cc.models.size, np.nan),
        acc_variant=Y[sub].mean(axis=0) if sub.size else np.full(cc.models.size, np.nan),
        n_items=int(sub.size), dropped=[models[j] for j in cc.dropped],
    )


def _item(lab: pl.DataFrame, inst: pl.DataFrame) -> pl.DataFrame:
    """Labels keyed by the source instance id (perturbed texts are other inputs)."""
    return (lab.join(inst, on=["input_id", "dataset"], how="inner")
            .select(pl.col("source_instance_id").alias("input_id"), "model", "y"))


def _compare(ref: pl.DataFrame, var: pl.DataFrame, name: str, min_coverage: float):
    both = pl.concat([ref.with_columns(__v=pl.lit(0)), var.with_columns(__v=pl.lit(1))])
    models = sorted(set(ref["model"].to_list()) & set(var["model"].to_list()))
    if len(models) < 2:
        return None
    both = both.filter(pl.col("model").is_in(models))
    items = both.select("input_id").unique().sort("input_id").with_row_index("__r")
    mcol = {m: j for j, m in enumerate(models)}
    mats = []
    for v in (0, 1):
        part = (both.filter(pl.col("__v") == v).group_by("input_id", "model")
                .agg(pl.col("y").cast(pl.Float64).mean()).join(items, on="input_id"))
        Y = np.full((items.height, len(models)), np.nan)
        Y[part["__r"].to_numpy(), [mcol[m] for m in part["model"]]] = part["y"].to_numpy()
        mats.append(Y)
    return compare_variant(mats[0], mats[1], models, name, min_coverage=min_coverage)


def format_tables(
    sets: list[VariantSet], memberships: pl.DataFrame, *, min_coverage: float = 0.8,
    min_items: int = 10,
) -> tuple[pl.DataFrame, pl.DataFrame]:
    """(per variant, per model) comparisons of every variant with its reference, per dataset
    and pooled per source for variant names present in ≥ 2 datasets of the source."""
    sources = dataset_sources(memberships)
    jobs = []
    for s in sets:
        for name, f in s.frames.items():
            if name != s.reference:
                jobs.append(("dataset", s.dataset, s.family, s.reference, name,
                             s.frames[s.reference], f))
    pooled: dict[tuple, list] = {}
    for s in sets:
        for name, f in s.frames.items():
            if name == s.reference:
                continue
            key = (sources.get(s.dataset, s.dataset.split("/")[0]), s.family,
                   "reference" if s.family == "metric" else s.reference, s.key(name))
            tag = pl.lit(s.dataset + "|")
            pooled.setdefault(key, []).append((
                s.frames[s.reference].with_columns(input_id=tag + pl.col("input_id")),
                f.with_columns(input_id=tag + pl.col("input_id"))))
    for (src, fam, ref, name), parts in pooled.items():
        if len(parts) >= 2:
            jobs.append(("group", src, fam, ref, name, pl.concat([p[0] for p in parts]),
                         pl.concat([p[1] for p in parts])))
    per_variant, per_model = [], []
    for kind, scope, fam, ref, name, rf, vf in jobs:
        vc = (_compare_subset if fam == "version" else _compare)(rf, vf, name, min_coverage)
        if vc is None or vc.n_items < min_items:
            continue
        base = {"scope_kind": kind, "scope": scope, "family": fam, "reference": ref}
        s = vc.summary()
        s["dropped"] = ", ".join(s["dropped"])
        per_variant.append({**base, **s})
        for j, m in enumerate(vc.models):
            per_model.append({**base, "variant": name, "model": m,
                              "acc_reference": float(vc.acc_original[j]),
                              "acc_variant": float(vc.acc_variant[j]), "delta": float(vc.delta[j]),
                              "rank_reference": int(vc.rank_original[j]),
                              "rank_variant": int(vc.rank_variant[j]),
                              "rank_move": int(vc.rank_move[j])})
    return pl.DataFrame(per_variant), pl.DataFrame(per_model)


# ---------------------------------------------------------------------------- RStd
def positions_from_outcomes(outcomes: pl.DataFrame) -> pl.DataFrame | None:
    """(dataset, model, gold, pred) from the ``gold_position`` / ``pred_position`` outcomes, or
    None when the store keeps no answer positions."""
    pos = outcomes.filter(pl.col("metric").is_in(POSITION_METRICS) & pl.col("perturbation").is_null())
    if pos.height == 0:
        return None
    wide = pos.pivot(on="metric", index=["input_id", "dataset", "model", "run_id"], values="value",
                     aggregate_function="first")
    if not set(POSITION_METRICS) <= set(wide.columns):
        return None
    return wide.select("dataset", "model", pl.col(GOLD_POSITION).alias("gold"),
                       pl.col(PRED_POSITION).alias("pred")).drop_nulls("gold")


def rstd_table(positions: pl.DataFrame, memberships: pl.DataFrame | None = None, *,
               min_gold: int = 10) -> pl.DataFrame:
    """RStd per (dataset, model) and per (source group, model) from (dataset, model, gold,
    pred) rows (pred < 0 or null = no valid answer). Positions with fewer than ``min_gold`` gold
    answers in a scope are left out of its RStd (their recall is noise); a source group with a
    single dataset is not repeated."""
    sources = dataset_sources(memberships) if memberships is not None else {}
    rows = []
    with_src = positions.with_columns(__src=pl.col("dataset").str.split("/").list.first())
    if sources:
        with_src = with_src.with_columns(
            __src=pl.col("dataset").replace_strict(sources, default=pl.col("__src"), return_dtype=pl.String))
    for kind, frame, key in (("dataset", positions, "dataset"), ("group", with_src, "__src")):
        if kind == "group":
            multi = frame.group_by(key).agg(pl.col("dataset").n_unique().alias("n")).filter(pl.col("n") > 1)
            frame = frame.join(multi.select(key), on=key, how="semi")
        for (scope, model), part in frame.group_by(key, "model"):
            r = rstd(part["gold"].to_numpy(), part["pred"].fill_null(-1).to_numpy(), min_gold=min_gold)
            rows.append({"scope_kind": kind, "scope": scope, "model": model, "rstd": r.rstd,
                         "rstd_noise": r.noise, "acc": r.acc, "n": r.n,
                         "unanswered": r.n_unanswered,
                         "recall": [None if np.isnan(x) else float(x) for x in r.recall],
                         "pred_share": [float(x) for x in r.pred_share]})
    return pl.DataFrame(rows).sort("scope_kind", "scope", "rstd", descending=[False, False, True]) if rows else pl.DataFrame()


# ---------------------------------------------------------------------------- driver
@dataclass
class StabilitySummary:
    rankings: pl.DataFrame
    ranking_scopes: pl.DataFrame
    variants: pl.DataFrame
    variant_models: pl.DataFrame
    rstd: pl.DataFrame
    router_tasks: pl.DataFrame = field(default_factory=pl.DataFrame)
    router_queries: pl.DataFrame = field(default_factory=pl.DataFrame)
    router_models: pl.DataFrame = field(default_factory=pl.DataFrame)
    notes: list[str] = field(default_factory=list)

    def manifest(self, top: int = 5) -> dict:
        """A small JSON summary (for a bundle manifest): per source group the ranking's τ and
        top model, the least stable datasets, the variants with the lowest τ, the most biased
        models, the routing flip rates, and per model its group rank interval, P(best), RStd
        and routing keep rates."""
        out: dict = {"notes": list(self.notes), "groups": {}, "models": {}}
        rs = self.ranking_scopes
        if rs.height:
            ok = rs.filter(pl.col("skipped").is_null())
            for r in ok.filter(pl.col("scope_kind") == "group").iter_rows(named=True):
                out["groups"][r["scope"]] = {k: r[k] for k in (
                    "n_inputs", "n_models", "tau_mean", "tau_p05", "best", "p_best_top",
                    "max_rank_width", "widest")}
            out["least_stable_datasets"] = (
                ok.filter(pl.col("scope_kind") == "dataset").sort("tau_p05").head(top)
                .select("scope", "tau_mean", "tau_p05", "best", "p_best_top").to_dicts())
        if self.variants.height:
            out["least_stable_variants"] = (
                self.variants.sort("tau", nulls_last=True).head(top)
                .select("scope", "variant", "tau", "max_rank_move", "max_mover").to_dicts())
        if self.rankings.height:
            for r in self.rankings.filter(pl.col("scope_kind") == "group").iter_rows(named=True):
                out["models"].setdefault(r["model"], {})[r["scope"]] = {
                    "acc": r["acc"], "rank": r["rank"], "rank_lo": r["rank_lo"],
                    "rank_hi": r["rank_hi"], "p_best": r["p_best"]}
        if self.rstd.height:
            biggest = self.rstd.filter(pl.col("scope_kind") == "group") if (
                self.rstd["scope_kind"] == "group").any() else self.rstd
            out["most_biased"] = (biggest.sort("rstd", descending=True, nulls_last=True).head(top)
                                  .select("scope", "model", "rstd", "rstd_noise").to_dicts())
            for r in biggest.iter_rows(named=True):
                out["models"].setdefault(r["model"], {}).setdefault("rstd", {})[r["scope"]] = r["rstd"]
        if self.router_tasks.height:
            cols = [c for c in self.router_tasks.columns if c.startswith("flip_") or c == "acc_change"]
            out["routing"] = (self.router_tasks.group_by("group", "method")
                              .agg([pl.col(c).mean() for c in cols]).sort("group", "method").to_dicts())
            out["least_stable_task_choices"] = (
                self.router_tasks.filter(pl.col("method") == "S3").sort("flip_all", descending=True)
                .head(top).select("group", "task", "model", "flip_all", "acc_change", "modal").to_dicts())
        if self.router_models.height:
            for r in self.router_models.iter_rows(named=True):
                out["models"].setdefault(r["model"], {}).setdefault("routing", {})[r["group"]] = {
                    k: r[k] for k in ("tasks_chosen_s3", "task_keep_rate", "queries_routed",
                                      "query_keep_rate")}
        return _jsonable(out)

    def model_fields(self) -> dict[str, dict]:
        """Per model one line of its stability: ``rank``, ``rank_lo``, ``rank_hi``, ``p_best``
        from the ranking where it was ranked on the most inputs (a source group before a
        dataset: ``stability_scope``), and ``rstd`` from the RStd scope with the most items
        (a source group first; ``rstd_scope``; null without answer positions). For a bundle's
        model table."""
        def best(df: pl.DataFrame, size: str) -> pl.DataFrame:
            return (df.sort([pl.col("scope_kind") == "group", size, "scope"],
                            descending=[True, True, False])
                    .unique("model", keep="first", maintain_order=True))

        if self.rankings.height == 0:
            return {}
        sizes = self.ranking_scopes.select("scope_kind", "scope", "n_inputs")
        r = best(self.rankings.join(sizes, on=["scope_kind", "scope"], how="left"), "n_inputs")
        out = {
            row["model"]: {k: row[k] for k in ("rank", "rank_lo", "rank_hi", "p_best")}
            | {"stability_scope": row["scope"], "rstd": None, "rstd_scope": None}
            for row in r.iter_rows(named=True)
        }
        if self.rstd.height:
            for row in best(self.rstd.filter(pl.col("rstd").is_not_nan()), "n").iter_rows(named=True):
                if row["model"] in out:
                    out[row["model"]].update(rstd=row["rstd"], rstd_scope=row["scope"])
        for model, fields in self.router_fields().items():
            if model in out:
                out[model].update(fields)
        return _jsonable(out)

    def router_fields(self) -> dict[str, dict]:
        """Per model its routing-choice stability, pooled over the source groups (empty without
        the routing tables): ``task_choice_n``, the held-out tasks whose S3 choice is the model;
        ``task_choice_keep``, the mean over them of 1 − ``flip_task`` (the probability that the
        choice stays under a bootstrap resample of the task's inputs; null when never chosen);
        ``query_n``, the held-out queries whose argmax-g choice is the model, and
        ``query_keep_rate``, the mean over them of the probability that the choice stays under
        a bootstrap resample of the kNN index (null when none)."""
        if self.router_tasks.height == 0:
            return {}
        s3_ = self.router_tasks.filter(pl.col("method") == "S3")
        tasks = {r["model"]: r for r in s3_.group_by("model").agg(
            pl.len().alias("n"), (1.0 - pl.col("flip_task")).mean().alias("keep")).iter_rows(named=True)}
        rm = self.router_models
        queries = {r["model"]: r for r in rm.group_by("model").agg(
            pl.col("queries_routed").sum().alias("n"),
            (pl.col("query_keep_rate").fill_nan(0.0).fill_null(0.0) * pl.col("queries_routed"))
            .sum().alias("kept")).iter_rows(named=True)} if rm.height else {}
        out = {}
        for model in sorted((set(rm["model"]) if rm.height else set()) | set(tasks)):
            t, q = tasks.get(model), queries.get(model)
            nq = int(q["n"]) if q else 0
            out[model] = {"task_choice_n": int(t["n"]) if t else 0,
                          "task_choice_keep": t["keep"] if t else None,
                          "query_n": nq,
                          "query_keep_rate": q["kept"] / nq if nq else None}
        return _jsonable(out)

    def markdown(self, top: int = 10) -> str:
        parts = []
        if self.ranking_scopes.height:
            ok = self.ranking_scopes.filter(pl.col("skipped").is_null())
            cols = ["scope", "n_inputs", "n_models", "tau_mean", "tau_p05", "best", "p_best_top",
                    "max_rank_width", "widest"]
            parts.append("## Rankings per source group\n\n" + _md(ok.filter(pl.col("scope_kind") == "group").select(cols)))
            parts.append(f"## Least stable dataset rankings (lowest 5th-percentile τ, top {top})\n\n"
                         + _md(ok.filter((pl.col("scope_kind") == "dataset") & (pl.col("n_models") >= 3))
                               .sort("tau_p05").head(top).select(cols)))
        if self.rankings.height:
            g = self.rankings.filter(pl.col("scope_kind") == "group")
            parts.append("## Rank intervals per source group\n\n" + _md(g.drop("scope_kind")))
        if self.variants.height:
            parts.append("## Format sensitivity (τ of each variant's ranking vs its reference)\n\n"
                         + _md(self.variants.sort("tau", nulls_last=True).drop("dropped")))
            mv = self.variant_models.with_columns(am=pl.col("rank_move").abs()).sort("am", descending=True).head(top).drop("am")
            parts.append(f"## Largest rank moves under a variant (top {top})\n\n" + _md(mv))
        if self.rstd.height:
            parts.append(f"## Selection bias (RStd; largest {top} per scope kind)\n\n" + _md(
                pl.concat([p.sort("rstd", descending=True, nulls_last=True).head(top)
                           for _, p in self.rstd.group_by("scope_kind", maintain_order=True)])
                .drop("recall", "pred_share")))
        if self.router_tasks.height:
            rt = self.router_tasks
            variant_cols = [c for c in rt.columns if c.startswith("flip_metric")]
            parts.append("## Task routing under resampling (mean over held-out tasks)\n\n" + _md(
                rt.group_by("group", "method").agg(
                    pl.col("flip_task").mean(), pl.col("flip_all").mean(),
                    pl.col("acc_change").mean(), pl.len().alias("n_tasks")).sort("group", "method")))
            if variant_cols:
                long = rt.unpivot(index=["group", "task", "method"], on=variant_cols,
                                  variable_name="variant", value_name="flip").drop_nulls("flip")
                parts.append("## Task routing under format variants (share of tasks whose choice "
                             "changes)\n\n" + _md(
                    long.group_by("group", "variant", "method").agg(pl.col("flip").mean())
                    .pivot(on="method", index=["group", "variant"], values="flip")
                    .sort("group", "variant")))
            parts.append(f"## Least stable task choices (S3, top {top})\n\n" + _md(
                rt.filter(pl.col("method") == "S3").sort("flip_all", descending=True).head(top)
                .select("group", "task", "model", "n_inputs", "flip_task", "flip_all",
                        "acc_change", "modal", "modal_share", *variant_cols)))
        if self.router_queries.height:
            rq = self.router_queries
            fixed = ["group", "task", "n_inputs", "flip_all", "outcome_change", "quality", "quality_sd"]
            var = [c for c in rq.columns if c.startswith("flip_metric")]
            worst = (rq.select("group", "task", *var).unpivot(index=["group", "task"], on=var)
                     .drop_nulls("value").sort("value", descending=True)
                     .unique(["group", "task"], keep="first")
                     .select("group", "task", pl.col("variable").alias("worst_variant"),
                             pl.col("value").alias("worst_variant_flip"))) if var else None
            q = rq.select(fixed)
            if worst is not None:
                q = q.join(worst, on=["group", "task"], how="left")
            parts.append("## Per-query routing (argmax g) under resampling and variants\n\n"
                         + _md(q.sort("group", "task")))
        if self.notes:
            parts.append("## Notes\n\n" + "\n".join(f"- {n}" for n in self.notes))
        return "\n\n".join(parts)


def _md(df: pl.DataFrame) -> str:
    if df.height == 0:
        return "(none)"
    def cell(v):
        if isinstance(v, float):
            return "–" if np.isnan(v) else f"{v:.3f}"
        if isinstance(v, list):
            return "[" + ", ".join(cell(x) for x in v) + "]"
        return "–" if v is None else str(v)
    lines = ["| " + " | ".join(df.columns) + " |", "|" + "---|" * len(df.columns)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in df.iter_rows()]
    return "\n".join(lines)


def _jsonable(x):
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (np.floating, float)):
        return None if not np.isfinite(x) else float(x)
    if isinstance(x, np.integer):
        return int(x)
    return x


def stability_summary(
    store,
    *,
    B: int = 1000,
    seed: int = 0,
    min_coverage: float = 0.8,
    min_inputs: int = 10,
    rules: tuple[Rule, ...] = DEFAULT_RULES,
    positions: pl.DataFrame | None = None,
    embeddings: tuple[np.ndarray, list[str]] | None = None,
    router_B: int = 200,
    router_sources: list[str] | None = None,
    eval_config=None,
) -> StabilitySummary:
    """All stability tables of a store (``store.read(table)``); see the module docstring.
    ``embeddings`` (X, input ids) turns on the routing-choice tables."""
    labels = store.read("labels")
    memberships = store.read("memberships")
    outcomes = store.read("outcomes")
    notes = []
    rankings, scopes = ranking_tables(labels, memberships, B=B, seed=seed,
                                      min_coverage=min_coverage, min_inputs=min_inputs)
    sets = variant_sets(outcomes, labels, memberships, rules)
    variants, variant_models = format_tables(sets, memberships, min_coverage=min_coverage,
                                             min_items=min_inputs)
    if variants.height and scopes.height and "tau_mean" in scopes.columns:
        # context: how much the ranking moves under resampling alone
        boot = scopes.select("scope_kind", "scope", pl.col("tau_mean").alias("tau_bootstrap"))
        variants = variants.join(boot, on=["scope_kind", "scope"], how="left")
    if not outcomes.filter(pl.col("perturbation").is_not_null()).height:
        notes.append("no perturbed outcomes in the store: no perturbation variants")
    pos = positions_from_outcomes(outcomes)
    if pos is None and positions is None:
        notes.append("no answer positions in the store (outcomes gold_position/pred_position): no RStd")
    pos = positions if positions is not None else pos
    rstd_df = rstd_table(pos, memberships) if pos is not None and pos.height else pl.DataFrame()
    summary = StabilitySummary(rankings, scopes, variants, variant_models, rstd_df, notes=notes)
    if embeddings is not None:
        _router_tables(summary, labels, memberships, outcomes, sets, embeddings, router_B, seed,
                       router_sources, eval_config)
    return summary


def _router_tables(summary, labels, memberships, outcomes, sets, embeddings, B, seed, sources,
                   eval_config):
    from benchroute.transforms.evaluate import BenchmarkArrays, EvalConfig
    from benchroute.transforms.lodo_groups import lodo_groups
    from benchroute.transforms.stability_router import router_stability, variant_arrays

    cfg = eval_config or EvalConfig()
    X, ids = embeddings
    known = set(ids)
    tasks, queries, models = [], [], []
    for g in lodo_groups(labels, memberships):
        if g.skipped or (sources and g.name not in sources):
            continue
        missing = len(set(g.labels["input_id"].unique().to_list()) - known)
        if missing:
            summary.notes.append(f"routing stability of {g.name} skipped: {missing} inputs have no vector")
            continue
        bench = BenchmarkArrays.from_frames(X, ids, g.labels, memberships)
        variants = {}
        mine = [s for s in sets if s.dataset in g.datasets and s.family == "metric"]
        keys = sorted({s.key(n) for s in mine for n in s.frames if n != s.reference})
        for key in keys:
            # the variant where a dataset has it, the group's own labels elsewhere
            parts, covered = [], set()
            for s in mine:
                names = [n for n in s.frames if n != s.reference and s.key(n) == key]
                if names:
                    parts.append(s.frames[names[0]].with_columns(dataset=pl.lit(s.dataset)))
                    covered.add(s.dataset)
            rest = g.labels.filter(~pl.col("dataset").is_in(sorted(covered)))
            parts.append(rest.select("input_id", "model", "y", "dataset"))
            Yv, dyv = variant_arrays(
                bench, pl.concat([p.select("input_id", "model", "y", "dataset") for p in parts]))
            if np.isnan(Yv).sum() > np.isnan(bench.Y).sum():
                summary.notes.append(f"routing under {key} in {g.name} skipped: it does not "
                                     "label every model of the group")
                continue
            variants[key.replace(":", "_")] = (Yv, dyv)
        rs = router_stability(bench, cfg, B=B, seed=seed, variants=variants)
        tag = pl.lit(g.name).alias("group")
        tasks.append(rs.tasks.select(tag, pl.all()))
        queries.append(rs.queries.select(tag, pl.all()))
        models.append(rs.models.select(tag, pl.all()))
    if tasks:
        summary.router_tasks = pl.concat(tasks, how="diagonal_relaxed")
        summary.router_queries = pl.concat(queries, how="diagonal_relaxed")
        summary.router_models = pl.concat(models, how="diagonal_relaxed")
