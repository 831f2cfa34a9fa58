"""Helpers shared by the table and JSON readers (a helper module, not a reader).

- file access through fsspec: listing the files under a root, reading bytes, CSV headers and
  Parquet schemas without reading the data;
- CSV text with a UTF-8 check (rows with invalid bytes are quarantined, not the whole file);
- vectorised quarantine: ``apply_checks`` splits off rows that break a rule, ``drop_duplicates``
  keeps the first of several rows with one key;
- JSON records streamed one at a time from a JSON array (ijson) or JSON Lines, with parse errors
  reported as ``ParseFailure`` items so the caller can quarantine them and keep what came before.

Records are numbered from 1 in quarantine rows: ``row 1`` is the first data row of a table
(after a CSV header), ``record 1`` the first item of a JSON array, ``line 1`` the first line of a
JSON Lines file.
"""

from __future__ import annotations

import csv
import io
import json
import posixpath
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import fsspec
import ijson
import polars as pl
import pyarrow.parquet as pq
from fsspec.core import url_to_fs

from benchroute.schemas import empty
from benchroute.transforms.ids import input_ids

from .base import UnreadableSource

ROW = "__row"  # the 1-based record number column added to every table read


# ----------------------------------------------------------------------------------- files
def open_url(url: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """The filesystem and path of an fsspec URL or local path."""
    return url_to_fs(str(url))


def base_name(path: str) -> str:
    """The last component of a path (``a/b/c.csv`` -> ``c.csv``)."""
    return posixpath.basename(str(path).rstrip("/"))


def parent_name(path: str, levels: int = 1) -> str:
    """The name of the folder ``levels`` above a path (``a/b/c.csv``, 1 -> ``b``)."""
    p = str(path).rstrip("/")
    for _ in range(levels):
        p = posixpath.dirname(p)
    return posixpath.basename(p)


def list_files(fs: fsspec.AbstractFileSystem, root: str) -> list[str]:
    """Every file under ``root`` (or ``root`` itself when it is a file), sorted."""
    if fs.isfile(root):
        return [root]
    return sorted(fs.find(root))


def read_bytes(fs: fsspec.AbstractFileSystem, path: str, label: str) -> bytes:
    """The whole file; an empty or unreadable file raises ``UnreadableSource``."""
    try:
        with fs.open(path, "rb") as f:
            data = f.read()
    except OSError as exc:
        raise UnreadableSource(f"{label}: cannot read file: {exc}") from exc
    if not data.strip():
        raise UnreadableSource(f"{label}: file is empty")
    return data


def read_head(fs: fsspec.AbstractFileSystem, path: str, size: int = 1 << 16) -> bytes:
    """The first ``size`` bytes of a file (empty on error)."""
    try:
        with fs.open(path, "rb") as f:
            return f.read(size)
    except OSError:
        return b""


def csv_header(fs: fsspec.AbstractFileSystem, path: str) -> list[str]:
    """The column names of a CSV file, read from its first bytes only ([] if none)."""
    head = read_head(fs, path).decode("utf-8", errors="replace").lstrip("\ufeff")
    try:
        return next(csv.reader(io.StringIO(head)), [])
    except csv.Error:
        return []


def parquet_columns(fs: fsspec.AbstractFileSystem, path: str) -> list[str]:
    """The column names of a Parquet file, from its footer only ([] if it is not Parquet)."""
    try:
        with fs.open(path, "rb") as f:
            return list(pq.read_schema(f).names)
    except Exception:  # noqa: BLE001 - anything that is not a readable Parquet footer
        return []


def read_parquet(
    fs: fsspec.AbstractFileSystem, path: str, label: str, columns: list[str] | None = None
) -> pl.DataFrame:
    """A Parquet file (or the given columns of it) with a 1-based ``ROW`` column."""
    try:
        with fs.open(path, "rb") as f:
            available = pq.read_schema(f).names
            wanted = None if columns is None else [c for c in columns if c in available]
            f.seek(0)
            table = pq.read_table(f, columns=wanted)
    except FileNotFoundError as exc:
        raise UnreadableSource(f"{label}: file not found") from exc
    except Exception as exc:  # noqa: BLE001 - a corrupt or non-Parquet file
        raise UnreadableSource(f"{label}: not a readable Parquet file: {exc}") from exc
    df = pl.from_arrow(table)
    assert isinstance(df, pl.DataFrame)
    return df.with_row_index(ROW, offset=1)


def read_csv_strings(
    fs: fsspec.AbstractFileSystem, path: str, label: str, *, source: str
) -> tuple[pl.DataFrame, pl.DataFrame]:
    """A CSV file as all-String columns with a 1-based ``ROW`` column, and quarantine rows.

    The file must be UTF-8. If it is not, it is decoded with replacement characters and every
    row holding one is quarantined (its text would otherwise hash to a wrong input id).
    """
    data = read_bytes(fs, path, label)
    try:
        data.decode("utf-8")
        lossy = False
    except UnicodeDecodeError:
        lossy = True
    try:
        df = pl.read_csv(
            io.BytesIO(data),
            infer_schema=False,
            encoding="utf8-lossy" if lossy else "utf8",
            truncate_ragged_lines=False,
        )
    except Exception as exc:  # noqa: BLE001 - polars raises several error types
        raise UnreadableSource(f"{label}: not a readable CSV file: {exc}") from exc
    df = df.with_row_index(ROW, offset=1)
    if not lossy:
        return df, empty("quarantine")
    text_cols = [c for c in df.columns if c != ROW]
    bad = pl.any_horizontal([pl.col(c).str.contains("\ufffd", literal=True) for c in text_cols])
    return apply_checks(
        df,
        [Check(bad, "row", "not valid UTF-8 (undecodable bytes in this row)")],
        source=source,
        file=label,
        record=row_label(),
    )


# ------------------------------------------------------------------------------ quarantine
@dataclass(frozen=True)
class Check:
    """A row rule: rows where ``bad`` is true go to quarantine with ``field`` and ``reason``.

    ``field`` and ``reason`` are text or expressions; ``value`` (an expression) is the
    offending value written to the quarantine row.
    """

    bad: pl.Expr
    field: str | pl.Expr
    reason: str | pl.Expr
    value: pl.Expr | None = None


def row_label(prefix: str = "row") -> pl.Expr:
    """``row 12`` from the ``ROW`` column."""
    return pl.format(f"{prefix} {{}}", pl.col(ROW))


def quarantine_rows(
    df: pl.DataFrame,
    *,
    source: str,
    file: str,
    record: pl.Expr,
    field: str | pl.Expr,
    reason: str | pl.Expr,
    value: pl.Expr | None = None,
) -> pl.DataFrame:
    """One quarantine row per row of ``df`` (all columns evaluated on ``df``)."""
    if df.height == 0:
        return empty("quarantine")
    as_expr = lambda x: pl.lit(x, pl.String) if isinstance(x, str) else x  # noqa: E731
    value_expr = (
        pl.lit(None, pl.String) if value is None else value.cast(pl.String).str.slice(0, 200)
    )
    return df.select(
        pl.lit(source, pl.String).alias("source"),
        pl.lit(file, pl.String).alias("file"),
        record.cast(pl.String).alias("record"),
        as_expr(field).cast(pl.String).alias("field"),
        as_expr(reason).cast(pl.String).alias("reason"),
        value_expr.alias("value"),
    )


def apply_checks(
    df: pl.DataFrame, checks: list[Check], *, source: str, file: str, record: pl.Expr
) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Split ``df`` into rows passing every check and quarantine rows (first failed check)."""
    parts = [empty("quarantine")]
    for check in checks:
        bad = check.bad.fill_null(True)
        failing = df.filter(bad)
        if failing.height:
            parts.append(
                quarantine_rows(
                    failing,
                    source=source,
                    file=file,
                    record=record,
                    field=check.field,
                    reason=check.reason,
                    value=check.value,
                )
            )
            df = df.filter(~bad)
    return df, pl.concat(parts, how="vertical_relaxed")


def drop_duplicates(
    df: pl.DataFrame,
    key: list[str],
    *,
    source: str,
    file: str,
    record: pl.Expr,
    field: str | pl.Expr,
    what: str,
    value: str | None = None,
) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Keep the first row of each ``key``; quarantine the others, naming the kept record.

    The quarantine record reads ``row 12 (repeats row 3)``; the reason is the same sentence for
    every repeat, so reasons group well in reports.

    With ``value`` (a column), the reason says whether the dropped row's value equals the kept
    one (a repeated record) or differs (a conflicting record: the first is kept).
    """
    first = pl.struct(key).is_first_distinct()
    if df.height == 0 or df.select(first.all()).item():
        return df, empty("quarantine")
    df = df.with_columns(__first=first)
    kept = df.filter(pl.col("__first")).drop("__first")
    dup = df.filter(~pl.col("__first")).drop("__first")
    ref = kept.join(dup.select(key).unique(), on=key, how="semi", nulls_equal=True)
    ref_cols = [record.cast(pl.String).alias("__kept")]
    if value is not None:
        ref_cols.append(pl.col(value).alias("__kept_value"))
    dup = dup.join(ref.select(*key, *ref_cols), on=key, how="left", nulls_equal=True)
    if value is None:
        detail = pl.lit("")
    else:
        detail = (
            pl.when(pl.col(value).eq_missing(pl.col("__kept_value")))
            .then(pl.lit(" (same value)"))
            .otherwise(pl.lit(" (different value)"))
        )
    reason = pl.format(f"duplicate {what}; the first is kept{{}}", detail)
    bad = quarantine_rows(
        dup,
        source=source,
        file=file,
        record=pl.format("{} (repeats {})", record, "__kept"),
        field=field,
        reason=reason,
        value=None if value is None else pl.col(value),
    )
    return kept, bad


def with_input_ids(df: pl.DataFrame, text: str) -> pl.DataFrame:
    """``df`` plus ``input_id`` of its ``text`` column; each distinct text is hashed once."""
    distinct = df.select(pl.col(text).unique())
    distinct = distinct.with_columns(input_id=input_ids(distinct[text]))
    return df.join(distinct, on=text, how="left", nulls_equal=True, maintain_order="left")


def empty_text(column: str) -> pl.Expr:
    """True where a text column is null or only whitespace."""
    return pl.col(column).is_null() | (pl.col(column).str.strip_chars() == "")


# ----------------------------------------------------------------------------------- JSON
@dataclass(frozen=True)
class ParseFailure:
    """A JSON record (or the rest of a JSON array) that could not be parsed.

    ``reason`` is a stable sentence (quarantine reasons group well); ``detail`` is the parser's
    message, written as the quarantine row's value.
    """

    reason: str
    detail: str
    rest_lost: bool  # True: the stream stopped here and later records were not read


def json_kind(head: bytes) -> str | None:
    """``"array"``, ``"lines"`` or None, from the first bytes of a file."""
    text = head.lstrip(b"\xef\xbb\xbf \t\r\n")
    if text.startswith(b"["):
        return "array"
    if text.startswith(b"{"):
        return "lines"
    return None


def iter_json_records(
    fs: fsspec.AbstractFileSystem, path: str, label: str
) -> Iterator[tuple[str, Any]]:
    """Every record of a JSON array or JSON Lines file as ``(record label, value)``.

    A record that cannot be parsed comes as a ``ParseFailure`` value. In a JSON array a parse
    error ends the stream (nothing after it can be found); in JSON Lines only that line is lost.
    A file that is empty, not JSON, or whose very first record fails raises ``UnreadableSource``.
    """
    kind = json_kind(read_head(fs, path, 4096))
    if kind is None:
        if not read_head(fs, path, 4096).strip():
            raise UnreadableSource(f"{label}: file is empty")
        raise UnreadableSource(f"{label}: not JSON (expected a JSON array or JSON Lines)")
    records = _iter_array(fs, path) if kind == "array" else _iter_lines(fs, path)
    n_good = 0
    for name, value in records:
        if isinstance(value, ParseFailure) and n_good == 0 and value.rest_lost:
            raise UnreadableSource(f"{label}: not valid JSON at {name}: {value.detail}")
        if not isinstance(value, ParseFailure):
            n_good += 1
        yield name, value
    if n_good == 0 and kind == "lines":
        # Every line failed (or there were none): nothing in the file is JSON Lines.
        raise UnreadableSource(f"{label}: no valid JSON record in the file")


def _iter_lines(fs: fsspec.AbstractFileSystem, path: str) -> Iterator[tuple[str, Any]]:
    """Lines of a JSON Lines file, each parsed on its own (blank lines skipped)."""
    with fs.open(path, "rb") as f:
        for n, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            try:
                yield f"line {n}", json.loads(raw.decode("utf-8"))
            except UnicodeDecodeError as exc:
                yield (
                    f"line {n}",
                    ParseFailure("line is not valid UTF-8", str(exc), rest_lost=False),
                )
            except json.JSONDecodeError as exc:
                yield f"line {n}", ParseFailure("invalid JSON line", str(exc), rest_lost=False)


def _iter_array(fs: fsspec.AbstractFileSystem, path: str) -> Iterator[tuple[str, Any]]:
    """Items of a JSON array, streamed; NaN/Infinity literals (Python's json) are read as null."""
    n = 0
    try:
        with fs.open(path, "rb") as f:
            for item in ijson.items(f, "item", use_float=True):
                n += 1
                yield f"record {n}", item
        return
    except ijson.JSONError as exc:
        if not _non_finite_literal(str(exc)):
            yield f"record {n + 1}", _broken_array(exc)
            return
    # The file uses NaN/Infinity (not JSON, but Python's json writes them): read it again
    # through a filter that turns them into null, skipping the records already given.
    seen = n
    n = 0
    try:
        with fs.open(path, "rb") as f:
            for item in ijson.items(_NonFiniteAsNull(f), "item", use_float=True):
                n += 1
                if n > seen:
                    yield f"record {n}", item
    except ijson.JSONError as exc:
        yield f"record {n + 1}", _broken_array(exc)


def _broken_array(exc: Exception) -> ParseFailure:
    lines = str(exc).strip().splitlines()
    return ParseFailure(
        "invalid JSON here: the rest of the file is not read",
        lines[0] if lines else type(exc).__name__,
        rest_lost=True,
    )


def _non_finite_literal(message: str) -> bool:
    """Whether a yajl error points at a bare NaN / Infinity token."""
    return "lexical error" in message and bool(re.search(r"\b(NaN|-?Infinity)\b", message))


_NON_FINITE = re.compile(rb"([:\[,]\s*)(?:NaN|-?Infinity)(?=\s*[,\]}])")


class _NonFiniteAsNull:
    """A byte stream that rewrites bare ``NaN``/``Infinity`` JSON values to ``null``.

    Text is cut at the last comma of each chunk so that no token straddles two chunks. (The
    pattern could also match inside a string value; this reader is used only for files that
    already failed because they hold such literals.)
    """

    def __init__(self, raw, chunk: int = 1 << 20):
        self._raw = raw
        self._chunk = chunk
        self._carry = b""
        self._out = b""
        self._eof = False

    def read(self, size: int = -1) -> bytes:
        while not self._eof and (size < 0 or len(self._out) < size):
            self._fill()
        if size < 0:
            size = len(self._out)
        data, self._out = self._out[:size], self._out[size:]
        return data

    def _fill(self) -> None:
        data = self._raw.read(self._chunk)
        buf = self._carry + data
        if not data:
            self._eof = True
            self._out += _NON_FINITE.sub(rb"\1null", buf)
            self._carry = b""
            return
        cut = buf.rfind(b",")
        if cut < 0:
            self._carry = buf
            return
        self._out += _NON_FINITE.sub(rb"\1null", buf[: cut + 1])[:-1]
        self._carry = buf[cut:]


def first_json_record(fs: fsspec.AbstractFileSystem, path: str, limit: int = 4 << 20) -> Any:
    """The first record of a JSON array or JSON Lines file, reading at most ``limit`` bytes.

    Returns None when the file is not JSON or the first record is larger than ``limit``.
    """
    kind = json_kind(read_head(fs, path, 4096))
    try:
        with fs.open(path, "rb") as f:
            if kind == "array":
                return next(ijson.items(_Limited(f, limit), "item", use_float=True), None)
            if kind == "lines":
                return json.loads(_first_line(f, limit).decode("utf-8"))
    except Exception:  # noqa: BLE001 - any parse failure means "not this format"
        return None
    return None


def _first_line(f, limit: int, chunk: int = 1 << 16) -> bytes:
    """The bytes of a file up to its first newline, reading at most ``limit`` bytes."""
    buf = b""
    while len(buf) < limit:
        data = f.read(min(chunk, limit - len(buf)))
        if not data:
            break
        buf += data
        if (end := buf.find(b"\n")) >= 0:
            return buf[:end]
    return buf


class _Limited:
    """A byte stream that ends after ``limit`` bytes (only ``read``: ijson then uses it)."""

    def __init__(self, raw, limit: int):
        self._raw = raw
        self._left = limit

    def read(self, size: int = -1) -> bytes:
        if self._left <= 0:
            return b""
        size = self._left if size < 0 else min(size, self._left)
        data = self._raw.read(size)
        self._left -= len(data)
        return data
