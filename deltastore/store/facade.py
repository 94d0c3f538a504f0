"""The :class:`Store`: the operations of :mod:`.writes`, :mod:`.reads` and :mod:`.lifecycle` in one API."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from deltastore.backends import open_backend
from deltastore.backends.lmdb_backend import LmdbConfig
from deltastore.settings import StoreConfig
from deltastore.store.reads import Reads
from deltastore.store.writes import Writes

__all__ = ["Store"]


class Store(Writes, Reads):
    """Snapshots of KV caches on a :class:`~deltastore.backend.Backend`; thread-safe.

    Args:
        backend: where everything lives (one per process and data directory).
        config: block size, capacity, TTL and dedup-sharing policy.
        clock: unix seconds; injectable so TTL and LRU are testable without sleeping.
    """

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
