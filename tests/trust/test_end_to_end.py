"""End-to-end integrity: the client checks each payload's digest, codec and coverage itself.

Before: the reply carried no payload digest and the client decoded whatever bytes arrived, so
corruption after the server's own check (server memory, a proxy, a shared-memory file another
local process rewrote) became silently wrong tensors.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import blake3
import grpc
import pytest
from trust_helpers import MODEL, client, make_cache, start_service, tokens_for

from deltastore.client.sync import DeltaStoreClient
from deltastore.client.wire import decode_snapshot, read_snapshot_stream
from deltastore.codecs import read_header
from deltastore.errors import ChecksumMismatch
from deltastore.v1 import deltastore_pb2 as pb
from deltastore.v1 import deltastore_pb2_grpc as pb_grpc


def _fetch(port: int, session: str, turn: int = 0) -> tuple[pb.SnapshotInfo, list[bytes]]:
    with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
        info, payloads = read_snapshot_stream(
            pb_grpc.DeltaStoreStub(ch).GetSnapshot(
                pb.GetSnapshotRequest(session=session, turn=turn), timeout=10
            ),
            1 << 30,
        )
    return info, [bytes(p) for p in payloads]


def _flip_in_data(payload: bytes) -> bytes:
    """One bit flipped inside the first section's data: the header still parses."""
    hdr = read_header(payload)
    _, _, offset, length = hdr.sections[0]
    bad = bytearray(payload)
    bad[offset + length // 2] ^= 0x04
    return bytes(bad)


def test_client_verifies_digest_codec_and_coverage(tmp_path: Path, reliability) -> None:
    svc = start_service(tmp_path)
    try:
        with client(svc.grpc_port, None) as c:
            c.put_snapshot("a", 0, tokens_for(1, 40), make_cache(40), model=MODEL, codec="k4v2")
            c.put_snapshot("b", 0, tokens_for(2, 40), make_cache(40, seed=2), model=MODEL, codec="k8v8")
        info, payloads = _fetch(svc.grpc_port, "a")
        other_info, other = _fetch(svc.grpc_port, "b")
    finally:
        svc.stop()
    assert all(len(s.digest) == 32 for s in info.segments)
    assert decode_snapshot(info, payloads, as_cache=False).n_tokens == 40

    def as_sent(sent: list[bytes]) -> pb.SnapshotInfo:
        """The info a consistent liar sends: sizes and digests of these very bytes, so only the
        header checks (codec, coverage) can tell."""
        meta = pb.SnapshotInfo()
        meta.CopyFrom(info)
        for seg, payload in zip(meta.segments, sent, strict=True):
            seg.size_bytes, seg.digest = len(payload), blake3.blake3(payload).digest()
        return meta

    undigested = pb.SnapshotInfo()
    undigested.CopyFrom(info)
    undigested.segments[1].ClearField("digest")  # as from a server that omits one: refused, not skipped
    swapped = [payloads[1], payloads[0], *payloads[2:]]
    foreign = [other[0], *payloads[1:]]
    cases = {
        "bit flip in a payload's data": (info, [_flip_in_data(payloads[0]), *payloads[1:]]),
        "payloads swapped": (as_sent(swapped), swapped),
        "a payload of another codec": (as_sent(foreign), foreign),
        "a segment's digest left out": (undigested, payloads),
    }
    assert len(other_info.segments) == len(info.segments)
    for name, (meta, sent) in cases.items():
        with pytest.raises(ChecksumMismatch) as err:
            decode_snapshot(meta, sent, as_cache=False)
        assert ("digest in the segment's info" in str(err.value)) is (name == "a segment's digest left out")
    reliability.record(
        "payload bytes changed after the server's check (flip; swap; another codec's block); "
        "a segment's digest left out of the info",
        len(cases),
        "client raises ChecksumMismatch before decoding",
    )


class _Tamper(grpc.UnaryUnaryClientInterceptor):
    """Another local process rewriting the export between the server's reply and the client's mmap."""

    def __init__(self, shm: Path) -> None:
        self.shm = shm
        self.tampered = 0

    def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        outcome = continuation(details, request)
        if details.method.endswith(("/GetSnapshotShm", "/GetPrefixShm")) and outcome.exception() is None:
            path = self.shm / outcome.result().file
            fd = os.open(path, os.O_RDWR)
            try:
                first = os.pread(fd, 1, 100)
                os.pwrite(fd, bytes([first[0] ^ 0x01]), 100)
            finally:
                os.close(fd)
            self.tampered += 1
        return outcome


@pytest.mark.parametrize("read", ["snapshot", "prefix"])
def test_shared_memory_export_rewritten_before_mapping(tmp_path: Path, reliability, read: str) -> None:
    shm = tmp_path / "shm"
    svc = start_service(tmp_path, shm_dir=str(shm), shm_peers="loopback")
    tamper = _Tamper(shm)
    tokens = tokens_for(3, 40)
    try:
        with client(svc.grpc_port, None) as c:
            c.put_snapshot("a", 0, tokens, make_cache(40), model=MODEL, codec="k4v2")
        target = f"127.0.0.1:{svc.grpc_port}"
        with (
            DeltaStoreClient(target, timeout=20, shm_dir=str(shm), interceptors=[tamper]) as c,
            pytest.raises(ChecksumMismatch),
        ):
            if read == "snapshot":
                c.get_snapshot("a", 0, model=MODEL)
            else:  # the connector's path: checked before a single payload is handed out
                c.fetch_prefix(tokens, model=MODEL, codec="k4v2")
        assert tamper.tampered == 1
    finally:
        svc.stop()
    reliability.record(
        "shared-memory export rewritten before the client maps it (GetSnapshotShm; GetPrefixShm)",
        1,
        "ChecksumMismatch",
    )
