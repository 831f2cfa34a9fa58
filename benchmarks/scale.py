"""Leaderboard scale (issue 16), first version: how the pipeline's steps grow with inputs × models.

    nice -n 5 .venv/bin/python benchmarks/scale.py                       # 10k×100, 20k×500
    nice -n 5 .venv/bin/python benchmarks/scale.py --sizes 100000x4000 --ann-sizes 100000

For each size N×M (``--sizes``), in a work folder, one subprocess per step (so each step's wall
time and peak RSS are its own: ``os.wait4`` on the child):

1. ``synth``: ``benchmarks/synth.py --inputs N --models M`` (the long-table source + vectors);
2. ``ingest``: ``benchroute ingest <source> --store S`` (the real Prefect flow: read, quarantine,
   commit, relabel);
3. ``vectors``: ``synth.py --embeddings-only --store S`` (the vectors under the default embedder's
   identity: ``benchroute embed`` has nothing to do);
4. ``labels``: the store's labels table as today's dense n × M float32 matrix and bit-packed
   (``artifacts.label_pack.from_labels_frame``); checks both agree, reports bytes (skipped above
   ``LABELS_IN_MEMORY`` labels: it packs from one frame);
5. ``publish`` (``benchroute publish --no-evaluate``: fit, pack, index, publish) and ``route``: the
   bundle's bytes, cold load + verify, single-query routing p50/p99 given an embedding;
6. ``evaluate``: the evaluation a bundle carries (``stages.evaluate.evaluate_all``, per source
   group leave-one-dataset-out; ``--no-evaluate`` skips it). The default synthetic world leaves
   each model off a quarter of the benchmarks: the group is the models labelled on every
   dataset, or, with fewer than two such (100k × 4,000), the complete block of datasets × models
   ``lodo_groups.complete_block`` finds (20 datasets × 1,365 models there). With 3 % of labels
   missing at random, no input of so many models is labelled by all of them, so no dataset is
   held out (the protocol compares models on complete inputs); ``--complete`` generates every
   model on every benchmark with no label missing, so every held-out dataset is evaluated;
7. ``synth+1``, ``ingest+1``, ``publish+1``, ``route+1``: one more model's results land
   (``synth.py --models-from``), are ingested (appended labels) and published as an extension
   of the latest bundle (``publish --incremental``: no refit, ``artifacts.router_extend``); the
   note gives each as a share of the full step;
8. ``ann``: exact search vs HNSW (``artifacts.ann_index``) over the vectors as the bundle stores
   them (float16): build time, serialised bytes, recall@10 on the held-out queries, single-query
   latency p50/p99 on one thread.

``--ann-sizes`` adds ANN-only rows (vectors generated with one model, no ingest). Sizes that are
not run still get the label-size projection (``--project``, default the issue's 100k × 4,000).
``--json FILE`` writes every measurement.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
PY = sys.executable
BENCHROUTE = str(Path(PY).with_name("benchroute"))


# ---------------------------------------------------------------------- subprocess steps
def run_step(name: str, cmd: list[str], env: dict | None = None, log: Path | None = None) -> dict:
    """Run ``cmd``; its wall seconds, peak RSS (MiB, of the child and the children it waited
    for) and exit code. Output goes to ``log``."""
    t0 = time.perf_counter()
    with open(log or os.devnull, "ab") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=REPO)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
    seconds = time.perf_counter() - t0
    row = {"step": name, "seconds": round(seconds, 2), "peak_rss_mib": round(usage.ru_maxrss / 1024, 1),
           "rc": proc.returncode}
    if proc.returncode != 0:
        tail = log.read_text(errors="replace")[-2000:] if log else ""
        raise RuntimeError(f"step {name} failed (rc {proc.returncode}): {' '.join(cmd)}\n{tail}")
    return row


def child_env(prefect_home: Path, threads: int | None = None) -> dict:
    env = dict(os.environ)
    env.update(PREFECT_HOME=str(prefect_home), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               PREFECT_LOGGING_LEVEL="WARNING", PREFECT_SERVER_ANALYTICS_ENABLED="false",
               PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW="ignore")
    if threads:
        for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "POLARS_MAX_THREADS"):
            env[var] = str(threads)
    return env


# ---------------------------------------------------------------------- in-child measurements
# The labels measurement packs the labels from one in-memory frame: above this it is skipped
# (the size table then gives the projection).
LABELS_IN_MEMORY = 60_000_000

def measure_labels(store: str, synth_dir: str, out: str) -> None:
    """Dense float32 vs packed labels from the store's labels table (rows in synth input order,
    columns sorted model names)."""
    import polars as pl
    from benchroute.artifacts import label_pack as lp
    from benchroute.artifacts.store import Store

    from benchroute.artifacts.stages.ingest import label_count

    n_labels = label_count(Store(store))
    if n_labels > LABELS_IN_MEMORY:
        Path(out).write_text(json.dumps({"skipped": f"{n_labels:,} labels: more than this "
                                         f"measurement holds in one frame", "labels": n_labels}))
        return
    t0 = time.perf_counter()
    labels = Store(store).read("labels", columns=["input_id", "model", "y"])
    t_read = time.perf_counter() - t0
    ids = pl.read_parquet(Path(synth_dir) / "synth" / "inputs.parquet", columns=["input_id"])[
        "input_id"].to_list()
    models = sorted(labels["model"].unique().to_list())
    n, m = len(ids), len(models)
    t0 = time.perf_counter()
    packed = lp.from_labels_frame(labels, ids, models)
    t_pack = time.perf_counter() - t0
    files = packed.to_files("index/labels_")
    result = {
        "n": n, "models": m, "labels": labels.height, "read_s": round(t_read, 2),
        "pack_s": round(t_pack, 2), "packed_bytes": sum(len(v) for v in files.values()),
        "float32_bytes": lp.dense_float32_bytes(n, m) + 128, "exceptions": int(packed.extra_rows.size),
    }
    if lp.dense_float32_bytes(n, m) <= 2 * 2**30:
        t0 = time.perf_counter()
        dense = packed.unpack(np.float32)
        result["unpack_s"] = round(time.perf_counter() - t0, 2)
        t0 = time.perf_counter()
        again = lp.pack(dense)
        result["pack_dense_s"] = round(time.perf_counter() - t0, 2)
        result["round_trip_exact"] = bool(again.equals(packed))
        result["known_ok"] = int((~np.isnan(dense)).sum()) == labels.height
    rng = np.random.default_rng(0)
    nbrs = rng.integers(0, n, (200, 10))
    t0 = time.perf_counter()
    for row in nbrs:
        packed.rows(row)
    result["rows_10_ms"] = round((time.perf_counter() - t0) / len(nbrs) * 1000, 3)
    Path(out).write_text(json.dumps(result))


def measure_ann(synth_dir: str, out: str, k: int = 10, n_latency: int = 300) -> None:
    """Exact vs HNSW over the synthetic vectors stored as the bundle stores them (float16)."""
    from benchroute.artifacts import ann_index as ai

    side = Path(synth_dir) / "synth"
    X = np.load(side / "embeddings.npy", mmap_mode="r").astype(np.float16)
    Q = np.load(side / "queries.npy")
    rows = []
    for kind in ("exact", "hnsw"):
        t0 = time.perf_counter()
        index = ai.build_index(X, kind)
        build = time.perf_counter() - t0
        blob = index.to_bytes()
        t0 = time.perf_counter()
        loaded = ai.load_index(blob, X)
        load = time.perf_counter() - t0
        recall = ai.recall_at_k(loaded, X, Q, k)
        lat = []
        for q in Q[:n_latency]:
            t0 = time.perf_counter()
            loaded.search(q[None, :], k)
            lat.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        loaded.search(Q, k)
        batch = time.perf_counter() - t0
        rows.append({
            "kind": kind, "n": int(X.shape[0]), "d": int(X.shape[1]), "build_s": round(build, 2),
            "load_s": round(load, 2), "bytes": len(blob), "vectors_bytes": int(X.nbytes),
            f"recall@{k}": round(recall, 4), "p50_ms": round(float(np.percentile(lat, 50)) * 1e3, 3),
            "p99_ms": round(float(np.percentile(lat, 99)) * 1e3, 3),
            "batch_qps": round(len(Q) / batch, 1), "params": index.params.__dict__,
        })
    Path(out).write_text(json.dumps(rows))


def measure_evaluate(store: str, out: str) -> None:
    """The evaluation a bundle carries (``stages.evaluate.evaluate_all``, what ``publish``
    without ``--no-evaluate`` runs): per source group its held-out tasks, or why it is skipped."""
    from benchroute.artifacts.embeddings import pick_embedder
    from benchroute.artifacts.specs import RouterSpec, Selection
    from benchroute.artifacts.stages.evaluate import evaluate_all
    from benchroute.artifacts.store import Store

    st = Store(store)
    ev = evaluate_all(st, pick_embedder(st, None), Selection(), RouterSpec())
    Path(out).write_text(json.dumps({
        g: {"skipped": e["skipped"]} if "skipped" in e else
        {"tasks": e.get("n_tasks"), "predictor_accuracy": e.get("predictor_accuracy"),
         "kernel_mae": e.get("kernel_mae")} for g, e in ev.items()}))


def measure_route(store: str, synth_dir: str, out: str, name: str = "scale", n_queries: int = 300) -> None:
    """The published bundle as a consumer meets it: bytes, cold load + verify, and single-query
    routing given an embedding (the synthetic held-out queries), p50 / p99."""
    from benchroute.artifacts.bundle import BundleStore
    from benchroute.artifacts.router import load_router

    bs = BundleStore(store)
    root = bs.path(name, bs.ref(name))
    size = sum(bs.fs.size(p) for p in bs.fs.find(root))
    t0 = time.perf_counter()
    router = load_router(store, name)
    load = time.perf_counter() - t0
    Q = np.load(Path(synth_dir) / "synth" / "queries.npy")[:n_queries]
    router.route(Q[0])
    lat = []
    for q in Q:
        t0 = time.perf_counter()
        router.route(q)
        lat.append(time.perf_counter() - t0)
    search = router.manifest["parameters"].get("index_search", {})
    Path(out).write_text(json.dumps({
        "bundle_bytes": int(size), "load_s": round(load, 3), "index": search.get("kind"),
        "recall@10": search.get("recall_at_10"), "dense_labels": not hasattr(router.knn.Y_, "rows"),
        "p50_ms": round(float(np.percentile(lat, 50)) * 1e3, 3),
        "p99_ms": round(float(np.percentile(lat, 99)) * 1e3, 3)}))


# ---------------------------------------------------------------------- driver
def parse_size(text: str) -> tuple[int, int]:
    n, m = text.lower().replace("×", "x").split("x")
    return int(float(n)), int(float(m))


def mib(b: float) -> str:
    return f"{b / 2**20:,.1f}"


def run_size(n: int, m: int, work: Path, *, ann_only: bool = False, threads: int = 1,
             bundle: bool = True, evaluate: bool = True, complete: bool = False) -> dict:
    tag = f"{n}x{m}"
    base = work / tag
    shutil.rmtree(base, ignore_errors=True)
    base.mkdir(parents=True)
    syn, store, log = base / "synth_out", base / "store", base / "log.txt"
    env = child_env(base / "prefect", threads=threads)
    res: dict = {"size": tag, "n": n, "models": m, "steps": []}
    models = 1 if ann_only else m
    # ``complete``: every model run on every benchmark, no label missing (a leaderboard whose
    # source group leave-one-dataset-out can evaluate; by default almost no model covers all)
    shape = ["--run-share", "1", "--missing", "0"] if complete else []
    res["steps"].append(run_step("synth", [PY, str(HERE / "synth.py"), "--inputs", str(n),
                                           "--models", str(models), "--out", str(syn), "--seed", "0",
                                           *shape], env, log))
    res["synth"] = json.loads((syn / "synth" / "meta.json").read_text())
    res["synth"].pop("datasets", None)
    if not ann_only:
        res["steps"].append(run_step("ingest", [BENCHROUTE, "ingest", str(syn / "long_table"),
                                                "--store", str(store), "--no-progress"], env, log))
        res["steps"].append(run_step("vectors", [PY, str(HERE / "synth.py"), "--out", str(syn),
                                                 "--store", str(store), "--embeddings-only"],
                                     env, log))
        lab = base / "labels.json"
        res["steps"].append(run_step("labels", [PY, __file__, "_labels", str(store), str(syn),
                                                str(lab)], env, log))
        res["labels"] = json.loads(lab.read_text())
        res["store_bytes"] = sum(f.stat().st_size for f in store.rglob("*") if f.is_file())
        publish = [BENCHROUTE, "publish", "--store", str(store), "--name", "scale", "--no-evaluate"]
        if bundle:
            res["steps"].append(run_step("publish", publish, env, log))
            rt = base / "route.json"
            res["steps"].append(run_step("route", [PY, __file__, "_route", str(store), str(syn), str(rt)],
                                         env, log))
            res["route"] = json.loads(rt.read_text())
        if evaluate:
            evj = base / "evaluate.json"
            res["steps"].append(run_step("evaluate", [PY, __file__, "_evaluate", str(store), str(evj)],
                                         env, log))
            res["evaluate"] = json.loads(evj.read_text())
        # One more model's results land (model m of an (m + 1)-model world, same inputs).
        new = base / "new_model"
        res["steps"].append(run_step("synth+1", [PY, str(HERE / "synth.py"), "--inputs", str(n),
                                                 "--models", str(m + 1), "--models-from", str(m),
                                                 "--out", str(new), "--seed", "0", *shape], env, log))
        res["steps"].append(run_step("ingest+1", [BENCHROUTE, "ingest", str(new / "long_table"),
                                                  "--store", str(store), "--no-progress"], env, log))
        if bundle:  # the latest bundle extended by the new model (artifacts.router_extend)
            res["steps"].append(run_step("publish+1", [*publish, "--incremental"], env, log))
            rt1 = base / "route_plus1.json"
            res["steps"].append(run_step("route+1", [PY, __file__, "_route", str(store), str(syn), str(rt1)],
                                         env, log))
            res["route+1"] = json.loads(rt1.read_text())
    ann = base / "ann.json"
    res["steps"].append(run_step("ann", [PY, __file__, "_ann", str(syn), str(ann)], env, log))
    res["ann"] = json.loads(ann.read_text())
    return res


def print_tables(results: list[dict], project: list[tuple[int, int]]) -> None:
    from benchroute.artifacts import label_pack as lp

    print("\n## Steps (one subprocess each; peak RSS of the step)\n")
    print(f"{'size':>14} {'step':>8} {'seconds':>9} {'peak RSS MiB':>13}  notes")
    for r in results:
        for s in r["steps"]:
            note = ""
            if s["step"] == "synth":
                note = f"{r['synth']['outcome_rows']:,} outcome rows, {r['synth']['parts']} parts"
            elif s["step"] == "ingest":
                note = f"store {mib(r['store_bytes'])} MiB on disk"
            elif s["step"] == "labels" and "skipped" in r["labels"]:
                note = r["labels"]["skipped"]
            elif s["step"] == "evaluate":
                note = "; ".join(f"{g}: {e['skipped']}" if "skipped" in e else
                                 f"{g}: {e['tasks']} held-out tasks, predictor accuracy "
                                 f"{e['predictor_accuracy']:.3f}" for g, e in r["evaluate"].items())
            elif s["step"] in ("ingest+1", "publish+1"):
                full = next(x for x in r["steps"] if x["step"] == s["step"][:-2])
                note = f"{100 * s['seconds'] / full['seconds']:.1f} % of the full {s['step'][:-2]}"
            elif s["step"] == "labels":
                lab = r["labels"]
                note = (f"read {lab['read_s']} s, pack {lab['pack_s']} s, "
                        f"exact round trip {lab.get('round_trip_exact')}, "
                        f"10 rows {lab['rows_10_ms']} ms")
            print(f"{r['size']:>14} {s['step']:>8} {s['seconds']:>9.2f} {s['peak_rss_mib']:>13,.0f}  {note}")
    print("\n## The published bundle (publish --no-evaluate; route given an embedding, one process)\n")
    print(f"{'size':>14} {'bundle MiB':>11} {'index':>6} {'recall@10':>10} {'load s':>7} {'p50 ms':>7} {'p99 ms':>7}")
    for r in results:
        for key in ("route", "route+1"):
            if key in r:
                b = r[key]
                rec = "-" if b["recall@10"] is None else f"{b['recall@10']:.4f}"
                size = r["size"] if key == "route" else f"{r['size']}+1"
                print(f"{size:>14} {mib(b['bundle_bytes']):>11} {b['index']:>6} {rec:>10} {b['load_s']:>7.2f} "
                      f"{b['p50_ms']:>7.2f} {b['p99_ms']:>7.2f}")
    print("\n## Labels in the bundle: float32 n × M (today) vs bit-packed (value + known bits)\n")
    print(f"{'size':>14} {'labels':>13} {'float32 MiB':>12} {'packed MiB':>11} {'ratio':>6}")
    seen = set()
    for r in results:
        if "labels" in r and "skipped" not in r["labels"]:
            lab = r["labels"]
            seen.add((lab["n"], lab["models"]))
            print(f"{r['size']:>14} {lab['labels']:>13,} {mib(lab['float32_bytes']):>12} "
                  f"{mib(lab['packed_bytes']):>11} {lab['float32_bytes'] / lab['packed_bytes']:>6.1f}")
    for n, m in project:
        if (n, m) not in seen:
            f32, pk = lp.dense_float32_bytes(n, m), lp.packed_bytes(n, m)
            print(f"{f'{n}x{m}':>14} {'(projected)':>13} {mib(f32):>12} {mib(pk):>11} {f32 / pk:>6.1f}")
    print("\n## Nearest neighbours: exact vs HNSW (faiss), float16 rows, k = 10, one thread\n")
    print(f"{'n':>8} {'kind':>6} {'build s':>8} {'index MiB':>10} {'recall@10':>10} "
          f"{'p50 ms':>8} {'p99 ms':>8} {'batch q/s':>10}")
    for r in results:
        for a in r["ann"]:
            print(f"{a['n']:>8} {a['kind']:>6} {a['build_s']:>8.2f} {mib(a['bytes']):>10} "
                  f"{a['recall@10']:>10.4f} {a['p50_ms']:>8.3f} {a['p99_ms']:>8.3f} {a['batch_qps']:>10,.0f}")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "_labels":
        measure_labels(*argv[1:4])
        return 0
    if argv and argv[0] == "_ann":
        measure_ann(*argv[1:3])
        return 0
    if argv and argv[0] == "_evaluate":
        measure_evaluate(*argv[1:3])
        return 0
    if argv and argv[0] == "_route":
        measure_route(*argv[1:4])
        return 0
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default="10000x100,20000x500",
                    help="comma-separated NxM to run end to end ('' for none)")
    ap.add_argument("--ann-sizes", default="", help="comma-separated N for ANN-only rows")
    ap.add_argument("--project", default="28500x142,100000x4000",
                    help="sizes for the label-size projection")
    ap.add_argument("--work", help="work folder (default: a temporary one, removed)")
    ap.add_argument("--threads", type=int, default=1, help="threads per step (BLAS, polars)")
    ap.add_argument("--no-bundle", action="store_true", help="skip publish and the routing measurement")
    ap.add_argument("--no-evaluate", action="store_true",
                    help="skip the evaluation a bundle carries (per-group leave-one-dataset-out)")
    ap.add_argument("--complete", action="store_true",
                    help="every model on every benchmark, no label missing (evaluable groups)")
    ap.add_argument("--json", help="write every measurement here")
    a = ap.parse_args(argv)
    work = Path(a.work) if a.work else Path(tempfile.mkdtemp(prefix="benchroute-scale-"))
    results = []
    try:
        for text in filter(None, a.sizes.split(",")):
            n, m = parse_size(text)
            print(f"running {n}x{m} …", file=sys.stderr, flush=True)
            results.append(run_size(n, m, work, threads=a.threads, bundle=not a.no_bundle,
                                    evaluate=not a.no_evaluate, complete=a.complete))
        for text in filter(None, a.ann_sizes.split(",")):
            n = int(float(text))
            print(f"running ANN only at {n} …", file=sys.stderr, flush=True)
            results.append(run_size(n, 1, work, ann_only=True, threads=a.threads))
    finally:
        if not a.work:
            shutil.rmtree(work, ignore_errors=True)
    print_tables(results, [parse_size(s) for s in filter(None, a.project.split(","))])
    if a.json:
        Path(a.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
