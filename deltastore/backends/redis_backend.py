"""The distributed backend: Redis (standalone or Cluster) or Valkey, behind the Backend interface.

How the interface's guarantees are kept on an engine without multi-key transactions across
nodes or snapshot reads:

- Placement. Everything the store changes in one transaction (records, refcounts, the LRU
  index and the store-wide counters) lives under one hash tag ``{prefix}``, so one node's Lua
  commits it atomically. Only values of the ``blocks`` keyspace (the payloads: nearly every
  byte) are stored *out of line*, each under a data key with its own random hash tag, so they
  spread over every node of a cluster; the metadata slot holds the data key's name. The
  trade-off: a store's metadata (a few hundred bytes per segment and snapshot) is bounded by
  one node and one core, its payloads are not. Run one store per key prefix to spread metadata.
- Writes. A transaction takes the store's write lock (``SET NX PX``, a lease), runs ``fn``
  reading the current state and buffering its writes, then commits: it records each new
  payload's data key as an *intent* (only while holding the lock; each 32 MiB of payloads
  renews the lease), writes the payloads with pipelines to their nodes, and runs one Lua
  script that checks the lock token (fencing: a writer whose lease expired commits nothing and
  runs ``fn`` again), applies every write as a new version and releases the lock. Writers
  serialize per store, like LMDB's single writer; reads under the lock cost one round trip
  per key. A crash before the script leaves data keys nothing references; the next
  commit moves such stale intents to the free set, and clients delete freed data keys after
  their commits. A crash after it leaves a complete commit. So a snapshot is visible whole or
  not at all, refcounts and counters change only with the data, and a retried put is an
  idempotent no-op at the store level.
- Reads. ``read()`` registers a view at the current commit sequence S (with a lease); while
  any view is open, commits keep the versions they replace, and the view reads values as of S.
  History is trimmed once no open view is older, and never kept while no view is open.
  Payloads replaced or freed are deleted only after that, so a view never sees a dangling
  data key. A view open longer than its lease fails with BackendUnavailable (retry the call).
  Data keys are never rewritten (each write makes a new name), so a client-side payload cache
  by name is always coherent; it saves refetching payloads a later turn or session reuses.
- Failures. Connection loss, a cluster slot without a live node, a loading or read-only
  replica raise :class:`~deltastore.errors.BackendUnavailable` (gRPC UNAVAILABLE); Redis
  out of memory raises StoreFull. A missing data key behind a committed pointer (a node that
  came back without its data) raises ChecksumMismatch: never wrong bytes.
- Durability is Redis's: run it with ``appendonly yes`` and ``appendfsync always`` for every
  acknowledged put to survive a crash of Redis itself (``everysec`` may lose the last second),
  and ``maxmemory-policy noeviction`` (checked at open on every primary: an evicting Redis
  would drop records). Replication is asynchronous: with ``wait_replicas=N`` a commit is
  acknowledged only once N replicas of the metadata node have it (WAIT), so a failover keeps
  it; payload keys on other nodes are not waited for (a payload lost in a failover reads as
  ChecksumMismatch, never as wrong bytes).

URLs: ``redis://[user:pass@]host:port[/db]``, ``rediss://`` (TLS), and
``redis+cluster://host:port[,host:port...]`` (``rediss+cluster://`` with TLS). Query options:
``prefix`` (default ``deltastore``), ``lock_lease_ms`` (15000), ``lock_wait_s`` (60),
``view_lease_ms`` (60000), ``timeout_s`` (socket timeout, 10), ``payload_cache_mb`` (64),
``wait_replicas`` (0), ``wait_timeout_ms`` (1000) and ``max_attempts`` (5: tries of one
transaction whose lease ran out, also bounded by ``lock_wait_s`` and the call's deadline).

Why one long module: the views, the write batch and the commit protocol share the key layout
and the Lua scripts' contract (redis_scripts.py); they change together.
"""

from __future__ import annotations

import abc
import hashlib
import mmap
import re
import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from typing import Any, TypeAlias, TypeVar
from urllib.parse import parse_qsl, unquote, urlencode, urlsplit, urlunsplit

import redis
import redis.exceptions as rex
from redis.backoff import ExponentialBackoff
from redis.cluster import ClusterNode, RedisCluster
from redis.retry import Retry

from deltastore.backend import (
    COUNTER_NBYTES,
    KEYSPACES,
    MAX_KEY_BYTES,
    Backend,
    ReadView,
    WriteBatch,
    deadline_left,
)
from deltastore.backends import redact_url, redis_scripts
from deltastore.errors import (
    BackendUnavailable,
    ChecksumMismatch,
    DeltaStoreError,
    IncompatibleFormat,
    InvalidArgument,
    StoreFull,
)

__all__ = ["REDIS_FORMAT", "RedisBackend", "RedisConfig"]

REDIS_FORMAT = b"deltastore-redis/1"
OUT_OF_LINE: frozenset[str] = frozenset({"blocks"})  # keyspaces whose values live under their own tags
SCHEMES = ("redis", "rediss", "redis+cluster", "rediss+cluster")
_HDR = redis_scripts.HDR_DIGITS
_PREFIX_RE = re.compile(r"[A-Za-z0-9._-]{1,64}")
_SCAN_PAGE = 256
_TRIM_BUDGET = 4096  # history entries one commit trims at most (bounds a commit's latency)
_FREE_PAGE = 512  # freed data keys one client deletes after a commit, at most
_CHUNK_BYTES = 32 << 20  # payload bytes written per lease renewal
T = TypeVar("T")
Value = bytes | None  # None in a write buffer: deleted
# redis.Redis | RedisCluster. redis-py annotates each command with the union of its sync and
# async results (and str for decoded replies), so typed uses would need a cast at every call;
# replies are bytes here (no decode_responses) and checked where they are parsed.
Client: TypeAlias = Any

_UNAVAILABLE = (
    rex.ConnectionError,
    rex.TimeoutError,
    rex.ClusterDownError,
    rex.TryAgainError,
    rex.MasterDownError,
    rex.BusyLoadingError,
    rex.ReadOnlyError,
    rex.SlotNotCoveredError,
    rex.RedisClusterException,
)


def _chunks(items: list[tuple[str, bytes]], limit: int) -> Iterator[list[tuple[str, bytes]]]:
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


class _LockLost(Exception):
    """The write lock's lease expired before the commit: run the transaction again."""


@dataclass(frozen=True)
class RedisConfig:
    """Where and how the store lives in Redis.

    Attributes:
        url: the server URL without DeltaStore's query options (see the module docstring).
        prefix: key prefix and hash tag of this store's metadata; stores with different prefixes
            are independent and may sit on different cluster nodes.
        lock_lease_ms: the write lock expires this long after a writer crashed holding it
            (writers then wait at most this long); a transaction must commit within it.
        lock_wait_s: a writer waiting longer than this for the lock fails with BackendUnavailable.
        view_lease_ms: how long a read view may stay open.
        timeout_s: socket connect and read timeout, seconds.
        payload_cache_mb: client-side cache of payloads, MiB (0: off). Always coherent: a data
            key's bytes never change (each write makes a new key), so entries never go stale.
        wait_replicas: a commit is acknowledged only once this many replicas of the metadata
            node have it (WAIT); 0: on the primary alone (asynchronous replication).
        wait_timeout_ms: how long a commit waits for those replicas before failing UNAVAILABLE.
    """

    url: str = field(default="redis://127.0.0.1:6379/0", repr=False)  # may hold a password
    prefix: str = "deltastore"
    lock_lease_ms: int = 15_000
    lock_wait_s: float = 60.0
    view_lease_ms: int = 60_000
    timeout_s: float = 10.0
    payload_cache_mb: int = 64
    wait_replicas: int = 0
    wait_timeout_ms: int = 1000
    max_attempts: int = 5

    def __post_init__(self) -> None:
        scheme = urlsplit(self.url).scheme
        if scheme not in SCHEMES:
            raise InvalidArgument(
                f"not a Redis URL: {redact_url(self.url)!r}",
                hint=f"use one of {', '.join(s + '://' for s in SCHEMES)}",
            )
        if not _PREFIX_RE.fullmatch(self.prefix):
            raise InvalidArgument(f"Redis key prefix {self.prefix!r} must match [A-Za-z0-9._-]{{1,64}}")
        if self.lock_lease_ms < 100 or self.view_lease_ms < 100:
            raise InvalidArgument("lock_lease_ms and view_lease_ms must be at least 100")
        if self.max_attempts < 1:
            raise InvalidArgument("max_attempts must be at least 1")
        if self.lock_wait_s <= 0 or self.timeout_s <= 0 or self.wait_timeout_ms <= 0:
            raise InvalidArgument("lock_wait_s, timeout_s and wait_timeout_ms must be positive")
        if self.payload_cache_mb < 0 or self.wait_replicas < 0:
            raise InvalidArgument("payload_cache_mb and wait_replicas must be >= 0")

    @property
    def cluster(self) -> bool:
        return urlsplit(self.url).scheme.endswith("+cluster")

    @classmethod
    def from_url(cls, url: str) -> RedisConfig:
        """Split DeltaStore's options (``prefix``, leases, timeout) off a Redis URL."""
        parts = urlsplit(url)
        ours: dict[str, Any] = {}
        rest: list[tuple[str, str]] = []
        casts: dict[str, Callable[[str], Any]] = {
            "prefix": str,
            "lock_lease_ms": int,
            "lock_wait_s": float,
            "view_lease_ms": int,
            "timeout_s": float,
            "payload_cache_mb": int,
            "wait_replicas": int,
            "wait_timeout_ms": int,
            "max_attempts": int,
        }
        for name, value in parse_qsl(parts.query, keep_blank_values=True):
            if name in casts:
                try:
                    ours[name] = casts[name](value)
                except ValueError:
                    raise InvalidArgument(f"Redis URL option {name}={value!r} is not a number") from None
            else:
                rest.append((name, value))
        clean = urlunsplit((parts.scheme, parts.netloc, parts.path, urlencode(rest), ""))
        return cls(url=clean, **ours)


def _hint(exc: BaseException) -> str:
    return "check that every Redis node is up and reachable; the call can be retried" + (
        f" ({type(exc).__name__})" if not str(exc) else ""
    )


def _view_expired(what: str) -> BackendUnavailable:
    return BackendUnavailable(
        f"Redis read view expired during {what}",
        hint="read views must be short; raise view_lease_ms in the backend URL",
    )


@contextmanager
def _errors(what: str) -> Iterator[None]:
    """Map redis-py failures onto DeltaStore's error hierarchy."""
    try:
        yield
    except _UNAVAILABLE as exc:
        raise BackendUnavailable(f"Redis unavailable during {what}: {exc}", hint=_hint(exc)) from exc
    except rex.OutOfMemoryError as exc:
        raise StoreFull(
            f"Redis is out of memory during {what}: {exc}",
            hint="raise Redis maxmemory or add cluster nodes; lower DELTASTORE_MAX_STORED_BYTES so "
            "eviction starts earlier",
        ) from exc
    except rex.ResponseError as exc:
        text = str(exc)
        if text.startswith("DSLOCK"):
            raise _LockLost(text) from exc
        if text.startswith("DSEXPIRED"):
            raise _view_expired(what) from exc
        if "CLUSTERDOWN" in text or "MASTERDOWN" in text or text.startswith("LOADING"):
            raise BackendUnavailable(f"Redis unavailable during {what}: {exc}", hint=_hint(exc)) from exc
        if text.startswith("OOM"):
            raise StoreFull(
                f"Redis is out of memory during {what}: {exc}", hint="raise Redis maxmemory"
            ) from exc
        raise DeltaStoreError(f"Redis error during {what}: {exc}") from exc
    except rex.RedisError as exc:
        raise DeltaStoreError(f"Redis error during {what}: {exc}") from exc


def _as_bytes(value: Any) -> bytes:
    """A Redis reply item (bytes; str only if a client decodes responses) as bytes."""
    return value.encode() if isinstance(value, str) else bytes(value)


def _encode_counter(value: int) -> bytes:
    return value.to_bytes(COUNTER_NBYTES, "little", signed=True)


def _decode_counter(raw: bytes | memoryview) -> int:
    return int.from_bytes(raw, "little", signed=True)


def _lex_range(prefix: bytes, after: bytes | None) -> tuple[bytes, bytes]:
    """ZRANGEBYLEX bounds of the keys starting with ``prefix`` (and greater than ``after``)."""
    low = b"(" + after if after is not None else (b"[" + prefix if prefix else b"-")
    end = prefix.rstrip(b"\xff")
    high = b"(" + end[:-1] + bytes([end[-1] + 1]) if end else b"+"
    return low, high


class _PayloadCache:
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


class _Script:
    """A Lua script called by SHA, (re)loaded on NOSCRIPT (e.g. after a node restarted)."""

    def __init__(self, client: Client, source: str) -> None:
        self._client = client
        self._source = source
        self._sha = hashlib.sha1(source.encode()).hexdigest()

    def __call__(self, key: str, *args: bytes | str | int) -> Any:
        try:
            return self._client.evalsha(self._sha, 1, key, *args)
        except rex.NoScriptError:
            self._client.script_load(self._source)
            return self._client.evalsha(self._sha, 1, key, *args)

    def then_wait(
        self, node: redis.Redis, replicas: int, timeout_ms: int, key: str, *args: bytes | str | int
    ) -> tuple[Any, int]:
        """Run on ``node``, then WAIT on the same connection: (reply, replicas that have the writes)."""

        def attempt() -> tuple[Any, int]:
            pipe = node.pipeline(transaction=False)
            pipe.evalsha(self._sha, 1, key, *args)
            pipe.wait(replicas, timeout_ms)
            reply, acked = pipe.execute()
            return reply, int(acked)

        try:
            return attempt()
        except rex.NoScriptError:
            node.script_load(self._source)
            return attempt()


class _Reader(ReadView):
    """Reads of one keyspace layout; subclasses say at which version."""

    def __init__(self, backend: RedisBackend) -> None:
        self._b = backend

    @abc.abstractmethod
    def _raw(self, keyspace: str, key: bytes) -> bytes | None:
        """The stored value (a data key name for out-of-line keyspaces), None when absent."""

    @abc.abstractmethod
    def _raw_page(
        self, keyspace: str, prefix: bytes, after: bytes | None
    ) -> tuple[list[tuple[bytes, bytes]], bool]:
        """Up to a page of (key, stored value) in key order after ``after``; True when more may follow."""

    def get(self, keyspace: str, key: bytes) -> bytes | None:
        raw = self._raw(self._b.check_keyspace(keyspace), key)
        if raw is None or keyspace not in OUT_OF_LINE:
            return raw
        return self._fetch([(key, raw)])[0]

    def _fetch(self, pointers: list[tuple[bytes, bytes]]) -> list[bytes]:
        return self._b.fetch_data(pointers)

    def get_head(self, keyspace: str, key: bytes, nbytes: int) -> tuple[bytes, int] | None:
        raw = self._raw(self._b.check_keyspace(keyspace), key)
        if raw is None or keyspace not in OUT_OF_LINE:
            return None if raw is None else (raw[:nbytes], len(raw))
        return self._fetch_head(key, raw, nbytes)

    def _fetch_head(self, key: bytes, name: bytes, nbytes: int) -> tuple[bytes, int]:
        return self._b.fetch_head(key, name, nbytes)

    def get_counter(self, keyspace: str, key: bytes) -> int:
        raw = self._raw(self._b.check_keyspace(keyspace), key)
        return 0 if raw is None else _decode_counter(raw)

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
        self._b.check_keyspace(keyspace)
        for page in self._scan_raw(keyspace, prefix):
            if keyspace in OUT_OF_LINE:
                yield from zip((k for k, _ in page), self._fetch(page), strict=True)
            else:
                yield from page

    def scan_counters(self, keyspace: str, prefix: bytes = b"") -> Iterator[tuple[bytes, int]]:
        self._b.check_keyspace(keyspace)
        for page in self._scan_raw(keyspace, prefix):
            for key, raw in page:
                yield key, _decode_counter(raw)


class _View(_Reader):
    """A read view at commit sequence ``seq``, registered under ``view_id`` while open."""

    def __init__(self, backend: RedisBackend, view_id: str, seq: int) -> None:
        super().__init__(backend)
        self._id = view_id
        self._seq = seq

    def _raw(self, keyspace: str, key: bytes) -> bytes | None:
        with _errors("a read"):
            raw = self._b.scripts["get_at"](self._b.seq_key, self._b.tag, self._id, self._seq, keyspace, key)
        return None if raw is None else raw[_HDR:]

    def _raw_page(
        self, keyspace: str, prefix: bytes, after: bytes | None
    ) -> tuple[list[tuple[bytes, bytes]], bool]:
        return self._b.scan_page(self._id, self._seq, keyspace, prefix, after)

    def _fetch(self, pointers: list[tuple[bytes, bytes]]) -> list[bytes]:
        return self._expired_if_gone(lambda: self._b.fetch_data(pointers))

    def _fetch_head(self, key: bytes, name: bytes, nbytes: int) -> tuple[bytes, int]:
        return self._expired_if_gone(lambda: self._b.fetch_head(key, name, nbytes))

    def _expired_if_gone(self, read: Callable[[], T]) -> T:
        try:
            return read()
        except ChecksumMismatch:
            # A view past its lease no longer holds back the freeing of what it read: that is
            # an expired view, not lost data.
            with _errors("a read"):
                alive = self._b.client.zscore(f"{self._b.tag}:rs", self._id) is not None
            if alive:
                raise
            raise _view_expired("a payload read") from None


class _Batch(_Reader, WriteBatch):
    """A transaction under the write lock: reads the current state overlaid with its own writes."""

    def __init__(self, backend: RedisBackend) -> None:
        super().__init__(backend)
        self.writes: dict[str, dict[bytes, Value]] = {}
        # Stored values read so far: nobody else commits while the lock is held, so they stay
        # current and each key costs one round trip per transaction.
        self._read: dict[tuple[str, bytes], bytes | None] = {}

    def _raw(self, keyspace: str, key: bytes) -> bytes | None:
        mine = self.writes.get(keyspace)
        if mine is not None and key in mine:
            return mine[key]
        if (keyspace, key) not in self._read:
            raw = self._b.current(keyspace, key)
            self._read[keyspace, key] = None if raw is None else raw[_HDR:]
        return self._read[keyspace, key]

    def get(self, keyspace: str, key: bytes) -> bytes | None:
        mine = self.writes.get(self._b.check_keyspace(keyspace))
        if mine is not None and key in mine:
            return mine[key]  # buffered values are the data itself, also out of line
        return super().get(keyspace, key)

    def get_head(self, keyspace: str, key: bytes, nbytes: int) -> tuple[bytes, int] | None:
        mine = self.writes.get(self._b.check_keyspace(keyspace))
        if mine is not None and key in mine:
            value = mine[key]
            return None if value is None else (value[:nbytes], len(value))
        return super().get_head(keyspace, key, nbytes)

    def _raw_page(
        self, keyspace: str, prefix: bytes, after: bytes | None
    ) -> tuple[list[tuple[bytes, bytes]], bool]:
        return self._b.scan_page("", 0, keyspace, prefix, after)

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
        self._b.check_keyspace(keyspace)
        for key, value, buffered in self._merged(keyspace, prefix):
            if keyspace in OUT_OF_LINE and not buffered:
                value = self._fetch([(key, value)])[0]
            yield key, value

    def scan_counters(self, keyspace: str, prefix: bytes = b"") -> Iterator[tuple[bytes, int]]:
        self._b.check_keyspace(keyspace)
        for key, value, _ in self._merged(keyspace, prefix):
            yield key, _decode_counter(value)

    def _write(self, keyspace: str, key: bytes, value: Value) -> None:
        if len(key) > MAX_KEY_BYTES or not key:
            raise InvalidArgument(f"keys must be 1..{MAX_KEY_BYTES} bytes, got {len(key)}")
        self.writes.setdefault(keyspace, {})[key] = value

    def put(self, keyspace: str, key: bytes, value: bytes | bytearray | memoryview | mmap.mmap) -> None:
        self._write(self._b.check_keyspace(keyspace), key, bytes(value))

    def put_if_absent(self, keyspace: str, key: bytes, value: bytes) -> bool:
        if self._raw(self._b.check_keyspace(keyspace), key) is not None:
            return False
        self._write(keyspace, key, bytes(value))
        return True

    def delete(self, keyspace: str, key: bytes) -> bool:
        if self._raw(self._b.check_keyspace(keyspace), key) is None:
            return False
        self._write(keyspace, key, None)
        return True

    def incr(self, keyspace: str, key: bytes, delta: int) -> int:
        raw = self._raw(self._b.check_keyspace(keyspace), key)
        value = (0 if raw is None else _decode_counter(raw)) + delta
        if value:
            self._write(keyspace, key, _encode_counter(value))
        elif raw is not None:
            self._write(keyspace, key, None)
        return value


class RedisBackend(Backend):
    """A store's keyspaces in Redis or Redis Cluster; see the module docstring for the protocol.

    Several processes (``deltastore serve`` replicas) may open one URL and prefix at once: they
    share the data, writers serialize on the store's lock, readers never wait.
    """

    name = "redis"

    def __init__(self, config: RedisConfig) -> None:
        self.config = config
        self.prefix = config.prefix
        self.tag = tag = "{" + config.prefix + "}"
        self.seq_key = f"{tag}:seq"
        self._lock_key = f"{tag}:lock"
        self._format_key = f"{tag}:format"
        self._free_key = f"{tag}:free"
        self._closed = False
        self._cache = _PayloadCache(config.payload_cache_mb << 20)
        self.client = self._connect()
        self.scripts = {
            name: _Script(self.client, source)
            for name, source in (
                ("open_view", redis_scripts.OPEN_VIEW),
                ("get_at", redis_scripts.GET_AT),
                ("scan_at", redis_scripts.SCAN_AT),
                ("intent", redis_scripts.INTENT),
                ("release", redis_scripts.RELEASE),
                ("commit", redis_scripts.COMMIT),
            )
        }
        self._check_server()

    @classmethod
    def from_url(cls, url: str) -> RedisBackend:
        return cls(RedisConfig.from_url(url))

    # ------------------------------------------------------------------ connection

    def _connect(self) -> Client:
        cfg = self.config
        timeouts: dict[str, Any] = {
            "socket_timeout": cfg.timeout_s,
            "socket_connect_timeout": min(cfg.timeout_s, 2.0),
        }
        if not cfg.cluster:
            with _errors("connect"):
                return redis.Redis.from_url(cfg.url, health_check_interval=30, **timeouts)
        parts = urlsplit(cfg.url)
        hosts = parts.netloc.rpartition("@")[2]
        nodes: list[ClusterNode] = []
        for item in filter(None, hosts.split(",")):
            host, sep, port = item.rpartition(":")
            if not sep or not port.isdigit():
                raise InvalidArgument(f"cluster node {item!r} in {redact_url(cfg.url)!r} is not host:port")
            nodes.append(ClusterNode(host.strip("[]"), int(port)))
        if not nodes:
            raise InvalidArgument(f"{redact_url(cfg.url)!r} names no cluster node")
        with _errors("connect"):
            return RedisCluster(
                startup_nodes=nodes,
                username=unquote(parts.username) if parts.username else None,
                password=unquote(parts.password) if parts.password else None,
                ssl=parts.scheme.startswith("rediss"),
                # Few, short retries: a dead node must surface as UNAVAILABLE quickly.
                retry=Retry(ExponentialBackoff(cap=0.5, base=0.05), 2),
                require_full_coverage=False,
                **timeouts,
            )

    def _check_server(self) -> None:
        with _errors("open"):
            # CONFIG may be disabled on managed services; then the operator's word is taken.
            try:
                if self.config.cluster:  # every primary: one evicting node drops records too
                    per_node = self.client.config_get("maxmemory-policy", target_nodes=RedisCluster.PRIMARIES)
                    values = {v.get("maxmemory-policy") for v in per_node.values()}
                else:
                    values = {self.client.config_get("maxmemory-policy").get("maxmemory-policy")}
            except rex.ResponseError:
                values = set()
            evicting = sorted(v for v in values if v and v != "noeviction")
            if evicting:
                raise InvalidArgument(
                    f"Redis evicts keys (maxmemory-policy {', '.join(evicting)}): it would drop store records",
                    hint="set maxmemory-policy noeviction on every node; DeltaStore evicts whole sessions itself",
                )
            found = self.client.set(self._format_key, REDIS_FORMAT, nx=True, get=True)
        if found is not None and bytes(found) != REDIS_FORMAT:
            raise IncompatibleFormat(
                f"Redis prefix {self.prefix!r} holds layout {bytes(found)!r}; this build reads {REDIS_FORMAT!r}",
                hint="upgrade deltastore, or choose another ?prefix= in the backend URL",
            )

    def check_keyspace(self, keyspace: str) -> str:
        if self._closed:
            raise DeltaStoreError("the Redis backend is closed")
        if keyspace not in KEYSPACES:
            raise InvalidArgument(f"unknown keyspace {keyspace!r}")
        return keyspace

    # ------------------------------------------------------------------ reads

    def current(self, keyspace: str, key: bytes) -> bytes | None:
        """The latest committed encoded value (for the lock holder)."""
        with _errors("a read"):
            return self.client.hget(f"{self.tag}:v:{keyspace}", key)

    def scan_page(
        self, view_id: str, seq: int, keyspace: str, prefix: bytes, after: bytes | None
    ) -> tuple[list[tuple[bytes, bytes]], bool]:
        """A page of (key, stored value) as of ``seq`` (view) or now (``view_id`` "")."""
        low, high = _lex_range(prefix, after)
        with _errors("a scan"):
            reply = self.scripts["scan_at"](
                self.seq_key, self.tag, view_id, seq, keyspace, low, high, _SCAN_PAGE
            )
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

    def fetch_data(self, pointers: list[tuple[bytes, bytes]]) -> list[bytes]:
        """The payloads behind (key, data key name) pointers, in order."""
        values: list[bytes | None] = [self._cache.get(bytes(name)) for _, name in pointers]
        todo = [i for i, v in enumerate(values) if v is None]
        with _errors("a payload read"):
            if len(todo) == 1:
                fetched = [self.client.get(pointers[todo[0]][1])]
            elif todo:
                pipe = self.client.pipeline(transaction=False)
                for i in todo:
                    pipe.get(pointers[i][1])
                fetched = pipe.execute()
            else:
                fetched = []
        for i, value in zip(todo, fetched, strict=True):
            key, name = pointers[i]
            if value is None:
                raise ChecksumMismatch(
                    key.hex(), f"payload under Redis key {bytes(name).decode()}", "no such key (data lost)"
                )
            self._cache.put(bytes(name), value)
            values[i] = value
        return values  # type: ignore[return-value]

    def fetch_head(self, key: bytes, name: bytes, nbytes: int) -> tuple[bytes, int]:
        """The first ``nbytes`` of the payload behind a pointer and its length: no whole-value read."""
        cached = self._cache.get(bytes(name))
        if cached is not None:
            return cached[:nbytes], len(cached)
        with _errors("a payload read"):
            pipe = self.client.pipeline(transaction=False)
            pipe.getrange(name, 0, max(nbytes, 1) - 1)
            pipe.strlen(name)
            head, total = pipe.execute()
        if not total:
            raise ChecksumMismatch(
                key.hex(), f"payload under Redis key {bytes(name).decode()}", "no such key (data lost)"
            )
        return head, int(total)

    @contextmanager
    def read(self) -> Iterator[ReadView]:
        self.check_keyspace("meta")
        view_id = secrets.token_hex(12)
        with _errors("opening a read view"):
            seq = int(self.scripts["open_view"](self.seq_key, self.tag, view_id, self.config.view_lease_ms))
        try:
            yield _View(self, view_id, seq)
        finally:
            # Best effort: the view's lease ends it anyway.
            with suppress(DeltaStoreError), _errors("closing a read view"):
                pipe = self.client.pipeline(transaction=False)
                pipe.zrem(f"{self.tag}:rs", view_id)
                pipe.zrem(f"{self.tag}:rx", view_id)
                pipe.execute()

    # ------------------------------------------------------------------ writes

    def _acquire(self) -> str:
        token = secrets.token_hex(16)
        deadline = time.monotonic() + self.config.lock_wait_s
        left = deadline_left()
        if left is not None:
            deadline = min(deadline, time.monotonic() + left)
        delay = 0.0005
        while True:
            with _errors("taking the write lock"):
                if self.client.set(self._lock_key, token, nx=True, px=self.config.lock_lease_ms):
                    return token
            if time.monotonic() > deadline:
                raise BackendUnavailable(
                    f"the store's write lock in Redis stayed busy for {self.config.lock_wait_s:g} s",
                    hint="another writer is slow or crashed holding it; it expires after lock_lease_ms",
                )
            time.sleep(delay * (0.5 + secrets.randbelow(1000) / 1000))
            delay = min(delay * 2, 0.02)

    def _release(self, token: str) -> None:
        """Best effort: an unreleased lock expires with its lease."""
        with suppress(DeltaStoreError), _errors("releasing the write lock"):
            self.scripts["release"](self.seq_key, self.tag, token)

    def _data_key(self) -> str:
        # Its own random hash tag: payloads spread evenly over every node of a cluster.
        return f"{self.prefix}:d:{{{secrets.token_hex(8)}}}"

    def _delete_data(self, names: list[bytes | str]) -> None:
        if names:
            pipe = self.client.pipeline(transaction=False)
            for name in names:
                pipe.delete(name)
            pipe.execute()

    def _commit(self, batch: _Batch, token: str) -> int:
        """Write the batch's payloads, then its metadata atomically; returns the free set's size."""
        data: list[tuple[str, bytes]] = []
        args: list[bytes | str | int] = []
        n_writes = 0
        for keyspace, writes in batch.writes.items():
            for key, value in writes.items():
                if value is not None and keyspace in OUT_OF_LINE:
                    name = self._data_key()
                    data.append((name, value))
                    value = name.encode()
                args += [keyspace, key, b"d" if value is None else b"p", b"" if value is None else value]
                n_writes += 1
        if not n_writes:
            self._release(token)
            return 0
        written: list[bytes | str] = []
        try:
            with _errors("a commit"):
                for chunk in _chunks(data, _CHUNK_BYTES):
                    # Each chunk renews the lease, so a large snapshot commits however long it takes
                    # to send, as long as each chunk fits in one lease.
                    names = [n for n, _ in chunk]
                    self.scripts["intent"](self.seq_key, self.tag, token, self.config.lock_lease_ms, *names)
                    pipe = self.client.pipeline(transaction=False)
                    for name, value in chunk:
                        pipe.set(name, value)
                    written.extend(names)
                    pipe.execute()
                ooc = sorted(OUT_OF_LINE)
                commit_args = (
                    self.tag,
                    token,
                    len(ooc),
                    *ooc,
                    len(data),
                    *(n for n, _ in data),
                    n_writes,
                    *args,
                    _TRIM_BUDGET,
                )
                reply = self._run_commit(commit_args)
        except _LockLost:
            self._delete_data_quietly(written)
            raise
        for name, value in data:
            self._cache.put(name.encode(), value)
        return int(reply[1])

    def _run_commit(self, commit_args: tuple[bytes | str | int, ...]) -> Any:
        """The commit script, followed by WAIT for replicas when ``wait_replicas`` asks for it."""
        cfg = self.config
        if not cfg.wait_replicas:
            return self.scripts["commit"](self.seq_key, *commit_args)
        if cfg.cluster:
            node = self.client.get_redis_connection(self.client.get_node_from_key(self.seq_key))
        else:
            node = self.client
        reply, acked = self.scripts["commit"].then_wait(
            node, cfg.wait_replicas, cfg.wait_timeout_ms, self.seq_key, *commit_args
        )
        if acked < cfg.wait_replicas:
            raise BackendUnavailable(
                f"commit reached {acked} of {cfg.wait_replicas} replicas within {cfg.wait_timeout_ms} ms",
                hint="it is applied on the primary but a failover may lose it; retrying the put is safe "
                "(an identical snapshot is a no-op); check the replicas",
            )
        return reply

    def _delete_data_quietly(self, names: list[bytes | str]) -> None:
        # Best effort: their intents are moved to the free set by the next commit.
        with suppress(DeltaStoreError), _errors("deleting unreferenced payloads"):
            self._delete_data(names)

    def _drain_free(self) -> None:
        """Delete a page of data keys no version references any more (idempotent, any client)."""
        with _errors("freeing payloads"):
            names = self.client.srandmember(self._free_key, _FREE_PAGE) or []
            if names:
                self._delete_data(names)
                self.client.srem(self._free_key, *names)

    def transact(self, fn: Callable[[WriteBatch], T]) -> T:
        """Run ``fn`` under the write lock and commit; retried after a lost lease, within bounds.

        A lease lost before the commit (``fn`` slower than ``lock_lease_ms``, a stalled process)
        commits nothing and runs ``fn`` again, at most ``max_attempts`` times in all, never past
        ``lock_wait_s`` from the first try nor past the call's deadline
        (:func:`deltastore.backend.call_deadline`): then BackendUnavailable.
        """
        self.check_keyspace("meta")
        started = time.monotonic()
        attempts = 0
        while True:
            attempts += 1
            token = self._acquire()
            try:
                batch = _Batch(self)
                result = fn(batch)
                freed = self._commit(batch, token)
            except _LockLost:
                # Our lease ran out and nothing was committed: run fn again, within bounds.
                left = deadline_left()
                if (
                    attempts >= self.config.max_attempts
                    or time.monotonic() - started > self.config.lock_wait_s
                    or (left is not None and left <= 0)
                ):
                    raise BackendUnavailable(
                        f"lost the store's write lock (lease {self.config.lock_lease_ms} ms) before "
                        f"committing, {attempts} time(s); nothing was written",
                        hint="the transaction outlasts lock_lease_ms (raise it) or Redis is overloaded",
                    ) from None
                continue
            except BaseException:
                self._release(token)
                raise
            if freed:
                # Committed already; if this fails, another commit's client frees them later.
                with suppress(DeltaStoreError):
                    self._drain_free()
            return result

    # ------------------------------------------------------------------ operations

    def stray_values(self) -> list[str]:
        """Payload keys under this prefix that no version, intent or free-set entry names.

        Read in this order so that a concurrent writer's keys are never reported: the data keys
        first (a writer records its intent before it writes one), then the intents, the current
        pointers, the history and the free set (a commit moves a name from the intents to the
        pointers, a replacement from the pointers to the history or the free set).
        """
        tag = self.tag
        with _errors("listing payload keys"):
            found = {_as_bytes(k) for k in self.client.scan_iter(match=f"{self.prefix}:d:*", count=1000)}
            if not found:
                return []
            named = {_as_bytes(k) for k in self.client.hkeys(f"{tag}:pend")}
            for ks in sorted(OUT_OF_LINE):
                named.update(_as_bytes(v)[_HDR:] for _, v in self.client.hscan_iter(f"{tag}:v:{ks}"))
                for key in self.client.zrange(f"{tag}:hk:{ks}", 0, -1):
                    for member in self.client.zrange(f"{tag}:H:{ks}:".encode() + _as_bytes(key), 0, -1):
                        named.add(_as_bytes(member)[2 * _HDR :])
            named.update(_as_bytes(m) for m in self.client.smembers(self._free_key))
        return sorted(name.decode() for name in found - named)

    def remove_stray_values(self, names: list[str]) -> int:
        stray = set(self.stray_values())  # only what is still unreferenced
        doomed = [n for n in names if n in stray]
        with _errors("removing stray payload keys"):
            self._delete_data(list(doomed))
        return len(doomed)

    def info(self) -> dict[str, Any]:
        self.check_keyspace("meta")
        tag = self.tag
        with _errors("info"):
            pipe = self.client.pipeline(transaction=False)
            pipe.hlen(f"{tag}:v:blocks")
            pipe.get(self.seq_key)
            pipe.zcard(f"{tag}:rs")
            pipe.zcard(f"{tag}:T")
            pipe.scard(self._free_key)
            blocks, seq, views, history, free = pipe.execute()
            if self.config.cluster:
                memory = self.client.info("memory", target_nodes=RedisCluster.PRIMARIES)
            else:
                memory = self.client.info("memory")
        if self.config.cluster:
            used = sum(int(m.get("used_memory", 0)) for m in memory.values() if isinstance(m, dict))
            nodes = sorted(memory)
        else:
            used = int(memory.get("used_memory", 0))
            nodes = [urlsplit(self.config.url).netloc.rpartition("@")[2]]
        return {
            "backend": self.name,
            "mode": "cluster" if self.config.cluster else "standalone",
            "nodes": nodes,
            "prefix": self.prefix,
            "used_memory_bytes": used,
            "blocks": int(blocks),
            "commit_seq": int(seq or 0),
            "open_views": int(views),
            "history_entries": int(history),
            "free_payloads": int(free),
            "lock_lease_ms": self.config.lock_lease_ms,
        }

    def destroy(self) -> int:
        """Delete every key of this store (metadata and payloads); returns how many. Irreversible."""
        self.check_keyspace("meta")
        removed = 0
        with _errors("destroy"):
            for pattern in (f"{self.tag}:*", f"{self.prefix}:d:*"):
                batch: list[bytes] = []
                for name in self.client.scan_iter(match=pattern, count=1000):
                    batch.append(name)
                    if len(batch) >= 1000:
                        self._delete_data(list(batch))
                        removed += len(batch)
                        batch.clear()
                self._delete_data(list(batch))
                removed += len(batch)
        return removed

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        with suppress(rex.RedisError):
            self.client.close()
