"""Bit-exact storage: byte-plane split on the device, then zstd (``entropy.py``) per section.

A tensor's bytes are regrouped by byte position: for fp16 all high bytes (sign, exponent, top
mantissa bits: few distinct values, highly compressible) then all low bytes (near random).
The split is a pure permutation of bytes, so NaN payloads, infinities and -0.0 survive exactly,
for float16, bfloat16 and float32 alike.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from deltastore.codecs.base import Shape, TensorCodec, require_little_endian

__all__ = ["LosslessCodec"]


_WORD = {2: torch.int16, 4: torch.int32}


class LosslessCodec(TensorCodec):
    """One part: the byte planes of the tensor, least significant plane first.

    Planes are cut with integer shifts of the tensor viewed as words, 3-5x faster than a
    strided byte transpose; the little-endian host makes plane i byte i of each element.
    """

    def __init__(self, dtype: torch.dtype) -> None:
        require_little_endian()
        self.dtype = dtype
        self.itemsize = torch.empty((), dtype=dtype).element_size()
        self.word = _WORD[self.itemsize]

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        w = x.contiguous().view(-1).view(self.word)
        planes = torch.empty(self.itemsize, w.numel(), dtype=torch.uint8, device=w.device)
        for i in range(self.itemsize):
            planes[i].copy_(w >> (8 * i) if i else w)  # int -> uint8 keeps the low byte
        return (planes.view(-1),)

    def stacks(self, shape: Shape) -> bool:
        return False  # planes span the whole tensor: stacked tensors interleave differently

    def decode(self, parts: Sequence[torch.Tensor], shape: Shape, dtype: torch.dtype) -> torch.Tensor:
        planes = parts[0].view(self.itemsize, -1)
        w = planes[0].to(self.word)
        for i in range(1, self.itemsize):
            w |= planes[i].to(self.word) << (8 * i)
        return w.view(self.dtype).view(shape).to(dtype)
