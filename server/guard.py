"""Stall guard: cancel streaming calls whose peer stopped sending or reading.

A client that opens a PutSnapshot and then sends nothing, or a GetSnapshot it never reads, holds
one of the server's handler threads for as long as its deadline allows, forever without one; a
handful of such clients would take the whole pool. gRPC's own keepalive does not help (the peer
is alive, just silent), so one watchdog thread cancels any streaming call that made no progress
(a request message received, or a response message taken for sending) for ``stall_seconds``.
Cancelling unblocks the handler: its request iterator raises, its pending send returns, and the
service's error mapping reports the call as cancelled; nothing of a cancelled put is stored.

Three more limits keep the pool for the callers who use it:

- A minimum transfer rate: a stream that moves a message just often enough never to look idle
  (one every ``stall_seconds - 1``) is cancelled too once, past its first ``stall_seconds``, its
  average falls below ``min_rate_bytes`` per second.
- Concurrent streams per API key (``max_streams_per_caller``): one tenant's open streams cannot
  take every handler thread (RESOURCE_EXHAUSTED beyond; only with auth on, when keys name
  tenants).
- ``grpc.health.v1.Health/Watch`` (open to anyone, like every health check) is served without a
  pool thread (grpc's non-blocking handler: a watch is a callback, not a parked thread) and at
  most ``max_watches`` at once.
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import threading
import time
from collections.abc import Iterator
from typing import Any

import grpc

from deltastore.server.handlers import Handler

__all__ = ["StallGuard"]

log = logging.getLogger(__name__)

_WATCH = "/grpc.health.v1.Health/Watch"


def _size(msg: Any) -> int:
    """Bytes of a streamed message: pre-serialized bytes, a wire chunk, or a protobuf message."""
    if isinstance(msg, bytes | bytearray | memoryview):
        return len(msg)
    data = getattr(msg, "data", None)
    if isinstance(data, memoryview | bytes):
        return len(data)
    byte_size = getattr(msg, "ByteSize", None)
    return byte_size() if callable(byte_size) else 0


def _caller(context: grpc.ServicerContext) -> str | None:
    """Who a stream counts against: its API key (digested), or None without one (auth off)."""
    for name, value in context.invocation_metadata() or ():
        if name in ("authorization", "x-api-key") and value:
            text = value.decode("latin-1") if isinstance(value, bytes) else value
            return hashlib.sha256(text.encode()).hexdigest()[:16]
    return None


class StallGuard:
    """A handler layer that cancels streaming calls idle for ``stall_seconds``.

    Args:
        stall_seconds: longest time, in seconds, between two messages of one streaming call.
    """

    def __init__(
        self,
        stall_seconds: float,
        *,
        min_rate_bytes: int = 0,
        max_streams_per_caller: int = 0,
        max_watches: int = 8,
    ) -> None:
        self.stall_seconds = stall_seconds
        self.min_rate_bytes = min_rate_bytes
        self.max_streams_per_caller = max_streams_per_caller
        self.max_watches = max_watches
        self._calls: dict[int, tuple[float, grpc.ServicerContext, str]] = {}
        self._started: dict[int, tuple[float, str | None]] = {}  # call -> (start, caller)
        self._moved: dict[int, int] = {}  # call -> bytes moved
        self._per_caller: dict[str, int] = {}
        self._watches = 0
        self._ids = itertools.count()
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self.cancelled = 0  # calls this guard cancelled, for tests and logs

    def close(self) -> None:
        self._wake.set()

    def __call__(self, handler: Handler) -> Handler:
        """The handler under watch (a :data:`~deltastore.server.handlers.Layer`): streaming calls
        are registered and their messages counted; Health/Watch is bounded; unary calls pass."""
        if handler.method == _WATCH:
            return self._watch_handler(handler)
        if handler.request_streaming == handler.response_streaming:
            return handler  # unary calls, and bidirectional streams (none in this service)
        self._start()
        inner, method = handler.behavior, handler.method
        if handler.request_streaming:

            def put_like(requests: Iterator[Any], context: grpc.ServicerContext) -> Any:
                call = self._register(context, method)
                try:
                    return inner(self._progress(call, requests), context)
                finally:
                    self._unregister(call)

            return handler.replace(behavior=put_like)

        def get_like(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
            call = self._register(context, method)
            try:
                # Each response is pulled after the previous one was sent: a pull is progress.
                yield from self._progress(call, inner(request, context))
            finally:
                self._unregister(call)

        return handler.replace(behavior=get_like)

    def _watch_handler(self, handler: Handler) -> Handler:
        """Health/Watch, bounded, and still non-blocking (no pool thread per watch)."""
        inner = handler.behavior

        def watch(request: Any, context: grpc.ServicerContext, send_response_callback: Any = None) -> Any:
            with self._lock:
                refused = self._watches >= self.max_watches
                if not refused:
                    self._watches += 1
            if refused:
                context.abort(
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                    f"at most {self.max_watches} health watches at once; poll Health/Check instead",
                )
            if not context.add_callback(self._watch_ended):
                self._watch_ended()  # the call ended already: its callback would never run
                return None
            return inner(request, context, send_response_callback=send_response_callback)

        watch.experimental_non_blocking = True  # type: ignore[attr-defined]
        watch.experimental_thread_pool = None  # type: ignore[attr-defined]
        return handler.replace(behavior=watch)

    def _watch_ended(self) -> None:
        with self._lock:
            self._watches -= 1

    def _progress(self, call: int, messages: Iterator[Any]) -> Iterator[Any]:
        for msg in messages:
            self._touch(call, _size(msg))
            yield msg

    def _register(self, context: grpc.ServicerContext, method: str) -> int:
        call = next(self._ids)
        caller = _caller(context) if self.max_streams_per_caller else None
        now = time.monotonic()
        with self._lock:
            if caller is not None:
                if self._per_caller.get(caller, 0) >= self.max_streams_per_caller:
                    caller = ""  # refused below, outside the lock
                else:
                    self._per_caller[caller] = self._per_caller.get(caller, 0) + 1
            if caller != "":
                self._calls[call] = (now, context, method)
                self._started[call] = (now, caller)
                self._moved[call] = 0
        if caller == "":
            context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"{method}: this key already has {self.max_streams_per_caller} streams open; finish one first",
            )
        return call

    def _touch(self, call: int, nbytes: int = 0) -> None:
        with self._lock:
            entry = self._calls.get(call)
            if entry is not None:
                self._calls[call] = (time.monotonic(), entry[1], entry[2])
                self._moved[call] += nbytes

    def _unregister(self, call: int) -> None:
        with self._lock:
            self._forget(call)

    def _forget(self, call: int) -> None:
        """(Under the lock.) Drop a call's records and its place in its caller's count."""
        self._calls.pop(call, None)
        self._moved.pop(call, None)
        _, caller = self._started.pop(call, (0.0, None))
        if caller:
            left = self._per_caller.get(caller, 1) - 1
            if left > 0:
                self._per_caller[caller] = left
            else:
                self._per_caller.pop(caller, None)

    def _slow(self, call: int, now: float) -> bool:
        """(Under the lock.) Past its first stall_seconds, is the call below min_rate_bytes/s?"""
        if not self.min_rate_bytes:
            return False
        started = self._started.get(call, (now, None))[0]
        elapsed = now - started
        return elapsed > self.stall_seconds and self._moved.get(call, 0) < self.min_rate_bytes * elapsed

    def _start(self) -> None:
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._watch, name="deltastore-stall-guard", daemon=True
                )
                self._thread.start()

    def _watch(self) -> None:
        period = min(1.0, self.stall_seconds / 4)
        while not self._wake.wait(period):
            now = time.monotonic()
            cutoff = now - self.stall_seconds
            with self._lock:
                stalled = [
                    (c, ctx, m) for c, (t, ctx, m) in self._calls.items() if t < cutoff or self._slow(c, now)
                ]
                for call, _, _ in stalled:
                    self._forget(call)
            for _, context, method in stalled:
                log.warning(
                    "%s from %s: no progress for %.0f s or under %d bytes/s, cancelled",
                    method,
                    context.peer(),
                    self.stall_seconds,
                    self.min_rate_bytes,
                )
                self.cancelled += 1
                context.cancel()
