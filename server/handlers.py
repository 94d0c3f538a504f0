"""One way to wrap gRPC method handlers: layers composed around each handler.

Three concerns wrap the service's handlers: requests that do not parse (``server/malformed.py``),
authentication and the caller's principal (``server/auth.py``) and the stall guard
(``server/guard.py``). Each is a :data:`Layer`, a function from one :class:`Handler` to another,
so none of them rebuilds grpc's four handler kinds by hand: :func:`wrap` converts once, applies
the layers, and converts back. :class:`Layered` applies layers to every handler of a server
(DeltaStore, health, reflection) as one interceptor.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import grpc

__all__ = ["Behavior", "Handler", "Layer", "Layered", "wrap"]

Behavior = Callable[..., Any]
"""``(request or request iterator, context) -> response or response iterator``."""

_KINDS = {
    (False, False): (grpc.unary_unary_rpc_method_handler, "unary_unary"),
    (False, True): (grpc.unary_stream_rpc_method_handler, "unary_stream"),
    (True, False): (grpc.stream_unary_rpc_method_handler, "stream_unary"),
    (True, True): (grpc.stream_stream_rpc_method_handler, "stream_stream"),
}


@dataclasses.dataclass(frozen=True)
class Handler:
    """A method handler of any kind, as the layers see it.

    Attributes:
        method: the full method name, ``/package.Service/Method``.
        behavior: the function grpc calls (its ``experimental_*`` attributes, if any, are grpc's
            to read: a layer that replaces it sets them on its own function).
    """

    method: str
    behavior: Behavior
    request_streaming: bool
    response_streaming: bool
    request_deserializer: Callable[[bytes], Any] | None
    response_serializer: Callable[[Any], bytes] | None

    @property
    def name(self) -> str:
        """The method's short name (``PutSnapshot``)."""
        return self.method.rpartition("/")[2]

    @classmethod
    def of(cls, method: str, handler: grpc.RpcMethodHandler) -> Handler:
        streaming = (bool(handler.request_streaming), bool(handler.response_streaming))
        return cls(
            method,
            getattr(handler, _KINDS[streaming][1]),
            *streaming,
            handler.request_deserializer,
            handler.response_serializer,
        )

    def replace(self, **changes: Any) -> Handler:
        return dataclasses.replace(self, **changes)

    def rpc_method_handler(self) -> grpc.RpcMethodHandler:
        make = _KINDS[(self.request_streaming, self.response_streaming)][0]
        return make(
            self.behavior,
            request_deserializer=self.request_deserializer,
            response_serializer=self.response_serializer,
        )


Layer = Callable[[Handler], Handler]
"""Wraps a handler (or returns it unchanged where it does not apply)."""


def wrap(method: str, handler: grpc.RpcMethodHandler, layers: Sequence[Layer]) -> grpc.RpcMethodHandler:
    """``handler`` inside ``layers``, the first one outermost (it runs first on each call)."""
    wrapped = Handler.of(method, handler)
    for layer in reversed(layers):
        wrapped = layer(wrapped)
    return wrapped.rpc_method_handler()


class Layered(grpc.ServerInterceptor):
    """Every handler a server finds, inside the same layers (see :func:`wrap`)."""

    def __init__(self, layers: Sequence[Layer]) -> None:
        self.layers = tuple(layers)

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler | None],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = continuation(details)
        if handler is None or not self.layers:
            return handler
        return wrap(details.method, handler, self.layers)
