"""Per-tenant quotas: one namespace cannot evict every other, nor hold the server's memory.

Before: capacity eviction was store-wide LRU (a tenant writing a lot evicted everyone else's
older sessions first) and nothing bounded the bytes one tenant's concurrent puts kept in memory.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from trust_helpers import MODEL, client, make_cache, start_service, tokens_for

from deltastore.errors import StoreFull
from deltastore.settings import StoreConfig
from deltastore.store import SegmentPayload, Store
from deltastore.v1 import deltastore_pb2 as pb
from deltastore.v1 import deltastore_pb2_grpc as pb_grpc
from deltastore.verify import verify_backend

SEG = 32 << 10


def _put(store: Store, ns: str, session: str, seed: int, n: int = 48):
    tokens = tokens_for(seed, n)
    plan = store.plan_snapshot(ns, session, "m", "k4v2", tokens)
    payloads = {
        s.key: SegmentPayload(bytes([seed % 251]) * SEG, s.n_tokens, 4096 * s.n_tokens) for s in plan.missing
    }
    return store.put_snapshot(ns, session, 0, "m", "k4v2", tokens, payloads)


def _sessions(store: Store, ns: str) -> list[str]:
    return sorted({i.session for i in store.list_snapshots(ns)})


def test_capacity_eviction_takes_from_the_biggest_namespace(tmp_path: Path, reliability) -> None:
    with Store.open(tmp_path / "probe", StoreConfig(block_size=16)) as probe:
        _put(probe, "x", "x", 1)
        one = probe.savings()["stored_bytes"]
    with Store.open(tmp_path / "data", StoreConfig(block_size=16, max_stored_bytes=int(6.5 * one))) as store:
        _put(store, "quiet", "q0", 1)  # the oldest sessions of the store
        _put(store, "quiet", "q1", 2)
        evicted = []
        for i in range(10):
            evicted += _put(store, "greedy", f"g{i}", 10 + i).evicted_sessions
        assert _sessions(store, "quiet") == ["q0", "q1"]
        assert evicted and all(ns == "greedy" for ns, _ in evicted)
        assert verify_backend(store.backend).clean
    reliability.record(
        "one namespace writes 10 sessions into a store with room for 6; another holds the 2 oldest",
        10,
        f"{len(evicted)} evictions, all from the writing namespace; the other's sessions kept",
    )


def test_namespace_quota(tmp_path: Path, reliability) -> None:
    with Store.open(tmp_path / "probe", StoreConfig(block_size=16)) as probe:
        _put(probe, "x", "x", 1)
        one = probe.savings("x")["stored_bytes"]
    config = StoreConfig(block_size=16, namespace_quota_bytes=int(3.5 * one))
    with Store.open(tmp_path / "data", config) as store:
        _put(store, "quiet", "q0", 1)
        for i in range(6):
            _put(store, "greedy", f"g{i}", 10 + i)
        assert _sessions(store, "greedy") == ["g3", "g4", "g5"]  # its own oldest went first
        assert store.savings("greedy")["stored_bytes"] <= config.namespace_quota_bytes
        assert _sessions(store, "quiet") == ["q0"]
        before = store.savings()
        with pytest.raises(StoreFull, match="quota"):
            _put(store, "greedy", "huge", 99, n=16 * 14)  # alone bigger than the quota
        after = store.savings()
        before.pop("backend"), after.pop("backend")
        assert after == before and verify_backend(store.backend).clean
    reliability.record(
        "a namespace past its quota (6 puts, room for 3); one put larger than the quota",
        7,
        "its own oldest sessions evicted, others untouched; StoreFull, nothing changed",
    )


def test_inflight_bytes_per_namespace(tmp_path: Path, reliability) -> None:
    svc = start_service(tmp_path, max_inflight_bytes=96 << 10)
    release = threading.Event()
    codes: list[grpc.StatusCode] = []
    try:
        with grpc.insecure_channel(f"127.0.0.1:{svc.grpc_port}") as ch:
            stub = pb_grpc.DeltaStoreStub(ch)
            tokens = tokens_for(5, 16)
            plan = stub.PlanSnapshot(
                pb.PlanSnapshotRequest(
                    namespace="acme", session="big", model=MODEL, codec="k4v2", token_ids=tokens
                ),
                timeout=5,
            )
            key = plan.segments[0].key

            def held() -> Iterator[pb.PutSnapshotRequest]:
                header = pb.SnapshotHeader(
                    namespace="acme", session="big", turn=0, model=MODEL, codec="k4v2", token_ids=tokens
                )
                yield pb.PutSnapshotRequest(header=header)
                yield pb.PutSnapshotRequest(
                    chunk=pb.BlockChunk(key=key, offset=0, total_bytes=1 << 20, data=bytes(80 << 10))
                )
                release.wait(20)

            def one() -> None:
                try:
                    stub.PutSnapshot(held(), timeout=30)
                except grpc.RpcError as exc:
                    codes.append(exc.code())

            holder = threading.Thread(target=one)
            holder.start()
            time.sleep(1.0)  # the 80 KiB chunk is in the server's memory now
            cache = make_cache(64, layers=4, heads=2)  # a k4v2 put of about 40 KiB
            with client(svc.grpc_port, None, "acme") as acme:
                try:
                    acme.put_snapshot("other", 0, tokens_for(6, 64), cache, model=MODEL, codec="k4v2")
                    codes.append(grpc.StatusCode.OK)
                except grpc.RpcError as exc:
                    codes.append(exc.code())
            with client(svc.grpc_port, None, "globex") as globex:
                globex.put_snapshot("g", 0, tokens_for(6, 64), cache, model=MODEL, codec="k4v2")
            release.set()
            holder.join(30)
            with client(svc.grpc_port, None, "acme") as acme:  # released with the held call
                acme.put_snapshot("after", 0, tokens_for(7, 64), cache, model=MODEL, codec="k4v2")
    finally:
        release.set()
        svc.stop()
    assert codes[0] is grpc.StatusCode.RESOURCE_EXHAUSTED, codes
    reliability.record(
        "a second put of a namespace whose puts hold 80 of 96 KiB in flight",
        1,
        "RESOURCE_EXHAUSTED; another namespace served; budget back when the call ends",
    )
