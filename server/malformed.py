"""Requests that do not parse get INVALID_ARGUMENT, not gRPC's INTERNAL.

grpc's Python server answers a request message its deserializer cannot parse with INTERNAL
("Exception deserializing request!"), which reads as a server bug and hides the caller's mistake.
:func:`tolerant` wraps a method handler so that its deserializer never raises: a message that
does not parse becomes a :class:`Malformed` marker, and the handler answers INVALID_ARGUMENT
naming the method and the parser's complaint (unary requests) or raises ``InvalidArgument`` in
the request iterator (streaming requests), where the service's error mapping reports it and
nothing of the call is stored. It is a layer of ``server/handlers.py``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import grpc

from deltastore.errors import InvalidArgument
from deltastore.server.handlers import Handler
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


def tolerant(handler: Handler) -> Handler:
    """``handler`` with a deserializer that never raises (see the module docstring); a :data:`Layer`."""
    behavior = handler.behavior

    def checked_stream(requests: Iterator[Any], context: grpc.ServicerContext) -> Any:
        return behavior(_checked(requests), context)

    def checked(request: Any, context: grpc.ServicerContext) -> Any:
        if isinstance(request, Malformed):
            _refuse(request, context)
        return behavior(request, context)

    return handler.replace(
        behavior=checked_stream if handler.request_streaming else checked,
        request_deserializer=_parse(handler.name, handler.request_deserializer),
    )
