"""Redis: a transaction that keeps losing its lease gives up within bounds; reuse reads headers only."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
from redis_harness import require_redis_server

from deltastore.backend import call_deadline
from deltastore.backends.redis import RedisBackend
from deltastore.bench.redis_local import LocalRedis
from deltastore.errors import BackendUnavailable
from deltastore.settings import StoreConfig
from deltastore.store import SegmentPayload, Store


@pytest.fixture
def node(tmp_path: Path):
    require_redis_server()
    with LocalRedis(tmp_path / "redis", appendfsync="no") as redis_node:
        yield redis_node


def _run_bounded(fn, limit_s: float) -> BaseException | None:
    """Run ``fn`` in a thread; the exception it raised, or fail when it is still running after ``limit_s``."""
    out: list[BaseException | None] = []

    def target() -> None:
        try:
            fn()
            out.append(None)
        except BaseException as exc:
            out.append(exc)

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(limit_s)
    assert not thread.is_alive(), f"the transaction was still retrying after {limit_s} s"
    return out[0]


def test_lost_lease_retries_are_bounded(node: LocalRedis) -> None:
    backend = RedisBackend.from_url(f"{node.url}?prefix=lease&lock_lease_ms=100&lock_wait_s=30")
    tries = 0

    def slow(b) -> None:  # always outlives its 100 ms lease: the commit is refused every time
        nonlocal tries
        tries += 1
        time.sleep(0.15)
        b.put("meta", b"slow", b"1")

    try:
        started = time.monotonic()
        exc = _run_bounded(lambda: backend.transact(slow), 20)
        assert isinstance(exc, BackendUnavailable) and "lost the store's write lock" in str(exc)
        assert tries == backend.config.max_attempts == 5 and time.monotonic() - started < 10
        # The call's deadline bounds it too, before the attempts run out.
        tries = 0
        started = time.monotonic()

        def within_deadline() -> None:
            with call_deadline(0.3):  # as the server wraps each call
                backend.transact(slow)

        exc = _run_bounded(within_deadline, 20)
        assert isinstance(exc, BackendUnavailable) and tries < 5 and time.monotonic() - started < 3
        with backend.read() as view:
            assert view.get("meta", b"slow") is None  # nothing was ever committed
    finally:
        backend.close()


def test_reused_segments_are_not_fetched(node: LocalRedis) -> None:
    """A turn reusing ~16 MiB of stored payloads moves kilobytes from Redis, not the payloads."""
    url = f"{node.url}?prefix=heads&payload_cache_mb=0"
    config = StoreConfig(block_size=64)
    tokens = list(range(64 * 16 + 5))
    seg_bytes = 1 << 20

    def payloads(store: Store, n: int, parent: int | None) -> dict:
        plan = store.plan_snapshot("ns", "s", "m", "k4v2", tokens[:n], parent)
        return {
            s.key: SegmentPayload(bytes([i % 251]) * seg_bytes, s.n_tokens, 4096 * s.n_tokens)
            for i, s in enumerate(plan.missing)
        }

    with Store(RedisBackend.from_url(url), config) as store:
        store.put_snapshot("ns", "s", 0, "m", "k4v2", tokens[:1024], payloads(store, 1024, None))
    with node.client() as admin, Store(RedisBackend.from_url(url), config) as store:
        before = admin.info("stats")["total_net_output_bytes"]
        new = payloads(store, len(tokens), 0)
        assert len(new) == 1  # 16 reused segments (16 MiB), one new tail
        result = store.put_snapshot("ns", "s", 1, "m", "k4v2", tokens, new, 0)
        assert result.reused_segments == 16
        moved = admin.info("stats")["total_net_output_bytes"] - before
        assert store.get_snapshot("ns", "s", 1).info.n_tokens == len(tokens)
    assert moved < 1 << 20, f"{moved} bytes read from Redis to reuse 16 MiB of stored segments"
