"""Evaluate strong/weak routers on benchmarks they never saw (docs/method.md#evaluating-pair-routers; issue 14).

``evaluate_pair(data, X, strong, weak, heldout)``:

1. Held out: every input in a dataset matching ``heldout`` (fnmatch patterns, or regexes starting
   with '^'); the *test* queries are those where both models have a result. No held-out input is
   ever a training input, and training inputs whose embedding is a near duplicate of a held-out
   one (cosine ≥ ``dedup``) are dropped too (RouteLLM drops its contaminated prompts the same way;
   the same question often sits in two sources under two prompt formats).
2. The rest is split (seeded): a ``calib_fraction`` of the inputs forms the *calibration set*
   (unlabelled use only), the others train every router — on all models kept (the pair and the
   ``max_models`` − 2 models with most inputs in common with either; every comparison among them
   is a training pair for SW and MF), the ĝ predictors on the pair's labels (``models="pair"``) or
   on every kept model's.
3. Per router: scores on the test queries → the RouteLLM curve, APGR, CPT(50 %), CPT(80 %) with
   bootstrap intervals (``transforms.pair_metrics``); (α, τ) per target share from the
   calibration set (``transforms.pair_calibration``) and, at those thresholds on the test
   queries, c(α), r(α), PGR with intervals; recalibration on the test queries' own scores (no
   labels): thresholds from a random half of them, their share there and on the other half.
   The random router's APGR and CPT are the mean over ``random_draws`` seeds (RouteLLM: 10).
4. The oracle scores the test queries from their labels (``pair_metrics.oracle_scores``, what
   ``OracleRouter`` fitted on them returns); its APGR sits next to the analytic value.

``training_pool`` gives step 1's training inputs alone (``transforms.pair_select`` validates
candidate routers inside it, never on the held-out benchmark).

``load_store_data(url)`` reads a store's labels, memberships and embeddings into a
``WinData`` and the aligned matrix. ``write_pair_report`` writes Parquet, Markdown and a
self-contained HTML page with the PGR-vs-call-share plot.
"""

from __future__ import annotations

import base64
import html
import io
import json
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import polars as pl

from benchroute.transforms import pair_calibration as calib
from benchroute.transforms import pair_metrics as pm
from benchroute.transforms.knn import normalize_rows
from benchroute.transforms.pair_labels import PairError, WinData, bridge_models, win_data_from_frames
from benchroute.transforms.pair_routers import make_pair_router, query_keys

# name → (router key in pair_routers.PAIR_ROUTERS, hyper-parameters)
DEFAULT_ROUTERS: dict[str, tuple[str, dict]] = {
    "sw_ranking": ("sw_ranking", {}),
    "mf": ("mf", {}),
    "diff_knn": ("diff", {"predictor": "knn_shrunk", "predictor_params": {"n_neighbors": 20}}),
    "diff_mlp": ("diff", {"predictor": "mlp"}),
    "diff_mlp_all": ("diff", {"predictor": "mlp", "models": "all"}),
    "diff_factorized_all": ("diff", {"predictor": "factorized", "models": "all"}),
    "irt": ("irt", {}),
    "ens_mlp_irt": ("ensemble", {"members": [["diff", {"predictor": "mlp", "models": "all"}], ["irt", {}]]}),
    "ens_mlp_irt_mf": ("ensemble", {"members": [["diff", {"predictor": "mlp", "models": "all"}], ["irt", {}],
                                                ["mf", {}]]}),
    "random": ("random", {}),
    "oracle": ("oracle", {}),
}

# RouteLLM's published numbers (docs/method.md#reference-numbers; gpt-4-1106-preview vs Mixtral-8x7B, Arena data with
# golden-label / judge augmentation). Keys: benchmark → router → metric.
ROUTELLM_REFERENCE: dict[str, dict[str, dict[str, float]]] = {
    "mmlu": {"mf": {"apgr": 0.597}, "sw_ranking": {"apgr": 0.603}, "random": {"apgr": 0.500},
             "best": {"cpt50": 0.354}},
    "gsm8k": {"mf": {"apgr": 0.565}, "sw_ranking": {"apgr": 0.568}},
    "mt_bench": {"mf": {"apgr": 0.802, "cpt50": 0.134}},
}


@dataclass
class PairEvalResult:
    """The evaluation of the routers on one pair and one held-out benchmark."""

    name: str
    strong: str
    weak: str
    heldout: list[str]
    summary: pl.DataFrame  # one row per router
    curves: pl.DataFrame  # router, threshold, call_share, quality, pgr (the RouteLLM curve)
    operating: pl.DataFrame  # router, target_share, alpha, c/r/pgr on the test queries with CIs
    calibration: pl.DataFrame  # router, target_share, alpha, share (calibration set), shares on test
    info: dict = field(default_factory=dict)
    scores: dict[str, np.ndarray] = field(default_factory=dict)


# ------------------------------------------------------------------------------ data
def load_store_data(url: str, embedder: str | None = None, models: Sequence[str] | None = None,
                    datasets: Sequence[str] | None = None) -> tuple[WinData, np.ndarray]:
    """(WinData, X) of every labelled input with a vector (``datasets``: fnmatch patterns to keep)."""
    from benchroute.artifacts import embeddings as emb
    from benchroute.artifacts.store import Store

    store = Store(url)
    eid = emb.pick_embedder(emb.embedders(store), embedder)  # one embedder choice for every caller
    labels = store.read("labels")
    mem = store.read("memberships")
    if datasets:
        import fnmatch

        keep = [d for d in labels["dataset"].unique().to_list()
                if any(fnmatch.fnmatchcase(d, p) for p in datasets)]
        labels = labels.filter(pl.col("dataset").is_in(keep))
    have = emb.present_ids(store, eid)
    labels = labels.filter(pl.col("input_id").is_in(have.implode()))
    data = win_data_from_frames(labels, mem, models=models)
    X, _ = emb.read_matrix(store, eid, data.input_ids)
    return data, normalize_rows(np.array(X))


def near_duplicates(X_train: np.ndarray, X_test: np.ndarray, threshold: float,
                    block: int = 2048) -> np.ndarray:
    """(n_train,) bool: training rows with cosine ≥ ``threshold`` to any test row."""
    A = normalize_rows(X_train)
    B = normalize_rows(X_test)
    out = np.zeros(A.shape[0], bool)
    if B.shape[0] == 0:
        return out
    for s in range(0, A.shape[0], block):
        out[s:s + block] = (A[s:s + block] @ B.T).max(axis=1) >= threshold
    return out


def training_pool(X: np.ndarray, held: np.ndarray, test: np.ndarray, exclude: np.ndarray | None = None,
                  augment: float = 0.0, dedup: float | None = 0.95, seed: int = 0):
    """The inputs ``evaluate_pair`` may train on: not held out, not ``exclude``d, not a near
    duplicate (cosine ≥ ``dedup``) of a held-out input (of a test query with ``augment``, whose
    seeded share of the test queries joins training). Returns (train rows, test rows, augmented
    rows, n excluded, n near duplicates dropped)."""
    n_excluded = 0
    if exclude is not None:
        exclude = np.asarray(exclude, bool) & ~held
        n_excluded = int(exclude.sum())
    train_all = np.flatnonzero(~held & ~exclude) if exclude is not None else np.flatnonzero(~held)
    aug = np.empty(0, np.int64)
    if augment:
        aug = np.sort(np.random.default_rng(seed + 2).choice(test, int(round(augment * test.size)), replace=False))
        test = np.setdiff1d(test, aug)
        train_all = np.union1d(train_all, aug)
    n_dup = 0
    if dedup is not None and train_all.size:
        against = test if augment else np.flatnonzero(held)
        dup = near_duplicates(X[train_all], X[against], dedup)
        n_dup = int(dup.sum())
        train_all = train_all[~dup]
    return train_all, test, aug, n_excluded, n_dup


# ------------------------------------------------------------------------------ evaluation
def evaluate_pair(
    data: WinData,
    X: np.ndarray,
    strong: str,
    weak: str,
    heldout: Sequence[str],
    *,
    name: str | None = None,
    routers: Mapping[str, tuple[str, Mapping]] | None = None,
    calib_fraction: float = 0.1,
    dedup: float | None = 0.95,
    max_models: int | None = 24,
    n_boot: int = 1000,
    shares: Sequence[float] = calib.DEFAULT_SHARES,
    seed: int = 0,
    min_test: int = 20,
    exclude: np.ndarray | None = None,
    augment: float = 0.0,
    random_draws: int = 10,
    log=None,
) -> PairEvalResult:
    """Train on everything but ``heldout`` and judge each router there (module doc).
    ``exclude`` (n bool): more inputs never to train on (e.g. another source's copies of the
    held-out questions). ``augment``: a seeded fraction of the held-out benchmark's test queries
    moves to training with its labels (RouteLLM's golden-label augmentation with MMLU's
    validation questions, here with MMLU's own); the rest is tested, near duplicates of it are
    dropped from training."""
    routers = dict(routers or DEFAULT_ROUTERS)
    X = normalize_rows(X)
    s_idx, w_idx = data.model_index(strong), data.model_index(weak)
    held = data.in_datasets(heldout)
    both = ~np.isnan(data.Q[:, s_idx]) & ~np.isnan(data.Q[:, w_idx])
    test = np.flatnonzero(held & both)
    if test.size < min_test:
        raise PairError(f"{name or heldout}: only {test.size} held-out inputs with results of both "
                        f"{strong} and {weak} (need {min_test})")
    train_all, test, aug, n_excluded, n_dup = training_pool(X, held, test, exclude, augment, dedup, seed)
    rng = np.random.default_rng(seed)
    perm = rng.permutation(train_all)
    n_cal = int(round(calib_fraction * perm.size))
    cal_rows, fit_rows = np.sort(perm[:n_cal]), np.sort(perm[n_cal:])
    fit_data = data.rows(fit_rows)
    keep = bridge_models(fit_data.Q, s_idx, w_idx, (max_models or len(data.models)) - 2, link="either")
    kept = [data.models[j] for j in keep]
    fit_data = fit_data.columns(kept)
    pair_fit = ~np.isnan(fit_data.Q[:, 0]) & ~np.isnan(fit_data.Q[:, 1])
    test_data = data.rows(test).columns(kept)
    qs, qw = test_data.Q[:, 0], test_data.Q[:, 1]
    info = {
        "name": name or "+".join(heldout), "strong": strong, "weak": weak, "heldout": list(heldout),
        "n_test": int(test.size), "n_heldout_inputs": int(held.sum()), "n_train": int(fit_rows.size),
        "n_calibration": int(cal_rows.size), "n_near_duplicates_dropped": n_dup, "dedup": dedup,
        "n_excluded": n_excluded, "n_augment": int(aug.size),
        "models": kept, "n_train_pair_labelled": int(pair_fit.sum()),
        "quality": "judge score" if any(d in data.score_datasets for d in _datasets_of(data, test)) else "y",
        "r_strong": float(qs.mean()), "r_weak": float(qw.mean()),
        "oracle_apgr_analytic": pm.oracle_apgr(qs, qw),
    }
    if set(np.unique(np.concatenate([qs, qw]))) <= {0.0, 1.0}:
        p_plus, p_minus = float(np.mean((qs == 1) & (qw == 0))), float(np.mean((qs == 0) & (qw == 1)))
        info.update(p_strong_only=p_plus, p_weak_only=p_minus)
    summary, curves, operating, cal_tab, all_scores = [], [], [], [], {}
    k_test, k_cal = query_keys(X[test]), query_keys(X[cal_rows])
    half = np.random.default_rng(seed + 1).permutation(test.size)
    a_idx, b_idx = half[: test.size // 2], half[test.size // 2:]
    for rname, (key, params) in routers.items():
        t0 = time.perf_counter()
        if key == "oracle":  # from the labels directly (a lookup by embedding confuses duplicates)
            fit_s, t0 = 0.0, time.perf_counter()
            p = pm.oracle_scores(qs, qw, data.quality_range())
            p_cal, kc = p, k_test  # calibrated on the test queries themselves
        else:
            router = make_pair_router(key, **dict(params)).fit(X[fit_rows], fit_data, pair=(strong, weak))
            fit_s = time.perf_counter() - t0
            t0 = time.perf_counter()
            p = router.predict_proba(X[test])
            p_cal, kc = (router.predict_proba(X[cal_rows]), k_cal) if cal_rows.size else (p, k_test)
        pred_s = time.perf_counter() - t0
        all_scores[rname] = p
        P = p
        if key == "random" and random_draws > 1:  # RouteLLM averages its random router over 10 draws
            seed0 = int(dict(params).get("seed", 0))
            P = np.stack([p] + [make_pair_router("random", seed=seed0 + 1 + j).fit(X[test], test_data, (strong, weak))
                                .predict_proba(X[test]) for j in range(random_draws - 1)])
        m = pm.evaluate_scores(P, qs, qw, n_boot=n_boot, seed=seed)
        table = calib.calibrate(p_cal, shares, keys=kc)
        at = pm.bootstrap_at_thresholds(p, qs, qw, [(r["alpha"], r["tau"]) for r in table], keys=k_test,
                                        n_boot=n_boot, seed=seed)
        recal_half = calib.recalibrate(p[a_idx], table, keys=k_test[a_idx])
        for r, o, rh in zip(table, at, recal_half):
            operating.append({"router": rname, "target_share": r["target_share"], "tau": r["tau"], **o})
            cal_tab.append({
                "router": rname, "target_share": r["target_share"], "alpha": r["alpha"], "tau": r["tau"],
                "share_calibration": r["share"], "share_test_stored": o["call_share"],
                "alpha_recalibrated": rh["alpha"], "tau_recalibrated": rh["tau"],
                "share_recalibration_half": rh["share"],
                "share_other_half": calib.share_at(p[b_idx], rh["alpha"], rh["tau"], k_test[b_idx]),
            })
        mine = [c for c in cal_tab if c["router"] == rname]
        errs_stored = [abs(c["share_test_stored"] - c["target_share"]) for c in mine]
        errs_recal = [abs(c["share_recalibration_half"] - c["target_share"]) for c in mine]
        errs_other = [abs(c["share_other_half"] - c["target_share"]) for c in mine]
        for row in m.curve.rows():
            curves.append({"router": rname, **row})
        summary.append({
            "router": rname, **m.row(), "fit_s": fit_s, "predict_s": pred_s,
            "share_error_stored_max": max(errs_stored), "share_error_stored_mean": float(np.mean(errs_stored)),
            "share_error_recalibrated_max": max(errs_recal),
            "share_error_other_half_max": max(errs_other),
            "share_error_other_half_mean": float(np.mean(errs_other)),
        })
        if log:
            log(f"{info['name']} {rname}: APGR {m.apgr:.3f} [{m.apgr_ci[0]:.3f}, {m.apgr_ci[1]:.3f}] "
                f"CPT50 {m.cpt[0.5]:.3f} fit {fit_s:.1f}s predict {pred_s:.1f}s")
    return PairEvalResult(info["name"], strong, weak, list(heldout), pl.DataFrame(summary),
                          pl.DataFrame(curves), pl.DataFrame(operating), pl.DataFrame(cal_tab), info, all_scores)


PUBLISHED_BENCHMARKS = ("mmlu", "gsm8k", "mt_bench")  # RouteLLM's reference numbers exist for these


def chosen_routers(names: Sequence[str] | None) -> dict[str, tuple[str, dict]] | None:
    """The routers of ``DEFAULT_ROUTERS`` named (``None``: all); ``ValueError`` for an unknown one."""
    if not names:
        return None
    unknown = sorted(set(names) - set(DEFAULT_ROUTERS))
    if unknown:
        raise ValueError(f"unknown routers {unknown}; choose from {sorted(DEFAULT_ROUTERS)}")
    return {r: DEFAULT_ROUTERS[r] for r in names}


def evaluate_pairs(data: WinData, X: np.ndarray, pairs: Sequence[tuple[str, str]], heldout: Sequence[str],
                   *, routers: Sequence[str] | None = None, n_boot: int = 1000,
                   seed: int = 0) -> tuple[list[PairEvalResult], dict[str, str]]:
    """``evaluate_pair`` for every pair and every held-out option (comma-separated dataset names
    or globs, e.g. ``"mmlu/*"``); returns the results, each named ``<benchmark>-<strong>-vs-<weak>``,
    and the names whose benchmark has RouteLLM's published reference numbers (name → benchmark)."""
    import re

    chosen = chosen_routers(routers)
    results, reference = [], {}
    for held in heldout:
        patterns = [x.strip() for x in held.split(",") if x.strip()]
        if not patterns:
            raise ValueError(f"held-out option {held!r} names no dataset")
        benchmark = patterns[0].split("/")[0]
        for strong, weak in pairs:
            name = re.sub(r"[^A-Za-z0-9_.+-]+", "-",
                          f"{benchmark}-{strong.split('/')[-1]}-vs-{weak.split('/')[-1]}")
            results.append(evaluate_pair(data, X, strong, weak, patterns, name=name, routers=chosen,
                                         n_boot=n_boot, seed=seed))
            if benchmark in PUBLISHED_BENCHMARKS:
                reference[name] = benchmark
    return results, reference


def _datasets_of(data: WinData, rows: np.ndarray) -> list[str]:
    hit = data.member[rows].any(axis=0)
    return [d for d, h in zip(data.datasets, hit) if h]


# ------------------------------------------------------------------------------ report
def reference_for(benchmark: str, router: str, metric: str) -> float | None:
    return ROUTELLM_REFERENCE.get(benchmark, {}).get(router, {}).get(metric)


def table_rows(results: Sequence[PairEvalResult], reference: Mapping[str, str] | None = None) -> pl.DataFrame:
    """One row per (benchmark, router): APGR and CPT with intervals and RouteLLM's number where
    published. ``reference`` maps a result's name to a key of ``ROUTELLM_REFERENCE``."""
    rows = []
    for res in results:
        ref_key = (reference or {}).get(res.name)
        for r in res.summary.iter_rows(named=True):
            ref_router = {"sw_ranking": "sw_ranking", "mf": "mf", "random": "random"}.get(r["router"])
            rows.append({
                "benchmark": res.name, "strong": res.strong, "weak": res.weak, "n_test": res.info["n_test"],
                **r,
                "routellm_apgr": reference_for(ref_key, ref_router, "apgr") if ref_key and ref_router else None,
                "routellm_cpt50": reference_for(ref_key, ref_router, "cpt50") if ref_key and ref_router else None,
                "oracle_apgr_analytic": res.info["oracle_apgr_analytic"],
            })
    return pl.DataFrame(rows)


def plot_pgr(results: Sequence[PairEvalResult]) -> bytes:
    """PNG: PGR against strong-call share per router, one panel per held-out benchmark."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(results)
    ncols = min(4, n)
    nrows = -(-n // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.4 * ncols, 3.9 * nrows), squeeze=False)
    for ax in axes.ravel()[n:]:
        ax.set_visible(False)
    for ax, res in zip(axes.ravel(), results):
        for router in res.curves["router"].unique(maintain_order=True).to_list():
            c = res.curves.filter(pl.col("router") == router).sort("call_share")
            ax.plot(c["call_share"] * 100, c["pgr"], marker=".", label=router,
                    linestyle="--" if router in ("random", "oracle") else "-")
        ax.axhline(0, color="grey", lw=0.6)
        ax.axhline(1, color="grey", lw=0.6)
        ax.set_title(f"{res.name}\n{res.strong} vs {res.weak}", fontsize=8)
        ax.set_xlabel("strong-model calls (%)")
        ax.set_ylabel("PGR")
        ax.legend(fontsize=7)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()


def markdown_table(table: pl.DataFrame) -> str:
    head = ("| benchmark | pair | n | router | APGR [95 % CI] | RouteLLM APGR | CPT(50 %) [CI] | "
            "CPT(80 %) [CI] | share error, stored α (mean) | recalibrated: same queries (max) | "
            "recalibrated: other half (mean / max) |")
    lines = [head, "|" + "---|" * 11]

    def f(x, pct=False):
        if x is None or x != x:
            return "–"
        return f"{100 * x:.1f} %" if pct else f"{x:.3f}"

    for r in table.iter_rows(named=True):
        lines.append(
            f"| {r['benchmark']} | {r['strong']} / {r['weak']} | {r['n_test']} | {r['router']} | "
            f"{f(r['apgr'])} [{f(r['apgr_lo'])}, {f(r['apgr_hi'])}] | {f(r['routellm_apgr'])} | "
            f"{f(r['cpt50'], True)} [{f(r['cpt50_lo'], True)}, {f(r['cpt50_hi'], True)}] | "
            f"{f(r['cpt80'], True)} [{f(r['cpt80_lo'], True)}, {f(r['cpt80_hi'], True)}] | "
            f"{f(r['share_error_stored_mean'], True)} | {f(r['share_error_recalibrated_max'], True)} | "
            f"{f(r['share_error_other_half_mean'], True)} / {f(r['share_error_other_half_max'], True)} |"
        )
    return "\n".join(lines)


def write_pair_report(out_dir: str, results: Sequence[PairEvalResult],
                      reference: Mapping[str, str] | None = None, meta: Mapping | None = None) -> dict[str, str]:
    """``<out>/pair_table.parquet``, per result ``<name>_{curves,operating,calibration}.parquet``,
    ``pair_report.md`` and ``pair_report.html`` (the plot embedded)."""
    from fsspec.core import url_to_fs

    fs, root = url_to_fs(out_dir)
    fs.makedirs(root, exist_ok=True)
    paths = {}
    table = table_rows(results, reference)

    def put(rel: str, data: bytes) -> None:
        with fs.open(f"{root}/{rel}", "wb") as f:
            f.write(data)
        paths[rel] = f"{root}/{rel}"

    def parquet(df: pl.DataFrame) -> bytes:
        b = io.BytesIO()
        df.write_parquet(b)
        return b.getvalue()

    put("pair_table.parquet", parquet(table))
    for res in results:
        slug = res.name.replace("/", "_").replace("*", "")
        for k in ("curves", "operating", "calibration"):
            put(f"{slug}_{k}.parquet", parquet(getattr(res, k)))
    info = {res.name: res.info for res in results}
    put("pair_info.json", json.dumps({"meta": dict(meta or {}), "results": info}, indent=1, default=str).encode())
    md = ["# Strong/weak routers on held-out benchmarks", "",
          "APGR over 10 call-share bins and CPT read from the curve as measured (RouteLLM's "
          "protocol), 95 % percentile bootstrap intervals over queries. RouteLLM's numbers: "
          "gpt-4-1106-preview vs Mixtral-8x7B, routers trained on Arena data with augmentation.", "",
          markdown_table(table), ""]
    for res in results:
        md.append(f"- {res.name}: " + ", ".join(f"{k} {v}" for k, v in res.info.items()
                                                 if k not in ("models", "heldout")))
    put("pair_report.md", "\n".join(md).encode())
    png = base64.b64encode(plot_pgr(results)).decode()
    body = "\n".join(md[:4])
    page = (
        "<!doctype html><meta charset='utf-8'><title>Pair routers</title>"
        "<style>body{font-family:sans-serif;max-width:1400px;margin:auto}table{border-collapse:collapse;"
        "font-size:12px}td,th{border:1px solid #ccc;padding:2px 6px}</style>"
        f"<h1>Strong/weak routers on held-out benchmarks</h1><p>{html.escape(body)}</p>"
        + _html_table(table)
        + f"<h2>PGR against strong-model calls</h2><img src='data:image/png;base64,{png}'>"
    )
    put("pair_report.html", page.encode())
    return paths


def _html_table(df: pl.DataFrame) -> str:
    cols = ["benchmark", "router", "n_test", "apgr", "apgr_lo", "apgr_hi", "routellm_apgr", "cpt50", "cpt80",
            "oracle_apgr_analytic", "share_error_stored_mean", "share_error_recalibrated_max",
            "share_error_other_half_mean"]
    cols = [c for c in cols if c in df.columns]
    out = ["<table><tr>" + "".join(f"<th>{html.escape(c)}</th>" for c in cols) + "</tr>"]
    for r in df.select(cols).iter_rows():
        out.append("<tr>" + "".join(
            f"<td>{v:.3f}</td>" if isinstance(v, float) else f"<td>{html.escape(str(v))}</td>" for v in r
        ) + "</tr>")
    return "".join(out) + "</table>"
