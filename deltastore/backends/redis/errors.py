"""redis-py's failures mapped onto DeltaStore's errors, and the scripts' own error replies.

Why its own module: every round trip of the backend goes through :func:`redis_errors`, so an
operator sees one vocabulary (UNAVAILABLE: retry; StoreFull: add memory) whichever node or
command failed; the Lua scripts report a lost lease (``DSLOCK``) and an expired read view
(``DSEXPIRED``) as error replies that only this mapping turns into exceptions.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import redis.exceptions as rex

from deltastore.errors import BackendUnavailable, DeltaStoreError, StoreFull

__all__ = ["LockLost", "redis_errors", "view_expired"]

_UNAVAILABLE = (
    rex.ConnectionError,
    rex.TimeoutError,
    rex.ClusterDownError,
    rex.TryAgainError,
    rex.MasterDownError,
    rex.BusyLoadingError,
    rex.ReadOnlyError,
    rex.SlotNotCoveredError,
    rex.RedisClusterException,
)


class LockLost(Exception):
    """The write lock's lease expired before the commit: run the transaction again."""


def _hint(exc: BaseException) -> str:
    return "check that every Redis node is up and reachable; the call can be retried" + (
        f" ({type(exc).__name__})" if not str(exc) else ""
    )


def view_expired(what: str) -> BackendUnavailable:
    return BackendUnavailable(
        f"Redis read view expired during {what}",
        hint="read views must be short; raise view_lease_ms in the backend URL",
    )


@contextmanager
def redis_errors(what: str) -> Iterator[None]:
    """Map redis-py failures onto DeltaStore's error hierarchy."""
    try:
        yield
    except _UNAVAILABLE as exc:
        raise BackendUnavailable(f"Redis unavailable during {what}: {exc}", hint=_hint(exc)) from exc
    except rex.OutOfMemoryError as exc:
        raise StoreFull(
            f"Redis is out of memory during {what}: {exc}",
            hint="raise Redis maxmemory or add cluster nodes; lower DELTASTORE_MAX_STORED_BYTES so "
            "eviction starts earlier",
        ) from exc
    except rex.ResponseError as exc:
        text = str(exc)
        if text.startswith("DSLOCK"):
            raise LockLost(text) from exc
        if text.startswith("DSEXPIRED"):
            raise view_expired(what) from exc
        if "CLUSTERDOWN" in text or "MASTERDOWN" in text or text.startswith("LOADING"):
            raise BackendUnavailable(f"Redis unavailable during {what}: {exc}", hint=_hint(exc)) from exc
        if text.startswith("OOM"):
            raise StoreFull(
                f"Redis is out of memory during {what}: {exc}", hint="raise Redis maxmemory"
            ) from exc
        raise DeltaStoreError(f"Redis error during {what}: {exc}") from exc
    except rex.RedisError as exc:
        raise DeltaStoreError(f"Redis error during {what}: {exc}") from exc
