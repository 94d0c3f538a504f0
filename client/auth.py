"""Client credentials for a DeltaStore that requires API keys (``deltastore.server.auth``).

Over TLS, use gRPC's own call credentials, which send ``authorization: Bearer <key>``::

    creds = grpc.composite_channel_credentials(
        grpc.ssl_channel_credentials(ca_pem), grpc.access_token_call_credentials(key))
    DeltaStoreClient(target, credentials=creds)

gRPC refuses call credentials on a plaintext channel, so on loopback or a sidecar's unix socket
pass ``interceptors=[ApiKey(key)]`` instead (``interceptors=async_api_key(key)`` for
``AsyncDeltaStoreClient``);
it adds the same header to every call.
"""

from __future__ import annotations

from collections import namedtuple
from collections.abc import Callable
from typing import Any

import grpc
from grpc import aio

__all__ = ["ApiKey", "async_api_key"]


class _Details(
    namedtuple("_Details", ("method", "timeout", "metadata", "credentials", "wait_for_ready", "compression")),
    grpc.ClientCallDetails,
):
    """The call details gRPC passes on, with the key added to the metadata."""


class _BearerKey:
    """The ``authorization`` header of a key; the key is kept in memory only, never in ``repr``."""

    def __init__(self, key: str) -> None:
        self._header = ("authorization", f"Bearer {key}")

    def __repr__(self) -> str:
        return f"{type(self).__name__}(***)"


class ApiKey(
    _BearerKey,
    grpc.UnaryUnaryClientInterceptor,
    grpc.UnaryStreamClientInterceptor,
    grpc.StreamUnaryClientInterceptor,
    grpc.StreamStreamClientInterceptor,
):
    """Adds ``authorization: Bearer <key>`` to every call of a channel (sync client).

    Args:
        key: the API key.
    """

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


class _AsyncKey(_BearerKey):
    def _with_key(self, details: aio.ClientCallDetails) -> aio.ClientCallDetails:
        return aio.ClientCallDetails(
            details.method,
            details.timeout,
            aio.Metadata(*(details.metadata or ()), self._header),
            details.credentials,
            details.wait_for_ready,
        )

    async def _intercept(
        self, continuation: Callable[..., Any], details: aio.ClientCallDetails, request: Any
    ) -> Any:
        return await continuation(self._with_key(details), request)


class _UnaryUnaryKey(_AsyncKey, aio.UnaryUnaryClientInterceptor):
    intercept_unary_unary = _AsyncKey._intercept


class _UnaryStreamKey(_AsyncKey, aio.UnaryStreamClientInterceptor):
    intercept_unary_stream = _AsyncKey._intercept


class _StreamUnaryKey(_AsyncKey, aio.StreamUnaryClientInterceptor):
    intercept_stream_unary = _AsyncKey._intercept


class _StreamStreamKey(_AsyncKey, aio.StreamStreamClientInterceptor):
    intercept_stream_stream = _AsyncKey._intercept


def async_api_key(key: str) -> list[aio.ClientInterceptor]:
    """Interceptors adding ``authorization: Bearer <key>`` to every call of a ``grpc.aio`` channel
    (``AsyncDeltaStoreClient(target, interceptors=async_api_key(key))``). grpc.aio files each
    interceptor under one call kind only, so there is one per kind."""
    return [kind(key) for kind in (_UnaryUnaryKey, _UnaryStreamKey, _StreamUnaryKey, _StreamStreamKey)]
