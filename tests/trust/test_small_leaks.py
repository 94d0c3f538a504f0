"""Small leaks: the shm budget counts an export in progress once; stray Redis payloads are found and removed.

Before: an export being written was counted twice against ``--shm-max-bytes`` (its reservation
and its growing file), so concurrent exports got spurious RESOURCE_EXHAUSTED; and a payload SET
by a writer whose lease had expired (Redis cannot fence it across nodes) stayed forever, unseen
by ``deltastore verify``.
"""

from __future__ import annotations

import subprocess
import sys
import threading
from pathlib import Path

import pytest
from redis_harness import require_redis_server

from deltastore.backends.redis import RedisBackend
from deltastore.bench.redis_local import LocalRedis
from deltastore.server.shm import ShmExporter
from deltastore.settings import StoreConfig
from deltastore.store import SegmentPayload, SnapshotStream, Store
from deltastore.verify import repair_backend, verify_backend

SEG = 256 << 10


def _put_three(store: Store, session: str) -> None:
    tokens = list(range(48))
    plan = store.plan_snapshot("ns", session, "m", "k4v2", tokens)
    payloads = {
        s.key: SegmentPayload(bytes([i + 1]) * SEG, s.n_tokens, 4096 * s.n_tokens)
        for i, s in enumerate(plan.missing)
    }
    store.put_snapshot("ns", session, 0, "m", "k4v2", tokens, payloads)


def test_export_in_progress_is_counted_once(tmp_path: Path, reliability) -> None:
    with Store.open(tmp_path / "data", StoreConfig(block_size=16)) as store:
        _put_three(store, "s")  # three 256 KiB segments
        snap = store.open_snapshot("ns", "s", 0)
        total = snap.payload_bytes
        exporter = ShmExporter(tmp_path / "shm", max_bytes=2 * total + total // 2)
        entered, release = threading.Event(), threading.Event()

        def gated(seg, use):  # the store's own read, held before the last segment
            if seg is snap.segments[-1]:
                entered.set()
                release.wait(20)
            return snap._read(seg, use)

        slow = SnapshotStream(snap.info, snap.token_ids, snap.segments, gated)
        names: list[str] = []
        writer = threading.Thread(target=lambda: names.append(exporter.export(slow)))
        writer.start()
        try:
            assert entered.wait(20)  # two thirds of the first export are in its file now
            names.append(exporter.export(store.open_snapshot("ns", "s", 0)))  # fits: 2 x total <= limit
        finally:
            release.set()
            writer.join(20)
        assert len(names) == 2 and all((tmp_path / "shm" / n).stat().st_size == total for n in names)
        for name in names:
            exporter.discard(name)
    reliability.record(
        "second shared-memory export while the first is being written (limit 2.5 x one export)",
        1,
        "served: the export in progress is counted once",
    )


@pytest.fixture
def redis_node(tmp_path: Path):
    require_redis_server()
    with LocalRedis(tmp_path / "redis", appendfsync="no") as node:
        yield node


def test_stray_redis_payloads_are_found_and_removed(redis_node: LocalRedis, reliability) -> None:
    url = f"{redis_node.url}?prefix=strays"
    with Store(RedisBackend.from_url(url), StoreConfig(block_size=16)) as store:
        _put_three(store, "s")
        assert verify_backend(store.backend).clean
        # What a writer whose lease expired leaves behind: its payload SETs land after the next
        # writer already freed its intents, so nothing will ever name (or delete) them.
        with redis_node.client() as admin:
            strays = [f"strays:d:{{stale{i:04x}}}" for i in range(3)]
            for name in strays:
                admin.set(name, b"x" * SEG)
        report = verify_backend(store.backend)
        assert not report.clean and all(any(n in p for p in report.problems) for n in strays), report.problems
    done = subprocess.run(
        [sys.executable, "-m", "deltastore", "verify", "--repair", "--backend", url],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "removed 3 stored value(s) nothing referenced" in done.stdout
    with Store(RedisBackend.from_url(url), StoreConfig(block_size=16)) as store:
        assert verify_backend(store.backend).clean
        assert repair_backend(store.backend).after.clean
        assert store.get_snapshot("ns", "s", 0).info.n_tokens == 48
        with redis_node.client() as admin:
            assert not any(admin.exists(n) for n in strays)
    reliability.record(
        "payload keys written by a writer after its lease expired (Redis)",
        len(strays),
        "verify names each; verify --repair removes them; snapshots intact",
    )
