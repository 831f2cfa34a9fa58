"""Which datasets and models are evaluated together (``transforms.lodo_groups``): a source's
datasets with the models labelled on all of them, or, where that leaves too few models (a
leaderboard whose models each ran some of its benchmarks), the complete block peeling finds."""

from __future__ import annotations

import importlib.util
import sys

import numpy as np
import polars as pl
import pytest
from conftest import REPO

from benchroute.transforms.lodo_groups import complete_block, group_shapes, lodo_groups


def test_peeling_drops_the_datasets_that_keep_models_out():
    # m0-m2 ran d0-d2; m3 also d3, m4 also d4: nobody ran all five. The best block is d0-d2 x
    # all five models (15 labels); d0-d3 x m3 has 4.
    cover = np.zeros((5, 5), bool)
    cover[:, :3] = True
    cover[3, 3] = cover[4, 4] = True
    keep_d, keep_m = complete_block(cover, min_datasets=3, min_models=2)
    assert keep_d.tolist() == [True, True, True, False, False] and keep_m.all()
    # the minimums bound it: four datasets are only complete for one model
    keep_d, keep_m = complete_block(cover, min_datasets=4, min_models=2)
    assert not keep_d.any() and not keep_m.any()


def test_peeling_prefers_the_dataset_that_completes_models_to_the_one_most_models_miss():
    # m0, m1 miss only d4; m2-m5 miss d1-d3. Dropping what most models miss (d1, d2, ...) never
    # completes anyone; dropping d4 completes m0 and m1 on d0-d3.
    cover = np.ones((6, 5), bool)
    cover[:2, 4] = False
    cover[2:, 1:4] = False
    keep_d, keep_m = complete_block(cover, min_datasets=3, min_models=2)
    assert keep_d.tolist() == [True, True, True, True, False]
    assert keep_m.tolist() == [True, True, False, False, False, False]


@pytest.mark.parametrize("seed", range(6))
def test_the_block_is_complete_and_one_coverage_gives_one_block(seed):
    rng = np.random.default_rng(seed)
    run = rng.random((40, 6)) < 0.6  # models x benchmarks, each benchmark three datasets
    cover = np.repeat(run, 3, axis=1) & (rng.random((40, 18)) < 0.97)
    keep_d, keep_m = complete_block(cover, min_datasets=3, min_models=2)
    assert keep_d.sum() >= 3 and keep_m.sum() >= 2
    assert cover[np.ix_(keep_m, keep_d)].all()  # every kept model on every kept dataset
    assert not (cover[:, keep_d].all(axis=1) & ~keep_m).any()  # and every model that is
    again = complete_block(cover.copy(), min_datasets=3, min_models=2)
    assert np.array_equal(again[0], keep_d) and np.array_equal(again[1], keep_m)


def _coverage(pairs):
    return pl.DataFrame(pairs, schema=["dataset", "model"], orient="row")


def test_only_a_source_with_too_few_complete_models_takes_a_block():
    # a: x and y ran all four datasets (z one): as before, z dropped. b: x and z never ran b/0,
    # y never b/1: no model ran all five, so the block is b/2-b/4 x all three (9 labels; b/1-b/4
    # x {x, z} has 8).
    cov = _coverage([(f"a/{d}", m) for d in range(4) for m in ("x", "y")] + [("a/0", "z")]
                    + [(f"b/{d}", m) for d in range(5) for m in ("x", "y", "z")
                       if (d, m) not in {(0, "x"), (0, "z"), (1, "y")}])
    mem = pl.DataFrame({"dataset": [f"a/{d}" for d in range(4)] + [f"b/{d}" for d in range(5)],
                        "source": ["a"] * 4 + ["b"] * 5})
    groups = {g.name: g for g in group_shapes(cov, mem)}
    a, b = groups["a"], groups["b"]
    assert (a.datasets, a.models, a.dropped_models, a.dropped_datasets, a.skipped) == (
        [f"a/{d}" for d in range(4)], ["x", "y"], ["z"], [], None)
    assert (b.datasets, b.models, b.dropped_models, b.dropped_datasets, b.skipped) == (
        ["b/2", "b/3", "b/4"], ["x", "y", "z"], [], ["b/0", "b/1"], None)
    # too few datasets left for any block of two models: skipped, with the all-datasets reason
    small = {g.name: g for g in group_shapes(cov, mem, min_datasets=4, min_models=3)}["b"]
    assert small.skipped.startswith("0 model(s)") and small.dropped_datasets == [] and len(small.datasets) == 5
    labels = cov.with_columns(pl.lit(1.0).alias("y"))
    assert [(g.name, g.datasets, g.models, g.dropped_datasets) for g in lodo_groups(labels, mem)] == [
        (g.name, g.datasets, g.models, g.dropped_datasets) for g in group_shapes(cov, mem)]


def _synth():
    spec = importlib.util.spec_from_file_location("synth", REPO / "benchmarks" / "synth.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["synth"] = mod
    spec.loader.exec_module(mod)
    return mod


def test_a_synthetic_leaderboard_without_a_complete_model_is_evaluated_on_its_block(tmp_path):
    """Each model ran each of four benchmarks with probability 1/2: fewer than two ran all, so
    the all-datasets rule skipped the group; the block is evaluated (LODO through the real
    ingest, vectors and evaluation)."""
    from benchroute.artifacts.router_build import SelectedLabels
    from benchroute.artifacts.specs import RouterSpec, Selection
    from benchroute.artifacts.stages.evaluate import evaluate_all, store_groups
    from benchroute.artifacts.store import Store
    from benchroute.flows.ingest import ingest_flow

    synth = _synth()
    spec = synth.SynthSpec(inputs=480, models=14, seed=3, topics=8, benchmarks=4, queries=20,
                           run_share=0.5, missing=0.02, rows_per_part=2000)
    synth.generate(spec, tmp_path / "gen")
    store = str(tmp_path / "store")
    ingest_flow(sources=[str(tmp_path / "gen" / synth.SOURCE_DIR)], store=store, progress=False)
    identity = synth.write_embeddings(store, tmp_path / "gen")
    labels = SelectedLabels(Store(store), Selection())
    cov = labels.coverage
    n_ds = cov["dataset"].n_unique()
    complete = cov.group_by("model").agg(pl.col("dataset").n_unique().alias("n")).filter(pl.col("n") == n_ds)
    assert complete.height < 2  # the all-datasets rule would skip this source
    (g,) = store_groups(labels)
    assert g.skipped is None and g.dropped_datasets and len(g.models) >= 2 and len(g.datasets) >= 3
    kept = cov.filter(pl.col("dataset").is_in(g.datasets) & pl.col("model").is_in(g.models))
    assert kept.height == len(g.datasets) * len(g.models)
    ev = evaluate_all(Store(store), identity.id, Selection(), RouterSpec())[g.name]
    assert "skipped" not in ev and ev["n_tasks"] == len(g.datasets) and ev["n_models"] == len(g.models)
    assert ev["datasets_dropped"] == len(g.dropped_datasets)  # the bundle's manifest says so
