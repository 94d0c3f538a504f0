"""Orthogonal rotation of keys before quantization: a sign-randomized, normalized Walsh-Hadamard.

Keys carry a few outlier channels; rotating spreads each outlier over every channel, so a
per-group min/max range fits the bulk of the values (QuaRot, Ashkboos et al. 2024; QuIP#).
``R = diag(s) @ H / sqrt(d)`` with ``H`` the Sylvester Hadamard matrix and ``s`` fixed +-1 signs
(seeded: part of the format, so every process rotates the same way). ``R`` is orthogonal:
unrotate is ``y @ R.T``, exact up to float rounding.
"""

from __future__ import annotations

import functools

import torch

from deltastore.errors import CodecError

__all__ = ["SIGN_SEED", "hadamard", "rotate", "unrotate"]

SIGN_SEED = 0x5EED
"""Seed of the random signs. Changing it changes the format (bump FORMAT_VERSION)."""


@functools.lru_cache(maxsize=16)
def hadamard(dim: int, device: torch.device) -> torch.Tensor:
    """The (dim, dim) float32 rotation matrix ``diag(s) @ H / sqrt(dim)`` on ``device``.

    Raises:
        CodecError: ``dim`` is not a power of two.
    """
    if dim < 1 or dim & (dim - 1):
        raise CodecError(
            f"Hadamard rotation needs a power-of-two head_dim, got {dim}", hint="use option 'nr'"
        )
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < dim:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    h /= dim**0.5
    gen = torch.Generator().manual_seed(SIGN_SEED)
    signs = torch.randint(0, 2, (dim,), generator=gen, dtype=torch.float64) * 2 - 1
    return (signs[:, None] * h).to(device=device, dtype=torch.float32)


def rotate(x: torch.Tensor) -> torch.Tensor:
    """Rotate the last axis. x: (..., head_dim) float32 -> same shape, float32."""
    return x @ hadamard(x.shape[-1], x.device)


def unrotate(y: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`rotate`. y: (..., head_dim) float32 -> same shape, float32."""
    return y @ hadamard(y.shape[-1], y.device).T
