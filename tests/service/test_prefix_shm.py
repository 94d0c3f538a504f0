"""GetPrefixShm and fetch_prefix: a real server on a unix socket, a real shared directory, LMDB.

Prefix loads through shared memory must give bit-exact the tensors the GetPrefix stream gives,
under the same rules as GetSnapshotShm (local callers only, a configured directory, nothing left
behind) and the same domain rules as GetPrefix.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import torch
from service_helpers import BLOCK_SIZE, MODEL, make_cache, start_service

from deltastore.client.aio import AsyncDeltaStoreClient
from deltastore.client.results import FetchedPrefix, RestoredSnapshot
from deltastore.client.sync import DeltaStoreClient
from deltastore.client.wire import check_payloads
from deltastore.codecs import decode_block
from deltastore.errors import ChecksumMismatch
from deltastore.server.app import Service
from deltastore.v1.protocol import SHM_FD_SOCKET

TOKENS = list(range(3000, 3300))  # 4 aligned blocks of 64 + a 44-token tail


@pytest.fixture(params=["file", "memfd"])
def shm_service(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[Service, str, Path]]:
    """A server on a unix socket with a shared-memory directory, in both export modes."""
    sock, shm = tmp_path / "ds.sock", tmp_path / "shm"
    svc = start_service(tmp_path, grpc_address=f"unix:{sock}", shm_dir=str(shm), shm_mode=request.param)
    try:
        yield svc, f"unix:{sock}", shm
    finally:
        svc.stop()


def _exports(shm: Path) -> list[str]:
    return [p.name for p in shm.iterdir() if p.name != SHM_FD_SOCKET]


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int16) if t.element_size() == 2 else t.view(torch.int32)


def _assert_same(a: RestoredSnapshot | None, b: RestoredSnapshot | None) -> None:
    assert a is not None and b is not None
    assert (a.n_tokens, a.token_ids, a.payload_bytes) == (b.n_tokens, b.token_ids, b.payload_bytes)
    for (k, v), (k2, v2) in zip(a.layers, b.layers, strict=True):
        assert torch.equal(_bits(k), _bits(k2)) and torch.equal(_bits(v), _bits(v2))
    for p, p2 in zip(a.positions, b.positions, strict=True):
        assert torch.equal(p, p2)


def _per_block(fetched: FetchedPrefix | None) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Decode as the vLLM connector does: block by block from the fetched payloads, joined here."""
    assert fetched is not None
    with fetched:
        blocks = [decode_block(p) for p in fetched.payloads]
    n_layers = len(blocks[0].layers)
    return [
        (
            torch.cat([b.layers[i][0] for b in blocks], dim=1),
            torch.cat([b.layers[i][1] for b in blocks], dim=1),
        )
        for i in range(n_layers)
    ]


@pytest.mark.parametrize("codec", ["lossless", "k4v2", "k8v4", "k4v2-pe50"])
def test_shm_prefix_is_bit_exact_the_streamed_prefix(
    shm_service: tuple[Service, str, Path], codec: str
) -> None:
    _, target, shm = shm_service
    cache = make_cache(len(TOKENS), seed=11)
    with (
        DeltaStoreClient(target, timeout=20) as streamed,
        DeltaStoreClient(target, timeout=20, shm_dir=str(shm)) as mapped,
    ):
        streamed.put_snapshot("writer", 0, TOKENS, cache, model=MODEL, codec=codec)
        for query, limit in ((TOKENS, None), ([*TOKENS[:200], 1, 2], None), (TOKENS, 130)):
            want = streamed.get_prefix(query, model=MODEL, codec=codec, max_tokens=limit)
            got = mapped.get_prefix(query, model=MODEL, codec=codec, max_tokens=limit)
            _assert_same(got, want)
            assert _exports(shm) == []  # claimed and gone, in both modes
        whole = mapped.get_prefix(TOKENS, model=MODEL, codec=codec)
        assert whole is not None and whole.n_tokens == len(TOKENS)
        if codec == "lossless":
            assert all(
                torch.equal(_bits(a[0]), _bits(b[0])) for a, b in zip(whole.layers, cache, strict=True)
            )
        assert mapped.get_prefix([9, 9, *TOKENS], model=MODEL, codec=codec) is None
        assert mapped.fetch_prefix([9, 9, *TOKENS], model=MODEL, codec=codec) is None
        assert _exports(shm) == []  # no match: nothing exported


def test_connector_style_fetch_with_and_without_shm(shm_service: tuple[Service, str, Path]) -> None:
    _, target, shm = shm_service
    with (
        DeltaStoreClient(target, timeout=20) as streamed,
        DeltaStoreClient(target, timeout=20, shm_dir=str(shm)) as mapped,
    ):
        streamed.put_snapshot("writer", 0, TOKENS, make_cache(len(TOKENS), seed=4), model=MODEL, codec="k4v2")
        want = streamed.get_prefix(TOKENS, model=MODEL, codec="k4v2")
        assert want is not None
        for c in (streamed, mapped):
            fetched = c.fetch_prefix(TOKENS, model=MODEL, codec="k4v2", max_tokens=3 * BLOCK_SIZE)
            assert fetched is not None and fetched.n_tokens == 3 * BLOCK_SIZE
            assert len(fetched.payloads) == len(fetched.info.segments) == 3
            assert fetched.payload_bytes == sum(s.size_bytes for s in fetched.info.segments)
            for (k, v), (wk, wv) in zip(_per_block(fetched), want.layers, strict=True):
                assert torch.equal(k, wk[:, : 3 * BLOCK_SIZE]) and torch.equal(v, wv[:, : 3 * BLOCK_SIZE])
        fetched = mapped.fetch_prefix(TOKENS, model=MODEL, codec="k4v2")
        assert fetched is not None
        view = fetched.payloads[0]
        fetched.close()
        with pytest.raises(ValueError):  # shared memory is unmapped once the fetch is closed
            bytes(view)
    assert _exports(shm) == []


@pytest.mark.parametrize("start", [1, 64, 100, 256, 299, 300])
def test_a_prefix_fetched_from_a_token_holds_only_the_segments_from_there(
    shm_service: tuple[Service, str, Path], start: int
) -> None:
    """What an engine that holds the first ``start`` tokens asks for: the segments ending after
    ``start`` (the first may begin before it), byte for byte the full fetch's, over both paths;
    the info still lists every matched token."""
    _, target, shm = shm_service
    with (
        DeltaStoreClient(target, timeout=20) as streamed,
        DeltaStoreClient(target, timeout=20, shm_dir=str(shm)) as mapped,
    ):
        streamed.put_snapshot(
            "writer", 0, TOKENS, make_cache(len(TOKENS), seed=6), model=MODEL, codec="lossless"
        )
        with streamed.fetch_prefix(TOKENS, model=MODEL, codec="lossless") as full:
            want = [
                (seg.start, bytes(p))
                for seg, p in zip(full.info.segments, full.payloads, strict=True)
                if seg.end > start
            ]
            full_info = full.info
        for c in (streamed, mapped):
            fetched = c.fetch_prefix(TOKENS, model=MODEL, codec="lossless", start=start)
            if not want:  # the caller holds every stored token: nothing to send
                assert fetched is None
                continue
            assert fetched is not None
            with fetched:
                assert list(fetched.info.token_ids) == TOKENS and fetched.n_tokens == len(TOKENS)
                got = [
                    (s.start, bytes(p)) for s, p in zip(fetched.info.segments, fetched.payloads, strict=True)
                ]
                assert got == want and got[0][0] <= start
                assert fetched.payload_bytes == sum(len(p) for _, p in want)
    assert _exports(shm) == []
    # A server that leaves out a segment the caller needs is caught before decoding.
    if len(want) > 1:
        short = type(full_info)()
        short.CopyFrom(full_info)
        kept = [seg for seg in short.segments if seg.end > start][1:]
        del short.segments[:]
        short.segments.extend(kept)
        with pytest.raises(ChecksumMismatch):
            check_payloads(short, [p for _, p in want[1:]], start=start)


def test_aio_get_prefix_and_fetch_prefix(shm_service: tuple[Service, str, Path]) -> None:
    _, target, shm = shm_service
    cache = make_cache(len(TOKENS), seed=8)
    with DeltaStoreClient(target, timeout=20) as c:
        c.put_snapshot("writer", 0, TOKENS, cache, model=MODEL, codec="k8v8")
        want = c.get_prefix(TOKENS, model=MODEL, codec="k8v8")

    async def run(shm_dir: str | None) -> tuple[RestoredSnapshot | None, int, RestoredSnapshot | None]:
        async with AsyncDeltaStoreClient(target, timeout=20, shm_dir=shm_dir) as ac:
            got = await ac.get_prefix(TOKENS, model=MODEL, codec="k8v8")
            fetched = await ac.fetch_prefix(TOKENS, model=MODEL, codec="k8v8", max_tokens=BLOCK_SIZE)
            assert fetched is not None
            with fetched:
                n = fetched.n_tokens
            return got, n, await ac.get_prefix([5, *TOKENS], model=MODEL, codec="k8v8")

    for shm_dir in (None, str(shm)):
        got, n, none = asyncio.run(run(shm_dir))
        _assert_same(got, want)
        assert n == BLOCK_SIZE and none is None
    assert _exports(shm) == []


def test_tcp_caller_is_refused_by_default(tmp_path: Path) -> None:
    shm = tmp_path / "shm"
    svc = start_service(tmp_path, shm_dir=str(shm))  # TCP loopback, --shm-peers left at its default
    try:
        target = f"127.0.0.1:{svc.grpc_port}"
        with DeltaStoreClient(target, timeout=20) as c:
            c.put_snapshot("s", 0, TOKENS, make_cache(len(TOKENS)), model=MODEL, codec="k4v2")
        with DeltaStoreClient(target, timeout=20, shm_dir=str(shm)) as c, pytest.raises(grpc.RpcError) as err:
            c.fetch_prefix(TOKENS, model=MODEL, codec="k4v2")
        assert err.value.code() is grpc.StatusCode.FAILED_PRECONDITION
        assert "GetPrefixShm serves callers on this server's unix socket" in (err.value.details() or "")
        assert _exports(shm) == []
    finally:
        svc.stop()


def test_without_shm_dir_the_call_is_refused(tmp_path: Path) -> None:
    sock = tmp_path / "ds.sock"
    svc = start_service(tmp_path, grpc_address=f"unix:{sock}")
    try:
        with (
            DeltaStoreClient(f"unix:{sock}", timeout=20, shm_dir=str(tmp_path)) as c,
            pytest.raises(grpc.RpcError) as err,
        ):
            c.get_prefix(TOKENS, model=MODEL, codec="k4v2")
        assert err.value.code() is grpc.StatusCode.FAILED_PRECONDITION
        assert "--shm-dir" in (err.value.details() or "") and "GetPrefix" in (err.value.details() or "")
    finally:
        svc.stop()


def test_prefix_is_confined_to_the_callers_namespace(shm_service: tuple[Service, str, Path]) -> None:
    """Without auth, another namespace is another dedup domain: it matches nothing, exports nothing."""
    _, target, shm = shm_service
    with (
        DeltaStoreClient(target, namespace="alpha", timeout=20, shm_dir=str(shm)) as alpha,
        DeltaStoreClient(target, namespace="beta", timeout=20, shm_dir=str(shm)) as beta,
    ):
        alpha.put_snapshot("s", 0, TOKENS, make_cache(len(TOKENS)), model=MODEL, codec="k4v2")
        got = alpha.get_prefix(TOKENS, model=MODEL, codec="k4v2")
        assert got is not None and got.n_tokens == len(TOKENS)
        assert beta.fetch_prefix(TOKENS, model=MODEL, codec="k4v2") is None
    assert _exports(shm) == []


def test_unclaimed_prefix_exports_share_the_budget_and_are_counted(tmp_path: Path) -> None:
    """Prefix and snapshot exports draw on one --shm-max-bytes; sent bytes are counted per rpc."""
    from prometheus_client.parser import text_string_to_metric_families

    from deltastore.v1 import deltastore_pb2 as pb
    from deltastore.v1 import deltastore_pb2_grpc as pb_grpc

    sock, shm = tmp_path / "ds.sock", tmp_path / "shm"
    svc = start_service(tmp_path, grpc_address=f"unix:{sock}", shm_dir=str(shm), shm_max_bytes=1 << 20)
    try:
        with DeltaStoreClient(f"unix:{sock}", timeout=20) as c:
            c.put_snapshot("s", 0, TOKENS, make_cache(len(TOKENS)), model=MODEL, codec="fp16")
        req = pb.GetPrefixRequest(namespace="default", model=MODEL, codec="fp16", token_ids=TOKENS)
        sizes = []
        with grpc.insecure_channel(f"unix:{sock}") as ch, pytest.raises(grpc.RpcError) as err:
            stub = pb_grpc.DeltaStoreStub(ch)
            for _ in range(100):  # nobody claims them: ~300 KB each against a 1 MiB cap
                sizes.append(stub.GetPrefixShm(req, timeout=10).info.payload_bytes)
        assert err.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "--shm-max-bytes" in (err.value.details() or "")
        assert 1 <= len(sizes) <= 4 and len(_exports(shm)) == len(sizes)
        with (
            DeltaStoreClient(f"unix:{sock}", timeout=20, shm_dir=str(shm)) as c,
            pytest.raises(grpc.RpcError) as err,
        ):
            c.get_snapshot("s", 0)  # the same budget, spent by the prefix exports
        assert err.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
        sent = sum(
            s.value
            for family in text_string_to_metric_families(svc.metrics.exposition().decode())
            for s in family.samples
            if s.name == "deltastore_grpc_sent_bytes_total" and s.labels.get("method") == "GetPrefixShm"
        )
        assert sent == sum(sizes) > 0
    finally:
        svc.stop()


def test_an_export_whose_caller_went_away_is_discarded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The caller's deadline passes while its export is written: nobody will claim it, so it goes."""
    import time

    from deltastore.server.shm import ShmExporter

    real = ShmExporter.export

    def slow(self: ShmExporter, snap: object) -> str:
        name = real(self, snap)  # type: ignore[arg-type]
        time.sleep(1.0)  # a large export: the caller's deadline passes meanwhile
        return name

    monkeypatch.setattr(ShmExporter, "export", slow)
    sock, shm = tmp_path / "ds.sock", tmp_path / "shm"
    svc = start_service(tmp_path, grpc_address=f"unix:{sock}", shm_dir=str(shm))
    try:
        with DeltaStoreClient(f"unix:{sock}", timeout=20, shm_dir=str(shm)) as c:
            c.put_snapshot("s", 0, TOKENS, make_cache(len(TOKENS)), model=MODEL, codec="k4v2")
            with pytest.raises(grpc.RpcError) as err:
                c.fetch_prefix(TOKENS, model=MODEL, codec="k4v2", timeout=0.3)
            assert err.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED
            assert len(_exports(shm)) == 1  # written, not claimed
            deadline = time.monotonic() + 10
            while _exports(shm) and time.monotonic() < deadline:
                time.sleep(0.05)
            assert _exports(shm) == []  # removed by the server at once, not by the 60 s sweep
    finally:
        svc.stop()
