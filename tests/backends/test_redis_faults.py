"""A cluster node killed (SIGKILL) during puts, then restarted: no acknowledged snapshot is lost
or half-visible, and every failure during the outage is a clear BackendUnavailable."""

from __future__ import annotations

import contextlib
import threading
import time

import pytest
from store_testlib import payload_for, put, random_tokens

from deltastore.backends.redis import RedisBackend
from deltastore.bench.redis_local import LocalRedisCluster
from deltastore.errors import BackendUnavailable, NotFound
from deltastore.settings import StoreConfig
from deltastore.store import Store
from deltastore.verify import verify_backend

BLOCK = 16


def _tokens(i: int) -> list[int]:
    return random_tokens(7000 + i, 3 * BLOCK + 5)  # 3 blocks and a tail: payloads on every node


class _Writer(threading.Thread):
    """Puts snapshot i = 0, 1, ... (one session each), recording which were acknowledged."""

    def __init__(self, store: Store) -> None:
        super().__init__()
        self.store = store
        self.acked: list[int] = []
        self.failed: list[int] = []
        self.other_errors: list[BaseException] = []
        self.stop = threading.Event()
        self.next = 0

    def run(self) -> None:
        while not self.stop.is_set():
            i = self.next
            self.next += 1
            try:
                put(self.store, "acme", f"s{i}", 0, _tokens(i))
            except BackendUnavailable:
                self.failed.append(i)
            except BaseException as exc:  # anything else is a test failure, surfaced below
                self.other_errors.append(exc)
            else:
                self.acked.append(i)

    def wait_for(self, what: list[int], n: int, timeout_s: float = 60) -> None:
        deadline = time.monotonic() + timeout_s
        while len(what) < n:
            assert self.is_alive() and time.monotonic() < deadline, (
                self.acked,
                self.failed,
                self.other_errors,
            )
            time.sleep(0.01)


def _check_snapshot(store: Store, i: int) -> None:
    snap = store.get_snapshot("acme", f"s{i}", 0)
    assert snap.token_ids == _tokens(i)
    assert all(seg.payload == payload_for(seg.key, seg.n_tokens) for seg in snap.segments)


@pytest.mark.timeout(180)
def test_a_node_killed_during_puts_loses_nothing_acknowledged(own_cluster: LocalRedisCluster) -> None:
    url = f"{own_cluster.url}?prefix=faults&lock_lease_ms=2000&timeout_s=2"
    backend = RedisBackend.from_url(url)
    store = Store(backend, StoreConfig(block_size=BLOCK))
    # Reads go through another handle without a payload cache, as through another server.
    reader = Store(RedisBackend.from_url(f"{url}&payload_cache_mb=0"), StoreConfig(block_size=BLOCK))
    meta_port = backend.client.get_node_from_key(backend.seq_key).port
    meta_node = next(i for i, n in enumerate(own_cluster.nodes) if n.port == meta_port)
    payload_node = (meta_node + 1) % len(own_cluster.nodes)
    writer = _Writer(store)
    writer.start()
    try:
        # Once the node holding the metadata slot, once a node holding only payloads.
        for victim in (meta_node, payload_node):
            writer.wait_for(writer.acked, len(writer.acked) + 5)
            own_cluster.kill(victim)
            writer.wait_for(writer.failed, len(writer.failed) + 3)
            # Reads during the outage return the right bytes or fail clearly, never wrong data.
            unavailable = 0
            for i in list(writer.acked):
                try:
                    _check_snapshot(reader, i)
                except BackendUnavailable:
                    unavailable += 1
            assert unavailable > 0
            own_cluster.restart(victim)
            writer.wait_for(writer.acked, len(writer.acked) + 5)
    finally:
        writer.stop.set()
        writer.join()
    assert not writer.other_errors, writer.other_errors
    for i in writer.acked:
        _check_snapshot(reader, i)
    # An unacknowledged put may have committed before its reply was lost: then it is whole.
    for i in writer.failed:
        with contextlib.suppress(NotFound):
            _check_snapshot(reader, i)
    report = verify_backend(reader.backend)
    assert report.clean, report.problems
    store.close()
    reader.close()
