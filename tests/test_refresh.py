"""The refresh flow for real: Prefect runs (ephemeral server) on real sample dumps in a landing zone.

The landing zone holds sample/mmlu_pro (two models' results held back) and sample/routellm. Its
stores start with the vectors of all but a few of its inputs (copied from the session's embedded
sample store, as if an earlier run had embedded them), so each first refresh embeds those few
with the real model instead of all 1,388.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from types import SimpleNamespace

import pytest
from benchroute.artifacts.bundle import BundleStore, open_bundle
from benchroute.artifacts.store import Store
from benchroute.flows.refresh import refresh_flow
from prefect.exceptions import ParameterTypeError
from refresh_support import land_held_back, make_landing, seed_vectors

LEFT_OUT = 24  # inputs the first refresh embeds itself


@pytest.fixture(scope="module")
def lifecycle(tmp_path_factory, embedded_sample_store):
    """Refreshes: first, nothing new (stopped by the check), nothing new run in full (every step
    cached), the held-back models' results land."""
    root = tmp_path_factory.mktemp("refresh")
    landing, held, results = make_landing(root)
    store = str(root / "store")
    _, left_out = seed_vectors(embedded_sample_store, store, LEFT_OUT)
    first = refresh_flow(landing=str(landing), store=store)
    second = refresh_flow(landing=str(landing), store=store)
    second_full = refresh_flow(landing=str(landing), store=store, full=True)
    land_held_back(landing, results)
    third = refresh_flow(landing=str(landing), store=store)
    return SimpleNamespace(root=root, landing=landing, store=store, held=held, left_out=left_out,
                           first=first, second=second, second_full=second_full, third=third)


def _canonical(store: str, source_models: list[str]) -> set[str]:
    outcomes = Store(store).read("outcomes", columns=["model", "source_model"])
    return set(outcomes.filter(outcomes["source_model"].is_in(source_models))["model"])


def test_first_refresh_ingests_embeds_new_inputs_and_publishes_version_1(lifecycle):
    s = lifecycle.first
    assert s["units"]["new"] == s["units"]["found"] >= 2
    assert s["ingest"]["units_failed"] == {}
    assert s["embed"]["new"] == LEFT_OUT and s["embed"]["already_present"] == s["embed"]["total"] - LEFT_OUT
    assert s["evaluation"]["ran"] == ["mmlu_pro", "routellm"]
    assert s["published"] and s["bundle"]["created"]
    assert BundleStore(lifecycle.store).versions("default")[0] == s["bundle"]["version"]
    manifest = open_bundle(lifecycle.store, "default", s["bundle"]["version"]).manifest
    held = _canonical(lifecycle.store, lifecycle.held)
    assert len(held) == 2 and not held & {m["model"] for m in manifest["models"]}
    assert set(manifest["evaluation"]) == {"mmlu_pro", "routellm"}


def test_second_refresh_with_nothing_new_stops_at_the_check(lifecycle):
    s, first = lifecycle.second, lifecycle.first
    assert s["noop"] and s["units"] == {"found": first["units"]["found"], "new": 0, "new_keys": []}
    assert not s["published"] and s["bundle"]["version"] == first["bundle"]["version"]
    assert s["bundle"]["bytes"] == first["bundle"]["bytes"] and s["bundle"]["models"] == first["bundle"]["models"]


def test_second_refresh_run_in_full_publishes_nothing_from_cache(lifecycle):
    s, first = lifecycle.second_full, lifecycle.first
    assert "noop" not in s and s["units"]["new"] == 0 and s["ingest"] is None
    assert s["embed"]["new"] == 0 and s["embed"]["partitions"] == 0
    assert s["evaluation"] == {"ran": [], "cached": ["mmlu_pro", "routellm"], "skipped": []}
    assert s["fit_cached"] is True
    assert not s["published"] and s["bundle"]["version"] == first["bundle"]["version"]


def test_new_models_results_land_and_publish_version_2_without_embedding(lifecycle):
    s, first = lifecycle.third, lifecycle.first
    assert s["units"]["new"] == 1 and s["units"]["new_keys"][0].startswith("mmlu_pro:")
    assert s["ingest"]["added"]["_total"]["new_inputs"] == 0
    assert s["embed"]["new"] == 0 and s["embed"]["already_present"] == s["embed"]["total"]
    # only the group whose data changed is evaluated again
    assert s["evaluation"] == {"ran": ["mmlu_pro"], "cached": ["routellm"], "skipped": []}
    assert s["published"] and s["bundle"]["version"] != first["bundle"]["version"]
    bundles = BundleStore(lifecycle.store)
    assert bundles.versions("default") == [first["bundle"]["version"], s["bundle"]["version"]]
    assert bundles.ref("default") == s["bundle"]["version"]
    models = {m["model"] for m in open_bundle(lifecycle.store, "default").manifest["models"]}
    assert _canonical(lifecycle.store, lifecycle.held) <= models
    assert s["bundle"]["models"] == first["bundle"]["models"] + len(lifecycle.held)


def test_the_noop_check_trusts_its_record_only_while_it_matches(lifecycle):
    """After the third refresh nothing is new: the check says so. Other specs, a record naming
    another version (same size), a record that is not JSON or none at all: the refresh runs."""
    from pathlib import Path

    from benchroute.artifacts.specs import EmbedSpec, RouterSpec
    from benchroute.artifacts.stages import refresh as stage

    def check(**router):
        return stage.check(str(lifecycle.landing), lifecycle.store, "default", EmbedSpec(),
                           RouterSpec(**router))

    ok = check()
    assert ok.noop and ok.version == lifecycle.third["bundle"]["version"]
    assert not check(k=5).noop and "specs" in check(k=5).reason
    record = Path(lifecycle.store) / stage.RECORD_DIR / "default.json"
    good = record.read_bytes()
    first = lifecycle.first["bundle"]["version"]
    try:
        record.write_bytes(good.replace(ok.version.encode(), first.encode()))
        assert len(record.read_bytes()) == len(good) and not check().noop
        record.write_bytes(b"{not json" + good[9:])
        assert not check().noop
        forged = json.loads(good)  # the current key and version, untagged or tagged by someone else
        for tag in (None, "0" * 64):
            record.write_text(json.dumps({k: v for k, v in {**forged, "tag": tag}.items() if v}))
            assert not check().noop
        record.unlink()
        assert not check().noop and "no refresh recorded" in check().reason
    finally:
        record.write_bytes(good)
    assert check().noop


def test_incremental_refresh_equals_a_full_rebuild(lifecycle, tmp_path):
    """A fresh store built from the final landing zone in one refresh (with the same vectors)
    publishes the very bundle the three incremental refreshes ended with."""
    from benchroute.artifacts import embeddings as emb

    src = Store(lifecycle.store)
    eid = emb.embedders(src)[0]
    ident, precision = emb.read_part_identity(src, src.parts(f"embeddings/{eid}")[0])
    store = str(tmp_path / "rebuilt")
    emb.write_part(Store(store), ident, emb.read_table(src, eid), precision=precision)
    s = refresh_flow(landing=str(lifecycle.landing), store=store)
    assert s["embed"]["new"] == 0 and s["published"]
    assert s["bundle"]["content_hash"] == lifecycle.third["bundle"]["content_hash"]


def test_incremental_refresh_extends_the_latest_version_by_the_models_that_land(
        tmp_path, embedded_sample_store):
    """``incremental``: no group is evaluated; the first refresh builds in full (nothing to
    extend), the one after the held-back models land extends it by exactly them, without a refit,
    and the router serves them."""
    from benchroute.artifacts.router import load_router

    landing, held, results = make_landing(tmp_path)
    store = str(tmp_path / "store")
    seed_vectors(embedded_sample_store, store, 0)
    first = refresh_flow(landing=str(landing), store=store, incremental=True)
    assert first["published"] and first["bundle"]["extended"] is None
    assert first["evaluation"] == {"ran": [], "cached": [], "skipped": []}
    land_held_back(landing, results)
    second = refresh_flow(landing=str(landing), store=store, incremental=True)
    assert second["units"]["new"] == 1 and second["evaluation"]["ran"] == []
    assert second["published"] and second["bundle"]["extended"] == first["bundle"]["version"]
    manifest = open_bundle(store, "default").manifest
    assert manifest["version"] == second["bundle"]["version"] and manifest["evaluation"] == {}
    extension = manifest["parameters"]["extension"]
    added = _canonical(store, held)
    assert extension["base_version"] == first["bundle"]["version"]
    assert len(added) == 2 and set(extension["added_models"]) == added
    assert second["bundle"]["models"] == first["bundle"]["models"] + 2
    assert added <= set(load_router(store, "default").model_names)


def test_an_incremental_publish_has_its_own_cache_key(lifecycle):
    """An extension is not the full build of the same data: neither may be served from the
    other's cached result (and a full build's key is what it was before extensions)."""
    from benchroute.artifacts import embeddings as emb
    from benchroute.artifacts.specs import RouterSpec, Selection
    from benchroute.flows.pipeline import _publish_key

    p = {"store": lifecycle.store, "name": "default", "embedder_id": emb.embedders(Store(lifecycle.store))[0],
         "evaluation": {}, "selection": Selection(), "router": RouterSpec()}
    full = _publish_key(None, p)
    assert _publish_key(None, {**p, "incremental": False}) == full
    assert _publish_key(None, {**p, "incremental": True}) != full


def test_evaluation_and_bundle_are_prefect_artifacts(lifecycle):
    from uuid import UUID

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    run = UUID(lifecycle.third["flow_run_id"])
    with get_client(sync_client=True) as client:
        found = client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[run])))
    by_key = {a.key: a for a in found}
    assert by_key["refresh-evaluation"].type == "table"
    table = str(by_key["refresh-evaluation"].data)
    assert "mmlu_pro" in table and "ran" in table and "routellm" in table and "cached" in table
    md = by_key["refresh-bundle"]
    assert md.type == "markdown" and lifecycle.third["bundle"]["version"] in md.data
    assert "benchroute route" in md.data


def test_bundle_routes_a_query(lifecycle):
    from benchroute.artifacts.router import load_router

    router = load_router(lifecycle.store, "default")
    choice = router.route("What is the derivative of x squared?")
    assert choice  # a routing decision with a model


def test_killed_refresh_resumes_from_cached_results(tmp_path, embedded_sample_store):
    """SIGKILL while the second evaluation group runs; the next run finds the first group's
    result in the Prefect cache, ingests and embeds nothing, and publishes."""
    landing, _, _ = make_landing(tmp_path)
    store = str(tmp_path / "store")
    seed_vectors(embedded_sample_store, store, 8)
    child = tmp_path / "child.py"
    child.write_text(textwrap.dedent(f"""
        import os, signal, sys
        from benchroute.artifacts.stages import evaluate as stage
        from benchroute.flows.refresh import refresh_flow
        calls = []
        real = stage.evaluate_group
        def evaluate_group(*args, **kwargs):
            calls.append(args[2])
            if len(calls) == 2:  # the second group: die mid-way, no cleanup
                os.kill(os.getpid(), signal.SIGKILL)
            return real(*args, **kwargs)
        stage.evaluate_group = evaluate_group
        refresh_flow(landing={str(landing)!r}, store={store!r})
    """))
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect-child")}
    env.pop("PREFECT_API_URL", None)
    log = tmp_path / "child.log"
    with log.open("wb") as out:  # a file, not a pipe: the orphaned server would hold a pipe open
        proc = subprocess.Popen([sys.executable, str(child)], env=env, start_new_session=True,
                                stdout=out, stderr=subprocess.STDOUT)
        try:
            proc.wait(timeout=300)
        finally:
            try:  # the child's own ephemeral Prefect server is left behind by the kill
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    assert proc.returncode == -signal.SIGKILL, log.read_text(errors="replace")[-3000:]
    st = Store(store)
    assert st.units() and BundleStore(store).versions("default") == []  # ingested, not published

    s = refresh_flow(landing=str(landing), store=store)
    assert s["units"]["new"] == 0 and s["embed"]["new"] == 0
    assert s["evaluation"]["cached"] == ["mmlu_pro"] and s["evaluation"]["ran"] == ["routellm"]
    assert s["published"] and BundleStore(store).versions("default") == [s["bundle"]["version"]]


def test_parameters_are_validated_before_the_run(tmp_path):
    for bad in ({"router": {"k": 0}}, {"embed": {"precision": "fp16"}}, {"name": "no spaces"},
                {"partitions": 0}, {"kinds": ["csv"]}, {"router": {"weights": "cosine"}},
                {"router": {"k": 10, "unknown": 1}}):
        with pytest.raises(ParameterTypeError):
            refresh_flow(landing=str(tmp_path), store=str(tmp_path / "s"), **bad)
    assert not (tmp_path / "s").exists()


def test_missing_landing_fails_clearly_and_empty_landing_is_not_an_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="source not found"):
        refresh_flow(landing=str(tmp_path / "nowhere"), store=str(tmp_path / "s"))
    (tmp_path / "empty").mkdir()
    s = refresh_flow(landing=str(tmp_path / "empty"), store=str(tmp_path / "s"))
    assert s["units"]["found"] == 0 and not s["published"] and s["bundle"] is None


def test_refresh_on_s3(s3_server, embedded_sample_store, tmp_path):
    """Landing zone and store on a real S3 API (moto on loopback); results cached in the store."""
    import fsspec
    from conftest import SAMPLE

    fs = fsspec.filesystem("s3")
    landing = f"{s3_server}/landing-{tmp_path.name}"
    store = f"{s3_server}/store-{tmp_path.name}"
    fs.put(str(SAMPLE / "mmlu_pro"), f"{landing}/mmlu_pro", recursive=True)
    seed_vectors(embedded_sample_store, store, 0)
    first = refresh_flow(landing=landing, store=store)
    second = refresh_flow(landing=landing, store=store)
    assert first["published"] and first["bundle"]["url"].startswith("s3://")
    assert not second["published"] and second["noop"]
    assert refresh_flow(landing=landing, store=store, full=True)["evaluation"]["cached"] == ["mmlu_pro"]
    assert fs.ls(f"{store}/_cache/prefect")
    assert open_bundle(store, "default").manifest["version"] == first["bundle"]["version"]
