"""Reads of the store in Redis: a read view at one commit sequence, and a transaction's batch.

Why read views stay (issue #15 asked whether immutable blocks make them unnecessary): blocks
are content-addressed and their payloads immutable, and that already takes payloads out of the
versioning (:mod:`~deltastore.backends.redis.payloads`: plain GETs, a cache that never goes
stale). But the metadata a store read walks is mutable: a session record, a manifest scan,
then the block records it names, whose refcounts reach 0 and whose records are deleted when a
session is deleted, evicted or expired. Redis has no multi-key snapshot read, so without a view
a reader racing such a commit would see a torn snapshot: a manifest whose blocks are gone (read
as corruption), or a scan that mixes two versions. A view costs one round trip to open and one
to close, plus history kept only while it is open; views are dropped where a reader cannot see
a torn state: payload reads (immutable) and reads inside a transaction (:class:`Batch`, under
the write lock: nothing else commits). A read of a single key needs no view either, but the
Backend interface's ``read()`` cannot know a reader will stop at one key; that is the store's
call (its streaming reads open one view per block and could read the block record alone).
"""

from __future__ import annotations

import abc
import mmap
import secrets
from collections.abc import Callable, Iterator
from contextlib import suppress
from typing import TypeVar

from deltastore.backend import COUNTER_NBYTES, KEYSPACES, MAX_KEY_BYTES, ReadView, WriteBatch
from deltastore.backends.redis.config import Client
from deltastore.backends.redis.errors import redis_errors, view_expired
from deltastore.backends.redis.payloads import OUT_OF_LINE, Payloads
from deltastore.backends.redis.scripts import HDR_DIGITS as _HDR
from deltastore.backends.redis.scripts import Scripts
from deltastore.errors import ChecksumMismatch, DeltaStoreError, InvalidArgument

__all__ = ["Batch", "Metadata", "View", "decode_counter", "encode_counter"]

_SCAN_PAGE = 256
T = TypeVar("T")
Value = bytes | None  # None in a write buffer: deleted


def encode_counter(value: int) -> bytes:
    return value.to_bytes(COUNTER_NBYTES, "little", signed=True)


def decode_counter(raw: bytes | memoryview) -> int:
    return int.from_bytes(raw, "little", signed=True)


def _lex_range(prefix: bytes, after: bytes | None) -> tuple[bytes, bytes]:
    """ZRANGEBYLEX bounds of the keys starting with ``prefix`` (and greater than ``after``)."""
    low = b"(" + after if after is not None else (b"[" + prefix if prefix else b"-")
    end = prefix.rstrip(b"\xff")
    high = b"(" + end[:-1] + bytes([end[-1] + 1]) if end else b"+"
    return low, high


class Metadata:
    """The store's metadata under its hash tag ``{prefix}``: the reads every view builds on."""

    def __init__(self, client: Client, tag: str, scripts: Scripts, payloads: Payloads) -> None:
        self.client = client
        self.tag = tag
        self.scripts = scripts
        self.payloads = payloads
        self.closed = False

    def check(self, keyspace: str) -> str:
        if self.closed:
            raise DeltaStoreError("the Redis backend is closed")
        if keyspace not in KEYSPACES:
            raise InvalidArgument(f"unknown keyspace {keyspace!r}")
        return keyspace

    def current(self, keyspace: str, key: bytes) -> bytes | None:
        """The latest committed encoded value (for the lock holder)."""
        with redis_errors("a read"):
            return self.client.hget(f"{self.tag}:v:{keyspace}", key)

    def scan_page(
        self, view_id: str, seq: int, keyspace: str, prefix: bytes, after: bytes | None
    ) -> tuple[list[tuple[bytes, bytes]], bool]:
        """A page of (key, stored value) as of ``seq`` (view) or now (``view_id`` "")."""
        low, high = _lex_range(prefix, after)
        with redis_errors("a scan"):
            reply = self.scripts(self.scripts.scan_at, view_id, seq, keyspace, low, high, _SCAN_PAGE)
        n_a, n_b = int(reply[0]), int(reply[1])
        pairs = reply[2:]
        entries = [(bytes(pairs[i]), pairs[i + 1]) for i in range(0, len(pairs), 2)]
        # Keys past the end of a full list may be missing from the other list: stop before them.
        bound: bytes | None = None
        for start, n in ((0, n_a), (n_a, n_b)):
            if n == _SCAN_PAGE:
                last = entries[start + n - 1][0]
                bound = last if bound is None else min(bound, last)
        page: dict[bytes, bytes] = {}
        for key, raw in entries:
            if raw is not None and (bound is None or key <= bound):
                page[key] = raw[_HDR:]
        return sorted(page.items()), bound is not None

    def open_view(self, lease_ms: int) -> View:
        """Register a view at the current commit sequence (commits keep history for it)."""
        self.check("meta")
        view_id = secrets.token_hex(12)
        with redis_errors("opening a read view"):
            seq = int(self.scripts(self.scripts.open_view, view_id, lease_ms))
        return View(self, view_id, seq)

    def close_view(self, view: View) -> None:
        """Best effort: the view's lease ends it anyway."""
        with suppress(DeltaStoreError), redis_errors("closing a read view"):
            pipe = self.client.pipeline(transaction=False)
            pipe.zrem(f"{self.tag}:rs", view.id)
            pipe.zrem(f"{self.tag}:rx", view.id)
            pipe.execute()


class _Reader(ReadView):
    """Reads of one keyspace layout; subclasses say at which version."""

    def __init__(self, meta: Metadata) -> None:
        self._m = meta

    @abc.abstractmethod
    def _raw(self, keyspace: str, key: bytes) -> bytes | None:
        """The stored value (a data key name for out-of-line keyspaces), None when absent."""

    @abc.abstractmethod
    def _raw_page(
        self, keyspace: str, prefix: bytes, after: bytes | None
    ) -> tuple[list[tuple[bytes, bytes]], bool]:
        """Up to a page of (key, stored value) in key order after ``after``; True when more may follow."""

    def get(self, keyspace: str, key: bytes) -> bytes | None:
        raw = self._raw(self._m.check(keyspace), key)
        if raw is None or keyspace not in OUT_OF_LINE:
            return raw
        return self._fetch([(key, raw)])[0]

    def _fetch(self, pointers: list[tuple[bytes, bytes]]) -> list[bytes]:
        return self._m.payloads.fetch(pointers)

    def get_head(self, keyspace: str, key: bytes, nbytes: int) -> tuple[bytes, int] | None:
        raw = self._raw(self._m.check(keyspace), key)
        if raw is None or keyspace not in OUT_OF_LINE:
            return None if raw is None else (raw[:nbytes], len(raw))
        return self._fetch_head(key, raw, nbytes)

    def _fetch_head(self, key: bytes, name: bytes, nbytes: int) -> tuple[bytes, int]:
        return self._m.payloads.fetch_head(key, name, nbytes)

    def get_counter(self, keyspace: str, key: bytes) -> int:
        raw = self._raw(self._m.check(keyspace), key)
        return 0 if raw is None else decode_counter(raw)

    def _scan_raw(self, keyspace: str, prefix: bytes) -> Iterator[list[tuple[bytes, bytes]]]:
        after: bytes | None = None
        while True:
            page, more = self._raw_page(keyspace, prefix, after)
            if page:
                yield page
                after = page[-1][0]
            if not more:
                return

    def scan(self, keyspace: str, prefix: bytes = b"") -> Iterator[tuple[bytes, bytes]]:
        self._m.check(keyspace)
        for page in self._scan_raw(keyspace, prefix):
            if keyspace in OUT_OF_LINE:
                yield from zip((k for k, _ in page), self._fetch(page), strict=True)
            else:
                yield from page

    def scan_counters(self, keyspace: str, prefix: bytes = b"") -> Iterator[tuple[bytes, int]]:
        self._m.check(keyspace)
        for page in self._scan_raw(keyspace, prefix):
            for key, raw in page:
                yield key, decode_counter(raw)


class View(_Reader):
    """A read view at commit sequence ``seq``, registered under ``id`` while open."""

    def __init__(self, meta: Metadata, view_id: str, seq: int) -> None:
        super().__init__(meta)
        self.id = view_id
        self._seq = seq

    def _raw(self, keyspace: str, key: bytes) -> bytes | None:
        scripts = self._m.scripts
        with redis_errors("a read"):
            raw = scripts(scripts.get_at, self.id, self._seq, keyspace, key)
        return None if raw is None else raw[_HDR:]

    def _raw_page(
        self, keyspace: str, prefix: bytes, after: bytes | None
    ) -> tuple[list[tuple[bytes, bytes]], bool]:
        return self._m.scan_page(self.id, self._seq, keyspace, prefix, after)

    def _fetch(self, pointers: list[tuple[bytes, bytes]]) -> list[bytes]:
        return self._expired_if_gone(lambda: self._m.payloads.fetch(pointers))

    def _fetch_head(self, key: bytes, name: bytes, nbytes: int) -> tuple[bytes, int]:
        return self._expired_if_gone(lambda: self._m.payloads.fetch_head(key, name, nbytes))

    def _expired_if_gone(self, read: Callable[[], T]) -> T:
        try:
            return read()
        except ChecksumMismatch:
            # A view past its lease no longer holds back the freeing of what it read: that is
            # an expired view, not lost data.
            with redis_errors("a read"):
                alive = self._m.client.zscore(f"{self._m.tag}:rs", self.id) is not None
            if alive:
                raise
            raise view_expired("a payload read") from None


class Batch(_Reader, WriteBatch):
    """A transaction under the write lock: reads the current state overlaid with its own writes."""

    def __init__(self, meta: Metadata) -> None:
        super().__init__(meta)
        self.writes: dict[str, dict[bytes, Value]] = {}
        # Stored values read so far: nobody else commits while the lock is held, so they stay
        # current and each key costs one round trip per transaction.
        self._read: dict[tuple[str, bytes], bytes | None] = {}

    def _raw(self, keyspace: str, key: bytes) -> bytes | None:
        mine = self.writes.get(keyspace)
        if mine is not None and key in mine:
            return mine[key]
        if (keyspace, key) not in self._read:
            raw = self._m.current(keyspace, key)
            self._read[keyspace, key] = None if raw is None else raw[_HDR:]
        return self._read[keyspace, key]

    def get(self, keyspace: str, key: bytes) -> bytes | None:
        mine = self.writes.get(self._m.check(keyspace))
        if mine is not None and key in mine:
            return mine[key]  # buffered values are the data itself, also out of line
        return super().get(keyspace, key)

    def get_head(self, keyspace: str, key: bytes, nbytes: int) -> tuple[bytes, int] | None:
        mine = self.writes.get(self._m.check(keyspace))
        if mine is not None and key in mine:
            value = mine[key]
            return None if value is None else (value[:nbytes], len(value))
        return super().get_head(keyspace, key, nbytes)

    def _raw_page(
        self, keyspace: str, prefix: bytes, after: bytes | None
    ) -> tuple[list[tuple[bytes, bytes]], bool]:
        return self._m.scan_page("", 0, keyspace, prefix, after)

    def _merged(self, keyspace: str, prefix: bytes) -> Iterator[tuple[bytes, bytes, bool]]:
        """(key, value, buffered) in key order: stored entries overlaid with this transaction's."""
        mine = self.writes.get(keyspace, {})
        own = sorted(k for k in mine if k.startswith(prefix))
        j = 0
        for page in self._scan_raw(keyspace, prefix):
            for key, raw in page:
                while j < len(own) and own[j] < key:
                    if (v := mine[own[j]]) is not None:
                        yield own[j], v, True
                    j += 1
                if key in mine:
                    if j < len(own) and own[j] == key:
                        j += 1
                    if (v := mine[key]) is not None:
                        yield key, v, True
                else:
                    yield key, raw, False
        for key in own[j:]:
            if (v := mine[key]) is not None:
                yield key, v, True

    def scan(self, keyspace: str, prefix: bytes = b"") -> Iterator[tuple[bytes, bytes]]:
        self._m.check(keyspace)
        for key, value, buffered in self._merged(keyspace, prefix):
            if keyspace in OUT_OF_LINE and not buffered:
                value = self._fetch([(key, value)])[0]
            yield key, value

    def scan_counters(self, keyspace: str, prefix: bytes = b"") -> Iterator[tuple[bytes, int]]:
        self._m.check(keyspace)
        for key, value, _ in self._merged(keyspace, prefix):
            yield key, decode_counter(value)

    def _write(self, keyspace: str, key: bytes, value: Value) -> None:
        if len(key) > MAX_KEY_BYTES or not key:
            raise InvalidArgument(f"keys must be 1..{MAX_KEY_BYTES} bytes, got {len(key)}")
        self.writes.setdefault(keyspace, {})[key] = value

    def put(self, keyspace: str, key: bytes, value: bytes | bytearray | memoryview | mmap.mmap) -> None:
        self._write(self._m.check(keyspace), key, bytes(value))

    def delete(self, keyspace: str, key: bytes) -> bool:
        if self._raw(self._m.check(keyspace), key) is None:
            return False
        self._write(keyspace, key, None)
        return True

    def incr(self, keyspace: str, key: bytes, delta: int) -> int:
        raw = self._raw(self._m.check(keyspace), key)
        value = (0 if raw is None else decode_counter(raw)) + delta
        if value:
            self._write(keyspace, key, encode_counter(value))
        elif raw is not None:
            self._write(keyspace, key, None)
        return value
