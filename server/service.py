"""The gRPC service: convert messages, validate payload headers, delegate to the store.

Thin on purpose (like grpc's own examples): every rpc is a conversion around one store call.
What the server adds is what only a network boundary needs: size limits, chunk framing,
deadlines, validating every incoming payload's header against the segment it claims to be, error
codes, and metrics. ``create_server(store, address)`` returns ``(server, port)`` so tests bind
port 0.

Why one long module: one handler per rpc of one service, each a conversion around a store
call, sharing the validation helpers below.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent import futures
from typing import Any
from urllib.parse import unquote

import grpc
from google.protobuf import message_factory
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from deltastore.accounting import SavingsReport
from deltastore.backend import call_deadline
from deltastore.codecs import BlockHeader, CodecSpec, read_header
from deltastore.codecs.bounds import check_expansion
from deltastore.errors import (
    DeltaStoreError,
    FormatError,
    InvalidArgument,
    MismatchError,
    NotConfigured,
    ResourceExhausted,
)
from deltastore.manifest import block_payload_offset
from deltastore.server.handlers import Handler
from deltastore.server.health import HEALTH_SERVICE, HealthServicer
from deltastore.server.malformed import tolerant
from deltastore.server.metrics import Metrics
from deltastore.server.principal import Access, namespace_for, savings_namespace
from deltastore.server.readahead import read_ahead
from deltastore.server.settings import ServerSettings
from deltastore.server.shm import ShmExporter
from deltastore.server.shm_fd import MemfdExporter
from deltastore.server.status import grpc_code
from deltastore.store import PlannedSegment, SegmentPayload, SnapshotStream, Store
from deltastore.store import SnapshotInfo as StoreSnapshotInfo
from deltastore.v1 import deltastore_pb2 as pb
from deltastore.v1 import deltastore_pb2_grpc as pb_grpc
from deltastore.v1.protocol import (
    ERROR_TYPE_KEY,
    ChunkAssembler,
    WireChunk,
    encode_chunk_message,
    wire_deserializer,
    wire_serializer,
)

__all__ = ["SERVICE_NAME", "DeltaStoreService", "create_server"]

log = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["DeltaStore"].full_name


_DEADLINE_SLACK_S = 0.25
"""A request stream that breaks this close to the call's deadline broke because the deadline passed.
The server learns the deadline when the call reaches it, a little after the client started it, so
the client's expiry reaches the server while the server's own copy still shows some time left;
gRPC gives the server no code for the break."""


class _DeadlineExceeded(Exception):
    """The caller's deadline passed before the work could be committed."""


class _InflightBudget:
    """Bytes of PutSnapshot payloads held in memory per namespace, bounded (``max_inflight_bytes``)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._lock = threading.Lock()
        self._by_namespace: dict[str, int] = {}

    def hold(self, namespace: str) -> _Held:
        return _Held(self, namespace)


class _Held:
    """One put's share of its namespace's in-flight budget; released once when the call ends."""

    def __init__(self, budget: _InflightBudget, namespace: str) -> None:
        self._budget = budget
        self._namespace = namespace
        self._held = 0

    def update(self, total: int) -> None:
        more = total - self._held
        if more <= 0:
            return
        b = self._budget
        with b._lock:
            now = b._by_namespace.get(self._namespace, 0) + more
            if now > b.limit:
                raise ResourceExhausted(
                    f"namespace {self._namespace!r} has {now - more} bytes of puts in flight; "
                    f"{more} more would pass --max-inflight-bytes {b.limit}",
                    hint="retry when the namespace's other puts have finished",
                )
            b._by_namespace[self._namespace] = now
        self._held = total

    def release(self) -> None:
        b = self._budget
        with b._lock:
            left = b._by_namespace.get(self._namespace, 0) - self._held
            if left > 0:
                b._by_namespace[self._namespace] = left
            else:
                b._by_namespace.pop(self._namespace, None)
            self._held = 0


class _Call:
    """Per-call bookkeeping: the final status code, for metrics."""

    def __init__(self) -> None:
        self.code = "OK"


class DeltaStoreService(pb_grpc.DeltaStoreServicer):
    """``deltastore.v1.DeltaStore`` over one :class:`deltastore.store.Store`."""

    def __init__(self, store: Store, settings: ServerSettings, metrics: Metrics) -> None:
        self._store = store
        self._settings = settings
        self._metrics = metrics
        self._auth_on = bool(settings.auth_file)  # then every call must carry a principal
        self._shm: ShmExporter | MemfdExporter | None = None
        if settings.shm_dir:
            exporter = MemfdExporter if settings.shm_mode == "memfd" else ShmExporter
            self._shm = exporter(settings.shm_dir, settings.shm_max_bytes)
        self._inflight = _InflightBudget(settings.max_inflight_bytes)

    # -- plumbing ------------------------------------------------------------------------------

    @contextlib.contextmanager
    def _rpc(self, method: str, context: grpc.ServicerContext) -> Iterator[_Call]:
        """Map errors to status codes (with the error class in trailing metadata) and record metrics."""
        call = _Call()
        started = time.perf_counter()
        try:
            _check_deadline(context)
            with call_deadline(context.time_remaining()):  # bounds the backend's retries too
                yield call
        except GeneratorExit:  # the client went away mid-stream
            call.code = "CANCELLED"
            raise
        except DeltaStoreError as exc:
            code = grpc_code(exc)
            call.code = code.name
            context.set_trailing_metadata(((ERROR_TYPE_KEY, type(exc).__name__),))
            context.abort(code, str(exc))
        except _DeadlineExceeded as exc:
            call.code = "DEADLINE_EXCEEDED"
            context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, str(exc))
        except grpc.RpcError:  # reading the request stream failed: the caller cancelled or timed out
            remaining = context.time_remaining()
            code = (
                grpc.StatusCode.DEADLINE_EXCEEDED
                if remaining is not None and remaining <= _DEADLINE_SLACK_S
                else grpc.StatusCode.CANCELLED
            )
            call.code = code.name
            context.abort(code, f"{method}: the request stream ended early; nothing was stored")
        except Exception:
            call.code = "INTERNAL"
            log.exception("%s failed", method)
            context.abort(grpc.StatusCode.INTERNAL, f"{method}: internal error (see the server log)")
        finally:
            self._metrics.observe(method, call.code, time.perf_counter() - started)

    def _codec(self, text: str) -> str:
        """Canonical codec spec of a request (INVALID_ARGUMENT if it does not parse)."""
        if not text:
            raise InvalidArgument("codec is required (e.g. 'k4v2', 'lossless')")
        return CodecSpec.parse(text).canonical()

    def _tokens(self, token_ids: Sequence[int]) -> list[int]:
        if len(token_ids) > self._settings.max_tokens:
            raise ResourceExhausted(
                f"{len(token_ids)} tokens exceed the limit of {self._settings.max_tokens}",
                hint="raise --max-tokens (DELTASTORE_MAX_TOKENS)",
            )
        return list(token_ids)

    # -- rpcs ----------------------------------------------------------------------------------

    def PlanSnapshot(
        self, request: pb.PlanSnapshotRequest, context: grpc.ServicerContext
    ) -> pb.PlanSnapshotResponse:
        with self._rpc("PlanSnapshot", context):
            namespace = namespace_for(request.namespace, Access.READ, auth_on=self._auth_on)
            codec = self._codec(request.codec)
            plan = self._store.plan_snapshot(
                namespace,
                request.session,
                model=_required("model", request.model),
                codec=codec,
                token_ids=self._tokens(request.token_ids),
                parent_turn=request.parent_turn if request.HasField("parent_turn") else None,
            )
            return pb.PlanSnapshotResponse(
                segments=[_segment(s) for s in plan.segments], block_size=plan.block_size, codec=codec
            )

    def PutSnapshot(
        self, request_iterator: Iterator[pb.PutSnapshotRequest | WireChunk], context: grpc.ServicerContext
    ) -> pb.PutSnapshotResponse:
        with self._rpc("PutSnapshot", context):
            first = next(request_iterator, None)
            if first is None or isinstance(first, WireChunk) or first.WhichOneof("part") != "header":
                raise InvalidArgument("PutSnapshot must start with a header message")
            hdr = first.header
            namespace = namespace_for(hdr.namespace, Access.WRITE, auth_on=self._auth_on)
            codec = self._codec(hdr.codec)
            model = _required("model", hdr.model)
            tokens = self._tokens(hdr.token_ids)
            parent = hdr.parent_turn if hdr.HasField("parent_turn") else None
            held = self._inflight.hold(namespace)  # bytes this put keeps in memory, per namespace
            context.add_callback(held.release)  # when the call ends, however it ends
            plan = self._store.plan_snapshot(
                namespace, hdr.session, model=model, codec=codec, token_ids=tokens, parent_turn=parent
            )
            segments: dict[bytes, PlannedSegment] = {s.key: s for s in plan.segments}
            limit = self._settings.max_snapshot_bytes
            # The assembler hashes each payload as its chunks arrive and writes it straight into
            # its block record: the store keeps both as they are.
            assembler = ChunkAssembler(
                max_payload_bytes=limit,
                max_total_bytes=limit,
                digest=True,
                room=lambda key: block_payload_offset(segments[key].n_tokens) if key in segments else 0,
            )
            payloads: dict[bytes, SegmentPayload] = {}
            shape: tuple[int, int, int] | None = None
            try:
                for msg in request_iterator:
                    _check_deadline(context)
                    if isinstance(msg, WireChunk):
                        done = assembler.add(msg)
                    elif msg.WhichOneof("part") == "chunk":
                        done = assembler.add(msg.chunk)
                    else:
                        raise InvalidArgument("PutSnapshot carries one header, then only chunks")
                    held.update(assembler.received_bytes)
                    if done is None:
                        continue
                    key = done.key
                    if key in payloads:
                        raise InvalidArgument(f"segment {key.hex()} was sent twice")
                    header = _check_payload(key, done.data, segments, codec)
                    dims = (header.n_layers, header.kv_heads, header.head_dim)
                    if shape is not None and dims != shape:
                        raise InvalidArgument(
                            f"segment {key.hex()} has (layers, kv_heads, head_dim) {dims}, other segments {shape}"
                        )
                    shape = dims
                    # The snapshot's logical bytes (segments agree on bytes per token, the store
                    # checks reused ones too) are bounded before anything is stored or counted.
                    logical = header.fp16_nbytes // header.n_tokens * len(tokens)
                    if logical > self._settings.max_logical_bytes:
                        raise ResourceExhausted(
                            f"segment {key.hex()} implies {logical} FP16 bytes for the snapshot's "
                            f"{len(tokens)} tokens, over --max-logical-bytes {self._settings.max_logical_bytes}"
                        )
                    payloads[key] = SegmentPayload(
                        done.data, header.n_tokens, header.fp16_nbytes, done.digest, done.record
                    )
            finally:
                self._metrics.bytes_received.labels("PutSnapshot").inc(assembler.received_bytes)
            assembler.finish()
            # Never commit work the caller has given up on: it would be acknowledged to no one.
            _check_deadline(context)
            result = self._store.put_snapshot(
                namespace,
                hdr.session,
                hdr.turn,
                model=model,
                codec=codec,
                token_ids=tokens,
                payloads=payloads,
                parent_turn=parent,
            )
            return pb.PutSnapshotResponse(
                snapshot_id=result.snapshot_id,
                new_bytes=result.new_bytes,
                reused_temporal_bytes=result.reused_temporal_bytes,
                reused_shared_bytes=result.reused_shared_bytes,
                new_segments=result.new_segments,
                reused_segments=result.reused_segments,
                logical_bytes=result.logical_bytes,
            )

    def _open_snapshot(self, request: pb.GetSnapshotRequest, namespace: str) -> SnapshotStream:
        return self._store.open_snapshot(
            namespace,
            request.session,
            request.turn if request.HasField("turn") else None,
            model=request.model or None,
            codec=self._codec(request.codec) if request.codec else None,
        )

    def GetSnapshot(
        self, request: pb.GetSnapshotRequest, context: grpc.ServicerContext
    ) -> Iterator[pb.GetSnapshotResponse | bytes]:
        """The info, then every payload as pre-serialized chunk messages (see ``_add_service``)."""
        with self._rpc("GetSnapshot", context):
            namespace = namespace_for(request.namespace, Access.READ, auth_on=self._auth_on)
            yield from self._stream_snapshot("GetSnapshot", self._open_snapshot(request, namespace), context)

    def GetPrefix(
        self, request: pb.GetPrefixRequest, context: grpc.ServicerContext
    ) -> Iterator[pb.GetSnapshotResponse | bytes]:
        """The stored leading segments of the caller's tokens in its own domain, as GetSnapshot streams."""
        with self._rpc("GetPrefix", context):
            namespace = namespace_for(request.namespace, Access.READ, auth_on=self._auth_on)
            yield from self._stream_snapshot("GetPrefix", self._open_prefix(request, namespace), context)

    def _open_prefix(self, request: pb.GetPrefixRequest, namespace: str) -> SnapshotStream:
        return self._store.get_prefix(
            namespace,
            model=_required("model", request.model),
            codec=self._codec(request.codec),
            token_ids=self._tokens(request.token_ids),
            max_tokens=request.max_tokens or None,
            start=request.start_token,
        )

    def _stream_snapshot(
        self, method: str, snap: SnapshotStream, context: grpc.ServicerContext
    ) -> Iterator[pb.GetSnapshotResponse | bytes]:
        """The info, then the payloads read, verified and framed ahead of the send (one copy)."""
        yield pb.GetSnapshotResponse(info=_snapshot_info(snap))
        sent = self._metrics.bytes_sent.labels(method)
        chunk_bytes = self._settings.chunk_bytes

        def serialize(seg: PlannedSegment, _fp16: int, payload: memoryview) -> list[bytes]:
            # Straight from the stored record into the messages: the payload's only copy.
            return list(encode_chunk_message(seg.key, payload, chunk_bytes))

        for seg, messages in zip(snap.segments, read_ahead(snap.map(serialize)), strict=True):
            # The next payload is read, verified and framed while this one is sent.
            for msg in messages:
                if not context.is_active():
                    raise _DeadlineExceeded(f"{method}: the caller went away or its deadline passed")
                yield msg
            sent.inc(seg.size_bytes)

    def GetSnapshotShm(
        self, request: pb.GetSnapshotRequest, context: grpc.ServicerContext
    ) -> pb.GetSnapshotShmResponse:
        with self._rpc("GetSnapshotShm", context):
            namespace = namespace_for(request.namespace, Access.READ, auth_on=self._auth_on)
            return self._export("GetSnapshotShm", context, lambda: self._open_snapshot(request, namespace))

    def GetPrefixShm(
        self, request: pb.GetPrefixRequest, context: grpc.ServicerContext
    ) -> pb.GetSnapshotShmResponse:
        """GetPrefix's segments (the caller's own domain) as one shared-memory export."""
        with self._rpc("GetPrefixShm", context):
            namespace = namespace_for(request.namespace, Access.READ, auth_on=self._auth_on)
            return self._export("GetPrefixShm", context, lambda: self._open_prefix(request, namespace))

    def _export(
        self, method: str, context: grpc.ServicerContext, open_snap: Callable[[], SnapshotStream]
    ) -> pb.GetSnapshotShmResponse:
        """What ``open_snap`` opens, exported into shared memory: the rules of every ``*Shm`` rpc.

        Only for a caller on this host (the unix socket; TCP loopback by explicit setting), checked
        before anything is read; an export nobody will claim (the caller went away) is discarded.
        Nothing is exported for a snapshot without segments (a prefix that matched nothing).
        """
        stream = method.removesuffix("Shm")
        if self._shm is None:
            raise NotConfigured(
                "this server has no shared-memory directory",
                hint=f"start it with --shm-dir (DELTASTORE_SHM_DIR), or read with {stream}",
            )
        if not _on_this_host(context.peer(), allow_loopback=self._settings.shm_peers == "loopback"):
            raise NotConfigured(
                f"{method} serves callers on this server's unix socket only"
                + (" (or TCP loopback)" if self._settings.shm_peers == "loopback" else ""),
                hint="connect through the unix socket (--grpc unix:/path.sock), start the server with "
                f"--shm-peers loopback to also trust TCP loopback callers, or read with {stream}",
            )
        snap = open_snap()
        if not snap.segments:
            return pb.GetSnapshotShmResponse(info=_snapshot_info(snap))
        name = self._shm.export(snap)
        if not context.is_active():  # nobody will claim it
            self._shm.discard(name)
            raise _DeadlineExceeded(f"{method}: the caller went away or its deadline passed")
        self._metrics.bytes_sent.labels(method).inc(snap.payload_bytes)
        return pb.GetSnapshotShmResponse(info=_snapshot_info(snap), file=name)

    def LookupPrefix(
        self, request: pb.LookupPrefixRequest, context: grpc.ServicerContext
    ) -> pb.LookupPrefixResponse:
        with self._rpc("LookupPrefix", context):
            namespace = namespace_for(request.namespace, Access.READ, auth_on=self._auth_on)
            matched = self._store.lookup_prefix(
                namespace,
                model=_required("model", request.model),
                codec=self._codec(request.codec),
                token_ids=self._tokens(request.token_ids),
            )
            return pb.LookupPrefixResponse(matched_tokens=matched)

    def HasBlocks(self, request: pb.HasBlocksRequest, context: grpc.ServicerContext) -> pb.HasBlocksResponse:
        with self._rpc("HasBlocks", context):
            namespace = namespace_for(request.namespace, Access.READ, auth_on=self._auth_on)
            keys = [bytes(k) for k in request.keys]
            if len(keys) > self._settings.max_tokens:
                raise ResourceExhausted(
                    f"{len(keys)} keys in one HasBlocks call exceed {self._settings.max_tokens}"
                )
            present = self._store.has_blocks(namespace, keys) if keys else []
            return pb.HasBlocksResponse(present=present)

    def DeleteSnapshot(
        self, request: pb.DeleteSnapshotRequest, context: grpc.ServicerContext
    ) -> pb.DeleteSnapshotResponse:
        with self._rpc("DeleteSnapshot", context):
            namespace = namespace_for(request.namespace, Access.WRITE, auth_on=self._auth_on)
            freed = self._store.delete_snapshot(namespace, request.session, request.turn)
            return pb.DeleteSnapshotResponse(
                freed_segments=freed.freed_segments, freed_bytes=freed.freed_bytes
            )

    def DeleteSession(
        self, request: pb.DeleteSessionRequest, context: grpc.ServicerContext
    ) -> pb.DeleteSessionResponse:
        with self._rpc("DeleteSession", context):
            namespace = namespace_for(request.namespace, Access.WRITE, auth_on=self._auth_on)
            freed = self._store.delete_session(namespace, request.session)
            return pb.DeleteSessionResponse(
                deleted_snapshots=freed.deleted_snapshots,
                freed_segments=freed.freed_segments,
                freed_bytes=freed.freed_bytes,
            )

    def ListSnapshots(
        self, request: pb.ListSnapshotsRequest, context: grpc.ServicerContext
    ) -> pb.ListSnapshotsResponse:
        with self._rpc("ListSnapshots", context):
            namespace = namespace_for(request.namespace, Access.READ, auth_on=self._auth_on)
            infos = self._store.list_snapshots(namespace, request.session or None)
            return pb.ListSnapshotsResponse(snapshots=[_summary(s) for s in infos])

    def GetSavings(
        self, request: pb.GetSavingsRequest, context: grpc.ServicerContext
    ) -> pb.GetSavingsResponse:
        with self._rpc("GetSavings", context):
            report = self._store.savings(savings_namespace(request.namespace, auth_on=self._auth_on))
            return pb.GetSavingsResponse(
                total=_savings(report),
                namespaces={ns: _savings(r) for ns, r in (report.get("namespaces") or {}).items()},
            )


# -- conversions -------------------------------------------------------------------------------


def _on_this_host(peer: str, *, allow_loopback: bool = False) -> bool:
    """May this gRPC peer use shared memory? A unix socket caller; TCP loopback only when allowed.

    A TCP peer that looks local may be any remote caller behind a local proxy (a sidecar's
    ingress, an ssh tunnel), so loopback is trusted only by an explicit setting. Peer strings
    are ``unix:...``, ``ipv4:127.0.0.1:port`` and ``ipv6:[::1]:port`` (brackets may come
    percent-encoded); IPv4-mapped IPv6 addresses count as their IPv4 address.
    """
    if peer.startswith("unix:"):
        return True
    kind, _, rest = peer.partition(":")
    if not allow_loopback or kind not in ("ipv4", "ipv6"):
        return False
    host = unquote(rest).rpartition(":")[0].strip("[]")
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_loopback


def _required(name: str, value: str) -> str:
    if not value:
        raise InvalidArgument(f"{name} is required")
    return value


def _check_deadline(context: grpc.ServicerContext) -> None:
    remaining = context.time_remaining()
    if remaining is not None and remaining <= 0:
        raise _DeadlineExceeded("the call's deadline passed before the server finished; nothing was stored")


def _check_payload(
    key: bytes, payload: bytes | bytearray | memoryview, segments: dict[bytes, PlannedSegment], codec: str
) -> BlockHeader:
    """The payload's header, after checking it is the segment it claims to be."""
    seg = segments.get(key)
    if seg is None:
        raise InvalidArgument(f"segment {key.hex()} is not part of this snapshot's plan")
    try:
        header = read_header(payload)
        check_expansion(header)  # a zstd section may not declare gigabytes behind a few bytes
    except FormatError as exc:
        raise FormatError(f"segment {key.hex()}: {exc.message}", hint=exc.hint) from None
    if header.spec.canonical() != codec:
        raise MismatchError(
            f"segment {key.hex()} is encoded as {header.spec.canonical()!r}, the snapshot as {codec!r}"
        )
    if header.n_tokens != seg.end - seg.start or header.start != seg.start:
        raise InvalidArgument(
            f"segment {key.hex()} covers tokens [{seg.start}, {seg.end}) but its payload holds "
            f"[{header.start}, {header.start + header.n_tokens})"
        )
    return header


def _segment(seg: PlannedSegment) -> pb.Segment:
    return pb.Segment(
        start=seg.start,
        end=seg.end,
        key=seg.key,
        present=seg.present,
        size_bytes=seg.size_bytes,
        digest=seg.digest,
    )


def _snapshot_info(snap: SnapshotStream) -> pb.SnapshotInfo:
    info = snap.info
    return pb.SnapshotInfo(
        snapshot_id=info.snapshot_id,
        namespace=info.namespace,
        session=info.session,
        turn=info.turn,
        model=info.model,
        codec=info.codec,
        token_ids=snap.token_ids,
        segments=[_segment(s) for s in snap.segments],
        logical_bytes=info.logical_bytes,
        payload_bytes=snap.payload_bytes,
        parent_turn=info.parent_turn,
        created_at=info.created_at,
    )


def _summary(info: StoreSnapshotInfo) -> pb.SnapshotSummary:
    return pb.SnapshotSummary(
        snapshot_id=info.snapshot_id,
        session=info.session,
        turn=info.turn,
        model=info.model,
        codec=info.codec,
        n_tokens=info.n_tokens,
        logical_bytes=info.logical_bytes,
        created_at=info.created_at,
        parent_turn=info.parent_turn,
    )


def _savings(report: SavingsReport) -> pb.Savings:
    layers = report["layers"]
    return pb.Savings(
        logical_bytes=report["logical_bytes"],
        stored_bytes=report["stored_bytes"],
        ratio=report["ratio"],
        codec=layers["codec"],
        prefix_dedup=layers["prefix_dedup"],
        temporal_delta=layers["temporal_delta"],
        snapshots=report["snapshots"],
        sessions=report["sessions"],
        blocks=report["blocks"],
    )


# -- server ------------------------------------------------------------------------------------


_WIRE_CODING: dict[str, tuple[Callable[[bytes], Any] | None, Callable[[Any], bytes] | None]] = {
    "PutSnapshot": (wire_deserializer(pb.PutSnapshotRequest.FromString), None),
    "GetSnapshot": (None, wire_serializer),
    "GetPrefix": (None, wire_serializer),
}
"""The payload streams' chunk messages, (de)serialized by hand: (request parser, response writer)."""


def method_handlers(servicer: pb_grpc.DeltaStoreServicer) -> dict[str, grpc.RpcMethodHandler]:
    """The handler table the server registers, one entry per rpc of the service's descriptor.

    Messages are protobuf's, except the payload streams' chunk messages, (de)serialized by hand
    (``_WIRE_CODING``): the wire format is unchanged (any protobuf client interoperates), but
    chunks skip Python protobuf's copies: incoming ones are views into the received message,
    outgoing ones are serialized once. Every request deserializer is tolerant: requests that do
    not parse are answered INVALID_ARGUMENT (``server/malformed.py``).
    """
    table: dict[str, grpc.RpcMethodHandler] = {}
    for method in pb.DESCRIPTOR.services_by_name["DeltaStore"].methods:
        parse, write = _WIRE_CODING.get(method.name, (None, None))
        handler = Handler(
            method=f"/{SERVICE_NAME}/{method.name}",
            behavior=getattr(servicer, method.name),
            request_streaming=method.client_streaming,
            response_streaming=method.server_streaming,
            request_deserializer=parse or message_factory.GetMessageClass(method.input_type).FromString,
            response_serializer=write
            or message_factory.GetMessageClass(method.output_type).SerializeToString,
        )
        table[method.name] = tolerant(handler).rpc_method_handler()
    return table


def _add_service(servicer: DeltaStoreService, server: grpc.Server) -> None:
    handlers = method_handlers(servicer)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))
    server.add_registered_method_handlers(SERVICE_NAME, handlers)


def create_server(
    store: Store,
    address: str,
    *,
    settings: ServerSettings | None = None,
    metrics: Metrics | None = None,
    interceptors: Sequence[grpc.ServerInterceptor] = (),
    health_servicer: HealthServicer | None = None,
    credentials: grpc.ServerCredentials | None = None,
) -> tuple[grpc.Server, int]:
    """Build and start a gRPC server with the DeltaStore, health and reflection services.

    Args:
        store: the store to serve.
        address: ``host:port`` (port 0 picks a free one) or ``unix:/path/to.sock``.
        settings: limits and thread count (defaults when None).
        metrics: where RPCs are counted (a fresh registry when None).
        interceptors: server interceptors run before every handler (``handlers.Layered``: auth and
            the stall guard; tracing).
        health_servicer: the grpc.health.v1 servicer to expose (pass one to set NOT_SERVING
            while draining); a fresh one when None.
        credentials: TLS / mTLS server credentials (``deltastore.server.tls``); None: plaintext.

    Returns:
        ``(server, port)``: the started server and the bound port (0 for a unix socket).
    """
    settings = settings or ServerSettings()
    metrics = metrics or Metrics(store.savings)
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=settings.workers, thread_name_prefix="deltastore-grpc"),
        interceptors=list(interceptors),
        options=[
            ("grpc.max_receive_message_length", settings.max_message_bytes),
            ("grpc.max_send_message_length", settings.max_message_bytes),
            ("grpc.so_reuseport", 0),
        ],
        maximum_concurrent_rpcs=settings.workers * 4,
    )
    _add_service(DeltaStoreService(store, settings, metrics), server)
    health_servicer = health_servicer or HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection((SERVICE_NAME, HEALTH_SERVICE, reflection.SERVICE_NAME), server)
    if credentials is not None and not address.startswith("unix:"):
        port = server.add_secure_port(address, credentials)
    else:
        port = server.add_insecure_port(address)
    if port == 0 and not address.startswith("unix:"):
        raise InvalidArgument(f"cannot bind gRPC address {address!r}")
    server.start()
    for name in ("", SERVICE_NAME):
        health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    return server, (0 if address.startswith("unix:") else port)
