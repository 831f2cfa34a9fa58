"""Nothing lost, nothing half-done: a real process killed (SIGKILL) at each commit point of a
multi-step write, then a rerun that ends in the state a clean run leaves.

The kill comes from ``benchroute.faults.crash_point``: the child runs with
``BENCHROUTE_CRASH_AT=<point>`` and SIGKILLs itself there (no cleanup, no ``finally``). The
Prefect commands (ingest, publish, refresh) run as the real CLI against one Prefect server this
module starts, so no child starts (or leaves behind) a temporary server of its own; the bundle
steps and the registry run in a plain ``python`` child or the CLI without Prefect.
"""

from __future__ import annotations

import inspect
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from benchroute.artifacts import embeddings as emb_store
from benchroute.artifacts import registry
from benchroute.artifacts.bundle import (
    VERSION_RE,
    BundleContent,
    BundleStore,
    json_bytes,
    npy_bytes,
    open_bundle,
)
from benchroute.artifacts.specs import RouterSpec
from benchroute.artifacts.stages.fit import FitOptions
from benchroute.artifacts.store import Store
from benchroute.io import fresh_ls
from conftest import SAMPLE
from polars.testing import assert_frame_equal

CLI = str(Path(sys.executable).with_name("benchroute"))
KEYS = ["input_id", "dataset", "model"]


# ------------------------------------------------------------------------------ running children
@pytest.fixture(scope="module")
def prefect_api():
    """One Prefect server for every child of this module (its own port, stopped afterwards)."""
    from prefect.server.api.server import SubprocessASGIServer

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = SubprocessASGIServer(port=port)
    server.start(timeout=180)
    yield server.api_url
    server.stop()


def _run(cmd: list[str], tmp: Path, *, crash: str | None = None, api: str | None = None,
         timeout: float = 300) -> tuple[int, str]:
    """Run ``cmd``; with ``crash``, it must die by SIGKILL at that point. Returns (rc, output)."""
    env = {**os.environ, "PREFECT_HOME": str(tmp / f"prefect-{os.urandom(4).hex()}"),
           "HF_HUB_OFFLINE": "1", "PREFECT_LOGGING_LEVEL": "INFO"}
    env.pop("BENCHROUTE_CRASH_AT", None)
    env.pop("PREFECT_API_URL", None)
    if crash:
        env["BENCHROUTE_CRASH_AT"] = crash
    if api:
        env["PREFECT_API_URL"] = api
    log = tmp / f"child-{os.urandom(4).hex()}.log"
    with log.open("wb") as out:  # a file, not a pipe: nothing the child leaves can hold it open
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True, cwd=tmp)
        try:
            proc.wait(timeout=timeout)
        finally:
            try:  # anything the child started (a temporary Prefect server) goes with it
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    output = log.read_text(errors="replace")
    if crash:
        assert proc.returncode == -signal.SIGKILL, f"not killed at {crash}:\n{output[-3000:]}"
    else:
        assert proc.returncode == 0, output[-3000:]
    return proc.returncode, output


# ------------------------------------------------------------------------------ stores
@pytest.fixture(scope="module")
def stores(tmp_path_factory, prefect_api):
    """``partial``: sample/mmlu_pro ingested by the CLI (labels of one source); ``clean``: then
    the whole sample ingested into a copy of it, undisturbed (the state every rerun must reach;
    an incremental ingest differs from a one-shot one, e.g. in a model's first source)."""
    root = tmp_path_factory.mktemp("crash")
    partial = str(root / "partial")
    _run([CLI, "ingest", str(SAMPLE / "mmlu_pro"), "--store", partial, "--no-progress"], root,
         api=prefect_api)
    clean = _copy(partial, root / "clean")
    _run([CLI, "ingest", str(SAMPLE), "--store", clean, "--no-progress"], root, api=prefect_api)
    return root, partial, clean


def _copy(src: str, dst: Path) -> str:
    shutil.copytree(src, dst)
    return str(dst)


def _table(url: str, name: str, key: list[str]) -> pl.DataFrame:
    return Store(url).read(name).sort(key)


def _assert_ingest_state_equals(url: str, clean: str) -> None:
    for name, key in (("labels", KEYS), ("model_cards", ["model"]), ("models", ["model"]),
                      ("inputs", ["input_id"])):
        assert_frame_equal(_table(url, name, key), _table(clean, name, key))
    out = Store(url).read("outcomes", columns=["input_id", "dataset", "model", "metric", "run_id"])
    ref = Store(clean).read("outcomes", columns=["input_id", "dataset", "model", "metric", "run_id"])
    assert out.height == ref.height and out.unique().height == ref.unique().height


# ------------------------------------------------------------------------------ ingest
def test_ingest_killed_after_its_append_commit_relabels_on_the_rerun(stores, prefect_api, tmp_path):
    """The issue's case: a store holding labels, a new ingest killed right after its append
    commit; the rerun finds every unit ingested, sees the labels are stale and relabels."""
    root, partial, clean = stores
    url = _copy(partial, tmp_path / "store")
    before = Store(url).read("labels").height
    cmd = [CLI, "ingest", str(SAMPLE), "--store", url, "--no-progress"]
    _run(cmd, tmp_path, crash="ingest.appended", api=prefect_api)
    s = Store(url)
    assert s.read("labels").height == before  # half-done: new outcomes, old labels
    assert s.read("outcomes").height == Store(clean).read("outcomes").height

    _, out = _run(cmd, tmp_path, api=prefect_api)
    assert "relabelled although no unit was new" in out, out[-2000:]
    labels = Store(url).read("labels").height
    assert labels == Store(clean).read("labels").height > before
    _assert_ingest_state_equals(url, clean)


def test_ingest_killed_after_its_labels_commit_syncs_the_cards_on_the_rerun(stores, prefect_api,
                                                                            tmp_path):
    root, partial, clean = stores
    url = _copy(partial, tmp_path / "store")
    cmd = [CLI, "ingest", str(SAMPLE), "--store", url, "--no-progress"]
    _run(cmd, tmp_path, crash="ingest.labelled", api=prefect_api)
    assert_frame_equal(_table(url, "labels", KEYS), _table(clean, "labels", KEYS))
    # half-done: the card is still the one of the models before this ingest
    assert Store(url).units()["model_cards"] == Store(partial).units()["model_cards"]
    assert Store(url).units()["model_cards"] != Store(clean).units()["model_cards"]
    commits = len(Store(url).commits())

    _, out = _run(cmd, tmp_path, api=prefect_api)
    assert "relabelled although" not in out  # the labels were current: only the card is written
    assert len(Store(url).commits()) == commits + 1
    _assert_ingest_state_equals(url, clean)


# ------------------------------------------------------------------------------ publish (CLI)
@pytest.fixture(scope="module")
def with_vectors(stores):
    """The partial store with a vector per input, under the default embedder's identity (random
    vectors: these tests check what is written, not how well it routes), so refresh embeds none."""
    from benchroute.transforms.embedder import resolve

    root, partial, _ = stores
    url = _copy(partial, root / "with-vectors")
    _, identity = resolve()
    ids = Store(url).read("inputs")["input_id"].sort().to_list()
    x = np.random.default_rng(0).standard_normal((len(ids), identity.dim)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    emb_store.write_part(Store(url), identity, emb_store.vectors_frame(identity, ids, x),
                         precision="fp32")
    return url


def _publish_in_process(url: str, **router) -> str:
    from benchroute.flows.publish import publish_store

    options = FitOptions(router=RouterSpec(predictor="knn", **router), evaluate=False)
    return publish_store(url, "default", options)["version"]


def _killed_after_manifest_then_rerun(cmd, tmp_path, api, url, old):
    """Runs ``cmd`` killed after its bundle manifest landed (``latest`` still on ``old``, the new
    version pending), then again: the rerun says it moved ``latest`` to the new version, which is
    no longer pending. Returns (the new version, the rerun's output)."""
    _run(cmd, tmp_path, crash="bundle.manifest", api=api)
    bs = BundleStore(url)
    new = [v for v in bs.versions("default") if v != old]
    assert len(new) == 1 and bs.ref("default") == old and bs.pending("default") == new

    _, out = _run(cmd, tmp_path, api=api)
    assert f"finished an interrupted publish: latest moved to default {new[0]}" in out, out[-2000:]
    assert bs.ref("default") == new[0] and bs.versions("default") == [old, new[0]]
    assert bs.pending("default") == []
    return new[0], out


def test_cli_publish_killed_after_its_manifest_moves_latest_on_the_rerun(with_vectors, prefect_api,
                                                                         tmp_path):
    """The manifest landed, ``latest`` did not move: the rerun moves it and says so (it used to
    say 'unchanged, latest stays' and leave ``latest`` on the old version)."""
    from benchroute.flows.publish import build_content

    url = _copy(with_vectors, tmp_path / "store")
    old = _publish_in_process(url)
    cmd = [CLI, "publish", "--store", url, "--no-evaluate", "--predictor", "knn", "--k", "5"]
    new, out = _killed_after_manifest_then_rerun(cmd, tmp_path, prefect_api, url, old)
    assert "unchanged, latest stays" not in out
    clean = build_content(url, "default", FitOptions(router=RouterSpec(predictor="knn", k=5), evaluate=False))
    assert BundleStore(url).manifest("default", new)["content_hash"] == clean.content_hash()
    assert open_bundle(url, "default").manifest["version"] == new


def test_refresh_killed_after_its_manifest_moves_latest_on_the_rerun(with_vectors, prefect_api,
                                                                     tmp_path):
    url = _copy(with_vectors, tmp_path / "store")
    landing = tmp_path / "landing"
    shutil.copytree(SAMPLE / "mmlu_pro", landing / "mmlu_pro")
    old = _publish_in_process(url)
    cmd = [CLI, "refresh", str(landing), "--store", url]
    _, out = _killed_after_manifest_then_rerun(cmd, tmp_path, prefect_api, url, old)
    assert "data unchanged" not in out


# ------------------------------------------------------------------------------ publish steps
_PUBLISHER = textwrap.dedent(
    """
    import json, sys
    import numpy as np
    from benchroute.artifacts.bundle import BundleContent, BundleStore, json_bytes, npy_bytes
    exec(sys.argv[3])  # _content, as defined in the test module
    p = BundleStore(sys.argv[1]).publish(_content(int(sys.argv[2])), code_version="t")
    print(json.dumps({"version": p.version, "created": p.created, "latest": p.latest,
                      "recovered": list(p.recovered)}))
    """
)


def _content(seed: int) -> BundleContent:
    rng = np.random.default_rng(seed)
    return BundleContent("demo", {"x.npy": npy_bytes(rng.standard_normal(64)),
                                  "params.json": json_bytes({"seed": seed})},
                         {"parameters": {"seed": seed}})


def _publish_child(store: str, seed: int, tmp: Path, crash: str | None = None) -> dict | None:
    cmd = [sys.executable, "-c", _PUBLISHER, store, str(seed), inspect.getsource(_content)]
    _, out = _run(cmd, tmp, crash=crash, timeout=120)
    return None if crash else json.loads(out.strip().splitlines()[-1])


def _folders(store: str, name: str = "demo") -> list[str]:
    bs = BundleStore(store)
    return sorted(os.path.basename(p.rstrip("/")) for p in fresh_ls(bs.fs, bs.path(name))
                  if VERSION_RE.fullmatch(os.path.basename(p.rstrip("/"))))


@pytest.mark.parametrize("point", ["bundle.intent", "bundle.files", "bundle.manifest", "bundle.ref"])
def test_publish_killed_at_each_step_is_finished_or_rolled_back(tmp_path, point):
    store = str(tmp_path / "store")
    bs = BundleStore(store)
    old = bs.publish(_content(0), code_version="t").version
    _publish_child(store, 1, tmp_path, crash=point)
    killed = bs.pending("demo")
    assert len(killed) == 1
    # Readers see the old bundle or the new one, whole: before the ref moved, the old one.
    assert bs.ref("demo") == (killed[0] if point == "bundle.ref" else old)
    open_bundle(store, "demo")

    r = _publish_child(store, 1, tmp_path)
    if point in ("bundle.intent", "bundle.files"):  # never visible: published anew
        assert r["created"] and r["version"] != killed[0] and r["recovered"] == []
        # The dead publish's intent stays until it is stale, then it is rolled back.
        assert bs.pending("demo") == killed
        assert bs.recover("demo", stale_after=0) == [{"version": killed[0], "action": "rolled back"}]
    elif point == "bundle.manifest":  # committed, latest not moved: the rerun moves it
        assert not r["created"] and r["version"] == killed[0] and r["recovered"] == [killed[0]]
    else:  # everything done but clearing the intent
        assert not r["created"] and r["version"] == killed[0] and r["recovered"] == []
    assert r["latest"] == r["version"] == bs.ref("demo")

    # The state of a clean run: two versions with the contents of seed 0 and 1, latest the newest,
    # no intent, no folder besides the versions'.
    versions = bs.versions("demo")
    assert versions == [old, r["version"]] == _folders(store)
    assert [bs.manifest("demo", v)["content_hash"] for v in versions] == [
        _content(0).content_hash(), _content(1).content_hash()]
    assert bs.pending("demo") == [] and bs.orphans("demo") == []
    assert open_bundle(store, "demo").manifest["version"] == versions[-1]


# ------------------------------------------------------------------------------ registry
def test_rollback_killed_midway_and_never_undone_by_a_later_publish(tmp_path):
    """A publish killed after its manifest, then a deliberate rollback (itself killed once
    between its two steps): no later publish moves ``latest`` forward again."""
    store = str(tmp_path / "store")
    bs = BundleStore(store)
    v0 = bs.publish(_content(0), code_version="t").version
    v1 = bs.publish(_content(1), code_version="t").version
    _publish_child(store, 2, tmp_path, crash="bundle.manifest")
    (v2,) = bs.pending("demo")
    assert bs.ref("demo") == v1

    cmd = [CLI, "bundles", "rollback", "--store", store, "--name", "demo"]
    _run(cmd, tmp_path, crash="rollback.cleared", timeout=120)
    assert bs.ref("demo") == v1 and bs.pending("demo") == []
    _, out = _run(cmd, tmp_path, timeout=120)
    assert f"latest -> {v0}" in out and bs.ref("demo") == v0

    r = _publish_child(store, 2, tmp_path)  # the interrupted publish's content again
    assert r == {"version": v2, "created": False, "latest": v0, "recovered": []}
    assert bs.ref("demo") == v0 and bs.versions("demo") == [v0, v1, v2]


def test_gc_killed_between_a_manifest_and_its_folder_is_finished_by_the_next_gc(tmp_path):
    store = str(tmp_path / "store")
    bs = BundleStore(store)
    versions = [bs.publish(_content(seed), code_version="t").version for seed in range(4)]
    cmd = [CLI, "bundles", "gc", "--store", store, "--name", "demo", "--keep", "1"]
    _run(cmd, tmp_path, crash="gc.manifest_removed", timeout=120)
    assert bs.versions("demo") == versions[1:]  # the first doomed one is invisible already
    assert bs.orphans("demo") == versions[:1] and _folders(store) == versions

    _, out = _run(cmd, tmp_path, timeout=120)
    assert "removed 3 version(s)" in out, out
    assert bs.versions("demo") == _folders(store) == versions[-1:] == [bs.ref("demo")]
    assert registry.gc(store, "demo", keep=1) == []
