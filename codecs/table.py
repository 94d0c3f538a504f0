"""List the codec tiers: bits per element with every byte counted, ratio vs FP16, bit-exactness.

``--max-kl X`` instead prints the spec with the highest ratio measured under mean KL X on real
text (``deltastore.codecs.tiers.pick_tier``, from the shipped quality run); with ``--engine``, the
best engine-usable spec (no eviction, no attention scores), measured on the corpus's report split
with the budget met at the upper end of its 95% interval.

Figures are exact byte arithmetic (``encoded_nbytes``, which the tests prove equal to real
payload sizes) for a reference block: the Mistral-7B KV shape (32 layers x 8 KV heads x 128
head_dim), 4096 tokens at position 0. Codecs with a zstd stage (lossless) depend on the data;
their size is shown as null.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from deltastore.codecs.format import encoded_nbytes
from deltastore.codecs.spec import TIERS, Tier
from deltastore.errors import InvalidArgument, NotFound

__all__ = ["REFERENCE_BLOCK", "add_arguments", "run", "tier_row", "tier_rows"]

REFERENCE_BLOCK: dict[str, int] = {
    "n_layers": 32,
    "kv_heads": 8,
    "head_dim": 128,
    "n_tokens": 4096,
    "start": 0,
}


def tier_row(tier: Tier, block: dict[str, int] = REFERENCE_BLOCK) -> dict[str, Any]:
    """One tier's figures for ``block`` (keys as in :data:`REFERENCE_BLOCK`)."""
    spec = tier.spec
    data_dependent = spec.entropy or spec.kind == "lossless"
    elements = block["n_layers"] * 2 * block["kv_heads"] * block["n_tokens"] * block["head_dim"]
    size = None
    if not data_dependent:
        n_layers, kv_heads, head_dim = block["n_layers"], block["kv_heads"], block["head_dim"]
        n_tokens, start = block["n_tokens"], block["start"]
        size = encoded_nbytes(
            spec, n_layers=n_layers, kv_heads=kv_heads, head_dim=head_dim, n_tokens=n_tokens, start=start
        )
    bits = None if size is None else 8 * size / elements
    kept = spec.kept_tokens(block["n_tokens"], block["start"]) if spec.evicts else None
    return {
        "name": tier.name,
        "spec": spec.canonical(),
        "key_bits": spec.key_bits,
        "value_bits": spec.value_bits,
        "group_size": spec.group_size if spec.kind in ("fp8", "quant") else None,
        "bits_per_element": bits,
        "ratio_vs_fp16": None if bits is None else 16 / bits,
        "bit_exact": spec.bit_exact,
        "kept_fraction": None if kept is None else kept / block["n_tokens"],
        "report_ratio": tier.report_ratio,
        "about": tier.about,
    }


def tier_rows(block: dict[str, int] = REFERENCE_BLOCK) -> list[dict[str, Any]]:
    return [tier_row(t, block) for t in TIERS.values()]


def _fmt(value: Any, spec: str = "") -> str:
    if value is None:
        return "-"
    return format(value, spec) if spec else str(value)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print the table as JSON")
    parser.add_argument(
        "--max-kl",
        type=float,
        default=None,
        metavar="X",
        help="print the measured spec with the highest ratio at mean KL <= X (nats/token) and exit",
    )
    parser.add_argument(
        "--engine",
        action="store_true",
        help="with --max-kl: engine-usable specs only (no eviction, no attention scores; vLLM/SGLang)",
    )


def _pick(max_kl: float, as_json: bool, engine: bool = False) -> int:
    """Print pick_tier(max_kl) with its measured figures; 2 when nothing measured fits."""
    from deltastore.codecs.tiers import load_table, pick_tier

    table = load_table(engine)
    try:
        spec = pick_tier(max_kl, table=table, engine=engine)
    except (InvalidArgument, NotFound) as exc:
        print(f"deltastore codecs: {exc.message}" + (f" ({exc.hint})" if exc.hint else ""), file=sys.stderr)
        return 2
    point = next(p for p in table["points"] if p["spec"] == spec)
    src = table["source"]
    if as_json:
        json.dump({"max_kl": max_kl, **point, "source": src}, sys.stdout, indent=2)
        sys.stdout.write("\n")
        return 0
    print(spec)
    interval = f" [95% CI {point['kl_lo']:.4g}, {point['kl_hi']:.4g}]" if "kl_hi" in point else ""
    where = f"{src['text']}, " if src.get("split") else ""
    print(
        f"measured: {point['ratio']:.2f}x vs FP16, mean KL {point['kl_mean']:.4g} nats{interval}, top-1 "
        f"{point['top1']:.3f} (scores: {point['scores']}; {src['model']}, {where}{src['windows']} windows, "
        f"{src['block']}-token blocks)"
    )
    if "kl_by_text" in point:  # several texts: the figures above are the worst of them
        print("worst of: " + ", ".join(f"{text} KL {kl:.4g}" for text, kl in point["kl_by_text"].items()))
    return 0


def run(args: argparse.Namespace) -> int:
    if args.engine and args.max_kl is None:
        print("deltastore codecs: --engine needs --max-kl X", file=sys.stderr)
        return 2
    if args.max_kl is not None:
        return _pick(args.max_kl, args.json, args.engine)
    rows = tier_rows()
    if args.json:
        json.dump({"reference_block": REFERENCE_BLOCK, "tiers": rows}, sys.stdout, indent=2)
        sys.stdout.write("\n")
        return 0
    b = REFERENCE_BLOCK
    print(
        f"Reference block: {b['n_layers']} layers x {b['kv_heads']} KV heads x {b['head_dim']} dims x "
        f"{b['n_tokens']} tokens; every byte counted (codes, scales, zero-points, masks, header)."
    )
    print("Eviction pe<X>/adapt<X>: keep ceil(n*(100+X)/200) tokens per head (X% + half the rest);")
    print("pe<X> always keeps the first X%, adapt<X> picks every kept token by score; both keep the")
    print("first 4 positions (sink) and the last r<N> (default 16) tokens of the block.")
    print("keep<P>: keep the last r<N> tokens of the sequence and, of each block's other m tokens,")
    print("ceil(m*P/100) per head by score (at least the sink). Eviction is decided when a segment is")
    print("sealed, with the sequence end known then. Evicted tokens are absent at decode.")
    print("p8: scales and zero-points as 8-bit codes on per-head grids (about half their bytes);")
    print("hp<N>: the newest N tokens of the sequence at 8 bits (with keep<P>, N <= r<N>).")
    print("lo<L> (with keep<P>, L <= P): of the kept tokens, the lowest-scored, L% of each block's")
    print("older tokens, at 2 bits instead of the spec's (e.g. keep88-lo72: 16% 4-bit, 72% 2-bit).")
    print("`deltastore codecs --max-kl X` picks the best measured spec for a quality budget.")
    print("'-' = not applicable, or data-dependent (zstd).\n")
    header = ("tier", "spec", "K", "V", "group", "bits/elem", "ratio", "report", "bit-exact", "kept")
    table = [
        (
            r["name"],
            r["spec"],
            str(r["key_bits"]),
            str(r["value_bits"]),
            _fmt(r["group_size"]),
            _fmt(r["bits_per_element"], ".3f"),
            _fmt(r["ratio_vs_fp16"], ".2f") + ("x" if r["ratio_vs_fp16"] else ""),
            _fmt(r["report_ratio"], ".1f") + ("x" if r["report_ratio"] else ""),
            "yes" if r["bit_exact"] else "no",
            _fmt(r["kept_fraction"], ".0%"),
        )
        for r in rows
    ]
    widths = [max(len(row[i]) for row in (header, *table)) for i in range(len(header))]
    for row in (header, tuple("-" * w for w in widths), *table):
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
    return 0
