"""Typed specs: what a run may choose, as frozen, validated values.

A flow takes each spec whole (``refresh_flow(..., embed=EmbedSpec(), router=RouterSpec())``), a
bundle's manifest records the specs it was built from whole (``spec.selection``,
``spec.router``), and a cache key digests them whole (``Spec.key``), so a new field reaches the
CLI, the flows, the manifest and the cache keys in one edit. The CLI's options are generated from
the fields (``flows.cli``); their descriptions are its help.

- ``Selection``: which part of the store a bundle is built from;
- ``EmbedSpec``: which embedder embeds new inputs, at which precision and batch size;
- ``RouterSpec``: how the router is fitted and served (k, weights, predictor, index storage and
  search, strong/weak pairs, the stability bootstrap).

Values read back from a manifest or a request go through ``model_validate`` (unknown fields are
refused), never through ``eval`` or pickle.
"""

from __future__ import annotations

from typing import Annotated, Literal

from benchroute.artifacts.router import INDEX_DTYPES as _INDEX_DTYPES
from benchroute.transforms.embed import PRECISIONS
from benchroute.transforms.embedder_packages import DEFAULT_EMBEDDER
from benchroute.transforms.fingerprints import digest
from benchroute.transforms.ingest import READER_MODULES
from benchroute.transforms.predictors import PREDICTORS
from benchroute.transforms.router_fit import DEFAULT_PREDICTOR
from pydantic import BaseModel, ConfigDict, Field, field_validator

READER_KINDS: tuple[str, ...] = READER_MODULES  # the source kinds: one reader module each
WEIGHTS = ("uniform", "distance")
INDEX_DTYPES: tuple[str, ...] = tuple(_INDEX_DTYPES)  # how a bundle may store its index
INDEX_SEARCHES = ("auto", "exact", "hnsw")
PREDICTOR_NAMES: tuple[str, ...] = tuple(sorted(PREDICTORS))
STABILITY_B = 200  # bootstrap resamples of a bundle's stability summary

Kind = Literal[READER_KINDS]  # type: ignore[valid-type]
Precision = Literal[PRECISIONS]  # type: ignore[valid-type]
Weights = Literal[WEIGHTS]  # type: ignore[valid-type]
IndexDtype = Literal[INDEX_DTYPES]  # type: ignore[valid-type]
IndexSearch = Literal[INDEX_SEARCHES]  # type: ignore[valid-type]
PredictorName = Literal[PREDICTOR_NAMES]  # type: ignore[valid-type]
Positive = Annotated[int, Field(ge=1)]
BatchSize = Annotated[int, Field(ge=1, le=4096)]
Names = tuple[str, ...] | None


class Spec(BaseModel):
    """A frozen, validated choice; ``to_dict`` is its JSON form, ``key`` its digest."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    def to_dict(self) -> dict:
        return self.model_dump(mode="json")

    @property
    def key(self) -> str:
        """A digest of the spec's kind and every field: equal specs, equal keys."""
        return digest(type(self).__name__, self.to_dict())


def _names(v):
    """A list, tuple or single string of names as a tuple; empty as ``None``."""
    if v is None:
        return None
    if isinstance(v, str):
        v = [v]
    v = tuple(v)
    return v or None


class Selection(Spec):
    """Which part of the store a bundle is built from (``None`` = all of it)."""

    sources: tuple[Kind, ...] | None = Field(None, description="source kinds (helm, mmlu_pro, …)")
    datasets: Names = Field(None, description="dataset names or globs (mmlu_pro/*)")
    models: Names = Field(None, description="model names or globs")
    exclude_models: Names = Field(None, description="model names or globs left out after that")

    _tuples = field_validator("sources", "datasets", "models", "exclude_models", mode="before")(
        classmethod(lambda cls, v: _names(v)))

    @classmethod
    def of(cls, sources=None, datasets=None, models=None, exclude_models=None) -> Selection:
        return cls(sources=sources, datasets=datasets, models=models, exclude_models=exclude_models)

    @property
    def is_all(self) -> bool:
        return not any((self.sources, self.datasets, self.models, self.exclude_models))


class EmbedSpec(Spec):
    """How new inputs are embedded."""

    embedder: str = Field(DEFAULT_EMBEDDER, min_length=1,
                          description="embedder name (a sentence-transformers model shipped in a package)")
    precision: Precision = Field("auto", description="auto: bf16 where it is measured faster on this machine")
    batch_size: BatchSize = Field(64, description="inputs per forward pass")


def _pair(p) -> tuple[str, str]:
    parts = [x.strip() for x in p.split(",")] if isinstance(p, str) else list(p)
    if len(parts) != 2 or not all(isinstance(x, str) and x for x in parts) or parts[0] == parts[1]:
        raise ValueError(f"a pair is two different models 'STRONG,WEAK', got {p!r}")
    return parts[0], parts[1]


class RouterSpec(Spec):
    """How the router is fitted and served."""

    k: Positive = Field(10, description="neighbours of the kNN estimators")
    weights: Weights = Field("uniform", description="kNN weights: uniform or by distance")
    predictor: PredictorName = Field(
        DEFAULT_PREDICTOR, description="per-query correctness predictor (default: the measured best)")
    index_dtype: IndexDtype = Field("float16", description="how the bundle stores its index")
    index_search: IndexSearch = Field(
        "auto", description="exact scan, an HNSW graph (recall in the manifest), or auto (HNSW above "
                            "20,000 index rows)")
    pairs: tuple[tuple[str, str], ...] = Field(
        (), description="strong/weak pair routers to serve, each 'STRONG,WEAK'")
    pair_models: tuple[str, ...] = Field(
        (), description="serve every pair among these models (the one of higher accuracy is strong)")
    stability_B: Annotated[int, Field(ge=0)] = Field(
        STABILITY_B, description="bootstrap resamples of the bundle's stability summary (0 = none)")

    @field_validator("pairs", mode="before")
    @classmethod
    def _pairs(cls, v):
        return tuple(_pair(p) for p in (v or ()))

    @field_validator("pair_models", mode="before")
    @classmethod
    def _pair_models(cls, v):
        return _names(v) or ()

    def evaluation(self) -> dict:
        """The fields a leave-one-dataset-out evaluation depends on."""
        return {"k": self.k, "weights": self.weights}
