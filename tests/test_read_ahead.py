"""The ingest flow reads units a few at a time ahead of the commit, never all at once."""

from __future__ import annotations

from concurrent.futures import Future

import pytest

from benchroute.flows.runtime import read_ahead


def test_read_ahead_keeps_at_most_ahead_results_waiting():
    submitted: list[int] = []
    consumed: list[int] = []
    most_waiting = 0

    def submit(i: int) -> Future:
        submitted.append(i)
        f: Future = Future()
        f.set_result(i * 10)
        return f

    for item, result in read_ahead(range(20), submit, ahead=3):
        assert result() == item * 10
        consumed.append(item)
        most_waiting = max(most_waiting, len(submitted) - len(consumed))
    assert consumed == list(range(20)) and submitted == list(range(20))
    assert most_waiting == 3


def test_read_ahead_of_fewer_items_than_the_window():
    out = [(i, r()) for i, r in read_ahead(["a"], lambda i: _done(i), ahead=4)]
    assert out == [("a", "a")]
    assert list(read_ahead([], lambda i: _done(i), ahead=4)) == []
    assert [r() for _, r in read_ahead([None, 0, None], _done, ahead=1)] == [None, 0, None]


def _done(value) -> Future:
    f: Future = Future()
    f.set_result(value)
    return f


def test_a_passing_io_error_is_retried_and_a_permanent_one_is_not(monkeypatch):
    from benchroute.flows import ingest as flow_ingest

    from types import SimpleNamespace

    calls: list[str] = []

    def read(unit, aliases, rules):
        unit = unit.url
        calls.append(unit)
        if unit == "gone":
            raise FileNotFoundError(unit)
        if unit == "flaky" and len(calls) < 3:
            raise ConnectionResetError("peer went away")
        if unit == "down":
            raise TimeoutError("still down")
        return {"read": unit}

    def u(name):
        return SimpleNamespace(url=name)

    monkeypatch.setattr(flow_ingest.stage, "read_tables", read)
    monkeypatch.setattr(flow_ingest, "READ_RETRY_SECONDS", 0.0)
    assert flow_ingest.read_retrying(u("flaky"), None, None) == {"read": "flaky"}
    assert calls == ["flaky"] * 3
    calls.clear()
    with pytest.raises(FileNotFoundError):
        flow_ingest.read_retrying(u("gone"), None, None)
    assert calls == ["gone"]
    calls.clear()
    with pytest.raises(TimeoutError):
        flow_ingest.read_retrying(u("down"), None, None)
    assert calls == ["down"] * flow_ingest.READ_TRIES
