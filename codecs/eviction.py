"""Token eviction: which tokens of a block each KV head keeps.

Per layer and KV head, a block of ``n`` tokens keeps exactly ``spec.kept_tokens(n, start,
seq_end)`` tokens (see ``spec.py`` for the budget): always the sink (absolute positions below
``spec.eviction_sink``) and the recent window (pe/adapt: the last ``spec.recent`` tokens of the
block; keep<P>: absolute positions >= ``seq_end - spec.recent``, the sequence's last tokens as
known when the segment is sealed); for ``pe<X>`` also the first ``ceil(n * X / 100)`` tokens; the
rest of the budget goes to the highest scores.

Scores are importance, higher = keep: the engine's attention mass from an observation window
(SnapKV, Li et al. 2024; H2O) when given, else the key-norm proxy ``-||k||_2`` (tokens with small
key norms draw the most attention: Devoto et al. 2024, kvpress ``KnormPress``).

lo<L> demotes, of the kept tokens, the lowest-scored to 2 bits (:func:`low_slots`): the same
ranking decides both, so a token is demoted before it is dropped.

Evicted tokens are absent from the decoded block: ``DecodedBlock.layers`` holds only kept
tokens, in position order, and ``positions`` their absolute positions. A caller rebuilding an HF
cache uses the kept tensors as they are and continues generating at position ``n_tokens``
(RoPE was applied before caching, so kept keys stay valid).
"""

from __future__ import annotations

import math

import torch

from deltastore.codecs.spec import CodecSpec
from deltastore.errors import CodecError

__all__ = ["gather_tokens", "importance", "keep_indices", "low_slots", "mask_from_indices"]


def importance(
    keys: torch.Tensor,
    spec: CodecSpec,
    start: int,
    scores: torch.Tensor | None = None,
    seq_end: int | None = None,
) -> torch.Tensor:
    """(kv_heads, n_tokens) float32 importance, +inf where eviction must keep the token.

    Args:
        keys: (kv_heads, n_tokens, head_dim), used for the key-norm proxy when ``scores`` is None.
        spec: a spec with eviction.
        start: absolute position of the block's first token.
        scores: optional (kv_heads, n_tokens) importance; NaN counts as least important, +inf as
            the highest finite score (only forced tokens rank +inf, whatever a caller sends).
        seq_end: absolute end of the sequence (keep<P>'s recent window; None: the block's end).
    """
    h, n, _ = keys.shape
    if scores is None:
        score = -torch.linalg.vector_norm(keys.float(), dim=-1)
    else:
        if tuple(scores.shape) != (h, n):
            raise CodecError(
                f"scores have shape {tuple(scores.shape)}, expected (kv_heads, tokens) = {(h, n)}"
            )
        score = torch.nan_to_num(scores.to(device=keys.device, dtype=torch.float32), nan=-torch.inf)
        score = score.clone()
    prefix, tail = spec.forced_range(n, start, seq_end)
    score[:, :prefix] = torch.inf
    score[:, tail:] = torch.inf
    return score


def keep_indices(score: torch.Tensor, kept: int) -> torch.Tensor:
    """Kept token indices per head, ascending: (kv_heads, kept) int64, the ``kept`` highest of
    :func:`importance`'s ``score`` (``spec.kept_tokens(n_tokens, start, seq_end)``)."""
    h, n = score.shape
    if kept == n:
        return torch.arange(n, device=score.device).expand(h, n)
    return torch.topk(score, kept, dim=-1, sorted=False).indices.sort(dim=-1).values


def low_slots(score: torch.Tensor, idx: torch.Tensor, low: int) -> torch.Tensor:
    """lo<L>: (kv_heads, kept) bool, set on the ``low`` lowest-``score`` kept tokens of each head.

    score: :func:`importance` of the block; idx: :func:`keep_indices`. Forced tokens (+inf) are
    never picked while ``low`` is at most the kept tokens that are not forced (the spec's count).
    """
    slots = torch.zeros(idx.shape, dtype=torch.bool, device=idx.device)
    if low:
        lowest = torch.topk(score.gather(1, idx), low, dim=-1, largest=False, sorted=False).indices
        slots.scatter_(1, lowest, True)
    return slots


def gather_tokens(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """x: (..., n_tokens, head_dim), idx: (..., k) token indices per row -> (..., k, head_dim).

    Whole head_dim rows through one index_select: on CPU several times faster than a gather or
    scatter with the index expanded over head_dim."""
    *lead, n, d = x.shape
    base = torch.arange(math.prod(lead), device=idx.device).view(*lead, 1) * n
    return x.reshape(-1, d).index_select(0, (idx + base).view(-1)).view(*lead, idx.shape[-1], d)


def mask_from_indices(idx: torch.Tensor, n_tokens: int) -> torch.Tensor:
    """(kv_heads, kept) indices -> (kv_heads, n_tokens) bool keep mask."""
    mask = torch.zeros(idx.shape[0], n_tokens, dtype=torch.bool, device=idx.device)
    return mask.scatter_(1, idx, True)
