"""Hostile input: fuzzed protobuf handlers and payload decoders, lying sizes, stalls.

Every bad input must get a clear status (never INTERNAL or UNKNOWN), leave the store unchanged,
keep the server serving, and hold memory to what was actually sent.

Why one long module: one scenario family (hostile input) over every handler, sharing its
stream-attack helpers.
"""

from __future__ import annotations

import struct
import threading
import tracemalloc
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from trust_helpers import MODEL, client, make_cache, send_garbage, start_service, tokens_for

from deltastore.codecs import CodecSpec, decode_block, encode_block, read_header
from deltastore.errors import CodecError, DeltaStoreError
from deltastore.server.app import Service
from deltastore.v1 import deltastore_pb2 as pb
from deltastore.v1 import deltastore_pb2_grpc as pb_grpc

CLEAR = {
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.ALREADY_EXISTS,
    grpc.StatusCode.OUT_OF_RANGE,
}
FUZZ = settings(
    max_examples=80,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
    database=None,
)
BASE_TOKENS = tokens_for(5, 45)
NEW_TOKENS = tokens_for(77, 16)  # one block the store never holds: a put of it must send it


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    tmp = tmp_path_factory.mktemp("hostile")  # shared memory on, so the fuzz reaches GetSnapshotShm's export
    svc = start_service(tmp, workers=4, stall_seconds=1.0, shm_dir=str(tmp / "shm"), shm_peers="loopback")
    try:
        with client(svc.grpc_port, None) as c:
            c.put_snapshot("base", 0, BASE_TOKENS, make_cache(45), model=MODEL, codec="k4v2")
        yield svc
    finally:
        svc.stop()


@pytest.fixture(scope="module")
def stub(service: Service) -> Iterator[pb_grpc.DeltaStoreStub]:
    with grpc.insecure_channel(f"127.0.0.1:{service.grpc_port}") as ch:
        yield pb_grpc.DeltaStoreStub(ch)


def _state(service: Service) -> tuple[Any, ...]:
    """Everything a bad request must not change: every block and manifest key, and the counters."""
    with service.store.backend.read() as view:
        blocks = sorted(bytes(k) for k, _ in view.scan("blocks"))
        manifests = sorted(bytes(k) for k, _ in view.scan("manifests"))
    savings = service.store.savings()
    savings.pop("backend", None)
    return blocks, manifests, repr(savings)


def _serving(service: Service) -> bool:
    with grpc.insecure_channel(f"127.0.0.1:{service.grpc_port}") as ch:
        reply = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5)
    return reply.status == health_pb2.HealthCheckResponse.SERVING


def _code(fn: Callable[[], Any]) -> grpc.StatusCode:
    try:
        fn()
    except grpc.RpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK


def _payload(codec: str = "k4v2", n: int = 16, start: int = 0) -> bytes:
    cache = make_cache(start + n)
    return encode_block([(k[:, start:], v[:, start:]) for k, v in cache], CodecSpec.parse(codec), start=start)


# -- payload decoders --------------------------------------------------------------------------

_VALID = {codec: _payload(codec) for codec in ("k4v2", "lossless", "k8v8-z", "fp8", "k4v2-pe50")}


@st.composite
def mangled_payloads(draw: st.DrawFn) -> bytes:
    data = bytearray(_VALID[draw(st.sampled_from(sorted(_VALID)))])
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["flip", "truncate", "insert", "extend", "header-int"]))
        if op == "flip" and data:
            i = draw(st.integers(0, len(data) - 1))
            data[i] ^= draw(st.integers(1, 255))
        elif op == "truncate":
            del data[draw(st.integers(0, len(data))) :]
        elif op == "insert":
            i = draw(st.integers(0, len(data)))
            data[i:i] = draw(st.binary(min_size=1, max_size=16))
        elif op == "extend":
            data += draw(st.binary(min_size=1, max_size=64))
        elif op == "header-int" and len(data) >= 36:  # a lying dimension, size or offset
            offset = draw(st.sampled_from([8, 12, 16, 20, 24, 32]))
            data[offset : offset + 4] = struct.pack(
                "<I", draw(st.sampled_from([0, 1, 2**16, 2**31 - 1, 2**32 - 1]))
            )
    return bytes(data)


@given(mangled_payloads())
@FUZZ
def test_decoders_refuse_mangled_payloads_cleanly(data: bytes) -> None:
    tracemalloc.start()
    try:
        try:
            header = read_header(data)
            blk = decode_block(data)
        except DeltaStoreError:
            return  # FormatError / CodecError / InvalidArgument: the clear refusal
        finally:
            peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 64 * max(len(data), 4096) + (8 << 20), peak  # no allocation driven by lying sizes
    assert len(blk.layers) == header.n_layers
    for k, v in blk.layers:
        assert k.shape[0] == header.kv_heads and k.shape[-1] == header.head_dim and v.shape == k.shape


def test_huge_dimensions_are_refused_before_allocating(reliability) -> None:
    good = _VALID["lossless"]
    tried = 0
    for offset in (8, 12, 16, 20):  # n_layers, kv_heads, head_dim, n_tokens
        for value in (2**20, 2**31 - 1, 2**32 - 1):
            data = bytearray(good)
            data[offset : offset + 4] = struct.pack("<I", value)
            tracemalloc.start()
            with pytest.raises(DeltaStoreError):
                decode_block(bytes(data))
            peak = tracemalloc.get_traced_memory()[1]
            tracemalloc.stop()
            assert peak < 4 << 20
            tried += 1
    reliability.record(
        "payload header with huge layers/heads/head_dim/tokens", tried, "FormatError, < 4 MiB allocated"
    )


def test_unknown_format_version_and_codec_are_refused(reliability) -> None:
    data = bytearray(_VALID["k4v2"])
    data[4] = 99  # format version byte
    with pytest.raises(DeltaStoreError, match="version 99"):
        read_header(bytes(data))
    for text in ("k9v9", "k4v2-zz", "", "lossless-v99"):
        with pytest.raises(DeltaStoreError):
            CodecSpec.parse(text)
    reliability.record(
        "payload of an unknown block format version; unknown codec spec strings", 5, "INVALID_ARGUMENT"
    )


def test_non_finite_tensors(reliability) -> None:
    """Quantizing codecs refuse NaN/inf with a hint; the bit-exact tier keeps them bit for bit."""
    cache = make_cache(16)
    for bad in (float("nan"), float("inf"), -float("inf")):
        poisoned = [(k.clone(), v.clone()) for k, v in cache]
        poisoned[1][0][0, 3, 5] = bad
        for codec in ("k4v2", "k8v8", "fp8"):
            with pytest.raises(CodecError, match="non-finite"):
                encode_block(poisoned, CodecSpec.parse(codec))
        back = decode_block(encode_block(poisoned, CodecSpec.parse("lossless"))).layers[1][0]
        assert torch.equal(back.view(torch.int16), poisoned[1][0].view(torch.int16))
    reliability.record("NaN/+inf/-inf in K or V", 9, "quantizing codecs: CodecError; lossless: bit-exact")


# -- the PutSnapshot stream --------------------------------------------------------------------


def _header(**fields: Any) -> pb.PutSnapshotRequest:
    base = {"session": "h", "turn": 0, "model": MODEL, "codec": "k4v2", "token_ids": NEW_TOKENS}
    return pb.PutSnapshotRequest(header=pb.SnapshotHeader(**{**base, **fields}))


def _chunk(key: bytes, offset: int, total: int, data: bytes) -> pb.PutSnapshotRequest:
    return pb.PutSnapshotRequest(chunk=pb.BlockChunk(key=key, offset=offset, total_bytes=total, data=data))


def _plan_key(stub: pb_grpc.DeltaStoreStub, tokens: list[int], session: str = "h") -> bytes:
    plan = stub.PlanSnapshot(
        pb.PlanSnapshotRequest(session=session, model=MODEL, codec="k4v2", token_ids=tokens), timeout=5
    )
    return plan.segments[0].key


def test_stream_attacks(service: Service, stub: pb_grpc.DeltaStoreStub, reliability) -> None:
    key = _plan_key(stub, NEW_TOKENS)
    payload = _payload()
    half = len(payload) // 2
    other_codec = _payload("k8v8")
    bumped = bytearray(payload)
    bumped[4] = 7
    cases: dict[str, tuple[list[pb.PutSnapshotRequest], set[grpc.StatusCode]]] = {
        "empty stream": ([], {grpc.StatusCode.INVALID_ARGUMENT}),
        "chunk before header": ([_chunk(key, 0, len(payload), payload)], {grpc.StatusCode.INVALID_ARGUMENT}),
        "two headers": ([_header(), _header()], {grpc.StatusCode.INVALID_ARGUMENT}),
        "header only (segments missing)": ([_header()], {grpc.StatusCode.FAILED_PRECONDITION}),
        "truncated payload (stream ends mid-block)": (
            [_header(), _chunk(key, 0, len(payload), payload[:half])],
            {grpc.StatusCode.INVALID_ARGUMENT},
        ),
        "chunks out of order": (
            [
                _header(),
                _chunk(key, half, len(payload), payload[half:]),
                _chunk(key, 0, len(payload), payload[:half]),
            ],
            {grpc.StatusCode.INVALID_ARGUMENT},
        ),
        "gap between chunks": (
            [
                _header(),
                _chunk(key, 0, len(payload), payload[:10]),
                _chunk(key, 20, len(payload), payload[20:]),
            ],
            {grpc.StatusCode.INVALID_ARGUMENT},
        ),
        "chunk changes the declared size": (
            [
                _header(),
                _chunk(key, 0, len(payload), payload[:half]),
                _chunk(key, half, len(payload) + 9, payload[half:]),
            ],
            {grpc.StatusCode.INVALID_ARGUMENT},
        ),
        "size smaller than the data (overrun)": (
            [
                _header(),
                _chunk(key, 0, half + 1, payload[:half]),
                _chunk(key, half, half + 1, payload[half:]),
            ],
            {grpc.StatusCode.INVALID_ARGUMENT},
        ),
        "declared size over the limit": (
            [_header(), _chunk(key, 0, 2**62, b"x")],
            {grpc.StatusCode.RESOURCE_EXHAUSTED},
        ),
        "duplicate segment": (
            [_header(), _chunk(key, 0, len(payload), payload), _chunk(key, 0, len(payload), payload)],
            {grpc.StatusCode.INVALID_ARGUMENT},
        ),
        "segment not in the plan": (
            [_header(), _chunk(bytes(32), 0, len(payload), payload)],
            {grpc.StatusCode.INVALID_ARGUMENT},
        ),
        "short key": (
            [_header(), _chunk(b"k", 0, len(payload), payload)],
            {grpc.StatusCode.INVALID_ARGUMENT},
        ),
        "payload of another codec": (
            [_header(), _chunk(key, 0, len(other_codec), other_codec)],
            {grpc.StatusCode.FAILED_PRECONDITION},
        ),
        "payload of an unknown format version": (
            [_header(), _chunk(key, 0, len(bumped), bytes(bumped))],
            {grpc.StatusCode.INVALID_ARGUMENT},
        ),
        "payload for other token positions": (
            [_header(), _chunk(key, 0, len(_payload(start=16)), _payload(start=16))],
            {grpc.StatusCode.INVALID_ARGUMENT},
        ),
        "unknown codec in header": ([_header(codec="k9v9")], {grpc.StatusCode.INVALID_ARGUMENT}),
        "too many tokens": (
            [_header(token_ids=[1] * (service.settings.max_tokens + 1))],
            {grpc.StatusCode.RESOURCE_EXHAUSTED},
        ),
        "bad session name (control characters)": (
            [_header(session="a\x00b")],
            {grpc.StatusCode.INVALID_ARGUMENT},
        ),
        "parent turn that does not exist": (
            [_header(parent_turn=41)],
            {grpc.StatusCode.NOT_FOUND, grpc.StatusCode.FAILED_PRECONDITION},
        ),
    }
    before = _state(service)
    for name, (messages, expected) in cases.items():
        code = _code(lambda m=messages: stub.PutSnapshot(iter(m), timeout=10))
        assert code in expected, (name, code)
        assert _state(service) == before, name
        reliability.record(f"PutSnapshot stream: {name}", 1, f"{code.name}; store unchanged")
    assert _serving(service)


def test_duplicate_turns(service: Service, reliability) -> None:
    with client(service.grpc_port, None) as c:
        cache = make_cache(45)
        before = _state(service)
        again = c.put_snapshot("base", 0, BASE_TOKENS, cache, model=MODEL, codec="k4v2")  # identical: no-op
        assert again.new_bytes == 0 and _state(service) == before
        # Same tokens: segments are addressed by tokens, so the stored (first) KV stays; a no-op.
        same = c.put_snapshot("base", 0, BASE_TOKENS, make_cache(45, seed=9), model=MODEL, codec="k4v2")
        assert same.new_bytes == 0 and _state(service) == before
        other = _code(
            lambda: c.put_snapshot("base", 0, BASE_TOKENS[:40], make_cache(40), model=MODEL, codec="k4v2")
        )
        assert other == grpc.StatusCode.ALREADY_EXISTS
        assert _state(service) == before
    reliability.record(
        "same turn put again: identical / same tokens other KV / other tokens",
        3,
        "no-op / no-op / ALREADY_EXISTS; store unchanged",
    )


def _vmhwm() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM")


def test_lying_sizes_hold_no_memory(service: Service, stub: pb_grpc.DeltaStoreStub, reliability) -> None:
    """A payload declared at 512 MiB (under the 1 GiB limit) that sends 1 KiB costs ~1 KiB."""
    key = _plan_key(stub, NEW_TOKENS)
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak RSS (Linux)
    start = _vmhwm()
    for _ in range(8):
        code = _code(
            lambda: stub.PutSnapshot(iter([_header(), _chunk(key, 0, 512 << 20, b"\0" * 1024)]), timeout=10)
        )
        assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert _vmhwm() - start < 128 << 20
    reliability.record("chunk declaring 512 MiB, sending 1 KiB", 8, "INVALID_ARGUMENT; peak RSS +<128 MiB")


# -- fuzzed messages ---------------------------------------------------------------------------

names = st.one_of(
    st.text(max_size=80), st.sampled_from(["", "default", "base", "a" * 64, "a" * 65, "x/y", "é"])
)
uint32 = st.integers(0, 2**32 - 1)
token_lists = st.lists(uint32, max_size=200)


@st.composite
def put_streams(draw: st.DrawFn) -> list[pb.PutSnapshotRequest]:
    msgs: list[pb.PutSnapshotRequest] = []
    if draw(st.booleans()):
        header = pb.SnapshotHeader(
            namespace=draw(names),
            session=draw(names),
            turn=draw(uint32),
            model=draw(st.sampled_from([MODEL, "", "m"])),
            codec=draw(st.sampled_from(["k4v2", "lossless", "", "k9", "k4v2-pe50", "fp8-z"])),
            token_ids=draw(token_lists),
        )
        if draw(st.booleans()):
            header.parent_turn = draw(uint32)
        msgs.append(pb.PutSnapshotRequest(header=header))
    for _ in range(draw(st.integers(0, 5))):
        data = draw(st.one_of(st.binary(max_size=300), st.sampled_from(list(_VALID.values()))))
        msgs.append(
            _chunk(
                draw(st.one_of(st.binary(max_size=40), st.just(bytes(32)))),
                draw(st.one_of(st.just(0), st.integers(0, 2**64 - 1))),
                draw(st.one_of(st.just(len(data)), st.integers(0, 2**64 - 1))),
                data,
            )
        )
    return msgs


@given(put_streams())
@FUZZ
def test_fuzzed_put_streams(
    service: Service, stub: pb_grpc.DeltaStoreStub, msgs: list[pb.PutSnapshotRequest]
) -> None:
    before = _state(service)
    code = _code(lambda: stub.PutSnapshot(iter(msgs), timeout=10))
    assert code in CLEAR | {grpc.StatusCode.OK}, code
    if code is not grpc.StatusCode.OK:
        assert _state(service) == before


@st.composite
def unary_calls(draw: st.DrawFn) -> tuple[str, Any]:
    method = draw(
        st.sampled_from(
            [
                "PlanSnapshot",
                "GetSnapshot",
                "GetSnapshotShm",
                "LookupPrefix",
                "GetPrefix",
                "GetPrefixShm",
                "HasBlocks",
                "DeleteSnapshot",
                "DeleteSession",
                "ListSnapshots",
                "GetSavings",
            ]
        )
    )
    ns, session, turn = draw(names), draw(names), draw(uint32)
    codec, model = (
        draw(st.sampled_from(["k4v2", "", "q", "lossless"])),
        draw(st.sampled_from([MODEL, "", "m"])),
    )
    requests = {
        "PlanSnapshot": lambda: pb.PlanSnapshotRequest(
            namespace=ns, session=session, model=model, codec=codec, token_ids=draw(token_lists)
        ),
        "GetSnapshot": lambda: pb.GetSnapshotRequest(
            namespace=ns, session=session, turn=turn, model=model, codec=codec
        ),
        "GetSnapshotShm": lambda: pb.GetSnapshotRequest(
            namespace=ns, session=session, turn=turn, model=model, codec=codec
        ),
        "LookupPrefix": lambda: pb.LookupPrefixRequest(
            namespace=ns, model=model, codec=codec, token_ids=draw(token_lists)
        ),
        "GetPrefix": lambda: pb.GetPrefixRequest(
            namespace=ns, model=model, codec=codec, token_ids=draw(token_lists), max_tokens=draw(uint32)
        ),
        "HasBlocks": lambda: pb.HasBlocksRequest(
            namespace=ns, keys=draw(st.lists(st.binary(max_size=40), max_size=20))
        ),
        "DeleteSnapshot": lambda: pb.DeleteSnapshotRequest(namespace=ns, session=session, turn=turn),
        "DeleteSession": lambda: pb.DeleteSessionRequest(namespace=ns, session=session),
        "ListSnapshots": lambda: pb.ListSnapshotsRequest(namespace=ns, session=session),
        "GetSavings": lambda: pb.GetSavingsRequest(namespace=ns),
    }
    requests["GetPrefixShm"] = requests["GetPrefix"]  # the same request, answered by an export
    return method, requests[method]()


@given(unary_calls())
@FUZZ
def test_fuzzed_unary_calls(service: Service, stub: pb_grpc.DeltaStoreStub, call: tuple[str, Any]) -> None:
    method, request = call
    before = _state(service)
    fn = getattr(stub, method)
    code = _code(
        lambda: (
            list(fn(request, timeout=10))
            if method in ("GetSnapshot", "GetPrefix")
            else fn(request, timeout=10)
        )
    )
    assert code in CLEAR | {grpc.StatusCode.OK}, (method, code)
    if request.namespace not in ("", "default") or getattr(request, "session", "") != "base":
        assert _state(service) == before


def test_messages_that_do_not_parse_are_invalid_argument(service: Service, reliability) -> None:
    """Raw bytes to every rpc, bypassing any client: INVALID_ARGUMENT naming the method, not INTERNAL."""
    before = _state(service)
    tried = send_garbage(service.grpc_port)
    assert _state(service) == before and _serving(service)
    reliability.record(
        "request bytes that are not protobuf, to every rpc",
        tried,
        "INVALID_ARGUMENT naming the rpc; store unchanged",
    )


def test_fuzz_totals(service: Service, reliability) -> None:
    """Records the fuzz runs above (hypothesis examples per test) and checks the server is serving."""
    assert _serving(service)
    n = FUZZ.max_examples
    reliability.record(
        "mangled payloads (flips, truncation, insertion, lying header ints) into the decoders",
        n,
        "DeltaStoreError or a consistent decode; bounded memory",
    )
    reliability.record(
        "random PutSnapshot streams (header fields, chunk keys/offsets/sizes/data)",
        n,
        "clear status; store unchanged on failure",
    )
    reliability.record("random requests to every unary rpc", n, "clear status; store unchanged")


# -- stalls ------------------------------------------------------------------------------------


def test_stalled_clients_are_cancelled_and_free_their_threads(
    service: Service, stub: pb_grpc.DeltaStoreStub, reliability
) -> None:
    """More stalled puts than handler threads, with no deadline: the guard cancels them and the server serves."""
    release = threading.Event()

    def stalling() -> Iterator[pb.PutSnapshotRequest]:
        yield _header(session="stall")
        release.wait(30)

    before = _state(service)
    cancelled_before = service.stall_guard.cancelled
    codes: list[grpc.StatusCode] = []

    def one() -> None:
        codes.append(_code(lambda: stub.PutSnapshot(stalling())))

    threads = [threading.Thread(target=one) for _ in range(service.settings.workers + 2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    release.set()
    assert codes == [grpc.StatusCode.CANCELLED] * len(threads), codes
    assert service.stall_guard.cancelled - cancelled_before == len(threads)
    assert _state(service) == before and _serving(service)
    with client(service.grpc_port, None) as c:
        assert [s.turn for s in c.list_snapshots("base")] == [0]
    reliability.record(
        "PutSnapshot client stalls mid-stream without a deadline (more than the worker threads)",
        len(threads),
        "cancelled after --stall-seconds; nothing stored; server serves",
    )


def test_reader_that_stops_reading_is_cancelled(tmp_path: Path, service: Service, reliability) -> None:
    """A GetSnapshot whose client takes the first message and stops reading does not hold a thread."""
    with client(service.grpc_port, None) as c:
        c.put_snapshot(
            "big", 0, tokens_for(9, 2048), make_cache(2048, layers=4), model=MODEL, codec="lossless"
        )
    cancelled_before = service.stall_guard.cancelled
    with grpc.insecure_channel(f"127.0.0.1:{service.grpc_port}", options=[("grpc.http2.bdp_probe", 0)]) as ch:
        stream = pb_grpc.DeltaStoreStub(ch).GetSnapshot(pb.GetSnapshotRequest(session="big", turn=0))
        next(stream)  # the manifest; then the client stops reading
        deadline = threading.Event()
        for _ in range(100):
            if service.stall_guard.cancelled > cancelled_before:
                break
            deadline.wait(0.1)
        assert service.stall_guard.cancelled == cancelled_before + 1
        with pytest.raises(grpc.RpcError) as err:
            for _ in stream:
                pass
        assert err.value.code() == grpc.StatusCode.CANCELLED
    with client(service.grpc_port, None) as c:
        c.delete_session("big")
    reliability.record(
        "GetSnapshot client stops reading after the manifest", 1, "cancelled after --stall-seconds"
    )
