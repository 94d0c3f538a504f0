"""Writes: one writer at a time per store, under a leased lock, committed by one fenced script.

A transaction takes the store's write lock (redis-py's :class:`~redis.lock.Lock` with an acquire
that is safe to resend, :class:`ReplaySafeLock`: ``SET NX PX`` with a random token, tried with redis-py's Retry and backoff until ``lock_wait_s`` or the call's
deadline), runs ``fn`` on a
:class:`~deltastore.backends.redis.views.Batch`, then commits: it records each new payload's
data key as an *intent* and renews the lease (the INTENT script, per 32 MiB of payloads),
writes the payloads to their nodes, and runs the COMMIT script, which applies every write as
one new version only if the lock still holds this token, and releases the lock in the same
step. What stays hand-written, and why: redis-py's Lock can acquire, renew and release, but it
cannot fence a multi-key write (``Lock.owned()`` then a commit is check-then-act: the lease may
expire in between, and another writer's commit would interleave), so the token check lives in
the scripts; and redis-py's Retry counts tries but knows no deadline, so the retry of a
transaction whose lease ran out is a loop bounded by ``max_attempts``, ``lock_wait_s`` and
:func:`~deltastore.backend.call_deadline` (issue #17).

A crash before the COMMIT script leaves data keys nothing references; the next commit moves
such stale intents to the free set, and clients delete freed data keys after their commits. A
crash after it leaves a complete commit. A lost lease never deletes what it wrote either: if the
COMMIT reply was lost, the payloads may be committed (a replay answers "committed", see
scripts.py), and if not, their intents free them at the next commit.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable
from contextlib import suppress
from typing import Any, TypeVar

from redis.backoff import EqualJitterBackoff
from redis.lock import Lock
from redis.retry import Retry

from deltastore.backend import WriteBatch, deadline_left
from deltastore.backends.redis.config import RETRIES, RedisConfig
from deltastore.backends.redis.errors import LockLost, redis_errors
from deltastore.backends.redis.payloads import OUT_OF_LINE, chunks, delete_keys
from deltastore.backends.redis.views import Batch, Metadata
from deltastore.errors import BackendUnavailable, DeltaStoreError

__all__ = ["Writer"]

T = TypeVar("T")
_TRIM_BUDGET = 4096  # history entries one commit trims at most (bounds a commit's latency)
_FREE_PAGE = 512  # freed data keys one client deletes after a commit, at most
_CHUNK_BYTES = 32 << 20  # payload bytes written per lease renewal


class _Busy(Exception):
    """Another writer holds the lock: try again after a backoff."""


def _lock_wait() -> Retry:
    """How a writer waits for the lock: sleeps of 0.25-0.5 ms between tries, doubling to 10-20 ms.

    Not Lock.acquire's own wait: it polls at one fixed interval, and measured with 4 writers on
    one store (1.2k small commits) a fixed 2 ms poll gave 20% fewer commits a second than this
    backoff, a 0.5 ms poll half as many (its SET NX flood slows the lock holder's commit).
    """
    return Retry(EqualJitterBackoff(cap=0.02, base=0.00025), -1, supported_errors=(_Busy,))


class ReplaySafeLock(Lock):
    """redis-py's Lock whose acquire may be resent: redis-py resends a command whose reply was lost
    (the client's Retry), and a plain ``SET NX`` resent after the first one took the lock fails
    against our own token, so the writer would wait out its own lease (15 s by default). One script,
    one round trip per try as before: the lock is ours if it already holds our token."""

    LUA_ACQUIRE_SCRIPT = """
    local held = redis.call('get', KEYS[1])
    if held == ARGV[1] then return 1 end
    if held then return 0 end
    redis.call('set', KEYS[1], ARGV[1], 'px', ARGV[2])
    return 1
    """
    lua_acquire: Any = None

    def register_scripts(self) -> None:
        super().register_scripts()
        cls = self.__class__
        if cls.lua_acquire is None:
            cls.lua_acquire = self.redis.register_script(cls.LUA_ACQUIRE_SCRIPT)

    def do_acquire(self, token: str | bytes) -> bool:
        lease_ms = int((self.timeout or 0) * 1000)
        if lease_ms <= 0:
            raise ValueError("the write lock needs a lease")
        return bool(self.lua_acquire(keys=[self.name], args=[token, lease_ms], client=self.redis))


class Writer:
    """The write path of one store: lock, payloads, commit, freeing."""

    def __init__(self, config: RedisConfig, meta: Metadata) -> None:
        self.config = config
        self._m = meta
        self.lock_key = f"{meta.tag}:lock"
        self.free_key = f"{meta.tag}:free"

    def acquire(self) -> Lock:
        """Take the write lock (held under a random token); BackendUnavailable when it stays busy."""
        wait = self.config.lock_wait_s
        left = deadline_left()
        give_up = time.monotonic() + (wait if left is None else min(wait, left))
        lock = self._m.client.lock(
            self.lock_key,
            timeout=self.config.lock_lease_ms / 1000,
            thread_local=False,
            lock_class=ReplaySafeLock,
        )
        token = secrets.token_hex(16)

        def attempt() -> Lock:
            if not lock.acquire(blocking=False, token=token):
                raise _Busy
            return lock

        def busy(_: Exception) -> None:
            if time.monotonic() > give_up:
                raise BackendUnavailable(
                    f"the store's write lock in Redis stayed busy for {wait:g} s",
                    hint="another writer is slow or crashed holding it; it expires after lock_lease_ms",
                )

        with redis_errors("taking the write lock"):
            return _lock_wait().call_with_retry(attempt, busy)

    @staticmethod
    def _release(lock: Lock) -> None:
        """Best effort, when nothing is committed: an unreleased lock expires with its lease."""
        # A lock no longer ours (its lease ran out) raises LockError: mapped, then ignored.
        with suppress(DeltaStoreError), redis_errors("releasing the write lock"):
            lock.release()

    def _commit(self, batch: Batch, lock: Lock) -> int:
        """Write the batch's payloads, then its metadata atomically; returns the free set's size."""
        payloads, scripts = self._m.payloads, self._m.scripts
        token: bytes = lock.local.token
        data: list[tuple[str, bytes]] = []
        args: list[bytes | str | int] = []
        n_writes = 0
        for keyspace, writes in batch.writes.items():
            for key, value in writes.items():
                if value is not None and keyspace in OUT_OF_LINE:
                    name = payloads.new_name()
                    data.append((name, value))
                    value = name.encode()
                args += [keyspace, key, b"d" if value is None else b"p", b"" if value is None else value]
                n_writes += 1
        if not n_writes:
            self._release(lock)
            return 0
        lease = self.config.lock_lease_ms
        # How long a resent commit may still arrive: every try of it bounded by timeout_s.
        replay_ms = (RETRIES + 1) * int(self.config.timeout_s * 1000) + 1000
        with redis_errors("a commit"):
            for chunk in chunks(data, _CHUNK_BYTES):
                # Each chunk renews the lease, so a large snapshot commits however long it takes
                # to send, as long as each chunk fits in one lease.
                scripts(scripts.intent, token, lease, *(n for n, _ in chunk))
                payloads.write(chunk)
            ooc = sorted(OUT_OF_LINE)
            names = [n for n, _ in data]
            reply = self._run_commit(
                [token, replay_ms, len(ooc), *ooc, len(data), *names, n_writes, *args, _TRIM_BUDGET]
            )
        payloads.cache(data)
        return int(reply[1])

    def _run_commit(self, commit_args: list[bytes | str | int]) -> Any:
        """The commit script, followed by WAIT for replicas when ``wait_replicas`` asks for it."""
        cfg, client, scripts = self.config, self._m.client, self._m.scripts
        if not cfg.wait_replicas:
            return scripts(scripts.commit, *commit_args)
        # WAIT counts the writes of its own connection: run both on one pipeline to the node (a
        # script in a pipeline costs one more round trip, SCRIPT EXISTS, next to WAIT's own).
        if cfg.cluster:
            node = client.get_redis_connection(client.get_node_from_key(f"{self._m.tag}:seq"))
        else:
            node = client
        pipe = node.pipeline(transaction=False)
        scripts(scripts.commit, *commit_args, client=pipe)
        pipe.wait(cfg.wait_replicas, cfg.wait_timeout_ms)
        reply, acked = pipe.execute()
        if int(acked) < cfg.wait_replicas:
            raise BackendUnavailable(
                f"commit reached {acked} of {cfg.wait_replicas} replicas within {cfg.wait_timeout_ms} ms",
                hint="it is applied on the primary but a failover may lose it; retrying the put is safe "
                "(an identical snapshot is a no-op); check the replicas",
            )
        return reply

    def drain_free(self) -> None:
        """Delete a page of data keys no version references any more (idempotent, any client)."""
        client = self._m.client
        with redis_errors("freeing payloads"):
            names = client.srandmember(self.free_key, _FREE_PAGE) or []
            if names:
                delete_keys(client, names)
                client.srem(self.free_key, *names)

    def transact(self, fn: Callable[[WriteBatch], T]) -> T:
        """Run ``fn`` under the write lock and commit; retried after a lost lease, within bounds.

        A lease lost before the commit (``fn`` slower than ``lock_lease_ms``, a stalled process)
        commits nothing and runs ``fn`` again, at most ``max_attempts`` times in all, never past
        ``lock_wait_s`` from the first try nor past the call's deadline
        (:func:`deltastore.backend.call_deadline`): then BackendUnavailable.
        """
        self._m.check("meta")
        started = time.monotonic()
        attempts = 0
        while True:
            attempts += 1
            lock = self.acquire()
            try:
                result = fn(batch := Batch(self._m))
                freed = self._commit(batch, lock)
            except LockLost:
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
                self._release(lock)
                raise
            if freed:
                # Committed already; if this fails, another commit's client frees them later.
                with suppress(DeltaStoreError):
                    self.drain_free()
            return result
