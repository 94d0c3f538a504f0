"""Decoding a range of layers (``layers=``, ``BlockDecoder``): bit for bit the full decode's
layers, for every codec family, from each layer's own bytes."""

from __future__ import annotations

import itertools

import pytest
import torch
from codec_testlib import DEVICES, make_cache

from deltastore.codecs import decode_blocks, encode_block, read_header
from deltastore.codecs.block import BlockDecoder
from deltastore.codecs.format import Section
from deltastore.errors import CodecError, FormatError

N_LAYERS = 5
SPECS = [
    "fp16",
    "lossless",
    "fp8",
    "k8v8",
    "k4v4",
    "k4v2",
    "k4v2-p8",
    "k4v4-kt-p8-hp8",
    "k4v2-sink4",
    "k4v2-sink64",  # the first block is all sink: nothing coded
    "k3v2-p8-sink4-hp8-pr100000-up0.2",
    "k2v2-kt-g32-pr10000",
    "k3v2-g64-kc-p8-up1.3-z",  # per-layer bits, zstd sections
    "k2v3-kt-g32-up4-keep75-lo25-r8",
    "k4v4-p8-sink4-z-hp16-keep88-lo72-r32",
    "k4v2-pe50",
]


def _payloads(spec: str, device: str, dtype: torch.dtype = torch.float16) -> list[bytes]:
    """A 150-token cache of N_LAYERS layers cut like a snapshot: blocks of 64, 64 and 22 tokens."""
    cache = make_cache(n_layers=N_LAYERS, tokens=150, device=device, dtype=dtype, seed=7)
    starts = [0, 64, 128, 150]
    return [
        encode_block([(k[:, a:b], v[:, a:b]) for k, v in cache], spec, start=a, seq_end=150)
        for a, b in itertools.pairwise(starts)
    ]


def _same(got: torch.Tensor, want: torch.Tensor) -> bool:
    return got.dtype == want.dtype and got.device == want.device and torch.equal(got, want)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("spec", SPECS)
def test_each_layer_and_range_equals_the_full_decode(spec: str, device: str) -> None:
    payloads = _payloads(spec, device)
    full = decode_blocks(payloads, device=device, dtype=torch.bfloat16)
    decoder = BlockDecoder(payloads, device=device, dtype=torch.bfloat16)
    assert decoder.n_layers == N_LAYERS
    ranges = [slice(i, i + 1) for i in range(N_LAYERS)] + [slice(1, 4), slice(3, None), slice(-2, None)]
    for layers in ranges:
        chosen = range(N_LAYERS)[layers]
        for part, whole in zip(decoder.decode(layers), full, strict=True):
            assert (part.start, part.n_tokens, part.kept) == (whole.start, whole.n_tokens, whole.kept)
            assert len(part.layers) == len(chosen) == len(part.positions)
            for j, i in enumerate(chosen):
                assert all(_same(a, b) for a, b in zip(part.layers[j], whole.layers[i], strict=True))
                assert torch.equal(part.positions[j], whole.positions[i])
    # the one-call form, and None for every layer
    one = decode_blocks(payloads, device=device, dtype=torch.bfloat16, layers=slice(2, 3))
    assert all(_same(o.layers[0][1], w.layers[2][1]) for o, w in zip(one, full, strict=True))
    again = decoder.decode()
    assert all(_same(a.layers[4][0], w.layers[4][0]) for a, w in zip(again, full, strict=True))


def test_float32_caches_in_their_own_dtype() -> None:
    payloads = _payloads("lossless", "cpu", torch.float32)
    full = decode_blocks(payloads)
    for i in range(N_LAYERS):
        for part, whole in zip(decode_blocks(payloads, layers=slice(i, i + 1)), full, strict=True):
            assert _same(part.layers[0][0], whole.layers[i][0]) and part.layers[0][0].dtype == torch.float32


@pytest.mark.parametrize("layers", [slice(5, 9), slice(2, 2), slice(0, 4, 2), slice(3, 1)])
def test_a_range_without_consecutive_layers_is_refused(layers: slice) -> None:
    with pytest.raises(CodecError, match="consecutive layers"):
        decode_blocks(_payloads("k4v2", "cpu")[:1], layers=layers)


def test_a_damaged_layer_leaves_the_others_decodable() -> None:
    """Layer 3's eviction mask keeps 64 tokens in head 0 and 32 in head 1 (48 each, as the same
    total): the full decode and layer 3 refuse it, every other layer decodes as before (each range
    reads its own layers' bits)."""
    spec = "k4v2-keep75-r8"
    payload = bytearray(_payloads(spec, "cpu")[0])
    hdr = read_header(payload)
    clean = decode_blocks([bytes(payload)])[0]
    _, flags, offset, _ = next(s for s in hdr.sections if s[0] == Section.MASK)
    assert not flags and hdr.n_tokens == 64 and hdr.kept_tokens == 48  # raw bits, 8 bytes a head
    head0 = offset + 3 * hdr.kv_heads * 8
    payload[head0 : head0 + 16] = b"\xff" * 8 + b"\xff" * 4 + b"\x00" * 4
    with pytest.raises(FormatError, match="eviction mask"):
        decode_blocks([bytes(payload)])
    with pytest.raises(FormatError, match="eviction mask"):
        decode_blocks([bytes(payload)], layers=slice(3, 4))
    for layers in (slice(0, 3), slice(4, 5)):
        part = decode_blocks([bytes(payload)], layers=layers)[0]
        for j, i in enumerate(range(N_LAYERS)[layers]):
            assert all(torch.equal(a, b) for a, b in zip(part.layers[j], clean.layers[i], strict=True))
