"""The embeddings table (docs/formats.md#embeddings) and the identity of an embedder.

One table per embedder, ``embeddings/<embedder id>`` in the store, so every table holds vectors of
one width from one set of weights. A row is one input's vector::

    input_id   String                 the key of ``inputs``
    embedder   String                 the embedder id (name, dimension and weights hash, below)
    vector     Array(Float32, dim)    L2-normalised

The id carries name, dimension and a weights hash, so vectors of two embedders, or of two
versions of one embedder's weights, never meet in one table or one matrix. Each Parquet part also
carries the full identity (and the precision it was computed at) in its key-value metadata.

Parts are written with zstd, byte-stream-split on the float values and no dictionary for them
(docs/formats.md#embeddings: the smallest encoding for float vectors); polars reads the column as
``Array(Float32, dim)``, which converts to a numpy matrix without copying.
"""

from __future__ import annotations

import functools
import json
import re
from dataclasses import asdict, dataclass

import dataframely as dy
import polars as pl

from .tables import INPUT_ID_PATTERN

TABLE_PREFIX = "embeddings"
KEY = ["input_id", "embedder"]
COLUMNS = ["input_id", "embedder", "vector"]

# pyarrow.parquet.write_table options for every part of an embeddings table. The float column is
# addressed by its Parquet leaf path: a fixed-size list's values live in ``vector.list.element``.
PARQUET_OPTIONS: dict = {
    "compression": "zstd",
    "compression_level": 3,
    "use_dictionary": ["embedder"],
    "use_byte_stream_split": ["vector.list.element"],
    "write_statistics": ["input_id", "embedder"],
}

# Parquet key-value metadata keys.
META_IDENTITY = b"benchroute.embedder"
META_PRECISION = b"benchroute.precision"

_ID_PATTERN = re.compile(r"^[a-z0-9][a-z0-9.-]*-[0-9]+d-[0-9a-f]{12}$")
_SLUG = re.compile(r"[^a-z0-9.]+")


@dataclass(frozen=True)
class EmbedderIdentity:
    """What makes two vectors comparable: the model's name, its width, and its weights.

    ``weights_hash`` is the sha256 (hex) over the model folder's files that change the vectors
    (weights, configs, tokenizer); see ``benchroute.transforms.embed.weights_hash``.
    """

    name: str
    dim: int
    weights_hash: str

    def __post_init__(self) -> None:
        if not self.name or not _SLUG.sub("", self.name.lower()):
            raise ValueError(f"embedder name {self.name!r} is empty")
        if not isinstance(self.dim, int) or self.dim <= 0:
            raise ValueError(
                f"embedder {self.name!r}: dimension {self.dim!r} is not a positive int"
            )
        if not re.fullmatch(r"[0-9a-f]{12,64}", self.weights_hash or ""):
            raise ValueError(
                f"embedder {self.name!r}: weights hash {self.weights_hash!r} is not hex"
            )

    @property
    def id(self) -> str:
        """``<name slug>-<dim>d-<first 12 hex of the weights hash>``, e.g.
        ``all-minilm-l6-v2-384d-53aa51172d14``; also the store table's suffix."""
        slug = _SLUG.sub("-", self.name.lower()).strip("-.")
        return f"{slug}-{self.dim}d-{self.weights_hash[:12]}"

    @property
    def table(self) -> str:
        """The store table that holds this embedder's vectors."""
        return table_name(self.id)

    def to_json(self) -> str:
        return json.dumps({**asdict(self), "id": self.id}, sort_keys=True)

    @classmethod
    def from_json(cls, text: str | bytes) -> EmbedderIdentity:
        data = json.loads(text)
        return cls(name=data["name"], dim=int(data["dim"]), weights_hash=data["weights_hash"])


def table_name(embedder_id: str) -> str:
    """``embeddings/<embedder id>`` (raises on an id that is not one)."""
    if not is_embedder_id(embedder_id):
        raise ValueError(f"{embedder_id!r} is not an embedder id (<name>-<dim>d-<12 hex>)")
    return f"{TABLE_PREFIX}/{embedder_id}"


def is_embedder_id(text: str) -> bool:
    return bool(_ID_PATTERN.match(text or ""))


def dim_of(embedder_id: str) -> int:
    """The vector width encoded in an embedder id."""
    if not is_embedder_id(embedder_id):
        raise ValueError(f"{embedder_id!r} is not an embedder id")
    return int(embedder_id.rsplit("-", 2)[1][:-1])


def polars_schema(dim: int) -> dict[str, pl.DataType]:
    return {"input_id": pl.String, "embedder": pl.String, "vector": pl.Array(pl.Float32, dim)}


def empty(dim: int) -> pl.DataFrame:
    return pl.DataFrame(schema=polars_schema(dim))


@functools.cache
def schema(dim: int) -> type[dy.Schema]:
    """The dataframely schema of an embeddings table of width ``dim`` (one class per width)."""
    return type(
        f"Embeddings{dim}",
        (dy.Schema,),
        {
            "__doc__": f"One L2-normalised float32 vector of width {dim} per (input, embedder).",
            "__module__": __name__,
            "input_id": dy.String(primary_key=True, regex=INPUT_ID_PATTERN),
            "embedder": dy.String(primary_key=True, regex=_ID_PATTERN.pattern),
            "vector": dy.Array(dy.Float32(), dim),
        },
    )


def validate(df: pl.DataFrame, dim: int) -> pl.DataFrame:
    """Check a frame against the table of width ``dim``; raises ``dy.exc`` errors on bad rows."""
    return schema(dim).validate(df.select(COLUMNS), cast=True)
