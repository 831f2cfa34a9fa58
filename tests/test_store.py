"""The store: commits make parts visible atomically, appends are deduplicated, gc is safe."""

from __future__ import annotations

import json

import polars as pl
import pytest

from benchroute.artifacts.store import (
    PART_MODELS,
    Appender,
    Commit,
    Store,
    StoreError,
    new_rows,
    recorded_part_models,
)
from benchroute.schemas import empty
from benchroute.transforms.ids import input_id


def _inputs(*texts: str) -> pl.DataFrame:
    return pl.DataFrame({"input_id": [input_id(t) for t in texts], "text": list(texts)})


@pytest.fixture(params=["local", "memory"])
def store(request, tmp_path, memory_url) -> Store:
    return Store(str(tmp_path / "store") if request.param == "local" else memory_url)


def test_empty_store_reads_empty_tables_with_schema(store):
    df = store.read("outcomes")
    assert df.height == 0
    assert df.columns == empty("outcomes").columns
    assert store.commits() == [] and store.units() == {}


def test_commit_appends_and_replaces(store):
    store.commit(append={"inputs": _inputs("a", "b")}, units={"u1": "f1"})
    store.commit(append={"inputs": _inputs("c")}, units={"u2": "f2"})
    assert sorted(store.read("inputs")["text"]) == ["a", "b", "c"]
    store.commit(replace={"inputs": _inputs("z")})
    assert store.read("inputs")["text"].to_list() == ["z"]
    assert store.units() == {"u1": "f1", "u2": "f2"}
    assert [c.seq for c in store.commits()] == [1, 2, 3]


def test_uncommitted_parts_are_invisible_and_collected(store):
    store.commit(append={"inputs": _inputs("a")})
    # A crashed writer: its part is written but no commit names it.
    store.write_part("inputs", _inputs("ghost"), "crashed")
    assert store.read("inputs")["text"].to_list() == ["a"]
    removed = store.gc()
    assert removed == ["tables/inputs/part-crashed.parquet"]
    assert store.read("inputs")["text"].to_list() == ["a"]


def test_commit_numbers_are_claimed_exclusively(store):
    store.commit(append={"inputs": _inputs("a")})
    # A second writer already took number 2: the next commit must take 3, not overwrite.
    store.fs.pipe_file(
        store.path("_log", "0000000002.json"),
        json.dumps({"seq": 2, "batch": "other", "created": "x"}).encode(),
    )
    c = store.commit(append={"inputs": _inputs("b")})
    assert c.seq == 3
    assert sorted(store.read("inputs")["text"]) == ["a", "b"]


def test_corrupt_commit_file_is_reported_by_name(store):
    store.commit(append={"inputs": _inputs("a")})
    store.fs.pipe_file(store.path("_log", "0000000002.json"), b"{not json")
    with pytest.raises(StoreError, match="0000000002.json"):
        store.read("inputs")


def test_new_rows_keeps_only_unseen_keys_and_dedupes_incoming():
    old = _inputs("a", "b")
    inc = _inputs("b", "c", "c")
    assert new_rows(old, inc, "inputs")["text"].to_list() == ["c"]


def test_appender_is_idempotent(store):
    app = Appender(store)
    app.append({"inputs": _inputs("a", "b")}, units={"u": "1"}, info={})
    fresh = app.append({"inputs": _inputs("a", "b", "c")}, units={"u2": "2"}, info={})
    assert fresh["inputs"]["text"].to_list() == ["c"]
    # A new appender (a new run) sees the stored keys.
    fresh = Appender(store).append({"inputs": _inputs("a", "c")}, units={}, info={})
    assert fresh["inputs"].height == 0
    assert store.read("inputs").height == 3


def _outcomes(rows: list[tuple[str, str, float]], perturbation: str | None = None) -> pl.DataFrame:
    """Outcome rows (text, model, value) of one dataset and metric."""
    return pl.DataFrame(
        {"input_id": [input_id(t) for t, _, _ in rows], "dataset": "d", "model": [m for _, m, _ in rows],
         "metric": "exact_match", "value": [v for _, _, v in rows], "run_id": "r", "source": "s",
         "perturbation": perturbation, "source_model": [m for _, m, _ in rows]},
        schema=empty("outcomes").schema,
    )


def test_appender_keeps_outcome_keys_unique_without_loading_them(store, monkeypatch):
    """Outcomes re-stated by a later batch or a later run are dropped (the same key with a null
    perturbation included); a batch of new models reads only the stored parts' model column,
    never their key columns (which at leaderboard scale would not fit in memory)."""
    app = Appender(store)
    app.append({"outcomes": _outcomes([("a", "m1", 1.0), ("b", "m1", 0.0)])}, units={}, info={})
    fresh = app.append({"outcomes": _outcomes([("a", "m1", 1.0), ("c", "m1", 1.0)])},
                       units={}, info={})
    assert fresh["outcomes"]["input_id"].to_list() == [input_id("c")]

    read_columns: list[list[str]] = []
    real = Store.iter_batches

    def spy(self, rel, columns, batch_size=1_000_000):
        read_columns.append(list(columns))
        yield from real(self, rel, columns, batch_size)

    monkeypatch.setattr(Store, "iter_batches", spy)
    later = Appender(store)  # a new run: sees the stored keys
    fresh = later.append({"outcomes": _outcomes([("a", "m1", 1.0), ("a", "m2", 1.0)])},
                         units={}, info={})
    assert fresh["outcomes"]["model"].to_list() == ["m2"]
    assert any(len(c) > 1 for c in read_columns)  # m1's parts were looked up by key
    read_columns.clear()
    fresh = later.append({"outcomes": _outcomes([("a", "m3", 1.0), ("b", "m3", 0.0)])},
                         units={}, info={})
    assert fresh["outcomes"].height == 2
    assert read_columns == []  # part models are remembered; no part holds m3
    assert Appender(store).append({"outcomes": _outcomes([("b", "m3", 0.0)])}, units={},
                                  info={})["outcomes"].height == 0
    assert all(c == ["model"] or len(c) > 1 for c in read_columns)
    assert store.read("outcomes").height == 6


def _spy_reads(monkeypatch) -> list[tuple[str, list[str]]]:
    """(part, columns) of every ``Store.iter_batches`` call from now on."""
    reads: list[tuple[str, list[str]]] = []
    real = Store.iter_batches

    def spy(self, rel, columns, batch_size=1_000_000):
        reads.append((rel, list(columns)))
        yield from real(self, rel, columns, batch_size)

    monkeypatch.setattr(Store, "iter_batches", spy)
    return reads


def _three_outcome_parts(store: Store) -> list[str]:
    """Outcome parts holding m1; m2; m1 and m2 (one commit each, by one Appender)."""
    app = Appender(store)
    for rows in ([("a", "m1", 1.0), ("b", "m1", 0.0)], [("a", "m2", 0.0)],
                 [("c", "m1", 1.0), ("c", "m2", 1.0)]):
        app.append({"outcomes": _outcomes(rows)}, units={}, info={"kind": "ingest"})
    return store.parts("outcomes")


def test_appender_takes_part_models_from_the_commits(store, monkeypatch):
    """The commit that writes an outcome part records the part's models; a later run reads no
    part's model column, only the key columns of the parts that hold an incoming model."""
    parts = _three_outcome_parts(store)
    infos = [c.info for c in store.commits()]
    assert [i[PART_MODELS] for i in infos] == [
        {parts[0]: ["m1"]}, {parts[1]: ["m2"]}, {parts[2]: ["m1", "m2"]}]
    assert all(i["kind"] == "ingest" for i in infos)  # the caller's info is kept beside it

    reads = _spy_reads(monkeypatch)
    later = Appender(store)  # a new run
    fresh = later.append({"outcomes": _outcomes([("a", "m3", 1.0), ("b", "m4", 0.0)])},
                         units={}, info={})
    assert fresh["outcomes"].height == 2
    assert reads == []  # new models: no part read at all, not even its model column
    fresh = Appender(store).append(
        {"outcomes": _outcomes([("a", "m2", 0.0), ("d", "m2", 1.0), ("a", "m3", 1.0)])},
        units={}, info={})
    assert fresh["outcomes"].rows() == _outcomes([("d", "m2", 1.0)]).rows()
    assert all(cols != ["model"] for _, cols in reads)
    m3_part = store.parts("outcomes")[3]
    assert sorted({rel for rel, _ in reads}) == sorted([parts[1], parts[2], m3_part])


def _strip_part_models(store: Store) -> None:
    """Rewrite the commit files as a writer from before ``PART_MODELS`` left them."""
    for name in sorted(store.fs.ls(store.path("_log"), detail=False)):
        entry = json.loads(store.fs.cat_file(name))
        entry["info"].pop(PART_MODELS, None)
        store.fs.pipe_file(name, json.dumps(entry).encode())


def test_appender_reads_the_models_of_parts_without_a_record(store, monkeypatch):
    """Parts committed without a record (an older store; ``commit_parts``) have their model
    column read, and re-stated keys are still dropped; recorded parts are not read."""
    parts = _three_outcome_parts(store)
    _strip_part_models(store)
    assert all(PART_MODELS not in c.info for c in store.commits())
    reads = _spy_reads(monkeypatch)
    fresh = Appender(store).append(
        {"outcomes": _outcomes([("a", "m1", 1.0), ("b", "m1", 0.0), ("a", "m3", 1.0)])},
        units={}, info={})
    assert fresh["outcomes"]["model"].to_list() == ["m3"]
    assert sorted(rel for rel, cols in reads if cols == ["model"]) == sorted(parts)

    # A part written by ``write_part`` + ``commit_parts`` has no record: only it is read.
    from benchroute.artifacts.store import new_batch

    batch = new_batch()
    alone = store.write_part("outcomes", _outcomes([("e", "m5", 1.0)]), batch)
    assert PART_MODELS not in store.commit_parts(batch, append={"outcomes": [alone]}).info
    reads.clear()
    fresh = Appender(store).append({"outcomes": _outcomes([("e", "m5", 1.0), ("f", "m6", 1.0)])},
                                   units={}, info={})
    assert fresh["outcomes"]["model"].to_list() == ["m6"]
    # The part of m3 (committed above, with a record) is not read; the older three and it are.
    assert [rel for rel, cols in reads if cols == ["model"]] == [*parts, alone]


def test_part_model_records_are_taken_only_from_the_commit_that_wrote_the_part(store):
    """A record names too few models only if it is not the writer's: such records are ignored,
    two records of one path are united, and callers cannot write the key themselves."""
    c = store.commit(append={"outcomes": _outcomes([("a", "m1", 1.0)])})
    rel = c.append["outcomes"][0]
    assert recorded_part_models([c]) == {rel: frozenset({"m1"})}

    def commit(batch: str, record, **tables) -> Commit:
        return Commit(seq=9, batch=batch, created="x", append=tables.get("append", {}),
                      replace=tables.get("replace", {}), units={}, info={PART_MODELS: record})

    relisted = commit("later", {rel: []}, replace={"outcomes": [rel]})  # not under its batch
    unlisted = commit(c.batch, {rel: []})  # names no outcome part
    malformed = [commit(c.batch, {rel: "m9"}, append={"outcomes": [rel]}),
                 commit(c.batch, [rel], append={"outcomes": [rel]}),
                 commit(c.batch, {rel: [None]}, append={"outcomes": [rel]})]
    assert recorded_part_models([relisted, unlisted, *malformed]) == {}
    assert recorded_part_models([c, relisted, unlisted, *malformed]) == {rel: frozenset({"m1"})}
    second = commit(c.batch, {rel: ["m2"]}, append={"outcomes": [rel]})
    assert recorded_part_models([c, second]) == {rel: frozenset({"m1", "m2"})}

    for write in (lambda info: store.commit(append={"inputs": _inputs("a")}, info=info),
                  lambda info: store.commit_parts("b", info=info)):
        with pytest.raises(StoreError, match=PART_MODELS):
            write({PART_MODELS: {rel: ["m1"]}})
    # A part with a null model gets no record (its models are read from it instead).
    nulls = _outcomes([("a", "m1", 1.0), ("b", "m2", 1.0)]).with_columns(
        model=pl.when(pl.col("model") == "m2").then(None).otherwise(pl.col("model")))
    assert PART_MODELS not in store.commit(append={"outcomes": nulls}).info


def test_parts_written_alone_are_invisible_until_committed(store):
    """``write_part`` + ``commit_parts``: several parts of one table in one batch, visible
    together in one commit and not before."""
    from benchroute.artifacts.store import new_batch

    batch = new_batch()
    rels = [store.write_part("inputs", _inputs(t), batch) for t in ("a", "b", "c")]
    assert len(set(rels)) == 3
    assert store.read("inputs").height == 0
    store.commit_parts(batch, replace={"inputs": rels})
    assert sorted(store.read("inputs")["text"]) == ["a", "b", "c"]
    assert store.part_rows(rels[0]) == 1


def test_bad_table_name_is_refused(store):
    with pytest.raises(StoreError):
        store.commit(append={"../escape": _inputs("a")})


def test_store_on_s3(s3_server):
    """The same store code against a real S3 API (moto server on loopback) through s3fs."""
    store = Store(f"{s3_server}/store-test")
    Appender(store).append({"inputs": _inputs("a", "b")}, units={"u": "1"}, info={})
    Appender(store).append({"inputs": _inputs("b", "c")}, units={"u2": "2"}, info={})
    assert sorted(store.read("inputs")["text"]) == ["a", "b", "c"]
    assert store.units() == {"u": "1", "u2": "2"}


def test_racing_writers_never_overwrite_a_commit(store):
    """Two writers read the same next number; the loser must not replace the winner's commit.

    The race is forced: between this writer reading the next free number and writing its commit
    file, a second writer (another Store on the same root) commits under that number. Only an
    exclusive create ("xb") makes the late writer notice and move on to the next number.
    """
    store.commit(append={"inputs": _inputs("a")})
    other = Store(store.url)
    real_next_seq = store._next_seq
    calls, winner = [], []

    def stale_next_seq():
        seq = real_next_seq()
        if not calls:  # first read: the other writer commits before we write
            other.commit(append={"inputs": _inputs("b")}, units={"other": "f"})
            winner.append(store.fs.cat_file(store.path("_log", f"{seq:010d}.json")))
        calls.append(seq)
        return seq

    store._next_seq = stale_next_seq
    mine = store.commit(append={"inputs": _inputs("c")}, units={"mine": "f"})
    assert calls[0] == 2, "the race was not set up: the first read must see number 2 as free"
    assert mine.seq == 3 and len(calls) == 2
    commits = Store(store.url).commits()
    assert [c.seq for c in commits] == [1, 2, 3]
    assert store.fs.cat_file(store.path("_log", "0000000002.json")) == winner[0]  # untouched
    assert commits[1].units == {"other": "f"} and commits[2].units == {"mine": "f"}
    assert sorted(Store(store.url).read("inputs")["text"]) == ["a", "b", "c"]
