"""Fit the non-uniform codebooks of the ``nf`` codec option on real KV of the tuning split.

``python -m deltastore.bench.quality_codebook [--windows N] [--threads T]`` prefills windows of the
corpus's *tuning* documents (never the report ones) with SmolLM2-135M, rotates keys and values as
the codec does, takes each quantization group's normalized position ``t = (x - min) / (max -
min)`` in [0, 1] (keys per channel along 64 tokens, values per token along 64 dims) and runs
Lloyd-Max on ``t`` weighted by the group's squared range (so it minimizes the squared error in
the cache's units). The levels are free in [0, 1] (``--pin``: the ends stay at 0 and 1, which
keeps each group's min and max exact but spends two of a 2-bit code's four levels on one element
each). Prints the tables that ``codecs/codebook.py`` ships, and each table's weighted error
relative to uniform levels.
"""

from __future__ import annotations

import argparse
import json

import torch

__all__ = ["fit_levels", "main"]


def fit_levels(t: torch.Tensor, w: torch.Tensor, n: int, iters: int = 60, pin: bool = False) -> list[float]:
    """Weighted Lloyd-Max levels on [0, 1] for samples ``t`` (weights ``w``); ``pin``: the end
    levels stay at 0 and 1."""
    levels = torch.linspace(0, 1, n, dtype=torch.float64)
    t, w = t.double(), w.double()
    for _ in range(iters):
        mids = (levels[1:] + levels[:-1]) / 2
        idx = torch.bucketize(t, mids)
        num = torch.zeros(n, dtype=torch.float64).index_add_(0, idx, t * w)
        den = torch.zeros(n, dtype=torch.float64).index_add_(0, idx, w)
        new = torch.where(den > 0, num / den.clamp(min=1e-30), levels)
        if pin:
            new[0], new[-1] = 0.0, 1.0
        levels = new
    return [round(float(x), 6) for x in levels]


def _samples(layers: list[tuple[torch.Tensor, torch.Tensor]], group: int) -> dict[str, torch.Tensor]:
    from deltastore.codecs.quant import split_groups
    from deltastore.codecs.rotation import rotate

    out: dict[str, list[torch.Tensor]] = {"k": [], "v": [], "wk": [], "wv": []}
    for k, v in layers:
        for name, x, dim in (("k", k, 1), ("v", v, 2)):
            xg = split_groups(rotate(x.float()), group, dim)
            lo, hi = torch.aminmax(xg, dim=dim + 1, keepdim=True)
            rng = (hi - lo).clamp(min=1e-12)
            t = ((xg - lo) / rng).reshape(-1)
            out[name].append(t)
            out["w" + name].append((rng**2).expand_as(xg).reshape(-1))
    return {k: torch.cat(v) for k, v in out.items()}


def main() -> None:
    from deltastore.bench.quality import corpus_windows
    from deltastore.bench.quality_eval import prefill
    from deltastore.client.models import load_model

    p = argparse.ArgumentParser()
    p.add_argument("--windows", type=int, default=12)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--group", type=int, default=64)
    p.add_argument("--pin", action="store_true", help="pin the end levels at 0 and 1")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    model, tok = load_model("smollm2")
    windows = corpus_windows(tok, "tune", 512, 64)
    step = max(1, len(windows) // args.windows)
    acc: dict[str, list[torch.Tensor]] = {}
    for w in windows[::step][: args.windows]:
        prefill(model, w)
        for key, val in _samples(w.layers, args.group).items():
            acc.setdefault(key, []).append(val)
        w.layers = []
    tables = {}
    for name in ("k", "v"):
        t, wt = torch.cat(acc[name]), torch.cat(acc["w" + name])
        sel = torch.randperm(t.numel(), generator=torch.Generator().manual_seed(0))[:4_000_000]
        tables[name] = {bits: fit_levels(t[sel], wt[sel], 1 << bits, pin=args.pin) for bits in (2, 3, 4)}
        for bits, levels in tables[name].items():
            fitted, uniform = (
                _weighted_mse(t[sel], wt[sel], torch.tensor(x, dtype=torch.float64))
                for x in (levels, [i / ((1 << bits) - 1) for i in range(1 << bits)])
            )
            print(f"{name}{bits}: weighted MSE {fitted / uniform:.3f} of uniform levels")
    print(json.dumps(tables, indent=1))


def _weighted_mse(t: torch.Tensor, w: torch.Tensor, levels: torch.Tensor) -> float:
    idx = torch.bucketize(t.double(), (levels[1:] + levels[:-1]) / 2)
    return float((w.double() * (t.double() - levels[idx]) ** 2).sum() / w.double().sum())


if __name__ == "__main__":
    main()
