"""Hand-serialized chunk messages: the same wire format as protobuf, never a different reading."""

from __future__ import annotations

import blake3
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from deltastore.v1 import deltastore_pb2 as pb
from deltastore.v1.protocol import (
    ChunkAssembler,
    WireChunk,
    chunk_messages,
    encode_chunk_message,
    parse_chunk_message,
    wire_deserializer,
    wire_serializer,
)

KEY = bytes(range(32))


def _fields(chunk: pb.BlockChunk | WireChunk) -> tuple[bytes, int, int, bytes]:
    return bytes(chunk.key), chunk.offset, chunk.total_bytes, bytes(chunk.data)


@pytest.mark.parametrize("size", [0, 1, 127, 128, 129, 16_383, 16_384, 70_000])
def test_hand_serialized_chunks_read_as_protobuf_writes_them(size: int) -> None:
    payload = bytes(i * 7 % 251 for i in range(size))
    mine = list(encode_chunk_message(KEY, payload, 1000))
    theirs = list(chunk_messages(pb.GetSnapshotResponse, KEY, payload, 1000))
    assert len(mine) == len(theirs) == max(1, -(-size // 1000))
    for raw, msg in zip(mine, theirs, strict=True):
        assert pb.GetSnapshotResponse.FromString(raw) == msg
        assert pb.PutSnapshotRequest.FromString(raw).chunk == msg.chunk
        for wire in (raw, msg.SerializeToString()):
            parsed = parse_chunk_message(wire)
            assert parsed is not None and _fields(parsed) == _fields(msg.chunk)
    asm = ChunkAssembler(max_payload_bytes=size, max_total_bytes=size, digest=True)
    done = [asm.add(parse_chunk_message(raw)) for raw in mine]  # type: ignore[arg-type]
    assert done[-1] is not None and bytes(done[-1].data) == payload
    assert done[-1].digest == blake3.blake3(payload).digest()
    asm.finish()


def test_anything_but_one_plain_chunk_is_left_to_protobuf() -> None:
    header = pb.PutSnapshotRequest(header=pb.SnapshotHeader(session="s", turn=3))
    info = pb.GetSnapshotResponse(info=pb.SnapshotInfo(snapshot_id="a/b/0"))
    [chunk] = chunk_messages(pb.PutSnapshotRequest, KEY, b"abc", 10)
    raw = chunk.SerializeToString()
    unknown_field = raw[:1] + bytes([raw[1] + 2]) + raw[2:] + b"\x28\x01"  # BlockChunk field 5
    twice = raw + raw  # protobuf merges repeated submessages: its reading, not ours
    for wire in (header.SerializeToString(), info.SerializeToString(), unknown_field, twice, raw[:-1], b""):
        assert parse_chunk_message(wire) is None
    parse = wire_deserializer(pb.PutSnapshotRequest.FromString)
    assert parse(header.SerializeToString()) == header
    assert isinstance(parse(raw), WireChunk)
    assert wire_serializer(header) == header.SerializeToString() and wire_serializer(raw) is raw


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=80))
def test_fuzzed_bytes_never_parse_differently_from_protobuf(wire: bytes) -> None:
    parsed = parse_chunk_message(wire)
    if parsed is None:
        return
    msg = pb.PutSnapshotRequest.FromString(wire)
    assert msg.WhichOneof("part") == "chunk" and _fields(parsed) == _fields(msg.chunk)


@settings(max_examples=200, deadline=None)
@given(
    st.binary(min_size=32, max_size=32),
    st.integers(0, (1 << 64) - 1),
    st.integers(0, (1 << 64) - 1),
    st.binary(max_size=300),
)
def test_every_protobuf_chunk_parses_by_hand(key: bytes, offset: int, total: int, data: bytes) -> None:
    msg = pb.GetSnapshotResponse(chunk=pb.BlockChunk(key=key, offset=offset, total_bytes=total, data=data))
    parsed = parse_chunk_message(msg.SerializeToString())
    assert parsed is not None and _fields(parsed) == (key, offset, total, data)


def test_assembly_of_large_and_small_chunks_in_any_mix() -> None:
    payload = bytes(i * 13 % 256 for i in range(300_000))
    sizes = [70_000, 10, 10, 100_000, 5, 65_536, 64_439]
    assert sum(sizes) == len(payload)
    asm = ChunkAssembler(max_payload_bytes=len(payload), max_total_bytes=len(payload), digest=True)
    offset, done = 0, None
    for n in sizes:
        raw = pb.PutSnapshotRequest(
            chunk=pb.BlockChunk(
                key=KEY, offset=offset, total_bytes=len(payload), data=payload[offset : offset + n]
            )
        ).SerializeToString()
        assert done is None
        done = asm.add(parse_chunk_message(raw))  # type: ignore[arg-type]
        offset += n
    assert done is not None and done.data == payload and done.digest == blake3.blake3(payload).digest()
    assert asm.received_bytes == len(payload)
    asm.finish()


def test_room_gathers_the_payload_straight_into_a_record_buffer() -> None:
    payload = bytes(i * 29 % 256 for i in range(200_000))
    asm = ChunkAssembler(
        max_payload_bytes=len(payload), max_total_bytes=2 * len(payload), digest=True, room=lambda k: 48
    )
    done = [asm.add(parse_chunk_message(raw)) for raw in encode_chunk_message(KEY, payload, 70_000)]  # type: ignore[arg-type]
    last = done[-1]
    assert done[:-1] == [None, None] and last is not None and last.record is not None
    assert len(last.record) == 48 + len(payload) and last.record[48:] == payload == bytes(last.data)
    assert last.digest == blake3.blake3(payload).digest()
    # A lone chunk is written into a record as well, so the store can always keep it as is.
    [single] = encode_chunk_message(KEY, b"xyz", 10)
    one = asm.add(parse_chunk_message(single))  # type: ignore[arg-type]
    assert one is not None and one.record is not None and one.record[48:] == b"xyz"
