"""Asymmetric integer quantization with a scale and zero-point per group.

Per group of ``group`` consecutive elements along the grouping axis: ``zero = min``,
``scale = (max - min) / (2**bits - 1)``, stored as fp16 or as 8-bit codes (``params.py``), and
``code = round((x - zero) / scale)`` clamped to ``[0, 2**bits - 1]``; decode is
``code * scale + zero``. The error is at most ``scale / 2`` per element (plus the rounding of
the stored parameters). A partial last group is padded by repeating its last element (which
leaves min and max unchanged); padded codes are never stored.

Keys: rotated (``rotation.py``) and grouped per channel (along tokens, KIVI: Liu et al. 2024,
whose keys have per-channel outliers) or per token (along head_dim). Values: per token.
Overhead: 2 fp16 per group, i.e. 32 / group bits per element (0.5 at group 64); with p8 about
half of that.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from deltastore.codecs.base import Shape, TensorCodec
from deltastore.codecs.codebook import NF_BITS, code_levels, nearest_code
from deltastore.codecs.packing import pack_bits, packed_nbytes, unpack_float
from deltastore.codecs.params import decode_params, encode_params
from deltastore.codecs.rotation import rotate, unrotate
from deltastore.errors import CodecError

__all__ = ["IntCodec", "dequantize_groups", "merge_groups", "quantize_groups", "split_groups"]

_CHUNK = 1 << 18  # elements per call on CPU (1 MiB of float32 per temporary)
_CHUNK_ACCELERATOR = 1 << 26  # elsewhere (256 MiB of float32): bounds a long snapshot's temporaries


def split_groups(x: torch.Tensor, group: int, dim: int = -1) -> torch.Tensor:
    """Split axis ``dim`` (size n) into (ceil(n / group), group), padding by repeating the last element."""
    dim %= x.dim()
    n = x.shape[dim]
    pad = -n % group
    if pad:
        tail = x.narrow(dim, n - 1, 1).expand(*x.shape[:dim], pad, *x.shape[dim + 1 :])
        x = torch.cat([x, tail], dim=dim)
    return x.reshape(*x.shape[:dim], (n + pad) // group, group, *x.shape[dim + 1 :])


def merge_groups(x: torch.Tensor, n: int, dim: int = -1) -> torch.Tensor:
    """Inverse of :func:`split_groups`: ``dim`` indexes the merged axis; padding is dropped."""
    dim %= x.dim() - 1
    x = x.reshape(*x.shape[:dim], x.shape[dim] * x.shape[dim + 1], *x.shape[dim + 2 :])
    return x if x.shape[dim] == n else x.narrow(dim, 0, n)


def _reciprocal(scale: torch.Tensor) -> torch.Tensor:
    """1 / scale, with 0 for constant groups (scale 0): their codes are all 0."""
    return torch.where(scale > 0, scale.reciprocal(), torch.zeros_like(scale))


def quantize_groups(
    x: torch.Tensor, bits: int, group: int, dim: int = -1, params8: bool = False, levels: str | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize in groups of ``group`` consecutive elements along ``dim``.

    Args:
        x: float32, shape (heads, ...); n = x.shape[dim] (``dim`` is not the head axis 0 when
            ``params8``: its grids are per head).
        params8: store parameters as p8 codes (``params.py``) instead of fp16 pairs.
        levels: None for uniform codes, or "k"/"v": the non-uniform ``nf`` table (``codebook.py``)
            of that tensor kind; the code is the nearest level's index.
    Returns:
        codes: uint8 of x's shape, in [0, 2**bits).
        params: the stored parameter bytes, flat uint8 (``params.encode_params``); the group grid
            is x's shape with ``dim`` -> ceil(n / group).
    """
    dim %= x.dim()
    n = x.shape[dim]
    top = (1 << bits) - 1
    xg = split_groups(x, group, dim)
    lo, hi = torch.aminmax(xg, dim=dim + 1)
    scale, zero, stored = encode_params(lo, hi, top, params8)
    inv = _reciprocal(scale).unsqueeze(dim + 1)
    if levels is not None:
        codes = nearest_code(torch.addcmul(-zero.unsqueeze(dim + 1) * inv, xg, inv), levels, bits)
        return merge_groups(codes, n, dim), stored
    # floor(x / scale - zero / scale + 0.5): one fused pass; clamping also absorbs parameter rounding.
    codes = torch.addcmul(0.5 - zero.unsqueeze(dim + 1) * inv, xg, inv).clamp_(0, top).to(torch.uint8)
    return merge_groups(codes, n, dim), stored


def dequantize_groups(
    codes: torch.Tensor, params: torch.Tensor, group: int, dim: int = -1, params8: bool = False
) -> torch.Tensor:
    """Inverse of :func:`quantize_groups` (same ``group``, ``dim`` and ``params8``).

    codes: uint8 or float32 code values; params: the stored bytes -> float32 of codes' shape.
    """
    dim %= codes.dim()
    n = codes.shape[dim]
    pad = -n % group
    if pad:
        codes = torch.cat([codes, codes.new_zeros(*codes.shape[:dim], pad, *codes.shape[dim + 1 :])], dim=dim)
    cg = codes.reshape(*codes.shape[:dim], (n + pad) // group, group, *codes.shape[dim + 1 :]).float()
    grid = list(codes.shape)
    grid[dim] = (n + pad) // group
    scale, zero = decode_params(params, tuple(grid), params8)
    return merge_groups(torch.addcmul(zero.unsqueeze(dim + 1), cg, scale.unsqueeze(dim + 1)), n, dim)


class IntCodec(TensorCodec):
    """``bits``-bit codes, packed, with fp16 (scale, zero) per group.

    Args:
        bits: 2, 4 or 8.
        group: elements per group.
        axis: "token" (groups along head_dim) or "channel" (groups along tokens, per channel).
        rotate: rotate along head_dim by the signed Hadamard first.
        params8: parameters as p8 codes on per-head grids (``params.py``).
        levels: None (uniform codes) or "k"/"v": non-uniform ``nf`` levels of that tensor kind
            (``codebook.py``; ignored for widths without a table, i.e. 8 bits).

    Parts: packed codes in (kv_heads, tokens, head_dim) order; then the parameters over the group
    grid (kv_heads, ceil(tokens / group), head_dim) for "channel", (kv_heads, tokens,
    ceil(head_dim / group)) for "token": fp16 (scale, zero) pairs, or per head a p8 grid header
    and codes.
    """

    def __init__(
        self,
        bits: int,
        group: int,
        axis: str = "token",
        rotate: bool = False,
        params8: bool = False,
        levels: str | None = None,
    ) -> None:
        if axis not in ("token", "channel"):
            raise CodecError(f"unknown grouping axis {axis!r}")
        self.bits, self.group, self.rotate, self.params8 = bits, group, rotate, params8
        self.levels = levels if bits in NF_BITS else None
        self.dim = 1 if axis == "channel" else 2

    def stacks(self, shape: Shape) -> bool:
        h, t, d = shape
        return (h * t * d * self.bits) % 8 == 0  # each tensor's codes fill whole bytes

    def _heads_per_call(self, shape: Shape, device: torch.device) -> int:
        """Heads per call. On CPU, about ``_CHUNK`` elements at a time: a chunk's temporaries stay
        in cache and in malloc's reused heap (whole-tensor temporaries are fresh mmaps that
        page-fault on every call): ~1.5-2x. On an accelerator, ``_CHUNK_ACCELERATOR``: big
        kernels, but a whole long snapshot decoded as one run would need several times its size
        in float32 temporaries. Chunks must fill whole bytes of codes, so that their
        concatenation is the tensor's layout."""
        h, t, d = shape
        limit = _CHUNK if device.type == "cpu" else _CHUNK_ACCELERATOR
        align = 8 // math.gcd(t * d * self.bits, 8)  # heads whose codes fill whole bytes
        per = max(align, limit // max(1, t * d) // align * align)
        return h if per >= h else per

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        h = x.shape[0]
        per = self._heads_per_call((x.shape[0], x.shape[1], x.shape[2]), x.device)
        if per == h:
            return self._encode(x)
        chunks = [self._encode(x[i : i + per]) for i in range(0, h, per)]
        return torch.cat([c for c, _ in chunks]), torch.cat([p for _, p in chunks])

    def _encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = x.float()
        if self.rotate:
            x = rotate(x)
        codes, params = quantize_groups(x, self.bits, self.group, self.dim, self.params8, self.levels)
        return pack_bits(codes, self.bits), params

    def decode(self, parts: Sequence[torch.Tensor], shape: Shape, dtype: torch.dtype) -> torch.Tensor:
        h, t, d = shape
        per = self._heads_per_call(shape, parts[0].device)
        if per == h:
            return self._decode(parts[0], parts[1], shape).to(dtype)
        # Each chunk lands in its slice of the output, converted there: no whole-tensor float32
        # temporaries and no concatenation.
        out = torch.empty(shape, dtype=dtype, device=parts[0].device)
        code_n, param_n = packed_nbytes(per * t * d, self.bits), parts[1].numel() // h * per
        for c, i in enumerate(range(0, h, per)):
            n = min(per, h - i)
            codes = parts[0].narrow(0, c * code_n, packed_nbytes(n * t * d, self.bits))
            params = parts[1].narrow(0, c * param_n, parts[1].numel() // h * n)
            out[i : i + n].copy_(self._decode(codes, params, (n, t, d)))
        return out

    def _decode(self, packed: torch.Tensor, param_bytes: torch.Tensor, shape: Shape) -> torch.Tensor:
        """-> float32 of ``shape``."""
        n = shape[0] * shape[1] * shape[2]
        if self.levels is None:
            codes = unpack_float(packed, self.bits, n).view(shape)
        else:  # each byte -> its codes' levels in one lookup, as unpack_float does for plain codes
            table = code_levels(self.levels, self.bits, packed.device)
            codes = unpack_float(packed, self.bits, n, values=table).view(shape)
        x = dequantize_groups(codes, param_bytes, self.group, self.dim, self.params8)
        return unrotate(x) if self.rotate else x
