"""Codec encode/decode throughput on a 7B-shaped KV cache, each as a ratio to memcpy.

``deltastore bench codecs --json PATH [--tokens N] [--device cpu|cuda]`` encodes and decodes a
Mistral-7B-shaped cache (32 layers x 8 KV heads x 128 dims, fp16; 4096 tokens unless --tokens
says otherwise) with each main tier, and writes the JSON, a markdown table (PATH with .md) and
a bar plot (PATH with .png). Throughput is GB/s of FP16 input (1 GB = 1e9 bytes), the median of
--repeat runs. Two references, measured in the same run on the same device, so ratios hold
across machines where absolute GB/s do not: memcpy as ``torch.clone`` of the same tensors (what
a codec also pays: it allocates its outputs) and ``copy_`` into preallocated tensors (raw memory
bandwidth, the stricter bar; on CPU fresh large allocations page-fault, so clone is slower).

The data is synthetic (Gaussian, with outlier key channels like real post-RoPE keys): speed of
the quantizing codecs does not depend on it; the zstd stages (lossless, -z) do, so their ratio
here is not their ratio on real KV (``tests/codecs/test_real_kv.py`` measures that).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = ["DEFAULT_TIERS", "add_arguments", "run", "run_benchmark"]

DEFAULT_TIERS = (
    "fp16",
    "lossless",
    "fp8",
    "k8v8",
    "k4v4",
    "k4v2",
    "k4v2-nr",
    "k4v2-z",
    "k4v2-pe30",
    "k4v2-sink4",
)
SHAPE_7B = {"n_layers": 32, "kv_heads": 8, "head_dim": 128}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--json", type=Path, required=True, help="output JSON; .md and .png are written beside it"
    )
    parser.add_argument("--tokens", type=int, default=4096, help="tokens in the cache (default 4096)")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="where the codecs run")
    parser.add_argument(
        "--repeat", type=int, default=3, help="timed runs per measurement; the median is kept"
    )
    parser.add_argument(
        "--tiers", default=",".join(DEFAULT_TIERS), help="comma-separated codec specs (default: main tiers)"
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch intra-op threads (default: torch's choice). On an oversubscribed host 1 can be 10x+ "
        "faster: every parallel op waits for a second thread to be scheduled",
    )


def _synthetic_cache(tokens: int, device: str) -> list[tuple[Any, Any]]:
    """fp16 (K, V) per layer, (kv_heads, tokens, head_dim): Gaussian, a few large key channels."""
    import torch

    gen = torch.Generator().manual_seed(0)
    out = []
    for _ in range(SHAPE_7B["n_layers"]):
        k = torch.randn(SHAPE_7B["kv_heads"], tokens, SHAPE_7B["head_dim"], generator=gen)
        k[..., :4] *= 6.0
        v = torch.randn(SHAPE_7B["kv_heads"], tokens, SHAPE_7B["head_dim"], generator=gen)
        out.append((k.half().to(device), v.half().to(device)))
    return out


def _timed(fn: Callable[[], Any], repeat: int, sync: Callable[[], None]) -> tuple[float, Any]:
    """Median wall seconds of ``repeat`` runs after one warm-up, and the last result."""
    result = fn()
    sync()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        result = fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), result


def _copy_seconds(layers: list[tuple[Any, Any]], repeat: int, sync: Callable[[], None]) -> float:
    """Median seconds to copy_ every tensor into a preallocated one (raw memory bandwidth)."""
    sources = [t for kv in layers for t in kv]
    targets = [t.clone() for t in sources]
    seconds, _ = _timed(lambda: [a.copy_(b) for a, b in zip(targets, sources, strict=True)], repeat, sync)
    return seconds


def run_benchmark(tokens: int, device: str, tiers: list[str], repeat: int) -> dict[str, Any]:
    """Measure memcpy, then encode and decode of every tier. Returns the JSON document."""
    import torch
    from tqdm import tqdm

    from deltastore.codecs import decode_block, encode_block, read_header

    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    layers = _synthetic_cache(tokens, device)
    fp16_bytes = sum(k.numel() * 2 + v.numel() * 2 for k, v in layers)
    rows = []
    for spec in tqdm(tiers, desc="codecs", unit="tier"):
        # References re-measured next to each tier: on a shared host the load drifts over minutes.
        memcpy_s, _ = _timed(lambda: [(k.clone(), v.clone()) for k, v in layers], repeat, sync)
        copy_s = _copy_seconds(layers, repeat, sync)
        enc_s, payload = _timed(lambda s=spec: encode_block(layers, s), repeat, sync)
        dec_s, _ = _timed(lambda p=payload: decode_block(p, device=device), repeat, sync)
        hdr = read_header(payload)
        rows.append(
            {
                "spec": hdr.spec.canonical(),
                "ratio_vs_fp16": hdr.fp16_nbytes / len(payload),
                "payload_bytes": len(payload),
                "encode_s": enc_s,
                "decode_s": dec_s,
                "memcpy_s": memcpy_s,
                "copy_s": copy_s,
                "encode_gbps": fp16_bytes / enc_s / 1e9,
                "decode_gbps": fp16_bytes / dec_s / 1e9,
                "memcpy_gbps": fp16_bytes / memcpy_s / 1e9,
                "copy_gbps": fp16_bytes / copy_s / 1e9,
                "encode_vs_memcpy": memcpy_s / enc_s,
                "decode_vs_memcpy": memcpy_s / dec_s,
                "encode_vs_copy": copy_s / enc_s,
                "decode_vs_copy": copy_s / dec_s,
            }
        )
    memcpy_gbps = statistics.median(r["memcpy_gbps"] for r in rows)
    copy_gbps = statistics.median(r["copy_gbps"] for r in rows)
    return {
        "benchmark": "codecs",
        "shape": {**SHAPE_7B, "tokens": tokens},
        "fp16_bytes": fp16_bytes,
        "device": device,
        "torch_threads": torch.get_num_threads(),
        "machine": platform.machine(),
        "repeat": repeat,
        "memcpy_gbps": memcpy_gbps,
        "copy_gbps": copy_gbps,
        "goal": "encode and decode each >= 0.1 x memcpy",
        "rows": rows,
    }


def markdown(doc: dict[str, Any]) -> str:
    s = doc["shape"]
    lines = [
        f"Codec throughput, {s['n_layers']} layers x {s['kv_heads']} KV heads x {s['head_dim']} dims x "
        f"{s['tokens']} tokens ({doc['fp16_bytes'] / 2**20:.0f} MiB FP16) on {doc['device']}, "
        f"{doc['torch_threads']} torch threads. GB/s of FP16 input. References, re-measured next to each tier "
        f"(medians): memcpy as clone {doc['memcpy_gbps']:.2f} GB/s, copy_ into preallocated tensors "
        f"{doc['copy_gbps']:.2f} GB/s.",
        "",
        "| spec | ratio vs FP16 | encode GB/s | enc / memcpy | enc / copy_ | decode GB/s | dec / memcpy | dec / copy_ |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in doc["rows"]:
        lines.append(
            f"| {r['spec']} | {r['ratio_vs_fp16']:.2f}x | {r['encode_gbps']:.3f} | {r['encode_vs_memcpy']:.3f} "
            f"| {r['encode_vs_copy']:.3f} | {r['decode_gbps']:.3f} | {r['decode_vs_memcpy']:.3f} "
            f"| {r['decode_vs_copy']:.3f} |"
        )
    return "\n".join(lines) + "\n"


def plot(doc: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = doc["rows"]
    x = range(len(rows))
    fig, ax = plt.subplots(figsize=(max(6, 1.1 * len(rows)), 4))
    ax.bar([i - 0.2 for i in x], [r["encode_vs_memcpy"] for r in rows], width=0.4, label="encode")
    ax.bar([i + 0.2 for i in x], [r["decode_vs_memcpy"] for r in rows], width=0.4, label="decode")
    ax.axhline(0.1, color="grey", linestyle="--", linewidth=1, label="goal: 1/10 of memcpy")
    ax.set_xticks(list(x), [r["spec"] for r in rows], rotation=30, ha="right", fontsize=8)
    ax.set_ylabel(f"throughput / memcpy as clone (median {doc['memcpy_gbps']:.2f} GB/s)")
    ax.set_yscale("log")
    ax.set_title(
        f"KV codec throughput vs memcpy ({doc['device']}, {doc['shape']['tokens']} tokens, 7B shape)"
    )
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run(args: argparse.Namespace) -> int:
    from deltastore.errors import InvalidArgument

    if args.tokens < 1 or args.repeat < 1:
        raise InvalidArgument("--tokens and --repeat must be positive")
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise InvalidArgument("--device cuda: no CUDA device here")
    tiers = [t for t in args.tiers.split(",") if t]
    if not tiers:
        raise InvalidArgument("--tiers names no codec")
    if args.threads is not None:
        import torch

        if args.threads < 1:
            raise InvalidArgument("--threads must be positive")
        torch.set_num_threads(args.threads)
    doc = run_benchmark(args.tokens, args.device, tiers, args.repeat)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(doc, indent=2) + "\n")
    table = markdown(doc)
    args.json.with_suffix(".md").write_text(table)
    plot(doc, args.json.with_suffix(".png"))
    print(table, end="")
    return 0
