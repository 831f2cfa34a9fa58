"""The backfill flow: dry run, a selection of datasets and models published as its own bundle,
a rebuild into a fresh store, and the bundle builder kept equal to ``flows.publish``."""

from __future__ import annotations

import shutil

import polars as pl
import pytest
from benchroute.artifacts.bundle import BundleStore, open_bundle
from benchroute.artifacts.router_build import bundle_content
from benchroute.artifacts.specs import RouterSpec, Selection
from benchroute.artifacts.stages.evaluate import evaluate_group, refit_plan
from benchroute.artifacts.store import Store
from benchroute.flows.backfill import backfill_flow
from conftest import SAMPLE
from prefect.exceptions import ParameterTypeError
from refresh_support import seed_vectors


@pytest.fixture
def store_copy(embedded_sample_store, tmp_path):
    """A writable copy of the session's embedded sample store."""
    dst = tmp_path / "store"
    shutil.copytree(embedded_sample_store, dst)
    return str(dst)


def test_dry_run_reports_and_writes_nothing(store_copy):
    st = Store(store_copy)
    commits = len(st.commits())
    r = backfill_flow(
        store=store_copy, paths=[str(SAMPLE / "mmlu_pro")],
        selection=Selection(datasets=["mmlu_pro/*"], models=["openai/*", "nobody/*"]), dry_run=True,
    )
    plan = r["plan"]
    assert r["dry_run"] and plan["ingest"]["new"] == [] and plan["ingest"]["already_in_store"] == 1
    assert plan["embed"]["inputs_without_vector_now"] == 0
    assert plan["bundle"]["datasets"] and all(d.startswith("mmlu_pro/") for d in plan["bundle"]["datasets"])
    assert plan["bundle"]["models"] and all(m.startswith("openai/") for m in plan["bundle"]["models"])
    assert plan["unmatched"] == {"models": ["nobody/*"]}
    assert len(Store(store_copy).commits()) == commits
    assert BundleStore(store_copy).versions("default") == []


def test_selection_is_published_as_its_own_bundle(store_copy):
    labels = Store(store_copy).read("labels")
    mmlu_pro_models = sorted(labels.filter(pl.col("dataset").str.starts_with("mmlu_pro/"))["model"].unique())
    chosen = mmlu_pro_models[:6]
    r = backfill_flow(store=store_copy, name="mmlu-pro-six",
                      selection=Selection(datasets=["mmlu_pro/*"], models=chosen))
    assert r["published"] and r["evaluation"]["ran"] == ["mmlu_pro"]
    manifest = open_bundle(store_copy, "mmlu-pro-six").manifest
    assert sorted(m["model"] for m in manifest["models"]) == chosen
    assert set(manifest["evaluation"]) == {"mmlu_pro"}
    assert BundleStore(store_copy).versions("default") == []  # other bundles untouched
    again = backfill_flow(store=store_copy, name="mmlu-pro-six",
                      selection=Selection(datasets=["mmlu_pro/*"], models=chosen))
    assert not again["published"] and again["bundle"]["version"] == r["bundle"]["version"]


def test_backfill_rebuilds_a_fresh_store_from_dumps(embedded_sample_store, tmp_path):
    store = str(tmp_path / "fresh")
    seed_vectors(embedded_sample_store, store, 0)
    r = backfill_flow(store=store, paths=[str(SAMPLE)], selection=Selection(sources=["mmlu_pro", "routellm"]))
    assert r["ingest"]["units_found"] >= 2 and set(r["ingest"]["added"]) - {"_total"} == {"mmlu_pro", "routellm"}
    assert r["embed"]["new"] == 0 and r["published"]
    assert set(open_bundle(store, "default").manifest["evaluation"]) == {"mmlu_pro", "routellm"}


def test_bad_selection_fails_clearly(store_copy):
    with pytest.raises(ValueError, match="holds no labels"):
        backfill_flow(store=store_copy, selection=Selection(datasets=["no_such_dataset/*"]))
    with pytest.raises(ParameterTypeError):
        backfill_flow(store=store_copy, selection={"sources": ["not-a-source"]})


def test_bundle_builder_equals_publish_build_content(embedded_sample_store):
    """The refresh's bundle (evaluation per group, as its cached tasks compute it) is byte for
    byte what ``stages.fit.build_content`` (the ``publish`` flow) builds in one piece."""
    from benchroute.artifacts import embeddings as emb
    from benchroute.artifacts.stages.fit import build_content

    eid = emb.embedders(Store(embedded_sample_store))[0]
    plan = refit_plan(embedded_sample_store, eid, Selection(), RouterSpec())
    evaluation = {
        g.name: {"skipped": g.skipped} if g.skipped else
        evaluate_group(embedded_sample_store, eid, g.name, g.fingerprint, Selection(), RouterSpec())
        for g in plan.groups
    }
    ours = bundle_content(embedded_sample_store, "default", eid, Selection(), evaluation)
    theirs = build_content(embedded_sample_store, "default")
    assert ours.files.keys() == theirs.files.keys()
    assert all(ours.files[f] == theirs.files[f] for f in ours.files)
    assert ours.meta == theirs.meta
    assert ours.content_hash() == theirs.content_hash()


def test_backfill_of_a_selection_embeds_only_its_inputs(embedded_sample_store, tmp_path):
    """Inputs without a vector outside the selection are left for a later run."""
    from benchroute.artifacts import embeddings as emb
    from benchroute.flows.ingest import ingest_flow

    store = str(tmp_path / "partial")
    _, left_out = seed_vectors(embedded_sample_store, store, 40)
    ingest_flow(sources=[str(SAMPLE / "mmlu_pro"), str(SAMPLE / "routellm")], store=store,
                progress=False)
    r = backfill_flow(store=store, selection=Selection(sources=["routellm"]), name="routellm-only")
    members = Store(store).read("memberships")
    routellm_ids = set(members.filter(pl.col("source") == "routellm")["input_id"])
    wanted = [i for i in left_out if i in routellm_ids]
    assert 0 < len(wanted) < len(left_out)  # the 40 left out span both sources
    assert r["embed"]["new"] == len(wanted) and r["published"]
    st = Store(store)
    present = set(emb.present_ids(st, emb.embedders(st)[0]))
    assert set(wanted) <= present and not (set(left_out) - set(wanted)) & present


def test_labels_past_the_memory_limit_are_read_from_the_store_with_the_same_results(
        embedded_sample_store, monkeypatch):
    """``SelectedLabels`` holds the selection's labels while they are few, else re-reads the
    store a part at a time for each pass (a leaderboard): the same frames, coverage and inputs,
    so the same plan (fingerprints included) and the same evaluation of a group."""
    from benchroute.artifacts import embeddings as emb
    from benchroute.artifacts import router_build
    from benchroute.artifacts.router_build import SelectedLabels

    store = Store(embedded_sample_store)
    eid = emb.embedders(store)[0]
    held = SelectedLabels(store, Selection())
    streamed = SelectedLabels(store, Selection(), max_labels=held.rows - 1)
    assert held.held is not None and streamed.held is None
    one = pl.col("model") == held.coverage["model"].sort()[0]
    for where, cols in ((None, None), (one, None), (pl.col("y") == 1, ["input_id"])):
        a, b = list(held.batches(where, cols)()), list(streamed.batches(where, cols)())
        assert len(a) == len(b) == len(held.parts)
        for x, y in zip(a, b, strict=True):
            assert x.equals(y)
    assert held.coverage.sort("dataset", "model").equals(streamed.coverage.sort("dataset", "model"))
    assert held.input_ids.sort().equals(streamed.input_ids.sort())
    assert held.rows == streamed.rows == store.read("labels").height
    with pytest.raises(router_build.TooManyLabels, match=f"more than {held.rows - 1:,}"):
        streamed.frame()
    # a selection under the limit of a store over it: read once more and held
    name = held.coverage["model"].sort()[0]
    few = SelectedLabels(store, Selection(models=(name,)), max_labels=held.rows - 1)
    assert few.held is not None and 0 < few.rows < held.rows
    assert few.frame().equals(SelectedLabels(store, Selection(models=(name,))).frame())

    plan = refit_plan(embedded_sample_store, eid, Selection(), RouterSpec())
    group = min((g for g in plan.groups if not g.skipped), key=lambda g: g.inputs * g.models)
    entry = evaluate_group(embedded_sample_store, eid, group.name, group.fingerprint, Selection(),
                           RouterSpec())
    monkeypatch.setattr(router_build, "FRAME_MAX_LABELS", 0)  # every pass reads the store
    assert SelectedLabels(store, Selection()).held is None
    assert refit_plan(embedded_sample_store, eid, Selection(), RouterSpec()) == plan
    assert evaluate_group(embedded_sample_store, eid, group.name, group.fingerprint, Selection(),
                          RouterSpec()) == entry


def test_a_group_evaluated_against_another_plan_is_refused(embedded_sample_store):
    """``evaluate_group`` recomputes the group's fingerprint and refuses when it is not the
    plan's (the store, the parameters or the code changed since): a cached result under the
    plan's key would be wrong."""
    from benchroute.artifacts import embeddings as emb
    from benchroute.artifacts.stages import PipelineError

    eid = emb.embedders(Store(embedded_sample_store))[0]
    plan = refit_plan(embedded_sample_store, eid, Selection(), RouterSpec())
    g = next(g for g in plan.groups if not g.skipped)
    with pytest.raises(PipelineError, match=f"group {g.name!r} changed while this run was planning"):
        evaluate_group(embedded_sample_store, eid, g.name, g.fingerprint, Selection(), RouterSpec(k=5))
    with pytest.raises(PipelineError):
        evaluate_group(embedded_sample_store, eid, g.name, "0" * 64, Selection(), RouterSpec())
