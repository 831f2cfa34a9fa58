"""Benchmark: a published router bundle as its users meet it — size, cold load, task scoring,
query routing in process and over HTTP — with the exact index scan (the **baseline**) against
the HNSW graph (``--index-search hnsw``), and the text route against its floor.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bundle.py --store ./store [--name default]
        [--queries 1000] [--text-queries 200] [--task 1000] [--json out.json]

Needs a store with labels and vectors (``make run`` makes one from the sample; ``benchroute
refresh ../shared/data/raw --store …`` one from everything). In one run it fits the store's
router once (float16 index, as published by default) and publishes it twice into a temporary
store: as built (exact scan) and with an HNSW graph added over the same rows
(``artifacts.ann_index``). On each it measures:

- bytes on disk; cold ``load_router`` (open, verify every hash, build the index);
- ``score_task`` on a task of ``--task`` inputs given as embeddings (search, S1/S2/S3, p̂);
- ``route`` of single queries given as embeddings: p50 / p99 over ``--queries`` calls, in
  process and over HTTP on loopback (uvicorn + httpx, the ``benchroute serve`` app);
- ``route`` of single queries as text (embedding included), in process and over HTTP;

and, once, the floor of a text route: the bare forward pass of the embedder on one text and the
bare exact search of one vector, p50 each; the text route's ratio to their sum is printed
(issue 13's target: ≤ 1.3). Then the HNSW graph's effect on the answers: its recall@10 against
the exact scan and the share of queries routed to the same model.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import socket
import sys
import tempfile
import threading
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402


def build(store: str, out: str, name: str) -> tuple[dict, dict]:
    """Fit the store's router once and publish it into ``out`` twice: ``name`` (exact scan) and
    ``name-hnsw`` (the same files plus an HNSW graph over the stored rows); returns the two
    contents' ``parameters.index_search``."""
    from benchroute import __version__
    from benchroute.artifacts import ann_index
    from benchroute.artifacts import embeddings as emb
    from benchroute.artifacts.bundle import BundleContent, BundleStore
    from benchroute.artifacts.router import ANN_PREFIX
    from benchroute.artifacts.router_build import bundle_content, index_search_summary
    from benchroute.artifacts.specs import RouterSpec, Selection
    from benchroute.artifacts.store import Store

    eid = emb.embedders(Store(store))[0]
    content = bundle_content(store, name, eid, Selection(), {}, RouterSpec(index_search="exact"))
    bs = BundleStore(out)
    bs.publish(content, code_version=__version__)
    X = np.load(io.BytesIO(content.files["index/embeddings.npy"]), allow_pickle=False)
    t = time.perf_counter()
    graph = ann_index.build_index(X, "hnsw").to_files(ANN_PREFIX)
    graph_s = time.perf_counter() - t
    files = {**content.files, **graph}
    search = {**index_search_summary(files), "build_s": graph_s}
    meta = {**content.meta, "parameters": {**content.meta["parameters"], "index_search": search}}
    bs.publish(BundleContent(f"{name}-hnsw", files, meta), code_version=__version__)
    return content.meta["parameters"]["index_search"], search


def floor_ms(store_out: str, name: str, texts: list[str], queries: np.ndarray) -> tuple[float, float]:
    """p50 ms of the bare embedder forward pass on one text, and of the bare exact search of
    one vector over the bundle's index (``transforms.knn.cosine_topk``)."""
    from benchroute.artifacts.router import load_router
    from benchroute.transforms.knn import cosine_topk, normalize_rows

    router = load_router(store_out, name)
    router.embed(texts[:1])  # loads the bundle's embedder
    emb = router._embedder
    fwd, srch = [], []
    for t_ in texts:
        t = time.perf_counter()
        emb.encode([t_])
        fwd.append(time.perf_counter() - t)
    for q in queries[:200]:
        t = time.perf_counter()
        cosine_topk(normalize_rows(q[None, :]), router.knn.X_, router.knn.n_neighbors)
        srch.append(time.perf_counter() - t)
    return percentiles(fwd)[0], percentiles(srch)[0]


def percentiles(seconds: list[float]) -> tuple[float, float]:
    ms = np.asarray(seconds) * 1e3
    return float(np.percentile(ms, 50)), float(np.percentile(ms, 99))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def measure(store_out: str, name: str, queries: np.ndarray, texts: list[str], task: np.ndarray,
            text_queries: int = 200) -> dict:
    from benchroute.artifacts.bundle import BundleStore
    from benchroute.artifacts.router import load_router

    bs = BundleStore(store_out)
    version = bs.ref(name)
    fs, root = bs.fs, bs.path(name, version)
    size = sum(fs.size(p) for p in fs.find(root))
    t = time.perf_counter()
    router = load_router(store_out, name)
    load_s = time.perf_counter() - t

    router.score_task(task[:10])  # warm caches
    t = time.perf_counter()
    scores = router.score_task(task)
    task_s = time.perf_counter() - t

    picks, lat = [], []
    for q in queries:
        t = time.perf_counter()
        picks.append(router.route(q)["model"])
        lat.append(time.perf_counter() - t)
    router.route(texts[0])  # loads the embedder once
    lat_text = []
    for q in texts[:text_queries]:
        t = time.perf_counter()
        router.route(q)
        lat_text.append(time.perf_counter() - t)
    http_emb, http_text = http_latencies(store_out, name, texts[:text_queries], queries)
    return {
        "bytes": size, "load_s": load_s, "task_s": task_s, "route": percentiles(lat),
        "route_text": percentiles(lat_text), "http": percentiles(http_emb),
        "http_text": percentiles(http_text),
        "scores": {r["model"]: r for r in scores}, "picks": picks,
    }


def http_latencies(store_out: str, name: str, texts: list[str], queries: np.ndarray) -> tuple[list, list]:
    """POST /v1/route for every query embedding, then every text, to a real uvicorn server on
    loopback; returns the two lists of seconds."""
    import httpx
    import uvicorn
    from benchroute.artifacts.service import create_app

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(store_out, name, poll_seconds=3600),
                                           host="127.0.0.1", port=port, log_level="error"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{port}"
    with httpx.Client(base_url=base, timeout=30) as client:
        for _ in range(200):
            try:
                if client.get("/healthz").status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.05)
        client.post("/v1/route", json={"text": texts[0]}).raise_for_status()  # warm
        lat_emb, lat_text = [], []
        for q in queries:
            body = {"embedding": [float(v) for v in q]}
            t = time.perf_counter()
            client.post("/v1/route", json=body).raise_for_status()
            lat_emb.append(time.perf_counter() - t)
        for q in texts:
            t = time.perf_counter()
            client.post("/v1/route", json={"text": q}).raise_for_status()
            lat_text.append(time.perf_counter() - t)
    server.should_exit = True
    thread.join(timeout=10)
    return lat_emb, lat_text


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--store", required=True, help="a store with labels and vectors")
    ap.add_argument("--name", default="bench")
    ap.add_argument("--queries", type=int, default=1000, help="route calls given embeddings")
    ap.add_argument("--text-queries", type=int, default=200, help="route calls given text")
    ap.add_argument("--task", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)

    import polars as pl
    from benchroute.artifacts import embeddings as emb
    from benchroute.artifacts.store import Store

    st = Store(args.store)
    vectors = emb.read_table(st, emb.embedders(st)[0])
    inputs = st.read("inputs", columns=["input_id", "text"])
    rng = np.random.default_rng(args.seed)
    pick = rng.choice(vectors.height, size=min(vectors.height, args.task), replace=False)
    # Stored vectors perturbed (so none is its own neighbour) and renormalised.
    X = vectors["vector"].to_numpy()[pick].astype(np.float32)
    X += rng.normal(scale=0.02, size=X.shape).astype(np.float32)
    X /= np.linalg.norm(X, axis=1, keepdims=True)
    queries = X[: args.queries]
    texts = (
        inputs.filter(pl.col("input_id").is_in(vectors["input_id"].gather(pick[: args.queries]).implode()))
        ["text"].str.slice(0, 2000).to_list()
    )

    results = {}
    with tempfile.TemporaryDirectory() as out:
        t = time.perf_counter()
        exact_info, hnsw_info = build(args.store, out, args.name)
        print(f"built in {time.perf_counter() - t:.1f} s; HNSW graph {hnsw_info['build_s']:.1f} s, "
              f"recall@10 {hnsw_info['recall_at_10']:.4f}", flush=True)
        names = {"exact": args.name, "hnsw": f"{args.name}-hnsw"}
        # Warm-up (imports, the embedder, page cache, BLAS) so that neither side pays it.
        measure(out, names["hnsw"], queries[:20], texts[:20], X[:50], 5)
        fwd_ms, search_ms = floor_ms(out, names["exact"], texts[: args.text_queries], queries)
        for kind, name in names.items():
            results[kind] = measure(out, name, queries, texts, X, args.text_queries)

    base, ann = results["exact"], results["hnsw"]
    rows = [
        ("bundle size (MB)", base["bytes"] / 1e6, ann["bytes"] / 1e6),
        ("cold load + verify (s)", base["load_s"], ann["load_s"]),
        (f"score_task, {len(X):,} inputs (ms)", base["task_s"] * 1e3, ann["task_s"] * 1e3),
        ("route embedding p50 (ms)", base["route"][0], ann["route"][0]),
        ("route embedding p99 (ms)", base["route"][1], ann["route"][1]),
        ("route text p50 (ms)", base["route_text"][0], ann["route_text"][0]),
        ("route text p99 (ms)", base["route_text"][1], ann["route_text"][1]),
        ("HTTP /v1/route embedding p50 (ms)", base["http"][0], ann["http"][0]),
        ("HTTP /v1/route embedding p99 (ms)", base["http"][1], ann["http"][1]),
        ("HTTP /v1/route text p50 (ms)", base["http_text"][0], ann["http_text"][0]),
        ("HTTP /v1/route text p99 (ms)", base["http_text"][1], ann["http_text"][1]),
    ]
    print(f"\n{vectors.height:,} indexed inputs, {len(base['scores'])} models; "
          f"{len(queries)} queries; baseline = exact scan\n")
    print("| measurement | exact scan (baseline) | HNSW | ratio |")
    print("|---|---|---|---|")
    for label, b, f in rows:
        print(f"| {label} | {b:.3f} | {f:.3f} | {f / b if b else float('nan'):.3f} |")
    floor = fwd_ms + search_ms
    print(f"\nfloor of a text route: forward pass {fwd_ms:.2f} ms + exact search {search_ms:.2f} ms = "
          f"{floor:.2f} ms; route text p50 / floor: exact {base['route_text'][0] / floor:.2f}, "
          f"HNSW {ann['route_text'][0] / floor:.2f}")
    f16 = ann
    diffs = {}
    for s in ("S1", "S2", "S3"):
        d = [abs((f16["scores"][m][s] or 0) - (base["scores"][m][s] or 0)) for m in base["scores"]]
        diffs[s] = max(d)
    same = float(np.mean([a == b for a, b in zip(base["picks"], f16["picks"])]))
    print(f"HNSW vs exact answers: recall@10 {hnsw_info['recall_at_10']:.4f}; max |ΔS1| {diffs['S1']:.4f}, "
          f"max |ΔS2| {diffs['S2']:.4f}, max |ΔS3| {diffs['S3']:.4f}; same routed model for {same:.1%} of queries")
    out = {"rows": [dict(zip(("measurement", "exact", "hnsw"), r)) for r in rows], "index_search": hnsw_info,
           "floor_ms": {"forward": fwd_ms, "search": search_ms}, "max_abs_diff": diffs, "same_route": same,
           "indexed_inputs": vectors.height}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    return out


if __name__ == "__main__":
    main()
    sys.exit(0)
