"""The blocking client for inference workers.

One channel per client, reused by every call (create one client per process and share it across
threads; gRPC channels are thread-safe). Every call has a deadline; calls that fail with
UNAVAILABLE are retried with backoff inside that deadline. Failures surface as ``grpc.RpcError``
with the status code of ``deltastore.errors.STATUS_TABLE``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

import grpc

from deltastore.accounting import SavingsReport
from deltastore.client.results import (
    Deleted,
    FetchedPrefix,
    Plan,
    PutResult,
    RestoredSnapshot,
    SnapshotSummary,
    put_result,
    savings_dict,
)
from deltastore.client.shm import decode_mapped, fetch_mapped
from deltastore.client.wire import (
    DEFAULT_MAX_DECODED_BYTES,
    DEFAULT_NAMESPACE,
    PayloadCalls,
    PutRound,
    Retry,
    checked_prefix,
    decode_options,
    decode_prefix,
    decode_snapshot,
    error_type,
    fingerprint,
    has_blocks_request,
    plan_request,
    prefix_request,
    put_requests,
    read_snapshot_stream,
    remaining,
)
from deltastore.v1 import deltastore_pb2 as pb
from deltastore.v1 import deltastore_pb2_grpc as pb_grpc
from deltastore.v1.protocol import DEFAULT_CHUNK_BYTES

if TYPE_CHECKING:
    import torch

__all__ = ["DeltaStoreClient", "channel_options"]

T = TypeVar("T")
MAX_REPLANS = 2  # plan again when segments vanished between plan and put (concurrent deletes)


def channel_options(max_message_bytes: int) -> list[tuple[str, int]]:
    """Channel options shared by both clients: message limits, keepalive for long-lived sidecars."""
    return [
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.keepalive_time_ms", 30_000),
        ("grpc.keepalive_permit_without_calls", 1),
    ]


class DeltaStoreClient:
    """Put and get KV-cache snapshots.

    Args:
        target: ``host:port`` or ``unix:/path/to.sock``.
        namespace: tenant every call acts in.
        timeout: default deadline of a call in seconds (a put includes its plan and encode).
        retry: which failures are retried and how long to back off.
        chunk_bytes: payload bytes per streamed message.
        max_message_bytes: gRPC message limit (must be at least the server's chunk size + framing).
        max_snapshot_bytes: largest snapshot this client accepts back.
        credentials: TLS channel credentials (None: plaintext, for loopback and sidecars).
        interceptors: client interceptors (e.g. auth metadata).
        shm_dir: the server's ``--shm-dir`` as mounted here (same host): snapshots are read through
            it (GetSnapshotShm) instead of the stream. None: the stream.
        max_decoded_bytes: most bytes one snapshot may decode into (tensors and zstd sections, as
            the payloads declare them, checked before anything is decoded): ResourceExhausted
            beyond. Lower it to what this host can hold (default 64 GiB).
    """

    def __init__(
        self,
        target: str,
        *,
        namespace: str = DEFAULT_NAMESPACE,
        timeout: float = 30.0,
        retry: Retry | None = None,
        chunk_bytes: int = DEFAULT_CHUNK_BYTES,
        max_message_bytes: int = 8 << 20,
        max_snapshot_bytes: int = 1 << 32,
        credentials: grpc.ChannelCredentials | None = None,
        interceptors: Sequence[grpc.UnaryUnaryClientInterceptor] = (),
        shm_dir: str | None = None,
        max_decoded_bytes: int = DEFAULT_MAX_DECODED_BYTES,
    ) -> None:
        options = channel_options(max_message_bytes)
        if credentials is None:
            channel = grpc.insecure_channel(target, options)
        else:
            channel = grpc.secure_channel(target, credentials, options)
        self._channel = grpc.intercept_channel(channel, *interceptors) if interceptors else channel
        self._raw_channel = channel
        self._stub = pb_grpc.DeltaStoreStub(self._channel)
        self._payload_calls = PayloadCalls(self._channel)
        self.namespace = namespace
        self.timeout = timeout
        self.retry = retry or Retry()
        self.chunk_bytes = chunk_bytes
        self.max_snapshot_bytes = max_snapshot_bytes
        self.shm_dir = shm_dir
        self.max_decoded_bytes = max_decoded_bytes

    def close(self) -> None:
        self._raw_channel.close()

    def __enter__(self) -> DeltaStoreClient:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def _call(self, fn: Callable[[float], T], timeout: float | None) -> T:
        """Run ``fn(remaining_seconds)``, retrying retryable failures until the deadline."""
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        delays = self.retry.delays()
        while True:
            try:
                return fn(remaining(deadline))
            except grpc.RpcError as exc:
                delay = next(delays, None) if self.retry.retryable(exc) else None
                if delay is None or time.monotonic() + delay >= deadline:
                    raise
                time.sleep(delay)

    def plan_snapshot(
        self,
        session: str,
        token_ids: Sequence[int],
        *,
        model: Any,
        codec: str = "k4v2",
        parent_turn: int | None = None,
        timeout: float | None = None,
    ) -> Plan:
        """The segments a snapshot of these tokens consists of, and which the store has."""
        req = plan_request(
            self.namespace, session, token_ids, model=model, codec=codec, parent_turn=parent_turn
        )
        return Plan.from_proto(self._call(lambda t: self._stub.PlanSnapshot(req, timeout=t), timeout))

    def put_snapshot(
        self,
        session: str,
        turn: int,
        token_ids: Sequence[int],
        cache: Any,
        *,
        model: Any,
        codec: str = "k4v2",
        parent_turn: int | None = None,
        scores: Sequence[torch.Tensor] | None = None,
        timeout: float | None = None,
    ) -> PutResult:
        """Encode (on the cache's device) and store only the segments the store lacks.

        Args:
            session, turn: the snapshot's identity in this client's namespace.
            token_ids: every token of the sequence the cache holds.
            cache: HF ``DynamicCache`` or ``[(K, V), ...]``, each ``(kv_heads, tokens, head_dim)``
                (a leading batch dim of 1 is accepted), fp16/bf16/fp32, any device.
            model: fingerprint string, or the HF model / config to take it from.
            codec: codec spec, e.g. "k4v2", "lossless".
            parent_turn: the earlier turn of this session whose tokens are a prefix of these.
            scores: optional per layer ``(kv_heads, tokens)`` importance for evicting codecs.
        """
        put = PutRound(
            self.namespace, session, turn, token_ids, model=model, codec=codec, parent_turn=parent_turn
        )

        def attempt(seconds: float) -> PutResult:
            end = time.monotonic() + seconds
            replans = 0
            while True:
                plan = self._stub.PlanSnapshot(put.plan_request, timeout=remaining(end))
                payloads = put.payloads(plan, cache, scores)
                try:
                    reply = self._payload_calls.put(
                        put_requests(put.header, payloads, self.chunk_bytes, serialized=True),
                        timeout=remaining(end),
                    )
                except grpc.RpcError as exc:
                    # A segment planned as present was deleted before the put landed: plan again.
                    replans += 1
                    if replans <= MAX_REPLANS and error_type(exc) == "MissingSegments":
                        continue
                    raise
                return put_result(reply, payloads)

        return self._call(attempt, timeout)

    def get_snapshot(
        self,
        session: str,
        turn: int | None = None,
        *,
        model: Any = "",
        codec: str = "",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        as_cache: bool = True,
        timeout: float | None = None,
    ) -> RestoredSnapshot:
        """Read a snapshot back and decode it on ``device`` in ``dtype``.

        Args:
            model: expected model (fingerprint, HF model or config); "" accepts the stored one.
                With an HF model or config, the cache is built with its layer types.
            turn: the turn to read; None reads the session's latest.
            codec: expected codec; "" accepts the stored one.
            as_cache: also build an HF ``DynamicCache`` (``.cache``).
        """
        req = pb.GetSnapshotRequest(
            namespace=self.namespace,
            session=session,
            turn=turn,
            model=fingerprint(model) if model != "" else "",
            codec=codec,
        )
        decode = decode_options(
            model, device=device, dtype=dtype, as_cache=as_cache, max_decoded_bytes=self.max_decoded_bytes
        )
        if self.shm_dir is not None:
            reply = self._call(lambda t: self._stub.GetSnapshotShm(req, timeout=t), timeout)
            return decode_mapped(self.shm_dir, reply, self.max_snapshot_bytes, **decode)
        info, payloads = self._call(
            lambda t: read_snapshot_stream(self._payload_calls.get(req, timeout=t), self.max_snapshot_bytes),
            timeout,
        )
        return decode_snapshot(info, payloads, **decode)

    def lookup_prefix(
        self, token_ids: Sequence[int], *, model: Any, codec: str = "k4v2", timeout: float | None = None
    ) -> int:
        """How many leading tokens of ``token_ids`` have their KV stored for this model and codec."""
        req = pb.LookupPrefixRequest(
            namespace=self.namespace, model=fingerprint(model), codec=codec, token_ids=token_ids
        )
        return self._call(lambda t: self._stub.LookupPrefix(req, timeout=t), timeout).matched_tokens

    def fetch_prefix(
        self,
        token_ids: Sequence[int],
        *,
        model: Any,
        codec: str = "k4v2",
        max_tokens: int | None = None,
        dtype: torch.dtype | None = None,
        timeout: float | None = None,
        start: int = 0,
    ) -> FetchedPrefix | None:
        """The stored leading blocks of ``token_ids``, checked but not decoded (see ``get_prefix``).

        For callers that decode in their own way (per layer, into a paged cache): the payloads
        have passed every check ``get_prefix`` makes before decoding (digests, codec, coverage,
        and the decode bound for ``dtype``: None counts the stored dtype). With ``shm_dir`` they
        are read through GetPrefixShm (views of the mapped export), else from the GetPrefix
        stream. Use the result as a context manager; its payloads are valid inside it (the
        mapping is closed when it exits). None when nothing matches. ``start``: the caller holds
        the tokens before it (e.g. in an engine's prefix cache): only segments ending after it are
        sent (the first may begin before it); ``info.token_ids`` still lists every matched token.
        """
        req = prefix_request(
            self.namespace, token_ids, model=model, codec=codec, max_tokens=max_tokens, start=start
        )
        checks: dict[str, Any] = {"max_decoded_bytes": self.max_decoded_bytes, "dtype": dtype, "start": start}
        if self.shm_dir is not None:
            reply = self._call(lambda t: self._stub.GetPrefixShm(req, timeout=t), timeout)
            return fetch_mapped(self.shm_dir, reply, self.max_snapshot_bytes, **checks)
        info, payloads = self._call(
            lambda t: read_snapshot_stream(
                self._payload_calls.get_prefix(req, timeout=t), self.max_snapshot_bytes
            ),
            timeout,
        )
        return checked_prefix(info, payloads, **checks)

    def get_prefix(
        self,
        token_ids: Sequence[int],
        *,
        model: Any,
        codec: str = "k4v2",
        max_tokens: int | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        timeout: float | None = None,
    ) -> RestoredSnapshot | None:
        """The stored leading blocks of ``token_ids`` (what ``lookup_prefix`` counts), decoded.

        No session is needed: the server computes the chain from this client's namespace, model
        and codec. ``n_tokens`` of the result is the number of leading tokens restored (at most
        ``max_tokens``); None when nothing matches. ``as_cache`` is not built (``.cache`` is None).
        """
        fetched = self.fetch_prefix(
            token_ids, model=model, codec=codec, max_tokens=max_tokens, dtype=dtype, timeout=timeout
        )
        return decode_prefix(fetched, device=device, dtype=dtype)

    def has_blocks(self, keys: Sequence[bytes], *, timeout: float | None = None) -> list[bool]:
        """Which of these 32-byte segment keys the store holds in this namespace."""
        req = has_blocks_request(self.namespace, keys)
        return list(self._call(lambda t: self._stub.HasBlocks(req, timeout=t), timeout).present)

    def delete_snapshot(self, session: str, turn: int, *, timeout: float | None = None) -> Deleted:
        req = pb.DeleteSnapshotRequest(namespace=self.namespace, session=session, turn=turn)
        return Deleted.from_proto(self._call(lambda t: self._stub.DeleteSnapshot(req, timeout=t), timeout))

    def delete_session(self, session: str, *, timeout: float | None = None) -> Deleted:
        req = pb.DeleteSessionRequest(namespace=self.namespace, session=session)
        return Deleted.from_proto(self._call(lambda t: self._stub.DeleteSession(req, timeout=t), timeout))

    def list_snapshots(self, session: str = "", *, timeout: float | None = None) -> list[SnapshotSummary]:
        req = pb.ListSnapshotsRequest(namespace=self.namespace, session=session)
        reply = self._call(lambda t: self._stub.ListSnapshots(req, timeout=t), timeout)
        return [SnapshotSummary.from_proto(s) for s in reply.snapshots]

    def savings(self, namespace: str | None = None, *, timeout: float | None = None) -> SavingsReport:
        """Savings of one namespace (default: the whole store), as ``/v1/savings`` reports them."""
        req = pb.GetSavingsRequest(namespace=namespace or "")
        return savings_dict(self._call(lambda t: self._stub.GetSavings(req, timeout=t), timeout))
