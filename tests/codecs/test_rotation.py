"""The signed Walsh-Hadamard rotation: orthogonal, exactly inverted, spreads outliers."""

from __future__ import annotations

import pytest
import torch
from codec_testlib import DEVICES

from deltastore.codecs.rotation import hadamard, rotate, unrotate
from deltastore.errors import CodecError


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dim", [1, 2, 8, 64, 128, 256])
def test_orthogonal_and_inverse(dim: int, device: str) -> None:
    r = hadamard(dim, torch.device(device)).double()
    assert torch.allclose(r @ r.T, torch.eye(dim, dtype=torch.float64, device=device), atol=1e-6)
    x = torch.randn(3, 17, dim, device=device)
    assert torch.allclose(unrotate(rotate(x)), x, atol=1e-5)
    assert torch.allclose(rotate(x).norm(dim=-1), x.norm(dim=-1), rtol=1e-5)


def test_signs_are_seeded_and_not_trivial() -> None:
    r = hadamard(64, torch.device("cpu"))
    assert torch.equal(r, hadamard.__wrapped__(64, torch.device("cpu")))  # same in every process
    assert (r[:, 0] < 0).any() and (r[:, 0] > 0).any()


def test_outlier_channel_is_spread() -> None:
    x = torch.zeros(1, 1, 128)
    x[..., 5] = 100.0
    y = rotate(x)
    assert torch.allclose(y.abs(), torch.full_like(y, 100.0 / 128**0.5), rtol=1e-5)


@pytest.mark.parametrize("dim", [0, 3, 96])
def test_non_power_of_two_rejected(dim: int) -> None:
    with pytest.raises(CodecError, match="power-of-two"):
        hadamard(dim, torch.device("cpu"))
