"""The ``publish`` flow: fit the router on the store and publish it as a versioned bundle.

Thin wiring: the bundle's content from ``artifacts.router_build`` (the same builder the
refresh and backfill flows use), publication from ``artifacts.bundle``.
"""

from __future__ import annotations

import time

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from benchroute.artifacts.bundle import BundleContent
from benchroute.artifacts.router_build import (
    Selection,
    bundle_content,
    evaluation_entry,
    publish_content,
    select_frames,
)
from benchroute.artifacts.store import Store
from benchroute.flows.evaluate import evaluate_groups, pick_embedder
from benchroute.flows.ingest import cards_task
from benchroute.transforms.evaluate import EvalConfig
from benchroute.transforms.router_fit import DEFAULT_PREDICTOR


def build_content(
    store_url: str,
    name: str = "default",
    *,
    sources: list[str] | None = None,
    exclude_models: list[str] | None = None,
    embedder: str | None = None,
    k: int = 10,
    weights: str = "uniform",
    index_dtype: str = "float16",
    evaluate: bool = True,
    predictor: str = DEFAULT_PREDICTOR,
    pairs: list | None = None,
    pair_models: list[str] | None = None,
    index_search: str = "auto",
    log=None,
) -> BundleContent:
    """Everything a bundle holds, computed from the store (the refresh flow's builder, with the
    evaluation of every source group run here instead of taken from Prefect's cache)."""
    store = Store(store_url)
    embedder_id = pick_embedder(store, embedder)
    sel = Selection.of(sources=sources, exclude_models=exclude_models)
    labels, memberships, models = select_frames(store, sel)
    if labels.height == 0:
        raise ValueError(f"{store_url}: no labels to build a router from (sources={sources})")
    evaluation: dict = {}
    if evaluate:
        results, skipped = evaluate_groups(
            store, embedder_id, labels, memberships, models, EvalConfig(k=k, weights=weights),
            exclude_models=exclude_models, log=log,
        )
        evaluation = {g: {"skipped": why} for g, why in skipped.items()}
        evaluation.update({g: evaluation_entry(ev) for g, ev in results.items()})
    return bundle_content(store_url, name, embedder_id, sel, evaluation, k=k, weights=weights,
                          index_dtype=index_dtype, predictor=predictor, pairs=pairs,
                          pair_models=pair_models, index_search=index_search, log=log)


def publish_store(store_url: str, name: str = "default", *, log=None, **kwargs) -> dict:
    """Build and publish; returns version, url, whether a new version was created, seconds."""
    t0 = time.perf_counter()
    return publish_content(store_url, build_content(store_url, name, log=log, **kwargs), started=t0)


@task(cache_policy=NO_CACHE, retries=1, retry_delay_seconds=2)
def publish_task(store: str, name: str, options: dict) -> dict:
    return publish_store(store, name, log=get_run_logger(), **options)


@flow(name="publish")
def publish_flow(
    store: str,
    name: str = "default",
    sources: list[str] | None = None,
    exclude_models: list[str] | None = None,
    embedder: str | None = None,
    k: int = 10,
    weights: str = "uniform",
    index_dtype: str = "float16",
    evaluate: bool = True,
    predictor: str = DEFAULT_PREDICTOR,
    model_cards: str | None = None,
    pairs: list[str] | None = None,
    pair_models: list[str] | None = None,
    index_search: str = "auto",
) -> dict:
    """Fit and publish the router bundle; the bundle summary becomes a Prefect artifact.

    ``model_cards``: a card file over the defaults and the landing-zone card files the store
    recorded (it replaces a card an earlier run gave); the store's card is brought up to date
    first either way. ``pairs`` ("strong,weak") and ``pair_models`` (every pair among them)
    add strong/weak pair routers to the bundle."""
    cards_task(store, [], model_cards)
    result = publish_task(
        store,
        name,
        {
            "sources": sources,
            "exclude_models": exclude_models,
            "embedder": embedder,
            "k": k,
            "weights": weights,
            "index_dtype": index_dtype,
            "evaluate": evaluate,
            "predictor": predictor,
            "pairs": pairs,
            "pair_models": pair_models,
            "index_search": index_search,
        },
    )
    if result["created"]:
        state = "published new version"
    elif result["version"] in result.get("recovered", []):
        state = "finished an interrupted publish: latest moved to"
    else:
        state = "unchanged: kept version"
    create_markdown_artifact(
        key="bundle",
        markdown=(
            f"**{result['name']}** {state} `{result['version']}`\n\n"
            f"- url: `{result['url']}`\n- files: {result['files']}, {result['bytes']:,} bytes\n"
        ),
        description="router bundle",
    )
    get_run_logger().info("%s %s at %s", state, result["version"], result["url"])
    return result
