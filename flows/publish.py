"""The ``publish`` flow: fit the router on the store and publish it as a versioned bundle.

Wiring only: bring the store's model card up to date, then ``artifacts.stages.publish``
(``publish_store``: evaluate every group, then ``fit_and_publish``, the refresh's refit step's
path). ``build_content`` and ``publish_store`` are re-exported here for scripts.
"""

from __future__ import annotations

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from benchroute.artifacts.stages.fit import build_content
from benchroute.artifacts.stages.publish import publish_store
from benchroute.flows.pipeline import cards_task
from benchroute.transforms.router_fit import DEFAULT_PREDICTOR

__all__ = ["build_content", "publish_flow", "publish_store"]


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
