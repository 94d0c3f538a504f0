"""encode_block / decode_block round trips: shapes x dtypes x devices x codecs, error bounds, bytes."""

from __future__ import annotations

import pytest
import torch
from codec_testlib import DEVICES, make_cache, rel_err

from deltastore.codecs import CodecSpec, decode_block, encode_block, encoded_nbytes, read_header
from deltastore.codecs.format import params_nbytes
from deltastore.codecs.params import decode_params
from deltastore.codecs.quant import dequantize_groups, quantize_groups
from deltastore.codecs.spec import TIERS
from deltastore.codecs.table import tier_row
from deltastore.errors import CodecError

# Relative Frobenius error bounds on Gaussian KV (measured: k8 0.004, k4 0.09, k2 0.45, fp8 0.025).
BOUNDS = {"fp16": 1e-3, "fp8": 0.04, "k8v8": 0.01, "k4v4": 0.12, "k4v2": 0.6, "k2v2": 0.6, "k8v8-kt": 0.01}
KEY_BOUNDS = {"k4v2": 0.12, "k2v2": 0.6}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("tokens", [1, 5, 64, 70])
@pytest.mark.parametrize("spec_text", list(BOUNDS))
def test_roundtrip_error_bounds(spec_text: str, tokens: int, dtype: torch.dtype, device: str) -> None:
    layers = make_cache(tokens=tokens, dtype=dtype, device=device)
    payload = encode_block(layers, spec_text, start=7)
    blk = decode_block(payload, device=device)
    assert blk.n_tokens == tokens and blk.start == 7 and blk.kept == tokens
    assert blk.spec == CodecSpec.parse(spec_text) and blk.dtype == str(dtype).removeprefix("torch.")
    for (k, v), (k0, v0), pos in zip(blk.layers, layers, blk.positions, strict=True):
        assert k.shape == k0.shape and v.shape == v0.shape
        assert k.dtype == dtype and k.device.type == device
        assert torch.equal(pos.cpu(), torch.arange(7, 7 + tokens).expand(3, tokens))
        key_bound = KEY_BOUNDS.get(spec_text, BOUNDS[spec_text])
        if tokens > 1 or spec_text.startswith(("fp", "k8")):  # one-token groups of kc keys are exact
            assert rel_err(k, k0) < key_bound
        assert rel_err(v, v0) < BOUNDS[spec_text]


@pytest.mark.parametrize("params8", [False, True])
@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("n", [1, 63, 64, 130])
def test_quantize_groups_error_within_half_step(bits: int, n: int, params8: bool) -> None:
    x = torch.randn(4, n) * torch.linspace(0.1, 10, 4)[:, None]
    codes, params = quantize_groups(x, bits, 64, params8=params8)
    groups = -(-n // 64)
    assert codes.shape == x.shape and int(codes.max()) < 1 << bits
    assert params.dtype == torch.uint8 and params.numel() == params_nbytes(4, groups, params8)
    y = dequantize_groups(codes, params, 64, params8=params8)
    scale, _ = decode_params(params, (4, groups), params8)
    step = scale.repeat_interleave(64, dim=-1)[:, :n]
    # half a step of the stored scale, plus fp16 rounding of the zero-point and of the scale over
    # 2**bits levels (p8: float32 rounding of its grids)
    slack = x.abs().amax() * 2**-10 * (1 << bits)
    assert bool(((y - x).abs() <= step / 2 + slack).all())


def test_batch_dim_and_4d_input_accepted() -> None:
    layers = make_cache(tokens=9)
    batched = [(k[None], v[None]) for k, v in layers]
    assert encode_block(batched, "k4v2") == encode_block(layers, "k4v2")


def test_decode_dtype_override_and_no_aliasing() -> None:
    layers = make_cache(tokens=12)
    payload = encode_block(layers, "fp16")
    blk = decode_block(payload, dtype=torch.float32)
    assert blk.layers[0][0].dtype == torch.float32
    blk16 = decode_block(payload)
    blk16.layers[0][0].zero_()  # must never write into the payload bytes
    assert torch.equal(decode_block(payload).layers[0][0], layers[0][0])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_lossless_bit_exact_with_special_values(dtype: torch.dtype, device: str) -> None:
    layers = make_cache(n_layers=3, tokens=33, dtype=dtype, device=device)
    ints = {torch.float16: torch.int16, torch.bfloat16: torch.int16, torch.float32: torch.int32}[dtype]
    k = layers[1][0]
    flat = k.view(-1)
    flat[:6] = torch.tensor([float("inf"), float("-inf"), -0.0, 0.0, float("nan"), 1e-40], dtype=dtype)
    bits = flat.view(ints)
    bits[6] = (bits[4] | 1) if dtype == torch.float32 else (bits[4] | 3)  # NaN with another payload
    bits[7] = bits[4] | (1 << (bits.element_size() * 8 - 1))  # negative NaN
    payload = encode_block(layers, "lossless")
    blk = decode_block(payload, device=device)
    assert read_header(payload).spec.bit_exact
    for (a, b), (a0, b0) in zip(blk.layers, layers, strict=True):
        assert a.dtype == dtype
        assert torch.equal(a.view(ints), a0.view(ints)) and torch.equal(b.view(ints), b0.view(ints))


@pytest.mark.parametrize(("spec_text", "bits"), [("k4v4", 4.5), ("k4v2", 3.5), ("k2v2", 2.5), ("k8v8", 8.5)])
def test_exact_byte_accounting(spec_text: str, bits: float) -> None:
    layers = make_cache(n_layers=4, tokens=128)
    payload = encode_block(layers, spec_text)
    hdr = read_header(payload)
    elements = 4 * 2 * 3 * 128 * 64
    assert len(payload) - hdr.header_nbytes == elements * bits / 8
    assert hdr.header_nbytes < 128
    assert hdr.fp16_nbytes == elements * 2


def test_k4v2_realistic_block_ratio() -> None:
    """SmolLM2-shaped block (30 layers x 3 x 64), 64 tokens: at least 4.5x with every byte counted."""
    layers = make_cache(n_layers=30, tokens=64)
    payload = encode_block(layers, "k4v2")
    assert read_header(payload).fp16_nbytes / len(payload) >= 4.5


@pytest.mark.parametrize(
    "spec_text",
    [
        "fp16",
        "fp8",
        "k8v8",
        "k4v4-kt",
        "k4v2",
        "k2v2-g32",
        "k4v2-sink4",
        "fp8-sink8",
        "k4v2-pe50",
        "k4v2-adapt30-r4",
        "k4v2-sink4-pe10",
        "fp16-pe30",
        "k4v2-nr-g128",
        "k4v4-p8",
        "k4v2-kt-p8-sink4",
        "k4v4-sink4-hp8",
        "k4v4-p8-sink4-hp16-keep50-r16",
        "k4v4-p8-sink4-hp16-keep88-lo72-r16",
        "k4v2-nr-g32-keep100-lo50-r4",
    ],
)
@pytest.mark.parametrize(("tokens", "start"), [(1, 0), (3, 0), (70, 0), (70, 2), (100, 500)])
def test_encoded_nbytes_equals_real_bytes(spec_text: str, tokens: int, start: int) -> None:
    layers = make_cache(tokens=tokens)
    payload = encode_block(layers, spec_text, start=start)
    assert len(payload) == encoded_nbytes(
        spec_text, n_layers=2, kv_heads=3, head_dim=64, n_tokens=tokens, start=start
    )
    blk = decode_block(payload)
    assert blk.kept == CodecSpec.parse(spec_text).kept_tokens(tokens, start)


def test_table_ratio_equals_real_bytes() -> None:
    block = {"n_layers": 3, "kv_heads": 2, "head_dim": 64, "n_tokens": 96, "start": 0}
    layers = make_cache(n_layers=3, kv_heads=2, tokens=96)
    for tier in TIERS.values():
        row = tier_row(tier, block)
        if row["bits_per_element"] is None:
            assert tier.spec.kind == "lossless" or tier.spec.entropy
            continue
        payload = encode_block(layers, tier.spec)
        assert row["ratio_vs_fp16"] == 16 / row["bits_per_element"]
        assert row["ratio_vs_fp16"] == pytest.approx(
            read_header(payload).fp16_nbytes / len(payload), rel=1e-12
        )


def test_fp16_sink_tokens_exact() -> None:
    layers = make_cache(tokens=40)
    blk = decode_block(encode_block(layers, "k2v2-sink4", start=1))
    for (k, v), (k0, v0) in zip(blk.layers, layers, strict=True):
        assert torch.equal(k[:, :3], k0[:, :3]) and torch.equal(v[:, :3], v0[:, :3])
        assert not torch.equal(k[:, 3:5], k0[:, 3:5])


def test_partial_head_dim_groups_without_rotation() -> None:
    layers = make_cache(tokens=10, head_dim=96)
    blk = decode_block(encode_block(layers, "k8v8-nr-kt"))
    assert rel_err(blk.layers[0][0], layers[0][0]) < 0.01
    with pytest.raises(CodecError, match="power-of-two"):
        encode_block(layers, "k8v8")


def test_entropy_stage_roundtrip_and_never_larger() -> None:
    layers = make_cache(tokens=64)
    plain, packed = encode_block(layers, "k4v2"), encode_block(layers, "k4v2-z")
    assert len(packed) <= len(plain) + 2
    a, b = decode_block(plain), decode_block(packed)
    for (k, v), (k2, v2) in zip(a.layers, b.layers, strict=True):
        assert torch.equal(k, k2) and torch.equal(v, v2)


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda: [], "non-empty"),
        (lambda: [(torch.zeros(3, 4, 64),)], "pair"),
        (lambda: [(torch.zeros(3, 4), torch.zeros(3, 4))], "shape"),
        (lambda: [(torch.zeros(2, 3, 4, 64), torch.zeros(2, 3, 4, 64))], "shape"),
        (lambda: [(torch.zeros(3, 4, 64), torch.zeros(3, 5, 64))], "differs"),
        (lambda: [(torch.zeros(3, 4, 64, dtype=torch.int32),) * 2], "dtype"),
        (lambda: [(torch.zeros(3, 0, 64),) * 2], "n_tokens"),
        (lambda: [(torch.zeros(3, 4, 64, dtype=torch.float16), torch.zeros(3, 4, 64))], "differs"),
    ],
)
def test_bad_input_raises_codec_error(make, match: str) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(CodecError, match=match):
        encode_block(make(), "k4v2")


@pytest.mark.parametrize(
    ("scores", "match"),
    [
        ([torch.ones(3, 70)], "1 layers, the cache 2"),
        ([torch.ones(3, 70), torch.ones(3, 69)], "layer 1 scores have shape"),
        ([torch.ones(3, 70), "high"], "must be tensors"),
    ],
)
def test_bad_scores_raise_codec_error(scores: list, match: str) -> None:  # type: ignore[type-arg]
    with pytest.raises(CodecError, match=match):
        encode_block(make_cache(tokens=70), "k4v2-keep50", scores=scores)


def test_unrepresentable_values_raise() -> None:
    layers = make_cache(tokens=8, dtype=torch.float32)
    layers[0][0][0, 0, 0] = float("nan")
    with pytest.raises(CodecError, match="lossless"):
        encode_block(layers, "k4v2")
    big = make_cache(tokens=8, dtype=torch.float32)
    big[0][1][0, 0, 0] = 1e6
    with pytest.raises(CodecError, match="float16 range"):
        encode_block(big, "fp16")
    assert decode_block(encode_block(big, "lossless")).layers[0][1][0, 0, 0] == 1e6
