"""Bundles: atomic publish, verification on load, refusal of tampered or unsafe bundles, registry."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import polars as pl
import pytest

from benchroute.artifacts import registry
from benchroute.artifacts.bundle import (
    BundleContent,
    BundleError,
    BundleStore,
    json_bytes,
    npy_bytes,
    open_bundle,
    parquet_bytes,
)


def _content(seed: int = 0, name: str = "demo") -> BundleContent:
    rng = np.random.default_rng(seed)
    return BundleContent(
        name,
        {
            "index/embeddings.npy": npy_bytes(rng.standard_normal((5, 4)).astype(np.float32)),
            "labels.parquet": parquet_bytes(pl.DataFrame({"model": ["a", "b"], "y": [1, 0]})),
            "params.json": json_bytes({"k": 5}),
        },
        {"parameters": {"k": 5, "seed": seed}},
    )


@pytest.fixture(params=["local", "memory"])
def store_url(request, tmp_path, memory_url) -> str:
    return str(tmp_path / "store") if request.param == "local" else memory_url


def test_publish_load_roundtrip_and_idempotent(store_url):
    bs = BundleStore(store_url)
    first = bs.publish(_content(), code_version="t")
    assert first.created
    again = bs.publish(_content(), code_version="t")
    assert not again.created and again.version == first.version
    assert bs.versions("demo") == [first.version]
    b = open_bundle(store_url, "demo")
    assert b.manifest["version"] == first.version
    assert b.npy("index/embeddings.npy").shape == (5, 4)
    assert b.parquet("labels.parquet").column("y").to_pylist() == [1, 0]
    assert open_bundle(f"{store_url}/bundles/demo").manifest["version"] == first.version
    assert open_bundle(first.url).manifest["version"] == first.version


def test_registry_pin_rollback_gc(store_url):
    bs = BundleStore(store_url)
    versions = []
    for seed in range(4):
        versions.append(bs.publish(_content(seed), code_version="t").version)
    assert bs.versions("demo") == versions  # version ids sort in publication order
    assert len(versions) == 4 and bs.ref("demo") == versions[-1]
    registry.pin(store_url, "demo", versions[0], "prod")
    assert registry.rollback(store_url, "demo") == versions[-2]
    assert open_bundle(store_url, "demo").manifest["version"] == versions[-2]
    assert open_bundle(store_url, "demo", version="prod").manifest["version"] == versions[0]
    removed = registry.gc(store_url, "demo", keep=1)
    # Kept: the newest, latest (rolled back) and the pinned one.
    assert removed == [versions[1]]
    listed = {v["version"]: v["refs"] for v in registry.list_versions(store_url, "demo")}
    assert listed == {versions[0]: ["prod"], versions[2]: ["latest"], versions[3]: []}


def _tamper(store_url: str, rel: str, data: bytes | None) -> str:
    bs = BundleStore(store_url)
    v = bs.publish(_content(), code_version="t").version
    path = bs.path("demo", v, rel)
    if data is None:
        bs.fs.rm(path)
    else:
        bs.fs.pipe_file(path, data)
    return v


@pytest.mark.parametrize(
    "rel,data,message",
    [
        ("labels.parquet", b"PAR1 tampered", "labels.parquet"),
        ("params.json", None, "params.json"),
        ("extra.npy", npy_bytes(np.zeros(2)), "extra.npy"),
    ],
    ids=["tampered", "missing", "extra"],
)
def test_damaged_bundles_are_refused_naming_the_file(store_url, rel, data, message):
    _tamper(store_url, rel, data)
    with pytest.raises(BundleError, match=message):
        open_bundle(store_url, "demo")


def test_truncated_file_is_refused(store_url):
    bs = BundleStore(store_url)
    v = bs.publish(_content(), code_version="t").version
    path = bs.path("demo", v, "index/embeddings.npy")
    with bs.fs.open(path, "rb") as f:
        data = f.read()
    bs.fs.pipe_file(path, data[:-8])
    with pytest.raises(BundleError, match="embeddings.npy has"):
        open_bundle(store_url, "demo")


def _rewrite_manifest(store_url, change) -> None:
    bs = BundleStore(store_url)
    v = bs.publish(_content(), code_version="t").version
    path = bs.path("demo", v, "manifest.json")
    with bs.fs.open(path, "rb") as f:
        m = json.loads(f.read())
    change(m)
    bs.fs.pipe_file(path, json.dumps(m).encode())


def test_unknown_schema_version_is_refused(store_url):
    _rewrite_manifest(store_url, lambda m: m.update(schema_version=99))
    with pytest.raises(BundleError, match="schema_version 99"):
        open_bundle(store_url, "demo")


@pytest.mark.parametrize("bad", ["../../escape.json", "/etc/passwd.json", "a/../../b.npy"])
def test_paths_escaping_the_bundle_are_refused(store_url, bad):
    def change(m):
        m["files"][bad] = {"sha256": "0" * 64, "size": 1}

    _rewrite_manifest(store_url, change)
    with pytest.raises(BundleError, match="escapes|invalid"):
        open_bundle(store_url, "demo")


def test_pickled_npy_is_refused(store_url):
    bs = BundleStore(store_url)
    buf = io.BytesIO()
    np.save(buf, np.array([{"evil": 1}], dtype=object), allow_pickle=True)
    content = _content()
    files = dict(content.files)
    files["index/embeddings.npy"] = buf.getvalue()
    bs.publish(BundleContent("demo", files, content.meta), code_version="t")
    with pytest.raises(BundleError, match="embeddings.npy: not a plain .npy"):
        open_bundle(store_url, "demo")


def test_non_allowed_file_types_cannot_be_published(store_url):
    with pytest.raises(Exception, match="not Parquet"):
        BundleStore(store_url).publish(
            BundleContent("demo", {"model.pkl": b"x"}, {}), code_version="t"
        )


_PUBLISHER = textwrap.dedent(
    """
    import sys, time, numpy as np
    from benchroute.artifacts import bundle as b
    store, seed, slow = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "slow"
    real_pipe = b.BundleStore.publish
    if slow:  # stall after the data files, before the manifest: the test kills us here
        orig = b._exclusive_put
        def stalled(*a, **k):
            print("STALLED", flush=True); time.sleep(60); return orig(*a, **k)
        b._exclusive_put = stalled
    rng = np.random.default_rng(seed)
    content = b.BundleContent("demo", {"x.npy": b.npy_bytes(rng.standard_normal(1000))}, {"parameters": {"seed": seed}})
    print(b.BundleStore(store).publish(content, code_version="t").version, flush=True)
    """
)


def test_killed_publisher_leaves_the_old_latest(tmp_path):
    store = str(tmp_path / "store")
    old = BundleStore(store).publish(_content(), code_version="t").version
    proc = subprocess.Popen(
        [sys.executable, "-c", _PUBLISHER, store, "7", "slow"], stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout.readline().strip() == "STALLED"
    proc.kill()
    proc.wait()
    bs = BundleStore(store)
    assert bs.ref("demo") == old and bs.versions("demo") == [old]
    assert open_bundle(store, "demo").manifest["version"] == old


def test_concurrent_publishers_leave_exactly_their_versions(tmp_path):
    store = str(tmp_path / "store")
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _PUBLISHER, store, str(seed), "fast"],
            stdout=subprocess.PIPE,
            text=True,
        )
        for seed in (1, 2, 3)
    ]
    reported = {p.communicate(timeout=120)[0].strip() for p in procs}
    assert all(p.returncode == 0 for p in procs)
    bs = BundleStore(store)
    assert set(bs.versions("demo")) == reported
    assert bs.ref("demo") in reported
    for v in reported:
        open_bundle(store, "demo", version=v)


def test_publish_and_load_through_s3(s3_server):
    """A real S3 API on loopback (moto server) through s3fs, not a mock of fsspec."""
    url = f"{s3_server}/bundles-test"
    bs = BundleStore(url)
    first = bs.publish(_content(1), code_version="t")
    second = bs.publish(_content(2), code_version="t")
    assert bs.versions("demo") == [first.version, second.version]
    assert open_bundle(url, "demo").manifest["version"] == second.version
    assert registry.rollback(url, "demo") == first.version
    assert open_bundle(url, "demo").npy("index/embeddings.npy").shape == (5, 4)
