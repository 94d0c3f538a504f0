"""Shared memory is tied to the unix socket, or to TCP loopback by an explicit setting (IPv6 too).

Before: any TCP peer from 127.0.0.0/8 was trusted (a remote caller behind a local proxy looks
exactly like that), while IPv6 loopback was refused (gRPC percent-encodes its brackets).
"""

from __future__ import annotations

import socket
from pathlib import Path

import grpc
import pytest
from trust_helpers import MODEL, make_cache, start_service, tokens_for

from deltastore.client.sync import DeltaStoreClient
from deltastore.server.service import _on_this_host
from deltastore.v1.protocol import SHM_FD_PREFIX, SHM_FD_SOCKET

TOKENS = tokens_for(40, 40)


def _roundtrip(target: str, shm: Path) -> list[grpc.StatusCode]:
    """Both shared-memory reads, GetSnapshotShm (a snapshot) and GetPrefixShm (a prefix): their codes."""
    with DeltaStoreClient(target, timeout=20) as c:
        c.put_snapshot("s", 0, TOKENS, make_cache(40), model=MODEL, codec="k4v2")
    codes = []
    with DeltaStoreClient(target, timeout=20, shm_dir=str(shm)) as c:
        for read in (
            lambda: c.get_snapshot("s", 0, model=MODEL),
            lambda: c.get_prefix(TOKENS, model=MODEL, codec="k4v2"),
        ):
            try:
                got = read()
            except grpc.RpcError as exc:
                codes.append(exc.code())
            else:
                assert got is not None and got.n_tokens == 40
                codes.append(grpc.StatusCode.OK)
    assert [p.name for p in shm.iterdir() if p.name != SHM_FD_SOCKET] == []
    return codes


def _ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


def test_shm_callers(tmp_path: Path, reliability) -> None:
    outcomes: dict[str, list[grpc.StatusCode]] = {}
    # Default: a TCP loopback caller (possibly a proxied remote one) is refused ...
    svc = start_service(tmp_path / "tcp", shm_dir=str(tmp_path / "shm1"))
    try:
        outcomes["tcp default"] = _roundtrip(f"127.0.0.1:{svc.grpc_port}", tmp_path / "shm1")
    finally:
        svc.stop()
    # ... a caller on the unix socket is served.
    sock = tmp_path / "ds.sock"
    svc = start_service(tmp_path / "unix", grpc_address=f"unix:{sock}", shm_dir=str(tmp_path / "shm2"))
    try:
        outcomes["unix default"] = _roundtrip(f"unix:{sock}", tmp_path / "shm2")
    finally:
        svc.stop()
    # Explicitly trusting loopback: IPv4 and IPv6 loopback both served.
    hosts = ["127.0.0.1", *(["[::1]"] if _ipv6_loopback() else [])]
    for host in hosts:
        shm = tmp_path / f"shm-{len(outcomes)}"
        svc = start_service(
            tmp_path / f"lo{len(outcomes)}", grpc_address=f"{host}:0", shm_dir=str(shm), shm_peers="loopback"
        )
        try:
            outcomes[f"{host} loopback"] = _roundtrip(f"{host}:{svc.grpc_port}", shm)
        finally:
            svc.stop()
    assert outcomes.pop("tcp default") == [grpc.StatusCode.FAILED_PRECONDITION] * 2
    assert all(codes == [grpc.StatusCode.OK] * 2 for codes in outcomes.values()), outcomes
    assert _on_this_host("ipv6:%5B::1%5D:5000", allow_loopback=True)
    assert _on_this_host("ipv6:[::ffff:127.0.0.1]:1", allow_loopback=True)
    assert not _on_this_host("ipv4:127.0.0.1:5000")  # not without the explicit setting
    reliability.record(
        "GetSnapshotShm and GetPrefixShm from TCP loopback (a proxied remote caller looks the same), "
        "default settings",
        2,
        "FAILED_PRECONDITION",
    )
    reliability.record(
        "GetSnapshotShm and GetPrefixShm on the unix socket; with --shm-peers loopback from 127.0.0.1 "
        "and [::1]",
        2 * len(outcomes),
        "served",
    )


def test_shm_directory_and_files_must_be_private(tmp_path: Path, reliability) -> None:
    """A directory another user made or can write is refused; a planted file is not mapped."""

    from deltastore.client.shm import mapped_payloads
    from deltastore.errors import InvalidArgument, NotConfigured
    from deltastore.v1 import deltastore_pb2 as pb
    from deltastore.v1.protocol import SHM_FILE_PREFIX

    open_dir = tmp_path / "open"
    open_dir.mkdir()
    open_dir.chmod(0o777)
    target = tmp_path / "private"
    target.mkdir(mode=0o700)
    link = tmp_path / "link"
    link.symlink_to(target)
    refused = 0
    for where in (open_dir, link):
        try:
            svc = start_service(tmp_path / f"d-{where.name}", shm_dir=str(where))
        except NotConfigured:
            refused += 1
        else:
            svc.stop()
    assert refused == 2
    planted = target / f"{SHM_FILE_PREFIX}planted"
    planted.write_bytes(b"x" * 64)
    planted.chmod(0o644)
    reply = pb.GetSnapshotShmResponse(file=planted.name)
    reply.info.segments.add(size_bytes=64)
    with pytest.raises(InvalidArgument, match="not an export"), mapped_payloads(target, reply, 1 << 20):
        pass
    reliability.record(
        "--shm-dir pre-created with mode 777, or a symlink; a planted 0644 file named like an export",
        3,
        "server refuses the directory at start; client refuses the file",
    )


def test_memfd_exports_reach_only_their_caller(tmp_path: Path, reliability) -> None:
    """--shm-mode memfd: nothing to open in the directory; a sealed fd for the token holder, once."""
    import os

    from deltastore.client.shm import _claim_memfd
    from deltastore.errors import NotConfigured
    from deltastore.server.shm_fd import MemfdExporter
    from deltastore.settings import StoreConfig
    from deltastore.store import SegmentPayload, Store

    sock = tmp_path / "ds.sock"
    svc = start_service(
        tmp_path / "svc", grpc_address=f"unix:{sock}", shm_dir=str(tmp_path / "shm"), shm_mode="memfd"
    )
    try:
        assert _roundtrip(f"unix:{sock}", tmp_path / "shm") == [grpc.StatusCode.OK] * 2  # snapshot, prefix
    finally:
        svc.stop()
    with Store.open(tmp_path / "data", StoreConfig(block_size=16)) as store:
        plan = store.plan_snapshot("ns", "s", "m", "k4v2", list(range(32)))
        payloads = {x.key: SegmentPayload(b"p" * 1000, x.n_tokens, 4096 * x.n_tokens) for x in plan.missing}
        store.put_snapshot("ns", "s", 0, "m", "k4v2", list(range(32)), payloads)
        exporter = MemfdExporter(tmp_path / "shm2", 1 << 30)
        try:
            name = exporter.export(store.open_snapshot("ns", "s", 0))
            assert [p.name for p in (tmp_path / "shm2").iterdir()] == [SHM_FD_SOCKET]  # nothing to open
            with pytest.raises(NotConfigured):  # another process guessing a token
                _claim_memfd(tmp_path / "shm2", SHM_FD_PREFIX + "0" * 32)
            fd = _claim_memfd(tmp_path / "shm2", name)
            try:
                assert os.fstat(fd).st_size == 2000 and os.pread(fd, 4, 0) == b"pppp"
                with pytest.raises(PermissionError):  # sealed: not even its holder can change it
                    os.pwrite(fd, b"x", 0)
            finally:
                os.close(fd)
            with pytest.raises(NotConfigured):  # one time only
                _claim_memfd(tmp_path / "shm2", name)
        finally:
            exporter.close()
    reliability.record(
        "--shm-mode memfd: list the directory, guess a token, claim twice, write to the export",
        4,
        "only the socket is there; guessed and second claims get nothing; the export is sealed",
    )
