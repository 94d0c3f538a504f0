"""Run the gRPC service and the ops HTTP API in one process over one store.

``deltastore serve [--data-dir DIR] [--grpc ADDR] [--http ADDR]``. gRPC (default
127.0.0.1:50051, or ``unix:/path.sock`` for a sidecar sharing a volume) runs on its thread pool,
the ops API on uvicorn in a background thread. SIGTERM or SIGINT drains: readiness and gRPC
health turn NOT_SERVING, new RPCs are refused, in-flight RPCs get ``--grace-seconds`` to finish,
then the HTTP server and the store close.
"""

from __future__ import annotations

import argparse
import logging
import socket
import threading
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

from deltastore.errors import InvalidArgument
from deltastore.server.settings import ServerSettings, add_setting_arguments

if TYPE_CHECKING:
    import grpc
    import uvicorn

    from deltastore.server.auth import AuthPolicy
    from deltastore.store import Store

__all__ = ["Service", "add_arguments", "open_store", "run"]

log = logging.getLogger("deltastore.server")


def open_store(url: str) -> Store:
    """Open the store a backend URL names (see :func:`deltastore.backends.open_backend`)."""
    from deltastore.backends import open_backend
    from deltastore.settings import load_settings
    from deltastore.store import Store

    settings = load_settings()
    return Store(open_backend(url, settings.lmdb), settings.store)


def _bind(address: str) -> socket.socket:
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        raise InvalidArgument(f"HTTP address {address!r} is not host:port")
    host = host.strip("[]") or "0.0.0.0"
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, int(port)))
    except OSError as exc:
        sock.close()
        raise InvalidArgument(f"cannot bind HTTP address {address!r}: {exc}") from None
    return sock


class Service:
    """The serving process's parts: store, gRPC server, HTTP server, and their lifecycle.

    Args:
        settings: addresses, limits, data directory / backend URL.
        store: serve this store instead of opening ``settings.backend_url`` (it is closed on stop).
        interceptors: further gRPC server interceptors (tracing), run inside auth and the stall guard.
    """

    def __init__(
        self,
        settings: ServerSettings,
        *,
        store: Store | None = None,
        interceptors: Sequence[grpc.ServerInterceptor] = (),
    ) -> None:
        self.settings = settings
        self._store = store
        self._interceptors = interceptors
        self._grpc: grpc.Server | None = None
        self._http: uvicorn.Server | None = None
        self._http_thread: threading.Thread | None = None
        self._draining = False
        self._policy: AuthPolicy | None = None
        self.grpc_port = 0
        self.http_port = 0

    @property
    def store(self) -> Store:
        if self._store is None:
            raise InvalidArgument("the service is not started")
        return self._store

    def ready(self) -> bool:
        return self._grpc is not None and not self._draining

    def start(self) -> Service:
        import uvicorn

        from deltastore.server.auth import AuthLayer, HttpAuth, load_auth_file
        from deltastore.server.guard import StallGuard
        from deltastore.server.handlers import Layer, Layered
        from deltastore.server.health import HealthServicer
        from deltastore.server.http import create_app
        from deltastore.server.metrics import Metrics
        from deltastore.server.service import create_server
        from deltastore.server.tls import TlsFiles

        # -- trust (auth, stall guard, TLS): each off unless configured --
        s = self.settings
        s.check_exposure()
        policy = load_auth_file(s.auth_file) if s.auth_file else None
        self._policy = policy
        tls = TlsFiles.from_paths(s.tls_cert, s.tls_key, s.tls_client_ca)
        if policy is not None and policy.certs and not s.tls_client_ca:
            raise InvalidArgument(
                f"{s.auth_file} maps client certificates to tenants, but no client certificate is asked for",
                hint="give --tls-client-ca (with --tls-cert/--tls-key), or drop 'certs' from the auth file",
            )
        self.stall_guard = StallGuard(
            s.stall_seconds,
            min_rate_bytes=s.min_rate_bytes,
            max_streams_per_caller=(s.max_streams_per_caller or max(1, s.workers // 2)) if policy else 0,
            max_watches=s.max_watches,
        )
        # One interceptor wraps every handler (DeltaStore, health, reflection): auth outermost.
        layers: list[Layer] = [*([AuthLayer(policy)] if policy else []), self.stall_guard]
        interceptors = [Layered(layers), *self._interceptors]
        # -- end trust --

        if self._store is None:
            self._store = open_store(self.settings.backend_url)
        store = self._store
        if policy is not None:
            policy.check_dedup_groups(store.config.shared_groups)
        from deltastore.server.janitor import Janitor

        self.janitor = Janitor(store).start()
        self.metrics = Metrics(store.savings)
        self.health = HealthServicer()
        self._grpc, self.grpc_port = create_server(
            store,
            self.settings.grpc_address,
            settings=self.settings,
            metrics=self.metrics,
            interceptors=interceptors,
            health_servicer=self.health,
            credentials=tls.grpc_credentials() if tls else None,
        )
        if self.settings.http_address:
            sock = _bind(self.settings.http_address)
            self.http_port = sock.getsockname()[1]
            app = create_app(store, self.metrics, ready=self.ready, auth_on=policy is not None)
            served = HttpAuth(app, policy) if policy else app
            config = uvicorn.Config(
                served,
                log_level="warning",
                lifespan="off",
                access_log=False,
                **(tls.uvicorn_options() if tls else {}),
            )
            self._http = uvicorn.Server(config)
            self._http_thread = threading.Thread(
                target=self._http.run, kwargs={"sockets": [sock]}, name="deltastore-http", daemon=True
            )
            self._http_thread.start()
            deadline = time.monotonic() + 30
            while not self._http.started:
                if not self._http_thread.is_alive() or time.monotonic() > deadline:
                    raise InvalidArgument(f"the HTTP server on {self.settings.http_address} did not start")
                time.sleep(0.01)
        return self

    def reload_auth(self) -> bool:
        """Re-read the auth file (SIGHUP): new keys and grants apply to the next call.

        An auth file that no longer loads (or whose dedup groups now cross tenants) is refused
        with an error in the log, and the keys in use stay in force. Returns whether it applied.
        """
        from deltastore.errors import DeltaStoreError
        from deltastore.server.auth import load_auth_file

        if self._policy is None or not self.settings.auth_file:
            log.warning("SIGHUP: no auth file configured, nothing to reload")
            return False
        try:
            fresh = load_auth_file(self.settings.auth_file)
            fresh.check_dedup_groups(self.store.config.shared_groups)
        except DeltaStoreError as exc:
            log.error("auth file reload refused, the keys in use stay: %s", exc)
            return False
        self._policy.replace_with(fresh)
        log.warning("auth file %s reloaded", self.settings.auth_file)
        return True

    def stop(self) -> None:
        """Drain and close: refuse new calls, let in-flight ones finish within the grace period."""
        self._draining = True
        if self._grpc is not None:
            self.health.enter_graceful_shutdown()
            self._grpc.stop(self.settings.grace_seconds).wait()
        if self._http is not None and self._http_thread is not None:
            self._http.should_exit = True
            self._http_thread.join(timeout=self.settings.grace_seconds + 5)
        if self._grpc is not None:
            self.stall_guard.close()
            self.janitor.stop()
        if self._store is not None:
            self._store.close()

    def __enter__(self) -> Service:
        return self.start()

    def __exit__(self, *_exc: object) -> None:
        self.stop()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_setting_arguments(parser)
    parser.add_argument("--log-level", default="INFO", help="logging level (default INFO)")


def run(args: argparse.Namespace) -> int:
    import signal

    from deltastore.backends import redact_url

    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    settings = ServerSettings.load(args)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    service = Service(settings).start()
    reload = threading.Event()
    signal.signal(signal.SIGHUP, lambda *_: reload.set())  # re-read the auth file
    grpc_at = settings.grpc_address if settings.grpc_address.startswith("unix:") else None
    if grpc_at is None:
        grpc_at = f"{settings.grpc_address.rpartition(':')[0]}:{service.grpc_port}"
    http_at = (
        f"http://{settings.http_address.rpartition(':')[0]}:{service.http_port}"
        if service.http_port
        else "off"
    )
    # One machine-readable line: tests and scripts that bind port 0 read the real ports here.
    backend = redact_url(settings.backend_url)
    print(f"deltastore serving grpc={grpc_at} http={http_at} backend={backend}", flush=True)
    try:
        while not stop.wait(0.2):
            if reload.is_set():
                reload.clear()
                service.reload_auth()
    finally:
        log.info("draining: in-flight calls get %.1f s", settings.grace_seconds)
        service.stop()
        log.info("stopped")
    return 0
