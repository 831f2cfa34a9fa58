"""The synthetic leaderboard generator (benchmarks/synth.py): its source goes through the real
ingest flow into a store with exactly the generated labels; its vectors make `embed` a no-op;
its draws do not depend on how the output is cut into parts."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from conftest import REPO

_spec = importlib.util.spec_from_file_location("synth", REPO / "benchmarks" / "synth.py")
synth = importlib.util.module_from_spec(_spec)
sys.modules["synth"] = synth
_spec.loader.exec_module(synth)

SPEC = synth.SynthSpec(inputs=300, models=12, seed=7, topics=6, benchmarks=3, queries=20,
                       run_share=0.7, missing=0.05, rows_per_part=1000)


@pytest.fixture(scope="module")
def generated(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth")
    meta = synth.generate(SPEC, out)
    return out, meta


@pytest.fixture(scope="module")
def ingested(generated, tmp_path_factory):
    from benchroute.flows.ingest import ingest_flow

    out, _ = generated
    store = str(tmp_path_factory.mktemp("store") / "s")
    summary = ingest_flow(sources=[str(out / synth.SOURCE_DIR)], store=store, progress=False)
    return store, summary


def expected_labels(out: Path) -> pl.DataFrame:
    """(input_id, dataset, model, y) from the latent world, not from the written files."""
    world = synth.load_world(out)
    inputs = pl.read_parquet(out / synth.SIDE_DIR / "inputs.parquet")
    ids = np.array(inputs["input_id"].to_list())
    ds = np.array(inputs["dataset"].to_list())
    frames = []
    for j, name in enumerate(synth.model_names(world.spec)):
        rows, y = synth.model_outcomes(world, j)
        frames.append(pl.DataFrame({"input_id": ids[rows], "dataset": ds[rows],
                                    "model": [name] * rows.size, "y": y}))
    return pl.concat(frames).sort("input_id", "dataset", "model")


def test_source_is_a_long_table_in_parts(generated):
    out, meta = generated
    parts = sorted((out / synth.SOURCE_DIR).glob("part-*.parquet"))
    assert len(parts) == meta["parts"] == 4  # 1000 rows a part at 300 inputs: 3 models a part
    df = pl.read_parquet(parts)
    assert df.columns == ["input", "dataset", "model", "metric", "value"]
    assert df.height == meta["outcome_rows"]
    # both kinds of missing labels: whole benchmarks not run, and cells at random
    assert 0.5 < meta["label_share"] < 0.7 * 0.95 + 0.1
    assert set(df["metric"]) == {"exact_match"} and set(df["value"]) == {0, 1}
    assert df["dataset"].n_unique() == 6 and df["model"].n_unique() == 12


def test_real_ingest_gives_exactly_the_generated_labels(generated, ingested):
    from benchroute.artifacts.store import Store

    out, meta = generated
    store, summary = ingested
    assert summary["units_failed"] == {} and summary["units_found"] == meta["parts"]
    st = Store(store)
    assert st.read("quarantine").height == 0
    labels = st.read("labels").select("input_id", "dataset", "model", "y")
    want = expected_labels(out)
    assert labels.height == meta["outcome_rows"] == want.height == summary["labels"]
    got = labels.with_columns(pl.col("y").cast(pl.Int8)).sort("input_id", "dataset", "model")
    assert got.equals(want.with_columns(pl.col("y").cast(pl.Int8)))
    inputs = pl.read_parquet(out / synth.SIDE_DIR / "inputs.parquet")
    assert sorted(st.read("inputs")["input_id"].unique()) == sorted(inputs["input_id"])
    # a model not run on a benchmark has no label on any of its inputs
    world = synth.load_world(out)
    bench = dict(zip(inputs["input_id"], inputs["benchmark"]))
    for j, name in enumerate(synth.model_names(SPEC)):
        seen = {bench[i] for i in labels.filter(pl.col("model") == name)["input_id"]}
        assert seen == set(np.flatnonzero(world.run[j]))


def test_vectors_written_into_the_store_make_embed_a_no_op(generated, ingested):
    from benchroute.artifacts import embeddings as emb_store
    from benchroute.artifacts.store import Store
    from benchroute.artifacts.stages.embed import plan_embedding

    out, _ = generated
    store, _ = ingested
    identity = synth.write_embeddings(store, out)
    plan = plan_embedding(store)
    assert plan.identity == identity and plan.todo == 0 and plan.already_present == SPEC.inputs
    ids = pl.read_parquet(out / synth.SIDE_DIR / "inputs.parquet")["input_id"].to_list()
    X, _ = emb_store.read_matrix(Store(store), identity, ids)
    assert np.array_equal(X, np.load(out / synth.SIDE_DIR / "embeddings.npy"))
    synth.write_embeddings(store, out)  # nothing new: no second copy
    assert emb_store.read_table(Store(store), identity).height == SPEC.inputs
    assert emb_store.part_bytes(Store(store), identity)[1] == SPEC.inputs
    other = synth.write_embeddings(store, out, identity="synthetic")
    assert other.id.startswith("synth-384d-") and other != identity


def test_geometry_and_item_response(generated):
    out, _ = generated
    side = out / synth.SIDE_DIR
    X = np.load(side / "embeddings.npy")
    inputs = pl.read_parquet(side / "inputs.parquet")
    assert X.shape == (300, 384) and X.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(X, axis=1), 1, atol=1e-5)
    t, b = inputs["topic"].to_numpy(), inputs["benchmark"].to_numpy()
    S = X @ X.T
    off = ~np.eye(len(X), dtype=bool)
    same_t = (t[:, None] == t[None]) & off
    same_b = (b[:, None] == b[None]) & ~same_t & off
    other = b[:, None] != b[None]
    assert S[same_t].mean() > S[same_b].mean() + 0.1 > S[other].mean() + 0.2
    Q = np.load(side / "queries.npy")
    qt = pl.read_parquet(side / "queries.parquet")["topic"].to_numpy()
    assert Q.shape == (20, 384)
    nearest = t[np.argmax(Q @ X.T, axis=1)]
    assert (nearest == qt).mean() > 0.9  # queries come from the same topic clusters
    # the sampled labels follow the 2PL probabilities
    world = synth.load_world(out)
    P = synth.correct_probability(world)
    ys, ps = [], []
    for j in range(SPEC.models):
        rows, y = synth.model_outcomes(world, j)
        ys.append(y)
        ps.append(P[rows, j])
    y, p = np.concatenate(ys), np.concatenate(ps)
    assert abs(y.mean() - p.mean()) < 0.03
    assert y[p > 0.7].mean() > 0.7 and y[p < 0.3].mean() < 0.3


def test_parts_do_not_change_the_draws_and_seeds_do(generated, tmp_path):
    out, meta = generated
    other = synth.generate(synth.SynthSpec(**{**meta["spec"], "rows_per_part": 10_000}),
                           tmp_path / "one")
    assert other["parts"] == 1 and other["outcome_rows"] == meta["outcome_rows"]
    a = pl.read_parquet(sorted((out / synth.SOURCE_DIR).glob("*.parquet")))
    b = pl.read_parquet(tmp_path / "one" / synth.SOURCE_DIR / "part-00000.parquet")
    assert a.equals(b)
    assert np.array_equal(np.load(out / "synth" / "embeddings.npy"),
                          np.load(tmp_path / "one" / "synth" / "embeddings.npy"))
    synth.generate(synth.SynthSpec(**{**meta["spec"], "seed": 8}), tmp_path / "s8")
    c = pl.read_parquet(tmp_path / "s8" / synth.SOURCE_DIR / "*.parquet")
    assert not c["input"].is_in(a["input"].implode()).any()  # other texts, other input ids
    assert not np.array_equal(c["value"].to_numpy()[:500], a["value"].to_numpy()[:500])


def test_models_that_land_later_are_new_models_on_the_same_inputs(generated, tmp_path):
    """``models_from``: only the later models' outcomes, on the same input texts."""
    out, meta = generated
    spec = synth.SynthSpec(**{**meta["spec"], "models": SPEC.models + 1})
    later = synth.generate(spec, tmp_path / "later", models_from=SPEC.models)
    new = pl.read_parquet(tmp_path / "later" / synth.SOURCE_DIR / "*.parquet")
    old = pl.read_parquet(out / synth.SOURCE_DIR / "*.parquet")
    assert later["outcome_rows"] == new.height > 0
    assert new["model"].unique().to_list() == [synth.model_names(spec)[SPEC.models]]
    assert not new["model"].is_in(old["model"].implode()).any()
    assert new["input"].is_in(old["input"].implode()).all()


def test_cli(tmp_path, capsys):
    assert synth.main(["--inputs", "50", "--models", "3", "--out", str(tmp_path), "--dim", "16",
                       "--topics", "4", "--queries", "0"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["parts"] == 1 and printed["outcome_rows"] > 0
    assert np.load(tmp_path / "synth" / "embeddings.npy").shape == (50, 16)
    with pytest.raises(ValueError, match="16-d"):
        synth.write_embeddings(str(tmp_path / "store"), tmp_path)  # default embedder is 384-d


def test_a_selection_too_big_to_hold_in_memory_is_refused_at_the_boundary(ingested, monkeypatch):
    """``select_frames`` (the labels pair routers and stability hold) holds at most
    ``FRAME_MAX_LABELS`` labels and names the way out past it; a selection under the limit is
    read whole."""
    from benchroute.artifacts import router_build
    from benchroute.artifacts.specs import Selection
    from benchroute.artifacts.store import Store

    store = Store(ingested[0])
    n = store.read("labels").height
    assert len(store.parts("labels")) >= 1 and n > 0
    monkeypatch.setattr(router_build, "FRAME_MAX_LABELS", n)
    assert router_build.select_frames(store, Selection())[0].height == n
    monkeypatch.setattr(router_build, "FRAME_MAX_LABELS", n - 1)
    with pytest.raises(router_build.TooManyLabels, match=f"more than {n - 1:,}, too many.*pair routers"):
        router_build.select_frames(store, Selection())
    one = sorted(store.read("labels")["dataset"].unique())[0]
    small = router_build.select_frames(store, Selection(datasets=(one,)))[0]
    assert 0 < small.height < n and set(small["dataset"]) == {one}
