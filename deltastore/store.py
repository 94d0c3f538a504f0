"""The store: snapshots as manifests of immutable, refcounted, BLAKE3-addressed segments.

A snapshot (namespace, session, turn) is a manifest listing segments (see
:mod:`deltastore.addressing`): full aligned blocks, which any session of the same dedup domain,
model and codec shares, then the tail, made of the parent turn's tail segments plus one delta
segment of the new tokens. A client asks :meth:`Store.plan_snapshot` which segments are missing,
encodes only those, and hands them to :meth:`Store.put_snapshot`, which re-plans inside its write
transaction and stores blocks, refcounts, manifest, session and counters atomically.

Why eviction cannot hurt dedup or temporal reuse:

- *Token* eviction (dropping unimportant tokens, the codec's job) is decided inside each segment's
  payload when it is encoded and sealed. Segments are immutable and keyed by their tokens' full
  prefix, so a segment means the same bytes to every snapshot that references it: a later turn
  never rewrites or re-evicts an earlier segment, it only adds its own. Dedup keys and temporal
  reuse stay valid for the block's whole life.
- *Storage* eviction (capacity, TTL) removes whole sessions, in one transaction each, through
  the same refcounts as deletes: a segment shared with a surviving session stays, exactly the
  segments nothing references any more are freed, and no manifest ever points at a freed block.
  The session being written is never evicted by its own put; a put that cannot fit after
  evicting every other session fails with StoreFull and changes nothing.

Capacity policy: least recently used session first (a put or a get refreshes a session's clock,
gets at most every ``touch_interval_s``); optionally sessions idle longer than ``session_ttl_s``
expire: they read as absent at once and are deleted by later puts or :meth:`Store.expire_sessions`.

Why one long module: every public operation is one backend transaction that shares the
same ledger, refcount and quarantine helpers; cutting it by concept (plan and put, streaming
reads, deletion and eviction) into modules over one transaction context is the planned next
step (docs/ARCHITECTURE.md), not done yet.
"""

from __future__ import annotations

import functools
import logging
import struct
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from deltastore import accounting
from deltastore.accounting import Ledger, SavingsReport, read_counters, savings_of
from deltastore.addressing import (
    KEY_BYTES,
    Chain,
    Key,
    Segment,
    key_from_hex,
    seed,
    token_bytes,
    tokens_from_bytes,
)
from deltastore.backend import COUNTER_NBYTES, Backend, ReadView, WriteBatch
from deltastore.backends import open_backend
from deltastore.backends.lmdb_backend import LmdbConfig
from deltastore.errors import (
    AlreadyExists,
    ChecksumMismatch,
    FormatError,
    IncompatibleFormat,
    InvalidArgument,
    MismatchError,
    MissingSegments,
    NotFound,
    StoreFull,
)
from deltastore.manifest import (
    STORE_FORMAT,
    BlockMeta,
    Buffer,
    Manifest,
    SessionRecord,
    block_key,
    block_payload_offset,
    check_label,
    check_name,
    check_session,
    check_turn,
    decode_block,
    encode_block,
    global_ref_key,
    lru_key,
    manifest_key,
    ns_prefix,
    ns_ref_key,
    payload_digest,
    seal_block,
    session_key,
    session_prefix,
    session_ref_key,
    split_lru_key,
    split_name,
    split_session_prefix,
    turn_of_manifest_key,
)
from deltastore.settings import StoreConfig

__all__ = [
    "QUARANTINE_PREFIX",
    "DeleteResult",
    "Plan",
    "PlannedSegment",
    "PutResult",
    "SegmentPayload",
    "Snapshot",
    "SnapshotInfo",
    "SnapshotStream",
    "Store",
    "StoredSegment",
]

_FORMAT_KEY = b"store_format"
QUARANTINE_PREFIX = b"quarantine/"
"""``meta`` keys of records set aside as damaged: ``quarantine/<kind>/<key>`` -> the record."""

log = logging.getLogger(__name__)


def _block_head(view: ReadView, bkey: bytes, name: str, n_tokens: int) -> tuple[BlockMeta, memoryview] | None:
    """A stored block's meta and token ids, reading only its header (never the payload)."""
    head = view.get_head("blocks", bkey, block_payload_offset(n_tokens))
    if head is None:
        return None
    data, total = head
    meta, toks, _ = decode_block(data, name, check=False)
    offset = block_payload_offset(meta.n_tokens)
    return BlockMeta(meta.n_tokens, meta.fp16_nbytes, meta.digest, total - offset, total), toks


def quarantine(b: WriteBatch, kind: bytes, key: bytes, raw: bytes | memoryview) -> None:
    """Set a damaged record aside (``meta`` keyspace) for ``deltastore verify --repair``."""
    b.put_if_absent("meta", QUARANTINE_PREFIX + kind + b"/" + bytes(key), bytes(raw))
    log.warning(
        "quarantined a damaged %s record %s; run `deltastore verify --repair`", kind.decode(), key.hex()
    )


T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class PlannedSegment:
    """One segment of a plan: tokens ``[start, end)``, its hex key, whether it is stored.

    ``size_bytes`` is the stored payload's size in bytes (0 when missing); ``digest`` its BLAKE3
    as stored (in a snapshot's or prefix's segments; empty in a plan), for end-to-end checks.
    """

    start: int
    end: int
    key: str
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
    """A segment read back: tokens ``[start, end)``, hex key, FP16 size, payload bytes."""

    start: int
    end: int
    key: str
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


def _info(namespace: str, session: str, turn: int, m: Manifest) -> SnapshotInfo:
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


class Store:
    """Snapshots of KV caches on a :class:`~deltastore.backend.Backend`; thread-safe.

    Args:
        backend: where everything lives (one per process and data directory).
        config: block size, capacity, TTL and dedup-sharing policy.
        clock: unix seconds; injectable so TTL and LRU are testable without sleeping.
    """

    def __init__(
        self, backend: Backend, config: StoreConfig | None = None, *, clock: Callable[[], float] = time.time
    ) -> None:
        self.backend = backend
        self.config = config or StoreConfig()
        self._clock = clock

        def init(b: WriteBatch) -> None:
            found = b.get("meta", _FORMAT_KEY)
            if found is None:
                b.put("meta", _FORMAT_KEY, STORE_FORMAT)
            elif bytes(found) != STORE_FORMAT:
                raise IncompatibleFormat(
                    f"the store holds format {bytes(found)!r}; this build reads {STORE_FORMAT!r}",
                    hint="upgrade deltastore, or use a fresh data directory",
                )

        backend.transact(init)

    @classmethod
    def open(cls, data_dir: str | Path, config: StoreConfig | None = None, **lmdb_options: Any) -> Store:
        """The embedded store: an LMDB environment in ``data_dir``."""
        path = Path(data_dir)
        return cls(open_backend(f"lmdb://{path.resolve()}", LmdbConfig(path=path, **lmdb_options)), config)

    def close(self) -> None:
        self.backend.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ helpers

    def _now_ms(self) -> int:
        return int(self._clock() * 1000)

    def _expired(self, rec: SessionRecord, now_ms: int) -> bool:
        ttl = self.config.session_ttl_s
        return ttl is not None and rec.last_access_ms + int(ttl * 1000) < now_ms

    def _live_session(self, view: ReadView, namespace: str, session: str) -> SessionRecord | None:
        raw = view.get("sessions", session_key(namespace, session))
        if raw is None:
            return None
        rec = SessionRecord.decode(raw)
        return None if self._expired(rec, self._now_ms()) else rec

    def _segments(
        self,
        view: ReadView,
        namespace: str,
        session: str,
        rec: SessionRecord | None,
        model: str,
        codec: str,
        tokens: bytes,
        parent_turn: int | None,
    ) -> tuple[str, int, list[Segment]]:
        """(domain, block size, segments) of a snapshot; checks the parent and its prefix.

        The dedup domain comes from the configuration in effect, on every call: after a dedup
        group is split, a session created inside it can no longer plan or put against the group
        (that would keep revealing and receiving the other namespaces' blocks). Its snapshots stay
        readable and deletable; new turns go to a new session.
        """
        domain = self.config.domain(namespace)
        if rec is not None and rec.domain != domain:
            raise MismatchError(
                f"session {namespace}/{session} was created in another dedup domain than the one "
                f"namespace {namespace!r} is configured for now",
                hint="start a new session for new turns; this one stays readable until deleted",
            )
        block_size = rec.block_size if rec else self.config.block_size
        chain = Chain(seed(domain, model, codec, block_size), tokens, block_size)
        parent_bounds: list[tuple[int, int]] = []
        if parent_turn is not None:
            name = snapshot_id(namespace, session, parent_turn)
            raw = (
                None if rec is None else view.get("manifests", manifest_key(namespace, session, parent_turn))
            )
            if raw is None:
                raise NotFound(f"parent snapshot {name} not found")
            parent = Manifest.decode(raw, name)
            if parent.model != model or parent.codec != codec:
                raise MismatchError(
                    f"parent {name} is {parent.model}/{parent.codec}, this snapshot {model}/{codec}"
                )
            if parent.n_tokens > chain.n_tokens:
                raise InvalidArgument(f"parent {name} has more tokens than this snapshot")
            for seg in parent.segments:
                if chain.segment_key(seg.start, seg.end) != seg.key:
                    raise InvalidArgument(f"token ids do not extend those of parent {name}")
            parent_bounds = [(s.start, s.end) for s in parent.segments]
        return domain, block_size, chain.segments(parent_bounds)

    # ------------------------------------------------------------------ plan / put / get

    def plan_snapshot(
        self,
        namespace: str,
        session: str,
        model: str,
        codec: str,
        token_ids: Sequence[int],
        parent_turn: int | None = None,
    ) -> Plan:
        """Which segments a snapshot of these tokens has, and which of them are stored."""
        self._check_ids(namespace, session, model, codec, parent_turn)
        tokens = token_bytes(token_ids)
        planned: list[PlannedSegment] = []
        with self.backend.read() as view:
            rec = self._live_session(view, namespace, session)
            block_size = rec.block_size if rec else self.config.block_size
            if tokens:
                domain, block_size, segments = self._segments(
                    view, namespace, session, rec, model, codec, tokens, parent_turn
                )
                for seg in segments:
                    head = _block_head(view, block_key(domain, seg.key), seg.hex, seg.end - seg.start)
                    size = 0 if head is None else head[0].payload_nbytes
                    planned.append(PlannedSegment(seg.start, seg.end, seg.hex, head is not None, size))
        return Plan(
            namespace, session, model, codec, block_size, len(tokens) // 4, parent_turn, tuple(planned)
        )

    @staticmethod
    def _check_ids(namespace: str, session: str, model: str, codec: str, parent_turn: int | None) -> None:
        check_name("namespace", namespace)
        check_session(session)
        check_label("model fingerprint", model)
        check_label("codec spec", codec)
        if parent_turn is not None:
            check_turn(parent_turn)

    def put_snapshot(
        self,
        namespace: str,
        session: str,
        turn: int,
        model: str,
        codec: str,
        token_ids: Sequence[int],
        payloads: Mapping[bytes, SegmentPayload] | Mapping[str, SegmentPayload],
        parent_turn: int | None = None,
    ) -> PutResult:
        """Store a snapshot from the payloads of the segments its plan reported missing.

        Re-plans inside the write transaction: a segment stored meanwhile by someone else is
        reused (its payload here ignored); one neither stored nor supplied raises
        MissingSegments and nothing is written. Re-putting an identical snapshot is a no-op
        (``existed``); a different one under the same turn raises AlreadyExists.
        """
        self._check_ids(namespace, session, model, codec, parent_turn)
        check_turn(turn)
        if parent_turn is not None and parent_turn == turn:
            raise InvalidArgument("a snapshot cannot be its own parent")
        tokens = token_bytes(token_ids)
        if not tokens:
            raise InvalidArgument("a snapshot needs at least one token")
        supplied: dict[Key, SegmentPayload] = {}
        for raw_key, p in payloads.items():
            key = key_from_hex(raw_key)
            if not isinstance(p, SegmentPayload) or not isinstance(p.data, bytes | bytearray | memoryview):
                raise InvalidArgument(f"segment {key.hex()}: payload must be a SegmentPayload of bytes")
            if p.n_tokens <= 0 or p.fp16_nbytes <= 0 or not p.data:
                raise InvalidArgument(f"segment {key.hex()}: empty payload or non-positive sizes")
            if p.digest is not None and len(p.digest) != KEY_BYTES:
                raise InvalidArgument(f"segment {key.hex()}: a digest is {KEY_BYTES} bytes")
            if p.record is not None and len(p.record) != block_payload_offset(p.n_tokens) + len(p.data):
                raise InvalidArgument(f"segment {key.hex()}: the record buffer does not fit its payload")
            supplied[key] = p
        return self.backend.transact(
            lambda b: self._put_tx(b, namespace, session, turn, model, codec, tokens, supplied, parent_turn)
        )

    def _put_tx(
        self,
        b: WriteBatch,
        namespace: str,
        session: str,
        turn: int,
        model: str,
        codec: str,
        tokens: bytes,
        supplied: Mapping[Key, SegmentPayload],
        parent_turn: int | None,
    ) -> PutResult:
        now = self._now_ms()
        ledger = Ledger()
        evicted: list[tuple[str, str]] = []
        sid = snapshot_id(namespace, session, turn)
        skey = session_key(namespace, session)
        raw = b.get("sessions", skey)
        rec = None if raw is None else SessionRecord.decode(raw)
        if rec is not None and self._expired(rec, now):
            self._drop_session(b, ledger, namespace, session)
            evicted.append((namespace, session))
            rec = None
        domain, block_size, segments = self._segments(
            b, namespace, session, rec, model, codec, tokens, parent_turn
        )

        mkey = manifest_key(namespace, session, turn)
        existing = None if rec is None else b.get("manifests", mkey)
        if existing is not None:
            old = Manifest.decode(existing, sid)
            if old.model == model and old.codec == codec and old.segments == tuple(segments):
                self._touch_tx(b, namespace, session, now)
                return PutResult(sid, 0, 0, 0, 0, 0, 0, 0, old.fp16_nbytes, existed=True)
            raise AlreadyExists(f"snapshot {sid} exists with other content", hint="use a new turn number")

        wanted = {seg.key for seg in segments}
        extra = [k.hex() for k in supplied if k not in wanted]
        if extra:
            raise InvalidArgument(f"payloads for segments not in this snapshot: {', '.join(extra[:4])}")

        # Each segment: (segment, meta, new record or None when already stored).
        parts: list[tuple[Segment, BlockMeta, bytes | Buffer | None]] = []
        missing: list[str] = []
        for seg in segments:
            bkey = block_key(domain, seg.key)
            head = _block_head(b, bkey, seg.hex, seg.end - seg.start)  # no payload read for reuse
            if head is not None:
                parts.append((seg, head[0], None))
                continue
            p = supplied.get(seg.key)
            if p is None:
                missing.append(seg.hex)
                continue
            if p.n_tokens != seg.n_tokens:
                raise InvalidArgument(
                    f"segment {seg.hex} covers tokens [{seg.start}, {seg.end}) "
                    f"but its payload encodes {p.n_tokens} tokens"
                )
            seg_tokens = tokens[4 * seg.start : 4 * seg.end]
            if p.record is None:
                record: bytes | Buffer = encode_block(seg_tokens, p.data, p.fp16_nbytes, p.digest)
            else:
                seal_block(p.record, seg_tokens, p.fp16_nbytes, p.digest or payload_digest(p.data))
                record = p.record
            parts.append((seg, decode_block(record, seg.hex, check=False)[0], record))
        if missing:
            raise MissingSegments(missing)
        per_token = {meta.fp16_nbytes / meta.n_tokens for _, meta, _ in parts}
        if len(per_token) != 1:
            raise InvalidArgument(
                "segments disagree on FP16 bytes per token (model shape): "
                + ", ".join(f"{v:g}" for v in sorted(per_token))
            )

        if rec is None:
            rec = SessionRecord(domain, block_size, 0, now, now)
            value = rec.encode()
            b.put("sessions", skey, value)
            lkey = lru_key(now, namespace, session)
            b.put("sessions", lkey, b"")
            ledger.add("index_bytes", len(skey) + len(value) + len(lkey), namespace=namespace)
            ledger.add("sessions", 1, namespace=namespace)

        new_payload = temporal = shared = n_new = n_temporal = n_shared = 0
        for seg, meta, new_record in parts:
            if new_record is not None:
                b.put("blocks", block_key(domain, seg.key), new_record)
            session_had, _ = self._ref(b, ledger, namespace, session, domain, seg.key, meta, +1)
            if new_record is not None:
                new_payload += meta.payload_nbytes
                n_new += 1
            elif session_had:
                temporal += meta.payload_nbytes
                n_temporal += 1
            else:
                shared += meta.payload_nbytes
                n_shared += 1

        fp16 = sum(meta.fp16_nbytes for _, meta, _ in parts)
        parent = -1 if parent_turn is None else parent_turn
        manifest = Manifest(model, codec, block_size, len(tokens) // 4, fp16, parent, now, tuple(segments))
        value = manifest.encode()
        b.put("manifests", mkey, value)
        ledger.add("manifest_bytes", len(mkey) + len(value), namespace=namespace)
        ledger.add("logical", fp16, namespace=namespace)
        ledger.add("snapshots", 1, namespace=namespace)
        self._update_session(b, namespace, session, now, +1)
        new_bytes = ledger.stored_delta()
        ledger.flush(b)

        evicted.extend(self._expire_tx(b, now, self.config.expire_batch, keep=(namespace, session)))
        evicted.extend(self._make_room(b, namespace, session))
        return PutResult(
            sid, new_bytes, new_payload, temporal, shared, n_new, n_temporal, n_shared, fp16, tuple(evicted)
        )

    def _ref(
        self,
        b: WriteBatch,
        ledger: Ledger,
        namespace: str,
        session: str,
        domain: str,
        key: Key,
        meta: BlockMeta,
        delta: int,
    ) -> tuple[bool, bool]:
        """Add (+1) or drop (-1) one snapshot's reference to a segment; keep counters exact.

        Frees the block when its last reference goes. Returns (whether the session referenced
        the segment before this change, whether the block was freed).
        """
        shared_domain = domain != namespace
        block_nbytes = len(block_key(domain, key)) + meta.record_nbytes

        def edge(count: int) -> int:
            """+1 when the entry was just created, -1 when just removed, else 0."""
            if delta > 0:
                return 1 if count == delta else 0
            return -1 if count == 0 else 0

        gkey = global_ref_key(domain, key)
        g = edge(b.incr("refs", gkey, delta))
        if g:
            # Store-wide: the block itself and its refcount entry. Unshared domain: also the namespace's.
            ns = None if shared_domain else namespace
            ledger.add("unique_fp16", g * meta.fp16_nbytes, namespace=ns)
            ledger.add("block_bytes", g * block_nbytes, namespace=ns)
            ledger.add("index_bytes", g * (len(gkey) + COUNTER_NBYTES), namespace=ns)
            ledger.add("blocks", g, namespace=ns)
            if g < 0:
                b.delete("blocks", block_key(domain, key))
        if shared_domain:
            # The namespace as if stored alone: the block and a refcount entry of its own.
            nkey = ns_ref_key(namespace, key)
            n = edge(b.incr("refs", nkey, delta))
            if n:
                entry = len(nkey) + COUNTER_NBYTES
                ledger.add("index_bytes", n * entry)
                ledger.add("unique_fp16", n * meta.fp16_nbytes, namespace=namespace, store=False)
                ledger.add("block_bytes", n * block_nbytes, namespace=namespace, store=False)
                ledger.add("index_bytes", n * entry, namespace=namespace, store=False)
                ledger.add("blocks", n, namespace=namespace, store=False)
        skey = session_ref_key(namespace, session, key)
        count = b.incr("refs", skey, delta)
        s = edge(count)
        if s:
            ledger.add("session_fp16", s * meta.fp16_nbytes, namespace=namespace)
            ledger.add("index_bytes", s * (len(skey) + COUNTER_NBYTES), namespace=namespace)
        return count - delta > 0, g < 0

    def _update_session(self, b: WriteBatch, namespace: str, session: str, now: int, snapshots: int) -> None:
        """Add ``snapshots`` to the session's count and move it to the young end of the LRU."""
        skey = session_key(namespace, session)
        rec = SessionRecord.decode(b.get("sessions", skey))  # type: ignore[arg-type]
        if rec.last_access_ms != now:
            b.delete("sessions", lru_key(rec.last_access_ms, namespace, session))
            b.put("sessions", lru_key(now, namespace, session), b"")
        new = SessionRecord(rec.domain, rec.block_size, rec.n_snapshots + snapshots, rec.created_ms, now)
        b.put("sessions", skey, new.encode())

    def _touch_tx(self, b: WriteBatch, namespace: str, session: str, now: int) -> None:
        if b.get("sessions", session_key(namespace, session)) is not None:
            self._update_session(b, namespace, session, now, 0)

    def get_snapshot(
        self,
        namespace: str,
        session: str,
        turn: int | None = None,
        *,
        model: str | None = None,
        codec: str | None = None,
    ) -> Snapshot:
        """Read a snapshot (``turn=None``: the session's latest) with every payload verified.

        Each payload's BLAKE3 digest is checked and the segment keys are recomputed from the
        stored token ids, so corrupt payloads or tokens raise ChecksumMismatch, never return.
        A ``model`` or ``codec`` other than the stored one raises MismatchError.
        """
        opened = self.open_snapshot(namespace, session, turn, model=model, codec=codec)
        return Snapshot(opened.info, opened.token_ids, tuple(opened))

    def open_snapshot(
        self,
        namespace: str,
        session: str,
        turn: int | None = None,
        *,
        model: str | None = None,
        codec: str | None = None,
    ) -> SnapshotStream:
        """Open a snapshot for streaming: manifest, token ids and sizes now, payloads as iterated.

        Checks as :meth:`get_snapshot` does. Each payload is read and verified in a short read
        transaction of its own (:meth:`SnapshotStream.map` lets a server serialize it straight
        from the stored record), so a client takes in one payload while the next is read and no
        read transaction lives as long as a slow client. A snapshot deleted meanwhile raises
        NotFound from the iterator.
        """
        check_name("namespace", namespace)
        check_session(session)
        if turn is not None:
            check_turn(turn)
        with self.backend.read() as view:
            rec = self._live_session(view, namespace, session)
            if rec is None:
                raise NotFound(f"session {namespace}/{session} not found")
            if turn is None:
                keys = [k for k, _ in view.scan("manifests", session_prefix(namespace, session))]
                if not keys:
                    raise NotFound(f"session {namespace}/{session} has no snapshots")
                turn = turn_of_manifest_key(keys[-1])
            sid = snapshot_id(namespace, session, turn)
            raw = view.get("manifests", manifest_key(namespace, session, turn))
            if raw is None:
                raise NotFound(f"snapshot {sid} not found")
            m = Manifest.decode(raw, sid)
            if (model is not None and model != m.model) or (codec is not None and codec != m.codec):
                raise MismatchError(
                    f"snapshot {sid} is {m.model}/{m.codec}, requested {model or m.model}/{codec or m.codec}"
                )
            sizes: list[PlannedSegment] = []
            token_parts: list[bytes] = []
            for seg in m.segments:
                head = _block_head(view, block_key(rec.domain, seg.key), seg.hex, seg.end - seg.start)
                if head is None:
                    raise ChecksumMismatch(seg.hex, "a stored block", "no block (dangling reference)")
                meta, toks = head
                if meta.n_tokens != seg.end - seg.start:
                    raise ChecksumMismatch(seg.hex, f"{seg.end - seg.start} token ids", f"{meta.n_tokens}")
                token_parts.append(bytes(toks))
                sizes.append(
                    PlannedSegment(seg.start, seg.end, seg.hex, True, meta.payload_nbytes, bytes(meta.digest))
                )
            last_access = rec.last_access_ms
        tokens = b"".join(token_parts)
        chain = Chain(seed(rec.domain, m.model, m.codec, m.block_size), tokens, m.block_size)
        if chain.n_tokens != m.n_tokens:
            raise ChecksumMismatch(sid, f"{m.n_tokens} tokens", f"{chain.n_tokens} tokens")
        for seg in m.segments:
            if chain.segment_key(seg.start, seg.end) != seg.key:
                raise ChecksumMismatch(seg.hex, "token ids hashing to this key", "other token ids")
        now = self._now_ms()
        if now - last_access > self.config.touch_interval_s * 1000:
            self.backend.transact(lambda b: self._touch_tx(b, namespace, session, now))
        mkey = manifest_key(namespace, session, turn)

        def read(seg: PlannedSegment, use: Callable[[int, memoryview], T]) -> T:
            with self.backend.read() as view:
                block = view.get("blocks", block_key(rec.domain, key_from_hex(seg.key)))
                if block is None:
                    if view.get("manifests", mkey) is None:
                        raise NotFound(f"snapshot {sid} was deleted while it was read")
                    raise ChecksumMismatch(seg.key, "a stored block", "no block (dangling reference)")
                meta, _, payload = decode_block(block, seg.key)
                return use(meta.fp16_nbytes, payload)

        return SnapshotStream(
            _info(namespace, session, turn, m), tokens_from_bytes(tokens), tuple(sizes), read
        )

    # ------------------------------------------------------------------ queries

    def list_snapshots(self, namespace: str, session: str | None = None) -> list[SnapshotInfo]:
        """Snapshots of a namespace (or one session), ordered by session then turn."""
        check_name("namespace", namespace)
        prefix = (
            ns_prefix(namespace) if session is None else session_prefix(namespace, check_session(session))
        )
        out: list[SnapshotInfo] = []
        live: dict[str, bool] = {}
        with self.backend.read() as view:
            for key, raw in view.scan("manifests", prefix):
                ns, sess, rest = split_session_prefix(key)
                if sess not in live:
                    live[sess] = self._live_session(view, ns, sess) is not None
                if live[sess]:
                    turn = turn_of_manifest_key(rest)
                    out.append(_info(ns, sess, turn, Manifest.decode(raw, snapshot_id(ns, sess, turn))))
        return out

    def has_blocks(self, namespace: str, keys: Sequence[str | bytes]) -> list[bool]:
        """Whether each segment key is stored in this namespace's dedup domain."""
        check_name("namespace", namespace)
        domain = self.config.domain(namespace)
        parsed = [key_from_hex(k) for k in keys]
        with self.backend.read() as view:
            return [view.get_head("blocks", block_key(domain, k), 1) is not None for k in parsed]

    def lookup_prefix(self, namespace: str, model: str, codec: str, token_ids: Sequence[int]) -> int:
        """Leading tokens whose KV is stored: whole aligned blocks, then the rest as one segment."""
        check_name("namespace", namespace)
        check_label("model fingerprint", model)
        check_label("codec spec", codec)
        tokens = token_bytes(token_ids)
        domain, bs = self.config.domain(namespace), self.config.block_size
        chain = Chain(seed(domain, model, codec, bs), tokens, bs)
        matched = 0
        with self.backend.read() as view:
            for i in range(chain.n_tokens // bs):
                if view.get_head("blocks", block_key(domain, chain.hashes[i + 1]), 1) is None:
                    return matched
                matched = (i + 1) * bs
            if matched < chain.n_tokens:
                tail = chain.segment_key(matched, chain.n_tokens)
                if view.get_head("blocks", block_key(domain, tail), 1) is not None:
                    matched = chain.n_tokens
        return matched

    def get_prefix(
        self,
        namespace: str,
        model: str,
        codec: str,
        token_ids: Sequence[int],
        *,
        max_tokens: int | None = None,
    ) -> SnapshotStream:
        """The stored leading segments of these tokens, without a session (what LookupPrefix counts).

        The chain is computed here from the caller's namespace (its dedup domain), model and codec,
        so only blocks of that domain can match. Whole aligned blocks, then the rest as one stored
        segment, up to ``max_tokens`` (None: all). Each block's stored token ids must equal the
        requested ones (ChecksumMismatch otherwise); payloads are verified as they are read, as by
        :meth:`open_snapshot`. Nothing matching yields a stream with no segments.
        """
        check_name("namespace", namespace)
        check_label("model fingerprint", model)
        check_label("codec spec", codec)
        ids = list(token_ids) if max_tokens is None else list(token_ids)[: max(0, max_tokens)]
        tokens = token_bytes(ids)
        domain, bs = self.config.domain(namespace), self.config.block_size
        chain = Chain(seed(domain, model, codec, bs), tokens, bs)
        found: list[PlannedSegment] = []
        fp16_total = 0

        def take(view: ReadView, start: int, end: int, key: Key) -> bool:
            nonlocal fp16_total
            head = _block_head(view, block_key(domain, key), key.hex(), end - start)
            if head is None:
                return False
            meta, toks = head
            if bytes(toks) != tokens[4 * start : 4 * end]:
                raise ChecksumMismatch(key.hex(), "the requested token ids", "other stored token ids")
            found.append(PlannedSegment(start, end, key.hex(), True, meta.payload_nbytes, bytes(meta.digest)))
            fp16_total += meta.fp16_nbytes
            return True

        with self.backend.read() as view:
            matched = 0
            for i in range(chain.n_tokens // bs):
                if not take(view, i * bs, (i + 1) * bs, chain.hashes[i + 1]):
                    break
                matched = (i + 1) * bs
            else:
                if matched < chain.n_tokens:
                    take(view, matched, chain.n_tokens, chain.segment_key(matched, chain.n_tokens))
        n_tokens = found[-1].end if found else 0

        def read(seg: PlannedSegment, use: Callable[[int, memoryview], T]) -> T:
            with self.backend.read() as view:
                block = view.get("blocks", block_key(domain, key_from_hex(seg.key)))
                if block is None:
                    raise NotFound(f"prefix block {seg.key} was evicted while it was read")
                meta, _, payload = decode_block(block, seg.key)
                return use(meta.fp16_nbytes, payload)

        info = SnapshotInfo("", namespace, "", 0, model, codec, n_tokens, fp16_total, None, 0.0)
        return SnapshotStream(info, ids[:n_tokens], tuple(found), read)

    def savings(self, namespace: str | None = None) -> SavingsReport:
        """Savings of the store (and of every namespace), or of one namespace as if alone.

        See :mod:`deltastore.accounting` for the definitions; ``ratio`` equals the product of
        ``layers``. Store-wide figures count a block shared by namespaces once, per-namespace
        figures count it in each.
        """
        with self.backend.read() as view:
            if namespace is not None:
                check_name("namespace", namespace)
                out = savings_of(read_counters(view, namespace))
                out["namespace"] = namespace
                out["domain"] = self.config.domain(namespace)
                return out
            out = savings_of(read_counters(view))
            names = [
                name
                for name, rest in (split_name(key[1:]) for key, _ in view.scan_counters(accounting.KS, b"n"))
                if rest == b"snapshots"
            ]
            out["namespaces"] = {ns: savings_of(read_counters(view, ns)) for ns in names}
            out["backend"] = self.backend.info()
            return out

    # ------------------------------------------------------------------ deletion and eviction

    def _drop_snapshot(
        self, b: WriteBatch, ledger: Ledger, namespace: str, session: str, domain: str, mkey: bytes
    ) -> int:
        """Delete one manifest and its references; returns the number of segments freed."""
        raw = b.get("manifests", mkey)
        if raw is None:
            return 0
        try:
            m = Manifest.decode(raw, snapshot_id(namespace, session, turn_of_manifest_key(mkey)))
        except (ChecksumMismatch, FormatError):
            # Its segments and sizes are unknown: set it aside; `verify --repair` recounts.
            quarantine(b, b"manifest", mkey, raw)
            b.delete("manifests", mkey)
            return 0
        ledger.add("manifest_bytes", -(len(mkey) + len(raw)), namespace=namespace)
        b.delete("manifests", mkey)
        freed = 0
        for seg in m.segments:
            bkey = block_key(domain, seg.key)
            try:  # a payload lost in a Redis failover raises here too
                head = _block_head(b, bkey, seg.hex, seg.end - seg.start)
                if head is None:
                    raise ChecksumMismatch(seg.hex, "a stored block", "no block (dangling reference)")
                meta = head[0]
            except ChecksumMismatch:
                # A damaged or lost record stays local: moved out of the blocks (never served or
                # deduplicated against again), its references and counters left for
                # `deltastore verify --repair`, every intact segment freed as usual.
                quarantine(b, b"block", bkey, b"")
                b.delete("blocks", bkey)  # reads no payload; a no-op when the record is gone
                continue
            freed += self._ref(b, ledger, namespace, session, domain, seg.key, meta, -1)[1]
        ledger.add("logical", -m.fp16_nbytes, namespace=namespace)
        ledger.add("snapshots", -1, namespace=namespace)
        return freed

    def _remove_session_record(self, b: WriteBatch, ledger: Ledger, namespace: str, session: str) -> None:
        skey = session_key(namespace, session)
        raw = b.get("sessions", skey)
        if raw is None:
            return
        rec = SessionRecord.decode(raw)
        lkey = lru_key(rec.last_access_ms, namespace, session)
        ledger.add("index_bytes", -(len(skey) + len(raw) + len(lkey)), namespace=namespace)
        ledger.add("sessions", -1, namespace=namespace)
        b.delete("sessions", skey)
        b.delete("sessions", lkey)

    def _drop_session(self, b: WriteBatch, ledger: Ledger, namespace: str, session: str) -> tuple[int, int]:
        """Delete a session, all its snapshots and what only they referenced: (snapshots, freed)."""
        skey = session_key(namespace, session)
        raw = b.get("sessions", skey)
        if raw is None:
            return 0, 0
        try:
            domain = SessionRecord.decode(raw).domain
        except (ValueError, struct.error):  # FormatError, or a truncated record
            # Domain unknown, so its references cannot be dropped: set the record aside with its
            # LRU entry (eviction moves on to the next session); `verify --repair` drops the rest.
            quarantine(b, b"session", skey, raw)
            b.delete("sessions", skey)
            lru = [k for k, _ in b.scan("sessions", b"t") if split_lru_key(k)[1:] == (namespace, session)]
            for key in lru:
                b.delete("sessions", key)
            return 0, 0
        mkeys = [k for k, _ in b.scan("manifests", session_prefix(namespace, session))]
        freed = 0
        for mkey in mkeys:
            freed += self._drop_snapshot(b, ledger, namespace, session, domain, mkey)
        self._remove_session_record(b, ledger, namespace, session)
        return len(mkeys), freed

    def delete_snapshot(self, namespace: str, session: str, turn: int) -> DeleteResult:
        """Delete one snapshot; frees exactly the segments no other snapshot references."""
        check_name("namespace", namespace)
        check_session(session)
        check_turn(turn)

        def tx(b: WriteBatch) -> DeleteResult:
            ledger = Ledger()
            rec = self._live_session(b, namespace, session)
            mkey = manifest_key(namespace, session, turn)
            if rec is None or b.get("manifests", mkey) is None:
                raise NotFound(f"snapshot {snapshot_id(namespace, session, turn)} not found")
            freed = self._drop_snapshot(b, ledger, namespace, session, rec.domain, mkey)
            if rec.n_snapshots <= 1:
                self._remove_session_record(b, ledger, namespace, session)
            else:
                self._update_session(b, namespace, session, rec.last_access_ms, -1)
            result = DeleteResult(1, freed, -ledger.stored_delta())
            ledger.flush(b)
            return result

        return self.backend.transact(tx)

    def delete_session(self, namespace: str, session: str) -> DeleteResult:
        """Delete every snapshot of a session; frees exactly the segments only it referenced."""
        check_name("namespace", namespace)
        check_session(session)

        def tx(b: WriteBatch) -> DeleteResult:
            ledger = Ledger()
            if self._live_session(b, namespace, session) is None:
                raise NotFound(f"session {namespace}/{session} not found")
            snapshots, freed = self._drop_session(b, ledger, namespace, session)
            result = DeleteResult(snapshots, freed, -ledger.stored_delta())
            ledger.flush(b)
            return result

        return self.backend.transact(tx)

    def _expire_tx(
        self, b: WriteBatch, now: int, limit: int, keep: tuple[str, str] | None
    ) -> list[tuple[str, str]]:
        """Delete up to ``limit`` sessions idle past the TTL (oldest first), except ``keep``."""
        ttl = self.config.session_ttl_s
        if ttl is None or limit <= 0:
            return []
        cutoff = now - int(ttl * 1000)
        victims: list[tuple[str, str]] = []
        for key, _ in b.scan("sessions", b"t"):
            last_access, ns, sess = split_lru_key(key)
            if last_access >= cutoff or len(victims) >= limit:
                break
            if (ns, sess) != keep:
                victims.append((ns, sess))
        ledger = Ledger()
        for ns, sess in victims:
            self._drop_session(b, ledger, ns, sess)
        ledger.flush(b)
        return victims

    def _make_room(self, b: WriteBatch, namespace: str, session: str) -> list[tuple[str, str]]:
        """Evict whole sessions (never this one) until within the namespace quota and capacity.

        Over its quota, a namespace loses its own least recently used sessions. Over capacity,
        the namespace that stores the most loses its least recently used session first, so a
        tenant writing a lot evicts itself before it evicts anyone else.
        """
        evicted: list[tuple[str, str]] = []
        keep = (namespace, session)
        quota = self.config.namespace_quota_bytes
        while quota is not None and accounting.stored_bytes(read_counters(b, namespace)) > quota:
            victim = self._lru_victims(b, keep).get(namespace)
            if victim is None:
                raise StoreFull(
                    f"namespace {namespace!r} is over its quota of {quota} stored bytes even after "
                    "evicting its other sessions",
                    hint="raise DELTASTORE_NAMESPACE_QUOTA_BYTES, delete sessions, or use a stronger codec tier",
                )
            evicted.append(self._evict(b, victim))
        limit = self.config.max_stored_bytes
        while limit is not None and accounting.stored_bytes(read_counters(b)) > limit:
            candidates = self._lru_victims(b, keep)
            if not candidates:
                raise StoreFull(
                    f"snapshot does not fit in max_stored_bytes={limit} even after evicting every other session",
                    hint="raise DELTASTORE_MAX_STORED_BYTES, or use a stronger codec tier",
                )
            biggest = max(
                candidates, key=lambda ns: (accounting.stored_bytes(read_counters(b, ns)), -candidates[ns][2])
            )
            evicted.append(self._evict(b, candidates[biggest]))
        return evicted

    @staticmethod
    def _lru_victims(b: WriteBatch, keep: tuple[str, str]) -> dict[str, tuple[str, str, int]]:
        """Per namespace, its least recently used session other than ``keep``: (ns, session, rank)."""
        out: dict[str, tuple[str, str, int]] = {}
        for rank, (key, _) in enumerate(b.scan("sessions", b"t")):
            _, ns, sess = split_lru_key(key)
            if (ns, sess) != keep and ns not in out:
                out[ns] = (ns, sess, rank)
        return out

    def _evict(self, b: WriteBatch, victim: tuple[str, str, int]) -> tuple[str, str]:
        ledger = Ledger()
        self._drop_session(b, ledger, victim[0], victim[1])
        ledger.flush(b)
        return victim[0], victim[1]

    def expire_sessions(self, limit: int | None = None) -> list[tuple[str, str]]:
        """Delete sessions idle longer than ``session_ttl_s`` now; returns (namespace, session)s."""
        now = self._now_ms()
        return self.backend.transact(lambda b: self._expire_tx(b, now, limit or (1 << 62), None))
