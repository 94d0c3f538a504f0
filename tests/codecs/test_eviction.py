"""Eviction: exact budget, sink + recent always kept, scores honoured, positions consistent."""

from __future__ import annotations

import pytest
import torch
from codec_testlib import DEVICES, make_cache

from deltastore.codecs import CodecSpec, decode_block, encode_block
from deltastore.codecs.eviction import importance, keep_indices
from deltastore.errors import CodecError


def _kept_sets(positions: torch.Tensor) -> list[set[int]]:
    return [set(row.tolist()) for row in positions.cpu()]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "spec_text", ["fp16-pe50", "fp16-pe10", "fp16-adapt30", "fp16-adapt10-r4", "fp16-pe5-r0"]
)
@pytest.mark.parametrize(("tokens", "start"), [(1, 0), (7, 0), (50, 0), (50, 2), (200, 4096)])
def test_budget_sink_recent_and_exact_tokens(spec_text: str, tokens: int, start: int, device: str) -> None:
    spec = CodecSpec.parse(spec_text)
    layers = make_cache(n_layers=2, tokens=tokens, device=device)
    blk = decode_block(encode_block(layers, spec, start=start), device=device)
    kept = spec.kept_tokens(tokens, start)
    forced = set(range(start, start + spec.forced_prefix(tokens, start)))
    forced |= set(range(start + tokens - min(spec.recent, tokens), start + tokens))
    sink = set(range(start, min(4, start + tokens))) if start < 4 else set()
    early = set(range(start, start + -(-tokens * spec.evict_pct // 100))) if spec.eviction == "pe" else set()
    for (k, v), (k0, v0), pos in zip(blk.layers, layers, blk.positions, strict=True):
        assert k.shape == v.shape == (3, kept, 64) and pos.shape == (3, kept)
        assert bool((pos[:, 1:] > pos[:, :-1]).all())  # ascending, no duplicates
        for row in _kept_sets(pos):
            assert forced <= row and sink <= row and early <= row
        # fp16 keeps values exactly: decoded tokens are the originals at the kept positions
        idx = (pos - start).to(k0.device)
        assert torch.equal(k, k0.gather(1, idx[..., None].expand(-1, -1, 64)))
        assert torch.equal(v, v0.gather(1, idx[..., None].expand(-1, -1, 64)))


def test_scores_pick_the_tokens() -> None:
    layers = make_cache(n_layers=2, tokens=100)
    scores = []
    wanted = []
    for layer in range(2):
        s = torch.zeros(3, 100)
        gens = [torch.Generator().manual_seed(10 * layer + h) for h in range(3)]
        chosen = [torch.randperm(80, generator=g)[:45] + 4 for g in gens]
        for h, c in enumerate(chosen):
            s[h, c] = 1.0 + torch.rand(45)
        scores.append(s)
        wanted.append([set(c.tolist()) | set(range(4)) | set(range(84, 100)) for c in chosen])
    spec = CodecSpec.parse("fp16-adapt30")
    assert spec.kept_tokens(100) == 65 == 4 + 45 + 16
    blk = decode_block(encode_block(layers, "fp16-adapt30", scores=scores))
    for layer, pos in enumerate(blk.positions):
        assert _kept_sets(pos) == wanted[layer]


def test_key_norm_proxy_keeps_small_norm_keys() -> None:
    k = torch.ones(1, 60, 8)
    k[0, 10:30] *= 10  # large keys: evicted first by the proxy
    spec = CodecSpec.parse("fp16-adapt50-r0")
    idx = keep_indices(importance(k, spec, start=100), spec.kept_tokens(60, 100))
    assert idx.shape == (1, spec.kept_tokens(60, 100)) == (1, 45)
    kept = set(idx[0].tolist())
    assert kept >= set(range(10)) | set(range(30, 60)) and len(kept & set(range(10, 30))) == 5


def test_nan_scores_least_important_and_shape_checked() -> None:
    k = torch.randn(2, 40, 8)
    scores = torch.rand(2, 40)
    scores[:, 20:30] = float("nan")
    spec = CodecSpec.parse("fp16-adapt0-r0")
    idx = keep_indices(importance(k, spec, start=50, scores=scores), spec.kept_tokens(40, 50))
    assert not set(range(20, 30)) & set(idx.flatten().tolist())
    with pytest.raises(CodecError, match="shape"):
        importance(k, CodecSpec.parse("fp16-adapt0"), start=0, scores=torch.rand(2, 39))
    with pytest.raises(CodecError, match="layers"):
        encode_block([(k, k)], "fp16-pe50", scores=[scores, scores])


def test_quantized_eviction_with_sink_roundtrip() -> None:
    layers = make_cache(n_layers=2, tokens=90)
    blk = decode_block(encode_block(layers, "k4v2-sink4-pe20"))
    for (k, _), (k0, _), pos in zip(blk.layers, layers, blk.positions, strict=True):
        assert torch.equal(pos[:, :4], torch.arange(4).expand(3, 4))
        assert torch.equal(k[:, :4], k0[:, :4])  # fp16 sink tokens are exact


def test_only_forced_tokens_rank_infinite() -> None:
    """+inf marks the sink and the recent window; a user's +inf (or a float64 overflowing
    float32) ranks just below them, so no tie-breaking can evict or demote a forced token."""
    spec = CodecSpec.parse("fp16-keep50-r8")
    k = torch.randn(2, 40, 8)
    for fill in (float("inf"), 1e300):
        score = importance(k, spec, start=0, scores=torch.full((2, 40), fill, dtype=torch.float64))
        forced = torch.zeros(40, dtype=torch.bool)
        forced[:4] = forced[-8:] = True
        assert torch.isinf(score[:, forced]).all() and torch.isfinite(score[:, ~forced]).all()
