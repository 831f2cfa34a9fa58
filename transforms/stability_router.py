"""How often a routing choice changes under input resampling and under format variants.

For each held-out task d' of the leave-one-dataset-out protocol (``transforms.evaluate``, the
same neighbours, fallback, kernel and tie rule), the model chosen by S1, S2, S3 (kernel p̂),
BMA and the oracle, and per input the argmax of g_m(x) (per-query routing), are recomputed

- on B bootstrap resamples, **task**: of d''s inputs only (the task scores are means over them;
  u(d'), hence p̂, is a mean over them too), and **all**: of d''s inputs and, jointly, of the
  training index (g from the exact k nearest neighbours of the resampled index,
  ``stability.bootstrap_knn_scores``; BMA's per-dataset accuracies from the resampled rows).
  The nested leave-one-out p(d, m) behind the kernel stays at its full-data value (refitting it
  per resample would cost B evaluations); the kernel is re-read at the resampled u(d').
- under each **variant** of the labels (another scoring rule or run of the same items, aligned
  to the same inputs): g, p(d, m), u and the kernel are all recomputed from the variant labels.

Ties go to the higher training accuracy, then model order: the served router's rule at λ = 0.
A per-model summary says, for each model, how often it is chosen on the full data and how often
such a choice survives a resample (its keep rate), per task and per query.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import polars as pl

from benchroute.transforms.evaluate import (
    BenchmarkArrays,
    EvalConfig,
    HeldOutTask,
    held_out_tasks,
    task_kernel,
)
from benchroute.transforms.knn import Neighbors, aggregate_labels, grouped_topk
from benchroute.transforms.scores import s3
from benchroute.transforms.stability import (
    argmax_choices,
    bootstrap_counts,
    bootstrap_knn_scores,
    weighted_means,
)

TASK_METHODS = ("S1", "S2", "S3", "BMA", "Oracle")


@dataclass(frozen=True)
class RouterStability:
    """``tasks``: per (task, method): the full-data ``model``, ``flip_task`` and ``flip_all``
    (share of resamples choosing another model), ``modal`` (the most frequent resample choice)
    and its ``modal_share``, and ``flip_<variant>`` (1 if the variant's choice differs).
    ``queries``: per task, the per-input argmax g choice's flip rate under the training-index
    bootstrap (``flip_all``; the task-input resample does not change a single input's choice)
    and the share of inputs whose choice changes under each variant. ``models``: per model,
    tasks and queries routed to it and the mean keep rate of those choices."""

    tasks: pl.DataFrame
    queries: pl.DataFrame
    models: pl.DataFrame


def _train_acc(bench: BenchmarkArrays, dataset_y, t: HeldOutTask, counts: np.ndarray | None) -> np.ndarray:
    """Mean over training datasets of each model's accuracy on their rows outside d''s family
    (as ``evaluate``'s BMA); with ``counts`` (B × n_index) per resample: (B × M)."""
    accs = []
    for d2, yd in enumerate(dataset_y):
        if t.held[d2]:
            continue
        keep = t.train_rows[bench.dataset_rows[d2]]
        if not keep.any():
            continue
        r, y = bench.dataset_rows[d2][keep], yd[keep]
        W = np.ones((1, r.size)) if counts is None else counts[:, r]
        accs.append(weighted_means(y, W))
    if not accs:
        return np.full((1 if counts is None else counts.shape[0], len(bench.models)), np.nan)
    A = np.stack(accs)  # (D', B, M)
    with np.errstate(invalid="ignore"):
        return np.nanmean(A, axis=0)


def _choices(G, Yt, p_hat, train_acc, Wt=None):
    """Choices of each method on the full task (Wt None) or per resample row of Wt (B × n_t).
    G is (n_t × M) or (B × n_t × M); p_hat (M,) or (B × M); train_acc (M,) or (B × M)."""
    if G.ndim == 2:
        G = G[None]
    if Wt is None:
        Wt = np.ones((G.shape[0], G.shape[1]))
    den = Wt.sum(axis=1, keepdims=True)
    with np.errstate(invalid="ignore"):
        hits = np.where(np.isnan(G), np.nan, (G > 0.5).astype(np.float64))
    s1 = _wmean3(G, Wt)
    s2 = _wmean3(hits, Wt)
    out = {
        "S1": argmax_choices(s1, train_acc),
        "S2": argmax_choices(s2, train_acc),
        "S3": argmax_choices(s3(s2, p_hat), train_acc),
        "BMA": argmax_choices(np.broadcast_to(train_acc, s1.shape), train_acc),
        "Oracle": argmax_choices((Wt @ Yt) / den, train_acc),
    }
    return out


def _wmean3(G: np.ndarray, Wt: np.ndarray) -> np.ndarray:
    """(B × M) weighted mean over inputs of G (B or 1 × n × M) with weights Wt (B × n), NaN skipped."""
    have = ~np.isnan(G)
    Gz, H = np.where(have, G, 0.0), have.astype(np.float64)
    if G.shape[0] == 1:  # the same g for every resample
        num, den = Wt @ Gz[0], Wt @ H[0]
    else:
        num, den = np.einsum("bn,bnm->bm", Wt, Gz), np.einsum("bn,bnm->bm", Wt, H)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, num / np.where(den > 0, den, 1.0), np.nan)


def router_stability(
    bench: BenchmarkArrays,
    cfg: EvalConfig = EvalConfig(),
    *,
    B: int = 200,
    seed: int = 0,
    variants: dict[str, tuple[np.ndarray, list[np.ndarray]]] | None = None,
    search_factor: int = 3,
) -> RouterStability:
    """See the module docstring. ``variants``: name -> (Y, dataset_y) aligned to ``bench``
    (``variant_arrays`` builds them)."""
    if cfg.weights != "uniform":
        raise ValueError("the exact kNN bootstrap is implemented for uniform weights")
    k = cfg.k
    K = max(search_factor * k, cfg.k_descriptor or k)
    M = len(bench.models)
    grouped = grouped_topk(bench.X, bench.X, bench.row_groups, K,
                           self_rows=np.arange(len(bench.input_ids)))
    variants = variants or {}
    task_rows, query_rows = [], []
    per_model_task = np.zeros((M, 2))  # (times chosen by S3, sum of keep rates)
    per_model_query = np.zeros((M, 2))
    k_desc = cfg.k_descriptor or k
    for t in held_out_tasks(bench, cfg, grouped):
        first_k = Neighbors(t.neigh.indices[:, :k], t.neigh.similarities[:, :k])
        G = aggregate_labels(first_k, bench.Y, weights="uniform", fallback=t.fb)
        kern = t.kernel
        dd = t.neigh.distances[:, :k_desc]
        ok = ~np.isnan(dd)
        with np.errstate(invalid="ignore", divide="ignore"):
            dist = np.where(ok, dd, 0.0).sum(axis=1) / ok.sum(axis=1)  # per input, NaN = none
        u = float(np.nanmean(dist))
        p_hat = kern.predict(u)[0]
        tacc = t.train_acc
        full = {m: int(c[0]) for m, c in _choices(G, t.Yt, p_hat, tacc).items()}
        rng = np.random.default_rng([seed, t.d])
        Wt = bootstrap_counts(t.rows.size, B, rng).astype(np.float64)
        dist0 = np.nan_to_num(dist, nan=float(u))
        p_b = kern.predict((Wt @ dist0) / Wt.sum(axis=1))
        task_only = _choices(G, t.Yt, p_b, tacc, Wt)
        counts = bootstrap_counts(len(bench.input_ids), B, rng).astype(np.float64)
        counts[:, ~t.train_rows] = 0.0
        G_b = bootstrap_knn_scores(t.neigh.indices, bench.Y, counts, k, fallback=t.fb)
        tacc_b = _train_acc(bench, bench.dataset_y, t, counts)
        joint = _choices(G_b, t.Yt, p_b, tacc_b, Wt)
        q_full = argmax_choices(G, tacc)
        q_boot = argmax_choices(G_b, tacc_b[:, None, :])  # (B, n_t)
        q_same = q_boot == q_full[None]
        var_task, var_query = {}, {}
        for name, (Yv, dyv) in variants.items():
            Gv = aggregate_labels(first_k, Yv, weights="uniform",
                                  fallback=_column_means(Yv[t.train_rows]) if t.fb is not None else None)
            kv = task_kernel(bench, cfg, grouped, t.held, Yv, dyv)[0]
            Ytv = dyv[t.d][t.local]
            if np.isnan(Ytv).any():
                continue  # the variant does not label every input of the task
            taccv = _train_acc(bench, dyv, t, None)[0]
            var_task[name] = {m: int(c[0]) for m, c in
                              _choices(Gv, Ytv, kv.predict(u)[0], taccv).items()}
            var_query[name] = float((argmax_choices(Gv, taccv) != q_full).mean())
        A = t.Yt.mean(axis=0)
        for method in TASK_METHODS:
            c0 = full[method]
            cb = joint[method]
            counts_m = np.bincount(cb, minlength=M)
            row = {"task": t.name, "method": method, "model": bench.models[c0],
                   "n_inputs": int(t.rows.size),
                   "flip_task": float((task_only[method] != c0).mean()),
                   "flip_all": float((cb != c0).mean()),
                   "acc_change": float(np.abs(A[cb] - A[c0]).mean()),
                   "modal": bench.models[int(np.argmax(counts_m))],
                   "modal_share": float(counts_m.max() / B)}
            for name, ch in var_task.items():
                row[f"flip_{name}"] = float(ch[method] != c0)
            task_rows.append(row)
        keep = 1.0 - float((joint["S3"] != full["S3"]).mean())
        per_model_task[full["S3"]] += (1.0, keep)
        n_idx = np.arange(t.rows.size)
        y_full = t.Yt[n_idx, q_full]
        y_boot = t.Yt[n_idx[None, :], q_boot]  # (B, n_t)
        qrow = {"task": t.name, "n_inputs": int(t.rows.size),
                "flip_all": float(1.0 - q_same.mean()),
                "outcome_change": float((y_boot != y_full[None]).mean()),
                "quality": float(y_full.mean()),
                "quality_sd": float(y_boot.mean(axis=1).std())}
        for name, v in var_query.items():
            qrow[f"flip_{name}"] = v
        query_rows.append(qrow)
        np.add.at(per_model_query, q_full, np.stack([np.ones(q_full.size), q_same.mean(axis=0)], 1))
    models = pl.DataFrame({
        "model": bench.models,
        "tasks_chosen_s3": per_model_task[:, 0].astype(np.int64),
        "task_keep_rate": _ratio(per_model_task),
        "queries_routed": per_model_query[:, 0].astype(np.int64),
        "query_keep_rate": _ratio(per_model_query),
    })
    return RouterStability(pl.DataFrame(task_rows), pl.DataFrame(query_rows), models)


def variant_arrays(bench: BenchmarkArrays, labels: pl.DataFrame) -> tuple[np.ndarray, list[np.ndarray]]:
    """(Y, dataset_y) of another labels frame (input_id, dataset, model, y) on ``bench``'s rows,
    models and datasets (NaN where the variant has no label)."""
    row_of = {iid: r for r, iid in enumerate(bench.input_ids)}
    m_of = {m: j for j, m in enumerate(bench.models)}
    d_of = {d: j for j, d in enumerate(bench.datasets)}
    lab = labels.filter(pl.col("input_id").is_in(list(row_of)) & pl.col("model").is_in(list(m_of))
                        & pl.col("dataset").is_in(list(d_of)))
    r = np.array([row_of[i] for i in lab["input_id"]], np.int64)
    m = np.array([m_of[x] for x in lab["model"]], np.int64)
    dcol = np.array([d_of[x] for x in lab["dataset"]], np.int64)
    y = lab["y"].cast(pl.Float64).to_numpy()
    n, M = len(bench.input_ids), len(bench.models)
    ysum, ycnt = np.zeros((n, M)), np.zeros((n, M))
    np.add.at(ysum, (r, m), y)
    np.add.at(ycnt, (r, m), 1.0)
    with np.errstate(invalid="ignore"):
        Y = np.where(ycnt > 0, ysum / np.maximum(ycnt, 1), np.nan)
    dys = []
    for d, rows in enumerate(bench.dataset_rows):
        local = np.full(n, -1, np.int64)
        local[rows] = np.arange(rows.size)
        yd = np.full((rows.size, M), np.nan)
        sel = (dcol == d) & (local[r] >= 0)
        yd[local[r[sel]], m[sel]] = y[sel]
        dys.append(yd)
    return Y, dys


def _ratio(a: np.ndarray) -> np.ndarray:
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(a[:, 0] > 0, a[:, 1] / np.maximum(a[:, 0], 1), np.nan)


def _column_means(Y: np.ndarray) -> np.ndarray:
    cnt = (~np.isnan(Y)).sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(cnt > 0, np.nansum(Y, axis=0) / np.maximum(cnt, 1), np.nan)
