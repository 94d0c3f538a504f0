"""GetPrefix end to end: the stored leading blocks of a token list, without a session.

A real server on a loopback port over LMDB in a temp dir, and the real client.
"""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest
import torch
from service_helpers import BLOCK_SIZE, MODEL, make_cache, start_service

from deltastore.client.sync import DeltaStoreClient
from deltastore.server.app import Service
from deltastore.v1 import deltastore_pb2 as pb
from deltastore.v1 import deltastore_pb2_grpc as pb_grpc

TOKENS = list(range(7000, 7300))  # 4 aligned blocks of 64 + a 44-token tail


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int16)


def test_prefix_of_another_session_is_returned_bit_exact(client: DeltaStoreClient) -> None:
    cache = make_cache(len(TOKENS))
    client.put_snapshot("writer", 0, TOKENS, cache, model=MODEL, codec="lossless")

    whole = client.get_prefix(TOKENS, model=MODEL, codec="lossless")
    assert whole is not None and whole.n_tokens == len(TOKENS) and whole.token_ids == TOKENS
    assert whole.snapshot_id == "" and whole.session == ""
    for (k, v), (gk, gv) in zip(cache, whole.layers, strict=True):
        assert torch.equal(_bits(k), _bits(gk)) and torch.equal(_bits(v), _bits(gv))

    # A query that diverges inside block 3 gets the 3 leading aligned blocks, and only those.
    diverged = [*TOKENS[:200], 1, 2, 3]
    assert client.lookup_prefix(diverged, model=MODEL, codec="lossless") == 3 * BLOCK_SIZE
    part = client.get_prefix(diverged, model=MODEL, codec="lossless")
    assert part is not None and part.n_tokens == 3 * BLOCK_SIZE
    assert torch.equal(_bits(part.layers[1][0]), _bits(cache[1][0][:, : 3 * BLOCK_SIZE]))

    limited = client.get_prefix(TOKENS, model=MODEL, codec="lossless", max_tokens=130)
    assert limited is not None and limited.n_tokens == 2 * BLOCK_SIZE  # whole blocks only

    assert client.get_prefix([9, 9, 9, *TOKENS], model=MODEL, codec="lossless") is None
    assert client.get_prefix(TOKENS, model=MODEL, codec="k4v2") is None  # other codec: other chain
    assert client.get_prefix(TOKENS, model=MODEL.replace("0123", "4567"), codec="lossless") is None


def test_prefix_is_confined_to_the_callers_namespace(service: Service) -> None:
    target = f"127.0.0.1:{service.grpc_port}"
    with (
        DeltaStoreClient(target, namespace="alpha", timeout=20) as alpha,
        DeltaStoreClient(target, namespace="beta", timeout=20) as beta,
    ):
        alpha.put_snapshot("s", 0, TOKENS, make_cache(len(TOKENS)), model=MODEL, codec="k4v2")
        got = alpha.get_prefix(TOKENS, model=MODEL, codec="k4v2")
        assert got is not None and got.n_tokens == len(TOKENS)
        assert beta.lookup_prefix(TOKENS, model=MODEL, codec="k4v2") == 0
        assert beta.get_prefix(TOKENS, model=MODEL, codec="k4v2") is None


def test_corrupt_stored_payload_is_data_loss_never_served(client: DeltaStoreClient, service: Service) -> None:
    cache = make_cache(len(TOKENS), seed=3)
    client.put_snapshot("s", 0, TOKENS, cache, model=MODEL, codec="lossless")
    backend = service.store.backend
    with backend.read() as view:
        blocks = [(bytes(k), bytes(v)) for k, v in view.scan("blocks")]
    key, value = blocks[len(blocks) // 2]
    bad = bytearray(value)
    bad[-5] ^= 0x10  # inside the payload: only the digest check can notice
    backend.transact(lambda b: b.put("blocks", key, bytes(bad)))
    with pytest.raises(grpc.RpcError) as err:
        client.get_prefix(TOKENS, model=MODEL, codec="lossless")
    assert err.value.code() is grpc.StatusCode.DATA_LOSS


def test_requires_model_and_codec(service: Service) -> None:
    with grpc.insecure_channel(f"127.0.0.1:{service.grpc_port}") as ch:
        stub = pb_grpc.DeltaStoreStub(ch)
        for req in (
            pb.GetPrefixRequest(model="", codec="lossless", token_ids=TOKENS),
            pb.GetPrefixRequest(model=MODEL, codec="", token_ids=TOKENS),
        ):
            with pytest.raises(grpc.RpcError) as err:
                list(stub.GetPrefix(req, timeout=10))
            assert err.value.code() is grpc.StatusCode.INVALID_ARGUMENT


def test_empty_store_or_no_tokens_match_nothing(tmp_path: Path) -> None:
    svc = start_service(tmp_path)
    try:
        with DeltaStoreClient(f"127.0.0.1:{svc.grpc_port}", timeout=20) as c:
            assert c.get_prefix(TOKENS, model=MODEL, codec="lossless") is None
            assert c.get_prefix([], model=MODEL, codec="lossless") is None
    finally:
        svc.stop()


def test_fetch_prefix_hands_out_checked_payloads_a_caller_decodes_itself(client: DeltaStoreClient) -> None:
    """The connector's path: fetch, then decode block by block; the same tensors as get_prefix."""
    from deltastore.codecs import decode_block

    cache = make_cache(len(TOKENS), seed=5)
    client.put_snapshot("writer", 0, TOKENS, cache, model=MODEL, codec="k4v2")
    whole = client.get_prefix(TOKENS, model=MODEL, codec="k4v2")
    assert whole is not None
    fetched = client.fetch_prefix(TOKENS, model=MODEL, codec="k4v2")
    assert fetched is not None
    with fetched:
        assert fetched.n_tokens == len(TOKENS) and list(fetched.info.token_ids) == TOKENS
        assert len(fetched.payloads) == len(fetched.info.segments) == 5
        assert fetched.payload_bytes == whole.payload_bytes
        blocks = [decode_block(p) for p in fetched.payloads]
    for i, (k, v) in enumerate(whole.layers):
        assert torch.equal(torch.cat([b.layers[i][0] for b in blocks], dim=1), k)
        assert torch.equal(torch.cat([b.layers[i][1] for b in blocks], dim=1), v)
    assert client.fetch_prefix([9, 9, 9, *TOKENS], model=MODEL, codec="k4v2") is None
