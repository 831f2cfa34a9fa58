"""Benchmark: correctness predictors on real data, against the paper's kNN (k = 10).

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/predictors.py --store /tmp/full/store \\
        [--source mmlu_pro] [--predictors knn,knn_shrunk,mlp,factorized] [--calibrated mlp] \\
        [--set mlp.hidden=512 --set factorized.rank=64] [--seed 0] [--json out.json]

Reads the store (never writes it): the labels of every dataset of ``--source`` (``mmlu_pro``:
the ``mmlu_pro/*`` datasets; an input labelled in several of them gets the mean label), and the
vectors of the store's embedder (``--embedder`` if it holds several). A seeded random 80/20 split
of the *inputs*; every predictor is fitted on the 80% and scored on the labelled entries of the
20%:

- accuracy of 1[g > 0.5] against y (a mean label y counts fractionally), Brier (g − y)²,
  ECE over 15 equal-width bins of g (Σ_bins n_b/N · |mean y − mean g|), log-loss (g clipped to
  [1e-6, 1 − 1e-6]); a g that is NaN (plain kNN: no labelled neighbour) is scored as the model's
  training mean, and ``coverage`` is the share of entries with a finite g;
- fit seconds, and the median latency of one query through the predictor restored from its
  pickle-free state (``predictor_from_state``, numpy only);
- Δ columns: the difference to the baseline row ``knn`` (k = 10, uniform weights).

A ``prior`` row (each model's training mean for every input) is the floor any predictor must beat.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

BASELINE = "knn"


def load_source(store_url: str, source: str, embedder: str | None, skip_missing: bool = False):
    """(X float32 n × d, Y float64 n × M with NaN, input ids, model names, embedder id)."""
    import polars as pl

    from benchroute.artifacts.embeddings import MissingVectors, embedders, present_ids, read_matrix
    from benchroute.artifacts.store import Store

    store = Store(store_url)
    labels = store.read("labels", columns=["input_id", "dataset", "model", "y"])
    labels = labels.filter(pl.col("dataset").str.starts_with(f"{source}/") | (pl.col("dataset") == source))
    if labels.height == 0:
        sys.exit(f"no labels for source {source!r} in {store_url}")
    agg = labels.group_by("input_id", "model").agg(pl.col("y").cast(pl.Float64).mean()).sort("input_id", "model")
    ids = sorted(agg["input_id"].unique().to_list())
    models = sorted(agg["model"].unique().to_list())
    row = {i: k for k, i in enumerate(ids)}
    col = {m: k for k, m in enumerate(models)}
    Y = np.full((len(ids), len(models)), np.nan)
    Y[[row[i] for i in agg["input_id"]], [col[m] for m in agg["model"]]] = agg["y"].to_numpy()
    available = embedders(store)
    if embedder is None:
        if not available:
            sys.exit(f"{store_url} holds no embeddings yet (run `benchroute embed`)")
        embedder = available[0]
    if skip_missing:
        have = set(present_ids(store, embedder).to_list())
        keep = np.array([i in have for i in ids], bool)
        if not keep.all():
            print(f"(dropping {int((~keep).sum())} of {len(ids)} inputs without a vector)", flush=True)
        ids = [i for i, k in zip(ids, keep) if k]
        Y = Y[keep]
    try:
        X, _ = read_matrix(store, embedder, ids)
    except MissingVectors as e:
        sys.exit(f"not every input of {source} has a vector yet: {e}")
    return np.array(X, dtype=np.float32), Y, ids, models, embedder


def metrics(G: np.ndarray, Y: np.ndarray, fallback: np.ndarray, bins: int = 15) -> dict:
    """Held-out scores over the labelled entries of Y (see the module docstring)."""
    ok = ~np.isnan(Y)
    coverage = float(np.isfinite(G[ok]).mean())
    G = np.where(np.isnan(G), fallback[None, :], G)
    g, y = G[ok], Y[ok]
    pred = (g > 0.5).astype(np.float64)
    acc = float(np.mean(1.0 - np.abs(pred - y)))
    brier = float(np.mean((g - y) ** 2))
    p = np.clip(g, 1e-6, 1 - 1e-6)
    ll = float(-np.mean(y * np.log(p) + (1 - y) * np.log1p(-p)))
    b = np.minimum((g * bins).astype(np.int64), bins - 1)
    gap = np.abs(np.bincount(b, weights=y, minlength=bins) - np.bincount(b, weights=g, minlength=bins))
    ece = float(gap.sum() / g.size)  # Σ_b n_b/N · |mean y_b − mean g_b| = Σ_b |Σ y − Σ g| / N
    return {"accuracy": acc, "brier": brier, "ece": ece, "log_loss": ll, "coverage": coverage}


def parse_sets(items: list[str]) -> dict[str, dict]:
    """``name.param=value`` (value parsed as JSON when it parses) → {name: {param: value}}."""
    out: dict[str, dict] = {}
    for item in items:
        key, _, raw = item.partition("=")
        name, _, param = key.partition(".")
        if not param or not raw:
            sys.exit(f"--set wants name.param=value, got {item!r}")
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        out.setdefault(name, {})[param] = value
    return out


def latency_ms(est, Q: np.ndarray, n: int = 200) -> float:
    """Median seconds·1000 of one query through the predictor restored from its state."""
    from benchroute.transforms.predictors import predictor_from_state

    restored = predictor_from_state(*est.to_state())
    restored.predict_proba(Q[:1])
    times = []
    for i in range(min(n, len(Q))):
        t0 = time.perf_counter()
        restored.predict_proba(Q[i : i + 1])
        times.append(time.perf_counter() - t0)
    return 1000 * float(np.median(times))


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--store", required=True)
    ap.add_argument("--source", default="mmlu_pro")
    ap.add_argument("--embedder", default=None)
    ap.add_argument("--predictors", default="knn,knn_shrunk,mlp,factorized")
    ap.add_argument("--calibrated", default="", help="comma list of predictors to also run Platt-calibrated")
    ap.add_argument("--set", action="append", default=[], metavar="NAME.PARAM=VALUE")
    ap.add_argument("--test-fraction", type=float, default=0.2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--skip-missing", action="store_true", help="drop inputs without a vector (partial store)")
    ap.add_argument("--json", type=Path, help="also write the results here")
    args = ap.parse_args(argv)

    from benchroute.transforms.predictors import CalibratedPredictor, make_predictor

    X, Y, ids, models, embedder = load_source(args.store, args.source, args.embedder, args.skip_missing)
    rng = np.random.default_rng(args.seed)
    perm = rng.permutation(len(ids))
    n_test = int(round(args.test_fraction * len(ids)))
    te, tr = np.sort(perm[:n_test]), np.sort(perm[n_test:])
    Xtr, Ytr, Xte, Yte = X[tr], Y[tr], X[te], Y[te]
    prior = np.nanmean(Ytr, axis=0)
    print(
        f"{args.source}: {len(ids)} inputs × {len(models)} models, {int((~np.isnan(Y)).sum())} labels "
        f"({(~np.isnan(Y)).mean():.1%} filled); embedder {embedder}; train {len(tr)}, test {len(te)} "
        f"inputs (seed {args.seed})",
        flush=True,
    )

    sets = parse_sets(args.set)
    names = [n for n in args.predictors.split(",") if n]
    if BASELINE not in names:
        names.insert(0, BASELINE)
    runs: list[tuple[str, object]] = []
    for name in names:
        over = sets.get(name, {})
        label = f"{name}({', '.join(f'{k}={v!r}' for k, v in over.items())})" if over else name
        runs.append((label, make_predictor(name, **over)))
    for name in [n for n in args.calibrated.split(",") if n]:
        runs.append((f"{name}+platt", CalibratedPredictor(make_predictor(name, **sets.get(name, {})))))

    rows = [{"predictor": "prior", "fit_s": 0.0, "latency_ms": float("nan"),
             **metrics(np.broadcast_to(prior, Yte.shape).copy(), Yte, prior)}]
    for label, est in runs:
        t0 = time.perf_counter()
        est.fit(Xtr, Ytr)
        fit_s = time.perf_counter() - t0
        G = est.predict_proba(Xte)
        row = {"predictor": label, "fit_s": fit_s, "latency_ms": latency_ms(est, Xte), **metrics(G, Yte, prior)}
        if hasattr(est, "n_epochs_"):
            row["epochs"] = f"{est.best_epoch_ + 1}/{est.n_epochs_}"
        rows.append(row)
        print(f"  {label}: acc {row['accuracy']:.4f} ({fit_s:.1f} s)", flush=True)

    base = next(r for r in rows if r["predictor"] == BASELINE)
    cols = ["accuracy", "brier", "ece", "log_loss"]
    head = ("| predictor | fit s | 1-query ms | accuracy | Brier | ECE | log-loss | coverage | "
            "Δacc vs knn | ΔBrier | Δlog-loss | best/epochs |")
    print()
    print(head)
    print("|" + "---|" * (head.count("|") - 1))
    for r in rows:
        d = [r[c] - base[c] for c in ("accuracy", "brier", "log_loss")]
        lat = "–" if np.isnan(r["latency_ms"]) else f"{r['latency_ms']:.3f}"
        print(
            f"| {r['predictor']} | {r['fit_s']:.1f} | {lat} | "
            + " | ".join(f"{r[c]:.4f}" for c in cols)
            + f" | {r['coverage']:.3f} | {d[0]:+.4f} | {d[1]:+.4f} | {d[2]:+.4f} | {r.get('epochs', '–')} |"
        )
    result = {
        "source": args.source, "embedder": embedder, "n_inputs": len(ids), "n_models": len(models),
        "n_train": len(tr), "n_test": len(te), "seed": args.seed, "baseline": BASELINE, "rows": rows,
    }
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
