"""The store: commits make parts visible atomically, appends are deduplicated, gc is safe."""

from __future__ import annotations

import json

import polars as pl
import pytest

from benchroute.artifacts.store import Appender, Store, StoreError, new_rows
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
    store._write_part("inputs", "crashed", _inputs("ghost"))
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
