"""Deployments of the ``refresh`` (scheduled) and ``backfill`` (manual) flows, served with
``flow.serve`` semantics (``prefect.serve``): this process polls the Prefect server and runs
the scheduled and the manually triggered runs.

    benchroute deploy --landing ./landing --store ./store [--cron "0 * * * *"]
        [--dask-workers 2 | --dask-address tcp://scheduler:8786]

Without ``PREFECT_API_URL`` it first starts a local Prefect server on 127.0.0.1 (UI at
http://127.0.0.1:4200) with ``PREFECT_HOME`` (default ./.prefect) and stops it on exit; with
it, it serves against that server. Ctrl-C stops serving (schedules are paused on exit).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

DEFAULT_CRON = "0 * * * *"  # hourly, on the hour


def deployments(
    landing: str,
    store: str,
    *,
    name: str = "default",
    cron: str = DEFAULT_CRON,
    workers: int = 0,
    address: str | None = None,
    timezone: str | None = None,
    rules: str | None = None,
    aliases: str | None = None,
    model_cards: str | None = None,
    incremental: bool = False,
) -> list:
    """The two deployments: ``refresh/scheduled`` (cron, one run at a time; ``incremental``: each
    run extends the latest bundle by the models that landed, without evaluation, where it can)
    and ``backfill/manual`` (no schedule; its dumps default to the landing location)."""
    from benchroute.flows.backfill import backfill_flow
    from benchroute.flows.refresh import refresh_flow
    from benchroute.flows.scale import scale_parameters, with_task_runner
    from prefect.client.schemas.schedules import CronSchedule

    scale = scale_parameters(workers, address=address)
    refresh = with_task_runner(refresh_flow, workers, address=address)
    backfill = with_task_runner(backfill_flow, workers, address=address)
    return [
        refresh.to_deployment(
            name="scheduled",
            schedule=CronSchedule(cron=cron, timezone=timezone or "UTC"),
            parameters={"landing": landing, "store": store, "name": name, "rules": rules,
                        "aliases": aliases, "model_cards": model_cards, "incremental": incremental,
                        **scale},
            concurrency_limit=1,  # a slow run is never overlapped by the next one
            description=f"Ingest what is new in {landing}, embed, refit, publish {name} if the data changed.",
            tags=["benchroute", "refresh"],
        ),
        backfill.to_deployment(
            name="manual",
            parameters={"store": store, "paths": [landing], "name": name, "rules": rules,
                        "aliases": aliases, "model_cards": model_cards, **scale},
            description="Rebuild the store or a selection of it and publish (dry_run=True reports only).",
            tags=["benchroute", "backfill"],
        ),
    ]


def _healthy(api_url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{api_url.rstrip('/')}/health", timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


def start_server(host: str, port: int, home: str, timeout: float = 180.0) -> tuple[subprocess.Popen, str]:
    """``prefect server start`` on ``host:port`` (loopback by default); returns it and its API URL."""
    api = f"http://{host}:{port}/api"
    env = {**os.environ, "PREFECT_HOME": home, "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    env.pop("PREFECT_API_URL", None)
    Path(home).mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen(
        [sys.executable, "-m", "prefect", "server", "start", "--host", host, "--port", str(port)],
        env=env,
        # Its own session: Ctrl-C reaches this process only, which stops serving (pausing the
        # schedules through the server) and then stops the server itself.
        start_new_session=True,
    )
    deadline = time.monotonic() + timeout
    while not _healthy(api):
        if proc.poll() is not None:
            raise RuntimeError(f"prefect server exited with {proc.returncode} (port {port} in use?)")
        if time.monotonic() > deadline:
            proc.terminate()
            raise RuntimeError(f"prefect server did not answer at {api} within {timeout:.0f} s")
        time.sleep(1)
    return proc, api


def main(argv: list[str] | None = None) -> int:
    """``benchroute deploy …`` (``python -m benchroute.flows.deploy …``): the options are the CLI's."""
    from benchroute.flows.cli import main as cli

    return cli(["deploy", *(sys.argv[1:] if argv is None else argv)])


def serve_deployments(
    landing: str,
    store: str,
    *,
    name: str = "default",
    cron: str = DEFAULT_CRON,
    timezone: str | None = None,
    rules: str | None = None,
    aliases: str | None = None,
    model_cards: str | None = None,
    workers: int = 0,
    address: str | None = None,
    host: str = "127.0.0.1",
    port: int = 4200,
    run_now: bool = False,
    incremental: bool = False,
) -> int:
    """Serve ``deployments(…)`` until Ctrl-C, against ``PREFECT_API_URL`` or a Prefect server
    started here on ``host:port`` (stopped on exit); then leave the process (``os._exit``)."""
    server = None
    api = os.environ.get("PREFECT_API_URL")
    if not api:
        home = os.environ.get("PREFECT_HOME", str(Path(".prefect").resolve()))
        print(f"starting a Prefect server on {host}:{port} (PREFECT_HOME={home}) …", flush=True)
        server, api = start_server(host, port, home)
        os.environ["PREFECT_HOME"] = home
        os.environ["PREFECT_API_URL"] = api
    elif not _healthy(api):
        print(f"PREFECT_API_URL={api} does not answer", file=sys.stderr)
        return 2
    code = 0
    try:
        from prefect import serve
        from prefect.settings import PREFECT_API_URL, temporary_settings

        with temporary_settings(updates={PREFECT_API_URL: api}):
            deps = deployments(landing, store, name=name, cron=cron,
                               workers=workers, address=address,
                               timezone=timezone, rules=rules, aliases=aliases,
                               model_cards=model_cards, incremental=incremental)
            ui = api[: -len("/api")] if api.endswith("/api") else api
            print(f"Prefect UI: {ui}  (runs: {ui}/runs, deployments: {ui}/deployments)", flush=True)
            if run_now:
                _trigger_after_start("refresh/scheduled")
            serve(*deps)
    except KeyboardInterrupt:
        pass
    except BaseException:  # noqa: BLE001 - reported, then the server is stopped and we exit 1
        import traceback

        traceback.print_exc()
        code = 1
    finally:
        if server is not None:
            server.terminate()
            try:
                server.wait(timeout=20)
            except subprocess.TimeoutExpired:
                server.kill()
        print("stopped", flush=True)
        # Prefect's event-subscriber threads keep reconnecting to the stopped server and would
        # keep this process alive: leave now that the server and the runner are down.
        sys.stderr.flush()
        os._exit(code)


def _trigger_after_start(deployment: str) -> None:
    """Ask for one run of ``deployment`` as soon as ``serve`` has registered it."""
    import threading

    def trigger() -> None:
        from prefect.client.orchestration import get_client
        from prefect.exceptions import ObjectNotFound

        with get_client(sync_client=True) as client:
            for _ in range(120):
                try:
                    d = client.read_deployment_by_name(deployment)
                except ObjectNotFound:
                    time.sleep(1)
                    continue
                client.create_flow_run_from_deployment(d.id)
                print(f"triggered a run of {deployment}", flush=True)
                return

    threading.Thread(target=trigger, daemon=True).start()


if __name__ == "__main__":
    sys.exit(main())
