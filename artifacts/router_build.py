"""A router bundle's content built from a store: the selected labels, the fitted router (kNN
index, kernel), the evaluation summary and the manifest metadata. One builder for every flow
(``publish``, ``refresh``, ``backfill``), so equal data gives an equal bundle whichever ran it.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import polars as pl

from benchroute.artifacts import embeddings as emb_store
from benchroute.artifacts.bundle import BundleContent, BundleStore
from benchroute.artifacts.router import bundle_files, router_parameters
from benchroute.artifacts.store import Store
from benchroute.transforms.evaluate import BenchmarkArrays
from benchroute.transforms.fingerprints import glob_expr
from benchroute.transforms.router_fit import fit_router


@dataclass(frozen=True)
class Selection:
    """Which part of the store a bundle is built from (``None`` = all of it).

    ``sources``: source names (``helm``, ``mmlu_pro``…); ``datasets`` and ``models``: names or
    globs (``mmlu_pro/*``); ``exclude_models``: names left out after that.
    """

    sources: tuple[str, ...] | None = None
    datasets: tuple[str, ...] | None = None
    models: tuple[str, ...] | None = None
    exclude_models: tuple[str, ...] | None = None

    @classmethod
    def of(cls, sources=None, datasets=None, models=None, exclude_models=None) -> Selection:
        t = lambda v: tuple(v) if v else None  # noqa: E731
        return cls(t(sources), t(datasets), t(models), t(exclude_models))

    def to_dict(self) -> dict:
        return {k: list(v) if v else None for k, v in asdict(self).items()}

    @property
    def is_all(self) -> bool:
        return not any(asdict(self).values())


def select_frames(store: Store, sel: Selection) -> tuple[pl.DataFrame, pl.DataFrame, pl.DataFrame]:
    """(labels, memberships, models) of the store, labels restricted to the selection (sources,
    then datasets and models by name or glob, then excluded models by name or glob)."""
    labels = store.read("labels")
    memberships = store.read("memberships")
    models = store.read("models")
    if sel.sources:
        keep = memberships.filter(pl.col("source").is_in(list(sel.sources)))["dataset"].unique()
        labels = labels.filter(pl.col("dataset").is_in(keep.implode()))
    if sel.datasets:
        labels = labels.filter(glob_expr("dataset", sel.datasets))
    if sel.models:
        labels = labels.filter(glob_expr("model", sel.models))
    if sel.exclude_models:
        labels = labels.filter(~glob_expr("model", sel.exclude_models))
    return labels, memberships, models


def evaluation_entry(ev) -> dict:
    """What a bundle's manifest keeps of one group's ``transforms.evaluate`` result: its summary
    numbers and Table 1 with ties broken by training accuracy."""
    t1 = ev.table1.filter(pl.col("ties") == "train_acc")
    return {
        **{k_: v for k_, v in ev.summary.items() if isinstance(v, (int, float, str))},
        "table1": t1.select("method", "acc", "ratio_to_best", "rank").to_dicts(),
    }


def binarization_rules(store: Store) -> list[dict]:
    """The binarization rules of the labels now in the store (from the commit that wrote them)."""
    for c in reversed(store.commits()):
        if "labels" in c.replace:
            return c.info.get("rules", [])
    return []


def bundle_embedder(store: Store, embedder_id: str) -> dict:
    parts = store.parts(f"embeddings/{embedder_id}")
    ident, _ = emb_store.read_part_identity(store, parts[0])
    return {"name": ident.name, "dim": ident.dim, "weights_hash": ident.weights_hash, "id": ident.id}


SUMMARY_DIGITS = 12


def finite(obj):
    """JSON-safe: NaN and inf become null (the manifest is strict JSON); floats keep
    ``SUMMARY_DIGITS`` significant digits (a summary, not data). This absorbs last-bit noise of
    float sums; it does not make evaluations run with different BLAS thread counts equal (there
    kNN near-ties can break differently, up to ~1e-4 relative on all of ../shared/data)."""
    if isinstance(obj, float):
        return float(f"{obj:.{SUMMARY_DIGITS}g}") if obj == obj and abs(obj) != float("inf") else None
    if isinstance(obj, dict):
        return {k: finite(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [finite(v) for v in obj]
    return obj


def bundle_content(
    store_url: str, name: str, embedder_id: str, sel: Selection, evaluation: dict, *,
    k: int = 10, weights: str = "uniform", index_dtype: str = "float16", log=None,
) -> BundleContent:
    """The bundle of the selected data with the given evaluation (see ``evaluation_entry``)."""
    store = Store(store_url)
    labels, memberships, models = select_frames(store, sel)
    if labels.height == 0:
        raise ValueError(f"{store_url}: no labels to build a router from ({sel.to_dict()})")
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
    models_table = models.to_dicts()
    by_name: dict[str, dict] = {}
    for r in models_table:
        by_name.setdefault(r["model"], r)
    return BundleContent(
        name,
        bundle_files(fit, models_table, index_dtype=index_dtype),
        {
            "embedder": bundle_embedder(store, embedder_id),
            "binarization_rules": binarization_rules(store),
            "sources": [{"key": k_, "fingerprint": v} for k_, v in sorted(store.units().items())],
            "parameters": {**router_parameters(fit), "index_dtype": index_dtype},
            "evaluation": finite(evaluation),
            "models": [
                {
                    "model": m,
                    "display_name": by_name[m]["display_name"] if m in by_name else m,
                    "params_b": by_name[m]["params_b"] if m in by_name else None,
                    "cost_per_1k_tokens": None,
                }
                for m in fit.models
            ],
        },
    )


def publish_content(store_url: str, content: BundleContent, *, started: float | None = None) -> dict:
    """Publish ``content`` into the store's bundles (no new version when identical content is
    already published); returns what a flow reports of it. ``started``: a ``perf_counter``
    reading the reported seconds count from (default: now)."""
    from benchroute import code_version

    t0 = time.perf_counter() if started is None else started
    published = BundleStore(store_url).publish(content, code_version=code_version())
    return {
        "name": published.name,
        "version": published.version,
        "url": published.url,
        "created": published.created,
        "files": len(content.files),
        "bytes": sum(len(b) for b in content.files.values()),
        "models": len(content.meta["models"]),
        "content_hash": content.content_hash(),
        "seconds": round(time.perf_counter() - t0, 2),
    }
