"""The fit stage: what a router bundle is built from, and the key that says whether it changed.

``FitOptions`` is everything a publish may choose (a ``Selection``, the embedder, a ``RouterSpec``);
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
from benchroute.artifacts.router_build import bundle_content
from benchroute.artifacts.specs import RouterSpec, Selection
from benchroute.artifacts.store import Store
from benchroute.schemas.embeddings import table_name
from benchroute.transforms.fingerprints import digest


def data_key(store: Store, embedder_id: str, sel: Selection, router: RouterSpec) -> str:
    """A digest of everything a bundle is built from, read from the commit log alone (parts are
    immutable, so their names stand for their content), and of the specs whole."""
    commits = store.commits()
    tables = ["labels", "memberships", "models", table_name(embedder_id)]
    units: dict[str, str] = {}
    for c in commits:
        units.update(c.units)
    return digest(
        {t: store.parts(t, commits) for t in tables}, units, sel.key, router.key, code_version()
    )


@dataclass(frozen=True)
class FitOptions:
    """What a publish may choose: the data (``selection``), the ``embedder`` (id or name;
    default the only one stored), whether to ``evaluate`` every source group, and how the
    router is fitted (``router``); ``incremental``: extend the latest version by the models
    added since it where that is possible (``artifacts.router_extend``), else a full build."""

    selection: Selection = Selection()
    embedder: str | None = None
    router: RouterSpec = RouterSpec()
    evaluate: bool = True
    incremental: bool = False


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
    from benchroute.artifacts.router_build import has_labels
    from benchroute.artifacts.stages.evaluate import evaluate_all

    store = Store(store_url)
    embedder_id = pick_embedder(store, options.embedder)
    sel = options.selection
    if not has_labels(store, sel):
        raise ValueError(f"{store_url}: no labels to build a router from ({sel.to_dict()})")
    evaluation = evaluate_all(store, embedder_id, sel, options.router, log=log) if options.evaluate else {}
    return FitInputs(embedder_id, sel, evaluation)


def build_content(store_url: str, name: str = "default", options: FitOptions | None = None, *,
                  log=None) -> BundleContent:
    """Everything a bundle holds, computed from the store (the refresh flow's builder, with the
    evaluation of every source group run here instead of taken from Prefect's cache)."""
    o = options or FitOptions()
    f = fit_inputs(store_url, o, log=log)
    return bundle_content(store_url, name, f.embedder_id, f.selection, f.evaluation, o.router, log=log)
