"""Prefix dedup across sessions, temporal deltas across turns, and savings that multiply exactly."""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable

from store_testlib import FP16_PER_TOKEN, PAYLOAD_PER_TOKEN, put, random_tokens

from deltastore.settings import StoreConfig
from deltastore.store import Store
from deltastore.verify import verify_backend

B = 64


def payload_nbytes(n_tokens: int) -> int:
    return PAYLOAD_PER_TOKEN * n_tokens + 17  # what store_testlib.payload_for makes


def test_prefix_dedup_across_sessions(store_factory: Callable[..., Store]) -> None:
    store = store_factory(StoreConfig(block_size=B))
    system = random_tokens(100, 500)  # shared system prompt: 7 full blocks (448 tokens) shareable
    shared_blocks = 500 // B
    for user in range(6):
        result = put(store, "acme", f"user{user}", 0, system + random_tokens(200 + user, 100))
        if user == 0:
            assert result.reused_shared_segments == 0
        else:
            assert result.reused_shared_segments == shared_blocks
            assert result.reused_shared_bytes == shared_blocks * payload_nbytes(B)
            # 152 own tokens: 2 full blocks and a 24-token tail.
            assert result.new_segments == 3
            assert result.new_payload_bytes == PAYLOAD_PER_TOKEN * (600 - shared_blocks * B) + 3 * 17
    report = store.savings()
    unique_tokens = shared_blocks * B + 6 * (600 - shared_blocks * B)
    assert report["unique_fp16_bytes"] == FP16_PER_TOKEN * unique_tokens
    assert report["session_fp16_bytes"] == report["logical_bytes"] == 6 * 600 * FP16_PER_TOKEN
    assert math.isclose(report["layers"]["prefix_dedup"], 6 * 600 / unique_tokens)
    assert report["layers"]["temporal_delta"] == 1.0


def _turns(store: Store, session: str, context: int, turns: int, step: int) -> list[int]:
    """Bytes written by each turn of +``step`` tokens after a ``context``-token first turn."""
    tokens = random_tokens(zlib.crc32(session.encode()) & 0xFFFF, context)
    put(store, "acme", session, 0, tokens)
    written = []
    for turn in range(1, turns + 1):
        tokens = tokens + random_tokens(turn * 7919 + context, step)
        result = put(store, "acme", session, turn, tokens, parent=turn - 1)
        assert result.new_payload_bytes <= payload_nbytes(step) + payload_nbytes(B)
        assert result.reused_shared_bytes == 0
        written.append(result.new_bytes)
    return written


def test_bytes_per_turn_grow_with_new_tokens_not_context(store_factory: Callable[..., Store]) -> None:
    store = store_factory(StoreConfig(block_size=B))
    long = _turns(store, "long", 4096, 20, 50)
    short = _turns(store, "short", 512, 20, 50)
    # Per-turn writes at a 4K context match those at 512 tokens within 5% (the manifest lists
    # one 40-byte entry per block); re-storing the context would be 8x larger at 4K.
    assert sum(long) <= 1.05 * sum(short)
    assert max(long) < 2 * payload_nbytes(B + 50)
    context_payload = payload_nbytes(4096)
    assert max(long) < context_payload / 10
    report = store.savings("acme")
    final_fp16 = FP16_PER_TOKEN * (4096 + 20 * 50)
    # 21 snapshots of a growing 4K-5K context are stored in about the size of the last one.
    stored_long = report["stored_bytes"] * sum(long) / (sum(long) + sum(short))
    assert stored_long < final_fp16 / 5 * 2
    assert report["layers"]["temporal_delta"] > 10
    assert verify_backend(store.backend).clean


def test_savings_layers_multiply_to_the_ratio_and_match_a_hand_count(
    store_factory: Callable[..., Store],
) -> None:
    store = store_factory(StoreConfig(block_size=B))
    prefix = random_tokens(1, 2 * B)
    a0 = prefix + random_tokens(2, 10)
    a1 = a0 + random_tokens(3, 20)
    b0 = prefix + random_tokens(4, 30)
    r_a0 = put(store, "acme", "a", 0, a0)
    r_a1 = put(store, "acme", "a", 1, a1, parent=0)
    r_b0 = put(store, "acme", "b", 0, b0)
    assert (r_a1.new_segments, r_a1.reused_temporal_segments) == (1, 3)
    assert (r_b0.new_segments, r_b0.reused_shared_segments) == (1, 2)
    s = store.savings()
    f = FP16_PER_TOKEN
    assert s["logical_bytes"] == f * (len(a0) + len(a1) + len(b0))
    # Distinct segments: 2 prefix blocks, a's tail [128,138) and delta [138,158), b's tail [128,158).
    assert s["unique_fp16_bytes"] == f * (2 * B + 10 + 20 + 30)
    # Per session: a references 2 blocks + 10 + 20 tokens; b references 2 blocks + 30 tokens.
    assert s["session_fp16_bytes"] == f * ((2 * B + 30) + (2 * B + 30))
    stored = s["stored"]
    assert s["stored_bytes"] == stored["blocks"] + stored["manifests"] + stored["index"]
    payloads = sum(payload_nbytes(n) for n in (B, B, 10, 20, 30))
    assert payloads < stored["blocks"] < payloads + 5 * (33 + 48 + 4 * B)
    assert r_a0.new_bytes + r_a1.new_bytes + r_b0.new_bytes == s["stored_bytes"]
    layers = s["layers"]
    assert math.isclose(layers["codec"] * layers["prefix_dedup"] * layers["temporal_delta"], s["ratio"])
    assert math.isclose(s["ratio"], s["logical_bytes"] / s["stored_bytes"])
    assert s["namespaces"]["acme"]["stored_bytes"] == s["stored_bytes"]
    assert (s["snapshots"], s["sessions"], s["blocks"]) == (3, 2, 5)
    assert verify_backend(store.backend).clean
