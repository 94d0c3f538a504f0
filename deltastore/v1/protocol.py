"""Protocol rules both ends of the wire share (hand-written, not generated).

Framing of payload streams: the chunks of one payload are consecutive, in offset
order, each carries the payload's full size, and none is larger than the chunk limit. gRPC in
Python moves ~1.3 GB/s with ~1 MiB messages and an order of magnitude less with one huge
message, hence the default.
"""

from __future__ import annotations

from collections.abc import Iterator

from deltastore.errors import InvalidArgument, ResourceExhausted
from deltastore.v1 import deltastore_pb2 as pb

__all__ = ["DEFAULT_CHUNK_BYTES", "ERROR_TYPE_KEY", "KEY_BYTES", "ChunkAssembler", "iter_chunks"]

DEFAULT_CHUNK_BYTES = 1 << 20  # 1 MiB of payload per message
KEY_BYTES = 32  # BLAKE3 digest
ERROR_TYPE_KEY = "deltastore-error-type"
"""Trailing metadata key naming the ``deltastore.errors`` class behind a non-OK status, so a
client can tell e.g. MissingSegments (plan again) from another FAILED_PRECONDITION."""


def iter_chunks(
    key: bytes, payload: bytes, chunk_bytes: int = DEFAULT_CHUNK_BYTES
) -> Iterator[pb.BlockChunk]:
    """Yield the chunks of one payload (at least one, even for an empty payload).

    Args:
        key: the 32-byte segment key.
        payload: the encoded block.
        chunk_bytes: largest ``data`` per chunk, in bytes.
    """
    view = memoryview(payload)
    total = len(view)
    offset = 0
    while True:
        end = min(offset + chunk_bytes, total)
        yield pb.BlockChunk(key=key, offset=offset, total_bytes=total, data=bytes(view[offset:end]))
        offset = end
        if offset >= total:
            return


class ChunkAssembler:
    """Reassemble consecutive chunks into whole payloads, enforcing the framing and size limits.

    A payload's declared size is checked against the limits first, and the buffer grows with the
    bytes that actually arrive: a sender that declares a large payload and stalls or lies holds no
    more memory than it sent.
    """

    def __init__(self, *, max_payload_bytes: int, max_total_bytes: int) -> None:
        self._max_payload = max_payload_bytes
        self._max_total = max_total_bytes
        self._total = 0
        self._key: bytes | None = None
        self._buf: bytearray | None = None
        self._size = 0

    @property
    def total_bytes(self) -> int:
        """Payload bytes declared so far (complete and in-progress payloads)."""
        return self._total

    def add(self, chunk: pb.BlockChunk) -> tuple[bytes, bytes] | None:
        """Take one chunk; return ``(key, payload)`` when it completes a payload, else None."""
        if self._key is None:
            return self._start(chunk)
        if chunk.key != self._key:
            raise InvalidArgument(
                f"chunk for block {chunk.key.hex()} arrived before block {self._key.hex()} was complete"
            )
        filled = len(self._buf or b"")
        if chunk.total_bytes != self._size or chunk.offset != filled:
            raise InvalidArgument(
                f"block {self._key.hex()}: chunk at offset {chunk.offset} (size {chunk.total_bytes}) "
                f"does not continue at offset {filled} of {self._size} bytes"
            )
        return self._append(chunk.data)

    def finish(self) -> None:
        """Raise if a payload was left incomplete when the stream ended."""
        if self._key is not None:
            raise InvalidArgument(
                f"stream ended inside block {self._key.hex()}: {len(self._buf or b'')} of {self._size} bytes"
            )

    def _start(self, chunk: pb.BlockChunk) -> tuple[bytes, bytes] | None:
        if len(chunk.key) != KEY_BYTES:
            raise InvalidArgument(f"block key must be {KEY_BYTES} bytes, got {len(chunk.key)}")
        if chunk.offset != 0:
            raise InvalidArgument(
                f"block {chunk.key.hex()}: first chunk starts at offset {chunk.offset}, not 0"
            )
        size = chunk.total_bytes
        if size > self._max_payload:
            raise ResourceExhausted(
                f"block {chunk.key.hex()} is {size} bytes, over the limit of {self._max_payload}",
                hint="raise --max-snapshot-bytes (DELTASTORE_MAX_SNAPSHOT_BYTES) or use a stronger codec",
            )
        if self._total + size > self._max_total:
            raise ResourceExhausted(
                f"snapshot payloads exceed the limit of {self._max_total} bytes",
                hint="raise --max-snapshot-bytes (DELTASTORE_MAX_SNAPSHOT_BYTES) or use a stronger codec",
            )
        self._total += size
        if len(chunk.data) == size:  # the common case: a whole payload in one message, no copy
            return chunk.key, chunk.data
        self._key = chunk.key
        self._buf = bytearray()
        self._size = size
        return self._append(chunk.data)

    def _append(self, data: bytes) -> tuple[bytes, bytes] | None:
        buf = self._buf
        if buf is None or self._key is None:
            raise InvalidArgument("chunk arrived with no block in progress")
        if len(buf) + len(data) > self._size:
            raise InvalidArgument(f"block {self._key.hex()}: chunks overrun the declared {self._size} bytes")
        buf += data
        if len(buf) < self._size:
            return None
        key, self._key, self._buf = self._key, None, None
        return key, bytes(buf)
