"""The device loop's window bookkeeping (engines/loop.py: OpenWindows), against a brute-force
reference: after every event, the windows written are exactly the longest prefix of opened
windows whose every announced batch has been collected, each written once, in input order."""

from __future__ import annotations

import pytest
from hypothesis import given, settings, strategies as st

from pipeline.engines.loop import OpenWindows, WindowStart


def start(n_batches: int, tag: int) -> WindowStart:
    return WindowStart(rows=tag, chunks=(), n_batches=n_batches)  # the bookkeeping never looks inside


@settings(max_examples=200, deadline=None)
@given(batches=st.lists(st.integers(0, 4), max_size=8), in_flight=st.integers(1, 4), data=st.data())
def test_windows_are_written_complete_in_input_order_and_as_soon_as_possible(batches, in_flight, data):
    book = OpenWindows()
    written: list[int] = []
    collected = [0] * len(batches)
    pending: list[int] = []  # the window of each batch in flight, oldest first

    def expected_prefix() -> int:
        n = 0
        while n < opened and collected[n] == batches[n]:
            n += 1
        return n

    def check() -> None:
        written.extend(w.start.rows for w in book.pop_complete())
        assert written == list(range(expected_prefix()))

    opened = 0
    windows = {}
    for i, n in enumerate(batches):
        windows[i] = book.open(start(n, i), spans=None)
        opened += 1
        check()
        for _ in range(n):
            assert book.newest() is windows[i]
            pending.append(i)
            # collect the oldest batches until at most `in_flight` are left, sometimes more
            keep = data.draw(st.integers(0, in_flight))
            while len(pending) > keep:
                w = pending.pop(0)
                book.collected(windows[w])
                collected[w] += 1
                check()
    while pending:
        w = pending.pop(0)
        book.collected(windows[w])
        collected[w] += 1
        check()
    assert written == list(range(len(batches))) and len(book) == 0


def test_a_window_short_of_its_batches_is_never_complete():
    """A stop can end the producer mid-window: that window and every later one wait."""
    book = OpenWindows()
    first = book.open(start(2, 0), spans=None)
    book.open(start(0, 1), spans=None)
    book.collected(first)
    assert book.pop_complete() == [] and len(book) == 2


def test_protocol_violations_are_errors_not_silent_misattribution():
    book = OpenWindows()
    with pytest.raises(RuntimeError, match="no open window announced"):
        book.newest()
    w = book.open(start(1, 0), spans=None)
    book.collected(w)
    with pytest.raises(RuntimeError, match="more batches than it announced"):
        book.collected(w)
    book.open(start(0, 1), spans=None)
    with pytest.raises(RuntimeError, match="no open window announced"):
        book.newest()  # the newest window announced no batch
