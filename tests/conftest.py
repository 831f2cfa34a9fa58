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
