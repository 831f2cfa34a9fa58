"""The ``publish`` flow: fit the router on the store and publish it as a versioned bundle.

Thin wiring: arrays from ``transforms.evaluate``, the fit from ``transforms.router_fit``, the
bundle's files from ``artifacts.router``, publication from ``artifacts.bundle``.
"""

from __future__ import annotations

import time

import polars as pl
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from benchroute import __version__
from benchroute.artifacts import embeddings as emb_store
from benchroute.artifacts.bundle import BundleContent, BundleStore
from benchroute.artifacts.router import bundle_files, router_parameters
from benchroute.artifacts.store import Store
from benchroute.flows.evaluate import evaluate_groups, pick_embedder
from benchroute.transforms.evaluate import BenchmarkArrays, EvalConfig
from benchroute.transforms.router_fit import fit_router


def _rules(store: Store) -> list[dict]:
    """The binarization rules of the labels now in the store (from the commit that wrote them)."""
    for c in reversed(store.commits()):
        if "labels" in c.replace:
            return c.info.get("rules", [])
    return []


def _identity(store: Store, embedder_id: str) -> dict:
    parts = store.parts(f"embeddings/{embedder_id}")
    ident, _ = emb_store.read_part_identity(store, parts[0])
    return {"name": ident.name, "dim": ident.dim, "weights_hash": ident.weights_hash, "id": ident.id}


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
    log=None,
) -> BundleContent:
    """Everything a bundle holds, computed from the store (deterministic for a given store)."""
    store = Store(store_url)
    embedder_id = pick_embedder(store, embedder)
    labels = store.read("labels")
    memberships = store.read("memberships")
    models = store.read("models")
    if sources:
        keep = memberships.filter(pl.col("source").is_in(sources))["dataset"].unique()
        labels = labels.filter(pl.col("dataset").is_in(keep))
    if exclude_models:
        labels = labels.filter(~pl.col("model").is_in(exclude_models))
    if labels.height == 0:
        raise ValueError(f"{store_url}: no labels to build a router from (sources={sources})")
    ids = sorted(labels["input_id"].unique().to_list())
    X, ids = emb_store.read_matrix(store, embedder_id, ids)
    bench = BenchmarkArrays.from_frames(X, ids, labels, memberships, models)
    t0 = time.perf_counter()
    fit = fit_router(bench, k=k, weights=weights)
    if log:
        log.info(
            "fitted router: %d inputs, %d models, %d datasets in %.1f s",
            len(fit.input_ids), len(fit.models), len(fit.datasets), time.perf_counter() - t0,
        )
    evaluation: dict = {}
    if evaluate:
        results, skipped = evaluate_groups(
            store, embedder_id, labels, memberships, models, EvalConfig(k=k, weights=weights),
            exclude_models=exclude_models, log=log,
        )
        evaluation = {g: {"skipped": why} for g, why in skipped.items()}
        for g, ev in results.items():
            t1 = ev.table1.filter(pl.col("ties") == "train_acc")
            evaluation[g] = {
                **{k_: v for k_, v in ev.summary.items() if isinstance(v, (int, float, str))},
                "table1": t1.select("method", "acc", "ratio_to_best", "rank").to_dicts(),
            }
    models_table = models.to_dicts()
    content = BundleContent(
        name,
        bundle_files(fit, models_table, index_dtype=index_dtype),
        {
            "embedder": _identity(store, embedder_id),
            "binarization_rules": _rules(store),
            "sources": [{"key": k_, "fingerprint": v} for k_, v in sorted(store.units().items())],
            "parameters": {**router_parameters(fit), "index_dtype": index_dtype},
            "evaluation": _finite(evaluation),
            "models": [
                {
                    "model": m,
                    "display_name": next((r["display_name"] for r in models_table if r["model"] == m), m),
                    "params_b": next((r["params_b"] for r in models_table if r["model"] == m), None),
                    "cost_per_1k_tokens": None,
                }
                for m in fit.models
            ],
        },
    )
    return content


SUMMARY_DIGITS = 12


def _finite(obj):
    """JSON-safe: NaN and inf become null (the manifest is strict JSON); floats keep
    ``SUMMARY_DIGITS`` significant digits. The last bits of a float sum depend on thread count
    and memory alignment, and equal data must give an equal manifest (and content hash) wherever
    it was computed."""
    if isinstance(obj, float):
        return float(f"{obj:.{SUMMARY_DIGITS}g}") if obj == obj and abs(obj) != float("inf") else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_finite(v) for v in obj]
    return obj


def publish_store(store_url: str, name: str = "default", *, log=None, **kwargs) -> dict:
    """Build and publish; returns version, url, whether a new version was created, seconds."""
    t0 = time.perf_counter()
    content = build_content(store_url, name, log=log, **kwargs)
    published = BundleStore(store_url).publish(content, code_version=__version__)
    return {
        "name": published.name,
        "version": published.version,
        "url": published.url,
        "created": published.created,
        "files": len(content.files),
        "bytes": sum(len(b) for b in content.files.values()),
        "seconds": round(time.perf_counter() - t0, 2),
    }


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
) -> dict:
    """Fit and publish the router bundle; the bundle summary becomes a Prefect artifact."""
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
        },
    )
    state = "published new version" if result["created"] else "unchanged: kept version"
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
