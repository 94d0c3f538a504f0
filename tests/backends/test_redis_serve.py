"""Stateless servers in front of one Redis Cluster share the data: a snapshot put through one
``deltastore serve`` process is read, extended and deleted through another."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator

import grpc
import pytest
import torch

from deltastore.client.sync import DeltaStoreClient
from deltastore.server.app import Service
from deltastore.server.settings import ServerSettings

MODEL = "test-model@0123456789abcdef"


def _cache(n_tokens: int, seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    return [
        tuple(torch.randn(2, n_tokens, 64, generator=gen).to(torch.float16) for _ in range(2))  # type: ignore[misc]
        for _ in range(2)
    ]


@pytest.fixture
def serve_process(cluster_url: str) -> Iterator[str]:
    """``deltastore serve --backend redis+cluster://...`` in a subprocess; yields its gRPC target."""
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "deltastore",
            "serve",
            "--backend",
            cluster_url,
            "--grpc",
            "127.0.0.1:0",
            "--http",
            "",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "DELTASTORE_BLOCK_SIZE": "16"},
    )
    try:
        line = proc.stdout.readline() if proc.stdout else ""
        match = re.search(r"grpc=(\S+) .*backend=redis\+cluster://", line)
        assert match, f"no startup line: {line!r} {proc.stderr.read() if proc.stderr else ''}"
        yield match.group(1)
    finally:
        proc.terminate()
        proc.wait(30)


def test_two_servers_on_one_cluster_share_snapshots(serve_process: str, cluster_url: str) -> None:
    settings = ServerSettings(
        backend=cluster_url, grpc_address="127.0.0.1:0", http_address="", grace_seconds=1
    )
    service = Service(settings).start()  # opens the store from the URL, like serve does
    tokens = list(range(1000, 1040))
    more = [*tokens, *range(2000, 2013)]
    cache, longer = _cache(len(tokens), 1), _cache(len(more), 2)
    try:
        with (
            DeltaStoreClient(serve_process, namespace="acme") as a,
            DeltaStoreClient(f"127.0.0.1:{service.grpc_port}", namespace="acme") as b,
        ):
            first = a.put_snapshot("chat", 0, tokens, cache, model=MODEL, codec="lossless")
            got = b.get_snapshot("chat", 0, model=MODEL, as_cache=False)
            assert got.token_ids == tokens
            for (k, v), (k2, v2) in zip(cache, got.layers, strict=True):
                assert torch.equal(k, k2) and torch.equal(v, v2)  # the lossless tier is bit-exact
            # The next turn through the other server reuses what the first one stored.
            longer[0] = (torch.cat([cache[0][0], longer[0][0][:, 40:]], 1), longer[0][1])
            second = b.put_snapshot("chat", 1, more, longer, model=MODEL, codec="lossless", parent_turn=0)
            assert second.new_bytes < first.new_bytes
            assert [s.turn for s in a.list_snapshots("chat")] == [0, 1]
            assert a.savings()["snapshots"] == b.savings()["snapshots"] == 2
            # `deltastore verify` checks a Redis Cluster store through the same URL as serve.
            check = subprocess.run(
                [sys.executable, "-m", "deltastore", "verify", "--backend", cluster_url, "--json"],
                capture_output=True,
                text=True,
                timeout=120,
            )
            assert check.returncode == 0, check.stdout + check.stderr
            assert json.loads(check.stdout)["problems"] == []
            b.delete_session("chat")
            with pytest.raises(grpc.RpcError) as err:
                a.get_snapshot("chat", 0, model=MODEL, as_cache=False)
            assert err.value.code() == grpc.StatusCode.NOT_FOUND
    finally:
        service.stop()
