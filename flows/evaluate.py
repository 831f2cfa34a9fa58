"""The ``evaluate`` flow: the paper's leave-one-dataset-out evaluation on what the store holds,
with its report as a Prefect artifact.

Wiring only: the evaluation is ``artifacts.stages.evaluate.evaluate_store`` (re-exported here with
``pick_embedder`` and ``routing_groups`` for scripts).
"""

from __future__ import annotations

from fsspec.core import url_to_fs
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from benchroute.artifacts.stages.evaluate import (
    STABILITY_B,
    EvaluationError,
    evaluate_store,
    pick_embedder,
    routing_groups,
)
from benchroute.transforms.evaluate import EvalConfig

__all__ = ["EvaluationError", "evaluate_flow", "evaluate_store", "pick_embedder", "routing_groups"]


@task(cache_policy=NO_CACHE, retries=1)
def evaluate_task(store: str, out: str, embedder: str | None, config: EvalConfig, sources, exclude,
                  predictors=None, routing_splits=("random", "lodo"),
                  stability_B: int = STABILITY_B) -> dict:
    return evaluate_store(
        store, out, embedder=embedder, config=config, sources=sources, exclude_models=exclude,
        predictors=predictors, routing_splits=tuple(routing_splits), stability_B=stability_B,
        log=get_run_logger(),
    )


@flow(name="evaluate")
def evaluate_flow(
    store: str,
    out: str,
    embedder: str | None = None,
    k: int = 10,
    weights: str = "uniform",
    seed: int = 0,
    sources: list[str] | None = None,
    exclude_models: list[str] | None = None,
    predictors: list[str] | None = None,
    routing_splits: list[str] | None = None,
    stability_B: int = STABILITY_B,
) -> dict:
    """Run the evaluation and publish its Markdown report as a Prefect artifact
    (``stability_B`` = 0: no stability section)."""
    config = EvalConfig(k=k, weights=weights, seed=seed)
    splits = ("random", "lodo") if routing_splits is None else tuple(routing_splits)
    result = evaluate_task(store, out, embedder, config, sources, exclude_models, predictors, splits,
                           stability_B)
    fs, _ = url_to_fs(out)
    markdown = fs.cat_file(result["paths"]["markdown"]).decode("utf-8")
    create_markdown_artifact(markdown=markdown[:100_000], key="evaluation", description="LODO evaluation")
    return result
