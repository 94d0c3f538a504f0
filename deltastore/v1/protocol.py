"""Protocol rules both ends of the wire share (hand-written, not generated).

Framing of payload streams: the chunks of one payload are consecutive, in offset
order, each carries the payload's full size, and none is larger than the chunk limit. gRPC in
Python moves ~1.3 GB/s with ~1 MiB messages and an order of magnitude less with one huge
message, hence the default.

Every byte of a payload is copied as few times as Python allows: protobuf messages are built in
place (a submessage passed to a constructor is copied whole) and a chunk's ``data`` is read once
(each read of a bytes field is a fresh copy); the payload streams' own (de)serializers skip
protobuf for chunks altogether (one copy out, none in); a payload is put together with one copy
(joined, or written straight into the store's record buffer) and hashed chunk by chunk as it
arrives.
"""

from __future__ import annotations

import mmap
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple, Protocol, TypeVar

import blake3

from deltastore.errors import InvalidArgument, ResourceExhausted
from deltastore.v1 import deltastore_pb2 as pb

__all__ = [
    "DEFAULT_CHUNK_BYTES",
    "ERROR_TYPE_KEY",
    "KEY_BYTES",
    "SHM_FD_PREFIX",
    "SHM_FD_SOCKET",
    "SHM_FILE_PREFIX",
    "Assembled",
    "ChunkAssembler",
    "WireChunk",
    "chunk_messages",
    "encode_chunk_message",
    "iter_chunks",
    "parse_chunk_message",
    "wire_deserializer",
    "wire_serializer",
]

DEFAULT_CHUNK_BYTES = 1 << 20  # 1 MiB of payload per message
KEY_BYTES = 32  # BLAKE3 digest
ERROR_TYPE_KEY = "deltastore-error-type"
SHM_FILE_PREFIX = "deltastore-get-"
"""Names of GetSnapshotShm files: this prefix, then characters of ``[A-Za-z0-9_]`` only."""
"""Trailing metadata key naming the ``deltastore.errors`` class behind a non-OK status, so a
client can tell e.g. MissingSegments (plan again) from another FAILED_PRECONDITION."""
SHM_FD_PREFIX = "deltastore-fd-"
"""GetSnapshotShm names starting with this are one-time tokens for a sealed memfd, handed over the
unix socket ``SHM_FD_SOCKET`` in the shared directory (``--shm-mode memfd``), never a file."""
SHM_FD_SOCKET = "deltastore-fd.sock"


class _HasChunk(Protocol):
    @property
    def chunk(self) -> pb.BlockChunk: ...


M = TypeVar("M", bound=_HasChunk)


def chunk_messages(
    make: Callable[[], M], key: bytes, payload: bytes | bytearray | memoryview, chunk_bytes: int
) -> Iterator[M]:
    """Yield ``make()`` messages whose ``chunk`` carries one payload (at least one message).

    The chunk is filled in place: the payload bytes are copied once into each message.

    Args:
        make: the message type (``pb.PutSnapshotRequest`` or ``pb.GetSnapshotResponse``).
        key: the 32-byte segment key.
        payload: the encoded block.
        chunk_bytes: largest ``data`` per chunk, in bytes.
    """
    view = memoryview(payload)
    total = len(view)
    offset = 0
    while True:
        end = min(offset + chunk_bytes, total)
        msg = make()
        chunk = msg.chunk
        chunk.key = key
        chunk.offset = offset
        chunk.total_bytes = total
        chunk.data = (
            payload if end - offset == total and isinstance(payload, bytes) else bytes(view[offset:end])
        )
        yield msg
        offset = end
        if offset >= total:
            return


# -- chunk messages on the wire, by hand -------------------------------------------------------
#
# PutSnapshotRequest and GetSnapshotResponse both carry a chunk as field 2 of their oneof. Python's
# protobuf copies a chunk's data when it is set, when the message is serialized, when it is parsed
# and on every read of the field; these functions write and read exactly the same wire format
# with one copy on the way out and none on the way in. Anything but one plain chunk (a header, an
# info, unknown or repeated fields) is left to protobuf.

_CHUNK_TAG = 0x12  # field 2, length-delimited
_KEY_TAG, _OFFSET_TAG, _TOTAL_TAG, _DATA_TAG = 0x0A, 0x10, 0x18, 0x22  # BlockChunk fields 1-4


def _varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _read_varint(raw: bytes, pos: int, end: int) -> tuple[int, int] | None:
    """(value, next position) of the varint at ``pos``; None when malformed or past ``end``."""
    value = shift = 0
    while pos < end and shift < 64:
        byte = raw[pos]
        value |= (byte & 0x7F) << shift
        pos += 1
        if not byte & 0x80:
            return (value, pos) if value < 1 << 64 else None
        shift += 7
    return None


def encode_chunk_message(
    key: bytes, payload: bytes | bytearray | memoryview, chunk_bytes: int
) -> Iterator[bytes]:
    """One payload as serialized chunk messages (field 2 of PutSnapshotRequest/GetSnapshotResponse).

    Byte-identical in meaning to :func:`chunk_messages` (offset 0 is written, which protobuf
    reads the same as absent); each message costs one copy of its data.
    """
    view = memoryview(payload).cast("B")
    total = len(view)
    offset = 0
    while True:
        end = min(offset + chunk_bytes, total)
        head = b"".join(
            (
                bytes((_KEY_TAG,)),
                _varint(len(key)),
                key,
                bytes((_OFFSET_TAG,)),
                _varint(offset),
                bytes((_TOTAL_TAG,)),
                _varint(total),
                bytes((_DATA_TAG,)),
                _varint(end - offset),
            )
        )
        yield b"".join((bytes((_CHUNK_TAG,)), _varint(len(head) + end - offset), head, view[offset:end]))
        offset = end
        if offset >= total:
            return


class WireChunk(NamedTuple):
    """A chunk read straight off the wire: ``data`` is a view into the received message (no copy)."""

    key: bytes
    offset: int
    total_bytes: int
    data: memoryview


def parse_chunk_message(raw: bytes) -> WireChunk | None:
    """The chunk of a serialized PutSnapshotRequest/GetSnapshotResponse, or None if it is not one.

    None means "let protobuf parse it": the message holds something else (a header, an info),
    repeats or adds fields, or is malformed (protobuf then raises as it always did).
    """
    n = len(raw)
    if n < 2 or raw[0] != _CHUNK_TAG:
        return None
    got = _read_varint(raw, 1, n)
    if got is None or got[1] + got[0] != n:
        return None
    pos = got[1]
    fields: dict[int, int | tuple[int, int]] = {}
    while pos < n:
        tag = raw[pos]
        if tag in fields:
            return None
        got = _read_varint(raw, pos + 1, n)
        if got is None:
            return None
        value, pos = got
        if tag in (_OFFSET_TAG, _TOTAL_TAG):
            fields[tag] = value
        elif tag in (_KEY_TAG, _DATA_TAG) and pos + value <= n:
            fields[tag] = (pos, pos + value)
            pos += value
        else:
            return None
    key_span, data_span = fields.get(_KEY_TAG, (0, 0)), fields.get(_DATA_TAG, (0, 0))
    offset, total = fields.get(_OFFSET_TAG, 0), fields.get(_TOTAL_TAG, 0)
    if not (isinstance(key_span, tuple) and isinstance(data_span, tuple)):
        return None
    if not (isinstance(offset, int) and isinstance(total, int)):
        return None
    view = memoryview(raw)
    return WireChunk(raw[key_span[0] : key_span[1]], offset, total, view[data_span[0] : data_span[1]])


def wire_serializer(msg: bytes | Any) -> bytes:
    """gRPC serializer for streams that mix pre-serialized chunks (bytes) and protobuf messages."""
    return msg if isinstance(msg, bytes) else msg.SerializeToString()


def wire_deserializer(parse: Callable[[bytes], M]) -> Callable[[bytes], M | WireChunk]:
    """gRPC deserializer: chunks as :class:`WireChunk` (no copy), everything else by ``parse``."""

    def deserialize(raw: bytes) -> M | WireChunk:
        chunk = parse_chunk_message(raw)
        return parse(raw) if chunk is None else chunk

    return deserialize


class _Bare:
    """A message wrapper that hands out a bare BlockChunk as its ``chunk``."""

    __slots__ = ("chunk",)

    def __init__(self) -> None:
        self.chunk = pb.BlockChunk()


def iter_chunks(
    key: bytes, payload: bytes | bytearray | memoryview, chunk_bytes: int = DEFAULT_CHUNK_BYTES
) -> Iterator[pb.BlockChunk]:
    """Yield the bare chunks of one payload (at least one, even for an empty payload)."""
    return (m.chunk for m in chunk_messages(_Bare, key, payload, chunk_bytes))


_MIN_PART = 64 << 10  # chunks at least this large are kept as received until the join


class Assembled(NamedTuple):
    """One whole payload out of a stream.

    ``data`` is the chunks joined with one copy (a lone chunk is passed on as is); ``digest`` its
    BLAKE3 digest, computed over exactly these bytes as they arrived (None when hashing was not
    asked). With room asked for, ``record`` is the buffer the chunks were written into: the room,
    then ``data`` (a view of it).
    """

    key: bytes
    data: bytes | bytearray | memoryview
    digest: bytes | None
    record: mmap.mmap | None = None


class ChunkAssembler:
    """Reassemble consecutive chunks into whole payloads, enforcing the framing and size limits.

    A payload's declared size is checked against the limits first, and its chunks are kept as
    they arrive and joined once when the last one does (growing one buffer chunk by chunk would
    copy it again on every reallocation): a sender that declares a large payload and stalls or
    lies holds no more memory than it sent.

    With ``room``, each payload is instead written straight into a record buffer that leaves
    ``room(key)`` bytes before it (the store's record header), so the store can keep it without a
    copy; the buffer is an anonymous map, whose pages cost memory only once written, so the same
    holds.

    Args:
        max_payload_bytes: largest declared size of one payload.
        max_total_bytes: largest sum of declared sizes over the stream.
        digest: hash each payload with BLAKE3 as its chunks arrive (the store's block digest).
        room: bytes to leave free before the payload of a key (0: no record buffer).
    """

    def __init__(
        self,
        *,
        max_payload_bytes: int,
        max_total_bytes: int,
        digest: bool = False,
        room: Callable[[bytes], int] | None = None,
    ) -> None:
        self._max_payload = max_payload_bytes
        self._max_total = max_total_bytes
        self._digest = digest
        self._room_of = room
        self._room = 0
        self._record: mmap.mmap | None = None
        self._total = 0
        self._received = 0
        self._key: bytes | None = None
        self._parts: list[bytes | bytearray | memoryview] = []
        self._filled = 0
        self._hasher: blake3.blake3 | None = None
        self._size = 0

    @property
    def total_bytes(self) -> int:
        """Payload bytes declared so far (complete and in-progress payloads)."""
        return self._total

    @property
    def received_bytes(self) -> int:
        """Payload bytes taken so far (chunk data, framing excluded)."""
        return self._received

    def add(self, chunk: pb.BlockChunk | WireChunk) -> Assembled | None:
        """Take one chunk; return the payload when it completes one, else None."""
        data = chunk.data  # every read of a bytes field copies it: read it once
        self._received += len(data)
        if self._key is None:
            return self._start(chunk, data)
        if chunk.key != self._key:
            raise InvalidArgument(
                f"chunk for block {chunk.key.hex()} arrived before block {self._key.hex()} was complete"
            )
        filled = self._filled
        if chunk.total_bytes != self._size or chunk.offset != filled:
            raise InvalidArgument(
                f"block {self._key.hex()}: chunk at offset {chunk.offset} (size {chunk.total_bytes}) "
                f"does not continue at offset {filled} of {self._size} bytes"
            )
        return self._append(data)

    def finish(self) -> None:
        """Raise if a payload was left incomplete when the stream ended."""
        if self._key is not None:
            raise InvalidArgument(
                f"stream ended inside block {self._key.hex()}: {self._filled} of {self._size} bytes"
            )

    def _start(self, chunk: pb.BlockChunk | WireChunk, data: bytes | memoryview) -> Assembled | None:
        key = chunk.key
        if len(key) != KEY_BYTES:
            raise InvalidArgument(f"block key must be {KEY_BYTES} bytes, got {len(key)}")
        if chunk.offset != 0:
            raise InvalidArgument(f"block {key.hex()}: first chunk starts at offset {chunk.offset}, not 0")
        size = chunk.total_bytes
        if size > self._max_payload:
            raise ResourceExhausted(
                f"block {key.hex()} is {size} bytes, over the limit of {self._max_payload}",
                hint="raise --max-snapshot-bytes (DELTASTORE_MAX_SNAPSHOT_BYTES) or use a stronger codec",
            )
        if self._total + size > self._max_total:
            raise ResourceExhausted(
                f"snapshot payloads exceed the limit of {self._max_total} bytes",
                hint="raise --max-snapshot-bytes (DELTASTORE_MAX_SNAPSHOT_BYTES) or use a stronger codec",
            )
        self._total += size
        room = self._room_of(key) if self._room_of is not None else 0
        if len(data) == size and not room:  # a whole payload in one message: no copy
            return Assembled(key, data, blake3.blake3(data).digest() if self._digest else None)
        self._key = key
        self._parts, self._filled = [], 0
        self._room, self._record = room, (mmap.mmap(-1, room + size) if room else None)
        self._hasher = blake3.blake3() if self._digest else None
        self._size = size
        return self._append(data)

    def _append(self, data: bytes | memoryview) -> Assembled | None:
        if self._key is None:
            raise InvalidArgument("chunk arrived with no block in progress")
        if self._filled + len(data) > self._size:
            raise InvalidArgument(f"block {self._key.hex()}: chunks overrun the declared {self._size} bytes")
        if self._record is not None:
            start = self._room + self._filled
            self._record[start : start + len(data)] = data
        elif len(data) >= _MIN_PART:
            self._parts.append(data)
        elif self._parts and isinstance(self._parts[-1], bytearray):
            self._parts[-1] += data
        else:  # small chunks are gathered in one buffer: no per-chunk object overhead to exploit
            self._parts.append(bytearray(data))
        self._filled += len(data)
        if self._hasher is not None:
            self._hasher.update(data)
        if self._filled < self._size:
            return None
        digest = None if self._hasher is None else self._hasher.digest()
        record = self._record
        if record is None:
            done = Assembled(self._key, b"".join(self._parts), digest)
        else:
            done = Assembled(self._key, memoryview(record)[self._room :], digest, record)
        self._key, self._parts, self._filled, self._hasher, self._record = None, [], 0, None, None
        return done
