"""Peers on the same windows: HF ``QuantizedCache`` (optimum-quanto) and NVIDIA kvpress presses.

Both are an optional extra (``pip install -e .[peers]``). A peer that cannot import or run is
skipped with its reason in the JSON, never faked. Bytes are counted as for our rows: every code,
scale and zero-point at the width an FP16 deployment stores it (quanto keeps its scales in the
activation dtype; we count them as fp16), plus one keep bit per token, head and layer for presses
that evict.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from deltastore.bench.quality_configs import Config, Trial
from deltastore.bench.quality_eval import KVLayers, Window, cache_layers

__all__ = ["KVPressConfig", "QuantoConfig", "peer_configs", "peers_unavailable"]

KVPRESS_PRESSES = ("SnapKVPress", "StreamingLLMPress", "TOVAPress", "ExpectedAttentionPress")
KVPRESS_RATIOS = (0.3, 0.5, 0.7)


def peers_unavailable() -> dict[str, str]:
    """Peer name -> why it cannot run here (empty when every peer imports)."""
    reasons = {}
    try:
        import optimum.quanto  # noqa: F401
    except Exception as exc:  # any import failure means the peer is absent; say which
        reasons["quanto"] = f"optimum-quanto unavailable: {type(exc).__name__}: {exc}"
    try:
        import kvpress  # noqa: F401
    except Exception as exc:
        reasons["kvpress"] = f"kvpress unavailable: {type(exc).__name__}: {exc}"
    return reasons


def _qtensor_nbytes(q: object) -> int:
    """Stored bytes of a quanto packed tensor: packed codes as stored, scale and shift as fp16."""
    data = q._data
    packed = getattr(data, "_data", data)  # WeightQBitsTensor wraps a PackedTensor
    return packed.numel() * packed.element_size() + 2 * (q._scale.numel() + q._shift.numel())


@dataclass(frozen=True)
class QuantoConfig(Config):
    """HF QuantizedCache (quanto backend): per-group int codes, the whole context quantized.

    Attributes:
        nbits: 4 or 2; axis_key / axis_value: quanto's grouping axes (0 or -1); q_group_size: 64.
    """

    name: str
    spec: str
    group: str
    nbits: int
    axis_key: int
    axis_value: int = 0
    q_group_size: int = 64

    def run(self, model: object, window: Window) -> Trial:
        from transformers import QuantizedCache

        cache = QuantizedCache(
            backend="quanto",
            config=model.config,
            nbits=self.nbits,
            axis_key=self.axis_key,
            axis_value=self.axis_value,
            q_group_size=self.q_group_size,
            residual_length=window.n_cached + 1,
        )
        with torch.no_grad():
            model(input_ids=window.context_ids.to(model.device), past_key_values=cache, use_cache=True)
        layers: KVLayers = []
        nbytes = 0
        for layer in cache.layers:
            qk, qv = layer._quantized_keys, layer._quantized_values
            nbytes += _qtensor_nbytes(qk) + _qtensor_nbytes(qv)
            layers.append((layer._dequantize(qk)[0].half(), layer._dequantize(qv)[0].half()))
        return Trial(layers, nbytes, 1.0, 0.0, 0.0)


@dataclass(frozen=True)
class KVPressConfig(Config):
    """A kvpress press applied during the prefill; the pruned cache is stored in fp16."""

    name: str
    spec: str
    group: str
    press: str
    ratio: float

    def run(self, model: object, window: Window) -> Trial:
        import kvpress

        press = getattr(kvpress, self.press)(compression_ratio=self.ratio)
        with torch.no_grad(), press(model):
            out = model(input_ids=window.context_ids.to(model.device), use_cache=True)
        layers = cache_layers(out.past_key_values)
        n_layers, (heads, kept, dim) = len(layers), layers[0][0].shape
        mask = math.ceil(n_layers * heads * window.n_cached / 8)
        return Trial(layers, n_layers * 2 * heads * kept * dim * 2 + mask, kept / window.n_cached, 0.0, 0.0)


def peer_configs() -> list[Config]:
    """Every peer row: quanto int4/int2 on both key axes, four presses at 30/50/70% removed."""
    rows: list[Config] = []
    for nbits in (4, 2):
        for axis in (0, -1):
            rows.append(
                QuantoConfig(
                    f"HF QuantizedCache int{nbits} axis_key={axis}",
                    f"quanto nbits={nbits} axis_key={axis} axis_value=0 g64",
                    "peer",
                    nbits=nbits,
                    axis_key=axis,
                )
            )
    for press in KVPRESS_PRESSES:
        for ratio in KVPRESS_RATIOS:
            rows.append(
                KVPressConfig(
                    f"kvpress {press.removesuffix('Press')} {round(ratio * 100)}% removed",
                    f"kvpress {press}(compression_ratio={ratio}) fp16",
                    "peer",
                    press=press,
                    ratio=ratio,
                )
            )
    return rows
