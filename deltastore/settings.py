"""Store configuration, and the one place that reads ``DELTASTORE_*`` environment variables.

| variable | meaning | default |
|---|---|---|
| ``DELTASTORE_DATA_DIR`` | LMDB directory | ``./data`` |
| ``DELTASTORE_BLOCK_SIZE`` | tokens per aligned block (new sessions) | 64 |
| ``DELTASTORE_MAX_STORED_BYTES`` | capacity; past it, the LRU session of the namespace storing the most is evicted | unlimited |
| ``DELTASTORE_NAMESPACE_QUOTA_BYTES`` | stored bytes per namespace; past it, that namespace's own LRU sessions are evicted | unlimited |
| ``DELTASTORE_SESSION_TTL_S`` | sessions idle longer than this expire | never |
| ``DELTASTORE_SHARED_NAMESPACES`` | ``ns=group,ns2=group``: namespaces that dedup together | none |
| ``DELTASTORE_LMDB_MAP_SIZE`` | initial LMDB map size, bytes | 1 GiB |
| ``DELTASTORE_LMDB_MAX_MAP_SIZE`` | the map never grows past this | 256 GiB |
| ``DELTASTORE_LMDB_SYNC`` | ``1``: fdatasync per commit (power-loss safe); ``0``: kill -9 safe only | 1 |
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from deltastore.addressing import DEFAULT_BLOCK_SIZE, MAX_BLOCK_SIZE
from deltastore.backends.lmdb_backend import LmdbConfig
from deltastore.errors import InvalidArgument
from deltastore.manifest import check_name

__all__ = ["Settings", "StoreConfig", "load_settings"]


@dataclass(frozen=True)
class StoreConfig:
    """Policy of a :class:`~deltastore.store.Store`.

    Attributes:
        block_size: tokens per aligned block for new sessions (see :mod:`deltastore.addressing`).
        max_stored_bytes: capacity in stored bytes (payloads, manifests, index); a put that
            would exceed it evicts whole sessions: the least recently used session of the
            namespace that stores the most (so one tenant cannot evict every other). None:
            unlimited.
        namespace_quota_bytes: stored bytes one namespace may hold (as if stored alone); a put
            past it evicts that namespace's own least recently used sessions, never another's,
            or fails with StoreFull. None: unlimited.
        session_ttl_s: a session not read or written for this many seconds expires (it reads
            as absent and is deleted by the next puts or by ``expire_sessions``). None: never.
        shared_groups: namespace -> dedup group; namespaces of one group dedup against each
            other. Every other namespace dedups only within itself (tenants never see each
            other's blocks, not even as a plan's ``present`` flag).
        touch_interval_s: reads refresh a session's LRU clock at most this often (each refresh
            is a durable write).
        expire_batch: expired sessions deleted per put, at most (bounds a put's latency).
    """

    block_size: int = DEFAULT_BLOCK_SIZE
    max_stored_bytes: int | None = None
    namespace_quota_bytes: int | None = None
    session_ttl_s: float | None = None
    shared_groups: Mapping[str, str] = field(default_factory=dict)
    touch_interval_s: float = 10.0
    expire_batch: int = 16

    def __post_init__(self) -> None:
        if not 1 <= self.block_size <= MAX_BLOCK_SIZE:
            raise InvalidArgument(f"block_size must be in [1, {MAX_BLOCK_SIZE}], got {self.block_size}")
        if self.max_stored_bytes is not None and self.max_stored_bytes <= 0:
            raise InvalidArgument("max_stored_bytes must be positive (or None for unlimited)")
        if self.namespace_quota_bytes is not None and self.namespace_quota_bytes <= 0:
            raise InvalidArgument("namespace_quota_bytes must be positive (or None for unlimited)")
        if self.session_ttl_s is not None and self.session_ttl_s <= 0:
            raise InvalidArgument("session_ttl_s must be positive (or None for never)")
        if self.touch_interval_s < 0 or self.expire_batch < 0:
            raise InvalidArgument("touch_interval_s and expire_batch must be >= 0")
        groups = dict(self.shared_groups)
        for ns, group in groups.items():
            check_name("namespace", ns)
            check_name("shared group", group)
        object.__setattr__(self, "shared_groups", groups)

    def domain(self, namespace: str) -> str:
        """The dedup domain of a namespace: itself, or ``shared:<group>``."""
        group = self.shared_groups.get(namespace)
        return f"shared:{group}" if group else namespace


@dataclass(frozen=True)
class Settings:
    """Everything a process needs to open the embedded store."""

    data_dir: Path
    store: StoreConfig
    lmdb: LmdbConfig


def _int(env: Mapping[str, str], name: str) -> int | None:
    raw = env.get(name, "").strip()
    if not raw:
        return None
    try:
        return int(raw)
    except ValueError:
        raise InvalidArgument(f"{name}={raw!r} is not an integer") from None


def _float(env: Mapping[str, str], name: str) -> float | None:
    raw = env.get(name, "").strip()
    if not raw:
        return None
    try:
        return float(raw)
    except ValueError:
        raise InvalidArgument(f"{name}={raw!r} is not a number") from None


def _groups(raw: str) -> dict[str, str]:
    groups: dict[str, str] = {}
    for item in filter(None, (part.strip() for part in raw.split(","))):
        ns, sep, group = item.partition("=")
        if not sep:
            raise InvalidArgument(f"DELTASTORE_SHARED_NAMESPACES entry {item!r} is not ns=group")
        groups[ns.strip()] = group.strip()
    return groups


def load_settings(data_dir: str | Path | None = None, env: Mapping[str, str] | None = None) -> Settings:
    """Settings from the environment; an explicit ``data_dir`` (e.g. ``--data-dir``) wins."""
    env = os.environ if env is None else env
    path = Path(data_dir or env.get("DELTASTORE_DATA_DIR", "") or "./data")
    store = StoreConfig(
        block_size=_int(env, "DELTASTORE_BLOCK_SIZE") or DEFAULT_BLOCK_SIZE,
        max_stored_bytes=_int(env, "DELTASTORE_MAX_STORED_BYTES"),
        namespace_quota_bytes=_int(env, "DELTASTORE_NAMESPACE_QUOTA_BYTES"),
        session_ttl_s=_float(env, "DELTASTORE_SESSION_TTL_S"),
        shared_groups=_groups(env.get("DELTASTORE_SHARED_NAMESPACES", "")),
    )
    lmdb_kwargs: dict[str, object] = {"path": path}
    if (size := _int(env, "DELTASTORE_LMDB_MAP_SIZE")) is not None:
        lmdb_kwargs["map_size"] = size
    if (size := _int(env, "DELTASTORE_LMDB_MAX_MAP_SIZE")) is not None:
        lmdb_kwargs["max_map_size"] = size
    if (sync := env.get("DELTASTORE_LMDB_SYNC", "").strip()) != "":
        lmdb_kwargs["sync"] = sync not in ("0", "false", "no")
    return Settings(data_dir=path, store=store, lmdb=LmdbConfig(**lmdb_kwargs))  # type: ignore[arg-type]
