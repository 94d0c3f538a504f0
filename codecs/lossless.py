"""Bit-exact storage: byte-plane split on the device, then zstd (``entropy.py``) per section.

A tensor's bytes are regrouped by byte position: for fp16 all high bytes (sign, exponent, top
mantissa bits: few distinct values, highly compressible) then all low bytes (near random).
The split is a pure permutation of bytes, so NaN payloads, infinities and -0.0 survive exactly,
for float16, bfloat16 and float32 alike.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from deltastore.codecs.base import Shape, TensorCodec

__all__ = ["LosslessCodec"]


class LosslessCodec(TensorCodec):
    """One part: the byte planes of the tensor, plane after plane (little-endian byte order)."""

    def __init__(self, dtype: torch.dtype) -> None:
        self.dtype = dtype
        self.itemsize = torch.empty((), dtype=dtype).element_size()

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        raw = x.contiguous().view(-1).view(torch.uint8)
        return (raw.view(-1, self.itemsize).t().contiguous().view(-1),)

    def decode(self, parts: Sequence[torch.Tensor], shape: Shape) -> torch.Tensor:
        planes = parts[0].view(self.itemsize, -1)
        return planes.t().contiguous().view(-1).view(self.dtype).view(shape)
