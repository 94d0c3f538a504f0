"""The serving benchmark: its --quick run through a real server, and the honesty of its workload."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from deltastore.bench.serving_drive import percentile
from deltastore.bench.serving_workload import KVShape, Scenario, SyntheticKV, TokenChain, conversation_tokens
from deltastore.cli import main
from deltastore.errors import InvalidArgument

SHAPE = KVShape(2, 8, 128)


@pytest.fixture(scope="module")
def quick(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], Path]:
    out = tmp_path_factory.mktemp("serving") / "serving.json"
    assert main(["bench", "serving", "--quick", "--json", str(out)]) == 0
    return json.loads(out.read_text()), out


def test_quick_ratio_is_the_stores_own(quick: tuple[dict[str, Any], Path]) -> None:
    doc, _ = quick
    assert doc["store_recount"]["verify"]["clean"]
    rows = doc["scenarios"] + doc["growth"]
    assert rows
    for r in rows:
        per_token = KVShape(*map(int, r["shape"].split("x"))).token_fp16_bytes
        assert r["logical_bytes"] == r["logical_tokens"] * per_token
        assert r["effective_ratio"] == pytest.approx(r["logical_bytes"] / r["stored_bytes"], rel=1e-12)
        assert r["store_recount_ratio"] == pytest.approx(r["effective_ratio"], rel=1e-12)
        lay = r["layers"]
        assert lay["codec"] * lay["prefix_dedup"] * lay["temporal_delta"] == pytest.approx(
            r["effective_ratio"]
        )
        if r["ratio_bound"] is not None:
            # Metadata, block-level codec overhead and tail segments can only cost ratio.
            assert r["effective_ratio"] < r["ratio_bound"]


def test_quick_exercises_dedup_and_deltas(quick: tuple[dict[str, Any], Path]) -> None:
    doc, _ = quick
    for r in doc["scenarios"]:
        assert r["layers"]["prefix_dedup"] > 1.2, r["name"]
        assert r["layers"]["temporal_delta"] > 1.5, r["name"]
        assert r["reused_shared_bytes"] > 0 and r["reused_temporal_bytes"] > 0
        assert r["put_calls"] == r["users"] * r["turns"]
        assert r["get_calls"] > 0 and r["get_gbps"] > 0 and r["put_p99_ms"] >= r["put_p50_ms"] > 0
    assert doc["reference"]["memcpy_gbps"] > doc["reference"]["grpc_stream_gbps"] > 0


def test_quick_growth_follows_unique_tokens(quick: tuple[dict[str, Any], Path]) -> None:
    doc, _ = quick
    growth = sorted(doc["growth"], key=lambda g: g["unique_tokens"])
    assert len(growth) >= 3
    stored = [g["stored_bytes"] for g in growth]
    assert stored == sorted(stored)
    # Block bytes per unique token stay within a narrow band while users grow 4x.
    per_token = [g["stored"]["blocks"] / g["unique_tokens"] for g in growth]
    assert max(per_token) < 1.6 * min(per_token)


def test_quick_writes_table_and_plots(quick: tuple[dict[str, Any], Path]) -> None:
    _, out = quick
    md = out.with_suffix(".md").read_text()
    assert "| p128-k4v2 |" in md and "report's formula" in md
    for suffix in ("-ratio.png", "-throughput.png"):
        png = out.with_name(out.stem + suffix)
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_synthetic_kv_is_a_function_of_the_prefix() -> None:
    s = Scenario("t", 2, 40, 100, "fp16", turns=1, shape=SHAPE)
    a, b = conversation_tokens(s, 0), conversation_tokens(s, 1)
    assert a[:40] == b[:40] and a[40:] != b[40:]
    synth = SyntheticKV(SHAPE)
    ca, cb = TokenChain(a), TokenChain(b)
    assert torch.equal(synth.tokens_kv(ca.hashes[:40]), synth.tokens_kv(cb.hashes[:40]))
    assert not torch.equal(synth.tokens_kv(ca.hashes[40:41]), synth.tokens_kv(cb.hashes[40:41]))
    # One different early token changes the KV of every later token.
    c = [a[0] + 1, *a[1:]]
    assert not torch.equal(synth.tokens_kv(TokenChain(c).hashes[39:40]), synth.tokens_kv(ca.hashes[39:40]))
    kv = synth.tokens_kv(ca.hashes)
    assert kv.shape == (100, 2, 2, 8, 128) and kv.dtype == torch.float16
    keys = kv[:, :, 0].float()
    # Keys carry outlier channels: the largest channel scale dwarfs the median one.
    scale = keys.std(dim=0)
    assert (scale.amax(dim=-1) / scale.median(dim=-1).values).min() > 3


def test_cache_fills_only_asked_ranges_and_checks_them() -> None:
    s = Scenario("t", 1, 0, 64, "fp16", turns=1, shape=SHAPE)
    chain = TokenChain(conversation_tokens(s, 0))
    synth = SyntheticKV(SHAPE)
    layers = synth.cache(chain, 64, [(10, 20)])
    assert len(layers) == 2 and layers[0][0].shape == (8, 64, 128)
    want = synth.tokens_kv(chain.hashes[10:20])
    assert torch.equal(layers[1][1][:, 10:20].permute(1, 0, 2), want[:, 1, 1])
    with pytest.raises(InvalidArgument):
        synth.cache(chain, 64, [(60, 70)])


def test_scenario_arithmetic_and_validation() -> None:
    s = Scenario("t", 100, 3584, 4096, "k4v2", turns=4, turn_tokens=50, shape=SHAPE)
    assert [s.turn_context(t) for t in range(4)] == [3946, 3996, 4046, 4096]
    assert s.unique_tokens == 3584 + 100 * 512
    assert s.ratio_bound(1.0) == pytest.approx(100 * (3946 + 3996 + 4046 + 4096) / (3584 + 51200))
    with pytest.raises(InvalidArgument):
        Scenario("bad", 1, 4000, 4096, "k4v2", turns=4, turn_tokens=50)
    assert percentile([1.0, 2.0, 3.0, 4.0, 5.0], 50) == 3.0
    with pytest.raises(InvalidArgument):
        percentile([1.0], 100)
