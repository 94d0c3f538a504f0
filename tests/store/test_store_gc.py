"""Deletes free exactly the unreferenced segments; capacity (LRU) and TTL evict whole sessions."""

from __future__ import annotations

import random
from collections.abc import Callable

import pytest
from store_testlib import put, random_tokens

from deltastore.errors import NotFound, StoreFull
from deltastore.settings import StoreConfig
from deltastore.store import Store
from deltastore.verify import verify_backend

B = 16


class FakeClock:
    """Unix seconds that move only when told (LRU and TTL without sleeping)."""

    def __init__(self) -> None:
        self.now = 1_700_000_000.0

    def __call__(self) -> float:
        return self.now

    def tick(self, seconds: float = 1.0) -> None:
        self.now += seconds


def assert_empty(store: Store) -> None:
    with store.backend.read() as view:
        for ks in ("blocks", "manifests", "sessions"):
            assert list(view.scan(ks)) == [], ks
        assert list(view.scan_counters("refs")) == []
        assert list(view.scan_counters("counters")) == []


def test_deletes_free_exactly_what_nothing_references(store_factory: Callable[..., Store]) -> None:
    store = store_factory(StoreConfig(block_size=B))
    prefix = random_tokens(1, 2 * B)
    a0 = prefix + random_tokens(2, 5)
    a1 = a0 + random_tokens(3, 4)
    b0 = prefix + random_tokens(4, 3)
    put(store, "acme", "a", 0, a0)
    put(store, "acme", "a", 1, a1, parent=0)
    put(store, "acme", "b", 0, b0)
    assert store.delete_snapshot("acme", "a", 0).freed_segments == 0  # a1 holds all of a0's segments
    assert store.get_snapshot("acme", "a", 1).token_ids == a1
    result = store.delete_snapshot("acme", "a", 1)
    assert (result.deleted_snapshots, result.freed_segments) == (
        1,
        2,
    )  # a's tail and delta; b keeps the prefix
    with pytest.raises(NotFound):
        store.get_snapshot("acme", "a")
    assert store.get_snapshot("acme", "b", 0).token_ids == b0
    assert verify_backend(store.backend).clean
    before = store.savings()["stored_bytes"]
    result = store.delete_session("acme", "b")
    assert (result.deleted_snapshots, result.freed_segments, result.freed_bytes) == (1, 3, before)
    assert_empty(store)
    with pytest.raises(NotFound):
        store.delete_session("acme", "b")
    with pytest.raises(NotFound):
        store.delete_snapshot("acme", "b", 0)


def test_random_puts_and_deletes_never_leak_or_dangle(store_factory: Callable[..., Store]) -> None:
    store = store_factory(StoreConfig(block_size=B))
    rng = random.Random(7)
    prompts = [random_tokens(10 + i, rng.randrange(10, 60)) for i in range(3)]
    live: dict[str, tuple[int, list[int]]] = {}  # session -> (last turn, tokens)
    for step in range(80):
        op = rng.random()
        if op < 0.35 or not live:
            session = f"s{step}"
            tokens = rng.choice(prompts) + random_tokens(step, rng.randrange(0, 40))
            if not tokens:
                continue
            put(store, "acme", session, 0, tokens)
            live[session] = (0, tokens)
        elif op < 0.75:
            session = rng.choice(sorted(live))
            turn, tokens = live[session]
            tokens = tokens + random_tokens(1000 + step, rng.randrange(1, 25))
            put(store, "acme", session, turn + 1, tokens, parent=turn)
            live[session] = (turn + 1, tokens)
        elif op < 0.85:
            session = rng.choice(sorted(live))
            turn, tokens = live[session]
            store.delete_snapshot("acme", session, turn)
            remaining = [i.turn for i in store.list_snapshots("acme", session)]
            if remaining:
                prev = max(remaining)
                live[session] = (prev, store.get_snapshot("acme", session, prev).token_ids)
            else:
                del live[session]
        else:
            session = rng.choice(sorted(live))
            store.delete_session("acme", session)
            del live[session]
        if step % 8 == 0:
            report = verify_backend(store.backend)
            assert report.clean, report.problems
    for session, (turn, tokens) in live.items():
        assert store.get_snapshot("acme", session, turn).token_ids == tokens
    assert verify_backend(store.backend).clean
    for session in list(live):
        store.delete_session("acme", session)
    assert_empty(store)


def _size_of_one_session(store_factory: Callable[..., Store]) -> int:
    probe = store_factory(StoreConfig(block_size=B), name="probe")
    put(probe, "acme", "probe", 0, random_tokens(99, 3 * B))
    return probe.savings()["stored_bytes"]


def test_capacity_evicts_least_recently_used_sessions(store_factory: Callable[..., Store]) -> None:
    one = _size_of_one_session(store_factory)
    clock = FakeClock()
    cfg = StoreConfig(block_size=B, max_stored_bytes=int(3.5 * one), touch_interval_s=0)
    store = store_factory(cfg, clock)
    for i in range(3):
        put(store, "acme", f"s{i}", 0, random_tokens(i, 3 * B))
        clock.tick()
    store.get_snapshot("acme", "s0", 0)  # s0 is now more recent than s1 and s2
    clock.tick()
    result = put(store, "acme", "s3", 0, random_tokens(3, 3 * B))
    assert result.evicted_sessions == (("acme", "s1"),)
    clock.tick()
    result = put(store, "acme", "s4", 0, random_tokens(4, 3 * B))
    assert result.evicted_sessions == (("acme", "s2"),)
    assert sorted({i.session for i in store.list_snapshots("acme")}) == ["s0", "s3", "s4"]
    assert store.savings()["stored_bytes"] <= cfg.max_stored_bytes
    assert verify_backend(store.backend).clean


def test_one_put_evicts_several_sessions_biggest_namespace_first(store_factory: Callable[..., Store]) -> None:
    one = _size_of_one_session(store_factory)
    clock = FakeClock()
    store = store_factory(StoreConfig(block_size=B, max_stored_bytes=int(4.5 * one)), clock)
    for i, (namespace, session) in enumerate(
        [("globex", "g0"), ("acme", "a0"), ("acme", "a1"), ("acme", "a2")]
    ):
        put(store, namespace, session, 0, random_tokens(i, 3 * B))
        clock.tick()
    # globex (g0 plus this three-times-larger put) stores the most: it loses g0 first; then only
    # acme has sessions left to lose, oldest first, until the store fits again.
    result = put(store, "globex", "g1", 0, random_tokens(9, 9 * B))
    assert result.evicted_sessions == (("globex", "g0"), ("acme", "a0"), ("acme", "a1"))
    assert sorted((i.namespace, i.session) for i in store.list_snapshots("acme")) == [("acme", "a2")]
    assert verify_backend(store.backend).clean


def test_the_biggest_namespace_loses_its_oldest_even_when_others_are_older(
    store_factory: Callable[..., Store],
) -> None:
    one = _size_of_one_session(store_factory)
    clock = FakeClock()
    store = store_factory(StoreConfig(block_size=B, max_stored_bytes=int(8.5 * one)), clock)
    sessions = [("acme", f"a{i}") for i in range(4)] + [("big", f"b{i}") for i in range(4)]
    for i, (namespace, session) in enumerate(sessions):
        put(store, namespace, session, 0, random_tokens(i, 3 * B))
        clock.tick()
    # acme's sessions are all older, but big stores the most until it has lost three sessions.
    result = put(store, "big", "b4", 0, random_tokens(9, 9 * B))
    assert result.evicted_sessions == (("big", "b0"), ("big", "b1"), ("big", "b2"))
    assert len(store.list_snapshots("acme")) == 4
    assert verify_backend(store.backend).clean


def test_eviction_keeps_segments_other_sessions_share(store_factory: Callable[..., Store]) -> None:
    one = _size_of_one_session(store_factory)
    clock = FakeClock()
    # Room for 3 sessions' worth: evicting "old" alone frees only its own last block (the prefix
    # stays, "mid" shares it), which is just enough.
    store = store_factory(StoreConfig(block_size=B, max_stored_bytes=int(3.2 * one)), clock)
    prefix = random_tokens(50, 2 * B)
    put(store, "acme", "old", 0, prefix + random_tokens(51, B))
    clock.tick()
    put(store, "acme", "mid", 0, prefix + random_tokens(52, B))
    clock.tick()
    put(store, "acme", "new", 0, random_tokens(53, 3 * B))
    clock.tick()
    result = put(store, "acme", "newer", 0, random_tokens(54, 3 * B))
    assert result.evicted_sessions == (("acme", "old"),)
    assert store.get_snapshot("acme", "mid", 0).token_ids[: 2 * B] == prefix
    plan = store.plan_snapshot("acme", "other", "m1", "k4v2", [*prefix, 1])
    assert [s.present for s in plan.segments] == [True, True, False]
    assert verify_backend(store.backend).clean


def test_a_put_that_cannot_fit_fails_and_changes_nothing(store_factory: Callable[..., Store]) -> None:
    one = _size_of_one_session(store_factory)
    store = store_factory(StoreConfig(block_size=B, max_stored_bytes=2 * one))
    put(store, "acme", "keep", 0, random_tokens(1, 3 * B))
    before = store.savings()
    with pytest.raises(StoreFull):
        put(store, "acme", "huge", 0, random_tokens(2, 12 * B))
    after = store.savings()
    before.pop("backend"), after.pop("backend")  # the LMDB map may have grown meanwhile
    assert after == before
    assert store.get_snapshot("acme", "keep", 0).info.n_tokens == 3 * B
    assert verify_backend(store.backend).clean


def test_ttl_expires_idle_sessions(store_factory: Callable[..., Store]) -> None:
    clock = FakeClock()
    store = store_factory(StoreConfig(block_size=B, session_ttl_s=100, touch_interval_s=0), clock)
    put(store, "acme", "a", 0, random_tokens(1, B + 1))
    clock.tick(50)
    put(store, "acme", "b", 0, random_tokens(2, B + 1))
    clock.tick(60)  # a idle 110 s: expired; b idle 60 s
    with pytest.raises(NotFound):
        store.get_snapshot("acme", "a", 0)
    assert [i.session for i in store.list_snapshots("acme")] == ["b"]
    assert store.get_snapshot("acme", "b", 0).info.n_tokens == B + 1  # refreshes b
    result = put(store, "acme", "c", 0, random_tokens(3, 5))
    assert result.evicted_sessions == (("acme", "a"),)
    clock.tick(101)
    assert sorted(store.expire_sessions()) == [("acme", "b"), ("acme", "c")]
    assert_empty(store)
    # An expired session's turn numbers start afresh.
    put(store, "acme", "a", 0, random_tokens(4, 3))
    assert verify_backend(store.backend).clean
