"""Batched coding: a run of blocks (and a block's layers) coded in one call gives exactly what
coding each layer of each block on its own gives, bit for bit, whatever the codec."""

from __future__ import annotations

import itertools

import pytest
import torch
from codec_testlib import DEVICES, make_cache

from deltastore.codecs import block as codec_block
from deltastore.codecs import decode_block, decode_blocks, encode_block
from deltastore.codecs.quant import IntCodec

SPECS = [
    "fp16",
    "lossless",
    "fp8",
    "k8v8",
    "k4v2",
    "k4v2-pe50",
    "k4v4-kt-sink4-z-keep30-r16",
    "k2v2-nr-sink4",
    "k4v2-sink64",  # the first block is all sink: nothing coded
    "k4v4-p8-sink4-hp32-keep50-r32",  # 0, 10 and 22 newest tokens at 8 bits: three run keys
    "k4v2-kt-p8-hp8",
    "k4v4-p8-sink4-z-hp16-keep88-lo72-r32",  # 47, 39 and 0 tokens at 2 bits
    "k4v2-kt-keep60-lo30-r16",
]


def _segments(n_layers: int, device: str) -> tuple[list[list[tuple[torch.Tensor, torch.Tensor]]], list[int]]:
    """A 150-token cache cut like a snapshot: blocks of 64, 64 and a 22-token tail."""
    cache = make_cache(n_layers=n_layers, tokens=150, device=device, seed=3)
    starts = [0, 64, 128, 150]
    return [[(k[:, a:b], v[:, a:b]) for k, v in cache] for a, b in itertools.pairwise(starts)], starts


@pytest.mark.parametrize("blocks_per_run", [None, 1, 2])
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("spec", SPECS)
def test_run_decode_equals_layer_by_layer(
    spec: str, device: str, blocks_per_run: int | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Whole runs, and runs cut to bound memory (1 or 2 blocks per call), decode identically."""
    blocks, starts = _segments(4, device)
    if blocks_per_run is not None:
        h, n, d = blocks[0][0][0].shape
        monkeypatch.setattr(codec_block, "_RUN_ELEMENTS", blocks_per_run * 4 * h * n * d)
    payloads = [encode_block(b, spec, start=s, seq_end=150) for b, s in zip(blocks, starts, strict=False)]
    together = decode_blocks(payloads, device=device)
    assert len(together) == len(payloads)
    for blk, layers, start in zip(together, blocks, starts, strict=False):
        assert blk.start == start and blk.n_tokens == layers[0][0].shape[1]
        for i, layer in enumerate(layers):
            # the same layer alone in its own one-layer block: no stacking of any kind
            alone = decode_block(encode_block([layer], spec, start=start, seq_end=150), device=device)
            for got, want in zip(blk.layers[i], alone.layers[0], strict=True):
                assert got.dtype == want.dtype and torch.equal(got, want)
            assert torch.equal(blk.positions[i], alone.positions[0])


@pytest.mark.parametrize("layers_per_call", [None, 2])
@pytest.mark.parametrize("spec", SPECS)
def test_layers_encode_like_one_layer_blocks(
    spec: str, layers_per_call: int | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Encoding layers together lays out each section as the layers' sections in order, whether
    all go in one call or in groups (2 + 2 + 1 here)."""
    (block, *_), _ = _segments(5, "cpu")
    h, n, d = block[0][0].shape
    if layers_per_call is not None:
        monkeypatch.setattr(codec_block, "_STACK_ELEMENTS", layers_per_call * h * n * d)
    scores = [torch.rand(h, n, generator=torch.Generator().manual_seed(i)) for i in range(len(block))]
    whole = decode_block(encode_block(block, spec, seq_end=150, scores=scores))
    for i, layer in enumerate(block):
        alone = decode_block(encode_block([layer], spec, seq_end=150, scores=[scores[i]]))
        assert all(torch.equal(a, b) for a, b in zip(whole.layers[i], alone.layers[0], strict=True))


@pytest.mark.parametrize("params8", [False, True])
@pytest.mark.parametrize("axis", ["channel", "token"])
@pytest.mark.parametrize("bits", [2, 4, 8])
def test_chunked_calls_equal_head_by_head(bits: int, axis: str, params8: bool) -> None:
    """Enough heads that the CPU path splits them into chunks (with a ragged last chunk)."""
    codec = IntCodec(bits, 64, axis, rotate=True, params8=params8)
    x = torch.randn(70, 64, 64) * torch.linspace(0.5, 3, 64)
    assert codec._heads_per_call(tuple(x.shape), x.device) < 70  # really chunked
    codes, params = codec.encode(x)
    heads = [codec.encode(x[i : i + 1]) for i in range(70)]
    assert torch.equal(codes, torch.cat([c for c, _ in heads]))
    assert torch.equal(params, torch.cat([p for _, p in heads]))
    got = codec.decode([codes, params], tuple(x.shape), torch.float32)
    want = torch.cat([codec.decode(list(h), (1, 64, 64), torch.float32) for h in heads])
    assert torch.equal(got, want)


@pytest.mark.parametrize("bits", [2, 4])
def test_chunks_of_heads_whose_codes_do_not_fill_bytes(bits: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """5 tokens x 3 dims x 2 bits = 30 bits a head: chunks must be whole multiples of 4 heads."""
    from deltastore.codecs import quant

    codec = IntCodec(bits, 64, "token", rotate=False)
    x = torch.randn(70, 5, 3)
    whole = codec.encode(x)
    monkeypatch.setattr(quant, "_CHUNK", 2 * 15)  # 2 heads' worth: rounded up to 4 when needed
    per = codec._heads_per_call(tuple(x.shape), x.device)
    assert per < 70 and (per * 15 * bits) % 8 == 0
    chunked = codec.encode(x)
    assert all(torch.equal(a, b) for a, b in zip(whole, chunked, strict=True))
    assert torch.equal(
        codec.decode(list(chunked), (70, 5, 3), torch.float32),
        codec.decode(list(whole), (70, 5, 3), torch.float32),
    )
