"""keep<P> eviction: exact budget, sink and the sequence's last tokens always kept, scores honoured,
kept count read back from the keep mask, spec grammar and `deltastore codecs --max-kl`."""

from __future__ import annotations

import json
import math

import pytest
import torch
from codec_testlib import DEVICES, make_cache

from deltastore.cli import main
from deltastore.codecs import (
    CodecSpec,
    decode_block,
    decode_blocks,
    encode_block,
    encoded_nbytes,
    read_header,
)
from deltastore.errors import CodecError, FormatError, InvalidArgument


def _forced(spec: CodecSpec, tokens: int, start: int, seq_end: int) -> set[int]:
    """Absolute positions keep<P> must keep: the sink and positions >= seq_end - r."""
    block = range(start, start + tokens)
    return {p for p in block if p < spec.eviction_sink or p >= seq_end - spec.recent}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("spec_text", ["fp16-keep50-r64", "fp16-keep20-r16", "fp16-keep1-r0", "fp16-keep100"])
@pytest.mark.parametrize(
    ("tokens", "start", "seq_end"),
    [(64, 0, None), (64, 0, 511), (63, 448, 511), (64, 448, None), (64, 384, 511), (50, 2, 60), (1, 0, None)],
)
def test_keep_budget_exact_and_forced_kept(
    spec_text: str, tokens: int, start: int, seq_end: int | None, device: str
) -> None:
    spec = CodecSpec.parse(spec_text)
    end = start + tokens if seq_end is None else seq_end
    layers = make_cache(n_layers=2, tokens=tokens, device=device)
    payload = encode_block(layers, spec, start=start, seq_end=seq_end)
    blk = decode_block(payload, device=device)
    forced = _forced(spec, tokens, start, end)
    recent = sum(p >= end - spec.recent for p in range(start, start + tokens))
    older, sink = tokens - recent, len(forced) - recent
    kept = recent + max(math.ceil(older * spec.evict_pct / 100), sink)
    assert blk.kept == kept == spec.kept_tokens(tokens, start, seq_end) == read_header(payload).kept_tokens
    assert len(payload) == encoded_nbytes(
        spec, n_layers=2, kv_heads=3, head_dim=64, n_tokens=tokens, start=start, seq_end=seq_end
    )
    for (k, _), (k0, _), pos in zip(blk.layers, layers, blk.positions, strict=True):
        assert pos.shape == (3, kept) and bool((pos[:, 1:] > pos[:, :-1]).all())
        for row in pos.cpu():
            assert forced <= set(row.tolist())
        idx = (pos - start).to(k0.device)
        assert torch.equal(k, k0.gather(1, idx[..., None].expand(-1, -1, 64)))  # fp16: the originals


def test_block_before_the_recent_window_keeps_exactly_p_percent() -> None:
    """Only blocks holding the sequence's last r tokens keep more; r is relative to seq_end, not the block."""
    spec = CodecSpec.parse("k4v4-sink4-z-keep50-r64")
    layers = make_cache(n_layers=2, tokens=64)
    assert decode_block(encode_block(layers, spec, start=64, seq_end=511)).kept == 32
    # 76..127 forced, and half of the 12 tokens before them: no hole just before the recent window
    assert decode_block(encode_block(layers, spec, start=64, seq_end=140)).kept == 52 + 6
    assert (
        decode_block(encode_block(layers, spec, start=64)).kept == 64
    )  # default: the block ends the sequence
    assert decode_block(encode_block(layers, spec, start=0, seq_end=511)).kept == 32  # sink inside the budget
    with pytest.raises(CodecError, match="seq_end"):
        encode_block(layers, spec, start=64, seq_end=100)


def test_scores_pick_the_tokens() -> None:
    layers = make_cache(n_layers=2, tokens=64)
    scores, wanted = [], []
    for layer in range(2):
        s = torch.zeros(3, 64)
        chosen = [
            torch.randperm(60, generator=torch.Generator().manual_seed(7 * layer + h))[:28] + 4
            for h in range(3)
        ]
        for h, c in enumerate(chosen):
            s[h, c] = 1.0 + torch.rand(28)
        scores.append(s)
        wanted.append([set(c.tolist()) | set(range(4)) for c in chosen])
    blk = decode_block(encode_block(layers, "fp16-keep50-r16", scores=scores, seq_end=1000))
    for layer, pos in enumerate(blk.positions):
        assert [set(row.tolist()) for row in pos] == wanted[layer]


@pytest.mark.parametrize(
    "spec_text", ["k4v4-sink4-z-keep50-r64", "k4v4-kt-sink4-z-keep20-r64", "k8v4-keep90"]
)
def test_round_trip_quantized(spec_text: str) -> None:
    layers = make_cache(n_layers=3, tokens=64, dtype=torch.float16)
    for start, seq_end in ((0, 511), (448, 512), (128, None)):
        blk = decode_block(encode_block(layers, spec_text, start=start, seq_end=seq_end), dtype=torch.float32)
        for (k, v), (k0, v0), pos in zip(blk.layers, layers, blk.positions, strict=True):
            idx = (pos - start)[..., None].expand(-1, -1, 64)
            ref_k, ref_v = k0.float().gather(1, idx), v0.float().gather(1, idx)
            assert (k - ref_k).norm() / ref_k.norm() < 0.2 and (v - ref_v).norm() / ref_v.norm() < 0.2


def test_mask_stays_raw_and_lying_mask_rejected() -> None:
    payload = bytearray(encode_block(make_cache(n_layers=2, tokens=64), "k4v4-z-keep50-r16", seq_end=500))
    _kind, flags, offset, length = read_header(payload).sections[-1]
    assert flags == 0 and length == 2 * 3 * 64 // 8
    payload[offset] ^= 0xFF  # flip 8 mask bits of the first head: counts no longer agree
    with pytest.raises(FormatError):
        decode_block(bytes(payload))


@pytest.mark.parametrize(
    "text",
    ["k4v4-sink4-z-keep50-r64", "k4v4-kt-sink4-z-keep20-r64", "fp16-keep100", "fp8-keep1", "k4v2-keep30"],
)
def test_spec_parse_canonical_round_trip(text: str) -> None:
    spec = CodecSpec.parse(text)
    assert spec.eviction == "keep" and CodecSpec.parse(spec.canonical()) == spec
    assert spec.recent == (int(text.rsplit("-r", 1)[1]) if "-r" in text else 16)


@pytest.mark.parametrize("text", ["k4v4-keep0", "k4v4-keep101", "k4v4-keep50-pe30", "k4v4-keep50-keep40"])
def test_spec_rejects(text: str) -> None:
    with pytest.raises(InvalidArgument):
        CodecSpec.parse(text)


def test_existing_specs_unchanged() -> None:
    """pe/adapt keep the block's own last r tokens whatever seq_end says."""
    spec = CodecSpec.parse("k4v2-pe30")
    assert spec.canonical() == "k4v2-g64-kc-pe30-r16"
    assert spec.kept_tokens(64, 64, seq_end=10_000) == spec.kept_tokens(64, 64) == 42
    layers = make_cache(n_layers=1, tokens=64)
    assert encode_block(layers, spec, start=64, seq_end=10_000) == encode_block(layers, spec, start=64)


def test_max_kl(capsys: pytest.CaptureFixture[str]) -> None:
    from deltastore.codecs.tiers import load_table, pick_tier

    assert main(["codecs", "--max-kl", "0.05"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == pick_tier(0.05)
    CodecSpec.parse(lines[0])  # the codec can encode what it recommends
    point = next(p for p in load_table()["points"] if p["spec"] == lines[0])
    assert point["kl_mean"] <= 0.05 and f"{point['ratio']:.2f}x" in lines[1]
    assert main(["codecs", "--max-kl", "0.05", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["spec"] == lines[0] and doc["ratio"] == point["ratio"]


def test_max_kl_nothing_qualifies(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["codecs", "--max-kl", "-1"]) == 2
    assert "max_kl" in capsys.readouterr().err


def test_blocks_sealed_under_the_old_budget_still_decode(monkeypatch: pytest.MonkeyPatch) -> None:
    """Until 2026-11 the block the recent window starts in kept max(P% of the block, the window's
    tokens). Such payloads are in stores; the kept count is read from their mask."""
    spec = CodecSpec.parse("k4v4-sink4-z-keep20-r32")
    layers = make_cache(n_layers=2, tokens=64)
    cases = [(448, 512), (384, 460), (0, 64), (64, 1000)]
    new_counts = [spec.kept_tokens(64, start, end) for start, end in cases]

    def old_rule(self: CodecSpec, n_tokens: int, start: int = 0, seq_end: int | None = None) -> int:
        prefix, tail = self.forced_range(n_tokens, start, seq_end)
        return max(-(-n_tokens * self.evict_pct // 100), prefix + n_tokens - tail)

    monkeypatch.setattr(CodecSpec, "kept_tokens", old_rule)
    old = [encode_block(layers, spec, start=start, seq_end=end) for start, end in cases]
    old_counts = [spec.kept_tokens(64, start, end) for start, end in cases]
    monkeypatch.undo()
    assert old_counts != new_counts  # the cases cover blocks where the rules differ
    for payload, kept in zip(old, old_counts, strict=True):
        assert decode_block(payload).kept == read_header(payload).kept_tokens == kept


@pytest.mark.parametrize(
    ("spec", "counts"),
    [
        ("k4v4-p8-sink4-z-hp32-keep50-r32", {"high_tokens": [0, 10, 22]}),
        ("k4v4-p8-sink4-z-hp16-keep88-lo72-r32", {"high_tokens": [0, 0, 16], "low_tokens": [47, 39, 0]}),
    ],
)
def test_segments_depend_on_the_sequence_end_only_under_the_window(
    spec: str, counts: dict[str, list[int]]
) -> None:
    """Dedup: a block wholly before the recent window is the same payload whoever seals it, while
    the blocks under it hold more tokens (and hp<N>'s 8-bit, lo<L>'s fewer 2-bit ones); a snapshot
    of blocks with different counts still decodes in one call, as each block alone."""
    layers = make_cache(n_layers=2, tokens=64, seed=2)
    scores = [torch.rand(3, 64, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    assert encode_block(layers, spec, start=64, seq_end=200, scores=scores) == encode_block(
        layers, spec, start=64, seq_end=5000, scores=scores
    )
    cache = make_cache(n_layers=3, tokens=150, seed=4)
    bounds = [(0, 64), (64, 128), (128, 150)]
    payloads = [
        encode_block([(k[:, a:b], v[:, a:b]) for k, v in cache], spec, start=a, seq_end=150)
        for a, b in bounds
    ]
    for field, want in counts.items():
        assert [getattr(read_header(p), field) for p in payloads] == want
    for blk, p in zip(decode_blocks(payloads), payloads, strict=True):
        alone = decode_block(p)
        assert all(
            torch.equal(x, y)
            for pair in zip(blk.layers, alone.layers, strict=True)
            for x, y in zip(*pair, strict=True)
        )
