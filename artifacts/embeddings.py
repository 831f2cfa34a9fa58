"""Embedding tables in the store: write vectors in parts, read them back as a numpy matrix.

Each embedder has its own table ``embeddings/<embedder id>`` (``schemas.embeddings``). Vectors are
appended in parts of a few thousand rows, each part made visible by its own commit, so a crash
keeps every finished part and the next run embeds only what is still missing. Parts are plain
Parquet (zstd, byte-stream-split floats, ``fixed_size_list<float32>[dim]``): any Parquet reader
can use them; the commit log says which parts are current.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import numpy as np
import polars as pl
import pyarrow.parquet as pq

from benchroute.artifacts.store import Store
from benchroute.schemas import embeddings as E
from benchroute.schemas.embeddings import EmbedderIdentity


class MissingVectors(KeyError):
    """Some of the asked-for inputs have no vector for this embedder (message names them)."""

    def __str__(self) -> str:  # KeyError quotes its message; this one is a sentence
        return str(self.args[0]) if self.args else ""


def _table(embedder: EmbedderIdentity | str) -> str:
    return embedder.table if isinstance(embedder, EmbedderIdentity) else E.table_name(embedder)


def _embedder_id(embedder: EmbedderIdentity | str) -> str:
    return embedder.id if isinstance(embedder, EmbedderIdentity) else embedder


def embedders(store: Store) -> list[str]:
    """Ids of the embedders that have a table in the store."""
    prefix = E.TABLE_PREFIX + "/"
    return [t[len(prefix) :] for t in store.tables() if t.startswith(prefix)]



class EmbedderChoiceError(ValueError):
    """No stored embedder matches what was asked for (the message names what is stored)."""


def pick_embedder(stored: Store | Sequence[str], embedder: str | None = None) -> str:
    """The embedder id to use: the one asked for (an id or a name prefix such as
    ``sentence-transformers/all-MiniLM-L6-v2``) or the only one stored. ``stored``: a store (its
    embedders; messages name it) or the stored ids themselves."""
    where = f"{stored.url}: " if isinstance(stored, Store) else ""
    ids = embedders(stored) if isinstance(stored, Store) else list(stored)
    if not ids:
        raise EmbedderChoiceError(f"{where}no embeddings yet (run `benchroute embed` first)")
    if embedder:
        slug = embedder.lower().replace("_", "-").replace("/", "-")
        match = [i for i in ids if i == embedder or i.startswith(slug)]
        if not match:
            raise EmbedderChoiceError(f"{where}no embeddings of {embedder!r}; stored: {ids}")
        return sorted(match)[-1]
    if len(ids) > 1:
        raise EmbedderChoiceError(f"{where}several embedders stored, pick one of {ids}")
    return ids[0]


# --------------------------------------------------------------------------- write
def vectors_frame(
    identity: EmbedderIdentity, ids: Sequence[str], vectors: np.ndarray
) -> pl.DataFrame:
    """A frame of the embeddings table from ids and a (n, dim) float32 matrix (no per-row copy)."""
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    if vectors.ndim != 2 or vectors.shape != (len(ids), identity.dim):
        raise ValueError(
            f"{identity.id}: got vectors of shape {vectors.shape} for {len(ids)} ids, "
            f"expected ({len(ids)}, {identity.dim})"
        )
    return pl.DataFrame(
        {
            "input_id": pl.Series("input_id", list(ids), pl.String),
            "embedder": pl.Series("embedder", [identity.id] * len(ids), pl.String),
            "vector": pl.Series("vector", vectors, pl.Array(pl.Float32, identity.dim)),
        }
    )


def write_part(
    store: Store,
    identity: EmbedderIdentity,
    frame: pl.DataFrame,
    *,
    precision: str,
    info: dict | None = None,
) -> str:
    """Write one part of ``identity``'s table and commit it; returns the part's relative path.

    The part is written first and becomes visible only when its commit lands, so a crash in
    between leaves an orphan that ``Store.gc`` removes and no reader ever sees.
    """
    if frame.height == 0:
        raise ValueError("write_part: empty frame")
    arrow = frame.select(E.COLUMNS).to_arrow()
    arrow = arrow.replace_schema_metadata(
        {
            E.META_IDENTITY: identity.to_json().encode(),
            E.META_PRECISION: precision.encode(),
        }
    )
    commit = store.append_arrow(
        identity.table,
        arrow,
        info={
            "stage": "embed",
            "embedder": identity.id,
            "embedder_name": identity.name,
            "dim": identity.dim,
            "weights_hash": identity.weights_hash,
            "precision": precision,
            "rows": frame.height,
            **(info or {}),
        },
        **E.PARQUET_OPTIONS,
    )
    return commit.append[identity.table][0]


class PartWriter:
    """Buffers vectors and writes a part every ``part_rows`` rows or ``max_seconds`` seconds
    (whichever comes first), so a crash loses at most that much work."""

    def __init__(
        self,
        store: Store,
        identity: EmbedderIdentity,
        *,
        part_rows: int = 4096,
        max_seconds: float = 60.0,
        info: dict | None = None,
    ):
        if part_rows <= 0:
            raise ValueError("part_rows must be positive")
        self.store, self.identity = store, identity
        self.part_rows, self.max_seconds = part_rows, max_seconds
        self.info = dict(info or {})
        self.parts: list[str] = []
        self.rows_written = 0
        self._ids: list[str] = []
        self._vecs: list[np.ndarray] = []
        self._precision: str | None = None
        self._since = time.monotonic()

    @property
    def buffered(self) -> int:
        return len(self._ids)

    def add(self, ids: Sequence[str], vectors: np.ndarray, precision: str) -> None:
        if self._precision is not None and precision != self._precision:
            self.flush()  # one precision per part, as its metadata says
        self._precision = precision
        self._ids.extend(ids)
        self._vecs.append(np.asarray(vectors, dtype=np.float32))
        if self.buffered >= self.part_rows or time.monotonic() - self._since >= self.max_seconds:
            self.flush()

    def flush(self) -> str | None:
        self._since = time.monotonic()
        if not self._ids:
            return None
        frame = vectors_frame(self.identity, self._ids, np.concatenate(self._vecs))
        rel = write_part(
            self.store, self.identity, frame, precision=self._precision or "?", info=self.info
        )
        self.parts.append(rel)
        self.rows_written += frame.height
        self._ids, self._vecs = [], []
        return rel


# --------------------------------------------------------------------------- read
def present_ids(store: Store, embedder: EmbedderIdentity | str) -> pl.Series:
    """Input ids that already have a vector for ``embedder`` (reads the id column only)."""
    frame = store.read(_table(embedder), columns=["input_id"])
    if frame.width == 0:
        return pl.Series("input_id", [], pl.String)
    return frame["input_id"].unique()


def read_table(store: Store, embedder: EmbedderIdentity | str) -> pl.DataFrame:
    """The whole embeddings table of ``embedder`` (one row per input; the first vector written
    wins if two runs ever wrote the same input)."""
    embedder_id = _embedder_id(embedder)
    frame = store.read(_table(embedder))
    if frame.width == 0:
        return E.empty(E.dim_of(embedder_id))
    if frame["input_id"].is_duplicated().any():
        frame = frame.unique("input_id", keep="first", maintain_order=True)
    return frame


def read_matrix(
    store: Store,
    embedder: EmbedderIdentity | str,
    input_ids: Sequence[str] | pl.Series | None = None,
) -> tuple[np.ndarray, list[str]]:
    """A (n, dim) float32 matrix whose row i is the vector of ``input_ids[i]``, and the ids.

    With ``input_ids=None`` every stored vector, in stored order. The matrix is a read-only view of
    the Arrow buffer (no copy to numpy; ``np.array(m)`` for a writable copy). Raises
    ``MissingVectors`` naming ids that have no vector.
    """
    frame = read_table(store, embedder)
    if input_ids is None:
        aligned = frame
    else:
        wanted = pl.DataFrame({"input_id": pl.Series("input_id", list(input_ids), pl.String)})
        aligned = wanted.join(
            frame.select("input_id", "vector"), on="input_id", how="left", maintain_order="left"
        )
        missing = aligned.filter(pl.col("vector").is_null())["input_id"]
        if missing.len():
            shown = ", ".join(missing.head(5).to_list())
            raise MissingVectors(
                f"{missing.len()} of {len(wanted)} inputs have no vector for "
                f"{_embedder_id(embedder)}: {shown}{' …' if missing.len() > 5 else ''} "
                "(run `benchroute embed` first)"
            )
    matrix = aligned["vector"].rechunk().to_numpy()
    return matrix, aligned["input_id"].to_list()


def part_bytes(store: Store, embedder: EmbedderIdentity | str) -> tuple[int, int]:
    """(total bytes of the table's current parts, rows in them)."""
    total = rows = 0
    for rel in store.parts(_table(embedder)):
        full = store.path(rel)
        total += int(store.fs.size(full))
        with store.fs.open(full, "rb") as f:
            rows += pq.ParquetFile(f).metadata.num_rows
    return total, rows


def read_part_identity(store: Store, rel: str) -> tuple[EmbedderIdentity, str]:
    """The identity and precision recorded in one part's Parquet metadata."""
    with store.fs.open(store.path(rel), "rb") as f:
        meta = pq.ParquetFile(f).schema_arrow.metadata or {}
    return EmbedderIdentity.from_json(meta[E.META_IDENTITY]), meta.get(
        E.META_PRECISION, b"?"
    ).decode()
