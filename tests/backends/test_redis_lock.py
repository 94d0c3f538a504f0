"""The write lock's acquire may be resent (redis-py resends a command whose reply was lost)."""

from __future__ import annotations

import secrets

import redis
from redis_harness import SHARED_URL, require_shared_redis

from deltastore.backends.redis.commit import ReplaySafeLock


def test_a_resent_acquire_finds_the_lock_its_first_send_took() -> None:
    """Before: the resent SET NX failed against the writer's own token, and the writer waited out
    its own lease (15 s by default) before it could commit."""
    require_shared_redis()
    client = redis.Redis.from_url(SHARED_URL)
    name = f"dst-lock-test-{secrets.token_hex(4)}"
    try:
        mine = client.lock(name, timeout=5, thread_local=False, lock_class=ReplaySafeLock)
        other = client.lock(name, timeout=5, thread_local=False, lock_class=ReplaySafeLock)
        assert mine.acquire(blocking=False, token="writer-a")
        assert mine.do_acquire(b"writer-a")  # the resend of the same SET: still ours
        assert not other.acquire(blocking=False, token="writer-b")  # another writer: busy
        assert 0 < client.pttl(name) <= 5000  # the lease holds
        mine.release()
        assert other.acquire(blocking=False, token="writer-b")
        other.release()
    finally:
        client.delete(name)
        client.close()
