"""The ingest flow reads units a few at a time ahead of the commit, never all at once."""

from __future__ import annotations

from concurrent.futures import Future

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


def _done(value) -> Future:
    f: Future = Future()
    f.set_result(value)
    return f
