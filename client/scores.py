"""Token importance for KV eviction, captured from the engine's own attention at prefill.

SnapKV (Li et al. 2024) showed that the attention the last prompt queries (the *observation
window*) pay to each earlier token predicts which tokens later queries will need. This module
hooks the attention modules of an HF causal LM during one prefill forward pass, recomputes that
window's attention from the hooked query states and the cached (post-RoPE) keys, and returns a
score per KV head and token, ready for ``deltastore.codecs.encode_block(..., scores=...)``.

Why recompute instead of ``output_attentions``: SDPA and flash attention return no weights, and
eager attention for the whole prompt costs a (heads, T, T) matrix; the window needs only
(heads, W, T) per segment, computed in chunks.

Dedup safety: a prefix block shared by many sessions must be evicted the same way whoever stores
it, so its scores may only depend on the block's own prefix. ``segment_ends`` gives each segment
its own observation window (its last ``window`` queries, attending to keys before the segment's
end); with segments = the store's aligned blocks, the scores of a block depend on nothing after
it. One segment ending at the prompt's end is classic (not dedup-safe) SnapKV.

Look-ahead queries: inside a block, a causal window scores early tokens by many queries and late
tokens by few (the last token only by itself), so the scores say more about position than about
importance. With ``lookahead`` set, the window's query vectors are rotated to positions just past
the segment (``end + lookahead + j``), as the queries of a continuation will be, and attend to
every key of the prefix: each token of the block is scored by all of them, at the distances later
queries will read it from. Still a function of the prefix alone. On SmolLM2 it cut the KL of
dedup-safe ``keep<P>`` eviction by a third to a half against the causal window
(docs/results/quality_levers.md).
"""

from __future__ import annotations

import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F

from deltastore.errors import InvalidArgument

__all__ = [
    "DEFAULT_LOOKAHEAD",
    "DEFAULT_POOL",
    "DEFAULT_WINDOW",
    "SNAPKV",
    "ScoreCapture",
    "capture_scores",
    "decoder_layers",
    "rotary_embedding",
    "segment_ends_for_blocks",
]


def segment_ends_for_blocks(n_tokens: int, block_size: int) -> list[int]:
    """Ends of the store's segments of a prompt of ``n_tokens``: aligned blocks, then the tail."""
    if block_size < 1 or n_tokens < 1:
        raise InvalidArgument(f"need n_tokens >= 1 and block_size >= 1, got {n_tokens}, {block_size}")
    ends = list(range(block_size, n_tokens + 1, block_size))
    if not ends or ends[-1] != n_tokens:
        ends.append(n_tokens)
    return ends


DEFAULT_WINDOW = 128
DEFAULT_LOOKAHEAD = 64
DEFAULT_POOL = 1
"""Defaults: 128 look-ahead queries rotated 64 positions past the segment, no pooling. On SmolLM2 in
64-token blocks this beat the causal SnapKV window (64 queries, pooled over 5) at every budget
measured; pooling over 3 or 5 tokens undid a third of the gain (docs/results/quality_levers.md)."""

SNAPKV = {"window": 64, "pool": 5, "lookahead": None}
"""Classic SnapKV settings (Li et al. 2024): a causal window of 64 queries, pooled over 5 tokens."""


@dataclass
class ScoreCapture:
    """Forward hooks that compute observation-window scores per layer during a prefill.

    Attributes:
        window: observation-window length W in queries (SnapKV uses 32-64). With look-ahead the
            window may reach back before the segment's start.
        segment_ends: exclusive end positions of the segments, ascending, the last one equal to
            the prompt length (None: one segment, the whole prompt).
        pool: width of the average pooling over tokens (SnapKV: neighbours of an important
            token are kept with it); 1 disables it.
        lookahead: None: causal window (queries at their own positions). An int: the window's
            queries are rotated to positions ``end + lookahead + j`` and see every key before
            the segment's end (see the module docstring).
        scores: filled by the hooks, per layer index a (kv_heads, tokens) float32 tensor.
    """

    window: int = DEFAULT_WINDOW
    segment_ends: Sequence[int] | None = None
    pool: int = DEFAULT_POOL
    lookahead: int | None = DEFAULT_LOOKAHEAD
    scores: dict[int, torch.Tensor] = field(default_factory=dict)
    _rotary: Any = field(default=None, init=False, repr=False)
    _queries: dict[int, torch.Tensor] = field(default_factory=dict, init=False, repr=False)
    _rope: dict[tuple[Any, ...], Any] = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.window < 1:
            raise InvalidArgument(f"observation window must be >= 1 query, got {self.window}")
        if self.pool < 1 or self.pool % 2 == 0:
            raise InvalidArgument(f"pool width must be odd and >= 1, got {self.pool}")
        if self.lookahead is not None and self.lookahead < 0:
            raise InvalidArgument(f"lookahead must be >= 0 positions, got {self.lookahead}")

    @contextmanager
    def attach(self, model: Any) -> Iterator[ScoreCapture]:
        """Hook every attention module of ``model`` for the duration of the block."""
        if self.lookahead is not None:
            self._rotary = rotary_embedding(model)
        hooks = []
        for layer in decoder_layers(model):
            attn = layer.self_attn
            hooks.append(attn.register_forward_hook(self._hook, with_kwargs=True))
            if hasattr(attn, "q_proj"):  # the window's query projections come from the forward itself
                hooks.append(attn.q_proj.register_forward_hook(partial(self._keep_queries, attn.layer_idx)))
        try:
            yield self
        finally:
            for hook in hooks:
                hook.remove()
            self._rope.clear()

    def layer_scores(self, n_layers: int) -> list[torch.Tensor]:
        """Scores of every layer, in layer order; raises if a layer was not captured."""
        missing = [i for i in range(n_layers) if i not in self.scores]
        if missing:
            raise InvalidArgument(f"no attention scores captured for layers {missing[:5]}")
        return [self.scores[i] for i in range(n_layers)]

    def _keep_queries(self, layer_idx: int, _module: Any, _args: tuple, output: torch.Tensor) -> None:
        self._queries[layer_idx] = output

    def _hook(self, module: Any, args: tuple, kwargs: dict, output: Any) -> None:
        hidden = kwargs.get("hidden_states", args[0] if args else None)
        cache = kwargs.get("past_key_values")
        cos, sin = kwargs["position_embeddings"]
        if hidden is None or cache is None:
            raise InvalidArgument("score capture needs use_cache=True and a decoder with RoPE embeddings")
        keys = cache.layers[module.layer_idx].keys  # (1, kv_heads, T, head_dim), post-RoPE
        n = hidden.shape[1]
        if keys.shape[-2] != n:
            raise InvalidArgument("score capture runs on a fresh prefill (an empty cache before the call)")
        ends = list(self.segment_ends) if self.segment_ends is not None else [n]
        if not ends or ends[-1] != n or any(b <= a for a, b in zip([0, *ends], ends, strict=False)):
            raise InvalidArgument(
                f"segment ends must ascend and end at the prompt length {n}, got {ends[:8]}"
            )
        queries = self._queries.pop(module.layer_idx, None)
        if queries is None or queries.shape[:2] != hidden.shape[:2]:
            queries = None  # not hooked (or not this call's): project again
        with torch.no_grad():
            self.scores[module.layer_idx] = _window_scores(
                module, hidden, queries, keys, cos, sin, ends, self
            )


def _window_scores(
    module: Any,
    hidden: torch.Tensor,
    queries: torch.Tensor | None,
    keys: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    ends: list[int],
    cfg: ScoreCapture,
) -> torch.Tensor:
    """Per segment, mean attention of its W window queries to each of its tokens.

    Args:
        hidden: (1, T, hidden) input of the attention module.
        queries: (1, T, heads * head_dim) its ``q_proj`` output, as the forward computed it (None:
            projected here from ``hidden``).
        keys: (1, kv_heads, T, head_dim) cached keys after RoPE.
        cos, sin: (1, T, head_dim) rotary tables of the prompt positions.
    Returns:
        (kv_heads, T) float32: a token's attention averaged over the window queries that see it
        (causal: those at or after it; look-ahead: all of them), pooled over ``cfg.pool`` tokens,
        averaged over the query heads of its group.
    """
    rope = sys.modules[type(module).__module__].apply_rotary_pos_emb
    _, kv_heads, n, head_dim = keys.shape
    groups = module.config.num_attention_heads // kv_heads
    norm = getattr(module, "q_norm", None)  # query norm before RoPE, per head or over all heads
    weight = getattr(norm, "weight", None)
    norm_all_heads = weight is not None and weight.shape[-1] == module.config.num_attention_heads * head_dim
    out = torch.empty(kv_heads, n, dtype=torch.float32, device=keys.device)
    start = 0
    for end in ends:
        q0 = max(0, end - cfg.window) if cfg.lookahead is not None else max(start, end - cfg.window)
        w = end - q0
        q = queries[:, q0:end] if queries is not None else module.q_proj(hidden[:, q0:end])
        if norm is not None and norm_all_heads:  # OLMo2
            q = norm(q)
        q = q.view(1, w, -1, head_dim).transpose(1, 2)
        if norm is not None and not norm_all_heads:  # Qwen3/Gemma3: per head
            q = norm(q)
        if cfg.lookahead is None:
            q, _ = rope(q, q, cos[:, q0:end], sin[:, q0:end])
        else:
            # the same positions for every layer (of one RoPE type): their tables are computed once
            key = (end, w, getattr(module, "layer_type", None), q.dtype, q.device)
            if key not in cfg._rope:
                ahead = torch.arange(w, device=keys.device) + end + cfg.lookahead
                cfg._rope[key] = _rope_tables(cfg._rotary, module, q, ahead[None])
            q, _ = rope(q, q, *cfg._rope[key])
        k = keys[0, :, :end].float()  # (kv_heads, end, d)
        q = q[0].float().view(kv_heads, groups, w, head_dim)
        logits = torch.einsum("hgqd,htd->hgqt", q, k) * module.scaling
        if cfg.lookahead is None:
            qpos = torch.arange(q0, end, device=keys.device)[:, None]
            visible = torch.arange(end, device=keys.device)[None, :] <= qpos  # (W, end)
            attn = logits.masked_fill(~visible, float("-inf")).softmax(dim=-1)
            seen_by: torch.Tensor | int = visible[:, start:end].sum(dim=0).clamp(min=1)
        else:
            attn = logits.softmax(dim=-1)
            seen_by = w
        seg = attn[..., start:end].sum(dim=2).mean(dim=1) / seen_by  # (kv_heads, seg_len)
        if cfg.pool > 1:
            seg = F.avg_pool1d(
                seg[:, None], cfg.pool, stride=1, padding=cfg.pool // 2, count_include_pad=False
            )[:, 0]
        out[:, start:end] = seg
        start = end
    return out


def _decoder(model: Any) -> Any:
    """The decoder stack of an HF causal LM (``model.model``, or a multimodal model's language model)."""
    base = getattr(model, "model", model)
    return getattr(base, "language_model", base)


def decoder_layers(model: Any) -> Sequence[Any]:
    """The decoder layers of an HF causal LM (each with ``self_attn``)."""
    layers = getattr(_decoder(model), "layers", None)
    if layers is None or not all(hasattr(layer, "self_attn") for layer in layers):
        raise InvalidArgument(f"{type(model).__name__}: no decoder layers with self_attn to hook")
    return layers


def _rope_tables(rotary: Any, module: Any, x: torch.Tensor, positions: torch.Tensor) -> Any:
    """(cos, sin) of ``positions`` for ``module``'s layer: models whose layer types have their own
    RoPE bases (Gemma3: sliding vs full attention) take the layer type as well."""
    layer_type = getattr(module, "layer_type", None)
    try:
        if layer_type is not None and hasattr(rotary, "layer_types"):
            return rotary(x, positions, layer_type)
        return rotary(x, positions)
    except (TypeError, AttributeError, KeyError) as exc:
        raise InvalidArgument(
            f"{type(rotary).__name__}: unsupported rotary embedding for look-ahead scores ({exc})",
            hint="pass lookahead=None (a causal window) for this model",
        ) from exc


def rotary_embedding(model: Any) -> Any:
    """The rotary embedding module of an HF causal LM: ``(x, position_ids) -> (cos, sin)``."""
    rotary = getattr(_decoder(model), "rotary_emb", None)
    if rotary is None:
        raise InvalidArgument(f"{type(model).__name__}: no rotary_emb module; look-ahead scores need RoPE")
    return rotary


def capture_scores(
    model: Any,
    input_ids: torch.Tensor,
    *,
    window: int = DEFAULT_WINDOW,
    segment_ends: Sequence[int] | None = None,
    pool: int = DEFAULT_POOL,
    lookahead: int | None = DEFAULT_LOOKAHEAD,
) -> tuple[Any, list[torch.Tensor]]:
    """Prefill ``input_ids`` (1, T) and return ``(past_key_values, scores)``.

    ``scores`` is a list over layers of (kv_heads, T) float32, higher = more important; slice it
    per block to pass to ``encode_block``.
    """
    if input_ids.dim() != 2 or input_ids.shape[0] != 1:
        raise InvalidArgument(f"input_ids must be (1, tokens), got {tuple(input_ids.shape)}")
    cap = ScoreCapture(window=window, segment_ends=segment_ends, pool=pool, lookahead=lookahead)
    with torch.no_grad(), cap.attach(model):
        out = model(input_ids=input_ids, use_cache=True)
    return out.past_key_values, cap.layer_scores(len(out.past_key_values.layers))
