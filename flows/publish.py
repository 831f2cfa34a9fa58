"""The ``publish`` flow: fit the router on the store and publish it as a versioned bundle.

Wiring only: bring the store's model card up to date, then ``artifacts.stages.publish``
(``publish_store``: evaluate every group, then ``fit_and_publish``, the refresh's refit step's
path). ``build_content`` and ``publish_store`` are re-exported here for scripts.
"""

from __future__ import annotations

from benchroute.artifacts.specs import RouterSpec, Selection
from benchroute.artifacts.stages.fit import FitOptions, build_content
from benchroute.artifacts.stages.publish import publish_store
from benchroute.flows.pipeline import cards_task
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

__all__ = ["build_content", "publish_flow", "publish_store"]


@task(cache_policy=NO_CACHE, retries=1, retry_delay_seconds=2)
def publish_task(store: str, name: str, options: FitOptions) -> dict:
    return publish_store(store, name, options, log=get_run_logger())


@flow(name="publish")
def publish_flow(
    store: str,
    name: str = "default",
    selection: Selection = Selection(),
    embedder: str | None = None,
    router: RouterSpec = RouterSpec(),
    evaluate: bool = True,
    incremental: bool = False,
    model_cards: str | None = None,
) -> dict:
    """Fit the router on the ``selection`` of the store, as ``router`` says, and publish the
    bundle; the bundle summary becomes a Prefect artifact.

    ``embedder``: the stored embedder's id or name (default: the only one stored);
    ``evaluate``: evaluate every source group into the manifest; ``model_cards``: a card file
    over the defaults and the landing-zone card files the store recorded (it replaces a card an
    earlier run gave); the store's card is brought up to date first either way."""
    cards_task(store, [], model_cards)
    result = publish_task(store, name, FitOptions(selection, embedder, router, evaluate, incremental))
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
