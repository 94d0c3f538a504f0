"""The distributed backend: Redis (standalone or Cluster) or Valkey, behind the Backend interface.

How the interface's guarantees are kept on an engine without multi-key transactions across
nodes or snapshot reads (one module per part):

- Placement (:mod:`.payloads`). Everything the store changes in one transaction (records,
  refcounts, the LRU index and the store-wide counters) lives under one hash tag ``{prefix}``,
  so one node's Lua commits it atomically. Only values of the ``blocks`` keyspace (the
  payloads: nearly every byte) are stored *out of line*, each under a data key with its own
  random hash tag, so they spread over every node of a cluster; the metadata slot holds the
  data key's name. The trade-off: a store's metadata (a few hundred bytes per segment and
  snapshot) is bounded by one node and one core, its payloads are not. Run one store per key
  prefix to spread metadata.
- Writes (:mod:`.commit`). Writers serialize per store on a leased lock (redis-py's Lock) and
  commit with one Lua script (:mod:`.scripts`) that checks the lock token (fencing: a writer
  whose lease expired commits nothing and runs ``fn`` again, within bounds), applies every write
  as a new version and releases the lock. A snapshot is visible whole or not at all, refcounts
  and counters change only with the data, and a retried put is an idempotent no-op at the
  store level.
- Reads (:mod:`.views`). ``read()`` registers a view at the current commit sequence S (with a
  lease); while any view is open, commits keep the versions they replace, and the view reads
  values as of S. History is trimmed once no open view is older, and never kept while no view
  is open. Payloads replaced or freed are deleted only after that, so a view never sees a
  dangling data key. A view open longer than its lease fails with BackendUnavailable (retry
  the call). Why views stay although blocks are immutable: see :mod:`.views`.
- Failures (:mod:`.errors`). Connection loss, a cluster slot without a live node, a loading or
  read-only replica raise :class:`~deltastore.errors.BackendUnavailable` (gRPC UNAVAILABLE) after
  redis-py's own short retry (:mod:`.config`); Redis out of memory raises StoreFull. A missing
  data key behind a committed pointer (a node that came back without its data) raises
  ChecksumMismatch: never wrong bytes.
- Durability is Redis's: run it with ``appendonly yes`` and ``appendfsync always`` for every
  acknowledged put to survive a crash of Redis itself (``everysec`` may lose the last second),
  and ``maxmemory-policy noeviction`` (checked at open on every primary: an evicting Redis
  would drop records). Replication is asynchronous: with ``wait_replicas=N`` a commit is
  acknowledged only once N replicas of the metadata node have it (WAIT), so a failover keeps
  it; payload keys on other nodes are not waited for (a payload lost in a failover reads as
  ChecksumMismatch, never as wrong bytes).

URLs: ``redis://[user:pass@]host:port[/db]``, ``rediss://`` (TLS), and
``redis+cluster://host:port[,host:port...]`` (``rediss+cluster://`` with TLS). Query options:
``prefix`` (default ``deltastore``), ``lock_lease_ms`` (15000), ``lock_wait_s`` (60),
``view_lease_ms`` (60000), ``timeout_s`` (socket timeout, 10), ``payload_cache_mb`` (64),
``wait_replicas`` (0), ``wait_timeout_ms`` (1000) and ``max_attempts`` (5: tries of one
transaction whose lease ran out, also bounded by ``lock_wait_s`` and the call's deadline).
Open it with :func:`deltastore.backends.open_backend`.
"""

from __future__ import annotations

from deltastore.backends.redis.backend import REDIS_FORMAT, RedisBackend
from deltastore.backends.redis.config import SCHEMES, RedisConfig

__all__ = ["REDIS_FORMAT", "SCHEMES", "RedisBackend", "RedisConfig"]
