"""Choosing a strong/weak router without looking at the held-out benchmark (issue 14).

A held-out benchmark's labels must never pick the router. ``select_router`` validates every
candidate *inside the training data*: the training pool of an evaluation (what ``evaluate_pair``
may train on: held-out inputs, exclusions and near duplicates already removed) is split again
into validation tasks, one per dataset family (the part before '/': ``gsm8k``, ``mmlu``,
``mmlu_pro``...); a family with several datasets holds out every other one of them (sorted), so
the task asks for transfer to unseen subjects as the real evaluation does. On each task the
candidates are trained on the rest of the pool and judged by APGR (``evaluate_pair``, same
near-duplicate rule, no bootstrap); the candidate with the best mean APGR over the tasks wins.

Pair of a task: the evaluation's pair where both models have ≥ ``min_test`` results in the task;
otherwise, if the weak model has results there, a *proxy strong* model: the most accurate model
that ran on at least half the task's inputs (e.g. for gpt-4-1106-preview vs Mixtral on MMLU,
whose training data hold the pair only on GSM8K and MT-Bench, the MMLU-Pro task uses MMLU-Pro's
best model against Mixtral). Tasks without such a pair are skipped. The proxy's labels on the
rest of that family are hidden from training (``hide``), as the real strong model has none
there: the task then asks what the evaluation asks — route for a model never seen on this kind
of question — instead of the easier question of a model seen on its sister subjects.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence

import numpy as np
import polars as pl

from benchroute.transforms.pair_eval import evaluate_pair
from benchroute.transforms.pair_labels import PairError, WinData


def validation_tasks(data: WinData, pool: np.ndarray, strong: str, weak: str, min_test: int = 100) -> list[dict]:
    """Validation tasks inside ``pool`` (row indices of ``data``): dicts with ``family``,
    ``heldout`` (dataset names), ``strong``, ``weak`` (the pair judged), ``n`` (inputs where
    both have a result), ``proxy`` (whether strong is a proxy). See the module doc."""
    pool = np.asarray(pool, np.int64)
    member = data.member[pool]
    present = [d for j, d in enumerate(data.datasets) if member[:, j].any()]
    families: dict[str, list[str]] = {}
    for d in sorted(present):
        families.setdefault(d.split("/")[0], []).append(d)
    s_idx, w_idx = data.model_index(strong), data.model_index(weak)
    tasks = []
    for fam, dsets in sorted(families.items()):
        held = dsets[0::2] if len(dsets) > 1 else dsets
        rows = pool[data.in_datasets(held)[pool]]
        Y = data.Y[rows]
        have = ~np.isnan(Y)
        s, proxy = s_idx, False
        if np.sum(have[:, s_idx] & have[:, w_idx]) < min_test:
            if have[:, w_idx].sum() < min_test:
                continue
            cover = have.mean(axis=0) if rows.size else np.zeros(len(data.models))
            with np.errstate(invalid="ignore"), warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                acc = np.where(cover >= 0.5, np.nanmean(np.where(have, Y, np.nan), axis=0), -np.inf)
            acc[w_idx] = -np.inf
            if not np.isfinite(acc).any():
                continue
            s, proxy = int(np.argmax(acc)), True
        n = int(np.sum(have[:, s] & have[:, w_idx]))
        if n < min_test or pool.size - rows.size < min_test:  # too few to judge, or nothing left to train on
            continue
        fam_rows = pool[data.in_datasets(dsets)[pool]]
        hide = [data.models[s]] if proxy and not np.any(~np.isnan(data.Y[fam_rows, s_idx])) else []
        tasks.append({"family": fam, "heldout": held, "strong": data.models[s], "weak": weak, "n": n,
                      "proxy": proxy, "hide": hide, "family_datasets": dsets})
    return tasks


def hide_labels(data: WinData, task: Mapping) -> WinData:
    """``data`` with the labels of ``task["hide"]`` removed on the task family's inputs that are
    not held out (the validation task's training part); the held-out inputs keep theirs."""
    if not task.get("hide"):
        return data
    fam = data.in_datasets(task["family_datasets"]) & ~data.in_datasets(task["heldout"])
    cols = [data.model_index(m) for m in task["hide"]]
    Q, Y = data.Q.copy(), data.Y.copy()
    Q[np.ix_(fam, cols)] = np.nan
    Y[np.ix_(fam, cols)] = np.nan
    return WinData(data.input_ids, data.models, data.datasets, Q, Y, data.member, data.score_datasets)


def select_router(data: WinData, X: np.ndarray, pool: np.ndarray, strong: str, weak: str,
                  candidates: Mapping[str, tuple[str, Mapping]], *, min_test: int = 100,
                  dedup: float | None = 0.95, max_models: int | None = 24, seed: int = 0,
                  log=None) -> tuple[str | None, pl.DataFrame]:
    """(name of the candidate with the best mean validation APGR, table of task × router APGR)
    from the training ``pool`` only (module doc). ``None`` when no validation task exists."""
    pool = np.asarray(pool, np.int64)
    sub, Xs = data.rows(pool), np.asarray(X)[pool]
    rows = []
    for t in validation_tasks(data, pool, strong, weak, min_test):
        task_data = hide_labels(sub, t)
        try:
            res = evaluate_pair(task_data, Xs, t["strong"], t["weak"], t["heldout"], name=f"val:{t['family']}",
                                routers=candidates, n_boot=0, random_draws=1, dedup=dedup,
                                max_models=max_models, seed=seed, min_test=min_test)
        except PairError as e:
            if log:
                log(f"validation task {t['family']} skipped: {e}")
            continue
        for r in res.summary.iter_rows(named=True):
            rows.append({"task": t["family"], "strong": t["strong"], "weak": t["weak"], "proxy": t["proxy"],
                         "hidden": ",".join(t["hide"]),
                         "n_test": res.info["n_test"], "n_train": res.info["n_train"], "router": r["router"],
                         "apgr": r["apgr"], "cpt50": r["cpt50"]})
            if log:
                log(f"  validation {t['family']} ({t['strong'].split('/')[-1]} / {t['weak'].split('/')[-1]}, "
                    f"n={res.info['n_test']}): {r['router']} APGR {r['apgr']:.3f}")
    table = pl.DataFrame(rows) if rows else pl.DataFrame(
        schema={"task": pl.String, "strong": pl.String, "weak": pl.String, "proxy": pl.Boolean, "hidden": pl.String,
                "n_test": pl.Int64,
                "n_train": pl.Int64, "router": pl.String, "apgr": pl.Float64, "cpt50": pl.Float64})
    if table.is_empty():
        return None, table
    mean = table.group_by("router", maintain_order=True).agg(pl.col("apgr").mean().alias("mean_apgr"))
    mean = mean.filter(pl.col("mean_apgr").is_not_nan())
    if mean.is_empty():
        return None, table
    best = mean.sort("mean_apgr", descending=True, maintain_order=True)["router"][0]
    return best, table


def candidate_routers(routers: Mapping[str, tuple[str, Mapping]],
                      skip: Sequence[str] = ("random", "oracle")) -> dict[str, tuple[str, Mapping]]:
    """The routers a selection may choose: all but the baselines (by registry key)."""
    return {k: v for k, v in routers.items() if v[0] not in skip}
