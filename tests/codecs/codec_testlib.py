"""Helpers shared by the codec tests: devices, synthetic caches, a real English text."""

from __future__ import annotations

import pytest
import torch

DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.cuda])]

PROSE = (
    "The harbour town woke slowly in winter. Before dawn the fishing boats went out past the breakwater, "
    "their lamps swinging, and the gulls followed them in a loose grey cloud. By eight the bakery on the "
    "square had sold its first trays of bread, and the schoolchildren crossed the bridge in pairs, arguing "
    "about football and homework. The old ferry, repainted every spring and rusting again by autumn, made "
    "its first crossing at nine. Most mornings it carried a few farmers with crates of apples, a nurse "
    "going to the clinic on the island, and tourists who had misread the timetable. The captain, a quiet "
    "man who had worked the route for thirty years, knew the currents so well that he rarely looked at "
    "the instruments. In the afternoon the wind usually turned west and the water grew choppy. Shopkeepers "
    "pulled in their awnings, the cafe moved its chairs indoors, and the library filled with retired "
    "teachers reading newspapers from the capital. When storms came in from the Atlantic, the town closed "
    "its shutters and waited. The lighthouse keeper, who was no longer needed since the light had been "
    "automated, still climbed the stairs each evening out of habit, to check that the lamp turned and the "
    "glass was clean. People said the town had not changed in a hundred years, but that was not quite "
    "true. The cannery had closed, the railway station had become a museum, and half of the houses on "
    "the hill now belonged to people from the city who came only in August. Still, the rhythm of the "
    "days was the same: boats out at dawn, bread at eight, the ferry at nine, and the long quiet evening."
)


def make_cache(
    n_layers: int = 2,
    kv_heads: int = 3,
    tokens: int = 70,
    head_dim: int = 64,
    dtype: torch.dtype = torch.float16,
    device: str = "cpu",
    seed: int = 0,
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Gaussian KV with a few outlier key channels, like real post-RoPE keys."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n_layers):
        k = torch.randn(kv_heads, tokens, head_dim, generator=gen)
        k[..., :2] *= 8.0
        v = torch.randn(kv_heads, tokens, head_dim, generator=gen)
        out.append((k.to(device=device, dtype=dtype), v.to(device=device, dtype=dtype)))
    return out


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| in float64."""
    a, b = a.double().cpu(), b.double().cpu()
    return float((a - b).norm() / b.norm())
