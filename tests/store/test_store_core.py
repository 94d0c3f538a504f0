"""Store API: plan/put/get round trips, identity checks, errors that leave nothing behind."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from store_testlib import FP16_PER_TOKEN, payload_for, payloads, put, random_tokens

from deltastore.addressing import Chain, seed, token_bytes
from deltastore.errors import (
    AlreadyExists,
    ChecksumMismatch,
    InvalidArgument,
    MismatchError,
    MissingSegments,
    NotFound,
)
from deltastore.manifest import block_key, decode_block, encode_block
from deltastore.settings import StoreConfig
from deltastore.store import SegmentPayload, Store
from deltastore.verify import verify_backend

B = 16
CFG = StoreConfig(block_size=B)


@pytest.fixture
def small(store_factory: Callable[..., Store]) -> Store:
    return store_factory(CFG)


def test_round_trip_is_bit_exact(small: Store) -> None:
    tokens = random_tokens(1, 3 * B + 5)
    result = put(small, "acme", "s1", 0, tokens)
    assert result.snapshot_id == "acme/s1/0"
    assert result.new_segments == 4 and result.reused_segments == 0
    snap = small.get_snapshot("acme", "s1", 0)
    assert snap.token_ids == tokens
    assert [(s.start, s.end) for s in snap.segments] == [(0, 16), (16, 32), (32, 48), (48, 53)]
    assert all(s.payload == payload_for(s.key, s.n_tokens) for s in snap.segments)
    assert snap.info.logical_bytes == FP16_PER_TOKEN * len(tokens) == result.logical_bytes
    assert small.get_snapshot("acme", "s1").info.turn == 0  # latest
    assert verify_backend(small.backend).clean


def test_plan_reports_stored_segments_and_keys_follow_the_contract(small: Store) -> None:
    tokens = random_tokens(2, 2 * B + 3)
    plan = small.plan_snapshot("acme", "s1", "m1", "k4v2", tokens)
    chain = Chain(seed("acme", "m1", "k4v2", B), token_bytes(tokens), B)
    assert [s.key for s in plan.segments] == [
        chain.hashes[1],
        chain.hashes[2],
        chain.segment_key(2 * B, 2 * B + 3),
    ]
    assert not any(s.present for s in plan.segments) and plan.block_size == B
    put(small, "acme", "s1", 0, tokens)
    again = small.plan_snapshot("acme", "s2", "m1", "k4v2", tokens)
    assert [s.present for s in again.segments] == [True, True, True]
    assert again.segments[0].size_bytes == len(payload_for(again.segments[0].key, B))
    assert small.plan_snapshot("acme", "s1", "m1", "k4v2", []).segments == ()


def test_segment_keys_are_raw_bytes_end_to_end(small: Store) -> None:
    tokens = random_tokens(20, 2 * B + 3)
    plan = small.plan_snapshot("acme", "s", "m1", "k4v2", tokens)
    assert all(type(s.key) is bytes and len(s.key) == 32 for s in plan.segments)
    put(small, "acme", "s", 0, tokens)
    streamed = small.open_snapshot("acme", "s", 0)
    prefix = small.get_prefix("acme", "m1", "k4v2", tokens)
    read = small.get_snapshot("acme", "s", 0).segments
    for keys in ([s.key for s in streamed.segments], [s.key for s in prefix.segments], [s.key for s in read]):
        assert keys == [s.key for s in plan.segments]


def test_hex_keys_are_refused_where_bytes_are_taken(small: Store) -> None:
    tokens = random_tokens(21, B + 3)
    plan = small.plan_snapshot("acme", "s", "m1", "k4v2", tokens)
    as_hex = {s.key.hex(): p for s, p in zip(plan.missing, payloads(plan).values(), strict=True)}
    with pytest.raises(InvalidArgument, match="32 raw bytes, got str"):
        small.put_snapshot("acme", "s", 0, "m1", "k4v2", tokens, as_hex)  # type: ignore[arg-type]
    with pytest.raises(InvalidArgument, match="32 raw bytes, got str"):
        small.has_blocks("acme", [plan.segments[0].key.hex()])  # type: ignore[list-item]
    with pytest.raises(InvalidArgument, match="must be 32 bytes, got 31"):
        small.has_blocks("acme", [bytes(31)])
    assert small.savings()["stored_bytes"] == 0


def test_turn_extending_parent_writes_only_the_delta(small: Store) -> None:
    t0 = random_tokens(3, B + 4)
    put(small, "acme", "s", 0, t0)
    t1 = t0 + random_tokens(4, 5)  # stays inside block 1
    plan = small.plan_snapshot("acme", "s", "m1", "k4v2", t1, parent_turn=0)
    assert [(s.start, s.end, s.present) for s in plan.segments] == [
        (0, 16, True),
        (16, 20, True),
        (20, 25, False),
    ]
    r1 = small.put_snapshot("acme", "s", 1, "m1", "k4v2", t1, payloads(plan), parent_turn=0)
    assert r1.new_segments == 1 and r1.reused_temporal_segments == 2 and r1.reused_shared_segments == 0
    t2 = t1 + random_tokens(5, 10)  # completes block 1 with a delta: parent tokens never re-encoded
    plan2 = small.plan_snapshot("acme", "s", "m1", "k4v2", t2, parent_turn=1)
    assert [(s.start, s.end, s.present) for s in plan2.segments] == [
        (0, 16, True),
        (16, 20, True),
        (20, 25, True),
        (25, 32, False),
        (32, 35, False),
    ]
    t3 = t2 + random_tokens(6, 2 * B + 1)  # new tokens span whole blocks: aligned blocks again
    plan3 = small.plan_snapshot("acme", "s", "m1", "k4v2", t3, parent_turn=1)
    assert [(s.start, s.end) for s in plan3.segments][3:] == [(25, 32), (32, 48), (48, 64), (64, 68)]
    put(small, "acme", "s", 2, t2, parent=1)
    assert small.get_snapshot("acme", "s", 2).token_ids == t2
    assert small.get_snapshot("acme", "s", 1).token_ids == t1


def test_missing_segments_fail_and_write_nothing(small: Store) -> None:
    tokens = random_tokens(6, 2 * B)
    plan = small.plan_snapshot("acme", "s", "m1", "k4v2", tokens)
    partial = dict(list(payloads(plan).items())[:1])
    with pytest.raises(MissingSegments) as info:
        small.put_snapshot("acme", "s", 0, "m1", "k4v2", tokens, partial)
    assert info.value.keys == [plan.segments[1].key.hex()]
    assert isinstance(info.value, MismatchError)  # FAILED_PRECONDITION class
    assert small.savings()["stored_bytes"] == 0
    assert small.list_snapshots("acme") == []


def test_payload_metadata_is_validated(small: Store) -> None:
    tokens = random_tokens(7, B + 3)
    plan = small.plan_snapshot("acme", "s", "m1", "k4v2", tokens)
    good = payloads(plan)
    tail = plan.segments[1].key
    wrong_count = {**good, tail: SegmentPayload(b"x" * 10, 2, 2 * FP16_PER_TOKEN)}
    with pytest.raises(InvalidArgument, match="encodes 2 tokens"):
        small.put_snapshot("acme", "s", 0, "m1", "k4v2", tokens, wrong_count)
    wrong_shape = {**good, tail: SegmentPayload(b"x" * 10, 3, 3 * FP16_PER_TOKEN * 2)}
    with pytest.raises(InvalidArgument, match="per token"):
        small.put_snapshot("acme", "s", 0, "m1", "k4v2", tokens, wrong_shape)
    stray = {**good, b"\xab" * 32: SegmentPayload(b"x", 1, 10)}
    with pytest.raises(InvalidArgument, match="not in this snapshot"):
        small.put_snapshot("acme", "s", 0, "m1", "k4v2", tokens, stray)
    with pytest.raises(InvalidArgument):
        small.put_snapshot("acme", "s", 0, "m1", "k4v2", tokens, {"zz": SegmentPayload(b"x", 1, 1)})
    with pytest.raises(InvalidArgument):
        small.put_snapshot("acme", "s", 0, "m1", "k4v2", [], {})
    assert small.savings()["stored_bytes"] == 0


@pytest.mark.parametrize(
    ("namespace", "session", "turn", "tokens"),
    [("", "s", 0, [1]), ("a:b", "s", 0, [1]), ("ok", "", 0, [1]), ("ok", "s\n", 0, [1]),
     ("ok", "s", -1, [1]), ("ok", "s", 1 << 32, [1]), ("ok", "s", 0, [-1]), ("ok", "s", 0, [1 << 32])],
)  # fmt: skip
def test_bad_identifiers_are_invalid_arguments(
    small: Store, namespace: str, session: str, turn: int, tokens: list[int]
) -> None:
    with pytest.raises(InvalidArgument):
        small.put_snapshot(namespace, session, turn, "m1", "k4v2", tokens, {})


def test_model_and_codec_mismatch_never_serve_wrong_kv(small: Store) -> None:
    tokens = random_tokens(8, B + 1)
    put(small, "acme", "s", 0, tokens, model="m1", codec="k4v2")
    with pytest.raises(MismatchError):
        small.get_snapshot("acme", "s", 0, model="m2")
    with pytest.raises(MismatchError):
        small.get_snapshot("acme", "s", 0, codec="k8v8")
    assert small.get_snapshot("acme", "s", 0, model="m1", codec="k4v2").token_ids == tokens
    with pytest.raises(MismatchError):
        small.plan_snapshot("acme", "s", "m2", "k4v2", [*tokens, 5], parent_turn=0)
    # Another model or codec never dedups against these blocks.
    other = small.plan_snapshot("acme", "s2", "m2", "k4v2", tokens)
    assert not any(s.present for s in other.segments)
    other = small.plan_snapshot("acme", "s2", "m1", "lossless", tokens)
    assert not any(s.present for s in other.segments)


def test_parent_must_exist_and_be_a_prefix(small: Store) -> None:
    tokens = random_tokens(9, B + 3)
    with pytest.raises(NotFound):
        small.plan_snapshot("acme", "s", "m1", "k4v2", tokens, parent_turn=0)
    put(small, "acme", "s", 0, tokens)
    changed = [*tokens[:-1], tokens[-1] + 1, 7]
    with pytest.raises(InvalidArgument, match="do not extend"):
        small.plan_snapshot("acme", "s", "m1", "k4v2", changed, parent_turn=0)
    with pytest.raises(InvalidArgument, match="more tokens"):
        small.plan_snapshot("acme", "s", "m1", "k4v2", tokens[:-1], parent_turn=0)


def test_put_is_idempotent_and_turns_are_immutable(small: Store) -> None:
    tokens = random_tokens(10, B + 2)
    put(small, "acme", "s", 0, tokens)
    before = small.savings()["stored_bytes"]
    again = put(small, "acme", "s", 0, tokens)
    assert again.existed and again.new_bytes == 0
    assert small.savings()["stored_bytes"] == before
    with pytest.raises(AlreadyExists):
        put(small, "acme", "s", 0, [*tokens, 1])


def test_namespaces_never_dedup_unless_shared(store_factory: Callable[..., Store]) -> None:
    store = store_factory(StoreConfig(block_size=B, shared_groups={"t1": "public", "t2": "public"}))
    tokens = random_tokens(11, 2 * B)
    put(store, "acme", "s", 0, tokens)
    assert not any(s.present for s in store.plan_snapshot("globex", "s", "m1", "k4v2", tokens).segments)
    assert store.has_blocks(
        "globex", [s.key for s in store.plan_snapshot("acme", "x", "m1", "k4v2", tokens).segments]
    ) == [False, False]
    put(store, "t1", "s", 0, tokens)
    shared = put(store, "t2", "s", 0, tokens)
    assert shared.new_segments == 0 and shared.reused_shared_segments == 2
    assert not any(s.present for s in store.plan_snapshot("acme2", "s", "m1", "k4v2", tokens).segments)
    report = store.savings()
    # Shared blocks count once store-wide, and in each member namespace as if it were alone.
    assert report["blocks"] == 4
    assert report["namespaces"]["t1"]["blocks"] == report["namespaces"]["t2"]["blocks"] == 2
    store.delete_session("t1", "s")
    assert store.get_snapshot("t2", "s", 0).token_ids == tokens
    assert verify_backend(store.backend).clean


def test_lookup_prefix_and_has_blocks(small: Store) -> None:
    tokens = random_tokens(12, 3 * B + 4)
    put(small, "acme", "s", 0, tokens)
    assert small.lookup_prefix("acme", "m1", "k4v2", tokens) == len(tokens)
    assert small.lookup_prefix("acme", "m1", "k4v2", tokens[: 2 * B + 1]) == 2 * B
    assert small.lookup_prefix("acme", "m1", "k4v2", [*tokens[:B], 1, 2]) == B
    assert small.lookup_prefix("acme", "m1", "k8v8", tokens) == 0
    assert small.lookup_prefix("other", "m1", "k4v2", tokens) == 0
    keys = [s.key for s in small.plan_snapshot("acme", "x", "m1", "k4v2", tokens).segments]
    assert small.has_blocks("acme", [*keys, bytes(32)]) == [True] * len(keys) + [False]


def test_list_snapshots(small: Store) -> None:
    put(small, "acme", "a", 0, [1, 2, 3])
    put(small, "acme", "a", 1, [1, 2, 3, 4], parent=0)
    put(small, "acme", "b", 5, [9])
    put(small, "other", "a", 0, [1])
    infos = small.list_snapshots("acme")
    assert [(i.session, i.turn, i.n_tokens, i.parent_turn) for i in infos] == [
        ("a", 0, 3, None),
        ("a", 1, 4, 0),
        ("b", 5, 1, None),
    ]
    assert [i.turn for i in small.list_snapshots("acme", "a")] == [0, 1]
    assert small.list_snapshots("nobody") == []


def test_corrupt_payload_is_detected_never_served(small: Store) -> None:
    tokens = random_tokens(13, B + 2)
    put(small, "acme", "s", 0, tokens)
    seg = small.plan_snapshot("acme", "x", "m1", "k4v2", tokens).segments[0]
    bkey = block_key("acme", seg.key)

    def flip(t) -> None:
        raw = bytearray(t.get("blocks", bkey))
        raw[-1] ^= 0x01
        t.put("blocks", bkey, bytes(raw))

    small.backend.transact(flip)
    with pytest.raises(ChecksumMismatch, match=seg.key.hex()):
        small.get_snapshot("acme", "s", 0)
    assert not verify_backend(small.backend).clean


def test_corrupt_token_ids_are_detected(small: Store) -> None:
    tokens = random_tokens(14, B + 2)
    put(small, "acme", "s", 0, tokens)
    seg = small.plan_snapshot("acme", "x", "m1", "k4v2", tokens).segments[1]
    bkey = block_key("acme", seg.key)

    def swap_tokens(t) -> None:
        meta, toks, payload = decode_block(t.get("blocks", bkey), seg.key.hex())
        evil = bytes(toks)[:-4] + (123).to_bytes(4, "little")
        t.put("blocks", bkey, encode_block(evil, bytes(payload), meta.fp16_nbytes))

    small.backend.transact(swap_tokens)
    with pytest.raises(ChecksumMismatch, match="token ids"):
        small.get_snapshot("acme", "s", 0)
