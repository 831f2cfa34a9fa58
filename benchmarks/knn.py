"""Benchmark: one shared kNN search for all M models vs one scikit-learn kNN per model.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/knn.py [--k 10] [--queries 2000] [--synthetic]

Same data for both, in one run: the MMLU-Pro embeddings (all-MiniLM-L6-v2, cached by
``benchmarks/mmlu_pro_data.py``; embedded on first use) and the 28 models' ``correct_rx``
labels; a seeded random set of ``--queries`` inputs is scored from the others. ``--synthetic``
uses random vectors of the same shape instead (no embedding needed).

- shared: ``KNNCorrectness(k).fit(X, Y).predict_proba(Q)`` — one blocked search, M label columns.
- baseline: for each model, ``KNeighborsClassifier(k, metric="cosine", algorithm="brute")``
  fitted on the inputs labelled for that model, then ``predict_proba(Q)``.

Prints seconds, the speed-up (target ≥ M/2), peak traced memory (tracemalloc: numpy buffers
of both paths), the largest difference between the two g matrices over the models with
complete labels, and the latency of scoring a 1,000-input task (search, S1/S2/S3, descriptor,
kernel) against the whole benchmark.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import tracemalloc
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))


def load(synthetic: bool, seed: int) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """(X, Y, models): embeddings n × d and labels n × M (NaN = missing)."""
    if synthetic:
        rng = np.random.default_rng(seed)
        X = rng.normal(size=(11873, 384)).astype(np.float32)
        Y = (rng.random((11873, 28)) < 0.5).astype(np.float64)
        return X, Y, [f"m{i}" for i in range(28)]
    import mmlu_pro_data as mp
    import polars as pl

    inputs, _, labels, _ = mp.canonical_tables()
    X = mp.cached_embeddings(inputs)
    models = sorted(labels["model"].unique().to_list())
    row = {iid: i for i, iid in enumerate(inputs["input_id"].to_list())}
    col = {m: j for j, m in enumerate(models)}
    agg = labels.group_by("input_id", "model").agg(pl.col("y").cast(pl.Float64).mean())
    Y = np.full((len(row), len(models)), np.nan)
    Y[[row[i] for i in agg["input_id"]], [col[m] for m in agg["model"]]] = agg["y"].to_numpy()
    return X, Y, models


def measure(fn):
    """(result, seconds, peak traced MiB) of one call."""
    tracemalloc.start()
    t0 = time.perf_counter()
    out = fn()
    secs = time.perf_counter() - t0
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return out, secs, peak / 2**20


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--queries", type=int, default=2000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--synthetic", action="store_true")
    ap.add_argument("--json", type=Path, help="also write the results here")
    args = ap.parse_args(argv)

    from sklearn.neighbors import KNeighborsClassifier

    from benchroute.transforms.kernel import NadarayaWatson, mean_knn_distance
    from benchroute.transforms.knn import KNNCorrectness
    from benchroute.transforms.scores import task_scores

    X, Y, models = load(args.synthetic, args.seed)
    rng = np.random.default_rng(args.seed)
    q = np.zeros(len(X), bool)
    q[rng.choice(len(X), args.queries, replace=False)] = True
    Xtr, Ytr, Q = X[~q], Y[~q], X[q]
    M = Y.shape[1]

    def shared():
        return KNNCorrectness(args.k).fit(Xtr, Ytr).predict_proba(Q)

    def per_model():
        G = np.full((len(Q), M), np.nan)
        for m in range(M):
            lab = ~np.isnan(Ytr[:, m])
            clf = KNeighborsClassifier(args.k, metric="cosine", algorithm="brute")
            clf.fit(Xtr[lab], Ytr[lab, m].astype(int))
            proba = clf.predict_proba(Q)
            G[:, m] = proba[:, list(clf.classes_).index(1)] if 1 in clf.classes_ else 0.0
        return G

    shared()  # warm-up (BLAS threads, page faults) for both paths
    G_shared, t_shared, mem_shared = measure(shared)
    G_sklearn, t_sklearn, mem_sklearn = measure(per_model)
    complete = ~np.isnan(Ytr).any(axis=0)
    max_diff = float(np.abs(G_shared[:, complete] - G_sklearn[:, complete]).max())
    frac_equal = float(np.mean(np.abs(G_shared[:, complete] - G_sklearn[:, complete]) < 1e-6))
    # Where do the neighbour sets differ? Only at exact ties of the k-th similarity?
    ours = KNNCorrectness(args.k).fit(Xtr, Ytr).kneighbors(Q).indices
    ref = KNeighborsClassifier(args.k, metric="cosine", algorithm="brute").fit(
        Xtr, np.zeros(len(Xtr), int)).kneighbors(Q, return_distance=False)
    differ = [i for i in range(len(Q)) if set(ours[i]) != set(ref[i])]
    Xn = Xtr / np.linalg.norm(Xtr, axis=1, keepdims=True)
    gaps = []
    for i in differ:
        s = np.sort((Xn.astype(np.float64) @ (Q[i] / np.linalg.norm(Q[i])).astype(np.float64)))[::-1]
        gaps.append(s[args.k - 1] - s[args.k])

    # Scoring latency for a 1,000-input task against the whole benchmark (embeddings given).
    knn = KNNCorrectness(args.k).fit(X, Y)
    task = X[rng.choice(len(X), 1000, replace=False)] + 0.01 * rng.normal(size=(1000, X.shape[1])).astype(np.float32)
    kern = NadarayaWatson(bandwidth=0.05).fit(rng.random(13), rng.random((13, M)))

    def score():
        nb = knn.kneighbors(task)
        G = knn.predict_from_neighbors(nb)
        p_hat = kern.predict(mean_knn_distance(nb))[0]
        return task_scores(G, p_hat)

    score()
    lat = []
    for _ in range(5):
        t0 = time.perf_counter()
        score()
        lat.append(time.perf_counter() - t0)

    res = {
        "data": "synthetic" if args.synthetic else "mmlu_pro (all-MiniLM-L6-v2)",
        "n_index": int(len(Xtr)), "n_queries": int(len(Q)), "dim": int(X.shape[1]), "models": M,
        "k": args.k,
        "shared_s": t_shared, "sklearn_per_model_s": t_sklearn, "speedup": t_sklearn / t_shared,
        "target_speedup": M / 2,
        "shared_peak_mib": mem_shared, "sklearn_peak_mib": mem_sklearn,
        "max_abs_diff_complete_models": max_diff, "share_equal_complete_models": frac_equal,
        "n_complete_models": int(complete.sum()),
        "queries_with_other_neighbours": len(differ),
        "max_kth_similarity_gap_there": float(max(gaps)) if gaps else None,
        "score_1000_inputs_median_s": float(np.median(lat)),
        "score_index_size": int(len(X)),
    }
    print(f"data: {res['data']}; index {res['n_index']} × {res['dim']}, {res['n_queries']} queries, "
          f"M = {M}, k = {args.k}\n")
    print("| path | seconds | peak traced memory (MiB) |")
    print("|---|---|---|")
    print(f"| shared search, all {M} models | {t_shared:.3f} | {mem_shared:.0f} |")
    print(f"| scikit-learn, one KNeighborsClassifier per model | {t_sklearn:.3f} | {mem_sklearn:.0f} |")
    print(f"\nspeed-up: {res['speedup']:.1f}× (target ≥ M/2 = {M / 2:.0f})")
    print(f"g agreement on the {res['n_complete_models']} models with complete labels: "
          f"max |Δ| = {max_diff:.2e}, {100 * frac_equal:.2f}% of entries equal; "
          f"{len(differ)} queries have another neighbour set; largest gap between their k-th and "
          f"(k+1)-th similarity (float64): {max(gaps) if gaps else 0:.1e} (0 = an exact tie, "
          "which scikit-learn cuts arbitrarily and we give to the lower row)")
    print(f"scoring a 1,000-input task against {len(X)} inputs: {1000 * res['score_1000_inputs_median_s']:.0f} ms "
          f"(median of 5; embedding the texts not included)")
    if args.json:
        args.json.write_text(json.dumps(res, indent=2))
    return res


if __name__ == "__main__":
    main()
