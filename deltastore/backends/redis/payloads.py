"""Payloads out of line: each block value under its own data key, spread over the cluster.

Why its own module, and why these reads need no read view: a data key is written once, under a
fresh random name, and never rewritten; the metadata points at it. So a payload read is a plain
GET (no Lua, no version), a client-side cache by name never goes stale, and a replaced or freed
payload is deleted only once no open view can still name it (the commit script puts it in the
free set; :func:`delete_keys` runs after that). Immutability is what lets nearly every byte
bypass the versioning that the (mutable) metadata needs.
"""

from __future__ import annotations

import secrets
import threading
from collections import OrderedDict
from collections.abc import Iterator

from deltastore.backends.redis.config import Client
from deltastore.backends.redis.errors import redis_errors
from deltastore.errors import ChecksumMismatch

__all__ = ["OUT_OF_LINE", "PayloadCache", "Payloads", "chunks", "delete_keys"]

OUT_OF_LINE: frozenset[str] = frozenset({"blocks"})  # keyspaces whose values live under their own tags


def chunks(items: list[tuple[str, bytes]], limit: int) -> Iterator[list[tuple[str, bytes]]]:
    """Consecutive runs of (name, value) of at most ``limit`` value bytes (at least one item each)."""
    run: list[tuple[str, bytes]] = []
    size = 0
    for item in items:
        if run and size + len(item[1]) > limit:
            yield run
            run, size = [], 0
        run.append(item)
        size += len(item[1])
    if run:
        yield run


class PayloadCache:
    """Least recently used payloads by data key name, up to ``capacity`` bytes; thread-safe.

    Why: the store reads a stored block's record to learn its size when a later turn or another
    session reuses it; without this each put would fetch every reused payload again.
    """

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._items: OrderedDict[bytes, bytes] = OrderedDict()
        self._size = 0
        self._lock = threading.Lock()

    def get(self, name: bytes) -> bytes | None:
        with self._lock:
            value = self._items.get(name)
            if value is not None:
                self._items.move_to_end(name)
            return value

    def put(self, name: bytes, value: bytes) -> None:
        if len(value) > self.capacity:
            return
        with self._lock:
            if name in self._items:
                return
            self._items[name] = value
            self._size += len(value)
            while self._size > self.capacity:
                _, old = self._items.popitem(last=False)
                self._size -= len(old)


def _lost(key: bytes, name: bytes) -> ChecksumMismatch:
    return ChecksumMismatch(
        key.hex(), f"payload under Redis key {bytes(name).decode()}", "no such key (data lost)"
    )


class Payloads:
    """Data keys of one store (``{prefix}:d:{random}``): named, written, read, cached, deleted."""

    def __init__(self, client: Client, prefix: str, cache_bytes: int) -> None:
        self._client = client
        self.pattern = f"{prefix}:d:*"
        self._prefix = prefix
        self._cache = PayloadCache(cache_bytes)

    def new_name(self) -> str:
        # Its own random hash tag: payloads spread evenly over every node of a cluster.
        return f"{self._prefix}:d:{{{secrets.token_hex(8)}}}"

    def fetch(self, pointers: list[tuple[bytes, bytes]]) -> list[bytes]:
        """The payloads behind (key, data key name) pointers, in order."""
        values: list[bytes | None] = [self._cache.get(bytes(name)) for _, name in pointers]
        todo = [i for i, v in enumerate(values) if v is None]
        with redis_errors("a payload read"):
            if len(todo) == 1:
                fetched = [self._client.get(pointers[todo[0]][1])]
            elif todo:
                pipe = self._client.pipeline(transaction=False)
                for i in todo:
                    pipe.get(pointers[i][1])
                fetched = pipe.execute()
            else:
                fetched = []
        for i, value in zip(todo, fetched, strict=True):
            key, name = pointers[i]
            if value is None:
                raise _lost(key, name)
            self._cache.put(bytes(name), value)
            values[i] = value
        return values  # type: ignore[return-value]

    def fetch_head(self, key: bytes, name: bytes, nbytes: int) -> tuple[bytes, int]:
        """The first ``nbytes`` of the payload behind a pointer and its length: no whole-value read."""
        cached = self._cache.get(bytes(name))
        if cached is not None:
            return cached[:nbytes], len(cached)
        with redis_errors("a payload read"):
            pipe = self._client.pipeline(transaction=False)
            pipe.getrange(name, 0, max(nbytes, 1) - 1)
            pipe.strlen(name)
            head, total = pipe.execute()
        if not total:
            raise _lost(key, name)
        return head, int(total)

    def write(self, items: list[tuple[str, bytes]]) -> None:
        """SET each (name, value), in one pipeline (a cluster client splits it per node)."""
        pipe = self._client.pipeline(transaction=False)
        for name, value in items:
            pipe.set(name, value)
        pipe.execute()

    def cache(self, items: list[tuple[str, bytes]]) -> None:
        """Remember committed payloads: later reads of their names need no round trip."""
        for name, value in items:
            self._cache.put(name.encode(), value)


def delete_keys(client: Client, names: list[bytes] | list[str]) -> None:
    """DEL each name, in one pipeline (a cluster client splits it per node)."""
    if names:
        pipe = client.pipeline(transaction=False)
        for name in names:
            pipe.delete(name)
        pipe.execute()
