"""Load: 32 concurrent clients mixing put/get/lookup/delete against one server; a full store."""

from __future__ import annotations

import random
import threading
import time
from pathlib import Path

import grpc
from trust_helpers import MODEL, ServeProcess, client, make_cache, tokens_for, wait_healthy

from deltastore.server.app import Service
from deltastore.server.settings import ServerSettings
from deltastore.settings import StoreConfig
from deltastore.store import Store
from deltastore.verify import verify_backend

CLIENTS = 32
SECONDS = 10.0
SYSTEM = tokens_for(500, 48)  # a system prompt every session starts with: concurrent dedup and deletes
RSS_SLACK = 256 << 20  # growth allowed from the first to the second half of the run


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else 0.0


def _client_loop(
    port: int,
    idx: int,
    until: float,
    latencies: dict[str, list[float]],
    errors: list[str],
    lock: threading.Lock,
) -> None:
    rng = random.Random(idx)
    cache = make_cache(240, seed=idx)
    tail = tokens_for(10_000 + idx, 240 - len(SYSTEM))
    session, turn, n = f"w{idx}-0", 0, 0
    generation = 0
    with client(port, None, timeout=30) as c:
        while time.monotonic() < until:
            op = rng.choices(("put", "get", "lookup", "delete"), (4, 3, 2, 1))[0]
            if op in ("get", "delete") and turn == 0:
                op = "put"
            if op == "put" and n + 30 > 240:
                op = "delete"
            started = time.perf_counter()
            try:
                if op == "put":
                    n_next = max(n + rng.randrange(1, 30), len(SYSTEM) + 1)
                    tokens = (SYSTEM + tail)[:n_next]
                    layers = [(k[:, :n_next], v[:, :n_next]) for k, v in cache]
                    parent = turn - 1 if turn else None
                    c.put_snapshot(
                        session, turn, tokens, layers, model=MODEL, codec="k4v2", parent_turn=parent
                    )
                    n, turn = n_next, turn + 1
                elif op == "get":
                    snap = c.get_snapshot(session, rng.randrange(turn), as_cache=False)
                    if snap.token_ids != (SYSTEM + tail)[: len(snap.token_ids)]:
                        raise AssertionError(f"{session}: wrong tokens back")
                elif op == "lookup":
                    c.lookup_prefix(SYSTEM + tail, model=MODEL, codec="k4v2")
                else:
                    c.delete_session(session)
                    generation += 1
                    session, turn, n = f"w{idx}-{generation}", 0, 0
            except (grpc.RpcError, AssertionError) as exc:
                with lock:
                    errors.append(f"{op} {session}: {exc}")
                return
            with lock:
                latencies[op].append(time.perf_counter() - started)


def test_32_clients_mixed_load(tmp_path: Path, reliability) -> None:
    server = ServeProcess(tmp_path / "data", "--workers", "16")
    latencies: dict[str, list[float]] = {op: [] for op in ("put", "get", "lookup", "delete")}
    errors: list[str] = []
    lock = threading.Lock()
    rss: list[tuple[float, int]] = []
    try:
        with grpc.insecure_channel(f"127.0.0.1:{server.grpc_port}") as ch:
            wait_healthy(ch)
        start = time.monotonic()
        until = start + SECONDS
        threads = [
            threading.Thread(target=_client_loop, args=(server.grpc_port, i, until, latencies, errors, lock))
            for i in range(CLIENTS)
        ]
        for t in threads:
            t.start()
        while any(t.is_alive() for t in threads):
            rss.append((time.monotonic() - start, server.rss_bytes()))
            time.sleep(0.25)
        for t in threads:
            t.join()
        assert server.proc.poll() is None, "the server died under load"
    finally:
        server.stop()
    assert not errors, errors[:5]
    total = sum(len(v) for v in latencies.values())
    assert total >= CLIENTS * 5, total
    first = max(r for t, r in rss if t < SECONDS / 2)
    second = max(r for t, r in rss if t >= SECONDS / 2)
    assert second - first < RSS_SLACK, (first, second)

    with Store.open(tmp_path / "data", StoreConfig()) as store:
        report = verify_backend(store.backend)
        assert report.clean, report.problems
    p99 = {op: _percentile(v, 0.99) * 1000 for op, v in latencies.items()}
    summary = ", ".join(f"{op} p99 {ms:.0f} ms" for op, ms in p99.items())
    print(
        f"{total} calls by {CLIENTS} clients in {SECONDS:.0f} s; {summary}; peak RSS {max(r for _, r in rss) >> 20} MiB"
    )
    reliability.record(
        f"{CLIENTS} concurrent clients, put/get/lookup/delete mix, {SECONDS:.0f} s",
        total,
        f"0 errors; verify clean; {summary}; server peak RSS {max(r for _, r in rss) >> 20} MiB, "
        f"second-half growth {(second - first) >> 20} MiB",
    )


def test_full_store_refuses_with_resource_exhausted_and_stays_consistent(tmp_path: Path, reliability) -> None:
    store = Store.open(tmp_path / "data", StoreConfig(block_size=16), map_size=1 << 20, max_map_size=3 << 20)
    settings = ServerSettings(data_dir=tmp_path / "data", grpc_address="127.0.0.1:0", http_address="")
    svc = Service(settings, store=store).start()
    try:
        acked: list[int] = []
        refused = 0
        with client(svc.grpc_port, None) as c:
            for i in range(400):
                try:
                    c.put_snapshot(
                        f"s{i}", 0, tokens_for(i, 200), make_cache(200, seed=i), model=MODEL, codec="lossless"
                    )
                    acked.append(i)
                except grpc.RpcError as exc:
                    assert exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, exc
                    refused += 1
                    if refused == 3:
                        break
            assert refused == 3 and acked, (refused, len(acked))
            report = verify_backend(store.backend)
            assert report.clean, report.problems
            for i in acked[:: max(1, len(acked) // 10)]:
                assert c.get_snapshot(f"s{i}", 0, as_cache=False).token_ids == tokens_for(i, 200)
            # Freeing space makes the store writable again.
            for i in acked[: len(acked) // 2]:
                c.delete_session(f"s{i}")
            c.put_snapshot("after", 0, tokens_for(999, 200), make_cache(200), model=MODEL, codec="lossless")
        assert verify_backend(store.backend).clean
    finally:
        svc.stop()
    reliability.record(
        "puts into a full store (LMDB map at its maximum)",
        refused,
        f"RESOURCE_EXHAUSTED after {len(acked)} puts; verify clean; acked snapshots readable; writable after deletes",
    )
