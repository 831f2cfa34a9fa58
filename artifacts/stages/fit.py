"""The fit stage: what a router bundle is built from, and the key that says whether it changed.

``FitOptions`` is everything a publish may choose (selection, embedder, router parameters);
``fit_inputs`` resolves it into the embedder id, the selection and the evaluation the bundle
carries; ``build_content`` fits the router and builds the bundle's files
(``artifacts.router_build.bundle_content``: the router build itself lives there); ``data_key``
is a digest of everything a bundle is built from, read from the commit log alone (the
``fit-and-publish`` task of the refresh and backfill flows is cached under it).
"""

from __future__ import annotations

from dataclasses import dataclass

from benchroute import code_version
from benchroute.artifacts.bundle import BundleContent
from benchroute.artifacts.router_build import Selection, bundle_content
from benchroute.artifacts.store import Store
from benchroute.schemas.embeddings import table_name
from benchroute.transforms.fingerprints import digest
from benchroute.transforms.router_fit import DEFAULT_PREDICTOR


def data_key(store: Store, embedder_id: str, sel: Selection, params: dict) -> str:
    """A digest of everything a bundle is built from, read from the commit log alone (parts are
    immutable, so their names stand for their content)."""
    commits = store.commits()
    tables = ["labels", "memberships", "models", table_name(embedder_id)]
    units: dict[str, str] = {}
    for c in commits:
        units.update(c.units)
    return digest(
        {t: store.parts(t, commits) for t in tables}, units, sel.to_dict(), params, code_version()
    )


@dataclass(frozen=True)
class FitOptions:
    """What a publish may choose: the data (``sources``, ``exclude_models``), the ``embedder``
    (id or name; default the only one stored), whether to ``evaluate`` every source group, and
    the router's parameters (``k``, ``weights``, ``index_dtype``, ``predictor``, ``pairs``
    "strong,weak", ``pair_models``, ``index_search``)."""

    sources: list[str] | None = None
    exclude_models: list[str] | None = None
    embedder: str | None = None
    k: int = 10
    weights: str = "uniform"
    index_dtype: str = "float16"
    evaluate: bool = True
    predictor: str = DEFAULT_PREDICTOR
    pairs: list | None = None
    pair_models: list[str] | None = None
    index_search: str = "auto"

    def router_parameters(self) -> dict:
        """The keyword arguments of ``bundle_content`` (and ``fit_and_publish``) they set."""
        return {"k": self.k, "weights": self.weights, "index_dtype": self.index_dtype,
                "predictor": self.predictor, "pairs": self.pairs,
                "pair_models": self.pair_models, "index_search": self.index_search}


@dataclass(frozen=True)
class FitInputs:
    """What one bundle is fitted from: the embedder's id, the selection and the evaluation
    (``{group: evaluation_entry or {"skipped": why}}``, empty when not evaluated)."""

    embedder_id: str
    selection: Selection
    evaluation: dict


def fit_inputs(store_url: str, options: FitOptions, *, log=None) -> FitInputs:
    """The embedder (asked for, or the only one stored), the selection and, with
    ``options.evaluate``, every source group's evaluation run here (the flows' cached per-group
    evaluation is the same ``evaluate`` stage)."""
    from benchroute.artifacts.embeddings import pick_embedder
    from benchroute.artifacts.router_build import select_frames
    from benchroute.artifacts.stages.evaluate import evaluate_all

    store = Store(store_url)
    embedder_id = pick_embedder(store, options.embedder)
    sel = Selection.of(sources=options.sources, exclude_models=options.exclude_models)
    frames = select_frames(store, sel)
    if frames[0].height == 0:
        raise ValueError(f"{store_url}: no labels to build a router from (sources={options.sources})")
    evaluation = (evaluate_all(store, embedder_id, sel, options.k, options.weights, log=log,
                               frames=frames) if options.evaluate else {})
    return FitInputs(embedder_id, sel, evaluation)


def build_content(store_url: str, name: str = "default", *, log=None, **options) -> BundleContent:
    """Everything a bundle holds, computed from the store (the refresh flow's builder, with the
    evaluation of every source group run here instead of taken from Prefect's cache);
    ``options``: the fields of ``FitOptions``."""
    o = FitOptions(**options)
    f = fit_inputs(store_url, o, log=log)
    return bundle_content(store_url, name, f.embedder_id, f.selection, f.evaluation,
                          **o.router_parameters(), log=log)
