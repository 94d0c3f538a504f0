"""The store: snapshots as manifests of immutable, refcounted, BLAKE3-addressed segments.

One :class:`Store`, cut by concept into modules over one base (the backend, policy and clock):

- :mod:`.writes`: plan and put; segments, the dedup domain, the put transaction.
- :mod:`.reads`: streamed, verified reads; prefixes, lookups, listings, savings.
- :mod:`.lifecycle`: deletes, TTL expiry, LRU eviction, quotas.
- :mod:`.refcounts`: references and their counters, block headers, quarantine of damage.
- :mod:`.results`: the records operations take and return.

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
"""

from deltastore.manifest import QUARANTINE_PREFIX
from deltastore.store.facade import Store
from deltastore.store.results import (
    DeleteResult,
    Plan,
    PlannedSegment,
    PutResult,
    SegmentPayload,
    Snapshot,
    SnapshotInfo,
    SnapshotStream,
    StoredSegment,
)

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
