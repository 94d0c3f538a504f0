"""Bit packing of integer codes: 8 // bits codes per byte, the first code in the lowest bits.

3-bit codes (block format version 2) go 8 to 3 bytes: code i of a group of 8 at bits 3i..3i+2 of
the group's 24-bit little-endian word; the bytes past ``ceil(3 n / 8)``, which hold only padding,
are not stored.

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
    if bits not in (1, 2, 3, 4, 8):
        raise CodecError(f"cannot pack {bits}-bit codes; supported widths are (1, 2, 3, 4, 8)")
    return 8 // bits


def _pack3(flat: torch.Tensor) -> torch.Tensor:
    n = flat.numel()
    pad = -n % 8
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    c = flat.view(-1, 8).to(torch.int32)
    word = c[:, 0]
    for i in range(1, 8):
        word = word | (c[:, i] << (3 * i))
    out = torch.stack([word & 0xFF, (word >> 8) & 0xFF, (word >> 16) & 0xFF], dim=1).to(torch.uint8)
    return out.view(-1)[: packed_nbytes(n, 3)]


def _unpack3(packed: torch.Tensor, n_codes: int) -> torch.Tensor:
    pad = -packed.numel() % 3
    if pad:
        packed = torch.cat([packed, packed.new_zeros(pad)])
    b = packed.view(-1, 3).to(torch.int32)
    word = b[:, 0] | (b[:, 1] << 8) | (b[:, 2] << 16)
    shifts = torch.arange(0, 24, 3, dtype=torch.int32, device=packed.device)
    return ((word[:, None] >> shifts) & 7).to(torch.uint8).view(-1)[:n_codes]


def packed_nbytes(n_codes: int, bits: int) -> int:
    """Bytes that ``n_codes`` codes of ``bits`` bits take once packed."""
    return -(-n_codes * bits // 8)


def pack_bits(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack codes. codes: any shape, uint8 values < 2**bits -> (packed_nbytes(numel, bits),) uint8."""
    per = _check(bits)
    flat = codes.reshape(-1)
    if flat.dtype != torch.uint8:
        flat = flat.to(torch.uint8)
    if bits == 3:
        return _pack3(flat)
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
    if bits == 3:
        return _unpack3(packed, n_codes)
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


def unpack_float(
    packed: torch.Tensor, bits: int, n_codes: int, values: torch.Tensor | None = None
) -> torch.Tensor:
    """Unpack straight to float32 codes, (n_codes,): one table lookup per byte replaces the
    shift/mask passes and the uint8 -> float conversion of ``unpack_bits(...).float()``.
    ``values``: optional (2**bits,) float32 value of each code (non-uniform levels), looked up
    in the same pass."""
    per = _check(bits)
    if packed.numel() != packed_nbytes(n_codes, bits):
        raise CodecError(f"{packed.numel()} packed bytes cannot hold exactly {n_codes} {bits}-bit codes")
    if bits == 3:  # codes straddle bytes: no per-byte table
        codes = _unpack3(packed, n_codes).long()
        return codes.float() if values is None else values[codes]
    if per == 1 and values is None:
        return packed.float()
    table = _float_table(bits, packed.device)
    if values is not None:
        table = values[table.long()]
    return torch.index_select(table, 0, packed.to(torch.int32)).view(-1)[:n_codes]
