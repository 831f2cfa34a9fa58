"""Cached task results are data, not code: a record someone rewrote in the store's
``_cache/prefect`` is recomputed, never deserialized (``flows.cache_records``).

The records are real ones, written by a real refresh of the sample (mmlu_pro and routellm in a
landing zone, every vector already in the store: nothing to embed), then rewritten the way an
attacker with write access to the store would.
"""

from __future__ import annotations

import base64
import json
import logging
import math
import os
import pickle
import stat
from pathlib import Path
from types import SimpleNamespace

import pytest
from benchroute.artifacts.bundle import BundleStore, open_bundle
from benchroute.flows import cache_records
from benchroute.flows.cache_records import UntrustedRecord, open_record, seal
from benchroute.flows.refresh import refresh_flow
from refresh_support import make_landing, seed_vectors


class _Marker:
    """Unpickling this creates ``path``: proof that a record's pickle ran."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


@pytest.fixture(scope="module")
def cached(tmp_path_factory, embedded_sample_store):
    """One real refresh (everything computed and cached), with its own key file."""
    root = tmp_path_factory.mktemp("cache-records")
    mp = pytest.MonkeyPatch()
    mp.setenv("XDG_CONFIG_HOME", str(root / "config"))
    mp.delenv(cache_records.KEY_ENV, raising=False)
    landing, _, _ = make_landing(root, hold_back=0)
    store = str(root / "store")
    seed_vectors(embedded_sample_store, store, 0)
    first = refresh_flow(landing=str(landing), store=store)
    assert first["published"] and first["evaluation"]["ran"] == ["mmlu_pro", "routellm"]
    results = {what: _result(path) for what, path in _records(store).items()}
    yield SimpleNamespace(root=root, landing=landing, store=store, first=first, results=results)
    mp.undo()


def _records(store: str) -> dict[str, Path]:
    """The cache records by what they hold: ``fit`` or an evaluation group's name (found by
    its content: the bundle's evaluation, which keeps the same numbers rounded)."""
    evaluation = open_bundle(store, "default").manifest["evaluation"]
    out = {}
    for path in (Path(store) / "_cache" / "prefect").iterdir():
        result = _result(path)  # every record verifies
        if "content_hash" in result:
            out["fit"] = path
        for group, entry in evaluation.items():
            if _close(result, entry):
                out[group] = path
    assert set(out) == {"fit", "mmlu_pro", "routellm"}
    return out


def _close(a, b) -> bool:
    if isinstance(a, dict) and isinstance(b, dict):
        # the bundle adds fields to the cached evaluation (e.g. flip_task): a's keys must be b's
        return a.keys() <= b.keys() and all(_close(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_close(x, y) for x, y in zip(a, b))
    if isinstance(a, float) or isinstance(b, float):
        return a is not None and b is not None and math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12)
    return a == b


def _result(path: Path):
    return json.loads(_body(path)["result"])


def _body(path: Path) -> dict:
    return json.loads(open_record(path.name, path.read_bytes()))


def _pickled(record: dict, marker: Path) -> bytes:
    """The record with a pickle serializer whose payload creates ``marker`` when loaded."""
    record = json.loads(json.dumps(record))
    record["metadata"]["serializer"] = {"type": "pickle", "picklelib": "pickle",
                                        "picklelib_version": None}
    record["result"] = base64.encodebytes(pickle.dumps(_Marker(marker))).decode()
    return json.dumps(record).encode()


class _Warnings(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def _rerun(c):
    handler = _Warnings()
    loggers = [logging.getLogger("prefect.task_runs"), logging.getLogger("benchroute.cache")]
    for lg in loggers:
        lg.addHandler(handler)
    try:
        return refresh_flow(landing=str(c.landing), store=c.store, full=True), handler.messages
    finally:
        for lg in loggers:
            lg.removeHandler(handler)


def test_pickled_records_are_recomputed_not_unpickled(cached):
    """mmlu_pro's record becomes a pickle with a *valid* tag (only the serializer check stops
    it), routellm's a pickle with no tag; neither payload runs, both groups are evaluated again
    and give the same result, and the refit is then a cache hit (same evaluation)."""
    marker = cached.root / "pwned-by-pickle"
    records = _records(cached.store)
    signed = _pickled(_body(records["mmlu_pro"]), marker)
    records["mmlu_pro"].write_bytes(seal(records["mmlu_pro"].name, signed))
    records["routellm"].write_bytes(_pickled(_body(records["routellm"]), marker))

    s, warnings = _rerun(cached)

    assert not marker.exists()
    assert s["evaluation"]["ran"] == ["mmlu_pro", "routellm"] and s["evaluation"]["cached"] == []
    assert s["fit_cached"] is True and not s["published"]
    assert s["bundle"]["version"] == cached.first["bundle"]["version"]
    for what, path in _records(cached.store).items():  # rewritten, sealed, the same results
        assert _result(path) == cached.results[what], what
    assert any(records["mmlu_pro"].name in m and "serializer 'pickle'" in m for m in warnings)
    assert any(records["routellm"].name in m and "no authentication tag" in m for m in warnings)


def test_forged_json_records_are_recomputed(cached):
    """Valid JSON with a changed value: the fit record keeps its old (now wrong) tag, a group's
    record has none. Both are recomputed: the group evaluated again, the fit run again, and
    the store keeps the one true version."""
    records = _records(cached.store)

    fit = _body(records["fit"])
    forged = json.loads(fit["result"]) | {"version": "forged", "url": "s3://elsewhere/bundle"}
    fit["result"] = json.dumps(forged)
    header = records["fit"].read_bytes().partition(b"\n")[0]
    records["fit"].write_bytes(header + b"\n" + json.dumps(fit).encode())

    group = _body(records["routellm"])
    group["result"] = json.dumps(json.loads(group["result"]) | {"table1": []})
    records["routellm"].write_bytes(json.dumps(group).encode())

    s, warnings = _rerun(cached)

    assert s["evaluation"]["ran"] == ["routellm"] and s["evaluation"]["cached"] == ["mmlu_pro"]
    assert s["fit_cached"] is False and not s["published"]  # refitted: identical content
    assert s["bundle"]["version"] == cached.first["bundle"]["version"] != "forged"
    assert s["bundle"]["content_hash"] == cached.first["bundle"]["content_hash"]
    assert BundleStore(cached.store).versions("default") == [cached.first["bundle"]["version"]]
    now = {what: _result(path) for what, path in _records(cached.store).items()}
    assert now["routellm"] == cached.results["routellm"]
    stable = ("name", "version", "url", "content_hash", "models", "bytes")
    assert {k: now["fit"][k] for k in stable} == {k: cached.results["fit"][k] for k in stable}
    assert any(records["fit"].name in m and "does not verify" in m for m in warnings)
    assert any(records["routellm"].name in m and "no authentication tag" in m for m in warnings)


def test_records_are_bound_to_their_name_and_key(tmp_path, monkeypatch):
    """A sealed record moved to another cache key, or sealed with another key, is refused; the
    key file is created once, readable by its owner only."""
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    monkeypatch.delenv(cache_records.KEY_ENV, raising=False)
    body = json.dumps({"metadata": {"serializer": {"type": "json"}}, "result": "1"}).encode()
    data = seal("a" * 32, body)
    assert open_record("a" * 32, data) == body
    with pytest.raises(UntrustedRecord, match="does not verify"):
        open_record("b" * 32, data)
    key_file = tmp_path / "config" / "benchroute" / "cache.key"
    assert stat.S_IMODE(os.stat(key_file).st_mode) == 0o600
    monkeypatch.setenv(cache_records.KEY_ENV, "another key, e.g. set on every machine")
    with pytest.raises(UntrustedRecord, match="does not verify"):
        open_record("a" * 32, data)
