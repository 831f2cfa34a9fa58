"""Parameter types of the flows, each derived from the registry that owns the concept.

Prefect validates a run's parameters against them before it starts; the CLI's choices come from
the same tuples (``READER_KINDS``, ``PRECISIONS``…), so a new reader or precision is one edit.
"""

from __future__ import annotations

import argparse
from typing import Annotated, Literal

from pydantic import Field

from benchroute.artifacts.router import INDEX_DTYPES as _INDEX_DTYPES
from benchroute.transforms.embed import PRECISIONS
from benchroute.transforms.ingest import READER_MODULES

READER_KINDS: tuple[str, ...] = READER_MODULES  # the source kinds: one reader module each
WEIGHTS = ("uniform", "distance")
INDEX_DTYPES: tuple[str, ...] = tuple(_INDEX_DTYPES)  # how a bundle may store its index

Kind = Literal[READER_KINDS]  # type: ignore[valid-type]
Precision = Literal[PRECISIONS]  # type: ignore[valid-type]
Weights = Literal[WEIGHTS]  # type: ignore[valid-type]
IndexDtype = Literal[INDEX_DTYPES]  # type: ignore[valid-type]
BundleName = Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")]
Positive = Annotated[int, Field(ge=1)]
Url = Annotated[str, Field(min_length=1)]
BatchSize = Annotated[int, Field(ge=1, le=4096)]
Partitions = Annotated[int, Field(ge=1, le=1024)]


def kind_option(parser: argparse.ArgumentParser, helptext: str, dest: str = "sources") -> None:
    """``--kind`` (repeatable, one of ``READER_KINDS``) for every command that selects source
    kinds; ``--source``, its old spelling in backfill, evaluate and publish, is a hidden alias."""
    parser.add_argument("--kind", action="append", dest=dest, choices=READER_KINDS, help=helptext)
    parser.add_argument("--source", action="append", dest=dest, choices=READER_KINDS,
                        help=argparse.SUPPRESS)
