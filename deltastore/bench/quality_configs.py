"""What the quality benchmark compares: codec tiers, frontier experiments and peers.

Every config turns a window's stored cache into a restored cache of kept tokens and says how many
bytes it stored. Product rows (``CodecConfig``) go through ``encode_block``/``decode_block`` one
store segment at a time, exactly as the service stores them. Frontier rows (``EvictQuantConfig``)
try eviction budgets the codec's spec grammar cannot express yet: they choose the kept tokens
here, then store them with ``encode_block`` (no eviction in the spec) and add the keep mask's
bits, the same bytes the codec's MASK section would take.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch

from deltastore.bench.quality_eval import KVLayers, Window
from deltastore.codecs import CodecSpec, decode_block, encode_block
from deltastore.errors import InvalidArgument

__all__ = [
    "SCORE_SOURCES",
    "CodecConfig",
    "Config",
    "EvictQuantConfig",
    "Trial",
    "fp16_nbytes",
    "segments",
]

SCORE_SOURCES = {
    "block": "attention of each store block's own last queries (dedup-safe: depends only on the prefix)",
    "window": "attention of the prompt's last queries (SnapKV; a shared block would be evicted per session)",
    "knorm": "key-norm proxy, no queries needed (the codec's default when no scores are given)",
}


@dataclass(frozen=True)
class Trial:
    """One config on one window.

    Attributes:
        layers: restored cache, per layer (K, V) (kv_heads, kept, head_dim).
        nbytes: every byte stored for the window's cache.
        kept_fraction: kept tokens / cached tokens.
        encode_s / decode_s: seconds to encode / decode the whole cache (0 for peers that run inside
            the prefill).
    """

    layers: KVLayers
    nbytes: int
    kept_fraction: float
    encode_s: float
    decode_s: float


def fp16_nbytes(layers: KVLayers) -> int:
    """Bytes of the cache in FP16: the denominator of every ratio."""
    return sum(2 * (k.numel() + v.numel()) for k, v in layers)


def segments(n_tokens: int, block: int) -> list[tuple[int, int]]:
    """The store's segments of a cache: aligned blocks of ``block`` tokens, then the tail."""
    return [(s, min(s + block, n_tokens)) for s in range(0, n_tokens, block)]


def _slice(layers: KVLayers, s: int, e: int) -> KVLayers:
    return [(k[:, s:e], v[:, s:e]) for k, v in layers]


def _concat(blocks: list[KVLayers]) -> KVLayers:
    return [
        (torch.cat([b[i][0] for b in blocks], dim=1), torch.cat([b[i][1] for b in blocks], dim=1))
        for i in range(len(blocks[0]))
    ]


class Config:
    """A row of the benchmark. Subclasses implement :meth:`run`.

    Attributes:
        name: row label; spec: the spec string (or a peer's settings); group: "tier", "sweep",
        "frontier" or "peer"; scores: the score source it reads (see SCORE_SOURCES) or None.
    """

    name: str
    spec: str
    group: str
    scores: str | None = None

    def run(self, model: object, window: Window) -> Trial:
        raise NotImplementedError


@dataclass(frozen=True)
class CodecConfig(Config):
    """The product path: ``encode_block`` per store segment, scores sliced per segment."""

    name: str
    spec: str
    group: str
    scores: str | None = "block"
    block: int = 64

    def __post_init__(self) -> None:
        CodecSpec.parse(self.spec)  # a bad spec fails when the row is built, not hours into a run

    def run(self, model: object, window: Window) -> Trial:
        spec = CodecSpec.parse(self.spec)
        scores = None if self.scores in (None, "knorm") or not spec.evicts else window.scores[self.scores]
        payloads, t0 = [], time.perf_counter()
        for s, e in segments(window.n_cached, self.block):
            seg_scores = None if scores is None else [sc[:, s:e] for sc in scores]
            payloads.append(encode_block(_slice(window.layers, s, e), spec, start=s, scores=seg_scores))
        t1 = time.perf_counter()
        decoded = [decode_block(p, dtype=torch.float16).layers for p in payloads]
        t2 = time.perf_counter()
        layers = _concat(decoded)
        return Trial(
            layers, sum(map(len, payloads)), layers[0][0].shape[1] / window.n_cached, t1 - t0, t2 - t1
        )


def keep_topk(scores: torch.Tensor, keep: int, forced: torch.Tensor) -> torch.Tensor:
    """(kv_heads, n) scores, forced (n,) bool -> (kv_heads, keep) kept indices, ascending."""
    s = torch.nan_to_num(scores.float(), nan=-torch.inf).masked_fill(forced[None, :], torch.inf)
    return torch.topk(s, keep, dim=-1, sorted=False).indices.sort(dim=-1).values


@dataclass(frozen=True)
class EvictQuantConfig(Config):
    """Frontier: keep a fraction of each segment by score, then quantize the kept tokens.

    Attributes:
        spec: the row's spec in the proposed grammar (``<quant>-keep<P>``).
        quant: the codec spec (no eviction) the kept tokens are stored with.
        keep: fraction of each segment's tokens kept, (0, 1].
        scores: "block", "window" or "knorm".
        sink: absolute positions below this are always kept.
        recent: the last tokens of the cache are always kept.
        whole: the first ``whole`` tokens (a shared prefix) are left whole, never evicted: the
            other dedup-safe choice, measured against scoring blocks from within the prefix.
        block: segment size in tokens; 0 = the whole cache is one segment with one budget.
    """

    name: str
    spec: str
    group: str
    quant: str
    keep: float
    scores: str | None = "block"
    sink: int = 4
    recent: int = 16
    whole: int = 0
    block: int = 64

    def __post_init__(self) -> None:
        if CodecSpec.parse(self.quant).evicts or not 0 < self.keep <= 1:
            raise InvalidArgument(f"{self.name}: needs a spec without eviction and 0 < keep <= 1")

    def run(self, model: object, window: Window) -> Trial:
        spec = CodecSpec.parse(self.quant)
        n_total = window.n_cached
        payloads, mask_bytes, kept_tokens = [], 0, 0
        t0 = time.perf_counter()
        for s, e in segments(n_total, self.block or n_total):
            n = e - s
            pos = torch.arange(s, e)
            forced = (pos < max(self.sink, self.whole)) | (pos >= n_total - self.recent)
            keep = min(n, max(int(forced.sum()), math.ceil(n * self.keep)))
            kept_layers = []
            for i, (k, v) in enumerate(_slice(window.layers, s, e)):
                if self.scores == "knorm":
                    score = -torch.linalg.vector_norm(k.float(), dim=-1)
                else:
                    score = window.scores[str(self.scores)][i][:, s:e]
                idx = keep_topk(score, keep, forced.to(score.device))
                gather = idx.unsqueeze(-1).expand(-1, -1, k.shape[-1])
                kept_layers.append((k.gather(1, gather), v.gather(1, gather)))
            payloads.append(encode_block(kept_layers, spec, start=s))
            if keep < n:  # the keep mask: one bit per token, head and layer, as the codec's MASK section
                mask_bytes += math.ceil(len(kept_layers) * kept_layers[0][0].shape[0] * n / 8)
            kept_tokens += keep
        t1 = time.perf_counter()
        layers = _concat([decode_block(p, dtype=torch.float16).layers for p in payloads])
        t2 = time.perf_counter()
        return Trial(layers, sum(map(len, payloads)) + mask_bytes, kept_tokens / n_total, t1 - t0, t2 - t1)
