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
from benchroute.artifacts.stages.fit import FitOptions


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


@pytest.mark.parametrize("rel", ["index/embeddings.npy", "labels.parquet"])
def test_same_size_tampering_is_refused_by_the_hash(store_url, rel):
    """One byte changed, the size kept: only the sha256 comparison can catch it."""
    bs = BundleStore(store_url)
    v = bs.publish(_content(), code_version="t").version
    path = bs.path("demo", v, rel)
    with bs.fs.open(path, "rb") as f:
        data = bytearray(f.read())
    pos = len(data) - 1 if rel.endswith(".npy") else len(data) // 2  # npy: last float's byte
    data[pos] ^= 0x01
    bs.fs.pipe_file(path, bytes(data))
    assert len(data) == bs.manifest("demo", v)["files"][rel]["size"]
    with pytest.raises(BundleError, match=f"{rel} does not match its sha256"):
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


@pytest.mark.parametrize("change", [
    lambda m: m["parameters"].update(k=50),  # a routing setting
    lambda m: m.update(embedder={"name": "evil/other-model", "dim": 4, "weights_hash": "x"}),
    lambda m: m.update(content_hash="0" * 64),
    lambda m: m["files"].pop("params.json"),  # a listed file dropped (and deleted below)
])
def test_an_edited_manifest_is_refused(store_url, change):
    """Issue 12 item 3: settings in manifest.json are covered by the verified content hash."""
    bs = BundleStore(store_url)
    v = bs.publish(_content(), code_version="t").version
    assert open_bundle(store_url, "demo").manifest["parameters"]["k"] == 5
    path = bs.path("demo", v, "manifest.json")
    m = json.loads(bs.fs.cat_file(path))
    change(m)
    if "params.json" not in m["files"]:
        bs.fs.rm(bs.path("demo", v, "params.json"))
    bs.fs.pipe_file(path, json.dumps(m).encode())
    with pytest.raises(BundleError, match="does not match its content hash"):
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
        orig = b.exclusive_put
        def stalled(*a, **k):
            print("STALLED", flush=True); time.sleep(60); return orig(*a, **k)
        b.exclusive_put = stalled
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


# ------------------------------------------------------------------ refs stay inside the store
def _store_with_an_outside_bundle(tmp_path) -> tuple[str, str, str]:
    """(store, its own version, a version copied outside it): ``<tmp>/elsewhere/<v>`` and
    ``<tmp>/elsewhere/demo/<v>`` hold a complete, verifiable bundle that is not in the store."""
    import shutil

    store = str(tmp_path / "store")
    own = BundleStore(store).publish(_content(0), code_version="t").version
    other = BundleStore(str(tmp_path / "other")).publish(_content(1), code_version="t")
    shutil.copytree(other.url, tmp_path / "elsewhere" / other.version)
    shutil.copytree(other.url, tmp_path / "elsewhere" / "demo" / other.version)
    return store, own, other.version


def _write_ref(store: str, name: str, version: str, ref: str = "latest") -> str:
    """Overwrite a ref file by hand (as anyone with write access to the store could)."""
    path = os.path.join(store, "bundles", name, "refs", f"{ref}.json")
    with open(path, "w") as f:
        json.dump({"version": version}, f)
    return path


@pytest.mark.parametrize("form", ["relative", "relative-with-name", "absolute"])
def test_a_ref_cannot_leave_the_store(tmp_path, capsys, form):
    import re

    from benchroute.artifacts.router import load_router
    from benchroute.flows.cli import main as cli

    store, own, outside = _store_with_an_outside_bundle(tmp_path)
    value = {
        "relative": f"../../../elsewhere/{outside}",
        "relative-with-name": f"../../../elsewhere/demo/{outside}",  # name and version would match
        "absolute": str(tmp_path / "elsewhere" / "demo" / outside),
    }[form]
    ref_file = _write_ref(store, "demo", value)
    refused = rf"{re.escape(ref_file)}.*{re.escape(repr(value))}"
    with pytest.raises(BundleError, match=refused):
        BundleStore(store).resolve("demo")
    with pytest.raises(BundleError, match=refused):
        open_bundle(store, "demo")
    with pytest.raises(BundleError, match=refused):
        load_router(store, "demo")
    assert cli(["route", "--bundle", store, "--name", "demo", "a question"]) == 2
    err = capsys.readouterr().err
    assert "latest.json" in err and value in err and "Traceback" not in err

    BundleStore(store).set_ref("demo", "latest", own)  # a legit ref still works
    assert BundleStore(store).resolve("demo") == own
    assert open_bundle(store, "demo").manifest["version"] == own


@pytest.mark.parametrize(
    "content", ['{"version": 5}', "[]", "not json", '{"v": 1}', json.dumps({"version": "latest"})]
)
def test_malformed_ref_files_are_refused_naming_the_file(store_url, content):
    bs = BundleStore(store_url)
    bs.publish(_content(), code_version="t")
    bs.fs.pipe_file(bs.path("demo", "refs", "latest.json"), content.encode())
    with pytest.raises(BundleError, match="latest.json"):
        bs.resolve("demo")
    with pytest.raises(BundleError, match="latest.json"):
        open_bundle(store_url, "demo")


@pytest.mark.parametrize(
    "name,version,message",
    [
        ("../demo", "latest", "bad bundle name"),
        ("demo/..", "latest", "bad bundle name"),
        ("demo", "../../demo/refs/latest", "bad ref name"),
        ("demo", "/etc/passwd", "bad ref name"),
        ("demo", "20990101T000000000000Z-0123456789ab", "no published version"),
    ],
)
def test_names_and_versions_that_are_not_one_folder_are_refused(store_url, name, version, message):
    BundleStore(store_url).publish(_content(), code_version="t")
    with pytest.raises(BundleError, match=message):
        open_bundle(store_url, name, version=version)
    with pytest.raises(BundleError, match=message):
        BundleStore(store_url).resolve(name, version)


def test_a_copied_manifest_does_not_pass_for_another_folder(store_url):
    """The manifest's name and version must be the folder's: a copy under another version id or
    another bundle name is refused, by ref, by version and by URL."""
    bs = BundleStore(store_url)
    v = bs.publish(_content(), code_version="t").version
    fake = "20990101T000000000000Z-0123456789ab"
    bs.fs.copy(bs.path("demo", v), bs.path("demo", fake), recursive=True)
    bs.fs.copy(bs.path("demo", v), bs.path("copy", v), recursive=True)
    bs.fs.copy(bs.path("demo", v), bs.path("demo", "not-a-version"), recursive=True)
    assert bs.versions("demo") == sorted([v, fake]) and bs.versions("copy") == [v]
    with pytest.raises(BundleError, match="no version or ref 'not-a-version'"):
        open_bundle(store_url, "demo", version="not-a-version")
    with pytest.raises(BundleError, match=f"manifest is bundle demo/{v}.*folder demo/{fake}"):
        open_bundle(store_url, "demo", version=fake)
    bs.set_ref("copy", "latest", v)
    with pytest.raises(BundleError, match=f"manifest is bundle demo/{v}.*folder copy/{v}"):
        open_bundle(store_url, "copy")
    with pytest.raises(BundleError, match="manifest is bundle demo/"):
        open_bundle(f"{store_url}/bundles/copy/{v}")
    assert open_bundle(store_url, "demo", version=v).manifest["version"] == v


def test_cli_route_follows_a_legit_ref_and_refuses_an_escaping_one(embedded_sample_store, capsys):
    """On a real router bundle: a pin and ``latest`` route, a ``latest`` outside the store is an
    exit code 2 with the ref file named, not a traceback."""
    from benchroute.artifacts.router import load_router
    from benchroute.flows.cli import main as cli
    from benchroute.flows.publish import publish_store

    store = embedded_sample_store
    v = publish_store(store, "refs-escape", FitOptions(evaluate=False))["version"]
    registry.pin(store, "refs-escape", v, "prod")
    assert load_router(store, "refs-escape", "prod").version == v
    for version in ("latest", "prod"):
        assert cli(["route", "--bundle", store, "--name", "refs-escape", "--version", version,
                    "What is 2 + 2?"]) == 0
        assert json.loads(capsys.readouterr().out)["model"]
    ref_file = _write_ref(store, "refs-escape", f"../../../elsewhere/{v}")
    try:
        assert cli(["route", "--bundle", store, "--name", "refs-escape", "What is 2 + 2?"]) == 2
        err = capsys.readouterr().err
        assert ref_file in err and f"../../../elsewhere/{v}" in err and "Traceback" not in err
    finally:
        BundleStore(store).set_ref("refs-escape", "latest", v)
