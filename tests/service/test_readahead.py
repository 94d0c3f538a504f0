"""read_ahead: same items in order, errors where they happened, and no work after the consumer left."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import pytest

from deltastore.server.readahead import read_ahead


def test_items_in_order_and_produced_on_another_thread() -> None:
    threads: list[str] = []

    def source() -> Iterator[int]:
        for i in range(50):
            threads.append(threading.current_thread().name)
            yield i

    assert list(read_ahead(source(), depth=2)) == list(range(50))
    assert set(threads) == {"deltastore-read-ahead"}


def test_error_raised_after_the_items_before_it() -> None:
    def source() -> Iterator[int]:
        yield 1
        yield 2
        raise KeyError("segment 3 is corrupt")

    got = []
    with pytest.raises(KeyError, match="segment 3"):
        for item in read_ahead(source()):
            got.append(item)
    assert got == [1, 2]


def test_closing_the_consumer_stops_the_producer() -> None:
    produced = []

    def source() -> Iterator[int]:
        for i in range(1000):
            produced.append(i)
            yield i

    it = read_ahead(source(), depth=1)
    assert next(it) == 0
    it.close()  # what gRPC does to a cancelled call's response generator
    n = len(produced)
    time.sleep(0.2)
    assert len(produced) == n <= 3  # one handed out, one queued, at most one more in flight
    assert not any(t.name == "deltastore-read-ahead" for t in threading.enumerate())
