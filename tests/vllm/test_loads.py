"""The connector's layer-by-layer loader on its own: a real server and client, a paged cache laid
out as vLLM's CPU backend lays it out, no engine. What an engine run cannot show cheaply: each
layer is in the cache when its wait returns, and a stalled or failed fetch neither hangs a wait
nor writes after the deadline."""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Callable, Iterator

import pytest
import torch

from deltastore.bench.vllm_harness import ServerProcess
from deltastore.client.results import FetchedPrefix
from deltastore.client.sync import DeltaStoreClient
from deltastore.integrations.vllm.connector import split_kv
from deltastore.integrations.vllm.loads import LayerLoader, LoadSpec
from deltastore.integrations.vllm.stats import Counters

MODEL = "loader-test-model"
LAYERS, HEADS, DIM, BLOCK = 4, 2, 64, 16
TOKENS = list(range(1000, 1200))  # 200 tokens: three 64-token store blocks and a 8-token tail


@pytest.fixture(scope="module")
def stored(
    server: ServerProcess,
) -> Iterator[tuple[DeltaStoreClient, list[tuple[torch.Tensor, torch.Tensor]]]]:
    gen = torch.Generator().manual_seed(5)
    cache = [
        tuple(torch.randn(HEADS, len(TOKENS), DIM, generator=gen).to(torch.bfloat16) for _ in "kv")
        for _ in range(LAYERS)
    ]
    with DeltaStoreClient(server.target) as client:
        client.put_snapshot("loader", 0, TOKENS, cache, model=MODEL, codec="lossless")
        yield client, cache  # type: ignore[misc]


def paged() -> tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]]]:
    """A zeroed paged cache of 16 blocks per layer ([blocks, heads, block, 2 * dim], CPU layout)."""
    raw = torch.zeros(LAYERS, 16, HEADS, BLOCK, 2 * DIM, dtype=torch.bfloat16)
    return raw, [split_kv(raw[i], DIM, cpu_backend=True) for i in range(LAYERS)]


def loader(
    fetch: Callable[[LoadSpec, float], FetchedPrefix | None],
    kv: list[tuple[torch.Tensor, torch.Tensor]],
    timeout_s: float = 10.0,
) -> tuple[LayerLoader, Counters, list[str]]:
    counters, errors = Counters(), []
    out = LayerLoader(
        fetch, kv, BLOCK, counters, lambda what, exc: errors.append(f"{what}: {exc}"), timeout_s
    )
    return out, counters, errors


def spec(start: int = 24, end: int = 192) -> LoadSpec:
    """Tokens [24, 192) (the first 24 computed locally) into 12 blocks, in no particular order."""
    return LoadSpec("req-1", TOKENS[:end], start, end, [15, 3, 9, 1, 12, 4, 7, 0, 11, 2, 14, 6])


def test_each_wait_returns_with_its_layer_in_place(stored: tuple) -> None:
    client, cache = stored
    _, kv = paged()
    load = spec()

    def fetch(s: LoadSpec, timeout: float) -> FetchedPrefix | None:
        return client.fetch_prefix(
            s.token_ids, model=MODEL, codec="lossless", max_tokens=s.end, timeout=timeout
        )

    run, counters, errors = loader(fetch, kv)
    run.start([load])
    pos = torch.arange(load.start, load.end)
    ids, offsets = torch.tensor(load.block_ids)[pos // BLOCK], pos % BLOCK
    for layer in range(LAYERS):
        run.wait_layer(layer)
        kc, vc = kv[layer]
        assert torch.equal(kc[ids, :, offsets], cache[layer][0][:, load.start : load.end].permute(1, 0, 2))
        assert torch.equal(vc[ids, :, offsets], cache[layer][1][:, load.start : load.end].permute(1, 0, 2))
    assert run.finish() == set() and not errors
    # the locally computed tokens' slots are untouched
    assert not kv[0][0][15, :, :BLOCK].any() and not kv[0][0][3, :, : 24 - BLOCK].any()
    total = counters.total
    assert total["layers_loaded"] == LAYERS and total["layer_waits"] == LAYERS and total["loads"] == 1
    assert total["tokens_loaded"] == load.end - load.start and total["load_errors"] == 0
    run.shutdown()


def test_a_stalled_fetch_fails_the_load_at_the_deadline_and_writes_nothing_later(stored: tuple) -> None:
    """The store does not answer for longer than load_timeout_s: every layer's wait returns by
    the deadline, the load's blocks are reported, and the answer arriving afterwards is not
    written into blocks that vLLM is recomputing."""
    client, _ = stored
    raw, kv = paged()
    release = threading.Event()

    def stalled(s: LoadSpec, timeout: float) -> FetchedPrefix | None:
        release.wait(30)
        return client.fetch_prefix(s.token_ids, model=MODEL, codec="lossless", max_tokens=s.end)

    run, counters, _ = loader(stalled, kv, timeout_s=0.3)
    load = spec()
    started = time.monotonic()
    run.start([load])
    for layer in range(LAYERS):
        run.wait_layer(layer)
    assert time.monotonic() - started < 2.0, "a wait outlived the load deadline"
    assert run.finish() == set(load.block_ids[1:])  # block 15 holds only local tokens
    release.set()
    run.shutdown()  # the loader got its answer after the deadline; it wrote nothing
    assert not raw.any()
    assert counters.total["load_errors"] == 1 and counters.total["layers_loaded"] == 0


def test_a_step_stuck_past_its_deadline_holds_up_neither_the_next_step_nor_fetches_more(
    stored: tuple,
) -> None:
    """A store call that ignores its timeout keeps one step's loader busy past the deadline: the
    next step's load still lands in time, the stuck step fetches none of its other loads, and its
    late answer writes nothing over the next step's KV."""
    client, cache = stored
    _, kv = paged()
    release = threading.Event()
    fetched: list[str] = []

    def fetch(s: LoadSpec, timeout: float) -> FetchedPrefix | None:
        fetched.append(s.req_id)
        if s.req_id.startswith("stuck"):
            release.wait(30)
        return client.fetch_prefix(s.token_ids, model=MODEL, codec="lossless", max_tokens=s.end)

    run, counters, _ = loader(fetch, kv, timeout_s=0.3)
    load = spec()
    run.start([dataclasses.replace(load, req_id=name) for name in ("stuck-1", "stuck-2")])
    for layer in range(LAYERS):
        run.wait_layer(layer)
    assert run.finish() == set(load.block_ids[1:])
    run.start([load])  # the stuck step's thread still waits for its store
    for layer in range(LAYERS):
        run.wait_layer(layer)
    assert run.finish() == set()
    release.set()
    run.shutdown()
    assert fetched == ["stuck-1", "req-1"]
    pos = torch.arange(load.start, load.end)
    ids, offsets = torch.tensor(load.block_ids)[pos // BLOCK], pos % BLOCK
    for layer in range(LAYERS):
        want = cache[layer][0][:, load.start : load.end].permute(1, 0, 2)
        assert torch.equal(kv[layer][0][ids, :, offsets], want)
    assert counters.total["loads"] == 1 and counters.total["load_errors"] == 2


@pytest.mark.parametrize("answer", ["down", "short"])
def test_a_failed_fetch_releases_every_wait_at_once(stored: tuple, answer: str) -> None:
    client, _ = stored
    raw, kv = paged()
    load = spec()

    def fetch(s: LoadSpec, timeout: float) -> FetchedPrefix | None:
        if answer == "down":  # nothing listens there: UNAVAILABLE
            with DeltaStoreClient("127.0.0.1:9") as dead:
                return dead.fetch_prefix(s.token_ids, model=MODEL, codec="lossless", timeout=timeout)
        return client.fetch_prefix(s.token_ids, model=MODEL, codec="lossless", max_tokens=64)

    run, counters, errors = loader(fetch, kv)
    started = time.monotonic()
    run.start([load])
    for layer in range(LAYERS):
        run.wait_layer(layer)
    assert run.finish() == set(load.block_ids[1:])
    assert time.monotonic() - started < 5.0
    assert not raw.any() and counters.total["layers_loaded"] == 0 and len(errors) == 1
    assert ("64 of 192 tokens" in errors[0]) == (answer == "short")
    run.shutdown()
