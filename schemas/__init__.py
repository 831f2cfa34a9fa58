"""The one definition of every canonical table (and, later, of the bundle manifest)."""

from .tables import KEYS, OUTCOME_KEY, TABLES, SchemaError, empty, validate

__all__ = ["KEYS", "OUTCOME_KEY", "TABLES", "SchemaError", "empty", "validate"]
