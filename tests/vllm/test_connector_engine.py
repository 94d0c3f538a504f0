"""DeltaStoreConnector with a real vLLM engine (CPU) and a real DeltaStore server: no mocks.

Two references, both from runs in which the connector loaded nothing (asserted), so they compute
exactly what an engine without the connector computes:
- ``cold``: the whole prompt prefilled at once (what a recompute gives);
- ``hit``: the same prompt again, served by vLLM's own prefix cache for the same leading blocks
  a store load covers. A lossless load must give exactly this: the same KV in the same blocks,
  the same split of the prefill. (``cold`` and ``hit`` need not agree token for token: in bf16 a
  prefill split at a block boundary rounds differently, and greedy decoding can flip a token.)
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import connector_kv, fresh_engine

from deltastore.bench.vllm_harness import ServerProcess, run_prompts
from deltastore.client.sync import DeltaStoreClient
from deltastore.integrations.vllm.connector import connector_totals, wait_for_saves
from deltastore.integrations.vllm.stats import instances
from deltastore.store import Store

pytestmark = pytest.mark.slow
ANSWER = 24


def generate(
    llm: Any, prompt: list[int], *, max_tokens: int = ANSWER, params: dict | None = None
) -> tuple[list[int], dict]:
    """Greedy run with vLLM's own prefix cache emptied first (so history can only come from the
    store); returns the tokens and the connector's counter deltas (saves included)."""
    llm.reset_prefix_cache()
    before = connector_totals()
    (run,) = run_prompts(llm, [prompt], max_tokens=max_tokens, params=[params])
    assert wait_for_saves(llm, 120), "the save did not finish"
    after = connector_totals()
    return run.token_ids, {k: after[k] - before[k] for k in after}


@pytest.fixture(scope="module")
def base(llm: Any, texts: dict[str, list[int]]) -> dict[str, Any]:
    """SYS+Q1 computed cold (nothing loaded) and stored by the in-process engine."""
    prompt = texts["sys"] + texts["q1"]
    tokens, delta = generate(llm, prompt)
    assert delta["tokens_loaded"] == 0 and delta["saves"] == 1, delta
    assert delta["tokens_saved"] == (len(prompt) + ANSWER - 1) // 128 * 128
    before = connector_totals()["tokens_loaded"]
    (hit,) = run_prompts(llm, [prompt], max_tokens=ANSWER)  # vLLM's prefix cache, not the store
    assert wait_for_saves(llm, 120) and connector_totals()["tokens_loaded"] == before
    print(json.dumps({"cold_vs_prefix_hit_equal": tokens == hit.token_ids}))
    return {"prompt": prompt, "tokens": tokens, "hit": hit.token_ids, "delta": delta}


def test_fresh_engine_restores_lossless_and_dedups_the_shared_system_prompt(
    tmp_path: Path, model_dir: Path, server: ServerProcess, texts: dict[str, list[int]], base: dict[str, Any]
) -> None:
    other = texts["sys"] + texts["q2"]
    phases = [
        {"prompts": [base["prompt"]], "max_tokens": ANSWER},
        {"prompts": [other], "max_tokens": ANSWER, "reset": True},
    ]
    same, shared = fresh_engine(tmp_path, model_dir, connector_kv(server.target), phases)
    # A new process restored what the other engine stored, and the output is bit-for-bit the same.
    assert same["delta"]["tokens_loaded"] == (len(base["prompt"]) - 1) // 128 * 128
    assert same["delta"]["load_errors"] == 0
    assert same["tokens"][0] == base["hit"]
    # Layer by layer: the load landed in one step as one write per layer, and the forward pass
    # waited for each attention layer of that step (vLLM's attention decorator).
    n_layers = json.loads((model_dir / "config.json").read_text())["num_hidden_layers"]
    assert same["delta"]["layers_loaded"] == n_layers and same["delta"]["layer_waits"] == n_layers
    # Another user's question on the same system prompt: the prompt's blocks are loaded, and the
    # save encodes only blocks past them.
    assert shared["delta"]["tokens_loaded"] == len(texts["sys"]) // 128 * 128  # whole vLLM blocks
    saved = (len(other) + ANSWER - 1) // 128 * 128
    assert shared["delta"]["segments_encoded"] == (saved - len(texts["sys"]) // 64 * 64) // 64
    assert shared["delta"]["bytes_written"] < 0.4 * base["delta"]["bytes_written"]
    assert server.savings()["layers"]["prefix_dedup"] > 1.5


@pytest.fixture(scope="module")
def shm_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """A second server on a unix socket with --shm-dir (its own empty store)."""
    root = tmp_path_factory.mktemp("vllm-shm")
    srv = ServerProcess(root / "data", shm_dir=root / "shm").start()
    try:
        yield srv
    finally:
        srv.stop()


def test_fresh_engine_restores_k4v4_through_shared_memory_and_reports_agreement(
    tmp_path: Path, model_dir: Path, shm_server: ServerProcess, base: dict[str, Any]
) -> None:
    """The engine computes and saves over the unix socket, then (vLLM's cache emptied) loads it
    back through the shared-memory directory (GetPrefixShm), layer by layer."""
    phases = [
        {"prompts": [base["prompt"]], "max_tokens": ANSWER},
        {"prompts": [base["prompt"]], "max_tokens": ANSWER, "reset": True},
    ]
    kv = connector_kv(shm_server.target, codec="k4v4", shm_dir=str(shm_server.shm_dir))
    cold, restored = fresh_engine(tmp_path, model_dir, kv, phases)
    assert cold["delta"]["tokens_loaded"] == 0  # a new store
    assert restored["delta"]["tokens_loaded"] == (len(base["prompt"]) - 1) // 128 * 128
    assert restored["delta"]["load_errors"] == 0
    assert restored["delta"]["layers_loaded"] == restored["delta"]["layer_waits"] > 0
    # every loaded byte came through shared memory, none on the gRPC stream
    assert shm_server.sent_bytes("GetPrefixShm") >= restored["delta"]["bytes_loaded"] > 0
    assert shm_server.sent_bytes("GetPrefix") == 0
    a, b = base["hit"], restored["tokens"][0]
    agree = sum(x == y for x, y in zip(a, b, strict=True)) / len(a)
    lossless_bytes = base["delta"]["bytes_written"]
    ratio = (
        lossless_bytes / restored["delta"]["bytes_written"] if restored["delta"]["bytes_written"] else None
    )
    print(json.dumps({"k4v4_greedy_token_agreement": agree, "k4v4_first_token_equal": a[0] == b[0]}))
    (tmp_path.parent / "k4v4_agreement.json").write_text(
        json.dumps({"agreement": agree, "bytes_ratio": ratio})
    )
    assert a[0] == b[0], "k4v4 changed the very first greedy token"


def test_fresh_engine_restores_the_max_kl_tier_with_keys_before_rope(
    tmp_path: Path, model_dir: Path, server: ServerProcess, base: dict[str, Any]
) -> None:
    """max_kl 0.02 on SmolLM2 (plain RoPE, theta 100000) is k4v2-p8-sink4-z-hp16-pr100000: keys
    leave vLLM's paged cache post-RoPE, are stored before RoPE and come back re-rotated.

    Also a misconfigured ``shm_dir`` (this server has no --shm-dir and is on TCP): the first load
    finds shared memory unusable and the connector streams from then on, so loads still work."""
    phases = [
        {"prompts": [base["prompt"]], "max_tokens": ANSWER},
        {"prompts": [base["prompt"]], "max_tokens": ANSWER, "reset": True},
    ]
    streamed = server.sent_bytes("GetPrefix")
    kv = connector_kv(server.target, codec=None, max_kl=0.02, shm_dir=str(tmp_path / "not-the-servers"))
    cold, restored = fresh_engine(tmp_path, model_dir, kv, phases)
    assert cold["delta"]["tokens_loaded"] == 0  # its own codec chain
    assert restored["delta"]["tokens_loaded"] == (len(base["prompt"]) - 1) // 128 * 128
    assert restored["delta"]["load_errors"] == 0
    assert server.sent_bytes("GetPrefix") - streamed >= restored["delta"]["bytes_loaded"] > 0
    a, b = base["hit"], restored["tokens"][0]
    agree = sum(x == y for x, y in zip(a, b, strict=True)) / len(a)
    (tmp_path.parent / "max_kl_agreement.json").write_text(json.dumps({"agreement": agree}))
    assert a[0] == b[0], "the max_kl tier changed the very first greedy token"
    # the same tokens as the lossless base run, stored ~4.7x smaller (4.96x against lossless's 1.04x)
    assert base["delta"]["bytes_written"] > 3 * cold["delta"]["bytes_written"]


def test_multi_turn_loads_earlier_turns_and_writes_only_new_tokens(
    llm: Any, server: ServerProcess, texts: dict[str, list[int]]
) -> None:
    history: list[int] = []
    saved_before = 0
    for turn in range(3):
        prompt = history + texts["u"][turn * 60 : turn * 60 + 60] if turn else texts["chat"]
        answer, d = generate(llm, prompt, params={"deltastore": {"session": "chat-1", "turn": turn}})
        assert d["load_errors"] == 0 and d["saves"] == 1
        saved = (len(prompt) + ANSWER - 1) // 128 * 128
        if turn:
            # Every earlier token the store holds (the previous turn's save) comes back.
            assert d["tokens_loaded"] == saved_before, (turn, d)
        # Bytes written follow the new tokens: only the blocks past the previous save are encoded.
        assert d["tokens_saved"] == saved and d["segments_encoded"] == (saved - saved_before) // 64, d
        history, saved_before = prompt + answer, saved
    with DeltaStoreClient(server.target) as c:
        snaps = c.list_snapshots("chat-1")
    assert [(s.turn, s.parent_turn) for s in snaps] == [(0, None), (1, 0), (2, 1)]
    assert server.savings()["layers"]["temporal_delta"] > 1.0


def test_server_killed_requests_recompute_then_loads_resume(
    llm: Any, server: ServerProcess, base: dict[str, Any]
) -> None:
    server.kill()
    try:
        started = time.monotonic()
        tokens, d = generate(llm, base["prompt"])
        assert time.monotonic() - started < 60, "the engine stalled on a dead store"
        assert tokens == base["tokens"]  # recomputed, same greedy output
        assert d["tokens_loaded"] == 0 and d["lookup_errors"] + d["save_errors"] >= 1, d
        tokens, d = generate(llm, base["prompt"])  # still down: still serving
        assert tokens == base["tokens"]
    finally:
        server.start()
    time.sleep(0.5)  # the connector's cooldown after a failure (0.3 s here)
    tokens, d = generate(llm, base["prompt"])
    assert d["lookup_errors"] == 0 and d["tokens_loaded"] > 0 and d["load_errors"] == 0, d
    assert tokens == base["hit"]


def n_layers(llm: Any) -> int:
    return llm.llm_engine.model_config.get_num_layers(llm.llm_engine.vllm_config.parallel_config)


def test_a_load_failing_mid_layers_is_recomputed(
    llm: Any, server: ServerProcess, base: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Layers 0-2 land in the paged cache, then layer 3's write fails (its K/V views swapped for
    ones of another shape, which the loader refuses rather than broadcast into): all of the load's blocks are reported and vLLM
    recomputes them, so the half-written KV is never used; the next load works again."""
    (worker,) = [c for c in instances() if getattr(c, "_loader", None) is not None]
    loader = worker._loader
    broken = list(loader._kv)
    broken[3] = (broken[3][0][..., :1], broken[3][1][..., :1])
    with monkeypatch.context() as m:
        m.setattr(loader, "_kv", broken)
        tokens, d = generate(llm, base["prompt"])
    assert d["lookup_hits"] == 1 and d["load_errors"] == 1 and d["tokens_loaded"] == 0, d
    assert d["layers_loaded"] == 3 and d["layer_waits"] == n_layers(llm), d
    assert tokens == base["tokens"], "a half-written load reached the engine"
    tokens, d = generate(llm, base["prompt"])
    assert d["load_errors"] == 0 and d["layers_loaded"] == n_layers(llm), d
    assert tokens == base["hit"]


def test_corrupt_stored_payloads_are_data_loss_and_recomputed(
    llm: Any, server: ServerProcess, base: dict[str, Any]
) -> None:
    server.stop()
    try:
        store = Store.open(server.data_dir)
        try:
            with store.backend.read() as view:
                blocks = [(bytes(k), bytes(v)) for k, v in view.scan("blocks")]
            for key, value in blocks:  # one flipped payload bit in every stored block
                bad = bytearray(value)
                bad[-3] ^= 0x04
                store.backend.transact(lambda b, k=key, v=bytes(bad): b.put("blocks", k, v))
        finally:
            store.close()
    finally:
        server.start()
    time.sleep(0.5)
    tokens, d = generate(llm, base["prompt"])
    assert d["lookup_hits"] == 1 and d["load_errors"] == 1 and d["tokens_loaded"] == 0, d
    assert tokens == base["tokens"], "corrupt KV reached the engine"
    # refused before any layer: no layer written, and every layer's wait returned
    assert d["layers_loaded"] == 0 and d["layer_waits"] == n_layers(llm), d
