"""``benchroute.io``: the one I/O layer (atomic and exclusive puts, fresh listings, the JSON
reader and its policy for NaN/Infinity tokens, huge numbers and text that is not Unicode)."""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import threading

import fsspec
import ijson
import pytest
from fsspec.implementations.local import LocalFileSystem
from fsspec.implementations.memory import MemoryFileSystem

from benchroute import io as bio


def _local() -> LocalFileSystem:
    return fsspec.filesystem("file")


def _memory_root(name: str) -> tuple[MemoryFileSystem, str]:
    fs = fsspec.filesystem("memory")
    root = f"/benchroute-test-io/{name}"
    if fs.exists(root):
        fs.rm(root, recursive=True)
    return fs, root


def _json_items(doc: bytes, prefix: str = "item") -> list:
    return list(bio.iter_json(lambda: contextlib.nullcontext(io.BytesIO(doc)), prefix))


# ------------------------------------------------------------------------- filesystems
def test_is_local_and_display_path():
    assert bio.is_local(_local())
    mem, _ = _memory_root("display")
    assert not bio.is_local(mem)
    assert bio.display_path(_local(), "/a/b.json") == "/a/b.json"
    assert bio.display_path(mem, "/a/b.json") == "memory:///a/b.json"


# ------------------------------------------------------------------------- atomic_put
@pytest.mark.parametrize("breaks", ["fsync", "replace"])
def test_atomic_put_keeps_the_old_content_when_the_write_fails(tmp_path, monkeypatch, breaks):
    path = str(tmp_path / "ref.json")
    bio.atomic_put(_local(), path, b"old")

    def boom(*args, **kwargs):
        raise OSError(f"{breaks} failed")

    monkeypatch.setattr(os, breaks, boom)
    with pytest.raises(OSError, match="failed"):
        bio.atomic_put(_local(), path, b"new content")
    monkeypatch.undo()
    assert open(path, "rb").read() == b"old"
    assert os.listdir(tmp_path) == ["ref.json"]  # no temporary file is left behind


def test_atomic_put_replaces_whole_and_puts_its_temporary_file_in_tmp_dir(tmp_path, monkeypatch):
    folder = tmp_path / "name" / "refs"
    path = str(folder / "latest.json")
    seen = []
    real_replace = os.replace

    def spy(src, dst):
        seen.append((os.path.dirname(src), open(src, "rb").read(), dst))
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", spy)
    bio.atomic_put(_local(), path, b"v1", tmp_dir=str(tmp_path / "name"))  # creates the folder
    bio.atomic_put(_local(), path, b"v2" * 1000, tmp_dir=str(tmp_path / "name"))
    assert open(path, "rb").read() == b"v2" * 1000
    assert [s[0] for s in seen] == [str(tmp_path / "name")] * 2  # renamed in from tmp_dir
    assert seen[1][1] == b"v2" * 1000 and seen[1][2] == path
    assert sorted(os.listdir(tmp_path / "name")) == ["refs"]


def test_atomic_put_elsewhere_is_one_put():
    fs, root = _memory_root("atomic")
    bio.atomic_put(fs, f"{root}/refs/latest.json", b"a")
    bio.atomic_put(fs, f"{root}/refs/latest.json", b"b")
    assert fs.cat_file(f"{root}/refs/latest.json") == b"b"
    assert fs.ls(f"{root}/refs", detail=False) == [f"{root}/refs/latest.json"]


# ------------------------------------------------------------------------- exclusive_put
def test_exclusive_put_refuses_a_second_writer_local(tmp_path):
    path = str(tmp_path / "0000000001.json")
    bio.exclusive_put(_local(), path, b"first")
    with pytest.raises(FileExistsError):
        bio.exclusive_put(_local(), path, b"second")
    assert open(path, "rb").read() == b"first"
    assert os.listdir(tmp_path) == ["0000000001.json"]  # the loser's temporary file is gone


def test_exclusive_put_refuses_a_second_writer_in_memory():
    fs, root = _memory_root("exclusive")
    fs.makedirs(root, exist_ok=True)
    bio.exclusive_put(fs, f"{root}/m.json", b"first")
    with pytest.raises(FileExistsError):
        bio.exclusive_put(fs, f"{root}/m.json", b"second")
    assert fs.cat_file(f"{root}/m.json") == b"first"


def test_exclusive_put_racing_writers_one_wins(tmp_path):
    path = str(tmp_path / "claim")
    barrier = threading.Barrier(8)
    won, lost = [], []

    def writer(i: int) -> None:
        barrier.wait()
        try:
            bio.exclusive_put(_local(), path, f"writer {i}".encode())
            won.append(i)
        except FileExistsError:
            lost.append(i)

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(won) == 1 and len(lost) == 7
    assert open(path, "rb").read() == f"writer {won[0]}".encode()
    assert os.listdir(tmp_path) == ["claim"]


def test_exclusive_put_mode(tmp_path):
    path = str(tmp_path / "cache.key")
    old = os.umask(0o022)
    try:
        bio.exclusive_put(_local(), path, b"secret", mode=0o600)
    finally:
        os.umask(old)
    assert os.stat(path).st_mode & 0o777 == 0o600


# ------------------------------------------------------------------------- fresh_ls
class _ListingCacheFS(LocalFileSystem):
    """A local filesystem that caches listings as s3fs/gcsfs do (``dircache``)."""

    cachable = False

    def ls(self, path, detail=False, **kwargs):
        path = self._strip_protocol(path)
        if path not in self.dircache:
            self.dircache[path] = super().ls(path, detail=False)
        return list(self.dircache[path])

    def invalidate_cache(self, path=None):
        if path is None:
            self.dircache.clear()
        else:
            self.dircache.pop(self._strip_protocol(path), None)


def test_fresh_ls_sees_a_file_written_behind_the_listing_cache(tmp_path):
    fs = _ListingCacheFS()
    folder = str(tmp_path)
    (tmp_path / "a.json").write_text("1")
    assert fs.ls(folder) == [f"{folder}/a.json"]
    (tmp_path / "b.json").write_text("2")  # another process writes
    assert fs.ls(folder) == [f"{folder}/a.json"]  # the cache does not see it
    assert sorted(bio.fresh_ls(fs, folder)) == [f"{folder}/a.json", f"{folder}/b.json"]
    assert bio.fresh_ls(fs, f"{folder}/absent") == []


def test_fresh_ls_through_s3_sees_another_clients_write(s3_server):
    fs, bucket = fsspec.core.url_to_fs(s3_server)
    folder = f"{bucket}/io-fresh-ls"
    fs.pipe_file(f"{folder}/a", b"1")
    assert fs.ls(folder, detail=False) == [f"{folder}/a"]  # now in fs's listing cache
    other, _ = fsspec.core.url_to_fs(s3_server)  # another client (skip_instance_cache)
    assert other is not fs
    other.pipe_file(f"{folder}/b", b"2")
    assert sorted(bio.fresh_ls(fs, folder)) == [f"{folder}/a", f"{folder}/b"]
    fs.rm(folder, recursive=True)


# ------------------------------------------------------------------------- JSON policy
def test_json_nan_infinity_tokens_are_read_as_their_strings():
    doc = json.dumps([{"a": math.nan, "b": math.inf, "c": -math.inf, "d": 1.5}]).encode()
    assert b"NaN" in doc and b"-Infinity" in doc  # Python's json writes bare tokens
    [item] = _json_items(doc)
    assert item == {"a": "NaN", "b": "Infinity", "c": "-Infinity", "d": 1.5}
    assert math.isnan(float(item["a"])) and float(item["b"]) == math.inf
    assert float(item["c"]) == -math.inf
    # JSON Lines (``loads``) follows the same policy
    assert bio.loads(json.dumps(item | {"a": math.nan})) == item


def test_json_tokens_inside_strings_are_left_alone():
    doc = b'[{"s": "NaN, Infinity and -Infinity", "t": "12345678901234567890123"}, NaN]'
    assert _json_items(doc) == [
        {"s": "NaN, Infinity and -Infinity", "t": "12345678901234567890123"}, "NaN"]


def test_json_huge_numbers_are_read_as_their_text():
    doc = b"[12345678901234567890, 1e999, -2.5e400, 0.12345678901234567890123, 7]"
    items = _json_items(doc)
    assert items[:3] == ["12345678901234567890", "1e999", "-2.5e400"]
    assert items[3] == pytest.approx(0.123456789012345678) and items[4] == 7
    assert float(items[1]) == math.inf


def test_json_bad_text_is_marked_and_the_rest_read():
    doc = b'["ok", "x\xffy", "lone \\udc80", "high \\ud800", "pair \\ud83d\\ude00", NaN]'
    bad = bio.BAD_TEXT
    assert _json_items(doc) == ["ok", f"x{bad}y", f"lone {bad}", f"high {bad}", "pair \U0001f600",
                                "NaN"]


def test_json_lone_high_surrogate_alone_is_marked():
    """yajl reads a lone high surrogate escape as ``?`` without an error: the fast pass must
    not let it through."""
    doc = b'["a", "high \\ud800 x", "pair \\ud83d\\ude00"]'
    assert _json_items(doc) == ["a", f"high {bio.BAD_TEXT} x", "pair \U0001f600"]


def test_json_broken_file_gives_the_items_before_the_break_then_raises():
    got = []
    with pytest.raises(bio.JSON_PARSE_ERRORS):
        for item in bio.iter_json(lambda: contextlib.nullcontext(io.BytesIO(b'[1, NaN, {"a": ')),
                                  "item"):
            got.append(item)
    assert got == [1, "NaN"]


def test_tolerant_json_across_chunk_boundaries():
    doc = (
        b'[{"a": NaN, "s": "NaN \\" Infinity", "b": -Infinity}, {"c": Infinity, "d": [1, NaN]}, '
        b'{"s": "x\xffy \\udc80 \\ud83d\\ude00 caf\xc3\xa9 \\\\ \\" ", "n": 123456789012345678901, '
        b'"e": 1.25e999, "f": 0.1234567890123456789012, "g": -Infinity}]'
    )
    bad = bio.BAD_TEXT
    expected = [
        {"a": "NaN", "s": 'NaN " Infinity', "b": "-Infinity"},
        {"c": "Infinity", "d": [1, "NaN"]},
        {"s": f'x{bad}y {bad} \U0001f600 caf\u00e9 \\ " ', "n": "123456789012345678901",
         "e": "1.25e999", "f": pytest.approx(0.12345678901234568), "g": "-Infinity"},
    ]
    for chunk in (1, 2, 3, 5, 7, 13, 64, 1 << 16):
        reader = bio.TolerantJson(io.BytesIO(doc), chunk=chunk)
        assert list(ijson.items(reader, "item", use_float=True)) == expected, chunk
