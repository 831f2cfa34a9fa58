"""Bounded load test of the HTTP service (``artifacts.service``): requests/s and latency against
the number of clients, with and without a big score-task in flight, and across a hot swap.

    python benchmarks/service_load.py --store STORE [--seconds 10] [--clients 1,4,8,16]

Without ``--store`` it first builds the shipped sample into a temporary store (``benchroute
refresh sample``, several minutes). The service runs in a process of its own (uvicorn on
loopback) serving a bundle named ``--name`` (default ``loadtest``) published from the store, so
the store's ``default`` is left alone. This process drives closed-loop clients (each sends its
next request when its last one is answered) for ``--seconds`` per cell:

  embedding   ``/v1/route`` with a stored embedding (no embedder on the path)
  text        ``/v1/route`` with a short question (the embedder runs)
  text+task   text routes while one more client sends a big ``/v1/score-task`` back to back
              (``--task-texts`` texts of ``--task-chars`` characters; the service takes at most
              400,000 characters in one task)
  swap        embedding and text routes in turn while another process publishes a new version
              and ``latest`` moves (the service hot-swaps); the cell lasts until the new version
              answers (at most 300 s more; not seen by then is an error)

An error is any answer that is not 2xx except a 503 with Retry-After (the service shedding load,
counted apart; the client then waits as told), and any transport error. The table gives
requests/s, p50/p99 latency and the ratio of requests/s to the baseline, the 1-client cell of the
same scenario measured in the same run (``text+task`` also against ``text`` at the same client
count). Total time: about 4 × len(clients) × seconds plus start-up and publishes. Exits 1 on any
error.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
SCENARIOS = ("embedding", "text", "text+task", "swap")

WORDS = (
    "what which how many why when where is are the of a an to in for on with by from and or not "
    "model answer question number value result capital river city country year war king law "
    "energy mass force speed light water acid cell gene protein market price tax rate bond "
    "function integral derivative matrix vector prime sum product graph tree proof theorem "
    "poem novel author story translate summarize explain compare list write code python bug"
).split()

SERVE = """
import sys, uvicorn
from benchroute.artifacts.service import create_app
store, name, port, poll = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
uvicorn.run(create_app(store, name, poll_seconds=poll), host="127.0.0.1", port=port,
            log_level="warning")
"""

# Publish a router fitted with k neighbours; if that content was published before (no new
# version), point ``latest`` at it, so ``latest`` moves either way.
PUBLISH = """
import json, sys
from benchroute.artifacts.bundle import BundleStore
from benchroute.artifacts.specs import RouterSpec
from benchroute.artifacts.stages.fit import FitOptions
from benchroute.flows.publish import publish_store
store, name, k = sys.argv[1], sys.argv[2], int(sys.argv[3])
p = publish_store(store, name, FitOptions(router=RouterSpec(k=k), evaluate=False))
bs = BundleStore(store)
if bs.resolve(name, "latest") != p["version"]:
    bs.set_ref(name, "latest", p["version"])
print(json.dumps({"version": p["version"], "created": p["created"]}))
"""


def sentence(rng: random.Random, chars: int) -> str:
    words: list[str] = []
    while sum(len(w) + 1 for w in words) < chars:
        words.append(rng.choice(WORDS))
    return " ".join(words)[: chars - 1].strip() + "?"  # at most ``chars`` characters


@dataclass
class Stats:
    latencies: list[float] = field(default_factory=list)  # seconds, 2xx only
    shed: int = 0  # 503 with Retry-After
    errors: dict[str, int] = field(default_factory=dict)
    versions: set[str] = field(default_factory=set)

    def error(self, what: str) -> None:
        self.errors[what] = self.errors.get(what, 0) + 1


def pct(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


async def closed_loop(client: httpx.AsyncClient, next_request, stop_at: float, stats: Stats) -> None:
    while time.monotonic() < stop_at:
        path, body = next_request()
        t0 = time.perf_counter()
        try:
            r = await client.post(path, json=body)
        except httpx.HTTPError as exc:
            stats.error(type(exc).__name__)
            continue
        dt = time.perf_counter() - t0
        if 200 <= r.status_code < 300:
            stats.latencies.append(dt)
            version = r.json().get("bundle_version")
            if version:
                stats.versions.add(version)
        elif r.status_code == 503 and r.headers.get("retry-after"):
            stats.shed += 1
            wait = float(r.headers["retry-after"])
            await asyncio.sleep(max(0.0, min(wait, stop_at - time.monotonic())))
        else:
            stats.error(f"{r.status_code} {r.text[:120]}")


class Bench:
    def __init__(self, base: str, args, vectors: list[list[float]]):
        self.base, self.args, self.vectors = base, args, vectors
        self.rng = random.Random(0)
        task_rng = random.Random(1)
        self.task = {"texts": [sentence(task_rng, args.task_chars) for _ in range(args.task_texts)]}
        self.k_next = [5, 10]  # alternated by the swap cells (the first publish used 10)

    def route_text(self):
        return "/v1/route", {"text": sentence(self.rng, self.rng.randint(40, 160))}

    def route_embedding(self):
        return "/v1/route", {"embedding": self.rng.choice(self.vectors)}

    def alternating(self):
        flip = [False]

        def nxt():
            flip[0] = not flip[0]
            return self.route_text() if flip[0] else self.route_embedding()

        return nxt

    async def cell(self, scenario: str, clients: int) -> dict:
        seconds = self.args.seconds
        stats, task_stats = Stats(), Stats()
        limits = httpx.Limits(max_connections=clients + 2, max_keepalive_connections=clients + 2)
        note = ""
        async with httpx.AsyncClient(base_url=self.base, timeout=300, limits=limits) as client:
            t0 = time.monotonic()
            stop_at = t0 + seconds
            if scenario == "embedding":
                makers = [self.route_embedding] * clients
            elif scenario == "swap":
                makers = [self.alternating() for _ in range(clients)]
            else:
                makers = [self.route_text] * clients
            background = []
            if scenario == "text+task":
                background.append(asyncio.create_task(
                    closed_loop(client, lambda: ("/v1/score-task", self.task), stop_at, task_stats)))
            publish = None
            if scenario == "swap":
                before = (await client.get("/healthz")).json()["version"]
                k = self.k_next[0]
                self.k_next.reverse()

                async def publisher():
                    await asyncio.sleep(min(1.0, seconds / 5))
                    return await asyncio.to_thread(run_publish, self.args.store, self.args.name, k)

                publish = asyncio.create_task(publisher())
            if publish is None:
                await asyncio.gather(*(closed_loop(client, m, stop_at, stats) for m in makers))
            else:  # until the publish is done and the new version answers, at most 300 s more
                hard_stop = stop_at + 300

                async def until_swapped(make):
                    while True:
                        await closed_loop(client, make, min(time.monotonic() + 0.5, hard_stop), stats)
                        if time.monotonic() >= hard_stop or (
                            time.monotonic() >= stop_at and publish.done() and len(stats.versions) > 1
                        ):
                            return

                await asyncio.gather(*(until_swapped(m) for m in makers))
                published = await publish
                after = (await client.get("/healthz")).json()
                swapped = after["version"] == published["version"] != before
                note = (f"{'new' if published['created'] else 'old'} version published, "
                        f"{'swapped' if swapped else 'NOT swapped'}; "
                        f"{len(stats.versions)} versions answered")
                if not swapped or len(stats.versions) < 2:
                    stats.error("no answer from the new version")
            elapsed = time.monotonic() - t0
            for job in background:  # the task in flight is dropped (its connection closed) ...
                job.cancel()
            await asyncio.gather(*background, return_exceptions=True)
            await settle(client)  # ... and the next cell starts once the service has let it go
        if scenario == "text+task":
            done = task_stats.latencies
            note = (f"{len(done)} tasks done" + (f" (p50 {pct(done, .5):.1f} s)" if done else "")
                    + (f", {task_stats.shed} shed" if task_stats.shed else ""))
            stats.shed += task_stats.shed
            for what, n in task_stats.errors.items():
                stats.errors[f"task {what}"] = n
        return {
            "scenario": scenario, "clients": clients, "requests": len(stats.latencies),
            "rps": len(stats.latencies) / elapsed, "p50_ms": 1000 * pct(stats.latencies, 0.5),
            "p99_ms": 1000 * pct(stats.latencies, 0.99), "shed": stats.shed,
            "errors": sum(stats.errors.values()), "error_kinds": stats.errors, "note": note,
            "seconds": round(elapsed, 1),
        }


async def settle(client: httpx.AsyncClient, seconds: float = 60) -> None:
    """Wait until the service's /healthz says no embedding work is queued or running (a service
    whose /healthz does not say waits one second)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        load = (await client.get("/healthz")).json().get("embedding")
        if load is None:
            await asyncio.sleep(1)
            return
        if not load.get("busy"):
            return
        await asyncio.sleep(0.2)


def run_publish(store: str, name: str, k: int) -> dict:
    out = subprocess.run([sys.executable, "-c", PUBLISH, store, name, str(k)], capture_output=True,
                         text=True, env=_env(), timeout=600, check=False)
    if out.returncode:
        raise RuntimeError(f"publish failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _env() -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               PREFECT_SERVER_ANALYTICS_ENABLED="false")
    env.setdefault("PREFECT_HOME", tempfile.mkdtemp(prefix="benchroute-load-prefect-"))
    return env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def table(rows: list[dict]) -> str:
    base = {r["scenario"]: r["rps"] for r in rows if r["clients"] == 1}
    text = {r["clients"]: r["rps"] for r in rows if r["scenario"] == "text"}
    out = ["| scenario | clients | requests | req/s | × 1 client | p50 ms | p99 ms | 503 | errors | note |",
           "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        ratio = r["rps"] / base[r["scenario"]] if base.get(r["scenario"]) else float("nan")
        note = r["note"]
        if r["scenario"] == "text+task" and text.get(r["clients"]):
            note = f"{r['rps'] / text[r['clients']]:.2f} × text; " + note
        out.append(f"| {r['scenario']} | {r['clients']} | {r['requests']} | {r['rps']:.1f} | "
                   f"{ratio:.2f} | {r['p50_ms']:.0f} | {r['p99_ms']:.0f} | {r['shed']} | "
                   f"{r['errors']} | {note} |")
    return "\n".join(out)


def build_sample(store: str) -> None:
    exe = Path(sys.executable).with_name("benchroute")
    print(f"building the sample into {store} (benchroute refresh sample; minutes)", flush=True)
    subprocess.run([str(exe), "refresh", str(ROOT / "sample"), "--store", store], env=_env(),
                   check=True, stdout=subprocess.DEVNULL)


async def main_async(args, base: str, vectors) -> list[dict]:
    bench = Bench(base, args, vectors)
    async with httpx.AsyncClient(base_url=base, timeout=300) as client:  # warm: embedder loaded
        assert (await client.post("/v1/route", json={"text": "warm up"})).status_code == 200
        assert (await client.post("/v1/score-task", json={"texts": ["warm up"] * 4})).status_code == 200
    rows = []
    for scenario in args.scenarios:
        for n in args.clients:
            row = await bench.cell(scenario, n)
            print(f"  {scenario:>10} × {n:>2}: {row['rps']:7.1f} req/s  p50 {row['p50_ms']:6.0f} ms  "
                  f"p99 {row['p99_ms']:6.0f} ms  503 {row['shed']}  errors {row['errors']} "
                  f"{row['error_kinds'] or ''} {row['note']}", flush=True)
            rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--store", help="a store with embedded inputs (default: build the sample)")
    p.add_argument("--name", default="loadtest", help="bundle name the test publishes and serves")
    p.add_argument("--seconds", type=float, default=10.0, help="per cell")
    p.add_argument("--clients", default="1,4,8,16")
    p.add_argument("--scenarios", default=",".join(SCENARIOS))
    p.add_argument("--task-texts", type=int, default=400)
    p.add_argument("--task-chars", type=int, default=1000)
    p.add_argument("--json", help="also write the rows here")
    args = p.parse_args(argv)
    args.clients = [int(c) for c in args.clients.split(",")]
    args.scenarios = [s for s in args.scenarios.split(",") if s]
    unknown = set(args.scenarios) - set(SCENARIOS)
    if unknown or 1 not in args.clients:
        p.error(f"scenarios among {SCENARIOS}; clients must include 1 (the baseline)")
    if args.store is None:
        args.store = str(Path(tempfile.mkdtemp(prefix="benchroute-load-")) / "store")
        build_sample(args.store)
    t_start = time.monotonic()
    print(f"publishing {args.name} (k=10) into {args.store}", flush=True)
    first = run_publish(args.store, args.name, 10)

    from benchroute.artifacts.router import load_router

    router = load_router(args.store, args.name, first["version"])
    vectors = router.knn.X_[:256].tolist()
    del router

    port = free_port()
    base = f"http://127.0.0.1:{port}"
    log = open(Path(tempfile.gettempdir()) / f"benchroute-load-{port}.log", "w")  # noqa: SIM115
    server = subprocess.Popen([sys.executable, "-c", SERVE, args.store, args.name, str(port), "0.5"],
                              env=_env(), stdout=log, stderr=subprocess.STDOUT)
    try:
        for _ in range(600):
            try:
                if httpx.get(f"{base}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if server.poll() is not None:
                raise RuntimeError(f"the service exited; see {log.name}")
            time.sleep(0.1)
        print(f"service on {base} (log {log.name}); {args.seconds:g} s per cell", flush=True)
        rows = asyncio.run(main_async(args, base, vectors))
        health = httpx.get(f"{base}/healthz", timeout=10).json()
    finally:
        server.terminate()
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()
        log.close()
    print()
    print(f"machine: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}; "
          f"{time.monotonic() - t_start:.0f} s in all; final /healthz: "
          f"{ {k: v for k, v in health.items() if k not in ('last_error',)} }")
    print()
    print(table(rows))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 1 if any(r["errors"] for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
