"""Damage stays local: a damaged or lost block record never stops deletes, TTL expiry or LRU eviction.

Before: ``_drop_snapshot`` raised on a record it could not parse (or one lost on a Redis failover)
inside TTL expiry and LRU eviction, which run in every put's transaction, so every tenant's puts
failed with DATA_LOSS and the damaged session could not be deleted either. Now the damaged record is
quarantined, the intact segments are freed as usual, and ``deltastore verify --repair`` drops what
depends on the damage and leaves a verified store.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import grpc
import pytest
from trust_helpers import BLOCK, MODEL, client, make_cache, tokens_for

from deltastore.manifest import block_key
from deltastore.server.app import Service
from deltastore.server.settings import ServerSettings
from deltastore.settings import StoreConfig
from deltastore.store import QUARANTINE_PREFIX, Store
from deltastore.verify import repair_backend, verify_backend

T0 = 1_900_000_000.0


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> float:
        return self.now


def _service(tmp_path: Path, config: StoreConfig, clock: Clock) -> Service:
    settings = ServerSettings(
        data_dir=tmp_path / "data", grpc_address="127.0.0.1:0", http_address="", grace_seconds=1.0
    )
    store = Store(Store.open(settings.data_dir).backend, config, clock=clock)
    return Service(settings, store=store).start()


def _blocks_of(store: Store, namespace: str, session: str, turn: int) -> list[bytes]:
    stream = store.open_snapshot(namespace, session, turn)
    return [block_key(namespace, seg.key) for seg in stream.segments]


def _damage(store: Store, victim_blocks: list[bytes]) -> None:
    flipped, lost = victim_blocks[0], victim_blocks[-1]
    with store.backend.read() as view:
        record = bytearray(view.get("blocks", flipped))
    record[0] ^= 0x01  # the record's version byte: the header no longer parses

    def tx(b):
        b.put("blocks", flipped, bytes(record))
        b.delete("blocks", lost)  # a payload lost in a failover: the manifest points at nothing

    store.backend.transact(tx)


@pytest.mark.parametrize("how", ["ttl", "lru", "delete"])
def test_damaged_records_stay_local(tmp_path: Path, how: str, reliability) -> None:
    clock = Clock()
    svc = _service(tmp_path, StoreConfig(block_size=BLOCK), clock)
    cache = make_cache(70, seed=1)
    try:
        with client(svc.grpc_port, None, "acme") as acme:
            acme.put_snapshot(
                "v0",
                0,
                tokens_for(1, 40),
                [(k[:, :40], v[:, :40]) for k, v in cache],
                model=MODEL,
                codec="k4v2",
            )
            acme.put_snapshot("v0", 1, tokens_for(1, 70), cache, model=MODEL, codec="k4v2", parent_turn=0)
            acme.put_snapshot("v1", 0, tokens_for(2, 70), cache, model=MODEL, codec="k4v2")
        victim = _blocks_of(svc.store, "acme", "v0", 1)
        intact_v1 = _blocks_of(svc.store, "acme", "v1", 0)
        stored_before = svc.store.savings()["stored_bytes"]
        _damage(svc.store, victim)
    finally:
        svc.stop()

    # The same store again, with the policy under test.
    config = {
        "ttl": StoreConfig(block_size=BLOCK, session_ttl_s=60),
        "lru": StoreConfig(block_size=BLOCK, max_stored_bytes=int(stored_before * 1.3)),
        "delete": StoreConfig(block_size=BLOCK),
    }[how]
    clock.now += 3600  # the victims are idle past the TTL
    svc = _service(tmp_path, config, clock)
    try:
        with client(svc.grpc_port, None, "acme") as acme, client(svc.grpc_port, None, "globex") as globex:
            if how != "ttl":  # (expired sessions read as absent) the damaged snapshot is DATA_LOSS
                with pytest.raises(grpc.RpcError) as err:
                    acme.get_snapshot("v0", 1, model=MODEL)
                assert err.value.code() is grpc.StatusCode.DATA_LOSS
            if how == "delete":
                acme.delete_session("v0")
            for i in range(4):  # other tenants' puts: expiry/eviction meets the damage in their tx
                clock.now += 1
                globex.put_snapshot(
                    f"g{i}", 0, tokens_for(10 + i, 70), make_cache(70, seed=10 + i), model=MODEL, codec="k4v2"
                )
            kept = [s.session for s in globex.list_snapshots()]
            # (under capacity, the namespace storing the most pays first: globex itself, later on)
            assert kept == ["g0", "g1", "g2", "g3"] if how != "lru" else kept[-1] == "g3"
            got = globex.get_snapshot("g3", 0, model=MODEL)
            assert got.n_tokens == 70
            left = {s.session for s in acme.list_snapshots()}
        assert "v0" not in left  # deleted, expired or evicted despite the damage
        with svc.store.backend.read() as view:
            quarantined = [bytes(k) for k, _ in view.scan("meta", QUARANTINE_PREFIX)]
            still = {k for k in victim if view.get("blocks", k) is not None}
            v1_still = [view.get("blocks", k) is not None for k in intact_v1]
        assert len(quarantined) == 2 and all(
            any(k in q for q in quarantined) for k in (victim[0], victim[-1])
        )
        assert not still, "intact segments of the dropped session were not freed"
        if how == "delete":
            assert all(v1_still) and "v1" in left  # nothing else of the tenant was touched
        report = verify_backend(svc.store.backend)
        assert not report.clean and any("quarantined" in p for p in report.problems)
    finally:
        data_dir = svc.settings.data_dir
        svc.stop()

    # Repair, then verify: clean; every surviving snapshot still reads bit-exact.
    if how == "lru":  # through the CLI, as an operator would
        done = subprocess.run(
            [sys.executable, "-m", "deltastore", "verify", "--repair", "--data-dir", str(data_dir)],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert done.returncode == 0, done.stdout + done.stderr
        assert "REPAIRED: removed quarantined record" in done.stdout and "clean" in done.stdout
    with Store.open(data_dir, StoreConfig(block_size=BLOCK)) as store:
        if how != "lru":
            repaired = repair_backend(store.backend)
            assert repaired.after.clean, repaired.after.problems
        assert verify_backend(store.backend).clean
        assert store.get_snapshot("globex", "g3", 0).info.n_tokens == 70
    reliability.record(
        f"a block record with a flipped version byte and one lost, then {how} "
        + {"ttl": "expiry", "lru": "eviction", "delete": "of the session"}[how],
        1,
        "damage quarantined; 4 puts of another tenant succeed; intact segments freed; repair -> verify clean",
    )


def test_repair_drops_snapshots_on_damaged_blocks(tmp_path: Path, reliability) -> None:
    """Damage found by verify (not yet met by a delete): repair drops exactly the dependent snapshots."""
    clock = Clock()
    svc = _service(tmp_path, StoreConfig(block_size=BLOCK), clock)
    try:
        with client(svc.grpc_port, None, "acme") as acme:
            for i in range(3):
                acme.put_snapshot(
                    f"s{i}", 0, tokens_for(20 + i, 50), make_cache(50, seed=i), model=MODEL, codec="k4v2"
                )
        victim = _blocks_of(svc.store, "acme", "s1", 0)
        _damage(svc.store, victim)
        before = verify_backend(svc.store.backend)
        assert not before.clean
        repaired = repair_backend(svc.store.backend)
        assert repaired.dropped_snapshots == ["acme/s1/0"] and repaired.after.clean, repaired.as_dict()
        assert verify_backend(svc.store.backend).clean
        with client(svc.grpc_port, None, "acme") as acme:
            assert sorted(s.session for s in acme.list_snapshots()) == ["s0", "s2"]
            assert acme.get_snapshot("s2", 0, model=MODEL).n_tokens == 50
    finally:
        svc.stop()
    reliability.record(
        "verify --repair on a store with a damaged and a lost block",
        1,
        "only the dependent snapshot dropped; verify clean; others readable",
    )
