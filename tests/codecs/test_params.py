"""p8: scales and zero-points as 8-bit codes on per-head grids."""

from __future__ import annotations

import pytest
import torch
from codec_testlib import DEVICES, make_cache

from deltastore.codecs import decode_block, encode_block
from deltastore.codecs.format import params_nbytes
from deltastore.codecs.params import decode_params, encode_params
from deltastore.codecs.quant import dequantize_groups, quantize_groups
from deltastore.errors import CodecError


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def test_p8_costs_little_accuracy_for_half_the_parameter_bytes() -> None:
    """Per-token groups of rotated-KV-like data whose ranges vary 30x across tokens."""
    x = torch.randn(6, 512, 64) * torch.logspace(-1, 0.5, 512)[None, :, None]
    errors, sizes = {}, {}
    for params8 in (False, True):
        codes, params = quantize_groups(x, 4, 64, params8=params8)
        errors[params8] = _rel(dequantize_groups(codes, params, 64, params8=params8), x)
        sizes[params8] = params.numel()
    assert sizes[True] == params_nbytes(6, 512, True) < 0.52 * sizes[False]
    assert errors[True] < 1.03 * errors[False]


def test_every_group_stays_within_half_a_stored_step_over_a_wide_range() -> None:
    """Group ranges spanning 2**20 in one head: the table is chosen coarse enough to reach them."""
    x = torch.randn(2, 40, 64) * torch.logspace(-3, 3, 40)[None, :, None]
    codes, params = quantize_groups(x, 4, 64, params8=True)
    scale, _ = decode_params(params, (2, 40, 1), True)
    y = dequantize_groups(codes, params, 64, params8=True)
    assert bool(((y - x).abs() <= scale / 2 * (1 + 1e-5) + 1e-6 * x.abs()).all())


def test_constant_groups_and_constant_heads_decode_exactly() -> None:
    x = torch.randn(3, 8, 64)
    x[0, 2] = 1.5  # one constant group
    x[1] = -0.25  # a whole constant head
    x[2] = 0.0
    codes, params = quantize_groups(x, 4, 64, params8=True)
    y = dequantize_groups(codes, params, 64, params8=True)
    assert torch.equal(y[1], x[1]) and torch.equal(y[2], x[2])
    assert torch.allclose(y[0, 2], x[0, 2], atol=1e-6)


def test_non_finite_input_refused() -> None:
    x = torch.randn(2, 4, 64)
    x[1, 2, 3] = float("nan")
    with pytest.raises(CodecError, match="non-finite"):
        encode_params(*torch.aminmax(x, dim=-1), 15, True)


def test_hostile_table_index_decodes_to_garbage_not_an_error() -> None:
    _, params = quantize_groups(torch.randn(2, 4, 64), 4, 64, params8=True)
    bad = params.clone()
    bad[12:16] = torch.tensor([0x7F, 0x7F, 0x7F, 0x7F], dtype=torch.uint8)  # head 0's table index: NaN
    scale, zero = decode_params(bad, (2, 4, 1), True)
    assert scale.shape == zero.shape == (2, 4, 1)


@pytest.mark.parametrize("device", DEVICES)
def test_p8_blocks_round_trip_on_every_device(device: str) -> None:
    layers = make_cache(n_layers=2, tokens=70, device=device)
    for spec in ("k4v4-p8", "k4v2-kt-p8-sink4-z", "k2v2-p8-g32"):
        plain = decode_block(encode_block(layers, spec.replace("-p8", "")), device=device)
        p8 = decode_block(encode_block(layers, spec), device=device)
        for (k, v), (k8, v8), (k0, v0) in zip(plain.layers, p8.layers, layers, strict=True):
            assert _rel(k8, k0) < 1.1 * _rel(k, k0) and _rel(v8, v0) < 1.1 * _rel(v, v0)


@pytest.mark.parametrize(
    ("spec", "shape", "n_layers"),
    [
        ("k4v4-p8", (3, 683, 64), 2),  # 16 + 2 * 683 bytes a head: CPU chunks start 2 bytes off a float
        ("k4v4-kt-p8-sink4-z-keep50-r8", (3, 53, 64), 2),
        ("k2v2-nr-p8", (1, 5, 3), 2),
        ("k4v4-nr-hp1", (1, 4, 3), 1),  # odd head_dim: the 8-bit tokens' fp16 parameters start at an odd byte
        ("k4v4-nr-p8-hp4", (2, 7, 5), 1),
    ],
)
def test_parameters_at_any_byte_offset_decode(spec: str, shape: tuple[int, int, int], n_layers: int) -> None:
    """Found by review: a one-head chunk or a one-layer block can leave a head's parameter bytes at
    an offset that is not a multiple of 4 (p8) or 2 (fp16 pairs); decoding must not care."""
    gen = torch.Generator().manual_seed(0)
    layers = [
        (torch.randn(*shape, generator=gen).half(), torch.randn(*shape, generator=gen).half())
        for _ in range(n_layers)
    ]
    blk = decode_block(encode_block(layers, spec))
    for (k, v), (k0, _v0), pos in zip(blk.layers, layers, blk.positions, strict=True):
        src = k0.float().gather(1, pos[..., None].expand(-1, -1, shape[-1]))
        assert k.shape == src.shape and _rel(k, src) < 0.4 and bool(torch.isfinite(v).all())


def test_values_near_the_float32_limit_refused_not_turned_into_nan() -> None:
    layers = [(torch.randn(2, 8, 64), torch.randn(2, 8, 64))]
    layers[0][1][0, 1, 0], layers[0][1][0, 1, 1] = 3e38, -3e38
    with pytest.raises(CodecError, match="non-finite"):
        encode_block(layers, "k4v4-nr-p8")


def test_tiny_heads_keep_the_error_bound() -> None:
    """A head of values around 1e-38: the scale floor must not underflow to 0."""
    x = torch.randn(1, 16, 64) * 1e-38
    x[0, 3] = 2e-38  # a constant group
    codes, params = quantize_groups(x, 4, 64, params8=True)
    scale, _ = decode_params(params, (1, 16, 1), True)
    y = dequantize_groups(codes, params, 64, params8=True)
    assert bool((scale > 0).all())
    assert bool(((y - x).abs() <= scale / 2 * (1 + 1e-3) + 1e-45).all())


def test_scale_codes_are_what_a_binary_search_gives() -> None:
    """The scale code is the first grid scale >= the group's need, whatever the float error of
    the log2 estimate: checked against torch.searchsorted, exact grid points included."""
    from deltastore.codecs import params

    gen = torch.Generator().manual_seed(1)
    tables = params._scale_tables(torch.device("cpu"))
    for _ in range(50):
        heads, groups = 7, 97
        need = torch.rand(heads, groups, generator=gen) ** 4 * 10 ** (
            torch.rand(heads, 1, generator=gen) * 8 - 4
        )
        need[0, 0] = 0.0
        top = need.amax(dim=1)
        base = torch.maximum(need.amin(dim=1), top * 2.0**-24)
        table = ((top / base)[:, None] > tables[:, -1][None, :]).sum(dim=1).clamp_(max=tables.shape[0] - 1)
        grid = tables[table] * base[:, None]
        need[:, 1:6] = grid.gather(1, torch.randint(0, 256, (heads, 5), generator=gen))  # exact grid points
        want = torch.searchsorted(grid, need.contiguous()).clamp_(max=255)
        assert torch.equal(params._first_at_least(grid, need, base, table), want)
