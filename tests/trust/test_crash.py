"""Crash: ``deltastore serve`` SIGKILLed during concurrent puts, many times; nothing acknowledged is lost."""

from __future__ import annotations

import random
import threading
import time
import zlib
from pathlib import Path

import grpc
import torch
from trust_helpers import MODEL, ServeProcess, client, make_cache, tokens_for, wait_healthy

from deltastore.backends.lmdb_backend import LmdbBackend, LmdbConfig
from deltastore.codecs import decode_block
from deltastore.settings import StoreConfig
from deltastore.store import Store
from deltastore.verify import verify_backend

KILLS = 8
WRITERS = 4
MAX_TOKENS = 400


def _cache(session: str) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return make_cache(MAX_TOKENS, seed=zlib.crc32(session.encode()))


def _tokens(session: str, n: int) -> list[int]:
    return tokens_for(int(session.split("w")[1]), n)


def _writer(
    port: int, session: str, stop: threading.Event, acked: list[tuple[str, int, int]], rng: random.Random
) -> None:
    """Extend one session turn by turn until the server dies; record every acknowledged put."""
    full = _cache(session)
    n, turn = 0, 0
    with client(port, None, timeout=5) as c:
        while not stop.is_set() and n < MAX_TOKENS - 40:
            n_next = n + rng.randrange(1, 40)
            cache = [(k[:, :n_next], v[:, :n_next]) for k, v in full]
            try:
                c.put_snapshot(
                    session,
                    turn,
                    _tokens(session, n_next),
                    cache,
                    model=MODEL,
                    codec="lossless",
                    parent_turn=turn - 1 if turn else None,
                )
            except grpc.RpcError:
                return  # the server is gone: this put was never acknowledged
            acked.append((session, turn, n_next))
            n, turn = n_next, turn + 1


def test_sigkill_during_concurrent_puts_loses_nothing_acknowledged(tmp_path: Path, reliability) -> None:
    data_dir = tmp_path / "data"
    rng = random.Random(31)
    acked: list[tuple[str, int, int]] = []
    caches: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {}
    for cycle in range(KILLS):
        server = ServeProcess(data_dir)
        try:
            with grpc.insecure_channel(f"127.0.0.1:{server.grpc_port}") as ch:
                wait_healthy(ch)
            stop = threading.Event()
            sessions = [f"c{cycle}w{cycle * WRITERS + i}" for i in range(WRITERS)]
            threads = [
                threading.Thread(
                    target=_writer, args=(server.grpc_port, s, stop, acked, random.Random(rng.random()))
                )
                for s in sessions
            ]
            for t in threads:
                t.start()
            time.sleep(rng.uniform(0.2, 0.8))  # the writers' own pace decides where the kill lands
        finally:
            server.kill()
        stop.set()
        for t in threads:
            t.join(30)
        caches.update({s: _cache(s) for s in sessions})
    assert len(acked) >= KILLS, len(acked)

    with LmdbBackend(LmdbConfig(path=data_dir)) as backend:
        report = verify_backend(backend)
        assert report.clean, report.problems
        store = Store(backend, StoreConfig())
        stored = {(s.session, s.turn): s.n_tokens for s in store.list_snapshots("default")}
        for session, turn, n in acked:
            assert stored.get((session, turn)) == n, (session, turn)
        # Every stored snapshot, acknowledged or caught in flight, is whole and bit-exact.
        for (session, turn), n in stored.items():
            snap = store.get_snapshot("default", session, turn)
            assert snap.token_ids == _tokens(session, n)
            for seg in snap.segments:
                got = decode_block(seg.payload).layers
                want = [(k[:, seg.start : seg.end], v[:, seg.start : seg.end]) for k, v in caches[session]]
                assert all(
                    torch.equal(g[0], w[0]) and torch.equal(g[1], w[1])
                    for g, w in zip(got, want, strict=True)
                )
    reliability.record(
        f"SIGKILL of `deltastore serve` during {WRITERS} concurrent writers",
        KILLS,
        f"{len(acked)} acknowledged snapshots all intact and bit-exact; {len(stored) - len(acked)} in-flight commits whole; verify clean",
    )
