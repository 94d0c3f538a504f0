"""Payload digests handed in by the caller: kept as given, so only the true one reads back."""

from __future__ import annotations

from collections.abc import Callable

import blake3
import pytest
from store_testlib import FP16_PER_TOKEN, payload_for, random_tokens

from deltastore.errors import ChecksumMismatch, InvalidArgument
from deltastore.manifest import block_payload_offset, payload_digest
from deltastore.settings import StoreConfig
from deltastore.store import SegmentPayload, Store
from deltastore.verify import verify_backend


@pytest.fixture
def store(store_factory: Callable[..., Store]) -> Store:
    return store_factory(StoreConfig(block_size=16))


def _payloads(store: Store, tokens: list[int], digest: Callable[[bytes], bytes | None]) -> dict:
    plan = store.plan_snapshot("acme", "s", "m", "k4v2", tokens)
    out = {}
    for s in plan.missing:
        data = bytearray(payload_for(s.key, s.n_tokens))  # a buffer, as the chunk assembler hands over
        out[s.key] = SegmentPayload(data, s.n_tokens, FP16_PER_TOKEN * s.n_tokens, digest(bytes(data)))
    return out


def test_a_true_digest_is_kept_and_reads_verify(store: Store) -> None:
    tokens = random_tokens(3, 40)
    store.put_snapshot(
        "acme", "s", 0, "m", "k4v2", tokens, _payloads(store, tokens, lambda d: blake3.blake3(d).digest())
    )
    snap = store.get_snapshot("acme", "s", 0)
    assert [s.payload for s in snap.segments] == [payload_for(s.key, s.n_tokens) for s in snap.segments]


def test_a_wrong_digest_is_never_served(store: Store) -> None:
    tokens = random_tokens(4, 40)
    store.put_snapshot("acme", "s", 0, "m", "k4v2", tokens, _payloads(store, tokens, lambda d: bytes(32)))
    with pytest.raises(ChecksumMismatch):
        store.get_snapshot("acme", "s", 0)
    with pytest.raises(InvalidArgument, match="32 bytes"):
        other = random_tokens(5, 40)
        store.put_snapshot("acme", "t", 0, "m", "k4v2", other, _payloads(store, other, lambda d: b"short"))


def test_multi_threaded_digest_is_blake3() -> None:
    big = bytes(range(256)) * (5 << 12)  # 5 MiB: hashed on every core
    assert payload_digest(big) == blake3.blake3(big).digest()
    assert payload_digest(memoryview(big)[:100]) == blake3.blake3(big[:100]).digest()


def test_a_record_buffer_is_sealed_and_stored_as_is(store: Store) -> None:
    tokens = random_tokens(6, 40)
    plan = store.plan_snapshot("acme", "s", "m", "k4v2", tokens)
    payloads = {}
    for s in plan.missing:
        data = payload_for(s.key, s.n_tokens)
        room = block_payload_offset(s.n_tokens)
        record = bytearray(room) + data
        view = memoryview(record)[room:]
        payloads[s.key] = SegmentPayload(view, s.n_tokens, FP16_PER_TOKEN * s.n_tokens, None, record)
    store.put_snapshot("acme", "s", 0, "m", "k4v2", tokens, payloads)
    snap = store.get_snapshot("acme", "s", 0)
    assert [s.payload for s in snap.segments] == [payload_for(s.key, s.n_tokens) for s in snap.segments]
    assert verify_backend(store.backend).clean
    other = random_tokens(7, 10)
    [seg] = store.plan_snapshot("acme", "t", "m", "k4v2", other).missing
    short = SegmentPayload(b"abc", seg.n_tokens, FP16_PER_TOKEN * seg.n_tokens, None, bytearray(10))
    with pytest.raises(InvalidArgument, match="record buffer"):
        store.put_snapshot("acme", "t", 0, "m", "k4v2", other, {seg.key: short})
