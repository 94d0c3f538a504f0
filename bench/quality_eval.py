"""The quality protocol: windows of real text, a prefilled cache, and a continuation scored on it.

Per window of ``ctx + eval`` tokens: the model prefills the first ``ctx - 1`` tokens; that cache is
what a worker hands to the store (the last context token is the first input of the next forward
pass, as the newest token of a turn is). The continuation pass feeds tokens ``ctx - 1 .. ctx +
eval - 2`` teacher-forced on top of a cache and yields ``eval`` next-token distributions, the
prediction of the first continuation token included. The reference pass reads the cache as an
FP16 KV store holds it (the model's activations rounded to fp16: every ratio is against FP16, so
fp16 and the bit-exact tier score KL 0 by construction); every config's pass reads the cache it
restored. Evicted caches are handed to the model as kept tokens only with explicit positions
(keys carry RoPE already), which is how a serving engine continues from them.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from deltastore.errors import InvalidArgument

__all__ = [
    "KVLayers",
    "Window",
    "continuation_logprobs",
    "doc_windows",
    "kl_top1",
    "make_windows",
    "prefill",
    "to_hf_cache",
]

KVLayers = list[tuple[torch.Tensor, torch.Tensor]]
"""Per layer (K, V), each (kv_heads, tokens, head_dim)."""


@dataclass
class Window:
    """One window of text and what its reference pass produced.

    Attributes:
        ids: (1, ctx + eval) token ids.
        ctx: context length; the stored cache holds ``ctx - 1`` tokens.
        layers: the stored cache, fp16, per layer (kv_heads, ctx - 1, head_dim).
        ref_logprobs: (eval, vocab) float32 log-probabilities of the reference pass.
        prefill_s: seconds of the plain prefill (the time reference of this run).
        scores: eviction scores by ``quality_configs.score_key`` (source and segment size), each a
            list over layers of (kv_heads, ctx - 1).
        pruned: caches that peers pruned during the prefill, by row name.
        doc / kind: the corpus document and its kind ("prose", "docs", "code", "chat"); empty
            for a single ``--text``.
    """

    ids: torch.Tensor
    ctx: int
    doc: str = ""
    kind: str = ""
    layers: KVLayers = field(default_factory=list)
    ref_logprobs: torch.Tensor | None = None
    prefill_s: float = 0.0
    scores: dict[str, list[torch.Tensor]] = field(default_factory=dict)
    pruned: dict[str, KVLayers] = field(default_factory=dict)

    @property
    def n_cached(self) -> int:
        return self.ctx - 1

    @property
    def context_ids(self) -> torch.Tensor:
        return self.ids[:, : self.n_cached]

    @property
    def continuation_ids(self) -> torch.Tensor:
        return self.ids[:, self.n_cached : -1]


def make_windows(token_ids: Sequence[int], n: int, ctx: int, eval_len: int, seed: int) -> list[torch.Tensor]:
    """``n`` non-overlapping windows of ``ctx + eval_len`` tokens from different places of the text.

    The text is cut into ``n`` equal strata and each window starts at a seeded random offset in
    its stratum, so windows cover the whole text and a run is reproducible.
    """
    length = ctx + eval_len
    if ctx < 2 or eval_len < 1 or n < 1:
        raise InvalidArgument(f"need ctx >= 2, eval >= 1, windows >= 1 (got {ctx}, {eval_len}, {n})")
    stride = len(token_ids) // n
    if stride < length:
        raise InvalidArgument(
            f"the text has {len(token_ids)} tokens: too short for {n} windows of {length}",
            hint="pass a longer --text or fewer --windows",
        )
    rng = random.Random(seed)
    starts = [i * stride + rng.randrange(stride - length + 1) for i in range(n)]
    return [torch.tensor([token_ids[s : s + length]], dtype=torch.long) for s in starts]


def doc_windows(n_tokens: int, ctx: int, eval_len: int, per_doc: int) -> list[int]:
    """Start offsets of up to ``per_doc`` non-overlapping windows of ``ctx + eval_len`` tokens in a
    document of ``n_tokens``, spread evenly from its start (no seed: the split is fixed)."""
    length = ctx + eval_len
    fit = min(n_tokens // length, per_doc)
    if fit < 1:
        return []
    gap = (n_tokens - fit * length) // fit
    return [i * (length + gap) for i in range(fit)]


def cache_layers(past_key_values: object) -> KVLayers:
    """An HF cache -> per layer (K, V), each (kv_heads, tokens, head_dim) rounded to fp16."""
    return [(layer.keys[0].half(), layer.values[0].half()) for layer in past_key_values.layers]


def to_hf_cache(layers: KVLayers, dtype: torch.dtype, device: torch.device | str) -> object:
    """Per layer (K, V) of kept tokens -> a transformers ``DynamicCache``."""
    from transformers import DynamicCache

    cache = DynamicCache()
    for i, (k, v) in enumerate(layers):
        cache.update(k[None].to(device=device, dtype=dtype), v[None].to(device=device, dtype=dtype), i)
    return cache


@torch.no_grad()
def prefill(model: object, window: Window) -> object:
    """Prefill the window's context; fills ``window.layers`` and returns the HF cache."""
    out = model(input_ids=window.context_ids.to(model.device), use_cache=True)
    window.layers = cache_layers(out.past_key_values)
    return out.past_key_values


@torch.no_grad()
def continuation_logprobs(model: object, window: Window, layers: KVLayers) -> torch.Tensor:
    """Teacher-forced continuation on a cache of kept tokens; returns (eval, vocab) float32 log-probs.

    ``layers`` may hold fewer tokens than ``ctx - 1`` (eviction, same count in every layer); new
    tokens still get positions from ``ctx - 1`` on, as the engine would give them.
    """
    kept = {k.shape[1] for k, _ in layers}
    if len(kept) != 1:
        raise InvalidArgument(f"every layer must keep the same number of tokens, got {sorted(kept)}")
    past = kept.pop()
    ids = window.continuation_ids.to(model.device)
    n = ids.shape[1]
    cache = to_hf_cache(layers, model.dtype, model.device)
    positions = torch.arange(window.n_cached, window.n_cached + n, device=model.device)
    out = model(
        input_ids=ids,
        past_key_values=cache,
        position_ids=positions[None],
        cache_position=torch.arange(past, past + n, device=model.device),
        use_cache=True,
    )
    return torch.log_softmax(out.logits[0].float(), dim=-1)


def kl_top1(ref: torch.Tensor, cfg: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per position KL(p_ref || p_cfg) in nats and top-1 agreement, from (positions, vocab) log-probs."""
    kl = (ref.exp() * (ref - cfg)).sum(dim=-1).clamp(min=0.0)
    top1 = (ref.argmax(dim=-1) == cfg.argmax(dim=-1)).float()
    return kl, top1
