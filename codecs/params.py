"""How integer quantization stores each group's scale and zero-point: fp16 pairs, or 8-bit codes.

fp16 (the default): ``zero = fp16(min)``, ``scale = fp16((max - zero) / levels)``, 4 bytes per
group: at group 64 that is 0.5 bit per element, about 12% of a 4-bit cache's bytes.

p8 (spec option): per head (the leading axis) a 16-byte grid header, four float32 values
``zero_min, zero_step, scale_base, table``, then one byte per group for the zero-point and one
for the scale:

- ``zero = zero_min + code * zero_step``, the code rounded *down* from the group's min, on a
  255-step grid over the head's range of group minima;
- ``scale = scale_base * 2 ** (code * step)``, the smallest grid scale at least
  ``(max - zero) / levels``; ``scale_base`` is the head's smallest such need and ``step`` the
  finest of 1/256 .. 1/4 octave whose 255 steps reach its largest. The powers of two are fixed
  tables, so the stored codes and values follow from exact lookups, multiplications and
  comparisons (a log2 only estimates the scale code; two comparisons settle it): a log2/exp2 per
  group differed by one ulp between batch sizes and devices. The rotation's matmul before
  quantization can still differ in the last bit between batch sizes, as it does without p8.

So every group's codes still span its ``[min, max]``: the per-element error stays at most
``scale / 2``, with the scale at most ``2 ** step`` times what fp16 would store, plus one zero
step. Measured on SmolLM2-135M (``k4v4-sink4-z-hp16-keep88-r16``, 8 windows): about 45% fewer
parameter bytes, ratio 3.96x -> 4.12x, mean KL 0.00165 -> 0.00173.
Groups needing less than ``_MIN_SCALE`` of the head's largest scale (constant groups among them)
get that floor.
"""

from __future__ import annotations

import functools

import torch

from deltastore.codecs.format import GRID_HEADER_NBYTES
from deltastore.errors import CodecError

__all__ = ["check_finite", "decode_params", "encode_params"]

_STEPS = 255
_SCALE_STEPS = tuple(2.0**-k for k in range(8, 1, -1))  # log2 steps of the scale tables: 1/256 .. 1/4
_MIN_SCALE = 2.0**-24  # relative to the head's largest scale: a floor for constant groups


def check_finite(x: torch.Tensor) -> None:
    """Raise CodecError unless every element of ``x`` (inputs or stored parameters) is finite."""
    if not bool(torch.isfinite(x).all()):
        raise CodecError(
            "cannot quantize non-finite values or values beyond the float16 range",
            hint="store this cache with the 'lossless' codec",
        )


def encode_params(
    lo: torch.Tensor, hi: torch.Tensor, levels: int, params8: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Choose each group's stored (scale, zero) from its float32 min and max.

    Args:
        lo, hi: float32 group minima and maxima, shape (heads, ...) (the group grid).
        levels: ``2**bits - 1``.
        params8: p8 codes instead of fp16 pairs.
    Returns:
        scale, zero: float32 of the grid's shape, exactly what :func:`decode_params` returns.
        stored: the flat uint8 bytes, head after head.
    Raises:
        CodecError: non-finite values, or parameters beyond the float16 range (fp16 pairs).
    """
    if not params8:
        zero = lo.to(torch.float16)
        scale = ((hi - zero.float()) / levels).to(torch.float16)
        pairs = torch.stack([scale, zero], dim=-1)
        check_finite(pairs)
        return scale.float(), zero.float(), pairs.contiguous().view(-1).view(torch.uint8)
    check_finite(lo)
    check_finite(hi)
    heads = lo.shape[0]
    if lo.numel() == 0:
        return lo, lo, torch.empty(0, dtype=torch.uint8, device=lo.device)
    per_head = (heads, -1)
    bcast = (heads,) + (1,) * (lo.dim() - 1)
    flat = lo.reshape(per_head)
    zero_min = flat.amin(dim=1)
    zero_step = (flat.amax(dim=1) - zero_min) / _STEPS
    steps = torch.where(zero_step > 0, zero_step, torch.ones_like(zero_step)).view(bcast)
    zero_code = torch.floor((lo - zero_min.view(bcast)) / steps).clamp_(0, _STEPS)
    zero_code = torch.where(zero_step.view(bcast) > 0, zero_code, torch.zeros_like(zero_code))
    zero = zero_min.view(bcast) + zero_code * zero_step.view(bcast)
    # float rounding may land a grid point above the group's min: one step down (code 0 is the min)
    zero_code = torch.where(zero > lo, (zero_code - 1).clamp_(min=0), zero_code)
    zero = zero_min.view(bcast) + zero_code * zero_step.view(bcast)
    need = ((hi - zero) / levels).clamp(min=0).reshape(per_head)
    top = need.amax(dim=1)
    floor = (top * _MIN_SCALE).clamp(min=torch.finfo(torch.float32).tiny)  # never 0, even for tiny heads
    base = torch.maximum(need.amin(dim=1), torch.where(top > 0, floor, torch.ones_like(top)))
    tables = _scale_tables(lo.device)
    reach = (top / base)[:, None] > tables[:, -1][None, :]  # (heads, tables): too coarse to reach
    table = reach.sum(dim=1).clamp_(max=len(_SCALE_STEPS) - 1)
    grid = tables[table] * base[:, None]  # (heads, 256), strictly ascending
    scale_code = _first_at_least(grid, need, base, table)
    header = torch.stack([zero_min, zero_step, base, table.float()], dim=1).contiguous()
    codes = torch.stack([zero_code.reshape(per_head), scale_code.float()], dim=1)
    header_bytes = header.view(-1).view(torch.uint8).view(heads, GRID_HEADER_NBYTES)
    stored = torch.cat([header_bytes, codes.to(torch.uint8).reshape(heads, -1)], dim=1)
    scale, zero = _from_codes(header, codes)
    check_finite(header)  # values near the float32 limit overflow the grids: refuse, as fp16 pairs do
    check_finite(scale)
    return scale.view(lo.shape), zero.view(lo.shape), stored.view(-1)


def _first_at_least(
    grid: torch.Tensor, need: torch.Tensor, base: torch.Tensor, table: torch.Tensor
) -> torch.Tensor:
    """Per row, the index of the first grid scale >= each need (255 where none is): what
    ``torch.searchsorted(grid, need)`` gives, at a fraction of its cost on CPU. log2 estimates
    the index to within one step; two exact comparisons settle it, so float error in the
    estimate never changes the result."""
    steps = _scale_steps(grid.device)[table]
    estimate = torch.ceil(torch.log2(need / base[:, None]) / steps[:, None])
    code = estimate.nan_to_num_(0.0).clamp_(0, _STEPS).long()
    code += (grid.gather(1, code) < need).long()  # one step short: up
    code.clamp_(max=_STEPS)
    below = (code - 1).clamp(min=0)
    code -= ((code > 0) & (grid.gather(1, below) >= need)).long()  # one step over: down
    return code


@functools.cache
def _scale_steps(device: torch.device) -> torch.Tensor:
    """``_SCALE_STEPS`` as a float32 tensor on ``device`` (made once: no host copy per call)."""
    return torch.tensor(_SCALE_STEPS, dtype=torch.float32, device=device)


@functools.cache
def _scale_tables(device: torch.device) -> torch.Tensor:
    """(tables, 256) float32: row j holds ``2 ** (i * _SCALE_STEPS[j])``, computed in Python."""
    rows = [[2.0 ** (i * step) for i in range(_STEPS + 1)] for step in _SCALE_STEPS]
    return torch.tensor(rows, dtype=torch.float32, device=device)


def _from_codes(header: torch.Tensor, codes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, zero) float32, each (heads, groups), from a (heads, 4) header and (heads, 2, groups)
    float32 codes. A hostile header's table index is clamped: garbage values, never an index error."""
    table = torch.nan_to_num(header[:, 3]).clamp(0, len(_SCALE_STEPS) - 1).long()
    grid = _scale_tables(header.device)[table] * header[:, 2:3]
    zero = header[:, 0:1] + codes[:, 0] * header[:, 1:2]
    return grid.gather(1, codes[:, 1].long()), zero


def decode_params(
    stored: torch.Tensor, grid: tuple[int, ...], params8: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse of :func:`encode_params`: flat uint8 ``stored`` -> (scale, zero) float32 of ``grid``."""
    if stored.storage_offset() % 4:  # a slice of a bigger buffer: realign before reinterpreting
        stored = stored.clone()
    if not params8:
        pairs = stored.view(torch.float16).view(*grid, 2).float()
        return pairs[..., 0], pairs[..., 1]
    heads = grid[0]
    if stored.numel() == 0:  # no groups: nothing stored
        empty = torch.empty(grid, dtype=torch.float32, device=stored.device)
        return empty, empty
    per_head = stored.view(heads, -1)
    # a copy: each head's bytes start 16 + 2 * groups apart, not always at a multiple of 4
    header = per_head[:, :GRID_HEADER_NBYTES].clone().view(-1).view(torch.float32).view(heads, 4)
    scale, zero = _from_codes(header, per_head[:, GRID_HEADER_NBYTES:].float().view(heads, 2, -1))
    return scale.view(grid), zero.view(grid)
