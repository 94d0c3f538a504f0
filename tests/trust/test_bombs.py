"""Decompression bombs and forged sizes: bounded at put by the server's limits, and in the client.

Before: a lossless payload whose zstd sections declared gigabytes each passed ``read_header`` (all
the server checked), was stored and counted as logical bytes, and made every reader allocate
what it declared.
"""

from __future__ import annotations

import time
from pathlib import Path

import grpc
import pytest
import zstandard
from trust_helpers import BLOCK, MODEL, client, make_cache, start_service, tokens_for

from deltastore.client.wire import check_payloads
from deltastore.codecs import CodecSpec, encode_block, read_header
from deltastore.codecs.format import FLAG_ZSTD, pack_header, section_sizes
from deltastore.errors import FormatError, ResourceExhausted
from deltastore.store import SegmentPayload
from deltastore.v1 import deltastore_pb2 as pb
from deltastore.v1 import deltastore_pb2_grpc as pb_grpc
from deltastore.v1.protocol import chunk_messages

LOSSLESS = CodecSpec.parse("lossless")


def _bomb(n_tokens: int, *, layers: int, heads: int, head_dim: int, frames: bool) -> bytes:
    """A lossless payload whose zstd sections declare ``layers*heads*n_tokens*head_dim*2`` bytes each.

    ``frames``: real zstd frames of zeros (a reader inflates them); else 2 MiB of filler each
    (enough for the server, which never decompresses).
    """
    sizes = section_sizes(LOSSLESS, layers, heads, head_dim, n_tokens, 0, "float16")
    bodies = [
        zstandard.ZstdCompressor(level=1).compress(bytes(raw)) if frames else bytes(2 << 20)
        for _, raw in sizes
    ]
    table = [(kind, FLAG_ZSTD, len(body)) for (kind, _), body in zip(sizes, bodies, strict=True)]
    header = pack_header(LOSSLESS, layers, heads, head_dim, n_tokens, 0, "float16", table)
    return header + b"".join(bodies)


def _put(
    stub: pb_grpc.DeltaStoreStub, session: str, tokens: list[int], codec: str, payload: bytes
) -> grpc.StatusCode:
    plan = stub.PlanSnapshot(
        pb.PlanSnapshotRequest(session=session, model=MODEL, codec=codec, token_ids=tokens), timeout=10
    )
    [seg] = plan.segments
    header = pb.SnapshotHeader(session=session, turn=0, model=MODEL, codec=codec, token_ids=tokens)
    msgs = [
        pb.PutSnapshotRequest(header=header),
        *chunk_messages(pb.PutSnapshotRequest, seg.key, payload, 1 << 20),
    ]
    try:
        stub.PutSnapshot(iter(msgs), timeout=30)
    except grpc.RpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK


def test_bombs_and_forged_sizes_are_refused_at_put(tmp_path: Path, reliability) -> None:
    svc = start_service(tmp_path, max_logical_bytes=1 << 20)
    try:
        with client(svc.grpc_port, None) as c:
            c.put_snapshot("ok", 0, tokens_for(1, 40), make_cache(40), model=MODEL, codec="k4v2")
            before = c.savings()
        # 16 GiB of FP16 declared (two 8 GiB zstd sections, of filler) behind 4 MiB.
        bomb = _bomb(BLOCK, layers=1024, heads=64, head_dim=4096, frames=False)
        hdr = read_header(bomb)  # the header alone is well-formed: the old server stored it
        assert hdr.fp16_nbytes == 1 << 34 and len(bomb) < 5 << 20
        # Raw sections, honest bytes, but more logical bytes than the server's limit (1 MiB).
        big = encode_block(make_cache(BLOCK, layers=64, heads=8), CodecSpec.parse("k4v2"))
        assert read_header(big).fp16_nbytes > 1 << 20
        with grpc.insecure_channel(f"127.0.0.1:{svc.grpc_port}") as ch:
            stub = pb_grpc.DeltaStoreStub(ch)
            codes = [
                _put(stub, "bomb", tokens_for(2, BLOCK), "lossless", bomb),
                _put(stub, "wide", tokens_for(3, BLOCK), "k4v2", big),
            ]
        assert codes == [grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED], codes
        with client(svc.grpc_port, None) as c:
            after = c.savings()
            assert [s.session for s in c.list_snapshots()] == ["ok"]
        assert after == before, "a refused forged header moved the savings counters"
    finally:
        svc.stop()
    reliability.record(
        "lossless payload whose zstd sections declare 16 GiB behind 4 MiB",
        1,
        "INVALID_ARGUMENT at put; nothing stored; savings unchanged",
    )
    reliability.record(
        "honest raw sections over --max-logical-bytes (64 layers x 8 heads)",
        1,
        "RESOURCE_EXHAUSTED at put; savings unchanged",
    )


def test_client_refuses_to_inflate_a_bomb(tmp_path: Path, reliability) -> None:
    """A bomb already in the store (an older server, a compromised one): the client does not inflate it."""
    svc = start_service(tmp_path)
    tokens = tokens_for(4, BLOCK)
    bomb = _bomb(BLOCK, layers=1024, heads=16, head_dim=128, frames=True)  # 128 MiB behind ~10 KiB
    assert len(bomb) < 64 << 10 and read_header(bomb).fp16_nbytes == 128 << 20
    try:
        store = svc.store
        plan = store.plan_snapshot("default", "bomb", MODEL, "lossless", tokens)
        [seg] = plan.segments
        store.put_snapshot(
            "default", "bomb", 0, MODEL, "lossless", tokens,
            {seg.key: SegmentPayload(bomb, BLOCK, read_header(bomb).fp16_nbytes)},
        )  # fmt: skip
        with client(svc.grpc_port, None) as c:
            c.put_snapshot("ok", 0, tokens_for(5, 40), make_cache(40), model=MODEL, codec="lossless")
            started = time.perf_counter()
            with pytest.raises(FormatError, match="decompression bomb"):
                c.get_snapshot("bomb", 0, model=MODEL)
            assert time.perf_counter() - started < 5
            restored = c.get_snapshot("ok", 0, model=MODEL)
            assert restored.n_tokens == 40
    finally:
        svc.stop()
    legit = [encode_block(make_cache(40), LOSSLESS)]
    need = check_payloads(None, legit, max_decoded_bytes=1 << 30)
    with pytest.raises(ResourceExhausted):
        check_payloads(None, legit, max_decoded_bytes=need - 1)
    reliability.record(
        "GetSnapshot of a stored zstd bomb (128 MiB behind 10 KiB)",
        1,
        "client refuses before inflating (FormatError); other snapshots decode",
    )
