"""Shared test set-up: offline model loading, a private Prefect home, paths to real data."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
os.environ.setdefault("PREFECT_HOME", tempfile.mkdtemp(prefix="benchroute-prefect-"))
os.environ.setdefault("PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW", "ignore")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")  # no console noise at interpreter exit

REPO = Path(__file__).resolve().parents[1]
FIXTURES = REPO / "tests" / "fixtures"
SAMPLE = REPO / "sample"
RAW = REPO.parent / "shared" / "data" / "raw"


@pytest.fixture
def raw_data() -> Path:
    """The real benchmark outputs beside the checkout; the test is skipped without them."""
    if not RAW.is_dir():
        pytest.skip(f"real data not found at {RAW} (a checkout without ../shared/data)")
    return RAW


@pytest.fixture
def memory_url(request) -> str:
    """A fresh memory:// root, removed afterwards."""
    import fsspec

    import re

    url = f"memory://benchroute-test/{re.sub(r'[^A-Za-z0-9_-]', '_', request.node.name)}"
    yield url
    fs = fsspec.filesystem("memory")
    path = fs._strip_protocol(url)
    if fs.exists(path):
        fs.rm(path, recursive=True)


@pytest.fixture(scope="session")
def s3_server():
    """A real S3 API on 127.0.0.1 (moto's server mode), reached through s3fs like real S3.

    fsspec's per-protocol config points every ``s3://`` URL at it for the session.
    """
    import socket

    import boto3
    import fsspec
    from moto.server import ThreadedMotoServer

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    creds = {"aws_access_key_id": "test", "aws_secret_access_key": "test"}
    boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", **creds).create_bucket(
        Bucket="benchroute-test"
    )
    old = fsspec.config.conf.get("s3")
    fsspec.config.conf["s3"] = {
        "client_kwargs": {"endpoint_url": endpoint, "region_name": "us-east-1"},
        "key": "test",
        "secret": "test",
        "skip_instance_cache": True,
    }
    yield "s3://benchroute-test"
    if old is None:
        fsspec.config.conf.pop("s3", None)
    else:
        fsspec.config.conf["s3"] = old
    server.stop()


@pytest.fixture(scope="session")
def embedded_sample_store(tmp_path_factory) -> str:
    """The shipped sample, ingested and embedded with the default small embedder (once)."""
    from benchroute.flows.embed import embed_store
    from benchroute.flows.ingest import ingest_flow

    url = str(tmp_path_factory.mktemp("embedded") / "store")
    ingest_flow(sources=[str(SAMPLE)], store=url, progress=False)
    embed_store(url, progress=False)
    return url
