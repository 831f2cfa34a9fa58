"""The publish stage: fit the router and publish it as a bundle version, by one path.

``fit_and_publish`` builds the bundle (``stages.fit``, ``artifacts.router_build``) from a given
evaluation and publishes it (``artifacts.bundle``: no new version when identical content is
already published). The ``refresh`` and ``backfill`` flows call it with the evaluation of their
cached per-group tasks; ``publish_store`` (the ``publish`` flow) with one computed here.
"""

from __future__ import annotations

import time

from benchroute.artifacts.router_build import bundle_content, publish_content
from benchroute.artifacts.specs import RouterSpec, Selection
from benchroute.artifacts.stages.fit import FitOptions, fit_inputs


def fit_and_publish(
    store_url: str, name: str, embedder_id: str, sel: Selection, evaluation: dict,
    router: RouterSpec | None = None, *, log=None, started: float | None = None,
    incremental: bool = False,
) -> dict:
    """Fit, build and publish; returns name, version, url, whether a new version was created,
    files, bytes, seconds (``publish_content``) and ``extended``: the base version when the
    bundle is the latest one extended by new models (``incremental``: tried first, see
    ``artifacts.router_extend``; where it cannot be, the reason is logged and a full build runs)."""
    from benchroute.artifacts.router_extend import (
        ExtensionError,
        built_from_parts,
        extend_content,
        extension_plan,
        record_built_from,
    )
    from benchroute.artifacts.store import Store

    t0 = time.perf_counter() if started is None else started
    router = router or RouterSpec()
    basis = built_from_parts(Store(store_url))  # before the build: see built_from_parts
    content, base = None, None
    if incremental:
        plan = (extension_plan(store_url, name, embedder_id, sel, router, basis) if not evaluation
                else "an evaluation was asked for (it needs a full build)")
        if not isinstance(plan, str):
            try:
                content = extend_content(store_url, name, embedder_id, sel, router, plan, log=log)
                base = plan.base.manifest["version"]
            except ExtensionError as exc:
                plan = str(exc)
        if isinstance(plan, str) and log:
            log.info("incremental publish not possible, building in full: %s", plan)
    if content is None:
        content = bundle_content(store_url, name, embedder_id, sel, evaluation, router, log=log)
    published = publish_content(store_url, content, started=t0)
    try:
        record_built_from(store_url, name, published["version"], basis)
    except (RuntimeError, OSError) as exc:  # no sealing key here: later extensions build in full
        if log:
            log.warning("could not record the parts %s was built from (%s): a later --incremental "
                        "publish will build in full", published["version"], exc)
    return {**published, "extended": base}


def publish_store(store_url: str, name: str = "default", options: FitOptions | None = None, *,
                  log=None) -> dict:
    """Evaluate every group of the selection (unless ``options.evaluate`` is false), then
    ``fit_and_publish``."""
    t0 = time.perf_counter()
    o = options or FitOptions()
    f = fit_inputs(store_url, o, log=log)
    return fit_and_publish(store_url, name, f.embedder_id, f.selection, f.evaluation, o.router,
                           log=log, started=t0, incremental=o.incremental)
