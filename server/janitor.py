"""Session expiry on a timer: TTL'd sessions leave the store even when nobody writes.

Puts expire a batch of idle sessions in their own transaction, so a write-heavy store stays
clean; a read-mostly one (e.g. vLLM engines that mostly load prefixes) would keep serving the
blocks of expired sessions through LookupPrefix and GetPrefix. This thread runs the same expiry
every ``interval`` seconds (a quarter of the TTL, at most 30 s) when a TTL is configured.
"""

from __future__ import annotations

import logging
import threading
from typing import TYPE_CHECKING

from deltastore.errors import DeltaStoreError

if TYPE_CHECKING:
    from deltastore.store import Store

__all__ = ["Janitor"]

log = logging.getLogger("deltastore.server")


class Janitor:
    """Expire idle sessions of ``store`` periodically; a no-op without a TTL."""

    def __init__(self, store: Store, *, batch: int = 256) -> None:
        ttl = store.config.session_ttl_s
        self.interval = min(ttl / 4, 30.0) if ttl else None
        self._store = store
        self._batch = batch
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.expired = 0

    def start(self) -> Janitor:
        if self.interval is not None:
            self._thread = threading.Thread(target=self._run, name="deltastore-expiry", daemon=True)
            self._thread.start()
        return self

    def run_once(self) -> int:
        """Expire what is due now (in batches); returns how many sessions went."""
        total = 0
        while not self._stop.is_set():
            gone = len(self._store.expire_sessions(limit=self._batch))
            total += gone
            if gone < self._batch:
                break
        self.expired += total
        return total

    def _run(self) -> None:
        assert self.interval is not None
        while not self._stop.wait(self.interval):
            try:
                if gone := self.run_once():
                    log.info("expired %d idle sessions", gone)
            except DeltaStoreError as exc:  # a busy or briefly unavailable backend: next round
                log.warning("session expiry failed: %s", exc)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
