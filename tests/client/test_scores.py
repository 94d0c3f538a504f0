"""Eviction scores captured at prefill on the real SmolLM2 model: dedup safety and the two windows."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from deltastore.client.scores import SNAPKV, ScoreCapture, capture_scores, segment_ends_for_blocks
from deltastore.errors import InvalidArgument

_TEXT = "The Assembly met at Versailles in May, and the deputies of the Third Estate " * 12


@pytest.fixture(scope="module")
def model_ids() -> tuple[Any, torch.Tensor]:
    from deltastore.client.models import load_model

    model, tok = load_model()
    return model, tok(_TEXT, return_tensors="pt")["input_ids"][:, :96]


@pytest.mark.slow
@pytest.mark.parametrize("settings", [{}, SNAPKV], ids=["lookahead", "causal"])
def test_block_scores_depend_only_on_the_prefix(model_ids: tuple[Any, torch.Tensor], settings: dict) -> None:
    """Dedup safety: a block's eviction scores are the same whatever follows it."""
    model, ids = model_ids
    _, short = capture_scores(model, ids[:, :64], segment_ends=[32, 64], **settings)
    _, long = capture_scores(model, ids, segment_ends=segment_ends_for_blocks(96, 32), **settings)
    _, snap = capture_scores(model, ids, **settings)  # one window at the end: depends on the suffix
    assert len(long) == 30 and long[0].shape == (3, 96)
    for a, b in zip(short, long, strict=True):
        torch.testing.assert_close(a, b[:, :64], rtol=1e-4, atol=1e-6)
    assert not torch.allclose(snap[5][:, :64], long[5][:, :64])


@pytest.mark.slow
def test_lookahead_scores_are_each_querys_whole_attention(model_ids: tuple[Any, torch.Tensor]) -> None:
    """Look-ahead queries sit past the segment and see every key: unpooled, one segment's scores
    are a mean of softmax rows, so they sum to 1 per head. A causal window's do not (its late
    tokens are divided by fewer queries), and the sum leaves the segment for earlier ones."""
    model, ids = model_ids
    _, whole = capture_scores(model, ids)
    for layer in whole:
        torch.testing.assert_close(layer.sum(dim=1), torch.ones(3), rtol=1e-4, atol=1e-4)
    _, blocks = capture_scores(model, ids, segment_ends=[48, 96])
    second = torch.stack([layer[:, 48:].sum(dim=1) for layer in blocks])
    assert bool((second < 1 - 1e-3).any()) and bool((second <= 1 + 1e-4).all())
    _, causal = capture_scores(model, ids, window=64, pool=1, lookahead=None)
    assert not torch.allclose(torch.stack([c.sum(dim=1) for c in causal]), torch.ones(30, 3), atol=1e-2)


@pytest.mark.slow
def test_lookahead_moves_the_queries(model_ids: tuple[Any, torch.Tensor]) -> None:
    """The look-ahead distance is applied (RoPE of the re-positioned queries), not ignored."""
    model, ids = model_ids
    _, near = capture_scores(model, ids, lookahead=0)
    _, far = capture_scores(model, ids, lookahead=4096)
    assert not torch.allclose(near[10], far[10], atol=1e-4)


def test_settings_are_checked() -> None:
    with pytest.raises(InvalidArgument):
        ScoreCapture(lookahead=-1)
    with pytest.raises(InvalidArgument):
        ScoreCapture(pool=2)
    with pytest.raises(InvalidArgument):
        ScoreCapture(window=0)


def test_segment_ends() -> None:
    assert segment_ends_for_blocks(130, 64) == [64, 128, 130]
    assert segment_ends_for_blocks(128, 64) == [64, 128]
    with pytest.raises(InvalidArgument):
        segment_ends_for_blocks(0, 64)


def _tiny(config_cls: Any, model_cls: Any, eager: bool = False, **extra: Any) -> Any:
    """A tiny random model of an HF architecture (2 layers, 4 query / 2 KV heads), built offline."""
    torch.manual_seed(0)
    cfg = config_cls(
        vocab_size=100,
        hidden_size=64,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        **extra,
    )
    if eager:
        cfg._attn_implementation = "eager"
    return model_cls(cfg).eval()


def test_lookahead_on_per_layer_rope_models() -> None:
    """Gemma3 gives sliding and full attention layers their own RoPE base: the look-ahead queries
    take their layer's tables (a tiny random model, built offline)."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    model = _tiny(
        Gemma3TextConfig,
        Gemma3ForCausalLM,
        head_dim=16,
        sliding_window=512,
        layer_types=["sliding_attention", "full_attention"],
    )
    assert len({layer.self_attn.layer_type for layer in model.model.layers}) == 2
    ids = torch.randint(0, 100, (1, 150))
    _, scores = capture_scores(model, ids)
    for layer in scores:
        torch.testing.assert_close(layer.sum(dim=1), torch.ones(2), rtol=1e-4, atol=1e-4)
    _, blocks = capture_scores(model, ids, segment_ends=[64, 128, 150])
    assert all(s.shape == (2, 150) and bool(torch.isfinite(s).all()) for s in blocks)


@pytest.mark.slow
def test_hooked_query_projections_match_recomputed_ones(
    model_ids: tuple[Any, torch.Tensor], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The window's queries are taken from the forward's own q_proj output instead of projecting
    again; the scores must not change."""
    model, ids = model_ids
    ends = segment_ends_for_blocks(96, 32)
    kept, keep = [], ScoreCapture._keep_queries

    def counting(self: ScoreCapture, layer_idx: int, *args: Any) -> None:
        kept.append(layer_idx)
        keep(self, layer_idx, *args)

    monkeypatch.setattr(ScoreCapture, "_keep_queries", counting)
    _, hooked = capture_scores(model, ids, segment_ends=ends)
    assert sorted(kept) == list(range(30))  # every layer's scores used the forward's projections
    monkeypatch.setattr(ScoreCapture, "_keep_queries", lambda *a: None)
    _, projected = capture_scores(model, ids, segment_ends=ends)
    for a, b in zip(hooked, projected, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("settings", [{}, SNAPKV], ids=["lookahead", "causal"])
def test_query_norm_over_all_heads(settings: dict) -> None:
    """OLMo2 normalizes the whole query projection before splitting heads (Qwen3 per head): the
    window's queries get the same treatment (a tiny random model, built offline)."""
    from transformers import Olmo2Config, Olmo2ForCausalLM

    model = _tiny(Olmo2Config, Olmo2ForCausalLM, eager=True)  # eager: output_attentions below
    ids = torch.randint(0, 100, (1, 150))
    _, scores = capture_scores(model, ids, segment_ends=[64, 128, 150], **settings)
    assert all(s.shape == (2, 150) and bool(torch.isfinite(s).all()) for s in scores)
    if settings:  # a causal window over the whole prompt is the model's own attention, averaged
        _, whole = capture_scores(model, ids, window=150, pool=1, lookahead=None)
        with torch.no_grad():
            attn = model(input_ids=ids, output_attentions=True).attentions  # (1, heads, T, T) per layer
        seen_by = torch.arange(150, 0, -1)
        for mine, eager in zip(whole, attn, strict=True):
            ref = (eager[0].sum(dim=1) / seen_by).view(2, 2, 150).mean(dim=1)
            torch.testing.assert_close(mine, ref, rtol=1e-4, atol=1e-6)
