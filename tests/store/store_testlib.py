"""Helpers of the store tests: the backend registry and synthetic, deterministic segment payloads.

``BACKENDS`` maps an engine name to ``make(request, tmp_path) -> factory``, where
``factory(name="default") -> Backend`` opens the storage called ``name`` (the same name reopens
the same data: close the previous handle first). Every test using the ``backend_factory`` or
``store_factory`` fixtures runs on every engine listed; a new backend binds the whole suite
(contract and store tests) with one line here.
"""

from __future__ import annotations

import os
import random
from collections.abc import Callable, Sequence
from pathlib import Path

import blake3
import pytest
from redis_harness import redis_cluster_factory, redis_factory

from deltastore.backend import Backend
from deltastore.backends.lmdb_backend import LmdbBackend, LmdbConfig
from deltastore.store import Plan, PutResult, SegmentPayload, Store

BackendFactory = Callable[..., Backend]

# The folders of the store and backend suites' helpers: pytest's `pythonpath` puts them on the
# test process's path; worker subprocesses get them through PYTHONPATH (worker_env()).
HELPER_DIRS = [str(Path(__file__).resolve().parents[1] / name) for name in ("store", "backends")]


def worker_env() -> dict[str, str]:
    """The environment of a worker subprocess that imports these helpers."""
    inherited = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    return {**os.environ, "PYTHONPATH": os.pathsep.join([*HELPER_DIRS, *inherited])}


# Synthetic KV shape for payload metadata: FP16 bytes per token of SmolLM2-135M
# (30 layers x 2 (K,V) x 3 KV heads x 64 dims x 2 bytes), payloads 5x smaller (a K4V2-like tier).
FP16_PER_TOKEN = 30 * 2 * 3 * 64 * 2
PAYLOAD_PER_TOKEN = FP16_PER_TOKEN // 5


def lmdb_factory(_request: pytest.FixtureRequest, tmp_path: Path) -> BackendFactory:
    def make(name: str = "default") -> Backend:
        # A 1 MiB initial map, so the map-growth path runs in ordinary tests.
        return LmdbBackend(
            LmdbConfig(path=tmp_path / name, map_size=1 << 20, max_map_size=1 << 32, sync=False)
        )

    return make


BACKENDS: dict[str, Callable[[pytest.FixtureRequest, Path], BackendFactory]] = {
    "lmdb": lmdb_factory,
    "redis": redis_factory,
    "redis-cluster": redis_cluster_factory,
}


def payload_for(key: bytes, n_tokens: int) -> bytes:
    """Deterministic pseudo-random payload of a segment, so a test can predict what it reads back."""
    return blake3.blake3(key).digest(length=PAYLOAD_PER_TOKEN * n_tokens + 17)


def payloads(plan: Plan) -> dict[bytes, SegmentPayload]:
    """Payloads of the segments a plan reports missing."""
    return {
        s.key: SegmentPayload(payload_for(s.key, s.n_tokens), s.n_tokens, FP16_PER_TOKEN * s.n_tokens)
        for s in plan.missing
    }


def put(
    store: Store,
    namespace: str,
    session: str,
    turn: int,
    tokens: Sequence[int],
    parent: int | None = None,
    model: str = "m1",
    codec: str = "k4v2",
) -> PutResult:
    """Plan, encode (synthetically) and put one snapshot, as a client does."""
    plan = store.plan_snapshot(namespace, session, model, codec, tokens, parent)
    return store.put_snapshot(namespace, session, turn, model, codec, tokens, payloads(plan), parent)


def random_tokens(rng_seed: int, n: int) -> list[int]:
    rng = random.Random(rng_seed)
    return [rng.randrange(49152) for _ in range(n)]
