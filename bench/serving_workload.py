"""Synthetic multi-user, multi-turn chat workloads with honest, prefix-determined KV.

The KV of a token depends on every token before it, so the synthetic KV of token ``p`` is drawn
from a BLAKE3 extendable output seeded by a hash chain over tokens ``[0, p]``: identical prefixes
give bit-identical KV, any different earlier token gives different KV, in every process. The
values have the statistics that matter to the codecs (per-channel key offsets and scales with a
few outlier channels, near-Gaussian values, fp16), not those of a particular model.

A worker only generates the KV of the segments the store reports missing, as an inference engine
only hands over what it computed; the rest of its cache tensor is never touched (``torch.empty``
pages stay unallocated), so a 7B-shaped 4K-token cache costs memory only for its new tokens.
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Sequence
from typing import TYPE_CHECKING

import blake3

from deltastore.errors import InvalidArgument

if TYPE_CHECKING:
    import torch

__all__ = ["KVShape", "Scenario", "SyntheticKV", "TokenChain", "conversation_tokens"]

VOCAB = 49152
"""Token ids are drawn from SmolLM2's vocabulary size (any value works for addressing)."""

_CHAIN_SEED = b"deltastore/bench/serving/kv"
_OUTLIER_CHANNELS = 4  # per head: keys of real models carry a few large-magnitude channels


@dataclasses.dataclass(frozen=True)
class KVShape:
    """Per-token KV geometry: ``layers x 2 (K, V) x kv_heads x head_dim`` fp16 values."""

    layers: int = 32
    kv_heads: int = 8
    head_dim: int = 128

    @property
    def token_fp16_bytes(self) -> int:
        """FP16 bytes of one token's KV over all layers (7B shape: 128 KiB)."""
        return self.layers * 2 * self.kv_heads * self.head_dim * 2

    def label(self) -> str:
        return f"{self.layers}x{self.kv_heads}x{self.head_dim}"


@dataclasses.dataclass(frozen=True)
class Scenario:
    """One workload: ``users`` conversations sharing a ``prefix_tokens`` system prompt.

    Each conversation ends at ``context_tokens`` after ``turns`` turns; every turn after the first
    adds ``turn_tokens`` tokens (a user message plus the reply), so turn ``t`` holds
    ``context_tokens - (turns - 1 - t) * turn_tokens`` tokens. Every turn stays live.
    """

    name: str
    users: int
    prefix_tokens: int
    context_tokens: int
    codec: str
    turns: int = 4
    turn_tokens: int = 50
    shape: KVShape = KVShape()

    def __post_init__(self) -> None:
        if self.users < 1 or self.turns < 1 or self.turn_tokens < 1:
            raise InvalidArgument(f"scenario {self.name}: users, turns and turn_tokens must be >= 1")
        if self.turn_context(0) <= self.prefix_tokens:
            raise InvalidArgument(
                f"scenario {self.name}: the first turn ({self.turn_context(0)} tokens) must extend the "
                f"{self.prefix_tokens}-token shared prefix"
            )

    def turn_context(self, turn: int) -> int:
        """Tokens of the snapshot of ``turn``."""
        return self.context_tokens - (self.turns - 1 - turn) * self.turn_tokens

    @property
    def logical_tokens(self) -> int:
        """Tokens of every live snapshot, each counted as if stored alone."""
        return self.users * sum(self.turn_context(t) for t in range(self.turns))

    @property
    def unique_tokens(self) -> int:
        """Distinct token positions (distinct prefixes) over all users: what must be stored once."""
        return self.prefix_tokens + self.users * (self.context_tokens - self.prefix_tokens)

    def ratio_bound(self, codec_ratio: float) -> float:
        """The best effective ratio the arithmetic allows: codec ratio x logical / unique tokens."""
        return codec_ratio * self.logical_tokens / self.unique_tokens


def conversation_tokens(scenario: Scenario, user: int) -> list[int]:
    """The final token ids of one user's conversation: the shared prefix, then the user's own.

    The prefix is the same for every user of every scenario with that prefix length; the rest is
    seeded by the user index, so users never share anything past the prefix.
    """
    prefix = random.Random(f"prefix/{scenario.prefix_tokens}")
    own = random.Random(f"user/{scenario.name}/{user}")
    tokens = [prefix.randrange(VOCAB) for _ in range(scenario.prefix_tokens)]
    tokens += [own.randrange(VOCAB) for _ in range(scenario.context_tokens - scenario.prefix_tokens)]
    return tokens


class TokenChain:
    """Per-position 16-byte hashes of the prefixes ``tokens[: p + 1]``: the identity of token p's KV."""

    def __init__(self, tokens: Sequence[int]) -> None:
        h = blake3.blake3(_CHAIN_SEED).digest(16)
        out: list[bytes] = []
        for t in tokens:
            h = blake3.blake3(h + t.to_bytes(4, "little")).digest(16)
            out.append(h)
        self.hashes = out


class SyntheticKV:
    """Deterministic KV of a ``shape`` from token-prefix hashes, on ``device``.

    Statistics (fixed per shape by a seeded generator): keys = offset + scale * z per (layer,
    head, channel) with lognormal scales and ``_OUTLIER_CHANNELS`` channels per head 8x larger
    (the outlier channels real keys show); values = scale * z per (layer, head, channel) with
    milder spread; z ~ N(0, 1) from the hash stream through a 16-bit inverse-CDF table.
    """

    def __init__(self, shape: KVShape, device: str | torch.device = "cpu") -> None:
        import torch

        self.shape = shape
        self.device = torch.device(device)
        gen = torch.Generator().manual_seed(0x5EED)
        dims = (shape.layers, shape.kv_heads, shape.head_dim)
        k_scale = torch.exp(0.5 * torch.randn(dims, generator=gen))
        outliers = torch.rand(dims, generator=gen).argsort(dim=-1)[..., :_OUTLIER_CHANNELS]
        k_scale.scatter_(-1, outliers, k_scale.gather(-1, outliers) * 8.0)
        k_offset = 0.5 * k_scale * torch.randn(dims, generator=gen)
        v_scale = 0.5 * torch.exp(0.3 * torch.randn(dims, generator=gen))
        # (layers, 2, heads, dim): broadcast against (tokens, layers, 2, heads, dim)
        self._scale = torch.stack([k_scale, v_scale], dim=1).to(self.device)
        self._offset = torch.stack([k_offset, torch.zeros(dims)], dim=1).to(self.device)
        probs = (torch.arange(65536, dtype=torch.float64) + 0.5) / 65536
        self._icdf = torch.special.ndtri(probs).to(torch.float32).to(self.device)
        self._values_per_token = shape.layers * 2 * shape.kv_heads * shape.head_dim

    def tokens_kv(self, hashes: Sequence[bytes]) -> torch.Tensor:
        """KV of these token positions: ``(tokens, layers, 2, kv_heads, head_dim)`` fp16."""
        import torch

        n_bytes = 2 * self._values_per_token
        raw = bytearray(n_bytes * len(hashes))
        for i, h in enumerate(hashes):
            raw[i * n_bytes : (i + 1) * n_bytes] = blake3.blake3(h).digest(length=n_bytes)
        codes = torch.frombuffer(raw, dtype=torch.int16).to(self.device).to(torch.int32) + 32768
        z = self._icdf[codes].view(len(hashes), *self._scale.shape)
        return (self._offset + self._scale * z).to(torch.float16)

    def cache(self, chain: TokenChain, n_tokens: int, ranges: Sequence[tuple[int, int]]) -> list:
        """A cache of ``n_tokens`` tokens whose ``ranges`` ``[start, end)`` hold the true KV.

        Returns:
            ``[(K, V), ...]`` per layer, each ``(kv_heads, n_tokens, head_dim)`` fp16. Positions
            outside ``ranges`` are uninitialized: the caller encodes only the ranges it asked for.
        """
        import torch

        s = self.shape
        full = torch.empty(
            (s.layers, 2, s.kv_heads, n_tokens, s.head_dim), dtype=torch.float16, device=self.device
        )
        for start, end in ranges:
            if not 0 <= start < end <= n_tokens:
                raise InvalidArgument(f"range [{start}, {end}) outside a {n_tokens}-token cache")
            kv = self.tokens_kv(chain.hashes[start:end])  # (tokens, layers, 2, heads, dim)
            full[:, :, :, start:end, :] = kv.permute(1, 2, 3, 0, 4)
        return [(full[i, 0], full[i, 1]) for i in range(s.layers)]
