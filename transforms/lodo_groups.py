"""Which datasets are evaluated together: one leave-one-dataset-out benchmark per source.

Models are only compared on data where they all have labels, and sources differ in their model
sets (MMLU-Pro 28 models, HELM Safety 12, RouteLLM 2, AlpacaEval 58…), so each source is its
own benchmark: its datasets, restricted to the models labelled on every one of them. Where that
leaves too few models (a leaderboard whose models each ran only some of its benchmarks), the
group is the largest complete block of datasets × models that ``complete_block`` finds, and the
datasets it leaves out are named (``dropped_datasets``). A source with too few datasets or
models even so is skipped, with the reason.

Within a group each dataset is held out in turn, together with its *family* (``dataset_family``):
the parts of one benchmark that a source splits into several datasets. HELM's MMLU is one
dataset per subject (``helm/mmlu/subject=anatomy``...): holding out one subject while the other
56 stay in the index would test a task the router has mostly seen, so every ``helm/mmlu/...``
dataset is held out with it. A HELM ``dataset=`` argument names a benchmark of its own
(``helm/commonsense/dataset=hellaswag`` and ``.../dataset=openbookqa`` are two families).
Datasets of other sources are their own family.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np
import polars as pl


HELM_PREFIX = "helm/"
# A HELM argument that names a benchmark of its own, not a part of one (commonsense:dataset=).
HELM_BENCHMARK_ARGS = ("dataset",)


def dataset_family(dataset: str) -> str:
    """The datasets held out together with ``dataset`` share this name (module docstring):
    ``helm/<scenario>`` plus any ``HELM_BENCHMARK_ARGS`` of a HELM dataset, else the name."""
    if not dataset.startswith(HELM_PREFIX):
        return dataset
    scenario, _, args = dataset[len(HELM_PREFIX) :].partition("/")
    keep = [a for a in args.split(",") if a.partition("=")[0] in HELM_BENCHMARK_ARGS] if args else []
    return f"{HELM_PREFIX}{scenario}" + (f"/{','.join(keep)}" if keep else "")


def same_family(datasets: list[str]) -> np.ndarray:
    """(D × D bool): whether datasets i and j are of one family (the diagonal is true)."""
    fam = np.array([dataset_family(d) for d in datasets], dtype=object)
    return fam[:, None] == fam[None, :] if len(datasets) else np.zeros((0, 0), bool)


@dataclass(frozen=True)
class Group:
    """One source's benchmark: its datasets, the models labelled on every one of them, the
    ``labels`` of those (None where the group was planned from ``label_coverage`` alone, as a
    store too large to hold its labels as one frame plans it), the other models seen, and why it
    is not evaluated (None = evaluated)."""

    name: str
    datasets: list[str]
    models: list[str]
    labels: pl.DataFrame | None = None
    dropped_models: list[str] = field(default_factory=list)
    skipped: str | None = None
    dropped_datasets: list[str] = field(default_factory=list)


def group_shapes(
    coverage: pl.DataFrame,
    memberships: pl.DataFrame,
    *,
    min_datasets: int = 3,
    min_models: int = 2,
    exclude_models: list[str] | tuple[str, ...] = (),
) -> list[Group]:
    """The groups of ``lodo_groups`` from the labels' distinct (dataset, model) pairs alone
    (``coverage``; a leaderboard's are ~1 M of its 300 M labels), without their labels. A
    source where fewer than ``min_models`` models are labelled on all its datasets takes the
    ``complete_block`` of its coverage instead."""
    dataset_source = (
        memberships.select("dataset", "source")
        .unique()
        .sort("source")
        .unique("dataset", keep="first")  # a dataset fed by two sources goes to the first
    )
    cov = (coverage.select("dataset", "model").unique()
           .filter(~pl.col("model").is_in(list(exclude_models)))
           .join(dataset_source, on="dataset", how="inner"))
    groups = []
    for (source,), part in cov.group_by("source", maintain_order=False):
        datasets = sorted(part["dataset"].unique().to_list())
        n_of = part.group_by("model").agg(pl.col("dataset").n_unique().alias("n"))
        models = sorted(n_of.filter(pl.col("n") == len(datasets))["model"].to_list())
        dropped_datasets = []
        if len(models) < min_models and len(datasets) > min_datasets:
            all_models = sorted(n_of["model"].to_list())
            cover = np.zeros((len(all_models), len(datasets)), bool)
            cover[np.searchsorted(all_models, part["model"].to_numpy()),
                  np.searchsorted(datasets, part["dataset"].to_numpy())] = True
            keep_d, keep_m = complete_block(cover, min_datasets=min_datasets, min_models=min_models)
            if keep_m.sum() >= min_models:
                dropped_datasets = [d for d, k in zip(datasets, keep_d) if not k]
                datasets = [d for d, k in zip(datasets, keep_d) if k]
                models = [m for m, k in zip(all_models, keep_m) if k]
        dropped = sorted(set(n_of["model"].to_list()) - set(models))
        skipped = None
        if len(datasets) < min_datasets:
            skipped = f"{len(datasets)} dataset(s); leave-one-dataset-out needs {min_datasets}"
        elif len(models) < min_models:
            skipped = f"{len(models)} model(s) labelled on every dataset; need {min_models}"
        groups.append(Group(source, datasets, models, None, dropped, skipped, dropped_datasets))
    return sorted(groups, key=lambda g: g.name)


def complete_block(cover: np.ndarray, *, min_datasets: int, min_models: int) -> tuple[np.ndarray, np.ndarray]:
    """A complete block of a coverage matrix (``cover``: models × datasets, bool): dataset and
    model masks such that every kept model is labelled on every kept dataset, with as many
    labels (models × datasets) as greedy peeling finds, at least ``min_datasets`` ×
    ``min_models``; all-false masks when none is.

    Peeling drops one dataset at a time, the one that brings the models nearest to complete (a
    model missing c of the kept datasets weighs 2^-(c-1) on each of them: a model missing only
    that dataset counts most), and keeps the largest block seen. Ties go to the first dataset,
    so one coverage gives one block. Finding the largest block is NP-hard (maximum edge
    biclique); this is a few matrix passes per dataset."""
    n_models, n_datasets = cover.shape
    keep = np.ones(n_datasets, bool)
    best, best_keep, best_full = 0, np.zeros(n_datasets, bool), np.zeros(n_models, bool)
    while keep.sum() >= max(min_datasets, 1):
        gaps = ~cover[:, keep]
        missing = gaps.sum(axis=1)
        full = missing == 0
        area = int(full.sum()) * int(keep.sum())
        if full.sum() >= min_models and area > best:
            best, best_keep, best_full = area, keep.copy(), full
        if keep.sum() == max(min_datasets, 1):
            break
        weight = np.where(full, 0.0, np.exp2(-(missing - 1.0)))
        keep[np.flatnonzero(keep)[int(np.argmax(weight @ gaps))]] = False
    return best_keep, best_full


def group_filter(group: Group) -> pl.Expr:
    """The labels of ``group``: its datasets and its models."""
    return pl.col("dataset").is_in(group.datasets) & pl.col("model").is_in(group.models)


def lodo_groups(
    labels: pl.DataFrame,
    memberships: pl.DataFrame,
    *,
    min_datasets: int = 3,
    min_models: int = 2,
    exclude_models: list[str] | tuple[str, ...] = (),
) -> list[Group]:
    """One group per source: datasets of that source, models labelled on all of them, with
    their labels (``group_shapes`` of the labels' coverage)."""
    shapes = group_shapes(labels.select("dataset", "model"), memberships, min_datasets=min_datasets,
                          min_models=min_models, exclude_models=exclude_models)
    return [replace(g, labels=labels.filter(group_filter(g))) for g in shapes]
