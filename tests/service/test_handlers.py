"""The handler-wrapping helper: layers compose in order around every kind of handler, on a real server."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent import futures
from typing import Any

import grpc
import pytest

from deltastore.server.handlers import Handler, Layer, Layered

SERVICE = "test.Echo"


def _behaviors() -> dict[str, grpc.RpcMethodHandler]:
    """Echo handlers of the four kinds over raw bytes (no protobuf needed)."""

    def unary(request: bytes, context: Any) -> bytes:
        return request

    def server_stream(request: bytes, context: Any) -> Iterator[bytes]:
        yield request
        yield request

    def client_stream(requests: Iterator[bytes], context: Any) -> bytes:
        return b"".join(requests)

    def bidi(requests: Iterator[bytes], context: Any) -> Iterator[bytes]:
        yield from requests

    return {
        "Unary": grpc.unary_unary_rpc_method_handler(unary),
        "ServerStream": grpc.unary_stream_rpc_method_handler(server_stream),
        "ClientStream": grpc.stream_unary_rpc_method_handler(client_stream),
        "Bidi": grpc.stream_stream_rpc_method_handler(bidi),
    }


def _tracing(name: str, log: list[str]) -> Layer:
    def layer(handler: Handler) -> Handler:
        inner = handler.behavior

        def traced(request: Any, context: Any) -> Any:
            log.append(f"{name}:{handler.name}")
            return inner(request, context)

        return handler.replace(behavior=traced)

    return layer


@pytest.fixture
def channel_and_log() -> Iterator[tuple[grpc.Channel, list[str]]]:
    log: list[str] = []
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=2),
        interceptors=[Layered([_tracing("outer", log), _tracing("inner", log)])],
    )
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, _behaviors()),))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    try:
        yield channel, log
    finally:
        channel.close()
        server.stop(None)


def test_layers_wrap_every_kind_in_order(channel_and_log: tuple[grpc.Channel, list[str]]) -> None:
    channel, log = channel_and_log
    assert channel.unary_unary(f"/{SERVICE}/Unary")(b"a", timeout=10) == b"a"
    assert list(channel.unary_stream(f"/{SERVICE}/ServerStream")(b"b", timeout=10)) == [b"b", b"b"]
    assert channel.stream_unary(f"/{SERVICE}/ClientStream")(iter([b"c", b"d"]), timeout=10) == b"cd"
    assert list(channel.stream_stream(f"/{SERVICE}/Bidi")(iter([b"e", b"f"]), timeout=10)) == [b"e", b"f"]
    names = ("Unary", "ServerStream", "ClientStream", "Bidi")
    assert log == [f"{where}:{name}" for name in names for where in ("outer", "inner")]


def test_a_handler_converts_both_ways_keeping_its_behavior() -> None:
    handler = _behaviors()["Unary"]
    wrapped = Handler.of(f"/{SERVICE}/Unary", handler)
    assert wrapped.behavior is handler.unary_unary and wrapped.name == "Unary"
    assert not wrapped.request_streaming and not wrapped.response_streaming
    rebuilt = wrapped.rpc_method_handler()
    assert rebuilt.unary_unary is handler.unary_unary and rebuilt.unary_stream is None
