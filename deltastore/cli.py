"""The `deltastore` command line: the map of the product.

Each subcommand lives in the module that owns it. That module exposes
``add_arguments(parser)`` and ``run(args) -> int`` and keeps heavy imports (torch, grpc,
transformers) inside ``run`` so that ``deltastore --help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from deltastore.errors import DeltaStoreError

# (command, module, one-line help). "bench X" commands are nested under "bench".
COMMANDS: tuple[tuple[str, str, str], ...] = (
    ("serve", "deltastore.server.app", "run the gRPC service and the ops HTTP API over one store"),
    ("codecs", "deltastore.codecs.table", "list the codec tiers: bits, ratio vs FP16, bit-exactness"),
    ("verify", "deltastore.verify", "check every store invariant of a data directory"),
    (
        "demo",
        "deltastore.client.demo",
        "multi-turn SmolLM2 chat whose KV cache round-trips through the store",
    ),
)
BENCHES: tuple[tuple[str, str, str], ...] = (
    ("codecs", "deltastore.bench.codecs", "codec encode/decode throughput vs memcpy"),
    ("quality", "deltastore.bench.quality", "ratio vs KL/top-1 of every tier on a real model"),
    ("serving", "deltastore.bench.serving", "multi-user multi-turn workload through the running service"),
    ("backends", "deltastore.bench.backends", "put/get throughput of LMDB, Redis and Redis Cluster"),
)


def _add(sub: argparse._SubParsersAction, name: str, module: str, help_: str) -> None:
    mod = importlib.import_module(module)
    parser = sub.add_parser(name, help=help_, description=(mod.__doc__ or help_).strip().splitlines()[0])
    mod.add_arguments(parser)
    parser.set_defaults(_run=mod.run)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="deltastore",
        description="DeltaStore: KV-cache storage for LLM inference (compression, prefix dedup, temporal deltas).",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, module, help_ in COMMANDS:
        _add(sub, name, module, help_)
    bench = sub.add_parser("bench", help="benchmarks: JSON results, a markdown table and PNG plots")
    bench_sub = bench.add_subparsers(dest="bench", metavar="BENCH")
    for name, module, help_ in BENCHES:
        _add(bench_sub, name, module, help_)
    bench.set_defaults(_run=lambda _args: (bench.print_help(), 2)[1])
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "_run"):
        parser.print_help()
        return 2
    try:
        return int(args._run(args) or 0)
    except DeltaStoreError as exc:  # bad input or a refused operation: a message, not a traceback
        print(f"deltastore: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
