"""Deterministic fingerprints of what a computation reads (HF-datasets style, docs/operations.md#fingerprints-and-caching).

A fingerprint is a sha256 over the inputs and parameters of a step, so that equal fingerprints
mean equal results: the refresh flow uses them as Prefect cache keys (a leave-one-dataset-out
group whose labels, memberships, models and vectors did not change is not evaluated again) and
to cut work into stable partitions. Pure functions; no store access.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable, Sequence

import numpy as np
import polars as pl


# Row hashes are stable within one polars version only: the version is part of every frame
# digest. Two seeds: 128 bits per row.
_SEEDS = (0, 1)


def digest(*parts: object) -> str:
    """sha256 of JSON-serialisable parts (dict keys sorted, so dict order does not matter)."""
    h = hashlib.sha256()
    for part in parts:
        h.update(json.dumps(part, sort_keys=True, default=str, allow_nan=True).encode())
        h.update(b"\0")
    return h.hexdigest()


def frame_digest(df: pl.DataFrame) -> str:
    """A digest of a frame's rows as a set (row order does not matter) plus its schema."""
    h = hashlib.sha256()
    h.update(json.dumps([pl.__version__, df.height, [(c, str(t)) for c, t in df.schema.items()]]).encode())
    if df.height and df.width:
        rows = np.stack([df.hash_rows(seed=s).to_numpy() for s in _SEEDS], axis=1)
        h.update(rows[np.lexsort(rows.T[::-1])].tobytes())
    return h.hexdigest()


LABEL_DIGEST_COLUMNS = ["input_id", "dataset", "model", "y", "value"]


def labels_digest(batches: Iterable[pl.DataFrame]) -> tuple[str, pl.Series]:
    """(A digest of label rows given a batch at a time, their distinct input ids), holding one
    batch at a time. Each non-empty batch's rows count as a set (``frame_digest``) and the
    batches as a set of those: equal batches in any order give an equal digest; the same rows
    cut into other batches (a store whose parts were rewritten) give another, which only costs
    a cached evaluation."""
    parts, ids = [], []
    for batch in batches:
        if batch.height:
            parts.append(frame_digest(batch.select(LABEL_DIGEST_COLUMNS)))
            ids.append(batch["input_id"].unique())
    input_ids = pl.concat(ids).unique() if ids else pl.Series("input_id", [], pl.String)
    return digest(sorted(parts)), input_ids


def group_fingerprint(
    label_digest: str,
    input_ids: pl.Series,
    memberships: pl.DataFrame,
    models: pl.DataFrame,
    *,
    datasets: Sequence[str],
    model_names: Sequence[str],
    params: dict,
) -> str:
    """Everything one leave-one-dataset-out group's evaluation reads.

    ``label_digest`` and ``input_ids``: ``labels_digest`` of the group's labels (``input_id,
    dataset, model, y, value``); ``memberships`` the store's (only the group's inputs count: an
    input's other datasets shape the index), ``models`` the model table (sizes of the group's
    models), ``params`` the embedder id, the evaluation's parameters and the code version.
    """
    mem = memberships.filter(pl.col("input_id").is_in(input_ids.implode())).select("input_id", "dataset").unique()
    size = models.filter(pl.col("model").is_in(list(model_names))).select("model", "params_b").unique()
    return digest(
        sorted(datasets),
        sorted(model_names),
        label_digest,
        frame_digest(mem),
        frame_digest(size),
        params,
    )


def bucket_of(input_id: str, n: int) -> int:
    """A stable bucket in ``range(n)`` for an id (its leading hex digits, else its sha256)."""
    head = input_id[:8]
    if not re.fullmatch(r"[0-9a-fA-F]{8}", head):
        head = hashlib.sha256(input_id.encode()).hexdigest()[:8]
    return int(head, 16) % n


def partition_ids(ids: Iterable[str], n: int) -> list[list[str]]:
    """``ids`` cut into ``n`` stable buckets (an id always lands in the same one), each sorted;
    empty buckets are dropped."""
    if n < 1:
        raise ValueError(f"need at least one partition, got {n}")
    buckets: list[list[str]] = [[] for _ in range(n)]
    for i in ids:
        buckets[bucket_of(i, n)].append(i)
    return [sorted(b) for b in buckets if b]

