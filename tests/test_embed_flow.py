"""``embed_flow`` run for real as a Prefect flow (ephemeral server, temporary PREFECT_HOME), in a
child process so its Prefect settings cannot leak into other tests."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import polars as pl

from benchroute.artifacts.store import Store
from benchroute.transforms.ids import input_ids

FIXTURE = Path(__file__).parent / "fixtures" / "embed" / "prompts.csv"

SCRIPT = textwrap.dedent(
    """
    import json, sys
    from benchroute.artifacts.specs import EmbedSpec
    from benchroute.flows.embed import embed_flow
    first = embed_flow(sys.argv[1], EmbedSpec(precision="fp32", batch_size=16))
    second = embed_flow(store=sys.argv[1])
    print("RESULT " + json.dumps([first, second]))
    """
)


def test_embed_flow_runs_under_prefect(tmp_path):
    df = pl.read_csv(FIXTURE, schema_overrides={"record": pl.String}).head(40)
    inputs = pl.DataFrame({"input_id": input_ids(df["text"]), "text": df["text"]}).unique(
        "input_id", maintain_order=True
    )
    store = Store(str(tmp_path / "store"))
    store.commit(append={"inputs": inputs})
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}  # no outside server
    env.update(
        PREFECT_HOME=str(tmp_path / "prefect"),
        PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="120",
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        HF_HUB_OFFLINE="1",
        PREFECT_LOGGING_LEVEL="INFO",  # this test reads the run's logs
    )
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT, store.url],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT "))
    first, second = json.loads(line[len("RESULT ") :])
    assert first["new"] == inputs.height and first["precision"] == "fp32"
    assert second["new"] == 0 and second["already_present"] == inputs.height
    logs = proc.stdout + proc.stderr
    assert "Finished in state Completed" in logs
    assert "inputs/s" in logs and "to embed" in logs  # counts and rate in the Prefect logs
