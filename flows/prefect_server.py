"""Prefect's temporary server dies with the process that started it.

Without a Prefect API URL, Prefect 3 starts a temporary server for the process
(``prefect.server.api.server.SubprocessASGIServer``: a ``uvicorn`` child, ~230 MB) and stops it
``atexit``. A ``kill -9`` skips ``atexit`` and leaves the server running forever. ``guard()``
wraps the method that starts the server so that every server it starts gets a watchdog: a
tiny process in its own session that waits on the parent and on the server (Linux pidfds; a
poll elsewhere) and stops the server (SIGTERM, then SIGKILL) when the parent is gone, then
exits; it exits on its own when the server stops first (a normal exit). A watchdog rather than
``PR_SET_PDEATHSIG``: that signal follows the *thread* that started the child, and Prefect may
start its server from a short-lived worker thread.
"""

from __future__ import annotations

import functools
import os
import subprocess
import sys

_WATCHDOG = r"""
import os, select, signal, sys, time
parent, server = int(sys.argv[1]), int(sys.argv[2])
signal.signal(signal.SIGINT, signal.SIG_IGN)
def alive(pid):
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
try:
    sfd = os.pidfd_open(server)
except (AttributeError, OSError):
    sfd = None
if sfd is not None:
    try:
        pfd = os.pidfd_open(parent)
    except OSError:  # the parent is already gone
        pfd = None
    if pfd is not None:
        ready, _, _ = select.select([pfd, sfd], [], [])
        if sfd in ready:
            sys.exit(0)  # the server stopped first: nothing to do
    kill = lambda sig: signal.pidfd_send_signal(sfd, sig)
    gone = lambda: bool(select.select([sfd], [], [], 0)[0])
else:
    while os.getppid() == parent and alive(server):
        time.sleep(0.25)
    kill = lambda sig: os.kill(server, sig)
    gone = lambda: not alive(server)
try:
    kill(signal.SIGTERM)
    deadline = time.monotonic() + 5
    while not gone() and time.monotonic() < deadline:
        time.sleep(0.05)
    if not gone():
        kill(signal.SIGKILL)
except ProcessLookupError:
    pass
"""


def watch(server_pid: int, parent_pid: int | None = None) -> subprocess.Popen:
    """Start a watchdog that stops ``server_pid`` when ``parent_pid`` (this process) dies."""
    return subprocess.Popen(
        [sys.executable, "-I", "-c", _WATCHDOG, str(parent_pid or os.getpid()), str(server_pid)],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        close_fds=True, start_new_session=True,
    )


def guard() -> None:
    """Give every temporary Prefect server this process starts a watchdog (idempotent; nothing
    to do when a Prefect API URL is configured: then no temporary server is started)."""
    from prefect.settings import get_current_settings

    if get_current_settings().api.url:
        return
    from prefect.server.api.server import SubprocessASGIServer

    start = SubprocessASGIServer._run_uvicorn_command
    if getattr(start, "_benchroute_guarded", False):
        return

    @functools.wraps(start)
    def run_uvicorn_command(self):
        proc = start(self)
        try:
            self._benchroute_watchdog = watch(proc.pid)
        except OSError:  # no watchdog: the server still runs, as before
            pass
        return proc

    run_uvicorn_command._benchroute_guarded = True
    SubprocessASGIServer._run_uvicorn_command = run_uvicorn_command
