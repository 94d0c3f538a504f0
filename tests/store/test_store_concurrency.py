"""Concurrency: threads and processes putting overlapping prefixes into one store at once."""

from __future__ import annotations

import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path

from store_testlib import payload_for, put, worker_env
from store_workers import BLOCK, SYSTEM, overlap_tokens, put_retrying

from deltastore.backends.lmdb_backend import LmdbBackend, LmdbConfig
from deltastore.settings import StoreConfig
from deltastore.store import Store
from deltastore.verify import verify_backend

WORKER = Path(__file__).with_name("store_workers.py")
SYSTEM_BLOCKS = len(SYSTEM) // BLOCK


def _check(store: Store, workers: int, sessions: int) -> None:
    report = verify_backend(store.backend)
    assert report.clean, report.problems
    for w in range(workers):
        for s in range(sessions):
            snap = store.get_snapshot("acme", f"w{w}-{s}", 0)
            assert snap.token_ids == overlap_tokens(w, s)
            assert all(seg.payload == payload_for(seg.key, seg.n_tokens) for seg in snap.segments)
    savings = store.savings()
    # The shared system prompt is stored once; each session adds 2 blocks and a tail.
    assert savings["blocks"] == SYSTEM_BLOCKS + workers * sessions * 3
    assert savings["snapshots"] == workers * sessions


def test_threads_putting_overlapping_prefixes(store_factory: Callable[..., Store]) -> None:
    store = store_factory(StoreConfig(block_size=BLOCK))
    errors: list[BaseException] = []
    start = threading.Barrier(4)

    def work(worker: int) -> None:
        try:
            start.wait()
            for s in range(6):
                put_retrying(store, f"w{worker}-{s}", 0, overlap_tokens(worker, s), None)
                # Churn: a throwaway session sharing the prefix, deleted at once, so blocks
                # other threads planned as present can vanish (clients re-plan).
                put(store, "acme", f"tmp{worker}", 0, SYSTEM)
                store.delete_session("acme", f"tmp{worker}")
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(w,)) for w in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    _check(store, 4, 6)


def test_processes_putting_overlapping_prefixes(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    procs = [
        subprocess.Popen(
            [sys.executable, str(WORKER), "overlap", str(data_dir), str(w)],
            stderr=subprocess.PIPE,
            env=worker_env(),
        )
        for w in range(3)
    ]
    for proc in procs:
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err.decode()
    with LmdbBackend(LmdbConfig(path=data_dir)) as backend:
        _check(Store(backend, StoreConfig(block_size=BLOCK)), 3, 6)
