"""The `deltastore` command line: the map of the product.

Each subcommand lives in the module that owns it. That module exposes
``add_arguments(parser)`` and ``run(args) -> int``. Only the module of the command being run is
imported, so ``deltastore serve`` on a server-only install (no torch, no transformers, no
matplotlib) never touches the worker, benchmark or integration layers.
"""

from __future__ import annotations

import argparse
import importlib
import os
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
        "deltastore.bench.demo",
        "multi-turn SmolLM2 chat whose KV cache round-trips through the store",
    ),
)
BENCHES: tuple[tuple[str, str, str], ...] = (
    ("codecs", "deltastore.bench.codecs", "codec encode/decode throughput vs memcpy"),
    ("quality", "deltastore.bench.quality", "ratio vs KL/top-1 of every tier on a real model"),
    ("serving", "deltastore.bench.serving", "multi-user multi-turn workload through the running service"),
    ("backends", "deltastore.bench.backends", "put/get throughput of LMDB, Redis and Redis Cluster"),
    ("vllm", "deltastore.bench.vllm", "multi-turn chat through a real vLLM engine vs vLLM's caches"),
)


def _add(sub: argparse._SubParsersAction, name: str, module: str, help_: str, chosen: bool) -> None:
    """A subcommand; its module is imported (and its arguments added) only when it is the one run."""
    if not chosen:
        sub.add_parser(name, help=help_, description=help_)
        return
    mod = importlib.import_module(module)
    parser = sub.add_parser(name, help=help_, description=(mod.__doc__ or help_).strip().splitlines()[0])
    mod.add_arguments(parser)
    parser.set_defaults(_run=mod.run)


def _positionals(argv: Sequence[str]) -> list[str]:
    return [a for a in argv if not a.startswith("-")][:2]


def build_parser(argv: Sequence[str] = ()) -> argparse.ArgumentParser:
    """The parser for ``argv``: every command listed, only the chosen one's module imported."""
    words = _positionals(argv)
    parser = argparse.ArgumentParser(
        prog="deltastore",
        description="DeltaStore: KV-cache storage for LLM inference (compression, prefix dedup, temporal deltas).",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, module, help_ in COMMANDS:
        _add(sub, name, module, help_, chosen=words[:1] == [name])
    bench = sub.add_parser("bench", help="benchmarks: JSON results, a markdown table and PNG plots")
    bench_sub = bench.add_subparsers(dest="bench", metavar="BENCH")
    for name, module, help_ in BENCHES:
        _add(bench_sub, name, module, help_, chosen=words == ["bench", name])

    def bench_help(_args: argparse.Namespace) -> int:
        bench.print_help()
        return 2

    bench.set_defaults(_run=bench_help)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    if not hasattr(args, "_run"):
        parser.print_help()
        return 2
    try:
        rc = int(args._run(args) or 0)
        sys.stdout.flush()  # a closed pipe fails here, inside the handler below, not at exit
        return rc
    except DeltaStoreError as exc:  # bad input or a refused operation: a message, not a traceback
        print(f"deltastore: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # `deltastore codecs --json | head`: the reader left; exit quietly
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 141


if __name__ == "__main__":
    sys.exit(main())
