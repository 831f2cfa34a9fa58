"""Scale-out: the refresh flow's embedding and evaluation partitions on a Dask LocalCluster (two
single-threaded workers, loopback only) give the sequential run's vectors bit for bit and the
same router: every index file identical, and the kernel's descriptors, bandwidth and the
evaluation equal to float precision (OpenBLAS's float32 products differ in their last bits
between one and two threads, and a single-threaded worker is where the speed-up comes from)."""

from __future__ import annotations

import numpy as np
import pytest
from benchroute.artifacts import embeddings as emb
from benchroute.artifacts.bundle import open_bundle
from benchroute.artifacts.specs import EmbedSpec
from benchroute.artifacts.stages import embed as embed_stage
from benchroute.artifacts.store import Store
from benchroute.flows.refresh import refresh_flow
from benchroute.flows.scale import scale_parameters, task_runner, with_task_runner
from refresh_support import land_held_back, make_landing, seed_vectors

LEFT_OUT = 48  # embedded by each run, in two partitions


@pytest.fixture(scope="module")
def small_partitions():
    old = embed_stage.MIN_PARTITION
    embed_stage.MIN_PARTITION = 16  # two partitions out of a few dozen inputs
    yield
    embed_stage.MIN_PARTITION = old


@pytest.fixture(scope="module")
def sequential(tmp_path_factory, embedded_sample_store, small_partitions):
    root = tmp_path_factory.mktemp("dask")
    landing, _, results = make_landing(root)
    land_held_back(landing, results)
    store = str(root / "sequential")
    seed_vectors(embedded_sample_store, store, LEFT_OUT)
    summary = refresh_flow(landing=str(landing), store=store, embed=EmbedSpec(precision="fp32"), partitions=2)
    return root, landing, store, summary


def _vectors(url: str):
    st = Store(url)
    table = emb.read_table(st, emb.embedders(st)[0]).sort("input_id")
    return table["input_id"].to_list(), table["vector"].to_numpy()


@pytest.mark.parametrize("processes", [pytest.param(True, marks=pytest.mark.heavy), False],
                         ids=["processes", "threads"])
def test_dask_run_equals_the_sequential_run(processes, sequential, embedded_sample_store):
    root, landing, seq_store, seq = sequential
    assert seq["embed"]["partitions"] == 2 and seq["embed"]["new"] == LEFT_OUT
    store = str(root / f"dask-{'processes' if processes else 'threads'}")
    seed_vectors(embedded_sample_store, store, LEFT_OUT)
    flow = with_task_runner(refresh_flow, 2, processes=processes)
    s = flow(landing=str(landing), store=store, embed=EmbedSpec(precision="fp32"), partitions=2,
             **scale_parameters(2))
    assert s["embed"]["new"] == LEFT_OUT and s["embed"]["partitions"] == 2
    assert s["embed"]["threads"] == [1]  # each worker embeds on its own core
    assert s["evaluation"] == seq["evaluation"]
    ids_a, va = _vectors(seq_store)
    ids_b, vb = _vectors(store)
    assert ids_a == ids_b and np.array_equal(va, vb)  # bit for bit
    a, b = open_bundle(seq["bundle"]["url"]), open_bundle(s["bundle"]["url"])
    assert a.files.keys() == b.files.keys()
    for f in a.files:
        if f == "kernel/u.npy":
            np.testing.assert_allclose(a.npy(f), b.npy(f), rtol=1e-6)
        else:
            assert a.files[f] == b.files[f], f
    pa_, pb = a.manifest["parameters"], b.manifest["parameters"]
    assert pa_.keys() == pb.keys()
    for key in pa_:
        if isinstance(pa_[key], float):
            assert pb[key] == pytest.approx(pa_[key], rel=1e-5), key
        else:
            assert pa_[key] == pb[key], key
    _close(a.manifest["evaluation"], b.manifest["evaluation"])


def _close(x, y):
    if isinstance(x, dict):
        assert x.keys() == y.keys()
        for k in x:
            _close(x[k], y[k])
    elif isinstance(x, list):
        assert len(x) == len(y)
        for p, q in zip(x, y):
            _close(p, q)
    elif isinstance(x, float):
        assert y == pytest.approx(x, rel=1e-6, abs=1e-9)
    else:
        assert x == y


def test_task_runners_stay_on_loopback():
    runner = task_runner(2)
    assert runner.cluster_kwargs["host"] == "127.0.0.1"
    assert runner.cluster_kwargs["dashboard_address"] is None
    assert task_runner(2, processes=False).cluster_kwargs.get("host") is None  # in-process transport
    assert task_runner(address="tcp://10.0.0.5:8786").address == "tcp://10.0.0.5:8786"
    assert type(task_runner(0)).__name__ == "ThreadPoolTaskRunner"
    assert scale_parameters(0) == {"embed_concurrency": 1, "embed_threads": None}
    assert scale_parameters(2)["embed_concurrency"] == 2
