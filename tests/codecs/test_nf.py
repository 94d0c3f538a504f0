"""Option nf (non-uniform code levels) and block format versions: placement, sizes, old blocks."""

from __future__ import annotations

import itertools
import json
import struct
from pathlib import Path

import pytest
import torch
from codec_testlib import DEVICES, make_cache, rel_err

from deltastore.codecs import CodecSpec, decode_block, encode_block, encoded_nbytes, read_header
from deltastore.codecs.codebook import NF_BITS, NF_LEVELS, code_levels
from deltastore.codecs.format import FORMAT_VERSION, block_version
from deltastore.codecs.params import decode_params
from deltastore.codecs.quant import dequantize_groups, quantize_groups
from deltastore.errors import FormatError, InvalidArgument

GOLDEN = Path(__file__).parent / "data" / "format_v1"


def test_spec_grammar() -> None:
    spec = CodecSpec.parse("k4v2-nf-p8")
    assert spec.nf and spec.canonical() == "k4v2-g64-kc-p8-nf"
    assert CodecSpec.parse(spec.canonical()) == spec
    for bad in ("fp8-nf", "lossless-nf", "k8v8-nf", "k4v2-nf-nf"):
        with pytest.raises(InvalidArgument):
            CodecSpec.parse(bad)
    assert CodecSpec.parse("k8v4-nf").nf  # the 4-bit values take the table, the 8-bit keys stay uniform


def _worst(levels: torch.Tensor, top: int) -> float:
    """Largest distance, in code units, from any point of [0, top] to its nearest level."""
    return max(float(levels[0]), top - float(levels[-1]), float((levels[1:] - levels[:-1]).max()) / 2)


def test_tables_are_sorted_and_no_coarser_than_uniform() -> None:
    for (kind, bits), levels in NF_LEVELS.items():
        assert kind in "kv" and bits in NF_BITS and len(levels) == 1 << bits
        assert levels[0] >= 0.0 and levels[-1] <= 1.0
        assert all(a < b for a, b in itertools.pairwise(levels))
        top = (1 << bits) - 1
        # worst case in code units: uniform codes 0.5; the fitted tables 0.50-0.71 (codebook.py)
        assert _worst(code_levels(kind, bits, torch.device("cpu")), top) <= 0.75


@pytest.mark.parametrize("kind", ["k", "v"])
@pytest.mark.parametrize("bits", NF_BITS)
def test_levels_decode_exactly_and_codes_are_nearest(kind: str, bits: int) -> None:
    """Each element takes the index of its nearest level (placement pinned against a brute-force
    argmin) and decodes within the table's worst distance times the scale."""
    top = (1 << bits) - 1
    levels = code_levels(kind, bits, torch.device("cpu"))
    z = (
        torch.randn(4, 130, generator=torch.Generator().manual_seed(bits))
        * torch.linspace(0.1, 10, 4)[:, None]
    )
    codes, params = quantize_groups(z, bits, 64, levels=kind)
    scale, zero = decode_params(params, (4, 3), False)
    step = scale.repeat_interleave(64, dim=-1)[:, :130]
    base = zero.repeat_interleave(64, dim=-1)[:, :130]
    units = (z - base) / torch.where(step > 0, step, torch.ones_like(step))
    nearest = (units[..., None] - levels).abs().argmin(dim=-1)
    assert torch.equal(codes.long(), nearest)
    y = dequantize_groups(levels[codes.long()], params, 64)
    slack = z.abs().amax() * 2**-10 * (1 << bits)
    assert bool(((y - z).abs() <= step * _worst(levels, top) + slack).all())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "spec_text", ["k4v2-nf", "k4v4-p8-nf-sink4", "k2v2-nf-kt-g32", "k4v4-p8-nf-sink4-z-hp8-keep75-lo25-r8"]
)
def test_nf_blocks_exact_sizes_and_bounds(spec_text: str, device: str) -> None:
    layers = make_cache(tokens=70, device=device)
    kw = {"seq_end": 80} if "keep" in spec_text else {}
    payload = encode_block(layers, spec_text, start=10, **kw)
    plain = CodecSpec.parse(spec_text.replace("-nf", ""))
    size = encoded_nbytes(spec_text, n_layers=2, kv_heads=3, head_dim=64, n_tokens=70, start=10, **kw)
    # nf changes which level a code means, never a section's size: only the header's spec grows
    plain_size = encoded_nbytes(plain, n_layers=2, kv_heads=3, head_dim=64, n_tokens=70, start=10, **kw)
    assert size == plain_size + len("-nf")
    if not CodecSpec.parse(spec_text).entropy:
        assert len(payload) == size
    hdr = read_header(payload)
    assert hdr.version == 2 == block_version(hdr.spec)
    blk = decode_block(payload, device=device)
    if not hdr.spec.evicts:
        for (k, v), (k0, v0) in zip(blk.layers, layers, strict=True):
            assert rel_err(k, k0) < 0.6 and rel_err(v, v0) < 0.6


def test_nf_lowers_the_error_of_gaussian_codes() -> None:
    """What the fitted tables are for: rotated KV is bell-shaped, so 2-bit values err less."""
    layers = make_cache(n_layers=4, tokens=256, seed=3)
    errs = {}
    for spec in ("k4v2", "k4v2-nf"):
        blk = decode_block(encode_block(layers, spec))
        errs[spec] = sum(rel_err(v, v0) for (_, v), (_, v0) in zip(blk.layers, layers, strict=True))
    assert errs["k4v2-nf"] < errs["k4v2"]


def test_version_must_match_the_spec() -> None:
    layers = make_cache(tokens=8)
    for spec, version in (("k4v2", 1), ("k4v2-nf", 2)):
        payload = bytearray(encode_block(layers, spec))
        assert payload[4] == version and read_header(payload).version == version
        payload[4] = 3 - version  # a v1 header cannot name nf; a plain spec is always written as v1
        with pytest.raises(FormatError, match="version"):
            read_header(payload)
    payload = bytearray(encode_block(layers, "k4v2"))
    struct.pack_into("<B", payload, 4, FORMAT_VERSION + 1)
    with pytest.raises(FormatError, match="version"):
        read_header(payload)


@pytest.mark.parametrize("spec_text", sorted(json.loads((GOLDEN / "manifest.json").read_text())))
def test_version1_blocks_still_decode(spec_text: str) -> None:
    """Blocks written by the build before format version 2 (tests/codecs/data/format_v1, made by
    commit f57c8dc from ``make_cache(2, 2, 24, 32, seed=5)`` at start 2) decode unchanged."""
    entry = json.loads((GOLDEN / "manifest.json").read_text())[spec_text]
    payload = (GOLDEN / entry["file"]).read_bytes()
    assert len(payload) == entry["nbytes"]
    hdr = read_header(payload)
    assert hdr.version == 1 and hdr.spec == CodecSpec.parse(spec_text)
    layers = make_cache(n_layers=2, kv_heads=2, tokens=24, head_dim=32, seed=5)
    blk = decode_block(payload)
    fresh = decode_block(
        encode_block(layers, spec_text, start=2, seq_end=26 if "keep" in spec_text else None)
    )
    for (k, v), (k1, v1) in zip(blk.layers, fresh.layers, strict=True):
        assert k.shape == k1.shape and rel_err(k, k1) < 1e-2 and rel_err(v, v1) < 1e-2
    if spec_text == "lossless":
        for (k, v), (k0, v0) in zip(blk.layers, layers, strict=True):
            assert torch.equal(k, k0) and torch.equal(v, v0)


@pytest.mark.parametrize("n", [1, 5, 8, 13, 64, 1001])
def test_three_bit_packing_roundtrip_and_size(n: int) -> None:
    from deltastore.codecs.packing import pack_bits, packed_nbytes, unpack_bits, unpack_float

    codes = torch.randint(0, 8, (n,), dtype=torch.uint8, generator=torch.Generator().manual_seed(n))
    packed = pack_bits(codes, 3)
    assert packed.numel() == packed_nbytes(n, 3) == -(-3 * n // 8)
    assert torch.equal(unpack_bits(packed, 3, n), codes)
    assert torch.equal(unpack_float(packed, 3, n), codes.float())
    # placement: code i at bits 3i..3i+2 of the little-endian stream
    stream = int.from_bytes(packed.numpy().tobytes(), "little")
    assert [(stream >> (3 * i)) & 7 for i in range(n)] == codes.tolist()


@pytest.mark.parametrize("spec_text", ["k3v2", "k3v3-nf-p8", "k4v3-sink4-hp8", "k3v2-kt-g32-keep80-lo40-r16"])
def test_three_bit_blocks_exact_sizes(spec_text: str) -> None:
    layers = make_cache(tokens=37)
    kw = {"seq_end": 50} if "keep" in spec_text else {}
    payload = encode_block(layers, spec_text, start=5, **kw)
    assert len(payload) == encoded_nbytes(
        spec_text, n_layers=2, kv_heads=3, head_dim=64, n_tokens=37, start=5, **kw
    )
    hdr = read_header(payload)
    assert hdr.version == 2
    blk = decode_block(payload)
    if not hdr.spec.evicts:  # 3-bit keys sit between 4- and 2-bit ones
        for (k, _), (k0, _) in zip(blk.layers, layers, strict=True):
            assert rel_err(k, k0) < 0.25
