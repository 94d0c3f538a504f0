"""Redis engines for the backend contract and store suites.

``redis_factory`` binds the shared server at 127.0.0.1:6379 (other tests use it too: every
factory gets its own key prefix, deleted when the test process exits; never FLUSHALL).
``redis_cluster_factory`` binds a 3-node Redis Cluster on loopback ports, started once per test
process with redis-server and redis-cli and torn down at exit. Without redis-server (or the
shared server) the tests skip, except under CI=true, where they fail.
"""

from __future__ import annotations

import atexit
import hashlib
import os
import secrets
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import pytest
import redis

from deltastore.backend import Backend
from deltastore.backends.redis import RedisBackend
from deltastore.bench.redis_local import LocalRedisCluster, redis_binaries
from deltastore.errors import DeltaStoreError

SHARED_URL = "redis://127.0.0.1:6379/0"
# Test-sized leases: a writer killed holding the lock stalls the others for at most 3 s.
OPTIONS = "lock_lease_ms=3000&view_lease_ms=30000&timeout_s=5"
_RUN = secrets.token_hex(3)  # this test process: prefixes never collide with concurrent runs
_created: list[tuple[str, str]] = []  # (url, prefix) to delete at exit
_cluster: LocalRedisCluster | None = None


def unavailable(reason: str) -> None:
    """Skip, or fail under CI=true (CI must run the Redis suites, not silently skip them)."""
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"CI=true but {reason}")
    pytest.skip(reason)


def require_redis_server() -> None:
    try:
        redis_binaries()
    except DeltaStoreError as exc:
        unavailable(str(exc))


def require_shared_redis() -> None:
    try:
        with redis.Redis.from_url(SHARED_URL, socket_connect_timeout=2) as client:
            client.ping()
    except redis.RedisError as exc:
        unavailable(f"no Redis at {SHARED_URL}: {exc}")


def unique_prefix(tmp_path: Path, name: str) -> str:
    digest = hashlib.blake2b(str(tmp_path).encode(), digest_size=4).hexdigest()
    return f"dst-{_RUN}-{digest}-{name}"


def shared_cluster() -> LocalRedisCluster:
    """The test process's 3-node cluster (started on first use, stopped at exit)."""
    global _cluster
    require_redis_server()
    if _cluster is None:
        directory = Path(tempfile.mkdtemp(prefix="deltastore-redis-cluster-"))
        cluster = LocalRedisCluster(directory, appendfsync="no")
        atexit.register(shutil.rmtree, directory, True)
        atexit.register(cluster.stop)
        _cluster = cluster.start()
    return _cluster


def _cleanup() -> None:
    for url, prefix in _created:
        try:
            with RedisBackend.from_url(f"{url}?prefix={prefix}") as backend:
                backend.destroy()
        except DeltaStoreError:
            pass  # the server went away first


atexit.register(_cleanup)


def _factory(url: str, tmp_path: Path) -> Callable[..., Backend]:
    def make(name: str = "default") -> Backend:
        prefix = unique_prefix(tmp_path, name)
        if (url, prefix) not in _created:
            _created.append((url, prefix))
        return RedisBackend.from_url(f"{url}?prefix={prefix}&{OPTIONS}")

    return make


def redis_factory(tmp_path: Path) -> Callable[..., Backend]:
    require_shared_redis()
    return _factory(SHARED_URL, tmp_path)


def redis_cluster_factory(tmp_path: Path) -> Callable[..., Backend]:
    # The cluster is stopped at exit: its keys need no cleanup, but tracking them is harmless.
    return _factory(shared_cluster().url, tmp_path)
