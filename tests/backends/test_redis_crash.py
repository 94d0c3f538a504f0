"""A DeltaStore process on Redis Cluster killed with SIGKILL mid-put, many times: every
acknowledged snapshot survives, nothing visible is partial, and the payloads the dead writers
left uncommitted are freed by the next commit (no leaked keys)."""

from __future__ import annotations

import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from store_testlib import payload_for, worker_env
from store_workers import BLOCK, crash_tokens

from deltastore.backends.redis import RedisBackend
from deltastore.settings import StoreConfig
from deltastore.store import Store
from deltastore.verify import verify_backend

WORKER = Path(__file__).with_name("redis_crash_worker.py")
KILLS = 6


def _run_and_kill(url: str, rng_seed: int, acks: int, delay: float) -> list[tuple[str, int, int]]:
    """Start a writer, SIGKILL it ``delay`` s after its ``acks``-th ACK; return its ACKs."""
    proc = subprocess.Popen(
        [sys.executable, str(WORKER), url, str(rng_seed)],
        stdout=subprocess.PIPE,
        text=True,
        env=worker_env(),
    )
    got: list[tuple[str, int, int]] = []
    enough = threading.Event()

    def read() -> None:
        for line in proc.stdout:  # type: ignore[union-attr]
            if line.startswith("ACK "):
                session, turn, n = line.split()[1:]
                got.append((session, int(turn), int(n)))
                if len(got) >= acks:
                    enough.set()

    reader = threading.Thread(target=read)
    reader.start()
    try:
        assert enough.wait(60), "the writer made no progress"
        time.sleep(delay)  # lands anywhere in a put: planning, payload writes, the commit
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        reader.join()
    return got


def test_sigkill_of_a_writer_loses_no_acked_snapshot_and_leaks_no_payload(cluster_url: str) -> None:
    url = cluster_url.replace("lock_lease_ms=3000", "lock_lease_ms=1000")
    rng = random.Random(7)
    acked: dict[tuple[str, int], int] = {}
    for run in range(KILLS):
        for session, turn, n in _run_and_kill(url, run, 2, rng.uniform(0.0, 0.05)):
            acked[session, turn] = n
    backend = RedisBackend.from_url(f"{url}&payload_cache_mb=0")
    store = Store(backend, StoreConfig(block_size=BLOCK))
    for (session, turn), n in acked.items():
        snap = store.get_snapshot("acme", session, turn)
        assert snap.token_ids == crash_tokens(int(session[1:]), n)
        assert all(s.payload == payload_for(s.key, s.n_tokens) for s in snap.segments)
    for info in store.list_snapshots("acme"):  # acked or not, whatever is visible is whole
        snap = store.get_snapshot("acme", info.session, info.turn)
        assert snap.token_ids == crash_tokens(int(info.session[1:]), info.n_tokens)
    report = verify_backend(backend)
    assert report.clean, report.problems
    # One more commit (after the last dead writer's lease) frees what dead writers left pending.
    backend.transact(lambda t: t.put("meta", b"after-crashes", b"1"))
    data_keys = sum(1 for _ in backend.client.scan_iter(match=f"{backend.prefix}:d:*", count=1000))
    assert data_keys == backend.info()["blocks"]
    store.close()
