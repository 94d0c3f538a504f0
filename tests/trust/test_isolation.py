"""Tenant isolation: another tenant can never read, list, look up, delete or infer a tenant's data."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc
import httpx
import pytest
import torch
from trust_helpers import (
    KEY_ACME,
    KEY_GLOBEX,
    KEY_OPS,
    KEY_PLATFORM,
    MODEL,
    SERVICE,
    auth_config,
    call_every_method,
    client,
    make_cache,
    start_service,
    tokens_for,
    write_auth,
)

from deltastore.server.app import Service
from deltastore.settings import StoreConfig

DENIED = grpc.StatusCode.PERMISSION_DENIED
TOKENS = tokens_for(7, 70)  # 4 full blocks and a tail


@pytest.fixture
def service(tmp_path: Path) -> Iterator[Service]:
    svc = start_service(tmp_path, auth_file=str(write_auth(tmp_path / "auth.json")))
    try:
        full = make_cache(70)
        with client(svc.grpc_port, KEY_ACME) as acme:
            first = [(k[:, :50], v[:, :50]) for k, v in full]
            acme.put_snapshot("chat", 0, TOKENS[:50], first, model=MODEL, codec="lossless")
            acme.put_snapshot("chat", 1, TOKENS, full, model=MODEL, codec="lossless", parent_turn=0)
        yield svc
    finally:
        svc.stop()


def _channel(svc: Service) -> grpc.Channel:
    return grpc.insecure_channel(f"127.0.0.1:{svc.grpc_port}")


def _status(fn) -> tuple[grpc.StatusCode, str]:
    try:
        fn()
    except grpc.RpcError as exc:
        return exc.code(), exc.details() or ""
    return grpc.StatusCode.OK, ""


def test_every_call_into_another_tenants_namespace_is_denied(service: Service, reliability) -> None:
    tried = 0
    with _channel(service) as ch:
        for key, target in (
            (KEY_GLOBEX, "acme"),
            (KEY_GLOBEX, "acme-eval"),
            (KEY_ACME, "globex"),
            (KEY_PLATFORM, "acme"),
        ):
            for session in ("chat", "no-such-session"):
                codes = call_every_method(ch, key, target, session=session, turn=1)
                assert set(codes.values()) == {DENIED}, (key[:4], target, codes)
                tried += len(codes)
    reliability.record(
        "every rpc into another tenant's namespace (existing and absent sessions)", tried, "PERMISSION_DENIED"
    )
    with client(service.grpc_port, KEY_ACME) as acme:  # nothing changed
        assert [s.turn for s in acme.list_snapshots("chat")] == [0, 1]


def test_denials_do_not_depend_on_what_exists(service: Service, reliability) -> None:
    """Same code and message for an existing, an absent session and an unknown namespace."""
    answers = set()
    with _channel(service) as ch:
        for target, session in (("acme", "chat"), ("acme", "ghost"), ("nobody", "chat"), ("nobody", "ghost")):
            codes = call_every_method(ch, KEY_GLOBEX, target, session=session, turn=1)
            assert set(codes.values()) == {DENIED}
        with client(service.grpc_port, KEY_GLOBEX, namespace="acme") as g:
            for target in ("acme", "nobody"):
                g.namespace = target
                code, message = _status(lambda: g.get_snapshot("chat", 1))
                answers.add((code, message.replace(target, "<ns>")))
    assert len(answers) == 1, answers
    reliability.record(
        "probe existence through the denial (existing vs absent namespace/session)", 16, "identical answers"
    )


def test_home_namespace_aliases_never_reach_another_tenant(service: Service, reliability) -> None:
    """globex's "" and "default" are globex's own namespace: acme's session is simply not there."""
    with client(service.grpc_port, KEY_GLOBEX, namespace="") as g:
        for ns in ("", "default"):
            g.namespace = ns
            assert g.list_snapshots() == []
            assert _status(lambda: g.get_snapshot("chat", 1))[0] == grpc.StatusCode.NOT_FOUND
            assert _status(lambda: g.delete_session("chat"))[0] == grpc.StatusCode.NOT_FOUND
            assert _status(lambda: g.delete_snapshot("chat", 0))[0] == grpc.StatusCode.NOT_FOUND
            assert g.lookup_prefix(TOKENS, model=MODEL, codec="lossless") == 0
            saved = g.savings("")
            assert saved["snapshots"] == 0 and saved["logical_bytes"] == 0
    with client(service.grpc_port, KEY_ACME) as acme:
        snap = acme.get_snapshot("chat", 1, as_cache=False)
        assert snap.token_ids == TOKENS
        torch.testing.assert_close(snap.layers[1][0], make_cache(70)[1][0], rtol=0, atol=0)
    reliability.record(
        "another tenant's session through '' / 'default' (get, delete, list, lookup, savings)",
        14,
        "NOT_FOUND / empty, data intact",
    )


def test_dedup_is_scoped_per_tenant(service: Service, reliability) -> None:
    """globex cannot learn that acme stored these tokens: no plan flag, no lookup, no block, no reuse."""
    with client(service.grpc_port, KEY_ACME) as acme:
        acme_plan = acme.plan_snapshot("x", TOKENS, model=MODEL, codec="lossless")
        acme_keys = [s.key for s in acme_plan.segments if s.present]
        assert len(acme_keys) == 4  # the full blocks another session of acme's dedups against
        assert acme.has_blocks(acme_keys) == [True] * len(acme_keys)
    with client(service.grpc_port, KEY_GLOBEX) as g:
        plan = g.plan_snapshot("x", TOKENS, model=MODEL, codec="lossless")
        assert not any(s.present for s in plan.segments)
        assert g.lookup_prefix(TOKENS, model=MODEL, codec="lossless") == 0
        assert g.has_blocks(acme_keys) == [False] * len(acme_keys)  # even with acme's exact keys
        result = g.put_snapshot("x", 0, TOKENS, make_cache(70), model=MODEL, codec="lossless")
        assert result.reused_shared_bytes == 0 and result.reused_temporal_bytes == 0
        assert result.new_segments == len(plan.segments)
    with client(service.grpc_port, KEY_OPS) as ops:
        per_ns = ops.savings()["namespaces"]
        assert per_ns["acme"]["snapshots"] == 2 and per_ns["globex"]["snapshots"] == 1
    reliability.record(
        "infer another tenant's prefix via plan/lookup/HasBlocks/put reuse", 4, "nothing revealed"
    )


def test_http_views_are_scoped(service: Service, reliability) -> None:
    base = f"http://127.0.0.1:{service.http_port}"
    g = {"authorization": f"Bearer {KEY_GLOBEX}"}
    assert httpx.get(f"{base}/v1/sessions/chat", params={"namespace": "acme"}, headers=g).status_code == 403
    assert httpx.get(f"{base}/v1/savings", params={"namespace": "acme"}, headers=g).status_code == 403
    # a second namespace parameter cannot smuggle acme's in
    url = f"{base}/v1/sessions/chat?namespace=globex&namespace=acme"
    assert httpx.get(url, headers=g).status_code == 403
    assert httpx.get(f"{base}/v1/sessions/chat", headers=g).status_code == 404
    assert httpx.get(f"{base}/v1/savings", headers=g).json()["snapshots"] == 0
    reliability.record(
        "HTTP session/savings of another tenant's namespace (incl. duplicated query parameter)", 3, "403"
    )


def test_shared_namespace_is_opt_in_and_read_only_for_readers(service: Service, reliability) -> None:
    prompt = tokens_for(99, 48)
    with client(service.grpc_port, KEY_PLATFORM, namespace="public") as platform:
        platform.put_snapshot("system", 0, prompt, make_cache(48, seed=3), model=MODEL, codec="lossless")
    with client(service.grpc_port, KEY_ACME, namespace="public") as acme:
        assert acme.lookup_prefix([*prompt, 1, 2, 3], model=MODEL, codec="lossless") == 48
        assert acme.get_snapshot("system", 0, as_cache=False).token_ids == prompt
        codes = [
            _status(
                lambda: acme.put_snapshot("mine", 0, prompt, make_cache(48), model=MODEL, codec="lossless")
            )[0],
            _status(lambda: acme.delete_session("system"))[0],
            _status(lambda: acme.delete_snapshot("system", 0))[0],
        ]
        assert codes == [DENIED] * 3
    with client(service.grpc_port, KEY_GLOBEX, namespace="public") as g:  # did not opt in
        assert _status(g.list_snapshots)[0] == DENIED
    with client(service.grpc_port, KEY_PLATFORM, namespace="public") as platform:
        assert [s.session for s in platform.list_snapshots()] == ["system"]
    reliability.record(
        "write/delete in a shared namespace with read access; use without opt-in", 4, "PERMISSION_DENIED"
    )


def test_prefix_through_shared_memory_keeps_getprefix_domains(tmp_path: Path, reliability) -> None:
    """GetPrefixShm answers what GetPrefix would: the caller's dedup domain only, nothing exported else."""
    from deltastore.client.auth import ApiKey
    from deltastore.client.sync import DeltaStoreClient
    from deltastore.v1.protocol import SHM_FD_SOCKET

    sock, shm = tmp_path / "ds.sock", tmp_path / "shm"
    svc = start_service(
        tmp_path,
        grpc_address=f"unix:{sock}",
        shm_dir=str(shm),
        auth_file=str(write_auth(tmp_path / "auth.json")),
        store_config=StoreConfig(block_size=16, shared_groups={"acme": "a", "acme-eval": "a"}),
    )

    def shm_client(key: str, namespace: str) -> DeltaStoreClient:
        return DeltaStoreClient(
            f"unix:{sock}", namespace=namespace, timeout=20, interceptors=[ApiKey(key)], shm_dir=str(shm)
        )

    try:
        with shm_client(KEY_ACME, "acme") as acme:
            acme.put_snapshot("one", 0, TOKENS, make_cache(70), model=MODEL, codec="lossless")
            acme.namespace = "acme-eval"  # the same dedup group: its prefix is served
            got = acme.get_prefix(TOKENS, model=MODEL, codec="lossless")
            assert got is not None and got.n_tokens == 70
        with shm_client(KEY_GLOBEX, "acme") as g:
            denied = [_status(lambda: g.fetch_prefix(TOKENS, model=MODEL, codec="lossless"))]
            g.namespace = "acme-eval"
            denied.append(_status(lambda: g.get_prefix(TOKENS, model=MODEL, codec="lossless")))
            assert [code for code, _ in denied] == [DENIED] * 2
            g.namespace = ""  # its own domain: acme's tokens match nothing
            assert g.fetch_prefix(TOKENS, model=MODEL, codec="lossless") is None
        assert [p.name for p in shm.iterdir() if p.name != SHM_FD_SOCKET] == []
    finally:
        svc.stop()
    reliability.record(
        "GetPrefixShm into another tenant's namespaces; with its tokens in its own namespace",
        3,
        "PERMISSION_DENIED / no match; nothing exported",
    )


def test_dedup_group_inside_one_tenant_shares_blocks(tmp_path: Path) -> None:
    svc = start_service(
        tmp_path,
        auth_file=str(write_auth(tmp_path / "auth.json")),
        store_config=StoreConfig(block_size=16, shared_groups={"acme": "a", "acme-eval": "a"}),
    )
    try:
        with client(svc.grpc_port, KEY_ACME, namespace="acme") as acme:
            acme.put_snapshot("one", 0, TOKENS, make_cache(70), model=MODEL, codec="lossless")
            acme.namespace = "acme-eval"
            result = acme.put_snapshot("two", 0, TOKENS, make_cache(70), model=MODEL, codec="lossless")
            assert result.reused_shared_bytes > 0
        with client(svc.grpc_port, KEY_GLOBEX) as g:
            assert g.lookup_prefix(TOKENS, model=MODEL, codec="lossless") == 0
    finally:
        svc.stop()


def test_methods_under_test_are_the_service(service: Service) -> None:
    """The isolation matrix above covers every rpc of deltastore.v1.DeltaStore."""
    with _channel(service) as ch:
        assert set(call_every_method(ch, KEY_ACME, "acme")) == {m.name for m in SERVICE.methods}


def test_splitting_a_dedup_group_closes_the_channel_for_old_sessions(tmp_path: Path, reliability) -> None:
    """The dedup domain comes from the configuration now, not from when a session was created."""
    auth = auth_config(cross_tenant_dedup_groups=["g"])
    auth["tenants"]["globex"] = {"namespaces": ["globex"]}
    auth_file = str(write_auth(tmp_path / "auth.json", auth))
    shared = StoreConfig(block_size=16, shared_groups={"acme": "g", "globex": "g"})
    prompt, secret = tokens_for(30, 48), tokens_for(31, 48)
    svc = start_service(tmp_path, store_config=shared, auth_file=auth_file)
    try:
        with (
            client(svc.grpc_port, KEY_ACME, "acme") as acme,
            client(svc.grpc_port, KEY_GLOBEX, "globex") as gx,
        ):
            acme.put_snapshot("a0", 0, prompt, make_cache(48), model=MODEL, codec="k4v2")
            gx.put_snapshot("b0", 0, prompt, make_cache(48), model=MODEL, codec="k4v2")
    finally:
        data = svc.settings.data_dir
        svc.stop()
    # The operator splits the group: each namespace is its own dedup domain again.
    svc = start_service(tmp_path, store_config=StoreConfig(block_size=16), auth_file=auth_file)
    assert svc.settings.data_dir == data
    refused = 0
    try:
        with (
            client(svc.grpc_port, KEY_ACME, "acme") as acme,
            client(svc.grpc_port, KEY_GLOBEX, "globex") as gx,
        ):
            # globex's old session can no longer write into the group ...
            with pytest.raises(grpc.RpcError) as err:
                gx.put_snapshot("b0", 1, secret, make_cache(48, seed=3), model=MODEL, codec="k4v2")
            assert err.value.code() is grpc.StatusCode.FAILED_PRECONDITION
            refused += 1
            gx.put_snapshot("b1", 0, secret, make_cache(48, seed=3), model=MODEL, codec="k4v2")
            # ... and acme's old session can no longer probe it.
            with pytest.raises(grpc.RpcError) as err:
                acme.plan_snapshot("a0", secret, model=MODEL, codec="k4v2")
            assert err.value.code() is grpc.StatusCode.FAILED_PRECONDITION
            refused += 1
            plan = acme.plan_snapshot("a1", secret, model=MODEL, codec="k4v2")
            assert not any(s.present for s in plan.segments)
            assert acme.lookup_prefix(secret, model=MODEL, codec="k4v2") == 0
            # Old sessions stay readable and deletable.
            assert acme.get_snapshot("a0", 0, model=MODEL).n_tokens == 48
            acme.delete_session("a0")
            gx.delete_session("b0")
    finally:
        svc.stop()
    reliability.record(
        "old sessions of a split dedup group: put, plan against the other tenant's new prefix",
        refused + 2,
        "FAILED_PRECONDITION for the old sessions; nothing present for new ones; old data readable, deletable",
    )
