"""Planning and storing snapshots: segments, the dedup domain, and the put transaction.

A snapshot (namespace, session, turn) is a manifest listing segments (see
:mod:`deltastore.addressing`): full aligned blocks, which any session of the same dedup domain,
model and codec shares, then the tail, made of the parent turn's tail segments plus one delta
segment of the new tokens. A client asks :meth:`Writes.plan_snapshot` which segments are
missing, encodes only those, and hands them to :meth:`Writes.put_snapshot`, which re-plans inside
its write transaction and stores blocks, refcounts, manifest, session and counters atomically,
then expires and evicts other sessions as the policy asks (:mod:`.lifecycle`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from deltastore.accounting import Ledger
from deltastore.addressing import KEY_BYTES, Chain, Key, Segment, check_key, seed, token_bytes
from deltastore.backend import ReadView, WriteBatch
from deltastore.errors import AlreadyExists, InvalidArgument, MismatchError, MissingSegments, NotFound
from deltastore.manifest import (
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
    lru_key,
    manifest_key,
    payload_digest,
    seal_block,
    session_key,
)
from deltastore.store.lifecycle import Lifecycle
from deltastore.store.refcounts import block_head, ref
from deltastore.store.results import Plan, PlannedSegment, PutResult, SegmentPayload, snapshot_id

__all__ = ["Writes"]


class Writes(Lifecycle):
    """Plan and put snapshots (a put may expire and evict other sessions, hence the base)."""

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
        _check_ids(namespace, session, model, codec, parent_turn)
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
                    head = block_head(view, domain, seg.key, seg.n_tokens)
                    size = 0 if head is None else head[0].payload_nbytes
                    planned.append(PlannedSegment(seg.start, seg.end, seg.key, head is not None, size))
        return Plan(
            namespace, session, model, codec, block_size, len(tokens) // 4, parent_turn, tuple(planned)
        )

    def put_snapshot(
        self,
        namespace: str,
        session: str,
        turn: int,
        model: str,
        codec: str,
        token_ids: Sequence[int],
        payloads: Mapping[bytes, SegmentPayload],
        parent_turn: int | None = None,
    ) -> PutResult:
        """Store a snapshot from the payloads of the segments its plan reported missing.

        ``payloads`` maps each segment's key (32 raw bytes, as the plan gives it) to its payload.
        Re-plans inside the write transaction: a segment stored meanwhile by someone else is
        reused (its payload here ignored); one neither stored nor supplied raises
        MissingSegments and nothing is written. Re-putting an identical snapshot is a no-op
        (``existed``); a different one under the same turn raises AlreadyExists.
        """
        _check_ids(namespace, session, model, codec, parent_turn)
        check_turn(turn)
        if parent_turn is not None and parent_turn == turn:
            raise InvalidArgument("a snapshot cannot be its own parent")
        tokens = token_bytes(token_ids)
        if not tokens:
            raise InvalidArgument("a snapshot needs at least one token")
        supplied: dict[Key, SegmentPayload] = {}
        for raw_key, p in payloads.items():
            key = check_key(raw_key)
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
            head = block_head(b, domain, seg.key, seg.n_tokens)  # no payload read for reuse
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
            session_had, _ = ref(b, ledger, namespace, session, domain, seg.key, meta, +1)
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


def _check_ids(namespace: str, session: str, model: str, codec: str, parent_turn: int | None) -> None:
    check_name("namespace", namespace)
    check_session(session)
    check_label("model fingerprint", model)
    check_label("codec spec", codec)
    if parent_turn is not None:
        check_turn(parent_turn)
