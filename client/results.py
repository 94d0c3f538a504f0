"""What the clients hand back: typed results of every call, mapped once from the wire messages.

The sync and asyncio clients return these (never protobuf messages), so a caller's code does not
change with the transport.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from deltastore.accounting import SavingsReport
from deltastore.client.cache import KVLayers, cache_tokens
from deltastore.v1 import deltastore_pb2 as pb

if TYPE_CHECKING:
    import torch

__all__ = [
    "Deleted",
    "FetchedPrefix",
    "Plan",
    "PlanSegment",
    "PutResult",
    "RestoredSnapshot",
    "SnapshotSummary",
    "put_result",
    "savings_dict",
]


@dataclasses.dataclass(frozen=True)
class PlanSegment:
    """Tokens ``[start, end)`` as one payload named ``key``; ``present`` when the store has it."""

    start: int
    end: int
    key: bytes
    present: bool
    size_bytes: int = 0


@dataclasses.dataclass(frozen=True)
class Plan:
    segments: tuple[PlanSegment, ...]
    block_size: int
    codec: str

    @property
    def missing(self) -> tuple[PlanSegment, ...]:
        return tuple(s for s in self.segments if not s.present)

    @classmethod
    def from_proto(cls, msg: pb.PlanSnapshotResponse) -> Plan:
        return cls(tuple(_segment(s) for s in msg.segments), msg.block_size, msg.codec)


def _segment(s: pb.Segment) -> PlanSegment:
    return PlanSegment(s.start, s.end, bytes(s.key), s.present, s.size_bytes)


@dataclasses.dataclass(frozen=True)
class PutResult:
    """What a put wrote. ``sent_bytes`` is the payload bytes this client streamed."""

    snapshot_id: str
    new_bytes: int
    reused_temporal_bytes: int
    reused_shared_bytes: int
    new_segments: int
    reused_segments: int
    logical_bytes: int
    sent_bytes: int
    encoded_segments: int


@dataclasses.dataclass(frozen=True)
class Deleted:
    """What a DeleteSnapshot or DeleteSession freed (``deleted_snapshots``: 1 for DeleteSnapshot)."""

    deleted_snapshots: int
    freed_segments: int
    freed_bytes: int

    @classmethod
    def from_proto(cls, msg: pb.DeleteSnapshotResponse | pb.DeleteSessionResponse) -> Deleted:
        deleted = msg.deleted_snapshots if isinstance(msg, pb.DeleteSessionResponse) else 1
        return cls(deleted, msg.freed_segments, msg.freed_bytes)


@dataclasses.dataclass(frozen=True)
class SnapshotSummary:
    snapshot_id: str
    session: str
    turn: int
    model: str
    codec: str
    n_tokens: int
    logical_bytes: int
    created_at: float
    parent_turn: int | None

    @classmethod
    def from_proto(cls, s: pb.SnapshotSummary) -> SnapshotSummary:
        return cls(
            s.snapshot_id,
            s.session,
            s.turn,
            s.model,
            s.codec,
            s.n_tokens,
            s.logical_bytes,
            s.created_at,
            s.parent_turn if s.HasField("parent_turn") else None,
        )


@dataclasses.dataclass
class RestoredSnapshot:
    """A snapshot read back and decoded.

    Attributes:
        token_ids: every token of the sequence (``n_tokens`` of them).
        n_tokens: tokens of the original sequence: the position to continue generation at.
        layers: per layer ``(K, V)``, ``(kv_heads, kept, head_dim)``; ``kept < n_tokens`` only
            with an evicting codec (evicted tokens are absent).
        positions: per layer ``(kv_heads, kept)`` int64 absolute positions of the kept tokens.
        cache: an HF ``DynamicCache`` of ``layers`` (None when not requested).
        payload_bytes: encoded bytes received.
    """

    snapshot_id: str
    session: str
    turn: int
    model: str
    codec: str
    token_ids: list[int]
    n_tokens: int
    layers: KVLayers
    positions: list[torch.Tensor]
    cache: Any
    payload_bytes: int
    logical_bytes: int

    @property
    def kept_tokens(self) -> int:
        """Tokens the cache holds (its sequence length)."""
        return cache_tokens(self.layers)


class FetchedPrefix:
    """A stored prefix as read, checked but not decoded, for callers that decode in their own way.

    The vLLM connector decodes it layer by layer into its paged cache; ``get_prefix`` decodes it
    whole. Use it as a context manager: ``payloads`` are only valid inside (payloads read from
    shared memory are views of a mapping, unmapped when the context exits).

    Attributes:
        info: the prefix's manifest (no snapshot id or session; ``token_ids`` are the matched
            tokens, ``segments`` their segments).
        payloads: one encoded block per segment, in token order, already past
            ``check_payloads`` (digest, codec, coverage, decode bounds).
        n_tokens: leading tokens the prefix covers.
        payload_bytes: encoded bytes read.
    """

    def __init__(
        self,
        info: pb.SnapshotInfo,
        payloads: Sequence[bytes | bytearray | memoryview],
        close: Callable[[], object] | None = None,
    ) -> None:
        self.info = info
        self.payloads = payloads
        self.n_tokens = len(info.token_ids)
        self.payload_bytes = sum(len(p) for p in payloads)
        self._close = close

    def close(self) -> None:
        """Release the payloads (unmap shared memory); idempotent."""
        close, self._close = self._close, None
        if close is not None:
            close()

    def __enter__(self) -> FetchedPrefix:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()


def put_result(msg: pb.PutSnapshotResponse, payloads: Mapping[bytes, bytes]) -> PutResult:
    return PutResult(
        msg.snapshot_id,
        msg.new_bytes,
        msg.reused_temporal_bytes,
        msg.reused_shared_bytes,
        msg.new_segments,
        msg.reused_segments,
        msg.logical_bytes,
        sum(len(p) for p in payloads.values()),
        len(payloads),
    )


def savings_dict(msg: pb.GetSavingsResponse) -> SavingsReport:
    """The GetSavings answer in the shape of the HTTP ``/v1/savings`` JSON."""

    def one(s: pb.Savings) -> SavingsReport:
        return {
            "logical_bytes": s.logical_bytes,
            "stored_bytes": s.stored_bytes,
            "ratio": s.ratio,
            "layers": {"codec": s.codec, "prefix_dedup": s.prefix_dedup, "temporal_delta": s.temporal_delta},
            "snapshots": s.snapshots,
            "sessions": s.sessions,
            "blocks": s.blocks,
        }

    return {**one(msg.total), "namespaces": {ns: one(s) for ns, s in sorted(msg.namespaces.items())}}
