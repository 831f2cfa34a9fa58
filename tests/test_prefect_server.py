"""A ``kill -9`` of a benchroute command does not leave its temporary Prefect server behind
(``flows.prefect_server``)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from conftest import SAMPLE

SERVER_APP = "prefect.server.api.server:create_app"


def _children(pid: int) -> dict[int, str]:
    """The live child processes of ``pid`` (zombies excluded) and their command lines."""
    out = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        state, ppid = stat.rsplit(")", 1)[1].split()[:2]
        if int(ppid) == pid and state != "Z":
            out[int(entry.name)] = cmdline
    return out


def _server_alive(pid: int) -> bool:
    """``pid`` is still a (not yet dead) temporary Prefect server."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        return state != "Z" and SERVER_APP in Path(f"/proc/{pid}/cmdline").read_text()
    except OSError:
        return False


def test_killed_command_takes_its_temporary_prefect_server_with_it(tmp_path):
    """``benchroute ingest`` of a sample source starts a temporary Prefect server; SIGKILL the
    command once the server runs: within seconds no server process from it is left."""
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect")}
    env.pop("PREFECT_API_URL", None)
    cmd = [str(Path(sys.executable).with_name("benchroute")), "ingest", str(SAMPLE / "mmlu_pro"),
           "--store", str(tmp_path / "store"), "--no-progress"]
    log = tmp_path / "command.log"
    with log.open("wb") as out:  # a file, not a pipe: a surviving server would hold a pipe open
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    server = None
    try:
        deadline = time.monotonic() + 150
        while server is None and proc.poll() is None and time.monotonic() < deadline:
            server = next((p for p, c in _children(proc.pid).items() if SERVER_APP in c), None)
            time.sleep(0.05)
        assert server, f"no temporary Prefect server started: {log.read_text(errors='replace')[-2000:]}"
        settle = time.monotonic() + 3  # the server runs: its watchdog is started right after it
        while len(_children(proc.pid)) < 2 and time.monotonic() < settle:
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(timeout=10) == -signal.SIGKILL
        gone_by = time.monotonic() + 10
        while _server_alive(server) and time.monotonic() < gone_by:
            time.sleep(0.1)
        assert not _server_alive(server), "the temporary Prefect server outlived its command"
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        if server and _server_alive(server):
            os.kill(server, signal.SIGKILL)  # the orphan this test found: not left running
