"""Crash safety: a writer killed with SIGKILL at random points, many times, loses nothing acked."""

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

from deltastore.backends.lmdb_backend import LmdbBackend, LmdbConfig
from deltastore.settings import StoreConfig
from deltastore.store import Store
from deltastore.verify import verify_backend

WORKER = Path(__file__).with_name("store_workers.py")
KILLS = 24


def _run_and_kill(data_dir: Path, rng_seed: int, delay: float) -> list[str]:
    """Start a writer, SIGKILL it ``delay`` seconds after it is ready; return its ACK/BEGIN lines."""
    proc = subprocess.Popen(
        [sys.executable, str(WORKER), "crash", str(data_dir), str(rng_seed)],
        stdout=subprocess.PIPE,
        text=True,
        env=worker_env(),
    )
    lines: list[str] = []
    ready = threading.Event()

    def read() -> None:
        for line in proc.stdout:  # type: ignore[union-attr]
            if line.startswith("READY"):
                ready.set()
            elif line.startswith(("ACK ", "BEGIN ")):
                lines.append(line.strip())

    reader = threading.Thread(target=read)
    reader.start()
    try:
        assert ready.wait(60), "writer did not start"
        time.sleep(delay)  # the writer's own pace sets where the kill lands
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        reader.join()
    assert proc.returncode == -signal.SIGKILL
    return lines


def test_sigkill_never_loses_acked_snapshots_nor_shows_partial_ones(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    rng = random.Random(2024)
    acked: dict[str, dict[int, int]] = {}  # session -> turn -> n_tokens
    # Sessions whose delete began but was never acknowledged (the kill landed in between): the
    # delete may or may not have committed, so they are either whole as acked or wholly gone.
    maybe_deleted: dict[str, dict[int, int]] = {}
    total_acks = 0
    for run in range(KILLS):
        for line in _run_and_kill(data_dir, run, rng.uniform(0.0, 0.25)):
            tag, kind, session, *rest = line.split()
            if tag == "BEGIN":  # a DEL of this session is in flight
                maybe_deleted[session] = acked.pop(session, {})
                continue
            total_acks += 1
            if kind == "DEL":
                maybe_deleted.pop(session, None)
                acked.pop(session, None)
                continue
            turn, n = int(rest[0]), int(rest[1])
            if session in maybe_deleted:  # the next writer saw whether the delete committed
                before = maybe_deleted.pop(session)
                acked[session] = {} if turn == 0 else before
            elif turn == 0:
                acked[session] = {}
            acked.setdefault(session, {})[turn] = n
    assert total_acks >= KILLS, total_acks  # the kills landed while work was going on
    print(f"{total_acks} acknowledged operations over {KILLS} kills")

    with LmdbBackend(LmdbConfig(path=data_dir)) as backend:
        report = verify_backend(backend)
        assert report.clean, report.problems
        store = Store(backend, StoreConfig(block_size=BLOCK))
        listed = {info.session for info in store.list_snapshots("acme")}
        for session, turns in [*acked.items(), *maybe_deleted.items()]:
            if session in maybe_deleted and session not in listed:
                continue  # its unacknowledged delete committed
            idx = int(session[1:])
            for turn, n in turns.items():
                snap = store.get_snapshot("acme", session, turn)
                assert snap.token_ids == crash_tokens(idx, n)
                assert all(s.payload == payload_for(s.key, s.n_tokens) for s in snap.segments)
        # Whatever is visible (acked or not yet acked when killed) is whole.
        for info in store.list_snapshots("acme"):
            snap = store.get_snapshot("acme", info.session, info.turn)
            assert snap.token_ids == crash_tokens(int(info.session[1:]), info.n_tokens)
