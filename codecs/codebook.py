"""Non-uniform code levels (spec option ``nf``): Lloyd-Max levels fitted to rotated KV.

After the Hadamard rotation keys and values are bell-shaped within a group, so uniform levels
between the group's min and max spend most codes on the sparse tails. With ``nf`` a ``b``-bit
code indexes a fixed table of ``2**b`` levels on ``[0, 2**b - 1]`` (the uniform codes' range):
decode is ``zero + scale * LEVELS[code]`` instead of ``zero + scale * code``; the stored scale and
zero-point are unchanged (``params.py``), so the parameter bytes are too. The levels are free in
that range: the ends sit inside it (2-bit: at 0.17 and 0.83 of the group's range), so a group's
min and max are rounded in like any other element: in code units the error is at most the larger
of half the widest gap between neighbouring levels and the distance from an end of the range to
its nearest level, times ``scale``: 0.50-0.51 at 2 bits, 0.55-0.56 at 3 and 0.69-0.71 at 4, against
0.5 for uniform codes (the wider outer gaps of 4-bit tables trade the rare extremes for the
bulk). Against uniform
levels the fit's weighted squared error on its samples is 0.56 (2-bit), 0.78 (3-bit) and 0.85
(4-bit) times as large.

Levels were fitted by ``python -m deltastore.bench.quality_codebook`` (weighted Lloyd-Max on the
normalized positions of real SmolLM2-135M keys (per channel along 64 tokens) and values (per token
along 64 dims), rotated, from 6 windows of the *tuning* split of the shipped corpus only, 4M
samples per table). They are part of the
format: changing them changes what stored ``nf`` blocks decode to (never edit; add a new option).
8-bit codes (``k8``, hp<N>) stay uniform.
"""

from __future__ import annotations

import functools

import torch

__all__ = ["NF_BITS", "NF_LEVELS", "code_levels", "nearest_code"]

NF_LEVELS: dict[tuple[str, int], tuple[float, ...]] = {
    # (tensor kind, bits) -> levels on [0, 1] (of the group's range); times 2**bits - 1 on use
    ("k", 2): (0.166114, 0.398822, 0.601456, 0.834244),
    ("k", 3): (0.061002, 0.217633, 0.339339, 0.447861, 0.552736, 0.661357, 0.783197, 0.93948),
    ("k", 4): (
        0.015325,
        0.107366,
        0.182073,
        0.247568,
        0.307722,
        0.36462,
        0.419417,
        0.473199,
        0.526446,
        0.580101,
        0.634869,
        0.69163,
        0.751715,
        0.817327,
        0.892257,
        0.984596,
    ),
    ("v", 2): (0.168305, 0.400823, 0.599237, 0.831391),
    ("v", 3): (0.060013, 0.220957, 0.342707, 0.449625, 0.552664, 0.659536, 0.7807, 0.940557),
    ("v", 4): (
        0.01459,
        0.109063,
        0.185603,
        0.251455,
        0.31133,
        0.367473,
        0.421323,
        0.474135,
        0.52657,
        0.57939,
        0.633171,
        0.689073,
        0.748793,
        0.814444,
        0.890214,
        0.985034,
    ),
}
NF_BITS = (2, 3, 4)
"""Code widths that have ``nf`` tables."""


@functools.lru_cache(maxsize=32)
def code_levels(kind: str, bits: int, device: torch.device) -> torch.Tensor:
    """(2**bits,) float32 levels on ``[0, 2**bits - 1]`` on ``device`` (made once per device)."""
    top = (1 << bits) - 1
    return torch.tensor([x * top for x in NF_LEVELS[(kind, bits)]], dtype=torch.float32, device=device)


@functools.lru_cache(maxsize=32)
def _midpoints(kind: str, bits: int, device: torch.device) -> torch.Tensor:
    levels = code_levels(kind, bits, device)
    return ((levels[1:] + levels[:-1]) / 2).contiguous()


def nearest_code(y: torch.Tensor, kind: str, bits: int) -> torch.Tensor:
    """uint8 index of the level nearest each ``y`` (in code units, ``(x - zero) / scale``); ties
    go to the lower level, values beyond the ends to the end levels."""
    return torch.bucketize(y, _midpoints(kind, bits, y.device)).to(torch.uint8)
