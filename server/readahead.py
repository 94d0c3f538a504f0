"""Read-ahead: run an iterator on its own thread, a bounded number of items ahead of its consumer.

GetSnapshot reads each segment, verifies its BLAKE3 digest and frames it into chunk messages,
then hands those to gRPC, whose send holds the handler thread until the bytes are out. Producing
segment i+1 while segment i is on the wire overlaps the two (hashing and socket writes release
the GIL). The consumer sees the producer's items and exceptions in order; closing the consumer
stops the producer and waits for it, so nothing touches the snapshot after the call ends.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from typing import TypeVar

__all__ = ["read_ahead"]

T = TypeVar("T")

_POLL_S = 0.05  # how often a producer blocked on a full queue checks that the consumer is still there


def read_ahead(items: Iterator[T], depth: int = 1) -> Iterator[T]:
    """Yield ``items``, produced on a helper thread at most ``depth`` items ahead."""
    slots: queue.Queue[tuple[str, object]] = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def offer(entry: tuple[str, object]) -> bool:
        while not stop.is_set():
            try:
                slots.put(entry, timeout=_POLL_S)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for item in items:
                if not offer(("item", item)):
                    return
            offer(("end", None))
        except BaseException as exc:  # handed to the consumer, raised there
            offer(("error", exc))

    producer = threading.Thread(target=produce, name="deltastore-read-ahead", daemon=True)
    producer.start()
    try:
        while True:
            kind, value = slots.get()
            if kind == "end":
                return
            if kind == "error":
                raise value  # type: ignore[misc]
            yield value  # type: ignore[misc]
    finally:
        stop.set()
        producer.join()
