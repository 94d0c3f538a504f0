"""Generated code is current; chunk framing; settings from flags and environment."""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import pytest

from deltastore.errors import InvalidArgument, ResourceExhausted
from deltastore.server.settings import ServerSettings, add_setting_arguments
from deltastore.settings import parse_size
from deltastore.v1 import deltastore_pb2 as pb
from deltastore.v1.protocol import ChunkAssembler, iter_chunks

ROOT = Path(__file__).resolve().parents[2]
GENERATED = ("deltastore_pb2.py", "deltastore_pb2.pyi", "deltastore_pb2_grpc.py")


def test_make_proto_reproduces_the_checked_in_code(tmp_path: Path) -> None:
    """Same command as `make proto`, into a temp dir: the checked-in files must be byte-identical."""
    subprocess.run(
        [
            sys.executable,
            "-m",
            "grpc_tools.protoc",
            "-I",
            str(ROOT / "proto"),
            f"--python_out={tmp_path}",
            f"--pyi_out={tmp_path}",
            f"--grpc_python_out={tmp_path}",
            str(ROOT / "proto/deltastore/v1/deltastore.proto"),
        ],
        check=True,
        cwd=ROOT,
    )
    for name in GENERATED:
        fresh = (tmp_path / "deltastore/v1" / name).read_bytes()
        assert fresh == (ROOT / "deltastore/v1" / name).read_bytes(), f"{name} is stale: run `make proto`"


def test_chunks_round_trip_and_limits() -> None:
    key = bytes(range(32))
    payload = bytes(range(256)) * 41
    chunks = list(iter_chunks(key, payload, chunk_bytes=1000))
    assert len(chunks) == 11 and all(len(c.data) <= 1000 for c in chunks)
    asm = ChunkAssembler(max_payload_bytes=len(payload), max_total_bytes=len(payload))
    done = [asm.add(c) for c in chunks]
    assert done[:-1] == [None] * 10 and done[-1] == (key, payload, None, None)
    asm.finish()
    [empty] = iter_chunks(key, b"")
    assert empty.total_bytes == 0 and empty.data == b""

    with pytest.raises(ResourceExhausted):
        ChunkAssembler(max_payload_bytes=100, max_total_bytes=10_000).add(chunks[0])
    asm = ChunkAssembler(max_payload_bytes=20_000, max_total_bytes=20_000)
    asm.add(chunks[0])
    with pytest.raises(InvalidArgument, match="does not continue"):
        asm.add(chunks[2])
    with pytest.raises(InvalidArgument, match="before block"):
        asm.add(pb.BlockChunk(key=bytes(32), offset=0, total_bytes=1, data=b"x"))
    with pytest.raises(InvalidArgument, match="stream ended inside"):
        asm.finish()
    with pytest.raises(InvalidArgument, match="32 bytes"):
        ChunkAssembler(max_payload_bytes=10, max_total_bytes=10).add(pb.BlockChunk(key=b"short"))
    with pytest.raises(InvalidArgument, match="overrun"):
        ChunkAssembler(max_payload_bytes=10, max_total_bytes=10).add(
            pb.BlockChunk(key=key, offset=0, total_bytes=2, data=b"abc")
        )


def test_settings_precedence_and_validation() -> None:
    parser = argparse.ArgumentParser()
    add_setting_arguments(parser)
    args = parser.parse_args(["--grpc", "unix:/run/ds.sock", "--max-snapshot-bytes", "64MiB"])
    env = {
        "DELTASTORE_GRPC_ADDRESS": "0.0.0.0:1",
        "DELTASTORE_WORKERS": "3",
        "DELTASTORE_DATA_DIR": "/srv/ds",
    }
    settings = ServerSettings.load(args, env)
    assert settings.grpc_address == "unix:/run/ds.sock"  # the flag beats the environment
    assert settings.workers == 3 and settings.max_snapshot_bytes == 64 << 20
    assert settings.backend_url == "lmdb:///srv/ds"
    assert parse_size("1g") == 1 << 30 and parse_size("512KiB") == 512 << 10 and parse_size("7") == 7
    with pytest.raises(InvalidArgument):
        parse_size("lots")
    with pytest.raises(InvalidArgument):
        ServerSettings(chunk_bytes=8 << 20, max_message_bytes=8 << 20)
    with pytest.raises(InvalidArgument):
        ServerSettings.load(None, {"DELTASTORE_WORKERS": "many"})
