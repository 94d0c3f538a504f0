"""FP8 (e4m3) with an fp16 scale per group of ``group`` elements along head_dim.

``scale = absmax / 448`` (448 is e4m3's largest finite value), ``code = e4m3(x / scale)``;
decode is ``float(code) * scale``. e4m3 keeps 3 mantissa bits: relative error <= 2**-4 per
element. Overhead: 16 / group bits per element (0.25 at group 64).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from deltastore.codecs.base import Shape, TensorCodec, as_bytes
from deltastore.codecs.params import check_finite
from deltastore.codecs.quant import merge_groups, split_groups

__all__ = ["E4M3_MAX", "Fp8Codec"]

E4M3_MAX = 448.0


class Fp8Codec(TensorCodec):
    """Parts: e4m3 codes (kv_heads, tokens, head_dim) and fp16 scales (kv_heads, tokens, groups)."""

    def __init__(self, group: int) -> None:
        self.group = group

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        d = x.shape[-1]
        xg = split_groups(x.float(), self.group)
        scale = (xg.abs().amax(dim=-1) / E4M3_MAX).to(torch.float16)
        check_finite(scale)
        s = scale.float()
        inv = torch.where(s > 0, s.reciprocal(), torch.zeros_like(s)).unsqueeze(-1)
        # fp16 rounding of the scale may push |x / scale| a hair past 448: clamp, never NaN.
        codes = (xg * inv).clamp_(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
        return as_bytes(merge_groups(codes, d)), as_bytes(scale)

    def decode(self, parts: Sequence[torch.Tensor], shape: Shape, dtype: torch.dtype) -> torch.Tensor:
        h, t, d = shape
        codes = parts[0].view(torch.float8_e4m3fn).view(shape).float()
        scale = parts[1].view(torch.float16).view(h, t, -(-d // self.group), 1).float()
        return merge_groups(split_groups(codes, self.group) * scale, d).to(dtype)
