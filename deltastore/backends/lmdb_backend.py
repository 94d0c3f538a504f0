"""The embedded backend: one LMDB environment on local disk, one named database per keyspace.

Choices, and why:

- Durability: ``sync=True, metasync=True`` by default, so an acknowledged transaction survives
  kill -9 *and* power loss (LMDB is copy-on-write: a crash never leaves a torn tree, only the
  last unsynced transactions missing). Each write transaction costs one fdatasync; the store
  batches a whole snapshot into one transaction, so that is one sync per Put. Measured on the
  2-core dev VM: a one-turn delta put takes 14.6 ms synced vs 2.7 ms unsynced (one fdatasync is
  ~12 ms there), a 2.4 MB snapshot 29 ms vs 18 ms; a put's latency is dominated by the sync, not
  by its size. ``sync=False`` keeps kill -9 safety (the OS page cache survives a process crash)
  but may lose the last transactions on power loss; it is offered for scratch deployments.
- Large puts are bound by the commit. Measured on the 2-core dev VM, one transaction of
  16 x 8 MiB values (median of 5): 650 ms as configured here, 460-500 ms without ``metasync``
  (the last commit may be undone by a power loss: not taken), 300-330 ms with ``writemap``
  (same durability), 190 ms unsynced; a plain write + fdatasync of the bytes takes 250 ms.
  ``writemap`` is not taken either: a page write into a hole of a full disk is SIGBUS (the
  process dies instead of failing the put), and reserving the map with ``posix_fallocate``
  does not cure it cheaply: on ext4 a failing fallocate keeps what it allocated, leaving the
  disk full; on stores larger than RAM a reused page is also read before it is overwritten.
- Map size: starts at ``map_size`` and doubles on ``MapFullError`` up to ``max_map_size``; then
  the transaction fails with :class:`~deltastore.errors.StoreFull` and an operator hint. Growth
  needs no transaction open in this process, so every transaction holds a shared gate and growth
  takes it exclusively. Another process that grew the map is followed on ``MapResizedError``.
- Reads: ``buffers=True`` read transactions hand out zero-copy views of the map; they are only
  valid inside the view (the store checks digests on them and copies once). Write transactions
  copy (a buffer from a write transaction dies at the next write).
- Processes: several may open one directory (LMDB's lock file serializes writers); an open
  backend refuses to be used after ``fork()`` (reopen it in the child).
- Counters are 8-byte little-endian signed integers.
"""

from __future__ import annotations

import mmap
import os
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import lmdb

from deltastore.backend import COUNTER_NBYTES, KEYSPACES, Backend, ReadView, WriteBatch
from deltastore.errors import DeltaStoreError, IncompatibleFormat, InvalidArgument, StoreFull

__all__ = ["LMDB_FORMAT", "LmdbBackend", "LmdbConfig"]

LMDB_FORMAT = b"deltastore-lmdb/1"
_FORMAT_KEY = b"backend_format"
T = TypeVar("T")
GiB = 1 << 30


@dataclass(frozen=True)
class LmdbConfig:
    """Settings of one LMDB environment.

    Attributes:
        path: directory holding ``data.mdb`` and ``lock.mdb`` (created if missing).
        map_size: initial map size in bytes (sparse on Linux: costs no disk until used).
        max_map_size: the map never grows past this many bytes; then writes raise StoreFull.
        sync: fdatasync on every commit (power-loss safe); False is kill -9 safe only.
        max_readers: concurrent read transactions over all processes.
    """

    path: Path
    map_size: int = 1 * GiB
    max_map_size: int = 256 * GiB
    sync: bool = True
    max_readers: int = 512

    def __post_init__(self) -> None:
        object.__setattr__(self, "path", Path(self.path))
        if self.map_size < 1 << 20:
            raise InvalidArgument(f"map_size must be at least 1 MiB, got {self.map_size}")
        if self.max_map_size < self.map_size:
            raise InvalidArgument("max_map_size must be >= map_size")


class _Gate:
    """Many transactions at once, or one map resize alone (writer-preferring)."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._active = 0
        self._exclusive = False
        self._waiting = 0

    @contextmanager
    def shared(self) -> Iterator[None]:
        with self._cond:
            while self._exclusive or self._waiting:
                self._cond.wait()
            self._active += 1
        try:
            yield
        finally:
            with self._cond:
                self._active -= 1
                if not self._active:
                    self._cond.notify_all()

    @contextmanager
    def exclusive(self) -> Iterator[None]:
        with self._cond:
            self._waiting += 1
            while self._exclusive or self._active:
                self._cond.wait()
            self._waiting -= 1
            self._exclusive = True
        try:
            yield
        finally:
            with self._cond:
                self._exclusive = False
                self._cond.notify_all()


def _decode_counter(raw: bytes | memoryview) -> int:
    return int.from_bytes(raw, "little", signed=True)


class _View(ReadView):
    def __init__(self, txn: lmdb.Transaction, dbs: dict[str, Any]) -> None:
        self._txn = txn
        self._dbs = dbs

    def _db(self, keyspace: str) -> Any:
        try:
            return self._dbs[keyspace]
        except KeyError:
            raise InvalidArgument(f"unknown keyspace {keyspace!r}") from None

    def get(self, keyspace: str, key: bytes) -> bytes | memoryview | None:
        return self._txn.get(key, db=self._db(keyspace))

    def get_counter(self, keyspace: str, key: bytes) -> int:
        raw = self._txn.get(key, db=self._db(keyspace))
        return 0 if raw is None else _decode_counter(raw)

    def _scan(self, keyspace: str, prefix: bytes) -> Iterator[tuple[bytes, bytes | memoryview]]:
        with self._txn.cursor(db=self._db(keyspace)) as cur:
            if not cur.set_range(prefix):
                return
            for key, value in cur:
                key = bytes(key)
                if not key.startswith(prefix):
                    return
                yield key, value

    def scan(self, keyspace: str, prefix: bytes = b"") -> Iterator[tuple[bytes, bytes | memoryview]]:
        return self._scan(keyspace, prefix)

    def scan_counters(self, keyspace: str, prefix: bytes = b"") -> Iterator[tuple[bytes, int]]:
        for key, value in self._scan(keyspace, prefix):
            yield key, _decode_counter(value)


class _Batch(_View, WriteBatch):
    def put(self, keyspace: str, key: bytes, value: bytes | bytearray | memoryview | mmap.mmap) -> None:
        self._txn.put(key, value, db=self._db(keyspace))

    def delete(self, keyspace: str, key: bytes) -> bool:
        return bool(self._txn.delete(key, db=self._db(keyspace)))

    def incr(self, keyspace: str, key: bytes, delta: int) -> int:
        db = self._db(keyspace)
        raw = self._txn.get(key, db=db)
        value = (0 if raw is None else _decode_counter(raw)) + delta
        if value:
            self._txn.put(key, value.to_bytes(COUNTER_NBYTES, "little", signed=True), db=db)
        elif raw is not None:
            self._txn.delete(key, db=db)
        return value


class LmdbBackend(Backend):
    """One LMDB environment; see the module docstring for durability and growth."""

    name = "lmdb"

    def __init__(self, config: LmdbConfig) -> None:
        self.config = config
        config.path.mkdir(parents=True, exist_ok=True)
        self._pid = os.getpid()
        self._gate = _Gate()
        self._closed = True
        self._open()
        self._closed = False

    def _open(self) -> None:
        config = self.config
        try:
            self._env = lmdb.open(
                str(config.path),
                map_size=config.map_size,
                max_dbs=len(KEYSPACES) + 1,
                max_readers=config.max_readers,
                sync=config.sync,
                metasync=config.sync,
                subdir=True,
                lock=True,
            )
        except lmdb.Error as exc:
            # py-lmdb refuses a second open of one environment in a process (closing either would
            # drop the other's locks); a forked child inherits that state, so open before forking
            # or start workers with the "spawn" method.
            hint = (
                "share one LmdbBackend per directory within a process (it is thread-safe); "
                "start worker processes with 'spawn', not fork"
                if "already open" in str(exc)
                else "check the path exists, is writable and is on a local filesystem"
            )
            raise DeltaStoreError(f"cannot open LMDB environment at {config.path}: {exc}", hint=hint) from exc
        # The map may already be larger than configured (grown earlier): adopt the file's size.
        self._env.set_mapsize(max(config.map_size, self._env.info()["map_size"]))
        with self._env.begin(write=True) as txn:
            self._dbs = {ks: self._env.open_db(ks.encode(), txn=txn, create=True) for ks in KEYSPACES}
            found = txn.get(_FORMAT_KEY, db=self._dbs["meta"])
            if found is None:
                txn.put(_FORMAT_KEY, LMDB_FORMAT, db=self._dbs["meta"])
            elif found != LMDB_FORMAT:
                self._env.close()
                raise IncompatibleFormat(
                    f"{config.path} holds LMDB layout {found!r}; this build reads {LMDB_FORMAT!r}",
                    hint="upgrade deltastore, or point --data-dir at a fresh directory",
                )

    def _check(self) -> None:
        if self._closed:
            raise DeltaStoreError("the LMDB backend is closed")
        if os.getpid() != self._pid:
            raise DeltaStoreError(
                "an LMDB environment must not be used across fork()",
                hint="open a new LmdbBackend in the child process",
            )

    def _grow(self, seen_size: int) -> None:
        """Double the map (unless another thread already did), up to max_map_size."""
        with self._gate.exclusive():
            current = self._env.info()["map_size"]
            if current != seen_size:
                return
            if current >= self.config.max_map_size:
                raise StoreFull(
                    f"LMDB map at {self.config.path} is full ({current} bytes)",
                    hint="raise DELTASTORE_LMDB_MAX_MAP_SIZE (max_map_size), lower max_stored_bytes "
                    "so eviction starts earlier, or delete sessions",
                )
            self._env.set_mapsize(min(2 * current, self.config.max_map_size))

    def _follow_resize(self) -> None:
        with self._gate.exclusive():
            self._env.set_mapsize(0)  # adopt the size another process set

    def transact(self, fn: Callable[[WriteBatch], T]) -> T:
        self._check()
        while True:
            seen = self._env.info()["map_size"]
            try:
                with self._gate.shared(), self._env.begin(write=True) as txn:
                    return fn(_Batch(txn, self._dbs))
            except lmdb.MapFullError:
                self._grow(seen)
            except lmdb.MapResizedError:
                self._follow_resize()

    @contextmanager
    def read(self) -> Iterator[ReadView]:
        self._check()
        while True:
            with self._gate.shared():
                try:
                    txn = self._env.begin(buffers=True)
                except lmdb.MapResizedError:
                    txn = None
                if txn is not None:
                    try:
                        yield _View(txn, self._dbs)
                    finally:
                        txn.abort()
                    return
            self._follow_resize()

    def info(self) -> dict[str, Any]:
        self._check()
        env = self._env.info()
        stat = self._env.stat()
        return {
            "backend": self.name,
            "path": str(self.config.path),
            "map_size": env["map_size"],
            "max_map_size": self.config.max_map_size,
            "used_bytes": (env["last_pgno"] + 1) * stat["psize"],
            "sync": self.config.sync,
            "readers": env["num_readers"],
        }

    def close(self) -> None:
        if self._closed or os.getpid() != self._pid:
            self._closed = True
            return
        with self._gate.exclusive():
            self._env.close()
        self._closed = True
