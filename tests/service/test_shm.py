"""GetSnapshotShm: a real server writing into a real shared directory, read back by both clients."""

from __future__ import annotations

import asyncio
import os
import shutil
import time
from pathlib import Path

import grpc
import pytest
import torch
from service_helpers import MODEL, make_cache, start_service

from deltastore.client.aio import AsyncDeltaStoreClient
from deltastore.client.shm import mapped_payloads
from deltastore.client.sync import DeltaStoreClient
from deltastore.errors import InvalidArgument, NotConfigured, ResourceExhausted
from deltastore.server.service import _on_this_host
from deltastore.server.shm import ORPHAN_SECONDS, ShmExporter
from deltastore.v1 import deltastore_pb2 as pb
from deltastore.v1 import deltastore_pb2_grpc as pb_grpc
from deltastore.v1.protocol import SHM_FILE_PREFIX as PREFIX

TOKENS = list(range(1000, 1150))  # two whole 64-token blocks and a tail: three segments


def _target(svc: object) -> str:
    return f"127.0.0.1:{svc.grpc_port}"  # type: ignore[attr-defined]


@pytest.mark.parametrize("codec", ["lossless", "k4v2-pe50"])
def test_shm_get_equals_stream_get_and_leaves_no_file(tmp_path: Path, codec: str) -> None:
    shm = tmp_path / "shm"
    svc = start_service(tmp_path, shm_dir=str(shm), shm_peers="loopback")
    try:
        cache = make_cache(len(TOKENS))
        with DeltaStoreClient(_target(svc), timeout=20) as c:
            c.put_snapshot("s", 0, TOKENS, cache, model=MODEL, codec=codec)
            streamed = c.get_snapshot("s", 0, as_cache=False)
        with DeltaStoreClient(_target(svc), timeout=20, shm_dir=str(shm)) as c:
            mapped = c.get_snapshot("s", 0, as_cache=False)
        assert mapped.payload_bytes == streamed.payload_bytes > 0
        for (k, v), (k2, v2) in zip(mapped.layers, streamed.layers, strict=True):
            assert torch.equal(k, k2) and torch.equal(v, v2)
        if codec == "lossless":
            assert all(torch.equal(a[0], b[0]) for a, b in zip(mapped.layers, cache, strict=True))
        assert list(shm.iterdir()) == []  # the client unlinked the file it was handed

        async def aio_get() -> object:
            async with AsyncDeltaStoreClient(_target(svc), timeout=20, shm_dir=str(shm)) as ac:
                return await ac.get_snapshot("s", 0, as_cache=False)

        got = asyncio.run(aio_get())
        assert torch.equal(got.layers[1][0], streamed.layers[1][0])  # type: ignore[attr-defined]
        assert list(shm.iterdir()) == []
    finally:
        svc.stop()


def test_without_shm_dir_the_call_is_refused_clearly(service: object) -> None:
    with (
        DeltaStoreClient(_target(service), timeout=20, shm_dir="/nonexistent") as c,
        pytest.raises(grpc.RpcError) as err,
    ):
        c.get_snapshot("s", 0)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "--shm-dir" in err.value.details()


def test_missing_snapshot_is_not_found_and_writes_nothing(tmp_path: Path) -> None:
    shm = tmp_path / "shm"
    svc = start_service(tmp_path, shm_dir=str(shm), shm_peers="loopback")
    try:
        with (
            DeltaStoreClient(_target(svc), timeout=20, shm_dir=str(shm)) as c,
            pytest.raises(grpc.RpcError) as err,
        ):
            c.get_snapshot("nobody", 0)
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
        assert list(shm.iterdir()) == []
    finally:
        svc.stop()


def test_client_pointed_at_another_directory_gets_a_clear_error(tmp_path: Path) -> None:
    shm = tmp_path / "shm"
    svc = start_service(tmp_path, shm_dir=str(shm), shm_peers="loopback")
    try:
        with DeltaStoreClient(_target(svc), timeout=20) as c:
            c.put_snapshot("s", 0, TOKENS, make_cache(len(TOKENS)), model=MODEL, codec="k4v2")
        elsewhere = tmp_path / "not-the-servers"
        elsewhere.mkdir()
        with (
            DeltaStoreClient(_target(svc), timeout=20, shm_dir=str(elsewhere)) as c,
            pytest.raises(NotConfigured, match="--shm-dir as mounted here"),
        ):
            c.get_snapshot("s", 0)
        assert len(list(shm.iterdir())) == 1  # unclaimed: the server sweeps it after ORPHAN_SECONDS
    finally:
        svc.stop()


def test_full_shm_directory_is_resource_exhausted_and_leaves_no_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A full tmpfs cannot be made portably in a test, so os.write fails with ENOSPC here (a fake)."""
    import errno

    from deltastore.server import shm as server_shm

    shm = tmp_path / "shm"
    svc = start_service(tmp_path, shm_dir=str(shm), shm_peers="loopback")
    try:
        with DeltaStoreClient(_target(svc), timeout=20) as c:
            c.put_snapshot("s", 0, TOKENS, make_cache(len(TOKENS)), model=MODEL, codec="k4v2")

        def full(_fd: int, _data: object) -> int:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        monkeypatch.setattr(server_shm.os, "write", full)
        with (
            DeltaStoreClient(_target(svc), timeout=20, shm_dir=str(shm)) as c,
            pytest.raises(grpc.RpcError) as err,
        ):
            c.get_snapshot("s", 0)
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "No space left" in err.value.details()
        assert list(shm.iterdir()) == []
    finally:
        svc.stop()


def test_orphans_are_swept_and_other_files_kept(tmp_path: Path) -> None:
    exporter = ShmExporter(tmp_path, max_bytes=1 << 20)
    old, fresh, other = tmp_path / f"{PREFIX}old", tmp_path / f"{PREFIX}fresh", tmp_path / "worker-file"
    for p in (old, fresh, other):
        p.write_bytes(b"xyz")
    past = time.time() - ORPHAN_SECONDS - 5
    os.utime(old, (past, past))
    os.utime(other, (past, past))
    assert exporter.sweep() == 3  # bytes still unclaimed: the fresh file's
    assert not old.exists() and fresh.exists() and other.exists()


def test_unclaimed_bytes_are_capped_and_a_removed_directory_comes_back(tmp_path: Path) -> None:
    shm = tmp_path / "shm"
    svc = start_service(tmp_path, shm_dir=str(shm), shm_max_bytes=1 << 20, shm_peers="loopback")
    try:
        with DeltaStoreClient(_target(svc), timeout=20) as c:
            c.put_snapshot("s", 0, TOKENS, make_cache(len(TOKENS)), model=MODEL, codec="fp16")
        req = pb.GetSnapshotRequest(namespace="default", session="s", turn=0)
        names = []
        with grpc.insecure_channel(_target(svc)) as ch, pytest.raises(grpc.RpcError) as err:
            for _ in range(100):  # nobody claims them: ~77 KB each against a 1 MiB cap
                names.append(pb_grpc.DeltaStoreStub(ch).GetSnapshotShm(req, timeout=10).file)
        assert (
            err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            and "--shm-max-bytes" in err.value.details()
        )
        assert 1 <= len(names) <= 14 and sorted(p.name for p in shm.iterdir()) == sorted(names)
        shutil.rmtree(shm)  # e.g. a tmp cleaner: the next export makes the directory again
        with DeltaStoreClient(_target(svc), timeout=20, shm_dir=str(shm)) as c:
            assert c.get_snapshot("s", 0, as_cache=False).n_tokens == len(TOKENS)
    finally:
        svc.stop()


def test_a_fifo_or_directory_in_place_of_the_file_is_refused_without_blocking(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / f"{PREFIX}fifo")
    (tmp_path / f"{PREFIX}dir").mkdir()
    for name in (f"{PREFIX}fifo", f"{PREFIX}dir"):
        reply = pb.GetSnapshotShmResponse(file=name)
        with pytest.raises((InvalidArgument, NotConfigured)), mapped_payloads(tmp_path, reply, 1 << 20):
            pass


@pytest.mark.parametrize(
    ("peer", "local"),
    [
        ("unix:/run/deltastore.sock", True),
        ("unix:", True),
        ("ipv4:127.0.0.1:50000", True),
        ("ipv6:[::1]:50000", True),
        ("ipv4:10.1.2.3:50000", False),
        ("ipv6:[2001:db8::1]:50000", False),
        ("ipv6:[::ffff:10.0.0.1]:1", False),
        ("", False),
    ],
)
def test_only_callers_on_this_host_may_ask(peer: str, local: bool) -> None:
    """With ``--shm-peers loopback``; by default only unix socket callers (tests/trust/test_shm_peers.py)."""
    assert _on_this_host(peer, allow_loopback=True) is local


@pytest.mark.parametrize(
    "name",
    ["", "../etc/passwd", "/etc/passwd", ".hidden", "a/b", "passwd", f"{PREFIX}a/../../x", f"{PREFIX}x\0"],
)
def test_client_refuses_file_names_outside_the_directory(tmp_path: Path, name: str) -> None:
    reply = pb.GetSnapshotShmResponse(file=name)
    with (
        pytest.raises(InvalidArgument, match="invalid shared-memory file"),
        mapped_payloads(tmp_path, reply, 1 << 20),
    ):
        pass


def test_client_refuses_a_file_of_the_wrong_size(tmp_path: Path) -> None:
    (tmp_path / f"{PREFIX}x").write_bytes(b"12345")
    (tmp_path / f"{PREFIX}x").chmod(0o600)  # as the server makes them
    reply = pb.GetSnapshotShmResponse(
        info=pb.SnapshotInfo(segments=[pb.Segment(size_bytes=4)]), file=f"{PREFIX}x"
    )
    with pytest.raises(InvalidArgument, match="holds 5 bytes"), mapped_payloads(tmp_path, reply, 1 << 20):
        pass
    assert not (tmp_path / f"{PREFIX}x").exists()  # unlinked even so


def test_the_clients_decode_limit_holds_on_every_read_path(tmp_path: Path) -> None:
    """``max_decoded_bytes`` on the client: a snapshot that decodes into more is refused before
    anything is decoded, through the stream, shared memory, the prefix read and the asyncio client."""
    shm = tmp_path / "shm"
    svc = start_service(tmp_path, shm_dir=str(shm), shm_peers="loopback")
    try:
        with DeltaStoreClient(_target(svc), timeout=20) as c:
            c.put_snapshot("s", 0, TOKENS, make_cache(len(TOKENS)), model=MODEL, codec="lossless")
            full = c.get_snapshot("s", 0, as_cache=False)
        small = full.logical_bytes // 2  # half of what the snapshot decodes into
        reads = {
            "stream": lambda c: c.get_snapshot("s", 0, as_cache=False),
            "prefix": lambda c: c.get_prefix(TOKENS, model=MODEL, codec="lossless"),
        }
        for name, read in reads.items():
            with (
                DeltaStoreClient(_target(svc), timeout=20, max_decoded_bytes=small) as c,
                pytest.raises(ResourceExhausted, match="decoding this snapshot takes more"),
            ):
                read(c)
            with DeltaStoreClient(_target(svc), timeout=20) as c:
                assert read(c) is not None, name  # the default limit reads it
        with (
            DeltaStoreClient(_target(svc), timeout=20, shm_dir=str(shm), max_decoded_bytes=small) as c,
            pytest.raises(ResourceExhausted, match="decoding this snapshot takes more"),
        ):
            c.get_snapshot("s", 0, as_cache=False)
        assert list(shm.iterdir()) == []  # the refused export was unlinked all the same

        async def aio_get() -> None:
            async with AsyncDeltaStoreClient(_target(svc), timeout=20, max_decoded_bytes=small) as ac:
                await ac.get_snapshot("s", 0, as_cache=False)

        with pytest.raises(ResourceExhausted):
            asyncio.run(aio_get())
    finally:
        svc.stop()
