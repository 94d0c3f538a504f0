"""The ops HTTP API (FastAPI): savings, session listing, health, readiness, metrics, a human page.

It reads the same store object the gRPC service writes, in the same process. Errors are JSON
``{"error": {"code", "type", "message", "hint"}}`` with the HTTP status of
``deltastore.errors.STATUS_TABLE``.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from importlib import resources
from typing import Any

from fastapi import FastAPI, Path, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException

from deltastore import __version__
from deltastore.errors import DeltaStoreError, InvalidArgument, NotFound
from deltastore.manifest import NAME_PATTERN
from deltastore.server.metrics import Metrics
from deltastore.server.principal import Access, namespace_for, savings_namespace
from deltastore.server.status import error_body, http_status

__all__ = ["create_app"]

DEFAULT_NAMESPACE = "default"
NAMESPACE_PATTERN = f"^{NAME_PATTERN}$"  # what deltastore.manifest.check_name accepts


class ErrorDetail(BaseModel):
    code: str
    type: str
    message: str
    hint: str


class ErrorBody(BaseModel):
    """Every error answer of the API (the schema documents it, so clients can rely on it)."""

    error: ErrorDetail


_BAD_INPUT: dict[int | str, dict[str, Any]] = {400: {"model": ErrorBody, "description": "invalid input"}}
_NAMESPACE = Query(None, pattern=NAMESPACE_PATTERN, description="tenant namespace; none: the whole store")


def create_app(
    store: Any, metrics: Metrics, *, ready: Callable[[], bool] = lambda: True, auth_on: bool = False
) -> FastAPI:
    """Build the ops app over ``store``.

    Args:
        store: the ``deltastore.store.Store`` the gRPC service uses.
        metrics: the server's metrics (exposed at ``/metrics``; HTTP requests are counted there).
        ready: False while the process starts or drains; ``/readyz`` answers 503 then.
        auth_on: the app is served behind ``deltastore.server.auth.HttpAuth``: every request must
            carry the principal it sets (a route reached without one is refused, not served open).
    """
    app = FastAPI(
        title="DeltaStore ops API",
        version=__version__,
        description="Storage savings, sessions, health and metrics of a DeltaStore service.",
    )
    page = resources.files("deltastore.server").joinpath("static/index.html").read_text(encoding="utf-8")

    @app.exception_handler(DeltaStoreError)
    async def _deltastore_error(_request: Request, exc: DeltaStoreError) -> JSONResponse:
        return JSONResponse(error_body(exc), status_code=http_status(exc))

    # Routing and validation errors get the same JSON shape as DeltaStore errors.
    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
        error = NotFound(str(exc.detail)) if exc.status_code == 404 else DeltaStoreError(str(exc.detail))
        body = error_body(error)
        if exc.status_code != 404:
            body["error"]["code"] = "HTTP_" + str(exc.status_code)
        return JSONResponse(body, status_code=exc.status_code)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_request: Request, exc: RequestValidationError) -> JSONResponse:
        return JSONResponse(error_body(InvalidArgument(str(exc.errors()))), status_code=400)

    @app.middleware("http")
    async def _count(request: Request, call_next: Callable[[Request], Any]) -> Response:
        response: Response = await call_next(request)
        route = request.scope.get("route")
        metrics.http_requests.labels(getattr(route, "path", "unmatched"), str(response.status_code)).inc()
        return response

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def index() -> str:
        # The current figures are inlined so the first paint already shows them (no fetch needed);
        # "</" is escaped so stored names can never close the script element.
        initial = json.dumps(store.savings(None)).replace("</", "<\\/")
        return page.replace("__INITIAL_SAVINGS__", initial)

    @app.get("/healthz", summary="the process is alive")
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get(
        "/readyz",
        summary="the service takes traffic: started, not draining, store readable",
        responses={503: {"description": "starting, draining or the store unreadable"}},
    )
    def readyz() -> JSONResponse:
        if not ready():
            return JSONResponse({"status": "not ready", "reason": "starting or draining"}, status_code=503)
        try:
            store.savings()
        except DeltaStoreError as exc:
            return JSONResponse({"status": "not ready", "reason": str(exc)}, status_code=503)
        return JSONResponse({"status": "ready"})

    @app.get("/metrics", summary="Prometheus text format", response_class=Response)
    def metrics_endpoint() -> Response:
        return Response(metrics.exposition(), media_type=CONTENT_TYPE_LATEST)

    @app.get(
        "/v1/savings", summary="logical vs stored bytes and the factor of each layer", responses=_BAD_INPUT
    )
    def savings(namespace: str | None = _NAMESPACE) -> dict[str, Any]:
        return store.savings(savings_namespace(namespace or "", auth_on=auth_on))

    @app.get(
        "/v1/sessions/{session}",
        summary="the snapshots of one session",
        responses={**_BAD_INPUT, 404: {"model": ErrorBody, "description": "no such session"}},
    )
    def session(
        session: str = Path(
            pattern=r"^[^\x00-\x1f\x7f]{1,128}$", description="session id: printable, at most 128 UTF-8 bytes"
        ),
        namespace: str = Query(DEFAULT_NAMESPACE, pattern=NAMESPACE_PATTERN, description="tenant namespace"),
    ) -> dict[str, Any]:
        namespace = namespace_for(namespace, Access.READ, auth_on=auth_on)
        snapshots = store.list_snapshots(namespace, session)
        if not snapshots:
            raise NotFound(f"session {session!r} has no snapshots in namespace {namespace!r}")
        return {"namespace": namespace, "session": session, "snapshots": [_plain(s) for s in snapshots]}

    return app


def _plain(obj: Any) -> Any:
    """JSON-ready form of a store record (dataclass, dict or scalar)."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {k: _plain(v) for k, v in dataclasses.asdict(obj).items()}
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_plain(v) for v in obj]
    if isinstance(obj, bytes):
        return obj.hex()
    return obj
