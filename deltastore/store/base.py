"""What every store operation shares: the backend, the policy, the clock and session liveness.

The operations are cut by concept into mixins over this base (:mod:`.writes`, :mod:`.reads`,
:mod:`.lifecycle`), composed into :class:`~deltastore.store.Store`; each public operation is one
backend transaction, and the session-record helpers here are the ones all of them read or move:
a session's TTL and its place in the LRU index (``t`` + last access + session).
"""

from __future__ import annotations

import time
from collections.abc import Callable

from deltastore.backend import Backend, ReadView, WriteBatch
from deltastore.errors import IncompatibleFormat
from deltastore.manifest import STORE_FORMAT, SessionRecord, lru_key, session_key
from deltastore.settings import StoreConfig

__all__ = ["StoreBase"]

_FORMAT_KEY = b"store_format"


class StoreBase:
    """The backend, policy and clock of a store; checks the stored format on construction.

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

    def _now_ms(self) -> int:
        return int(self._clock() * 1000)

    def _expired(self, rec: SessionRecord, now_ms: int) -> bool:
        ttl = self.config.session_ttl_s
        return ttl is not None and rec.last_access_ms + int(ttl * 1000) < now_ms

    def _live_session(self, view: ReadView, namespace: str, session: str) -> SessionRecord | None:
        """The session's record, or None when absent or idle past the TTL (it reads as absent)."""
        raw = view.get("sessions", session_key(namespace, session))
        if raw is None:
            return None
        rec = SessionRecord.decode(raw)
        return None if self._expired(rec, self._now_ms()) else rec

    @staticmethod
    def _update_session(b: WriteBatch, namespace: str, session: str, now: int, snapshots: int) -> None:
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
