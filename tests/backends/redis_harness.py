"""Redis engines for the backend contract and store suites, as a pytest plugin (tests/conftest.py).

``redis_factory`` binds the shared server at 127.0.0.1:6379 (other tests use it too: every
factory gets its own key prefix, deleted when the session ends; never FLUSHALL).
``redis_cluster_factory`` binds a 3-node Redis Cluster on loopback ports (the session fixture
``redis_cluster``: started once per test session with redis-server and redis-cli, stopped at its
end). Without redis-server (or the shared server) the tests skip, except under CI=true, where
they fail.
"""

from __future__ import annotations

import hashlib
import os
import secrets
from collections.abc import Callable, Iterator
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


@pytest.fixture(scope="session")
def redis_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalRedisCluster]:
    """The test session's 3-node cluster, started on first use and stopped when the session ends."""
    require_redis_server()
    with LocalRedisCluster(tmp_path_factory.mktemp("redis-cluster"), appendfsync="no") as cluster:
        yield cluster


@pytest.fixture(scope="session")
def redis_prefixes() -> Iterator[list[tuple[str, str]]]:
    """(url, prefix) of every backend the session opened on a shared server: deleted at its end."""
    created: list[tuple[str, str]] = []
    yield created
    for url, prefix in created:
        try:
            with RedisBackend.from_url(f"{url}?prefix={prefix}") as backend:
                backend.destroy()
        except DeltaStoreError:
            pass  # the server went away first


def _factory(url: str, tmp_path: Path, created: list[tuple[str, str]] | None) -> Callable[..., Backend]:
    def make(name: str = "default") -> Backend:
        prefix = unique_prefix(tmp_path, name)
        if created is not None and (url, prefix) not in created:
            created.append((url, prefix))
        return RedisBackend.from_url(f"{url}?prefix={prefix}&{OPTIONS}")

    return make


def redis_factory(request: pytest.FixtureRequest, tmp_path: Path) -> Callable[..., Backend]:
    require_shared_redis()
    return _factory(SHARED_URL, tmp_path, request.getfixturevalue("redis_prefixes"))


def redis_cluster_factory(request: pytest.FixtureRequest, tmp_path: Path) -> Callable[..., Backend]:
    # The session's cluster is stopped at its end: its keys need no cleanup.
    cluster: LocalRedisCluster = request.getfixturevalue("redis_cluster")
    return _factory(cluster.url, tmp_path, None)
