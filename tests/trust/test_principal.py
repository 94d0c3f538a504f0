"""The principal handed to handlers: resolved once per call by the auth layer, read by the handlers;
the request message itself is never rewritten."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import pytest
from trust_helpers import KEY_ACME, KEY_OPS, auth_config, write_auth

from deltastore.errors import PermissionDenied
from deltastore.server.auth import AuthLayer, AuthPolicy
from deltastore.server.handlers import Layered
from deltastore.server.principal import (
    Access,
    Principal,
    Role,
    current_principal,
    namespace_for,
    savings_namespace,
)
from deltastore.server.service import SERVICE_NAME, create_server, method_handlers
from deltastore.server.settings import ServerSettings
from deltastore.store import Store
from deltastore.v1 import deltastore_pb2 as pb
from deltastore.v1 import deltastore_pb2_grpc as pb_grpc


class Recorder(pb_grpc.DeltaStoreServicer):
    """Handlers that record what they see: the principal, the request as received, the namespace."""

    def __init__(self) -> None:
        self.seen: dict[str, tuple[Principal | None, str, str]] = {}
        self.threads: set[threading.Thread] = set()

    def _see(self, method: str, requested: str, access: Access) -> None:
        self.threads.add(threading.current_thread())
        self.seen[method] = (current_principal(), requested, namespace_for(requested, access, auth_on=True))

    def ListSnapshots(self, request: pb.ListSnapshotsRequest, context: Any) -> pb.ListSnapshotsResponse:
        self._see("ListSnapshots", request.namespace, Access.READ)
        return pb.ListSnapshotsResponse()

    def GetSnapshot(self, request: pb.GetSnapshotRequest, context: Any) -> Iterator[pb.GetSnapshotResponse]:
        yield pb.GetSnapshotResponse(info=pb.SnapshotInfo())
        # Still the caller's principal after a response went out (the stream runs step by step).
        self._see("GetSnapshot", request.namespace, Access.READ)
        yield pb.GetSnapshotResponse(info=pb.SnapshotInfo())

    def PutSnapshot(self, request_iterator: Iterator[Any], context: Any) -> pb.PutSnapshotResponse:
        header = next(request_iterator).header
        self._see("PutSnapshot", header.namespace, Access.WRITE)
        return pb.PutSnapshotResponse()


@pytest.fixture
def served() -> Iterator[tuple[Recorder, grpc.Channel]]:
    recorder = Recorder()
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=2),
        interceptors=[Layered([AuthLayer(AuthPolicy(auth_config()))])],
    )
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(SERVICE_NAME, method_handlers(recorder)),)
    )
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    try:
        yield recorder, channel
    finally:
        channel.close()
        server.stop(None)


def _key(key: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {key}"),)


def test_handlers_see_the_principal_and_the_request_as_sent(served: tuple[Recorder, grpc.Channel]) -> None:
    recorder, channel = served
    stub = pb_grpc.DeltaStoreStub(channel)
    stub.ListSnapshots(pb.ListSnapshotsRequest(namespace=""), metadata=_key(KEY_ACME), timeout=10)
    list(stub.GetSnapshot(pb.GetSnapshotRequest(namespace="acme-eval"), metadata=_key(KEY_ACME), timeout=10))
    header = pb.SnapshotHeader(namespace="default", session="s", model="m", codec="k4v2")
    stub.PutSnapshot(iter([pb.PutSnapshotRequest(header=header)]), metadata=_key(KEY_ACME), timeout=10)

    principal, requested, resolved = recorder.seen["ListSnapshots"]
    assert principal is not None and principal.tenant == "acme" and principal.role is Role.TENANT
    assert (requested, resolved) == ("", "acme")  # the request keeps "", the handler acts in the home
    assert recorder.seen["GetSnapshot"][0] == principal
    assert recorder.seen["GetSnapshot"][1:] == ("acme-eval", "acme-eval")
    assert recorder.seen["PutSnapshot"][1:] == ("default", "acme")
    # The principal belonged to those calls only: not to this thread, nor left on the server's.
    assert current_principal() is None and recorder.threads


def test_refusals_keep_their_codes(served: tuple[Recorder, grpc.Channel]) -> None:
    recorder, channel = served
    stub = pb_grpc.DeltaStoreStub(channel)
    with pytest.raises(grpc.RpcError) as missing:
        stub.ListSnapshots(pb.ListSnapshotsRequest(), timeout=10)
    assert missing.value.code() is grpc.StatusCode.UNAUTHENTICATED
    with pytest.raises(grpc.RpcError) as ops:
        stub.ListSnapshots(pb.ListSnapshotsRequest(), metadata=_key(KEY_OPS), timeout=10)
    assert ops.value.code() is grpc.StatusCode.PERMISSION_DENIED
    assert "ListSnapshots" not in recorder.seen  # refused before the handler ran


def test_namespace_resolution_without_and_with_a_principal() -> None:
    assert namespace_for("", Access.WRITE, auth_on=False) == "default"  # auth off: as asked
    assert namespace_for("anything", Access.WRITE, auth_on=False) == "anything"
    assert savings_namespace("", auth_on=False) is None  # the whole store
    # Auth on and no principal (a handler that lost its call's context): refused, never open.
    for resolve in (
        lambda: namespace_for("anything", Access.READ, auth_on=True),
        lambda: savings_namespace("", auth_on=True),
    ):
        with pytest.raises(PermissionDenied, match="without an authenticated caller"):
            resolve()
    tenant = AuthPolicy(auth_config()).authenticate(KEY_ACME)
    assert tenant.namespace_for("default", Access.WRITE) == "acme"
    assert tenant.namespace_for("public", Access.READ) == "public"
    with pytest.raises(PermissionDenied, match="may not write to namespace 'public'"):
        tenant.namespace_for("public", Access.WRITE)
    with pytest.raises(PermissionDenied, match="may not use namespace 'globex'"):
        tenant.namespace_for("globex", Access.READ)


def test_a_server_with_auth_refuses_calls_that_reach_handlers_without_a_principal(tmp_path: Path) -> None:
    """Fail closed: the service configured with an auth file but served without its auth layer
    (as if a change lost the principal on the way) refuses every namespaced call."""
    settings = ServerSettings(auth_file=str(write_auth(tmp_path / "auth.json")))
    with Store.open(tmp_path / "data") as store:
        server, port = create_server(store, "127.0.0.1:0", settings=settings)  # no auth interceptor
        try:
            with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
                stub = pb_grpc.DeltaStoreStub(channel)
                for call in (
                    lambda: stub.ListSnapshots(pb.ListSnapshotsRequest(namespace="acme"), timeout=10),
                    lambda: stub.GetSavings(pb.GetSavingsRequest(), timeout=10),
                ):
                    with pytest.raises(grpc.RpcError) as refused:
                        call()
                    assert refused.value.code() is grpc.StatusCode.PERMISSION_DENIED
                    assert "without an authenticated caller" in (refused.value.details() or "")
        finally:
            server.stop(None)
