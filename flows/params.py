"""Parameter types of the flows, each derived from the registry that owns the concept.

Prefect validates a run's parameters against them before it starts. The choices
(``READER_KINDS``, ``PRECISIONS``…) and the spec field types are those of ``artifacts.specs``,
from which the CLI's options are generated (``flows.spec_options``), so a new reader or
precision is one edit.
"""

from __future__ import annotations

from typing import Annotated

from benchroute.artifacts.specs import (  # noqa: F401 - re-exported for the flows
    INDEX_DTYPES,
    READER_KINDS,
    WEIGHTS,
    BatchSize,
    IndexDtype,
    Kind,
    Positive,
    Precision,
    Weights,
)
from pydantic import Field

BundleName = Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")]
Url = Annotated[str, Field(min_length=1)]
Partitions = Annotated[int, Field(ge=1, le=1024)]
