"""Bit packing of integer codes: 8 // bits codes per byte, the first code in the lowest bits.

Vectorized over all codes at once; the Python loop runs over bit slots (at most 8), never over
elements. A tail that does not fill a byte is padded with zero codes.
"""

from __future__ import annotations

import torch

from deltastore.errors import CodecError

__all__ = ["pack_bits", "packed_nbytes", "unpack_bits"]

_BITS = (1, 2, 4, 8)


def _check(bits: int) -> int:
    if bits not in _BITS:
        raise CodecError(f"cannot pack {bits}-bit codes; supported widths are {_BITS}")
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
    pad = -flat.numel() % per
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    slots = flat.view(-1, per)
    out = slots[:, 0].clone()
    for i in range(1, per):
        out |= slots[:, i] << (i * bits)
    return out


def unpack_bits(packed: torch.Tensor, bits: int, n_codes: int) -> torch.Tensor:
    """Inverse of :func:`pack_bits`. packed: (bytes,) uint8 -> (n_codes,) uint8."""
    per = _check(bits)
    if packed.numel() != packed_nbytes(n_codes, bits):
        raise CodecError(f"{packed.numel()} packed bytes cannot hold exactly {n_codes} {bits}-bit codes")
    if per == 1:
        return packed
    mask = (1 << bits) - 1
    slots = torch.stack([(packed >> (i * bits)) & mask for i in range(per)], dim=-1)
    return slots.view(-1)[:n_codes]
