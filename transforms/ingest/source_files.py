"""Reading source files: helpers shared by the table and JSON readers (not a reader itself).

The reader contract (what every reader returns: ``IngestResult``, ``Collector``, the value
checks ``to_float``/``text_problem``) is ``base``; the registry of readers and ``discover`` are
the package's ``__init__``. This module holds what readers use to get at a file's rows:

- file access through fsspec: listing the files under a root, reading bytes, CSV headers and
  Parquet schemas without reading the data;
- CSV text with a UTF-8 check (rows with invalid bytes are quarantined, not the whole file);
- vectorised quarantine: ``apply_checks`` splits off rows that break a rule, ``drop_duplicates``
  keeps the first of several rows with one key;
- JSON records streamed one at a time from a JSON array (ijson) or JSON Lines, with parse errors
  reported as ``ParseFailure`` items so the caller can quarantine them and keep what came before;
- what is not JSON in a JSON array, under ``benchroute.io``'s one policy: each invalid byte (and
  each lone surrogate escape such as ``\\udcff``) is read as ``BAD_TEXT`` (U+FDD0, a Unicode
  noncharacter), so the array parses on and ``text_problem`` finds the record that held it
  (readers quarantine that record, not the rest of the file); bare ``NaN``/``Infinity`` tokens
  are read as the strings ``"NaN"``/``"Infinity"`` (``to_float``: non-finite); a JSON Lines line
  with invalid bytes is quarantined;
- column types checked before use (``require_types``): a wrong type makes the unit unreadable,
  with the file, the column, its type and the type expected.

Records are numbered from 1 in quarantine rows: ``row 1`` is the first data row of a table
(after a CSV header), ``record 1`` the first item of a JSON array, ``line 1`` the first line of a
JSON Lines file.
"""

from __future__ import annotations

import codecs
import csv
import io
import json
import posixpath
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import fsspec
import ijson
import polars as pl
import pyarrow.parquet as pq
from fsspec.core import url_to_fs

from benchroute.io import JSON_PARSE_ERRORS, TolerantJson, iter_json, loads
from benchroute.schemas import empty
from benchroute.transforms.ids import input_ids

from .base import BAD_TEXT, UnreadableSource, printable, text_problem  # noqa: F401

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


def not_parquet_reason(fs: fsspec.AbstractFileSystem, path: str) -> str:
    """Why ``path`` has no readable Parquet footer, in words (for ``UnreadableSource``)."""
    try:
        if fs.isdir(path):
            return "is a folder, not a file"
        if not fs.exists(path):
            return "file not found (a missing file or a dangling link)"
        if fs.size(path) == 0:
            return "file is empty (0 bytes)"
    except OSError as exc:
        return f"cannot read file: {exc}"
    return "not a readable Parquet file"


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


# Column kinds ``require_types`` accepts, each with the polars types that qualify.
def _is_text(dtype: pl.DataType) -> bool:
    return dtype in (pl.String, pl.Categorical, pl.Null) or isinstance(dtype, pl.Enum)


def _is_int(dtype: pl.DataType) -> bool:
    return dtype.is_integer() or dtype == pl.Null


def _is_number(dtype: pl.DataType) -> bool:
    return dtype.is_numeric() or dtype in (pl.Boolean, pl.Null)


def _is_flag(dtype: pl.DataType) -> bool:
    """A correctness flag: bool, or a number (0/1)."""
    return _is_number(dtype)


def _is_number_or_text(dtype: pl.DataType) -> bool:
    return _is_number(dtype) or _is_text(dtype)


def _is_text_list(dtype: pl.DataType) -> bool:
    return isinstance(dtype, (pl.List, pl.Array)) and _is_text(dtype.inner)


COLUMN_KINDS = {
    "text": (_is_text, "text (string)"),
    "int": (_is_int, "an integer"),
    "number": (_is_number, "a number"),
    "flag": (_is_flag, "a bool or 0/1 number"),
    "number_or_text": (_is_number_or_text, "a number or text"),
    "text_list": (_is_text_list, "a list of strings"),
    "scalar_text": (_is_number_or_text, "text (or a number, read as text)"),
}
# What each kind's columns are cast to once checked (kinds not listed are left as they are).
_CAST_TO = {"text": pl.String, "scalar_text": pl.String, "flag": pl.Float64, "number": pl.Float64}


def require_types(df: pl.DataFrame, kinds: dict[str, str], label: str) -> pl.DataFrame:
    """``df`` with its columns cast to their kind's type (text as ``String``, numbers and flags
    as ``Float64``); a column of another type than its kind (see ``COLUMN_KINDS``) makes the
    unit unreadable, naming the file, the column and both types.

    Columns absent from ``df`` are not checked (callers check required columns first).
    """
    wrong = []
    for column, kind in kinds.items():
        if column not in df.columns:
            continue
        ok, expected = COLUMN_KINDS[kind]
        if not ok(df.schema[column]):
            wrong.append(f"column {column!r} is {df.schema[column]}, expected {expected}")
    if wrong:
        raise UnreadableSource(f"{label}: wrong column type: {'; '.join(wrong)}")
    casts = [
        pl.col(c).cast(_CAST_TO[kind])
        for c, kind in kinds.items()
        if c in df.columns and kind in _CAST_TO and df.schema[c] != _CAST_TO[kind]
    ]
    return df.with_columns(casts) if casts else df


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


_BOMS = (
    (b"\x00\x00\xfe\xff", "UTF-32"),
    (b"\xff\xfe\x00\x00", "UTF-32"),
    (b"\xfe\xff", "UTF-16"),
    (b"\xff\xfe", "UTF-16"),
)


def iter_json_records(
    fs: fsspec.AbstractFileSystem, path: str, label: str
) -> Iterator[tuple[str, Any]]:
    """Every record of a JSON array or JSON Lines file as ``(record label, value)``.

    A record that cannot be parsed comes as a ``ParseFailure`` value. In a JSON array a parse
    error ends the stream (nothing after it can be found); in JSON Lines only that line is lost.
    Bytes that are not valid UTF-8 do not end a JSON array: they are read as ``BAD_TEXT`` and the
    reader quarantines the record holding them (``text_problem``). A file that is empty, not
    JSON, UTF-16/32 encoded, or whose very first record fails raises ``UnreadableSource``.
    """
    head = read_head(fs, path, 4096)
    kind = json_kind(head)
    if kind is None:
        if not head.strip():
            raise UnreadableSource(f"{label}: file is empty")
        for bom, encoding in _BOMS:
            if head.startswith(bom):
                raise UnreadableSource(
                    f"{label}: encoded as {encoding} (byte-order mark), not UTF-8"
                )
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


def parsed_json_records(
    fs: fsspec.AbstractFileSystem, path: str, label: str, col
) -> Iterator[tuple[str, Any]]:
    """``iter_json_records`` less its failures: each ``ParseFailure`` is quarantined on ``col``
    (a ``Collector``) under ``label``, in its place in the stream, and skipped."""
    for record, item in iter_json_records(fs, path, label):
        if isinstance(item, ParseFailure):
            col.quarantine(label, record, None, item.reason, item.detail)
        else:
            yield record, item


def _iter_lines(fs: fsspec.AbstractFileSystem, path: str) -> Iterator[tuple[str, Any]]:
    """Lines of a JSON Lines file, each parsed on its own (blank lines skipped)."""
    with fs.open(path, "rb") as f:
        for n, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            try:
                yield f"line {n}", loads(raw.decode("utf-8"))
            except UnicodeDecodeError as exc:
                yield (
                    f"line {n}",
                    ParseFailure("line is not valid UTF-8", str(exc), rest_lost=False),
                )
            except (json.JSONDecodeError, RecursionError) as exc:
                yield f"line {n}", ParseFailure("invalid JSON line", str(exc), rest_lost=False)


def _iter_array(fs: fsspec.AbstractFileSystem, path: str) -> Iterator[tuple[str, Any]]:
    """Items of a JSON array, read by ``benchroute.io.iter_json`` under its one policy for what
    is not JSON: bare NaN/Infinity tokens (Python's json writes them) as the strings ``"NaN"``,
    ``"Infinity"``, ``"-Infinity"`` (``to_float`` reads them as the non-finite number), numbers
    beyond yajl's range (integers of 19 digits or more, exponents of three digits) as text
    (``to_float`` reads them, ``1e999`` as infinite), text that is not Unicode as ``BAD_TEXT``."""
    n = 0
    try:
        for item in iter_json(lambda: fs.open(path, "rb"), "item"):
            n += 1
            yield f"record {n}", item
    except JSON_PARSE_ERRORS as exc:
        yield f"record {n + 1}", _broken_array(exc)


def _broken_array(exc: Exception) -> ParseFailure:
    lines = str(exc).strip().splitlines()
    return ParseFailure(
        "invalid JSON here: the rest of the file is not read",
        lines[0] if lines else type(exc).__name__,
        rest_lost=True,
    )


_BAD_BYTES_HANDLER = "benchroute-bad-text"
codecs.register_error(_BAD_BYTES_HANDLER, lambda exc: (BAD_TEXT, exc.end))


def decode_lossy(data: bytes) -> str:
    """UTF-8 text with each invalid byte sequence replaced by ``BAD_TEXT``."""
    return data.decode("utf-8", _BAD_BYTES_HANDLER)


def first_json_record(fs: fsspec.AbstractFileSystem, path: str, limit: int = 4 << 20) -> Any:
    """The first record of a JSON array or JSON Lines file, reading at most ``limit`` bytes.

    Read under ``benchroute.io``'s JSON policy (text that is not valid UTF-8 as ``BAD_TEXT``, NaN
    and huge numbers as strings; the record's shape decides the format; the reader quarantines
    what is bad). Returns None when
    the file is not JSON or the first record is larger than ``limit``.
    """
    kind = json_kind(read_head(fs, path, 4096))
    try:
        with fs.open(path, "rb") as f:
            if kind == "array":
                stream = TolerantJson(_Limited(f, limit))  # only its shape matters
                return next(ijson.items(stream, "item", use_float=True), None)
            if kind == "lines":
                return loads(decode_lossy(_first_line(f, limit)))
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
