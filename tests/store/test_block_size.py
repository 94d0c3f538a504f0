"""The default block size, by measurement: stored bytes of a shared-prefix chat workload per B.

Payloads model a K4V2 tier on SmolLM2-135M's KV shape (30 layers, 3 KV heads, head_dim 64):
4-bit keys and 2-bit values with per-token value scales (4680 bytes/token), plus per segment the
per-channel key scales and zero-points (30*3*64*2 fp16 = 23040 bytes) and a 64-byte header. Small
blocks pay that per-segment cost and per-block index entries often; large blocks leave more of a
500-token shared prompt in per-session tails. Two retention patterns: every turn kept, only the
latest turn kept.
Run with ``-s`` to see the table.
"""

from __future__ import annotations

from pathlib import Path

from store_testlib import random_tokens

from deltastore.backends.lmdb_backend import LmdbBackend, LmdbConfig
from deltastore.settings import StoreConfig
from deltastore.store import SegmentPayload, Store

PER_TOKEN = 30 * 3 * 64 * 4 // 8 + 30 * 3 * 64 * 2 // 8 + 30 * 3 * 4  # K4 + V2 + value scales
PER_SEGMENT = 30 * 3 * 64 * 2 * 2 + 64  # per-channel key scale/zero (fp16) + header
FP16_PER_TOKEN = 30 * 2 * 3 * 64 * 2
USERS, SYSTEM, FIRST, TURNS, STEP = 8, 500, 200, 10, 50


def stored_bytes(tmp_path: Path, block_size: int, keep_old_turns: bool) -> int:
    backend = LmdbBackend(LmdbConfig(path=tmp_path / f"b{block_size}{keep_old_turns}", sync=False))
    with Store(backend, StoreConfig(block_size=block_size)) as store:
        system = random_tokens(1, SYSTEM)
        for user in range(USERS):
            tokens = system + random_tokens(100 + user, FIRST)
            for turn in range(TURNS + 1):
                if turn:
                    tokens = tokens + random_tokens(1000 * user + turn, STEP)
                parent = turn - 1 if turn else None
                plan = store.plan_snapshot("acme", f"u{user}", "m", "k4v2", tokens, parent)
                data = {
                    s.key: SegmentPayload(
                        b"\0" * (PER_TOKEN * s.n_tokens + PER_SEGMENT),
                        s.n_tokens,
                        FP16_PER_TOKEN * s.n_tokens,
                    )
                    for s in plan.missing
                }
                store.put_snapshot("acme", f"u{user}", turn, "m", "k4v2", tokens, data, parent)
                if parent is not None and not keep_old_turns:
                    store.delete_snapshot("acme", f"u{user}", parent)
        return store.savings()["stored_bytes"]


def test_default_block_size_stores_the_fewest_bytes(tmp_path: Path) -> None:
    sizes = (16, 32, 64, 128, 256)
    every = {b: stored_bytes(tmp_path, b, True) for b in sizes}
    latest = {b: stored_bytes(tmp_path, b, False) for b in sizes}
    print("\n| block size | all turns kept, MiB | latest turn kept, MiB |\n|---:|---:|---:|")
    for b in sizes:
        print(f"| {b} | {every[b] / 2**20:.2f} | {latest[b] / 2**20:.2f} |")
    # The default minimizes the worst excess over the best size across both retention patterns.
    regret = {b: max(every[b] / min(every.values()), latest[b] / min(latest.values())) for b in sizes}
    assert StoreConfig().block_size == min(regret, key=regret.__getitem__)
