"""lo<L>: the lowest-scored kept tokens at 2 bits instead of dropped, their count and places read
back from the payload's LOW_MASK."""

from __future__ import annotations

import math

import pytest
import torch
from codec_testlib import DEVICES, make_cache

from deltastore.codecs import (
    CodecSpec,
    decode_block,
    encode_block,
    encoded_nbytes,
    read_header,
)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    ("tokens", "start", "seq_end"),
    [(64, 0, 64), (64, 0, 600), (64, 64, 140), (64, 448, 512), (20, 2, 22), (1, 0, 1)],
)
def test_the_lowest_scored_kept_tokens_are_2_bit(tokens: int, start: int, seq_end: int, device: str) -> None:
    """Per-token groups (kt, fp16 params): every token's codes depend on that token alone, so the
    tokens lo<L> leaves at 4 bits decode bit-identical to the spec without lo<L>."""
    spec = CodecSpec.parse("k4v4-kt-sink4-keep75-lo50-r16")
    base = CodecSpec.parse("k4v4-kt-sink4-keep75-r16")
    layers = make_cache(n_layers=2, tokens=tokens, device=device, seed=5)
    gen = torch.Generator().manual_seed(7)
    scores = [torch.rand(3, tokens, generator=gen).to(device) for _ in layers]
    payload = encode_block(layers, spec, start=start, scores=scores, seq_end=seq_end)
    hdr = read_header(payload)
    forced = [p < spec.eviction_sink or p >= seq_end - spec.recent for p in range(start, start + tokens)]
    older = sum(p < seq_end - spec.recent for p in range(start, start + tokens))
    low = min(math.ceil(older * 50 / 100), hdr.kept_tokens - sum(forced))
    assert hdr.low_tokens == low == spec.low_tokens(tokens, start, seq_end)
    assert len(payload) == encoded_nbytes(
        spec, n_layers=2, kv_heads=3, head_dim=64, n_tokens=tokens, start=start, seq_end=seq_end
    )
    plain = encode_block(layers, base, start=start, scores=scores, seq_end=seq_end)
    assert len(payload) < len(plain) or low == 0
    got, want = decode_block(payload, device=device), decode_block(plain, device=device)
    for (k, v), (kb, vb), (_, v0), pos, pos_b, sc in zip(
        got.layers, want.layers, layers, got.positions, want.positions, scores, strict=True
    ):
        assert torch.equal(pos, pos_b)  # lo<L> demotes, it never changes which tokens are kept
        for head in range(3):
            kept = (pos[head] - start).tolist()
            ranked = sorted((i for i in kept if not forced[i]), key=lambda i: float(sc[head, i]))
            demoted = set(ranked[:low])
            for j, i in enumerate(kept):
                same = torch.equal(k[head, j], kb[head, j]) and torch.equal(v[head, j], vb[head, j])
                assert same == (i not in demoted), (head, i)
        if low:  # 2-bit codes: several times the 4-bit error of the same tokens
            changed = ~(v == vb).all(-1)  # (kv_heads, kept): the demoted slots
            at = changed.nonzero()[:, 1].view(3, low)
            src = v0.float().gather(1, pos.gather(1, at).sub(start)[..., None].expand(-1, -1, 64))
            rows = at[..., None].expand(-1, -1, 64)
            assert _rel(v.gather(1, rows), src) > 2 * _rel(vb.gather(1, rows), src)


def test_infinite_scores_never_displace_forced_tokens() -> None:
    """+inf scores must not tie with the marker of the sink and the recent window, or topk's
    tie-breaking could drop a sink or demote an 8-bit token (and fail the size check)."""
    layers = make_cache(n_layers=2, tokens=40, seed=8)
    spec = CodecSpec.parse("k4v4-sink4-hp4-keep50-lo40-r8")
    for fill in (float("inf"), 1e300):  # a float64 beyond float32 becomes +inf when converted
        scores = [torch.full((3, 40), fill, dtype=torch.float64) for _ in layers]
        blk = decode_block(encode_block(layers, spec, scores=scores, seq_end=40))
        for pos in blk.positions:
            assert (pos[:, :4] == torch.arange(4)).all() and (pos[:, -8:] == torch.arange(32, 40)).all()
