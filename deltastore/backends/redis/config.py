"""Where the store lives in Redis and how to reach it: URL options, and the redis-py client.

Why its own module: the URL grammar (``redis://``, ``rediss://``, ``redis+cluster://`` with
DeltaStore's options in the query) and the client policy (timeouts, retries) are what an
operator configures; the storage protocol in the other modules never parses a URL.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeAlias
from urllib.parse import parse_qsl, unquote, urlencode, urlsplit, urlunsplit

import redis
from redis.backoff import ExponentialWithJitterBackoff
from redis.cluster import ClusterNode, RedisCluster
from redis.retry import Retry

from deltastore.backends import redact_url
from deltastore.backends.redis.errors import redis_errors
from deltastore.errors import InvalidArgument

__all__ = ["RETRIES", "SCHEMES", "Client", "RedisConfig", "connect"]

SCHEMES = ("redis", "rediss", "redis+cluster", "rediss+cluster")
RETRIES = 2  # redis-py resends a command whose connection failed at most this many times
_PREFIX_RE = re.compile(r"[A-Za-z0-9._-]{1,64}")
# redis.Redis | RedisCluster. redis-py annotates each command with the union of its sync and
# async results (and str for decoded replies), so typed uses would need a cast at every call;
# replies are bytes here (no decode_responses) and checked where they are parsed.
Client: TypeAlias = Any


@dataclass(frozen=True)
class RedisConfig:
    """Where and how the store lives in Redis.

    Attributes:
        url: the server URL without DeltaStore's query options (see :mod:`deltastore.backends.redis`).
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
        max_attempts: tries of one transaction whose lease ran out (also bounded by
            ``lock_wait_s`` and the call's deadline).
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


def _retry() -> Retry:
    """redis-py's own retry of connection errors and timeouts, the same for one node or a cluster.

    Few, short tries (jittered backoff, 0.3 s in all at most): a connection dropped by a restart
    or a failover is reopened, and a node that stays down surfaces as UNAVAILABLE quickly, for
    the caller (the gRPC client) to retry the call. A resent command whose first reply was lost is
    harmless: reads, payload SETs and DELs, intents and view registrations are idempotent, the
    commit script recognizes its own replay (scripts.py), and a replayed lock SET NX only makes
    the writer wait out its own lease.
    """
    return Retry(ExponentialWithJitterBackoff(base=0.05, cap=0.5), RETRIES)


def connect(cfg: RedisConfig) -> Client:
    """A client of the URL's server or cluster, with the configured timeouts and retries."""
    options: dict[str, Any] = {
        "socket_timeout": cfg.timeout_s,
        "socket_connect_timeout": min(cfg.timeout_s, 2.0),
        "retry": _retry(),
    }
    if not cfg.cluster:
        with redis_errors("connect"):
            return redis.Redis.from_url(cfg.url, health_check_interval=30, **options)
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
    with redis_errors("connect"):
        return RedisCluster(
            startup_nodes=nodes,
            username=unquote(parts.username) if parts.username else None,
            password=unquote(parts.password) if parts.password else None,
            ssl=parts.scheme.startswith("rediss"),
            require_full_coverage=False,
            **options,
        )
