"""The data store: canonical tables as Parquet parts under one fsspec URL, with a commit log.

Layout under the root (a local path, ``memory://…``, ``s3://…``)::

    tables/<table>/part-<batch>.parquet   immutable data parts
    _log/<seq>.json                        one commit per batch, numbered 0000000001, 0000000002…

A part is visible only once a commit names it, and the commit file is written last in one put,
so a crash at any point leaves the store exactly as it was after the previous commit (the
orphaned parts are ignored and removed by ``gc``). A commit *appends* parts to a table or
*replaces* a table's parts (derived tables such as labels), and records which source units (with
their content fingerprints) it ingested, so re-ingesting an unchanged unit is a no-op. A commit
written by ``Store.commit`` also records, in ``info["part_models"]``, the model names in each
outcome part it wrote (``recorded_part_models``: what ``Appender`` de-duplicates against).
"""

from __future__ import annotations

import datetime as dt
import json
import os
import re
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
from fsspec.core import url_to_fs

from benchroute.io import exclusive_put, fresh_ls, is_local
from benchroute.schemas import KEYS, TABLES, empty

_TABLE_NAME = re.compile(r"^[a-z0-9_][a-z0-9_./=-]*$")
LOG_DIR = "_log"
# Commit info key, written by ``Store.commit`` only: {outcome part's relative path: the sorted
# model names in it}, for the outcome parts that commit wrote (``recorded_part_models``).
PART_MODELS = "part_models"


class StoreError(RuntimeError):
    """The store cannot be read or written as asked."""


@dataclass(frozen=True)
class Commit:
    seq: int
    batch: str
    created: str
    append: dict[str, list[str]]
    replace: dict[str, list[str]]
    units: dict[str, str]
    info: dict

    @classmethod
    def from_json(cls, data: dict) -> Commit:
        return cls(
            seq=int(data["seq"]),
            batch=data["batch"],
            created=data["created"],
            append=data.get("append", {}),
            replace=data.get("replace", {}),
            units=data.get("units", {}),
            info=data.get("info", {}),
        )


class Store:
    """Parquet tables at an fsspec URL (see module docstring for the layout)."""

    def __init__(self, url: str, **storage_options):
        self.url = str(url).rstrip("/")
        self.fs, self.root = url_to_fs(self.url, **storage_options)
        self.root = self.root.rstrip("/")
        self._written: dict[tuple[str, str], int] = {}  # parts written per (table, batch)

    # ---------------------------------------------------------------- paths
    def path(self, *parts: str) -> str:
        return "/".join([self.root, *parts])

    def url_of(self, relpath: str) -> str:
        full = self.path(relpath)
        if is_local(self.fs):
            return full
        protocol = self.fs.protocol[0] if isinstance(self.fs.protocol, tuple) else self.fs.protocol
        return f"{protocol}://{full.lstrip('/')}"

    # ---------------------------------------------------------------- log
    def commits(self) -> list[Commit]:
        """Every commit, oldest first."""
        names = sorted(p for p in fresh_ls(self.fs, self.path(LOG_DIR)) if p.endswith(".json"))
        out = []
        for name in names:
            with self.fs.open(name, "rb") as f:
                try:
                    out.append(Commit.from_json(json.loads(f.read())))
                except (ValueError, KeyError) as exc:
                    raise StoreError(f"{self.url}: commit file {name} is corrupt: {exc}") from exc
        return sorted(out, key=lambda c: c.seq)

    def parts(self, table: str, commits: list[Commit] | None = None) -> list[str]:
        """Relative paths of the parts that make up ``table`` now."""
        parts: list[str] = []
        for c in self.commits() if commits is None else commits:
            if table in c.replace:
                parts = list(c.replace[table])
            parts.extend(c.append.get(table, []))
        return parts

    def iter_batches(self, rel: str, columns: list[str], batch_size: int = 1_000_000):
        """One part's ``columns`` as polars frames of at most ``batch_size`` rows (memory: one
        batch, not the part)."""
        with self.fs.open(self.path(rel), "rb") as f:
            for batch in pq.ParquetFile(f).iter_batches(batch_size=batch_size, columns=columns):
                yield pl.from_arrow(batch)

    def batches(self, table: str, columns: list[str], batch_size: int = 1_000_000):
        """``table``'s ``columns`` as frames of at most ``batch_size`` rows, part after part
        (``iter_batches``): the whole table in bounded memory."""
        for rel in self.parts(table):
            yield from self.iter_batches(rel, columns, batch_size)

    def tables(self) -> list[str]:
        names: set[str] = set()
        for c in self.commits():
            names.update(c.append)
            names.update(c.replace)
        return sorted(names)

    def units(self) -> dict[str, str]:
        """Source units ingested so far: unit key -> content fingerprint of its last ingest."""
        out: dict[str, str] = {}
        for c in self.commits():
            out.update(c.units)
        return out

    # ---------------------------------------------------------------- read
    def read(self, table: str, columns: list[str] | None = None) -> pl.DataFrame:
        """The whole table as one frame (empty, with the declared columns, if never written): the
        rows of its parts concatenated as stored. Rows are not de-duplicated by key here; writers
        keep keys unique (``Appender``, ``new_rows``)."""
        return self.read_parts(table, self.parts(table), columns)

    def read_parts(self, table: str, parts: list[str], columns: list[str] | None = None) -> pl.DataFrame:
        """The rows of the given parts of ``table`` (relative paths as ``parts`` returns them;
        e.g. only the parts committed since some commit), concatenated as ``read`` does."""
        frames = []
        for rel in parts:
            with self.fs.open(self.path(rel), "rb") as f:
                frames.append(pl.read_parquet(f, columns=columns))
        if not frames:
            base = empty(table) if table in TABLES else pl.DataFrame()
            return base.select(columns) if columns and base.width else base
        # Not rechunked: one copy of the rows in memory, not two.
        return pl.concat(frames, how="vertical_relaxed", rechunk=False)

    # ---------------------------------------------------------------- write
    def commit(
        self,
        *,
        append: Mapping[str, pl.DataFrame] | None = None,
        replace: Mapping[str, pl.DataFrame] | None = None,
        units: Mapping[str, str] | None = None,
        info: Mapping | None = None,
    ) -> Commit:
        """Write the frames as new parts, then make them visible in one commit.

        Empty appended frames write nothing; an empty replacement empties the table. The commit's
        ``info`` gets ``PART_MODELS``: the model names in each outcome part written here, taken
        from the very frame written (none for a part with a null model: it is read instead).
        """
        info = _caller_info(info)
        batch = new_batch()
        written_append: dict[str, list[str]] = {}
        written_replace: dict[str, list[str]] = {}
        part_models: dict[str, list[str]] = {}

        def write(table: str, df: pl.DataFrame) -> str:
            rel = self.write_part(table, df, batch)
            if table == "outcomes" and "model" in df.columns and not df["model"].has_nulls():
                part_models[rel] = sorted(df["model"].unique().to_list())
            return rel

        for table, df in (append or {}).items():
            if df.height:
                written_append[table] = [write(table, df)]
        for table, df in (replace or {}).items():
            written_replace[table] = [write(table, df)] if df.height else []
        if part_models:
            info[PART_MODELS] = part_models
        return self._commit(batch, written_append, written_replace, units, info)

    def commit_parts(
        self,
        batch: str,
        *,
        append: Mapping[str, list[str]] | None = None,
        replace: Mapping[str, list[str]] | None = None,
        units: Mapping[str, str] | None = None,
        info: Mapping | None = None,
    ) -> Commit:
        """Make parts already written with ``write_part`` (under ``batch``) visible in one commit:
        for a table written a part at a time (memory: one part), e.g. an out-of-core relabel.
        No ``PART_MODELS`` record (the parts' contents are not seen here): readers that want
        an outcome part's models read them from the part."""
        return self._commit(batch, append, replace, units, _caller_info(info))

    def _commit(self, batch, append, replace, units, info: dict) -> Commit:
        return self._write_commit(
            batch,
            append={t: list(v) for t, v in (append or {}).items() if v},
            replace={t: list(v) for t, v in (replace or {}).items()},
            units=dict(units or {}),
            info=info,
        )

    def append_arrow(
        self, table: str, data: pa.Table, *, info: Mapping | None = None, **parquet_options
    ) -> Commit:
        """Append one part written from a pyarrow table with ``pyarrow.parquet.write_table``
        options (e.g. per-column encodings, schema metadata kept), then commit it. As with
        ``commit``, the part is invisible until its commit lands."""
        if data.num_rows == 0:
            raise StoreError(f"{self.url}: append_arrow({table!r}) with no rows")
        batch = new_batch()
        rel = self._part_path(table, batch)
        with self.fs.open(self.path(rel), "wb") as f:
            pq.write_table(data, f, **parquet_options)
        return self._write_commit(batch, append={table: [rel]}, replace={}, units={},
                                  info=_caller_info(info))

    def _part_path(self, table: str, batch: str) -> str:
        if not _TABLE_NAME.match(table) or ".." in table:
            raise StoreError(f"invalid table name {table!r}")
        self.fs.makedirs(self.path("tables", table), exist_ok=True)
        # Batch ids are unique to one writer, so counting its parts here names them apart.
        n = self._written.get((table, batch), 0)
        self._written[(table, batch)] = n + 1
        return f"tables/{table}/part-{batch}{f'-{n:05d}' if n else ''}.parquet"

    def write_part(self, table: str, df: pl.DataFrame, batch: str) -> str:
        """Write ``df`` as a new part of ``table`` under ``batch`` (``new_batch()``); it stays
        invisible until a commit names it (``commit_parts``). Returns its relative path."""
        rel = self._part_path(table, batch)
        with self.fs.open(self.path(rel), "wb") as f:
            df.write_parquet(f, compression="zstd", statistics=True)
        return rel

    def part_rows(self, rel: str) -> int:
        """A part's row count, from its Parquet footer (no data read)."""
        with self.fs.open(self.path(rel), "rb") as f:
            return pq.ParquetFile(f).metadata.num_rows

    def _write_commit(self, batch: str, **fields) -> Commit:
        log = self.path(LOG_DIR)
        self.fs.makedirs(log, exist_ok=True)
        for _ in range(100):
            seq = self._next_seq()
            entry = {
                "seq": seq,
                "batch": batch,
                "created": dt.datetime.now(dt.UTC).isoformat(),
                **fields,
            }
            payload = json.dumps(entry, indent=1, sort_keys=True).encode()
            target = self.path(LOG_DIR, f"{seq:010d}.json")
            try:
                exclusive_put(self.fs, target, payload)
            except FileExistsError:
                continue  # another writer took this number: take the next one
            return Commit.from_json(entry)
        raise StoreError(f"{self.url}: could not claim a commit number after 100 tries")

    def _next_seq(self) -> int:
        names = [os.path.basename(p) for p in fresh_ls(self.fs, self.path(LOG_DIR))]
        seqs = [int(n[:-5]) for n in names if n.endswith(".json") and n[:-5].isdigit()]
        return max(seqs, default=0) + 1

    # ---------------------------------------------------------------- upkeep
    def gc(self) -> list[str]:
        """Remove parts that no commit references (left by crashed writers). Returns them."""
        referenced: set[str] = set()
        for c in self.commits():
            for paths in (*c.append.values(), *c.replace.values()):
                referenced.update(paths)
        tables_dir = self.path("tables")
        if not self.fs.exists(tables_dir):
            return []
        removed = []
        for full in self.fs.find(tables_dir):
            rel = full[len(self.root) + 1 :] if full.startswith(self.root) else full
            if rel.endswith(".parquet") and rel not in referenced:
                self.fs.rm(full)
                removed.append(rel)
        return removed


def _caller_info(info: Mapping | None) -> dict:
    """A caller's commit ``info``, copied; ``PART_MODELS`` is refused there (only ``Store.commit``
    writes it, from the frames it writes, so that a record is never a caller's claim)."""
    info = dict(info or {})
    if PART_MODELS in info:
        raise StoreError(f"commit info key {PART_MODELS!r} is written by Store.commit only")
    return info


def recorded_part_models(commits: Iterable[Commit]) -> dict[str, frozenset[str]]:
    """Outcome part -> the model names ``Store.commit`` recorded for it (``PART_MODELS``).

    A record is only taken from the commit that wrote the part: its path must be one that commit
    makes visible in ``outcomes`` and be named for that commit's batch (``part-<batch>…``).
    Anything else (a malformed record, a path the commit did not write, e.g. an older part
    re-listed by a ``replace``) is ignored, and the part's models must then be read from it.
    Should two commits record the same path, the union is returned: more models only means more
    parts are checked. Why the record can be trusted: see ``Appender``.
    """
    out: dict[str, frozenset[str]] = {}
    for c in commits:
        record = c.info.get(PART_MODELS)
        if not isinstance(record, dict):
            continue
        named = set(c.append.get("outcomes", [])) | set(c.replace.get("outcomes", []))
        stem = f"tables/outcomes/part-{c.batch}"
        for rel, models in record.items():
            own = rel in named and (rel == f"{stem}.parquet"
                                    or re.fullmatch(re.escape(stem) + r"-\d{5}\.parquet", rel))
            if not (own and isinstance(models, list) and all(isinstance(m, str) for m in models)):
                continue
            out[rel] = out.get(rel, frozenset()) | frozenset(models)
    return out


def new_batch() -> str:
    """A fresh batch id: the name stem of the parts one commit writes (time-ordered, unique)."""
    return dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%S") + "-" + uuid.uuid4().hex[:8]


def new_rows(existing: pl.DataFrame, incoming: pl.DataFrame, table: str) -> pl.DataFrame:
    """Rows of ``incoming`` whose key is not in ``existing`` (and not repeated in incoming)."""
    key = KEYS[table]
    incoming = incoming.unique(key, keep="first", maintain_order=True)
    if existing.height == 0 or incoming.height == 0:
        return incoming
    return incoming.join(existing.select(key), on=key, how="anti", nulls_equal=True)


def concat_tables(results: Iterable[Mapping[str, pl.DataFrame]]) -> dict[str, pl.DataFrame]:
    """Stack the per-unit frames table by table."""
    stacked: dict[str, list[pl.DataFrame]] = {}
    for tables in results:
        for name, df in tables.items():
            stacked.setdefault(name, []).append(df)
    return {
        name: pl.concat(frames, how="vertical_relaxed") if frames else empty(name)
        for name, frames in stacked.items()
    }


class Appender:
    """Appends ingested frames to a store, keeping only rows whose key is new.

    The key columns of the tables with a row per input or per model (inputs, memberships,
    models, quarantine) are loaded once, so appending many batches costs one read of them. The
    outcomes' keys (a row per input × model × metric: hundreds of millions on a leaderboard) are
    never all loaded: an incoming batch is checked only against the stored parts that hold one
    of its models, one batch of their key columns at a time. Which models a part holds comes
    from the commit that wrote it (``recorded_part_models``), else from the part's model column,
    read once per run; so a batch of new models reads no part at all on a store whose outcome
    parts were all written by ``Store.commit``. Not safe against a second writer appending the
    same rows at the same time (the commit itself is): both would commit them, and
    ``Store.read`` returns such repeated keys as stored (it does not de-duplicate).

    Why a recorded model set may be trusted instead of read: a wrong record could only let
    duplicates through by *missing* a model the part holds (then the part is skipped). The
    record is written by ``Store.commit`` from the very frame it writes, in the commit that
    makes the part visible; commit files are created exclusively and never rewritten, and a
    caller cannot supply the record (``PART_MODELS`` is refused in callers' ``info``). Parts are
    not content-addressed but are immutable: a part's path holds its writer's batch id
    (``new_batch``: time plus 32 random bits, never shared by two writers; ``Store.commit``
    always takes a fresh one) and that writer's counter, so no path is written twice unless a
    caller hands ``write_part`` a batch id already used; ``gc`` removes only parts no commit
    names; a ``replace`` writes new parts under a new batch (a part it re-lists is the same
    file, still described by the record of the commit that wrote it; a part it drops is no
    longer consulted). Records are taken only for parts the recording commit itself made
    visible, under its own batch, and records of one path are united (more models: more parts
    checked, never fewer). A part file changed in place (a batch id reused by hand, an outside
    tool) would make its record stale, but it would equally break everything else that takes a
    part's path for its content (``Store.read``, which returns whatever the listed paths hold
    now; the labels' basis, a digest of part paths): the record relies on no assumption the
    store does not already make.
    """

    TABLES = ("inputs", "memberships", "outcomes", "models", "quarantine")
    IN_MEMORY = ("inputs", "memberships", "models", "quarantine")

    def __init__(self, store: Store):
        self.store = store
        commits = store.commits()  # one read of the log for every table below
        self._keys = {t: store.read_parts(t, store.parts(t, commits), KEYS[t])
                      for t in self.IN_MEMORY}
        self._outcome_parts = store.parts("outcomes", commits)
        recorded = recorded_part_models(commits)
        self._models_of: dict[str, frozenset[str]] = {
            rel: recorded[rel] for rel in self._outcome_parts if rel in recorded
        }

    def append(
        self, tables: Mapping[str, pl.DataFrame], units: Mapping[str, str], info: Mapping
    ) -> dict[str, pl.DataFrame]:
        """Commit the new rows of ``tables`` and record ``units``; returns the rows added."""
        fresh = {}
        for name in self.TABLES:
            df = tables.get(name)
            df = empty(name) if df is None else df
            fresh[name] = (self._new_outcomes(df) if name == "outcomes"
                           else new_rows(self._keys[name], df, name))
        commit = self.store.commit(append=fresh, units=units, info=info)
        for name in self.IN_MEMORY:
            if fresh[name].height:
                self._keys[name] = pl.concat(
                    [self._keys[name], fresh[name].select(KEYS[name])], how="vertical_relaxed"
                )
        for rel in commit.append.get("outcomes", []):
            self._outcome_parts.append(rel)
            self._models_of[rel] = frozenset(fresh["outcomes"]["model"].unique())
        return fresh

    def _part_models(self, rel: str) -> frozenset[str]:
        """The models with an outcome in one stored part: as its commit recorded them (loaded in
        ``__init__``), else its model column, read once."""
        if rel not in self._models_of:
            models: set[str] = set()
            for batch in self.store.iter_batches(rel, ["model"]):
                models.update(batch["model"].unique().to_list())
            self._models_of[rel] = frozenset(models)
        return self._models_of[rel]

    def _new_outcomes(self, incoming: pl.DataFrame) -> pl.DataFrame:
        """``new_rows`` for outcomes without the stored keys in memory: anti-joined against each
        part that holds one of the incoming models, a batch at a time."""
        key = KEYS["outcomes"]
        out = incoming.unique(key, keep="first", maintain_order=True)
        models = set(out["model"].unique().to_list()) if out.height else set()
        for rel in self._outcome_parts:
            if out.height == 0:
                break
            if not (self._part_models(rel) & models):
                continue
            for batch in self.store.iter_batches(rel, key):
                batch = batch.filter(pl.col("model").is_in(list(models)))
                if batch.height:
                    out = out.join(batch, on=key, how="anti", nulls_equal=True)
        return out
