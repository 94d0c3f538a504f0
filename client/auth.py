"""Client credentials for a DeltaStore that requires API keys (``deltastore.server.auth``).

Over TLS, use gRPC's own call credentials, which send ``authorization: Bearer <key>``::

    creds = grpc.composite_channel_credentials(
        grpc.ssl_channel_credentials(ca_pem), grpc.access_token_call_credentials(key))
    DeltaStoreClient(target, credentials=creds)

gRPC refuses call credentials on a plaintext channel, so on loopback or a sidecar's unix socket
pass ``interceptors=[ApiKey(key)]`` instead; it adds the same header to every call.
"""

from __future__ import annotations

from collections import namedtuple
from collections.abc import Callable
from typing import Any

import grpc

__all__ = ["ApiKey"]


class _Details(
    namedtuple("_Details", ("method", "timeout", "metadata", "credentials", "wait_for_ready", "compression")),
    grpc.ClientCallDetails,
):
    """The call details gRPC passes on, with the key added to the metadata."""


class ApiKey(
    grpc.UnaryUnaryClientInterceptor,
    grpc.UnaryStreamClientInterceptor,
    grpc.StreamUnaryClientInterceptor,
    grpc.StreamStreamClientInterceptor,
):
    """Adds ``authorization: Bearer <key>`` to every call of a channel (sync client).

    Args:
        key: the API key; kept in memory only, never in ``repr``.
    """

    def __init__(self, key: str) -> None:
        self._header = ("authorization", f"Bearer {key}")

    def __repr__(self) -> str:
        return "ApiKey(***)"

    def _with_key(self, details: grpc.ClientCallDetails) -> grpc.ClientCallDetails:
        metadata = [*(details.metadata or ()), self._header]
        return _Details(
            details.method,
            details.timeout,
            metadata,
            details.credentials,
            getattr(details, "wait_for_ready", None),
            getattr(details, "compression", None),
        )

    def _intercept(
        self, continuation: Callable[..., Any], details: grpc.ClientCallDetails, request: Any
    ) -> Any:
        return continuation(self._with_key(details), request)

    intercept_unary_unary = _intercept
    intercept_unary_stream = _intercept
    intercept_stream_unary = _intercept
    intercept_stream_stream = _intercept
