"""`deltastore serve` as a process: machine-readable startup line, SIGTERM drains in-flight calls."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import httpx
from service_helpers import MODEL, make_cache

from deltastore.client.sync import DeltaStoreClient
from deltastore.client.wire import Retry
from deltastore.codecs import CodecSpec, encode_block
from deltastore.store import Store
from deltastore.v1 import deltastore_pb2 as pb
from deltastore.v1 import deltastore_pb2_grpc as pb_grpc
from deltastore.v1.protocol import iter_chunks

TOKENS = list(range(300, 340))


def test_sigterm_finishes_in_flight_calls_then_exits(tmp_path: Path) -> None:
    env = {**os.environ, "DELTASTORE_LMDB_SYNC": "1", "DELTASTORE_BLOCK_SIZE": "64"}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "deltastore",
            "serve",
            "--data-dir",
            str(tmp_path / "data"),
            "--grpc",
            "127.0.0.1:0",
            "--http",
            "127.0.0.1:0",
            "--grace-seconds",
            "20",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        line = proc.stdout.readline() if proc.stdout else ""
        match = re.search(r"grpc=(\S+) http=(\S+)", line)
        assert match, f"no startup line: {line!r} {proc.stderr.read() if proc.stderr else ''}"
        target, base = match.groups()
        assert httpx.get(f"{base}/readyz").status_code == 200

        stub = pb_grpc.DeltaStoreStub(grpc.insecure_channel(target))
        with DeltaStoreClient(target, retry=Retry(attempts=1)) as client:
            plan = client.plan_snapshot("slow", TOKENS, model=MODEL, codec="k4v2")
        payload = encode_block(make_cache(len(TOKENS)), CodecSpec.parse("k4v2"))
        header = pb.SnapshotHeader(session="slow", turn=0, model=MODEL, codec="k4v2", token_ids=TOKENS)
        header_sent = threading.Event()
        resume = threading.Event()

        def stream() -> Iterator[pb.PutSnapshotRequest]:
            yield pb.PutSnapshotRequest(header=header)
            header_sent.set()
            resume.wait(10)  # SIGTERM arrives while this call is in flight
            yield from (pb.PutSnapshotRequest(chunk=c) for c in iter_chunks(plan.segments[0].key, payload))

        result: list[object] = []
        worker = threading.Thread(target=lambda: result.append(stub.PutSnapshot(stream(), timeout=30)))
        worker.start()
        assert header_sent.wait(10)
        time.sleep(0.3)  # let the header reach the server
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.5)  # draining now: readiness is off
        try:
            ready = httpx.get(f"{base}/readyz").status_code
        except httpx.TransportError:
            ready = 503
        assert ready == 503
        resume.set()
        worker.join(30)
        assert result and isinstance(result[0], pb.PutSnapshotResponse), result
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    with Store.open(tmp_path / "data") as store:  # the in-flight put was acknowledged and is durable
        assert [s.turn for s in store.list_snapshots("default", "slow")] == [0]
