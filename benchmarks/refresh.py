"""Full rebuild vs incremental refresh, and sequential vs Dask, on all of ../shared/data, in one run.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/refresh.py [--data ../shared/data] [--workers 2]
        [--work /tmp/benchroute-refresh-bench] [--json out.json] [--skip-dask]

A landing zone is made of a copy of every raw dump, with one MMLU-Pro model's results held back.
Then, each a real ``refresh`` flow run (ephemeral Prefect server):

  A. full rebuild, sequential: an empty store; ingest, embed every input, evaluate, fit, publish;
  B. no-op: the same again with nothing new;
  C. one new model lands (the held-back model's results, over inputs already embedded);
  D. full rebuild on a local Dask cluster of ``--workers`` single-threaded workers, on the data
     after C, into a second empty store; its bundle is compared with C's (same data, built
     incrementally vs from scratch, sequential vs parallel). ``--workers 1,2,4`` runs D once per
     worker count: the scaling curve against A.

Each row prints wall seconds of the flow call and the flow's own step timings; precision is
fixed (``--precision``, fp32 by default; bf16 only on CPUs with native bf16, it is 5-7x slower
without) so that both embeddings run the same arithmetic (``auto`` decides by timing, per
partition).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def make_landing(raw: Path, landing: Path):
    """Every raw dump copied under ``landing``; one MMLU-Pro model held back. Returns the
    held-back model and the full results table."""
    import polars as pl

    if landing.exists():
        shutil.rmtree(landing)
    shutil.copytree(raw, landing)
    path = landing / "mmlu_pro" / "results.parquet"
    results = pl.read_parquet(path)
    held = sorted(results["model"].unique().to_list())[-1]
    results.filter(pl.col("model") != held).write_parquet(path)
    return held, results


def row(label: str, seconds: float, s: dict) -> dict:
    """One table row of a refresh's summary (a no-op one has zero counts and ``noop``)."""
    e, t = s["embed"], s["timings"]
    return {
        "run": label,
        "wall_s": round(seconds, 1),
        "ingest_s": t.get("ingest", 0.0),
        "embed_s": t.get("embed", 0.0),
        "embedded": e["new"],
        "inputs_per_s": e["inputs_per_s"],
        "evaluate_s": t.get("evaluate", 0.0),
        "fit_publish_s": round(t.get("refit_total", 0.0) - t.get("evaluate", 0.0), 2),
        "groups_ran": ",".join(s["evaluation"]["ran"]) or "-",
        "groups_cached": ",".join(s["evaluation"]["cached"]) or "-",
        "published": s["published"],
        "version": (s["bundle"] or {}).get("version"),
        "threads": e.get("threads"),
    }


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--work", type=Path, default=Path("/tmp/benchroute-refresh-bench"))
    ap.add_argument("--workers", default="2",
                    help="Dask workers of run D; a comma list (1,2,4) runs D once per count: the scaling curve")
    ap.add_argument("--partitions", type=int, default=4)
    ap.add_argument("--precision", choices=["bf16", "fp32"], default="fp32")
    ap.add_argument("--skip-dask", action="store_true")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)

    args.work.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("PREFECT_HOME", str(args.work / "prefect"))
    from benchroute.artifacts.bundle import open_bundle
    from benchroute.flows.refresh import refresh_flow
    from benchroute.flows.scale import scale_parameters, with_task_runner

    landing = args.work / "landing"
    held, results = make_landing(args.data / "raw", landing)
    print(f"landing {landing}: all raw dumps, MMLU-Pro without {held}", flush=True)
    from benchroute.artifacts.specs import EmbedSpec

    common = {"landing": str(landing), "embed": EmbedSpec(precision=args.precision),
              "partitions": args.partitions}
    rows, out = [], {"held_back_model": held, "workers": args.workers}

    def run(label: str, flow, store: Path, **extra) -> dict:
        t = time.perf_counter()
        s = flow(store=str(store), **common, **extra)
        r = row(label, time.perf_counter() - t, s)
        rows.append(r)
        print(json.dumps(r), flush=True)
        return s

    seq_store = args.work / "store-seq"
    shutil.rmtree(seq_store, ignore_errors=True)
    run("A full rebuild (sequential)", refresh_flow, seq_store)
    run("B no-op refresh", refresh_flow, seq_store)
    results.write_parquet(landing / "mmlu_pro" / "results.parquet")  # the held-back model lands
    c = run("C one new model lands", refresh_flow, seq_store)

    for workers in ([] if args.skip_dask else [int(w) for w in str(args.workers).split(",")]):
        dask_store = args.work / f"store-dask-{workers}"
        shutil.rmtree(dask_store, ignore_errors=True)
        flow = with_task_runner(refresh_flow, workers)
        d = run(f"D full rebuild (Dask, {workers} workers)", flow, dask_store,
                **scale_parameters(workers))
        mc, md = open_bundle(c["bundle"]["url"]).manifest, open_bundle(d["bundle"]["url"]).manifest
        out[f"bundle_C_equals_D{workers}"] = {
            "content_hash": mc["content_hash"] == md["content_hash"],
            "files": all(mc["files"][f]["sha256"] == md["files"][f]["sha256"] for f in mc["files"]),
            "evaluation": json.dumps(mc["evaluation"], sort_keys=True)
            == json.dumps(md["evaluation"], sort_keys=True),
        }
        print(f"bundle C vs D ({workers} workers):", out[f"bundle_C_equals_D{workers}"], flush=True)

    out["rows"] = rows
    a = rows[0]["wall_s"]
    for r in rows:
        r["vs_full"] = round(r["wall_s"] / a, 4) if a else None
    print("\n| run | wall s | ingest s | embed s | embedded | inputs/s | evaluate s | fit+publish s | "
          "groups ran | groups cached | published | × full |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['run']} | {r['wall_s']} | {r['ingest_s']} | {r['embed_s']} | {r['embedded']:,} | "
              f"{r['inputs_per_s']} | {r['evaluate_s']} | {r['fit_publish_s']} | {r['groups_ran']} | "
              f"{r['groups_cached']} | {r['published']} | {r['vs_full']} |")
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
    sys.exit(0)
