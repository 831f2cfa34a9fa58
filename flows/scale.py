"""Where a flow's partitions run: one after another in the flow's process, or in parallel on a
Dask cluster through ``prefect-dask`` (a ``LocalCluster`` on loopback, or any scheduler address).

    flow = with_task_runner(refresh_flow, workers=2)             # LocalCluster, 2 worker processes
    flow = with_task_runner(refresh_flow, address="tcp://scheduler:8786")
    flow(landing=..., store=..., **scale_parameters(workers=2))

A real cluster's workers must reach the store and the landing location (S3, a shared disk) and
have benchroute installed; results are identical to a sequential run because partitions are cut
the same way (``flows.pipeline``).
"""

from __future__ import annotations

from prefect.task_runners import ThreadPoolTaskRunner

from benchroute.transforms.embedder import available_cores


def task_runner(workers: int = 0, *, address: str | None = None, processes: bool = True):
    """Sequential (``workers=0``, no address), a local Dask cluster of ``workers`` single-threaded
    workers bound to 127.0.0.1 (processes or threads), or the Dask scheduler at ``address``."""
    if not address and workers <= 0:
        return ThreadPoolTaskRunner(max_workers=1)
    from prefect_dask import DaskTaskRunner

    if address:
        return DaskTaskRunner(address=address)
    kwargs = {
        "n_workers": workers,
        "threads_per_worker": 1,
        "processes": processes,
        "dashboard_address": None,  # no dashboard (it would listen on every interface)
    }
    if processes:
        kwargs["host"] = "127.0.0.1"  # loopback only: scheduler, nannies and workers
    # (threads: one process, Dask's in-process transport; nothing listens at all)
    return DaskTaskRunner(cluster_class="distributed.LocalCluster", cluster_kwargs=kwargs)


def with_task_runner(flow, workers: int = 0, *, address: str | None = None, processes: bool = True):
    """``flow`` with its partitions run by ``task_runner(workers, address=…, processes=…)``."""
    return flow.with_options(task_runner=task_runner(workers, address=address, processes=processes))


def scale_parameters(workers: int = 0, *, address: str | None = None) -> dict:
    """Flow parameters that go with the runner: as many embedding partitions at a time as there
    are workers, and on a local cluster each worker's share of the cores (a remote cluster's
    workers use their own machine's cores)."""
    if address:
        return {"embed_concurrency": max(1, workers) if workers else 64, "embed_threads": None}
    if workers <= 0:
        return {"embed_concurrency": 1, "embed_threads": None}
    return {"embed_concurrency": workers, "embed_threads": max(1, available_cores() // workers)}
