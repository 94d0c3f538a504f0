"""The asyncio client (grpc.aio), for async inference servers.

Same calls and semantics as :class:`deltastore.client.sync.DeltaStoreClient`. Encoding and
decoding run in a worker thread (``asyncio.to_thread``), so tensor work never blocks the event
loop; on CUDA they mostly queue kernels anyway.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

import grpc
from grpc import aio

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
from deltastore.client.sync import MAX_REPLANS, channel_options
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
    read_snapshot_stream_async,
    remaining,
)
from deltastore.v1 import deltastore_pb2 as pb
from deltastore.v1 import deltastore_pb2_grpc as pb_grpc
from deltastore.v1.protocol import DEFAULT_CHUNK_BYTES

if TYPE_CHECKING:
    import torch

__all__ = ["AsyncDeltaStoreClient"]

T = TypeVar("T")


class AsyncDeltaStoreClient:
    """Put and get KV-cache snapshots from asyncio code. Arguments as for ``DeltaStoreClient``.

    Create it inside the running event loop and ``await client.close()`` (or use
    ``async with``).
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
        interceptors: Sequence[aio.ClientInterceptor] = (),
        shm_dir: str | None = None,
        max_decoded_bytes: int = DEFAULT_MAX_DECODED_BYTES,
    ) -> None:
        options = channel_options(max_message_bytes)
        if credentials is None:
            self._channel = aio.insecure_channel(target, options, interceptors=interceptors)
        else:
            self._channel = aio.secure_channel(target, credentials, options, interceptors=interceptors)
        self._stub = pb_grpc.DeltaStoreStub(self._channel)
        self._payload_calls = PayloadCalls(self._channel)
        self.namespace = namespace
        self.timeout = timeout
        self.retry = retry or Retry()
        self.chunk_bytes = chunk_bytes
        self.max_snapshot_bytes = max_snapshot_bytes
        self.shm_dir = shm_dir
        self.max_decoded_bytes = max_decoded_bytes

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> AsyncDeltaStoreClient:
        return self

    async def __aexit__(self, *_exc: object) -> None:
        await self.close()

    async def _call(self, fn: Callable[[float], Awaitable[T]], timeout: float | None) -> T:
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        delays = self.retry.delays()
        while True:
            try:
                return await fn(remaining(deadline))
            except grpc.RpcError as exc:
                delay = next(delays, None) if self.retry.retryable(exc) else None
                if delay is None or time.monotonic() + delay >= deadline:
                    raise
                await asyncio.sleep(delay)

    async def plan_snapshot(
        self,
        session: str,
        token_ids: Sequence[int],
        *,
        model: Any,
        codec: str = "k4v2",
        parent_turn: int | None = None,
        timeout: float | None = None,
    ) -> Plan:
        req = plan_request(
            self.namespace, session, token_ids, model=model, codec=codec, parent_turn=parent_turn
        )
        return Plan.from_proto(await self._call(lambda t: self._stub.PlanSnapshot(req, timeout=t), timeout))

    async def put_snapshot(
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
        """Encode and store only the missing segments (see ``DeltaStoreClient.put_snapshot``)."""
        put = PutRound(
            self.namespace, session, turn, token_ids, model=model, codec=codec, parent_turn=parent_turn
        )

        async def attempt(seconds: float) -> PutResult:
            end = time.monotonic() + seconds
            replans = 0
            while True:
                plan = await self._stub.PlanSnapshot(put.plan_request, timeout=remaining(end))
                payloads = await asyncio.to_thread(put.payloads, plan, cache, scores)
                try:
                    reply = await self._payload_calls.put(
                        put_requests(put.header, payloads, self.chunk_bytes, serialized=True),
                        timeout=remaining(end),
                    )
                except grpc.RpcError as exc:
                    replans += 1
                    if replans <= MAX_REPLANS and error_type(exc) == "MissingSegments":
                        continue
                    raise
                return put_result(reply, payloads)

        return await self._call(attempt, timeout)

    async def get_snapshot(
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
        """Read a snapshot back and decode it (see ``DeltaStoreClient.get_snapshot``)."""
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
            reply = await self._call(lambda t: self._stub.GetSnapshotShm(req, timeout=t), timeout)
            return await asyncio.to_thread(
                decode_mapped, self.shm_dir, reply, self.max_snapshot_bytes, **decode
            )
        info, payloads = await self._call(
            lambda t: read_snapshot_stream_async(
                self._payload_calls.get(req, timeout=t), self.max_snapshot_bytes
            ),
            timeout,
        )
        return await asyncio.to_thread(decode_snapshot, info, payloads, **decode)

    async def lookup_prefix(
        self, token_ids: Sequence[int], *, model: Any, codec: str = "k4v2", timeout: float | None = None
    ) -> int:
        req = pb.LookupPrefixRequest(
            namespace=self.namespace, model=fingerprint(model), codec=codec, token_ids=token_ids
        )
        return (await self._call(lambda t: self._stub.LookupPrefix(req, timeout=t), timeout)).matched_tokens

    async def fetch_prefix(
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
        """The stored leading blocks, checked, not decoded (see ``DeltaStoreClient.fetch_prefix``)."""
        req = prefix_request(
            self.namespace, token_ids, model=model, codec=codec, max_tokens=max_tokens, start=start
        )
        checks: dict[str, Any] = {"max_decoded_bytes": self.max_decoded_bytes, "dtype": dtype, "start": start}
        if self.shm_dir is not None:
            reply = await self._call(lambda t: self._stub.GetPrefixShm(req, timeout=t), timeout)
            return await asyncio.to_thread(
                fetch_mapped, self.shm_dir, reply, self.max_snapshot_bytes, **checks
            )
        info, payloads = await self._call(
            lambda t: read_snapshot_stream_async(
                self._payload_calls.get_prefix(req, timeout=t), self.max_snapshot_bytes
            ),
            timeout,
        )
        return await asyncio.to_thread(checked_prefix, info, payloads, **checks)

    async def get_prefix(
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
        """The stored leading blocks of ``token_ids``, decoded (see ``DeltaStoreClient.get_prefix``)."""
        fetched = await self.fetch_prefix(
            token_ids, model=model, codec=codec, max_tokens=max_tokens, dtype=dtype, timeout=timeout
        )
        return await asyncio.to_thread(decode_prefix, fetched, device=device, dtype=dtype)

    async def has_blocks(self, keys: Sequence[bytes], *, timeout: float | None = None) -> list[bool]:
        req = has_blocks_request(self.namespace, keys)
        return list((await self._call(lambda t: self._stub.HasBlocks(req, timeout=t), timeout)).present)

    async def delete_snapshot(self, session: str, turn: int, *, timeout: float | None = None) -> Deleted:
        req = pb.DeleteSnapshotRequest(namespace=self.namespace, session=session, turn=turn)
        return Deleted.from_proto(
            await self._call(lambda t: self._stub.DeleteSnapshot(req, timeout=t), timeout)
        )

    async def delete_session(self, session: str, *, timeout: float | None = None) -> Deleted:
        req = pb.DeleteSessionRequest(namespace=self.namespace, session=session)
        return Deleted.from_proto(
            await self._call(lambda t: self._stub.DeleteSession(req, timeout=t), timeout)
        )

    async def list_snapshots(
        self, session: str = "", *, timeout: float | None = None
    ) -> list[SnapshotSummary]:
        req = pb.ListSnapshotsRequest(namespace=self.namespace, session=session)
        reply = await self._call(lambda t: self._stub.ListSnapshots(req, timeout=t), timeout)
        return [SnapshotSummary.from_proto(s) for s in reply.snapshots]

    async def savings(self, namespace: str | None = None, *, timeout: float | None = None) -> SavingsReport:
        req = pb.GetSavingsRequest(namespace=namespace or "")
        return savings_dict(await self._call(lambda t: self._stub.GetSavings(req, timeout=t), timeout))
