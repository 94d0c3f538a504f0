"""The storage backend interface: ordered keyspaces of bytes, counters, and atomic transactions.

The store above is written against this small contract so that an embedded engine (LMDB) and a
distributed one (Redis Cluster / Valkey) serve it unchanged:

- ``transact(fn)`` runs ``fn(batch)`` as one atomic, isolated, durable transaction and returns
  its result. ``fn`` may be called more than once (an optimistic backend retries it on a
  conflict), so it must only act through ``batch``. An exception raised by ``fn`` aborts: none of
  its writes become visible.
- ``read()`` opens a consistent read-only view for a short while (long read views make LMDB's
  file grow; keep them to one request).
- Values returned by reads may be zero-copy buffers, valid only until the view closes (or, in a
  transaction, until the next write); copy what you keep.
- Counters are signed 64-bit integers behind ``incr``/``get_counter``; an absent counter reads 0
  and a counter that reaches 0 is removed, so "absent" and "zero" are one state.
- ``scan`` yields the entries whose key starts with a prefix, in ascending byte order of keys
  (a Redis backend keeps a lexicographic index per keyspace for this).

Keyspaces are fixed names (:data:`KEYSPACES`); a backend may map them to named databases, key
prefixes or hash tags. Keys are at most :data:`MAX_KEY_BYTES` bytes.
"""

from __future__ import annotations

import abc
import mmap
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from contextvars import ContextVar
from typing import Any, TypeVar

__all__ = [
    "COUNTER_NBYTES",
    "KEYSPACES",
    "MAX_KEY_BYTES",
    "Backend",
    "ReadView",
    "WriteBatch",
    "call_deadline",
    "deadline_left",
]

_DEADLINE: ContextVar[float | None] = ContextVar("deltastore_call_deadline", default=None)


@contextmanager
def call_deadline(seconds: float | None) -> Iterator[None]:
    """Within this block, backends stop retrying (lock waits, lost leases) after ``seconds``.

    The server wraps each call in the call's remaining deadline, so a transaction never keeps
    retrying for a caller that has given up. None: no deadline beyond the backend's own limits.
    """
    token = _DEADLINE.set(None if seconds is None else time.monotonic() + seconds)
    try:
        yield
    finally:
        try:
            _DEADLINE.reset(token)
        except ValueError:  # a generator resumed in another context: the next call sets its own
            _DEADLINE.set(None)


def deadline_left() -> float | None:
    """Seconds left of the innermost :func:`call_deadline` (None without one; may be negative)."""
    at = _DEADLINE.get()
    return None if at is None else at - time.monotonic()


KEYSPACES: tuple[str, ...] = ("blocks", "manifests", "refs", "sessions", "counters", "meta")
MAX_KEY_BYTES = 511  # LMDB's default key limit; the store's keys stay far below it
COUNTER_NBYTES = 8  # nominal stored size of a counter value, used in byte accounting

T = TypeVar("T")
Buffer = bytes | memoryview


class ReadView(abc.ABC):
    """A consistent read-only view of every keyspace."""

    @abc.abstractmethod
    def get(self, keyspace: str, key: bytes) -> Buffer | None:
        """The value stored under ``key``, or None when absent."""

    @abc.abstractmethod
    def get_counter(self, keyspace: str, key: bytes) -> int:
        """The counter under ``key`` (0 when absent)."""

    @abc.abstractmethod
    def scan(self, keyspace: str, prefix: bytes = b"") -> Iterator[tuple[bytes, Buffer]]:
        """Entries whose key starts with ``prefix``, ascending by key; counters excluded."""

    @abc.abstractmethod
    def scan_counters(self, keyspace: str, prefix: bytes = b"") -> Iterator[tuple[bytes, int]]:
        """Counters whose key starts with ``prefix``, ascending by key."""

    def get_head(self, keyspace: str, key: bytes, nbytes: int) -> tuple[Buffer, int] | None:
        """The first ``nbytes`` of a value and its whole length, or None when absent.

        For reading a record's header: a backend that keeps values out of line (Redis payloads)
        reads only those bytes instead of the whole value.
        """
        value = self.get(keyspace, key)
        return None if value is None else (value[:nbytes], len(value))


class WriteBatch(ReadView):
    """The view of a transaction in progress: reads see its own writes."""

    @abc.abstractmethod
    def put(self, keyspace: str, key: bytes, value: bytes | bytearray | memoryview | mmap.mmap) -> None:
        """Store ``value`` under ``key``, replacing any previous value."""

    @abc.abstractmethod
    def delete(self, keyspace: str, key: bytes) -> bool:
        """Remove ``key``; True when it existed."""

    @abc.abstractmethod
    def incr(self, keyspace: str, key: bytes, delta: int) -> int:
        """Add ``delta`` to a counter and return the new value (0 removes it)."""


class Backend(abc.ABC):
    """A storage engine the store runs on. Thread-safe; not to be shared across ``fork()``."""

    name: str = "backend"

    @abc.abstractmethod
    def transact(self, fn: Callable[[WriteBatch], T]) -> T:
        """Run ``fn`` in one atomic, durable transaction (possibly more than once) and return its result."""

    @abc.abstractmethod
    def read(self) -> AbstractContextManager[ReadView]:
        """A short-lived consistent read view: ``with backend.read() as view: ...``."""

    def stray_values(self) -> list[str]:
        """Stored values nothing references (a backend with out-of-line values); [] otherwise.

        For ``deltastore verify``: e.g. a Redis payload written by a writer whose lease had
        already expired (the write cannot be fenced across nodes), left behind forever.
        """
        return []

    def remove_stray_values(self, names: list[str]) -> int:
        """Delete values :meth:`stray_values` named; returns how many were removed."""
        return 0

    @abc.abstractmethod
    def info(self) -> dict[str, Any]:
        """Engine facts for operators (sizes, settings); JSON-serializable."""

    @abc.abstractmethod
    def close(self) -> None:
        """Release the engine; further calls fail."""

    def __enter__(self) -> Backend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
