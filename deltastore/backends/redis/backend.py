"""The Redis backend object: opens the store under its prefix and hands out views and transactions.

Why its own module: opening (client, server checks, layout version) and the operator's calls
(info, stray payloads, destroy) are the backend's face; the protocol it fronts lives in
views.py (reads), commit.py (writes), payloads.py and scripts.py.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from typing import Any, TypeVar
from urllib.parse import urlsplit

import redis.exceptions as rex
from redis.cluster import RedisCluster

from deltastore.backend import Backend, ReadView, WriteBatch
from deltastore.backends.redis.commit import Writer
from deltastore.backends.redis.config import RedisConfig, connect
from deltastore.backends.redis.errors import redis_errors
from deltastore.backends.redis.payloads import OUT_OF_LINE, Payloads, delete_keys
from deltastore.backends.redis.scripts import HDR_DIGITS as _HDR
from deltastore.backends.redis.scripts import Scripts
from deltastore.backends.redis.views import Metadata
from deltastore.errors import IncompatibleFormat, InvalidArgument

__all__ = ["REDIS_FORMAT", "RedisBackend"]

REDIS_FORMAT = b"deltastore-redis/1"
T = TypeVar("T")


def _as_bytes(value: Any) -> bytes:
    """A Redis reply item (bytes; str only if a client decodes responses) as bytes."""
    return value.encode() if isinstance(value, str) else bytes(value)


class RedisBackend(Backend):
    """A store's keyspaces in Redis or Redis Cluster; see :mod:`deltastore.backends.redis`.

    Several processes (``deltastore serve`` replicas) may open one URL and prefix at once: they
    share the data, writers serialize on the store's lock, readers never wait.
    """

    name = "redis"

    def __init__(self, config: RedisConfig) -> None:
        self.config = config
        self.prefix = config.prefix
        self.tag = tag = "{" + config.prefix + "}"
        self.seq_key = f"{tag}:seq"
        self.client = connect(config)
        self.payloads = Payloads(self.client, config.prefix, config.payload_cache_mb << 20)
        self.meta = Metadata(self.client, tag, Scripts(self.client, self.seq_key, tag), self.payloads)
        self.writer = Writer(config, self.meta)
        self._check_server()

    @classmethod
    def from_url(cls, url: str) -> RedisBackend:
        return cls(RedisConfig.from_url(url))

    def _check_server(self) -> None:
        with redis_errors("open"):
            # CONFIG may be disabled on managed services; then the operator's word is taken.
            try:
                if self.config.cluster:  # every primary: one evicting node drops records too
                    per_node = self.client.config_get("maxmemory-policy", target_nodes=RedisCluster.PRIMARIES)
                    values = {v.get("maxmemory-policy") for v in per_node.values()}
                else:
                    values = {self.client.config_get("maxmemory-policy").get("maxmemory-policy")}
            except rex.ResponseError:
                values = set()
            evicting = sorted(v for v in values if v and v != "noeviction")
            if evicting:
                raise InvalidArgument(
                    f"Redis evicts keys (maxmemory-policy {', '.join(evicting)}): it would drop store records",
                    hint="set maxmemory-policy noeviction on every node; DeltaStore evicts whole sessions itself",
                )
            found = self.client.set(f"{self.tag}:format", REDIS_FORMAT, nx=True, get=True)
        if found is not None and bytes(found) != REDIS_FORMAT:
            raise IncompatibleFormat(
                f"Redis prefix {self.prefix!r} holds layout {bytes(found)!r}; this build reads {REDIS_FORMAT!r}",
                hint="upgrade deltastore, or choose another ?prefix= in the backend URL",
            )

    @contextmanager
    def read(self) -> Iterator[ReadView]:
        view = self.meta.open_view(self.config.view_lease_ms)
        try:
            yield view
        finally:
            self.meta.close_view(view)

    def transact(self, fn: Callable[[WriteBatch], T]) -> T:
        """Run ``fn`` under the write lock and commit (:meth:`Writer.transact`: bounded retries)."""
        return self.writer.transact(fn)

    # ------------------------------------------------------------------ operations

    def stray_values(self) -> list[str]:
        """Payload keys under this prefix that no version, intent or free-set entry names.

        Read in this order so that a concurrent writer's keys are never reported: the data keys
        first (a writer records its intent before it writes one), then the intents, the current
        pointers, the history and the free set (a commit moves a name from the intents to the
        pointers, a replacement from the pointers to the history or the free set).
        """
        tag, client = self.tag, self.client
        with redis_errors("listing payload keys"):
            found = {_as_bytes(k) for k in client.scan_iter(match=self.payloads.pattern, count=1000)}
            if not found:
                return []
            named = {_as_bytes(k) for k in client.hkeys(f"{tag}:pend")}
            for ks in sorted(OUT_OF_LINE):
                named.update(_as_bytes(v)[_HDR:] for _, v in client.hscan_iter(f"{tag}:v:{ks}"))
                for key in client.zrange(f"{tag}:hk:{ks}", 0, -1):
                    for member in client.zrange(f"{tag}:H:{ks}:".encode() + _as_bytes(key), 0, -1):
                        named.add(_as_bytes(member)[2 * _HDR :])
            named.update(_as_bytes(m) for m in client.smembers(self.writer.free_key))
        return sorted(name.decode() for name in found - named)

    def remove_stray_values(self, names: list[str]) -> int:
        stray = set(self.stray_values())  # only what is still unreferenced
        doomed = [n for n in names if n in stray]
        with redis_errors("removing stray payload keys"):
            delete_keys(self.client, doomed)
        return len(doomed)

    def info(self) -> dict[str, Any]:
        self.meta.check("meta")
        tag, cluster = self.tag, self.config.cluster
        with redis_errors("info"):
            pipe = self.client.pipeline(transaction=False)
            pipe.hlen(f"{tag}:v:blocks")
            pipe.get(self.seq_key)
            pipe.zcard(f"{tag}:rs")
            pipe.zcard(f"{tag}:T")
            pipe.scard(self.writer.free_key)
            blocks, seq, views, history, free = pipe.execute()
            if cluster:
                memory = self.client.info("memory", target_nodes=RedisCluster.PRIMARIES)
            else:
                memory = self.client.info("memory")
        if cluster:
            used = sum(int(m.get("used_memory", 0)) for m in memory.values() if isinstance(m, dict))
            nodes = sorted(memory)
        else:
            used = int(memory.get("used_memory", 0))
            nodes = [urlsplit(self.config.url).netloc.rpartition("@")[2]]
        return {
            "backend": self.name,
            "mode": "cluster" if cluster else "standalone",
            "nodes": nodes,
            "prefix": self.prefix,
            "used_memory_bytes": used,
            "blocks": int(blocks),
            "commit_seq": int(seq or 0),
            "open_views": int(views),
            "history_entries": int(history),
            "free_payloads": int(free),
            "lock_lease_ms": self.config.lock_lease_ms,
        }

    def destroy(self) -> int:
        """Delete every key of this store (metadata and payloads); returns how many. Irreversible."""
        self.meta.check("meta")
        removed = 0
        with redis_errors("destroy"):
            for pattern in (f"{self.tag}:*", self.payloads.pattern):
                batch: list[bytes] = []
                for name in self.client.scan_iter(match=pattern, count=1000):
                    batch.append(name)
                    if len(batch) >= 1000:
                        delete_keys(self.client, batch)
                        removed += len(batch)
                        batch = []
                delete_keys(self.client, batch)
                removed += len(batch)
        return removed

    def close(self) -> None:
        if self.meta.closed:
            return
        self.meta.closed = True
        with suppress(rex.RedisError):
            self.client.close()
