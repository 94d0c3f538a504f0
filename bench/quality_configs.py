"""What the quality benchmark compares: codec tiers, frontier experiments and peers.

Every config turns a window's stored cache into a restored cache of kept tokens and says how many
bytes it stored. Every row goes through ``encode_block``/``decode_block`` one store segment at a
time, each segment sealed with the sequence's end known (``seq_end``), exactly as the service
stores them. Eviction rows (``EvictQuantConfig``) are ``<quant>-keep<P>-r<N>`` codec specs: the
codec picks the kept tokens (its keep mask is counted in the payload). Two frontier variants are
labelled as measurements, not product specs: a shared prefix left whole (its segments stored with
the spec's quantization and no eviction), and, NOT dedup-safe, one SnapKV budget over the whole
cache (the cache as one segment, scored by the prompt's last queries).
"""

from __future__ import annotations

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
    "score_key",
    "segments",
]

SCORE_SOURCES = {
    "block": "attention of the queries before each store block's end, rotated to positions past it "
    "(look-ahead; dedup-safe: depends only on the prefix)",
    "causal": "attention of each store block's own last queries, causal, SnapKV pooling "
    "(dedup-safe; the source before look-ahead)",
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
        return _store(
            window, [(s, e, spec) for s, e in segments(window.n_cached, self.block)], score_key(self)
        )


def score_key(cfg: Config) -> str | None:
    """Which captured scores a row reads from ``Window.scores``: ``<source>/<segment tokens>`` for
    the per-segment sources, ``window`` for the whole prompt's, None for the key-norm proxy."""
    if cfg.scores in (None, "knorm") or not CodecSpec.parse(cfg.spec).evicts:
        return None
    seg = getattr(cfg, "block", 0)
    return cfg.scores if cfg.scores == "window" or not seg else f"{cfg.scores}/{seg}"


def _store(window: Window, plan: list[tuple[int, int, CodecSpec]], key: str | None) -> Trial:
    """Encode each planned segment ``[s, e)`` with its spec (sealed at the window's end), decode all.

    ``key``: the captured scores to slice per segment (:func:`score_key`), or None for the codec's
    key-norm proxy.
    """
    source = None if key is None else window.scores[key]
    n_total, payloads, t0 = window.n_cached, [], time.perf_counter()
    for s, e, spec in plan:
        seg_scores = None if source is None or not spec.evicts else [sc[:, s:e] for sc in source]
        layers = _slice(window.layers, s, e)
        payloads.append(encode_block(layers, spec, start=s, scores=seg_scores, seq_end=n_total))
    t1 = time.perf_counter()
    decoded = [decode_block(p, dtype=torch.float16).layers for p in payloads]
    t2 = time.perf_counter()
    restored = _concat(decoded)
    return Trial(restored, sum(map(len, payloads)), restored[0][0].shape[1] / n_total, t1 - t0, t2 - t1)


@dataclass(frozen=True)
class EvictQuantConfig(Config):
    """Eviction rows: the codec spec ``<quant>-keep<P>[-lo<L>]-r<recent>`` per store segment.

    Attributes:
        spec: the row's spec, ``<quant>-keep<P>[-lo<L>]-r<recent>`` (what the product stores).
        quant: the spec without eviction (the shared prefix's segments use it).
        keep: fraction of each segment's tokens kept, a whole percentage in (0, 1].
        low: fraction of each segment's tokens kept at 2 bits (lo<L>), a whole percentage, at most keep.
        scores: a key of ``SCORE_SOURCES``.
        recent: the last tokens of the cache are always kept (the codec's r<N>, relative to the
            sequence's end).
        whole: the first ``whole`` tokens (a shared prefix, a multiple of ``block``) are left whole,
            never evicted: the other dedup-safe choice, measured against scoring blocks from
            within the prefix (not a single codec spec: two specs in one snapshot).
        block: segment size in tokens; 0 = the whole cache is one segment with one budget.
    """

    name: str
    spec: str
    group: str
    quant: str
    keep: float
    scores: str | None = "block"
    recent: int = 16
    whole: int = 0
    block: int = 64
    low: float = 0.0

    def __post_init__(self) -> None:
        pct, low = round(self.keep * 100), round(self.low * 100)
        if CodecSpec.parse(self.quant).evicts or not 1 <= pct <= 100 or abs(pct - self.keep * 100) > 1e-9:
            raise InvalidArgument(f"{self.name}: needs a spec without eviction and keep in whole % of (0, 1]")
        if abs(low - self.low * 100) > 1e-9:
            raise InvalidArgument(f"{self.name}: low must be a whole percentage")
        want = f"{self.quant}-keep{pct}" + (f"-lo{low}" if low else "") + f"-r{self.recent}"
        if CodecSpec.parse(self.spec) != CodecSpec.parse(want):
            raise InvalidArgument(f"{self.name}: spec {self.spec!r} is not {want}")
        if self.whole and (not self.block or self.whole % self.block):
            raise InvalidArgument(f"{self.name}: the whole prefix must be a multiple of the block size")

    def run(self, model: object, window: Window) -> Trial:
        evict, whole = CodecSpec.parse(self.spec), CodecSpec.parse(self.quant)
        plan = [
            (s, e, whole if e <= self.whole else evict)
            for s, e in segments(window.n_cached, self.block or window.n_cached)
        ]
        return _store(window, plan, score_key(self))
