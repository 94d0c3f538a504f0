"""Corruption: bits flipped anywhere in stored block records are never served, and verify finds each."""

from __future__ import annotations

import random
import struct
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from trust_helpers import MODEL, client, make_cache, start_service, tokens_for

from deltastore.client.wire import read_snapshot_stream
from deltastore.manifest import split_name
from deltastore.server.app import Service
from deltastore.v1 import deltastore_pb2 as pb
from deltastore.v1 import deltastore_pb2_grpc as pb_grpc
from deltastore.verify import verify_backend

FLIPS = 48
HEADER = struct.Struct("<BxHIQ32s")  # deltastore.manifest block record header
# Regions of a block record: where a flip lands decides which check catches it.
REGIONS = (
    ("version", 0, 1),
    ("reserved", 1, 4),
    ("n_tokens", 4, 8),
    ("fp16_nbytes", 8, 16),
    ("digest", 16, 48),
)
SERVED_BYTES_INTACT = {"fp16_nbytes"}  # accounting only: payload and tokens still verified


@pytest.fixture
def service(tmp_path: Path) -> Iterator[Service]:
    svc = start_service(tmp_path)
    try:
        with client(svc.grpc_port, None) as c:
            for i in range(6):
                full = make_cache(60, seed=i)
                tokens = tokens_for(100 + i % 3, 60)  # sessions share prefixes in threes
                codec = ("lossless", "k4v2")[i % 2]
                first = [(k[:, :37], v[:, :37]) for k, v in full]
                c.put_snapshot(f"s{i}", 0, tokens[:37], first, model=MODEL, codec=codec)
                c.put_snapshot(f"s{i}", 1, tokens, full, model=MODEL, codec=codec, parent_turn=0)
        yield svc
    finally:
        svc.stop()


def _fetch(stub: pb_grpc.DeltaStoreStub, session: str, turn: int) -> tuple[grpc.StatusCode, str, list[bytes]]:
    try:
        _, payloads = read_snapshot_stream(
            stub.GetSnapshot(pb.GetSnapshotRequest(session=session, turn=turn), timeout=10), 1 << 30
        )
    except grpc.RpcError as exc:
        return exc.code(), exc.details() or "", []
    return grpc.StatusCode.OK, "", payloads


def _bounds(region: str, record: bytes) -> tuple[int, int]:
    """Byte range ``[start, end)`` of a region of a block record."""
    fixed = {name: (start, end) for name, start, end in REGIONS}
    if region in fixed:
        return fixed[region]
    token_end = HEADER.size + 4 * HEADER.unpack_from(record)[2]
    return (HEADER.size, token_end) if region == "tokens" else (token_end, len(record))


def test_flipped_bits_are_never_served_and_verify_names_each_block(service: Service, reliability) -> None:
    backend = service.store.backend
    with backend.read() as view:
        blocks = [(bytes(k), bytes(v)) for k, v in view.scan("blocks")]
    snapshots = [(f"s{i}", t) for i in range(6) for t in (0, 1)]
    rng = random.Random(7)
    outcomes: dict[str, int] = {}
    with grpc.insecure_channel(f"127.0.0.1:{service.grpc_port}") as ch:
        stub = pb_grpc.DeltaStoreStub(ch)
        baseline = {s: _fetch(stub, *s)[2] for s in snapshots}
        assert all(baseline.values())
        names = [name for name, _, _ in REGIONS] + ["tokens", "payload"]
        for i in range(FLIPS):  # every region in turn, a random block and bit in it
            raw_key, value = rng.choice(blocks)
            key_hex = split_name(raw_key)[1].hex()
            region = names[i % len(names)]
            offset = rng.randrange(*_bounds(region, value))
            bad = bytearray(value)
            bad[offset] ^= 1 << rng.randrange(8)
            backend.transact(lambda b, k=raw_key, v=bytes(bad): b.put("blocks", k, v))
            try:
                failed = 0
                for snap in snapshots:
                    code, details, payloads = _fetch(stub, *snap)
                    if code is grpc.StatusCode.OK:
                        assert payloads == baseline[snap], f"corrupt bytes served ({region} flip)"
                    else:
                        assert code is grpc.StatusCode.DATA_LOSS, (code, details)
                        assert key_hex in details, details
                        failed += 1
                if region not in SERVED_BYTES_INTACT:
                    assert failed >= 1, f"a {region} flip went unnoticed by reads"
                report = verify_backend(backend)
                if region in SERVED_BYTES_INTACT:
                    # Accounting metadata: verify recounts it from manifests and counters.
                    assert any("sum of blocks" in p for p in report.problems), report.problems
                else:
                    assert any(key_hex in p for p in report.problems), (region, report.problems)
                outcomes[region] = outcomes.get(region, 0) + 1
            finally:
                backend.transact(lambda b, k=raw_key, v=value: b.put("blocks", k, v))
        assert verify_backend(backend).clean
        assert {s: _fetch(stub, *s)[2] for s in snapshots} == baseline
    for region, n in sorted(outcomes.items()):
        outcome = (
            "payload served intact; verify reports the logical-bytes mismatch"
            if region in SERVED_BYTES_INTACT
            else "DATA_LOSS naming the block; verify names it"
        )
        reliability.record(f"bit flip in a stored block record: {region}", n, outcome)


def test_verify_cli_finds_every_corrupt_block(tmp_path: Path, service: Service, reliability) -> None:
    backend = service.store.backend
    with backend.read() as view:
        blocks = [(bytes(k), bytes(v)) for k, v in view.scan("blocks")]
    rng = random.Random(11)
    victims = rng.sample(blocks, 5)
    for raw_key, value in victims:
        bad = bytearray(value)
        bad[rng.randrange(HEADER.size, len(bad))] ^= 0x10
        backend.transact(lambda b, k=raw_key, v=bytes(bad): b.put("blocks", k, v))
    data_dir = service.settings.data_dir
    service.stop()
    proc = subprocess.run(
        [sys.executable, "-m", "deltastore", "verify", "--data-dir", str(data_dir)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 1, proc.stdout + proc.stderr
    for raw_key, _ in victims:
        assert split_name(raw_key)[1].hex() in proc.stdout
    reliability.record("5 corrupt blocks at once, `deltastore verify` CLI", 1, "exit 1, every block named")
