"""Store put/get throughput and latency on LMDB, Redis and a Redis Cluster, as ratios to LMDB.

``deltastore bench backends --json PATH [--redis URL] [--cluster URL] [--sessions N] [--turns T]
[--threads K] [--durability os|fsync]`` runs one multi-turn chat workload through
:class:`~deltastore.store.Store` on each engine in the same run and writes the JSON, a markdown
table (PATH with .md) and a plot (PATH with .png).

Workload: ``--sessions`` conversations that share a system prompt, each ``--turns`` turns of
``--tokens-per-turn`` new tokens; a put is what a client does (plan, then put the missing
segments), a get reads the turn just written back whole with every digest checked. Payloads are
random bytes sized like SmolLM2-135M's KV under K4V2 (FP16 bytes per token / 5 by default), so
the engines move the bytes the real service moves; encoding is not measured here
(``bench codecs`` does). ``--threads`` clients run sessions concurrently; all puts run first,
then all gets (of every turn); throughput is per phase wall time, p50/p99 per operation.

Engines: an LMDB directory in a temporary folder; Redis and a 3-node Redis Cluster started on
loopback ports with redis-server (or the URLs given, under a fresh key prefix deleted after).
``--durability os`` (default) survives a crash of the DeltaStore process on every engine (LMDB
without fdatasync, Redis append-only with ``appendfsync everysec``); ``fsync`` survives power
loss (LMDB fdatasync per commit, ``appendfsync always``). Timings are reported as ratios to LMDB
measured in the same run; absolute numbers depend on the machine.
"""

from __future__ import annotations

import argparse
import json
import platform
import secrets
import statistics
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from deltastore.backend import Backend
    from deltastore.store import Plan, SegmentPayload, Store

__all__ = ["Workload", "add_arguments", "run", "run_benchmark"]

SMOLLM2_FP16_PER_TOKEN = 30 * 2 * 3 * 64 * 2  # layers x (K, V) x KV heads x head_dim x 2 bytes
ENGINES = ("lmdb", "redis", "redis-cluster")
MB = 1e6


@dataclass(frozen=True)
class Workload:
    """The chat workload every engine runs (sizes in tokens and bytes)."""

    sessions: int = 24
    turns: int = 4
    system_tokens: int = 128
    tokens_per_turn: int = 96
    block_size: int = 64
    fp16_per_token: int = SMOLLM2_FP16_PER_TOKEN
    compression: int = 5
    threads: int = 2

    @property
    def ops(self) -> int:
        return self.sessions * self.turns


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--json", type=Path, required=True, help="output JSON; .md and .png are written beside it"
    )
    parser.add_argument(
        "--redis", default="", help="redis:// URL to use (default: start a local redis-server)"
    )
    parser.add_argument(
        "--cluster", default="", help="redis+cluster:// URL to use (default: start a local 3-node cluster)"
    )
    parser.add_argument("--sessions", type=int, default=Workload.sessions, help="conversations (default 24)")
    parser.add_argument(
        "--turns", type=int, default=Workload.turns, help="turns per conversation (default 4)"
    )
    parser.add_argument(
        "--tokens-per-turn",
        type=int,
        default=Workload.tokens_per_turn,
        help="new tokens per turn (default 96)",
    )
    parser.add_argument(
        "--threads", type=int, default=Workload.threads, help="concurrent clients (default 2)"
    )
    parser.add_argument(
        "--durability", choices=("os", "fsync"), default="os", help="crash-safe (os, default) or power-safe"
    )


def _tokens(session: int, n: int, system: int) -> list[int]:
    import random

    rng = random.Random(session)
    return list(range(system)) + [rng.randrange(49152) for _ in range(n - system)]


def _payloads(plan: Plan, w: Workload) -> dict[bytes, SegmentPayload]:
    import blake3

    from deltastore.store import SegmentPayload

    per_token = w.fp16_per_token // w.compression
    return {
        s.key: SegmentPayload(
            blake3.blake3(s.key).digest(length=per_token * s.n_tokens),
            s.n_tokens,
            w.fp16_per_token * s.n_tokens,
        )
        for s in plan.missing
    }


def _parallel(
    w: Workload, fn: Callable[[int, int], tuple[float, int]], tick: Callable[[], None]
) -> dict[str, float]:
    """Run ``fn(session, turn) -> (seconds, payload bytes)`` over the workload on ``w.threads`` clients.

    Each client takes every ``threads``-th session and runs its turns in order. Throughput is
    operations (and payload bytes) over the phase's wall time; latencies are per operation.
    """
    lat: list[float] = []
    moved = 0
    lock = threading.Lock()
    errors: list[BaseException] = []

    def client(shard: int) -> None:
        nonlocal moved
        try:
            for s in range(shard, w.sessions, w.threads):
                for turn in range(w.turns):
                    seconds, nbytes = fn(s, turn)
                    with lock:
                        lat.append(seconds)
                        moved += nbytes
                        tick()
        except BaseException as exc:  # re-raised in the caller's thread
            errors.append(exc)

    start = time.perf_counter()
    threads = [threading.Thread(target=client, args=(i,)) for i in range(w.threads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    if errors:
        raise errors[0]
    ordered = sorted(lat)
    return {
        "ops_per_s": len(lat) / wall,
        "mb_per_s": moved / MB / wall,
        "p50_ms": statistics.median(ordered) * 1e3,
        "p99_ms": ordered[min(len(ordered) - 1, round(0.99 * (len(ordered) - 1)))] * 1e3,
        "wall_s": wall,
    }


def _drive(open_store: Callable[[], Store], w: Workload, tick: Callable[[], None]) -> dict[str, Any]:
    """Put every turn of every session (as a client: plan, payloads, put), then get each back.

    The gets go through a freshly opened store, as through another server of a deployment: no
    process-local cache of the writer helps them.
    """
    store = open_store()

    def put(s: int, turn: int) -> tuple[float, int]:
        tokens = _tokens(s, w.system_tokens + (turn + 1) * w.tokens_per_turn, w.system_tokens)
        parent = turn - 1 if turn else None
        t0 = time.perf_counter()
        plan = store.plan_snapshot("bench", f"s{s}", "m", "k4v2", tokens, parent)
        payloads = _payloads(plan, w)  # BLAKE3 output: ~0.1 ms per turn, the client's encode stand-in
        store.put_snapshot("bench", f"s{s}", turn, "m", "k4v2", tokens, payloads, parent)
        return time.perf_counter() - t0, sum(len(p.data) for p in payloads.values())

    def get(s: int, turn: int) -> tuple[float, int]:
        t0 = time.perf_counter()
        snap = reader.get_snapshot("bench", f"s{s}", turn)
        return time.perf_counter() - t0, snap.payload_bytes

    try:
        puts = _parallel(w, put, tick)
    finally:
        store.close()
    reader = open_store()
    try:
        return {"put": puts, "get": _parallel(w, get, tick), "savings_ratio": reader.savings()["ratio"]}
    finally:
        reader.close()


@contextmanager
def _engines(args: argparse.Namespace, root: Path) -> Iterator[dict[str, Callable[[], Backend]]]:
    """Openers of a fresh backend per engine (local servers started as needed, stopped after)."""
    from deltastore.backends.lmdb_backend import LmdbBackend, LmdbConfig
    from deltastore.backends.redis import RedisBackend
    from deltastore.bench.redis_local import LocalRedis, LocalRedisCluster

    fsync = "always" if args.durability == "fsync" else "everysec"
    prefix = f"bench-{secrets.token_hex(4)}"
    with ExitStack() as stack:
        redis_url = args.redis or stack.enter_context(LocalRedis(root / "redis", appendfsync=fsync)).url
        cluster_url = (
            args.cluster or stack.enter_context(LocalRedisCluster(root / "cluster", appendfsync=fsync)).url
        )

        def redis_opener(url: str) -> Callable[[], Backend]:
            full = f"{url}{'&' if '?' in url else '?'}prefix={prefix}"
            opened: list[str] = []

            def destroy() -> None:
                with RedisBackend.from_url(full) as backend:
                    backend.destroy()

            def open_() -> Backend:
                if not opened:
                    stack.callback(destroy)  # runs before the local servers stop
                    opened.append(full)
                return RedisBackend.from_url(full)

            return open_

        yield {
            "lmdb": lambda: LmdbBackend(LmdbConfig(path=root / "lmdb", sync=args.durability == "fsync")),
            "redis": redis_opener(redis_url),
            "redis-cluster": redis_opener(cluster_url),
        }


def run_benchmark(args: argparse.Namespace, w: Workload) -> dict[str, Any]:
    from tqdm import tqdm

    from deltastore.settings import StoreConfig
    from deltastore.store import Store

    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="deltastore-bench-") as tmp, _engines(args, Path(tmp)) as engines:
        bar = tqdm(total=2 * w.ops * len(ENGINES), desc="backends", unit="op")
        for name in ENGINES:
            bar.set_postfix_str(name)
            opener = engines[name]
            results[name] = _drive(
                lambda opener=opener: Store(opener(), StoreConfig(block_size=w.block_size)), w, bar.update
            )
        bar.close()
    ref = results["lmdb"]
    for name in ENGINES:
        for op in ("put", "get"):
            r = results[name][op]
            r["throughput_vs_lmdb"] = r["ops_per_s"] / ref[op]["ops_per_s"]
            r["p99_vs_lmdb"] = r["p99_ms"] / ref[op]["p99_ms"]
    for op in ("put", "get"):
        results["redis-cluster"][op]["throughput_vs_redis"] = (
            results["redis-cluster"][op]["ops_per_s"] / results["redis"][op]["ops_per_s"]
        )
    return {
        "benchmark": "backends",
        "workload": w.__dict__ | {"payload_bytes_per_token": w.fp16_per_token // w.compression},
        "durability": args.durability,
        "redis": args.redis or "local redis-server",
        "cluster": args.cluster or "local 3-node cluster",
        "machine": {"platform": platform.platform(), "python": platform.python_version()},
        "results": results,
    }


def markdown(doc: dict[str, Any]) -> str:
    w = doc["workload"]
    lines = [
        f"Backends: {w['sessions']} sessions x {w['turns']} turns of {w['tokens_per_turn']} tokens, "
        f"{w['threads']} clients, durability {doc['durability']}; ratios to LMDB in the same run.",
        "",
        "| engine | put turns/s | put MB/s | put p99 ms | put x LMDB | get turns/s | get MB/s | get p99 ms | get x LMDB |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in doc["results"].items():
        p, g = r["put"], r["get"]
        lines.append(
            f"| {name} | {p['ops_per_s']:.1f} | {p['mb_per_s']:.1f} | {p['p99_ms']:.1f} | "
            f"{p['throughput_vs_lmdb']:.2f} | {g['ops_per_s']:.1f} | {g['mb_per_s']:.1f} | "
            f"{g['p99_ms']:.1f} | {g['throughput_vs_lmdb']:.2f} |"
        )
    return "\n".join(lines) + "\n"


def plot(doc: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(doc["results"])
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, key, title in (
        (axes[0], "throughput_vs_lmdb", "throughput (x LMDB)"),
        (axes[1], "p99_ms", "p99 latency (ms)"),
    ):
        for i, op in enumerate(("put", "get")):
            values = [doc["results"][n][op][key] for n in names]
            ax.bar([x + 0.4 * i for x in range(len(names))], values, width=0.4, label=op)
        ax.set_xticks([x + 0.2 for x in range(len(names))], names)
        ax.set_title(title)
        ax.legend()
    fig.suptitle("DeltaStore backends: one multi-turn workload")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run(args: argparse.Namespace) -> int:
    from deltastore.errors import InvalidArgument

    w = Workload(
        sessions=args.sessions, turns=args.turns, tokens_per_turn=args.tokens_per_turn, threads=args.threads
    )
    if min(w.sessions, w.turns, w.tokens_per_turn, w.threads) <= 0 or w.threads > w.sessions:
        raise InvalidArgument(
            "sessions, turns, tokens-per-turn and threads must be positive; threads <= sessions"
        )
    doc = run_benchmark(args, w)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(doc, indent=2) + "\n")
    table = markdown(doc)
    args.json.with_suffix(".md").write_text(table)
    plot(doc, args.json.with_suffix(".png"))
    print(table)
    return 0
