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
    import re

    import fsspec

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


SAMPLE_VECTORS = Path(__file__).resolve().parent / "fixtures" / "sample_vectors" / "vectors.parquet"


def seed_sample_vectors(url: str) -> int:
    """Write the shipped vectors of the sample's inputs (``fixtures/sample_vectors``) into the
    store at ``url`` when they are the installed default embedder's; returns how many (0 when
    the embedder differs)."""
    import polars as pl
    import pyarrow.parquet as pq
    from benchroute.artifacts import embeddings as emb
    from benchroute.artifacts.store import Store
    from benchroute.schemas.embeddings import EmbedderIdentity
    from benchroute.transforms.embedder import resolve

    table = pq.read_table(SAMPLE_VECTORS)
    meta = table.schema.metadata
    identity = EmbedderIdentity.from_json(meta[b"identity"])
    if identity != resolve()[1]:
        return 0
    store = Store(url)
    ids = store.read("inputs", columns=["input_id"])["input_id"].unique()
    frame = pl.from_arrow(table.replace_schema_metadata(None)).filter(pl.col("input_id").is_in(ids.implode()))
    if frame.height:
        emb.write_part(store, identity, frame, precision=meta[b"precision"].decode(),
                       info={"seeded_from": "tests/fixtures/sample_vectors"})
    return frame.height


@pytest.fixture(scope="session")
def embedded_sample_store(tmp_path_factory) -> str:
    """The shipped sample, ingested and embedded with the default small embedder (once): the
    vectors come from ``fixtures/sample_vectors`` where they are the installed embedder's, and
    whatever they do not cover is embedded here."""
    from benchroute.flows.embed import embed_store
    from benchroute.flows.ingest import ingest_flow

    url = str(tmp_path_factory.mktemp("embedded") / "store")
    ingest_flow(sources=[str(SAMPLE)], store=url, progress=False)
    seed_sample_vectors(url)
    embed_store(url, progress=False)
    return url
