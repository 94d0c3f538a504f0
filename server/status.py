"""Errors to wire status: one lookup over ``deltastore.errors.STATUS_TABLE`` for gRPC and HTTP."""

from __future__ import annotations

import grpc

from deltastore.errors import STATUS_TABLE, DeltaStoreError

__all__ = ["error_body", "grpc_code", "http_status"]


def _row(exc: DeltaStoreError) -> tuple[str, int]:
    for cls, code, http in STATUS_TABLE:
        if isinstance(exc, cls):
            return code, http
    return "INTERNAL", 500


def grpc_code(exc: DeltaStoreError) -> grpc.StatusCode:
    """The gRPC status code a DeltaStore error travels as."""
    return grpc.StatusCode[_row(exc)[0]]


def http_status(exc: DeltaStoreError) -> int:
    """The HTTP status a DeltaStore error travels as."""
    return _row(exc)[1]


def error_body(exc: DeltaStoreError) -> dict[str, dict[str, str]]:
    """The JSON body of an HTTP error: ``{"error": {"code", "type", "message", "hint"}}``."""
    return {
        "error": {
            "code": _row(exc)[0],
            "type": type(exc).__name__,
            "message": exc.message,
            "hint": exc.hint,
        }
    }
