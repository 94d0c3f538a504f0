"""Multi-user, multi-turn workloads through the running service: measured savings and speed.

(Longer than our ~500-line aim on purpose: it is the one driver of a benchmark whose phases share
one server, one progress bar and one JSON document; the workload, the processes and ceilings, the
drive loop and the report already live in ``serving_workload``, ``serving_refs``,
``serving_drive`` and ``serving_report``.)

``deltastore bench serving [--quick] [--target HOST:PORT] --json PATH`` starts a DeltaStore
server in a child process (or uses ``--target``) and drives it with concurrent simulated users
through the real client over gRPC: the report's 100-user scenarios (shared system prompt of
500 / 2K / 3K / 3.5K tokens, 4K-token context, several turns of ~50 tokens) for each tier, a small
run on real SmolLM2 KV, restore vs recompute, and growth with users and context. It writes the
JSON, a markdown table (PATH with .md) and two plots (PATH with -ratio.png, -throughput.png).

KV is synthetic but honest about dedup (see :mod:`deltastore.bench.serving_workload`): identical
prefixes give identical KV, different ones different KV. Ratios are the store's own counters
(logical FP16 bytes of all live snapshots / every stored byte), checked against the workload's
token arithmetic and, when the benchmark owns the server, recomputed from the data directory
after the server stops (``deltastore verify``'s recount).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time
import uuid
from collections.abc import Callable
from contextlib import ExitStack
from importlib import resources
from pathlib import Path
from typing import Any

from deltastore.bench.serving_workload import KVShape, Scenario
from deltastore.errors import InvalidArgument

__all__ = ["REPORT_RATIOS", "add_arguments", "build_scenarios", "run", "run_benchmark"]

REPORT_RATIOS: dict[int, float] = {500: 6.7, 2048: 31.0, 3072: 55.0, 3584: 62.0}
"""The report's "Effective Ratio" for 100 users, 4K context, Conservative (K4V2, 6.2x), by prefix."""
REPORT_CODEC_RATIO = 6.2
REPORT_THREE_LAYER = (28.0, 113.0)
TIERS = ("fp16", "lossless", "k4v4", "k4v2", "k4v2-pe50")
FLAGSHIP_CODEC = "k4v2-pe50"
REPORT_TIER = "k4v2"
SYNTHETIC_MODEL = "synthetic-mistral-7b-kv"
MISTRAL_7B = KVShape(32, 8, 128)
CHUNK_BYTES = 1 << 20


@dataclasses.dataclass(frozen=True)
class Config:
    """What one run measures; ``--quick`` and the full run differ only here."""

    users: int
    context: int
    prefixes: tuple[int, ...]
    tier_prefix: int
    codecs: tuple[str, ...]
    turns: int
    turn_tokens: int
    layers: int
    flagship_layers: int
    flagship_get_users: int
    growth_users: tuple[int, ...]
    growth_contexts: tuple[int, ...]
    growth_codec: str
    reference_tokens: int
    restore_tokens: int
    real_users: int
    real_prefix: int
    real_context: int


FULL = Config(
    users=100,
    context=4096,
    prefixes=(500, 2048, 3072, 3584),
    tier_prefix=3584,
    codecs=TIERS,
    turns=4,
    turn_tokens=50,
    layers=1,
    flagship_layers=32,
    flagship_get_users=2,
    growth_users=(10, 100, 1000),
    growth_contexts=(1024, 4096, 16384),
    growth_codec="fp16",
    reference_tokens=1024,
    restore_tokens=2048,
    real_users=4,
    real_prefix=256,
    real_context=640,
)
QUICK = Config(
    users=4,
    context=256,
    prefixes=(96, 128),
    tier_prefix=128,
    codecs=("lossless", "k4v2"),
    turns=3,
    turn_tokens=20,
    layers=2,
    flagship_layers=0,
    flagship_get_users=0,
    growth_users=(2, 4, 8),
    growth_contexts=(),
    growth_codec="k4v2",
    reference_tokens=64,
    restore_tokens=0,
    real_users=0,
    real_prefix=0,
    real_context=0,
)


def build_scenarios(cfg: Config, *, full_shape: bool = False) -> tuple[list[Scenario], list[Scenario]]:
    """Every prefix with the report's tier, every tier at ``tier_prefix``, the full-shape flagship
    (when ``full_shape``), and the growth series."""
    shape = dataclasses.replace(MISTRAL_7B, layers=cfg.layers)
    common = {"turns": cfg.turns, "turn_tokens": cfg.turn_tokens}
    pairs = [(p, REPORT_TIER) for p in cfg.prefixes if p != cfg.tier_prefix]
    pairs += [(cfg.tier_prefix, codec) for codec in cfg.codecs]
    main = [
        Scenario(f"p{p}-{codec}", cfg.users, p, cfg.context, codec, shape=shape, **common)
        for p, codec in pairs
    ]
    if full_shape and cfg.flagship_layers:
        full = dataclasses.replace(MISTRAL_7B, layers=cfg.flagship_layers)
        p = cfg.tier_prefix
        main.append(
            Scenario(
                f"p{p}-{FLAGSHIP_CODEC}-7b", cfg.users, p, cfg.context, FLAGSHIP_CODEC, shape=full, **common
            )
        )
    growth_common = {"turns": 2, "turn_tokens": cfg.turn_tokens, "shape": shape}
    points = [(u, cfg.context) for u in cfg.growth_users]
    points += [(cfg.users, c) for c in cfg.growth_contexts if c != cfg.context]
    growth = [
        Scenario(f"g-u{u}-c{c}", u, c * 7 // 8, c, cfg.growth_codec, **growth_common) for u, c in points
    ]
    return main, growth


def codec_ratio(codec: str, shape: KVShape, tokens: int = 4096) -> float | None:
    """FP16 / payload bytes of one block of ``tokens`` tokens; None when data-dependent (zstd)."""
    from deltastore.codecs import CodecSpec, encoded_nbytes

    spec = CodecSpec.parse(codec)
    if spec.entropy or spec.kind == "lossless":
        return None
    size = encoded_nbytes(
        spec, n_layers=shape.layers, kv_heads=shape.kv_heads, head_dim=shape.head_dim, n_tokens=tokens
    )
    return tokens * shape.token_fp16_bytes / size


def report_formula_ratio(s: Scenario, codec: float = REPORT_CODEC_RATIO) -> float:
    """What the report's own assumptions give (codec x prefix sharing, latest turn only).

    ``c * U * C / (P + U * (C - P))``: U users of C tokens, one shared P-token prefix.
    """
    return (
        codec
        * s.users
        * s.context_tokens
        / (s.prefix_tokens + s.users * (s.context_tokens - s.prefix_tokens))
    )


# -- scenario runs -----------------------------------------------------------------------------


def _synthetic_run(
    target: str, namespace: str, s: Scenario, args: argparse.Namespace, get_users: int, bar: Any
) -> dict[str, Any]:
    """One synthetic scenario through the service; the figures of its namespace."""
    import torch

    from deltastore.bench.serving_drive import drive
    from deltastore.bench.serving_workload import SyntheticKV, TokenChain, conversation_tokens
    from deltastore.client import DeltaStoreClient

    tokens = [conversation_tokens(s, u) for u in range(s.users)]
    chains = [TokenChain(t) for t in tokens]
    synth = SyntheticKV(s.shape, args.device)
    exact = s.codec in ("fp16", "lossless")

    def check(user: int, restored: Any) -> None:
        # Bit-exact tiers must give back exactly the KV of the last restored token.
        last = restored.n_tokens - 1
        want = synth.tokens_kv([chains[user].hashes[last]])[0, 0]  # layer 0: (2, heads, dim)
        got_k, got_v = restored.layers[0]
        if not (torch.equal(got_k[:, last], want[0]) and torch.equal(got_v[:, last], want[1])):
            raise InvalidArgument(f"{s.name}: user {user} restored KV differs from what was stored")

    with DeltaStoreClient(target, namespace=namespace, timeout=600) as client:
        result = drive(
            client,
            s,
            tokens,
            lambda u, n, ranges: synth.cache(chains[u], n, ranges),
            model=f"{SYNTHETIC_MODEL}/{s.shape.label()}",
            concurrency=args.concurrency,
            get_users=min(get_users, s.users),
            check=check if exact else None,
            progress=bar.update,
        )
        savings = client.savings(namespace)
    return _figures(s, result, savings)


def _figures(s: Scenario, result: Any, savings: dict[str, Any]) -> dict[str, Any]:
    want_logical = s.logical_tokens * s.shape.token_fp16_bytes
    if savings["logical_bytes"] != want_logical:
        raise InvalidArgument(
            f"{s.name}: the store counts {savings['logical_bytes']} logical bytes, the workload "
            f"{want_logical} ({s.logical_tokens} tokens x {s.shape.token_fp16_bytes})"
        )
    layers = savings["layers"]
    c_ratio = codec_ratio(s.codec, s.shape)
    put, get = result.put.summary(), result.get.summary()
    return {
        "name": s.name,
        "users": s.users,
        "prefix_tokens": s.prefix_tokens,
        "context_tokens": s.context_tokens,
        "turns": s.turns,
        "turn_tokens": s.turn_tokens,
        "codec": s.codec,
        "shape": s.shape.label(),
        "logical_tokens": s.logical_tokens,
        "unique_tokens": s.unique_tokens,
        "logical_bytes": savings["logical_bytes"],
        "stored_bytes": savings["stored_bytes"],
        "effective_ratio": savings["ratio"],
        "layers": dict(layers),
        "two_layer_ratio": layers["codec"] * layers["prefix_dedup"],
        "codec_ratio_nominal": c_ratio,
        "ratio_bound": s.ratio_bound(c_ratio) if c_ratio else None,
        "report_ratio": REPORT_RATIOS.get(s.prefix_tokens)
        if s.users == 100 and s.context_tokens == 4096
        else None,
        "report_formula_ratio": report_formula_ratio(s),
        "sent_bytes": result.sent_bytes,
        "reused_shared_bytes": result.reused_shared_bytes,
        "reused_temporal_bytes": result.reused_temporal_bytes,
        "put_gbps": put["gbps"],
        "put_logical_gbps": put["logical_gbps"],
        "put_p50_ms": put["p50_ms"],
        "put_p99_ms": put["p99_ms"],
        "put_calls": put["calls"],
        "get_gbps": get["gbps"],
        "get_logical_gbps": get["logical_gbps"],
        "get_p50_ms": get["p50_ms"],
        "get_p99_ms": get["p99_ms"],
        "get_calls": get["calls"],
        "wall_s": result.wall_s,
    }


def _real_kv_run(
    target: str,
    namespace: str,
    model: Any,
    tok: Any,
    text: str,
    cfg: Config,
    args: argparse.Namespace,
    bar: Any,
) -> dict[str, Any]:
    """A small run on real SmolLM2 KV: users share a real system prompt, then talk about other text."""
    import torch

    from deltastore.bench.serving_drive import drive
    from deltastore.client import DeltaStoreClient
    from deltastore.client.cache import as_layers
    from deltastore.client.models import model_fingerprint

    conf = model.config
    shape = KVShape(
        conf.num_hidden_layers,
        conf.num_key_value_heads,
        getattr(conf, "head_dim", None) or conf.hidden_size // conf.num_attention_heads,
    )
    s = Scenario(
        "smollm2-real-k4v2",
        cfg.real_users,
        cfg.real_prefix,
        cfg.real_context,
        "k4v2",
        turns=cfg.turns,
        turn_tokens=cfg.turn_tokens,
        shape=shape,
    )
    ids = tok(text).input_ids
    own = s.context_tokens - s.prefix_tokens
    needed = s.prefix_tokens + 1024 + s.users * own
    if len(ids) < needed:
        raise InvalidArgument(f"the text has {len(ids)} tokens; the real-KV run needs {needed}")
    tokens = [ids[: s.prefix_tokens] + ids[s.prefix_tokens + 1024 + u * own :][:own] for u in range(s.users)]
    caches = []
    with torch.no_grad():
        for t in tokens:
            out = model(input_ids=torch.tensor([t]), use_cache=True)
            caches.append(as_layers(out.past_key_values))
    with DeltaStoreClient(target, namespace=namespace, timeout=600) as client:
        result = drive(
            client,
            s,
            tokens,
            lambda u, n, _ranges: [(k[:, :n], v[:, :n]) for k, v in caches[u]],
            model=model_fingerprint(model),
            concurrency=args.concurrency,
            get_users=s.users,
            progress=bar.update,
        )
        savings = client.savings(namespace)
    return _figures(s, result, savings)


# -- references and restore vs recompute -------------------------------------------------------


def _reference(target: str, run_id: str, cfg: Config, bar: Any, shm_dir: str | None = None) -> dict[str, Any]:
    """memcpy, the raw gRPC stream and the store path (no codec) on the same payload bytes.

    Put and Get go the way the clients send them (:class:`PayloadCalls`: hand-serialized chunks
    out, chunks read as views in), so the ratios to the raw stream are what a worker gets. With
    the server's ``shm_dir`` (a self-hosted server), GetSnapshotShm too: timed until the file is
    mapped with every page present, what a decode reads from (the stream's is the joined bytes)."""
    import grpc

    from deltastore.bench.serving_refs import RawStream, disk_sync_seconds, memcpy_gbps
    from deltastore.bench.serving_workload import SyntheticKV, TokenChain, conversation_tokens
    from deltastore.client import DeltaStoreClient
    from deltastore.client.shm import mapped_payloads
    from deltastore.client.sync import channel_options
    from deltastore.client.wire import PayloadCalls, encode_missing, put_requests, read_snapshot_stream
    from deltastore.v1 import deltastore_pb2 as pb
    from deltastore.v1 import deltastore_pb2_grpc as pb_grpc

    shape = MISTRAL_7B
    s = Scenario("ref", 1, 0, cfg.reference_tokens, "fp16", turns=1, shape=shape)
    ids = conversation_tokens(s, 0)
    cache = SyntheticKV(shape).cache(TokenChain(ids), len(ids), [(0, len(ids))])
    model = f"{SYNTHETIC_MODEL}/{shape.label()}"
    repeats = 3
    put_s, get_s, shm_s, disk_s, payloads = [], [], [], [], []
    channel = grpc.insecure_channel(target, channel_options(64 << 20))
    calls = PayloadCalls(channel)
    stub = pb_grpc.DeltaStoreStub(channel)
    try:
        for i in range(repeats):
            # A fresh namespace is a fresh dedup domain: every byte is new and written.
            ns = f"{run_id}-ref{i}"
            with DeltaStoreClient(target, namespace=ns) as client:
                plan = client.plan_snapshot("ref", ids, model=model, codec="fp16")
            if not payloads:
                payloads = list(encode_missing(plan, cache, len(ids)).values())
            keyed = {seg.key: p for seg, p in zip(plan.segments, payloads, strict=True)}
            header = pb.SnapshotHeader(
                namespace=ns, session="ref", turn=0, model=model, codec=plan.codec, token_ids=ids
            )
            t0 = time.perf_counter()
            calls.put(put_requests(header, keyed, CHUNK_BYTES, serialized=True), timeout=600)
            put_s.append(time.perf_counter() - t0)
            # Right after the put's commit: virtual disks absorb a burst in a write-back cache,
            # which a write right after another one does not get either.
            disk_s.append(disk_sync_seconds(payloads))
            req = pb.GetSnapshotRequest(namespace=ns, session="ref", turn=0)
            t0 = time.perf_counter()
            _info, got = read_snapshot_stream(calls.get(req, timeout=600), 1 << 34)
            get_s.append(time.perf_counter() - t0)
            if got != payloads:
                raise InvalidArgument("GetSnapshot returned other bytes than were put")
            if shm_dir is not None:
                t0 = time.perf_counter()
                reply = stub.GetSnapshotShm(req, timeout=600)
                with mapped_payloads(shm_dir, reply, 1 << 34) as views:
                    shm_s.append(time.perf_counter() - t0)  # every page mapped, ready to decode
                    if [bytes(v) for v in views] != payloads:
                        raise InvalidArgument("GetSnapshotShm returned other bytes than were put")
            bar.update(1)
    finally:
        channel.close()
    total = sum(len(p) for p in payloads)
    with RawStream() as raw:
        send_s = min(raw.send(payloads, CHUNK_BYTES) for _ in range(repeats))
        recv_s = min(raw.receive(total, CHUNK_BYTES) for _ in range(repeats))
    bar.update(1)
    return {
        "payload_bytes": total,
        "segments": len(payloads),
        "chunk_bytes": CHUNK_BYTES,
        "memcpy_gbps": memcpy_gbps(total),
        "disk_sync_gbps": total / min(disk_s) / 1e9,
        "grpc_stream_gbps": total / send_s / 1e9,
        "grpc_stream_receive_gbps": total / recv_s / 1e9,
        "store_put_gbps": total / min(put_s) / 1e9,
        "store_get_gbps": total / min(get_s) / 1e9,
        **({"store_get_shm_gbps": total / min(shm_s) / 1e9} if shm_s else {}),
    }


def _restore_vs_recompute(
    target: str, namespace: str, model: Any, tok: Any, text: str, n_tokens: int, bar: Any
) -> dict[str, Any]:
    """Prefill ``n_tokens`` real tokens vs GetSnapshot + decode of their cache, per tier."""
    import torch

    from deltastore.client import DeltaStoreClient

    ids = tok(text).input_ids[:n_tokens]
    if len(ids) < n_tokens:
        raise InvalidArgument(f"the text has {len(ids)} tokens, restore vs recompute needs {n_tokens}")
    x = torch.tensor([ids])
    recompute, cache = [], None
    with torch.no_grad():
        model(input_ids=x[:, :32])  # warm-up
        for _ in range(2):
            t0 = time.perf_counter()
            cache = model(input_ids=x, use_cache=True).past_key_values
            recompute.append(time.perf_counter() - t0)
    bar.update(1)
    rows = []
    with DeltaStoreClient(target, namespace=namespace, timeout=600) as client:
        for codec in ("fp16", "lossless", "k4v2", "k4v2-pe50"):
            client.put_snapshot(f"restore-{codec}", 0, ids, cache, model=model, codec=codec)
            times = []
            for _ in range(3):
                t0 = time.perf_counter()
                restored = client.get_snapshot(f"restore-{codec}", 0, model=model, as_cache=True)
                times.append(time.perf_counter() - t0)
            best = min(times)
            rows.append(
                {
                    "codec": codec,
                    "payload_bytes": restored.payload_bytes,
                    "logical_bytes": restored.logical_bytes,
                    "restore_s": best,
                    "speedup": min(recompute) / best,
                }
            )
            bar.update(1)
    return {
        "model": getattr(model.config, "name_or_path", ""),
        "tokens": n_tokens,
        "threads": torch.get_num_threads(),
        "recompute_s": min(recompute),
        "tiers": rows,
    }


# -- the run -------------------------------------------------------------------------------------


def _recount(data_dir: Path, namespaces: dict[str, str], verify: bool) -> dict[str, Any]:
    """Savings recomputed from the stopped server's data directory (and a full verify)."""
    from deltastore.backends.lmdb_backend import LmdbBackend, LmdbConfig
    from deltastore.store import Store
    from deltastore.verify import verify_backend

    with Store(LmdbBackend(LmdbConfig(path=data_dir))) as store:
        found = {name: store.savings(ns) for name, ns in namespaces.items()}
        out: dict[str, Any] = {
            "ratios": {name: sv["ratio"] for name, sv in found.items()},
            "stored": {name: sv["stored"] for name, sv in found.items()},
        }
        if verify:
            report = verify_backend(store.backend)
            out["verify"] = {
                "clean": report.clean,
                "problems": report.problems[:20],
                "checked": report.checked,
            }
    return out


def run_benchmark(args: argparse.Namespace) -> dict[str, Any]:
    """Every section of the benchmark; the JSON document."""
    from tqdm import tqdm

    from deltastore.bench.serving_refs import ServerProcess

    cfg = QUICK if args.quick else FULL
    main, growth = build_scenarios(cfg, full_shape=args.full_shape)
    if args.scenario:
        main = [s for s in main if any(pat in s.name for pat in args.scenario)]
        growth = [s for s in growth if any(pat in s.name for pat in args.scenario)]
    run_id = uuid.uuid4().hex[:8]
    use_model = not args.quick and not args.no_model
    steps = sum(s.users * s.turns for s in [*main, *growth]) + 4
    if use_model:
        steps += cfg.real_users * cfg.turns + 5
    doc: dict[str, Any] = {
        "config": {
            **dataclasses.asdict(cfg),
            "block_size": args.block_size,
            "concurrency": args.concurrency,
            "get_users": args.get_users,
            "quick": args.quick,
            "target": args.target or "self-hosted",
        },
        "scenarios": [],
        "growth": [],
    }
    namespaces: dict[str, str] = {}
    with ExitStack() as stack:
        server = None
        if args.target:
            target = args.target
        else:
            server = stack.enter_context(ServerProcess(block_size=args.block_size))
            target = server.target
        bar = stack.enter_context(tqdm(total=steps, desc="bench serving", unit="turn", dynamic_ncols=True))

        def scenario(s: Scenario, into: list[dict[str, Any]], fn: Callable[[str], dict[str, Any]]) -> None:
            ns = f"b{run_id}-{s.name}"[:64]
            namespaces[s.name] = ns
            bar.set_postfix_str(s.name)
            row = fn(ns)
            if server is not None:
                row.update(server.rss())
            into.append(row)

        doc["reference"] = _reference(
            target, f"b{run_id}", cfg, bar, server.shm_dir if server is not None else None
        )
        for s in main:
            # Decoding a whole 7B-shaped 4K cache takes seconds on CPU: the full-shape run samples fewer.
            gets = cfg.flagship_get_users if s.shape.layers != cfg.layers else args.get_users
            scenario(s, doc["scenarios"], lambda ns, s=s, g=gets: _synthetic_run(target, ns, s, args, g, bar))
        for s in growth:
            scenario(
                s, doc["growth"], lambda ns, s=s: _synthetic_run(target, ns, s, args, args.get_users, bar)
            )
        if use_model:
            from deltastore.client.models import load_model

            model, tok = load_model(args.model)
            text = (
                resources.files("deltastore.bench")
                .joinpath("data", "gardiner_french_revolution.txt")
                .read_text()
            )
            real = _real_kv_run(target, f"b{run_id}-real", model, tok, text, cfg, args, bar)
            namespaces[real["name"]] = f"b{run_id}-real"
            if server is not None:
                real.update(server.rss())
            doc["scenarios"].append(real)
            doc["restore_vs_recompute"] = _restore_vs_recompute(
                target, f"b{run_id}-restore", model, tok, text, cfg.restore_tokens, bar
            )
        if server is not None:
            server.stop()
            doc["store_recount"] = _recount(server.data_dir, namespaces, args.verify)
            _check_recount(doc)
    ref = doc["reference"]
    for row in [*doc["scenarios"], *doc["growth"]]:
        for op in ("put", "get"):
            row[f"{op}_vs_memcpy"] = row[f"{op}_gbps"] / ref["memcpy_gbps"]
            row[f"{op}_vs_grpc"] = row[f"{op}_gbps"] / ref["grpc_stream_gbps"]
    for row in doc["growth"]:
        row["stored_bytes_per_unique_token"] = row["stored_bytes"] / row["unique_tokens"]
    return doc


def _check_recount(doc: dict[str, Any]) -> None:
    """The ratios read over gRPC must be the ones the data directory gives, and the data clean."""
    recount = doc["store_recount"]
    for row in [*doc["scenarios"], *doc["growth"]]:
        again = recount["ratios"][row["name"]]
        if abs(again - row["effective_ratio"]) > 1e-9 * again:
            raise InvalidArgument(
                f"{row['name']}: ratio {row['effective_ratio']} over gRPC, {again} in the store"
            )
        row["store_recount_ratio"] = again
        row["stored"] = recount["stored"][row["name"]]
    verify = recount.get("verify")
    if verify is not None and not verify["clean"]:
        raise InvalidArgument(f"deltastore verify found problems: {verify['problems']}")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--quick", action="store_true", help="a few users, short contexts (< 60 s, runs in make test)"
    )
    parser.add_argument(
        "--json",
        type=Path,
        default=Path("bench-results/serving.json"),
        help="output JSON; .md and .png next to it",
    )
    parser.add_argument("--target", default="", help="an existing server (host:port); default: start one")
    parser.add_argument(
        "--block-size",
        type=int,
        default=64,
        help="tokens per aligned block of the started server (default 64: k4v2-pe50 evicts nothing in 32-token blocks)",
    )
    parser.add_argument(
        "--concurrency", type=int, default=2, help="users served at once (default 2, the cores here)"
    )
    parser.add_argument(
        "--get-users",
        type=int,
        default=8,
        help="users that restore their previous turn before each turn (default 8)",
    )
    parser.add_argument(
        "--full-shape",
        action="store_true",
        help="also run the tier-prefix k4v2-pe50 scenario in the full 32-layer 7B shape (slow on CPU)",
    )
    parser.add_argument(
        "--device", default="cpu", help="torch device the synthetic KV is made on (cpu, cuda)"
    )
    parser.add_argument(
        "--model", default="smollm2", help="model of the real-KV run and restore vs recompute"
    )
    parser.add_argument("--no-model", action="store_true", help="skip the real-model sections")
    parser.add_argument(
        "--no-verify",
        dest="verify",
        action="store_false",
        help="skip deltastore verify of the data afterwards",
    )
    parser.add_argument(
        "--scenario",
        action="append",
        default=[],
        help="run only scenarios whose name contains this (repeatable)",
    )


def run(args: argparse.Namespace) -> int:
    from deltastore.bench.serving_report import write_outputs

    if args.concurrency < 1 or args.get_users < 0:
        raise InvalidArgument("--concurrency must be >= 1 and --get-users >= 0")
    import signal

    def interrupted(*_: object) -> None:
        raise KeyboardInterrupt  # unwinds the ExitStack: child servers stop, temp data goes

    signal.signal(signal.SIGTERM, interrupted)
    t0 = time.perf_counter()
    doc = run_benchmark(args)
    doc["wall_s"] = time.perf_counter() - t0
    doc["machine"] = {"cpus": os.cpu_count()}
    paths = write_outputs(doc, args.json)
    print(json.dumps({"ok": True, "wall_s": round(doc["wall_s"], 1), "outputs": [str(p) for p in paths]}))
    return 0
