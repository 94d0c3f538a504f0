"""Streaming reads: sizes up front, payloads one by one, a concurrent delete is NotFound."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from store_testlib import payload_for, put, random_tokens

from deltastore.errors import NotFound
from deltastore.settings import StoreConfig
from deltastore.store import Store


@pytest.fixture
def store(store_factory: Callable[..., Store]) -> Store:
    return store_factory(StoreConfig(block_size=16))


def test_open_snapshot_streams_what_get_snapshot_returns(store: Store) -> None:
    tokens = random_tokens(9, 50)
    put(store, "acme", "s", 0, tokens)
    opened = store.open_snapshot("acme", "s")
    whole = store.get_snapshot("acme", "s", 0)
    assert opened.info == whole.info and opened.token_ids == whole.token_ids == tokens
    streamed = list(opened)
    assert streamed == list(whole.segments)
    assert [s.size_bytes for s in opened.segments] == [len(s.payload) for s in streamed]
    assert opened.payload_bytes == whole.payload_bytes
    assert all(s.payload == payload_for(s.key, s.n_tokens) for s in streamed)


def test_a_snapshot_deleted_while_streaming_is_not_found(store: Store) -> None:
    put(store, "acme", "s", 0, random_tokens(10, 50))
    segments = iter(store.open_snapshot("acme", "s", 0))
    next(segments)
    store.delete_snapshot("acme", "s", 0)
    with pytest.raises(NotFound, match="deleted while it was read"):
        next(segments)
