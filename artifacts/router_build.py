"""A router bundle's content built from a store: the selected labels, the fitted router (kNN
index, kernel), the evaluation summary and the manifest metadata. One builder for every flow
(``publish``, ``refresh``, ``backfill``), so equal data gives an equal bundle whichever ran it.
"""

from __future__ import annotations

import io
import time

import numpy as np
import polars as pl
from benchroute.artifacts import embeddings as emb_store
from benchroute.artifacts.bundle import (
    BundleContent,
    BundleStore,
    json_bytes,
    npy_bytes,
)
from benchroute.artifacts.router import CURVE_COLUMNS, bundle_files, router_parameters
from benchroute.artifacts.specs import STABILITY_B, RouterSpec, Selection
from benchroute.artifacts.store import Store
from benchroute.transforms import costs as costs_
from benchroute.transforms.evaluate import BenchmarkArrays
from benchroute.transforms.ids import glob_expr
from benchroute.transforms.model_cards import cards_for
from benchroute.transforms.predictors import make_predictor
from benchroute.transforms.router_fit import fit_router
from benchroute.transforms.routing_eval import (
    CostData,
    NoHeldOutInputs,
    evaluate_routing,
    unrecorded_tokens,
)


def selection_filter(memberships: pl.DataFrame, sel: Selection) -> pl.Expr:
    """The labels of the selection: its sources, then datasets and models by name or glob, then
    excluded models by name or glob."""
    keep = pl.lit(True)
    if sel.sources:
        chosen = memberships.filter(pl.col("source").is_in(list(sel.sources)))["dataset"].unique()
        keep = keep & pl.col("dataset").is_in(chosen.implode())
    if sel.datasets:
        keep = keep & glob_expr("dataset", sel.datasets)
    if sel.models:
        keep = keep & glob_expr("model", sel.models)
    if sel.exclude_models:
        keep = keep & ~glob_expr("model", sel.exclude_models)
    return keep


def label_batches(store: Store, keep: pl.Expr, columns: list[str] | None = None,
                  parts: list[str] | None = None):
    """A callable giving the selected labels a stored part at a time (``columns``, default
    ``LABEL_COLUMNS``; they must include what ``keep`` reads), the same parts (``parts``, default
    the store's now) in the same order on every call (``BenchmarkArrays.from_batches`` reads them
    two or three times)."""
    parts = store.parts("labels") if parts is None else parts
    cols = columns or LABEL_COLUMNS

    def batches():
        for rel in parts:
            yield store.read_parts("labels", [rel], cols).filter(keep)

    return batches


def has_labels(store: Store, sel: Selection) -> bool:
    """Whether the selection holds any label (read a part at a time, up to the first hit)."""
    keep = selection_filter(store.read("memberships"), sel)
    return any(b.height for b in label_batches(store, keep, ["input_id", "dataset", "model"])())


def selected_input_ids(store: Store, sel: Selection) -> pl.Series:
    """The distinct input ids of the selection's labels (read a part at a time)."""
    keep = selection_filter(store.read("memberships"), sel)
    ids = [b["input_id"].unique() for b in label_batches(store, keep, ["input_id", "dataset", "model"])()]
    return pl.concat(ids).unique() if ids else pl.Series("input_id", [], pl.String)


class SelectedLabels:
    """The selection's labels (``selection_filter``; ``LABEL_COLUMNS``: not the rule text or the
    outcome count, a third of a label's bytes) a stored part at a time, with their distinct
    (dataset, model) pairs (``coverage``). Read once here; the selected parts are kept in
    memory (``held``) when they hold at most ``FRAME_MAX_LABELS`` labels (kept while reading
    when the stored labels, counted from the parts' footers, are that few; else read once more:
    never more than the limit held), else each call of ``batches`` reads them again from the
    store, so a leaderboard's labels are never all in memory. Either
    way ``batches`` yields the same frames, a part at a time: results (and
    ``fingerprints.labels_digest``) do not depend on which. ``rows``: how many labels;
    ``input_ids``: their distinct inputs."""

    def __init__(self, store: Store, sel: Selection, memberships: pl.DataFrame | None = None,
                 *, max_labels: int | None = None) -> None:
        self.store = store
        self.memberships = store.read("memberships") if memberships is None else memberships
        self.keep = selection_filter(self.memberships, sel)
        self.parts = store.parts("labels")
        self.limit = FRAME_MAX_LABELS if max_labels is None else max_labels
        # kept while reading only when the whole store is small (its parts' footers): else a
        # leaderboard's parts would be held up to the limit (3.5 GB) before it is known
        stored = sum(store.part_rows(rel) for rel in self.parts)
        held: list[pl.DataFrame] | None = [] if stored <= self.limit else None
        # distinct so far, merged part by part: each part of a leaderboard's labels holds most of
        # its 800k (dataset, model) pairs; kept per part, 107 parts of them held 5 GB
        coverage = pl.DataFrame(schema={"dataset": pl.String, "model": pl.String})
        ids = pl.Series("input_id", [], pl.String)
        rows = 0
        cols = LABEL_COLUMNS if held is not None else ["input_id", "dataset", "model"]
        for part in label_batches(store, self.keep, cols, self.parts)():
            coverage = pl.concat([coverage, part.select("dataset", "model").unique()]).unique()
            ids = pl.concat([ids, part["input_id"].unique()]).unique()
            rows += part.height
            if held is not None:
                held.append(part)
        self.held = held
        self.rows = rows
        if held is None and rows <= self.limit:  # a few labels of a large store
            self.held = list(self.batches()())
        self.coverage = coverage
        self.input_ids = ids

    def batches(self, where: pl.Expr | None = None, columns: list[str] | None = None):
        """A callable giving the labels a part at a time (only those ``where`` holds; only
        ``columns``), the same frames in the same order on every call: what
        ``BenchmarkArrays.from_batches`` and ``labels_digest`` read."""
        keep = self.keep if where is None else self.keep & where
        cols = columns or LABEL_COLUMNS

        def held():
            for part in self.held:
                yield part.filter(where).select(cols) if where is not None else part.select(cols)

        # what the filters read (the selection's dataset and model, and ``where``'s columns)
        read = list(dict.fromkeys([*cols, "dataset", "model",
                                   *(where.meta.root_names() if where is not None else [])]))

        def stored():
            for part in label_batches(self.store, keep, read, self.parts)():
                yield part.select(cols)

        return held if self.held is not None else stored

    def frame(self) -> pl.DataFrame:
        """All the selected labels as one frame; ``TooManyLabels`` past ``FRAME_MAX_LABELS``."""
        if self.held is None:
            raise TooManyLabels(
                f"{self.store.url}: the selection holds {self.rows:,} labels, more than "
                f"{self.limit:,}, too many to hold in memory (pair routers and stability read "
                "them all): publish without pair routers or stability, or select fewer sources, "
                "datasets or models")
        return (pl.concat(self.held, how="vertical_relaxed", rechunk=False) if self.held
                else self.store.read_parts("labels", [], LABEL_COLUMNS))


def select_frames(store: Store, sel: Selection) -> tuple[pl.DataFrame, pl.DataFrame, pl.DataFrame]:
    """(labels, memberships, models) of the store, labels restricted to the selection as one
    frame (``SelectedLabels.frame``: ``TooManyLabels`` past ``FRAME_MAX_LABELS``). For pair
    routers and stability, which hold them all; the publish, its extension and the per-group
    evaluation stream them instead."""
    selected = SelectedLabels(store, sel)
    return selected.frame(), selected.memberships, store.read("models")


# The most labels held in memory as frames (~80-95 bytes each: 40 M ≈ 3.5 GB, the 50k × 1,000
# leaderboard; 100k × 4,000 holds 293 M): past it ``SelectedLabels`` re-reads the store.
FRAME_MAX_LABELS = 40_000_000


class TooManyLabels(ValueError):
    """The selection's labels are too many to hold as one frame (``select_frames``)."""


# The label columns routers are fitted and evaluated from.
LABEL_COLUMNS = ["input_id", "dataset", "model", "metric", "value", "y"]


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


def token_frames(store: Store, parts: list[str] | None = None) -> tuple[pl.DataFrame, pl.DataFrame]:
    """(input texts, recorded output tokens per input and model) of the store (of its outcome
    ``parts``; None = all): what ``cost_data`` reads, to read once when several benchmarks of one
    store are costed."""
    return store.read("inputs", columns=["input_id", "text"]), recorded_output_tokens(store, parts)


def unperturbed_outcomes(store: Store, metrics: list[str], columns: list[str],
                         parts: list[str] | None = None) -> pl.DataFrame:
    """The store's unperturbed outcome rows of ``metrics`` (their ``columns``), from its outcome
    ``parts`` (None = all), a batch at a time: all outcomes would not fit in memory on a
    leaderboard. A part whose metric column holds none of them is not read further (a
    leaderboard's parts mostly record no output length and no log-likelihood: one column read
    instead of five)."""
    wanted = pl.col("metric").is_in(metrics) & pl.col("perturbation").is_null()
    read = list(dict.fromkeys([*columns, "metric", "perturbation"]))
    kept = [b.filter(wanted).select(columns)
            for rel in (store.parts("outcomes") if parts is None else parts)
            if any(m["metric"].is_in(metrics).any() for m in store.iter_batches(rel, ["metric"]))
            for b in store.iter_batches(rel, read)]
    return pl.concat(kept) if kept else store.read_parts("outcomes", [], columns)


def recorded_output_tokens(store: Store, parts: list[str] | None = None) -> pl.DataFrame:
    """The mean recorded output length (tokens) per input and model in the store's outcome
    ``parts`` (None = all), from the unperturbed output-length metrics (``costs.OUTPUT_METRICS``)."""
    outcomes = unperturbed_outcomes(store, list(costs_.OUTPUT_METRICS),
                                    ["input_id", "model", "metric", "value"], parts)
    return (
        outcomes
        .with_columns(tokens=pl.col("value") * pl.col("metric").replace_strict(costs_.OUTPUT_METRICS))
        .group_by("input_id", "model").agg(pl.col("tokens").mean())
    )


def model_prices(cards: list[dict], models: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """(USD per 1M input tokens, per 1M output tokens) of each model from its card, NaN where
    unknown."""
    by_name = {c["model"]: c for c in cards}

    def price(m: str, col: str) -> float:
        v = by_name.get(m, {}).get(col)
        return np.nan if v is None else float(v)

    return (np.array([price(m, "usd_per_1m_input") for m in models], np.float64),
            np.array([price(m, "usd_per_1m_output") for m in models], np.float64))


def cost_data(store: Store, bench: BenchmarkArrays, cards: list[dict],
              tokens: tuple[pl.DataFrame, pl.DataFrame] | None = None) -> CostData:
    """Prices (from the model cards) and token counts (input text length; recorded output
    lengths, see ``transforms.costs``) aligned to ``bench``; ``tokens``: ``token_frames(store)``
    when already read."""
    texts_all, recorded = tokens if tokens is not None else token_frames(store)
    p_in, p_out = model_prices(cards, list(bench.models))
    ids = pl.DataFrame({"input_id": bench.input_ids})
    texts = ids.join(texts_all, on="input_id", how="left")
    in_tok = costs_.input_tokens([t or "" for t in texts["text"].to_list()])
    out = unrecorded_tokens(len(bench.input_ids), len(bench.models))
    if recorded.height:
        out = np.full(out.shape, np.nan, bench.Y.dtype)
        row_of = {iid: r for r, iid in enumerate(bench.input_ids)}
        m_of = {m: j for j, m in enumerate(bench.models)}
        rec = recorded.filter(pl.col("input_id").is_in(bench.input_ids) & pl.col("model").is_in(bench.models))
        r = np.array([row_of[i] for i in rec["input_id"]], np.int64)
        c = np.array([m_of[m] for m in rec["model"]], np.int64)
        out[r, c] = rec["tokens"].to_numpy()
    return CostData(p_in, p_out, in_tok, out)


def routing_curve(bench: BenchmarkArrays, cost: CostData, predictor: str, *, seed: int = 0,
                  log=None) -> tuple[list[dict], dict]:
    """The cost–quality curve of the bundle as built, measured on held-out inputs: ``predictor``
    fitted on a random 80 % of the bundle's inputs, the policy with the bundle's own costs and
    reference over all its models on the other 20 % (``transforms.routing_eval``); and the
    summary (AIQ, quality at a cost share…). Empty without held-out inputs or prices."""
    try:
        res = evaluate_routing(bench, cost, {predictor: lambda: make_predictor(predictor)},
                               split="random", seed=seed, complete_only=False, log=log)
    except NoHeldOutInputs as exc:
        if log:
            log.info("no routing curve: %s", exc)
        return [], {}
    pts = res.points.filter(pl.col("cost_share").is_finite())
    summary = {**res.summary.row(0, named=True), **res.predictor_metrics.drop("fit_s").row(0, named=True)}
    # (no timing: equal data must give an equal bundle)
    return pts.select(list(CURVE_COLUMNS)).to_dicts(), summary


# Bootstrap resamples of a bundle's stability summary (issue 15): computed with the evaluation,
# on the bundle's own datasets and models.


def stability_too_big(store: Store) -> str | None:
    """Why a stability summary is not computed for ``store``, or None: it reads every stored
    label and outcome as one frame (``transforms.stability_summary``), so not past
    ``FRAME_MAX_LABELS`` of either (counted from the parts' footers, nothing read)."""
    stored = max(sum(store.part_rows(rel) for rel in store.parts(t)) for t in ("labels", "outcomes"))
    if stored <= FRAME_MAX_LABELS:
        return None
    return (f"not computed: the store holds {stored:,} labels or outcomes, more than the "
            f"{FRAME_MAX_LABELS:,} the stability summary reads into memory (--stability-B 0 skips it)")


def bundle_stability(store: Store, labels: pl.DataFrame, B: int = STABILITY_B, *,
                     embeddings: tuple[np.ndarray, list[str]] | None = None, eval_config=None):
    """``transforms.stability_summary`` of the bundle's datasets and models (its labels); with
    ``embeddings`` (X, input ids) also the routing-choice tables (``router_B`` = ``B``, the
    evaluation's ``eval_config``)."""
    from benchroute.transforms.stability_summary import StoreView, stability_summary

    view = StoreView(store, labels["dataset"].unique().to_list(), labels["model"].unique().to_list())
    return stability_summary(view, B=B, embeddings=embeddings, router_B=B, eval_config=eval_config)


def with_flip_task(evaluation: dict, router_tasks: pl.DataFrame) -> dict:
    """``evaluation`` (group -> ``evaluation_entry``) with each Table 1 row of a method the
    routing-stability tables cover given ``flip_task``: the mean over the group's held-out
    tasks of the share of resamples of the task's inputs whose choice differs."""
    if router_tasks.height == 0:
        return evaluation
    flips = {(r["group"], r["method"]): r["flip_task"] for r in router_tasks.group_by(
        "group", "method").agg(pl.col("flip_task").mean()).iter_rows(named=True)}
    out = {}
    for group, entry in evaluation.items():
        if isinstance(entry, dict) and "table1" in entry:
            entry = {**entry, "table1": [
                {**row, "flip_task": flips[(group, row["method"])]}
                if (group, row.get("method")) in flips else row for row in entry["table1"]]}
        out[group] = entry
    return out


def served_index(X: np.ndarray, index_dtype: str) -> np.ndarray:
    """The index rows as a loaded bundle's router holds them: stored in ``index_dtype``, read
    back as float32, L2-normalised (``Router``'s kNN fit)."""
    from benchroute.artifacts.router import INDEX_DTYPES
    from benchroute.transforms.knn import normalize_rows

    return normalize_rows(np.asarray(X).astype(INDEX_DTYPES[index_dtype]).astype(np.float32))


def pair_routing_files(fit, labels: pl.DataFrame, memberships: pl.DataFrame,
                       pairs: list[tuple[str, str]], *, index_dtype: str = "float16", seed: int = 0,
                       log=None) -> tuple[dict[str, bytes], dict]:
    """The ``pairs/`` files of a bundle (``transforms.pair_serving``: routers fitted on all but a
    seeded 10 % of the index rows, calibrated per target share on the rest) and the manifest's
    ``parameters.pairs``. The routers are fitted on the index as the served router reads it back
    (``served_index``), so the bundle answers what was calibrated; the similarity-weighted router
    keeps no copy of the index: it reads ``index/embeddings.npy`` and ``pairs/quality.npy`` (the
    compared quality: y, or a judge score where the labels carry one; absent when it equals
    ``index/labels.npy``)."""
    from benchroute.transforms.pair_labels import win_data_from_frames
    from benchroute.transforms.pair_routers import SWRankingRouter
    from benchroute.transforms.pair_serving import (
        DEFAULT_SERVED,
        build_pair_routing,
        pair_files,
    )

    t0 = time.perf_counter()
    pairs = [tuple(p) for p in pairs]
    missing = sorted({m for p in pairs for m in p} - set(fit.models))
    if missing:
        raise ValueError(f"pair models not in this bundle: {missing}; it holds {len(fit.models)} models")
    data = win_data_from_frames(labels, memberships, models=list(fit.models), input_ids=list(fit.input_ids))
    routing = build_pair_routing(served_index(fit.X, index_dtype), data, pairs, seed=seed)
    shared = [n for n, r in routing.routers.items() if isinstance(r, SWRankingRouter)]
    files = pair_files(routing, shared_index=shared)
    Q = data.Q.astype(np.float32)
    if not np.array_equal(Q, np.asarray(fit.Y, np.float32), equal_nan=True):
        files["pairs/quality.npy"] = npy_bytes(Q)
    if log:
        log.info("pair routers %s for %d pairs in %.1f s", sorted(routing.routers), len(pairs),
                 time.perf_counter() - t0)
    params = {
        "pairs": [list(p) for p in pairs],
        "routers": {n: [key, dict(kw)] for n, (key, kw) in DEFAULT_SERVED.items()},
        "default_router": routing.default_router,
        "shares": list(routing.shares),
        "calibration_rows": int(len(data.input_ids) - len(routing.fit_rows)),
        "seed": seed,
    }
    return files, params


def index_search_summary(files: dict[str, bytes], *, n_queries: int = 500, k: int = 10, seed: int = 0,
                         log=None) -> dict:
    """How the bundle's router searches its index: ``exact``, or ``hnsw`` with its parameters
    and its recall@k against the exact scan, measured here on ``n_queries`` seeded index rows
    used as queries (their own row left out of both answers: a query is never in the index)."""
    from benchroute.artifacts.ann_index import load_index_files, recall_at_k
    from benchroute.artifacts.router import ANN_PREFIX

    if f"{ANN_PREFIX}params.json" not in files:
        return {"kind": "exact"}
    X = np.load(io.BytesIO(files["index/embeddings.npy"]), allow_pickle=False)
    index = load_index_files(files, ANN_PREFIX, X)
    rng = np.random.default_rng(seed)
    rows = np.sort(rng.choice(len(X), size=min(n_queries, len(X)), replace=False))
    recall = recall_at_k(index, index.X, index.X[rows], k, own_rows=rows)
    p = index.params
    out = {"kind": p.kind, "library": p.library, "m": p.m, "ef_construction": p.ef_construction,
           "ef_search": p.ef_search, "seed": p.seed, f"recall_at_{k}": recall,
           "recall_queries": int(len(rows))}
    if log:
        log.info("HNSW index over %d rows: recall@%d %.4f against the exact scan", len(X), k, out[f"recall_at_{k}"])
    return out


def pair_list(models: list[str], pairs=None, pair_models=None, train_acc=None) -> list[tuple[str, str]]:
    """The pairs a bundle serves: ``pairs`` as given ((strong, weak) tuples, or "strong,weak":
    model names hold slashes, never commas), then every pair among ``pair_models`` with the
    model of higher ``train_acc`` (aligned to ``models``) as the strong one; duplicates dropped."""
    out: list[tuple[str, str]] = []
    for p in pairs or ():
        s, w = (x.strip() for x in p.split(",")) if isinstance(p, str) else p
        out.append((s, w))
    if pair_models:
        acc = dict(zip(models, [float(a) for a in train_acc])) if train_acc is not None else {}
        chosen = sorted(set(pair_models), key=lambda m: (-acc.get(m, 0.0), m))
        out += [(a, b) for i, a in enumerate(chosen) for b in chosen[i + 1:]]
    uniq: list[tuple[str, str]] = []
    for p in out:
        if p[0] == p[1]:
            raise ValueError(f"a pair needs two different models, got {p[0]!r} twice")
        if p not in uniq:
            uniq.append(p)
    return uniq


def selected_arrays(store: Store, embedder_id: str, sel: Selection) -> tuple[BenchmarkArrays, pl.DataFrame]:
    """(``BenchmarkArrays`` of the selected labels, memberships), the labels streamed a stored
    part at a time into label matrices (float32 at leaderboard size: ``evaluate.dense_dtype``),
    never one frame of all labels."""
    memberships = store.read("memberships")
    models = store.read("models")
    bench = BenchmarkArrays.from_batches(
        lambda ids: emb_store.read_matrix(store, embedder_id, ids)[0],
        label_batches(store, selection_filter(memberships, sel)), memberships, models)
    return bench, memberships


def bundle_content(
    store_url: str, name: str, embedder_id: str, sel: Selection, evaluation: dict,
    router: RouterSpec | None = None, *, log=None,
) -> BundleContent:
    """The bundle of the selected data, fitted as ``router`` says (default ``RouterSpec()``),
    with the given evaluation (see ``evaluation_entry``). The manifest records both specs whole
    (``spec.selection``, ``spec.router``). With an evaluation and ``router.stability_B`` > 0 the
    manifest also holds ``stability`` (the summary of ``bundle_stability``) and each model entry
    its ``rank``, ``rank_lo``, ``rank_hi``, ``p_best``, ``rstd`` and ``stability_scope``; with
    uniform weights also the routing-choice stability (``task_choice_n``, ``task_choice_keep``,
    ``query_n``, ``query_keep_rate``: ``StabilitySummary.router_fields``) and each evaluated
    method's ``flip_task`` in the evaluation's Table 1 (``with_flip_task``); all are covered by
    the content hash like every other manifest field. ``router.pairs`` / ``router.pair_models``
    (``pair_list``) add the strong/weak pair routers (``pair_routing_files``)."""
    router = router or RouterSpec()
    k, weights, index_dtype, predictor = router.k, router.weights, router.index_dtype, router.predictor
    store = Store(store_url)
    t0 = time.perf_counter()
    bench, memberships = selected_arrays(store, embedder_id, sel)
    if log:
        log.info("labels: %d inputs x %d models, %d datasets (%s), read a part at a time in %.1f s",
                 len(bench.input_ids), len(bench.models), len(bench.datasets), bench.Y.dtype,
                 time.perf_counter() - t0)
    if not bench.input_ids:
        raise ValueError(f"{store_url}: no labels to build a router from ({sel.to_dict()})")
    labels = None  # the selected labels as one frame: read only for pair routers and stability
    cards = cards_for(store, list(bench.models))
    t0 = time.perf_counter()
    cost = cost_data(store, bench, cards)
    fit = fit_router(bench, k=k, weights=weights, predictor=predictor, cost=cost, log=log)
    curve, routing = routing_curve(bench, cost, predictor, log=log)
    if log:
        log.info(
            "fitted router (%s): %d inputs, %d models, %d datasets, %d curve points in %.1f s",
            predictor, len(fit.input_ids), len(fit.models), len(fit.datasets), len(curve),
            time.perf_counter() - t0,
        )
    files = bundle_files(fit, cards, curve, index_dtype=index_dtype, index_search=router.index_search)
    search = index_search_summary(files, log=log)
    files["routing/summary.json"] = json_bytes(finite(routing))
    served_pairs = pair_list(list(fit.models), router.pairs, router.pair_models, fit.train_acc)
    pair_params = None
    if served_pairs:
        labels = select_frames(store, sel)[0]
        pfiles, pair_params = pair_routing_files(fit, labels, memberships, served_pairs,
                                                 index_dtype=index_dtype, log=log)
        files.update(pfiles)
    info = pq_models(files["models.parquet"])
    meta = {
        "embedder": bundle_embedder(store, embedder_id),
        "binarization_rules": binarization_rules(store),
        "sources": [{"key": k_, "fingerprint": v} for k_, v in sorted(store.units().items())],
        "parameters": {**router_parameters(fit), "index_dtype": index_dtype, "index_search": search,
                       **({"pairs": pair_params} if pair_params else {})},
        "evaluation": finite(evaluation),
        "spec": {"selection": sel.to_dict(), "router": router.to_dict()},
    }
    too_big = stability_too_big(store) if evaluation and router.stability_B > 0 else None
    if too_big:  # a leaderboard: the bundle says why it has no stability summary
        meta["stability"] = {"notes": [too_big], "groups": {}, "models": {}}
    elif evaluation and router.stability_B > 0:
        from benchroute.transforms.evaluate import EvalConfig

        routing_ok = weights == "uniform"  # the exact kNN bootstrap's condition
        labels = labels if labels is not None else select_frames(store, sel)[0]
        X, ids = emb_store.read_matrix(store, embedder_id, list(bench.input_ids))
        stability = bundle_stability(store, labels, router.stability_B,
                                     embeddings=(X, ids) if routing_ok else None,
                                     eval_config=EvalConfig(k=k, weights=weights))
        per_model = stability.model_fields()
        info = [{**m, **per_model.get(m["model"], {})} for m in info]
        meta["stability"] = finite(stability.manifest())
        meta["evaluation"] = finite(with_flip_task(evaluation, stability.router_tasks))
    meta["models"] = finite(info)
    return BundleContent(name, files, meta)


def pq_models(data: bytes) -> list[dict]:
    """The bundle's model table as manifest entries (cards, expected output tokens)."""
    import io

    import pyarrow.parquet as pq

    keep = ("model", "display_name", "params_b", "usd_per_1m_input", "usd_per_1m_output", "price_rule",
            "price_source", "price_as_of")
    return [{k_: r[k_] for k_ in keep} for r in pq.read_table(io.BytesIO(data)).to_pylist()]


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
        "latest": published.latest,
        # versions made latest here, finishing publishes a killed run left half-done
        "recovered": list(published.recovered),
        "files": len(content.files),
        "bytes": sum(len(b) for b in content.files.values()),
        "models": len(content.meta["models"]),
        "content_hash": content.content_hash(),
        "seconds": round(time.perf_counter() - t0, 2),
    }
