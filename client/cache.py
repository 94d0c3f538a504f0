"""KV caches in and out of the codec's layout: HF ``DynamicCache`` or per-layer ``(K, V)`` tensors.

The codec works on a list over layers of ``(K, V)``, each ``(kv_heads, tokens, head_dim)``.
HF caches carry a leading batch dimension: ``(1, kv_heads, tokens, head_dim)``. Nothing here
copies tensors or moves them between devices except :func:`to_dynamic_cache`'s batch view.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from deltastore.errors import InvalidArgument

if TYPE_CHECKING:
    import torch

__all__ = ["KVLayers", "as_layers", "cache_tokens", "slice_layers", "to_dynamic_cache"]

KVLayers = list[tuple["torch.Tensor", "torch.Tensor"]]
"""A cache as a list over layers of ``(K, V)``, each ``(kv_heads, tokens, head_dim)``."""


def as_layers(cache: Any) -> KVLayers:
    """Per-layer ``(K, V)`` of an HF ``DynamicCache`` (transformers >= 4.56) or a list of pairs.

    Args:
        cache: a ``DynamicCache`` (``cache.layers[i].keys/.values``), or a sequence of ``(K, V)``
            with K and V ``(kv_heads, tokens, head_dim)`` or ``(1, kv_heads, tokens, head_dim)``.

    Returns:
        ``[(K, V), ...]`` with the batch dimension removed (views, no copy).
    """
    if hasattr(cache, "layers") and not isinstance(cache, list | tuple):
        pairs = [(layer.keys, layer.values) for layer in cache.layers]
    elif isinstance(cache, list | tuple):
        pairs = [tuple(pair) for pair in cache]
    else:
        raise InvalidArgument(
            f"expected a DynamicCache or a list of (K, V) tensors, got {type(cache).__name__}"
        )
    if not pairs:
        raise InvalidArgument("the cache has no layers")
    layers: KVLayers = []
    for i, pair in enumerate(pairs):
        if len(pair) != 2 or pair[0] is None or pair[1] is None:
            raise InvalidArgument(f"layer {i}: expected a (K, V) pair of tensors")
        k, v = (_squeeze_batch(t, i) for t in pair)
        if k.shape[:2] != v.shape[:2]:
            raise InvalidArgument(
                f"layer {i}: K {tuple(k.shape)} and V {tuple(v.shape)} disagree on heads/tokens"
            )
        layers.append((k, v))
    n = cache_tokens(layers)
    for i, (k, _) in enumerate(layers):
        if k.shape[1] != n:
            raise InvalidArgument(f"layer {i} holds {k.shape[1]} tokens, layer 0 holds {n}")
    return layers


def _squeeze_batch(t: torch.Tensor, layer: int) -> torch.Tensor:
    if t.dim() == 4:
        if t.shape[0] != 1:
            raise InvalidArgument(f"layer {layer}: batch size {t.shape[0]}; store one sequence per snapshot")
        return t[0]
    if t.dim() != 3:
        raise InvalidArgument(
            f"layer {layer}: expected (kv_heads, tokens, head_dim), got shape {tuple(t.shape)}"
        )
    return t


def cache_tokens(layers: KVLayers) -> int:
    """Tokens held by the cache (the sequence dimension of layer 0)."""
    return int(layers[0][0].shape[1])


def slice_layers(layers: KVLayers, start: int, end: int) -> KVLayers:
    """Tokens ``[start, end)`` of every layer (views)."""
    return [(k[:, start:end], v[:, start:end]) for k, v in layers]


def to_dynamic_cache(layers: Sequence[tuple[torch.Tensor, torch.Tensor]], config: Any = None) -> Any:
    """An HF ``DynamicCache`` holding ``layers`` (a batch dimension of 1 is added).

    Args:
        layers: ``[(K, V), ...]`` each ``(kv_heads, tokens, head_dim)``.
        config: the model's config, so the cache gets the model's layer types (sliding windows).
    """
    from transformers import DynamicCache

    cache = DynamicCache(config=config) if config is not None else DynamicCache()
    for i, (k, v) in enumerate(layers):
        cache.update(k.unsqueeze(0), v.unsqueeze(0), i)
    return cache
