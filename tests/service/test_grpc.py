"""The gRPC service end to end: a real server on an ephemeral port, the real client, real LMDB."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families
from service_helpers import MODEL, make_cache, start_service

from deltastore.client.aio import AsyncDeltaStoreClient
from deltastore.client.sync import DeltaStoreClient
from deltastore.client.wire import Retry
from deltastore.codecs import CodecSpec, encode_block
from deltastore.manifest import block_key
from deltastore.server.app import Service
from deltastore.v1 import deltastore_pb2 as pb
from deltastore.v1 import deltastore_pb2_grpc as pb_grpc
from deltastore.v1.protocol import iter_chunks

TOKENS = list(range(5000, 5300))


def _metric(http_text: str, name: str, **labels: str) -> float:
    """Sum of the samples of ``name`` whose labels include ``labels``."""
    total = 0.0
    for family in text_string_to_metric_families(http_text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                total += sample.value
    return total


def _received(service: Service) -> float:
    return _metric(
        service.metrics.exposition().decode(), "deltastore_grpc_received_bytes_total", method="PutSnapshot"
    )


def _bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bits (bit-exact comparison: NaN payloads and -0.0 count)."""
    return t.view(torch.int32 if t.element_size() == 4 else torch.int16)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_lossless_put_get_is_bit_exact(client: DeltaStoreClient, dtype: torch.dtype) -> None:
    cache = make_cache(len(TOKENS), dtype=dtype)
    put = client.put_snapshot("s", 0, TOKENS, cache, model=MODEL, codec="lossless")
    assert put.encoded_segments == 5  # 4 aligned blocks of 64 tokens + a 44-token tail
    got = client.get_snapshot("s", 0, model=MODEL, codec="lossless")
    assert got.token_ids == TOKENS and got.n_tokens == len(TOKENS) and got.kept_tokens == len(TOKENS)
    for (k, v), (gk, gv) in zip(cache, got.layers, strict=True):
        assert gk.dtype == dtype
        assert torch.equal(_bits(k), _bits(gk)) and torch.equal(_bits(v), _bits(gv))
    assert got.cache.get_seq_length() == len(TOKENS)
    assert torch.equal(got.cache.layers[1].keys[0], cache[1][0])


def test_multi_chunk_streams_both_ways(tmp_path: Path) -> None:
    service = start_service(tmp_path, chunk_bytes=64 << 10)
    try:
        cache = make_cache(256, layers=4, heads=4, dtype=torch.float32)
        with DeltaStoreClient(f"127.0.0.1:{service.grpc_port}", chunk_bytes=48 << 10) as c:
            put = c.put_snapshot("big", 0, TOKENS[:256], cache, model=MODEL, codec="lossless")
            assert put.sent_bytes > 4 * (64 << 10)  # several chunks per payload
            got = c.get_snapshot("big", 0, device="cpu", as_cache=False)
        assert all(
            torch.equal(a, b) and torch.equal(x, y) for (a, x), (b, y) in zip(cache, got.layers, strict=True)
        )
        assert _received(service) == put.sent_bytes
        sent = _metric(
            service.metrics.exposition().decode(), "deltastore_grpc_sent_bytes_total", method="GetSnapshot"
        )
        assert sent == got.payload_bytes
    finally:
        service.stop()


def test_turns_and_sessions_send_only_missing_segments(
    service: Service, client: DeltaStoreClient, http
) -> None:
    shared = make_cache(300)
    first = client.put_snapshot(
        "alice", 0, TOKENS[:200], [(k[:, :200], v[:, :200]) for k, v in shared], model=MODEL, codec="k4v2"
    )
    second = client.put_snapshot("alice", 1, TOKENS, shared, model=MODEL, codec="k4v2", parent_turn=0)
    # Turn 1 sends its new tokens only: a delta completing block [192, 256), then the new tail.
    assert second.encoded_segments == 2 and second.reused_temporal_bytes > 0
    assert client.get_snapshot("alice", as_cache=False).turn == 1  # no turn: the latest
    # Bob shares the 3 aligned blocks of Alice's first turn (192 tokens) and diverges after them.
    bob_tokens = TOKENS[:192] + [7] * 28
    bob_cache = [
        (torch.cat([k[:, :192], k2[:, 192:]], 1), torch.cat([v[:, :192], v2[:, 192:]], 1))
        for (k, v), (k2, v2) in zip(shared, make_cache(220, seed=1), strict=True)
    ]
    bob = client.put_snapshot("bob", 0, bob_tokens, bob_cache, model=MODEL, codec="k4v2")
    assert bob.encoded_segments == 1 and bob.reused_shared_bytes > 0
    # What the server received is exactly what the clients sent: only missing segments.
    assert _received(service) == first.sent_bytes + second.sent_bytes + bob.sent_bytes
    assert bob.sent_bytes < first.sent_bytes / 3
    savings = http.get("/v1/savings").json()
    assert savings["snapshots"] == 3 and savings["sessions"] == 2
    assert savings["layers"]["prefix_dedup"] > 1.0 and savings["layers"]["temporal_delta"] > 1.0
    assert savings["layers"]["codec"] > 3.0
    assert savings["ratio"] == pytest.approx(
        savings["layers"]["codec"] * savings["layers"]["prefix_dedup"] * savings["layers"]["temporal_delta"]
    )
    assert savings["namespaces"]["default"]["snapshots"] == 3
    assert client.savings()["ratio"] == pytest.approx(savings["ratio"])
    # Lookup and presence, as a worker would ask before prefill.
    assert client.lookup_prefix([*bob_tokens[:210], 1, 2], model=MODEL, codec="k4v2") == 192
    assert client.lookup_prefix(TOKENS, model=MODEL, codec="lossless") == 0
    plan = client.plan_snapshot("carol", TOKENS[:130], model=MODEL, codec="k4v2")
    assert [s.present for s in plan.segments] == [True, True, False]
    assert client.has_blocks([s.key for s in plan.segments]) == [True, True, False]


def test_list_and_delete(client: DeltaStoreClient) -> None:
    cache = make_cache(100)
    client.put_snapshot(
        "s", 0, TOKENS[:70], [(k[:, :70], v[:, :70]) for k, v in cache], model=MODEL, codec="k4v2"
    )
    client.put_snapshot("s", 1, TOKENS[:100], cache, model=MODEL, codec="k4v2", parent_turn=0)
    client.put_snapshot("t", 0, TOKENS[:100], cache, model=MODEL, codec="k4v2")
    listed = client.list_snapshots("s")
    assert [(s.turn, s.n_tokens, s.parent_turn) for s in listed] == [(0, 70, None), (1, 100, 0)]
    assert len(client.list_snapshots()) == 3
    freed = client.delete_snapshot("s", 1)
    assert freed.freed_segments == 1  # its own delta [70, 100); the block is shared with turn 0 and t
    gone = client.delete_session("s")
    assert gone.deleted_snapshots == 1
    assert [s.session for s in client.list_snapshots()] == ["t"]
    assert client.savings()["snapshots"] == 1


def _code(fn) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as info:
        fn()
    return info.value.code()


def _raw_put(stub: pb_grpc.DeltaStoreStub, header: pb.SnapshotHeader, payloads: dict[bytes, bytes]) -> None:
    def messages() -> Iterator[pb.PutSnapshotRequest]:
        yield pb.PutSnapshotRequest(header=header)
        for key, payload in payloads.items():
            for chunk in iter_chunks(key, payload):
                yield pb.PutSnapshotRequest(chunk=chunk)

    stub.PutSnapshot(messages(), timeout=20)


def test_every_bad_request_maps_to_its_status_code(service: Service, client: DeltaStoreClient) -> None:
    stub = pb_grpc.DeltaStoreStub(grpc.insecure_channel(f"127.0.0.1:{service.grpc_port}"))
    cache = make_cache(100)
    client.put_snapshot("s", 0, TOKENS[:100], cache, model=MODEL, codec="k4v2")
    plan = client.plan_snapshot("x", TOKENS[:100], model="other@1", codec="k4v2")
    tail = plan.segments[-1]
    good_tail = encode_block([(k[:, 64:], v[:, 64:]) for k, v in cache], CodecSpec.parse("k4v2"), start=64)
    other_header = pb.SnapshotHeader(
        session="x", turn=0, model="other@1", codec="k4v2", token_ids=TOKENS[:100]
    )
    invalid = grpc.StatusCode.INVALID_ARGUMENT
    cases = {
        "unknown codec": (lambda: client.plan_snapshot("s", TOKENS, model=MODEL, codec="k3v9"), invalid),
        "no model": (
            lambda: stub.PlanSnapshot(pb.PlanSnapshotRequest(session="s", codec="k4v2", token_ids=[1])),
            invalid,
        ),
        "bad session id": (lambda: client.plan_snapshot("a/b\n", TOKENS, model=MODEL, codec="k4v2"), invalid),
        "stream without header": (
            lambda: stub.PutSnapshot(iter([pb.PutSnapshotRequest(chunk=pb.BlockChunk(key=bytes(32)))])),
            invalid,
        ),
        "garbage payload": (lambda: _raw_put(stub, other_header, {tail.key: b"not a block"}), invalid),
        "payload for another segment": (
            lambda: _raw_put(stub, other_header, {plan.segments[0].key: good_tail}),
            invalid,
        ),
        "key not in plan": (lambda: _raw_put(stub, other_header, {bytes(32): good_tail}), invalid),
        "segments missing": (lambda: _raw_put(stub, other_header, {}), grpc.StatusCode.FAILED_PRECONDITION),
        "payload of another codec": (
            lambda: _raw_put(
                stub,
                pb.SnapshotHeader(session="x", turn=0, model="other@1", codec="k8v8", token_ids=TOKENS[:100]),
                {
                    client.plan_snapshot("x", TOKENS[:100], model="other@1", codec="k8v8")
                    .segments[-1]
                    .key: good_tail
                },
            ),
            grpc.StatusCode.FAILED_PRECONDITION,
        ),
        "model mismatch on get": (
            lambda: client.get_snapshot("s", 0, model="other@1"),
            grpc.StatusCode.FAILED_PRECONDITION,
        ),
        "codec mismatch on get": (
            lambda: client.get_snapshot("s", 0, codec="lossless"),
            grpc.StatusCode.FAILED_PRECONDITION,
        ),
        "unknown snapshot": (lambda: client.get_snapshot("s", 9), grpc.StatusCode.NOT_FOUND),
        "unknown session": (lambda: client.delete_session("nobody"), grpc.StatusCode.NOT_FOUND),
        "other content, same turn": (
            lambda: client.put_snapshot(
                "s", 0, TOKENS[:100], make_cache(100, seed=3), model="other@2", codec="k4v2"
            ),
            grpc.StatusCode.ALREADY_EXISTS,
        ),
    }
    for name, (call, expected) in cases.items():
        assert _code(call) == expected, name
    assert client.list_snapshots("x") == []  # no failed put left anything behind
    text = service.metrics.exposition().decode()
    assert _metric(text, "deltastore_grpc_errors_total", method="PutSnapshot", code="INVALID_ARGUMENT") == 4
    assert _metric(text, "deltastore_grpc_errors_total", method="GetSnapshot", code="NOT_FOUND") == 1


def test_limits_are_resource_exhausted(tmp_path: Path) -> None:
    service = start_service(tmp_path, max_snapshot_bytes=20_000, max_tokens=200)
    try:
        with DeltaStoreClient(f"127.0.0.1:{service.grpc_port}") as c:
            assert _code(lambda: c.plan_snapshot("s", TOKENS, model=MODEL, codec="k4v2")) == (
                grpc.StatusCode.RESOURCE_EXHAUSTED
            )
            big = make_cache(200, layers=4, heads=4)
            assert _code(
                lambda: c.put_snapshot("s", 0, TOKENS[:200], big, model=MODEL, codec="lossless")
            ) == (grpc.StatusCode.RESOURCE_EXHAUSTED)
            small = make_cache(10)
            assert c.put_snapshot("s", 0, TOKENS[:10], small, model=MODEL, codec="k4v2").new_segments == 1
    finally:
        service.stop()


def test_corrupt_block_is_data_loss(service: Service, client: DeltaStoreClient) -> None:
    client.put_snapshot("s", 0, TOKENS[:64], make_cache(64), model=MODEL, codec="k4v2")
    key = client.plan_snapshot("s", TOKENS[:64], model=MODEL, codec="k4v2").segments[0].key
    raw_key = block_key("default", key)

    def flip(batch) -> None:
        record = bytearray(batch.get("blocks", raw_key))
        record[-1] ^= 0xFF
        batch.put("blocks", raw_key, bytes(record))

    service.store.backend.transact(flip)
    assert _code(lambda: client.get_snapshot("s", 0)) == grpc.StatusCode.DATA_LOSS


def test_deadline_passed_mid_stream_stores_nothing(service: Service, client: DeltaStoreClient) -> None:
    stub = pb_grpc.DeltaStoreStub(grpc.insecure_channel(f"127.0.0.1:{service.grpc_port}"))
    cache = make_cache(64)
    plan = client.plan_snapshot("late", TOKENS[:64], model=MODEL, codec="k4v2")
    payload = encode_block(cache, CodecSpec.parse("k4v2"), start=0)
    header = pb.SnapshotHeader(session="late", turn=0, model=MODEL, codec="k4v2", token_ids=TOKENS[:64])

    def slow() -> Iterator[pb.PutSnapshotRequest]:
        yield pb.PutSnapshotRequest(header=header)
        time.sleep(0.6)  # the caller's deadline passes while the stream is still open
        for chunk in iter_chunks(plan.segments[0].key, payload):
            yield pb.PutSnapshotRequest(chunk=chunk)

    assert _code(lambda: stub.PutSnapshot(slow(), timeout=0.3)) == grpc.StatusCode.DEADLINE_EXCEEDED

    def errors() -> float:
        text = service.metrics.exposition().decode()
        return _metric(text, "deltastore_grpc_errors_total", method="PutSnapshot", code="DEADLINE_EXCEEDED")

    give_up = time.monotonic() + 10  # the server finishes with the abandoned stream on its own time
    while errors() < 1 and time.monotonic() < give_up:
        time.sleep(0.05)
    assert errors() == 1
    assert client.list_snapshots("late") == []


def test_health_and_reflection(service: Service) -> None:
    channel = grpc.insecure_channel(f"127.0.0.1:{service.grpc_port}")
    health = health_pb2_grpc.HealthStub(channel)
    for name in ("", "deltastore.v1.DeltaStore"):
        reply = health.Check(health_pb2.HealthCheckRequest(service=name), timeout=5)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
    refl = reflection_pb2_grpc.ServerReflectionStub(channel)
    replies = refl.ServerReflectionInfo(
        iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5
    )
    names = {s.name for r in replies for s in r.list_services_response.service}
    assert {"deltastore.v1.DeltaStore", "grpc.health.v1.Health"} <= names


def test_unix_socket(tmp_path: Path) -> None:
    sock = tmp_path / "ds.sock"
    service = start_service(tmp_path, grpc_address=f"unix:{sock}", http_address="")
    try:
        with DeltaStoreClient(f"unix:{sock}") as c:
            c.put_snapshot("s", 0, TOKENS[:10], make_cache(10), model=MODEL, codec="lossless")
            assert c.get_snapshot("s", 0, as_cache=False).n_tokens == 10
    finally:
        service.stop()


def test_client_retries_unavailable_until_the_server_is_up(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    started: list[Service] = []
    timer = threading.Timer(
        0.5, lambda: started.append(start_service(tmp_path, grpc_address=f"127.0.0.1:{port}"))
    )
    timer.start()
    try:
        retry = Retry(attempts=40, base_seconds=0.05, cap_seconds=0.2)
        with DeltaStoreClient(f"127.0.0.1:{port}", retry=retry, timeout=30) as c:
            assert c.savings()["snapshots"] == 0
        with DeltaStoreClient("127.0.0.1:1", retry=Retry(attempts=2, base_seconds=0.01)) as dead:
            assert _code(dead.savings) == grpc.StatusCode.UNAVAILABLE
    finally:
        timer.join()
        for svc in started:
            svc.stop()


def test_async_client_round_trip(service: Service) -> None:
    cache = make_cache(150, dtype=torch.bfloat16)

    async def main() -> None:
        async with AsyncDeltaStoreClient(f"127.0.0.1:{service.grpc_port}") as c:
            put = await c.put_snapshot("a", 0, TOKENS[:150], cache, model=MODEL, codec="lossless")
            assert put.encoded_segments == 3
            again = await c.put_snapshot("b", 0, TOKENS[:150], cache, model=MODEL, codec="lossless")
            assert again.sent_bytes == 0 and again.reused_shared_bytes == put.sent_bytes
            got = await c.get_snapshot("a", 0, dtype=torch.bfloat16)
            assert all(torch.equal(a, b) for (a, _), (b, _) in zip(cache, got.layers, strict=True))
            assert await c.lookup_prefix(TOKENS[:150], model=MODEL, codec="lossless") == 150
            assert [s.session for s in await c.list_snapshots()] == ["a", "b"]
            assert (await c.delete_session("b")).deleted_snapshots == 1
            assert (await c.savings())["sessions"] == 1
            with pytest.raises(grpc.RpcError) as info:
                await c.get_snapshot("nobody", 0)
            assert info.value.code() == grpc.StatusCode.NOT_FOUND

    asyncio.run(main())


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_cache_encodes_on_device_and_restores_there(client: DeltaStoreClient) -> None:
    cache = [(k.cuda(), v.cuda()) for k, v in make_cache(200)]
    client.put_snapshot("gpu", 0, TOKENS[:200], cache, model=MODEL, codec="lossless")
    got = client.get_snapshot("gpu", 0, device="cuda")
    assert got.layers[0][0].is_cuda and got.cache.layers[0].keys.is_cuda
    assert all(torch.equal(a, b) for (a, _), (b, _) in zip(cache, got.layers, strict=True))
    k4 = client.put_snapshot("gpu-k4v2", 0, TOKENS[:200], cache, model=MODEL, codec="k4v2")
    assert k4.logical_bytes / k4.sent_bytes > 3.0
