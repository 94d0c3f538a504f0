"""Ratio vs KL/top-1 of every tier on a real model: the report's 12-config sweep, frontier, peers.

``deltastore bench quality [--model ID_OR_PATH] [--split tune|report | --text FILE] [--groups G]
--json PATH`` writes the JSON, a markdown table (PATH with .md) and a ratio-vs-KL plot (PATH with
.png). The protocol is in ``quality_eval.py``; the rows in ``quality_configs.py`` and
``quality_peers.py``.

Default text: the shipped corpus (``bench/data/corpus``, ``manifest.json``): 27 documents of four
kinds (prose, technical documentation, Python source, chat-formatted Q&A), ~63K SmolLM2 tokens,
each wholly in the *tuning* split (levers and tiers are chosen there) or the *report* split
(every published figure), up to ``--per-doc`` non-overlapping windows per document. A row's KL is
the mean over windows of each window's mean KL, with a 95% bootstrap interval over windows, and
per kind of text. ``--text FILE`` measures one file instead (windows placed by ``--seed``).

Why one long module: the single driver of a benchmark whose groups share one model load, one
set of windows and one JSON document; configs, evaluation, peers and tiers live beside it in
``quality_configs``, ``quality_eval``, ``quality_peers`` and ``codecs.tiers``.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import itertools
import json
import random
import time
from collections.abc import Callable
from contextlib import ExitStack, suppress
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from deltastore.errors import InvalidArgument

__all__ = ["REPORT_POINTS", "add_arguments", "build_configs", "grade", "run", "run_benchmark"]

DEFAULT_TEXT = "gardiner_french_revolution.txt"
CORPUS = "corpus"
GROUPS = ("tier", "sweep", "frontier", "peer", "engine")
BOOTSTRAP = 2000

# The report's quality table (its 7B/32B/72B columns): (label, ratio, KL).
REPORT_POINTS: dict[str, list[tuple[str, float, float]]] = {
    "7B": [("Lossless", 4.1, 0.003), ("Conservative", 6.1, 0.039), ("Balanced", 10.0, 0.073), ("Aggressive", 11.4, 0.115)],
    "32B": [
        ("Lossless", 4.1, 0.006), ("Conservative", 6.2, 0.042), ("K4V4 PE30", 6.9, 0.054), ("K4V4 PE10", 7.9, 0.096),
        ("K4V2 PE50", 9.0, 0.060), ("K4V2 Adapt30", 9.5, 0.076), ("Balanced", 10.2, 0.089), ("K4V2 PE20", 10.9, 0.112),
        ("K4V2 Adapt10", 11.1, 0.117), ("K4V2 PE15", 11.3, 0.111), ("Aggressive", 11.8, 0.123), ("K4V2 PE5", 12.2, 0.186),
    ],
    "72B": [
        ("Lossless", 4.1, 0.002), ("Conservative", 6.2, 0.024), ("K4V4 PE30", 6.9, 0.054), ("K4V4 PE10", 7.9, 0.157),
        ("K4V2 PE50", 9.0, 0.039), ("K4V2 Adapt30", 9.5, 0.049), ("Balanced", 10.2, 0.076), ("K4V2 PE20", 10.9, 0.125),
        ("K4V2 Adapt10", 11.1, 0.182), ("K4V2 PE15", 11.3, 0.191), ("Aggressive", 11.8, 0.220), ("K4V2 PE5", 12.2, 0.214),
    ],
}  # fmt: skip

# The frontier targets: at each ratio, the best KL the report gives for any model size.
TARGETS: list[tuple[float, float]] = [
    (4.1, 0.002),
    (6.2, 0.024),
    (9.0, 0.039),
    (10.2, 0.073),
    (11.8, 0.115),
    (16.0, 0.10),
]

_GRADES = ((0.01, "EXCELLENT"), (0.05, "GOOD"), (0.2, "ACCEPTABLE"), (0.5, "MARGINAL"))


def grade(kl: float) -> str:
    """The report's grade of a mean KL (DESIGN.md): EXCELLENT < 0.01 <= GOOD < 0.05 <= ACCEPTABLE < 0.2."""
    for bound, name in _GRADES:
        if kl < bound or (name == "MARGINAL" and kl <= bound):
            return name
    return "POOR"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model", default="smollm2", help="HF causal LM id or path (default: SmolLM2-135M offline)"
    )
    parser.add_argument(
        "--text", type=Path, default=None, help="one UTF-8 text file instead of the shipped corpus"
    )
    parser.add_argument(
        "--split",
        choices=("tune", "report"),
        default="report",
        help="corpus split (default report: what figures are published from; choose levers on tune)",
    )
    parser.add_argument(
        "--per-doc", type=int, default=4, help="corpus: at most this many windows per document (default 4)"
    )
    parser.add_argument(
        "--json", type=Path, required=True, help="output JSON; .md and .png are written beside it"
    )
    parser.add_argument(
        "--quick", action="store_true", help="2 short windows, core tiers only (the make-test check)"
    )
    parser.add_argument(
        "--windows",
        type=int,
        default=None,
        help="number of windows (--text: default 8, quick 2; corpus: default all of the split, quick 2)",
    )
    parser.add_argument(
        "--ctx", type=int, default=None, help="context tokens per window (default 512, quick 128)"
    )
    parser.add_argument(
        "--eval", type=int, default=None, help="continuation tokens scored (default 64, quick 16)"
    )
    parser.add_argument("--block", type=int, default=64, help="store block size in tokens (default 64)")
    parser.add_argument("--seed", type=int, default=0, help="window placement seed")
    parser.add_argument("--no-peers", action="store_true", help="skip the quanto and kvpress rows")
    parser.add_argument(
        "--groups",
        default="tier,sweep,frontier,peer",
        help="comma-separated row groups to run (tier, sweep, frontier, peer, engine: score-free, "
        "non-evicting rows an engine's paged cache can use); fp16 always runs",
    )
    parser.add_argument(
        "--specs",
        default=None,
        metavar="A,B,...",
        help="with --groups engine: measure these specs (score-free, non-evicting) instead of the default list",
    )
    parser.add_argument(
        "--only",
        default=None,
        metavar="A,B,...",
        help="keep only the rows (of the chosen groups) whose spec is one of these (fp16 always runs)",
    )
    parser.add_argument("--device", default="cpu", help="torch device for the model and the codecs")
    parser.add_argument(
        "--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)"
    )
    parser.add_argument(
        "--recommend", type=Path, default=None, help="also write the recommended-tiers JSON here"
    )
    parser.add_argument(
        "--recommend-also",
        type=Path,
        action="append",
        default=[],
        metavar="JSON",
        help="with --recommend: a run on another text (same model and protocol) whose worst KL the "
        "recommendations must also meet (repeatable)",
    )


@dataclass
class _Acc:
    """Per-config accumulator over windows."""

    kl: list[Any] = field(default_factory=list)
    top1: list[Any] = field(default_factory=list)
    fp16: int = 0
    stored: int = 0
    kept: float = 0.0
    enc: float = 0.0
    dec: float = 0.0
    n: int = 0
    timed_fp16: int = 0  # FP16 bytes of the windows whose encode/decode time is counted
    where: list[tuple[str, str]] = field(default_factory=list)  # (kind, doc) of each window


ENGINE_SPECS: tuple[str, ...] = (
    "lossless",
    "k8v8",
    "fp8",
    "k8v4-p8-sink4-z",
    "k8v3-p8-sink4-z-hp8",
    "k4v4",
    "k4v2",
    "k2v2-sink4",
    "k4v2-sink4-z",
    "k4v4-p8-sink4-z-hp16",
    "k4v4-p8-nf-sink4-z-hp16",
    "k4v3-p8-sink4-z-hp8",
    "k3v3-p8-sink4-z-hp16",
    "k4v2-p8-sink4-z-hp16",
    "k3v2-p8-sink4-z-hp16",
    "k3v2-p8-sink4-z-hp8",
    "k3v2-p8-sink4-z",
    "k2v2-p8-sink4-z-hp32",
    "k4v2-p8-sink4-z-hp16-pr100000",  # keys before RoPE, SmolLM2's theta (docs/results/quality_levers.md)
    "k3v2-p8-sink4-z-hp16-pr100000",
    "k3v2-p8-sink4-z-pr100000",
    "k2v2-p8-sink4-z-hp32-pr100000",
    # per-layer bits from codecs/data/calibration-smollm2.json (bench/quality_calibrate.py)
    "k3v2-p8-sink4-z-pr100000-up18.20.23",
    "k3v2-p8-sink4-z-pr100000-up14.17.18.20.23.24",
    "k3v2-p8-sink4-z-pr100000-up5.7.8.14.17.18.20.21.23.24",
    "k3v2-p8-sink4-z-hp16-pr100000-up18.20.23",
    "k3v2-p8-sink4-z-hp16-pr100000-up14.17.18.20.23.24",
    "k2v2-p8-sink4-z-pr100000-up18.20.23",
)
"""The engine group: score-free, non-evicting specs (a paged cache needs every position and its
kernels expose no attention weights), chosen on the tuning split (docs/results/quality_levers.md);
``deltastore bench quality --groups engine --split report --per-doc 2`` regenerates
docs/results/quality-engine.* from them. The ``pr100000`` and ``up<layers>`` rows are SmolLM2's
(its rope_theta, its calibration): with another ``--model``, name its own rows with ``--specs``."""


def engine_configs(block: int, specs: str | None = None) -> list[Any]:
    """Rows of the engine group (``--groups engine``): ``ENGINE_SPECS``, or the comma-separated
    ``specs``, each of which must be engine-usable (no eviction)."""
    from deltastore.bench.quality_configs import CodecConfig
    from deltastore.codecs import CodecSpec

    chosen = ENGINE_SPECS if specs is None else tuple(x.strip() for x in specs.split(",") if x.strip())
    for spec in chosen:
        if CodecSpec.parse(spec).evicts:
            raise InvalidArgument(f"{spec} evicts tokens: an engine's paged cache needs every position")
    return [CodecConfig(spec, spec, "engine", scores=None, block=block) for spec in chosen]


def build_configs(quick: bool, block: int, peers: bool, specs: str | None = None) -> list[Any]:
    """The rows, in table order: reference tiers, the report's 12, our frontier, then peers."""
    from deltastore.bench.quality_configs import CodecConfig, EvictQuantConfig
    from deltastore.codecs import TIERS

    def tier(name: str, spec: str, group: str = "tier", scores: str | None = "block") -> CodecConfig:
        return CodecConfig(name, spec, group, scores=scores, block=block)

    rows: list[Any] = [tier("fp16", "fp16"), tier("lossless (bit-exact)", "lossless"), tier("K8V8", "k8v8")]
    rows += engine_configs(block, specs)
    if quick:
        return [
            *rows,
            tier("K4V4", "k4v4"),
            tier("K4V2", "k4v2"),
            tier("K4V2 PE50", "k4v2-pe50"),
            tier("K4V4 keep50", "k4v4-sink4-keep50-r16"),
            tier("K4V4 keep100 lo50", "k4v4-sink4-keep100-lo50-r16"),  # the same 4-bit tokens, the rest 2-bit
        ]
    rows.append(tier("fp8", "fp8"))
    for t in TIERS.values():
        if t.report_ratio is not None:
            rows.append(tier(t.name, t.spec.canonical(), "sweep"))

    def frontier(
        spec: str, keep: float, scores: str = "block", seg: int | None = block, **kw: Any
    ) -> EvictQuantConfig:
        """An evict-then-quantize row; seg=None: one budget over the whole cache (one segment)."""
        pct, low = round(keep * 100), round(kw.get("low", 0) * 100)
        label = f"{spec} keep{pct}%" + (f" ({low}% at 2 bits)" if low else "") + f" {scores}-scored"
        label += " one segment" if seg is None else f" per {seg}-token block"
        if kw.get("recent"):
            label += f", last {kw['recent']} whole"
        if kw.get("whole"):
            label += f", prefix {kw['whole']} whole"
        name = f"{spec}-keep{pct}" + (f"-lo{low}" if low else "") + f"-r{kw.get('recent', 16)}"
        return EvictQuantConfig(label, name, "frontier", spec, keep, scores=scores, block=seg or 0, **kw)

    # Levers one at a time: key layout, rotation, fp16 sink, entropy stage, bits ...
    for spec in (
        "k4v4-kt",
        "k4v4-nr",
        "k4v4-sink4",
        "k4v4-sink4-z",
        "k8v4-sink4-z",
        "k4v2-sink4-z",
        "k2v2-sink4",
    ):
        rows.append(tier(spec, spec, "frontier"))
    # ... eviction that stays dedup-safe: per store block, scored from within the block's prefix
    # (look-ahead queries, client/scores.py) ...
    for keep in (0.9, 0.6, 0.5, 0.3, 0.28, 0.2):
        rows.append(frontier("k4v4-sink4-z", keep, recent=64))
    for recent in (16, 128):  # the recent window's worth
        rows.append(frontier("k4v4-sink4-z", 0.3, recent=recent))
    for keep in (0.95, 0.9, 0.88, 0.7):  # the low-eviction end: near the quantization-only KL
        rows.append(frontier("k4v4-sink4-z", keep, recent=16))
    rows.append(frontier("k8v4-sink4-z", 0.88, recent=16))  # under KL 0.002: 8-bit keys, light eviction
    # ... the newest tokens at 8 bits (hp<N>) and 8-bit scales and zero-points (p8), each alone
    # and together ...
    rows.append(tier("k4v4-p8-sink4-z", "k4v4-p8-sink4-z", "frontier"))
    rows.append(tier("k4v4-p8-sink4-z-hp16", "k4v4-p8-sink4-z-hp16", "frontier"))
    rows.append(frontier("k4v4-sink4-z-hp16", 0.88, recent=16))
    rows.append(frontier("k4v4-p8-sink4-z", 0.88, recent=16))
    for keep, high in ((0.9, 8), (0.88, 8), (0.88, 16), (0.85, 16)):
        rows.append(frontier(f"k4v4-p8-sink4-z-hp{high}", keep, recent=16))
    for keep in (0.6, 0.55, 0.5, 0.4, 0.35, 0.3, 0.28, 0.26, 0.2):
        rows.append(frontier("k4v4-p8-sink4-z", keep, recent=64))
    rows.append(frontier("k4v4-p8-sink4-z", 0.3, recent=48))  # 9.0x in 64-token blocks
    # ... the tokens eviction would drop first, many of them kept at 2 bits instead (lo<L>) ...
    for keep, low, recent in (
        (0.8, 0.4, 64),  # light demotion: what holds on copy-heavy text too (quality-vimdoc)
        (0.7, 0.2, 64),
        (0.65, 0.15, 64),
        (0.7, 0.3, 64),
        (0.35, 0.2, 64),
        (1.0, 0.85, 64),
        (0.9, 0.7, 64),
        (0.84, 0.64, 64),
        (0.84, 0.64, 32),
        (0.88, 0.72, 32),
        (0.88, 0.72, 16),
        (0.6, 0.5, 64),
        (0.5, 0.4, 64),
        (0.4, 0.32, 64),
    ):
        rows.append(frontier("k4v4-p8-sink4-z", keep, recent=recent, low=low))
    for keep, low, recent in (  # 2-bit kc groups and p8 grids over 128-token blocks: cheaper per token
        (0.88, 0.72, 32),
        (0.4, 0.32, 64),
        (0.35, 0.28, 64),
        (0.3, 0.25, 32),
        (0.3, 0.26, 16),
        (0.25, 0.2, 16),
        (0.2, 0.16, 16),
        (0.4, 0.32, 128),  # a wider recent window for copy-heavy text (quality-vimdoc)
        (0.3, 0.25, 128),
    ):
        rows.append(frontier("k4v4-p8-sink4-z", keep, seg=128, recent=recent, low=low))
    for keep in (
        0.4,
        0.3,
        0.25,
        0.2,
    ):  # a wider recent window: what holds on copy-heavy text (quality-vimdoc)
        rows.append(frontier("k4v4-p8-sink4-z", keep, recent=128))
    for keep in (0.12, 0.08):
        rows.append(frontier("k4v4-kt-p8-sink4-z", keep, recent=128))
    for keep in (0.25, 0.16, 0.08):
        rows.append(frontier("k4v4-kt-p8-sink4-z", keep, recent=16))
    rows.append(frontier("k4v4-p8-sink4-z", 0.28, seg=128, recent=64))
    # ... what look-ahead bought: the same specs scored by each block's causal window (SnapKV) ...
    rows.append(frontier("k4v4-sink4-z", 0.3, "causal", recent=64))
    for keep, recent in ((0.3, 64), (0.2, 96), (0.12, 48)):
        rows.append(frontier("k4v4-kt-sink4-z", keep, "causal", recent=recent))
    # ... keys per token: no per-channel scales for a few kept tokens. The per-block budget P traded
    # against the recent window r<N>: these won the grid (P 8-60 x r16-r64, 8 windows) near the
    # targets of docs/results/quality_levers.md ...
    for keep, recent in (
        (0.55, 32),
        (0.5, 64),
        (0.33, 48),
        (0.3, 64),
        (0.28, 48),
        (0.3, 16),
        (0.25, 32),
        (0.25, 16),
        (0.2, 96),
        (0.2, 64),
        (0.2, 16),
        (0.16, 16),
        (0.12, 48),
        (0.12, 16),
        (0.1, 16),
        (0.08, 16),
    ):
        rows.append(frontier("k4v4-kt-sink4-z", keep, recent=recent))
    # ... coarser store blocks (DELTASTORE_BLOCK_SIZE): per-channel key scales shared by more kept
    # tokens, dedup at a coarser granularity ...
    for keep, recent in ((0.55, 64), (0.5, 64), (0.3, 64), (0.28, 64), (0.3, 32)):
        rows.append(frontier("k4v4-sink4-z", keep, seg=128, recent=recent))
    rows.append(frontier("k4v4-sink4-z", 0.3, seg=256, recent=64))
    rows.append(frontier("k4v4-kt-sink4-z", 0.3, seg=256, recent=64))  # kt leaves 256-token blocks little
    for keep in (0.5, 0.3):
        rows.append(frontier("k4v4-sink4-z", keep, "knorm", recent=64))  # no queries: key-norm proxy
    rows.append(frontier("k4v4-sink4-z", 0.3, recent=64, whole=256))  # shared prefix left whole
    # ... and, not dedup-safe, one SnapKV budget over the whole cache from the prompt's last queries.
    for keep in (0.9, 0.6, 0.4, 0.3, 0.2, 0.15):
        rows.append(frontier("k4v4-sink4-z", keep, "window", seg=None))
    rows.append(frontier("k8v4-sink4-z", 0.6, "window", seg=None))
    rows.append(frontier("k4v2-sink4-z", 0.4, "window", seg=None))
    if peers:
        from deltastore.bench.quality_peers import peer_configs

        rows.extend(peer_configs())
    return rows


def corpus_manifest() -> list[dict[str, Any]]:
    """The shipped corpus's documents (``bench/data/corpus/manifest.json``)."""
    root = resources.files("deltastore.bench").joinpath("data", CORPUS)
    return json.loads(root.joinpath("manifest.json").read_text("utf-8"))["documents"]


def corpus_windows(tok: Any, split: str, ctx: int, eval_len: int, per_doc: int = 4) -> list[Any]:
    """Windows of every document of ``split`` ("tune" or "report"), in manifest order."""
    import torch

    from deltastore.bench.quality_eval import Window, doc_windows

    root = resources.files("deltastore.bench").joinpath("data", CORPUS)
    out = []
    for doc in corpus_manifest():
        if doc["split"] != split:
            continue
        ids = tok(root.joinpath(doc["file"]).read_text("utf-8"), add_special_tokens=False)["input_ids"]
        for s in doc_windows(len(ids), ctx, eval_len, per_doc):
            w = torch.tensor([ids[s : s + ctx + eval_len]], dtype=torch.long)
            out.append(Window(w, ctx, doc=doc["name"], kind=doc["kind"]))
    if not out:
        raise InvalidArgument(
            f"no corpus document of split {split!r} holds a window of {ctx + eval_len} tokens"
        )
    return out


def _load_text(path: Path) -> tuple[str, str]:
    try:
        return path.read_text("utf-8"), str(path)
    except (OSError, UnicodeDecodeError) as exc:
        raise InvalidArgument(f"cannot read --text {path}: {exc}") from exc


def run_benchmark(
    args: argparse.Namespace, checkpoint: Callable[[dict[str, Any]], None] | None = None
) -> dict[str, Any]:
    """Run the whole sweep and return the JSON document (also written by :func:`run`).

    ``checkpoint`` receives the document after every window, so a long run that is stopped
    still leaves its completed windows on disk.
    """
    import torch
    import transformers
    from tqdm import tqdm

    from deltastore.bench.quality_configs import fp16_nbytes, score_key
    from deltastore.bench.quality_eval import Window, continuation_logprobs, kl_top1, make_windows, prefill
    from deltastore.bench.quality_peers import KVPressConfig, PressBank, peers_unavailable
    from deltastore.bench.serving_refs import memcpy_gbps
    from deltastore.client.models import load_model

    ctx = args.ctx or (128 if args.quick else 512)
    eval_len = args.eval or (16 if args.quick else 64)
    groups = {g.strip() for g in args.groups.split(",") if g.strip()}
    if not groups <= set(GROUPS):
        raise InvalidArgument(f"unknown row group in --groups {args.groups!r}")
    transformers.utils.logging.disable_progress_bar()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    model, tok = load_model(args.model, device=args.device)
    if args.text is not None:
        text, text_name = _load_text(args.text)
        n_windows = args.windows or (2 if args.quick else 8)
        ids = tok(text, add_special_tokens=False)["input_ids"]
        windows = [Window(w, ctx) for w in make_windows(ids, n_windows, ctx, eval_len, args.seed)]
    else:
        text_name = f"{CORPUS}:{args.split}"
        windows = corpus_windows(tok, args.split, ctx, eval_len, args.per_doc)
        n_windows = args.windows or (2 if args.quick else len(windows))
        if n_windows < len(windows):  # an even subset, every kind represented
            windows = [windows[i * len(windows) // n_windows] for i in range(n_windows)]
        n_windows = len(windows)
    skipped = {} if args.no_peers or args.quick or "peer" not in groups else peers_unavailable()
    configs = build_configs(
        args.quick, args.block, peers=not (args.no_peers or args.quick), specs=getattr(args, "specs", None)
    )
    configs = [c for c in configs if c.group in groups or c.spec == "fp16"]
    if getattr(args, "only", None):
        only = {x.strip() for x in args.only.split(",") if x.strip()}
        unknown = only - {c.spec for c in configs}
        if unknown:
            raise InvalidArgument(f"--only: no row of groups {sorted(groups)} has spec {sorted(unknown)}")
        configs = [c for c in configs if c.spec in only or c.spec == "fp16"]
    configs = [c for c in configs if c.group != "peer" or c.__class__.__name__ not in _peer_classes(skipped)]
    acc = {c.name: _Acc() for c in configs}
    # Scores per (source, segment size): a worker scores the store's own blocks, so rows stored in
    # other segment sizes read scores captured for those segments.
    sources = sorted({score_key(c) for c in configs} - {None})
    capture_s = prefill_s = 0.0
    measured_capture = False
    windows_done = 0
    rss_mb: list[float] = []
    memcpy_gbs = memcpy_gbps(64 << 20)  # the ceiling encode and decode speeds are read against
    press_rows = [c for c in configs if isinstance(c, KVPressConfig)]
    bank = PressBank(model, press_rows) if press_rows else None

    def document(done: int) -> dict[str, Any]:
        return {
            "model": args.model,
            "text": text_name,
            "windows": done,
            "windows_planned": n_windows,
            "ctx": ctx,
            "eval": eval_len,
            "block": args.block,
            "seed": args.seed,
            "split": None if args.text is not None else args.split,
            "per_doc": None if args.text is not None else args.per_doc,
            "device": args.device,
            "threads": torch.get_num_threads(),
            "memcpy_gbs": memcpy_gbs,
            "rss_mb_per_window": rss_mb,
            "protocol": "cache = first ctx-1 tokens; continuation of eval tokens teacher-forced from the last context token",
            "prefill_s": prefill_s,
            "score_capture_overhead": (capture_s - prefill_s) / max(prefill_s, 1e-9),
            "score_sources": _score_sources(),
            "skipped": skipped,
            "rows": [_summary(c, acc[c.name]) for c in configs if acc[c.name].n == done and done],
        }

    torch.manual_seed(args.seed)
    with tqdm(total=len(windows) * (len(configs) + 1), desc="quality", unit="run") as bar:
        for w in windows:
            caps = {key: _capture(key, w.n_cached) for key in sources}
            if not measured_capture and sources:  # once: a plain prefill vs one with the score hooks
                prefill_s, capture_s = _capture_cost(model, w, args.block)
                measured_capture = True
            with ExitStack() as stack:  # hooks only read: the cache is the plain prefill's
                for name in sources:
                    stack.enter_context(caps[name].attach(model))
                pruned = stack.enter_context(bank.attach()) if bank is not None else {}
                t0 = time.perf_counter()
                prefill(model, w)
                if not sources and not prefill_s:  # no score rows: the first plain prefill is the reference
                    prefill_s = capture_s = time.perf_counter() - t0
            w.scores = {name: caps[name].layer_scores(len(w.layers)) for name in sources}
            w.pruned = {name: layers for name, layers in pruned.items() if name not in bank.errors}
            for name, why in (bank.errors if bank is not None else {}).items():
                skipped.setdefault(name, why)
            w.ref_logprobs = continuation_logprobs(model, w, w.layers)
            bar.update(1)
            for cfg in configs:
                bar.set_postfix_str(cfg.name[:32])
                try:
                    trial = cfg.run(model, w)
                except Exception as exc:
                    if cfg.group != "peer":
                        raise
                    skipped.setdefault(
                        cfg.name, f"{type(exc).__name__}: {exc}"
                    )  # a peer broke: say so, never fake it
                    bar.update(1)
                    continue
                kl, top1 = kl_top1(w.ref_logprobs, continuation_logprobs(model, w, trial.layers))
                a = acc[cfg.name]
                a.kl.append(kl)
                a.top1.append(top1)
                a.fp16 += fp16_nbytes(w.layers)
                a.stored += trial.nbytes
                a.kept += trial.kept_fraction
                if windows_done or len(windows) == 1:  # the first window pays one-time warm-ups
                    a.enc += trial.encode_s
                    a.dec += trial.decode_s
                    a.timed_fp16 += fp16_nbytes(w.layers)
                a.n += 1
                a.where.append((w.kind, w.doc))
                del trial
                bar.update(1)
            windows_done += 1
            # A window's cache, scores and reference are dropped once its rows are done, and freed
            # heap pages go back to the system: peak memory stays flat across windows and rows.
            w.layers, w.scores, w.pruned, w.ref_logprobs = [], {}, {}, None
            gc.collect()
            _trim_heap()
            rss_mb.append(_rss_mb())
            if checkpoint is not None:
                checkpoint(document(windows_done))
    return document(windows_done)


def _trim_heap() -> None:
    """Return freed heap pages to the OS (glibc ``malloc_trim``; a no-op elsewhere)."""
    with suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def _rss_mb() -> float:
    """Resident set size of this process in MB (Linux; 0 elsewhere)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def bootstrap_ci(values: list[float], n: int = BOOTSTRAP, seed: int = 0) -> tuple[float, float]:
    """95% percentile bootstrap interval of the mean of ``values`` (resampled with replacement)."""
    if len(values) < 2:
        return (values[0], values[0]) if values else (0.0, 0.0)
    rng = random.Random(seed)
    k = len(values)
    means = sorted(sum(values[rng.randrange(k)] for _ in range(k)) / k for _ in range(n))
    return means[int(0.025 * n)], means[int(0.975 * n) - 1]


def _capture_cost(model: Any, window: Any, block: int, repeat: int = 3) -> tuple[float, float]:
    """Seconds of a plain prefill and of one with the product's score hooks: each warmed up once,
    then the fastest of ``repeat``, alternating (a single cold pair once gave a negative cost)."""
    from deltastore.bench.quality_eval import prefill

    def timed(hooked: bool) -> float:
        t0 = time.perf_counter()
        if hooked:
            with _capture(f"block/{block}", window.n_cached).attach(model):
                prefill(model, window)
        else:
            prefill(model, window)
        return time.perf_counter() - t0

    timed(False), timed(True)
    runs = [(timed(False), timed(True)) for _ in range(repeat)]
    return min(r[0] for r in runs), min(r[1] for r in runs)


def _capture(key: str, n_tokens: int) -> Any:
    """The score capture of a ``score_key``: ``block/N`` (the product's), ``causal/N`` or ``window``."""
    from deltastore.client.scores import SNAPKV, ScoreCapture, segment_ends_for_blocks

    source, _, seg = key.partition("/")
    ends = segment_ends_for_blocks(n_tokens, int(seg)) if seg else None
    return ScoreCapture(segment_ends=ends) if source == "block" else ScoreCapture(segment_ends=ends, **SNAPKV)


def _summary(cfg: Any, a: _Acc) -> dict[str, Any]:
    import torch

    kl = torch.cat(a.kl)
    per_window = [float(x.mean()) for x in a.kl]
    kl_mean = sum(per_window) / len(per_window)
    lo, hi = bootstrap_ci(per_window)
    by_kind: dict[str, list[float]] = {}
    for (kind, _), value in zip(a.where, per_window, strict=True):
        by_kind.setdefault(kind or "text", []).append(value)
    kind_means = {k: sum(v) / len(v) for k, v in by_kind.items()}
    worst_kind = max(kind_means, key=kind_means.__getitem__)
    worst_at = max(range(len(per_window)), key=per_window.__getitem__)
    return {
        "config": cfg.name,
        "spec": cfg.spec,
        "group": cfg.group,
        "scores": getattr(cfg, "scores", None),
        "dedup_safe": getattr(cfg, "scores", None) != "window",
        "segment_tokens": getattr(cfg, "block", 0),
        "whole_prefix": getattr(cfg, "whole", 0),
        "ratio": a.fp16 / a.stored,
        "kl_mean": kl_mean,
        "kl_ci95": [lo, hi],
        "kl_by_kind": kind_means,
        "worst_kind": worst_kind,
        "worst_window": {"doc": a.where[worst_at][1], "kl": per_window[worst_at]},
        "kl_windows": per_window,
        "kl_p95": float(torch.quantile(kl.double(), 0.95)),
        "top1": float(torch.cat(a.top1).mean()),
        "grade": grade(kl_mean),
        "kept_fraction": a.kept / a.n,
        "encode_s": a.enc / max(1, a.n - (a.n > 1)),  # per timed window
        "decode_s": a.dec / max(1, a.n - (a.n > 1)),
        "bytes_per_window": a.stored / a.n,
        "encode_gbs": a.timed_fp16 / max(a.enc, 1e-12) / 1e9,
        "decode_gbs": a.timed_fp16 / max(a.dec, 1e-12) / 1e9,
    }


def _score_sources() -> dict[str, str]:
    from deltastore.bench.quality_configs import SCORE_SOURCES

    return SCORE_SOURCES


def _peer_classes(skipped: dict[str, str]) -> set[str]:
    return {
        name for peer, name in (("quanto", "QuantoConfig"), ("kvpress", "KVPressConfig")) if peer in skipped
    }


def windows_to_separate(a: list[float], b: list[float]) -> int | None:
    """Windows it takes for two rows' mean KL to differ at 95% (paired, normal approximation:
    ``(1.96 * sd(d) / |mean(d)|)**2`` over the per-window differences d); None if equal."""
    d = [x - y for x, y in zip(a, b, strict=True)]
    if len(d) < 2:
        return None
    mean = sum(d) / len(d)
    var = sum((x - mean) ** 2 for x in d) / (len(d) - 1)
    if mean == 0:
        return None
    return max(2, int(-(-(1.96**2) * var // (mean * mean))))


def markdown(doc: dict[str, Any]) -> str:
    """The results as a markdown table: mean KL with its 95% bootstrap interval over windows, the
    worst kind of text, encode/decode speed in GB/s of FP16 KV beside this run's memcpy."""
    where = doc["text"] + (
        f" ({doc['split']} split, <= {doc['per_doc']} windows per document)" if doc.get("split") else ""
    )
    lines = [
        f"Model {doc['model']}, text {where}: {doc['windows']} windows x ({doc['ctx']} context + "
        f"{doc['eval']} scored), block {doc['block']}. Ratio = FP16 bytes / every stored byte. KL in "
        f"nats: mean over windows [95% bootstrap interval]; worst = the kind of text with the highest "
        f"mean. Encode/decode: GB/s of FP16 KV on {doc['device']} ({doc.get('threads', '?')} threads; "
        f"memcpy {doc.get('memcpy_gbs', 0):.1f} GB/s in the same run).",
        "",
        "| config | spec | group | ratio | KL mean [95% CI] | worst kind (KL) | top-1 | grade | kept | encode GB/s | decode GB/s |",
        "|---|---|---|---:|---:|---|---:|---|---:|---:|---:|",
    ]
    for r in doc["rows"]:
        lo, hi = r.get("kl_ci95", (r["kl_mean"], r["kl_mean"]))
        worst = r.get("worst_kind", "")
        lines.append(
            f"| {r['config']} | `{r['spec']}` | {r['group']}{'' if r['dedup_safe'] else ' (not dedup-safe)'} | "
            f"{r['ratio']:.2f}x | {r['kl_mean']:.4f} [{lo:.4f}, {hi:.4f}] | "
            f"{worst} ({r.get('kl_by_kind', {}).get(worst, r['kl_mean']):.4f}) | {r['top1']:.3f} | {r['grade']} | "
            f"{r['kept_fraction']:.2f} | {r.get('encode_gbs', 0):.2f} | {r.get('decode_gbs', 0):.2f} |"
        )
    ranked = sorted((r for r in doc["rows"] if r["kl_mean"] > 0), key=lambda r: r["ratio"])
    pairs = [
        (x["spec"], y["spec"], windows_to_separate(x["kl_windows"], y["kl_windows"]))
        for x, y in itertools.pairwise(ranked)
        if "kl_windows" in x and "kl_windows" in y
    ]
    if pairs:
        lines.append(
            "\nWindows needed to separate neighbouring rows (by ratio) at 95%, paired: "
            + "; ".join(f"`{x}` vs `{y}` {n if n is not None else '-'}" for x, y, n in pairs)
        )
    rss = doc.get("rss_mb_per_window") or []
    if rss:
        lines.append(
            f"\nResident memory after each window: {rss[0]:.0f} .. {max(rss):.0f} MB (last {rss[-1]:.0f})."
        )
    for name, why in doc["skipped"].items():
        lines.append(f"\nSkipped {name}: {why}")
    return "\n".join(lines) + "\n"


def plot(doc: dict[str, Any], path: Path) -> None:
    """Ratio vs mean KL (log scale), our rows by group, the report's points as labelled references."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10, 6.5))
    styles = {
        "tier": ("o", "tab:blue"),
        "sweep": ("s", "tab:orange"),
        "frontier": ("D", "tab:green"),
        "peer": ("^", "tab:gray"),
        "engine": ("P", "tab:cyan"),
    }
    floor = 1e-5  # KL 0 (fp16, bit-exact) drawn at the floor of the log axis
    for group, (marker, color) in styles.items():
        pts = [(r["ratio"], max(r["kl_mean"], floor)) for r in doc["rows"] if r["group"] == group]
        if pts:
            ax.scatter(
                *zip(*pts, strict=True), marker=marker, color=color, label=f"measured: {group}", zorder=3
            )
    for size, color in (("7B", "tab:red"), ("32B", "tab:purple"), ("72B", "tab:brown")):
        pts = REPORT_POINTS[size]
        ax.scatter(
            [p[1] for p in pts],
            [p[2] for p in pts],
            marker="x",
            color=color,
            label=f"report {size}",
            zorder=2,
        )
        for label, x, y in pts[:4] if size != "72B" else pts:
            ax.annotate(
                f"{label} {size}", (x, y), fontsize=6, color=color, xytext=(3, 3), textcoords="offset points"
            )
    ax.scatter(*zip(*TARGETS, strict=True), marker="*", s=120, color="k", label="target (issue #8)", zorder=4)
    ax.set_yscale("log")
    ax.set_xlabel("compression ratio vs FP16 (every byte counted)")
    ax.set_ylabel("mean KL(p_fp16 || p_compressed), nats")
    ax.set_title(f"{doc['model']}: {doc['windows']} windows x {doc['ctx']}+{doc['eval']} tokens")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _read_run(path: Path) -> dict[str, Any]:
    """A quality run's JSON document (``--recommend-also``)."""
    try:
        doc = json.loads(path.read_text("utf-8"))
    except (OSError, ValueError) as exc:
        raise InvalidArgument(f"cannot read the quality run {path}: {exc}") from exc
    if not isinstance(doc, dict) or not isinstance(doc.get("rows"), list):
        raise InvalidArgument(f"{path} is not a `deltastore bench quality` JSON document")
    return doc


def run(args: argparse.Namespace) -> int:
    args.json.parent.mkdir(parents=True, exist_ok=True)

    def write(doc: dict[str, Any]) -> None:
        args.json.write_text(json.dumps(doc, indent=2) + "\n")

    others = [_read_run(path) for path in args.recommend_also]  # a bad path fails now, not after the run
    doc = run_benchmark(args, checkpoint=write)
    write(doc)
    table = markdown(doc)
    args.json.with_suffix(".md").write_text(table)
    plot(doc, args.json.with_suffix(".png"))
    if args.recommend is not None:
        from deltastore.codecs.tiers import recommend

        args.recommend.write_text(json.dumps(recommend(doc, *others), indent=2) + "\n")
    print(table)
    return 0
