"""Per-layer calibration for ``up<layers>`` (per-layer mixed precision): which layers' KV error
costs the model the most.

For each layer alone, the mean KL of the continuation when that layer's KV goes through ``--base``
(one store segment at a time, as the benchmark stores it) and every other layer stays fp16, over
calibration windows of the *tuning* split that the tuning runs do not score (the even 16-window
subset of ``bench quality --split tune --per-doc 3 --windows 16`` is left out). Layers are ranked
by it; ``specs`` gives the base spec with the top N layers one bit wider (``up``), which the
quality benchmark then measures like any spec. The result is stored per model fingerprint
(``codecs/data/calibration-<model>.json``), so the table's ``up`` specs are reproducible:

    python -m deltastore.bench.quality_calibrate --base k3v2-p8-sink4-z-pr100000 --windows 6 \\
        --json codecs/data/calibration-smollm2.json

On SmolLM2 the sensitivity is concentrated: 6 of 30 layers carry 60% of the summed per-layer KL,
which is why a few wider layers buy more than the same bytes spread over all of them
(docs/results/quality_levers.md).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

__all__ = ["calibration_windows", "layer_sensitivity", "main"]

TUNE_SUBSET = 16
"""Windows of the tuning runs (their even subset of the tuning split), never calibrated on."""


def calibration_windows(windows: list[Any], n: int) -> list[Any]:
    """``n`` windows spread over those not in the tuning runs' even subset of ``windows``."""
    scored = {i * len(windows) // TUNE_SUBSET for i in range(TUNE_SUBSET)}
    rest = [w for i, w in enumerate(windows) if i not in scored]
    return rest[:: max(1, (len(windows) - TUNE_SUBSET) // n)][:n]


def layer_sensitivity(model: Any, window: Any, base: str, block: int = 64) -> list[float]:
    """Per layer, the window's mean KL with only that layer's KV through ``base``."""
    import torch

    from deltastore.bench.quality_configs import segments
    from deltastore.bench.quality_eval import continuation_logprobs, kl_top1, prefill
    from deltastore.codecs import decode_block, encode_block

    prefill(model, window)
    ref = continuation_logprobs(model, window, window.layers)
    n = window.n_cached
    out = []
    for i, (k, v) in enumerate(window.layers):
        parts = [
            decode_block(
                encode_block([(k[:, s:e], v[:, s:e])], base, start=s, seq_end=n), dtype=k.dtype
            ).layers[0]
            for s, e in segments(n, block)
        ]
        layers = list(window.layers)
        layers[i] = (torch.cat([p[0] for p in parts], 1), torch.cat([p[1] for p in parts], 1))
        kl, _ = kl_top1(ref, continuation_logprobs(model, window, layers))
        out.append(float(kl.mean()))
    window.layers = []
    return out


def main(argv: list[str] | None = None) -> int:
    import torch

    from deltastore.bench.quality import corpus_windows
    from deltastore.client.models import load_model, model_fingerprint
    from deltastore.codecs import CodecSpec

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2")
    p.add_argument("--base", default="k3v2-p8-sink4-z-pr100000", help="the spec the layers are measured at")
    p.add_argument("--windows", type=int, default=6)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--top", default="3,6,10", help="the up<layers> specs to name: the top N layers wider")
    p.add_argument("--json", type=Path, required=True)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    base = CodecSpec.parse(args.base)
    model, tok = load_model(args.model)
    windows = calibration_windows(corpus_windows(tok, "tune", 512, 64, 3), args.windows)
    per_window = [layer_sensitivity(model, w, args.base) for w in windows]
    mean = [sum(col) / len(col) for col in zip(*per_window, strict=True)]
    order = sorted(range(len(mean)), key=lambda i: -mean[i])
    doc = {
        "model": args.model,
        "fingerprint": model_fingerprint(model),
        "base": base.canonical(),
        "windows": [w.doc for w in windows],
        "sensitivity": [round(x, 6) for x in mean],
        "order": order,
        "specs": {
            f"top{n}": f"{args.base}-up{'.'.join(map(str, sorted(order[:n])))}"
            for n in (int(x) for x in args.top.split(","))
        },
    }
    args.json.write_text(json.dumps(doc, indent=1) + "\n")
    print(json.dumps(doc["specs"], indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
