"""Authentication: keys on gRPC metadata and HTTP headers, the ops role, config checks, TLS and mTLS."""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import logging
import ssl
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from trust_helpers import (
    ALL_KEYS,
    KEY_ACME,
    KEY_GLOBEX,
    KEY_OPS,
    MODEL,
    SERVICE,
    auth_config,
    call_every_method,
    client,
    make_cache,
    make_pki,
    send_garbage,
    start_service,
    tokens_for,
    write_auth,
)

from deltastore.errors import InvalidArgument
from deltastore.server import auth as auth_mod
from deltastore.server.app import Service
from deltastore.server.auth import AuthPolicy
from deltastore.server.http import create_app
from deltastore.server.metrics import Metrics
from deltastore.settings import StoreConfig
from deltastore.v1 import deltastore_pb2 as pb
from deltastore.v1 import deltastore_pb2_grpc as pb_grpc

OK = grpc.StatusCode.OK


@pytest.fixture
def service(tmp_path: Path) -> Iterator[Service]:
    svc = start_service(tmp_path, auth_file=str(write_auth(tmp_path / "auth.json")))
    try:
        yield svc
    finally:
        svc.stop()


@pytest.fixture
def channel(service: Service) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(f"127.0.0.1:{service.grpc_port}") as ch:
        yield ch


def test_no_auth_file_keeps_the_service_open(tmp_path: Path) -> None:
    svc = start_service(tmp_path)
    try:
        with client(svc.grpc_port, None) as c:
            c.put_snapshot("s", 0, tokens_for(0, 20), make_cache(20), model=MODEL)
            assert [s.turn for s in c.list_snapshots("s")] == [0]
    finally:
        svc.stop()


@pytest.mark.parametrize("key", [None, "", "wrong-key-of-sufficient-length", KEY_ACME + "x", KEY_ACME[:-1]])
def test_every_call_without_a_valid_key_is_unauthenticated(
    channel: grpc.Channel, key: str | None, reliability
) -> None:
    codes = call_every_method(channel, key, "acme")
    assert set(codes.values()) == {grpc.StatusCode.UNAUTHENTICATED}, codes
    reliability.record(
        f"call every rpc with key {'missing' if not key else 'wrong'}", len(codes), "UNAUTHENTICATED"
    )


def test_malformed_authorization_headers_are_unauthenticated(channel: grpc.Channel, reliability) -> None:
    bad = [("authorization", f"Basic {KEY_ACME}"), ("authorization", KEY_ACME), ("authorization", "Bearer")]
    s = pb_grpc.DeltaStoreStub(channel)
    for header in bad:
        with pytest.raises(grpc.RpcError) as err:
            s.ListSnapshots(pb.ListSnapshotsRequest(), metadata=(header,), timeout=5)
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    # x-api-key is the other accepted header
    assert (
        s.ListSnapshots(pb.ListSnapshotsRequest(), metadata=(("x-api-key", KEY_ACME),), timeout=5) is not None
    )
    reliability.record(
        "malformed authorization header (Basic, no scheme, empty bearer)", len(bad), "UNAUTHENTICATED"
    )


def test_health_is_open_and_reflection_needs_a_key(channel: grpc.Channel) -> None:
    reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING
    refl = reflection_pb2_grpc.ServerReflectionStub(channel)
    request = reflection_pb2.ServerReflectionRequest(list_services="")
    with pytest.raises(grpc.RpcError) as err:
        list(refl.ServerReflectionInfo(iter([request]), timeout=5))
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    replies = list(refl.ServerReflectionInfo(iter([request]), metadata=(("x-api-key", KEY_ACME),), timeout=5))
    assert any(s.name == SERVICE.full_name for s in replies[0].list_services_response.service)


def test_ops_key_reads_savings_only(service: Service, channel: grpc.Channel, reliability) -> None:
    with client(service.grpc_port, KEY_ACME) as c:
        c.put_snapshot("s", 0, tokens_for(0, 40), make_cache(40), model=MODEL)
    for namespace in ("", "acme", "globex"):
        codes = call_every_method(channel, KEY_OPS, namespace)
        assert codes.pop("GetSavings") is OK
        assert set(codes.values()) == {grpc.StatusCode.PERMISSION_DENIED}, codes
    with client(service.grpc_port, KEY_OPS) as ops:
        whole = ops.savings()
        assert whole["snapshots"] == 1 and set(whole["namespaces"]) == {"acme"}
        assert ops.savings("acme")["snapshots"] == 1
    reliability.record(
        "ops key calls every rpc but GetSavings", 3 * (len(SERVICE.methods) - 1), "PERMISSION_DENIED"
    )


def test_http_keys_roles_and_namespaces(service: Service, reliability) -> None:
    with client(service.grpc_port, KEY_ACME) as c:
        c.put_snapshot("s", 0, tokens_for(0, 40), make_cache(40), model=MODEL)
    base = f"http://127.0.0.1:{service.http_port}"

    def get(path: str, key: str | None = None, **params: str) -> httpx.Response:
        headers = {"authorization": f"Bearer {key}"} if key else {}
        return httpx.get(base + path, headers=headers, params=params, timeout=10)

    for path in ("/healthz", "/readyz"):
        assert get(path).status_code == 200
    tried = 0
    for path in ("/", "/metrics", "/v1/savings", "/v1/sessions/s", "/docs", "/openapi.json", "/nope"):
        for key in (None, "not-a-key-but-long-enough"):
            r = get(path, key)
            tried += 1
            assert r.status_code == 401, (path, r.status_code)
            assert r.headers["www-authenticate"].startswith("Bearer")
            assert r.json()["error"]["code"] == "UNAUTHENTICATED"
    reliability.record("HTTP request without or with a wrong key", tried, "401 + WWW-Authenticate")

    for path in ("/", "/metrics", "/v1/savings", "/openapi.json"):
        assert get(path, KEY_OPS).status_code == 200, path
    assert get("/v1/savings", KEY_OPS, namespace="acme").json()["snapshots"] == 1
    assert get("/v1/sessions/s", KEY_OPS, namespace="acme").status_code == 403

    for path in ("/", "/metrics", "/openapi.json"):
        assert get(path, KEY_ACME).status_code == 403, path
    assert get("/v1/savings", KEY_ACME).json()["namespace"] == "acme"
    assert get("/v1/sessions/s", KEY_ACME).json()["snapshots"][0]["turn"] == 0
    assert get("/nope", KEY_ACME).status_code == 404
    reliability.record("HTTP route outside the key's role", 7, "403 (404 for unknown paths)")


def test_every_http_route_has_a_policy(tmp_path: Path) -> None:
    """A route added to the ops app must be placed in the HTTP auth table (default deny)."""
    from deltastore.store import Store

    with Store.open(tmp_path / "d", StoreConfig()) as store:
        app = create_app(store, Metrics())
    known = (
        auth_mod.OPEN_PATHS
        | auth_mod.OPS_PATHS
        | {auth_mod.SAVINGS_PATH, auth_mod.SESSIONS_PREFIX + "{session}"}
    )
    assert {r.path for r in app.routes} <= known


def test_keys_are_never_logged(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    svc = start_service(tmp_path, auth_file=str(write_auth(tmp_path / "auth.json")))
    try:
        with grpc.insecure_channel(f"127.0.0.1:{svc.grpc_port}") as ch:
            for key in (*ALL_KEYS, KEY_ACME + "-typo", "guess-guess-guess-guess"):
                call_every_method(ch, key, "globex")
        for key in (KEY_ACME, "guess-guess-guess-guess"):
            httpx.get(f"http://127.0.0.1:{svc.http_port}/metrics", headers={"x-api-key": key}, timeout=10)
    finally:
        svc.stop()
    text = caplog.text
    assert "refused" in text  # refusals are logged ...
    for key in (*ALL_KEYS, "guess-guess-guess-guess"):
        assert key not in text and key[:12] not in text  # ... without the key or a prefix of it


def test_key_comparison_has_no_early_exit(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every configured digest is compared, whichever key (or none) matches."""
    policy = AuthPolicy(auth_config())
    calls: list[int] = []
    real = hmac.compare_digest

    def counting(a: bytes, b: bytes) -> bool:
        calls.append(1)
        return real(a, b)

    monkeypatch.setattr(auth_mod.hmac, "compare_digest", counting)
    counts = []
    for key in (*ALL_KEYS, "no-such-key-no-such-key"):
        calls.clear()
        with contextlib.suppress(auth_mod.AuthError):
            policy.authenticate(key)
        counts.append(len(calls))
    assert counts == [len(ALL_KEYS)] * (len(ALL_KEYS) + 1)


def test_digest_keys_and_toml_files(tmp_path: Path) -> None:
    digest = hashlib.sha256(KEY_GLOBEX.encode()).hexdigest()
    path = tmp_path / "auth.toml"
    path.write_text(
        f'shared_namespaces = []\n[keys."sha256:{digest}"]\ntenant = "globex"\n[keys."{KEY_OPS}"]\nrole = "ops"\n'
    )
    policy = auth_mod.load_auth_file(path)
    assert policy.authenticate(KEY_GLOBEX).tenant == "globex"
    assert policy.authenticate(KEY_GLOBEX).home == "globex"
    assert policy.authenticate(KEY_OPS).role is auth_mod.Role.OPS


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda c: c["tenants"].update(globex={"namespaces": ["acme"]}), "already tenant 'acme'"),
        (lambda c: c["tenants"]["acme"]["shared"].update(secret="read"), "not in shared_namespaces"),
        (lambda c: c["tenants"].update(globex={"namespaces": ["public"]}), "shared namespace"),
        (lambda c: c["keys"].update({"short": {"tenant": "acme"}}), "shorter than 16"),
        (
            lambda c: c["keys"].update({"x" * 20: {"role": "admin"}}),
            r"keys\.<key>\.role='admin': .*'tenant' or 'ops'",
        ),
        (
            lambda c: c["keys"].update({"z" * 20: {"tenat": "acme"}}),
            r"keys\.<key>\.tenat='acme': unknown entry",
        ),
        (
            lambda c: c["tenants"]["acme"].update(namespaces="acme"),
            r"tenants\.acme\.namespaces='acme': .*list",
        ),
        (lambda c: c["tenants"]["acme"].update(namespaces=["a", "a"]), "lists a name twice"),
        (
            lambda c: c.update(shared_namespaces=["no spaces"]),
            r"shared_namespaces\.0='no spaces': name 'no spaces' must match",
        ),
        (lambda c: c["keys"].update({"y" * 20: {}}), "needs a 'tenant'"),
        (lambda c: c["tenants"]["acme"]["shared"].update(public="own"), "'read' or 'write'"),
        (lambda c: c.update(keys={}), "no keys"),
        (lambda c: c.update(extra=1), "extra=1: unknown entry"),
        (lambda c: c["tenants"].update(globex={"namespaces": ["default"]}), "home namespace"),
    ],
)
def test_bad_auth_configs_are_refused(change, message: str, reliability) -> None:
    config = auth_config()
    change(config)
    with pytest.raises(InvalidArgument, match=message) as refused:
        AuthPolicy(config)
    assert not any(key in str(refused.value) for key in config["keys"] if len(key) >= 16), "a key leaked"
    reliability.record("invalid auth file", 1, "refused at start with a named reason")


def test_cross_tenant_dedup_needs_opt_in(tmp_path: Path) -> None:
    groups = {"acme": "g", "globex": "g"}
    with pytest.raises(InvalidArgument, match="could infer"):
        start_service(
            tmp_path / "a",
            auth_file=str(write_auth(tmp_path / "auth.json")),
            store_config=StoreConfig(block_size=16, shared_groups=groups),
        )
    # One owner's namespaces may dedup together; an explicit opt-in allows a cross-tenant group.
    AuthPolicy(auth_config()).check_dedup_groups({"acme": "g", "acme-eval": "g"})
    AuthPolicy(auth_config(cross_tenant_dedup_groups=["g"])).check_dedup_groups(groups)
    with pytest.raises(InvalidArgument):
        AuthPolicy(auth_config()).check_dedup_groups({"acme": "g", "public": "g"})


# -- TLS ---------------------------------------------------------------------------------------


def _mtls_service(where: Path, auth: str, pki: Any) -> Service:
    return start_service(
        where,
        auth_file=auth,
        tls_cert=str(pki.server_cert),
        tls_key=str(pki.server_key),
        tls_client_ca=str(pki.ca),
    )


def test_tls_and_mtls(tmp_path: Path, reliability) -> None:
    pki = make_pki(tmp_path / "pki")
    ca = pki.ca.read_bytes()
    auth = str(write_auth(tmp_path / "auth.json"))

    def tls_client(port: int, cert: Path | None = None, key: Path | None = None, api_key: str = KEY_ACME):
        creds = grpc.ssl_channel_credentials(
            ca, key.read_bytes() if key else None, cert.read_bytes() if cert else None
        )
        creds = grpc.composite_channel_credentials(creds, grpc.access_token_call_credentials(api_key))
        return client(port, None, credentials=creds, timeout=5)

    svc = start_service(
        tmp_path / "tls", auth_file=auth, tls_cert=str(pki.server_cert), tls_key=str(pki.server_key)
    )
    try:
        with tls_client(svc.grpc_port) as c:
            c.put_snapshot("s", 0, tokens_for(0, 20), make_cache(20), model=MODEL)
            assert len(c.list_snapshots()) == 1
        with tls_client(svc.grpc_port, api_key=KEY_GLOBEX) as c:
            assert c.list_snapshots() == []
        with client(svc.grpc_port, KEY_ACME, timeout=3) as plain, pytest.raises(grpc.RpcError) as err:
            plain.list_snapshots()
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        r = httpx.get(
            f"https://127.0.0.1:{svc.http_port}/v1/savings",
            headers={"x-api-key": KEY_ACME},
            verify=_ssl(pki),
            timeout=10,
        )
        assert r.json()["snapshots"] == 1
        with pytest.raises(httpx.HTTPError):
            httpx.get(f"http://127.0.0.1:{svc.http_port}/healthz", timeout=5)
    finally:
        svc.stop()

    svc = _mtls_service(tmp_path / "mtls", auth, pki)
    try:
        with tls_client(svc.grpc_port, pki.client_cert, pki.client_key) as c:
            assert c.list_snapshots() == []
        for cert, key in ((None, None), (pki.rogue_cert, pki.rogue_key)):
            with tls_client(svc.grpc_port, cert, key) as c, pytest.raises(grpc.RpcError) as err:
                c.list_snapshots()
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        url = f"https://127.0.0.1:{svc.http_port}/healthz"
        assert httpx.get(url, verify=_ssl(pki, with_cert=True), timeout=10).status_code == 200
        with pytest.raises(httpx.HTTPError):
            httpx.get(url, verify=_ssl(pki), timeout=10)
    finally:
        svc.stop()
    reliability.record(
        "plaintext client against a TLS server", 2, "handshake refused (UNAVAILABLE / HTTP error)"
    )
    reliability.record("mTLS client without a certificate or with another CA's", 3, "handshake refused")


def _ssl(pki, *, with_cert: bool = False) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(pki.ca))
    if with_cert:
        ctx.load_cert_chain(str(pki.client_cert), str(pki.client_key))
    return ctx


def test_half_tls_configuration_is_refused(tmp_path: Path) -> None:
    pki = make_pki(tmp_path / "pki")
    for fields in (
        {"tls_cert": str(pki.server_cert)},
        {"tls_client_ca": str(pki.ca)},
        {"tls_cert": "/no/such", "tls_key": "/no/such"},
    ):
        with pytest.raises(InvalidArgument):
            start_service(tmp_path / "x", **fields)


def test_asyncio_client_sends_its_key(service: Service) -> None:
    """async_api_key on a plaintext channel: the asyncio client's calls carry the key, streams included."""
    import asyncio

    from deltastore.client.aio import AsyncDeltaStoreClient
    from deltastore.client.auth import async_api_key

    target = f"127.0.0.1:{service.grpc_port}"

    async def run() -> None:
        keys = async_api_key(KEY_ACME)
        assert all(KEY_ACME not in repr(k) for k in keys)
        async with AsyncDeltaStoreClient(target, namespace="acme", timeout=20, interceptors=keys) as c:
            await c.put_snapshot("s", 0, tokens_for(3, 20), make_cache(20), model=MODEL)  # client stream
            got = await c.get_snapshot("s", 0, as_cache=False)  # server stream
            assert got.n_tokens == 20
        async with AsyncDeltaStoreClient(target, namespace="acme", timeout=20) as c:
            with pytest.raises(grpc.RpcError) as err:
                await c.list_snapshots("s")
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED

    asyncio.run(run())


def test_bytes_that_do_not_parse_are_invalid_argument_with_a_valid_key(service: Service, reliability) -> None:
    """The auth layer must not trip over them (it reads the namespace of parsed requests only)."""
    tried = send_garbage(service.grpc_port, [("authorization", f"Bearer {KEY_ACME}")])
    # A put whose first message is a chunk, not a header: refused by the service, not by auth.
    with grpc.insecure_channel(f"127.0.0.1:{service.grpc_port}") as ch, pytest.raises(grpc.RpcError) as err:
        pb_grpc.DeltaStoreStub(ch).PutSnapshot(
            iter([pb.PutSnapshotRequest(chunk=pb.BlockChunk(key=bytes(32), total_bytes=1, data=b"x"))]),
            metadata=[("authorization", f"Bearer {KEY_ACME}")],
            timeout=10,
        )
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value.details()
    reliability.record(
        "request bytes that are not protobuf, with a valid key (auth on)",
        tried + 1,
        "INVALID_ARGUMENT naming the rpc",
    )


def test_sighup_reloads_the_auth_file(tmp_path: Path, reliability) -> None:
    """Keys rotate without a restart; a broken file is refused and the keys in use stay."""
    import signal
    import time

    from trust_helpers import ServeProcess, auth_config, client, write_auth

    path = write_auth(tmp_path / "auth.json")
    server = ServeProcess(tmp_path / "data", "--auth-file", str(path))
    new_key = "rotated-key-9c8b7a6d5e4f3a2b1c0d"

    def savings_code(key: str) -> grpc.StatusCode:
        try:
            with client(server.grpc_port, key, "acme", timeout=5) as c:
                c.savings()
            return grpc.StatusCode.OK
        except grpc.RpcError as exc:
            return exc.code()

    def after_sighup(expect: dict[str, grpc.StatusCode]) -> dict[str, grpc.StatusCode]:
        server.proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 10
        while True:
            got = {k: savings_code(k) for k in expect}
            if got == expect or time.monotonic() > deadline:
                return got

    try:
        assert savings_code(KEY_ACME) is grpc.StatusCode.OK
        assert savings_code(new_key) is grpc.StatusCode.UNAUTHENTICATED
        rotated = auth_config()
        rotated["keys"] = {new_key: {"tenant": "acme"}, KEY_OPS: {"role": "ops"}}
        write_auth(path, rotated)
        want = {KEY_ACME: grpc.StatusCode.UNAUTHENTICATED, new_key: grpc.StatusCode.OK}
        assert after_sighup(want) == want
        path.write_text("{ not json")
        server.proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 10
        while not any("reload refused" in line for line in server.stderr) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert any("reload refused" in line for line in server.stderr), server.stderr
        assert {k: savings_code(k) for k in want} == want and server.proc.poll() is None
    finally:
        server.stop()
    reliability.record(
        "SIGHUP after rotating a key; SIGHUP with a broken auth file",
        2,
        "old key UNAUTHENTICATED and new key served at once; broken file refused, keys in use kept",
    )


def test_mtls_certificate_maps_to_a_tenant(tmp_path: Path, reliability) -> None:
    """With mTLS, a client certificate's common name can stand for an API key (auth file 'certs')."""
    from trust_helpers import auth_config, make_pki

    pki = make_pki(tmp_path / "pki")
    config = auth_config()
    config["certs"] = {"worker-1": {"tenant": "acme"}}
    auth = str(write_auth(tmp_path / "auth.json", config))
    with pytest.raises(InvalidArgument, match="client certificate"):  # certs without mTLS: refused
        start_service(tmp_path / "plain", auth_file=auth)
    svc = _mtls_service(tmp_path / "mtls", auth, pki)
    ca = pki.ca.read_bytes()
    creds = grpc.ssl_channel_credentials(ca, pki.client_key.read_bytes(), pki.client_cert.read_bytes())
    try:
        with client(svc.grpc_port, None, "acme", credentials=creds, timeout=5) as c:  # no API key at all
            c.put_snapshot("s", 0, tokens_for(0, 20), make_cache(20), model=MODEL)
            assert [s.session for s in c.list_snapshots()] == ["s"]
        with client(svc.grpc_port, None, "globex", credentials=creds, timeout=5) as c:
            with pytest.raises(grpc.RpcError) as err:
                c.list_snapshots()
            assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
        with client(svc.grpc_port, None, "acme", credentials=creds, timeout=5) as c:
            keyed = grpc.composite_channel_credentials(creds, grpc.access_token_call_credentials(KEY_GLOBEX))
            with client(svc.grpc_port, None, "globex", credentials=keyed, timeout=5) as g:
                assert g.list_snapshots() == []  # a key, when sent, decides
    finally:
        svc.stop()
    reliability.record(
        "mTLS client certificate (CN mapped to a tenant) without an API key; other tenant's namespace",
        3,
        "served as that tenant; PERMISSION_DENIED elsewhere; certs without --tls-client-ca refused at start",
    )


def test_auth_file_reading(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The file's own problems are named: unreadable, unparsable, not a table; raw keys others can read warn."""
    with pytest.raises(InvalidArgument, match="cannot read auth file"):
        auth_mod.load_auth_file(tmp_path / "missing.json")
    broken = tmp_path / "broken.json"
    broken.write_text("{")
    with pytest.raises(InvalidArgument, match="does not parse"):
        auth_mod.load_auth_file(broken)
    broken.write_text("[]")
    with pytest.raises(InvalidArgument, match=r"broken\.json: .*valid dictionary"):
        auth_mod.load_auth_file(broken)
    private = write_auth(tmp_path / "auth.json")
    with caplog.at_level(logging.WARNING, logger="deltastore.server.auth_file"):
        auth_mod.load_auth_file(private)
        assert "readable by others" not in caplog.text
        private.chmod(0o644)
        auth_mod.load_auth_file(private)
    assert "readable by others" in caplog.text and KEY_ACME not in caplog.text
