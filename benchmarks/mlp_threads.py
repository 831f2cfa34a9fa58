"""Epoch time of the MLP predictor on 1 and 2 torch threads, and whether the weights are equal.

Baseline: 1 thread (``predictors.MAX_TORCH_THREADS``). For each size (rows x models, random
labels with 30 % missing, 384-d inputs) the predictor is fitted for 3 epochs alternately on 1 and
2 threads, twice each; the table gives the mean seconds per epoch, the ratio 2 / 1 and whether
the fitted layers are bit-identical. Where 2 threads pay (wide outputs) ``predictors`` uses them
(``WIDE_OUTPUTS``, ``WIDE_TORCH_THREADS``).

    .venv/bin/python benchmarks/mlp_threads.py --sizes 28000x142 40000x4000
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from benchroute.transforms import predictors


def epoch_seconds(X: np.ndarray, Y: np.ndarray, threads: int) -> tuple[float, list[np.ndarray]]:
    est = predictors.make_predictor("mlp")
    est.max_epochs, est.patience = 3, 10
    saved = predictors.torch_threads
    predictors.torch_threads = lambda n_outputs: threads  # noqa: E731 (the measured setting)
    try:
        t = time.perf_counter()
        est.fit(X, Y)
        return (time.perf_counter() - t) / est.n_epochs_, [w for w, _ in est.layers_]
    finally:
        predictors.torch_threads = saved


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", nargs="+", default=["28000x142", "40000x4000"])
    args = ap.parse_args(argv)
    print("| rows x models | 1 thread s/epoch (baseline) | 2 threads s/epoch | ratio 2/1 | equal weights |")
    print("|---|---|---|---|---|")
    for size in args.sizes:
        n, M = (int(v) for v in size.split("x"))
        rng = np.random.default_rng(0)
        X = rng.standard_normal((n, 384)).astype(np.float32)
        Y = (rng.random((n, M)) < 0.6).astype(np.float32)
        Y[rng.random((n, M)) < 0.3] = np.nan
        epoch_seconds(X[:2000], Y[:2000], 1)  # warm-up: torch's first fit pays its start-up
        runs = {1: [], 2: []}
        layers = {}
        for threads in (1, 2, 1, 2):
            sec, ws = epoch_seconds(X, Y, threads)
            runs[threads].append(sec)
            layers.setdefault(threads, ws)
        one, two = np.mean(runs[1]), np.mean(runs[2])
        same = all(np.array_equal(a, b) for a, b in zip(layers[1], layers[2]))
        print(f"| {n:,} x {M:,} | {one:.2f} | {two:.2f} | {two / one:.2f} | {same} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
