"""How the flows' tasks run: where their results persist, which errors are retried, which cores
an embedding partition takes, the global concurrency limit, and how to call the command.

Nothing here computes results (that is ``artifacts.stages``); it is the Prefect and process
plumbing the flows share.
"""

from __future__ import annotations

import os
import sys
from collections import deque
from contextlib import contextmanager
from pathlib import Path

from fsspec.core import url_to_fs

from benchroute.artifacts.stages import PipelineError  # noqa: F401 - raised by the flows' steps
from benchroute.io import is_local
from benchroute.transforms.fingerprints import digest

CACHE_DIR = "_cache/prefect"
EMBED_LIMIT = "benchroute-embed"  # the global concurrency limit every embedding partition takes a slot of


def cache_storage(store_url: str, cache: str | None = None):
    """Where task results persist: a saved file system block (Prefect needs a task's result
    storage to be a saved block) for the local or remote folder. Either one seals what it writes
    and reads back only sealed JSON records (``flows.cache_records``): a record someone else
    wrote into the store is recomputed, never deserialized."""
    from benchroute.flows.cache_records import SealedLocalFileSystem, SealedRemoteFileSystem

    url = (cache or f"{store_url.rstrip('/')}/{CACHE_DIR}").rstrip("/")
    fs, path = url_to_fs(url)
    if is_local(fs):
        Path(path).mkdir(parents=True, exist_ok=True)
        block = SealedLocalFileSystem(basepath=path)
    else:
        block = SealedRemoteFileSystem(basepath=url)
    block.save(f"benchroute-cache-{digest(url)[:16]}", overwrite=True)
    return block


PERMANENT_IO = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)


def passing_io_error(exc: BaseException | None) -> bool:
    """An I/O error that may pass (network, timeouts), not a missing path, bad data or a bug."""
    return isinstance(exc, (OSError, TimeoutError)) and not isinstance(exc, PERMANENT_IO)


def transient_io(task, task_run, state) -> bool:
    """Retry condition: retry I/O errors that may pass (``passing_io_error``)."""
    return passing_io_error(state.data if isinstance(state.data, BaseException) else None)


def ensure_limit(name: str, limit: int) -> None:
    """Create or resize a global concurrency limit (the embedding partitions take slots of one)."""
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        client.upsert_global_concurrency_limit_by_name(name, limit)


@contextmanager
def cores(threads: int | None):
    """Run the body on ``threads`` of the cores this thread may use (its affinity mask).

    The embedder takes every core its thread may use (``transforms.embedder.available_cores``
    reads the affinity mask), which is right for one process per machine and oversubscribes
    when several Dask workers share one; here each worker takes its own ``threads`` cores (by
    its worker number), and the mask is restored afterwards.
    """
    if not threads or not hasattr(os, "sched_setaffinity"):
        yield
        return
    before = os.sched_getaffinity(0)
    mine = sorted(before)
    if threads >= len(mine):
        yield
        return
    start = (_worker_slot() * threads) % len(mine)
    os.sched_setaffinity(0, {mine[(start + i) % len(mine)] for i in range(threads)})
    try:
        yield
    finally:
        os.sched_setaffinity(0, before)


def _worker_slot() -> int:
    """This Dask worker's number (0 outside a worker)."""
    try:
        from distributed import get_worker

        name = get_worker().name
    except (ImportError, ValueError):
        return 0
    try:
        return int(name)
    except (TypeError, ValueError):
        return abs(hash(name))


def command_name() -> str:
    """How to call ``benchroute`` from here: the venv's script when it is not on PATH."""
    import shutil

    exe = Path(sys.executable).with_name("benchroute")
    if exe.exists() and shutil.which("benchroute") != str(exe):
        try:
            return os.path.relpath(exe)
        except ValueError:
            return str(exe)
    return "benchroute"


def read_ahead(items, submit, ahead: int):
    """``(item, future.result)`` for each item, submitting at most ``ahead`` tasks before the
    one being consumed: results wait in memory only that far ahead, not for every item at once
    (a leaderboard's thousands of files would not fit)."""
    items = iter(items)
    pending: deque = deque()
    for item in items:
        pending.append((item, submit(item)))
        if len(pending) > ahead:
            break
    while pending:
        item, future = pending.popleft()
        yield item, future.result
        del future
        for nxt in items:  # the next one, if any
            pending.append((nxt, submit(nxt)))
            break
