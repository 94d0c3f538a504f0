"""Reading snapshots back: streamed and verified payloads, prefixes, lookups and listings.

Reads never trust what is stored: each payload's BLAKE3 digest is checked as it is read and the
segment keys are recomputed from the stored token ids, so damage raises ChecksumMismatch and is
never served. A stream reads each payload in a short read transaction of its own, so no read
transaction lives as long as a slow client (long LMDB read transactions make the file grow).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TypeVar

from deltastore import accounting
from deltastore.accounting import SavingsReport, read_counters, savings_of
from deltastore.addressing import Chain, Key, check_key, seed, token_bytes, tokens_from_bytes
from deltastore.backend import ReadView
from deltastore.errors import ChecksumMismatch, MismatchError, NotFound
from deltastore.manifest import (
    Manifest,
    block_key,
    check_label,
    check_name,
    check_session,
    check_turn,
    decode_block,
    manifest_key,
    ns_prefix,
    session_prefix,
    split_name,
    split_session_prefix,
    turn_of_manifest_key,
)
from deltastore.store.base import StoreBase
from deltastore.store.refcounts import block_head
from deltastore.store.results import (
    PlannedSegment,
    Snapshot,
    SnapshotInfo,
    SnapshotStream,
    info_of,
    snapshot_id,
)

__all__ = ["Reads"]

T = TypeVar("T")


class Reads(StoreBase):
    """Snapshots, prefixes and listings read back; savings figures."""

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
                head = block_head(view, rec.domain, seg.key, seg.n_tokens)
                if head is None:
                    raise ChecksumMismatch(seg.hex, "a stored block", "no block (dangling reference)")
                meta, toks = head
                if meta.n_tokens != seg.n_tokens:
                    raise ChecksumMismatch(seg.hex, f"{seg.n_tokens} token ids", f"{meta.n_tokens}")
                token_parts.append(bytes(toks))
                sizes.append(
                    PlannedSegment(seg.start, seg.end, seg.key, True, meta.payload_nbytes, bytes(meta.digest))
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
                block = view.get("blocks", block_key(rec.domain, seg.key))
                if block is None:
                    if view.get("manifests", mkey) is None:
                        raise NotFound(f"snapshot {sid} was deleted while it was read")
                    raise ChecksumMismatch(seg.key.hex(), "a stored block", "no block (dangling reference)")
                meta, _, payload = decode_block(block, seg.key.hex())
                return use(meta.fp16_nbytes, payload)

        return SnapshotStream(
            info_of(namespace, session, turn, m), tokens_from_bytes(tokens), tuple(sizes), read
        )

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
                    out.append(info_of(ns, sess, turn, Manifest.decode(raw, snapshot_id(ns, sess, turn))))
        return out

    def has_blocks(self, namespace: str, keys: Sequence[bytes]) -> list[bool]:
        """Whether each segment key (32 raw bytes) is stored in this namespace's dedup domain."""
        check_name("namespace", namespace)
        domain = self.config.domain(namespace)
        parsed = [check_key(k) for k in keys]
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
        start: int = 0,
    ) -> SnapshotStream:
        """The stored leading segments of these tokens, without a session (what LookupPrefix counts).

        The chain is computed here from the caller's namespace (its dedup domain), model and codec,
        so only blocks of that domain can match. Whole aligned blocks, then the rest as one stored
        segment, up to ``max_tokens`` (None: all). Each block's stored token ids must equal the
        requested ones (ChecksumMismatch otherwise); payloads are verified as they are read, as by
        :meth:`open_snapshot`. Nothing matching yields a stream with no segments. ``start``: only
        the segments ending after that token are streamed (the caller holds the ones before); every
        matched block is still looked up and its token ids checked, so the match is the same.
        """
        check_name("namespace", namespace)
        check_label("model fingerprint", model)
        check_label("codec spec", codec)
        ids = list(token_ids) if max_tokens is None else list(token_ids)[: max(0, max_tokens)]
        tokens = token_bytes(ids)
        domain, bs = self.config.domain(namespace), self.config.block_size
        chain = Chain(seed(domain, model, codec, bs), tokens, bs)
        found: list[PlannedSegment] = []
        seg_fp16: dict[Key, int] = {}

        def take(view: ReadView, start: int, end: int, key: Key) -> bool:
            head = block_head(view, domain, key, end - start)
            if head is None:
                return False
            meta, toks = head
            if bytes(toks) != tokens[4 * start : 4 * end]:
                raise ChecksumMismatch(key.hex(), "the requested token ids", "other stored token ids")
            found.append(PlannedSegment(start, end, key, True, meta.payload_nbytes, bytes(meta.digest)))
            seg_fp16[key] = meta.fp16_nbytes
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
        found = [seg for seg in found if seg.end > start]
        fp16_total = sum(seg_fp16[seg.key] for seg in found)

        def read(seg: PlannedSegment, use: Callable[[int, memoryview], T]) -> T:
            with self.backend.read() as view:
                block = view.get("blocks", block_key(domain, seg.key))
                if block is None:
                    raise NotFound(f"prefix block {seg.key.hex()} was evicted while it was read")
                meta, _, payload = decode_block(block, seg.key.hex())
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
