"""The one definition of every canonical table (``tables``), of the vectors' table
(``embeddings``) and of the bundle manifest (``manifest``).

The table names below load ``tables`` (polars, dataframely) on first use, so a bundle consumer
that only needs ``manifest`` imports neither.
"""

from __future__ import annotations

from importlib import import_module

__all__ = ["KEYS", "OUTCOME_KEY", "TABLES", "SchemaError", "empty", "validate"]


def __getattr__(name: str):
    if name in __all__:
        return getattr(import_module(".tables", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
