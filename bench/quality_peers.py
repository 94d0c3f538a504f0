"""Peers on the same windows: HF ``QuantizedCache`` (optimum-quanto) and NVIDIA kvpress presses.

Both are an optional extra (``pip install -e .[peers]``). A peer that cannot import or run is
skipped with its reason in the JSON, never faked. Bytes are counted as for our rows: every code,
scale and zero-point at the width an FP16 deployment stores it (quanto keeps its scales in the
activation dtype; we count them as fp16), plus one keep bit per token, head and layer for presses
that evict.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from deltastore.bench.quality_configs import Config, Trial
from deltastore.bench.quality_eval import KVLayers, Window

__all__ = ["KVPressConfig", "PressBank", "QuantoConfig", "peer_configs", "peers_unavailable"]

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
        from transformers.cache_utils import QuantoQuantizedLayer

        # The code QuantizedCache runs on a prefill (lazy init + _quantize of the whole context),
        # applied to the same stored cache every other row starts from.
        layer = QuantoQuantizedLayer(
            nbits=self.nbits,
            axis_key=self.axis_key,
            axis_value=self.axis_value,
            q_group_size=self.q_group_size,
        )
        layers: KVLayers = []
        nbytes = 0
        tokens = window.n_cached
        if (
            self.q_group_size
            and (self.axis_key == -1 or self.axis_value == -1)
            and tokens % self.q_group_size
        ):
            # What QuantizedCache itself raises on such a prefill, said plainly.
            raise ValueError(
                f"quanto axis=-1 groups along tokens: a {tokens}-token prefill is not a multiple of "
                f"q_group_size={self.q_group_size}, so HF QuantizedCache cannot quantize it"
            )
        for k, v in window.layers:
            qk = layer._quantize(k[None].float().contiguous(), axis=self.axis_key)
            qv = layer._quantize(v[None].float().contiguous(), axis=self.axis_value)
            nbytes += _qtensor_nbytes(qk) + _qtensor_nbytes(qv)
            layers.append((layer._dequantize(qk)[0].half(), layer._dequantize(qv)[0].half()))
        return Trial(layers, nbytes, 1.0, 0.0, 0.0)


@dataclass(frozen=True)
class KVPressConfig(Config):
    """A kvpress press applied during the prefill (see PressBank); the pruned cache is stored in fp16."""

    name: str
    spec: str
    group: str
    press: str
    ratio: float

    def run(self, model: object, window: Window) -> Trial:
        layers = window.pruned[self.name]
        n_layers, (heads, kept, dim) = len(layers), layers[0][0].shape
        mask = math.ceil(n_layers * heads * window.n_cached / 8)
        return Trial(layers, n_layers * 2 * heads * kept * dim * 2 + mask, kept / window.n_cached, 0.0, 0.0)


class PressBank:
    """Runs every kvpress press on one prefill, without touching the model's cache.

    A press prunes a layer's cache after that layer's attention ran; later layers never read it,
    so the hidden states, keys and values each press sees are those of the plain prefill. Calling
    each press's own ``compress`` from one hook gives what ``with press(model)`` would give, for
    one prefill instead of one per press.
    """

    def __init__(self, model: object, configs: list[KVPressConfig]) -> None:
        import kvpress

        self.presses = {c.name: getattr(kvpress, c.press)(compression_ratio=c.ratio) for c in configs}
        for press in self.presses.values():
            press.post_init_from_model(model)
        self.model = model
        self.out: dict[str, KVLayers] = {}
        self.errors: dict[str, str] = {}

    @contextmanager
    def attach(self) -> Iterator[dict[str, KVLayers]]:
        """Hook the attention modules; yields name -> pruned fp16 cache, filled by the prefill."""
        from deltastore.client.scores import decoder_layers

        self.out = {name: [] for name in self.presses}
        base = getattr(self.model, "model", self.model)
        base = getattr(base, "language_model", base)
        layers = decoder_layers(self.model)
        hooks = []
        for layer in layers:
            layer.self_attn.rotary_emb = base.rotary_emb  # what kvpress's own context manager sets up
            hooks.append(layer.self_attn.register_forward_hook(self._hook, with_kwargs=True))
        try:
            yield self.out
        finally:
            for layer, hook in zip(layers, hooks, strict=True):
                hook.remove()
                del layer.self_attn.rotary_emb

    def _hook(self, module: object, args: tuple, kwargs: dict, output: object) -> None:
        layer = kwargs["past_key_values"].layers[module.layer_idx]
        with torch.no_grad():
            for name, press in self.presses.items():
                if name in self.errors:
                    continue
                try:
                    k, v = press.compress(
                        module, kwargs["hidden_states"], layer.keys, layer.values, output[1], kwargs
                    )
                except Exception as exc:  # a peer that breaks is reported as skipped, never faked
                    self.errors[name] = f"{type(exc).__name__}: {exc}"
                    continue
                self.out[name].append((k[0].half(), v[0].half()))


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
