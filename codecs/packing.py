"""Bit packing of integer codes: 8 // bits codes per byte, the first code in the lowest bits.

Vectorized with word tricks instead of per-slot loops: the codes of one output byte are viewed as
one 16/32/64-bit little-endian word, and shifts fold them into its low byte (unpacking spreads
them back). Each step is one elementwise pass; nothing loops over elements. A tail that does not
fill a byte is padded with zero codes.
"""

from __future__ import annotations

import functools

import torch

from deltastore.codecs.base import require_little_endian
from deltastore.errors import CodecError

__all__ = ["pack_bits", "packed_nbytes", "unpack_bits", "unpack_float"]

# bits -> (word dtype holding the codes of one packed byte, fold shifts, spread mask)
_WORDS: dict[int, tuple[torch.dtype, tuple[int, ...], int]] = {
    4: (torch.int16, (4,), 0x0F0F),
    2: (torch.int32, (6, 12), 0x03030303),
    1: (torch.int64, (7, 14, 28), 0x0101010101010101),
}


def _check(bits: int) -> int:
    if bits not in (1, 2, 4, 8):
        raise CodecError(f"cannot pack {bits}-bit codes; supported widths are (1, 2, 4, 8)")
    return 8 // bits


def packed_nbytes(n_codes: int, bits: int) -> int:
    """Bytes that ``n_codes`` codes of ``bits`` bits take once packed."""
    return -(-n_codes * bits // 8)


def pack_bits(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack codes. codes: any shape, uint8 values < 2**bits -> (packed_nbytes(numel, bits),) uint8."""
    per = _check(bits)
    flat = codes.reshape(-1)
    if flat.dtype != torch.uint8:
        flat = flat.to(torch.uint8)
    if per == 1:
        return flat.contiguous()
    require_little_endian()
    pad = -flat.numel() % per
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    dtype, shifts, _ = _WORDS[bits]
    w = flat.contiguous().view(dtype)
    for s in shifts:
        w = w | (w >> s)
    return (w & 0xFF).to(torch.uint8)


def unpack_bits(packed: torch.Tensor, bits: int, n_codes: int) -> torch.Tensor:
    """Inverse of :func:`pack_bits`. packed: (bytes,) uint8 -> (n_codes,) uint8."""
    per = _check(bits)
    if packed.numel() != packed_nbytes(n_codes, bits):
        raise CodecError(f"{packed.numel()} packed bytes cannot hold exactly {n_codes} {bits}-bit codes")
    if per == 1:
        return packed
    require_little_endian()
    dtype, shifts, mask = _WORDS[bits]
    w = packed.to(dtype)
    for s in reversed(shifts):
        w = w | (w << s)
    return (w & mask).view(torch.uint8)[:n_codes]


@functools.lru_cache(maxsize=16)
def _float_table(bits: int, device: torch.device) -> torch.Tensor:
    """(256, 8 // bits) float32: the codes held by each byte value, as floats."""
    per = 8 // bits
    byte = torch.arange(256, dtype=torch.int64)
    codes = torch.stack([(byte >> (i * bits)) & ((1 << bits) - 1) for i in range(per)], dim=-1)
    return codes.to(device=device, dtype=torch.float32)


def unpack_float(packed: torch.Tensor, bits: int, n_codes: int) -> torch.Tensor:
    """Unpack straight to float32 codes, (n_codes,): one table lookup per byte replaces the
    shift/mask passes and the uint8 -> float conversion of ``unpack_bits(...).float()``."""
    per = _check(bits)
    if packed.numel() != packed_nbytes(n_codes, bits):
        raise CodecError(f"{packed.numel()} packed bytes cannot hold exactly {n_codes} {bits}-bit codes")
    if per == 1:
        return packed.float()
    table = _float_table(bits, packed.device)
    return torch.index_select(table, 0, packed.to(torch.int32)).view(-1)[:n_codes]
