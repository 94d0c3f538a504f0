"""The shared base of the per-tensor codecs, and the simplest one (raw fp16).

A block codec (``block.py``) splits a cache into per-layer K and V tensors of shape
(kv_heads, tokens, head_dim); a :class:`TensorCodec` turns one such tensor into a fixed tuple of
flat uint8 parts whose sizes ``format.section_sizes`` predicts exactly, and back. Each part index
becomes one section of the block (that part of every layer, layer after layer).
"""

from __future__ import annotations

import sys
from abc import ABC, abstractmethod
from collections.abc import Sequence

import torch

from deltastore.errors import CodecError

__all__ = ["Fp16Codec", "TensorCodec", "as_bytes", "require_little_endian", "to_fp16"]

Shape = tuple[int, int, int]


def as_bytes(x: torch.Tensor) -> torch.Tensor:
    """A flat uint8 view of ``x``'s bytes (copy only if ``x`` is not contiguous)."""
    return x.contiguous().view(-1).view(torch.uint8)


def require_little_endian() -> None:
    """The format stores little-endian bytes and the codecs reinterpret tensors in place."""
    if sys.byteorder != "little":
        raise CodecError("DeltaStore codecs need a little-endian host")


def to_fp16(x: torch.Tensor) -> torch.Tensor:
    """``x`` as float16; raises CodecError rather than silently turning finite values into inf."""
    if x.dtype == torch.float16:
        return x
    h = x.to(torch.float16)
    if bool((h.isinf() & ~x.isinf()).any()):
        raise CodecError("values exceed the float16 range", hint="store this cache with the 'lossless' codec")
    return h


class TensorCodec(ABC):
    """Encodes one (kv_heads, tokens, head_dim) tensor into flat uint8 parts, and back."""

    @abstractmethod
    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """x: (kv_heads, tokens, head_dim), fp16/bf16/fp32 -> parts, each (n_bytes,) uint8."""

    @abstractmethod
    def decode(self, parts: Sequence[torch.Tensor], shape: Shape, dtype: torch.dtype) -> torch.Tensor:
        """parts as from :meth:`encode` (on the target device) -> (kv_heads, tokens, head_dim) of ``dtype``."""

    def stacks(self, shape: Shape) -> bool:
        """Are the parts of tensors of ``shape`` stacked along the head axis the concatenation of
        each tensor's parts? Then a block's layers (and a run of blocks) encode and decode in one
        call as one tensor of ``layers * kv_heads`` heads: far fewer, larger torch calls."""
        return True


class Fp16Codec(TensorCodec):
    """Raw fp16: the reference every ratio is measured against (bf16/fp32 input is rounded)."""

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return (as_bytes(to_fp16(x)),)

    def decode(self, parts: Sequence[torch.Tensor], shape: Shape, dtype: torch.dtype) -> torch.Tensor:
        return parts[0].view(torch.float16).view(shape).to(dtype)
