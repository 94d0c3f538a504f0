"""Fixtures of the Redis backend tests: the shared cluster's URL, private clusters and servers."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from redis_harness import OPTIONS, require_redis_server, unique_prefix

from deltastore.backends.redis import RedisBackend
from deltastore.bench.redis_local import LocalRedis, LocalRedisCluster


@pytest.fixture
def cluster_url(redis_cluster: LocalRedisCluster, tmp_path: Path) -> str:
    """A backend URL with a fresh prefix on the test session's shared 3-node cluster."""
    return f"{redis_cluster.url}?prefix={unique_prefix(tmp_path, 'c')}&{OPTIONS}"


@pytest.fixture
def own_cluster(tmp_path: Path) -> Iterator[LocalRedisCluster]:
    """A private 3-node cluster (append-only, fsync per write) that a test may kill nodes of."""
    require_redis_server()
    with LocalRedisCluster(tmp_path / "cluster", appendfsync="always") as cluster:
        yield cluster


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[LocalRedis]:
    """A private standalone redis-server a test may reconfigure."""
    require_redis_server()
    with LocalRedis(tmp_path / "redis", appendfsync="no") as server:
        yield server


@pytest.fixture
def cluster_backend(cluster_url: str) -> Iterator[RedisBackend]:
    backend = RedisBackend.from_url(cluster_url)
    yield backend
    backend.close()
