"""Stall guard: cancel streaming calls whose peer stopped sending or reading.

A client that opens a PutSnapshot and then sends nothing, or a GetSnapshot it never reads, holds
one of the server's handler threads for as long as its deadline allows, forever without one; a
handful of such clients would take the whole pool. gRPC's own keepalive does not help (the peer
is alive, just silent), so one watchdog thread cancels any streaming call that made no progress
(a request message received, or a response message taken for sending) for ``stall_seconds``.
Cancelling unblocks the handler: its request iterator raises, its pending send returns, and the
service's error mapping reports the call as cancelled; nothing of a cancelled put is stored.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import grpc

__all__ = ["StallGuard"]

log = logging.getLogger(__name__)


class StallGuard(grpc.ServerInterceptor):
    """Server interceptor that cancels streaming calls idle for ``stall_seconds``.

    Args:
        stall_seconds: longest time, in seconds, between two messages of one streaming call.
    """

    def __init__(self, stall_seconds: float) -> None:
        self.stall_seconds = stall_seconds
        self._calls: dict[int, tuple[float, grpc.ServicerContext, str]] = {}
        self._ids = itertools.count()
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self.cancelled = 0  # calls this guard cancelled, for tests and logs

    def close(self) -> None:
        self._wake.set()

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler | None],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = continuation(details)
        if handler is None or not (handler.request_streaming or handler.response_streaming):
            return handler
        method: str = details.method  # type: ignore[attr-defined]
        self._start()
        if handler.request_streaming and not handler.response_streaming:

            def put_like(requests: Iterator[Any], context: grpc.ServicerContext) -> Any:
                call = self._register(context, method)
                try:
                    return handler.stream_unary(self._progress(call, requests), context)
                finally:
                    self._unregister(call)

            return grpc.stream_unary_rpc_method_handler(
                put_like, handler.request_deserializer, handler.response_serializer
            )
        if handler.response_streaming and not handler.request_streaming:

            def get_like(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
                call = self._register(context, method)
                try:
                    # Each response is pulled after the previous one was sent: a pull is progress.
                    yield from self._progress(call, handler.unary_stream(request, context))
                finally:
                    self._unregister(call)

            return grpc.unary_stream_rpc_method_handler(
                get_like, handler.request_deserializer, handler.response_serializer
            )
        return handler  # bidirectional streams: none in this service

    def _progress(self, call: int, messages: Iterator[Any]) -> Iterator[Any]:
        for msg in messages:
            self._touch(call)
            yield msg

    def _register(self, context: grpc.ServicerContext, method: str) -> int:
        call = next(self._ids)
        with self._lock:
            self._calls[call] = (time.monotonic(), context, method)
        return call

    def _touch(self, call: int) -> None:
        with self._lock:
            entry = self._calls.get(call)
            if entry is not None:
                self._calls[call] = (time.monotonic(), entry[1], entry[2])

    def _unregister(self, call: int) -> None:
        with self._lock:
            self._calls.pop(call, None)

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
            cutoff = time.monotonic() - self.stall_seconds
            with self._lock:
                stalled = [(c, ctx, m) for c, (t, ctx, m) in self._calls.items() if t < cutoff]
                for call, _, _ in stalled:
                    del self._calls[call]
            for _, context, method in stalled:
                log.warning(
                    "%s from %s: no progress for %.0f s, cancelled",
                    method,
                    context.peer(),
                    self.stall_seconds,
                )
                self.cancelled += 1
                context.cancel()
