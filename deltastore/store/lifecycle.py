"""How snapshots and sessions leave the store: deletes, TTL expiry, LRU eviction and quotas.

Every way out goes through the same refcounts as a put (:func:`.refcounts.ref`), one session per
step: a segment shared with a surviving session stays, exactly the segments nothing references
any more are freed, and no manifest ever points at a freed block. Damaged records met on the way
are quarantined (:func:`.refcounts.quarantine`), so eviction moves on and ``verify --repair``
finishes the job.

Capacity policy: over its quota a namespace loses its own least recently used sessions; over
the store's capacity the namespace that stores the most loses its least recently used session
first. The session being written is never evicted by its own put.
"""

from __future__ import annotations

import struct
from collections import deque

from deltastore import accounting
from deltastore.accounting import Ledger, read_counters
from deltastore.backend import WriteBatch
from deltastore.errors import ChecksumMismatch, FormatError, NotFound, StoreFull
from deltastore.manifest import (
    Manifest,
    SessionRecord,
    block_key,
    check_name,
    check_session,
    check_turn,
    lru_key,
    manifest_key,
    session_key,
    session_prefix,
    split_lru_key,
    split_name,
    turn_of_manifest_key,
)
from deltastore.store.base import StoreBase
from deltastore.store.refcounts import block_head, quarantine, ref
from deltastore.store.results import DeleteResult, snapshot_id

__all__ = ["Lifecycle"]


class Lifecycle(StoreBase):
    """Deleting snapshots and sessions, expiring idle sessions, evicting for quotas and capacity."""

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
            try:  # a payload lost in a Redis failover raises here too
                head = block_head(b, domain, seg.key, seg.n_tokens)
                if head is None:
                    raise ChecksumMismatch(seg.hex, "a stored block", "no block (dangling reference)")
                meta = head[0]
            except ChecksumMismatch:
                # A damaged or lost record stays local: moved out of the blocks (never served or
                # deduplicated against again), its references and counters left for
                # `deltastore verify --repair`, every intact segment freed as usual.
                bkey = block_key(domain, seg.key)
                quarantine(b, b"block", bkey, b"")
                b.delete("blocks", bkey)  # reads no payload; a no-op when the record is gone
                continue
            freed += ref(b, ledger, namespace, session, domain, seg.key, meta, -1)[1]
        ledger.add("logical", -m.fp16_nbytes, namespace=namespace)
        ledger.add("snapshots", -1, namespace=namespace)
        return freed

    @staticmethod
    def _remove_session_record(b: WriteBatch, ledger: Ledger, namespace: str, session: str) -> None:
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

    def expire_sessions(self, limit: int | None = None) -> list[tuple[str, str]]:
        """Delete sessions idle longer than ``session_ttl_s`` now; returns (namespace, session)s."""
        now = self._now_ms()
        return self.backend.transact(lambda b: self._expire_tx(b, now, limit or (1 << 62), None))

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
        lru = _LruFront(b, keep)
        quota = self.config.namespace_quota_bytes
        while quota is not None and accounting.stored_bytes(read_counters(b, namespace)) > quota:
            victim = lru.oldest_of({namespace})
            if victim is None:
                raise StoreFull(
                    f"namespace {namespace!r} is over its quota of {quota} stored bytes even after "
                    "evicting its other sessions",
                    hint="raise DELTASTORE_NAMESPACE_QUOTA_BYTES, delete sessions, or use a stronger codec tier",
                )
            evicted.append(self._evict(b, lru, victim))
        limit = self.config.max_stored_bytes
        while limit is not None and accounting.stored_bytes(read_counters(b)) > limit:
            # The namespaces the counters say have a session to lose; the index decides which.
            stored = {ns: accounting.stored_bytes(read_counters(b, ns)) for ns in _evictable(b, keep)}
            top = max(stored.values(), default=None)
            victim = lru.oldest_of({ns for ns, n in stored.items() if n == top})
            if victim is None:  # the counters and the index disagree (a quarantined session record)
                oldest = lru.oldest_per_namespace()
                if not oldest:
                    raise StoreFull(
                        f"snapshot does not fit in max_stored_bytes={limit} even after evicting every other session",
                        hint="raise DELTASTORE_MAX_STORED_BYTES, or use a stronger codec tier",
                    )
                ns = max(
                    oldest, key=lambda ns: (accounting.stored_bytes(read_counters(b, ns)), -oldest[ns][1])
                )
                victim = (ns, oldest[ns][0])
            evicted.append(self._evict(b, lru, victim))
        return evicted

    def _evict(self, b: WriteBatch, lru: _LruFront, victim: tuple[str, str]) -> tuple[str, str]:
        ledger = Ledger()
        self._drop_session(b, ledger, *victim)
        ledger.flush(b)
        lru.evicted(victim)
        return victim


def _evictable(b: WriteBatch, keep: tuple[str, str]) -> list[str]:
    """Namespaces whose session counter shows a session other than ``keep``."""
    out = []
    for key, count in b.scan_counters(accounting.KS, b"n"):
        name, rest = split_name(bytes(key)[1:])
        if rest == b"sessions" and count > (1 if name == keep[0] else 0):
            out.append(name)
    return out


class _LruFront:
    """The LRU index (oldest first) as the evictions of one put read it; ``keep`` is never offered.

    A victim is usually among the oldest sessions, so a lookup scans the index only up to it.
    Once one put's lookups have scanned as many entries as the index had at the start, the next
    lookup reads the whole index once into per-namespace queues and later ones read nothing:
    O(victim's position) per eviction, O(sessions + evictions) per put at most.
    """

    def __init__(self, b: WriteBatch, keep: tuple[str, str]) -> None:
        self._b = b
        self._keep = keep
        self._budget = read_counters(b)["sessions"]
        self._queues: dict[str, deque[tuple[str, int]]] | None = None

    def oldest_of(self, namespaces: set[str]) -> tuple[str, str] | None:
        """The least recently used session of these namespaces, or None when they have none."""
        if self._queues is None and self._budget > 0:
            for key, _ in self._b.scan("sessions", b"t"):
                self._budget -= 1
                _, ns, sess = split_lru_key(key)
                if ns in namespaces and (ns, sess) != self._keep:
                    return ns, sess
            return None
        heads = [(q[0][1], ns, q[0][0]) for ns, q in self._read_all().items() if ns in namespaces and q]
        return min(heads)[1:] if heads else None

    def oldest_per_namespace(self) -> dict[str, tuple[str, int]]:
        """Per namespace, its least recently used session and that session's rank in the index."""
        return {ns: q[0] for ns, q in self._read_all().items() if q}

    def evicted(self, victim: tuple[str, str]) -> None:
        """Forget a session just evicted (it was the oldest of its namespace)."""
        if self._queues is not None:
            self._queues[victim[0]].popleft()

    def _read_all(self) -> dict[str, deque[tuple[str, int]]]:
        if self._queues is None:
            self._queues = {}
            for rank, (key, _) in enumerate(self._b.scan("sessions", b"t")):
                _, ns, sess = split_lru_key(key)
                if (ns, sess) != self._keep:
                    self._queues.setdefault(ns, deque()).append((sess, rank))
        return self._queues
