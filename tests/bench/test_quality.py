"""The quality benchmark's --quick run on the real SmolLM2 model, and the tier picker.

One quick run (2 windows, 127 cached tokens, 16 scored) is shared by the module; it checks the
protocol's sanity: exact tiers score KL 0, KL grows as bits drop, and every measured ratio equals
the codec's own size arithmetic.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from deltastore.bench.quality import grade
from deltastore.bench.quality_configs import segments
from deltastore.bench.quality_tiers import pick_tier, recommend
from deltastore.cli import main
from deltastore.codecs import encoded_nbytes
from deltastore.errors import InvalidArgument, NotFound


@pytest.fixture(scope="module")
def quick(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], Path]:
    out = tmp_path_factory.mktemp("quality") / "quality.json"
    assert main(["bench", "quality", "--quick", "--json", str(out)]) == 0
    return json.loads(out.read_text()), out


def _rows(doc: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {r["spec"]: r for r in doc["rows"]}


@pytest.mark.slow
def test_outputs_and_schema(quick: tuple[dict[str, Any], Path]) -> None:
    doc, path = quick
    assert {"model", "text", "windows", "ctx", "eval", "rows"} <= doc.keys()
    assert doc["windows"] == 2
    for r in doc["rows"]:
        assert {"config", "spec", "ratio", "kl_mean", "kl_p95", "top1", "grade", "kept_fraction"} <= r.keys()
        assert r["grade"] == grade(r["kl_mean"])
    assert path.with_suffix(".png").stat().st_size > 10_000
    assert "| K4V2 |" in path.with_suffix(".md").read_text()


@pytest.mark.slow
def test_exact_tiers_are_exact(quick: tuple[dict[str, Any], Path]) -> None:
    rows = _rows(quick[0])
    for spec in ("fp16", "lossless"):
        assert rows[spec]["kl_mean"] == 0.0
        assert rows[spec]["kl_p95"] == 0.0
        assert rows[spec]["top1"] == 1.0


@pytest.mark.slow
def test_kl_grows_as_bits_drop(quick: tuple[dict[str, Any], Path]) -> None:
    rows = _rows(quick[0])
    assert 0 < rows["k8v8"]["kl_mean"] < rows["k4v4"]["kl_mean"] < rows["k4v2"]["kl_mean"]
    assert rows["k4v2-pe50"]["kept_fraction"] < 1.0


@pytest.mark.slow
def test_ratios_match_codec_arithmetic(quick: tuple[dict[str, Any], Path]) -> None:
    doc = quick[0]
    n_cached = doc["ctx"] - 1
    fp16 = 30 * 2 * 3 * n_cached * 64 * 2  # SmolLM2: 30 layers, 3 KV heads, head_dim 64
    for r in doc["rows"]:
        if r["spec"] == "lossless":
            continue  # zstd: data-dependent size
        stored = sum(
            encoded_nbytes(r["spec"], n_layers=30, kv_heads=3, head_dim=64, n_tokens=e - s, start=s)
            for s, e in segments(n_cached, doc["block"])
        )
        assert r["bytes_per_window"] == stored
        assert r["ratio"] == pytest.approx(fp16 / stored, rel=1e-12)


@pytest.mark.slow
def test_block_scores_depend_only_on_the_prefix() -> None:
    """Dedup safety: a block's eviction scores are the same whatever follows it."""
    from deltastore.client.models import load_model
    from deltastore.client.scores import capture_scores, segment_ends_for_blocks

    model, tok = load_model()
    ids = tok(
        "The Assembly met at Versailles in May, and the deputies of the Third Estate " * 12,
        return_tensors="pt",
    )
    ids = ids["input_ids"][:, :96]
    _, short = capture_scores(model, ids[:, :64], segment_ends=[32, 64])
    _, long = capture_scores(model, ids, segment_ends=segment_ends_for_blocks(96, 32))
    _, snap = capture_scores(model, ids)  # one window at the end: depends on the suffix
    assert len(long) == 30 and long[0].shape == (3, 96)
    for a, b in zip(short, long, strict=True):
        torch.testing.assert_close(a, b[:, :64], rtol=1e-4, atol=1e-6)
    assert not torch.allclose(snap[5][:, :64], long[5][:, :64])


def test_segment_ends() -> None:
    from deltastore.client.scores import segment_ends_for_blocks

    assert segment_ends_for_blocks(130, 64) == [64, 128, 130]
    assert segment_ends_for_blocks(128, 64) == [64, 128]
    with pytest.raises(InvalidArgument):
        segment_ends_for_blocks(0, 64)


_TABLE = {
    "points": [
        {"spec": "k4v4-sink4-z-keep30", "ratio": 11.0, "kl_mean": 0.05, "available": False},
        {"spec": "k4v2", "ratio": 4.6, "kl_mean": 0.05, "available": True},
        {"spec": "k4v4", "ratio": 3.6, "kl_mean": 0.01, "available": True},
        {"spec": "lossless", "ratio": 1.05, "kl_mean": 0.0, "available": True},
    ]
}


def test_pick_tier_highest_ratio_under_budget() -> None:
    assert pick_tier(0.0, table=_TABLE) == "lossless"
    assert pick_tier(0.02, table=_TABLE) == "k4v4"
    assert pick_tier(0.05, table=_TABLE) == "k4v2"
    assert pick_tier(0.05, available_only=False, table=_TABLE) == "k4v4-sink4-z-keep30"
    with pytest.raises(InvalidArgument):
        pick_tier(-1.0, table=_TABLE)
    with pytest.raises(NotFound):
        pick_tier(0.001, table={"points": _TABLE["points"][:2]})


@pytest.mark.slow
def test_recommend_from_quick_run(quick: tuple[dict[str, Any], Path]) -> None:
    table = recommend(quick[0])
    assert pick_tier(0.0, table=table) in ("fp16", "lossless")
    assert table["budgets"]["0.2"]["available"] is not None
