"""What the store's operations return, and what a put takes: plain immutable records.

Kept apart from the operations so that adapters (the gRPC service, shared memory, the HTTP
browser) depend on these shapes without reading how the store computes them. Segment keys are
:data:`~deltastore.addressing.Key` (32 raw bytes) throughout; hex appears only at text boundaries.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

from deltastore.addressing import Key
from deltastore.manifest import Buffer, Manifest

__all__ = [
    "DeleteResult",
    "Plan",
    "PlannedSegment",
    "PutResult",
    "SegmentPayload",
    "Snapshot",
    "SnapshotInfo",
    "SnapshotStream",
    "StoredSegment",
    "info_of",
    "snapshot_id",
]

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class PlannedSegment:
    """One segment of a plan: tokens ``[start, end)``, its key, whether it is stored.

    ``size_bytes`` is the stored payload's size in bytes (0 when missing); ``digest`` its BLAKE3
    as stored (in a snapshot's or prefix's segments; empty in a plan), for end-to-end checks.
    """

    start: int
    end: int
    key: Key
    present: bool
    size_bytes: int
    digest: bytes = b""

    @property
    def n_tokens(self) -> int:
        return self.end - self.start


@dataclass(frozen=True)
class Plan:
    """The segments of a prospective snapshot, in token order, covering ``[0, n_tokens)``."""

    namespace: str
    session: str
    model: str
    codec: str
    block_size: int
    n_tokens: int
    parent_turn: int | None
    segments: tuple[PlannedSegment, ...]

    @property
    def missing(self) -> tuple[PlannedSegment, ...]:
        """The segments the client must encode and send."""
        return tuple(s for s in self.segments if not s.present)


@dataclass(frozen=True, slots=True)
class SegmentPayload:
    """An encoded segment as the client sends it.

    Attributes:
        data: the codec's self-describing block (opaque to the store; not copied before the write).
        n_tokens: tokens it encodes (must equal the segment's end - start).
        fp16_nbytes: FP16 size of the KV it encodes, in bytes (from the codec's header).
        digest: BLAKE3 of ``data`` when the caller computed it over these very bytes (the
            server's chunk assembler does, as they arrive); None: the store hashes ``data``. A
            wrong digest is stored as given and makes every read of the block fail with
            ChecksumMismatch: never served, but lost.
        record: a writable buffer laid out as the block record, ``data`` already in place after
            ``block_payload_offset(n_tokens)`` bytes of room (``data`` is a view of it); the
            store writes header and token ids into the room and stores it without a copy.
    """

    data: bytes | bytearray | memoryview
    n_tokens: int
    fp16_nbytes: int
    digest: bytes | None = None
    record: Buffer | None = None


@dataclass(frozen=True)
class PutResult:
    """What a put wrote and what it reused.

    ``new_bytes`` counts every byte the snapshot added (payloads, manifest, index entries);
    ``new_payload_bytes`` the payloads alone. ``reused_temporal_bytes`` are payload bytes of
    segments this session already referenced (earlier turns), ``reused_shared_bytes`` payload
    bytes of segments stored by other sessions (prefix dedup). ``logical_bytes`` is the FP16
    size of the snapshot. ``existed``: an identical snapshot was already stored (an idempotent
    retry); nothing was written.
    """

    snapshot_id: str
    new_bytes: int
    new_payload_bytes: int
    reused_temporal_bytes: int
    reused_shared_bytes: int
    new_segments: int
    reused_temporal_segments: int
    reused_shared_segments: int
    logical_bytes: int
    evicted_sessions: tuple[tuple[str, str], ...] = ()
    existed: bool = False

    @property
    def reused_segments(self) -> int:
        return self.reused_temporal_segments + self.reused_shared_segments


@dataclass(frozen=True, slots=True)
class StoredSegment:
    """A segment read back: tokens ``[start, end)``, key, FP16 size, payload bytes."""

    start: int
    end: int
    key: Key
    fp16_nbytes: int
    payload: bytes

    @property
    def n_tokens(self) -> int:
        return self.end - self.start


@dataclass(frozen=True)
class SnapshotInfo:
    """A snapshot's manifest summary (no payloads). ``created_at`` is unix seconds."""

    snapshot_id: str
    namespace: str
    session: str
    turn: int
    model: str
    codec: str
    n_tokens: int
    logical_bytes: int
    parent_turn: int | None
    created_at: float


@dataclass(frozen=True)
class Snapshot:
    """A snapshot read back: its info, token ids and segment payloads in token order."""

    info: SnapshotInfo
    token_ids: list[int]
    segments: tuple[StoredSegment, ...]

    @property
    def payload_bytes(self) -> int:
        return sum(len(s.payload) for s in self.segments)


@dataclass(frozen=True)
class SnapshotStream:
    """A snapshot opened for streaming (:meth:`Store.open_snapshot`).

    ``segments`` lists every segment with its payload size (``size_bytes``); iterating reads the
    payloads, verified, in token order.
    """

    info: SnapshotInfo
    token_ids: list[int]
    segments: tuple[PlannedSegment, ...]
    _read: Callable[[PlannedSegment, Callable[[int, memoryview], Any]], Any]

    @property
    def payload_bytes(self) -> int:
        return sum(s.size_bytes for s in self.segments)

    def __iter__(self) -> Iterator[StoredSegment]:
        return self.map(
            lambda seg, fp16, payload: StoredSegment(seg.start, seg.end, seg.key, fp16, bytes(payload))
        )

    def map(self, fn: Callable[[PlannedSegment, int, memoryview], T]) -> Iterator[T]:
        """``fn(segment, fp16_nbytes, payload)`` per segment, in token order, without copying.

        ``payload`` is verified and valid only during the call (a view of the stored record);
        whatever ``fn`` keeps of it must be a copy.
        """
        for seg in self.segments:
            yield self._read(seg, functools.partial(fn, seg))


@dataclass(frozen=True)
class DeleteResult:
    """What a delete or eviction removed: snapshots, freed segments, and every byte freed."""

    deleted_snapshots: int
    freed_segments: int
    freed_bytes: int


def snapshot_id(namespace: str, session: str, turn: int) -> str:
    return f"{namespace}/{session}/{turn}"


def info_of(namespace: str, session: str, turn: int, m: Manifest) -> SnapshotInfo:
    """The summary of a stored manifest."""
    return SnapshotInfo(
        snapshot_id=snapshot_id(namespace, session, turn),
        namespace=namespace,
        session=session,
        turn=turn,
        model=m.model,
        codec=m.codec,
        n_tokens=m.n_tokens,
        logical_bytes=m.fp16_nbytes,
        parent_turn=None if m.parent_turn < 0 else m.parent_turn,
        created_at=m.created_ms / 1000.0,
    )
