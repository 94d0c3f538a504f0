"""Drive one workload through the running service: concurrent users, turn after turn, real client.

Each user's turn is what an inference worker does: restore the previous turn's cache
(``GetSnapshot`` + decode; sampled, see ``get_users``), then store the new turn
(``PutSnapshot``: plan, encode only the missing segments, stream them). Latencies are per call,
from the worker's side; the store's own savings counters give the bytes.
"""

from __future__ import annotations

import dataclasses
import statistics
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from deltastore.bench.serving_workload import Scenario
from deltastore.errors import InvalidArgument

__all__ = ["CacheSource", "CallStats", "drive", "percentile"]

CacheSource = Callable[[int, int, Sequence[tuple[int, int]]], Any]
"""``(user, n_tokens, ranges) -> cache``: the user's KV of its first ``n_tokens`` tokens, with at
least the token ranges ``[start, end)`` filled (those the store reported missing)."""

Check = Callable[[int, Any], None]
"""``(user, restored) -> None``: raises when a restored snapshot is not what was stored."""


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (integer q in 1..99) by linear interpolation; 0.0 for no values."""
    if not 1 <= q <= 99:
        raise InvalidArgument(f"percentile {q} outside 1..99")
    if len(values) < 2:
        return float(values[0]) if values else 0.0
    return float(statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1])


@dataclasses.dataclass
class CallStats:
    """Latencies (seconds) and bytes of one kind of call."""

    seconds: list[float] = dataclasses.field(default_factory=list)
    payload_bytes: int = 0
    logical_bytes: int = 0

    def add(self, seconds: float, payload: int, logical: int) -> None:
        self.seconds.append(seconds)
        self.payload_bytes += payload
        self.logical_bytes += logical

    def summary(self) -> dict[str, float]:
        """GB/s per call stream (bytes over the summed call time) and p50/p99 in ms."""
        busy = sum(self.seconds)
        return {
            "calls": len(self.seconds),
            "payload_bytes": self.payload_bytes,
            "logical_bytes": self.logical_bytes,
            "gbps": self.payload_bytes / busy / 1e9 if busy else 0.0,
            "logical_gbps": self.logical_bytes / busy / 1e9 if busy else 0.0,
            "p50_ms": percentile(self.seconds, 50) * 1e3,
            "p99_ms": percentile(self.seconds, 99) * 1e3,
        }


@dataclasses.dataclass
class DriveResult:
    put: CallStats
    get: CallStats
    sent_bytes: int
    reused_shared_bytes: int
    reused_temporal_bytes: int
    wall_s: float


def drive(
    client: Any,
    scenario: Scenario,
    tokens: Sequence[Sequence[int]],
    source: CacheSource,
    *,
    model: str,
    concurrency: int,
    get_users: int,
    check: Check | None = None,
    progress: Callable[[int], None] = lambda _n: None,
) -> DriveResult:
    """Run every turn of every user of ``scenario`` against ``client``'s namespace.

    Args:
        client: a :class:`deltastore.client.DeltaStoreClient` (thread-safe, shared by workers).
        tokens: per user, the final token ids of the conversation.
        source: where each user's KV comes from.
        model: the model fingerprint snapshots are stored under.
        concurrency: users served at once (threads sharing the client's channel).
        get_users: users (the first ones) that restore their previous turn before each turn; a
            worker that still holds the cache in memory does not restore it.
        check: validates restored snapshots (e.g. bit-exactness of lossless tiers).
        progress: called with 1 after every user-turn.
    """
    if len(tokens) != scenario.users:
        raise InvalidArgument(f"{len(tokens)} token lists for {scenario.users} users")
    put, get = CallStats(), CallStats()
    totals = {"sent": 0, "shared": 0, "temporal": 0}
    lock = threading.Lock()

    def one(user: int, turn: int) -> None:
        session = f"user-{user:05d}"
        n = scenario.turn_context(turn)
        if turn > 0 and user < get_users:
            t0 = time.perf_counter()
            restored = client.get_snapshot(
                session, turn - 1, model=model, codec=scenario.codec, as_cache=False
            )
            elapsed = time.perf_counter() - t0
            if restored.n_tokens != scenario.turn_context(turn - 1):
                raise InvalidArgument(f"{session} turn {turn - 1}: restored {restored.n_tokens} tokens")
            if check is not None:
                check(user, restored)
            with lock:
                get.add(elapsed, restored.payload_bytes, restored.logical_bytes)
        ids = list(tokens[user][:n])
        parent = turn - 1 if turn > 0 else None
        plan = client.plan_snapshot(session, ids, model=model, codec=scenario.codec, parent_turn=parent)
        cache = source(user, n, [(s.start, s.end) for s in plan.missing])
        t0 = time.perf_counter()
        result = client.put_snapshot(
            session, turn, ids, cache, model=model, codec=scenario.codec, parent_turn=parent
        )
        elapsed = time.perf_counter() - t0
        with lock:
            put.add(elapsed, result.sent_bytes, result.logical_bytes)
            totals["sent"] += result.sent_bytes
            totals["shared"] += result.reused_shared_bytes
            totals["temporal"] += result.reused_temporal_bytes
        progress(1)

    t_start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="bench-user") as pool:
        for turn in range(scenario.turns):
            # Turn-major: every user finishes turn t before any starts t+1, as in a live chat fleet.
            for fut in [pool.submit(one, u, turn) for u in range(scenario.users)]:
                fut.result()
    return DriveResult(
        put, get, totals["sent"], totals["shared"], totals["temporal"], time.perf_counter() - t_start
    )
