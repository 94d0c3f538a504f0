"""What the sync and asyncio clients share: request building, encoding, streaming framing, decoding.

Transport-free, so :mod:`deltastore.client.sync` and :mod:`deltastore.client.aio` are only the
calls themselves.
"""

from __future__ import annotations

import dataclasses
import random
import time
from collections.abc import AsyncIterable, Callable, Iterable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import grpc

from deltastore.addressing import KEY_BYTES, check_key
from deltastore.client.cache import KVLayers, as_layers, cache_tokens, slice_layers, to_dynamic_cache
from deltastore.client.models import model_fingerprint
from deltastore.client.results import FetchedPrefix, Plan, RestoredSnapshot
from deltastore.errors import ChecksumMismatch, InvalidArgument, ResourceExhausted
from deltastore.v1 import deltastore_pb2 as pb
from deltastore.v1.protocol import (
    DEFAULT_CHUNK_BYTES,
    ERROR_TYPE_KEY,
    ChunkAssembler,
    WireChunk,
    chunk_messages,
    encode_chunk_message,
    wire_deserializer,
    wire_serializer,
)

if TYPE_CHECKING:
    import torch

__all__ = [
    "DEFAULT_NAMESPACE",
    "PayloadCalls",
    "PutRound",
    "Retry",
    "checked_prefix",
    "decode_options",
    "decode_prefix",
    "decode_snapshot",
    "encode_missing",
    "fingerprint",
    "has_blocks_request",
    "plan_request",
    "prefix_request",
    "put_requests",
    "read_snapshot_stream",
    "read_snapshot_stream_async",
    "remaining",
]

DEFAULT_NAMESPACE = "default"


@dataclasses.dataclass(frozen=True)
class Retry:
    """Retries with capped exponential backoff and full jitter, for transient failures only.

    Attributes:
        attempts: total tries (1 = no retry).
        base_seconds: first backoff ceiling; doubles each try up to ``cap_seconds``.
        codes: status codes that are retried. UNAVAILABLE means the call never reached a
            working server (connection refused, server draining), so repeating it is safe.
    """

    attempts: int = 4
    base_seconds: float = 0.05
    cap_seconds: float = 2.0
    codes: frozenset[grpc.StatusCode] = frozenset({grpc.StatusCode.UNAVAILABLE})

    def __post_init__(self) -> None:
        if self.attempts < 1:
            raise InvalidArgument(f"attempts must be >= 1, got {self.attempts}")

    def delays(self) -> Iterator[float]:
        """Seconds to sleep before each retry (``attempts - 1`` values)."""
        for i in range(self.attempts - 1):
            yield random.uniform(0, min(self.cap_seconds, self.base_seconds * (2**i)))

    def retryable(self, exc: BaseException) -> bool:
        return isinstance(exc, grpc.RpcError) and exc.code() in self.codes


def remaining(deadline: float) -> float:
    """Seconds left until a ``time.monotonic()`` deadline, as a gRPC timeout.

    Never 0: gRPC reads a zero timeout as "no deadline"; a spent deadline must still expire.
    """
    return max(deadline - time.monotonic(), 1e-3)


def fingerprint(model: Any) -> str:
    """A model fingerprint string, from a string as is or from an HF model / config."""
    if isinstance(model, str):
        if not model:
            raise InvalidArgument("model fingerprint must not be empty")
        return model
    return model_fingerprint(model)


def encode_missing(
    plan: Plan,
    cache: Any,
    token_count: int,
    *,
    scores: Sequence[torch.Tensor] | None = None,
) -> dict[bytes, bytes]:
    """Encode the segments the plan reports missing, on the cache's device.

    The cache may hold fewer tokens than the snapshot when it was restored with an evicting codec:
    its last tokens are then still the sequence's last tokens, and a turn only ever encodes its
    new tokens (the parent's segments are reused), so those are what is sliced. Every segment is
    sealed knowing the sequence ends at ``token_count``: keep<P> codecs keep its last r<N> tokens.

    Args:
        plan: from PlanSnapshot for these tokens.
        cache: ``DynamicCache`` or ``[(K, V), ...]`` whose last tokens are the snapshot's last ones.
        token_count: tokens of the snapshot.
        scores: optional per layer ``(kv_heads, tokens)`` importance for evicting codecs, aligned
            with the cache's tokens.

    Returns:
        payload by segment key.
    """
    from deltastore.codecs import CodecSpec, encode_block

    layers = as_layers(cache)
    held = cache_tokens(layers)
    shift = token_count - held  # tokens evicted from the cache's (already stored) past
    first = min((seg.start for seg in plan.missing), default=token_count)
    if shift < 0 or first < shift:
        raise InvalidArgument(
            f"the cache holds {held} tokens but the snapshot has {token_count} token ids and must "
            f"encode tokens from position {first}",
            hint="store the cache the model computed for these tokens; a cache restored with an evicting "
            "codec can only store new turns on top of its own snapshot (pass parent_turn)",
        )
    if scores is not None and len(scores) != len(layers):
        raise InvalidArgument(f"scores has {len(scores)} layers, the cache has {len(layers)}")
    spec = CodecSpec.parse(plan.codec)
    payloads: dict[bytes, bytes] = {}
    for seg in plan.missing:
        lo, hi = seg.start - shift, seg.end - shift
        seg_scores = [s[..., lo:hi] for s in scores] if scores is not None else None
        payloads[seg.key] = encode_block(
            slice_layers(layers, lo, hi), spec, start=seg.start, scores=seg_scores, seq_end=token_count
        )
    return payloads


class PutRound:
    """One put_snapshot's requests and the segments it has encoded so far, shared by both clients.

    A put plans, encodes the missing segments and streams them; if a segment planned as present
    is deleted before the put lands, it plans again and encodes only what it has not encoded yet.
    """

    def __init__(
        self,
        namespace: str,
        session: str,
        turn: int,
        token_ids: Sequence[int],
        *,
        model: Any,
        codec: str,
        parent_turn: int | None,
    ) -> None:
        self.tokens = list(token_ids)
        self.header = pb.SnapshotHeader(
            namespace=namespace,
            session=session,
            turn=turn,
            model=fingerprint(model),
            token_ids=self.tokens,
            parent_turn=parent_turn,
        )
        self.plan_request = plan_request(
            namespace, session, self.tokens, model=self.header.model, codec=codec, parent_turn=parent_turn
        )
        self.encoded: dict[bytes, bytes] = {}

    def payloads(
        self, plan_msg: pb.PlanSnapshotResponse, cache: Any, scores: Sequence[torch.Tensor] | None
    ) -> dict[bytes, bytes]:
        """The missing segments' payloads by key, encoding those not encoded in an earlier round."""
        plan = Plan.from_proto(plan_msg)
        self.header.codec = plan.codec
        todo = Plan(tuple(s for s in plan.missing if s.key not in self.encoded), plan.block_size, plan.codec)
        self.encoded.update(encode_missing(todo, cache, len(self.tokens), scores=scores))
        return {s.key: self.encoded[s.key] for s in plan.missing}


def plan_request(
    namespace: str,
    session: str,
    token_ids: Sequence[int],
    *,
    model: Any,
    codec: str,
    parent_turn: int | None,
) -> pb.PlanSnapshotRequest:
    """The PlanSnapshot request of a prospective snapshot."""
    return pb.PlanSnapshotRequest(
        namespace=namespace,
        session=session,
        model=fingerprint(model),
        codec=codec,
        token_ids=token_ids,
        parent_turn=parent_turn,
    )


def has_blocks_request(namespace: str, keys: Sequence[bytes]) -> pb.HasBlocksRequest:
    """The HasBlocks request; each key is 32 raw bytes (a hex ``str`` is refused, not parsed)."""
    return pb.HasBlocksRequest(namespace=namespace, keys=[check_key(k) for k in keys])


def prefix_request(
    namespace: str,
    token_ids: Sequence[int],
    *,
    model: Any,
    codec: str,
    max_tokens: int | None,
    start: int = 0,
) -> pb.GetPrefixRequest:
    """The GetPrefix / GetPrefixShm request (``max_tokens`` None: no limit; ``start``: send only
    the segments ending after that token)."""
    return pb.GetPrefixRequest(
        namespace=namespace,
        model=fingerprint(model),
        codec=codec,
        token_ids=token_ids,
        max_tokens=max_tokens or 0,
        start_token=start,
    )


def put_requests(
    header: pb.SnapshotHeader,
    payloads: Mapping[bytes, bytes],
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    *,
    serialized: bool = False,
) -> Iterator[pb.PutSnapshotRequest | bytes]:
    """The PutSnapshot stream: the header, then every payload cut into chunks.

    ``serialized``: chunks come as ready wire bytes (one copy of the payload instead of protobuf's
    three), for a call made by :class:`PayloadCalls`; otherwise all are protobuf messages.
    """
    yield pb.PutSnapshotRequest(header=header)
    for key, payload in payloads.items():
        if serialized:
            yield from encode_chunk_message(key, payload, chunk_bytes)
        else:
            yield from chunk_messages(pb.PutSnapshotRequest, key, payload, chunk_bytes)


class PayloadCalls:
    """PutSnapshot, GetSnapshot and GetPrefix on a channel, with chunk messages (de)serialized by hand.

    The wire format is protobuf's; what changes is that outgoing chunks are serialized once and
    incoming ones are read as views of the received message (see :mod:`deltastore.v1.protocol`).
    Works on ``grpc`` and ``grpc.aio`` channels alike.
    """

    def __init__(self, channel: Any) -> None:
        service = pb.DESCRIPTOR.services_by_name["DeltaStore"].full_name
        self.put = channel.stream_unary(
            f"/{service}/PutSnapshot",
            request_serializer=wire_serializer,
            response_deserializer=pb.PutSnapshotResponse.FromString,
        )
        self.get = channel.unary_stream(
            f"/{service}/GetSnapshot",
            request_serializer=pb.GetSnapshotRequest.SerializeToString,
            response_deserializer=wire_deserializer(pb.GetSnapshotResponse.FromString),
        )
        self.get_prefix = channel.unary_stream(
            f"/{service}/GetPrefix",
            request_serializer=pb.GetPrefixRequest.SerializeToString,
            response_deserializer=wire_deserializer(pb.GetSnapshotResponse.FromString),
        )


class SnapshotReader:
    """Consumes a GetSnapshot stream message by message: the info, then every payload."""

    def __init__(self, max_bytes: int) -> None:
        self.info: pb.SnapshotInfo | None = None
        self.payloads: dict[bytes, bytes | bytearray | memoryview] = {}
        self._max = max_bytes
        self._assembler: ChunkAssembler | None = None

    def feed(self, msg: pb.GetSnapshotResponse | WireChunk) -> None:
        if not isinstance(msg, WireChunk) and msg.WhichOneof("part") == "info":
            if self.info is not None:
                raise InvalidArgument("GetSnapshot stream carried two info messages")
            self.info = msg.info
            self._assembler = ChunkAssembler(max_payload_bytes=self._max, max_total_bytes=self._max)
            return
        if self._assembler is None:
            raise InvalidArgument("GetSnapshot stream sent a chunk before the snapshot info")
        done = self._assembler.add(msg if isinstance(msg, WireChunk) else msg.chunk)
        if done is not None:
            self.payloads[done.key] = done.data

    def finish(self) -> tuple[pb.SnapshotInfo, list[bytes | bytearray | memoryview]]:
        """The info and the payloads in segment order."""
        if self.info is None or self._assembler is None:
            raise InvalidArgument("GetSnapshot stream ended without the snapshot info")
        self._assembler.finish()
        missing = [s.key.hex() for s in self.info.segments if bytes(s.key) not in self.payloads]
        if missing:
            raise InvalidArgument(f"GetSnapshot stream lacked {len(missing)} segment(s): {missing[:2]}")
        return self.info, [self.payloads[bytes(s.key)] for s in self.info.segments]


def read_snapshot_stream(
    messages: Iterable[pb.GetSnapshotResponse | WireChunk], max_bytes: int
) -> tuple[pb.SnapshotInfo, list[bytes | bytearray | memoryview]]:
    """Collect a whole GetSnapshot stream."""
    reader = SnapshotReader(max_bytes)
    for msg in messages:
        reader.feed(msg)
    return reader.finish()


async def read_snapshot_stream_async(
    messages: AsyncIterable[pb.GetSnapshotResponse | WireChunk], max_bytes: int
) -> tuple[pb.SnapshotInfo, list[bytes | bytearray | memoryview]]:
    """Collect a whole GetSnapshot stream of a ``grpc.aio`` call."""
    reader = SnapshotReader(max_bytes)
    async for msg in messages:
        reader.feed(msg)
    return reader.finish()


DEFAULT_MAX_DECODED_BYTES = 1 << 36
"""Most bytes a client decodes one snapshot into (sections and tensors), unless told otherwise."""


def check_payloads(
    info: pb.SnapshotInfo | None,
    payloads: Sequence[bytes | bytearray | memoryview],
    *,
    max_decoded_bytes: int = DEFAULT_MAX_DECODED_BYTES,
    dtype: Any = None,
    start: int = 0,
) -> int:
    """Check what the server sent before decoding any of it; returns the bytes decoding takes.

    With ``info``: each payload has its segment's size and BLAKE3 digest (end-to-end: corruption
    on the server, on the wire or in a shared-memory file is ChecksumMismatch, never tensors; a
    segment without a 32-byte digest is ChecksumMismatch too, so nothing goes unchecked), is
    encoded with the snapshot's codec and covers exactly its segment's tokens, and the segments
    cover the snapshot's tokens from 0 (``start``: from a segment holding token ``start``, for a
    prefix fetched from there) without a gap. Always: no zstd section declares more than
    ``MAX_EXPANSION`` x its size, and the whole decode fits ``max_decoded_bytes``
    (ResourceExhausted).
    """
    import blake3

    from deltastore.codecs import read_header
    from deltastore.codecs.bounds import check_expansion

    segments = list(info.segments) if info is not None else [None] * len(payloads)
    if len(segments) != len(payloads):
        raise InvalidArgument(f"{len(payloads)} payloads for {len(segments)} segments")
    total = pos = 0
    if start and info is not None and info.segments and info.segments[0].start <= start:
        pos = info.segments[0].start
    for seg, payload in zip(segments, payloads, strict=True):
        if seg is not None:
            name = bytes(seg.key).hex()
            if len(payload) != seg.size_bytes:
                raise ChecksumMismatch(name, f"{seg.size_bytes} payload bytes", f"{len(payload)}")
            if len(seg.digest) != KEY_BYTES:  # no digest, no end-to-end check: refused, not skipped
                raise ChecksumMismatch(
                    name,
                    f"a {KEY_BYTES}-byte BLAKE3 digest in the segment's info",
                    f"{len(seg.digest)} bytes",
                )
            threads = blake3.blake3.AUTO if len(payload) > 1 << 20 else 1
            got = blake3.blake3(payload, max_threads=threads).digest()
            if got != seg.digest:
                raise ChecksumMismatch(name, bytes(seg.digest).hex(), got.hex())
        hdr = read_header(payload)
        if seg is not None and info is not None:
            if info.codec and hdr.spec.canonical() != info.codec:
                raise ChecksumMismatch(name, f"a {info.codec} block", f"a {hdr.spec.canonical()} block")
            if (hdr.start, hdr.start + hdr.n_tokens) != (seg.start, seg.end) or seg.start != pos:
                raise ChecksumMismatch(
                    name,
                    f"tokens [{pos}, {seg.end})",
                    f"a segment [{seg.start}, {seg.end}) holding [{hdr.start}, {hdr.start + hdr.n_tokens})",
                )
            pos = seg.end
        itemsize = getattr(dtype, "itemsize", None) or (4 if hdr.dtype == "float32" else 2)
        total += check_expansion(hdr) + hdr.fp16_nbytes // 2 * itemsize
        if total > max_decoded_bytes:
            raise ResourceExhausted(
                f"decoding this snapshot takes more than {max_decoded_bytes} bytes",
                hint="raise max_decoded_bytes if the snapshot is genuinely this large",
            )
    if info is not None and pos != len(info.token_ids):
        raise ChecksumMismatch(
            info.snapshot_id or "prefix", f"{len(info.token_ids)} tokens", f"segments to {pos}"
        )
    return total


def decode_options(
    model: Any,
    *,
    device: torch.device | str | None,
    dtype: torch.dtype | None,
    as_cache: bool,
    max_decoded_bytes: int,
) -> dict[str, Any]:
    """The keyword arguments of :func:`decode_snapshot` (and ``decode_mapped``) for a get of both
    clients: the HF config for ``as_cache`` comes from ``model`` (a fingerprint string has none)."""
    config = None if isinstance(model, str) else getattr(model, "config", model)
    return {
        "device": device,
        "dtype": dtype,
        "as_cache": as_cache,
        "config": config,
        "max_decoded_bytes": max_decoded_bytes,
    }


def decode_snapshot(
    info: pb.SnapshotInfo,
    payloads: Sequence[bytes | bytearray | memoryview],
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    as_cache: bool = True,
    config: Any = None,
    max_decoded_bytes: int = DEFAULT_MAX_DECODED_BYTES,
) -> RestoredSnapshot:
    """Decode every segment on ``device`` and join them along the token axis.

    Nothing is decoded before :func:`check_payloads` passed: digests, codec and coverage against
    ``info``, and bounds, so a forged payload cannot make the client allocate what it declares.
    """
    check_payloads(info, payloads, max_decoded_bytes=max_decoded_bytes, dtype=dtype)
    return _decode_checked(info, payloads, device=device, dtype=dtype, as_cache=as_cache, config=config)


def _decode_checked(
    info: pb.SnapshotInfo,
    payloads: Sequence[bytes | bytearray | memoryview],
    *,
    device: torch.device | str | None,
    dtype: torch.dtype | None,
    as_cache: bool,
    config: Any,
) -> RestoredSnapshot:
    """:func:`decode_snapshot` of payloads that passed :func:`check_payloads` already."""
    import torch

    from deltastore.codecs import decode_blocks

    blocks = decode_blocks(payloads, device=device, dtype=dtype)
    if not blocks:
        raise InvalidArgument(f"snapshot {info.snapshot_id} has no segments")
    n_layers = len(blocks[0].layers)
    layers: KVLayers = []
    positions: list[torch.Tensor] = []
    for i in range(n_layers):
        ks = [b.layers[i][0] for b in blocks]
        vs = [b.layers[i][1] for b in blocks]
        layers.append((torch.cat(ks, dim=1), torch.cat(vs, dim=1)))
        positions.append(torch.cat([b.positions[i] for b in blocks], dim=1))
    return RestoredSnapshot(
        snapshot_id=info.snapshot_id,
        session=info.session,
        turn=info.turn,
        model=info.model,
        codec=info.codec,
        token_ids=list(info.token_ids),
        n_tokens=len(info.token_ids),
        layers=layers,
        positions=positions,
        cache=to_dynamic_cache(layers, config) if as_cache else None,
        payload_bytes=sum(len(p) for p in payloads),
        logical_bytes=info.logical_bytes,
    )


def checked_prefix(
    info: pb.SnapshotInfo,
    payloads: Sequence[bytes | bytearray | memoryview],
    *,
    max_decoded_bytes: int,
    dtype: torch.dtype | None,
    start: int = 0,
    close: Callable[[], object] | None = None,
) -> FetchedPrefix | None:
    """A GetPrefix answer as a :class:`FetchedPrefix` once :func:`check_payloads` passed; None when
    nothing matched. ``close`` releases the payloads: called here on failure or no match."""
    fetched = FetchedPrefix(info, payloads, close)
    if not info.segments:
        fetched.close()
        return None
    try:
        check_payloads(info, payloads, max_decoded_bytes=max_decoded_bytes, dtype=dtype, start=start)
    except BaseException:
        fetched.close()
        raise
    return fetched


def decode_prefix(
    fetched: FetchedPrefix | None, *, device: torch.device | str | None, dtype: torch.dtype | None
) -> RestoredSnapshot | None:
    """Decode a fetched prefix whole (``get_prefix``; no ``DynamicCache``), releasing it after."""
    if fetched is None:
        return None
    with fetched:
        return _decode_checked(
            fetched.info, fetched.payloads, device=device, dtype=dtype, as_cache=False, config=None
        )


def error_type(exc: grpc.RpcError) -> str:
    """The DeltaStore error class name a server attached to a failed call ("" if none)."""
    trailing = exc.trailing_metadata() if hasattr(exc, "trailing_metadata") else None
    for key, value in trailing or ():
        if key == ERROR_TYPE_KEY:
            return str(value)
    return ""
