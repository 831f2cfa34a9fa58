"""A published bundle extended by models whose results landed after it was built, without a refit
of what they do not change (issue 16: one new model on a 100k × 4,000 leaderboard).

A full build of a leaderboard bundle takes most of an hour (the kNN self-search, the MLP over 4,000
outputs, the held-out routing curve's second MLP). One new model changes little of it:

- its label column (the index rows and every other column stay);
- its p(d, m) on every dataset: measured from the neighbours the base bundle measured p with (its
  ``build/lodo_*.npy``, ``router_fit.LodoNeighbors``; neighbours do not depend on labels), so no
  search; u(d) is unchanged and the kernel's bandwidth is chosen again over all of p;
- its output of the correctness predictor: for the MLP a logistic output unit fitted on the
  frozen hidden layer of the base network (IRLS, deterministic); the other models' units are the
  base's. The kNN predictor needs nothing (it reads the labels);
- its price, expected output tokens and training accuracy, and so the reference model and cost.

The held-out routing curve and its summary are the base's, measured without the new models: the
curve's predictor is fitted on 80 % of the inputs and a warm start from the full-data network would
leak the other 20 %. ``parameters.extension`` says so; the next full build measures it again.

``extension_plan`` decides whether a bundle can be extended and says why not otherwise (a full
build then runs): the base is the latest version of the name, verified like any consumer's load; it
was built with the same selection, router spec and embedder, without evaluation, stability or pair
routers, with an extendable predictor and the build files; the store's label and outcome parts
are those the base was built from (``built_from_parts``, recorded beside the bundle, sealed)
plus new ones; the new labels (within the selection) are all of models the base does not hold,
on its inputs and on datasets its kernel scored; the memberships and vectors of its inputs are
unchanged; the outcome parts added hold no model the base holds; and the models added without a
refit over the whole chain of extensions stay within ``MAX_UNMEASURED_SHARE`` (10 %, at least
one) of the last full build's models — they are in no held-out curve and shaped no hidden layer.
The new models' arrays are made in the full build's float type (``evaluate.dense_dtype``) by the
same functions, so what is kept equals a full build's (``tests/test_router_extend.py``).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass

import numpy as np
import polars as pl

from benchroute.artifacts import embeddings as emb_store
from benchroute.artifacts.bundle import BundleContent, BundleStore, VerifiedBundle, open_bundle
from benchroute.artifacts.router import (
    ANN_PREFIX,
    LABELS_PREFIX,
    LODO_FILES,
    LODO_PREFIX,
    bundle_files,
    predictor_arrays,
    router_parameters,
)
from benchroute.artifacts.specs import RouterSpec, Selection
from benchroute.artifacts.store import Store, recorded_part_models
from benchroute.transforms import costs as costs_
from benchroute.transforms.evaluate import (
    LabelScatter,
    _positions,
    dataset_accuracies,
    dense_dtype,
    mean_over_datasets,
    model_sizes,
)
from benchroute.transforms.kernel import fallback_totals, train_mean
from benchroute.transforms.knn import aggregate_labels, normalize_rows
from benchroute.transforms.label_matrix import column_means, labelled_counts, row_blocks
from benchroute.transforms.lodo_groups import same_family
from benchroute.transforms.model_cards import cards_for
from benchroute.transforms.predictors import dense_forward, make_predictor, predictor_from_state, sigmoid
from benchroute.transforms.router_fit import LodoNeighbors, RouterFit, fit_kernel
from benchroute.transforms.routing_eval import CostData, DecisionCosts, unrecorded_tokens
from benchroute.transforms.scores import binarized_accuracy

EXTENDABLE_PREDICTORS = ("mlp", "knn")
HEAD_L2 = 1.0  # ridge on a new output unit's weights, in units of one label's log-loss
# Models an extension chain may add since the last full build, as a share of that build's models
# (at least one): they are in no held-out routing curve and shaped no hidden layer.
MAX_UNMEASURED_SHARE = 0.10


BUILT_FROM_DIR = "_cache/built_from"


def built_from_parts(store: Store) -> dict:
    """The parts a bundle is built from: what an extension by models that land later diffs
    against. Taken before a build starts (a store that grows meanwhile only makes the record
    older than the bundle: the extension then finds labels of models the base holds, and a full
    build runs), kept beside the bundle (``record_built_from``), not in it: part names are the
    store's, and equal data must give an equal bundle in any store."""
    return {"labels": store.parts("labels"), "outcomes": store.parts("outcomes")}


def _built_from_path(store_url: str, name: str, version: str) -> str:
    return f"{store_url.rstrip('/')}/{BUILT_FROM_DIR}/{name}/{version}.json"


def _built_from_body(name: str, version: str, basis: dict) -> bytes:
    return json.dumps({"name": name, "version": version, "basis": basis}, sort_keys=True).encode()


def record_built_from(store_url: str, name: str, version: str, basis: dict) -> None:
    """Remember the parts bundle ``name`` ``version`` was built from, tagged like the refresh's
    records (``benchroute.sealing``: an HMAC under a key that is not in the store)."""
    from benchroute import sealing
    from benchroute.io import atomic_put
    from fsspec.core import url_to_fs

    fs, path = url_to_fs(_built_from_path(store_url, name, version))
    fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
    tag = sealing.tag(f"built_from/{name}/{version}", _built_from_body(name, version, basis)).decode()
    atomic_put(fs, path, json.dumps({"name": name, "version": version, "basis": basis, "tag": tag}).encode())


def recorded_built_from(store_url: str, name: str, version: str) -> dict | None:
    """The parts ``record_built_from`` recorded for the version, or None when absent, malformed or not
    tagged under this machine's key (then no extension: a full build)."""
    from benchroute import sealing
    from fsspec.core import url_to_fs

    fs, path = url_to_fs(_built_from_path(store_url, name, version))
    try:
        rec = json.loads(fs.cat_file(path))
    except (FileNotFoundError, ValueError, UnicodeDecodeError):
        return None
    basis = rec.get("basis") if isinstance(rec, dict) else None
    ok = (isinstance(basis, dict) and isinstance(rec.get("tag"), str)
          and all(isinstance(basis.get(t), list) and all(isinstance(p, str) for p in basis[t])
                  for t in ("labels", "outcomes")))
    try:
        sealed = ok and sealing.verifies(f"built_from/{name}/{version}", _built_from_body(name, version, basis),
                                         rec["tag"].encode())
    except RuntimeError:  # no sealing key on this machine: nothing recorded can be trusted
        sealed = False
    return basis if sealed else None


class ExtensionError(RuntimeError):
    """Found while extending (after the plan): the extension would not be what the base kept."""


@dataclass(frozen=True)
class ExtensionPlan:
    """A base bundle and what the store holds beyond it: the new labels (within the selection)
    and the outcome parts to read the added models' tokens from."""

    base: VerifiedBundle
    labels: pl.DataFrame
    token_parts: list[str]  # outcome parts that may hold the added models' output lengths


def extension_plan(store_url: str, name: str, embedder_id: str, sel: Selection,
                   router: RouterSpec, parts_now: dict | None = None) -> ExtensionPlan | str:
    """The plan of extending ``name``'s latest version to the store's data, or why it cannot be
    (a sentence: then a full build runs). ``parts_now``: ``built_from_parts`` of the store taken
    by the caller (the one it records for the new version; default: now)."""
    from benchroute.artifacts.router_build import LABEL_COLUMNS, selection_filter

    store = Store(store_url)
    if router.predictor not in EXTENDABLE_PREDICTORS:
        return f"predictor {router.predictor!r} cannot be extended (only {', '.join(EXTENDABLE_PREDICTORS)})"
    if BundleStore(store_url).ref(name) is None:
        return f"no published bundle {name!r} to extend"
    base = open_bundle(store_url, name)  # verified: every file against its hash
    m = base.manifest
    params = m.get("parameters") or {}
    if m.get("spec") != {"selection": sel.to_dict(), "router": router.to_dict()}:
        return "the base was built with another selection or router spec"
    if (m.get("embedder") or {}).get("id") != embedder_id:
        return "the base was built with another embedder"
    if m.get("evaluation") or m.get("stability") or "pairs" in params:
        return "the base carries an evaluation, stability or pair routers (they need a full build)"
    if not all(f"{LODO_PREFIX}{f}.npy" in base.files for f in LODO_FILES):
        return "the base has no build files (built before extensions existed)"
    basis = recorded_built_from(store_url, name, m["version"])
    now = parts_now if parts_now is not None else built_from_parts(store)
    if basis is None:
        return "no verified record of the parts the base was built from (built elsewhere, or before extensions)"
    for table in ("labels", "outcomes"):
        old = list(basis.get(table) or [])
        if now[table][: len(old)] != old:
            return f"the store's {table} were rewritten since the base (a relabel or a replace)"
    label_parts = now["labels"][len(basis["labels"]):]
    outcome_parts = now["outcomes"][len(basis["outcomes"]):]
    if not label_parts:
        return "no new labels since the base"
    memberships = store.read("memberships")
    keep = selection_filter(memberships, sel)
    labels = pl.concat([store.read_parts("labels", [rel], LABEL_COLUMNS).filter(keep) for rel in label_parts],
                       how="vertical_relaxed")
    if labels.height == 0:
        return "no new labels in the selection since the base"
    base_models = set(_base_models(base))
    overlap = sorted(set(labels["model"].unique()) & base_models)
    if overlap:
        return f"new labels of models the base holds ({', '.join(overlap[:3])}…): a full build"
    drift = _unmeasured_share(params.get("extension"), len(base_models), labels["model"].n_unique())
    if drift:
        return drift
    ids = base.json("index/input_ids.json")
    if not labels["input_id"].is_in(ids).all():
        return "new labels on inputs the base does not index"
    datasets = base.json("datasets.json")
    if not labels["dataset"].is_in(datasets).all():
        return "new labels on datasets the base does not hold"
    u = base.npy("kernel/u.npy")
    unscored = [d for d in labels["dataset"].unique().to_list() if np.isnan(u[datasets.index(d)])]
    if unscored:  # the base's kernel left them out (no label there): a full build may not
        return f"new labels on datasets the base's kernel did not score ({', '.join(unscored[:3])})"
    member = base.npy("index/members.npy")
    mem = memberships.filter(pl.col("input_id").is_in(ids)).select("input_id", "dataset").unique()
    pairs = pl.concat([mem, labels.select("input_id", "dataset").unique()]).unique()
    if not pairs["dataset"].is_in(datasets).all() or pairs.height != int(member.sum()):
        return "the memberships of the base's inputs changed"
    rows, cols = _positions(pairs["input_id"], ids), _positions(pairs["dataset"], datasets)
    if not member[rows, cols].all():
        return "the memberships of the base's inputs changed"
    recorded = recorded_part_models(store.commits())
    for rel in outcome_parts:
        held = recorded[rel] if rel in recorded else set(
            store.read_parts("outcomes", [rel], ["model"])["model"].unique().to_list())
        if held & base_models:
            return f"outcomes of models the base holds were added ({rel})"
    # The added models' recorded output tokens, wherever they are: their outcomes may have been
    # committed before the base was built and their labels after (ingest commits, then relabels).
    added = set(labels["model"].unique().to_list())
    token_parts = [rel for rel in now["outcomes"] if rel not in recorded or recorded[rel] & added]
    return ExtensionPlan(base, labels, token_parts)


def extension_chain(extension: dict | None) -> list[dict]:
    """A bundle's ``parameters.extension`` and the ones it extends, newest first."""
    chain = []
    while isinstance(extension, dict):
        chain.append(extension)
        extension = extension.get("extends")
    return chain


def _unmeasured_share(extension: dict | None, n_base: int, n_new: int) -> str | None:
    """Why the models added without a refit would be too many, or None: the routing curve and the
    hidden layer are the last full build's, fitted on its models; past ``MAX_UNMEASURED_SHARE``
    of them added since (and more than one model), a full build measures the router again."""
    added = sum(len(e.get("added_models") or []) for e in extension_chain(extension))
    fitted = n_base - added  # the models of the last full build
    if added + n_new > max(1.0, MAX_UNMEASURED_SHARE * fitted):
        return (f"{added + n_new} models added without a refit since the last full build would pass "
                f"{MAX_UNMEASURED_SHARE:.0%} of its {fitted}: a full build measures the router on them")
    return None


def _base_models(base: VerifiedBundle) -> list[str]:
    return base.parquet("models.parquet").column("model").to_pylist()


def logistic_head(H: np.ndarray, y: np.ndarray, *, l2: float = HEAD_L2, max_iter: int = 50,
                  tol: float = 1e-8) -> tuple[np.ndarray, float]:
    """(w, b) minimising Σ_i BCE(σ(h_i·w + b), y_i) + l2/2 · ‖w‖² by Newton's method (IRLS) over
    the rows with a label (y may be a mean of labels in [0, 1]); no label: w = 0, b = 0."""
    ok = ~np.isnan(y)
    if not ok.any():
        return np.zeros(H.shape[1], np.float32), 0.0
    A = np.hstack([np.asarray(H[ok], np.float64), np.ones((int(ok.sum()), 1))])
    t = np.asarray(y[ok], np.float64)
    theta = np.zeros(A.shape[1])
    p0 = float(np.clip(t.mean(), 0.01, 0.99))
    theta[-1] = np.log(p0) - np.log1p(-p0)
    ridge = np.full(A.shape[1], l2)
    ridge[-1] = 1e-4  # the bias is hardly shrunk (enough to converge when every label is equal)
    for _ in range(max_iter):
        p = sigmoid(A @ theta)
        grad = A.T @ (p - t) + ridge * theta
        hess = (A * (p * (1 - p))[:, None]).T @ A + np.diag(ridge)
        step = np.linalg.solve(hess, grad)
        theta -= step
        if np.max(np.abs(step)) < tol:
            break
    return theta[:-1].astype(np.float32), float(theta[-1])


def extend_content(store_url: str, name: str, embedder_id: str, sel: Selection, router: RouterSpec,
                   plan: ExtensionPlan, *, log=None) -> BundleContent:
    """The bundle of ``plan.base`` extended by the models of ``plan.labels`` (module doc)."""
    from benchroute.artifacts import label_pack
    from benchroute.artifacts.router_build import (
        binarization_rules,
        bundle_embedder,
        finite,
        model_prices,
        pq_models,
        recorded_output_tokens,
    )

    t0 = time.perf_counter()
    store, base = Store(store_url), plan.base
    params = base.manifest["parameters"]
    ids = base.json("index/input_ids.json")
    datasets = base.json("datasets.json")
    member = base.npy("index/members.npy")
    old_models = _base_models(base)
    added = sorted(plan.labels["model"].unique().to_list())
    models = sorted(old_models + added)
    at = np.searchsorted(np.asarray(old_models, object), np.asarray(added, object))  # np.insert positions
    n, a = len(ids), len(added)
    dtype = np.dtype(dense_dtype(n, len(models)))  # the full build's float type

    # The new models' labels, scattered as a full build scatters them (``LabelScatter``) into
    # the base's rows and datasets: their Y columns and each dataset's y.
    d_rows = [np.flatnonzero(member[:, d]) for d in range(len(datasets))]
    scatter = LabelScatter(ids, datasets, added, d_rows, dtype)
    scatter.add(plan.labels)
    Y_new, d_y, _ = scatter.finish()

    # p(d, m) of the new models from the neighbours the base measured p with, and the same
    # fallback (the model's mean training label outside d's family) as ``lodo_accuracies``.
    lodo = LodoNeighbors(**{f: base.npy(f"{LODO_PREFIX}{f}.npy") for f in LODO_FILES})
    families = same_family(datasets)
    totals = fallback_totals(Y_new, n * len(models) * dtype.itemsize)
    P_new = np.full((len(datasets), a), np.nan)
    for i, d in enumerate(lodo.datasets):
        q_rows, neigh = lodo.of(i)
        allowed = ~member[:, families[d]].any(axis=1)
        fb = train_mean(Y_new, allowed, totals) if params["fallback"] == "train_mean" else None
        G = aggregate_labels(neigh, Y_new, weights=params["weights"], fallback=fb)
        P_new[d] = binarized_accuracy(G, d_y[d][np.searchsorted(d_rows[d], q_rows)])
    u = base.npy("kernel/u.npy")
    P = np.insert(base.npy("kernel/p.npy"), at, P_new, axis=1)
    ok, bandwidth, loo = fit_kernel(u, P)
    P = np.where(ok[:, None], P, np.nan)
    # training accuracy: the mean over datasets of each dataset's accuracy (``dataset_accuracy``)
    train_new = np.nan_to_num(mean_over_datasets(dataset_accuracies(d_y, a)), nan=0.0)  # as ``fit_router``
    base_models_tab = base.parquet("models.parquet")
    train_acc = np.insert(np.asarray(base_models_tab.column("train_acc").to_pylist(), np.float64), at, train_new)
    if log:
        log.info("extension: %d new models' labels and p(d, m) in %.1f s", a, time.perf_counter() - t0)

    # Labels: the base's, unpacked a block of rows at a time next to the new columns.
    packed = label_pack.PackedLabels.from_files(base.files, LABELS_PREFIX)
    Y = np.empty((n, len(models)), dtype)
    old_cols = np.delete(np.arange(len(models)), at + np.arange(a))  # where the base's columns go
    for sl in row_blocks(n, len(models)):
        Y[sl, old_cols] = packed.rows(np.arange(sl.start, sl.stop), dtype=dtype)
    Y[:, at + np.arange(a)] = Y_new
    del packed

    # The index rows: the store's vectors of the base's inputs, as the base stored them.
    X = normalize_rows(emb_store.read_matrix(store, embedder_id, ids)[0])
    stored = base.npy("index/embeddings.npy")
    if stored.shape != X.shape or not np.array_equal(X.astype(stored.dtype), stored):
        raise ExtensionError("the store's vectors of the base's inputs differ from the base's index")

    # The predictor: a new output unit per model on the base network's frozen hidden layer.
    arrays = predictor_arrays(base)
    if params["predictor"] == "mlp":
        est = predictor_from_state(base.json("predictor/params.json"), arrays)
        H = dense_forward(X, est.layers_[:-1], est.activations_[:-1])
        heads = [logistic_head(H, Y_new[:, j]) for j in range(a)]
        W, b = est.layers_[-1]
        est.layers_ = [*est.layers_[:-1], (
            np.ascontiguousarray(np.insert(W, at, np.stack([w for w, _ in heads], axis=1), axis=1), np.float32),
            np.ascontiguousarray(np.insert(b, at, [c for _, c in heads]), np.float32))]
        counts, means = column_means(Y_new)
        est.n_labels_ = np.insert(np.asarray(est.n_labels_), at, counts)
        est.prior_ = np.insert(np.asarray(est.prior_, np.float64), at, means)
        est.n_outputs_ = len(models)
    else:  # the kNN predictor: its state is the index and the labels
        est = make_predictor(params["predictor"]).fit(X, Y)
    if log:
        log.info("extension: predictor output units in %.1f s", time.perf_counter() - t0)

    # Prices, expected output tokens, the reference model and its cost.
    cards = cards_for(store, models)
    p_in, p_out = model_prices(cards, models)
    recorded = recorded_output_tokens(store, parts=plan.token_parts)  # as ``cost_data``, for the new models
    rec = recorded.filter(pl.col("model").is_in(added) & pl.col("input_id").is_in(ids))
    out_new = np.full((n, a), np.nan, dtype)
    if rec.height:
        out_new[_positions(rec["input_id"], ids), _positions(rec["model"], added)] = rec["tokens"].to_numpy()
    exp_new = costs_.expected_output_tokens_of_rows(out_new, None)
    exp_out = np.insert(np.asarray(base_models_tab.column("expected_output_tokens").to_pylist(), np.float64),
                        at, exp_new)
    settings = base.json("routing/settings.json")
    typical = float(settings["typical_input_tokens"])
    ref = costs_.reference_model(train_acc, p_in, p_out, labelled_counts(Y))
    decision = DecisionCosts(exp_out, ref, costs_.reference_cost(typical, exp_out, p_in, p_out, ref), typical)
    params_b = model_sizes(store.read("models"), models)

    fit = RouterFit(
        input_ids=list(ids), models=models, datasets=list(datasets), X=X, Y=Y, member=member, P=P,
        u=u, bandwidth=float(bandwidth), kernel_loo_mae=float(loo), train_acc=train_acc,
        params_b=params_b, k=int(params["k"]), k_descriptor=int(params["k_descriptor"]),
        weights=params["weights"], fallback=params["fallback"], predictor_name=params["predictor"],
        predictor=est, decision=decision,
        cost=CostData(p_in, p_out, np.ones(n), unrecorded_tokens(n, len(models))), lodo=lodo,
    )
    files = bundle_files(fit, cards, None, index_dtype=params["index_dtype"], index_search="exact")
    # What does not change: the index (and its graph), the held-out curve (see the module doc).
    for rel, data in base.files.items():
        if rel == "index/embeddings.npy" or rel.startswith(ANN_PREFIX) or rel in (
                "routing/curve.parquet", "routing/summary.json"):
            files[rel] = data
    info = pq_models(files["models.parquet"])
    extension = {
        "base_version": base.manifest["version"],
        "added_models": added,
        "predictor": ("a logistic output unit per added model on the base network's frozen hidden layer"
                      if params["predictor"] == "mlp" else "unchanged (reads the labels)"),
        "routing_curve": "the base's, measured without the added models",
    }
    prior_ext = params.get("extension")
    if prior_ext:  # an extension of an extension: keep the chain
        extension["extends"] = prior_ext
    meta = {
        "embedder": bundle_embedder(store, embedder_id),
        "binarization_rules": binarization_rules(store),
        "sources": [{"key": k_, "fingerprint": v} for k_, v in sorted(store.units().items())],
        "parameters": {**router_parameters(fit), "index_dtype": params["index_dtype"],
                       "index_search": params["index_search"], "extension": extension},
        "evaluation": {},
        "spec": base.manifest["spec"],
        "models": finite(info),
    }
    if log:
        log.info("extension of %s by %d models (%s) built in %.1f s", base.manifest["version"], a,
                 ", ".join(added[:3]), time.perf_counter() - t0)
    return BundleContent(name, files, meta)
