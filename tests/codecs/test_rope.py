"""Option pr<T> (keys quantized before RoPE, block format version 3): the layout matches the
model's RoPE, placement is bit-exact, sizes are exact, positions survive eviction."""

from __future__ import annotations

import re
import struct

import pytest
import torch
from codec_testlib import DEVICES, make_cache, rel_err

from deltastore.codecs import CodecSpec, decode_block, encode_block, encoded_nbytes, read_header
from deltastore.codecs.format import FORMAT_VERSION, block_version, pack_header, section_sizes
from deltastore.codecs.rope import apply_rope, remove_rope
from deltastore.errors import CodecError, FormatError, InvalidArgument

THETA = 100000


def test_spec_grammar() -> None:
    spec = CodecSpec.parse("k3v2-pr100000-p8-z")
    assert spec.rope_theta == THETA and spec.canonical() == "k3v2-g64-kc-p8-pr100000-z"
    assert CodecSpec.parse(spec.canonical()) == spec
    assert CodecSpec.parse("k4v4-pr1000000000").rope_theta == 10**9  # 10 digits: Llama-scale thetas fit
    assert CodecSpec.parse("k4v4").canonical() == "k4v4-g64-kc"  # specs without it are spelled as before
    for bad in (
        "fp8-pr10000",
        "lossless-pr10000",
        "k4v2-pr0",
        "k4v2-pr10-pr20",
        "k4v2-pr",
        "k4v2-pr99999999999",
    ):
        with pytest.raises(InvalidArgument):
            CodecSpec.parse(bad)


def test_layout_is_the_models_rope() -> None:
    """apply_rope is transformers' Llama RoPE (half split, float32 angles), remove_rope its inverse."""
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

    cfg = LlamaConfig(hidden_size=256, num_attention_heads=4, rope_theta=float(THETA))
    k = torch.randn(1, 3, 50, 64, generator=torch.Generator().manual_seed(1))
    pos = torch.arange(700, 750)[None]
    cos, sin = LlamaRotaryEmbedding(cfg)(k, pos)
    _, expected = apply_rotary_pos_emb(k, k, cos, sin)
    assert torch.allclose(apply_rope(k, pos[0], THETA), expected, atol=1e-5, rtol=0)
    assert torch.allclose(remove_rope(expected, pos[0], THETA), k, atol=1e-5, rtol=0)


def _sections(payload: bytes) -> list[bytes]:
    hdr = read_header(payload)
    return [payload[offset : offset + length] for _, _, offset, length in hdr.sections]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "spec_text",
    ["k4v2-pr100000", "k3v2-p8-sink4-hp16-pr100000", "k2v2-kt-g32-pr10000", "k3v3-nf-p8-pr500000"],
)
def test_placement_is_the_plain_codec_on_keys_before_rope(spec_text: str, device: str) -> None:
    """Every section but the fp16 sink is byte for byte what the spec without pr<T> writes for
    the keys with RoPE removed at their absolute positions; only the header's spec grows."""
    layers = make_cache(tokens=70, device=device)
    spec = CodecSpec.parse(spec_text)
    plain = CodecSpec.parse(re.sub(r"-pr\d+", "", spec_text))
    at = torch.arange(10, 80, device=device)
    before = [(remove_rope(k.float(), at, spec.rope_theta), v.float()) for k, v in layers]
    payload, reference = encode_block(layers, spec, start=10), encode_block(before, plain, start=10)
    n_sink = 1 if spec.sink else 0
    got, want = _sections(payload), _sections(reference)
    assert got[:4] == want[:4] and got[4 + n_sink :] == want[4 + n_sink :]
    size = encoded_nbytes(spec, n_layers=2, kv_heads=3, head_dim=64, n_tokens=70, start=10)
    assert len(payload) == size
    plain_size = encoded_nbytes(plain, n_layers=2, kv_heads=3, head_dim=64, n_tokens=70, start=10)
    assert size == plain_size + len(f"-pr{spec.rope_theta}")
    hdr = read_header(payload)
    assert hdr.version == 3 == block_version(hdr.spec) == FORMAT_VERSION
    blk = decode_block(payload, device=device)
    assert blk.layers[0][0].dtype == torch.float16
    ref = decode_block(reference, device=device, dtype=torch.float32)
    for (k, v), (k1, v1), (k0, _) in zip(blk.layers, ref.layers, layers, strict=True):
        assert torch.allclose(k.float(), apply_rope(k1, at, spec.rope_theta), atol=2e-2, rtol=1e-2)
        assert torch.equal(v, v1.half())
        assert rel_err(k, k0) < 0.3


@pytest.mark.parametrize("device", DEVICES)
def test_evicted_blocks_put_rope_back_at_each_kept_position(device: str) -> None:
    layers = make_cache(tokens=64, device=device, seed=4)
    spec = CodecSpec.parse("k4v4-p8-sink4-hp8-pr100000-keep50-lo25-r16")
    payload = encode_block(layers, spec, start=128, seq_end=200)
    assert len(payload) == encoded_nbytes(
        spec, n_layers=2, kv_heads=3, head_dim=64, n_tokens=64, start=128, seq_end=200
    )
    at = torch.arange(128, 192, device=device)
    before = [(remove_rope(k.float(), at, THETA), v.float()) for k, v in layers]
    plain = CodecSpec.parse("k4v4-p8-sink4-hp8-keep50-lo25-r16")
    ref = decode_block(
        encode_block(before, plain, start=128, seq_end=200), device=device, dtype=torch.float32
    )
    blk = decode_block(payload, device=device)
    assert blk.kept == 36
    for (k, _), (k1, _), (k0, _), pos, pos1 in zip(
        blk.layers, ref.layers, layers, blk.positions, ref.positions, strict=True
    ):
        assert torch.equal(pos, pos1)  # the key-norm ranking is RoPE-invariant: the same tokens kept
        assert torch.allclose(k.float(), apply_rope(k1, pos, THETA), atol=2e-2, rtol=1e-2)
        kept = torch.gather(k0, 1, (pos - 128).unsqueeze(-1).expand(-1, -1, 64))
        assert rel_err(k, kept) < 0.3  # a token re-rotated at a wrong position would cost ~1.4


def test_version_must_match_and_odd_head_dims_are_refused() -> None:
    payload = bytearray(encode_block(make_cache(tokens=8), "k4v2-pr10000"))
    payload[4] = 2  # a version 2 header cannot name pr<T>
    with pytest.raises(FormatError, match="version"):
        read_header(payload)
    struct.pack_into("<B", payload, 4, FORMAT_VERSION + 1)
    with pytest.raises(FormatError, match="version"):
        read_header(payload)
    with pytest.raises(CodecError, match="even head_dim"):
        encode_block(make_cache(tokens=8, head_dim=63), "k8v8-nr-pr10000")
    spec = CodecSpec.parse("k8v8-nr-pr10000")
    sizes = section_sizes(spec, 1, 1, 63, 4, 0, "float16")
    header = pack_header(spec, 1, 1, 63, 4, 0, "float16", [(kind, 0, size) for kind, size in sizes])
    with pytest.raises(FormatError, match="even head_dim"):
        decode_block(header + bytes(sum(size for _, size in sizes)))
