"""Requests that do not parse get INVALID_ARGUMENT, not gRPC's INTERNAL.

grpc's Python server answers a request message its deserializer cannot parse with INTERNAL
("Exception deserializing request!"), which reads as a server bug and hides the caller's mistake.
:func:`tolerant` wraps a method handler so that its deserializer never raises: a message that
does not parse becomes a :class:`Malformed` marker, and the handler answers INVALID_ARGUMENT
naming the method and the parser's complaint (unary requests) or raises ``InvalidArgument`` in
the request iterator (streaming requests), where the service's error mapping reports it and
nothing of the call is stored.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import grpc

from deltastore.errors import InvalidArgument
from deltastore.v1.protocol import ERROR_TYPE_KEY

__all__ = ["Malformed", "tolerant"]


@dataclass(frozen=True)
class Malformed:
    """A request message that did not parse."""

    message: str


def _parse(method: str, deserializer: Callable[[bytes], Any] | None) -> Callable[[bytes], Any]:
    def parse(data: bytes) -> Any:
        if deserializer is None:
            return data
        try:
            return deserializer(data)
        except Exception as exc:  # protobuf's DecodeError, or a hand parser's complaint
            return Malformed(f"{method}: the request message does not parse ({type(exc).__name__}: {exc})")

    return parse


def _checked(requests: Iterator[Any]) -> Iterator[Any]:
    for request in requests:
        if isinstance(request, Malformed):
            raise InvalidArgument(request.message)
        yield request


def _refuse(request: Malformed, context: grpc.ServicerContext) -> None:
    context.set_trailing_metadata(((ERROR_TYPE_KEY, InvalidArgument.__name__),))
    context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.message)


def tolerant(method: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    """``handler`` with a deserializer that never raises (see the module docstring)."""
    parse = _parse(method, handler.request_deserializer)
    serialize = handler.response_serializer
    if handler.request_streaming:
        behavior = handler.stream_unary or handler.stream_stream
        factory = (
            grpc.stream_unary_rpc_method_handler
            if handler.stream_unary is not None
            else grpc.stream_stream_rpc_method_handler
        )
        return factory(lambda requests, context: behavior(_checked(requests), context), parse, serialize)
    behavior = handler.unary_unary or handler.unary_stream
    factory = (
        grpc.unary_unary_rpc_method_handler
        if handler.unary_unary is not None
        else grpc.unary_stream_rpc_method_handler
    )

    def guarded(request: Any, context: grpc.ServicerContext) -> Any:
        if isinstance(request, Malformed):
            _refuse(request, context)
        return behavior(request, context)

    return factory(guarded, parse, serialize)
