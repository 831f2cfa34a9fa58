"""Synthetic leaderboards at any scale (issue 16), written as a real source for the real ingest.

    .venv/bin/python benchmarks/synth.py --inputs 10000 --models 100 --out DIR --seed 0
    .venv/bin/benchroute ingest DIR/long_table --store S --no-progress
    .venv/bin/python benchmarks/synth.py --out DIR --store S --embeddings-only   # skip `embed`

The model
---------
- Topics and benchmarks: ``topics`` topic clusters grouped into ``benchmarks`` benchmarks (topic
  t belongs to benchmark t mod B). Each topic is one dataset, ``synth/b03-t017``.
- Inputs: text-like embeddings (d = 384 by default, unit norm): a direction shared by all texts
  (real sentence embeddings have a non-zero mean), plus the benchmark's centre, plus the topic's
  offset, plus per-input noise of random spread; cosines: ~0.15 between unrelated texts, ~0.35
  within a benchmark, ~0.6 within a topic. Each input has a difficulty b_i (topic mean + N(0, 1)),
  which also moves it along a direction of its topic (nearby inputs are of similar difficulty,
  as kNN routing assumes), and a discrimination a_i (log-normal around 1).
- Models: latent ability per topic θ_m,t = general ability + benchmark skill + topic skill.
- Outcomes: 2-parameter item response, P(correct) = sigmoid(a_i (θ_m,t − b_i)); the sampled 0/1
  is the value of metric ``exact_match`` (binarized by the shipped rule: y = value).
- Missing labels: a model is run on a benchmark with probability ``run_share`` (else it has no
  outcome on any of that benchmark's inputs; every model runs on at least one benchmark), and
  each remaining outcome is dropped at random with probability ``missing``.

Every random draw comes from a stream keyed by (seed, what, index): a model's outcomes do not
depend on how many models or parts there are, so chunked writing is exact and memory is bounded
(one part of ``rows_per_part`` rows, the n × d embeddings memory-mapped, n × topics floats).

Output (``--out DIR``)
----------------------
- ``DIR/long_table/part-00000.parquet`` …: the source, in the generic long-table layout
  (``transforms/ingest/long_table.py``: ``input, dataset, model, metric, value``), one part per
  block of whole models, ~``rows_per_part`` rows each. Point ``benchroute ingest`` here.
- ``DIR/synth/``: what the source does not say, for checks and benchmarks:
  ``inputs.parquet`` (row, input_id as ingest computes it, text, dataset, topic, benchmark,
  difficulty, discrimination), ``embeddings.npy`` (n × d float32, row i = input i),
  ``queries.npy`` + ``queries.parquet`` (held-out query vectors and their topics),
  ``theta.npy`` (M × topics), ``run.npy`` (M × benchmarks, bool), ``models.parquet``,
  ``meta.json`` (the spec and counts).

Embeddings without an embedder
------------------------------
``write_embeddings(store, DIR)`` writes ``embeddings.npy`` into the store's embeddings table
(``artifacts.embeddings.PartWriter``) for the synthetic input ids. By default (d = 384) under the
identity of the default embedder (all-MiniLM-L6-v2, as ``transforms.embedder.resolve`` gives it),
so ``benchroute embed`` / ``refresh`` / ``publish`` find every input embedded and never load the
model; the parts record precision ``synthetic``. Such a store is for measuring the pipeline:
a query embedded by the real model at route time is not in the synthetic space.
``identity="synthetic"`` writes under an identity of its own (``synth-<d>d-<hash of the spec>``)
instead, for a pipeline told to use that embedder id.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import polars as pl

SOURCE_DIR = "long_table"
SIDE_DIR = "synth"
METRIC = "exact_match"
EMBED_CHUNK = 4096  # rows per embedding stream (fixed: the vectors do not depend on memory)
TEXT_CHUNK = 65536


@dataclass(frozen=True)
class SynthSpec:
    inputs: int = 10_000
    models: int = 100
    dim: int = 384
    seed: int = 0
    topics: int = 0  # 0: from the size, max(4, min(200, inputs // 250))
    benchmarks: int = 0  # 0: max(2, topics // 5)
    run_share: float = 0.75  # P(a model was run on a benchmark)
    missing: float = 0.03  # P(a run outcome is missing at random)
    queries: int = 1000  # held-out query vectors (0: none)
    noise: float = 1.0  # spread of an input around its topic (relative)
    rows_per_part: int = 2_000_000

    def resolved(self) -> SynthSpec:
        topics = self.topics or max(4, min(200, self.inputs // 250))
        benchmarks = self.benchmarks or max(2, topics // 5)
        if self.inputs <= 0 or self.models <= 0 or self.dim <= 1:
            raise ValueError("inputs, models must be positive and dim > 1")
        if benchmarks > topics:
            raise ValueError(f"{benchmarks} benchmarks for {topics} topics")
        if not (0 < self.run_share <= 1 and 0 <= self.missing < 1):
            raise ValueError("run_share must be in (0, 1], missing in [0, 1)")
        return replace(self, topics=topics, benchmarks=benchmarks)


def _rng(spec: SynthSpec, *key: int) -> np.random.Generator:
    return np.random.default_rng([spec.seed, *key])


# Stream keys (what)
_K_GEOMETRY, _K_INPUTS, _K_VECTORS, _K_MODELS, _K_OUTCOMES, _K_QUERIES, _K_WORDS = range(7)


def model_names(spec: SynthSpec) -> list[str]:
    width = max(4, len(str(spec.models - 1)))
    return [f"synth-m{j:0{width}d}" for j in range(spec.models)]


def dataset_names(spec: SynthSpec) -> list[str]:
    return [f"synth/b{t % spec.benchmarks:02d}-t{t:03d}" for t in range(spec.topics)]


@dataclass
class World:
    """The latent structure: geometry of topics, per-input item parameters, model abilities."""

    spec: SynthSpec
    mean_dir: np.ndarray  # (d,)
    bench_centres: np.ndarray  # (B, d)
    topic_offsets: np.ndarray  # (T, d)
    hard_dirs: np.ndarray  # (T, d): where in a topic the harder inputs lie
    topic_of_input: np.ndarray  # (n,) int
    difficulty: np.ndarray  # (n,)
    discrimination: np.ndarray  # (n,)
    spread: np.ndarray  # (n,) noise scale of each input
    theta: np.ndarray  # (M, T)
    run: np.ndarray  # (M, B) bool
    extra: dict = field(default_factory=dict)

    @property
    def bench_of_topic(self) -> np.ndarray:
        return np.arange(self.spec.topics) % self.spec.benchmarks

    @property
    def bench_of_input(self) -> np.ndarray:
        return self.bench_of_topic[self.topic_of_input]


def _unit(a: np.ndarray) -> np.ndarray:
    return a / np.linalg.norm(a, axis=-1, keepdims=True)


def make_world(spec: SynthSpec) -> World:
    spec = spec.resolved()
    n, M, d, T, B = spec.inputs, spec.models, spec.dim, spec.topics, spec.benchmarks
    g = _rng(spec, _K_GEOMETRY)
    mean_dir = _unit(g.standard_normal(d))
    bench = _unit(g.standard_normal((B, d)))
    topic = _unit(g.standard_normal((T, d)))
    hard = _unit(g.standard_normal((T, d)))
    gi = _rng(spec, _K_INPUTS)
    # topic sizes vary (Dirichlet shares), every topic has inputs when n >= T
    shares = gi.dirichlet(np.full(T, 2.0))
    topic_of_input = np.sort(gi.choice(T, size=n, p=shares))
    if n >= T:
        topic_of_input[:T] = np.arange(T)
        topic_of_input.sort()
    topic_difficulty = gi.normal(0.0, 0.8, T)
    difficulty = topic_difficulty[topic_of_input] + gi.normal(0.0, 1.0, n)
    discrimination = np.exp(gi.normal(0.0, 0.35, n))
    spread = spec.noise * gi.uniform(0.8, 1.25, n)
    gm = _rng(spec, _K_MODELS)
    general = gm.normal(0.3, 1.0, M)
    bench_skill = gm.normal(0.0, 0.6, (M, B))
    topic_skill = gm.normal(0.0, 0.35, (M, T))
    theta = general[:, None] + bench_skill[:, np.arange(T) % B] + topic_skill
    run = gm.random((M, B)) < spec.run_share
    run[np.arange(M), gm.integers(0, B, M)] = True  # every model runs somewhere
    return World(spec, mean_dir, bench, topic, hard, topic_of_input, difficulty, discrimination,
                 spread, theta.astype(np.float64), run,
                 extra={"topic_difficulty": topic_difficulty})


def _vectors(world: World, topics: np.ndarray, spread: np.ndarray, rng,
             local: np.ndarray) -> np.ndarray:
    """Unit vectors for inputs of ``topics`` (weights tuned for the cosines in the module doc);
    ``local``: each input's difficulty relative to its topic, which moves it along the topic's
    hard direction (so neighbours in the embedding space are of similar difficulty)."""
    s = world.spec
    d = s.dim
    centre = (0.45 * world.mean_dir + 0.55 * world.bench_centres[world.bench_of_topic[topics]]
              + 0.55 * world.topic_offsets[topics]
              + 0.1 * local[:, None] * world.hard_dirs[topics])
    noise = rng.standard_normal((len(topics), d)) * (0.75 / np.sqrt(d) * spread[:, None])
    return _unit(centre + noise).astype(np.float32)


def input_vectors(world: World, start: int, stop: int) -> np.ndarray:
    """Rows start..stop of the input embeddings, from streams of ``EMBED_CHUNK`` rows."""
    out = []
    for c in range(start // EMBED_CHUNK, (stop - 1) // EMBED_CHUNK + 1):
        lo, hi = c * EMBED_CHUNK, min((c + 1) * EMBED_CHUNK, world.spec.inputs)
        rows = np.arange(lo, hi)
        t = world.topic_of_input[rows]
        local = world.difficulty[rows] - world.extra["topic_difficulty"][t]
        block = _vectors(world, t, world.spread[rows], _rng(world.spec, _K_VECTORS, c), local)
        out.append(block[max(start, lo) - lo : min(stop, hi) - lo])
    return np.concatenate(out) if out else np.empty((0, world.spec.dim), np.float32)


def query_vectors(world: World, n: int) -> tuple[np.ndarray, np.ndarray]:
    """``n`` held-out query vectors from the same mixture, and their topics."""
    rng = _rng(world.spec, _K_QUERIES)
    topics = world.topic_of_input[rng.integers(0, world.spec.inputs, n)]
    spread = world.spec.noise * rng.uniform(0.8, 1.25, n)
    local = rng.normal(0.0, 1.0, n)
    return _vectors(world, topics, spread, rng, local), topics


_SYLLABLES = ["ka", "lo", "mi", "ne", "ru", "sa", "ti", "vo", "ze", "ph", "qu", "dr", "el", "ox"]


def input_texts(world: World, start: int, stop: int) -> list[str]:
    """Unique, text-like prompts (the input id is a hash of the text)."""
    s = world.spec
    vocab_rng = _rng(s, _K_WORDS)
    vocab = [
        ["".join(vocab_rng.choice(_SYLLABLES, vocab_rng.integers(2, 4))) for _ in range(24)]
        for _ in range(s.topics)
    ]
    names = dataset_names(s)
    texts = []
    for c in range(start // TEXT_CHUNK, (stop - 1) // TEXT_CHUNK + 1):
        lo, hi = c * TEXT_CHUNK, min((c + 1) * TEXT_CHUNK, s.inputs)
        rng = _rng(s, _K_WORDS, c + 1)
        lengths = rng.integers(6, 14, hi - lo)
        picks = rng.integers(0, 24, (hi - lo, 14))
        for i in range(max(start, lo), min(stop, hi)):
            t = world.topic_of_input[i]
            words = " ".join(vocab[t][w] for w in picks[i - lo, : lengths[i - lo]])
            texts.append(f"Q{i} ({names[t]}, seed {s.seed}): {words}?")
    return texts


def model_outcomes(world: World, j: int) -> tuple[np.ndarray, np.ndarray]:
    """Model j's outcomes: the input rows it has a value for, and the sampled 0/1 values."""
    s = world.spec
    rng = _rng(s, _K_OUTCOMES, j)
    u = rng.random(s.inputs)
    drop = rng.random(s.inputs) < s.missing
    theta = world.theta[j, world.topic_of_input]
    p = 1.0 / (1.0 + np.exp(-world.discrimination * (theta - world.difficulty)))
    keep = world.run[j, world.bench_of_input] & ~drop
    rows = np.flatnonzero(keep)
    return rows, (u[rows] < p[rows]).astype(np.int8)


def correct_probability(world: World, rows: np.ndarray | None = None) -> np.ndarray:
    """P(correct) (len(rows) × M): the truth an oracle router would use."""
    rows = np.arange(world.spec.inputs) if rows is None else np.asarray(rows)
    theta = world.theta[:, world.topic_of_input[rows]].T
    z = world.discrimination[rows, None] * (theta - world.difficulty[rows, None])
    return 1.0 / (1.0 + np.exp(-z))


# ---------------------------------------------------------------------- writing
def generate(spec: SynthSpec, out: str | Path, *, progress: bool = False, models_from: int = 0) -> dict:
    """Write the source and side files under ``out`` (see the module doc); returns the meta.

    ``models_from``: write the outcomes of models ``models_from`` … ``models - 1`` only (the
    results of models that land later, for an incremental run: same inputs and texts)."""
    t0 = time.perf_counter()
    spec = spec.resolved()
    world = make_world(spec)
    out = Path(out)
    src, side = out / SOURCE_DIR, out / SIDE_DIR
    src.mkdir(parents=True, exist_ok=True)
    side.mkdir(parents=True, exist_ok=True)
    for old in src.glob("part-*.parquet"):
        old.unlink()
    from benchroute.transforms.ids import input_id

    n, M = spec.inputs, spec.models
    names = dataset_names(spec)
    # inputs + embeddings (memory-mapped, chunked)
    texts = input_texts(world, 0, n)
    ids = [input_id(t) for t in texts]
    if len(set(ids)) != n:
        raise AssertionError("synthetic texts are not unique")
    pl.DataFrame(
        {
            "row": np.arange(n, dtype=np.int64),
            "input_id": ids,
            "text": texts,
            "dataset": [names[t] for t in world.topic_of_input],
            "topic": world.topic_of_input.astype(np.int32),
            "benchmark": world.bench_of_input.astype(np.int32),
            "difficulty": world.difficulty,
            "discrimination": world.discrimination,
        }
    ).write_parquet(side / "inputs.parquet")
    emb = np.lib.format.open_memmap(side / "embeddings.npy", mode="w+", dtype=np.float32,
                                    shape=(n, spec.dim))
    for lo in range(0, n, EMBED_CHUNK):
        emb[lo : lo + EMBED_CHUNK] = input_vectors(world, lo, min(lo + EMBED_CHUNK, n))
    emb.flush()
    del emb
    if spec.queries:
        qv, qt = query_vectors(world, spec.queries)
        np.save(side / "queries.npy", qv, allow_pickle=False)
        pl.DataFrame({"topic": qt.astype(np.int32), "dataset": [names[t] for t in qt]}
                     ).write_parquet(side / "queries.parquet")
    np.save(side / "theta.npy", world.theta.astype(np.float32), allow_pickle=False)
    np.save(side / "run.npy", world.run, allow_pickle=False)
    mnames = model_names(spec)
    pl.DataFrame({"model": mnames, "ability": world.theta.mean(axis=1)}).write_parquet(
        side / "models.parquet"
    )
    # the long table, one part per block of whole models
    text_s = pl.Series("input", texts, pl.String)
    dataset_s = pl.Series("dataset", [names[t] for t in world.topic_of_input], pl.String)
    per_part = max(1, spec.rows_per_part // n)
    parts, rows_total, positives = 0, 0, 0
    for first in range(models_from, M, per_part):
        frames = []
        for j in range(first, min(first + per_part, M)):
            rows, y = model_outcomes(world, j)
            if not rows.size:
                continue
            idx = pl.Series(rows)
            frames.append(
                pl.DataFrame(
                    {
                        "input": text_s.gather(idx),
                        "dataset": dataset_s.gather(idx),
                        "model": pl.Series([mnames[j]], dtype=pl.String).extend_constant(
                            mnames[j], rows.size - 1),
                        "metric": pl.Series([METRIC], dtype=pl.String).extend_constant(
                            METRIC, rows.size - 1),
                        "value": y,
                    }
                )
            )
            rows_total += rows.size
            positives += int(y.sum())
        if frames:
            pl.concat(frames).write_parquet(
                src / f"part-{parts:05d}.parquet", compression="zstd", row_group_size=262_144
            )
            parts += 1
        if progress:
            print(f"  models {first}..{min(first + per_part, M) - 1}: {rows_total:,} rows",
                  file=sys.stderr)
    meta = {
        "spec": asdict(spec),
        "source": str(src),
        "datasets": names,
        "parts": parts,
        "outcome_rows": rows_total,
        "positives": positives,
        "label_share": rows_total / (n * M),
        "spec_hash": spec_hash(spec),
        "seconds": round(time.perf_counter() - t0, 2),
    }
    (side / "meta.json").write_text(json.dumps(meta, indent=1))
    return meta


def spec_hash(spec: SynthSpec) -> str:
    return hashlib.sha256(json.dumps(asdict(spec.resolved()), sort_keys=True).encode()).hexdigest()


def read_meta(out: str | Path) -> dict:
    return json.loads((Path(out) / SIDE_DIR / "meta.json").read_text())


def load_world(out: str | Path) -> World:
    """The latent structure of a generated folder (recomputed from its spec)."""
    return make_world(SynthSpec(**read_meta(out)["spec"]))


def synthetic_identity(spec: SynthSpec):
    from benchroute.schemas.embeddings import EmbedderIdentity

    return EmbedderIdentity(name="synth", dim=spec.dim, weights_hash=spec_hash(spec))


def write_embeddings(store, out: str | Path, identity="default", *, part_rows: int = 16384):
    """Write the synthetic vectors of ``out`` into ``store``'s embeddings table for the synthetic
    input ids; returns the identity used.

    ``identity``: ``"default"`` (the default embedder's, so the pipeline skips embedding; needs
    d = 384), ``"synthetic"`` (``synth-<d>d-<spec hash>``) or an ``EmbedderIdentity``. Ids
    that already have a vector for it are not written again.
    """
    from benchroute.artifacts import embeddings as emb_store
    from benchroute.artifacts.store import Store

    out = Path(out)
    spec = SynthSpec(**read_meta(out)["spec"])
    if identity == "default":
        from benchroute.transforms.embedder import resolve

        identity = resolve()[1]
    elif identity == "synthetic":
        identity = synthetic_identity(spec)
    if identity.dim != spec.dim:
        raise ValueError(
            f"the synthetic vectors are {spec.dim}-d, the embedder {identity.id} is {identity.dim}-d"
            " (generate with --dim 384, or use identity='synthetic')"
        )
    st = store if isinstance(store, Store) else Store(str(store))
    ids = pl.read_parquet(out / SIDE_DIR / "inputs.parquet", columns=["input_id"])["input_id"]
    have = emb_store.present_ids(st, identity)
    todo = np.flatnonzero(~ids.is_in(have.implode()).to_numpy())
    X = np.load(out / SIDE_DIR / "embeddings.npy", mmap_mode="r")
    writer = emb_store.PartWriter(st, identity, part_rows=part_rows, max_seconds=1e9,
                                  info={"synthetic": spec_hash(spec)})
    id_list = ids.to_list()
    for lo in range(0, todo.size, part_rows):
        rows = todo[lo : lo + part_rows]
        writer.add([id_list[i] for i in rows], np.asarray(X[rows]), "synthetic")
    writer.flush()
    return identity


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--inputs", type=int, default=10_000)
    ap.add_argument("--models", type=int, default=100)
    ap.add_argument("--out", required=True, help="output folder (source in OUT/long_table)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dim", type=int, default=384)
    ap.add_argument("--topics", type=int, default=0, help="0: from the size")
    ap.add_argument("--benchmarks", type=int, default=0, help="0: topics // 5")
    ap.add_argument("--run-share", type=float, default=0.75)
    ap.add_argument("--missing", type=float, default=0.03)
    ap.add_argument("--queries", type=int, default=1000)
    ap.add_argument("--rows-per-part", type=int, default=2_000_000)
    ap.add_argument("--store", help="also write the vectors into this store's embeddings table")
    ap.add_argument("--identity", choices=["default", "synthetic"], default="default")
    ap.add_argument("--embeddings-only", action="store_true",
                    help="do not generate: write OUT's vectors into --store")
    ap.add_argument("--models-from", type=int, default=0,
                    help="write only models from this index on (models that land later)")
    ap.add_argument("--progress", action="store_true")
    a = ap.parse_args(argv)
    result: dict = {}
    if not a.embeddings_only:
        spec = SynthSpec(a.inputs, a.models, a.dim, a.seed, a.topics, a.benchmarks, a.run_share,
                         a.missing, a.queries, 1.0, a.rows_per_part)
        meta = generate(spec, a.out, progress=a.progress, models_from=a.models_from)
        result = {k: meta[k] for k in ("source", "parts", "outcome_rows", "label_share", "seconds")}
    elif not a.store:
        ap.error("--embeddings-only needs --store")
    if a.store:
        t = time.perf_counter()
        ident = write_embeddings(a.store, a.out, a.identity)
        result.update(embedder=ident.id, embed_seconds=round(time.perf_counter() - t, 2))
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
