"""grpc.health.v1 servicer whose status changes never wait on a watcher while holding a lock.

Why not grpc's own ``grpc_health.v1.health.HealthServicer``: its ``set()`` (and so
``enter_graceful_shutdown()``, which ``Service.stop()`` calls) sends to every open ``Watch`` while
holding the servicer's lock, and a non-blocking send waits until the server's polling thread
completes it. When a watcher cancels at that moment, the polling thread runs the watch's close
callback, which takes the same lock: the two wait on each other and shutdown hangs forever (seen in
CI; reproduced in 23 of 40 tries by cancelling 8 watches just before shutdown). Here the lock only
guards the tables; every send happens after it is released, on a snapshot of the watchers.

Watches are non-blocking only (a callback per stream, no handler thread parked per watcher):
``server.guard`` serves them that way and bounds how many may be open.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

__all__ = ["HEALTH_SERVICE", "HealthServicer"]

HEALTH_SERVICE: str = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name

_Send = Callable[[Any], Any]
_Status = int  # a health_pb2.HealthCheckResponse.ServingStatus value


class _Watcher:
    """One Watch stream: each status once, and the last one sent always the newest.

    ``tell`` reads the service's status when it sends (not when a caller recorded it), under this
    stream's own lock, so concurrent ``set`` calls cannot reach the stream in reverse order. Lock
    order: a watcher's lock, then (briefly) the servicer's; the servicer's lock is never held while
    sending.
    """

    def __init__(self, send: _Send, current: Callable[[], _Status]) -> None:
        self.send = send
        self._current = current
        self._lock = threading.Lock()
        self._last: _Status | None = None

    def tell(self) -> None:
        with self._lock:
            status = self._current()
            if status != self._last:
                self._last = status
                self.send(health_pb2.HealthCheckResponse(status=status))  # False once the call ended


class HealthServicer(health_pb2_grpc.HealthServicer):
    """Serving status per service name ("" = the whole server), with Check and Watch."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._status: dict[str, _Status] = {"": health_pb2.HealthCheckResponse.SERVING}
        self._watchers: dict[str, set[_Watcher]] = {}
        self._shutting_down = False

    def Check(self, request: health_pb2.HealthCheckRequest, context: grpc.ServicerContext) -> Any:
        with self._lock:
            status = self._status.get(request.service)
        if status is None:
            context.set_code(grpc.StatusCode.NOT_FOUND)
            context.set_details(f"unknown service {request.service!r}")
            return health_pb2.HealthCheckResponse()
        return health_pb2.HealthCheckResponse(status=status)

    def Watch(
        self,
        request: health_pb2.HealthCheckRequest,
        context: grpc.ServicerContext,
        send_response_callback: _Send | None = None,
    ) -> None:
        if send_response_callback is None:
            context.abort(
                grpc.StatusCode.UNIMPLEMENTED, "Health/Watch is served as a non-blocking stream only"
            )
            return  # abort raised already
        service = request.service
        watcher = _Watcher(send_response_callback, lambda: self._locked_current(service))
        with self._lock:
            self._watchers.setdefault(service, set()).add(watcher)
        if not context.add_callback(lambda: self._forget(service, watcher)):
            self._forget(service, watcher)  # the call ended already: its callback would never run
            return
        watcher.tell()

    Watch.experimental_non_blocking = True  # type: ignore[attr-defined]  # grpc: call with a send callback
    Watch.experimental_thread_pool = None  # type: ignore[attr-defined]

    def set(self, service: str, status: _Status) -> None:
        """Set a service's status and tell its watchers (ignored once shutdown began)."""
        with self._lock:
            if self._shutting_down:
                return
            watchers = self._record(service, status)
        for watcher in watchers:
            watcher.tell()

    def enter_graceful_shutdown(self) -> None:
        """Every service NOT_SERVING, for good: later ``set`` calls are ignored."""
        not_serving = health_pb2.HealthCheckResponse.NOT_SERVING
        with self._lock:
            if self._shutting_down:
                return
            self._shutting_down = True
            watchers = [w for service in list(self._status) for w in self._record(service, not_serving)]
        for watcher in watchers:
            watcher.tell()

    def _locked_current(self, service: str) -> _Status:
        with self._lock:
            return self._status.get(service, health_pb2.HealthCheckResponse.SERVICE_UNKNOWN)

    def _record(self, service: str, status: _Status) -> list[_Watcher]:
        """Store the status; the watchers to tell (the caller holds the lock)."""
        self._status[service] = status
        return list(self._watchers.get(service, ()))

    def _forget(self, service: str, watcher: _Watcher) -> None:
        """The call ended (on the server's polling thread): drop it, end the stream server-side."""
        with self._lock:
            self._watchers.get(service, set()).discard(watcher)
        watcher.send(None)  # not through the watcher's lock: a send in flight may wait on this thread
