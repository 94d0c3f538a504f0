"""Asymmetric integer quantization with an fp16 scale and zero-point per group.

Per group of ``group`` consecutive elements along the grouping axis: ``zero = min``,
``scale = (max - min) / (2**bits - 1)``, both stored as fp16, and
``code = round((x - zero) / scale)`` clamped to ``[0, 2**bits - 1]``; decode is
``code * scale + zero``. The error is at most ``scale / 2`` per element (plus fp16 rounding of
the parameters). A partial last group is padded by repeating its last element (which leaves
min and max unchanged); padded codes are never stored.

Keys: rotated (``rotation.py``) and grouped per channel (along tokens, KIVI: Liu et al. 2024,
whose keys have per-channel outliers) or per token (along head_dim). Values: per token.
Overhead: 2 fp16 per group, i.e. 32 / group bits per element (0.5 at group 64).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from deltastore.codecs.base import Shape, TensorCodec, as_bytes
from deltastore.codecs.packing import pack_bits, unpack_bits
from deltastore.codecs.rotation import rotate, unrotate
from deltastore.errors import CodecError

__all__ = ["IntCodec", "dequantize_groups", "merge_groups", "quantize_groups", "split_groups"]


def split_groups(x: torch.Tensor, group: int) -> torch.Tensor:
    """(..., n) -> (..., ceil(n / group), group), padding by repeating the last element."""
    n = x.shape[-1]
    pad = -n % group
    if pad:
        x = torch.cat([x, x[..., -1:].expand(*x.shape[:-1], pad)], dim=-1)
    return x.reshape(*x.shape[:-1], (n + pad) // group, group)


def merge_groups(x: torch.Tensor, n: int) -> torch.Tensor:
    """(..., groups, group) -> (..., n): inverse of :func:`split_groups` (drops padding)."""
    x = x.reshape(*x.shape[:-2], x.shape[-2] * x.shape[-1])
    return x if x.shape[-1] == n else x[..., :n]


def check_params(params: torch.Tensor) -> None:
    if not bool(torch.isfinite(params).all()):
        raise CodecError(
            "cannot quantize non-finite values or values beyond the float16 range",
            hint="store this cache with the 'lossless' codec",
        )


def _reciprocal(scale: torch.Tensor) -> torch.Tensor:
    """1 / scale, with 0 for constant groups (scale 0): their codes are all 0."""
    s = scale.float()
    return torch.where(s > 0, s.reciprocal(), torch.zeros_like(s))


def quantize_groups(x: torch.Tensor, bits: int, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize along the last axis.

    Args:
        x: (..., n) float32.
    Returns:
        codes (..., n) uint8 in [0, 2**bits); params (..., ceil(n / group), 2) fp16 = (scale, zero).
    """
    n = x.shape[-1]
    levels = (1 << bits) - 1
    xg = split_groups(x, group)
    lo, hi = torch.aminmax(xg, dim=-1)
    zero = lo.to(torch.float16)
    scale = ((hi - zero.float()) / levels).to(torch.float16)
    params = torch.stack([scale, zero], dim=-1)
    check_params(params)
    inv = _reciprocal(scale).unsqueeze(-1)
    codes = torch.addcmul(-zero.float().unsqueeze(-1) * inv, xg, inv)
    codes = codes.round_().clamp_(0, levels).to(torch.uint8)
    return merge_groups(codes, n), params


def dequantize_groups(codes: torch.Tensor, params: torch.Tensor, group: int) -> torch.Tensor:
    """Inverse of :func:`quantize_groups`. codes (..., n) uint8, params (..., g, 2) -> (..., n) float32."""
    n = codes.shape[-1]
    pad = -n % group
    if pad:
        codes = torch.cat([codes, codes.new_zeros(*codes.shape[:-1], pad)], dim=-1)
    cg = codes.reshape(*codes.shape[:-1], (n + pad) // group, group).float()
    p = params.float()
    return merge_groups(torch.addcmul(p[..., 1:2], cg, p[..., 0:1]), n)


class IntCodec(TensorCodec):
    """``bits``-bit codes, packed, with fp16 (scale, zero) per group.

    Args:
        bits: 2, 4 or 8.
        group: elements per group.
        axis: "token" (groups along head_dim) or "channel" (groups along tokens, per channel).
        rotate: rotate by the signed Hadamard first (keys).

    Parts: packed codes in (kv_heads, tokens, head_dim) order for axis "token", (kv_heads,
    head_dim, tokens) for "channel"; then the params, fp16 (scale, zero) pairs in the same order.
    """

    def __init__(self, bits: int, group: int, axis: str = "token", rotate: bool = False) -> None:
        if axis not in ("token", "channel"):
            raise CodecError(f"unknown grouping axis {axis!r}")
        self.bits, self.group, self.axis, self.rotate = bits, group, axis, rotate

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        x = x.float()
        if self.rotate:
            x = rotate(x)
        if self.axis == "channel":
            x = x.transpose(1, 2)
        codes, params = quantize_groups(x, self.bits, self.group)
        return pack_bits(codes, self.bits), as_bytes(params)

    def decode(self, parts: Sequence[torch.Tensor], shape: Shape) -> torch.Tensor:
        h, t, d = shape
        inner = (h, d, t) if self.axis == "channel" else (h, t, d)
        codes = unpack_bits(parts[0], self.bits, h * t * d).view(inner)
        params = parts[1].view(torch.float16).view(*inner[:-1], -(-inner[-1] // self.group), 2)
        x = dequantize_groups(codes, params, self.group)
        if self.axis == "channel":
            x = x.transpose(1, 2)
        return unrotate(x) if self.rotate else x
