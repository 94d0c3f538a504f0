"""The connector's settings (from ``kv_connector_extra_config``), its model fingerprint and alignment.

Nothing here imports vLLM, so it is testable and documented on its own.

``kv_connector_extra_config`` keys (all optional except ``target``):

=====================  ==========  ==============================================================
key                    default     meaning
=====================  ==========  ==============================================================
target                 (required)  DeltaStore gRPC ``host:port`` or ``unix:/path.sock``
namespace              "default"   tenant namespace every call acts in
api_key                none        API key (``authorization: Bearer``); ``api_key_env`` names an
                                   environment variable to read it from instead
tls_ca / tls_cert /    none        PEM files: server CA, and client cert/key for mTLS (TLS is on
tls_key                            when ``tls_ca`` is set)
codec                  "k4v2"      codec spec; evicting specs (``keep``/``pe``/``adapt``) are refused
max_kl                 none        instead of ``codec``: a quality budget (mean KL, nats per token);
                                   the codec is the engine-usable tier with the highest measured
                                   ratio whose KL (upper end of its 95% interval) fits it
                                   (``deltastore codecs --max-kl X --engine``); a tier with keys
                                   before RoPE (``pr<T>``) takes this model's rope_theta, and
                                   models without plain RoPE pick among the other tiers; tiers
                                   with per-layer bits (``up<layers>``, calibrated for one
                                   model) are never picked, only named as ``codec``
shm_dir                none        the server's ``--shm-dir`` as mounted here (same host)
lookup_timeout_s       1.0         deadline of a LookupPrefix (scheduler, on the request's path)
load_timeout_s         10.0        deadline of a step's loads, fetch and every layer (worker: the
                                   forward pass waits at most this, then recomputes)
save_timeout_s         60.0        deadline of a put (background)
cooldown_s             5.0         after the store was down or too slow, skip it this long
save                   true        store finished requests' KV
load                   true        load stored prefixes
store_block_size       64          the store's block size (its ``--block-size``), for alignment
max_pending_saves      32          saves in flight past which finished requests are not saved
                                   (a slow store never pins the engine's KV blocks)
=====================  ==========  ==============================================================
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any

import blake3

from deltastore.codecs import CodecSpec
from deltastore.codecs.tiers import load_table, pick_tier
from deltastore.errors import InvalidArgument, NotFound

__all__ = ["ConnectorConfig", "plain_rope_theta", "save_alignment", "vllm_fingerprint"]

_KEYS = {
    "target",
    "namespace",
    "api_key",
    "api_key_env",
    "tls_ca",
    "tls_cert",
    "tls_key",
    "codec",
    "max_kl",
    "shm_dir",
    "lookup_timeout_s",
    "load_timeout_s",
    "save_timeout_s",
    "cooldown_s",
    "save",
    "load",
    "store_block_size",
    "max_pending_saves",
}


@dataclasses.dataclass(frozen=True)
class ConnectorConfig:
    target: str
    namespace: str = "default"
    api_key: str | None = None
    tls_ca: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    codec: str = "k4v2"
    max_kl: float | None = None
    shm_dir: str | None = None
    lookup_timeout_s: float = 1.0
    load_timeout_s: float = 10.0
    save_timeout_s: float = 60.0
    cooldown_s: float = 5.0
    save: bool = True
    load: bool = True
    store_block_size: int = 64
    max_pending_saves: int = 32

    @classmethod
    def from_extra(cls, extra: dict[str, Any] | None, rope_theta: int | None = None) -> ConnectorConfig:
        """Parse and validate ``kv_connector_extra_config``; InvalidArgument names what is wrong.

        ``rope_theta``: the model's plain-RoPE theta (:func:`plain_rope_theta`), for a ``max_kl``
        pick with keys before RoPE; None: such tiers are not picked.
        """
        extra = dict(extra or {})
        unknown = set(extra) - _KEYS
        if unknown:
            raise InvalidArgument(
                f"DeltaStoreConnector: unknown kv_connector_extra_config keys {sorted(unknown)}",
                hint=f"known keys: {sorted(_KEYS)}",
            )
        if not extra.get("target"):
            raise InvalidArgument(
                "DeltaStoreConnector needs kv_connector_extra_config.target (host:port of DeltaStore)"
            )
        key_env = extra.pop("api_key_env", None)
        if key_env and not extra.get("api_key"):
            extra["api_key"] = os.environ.get(key_env) or None
        if extra.get("max_kl") is not None:
            extra["codec"] = _codec_for_budget(extra["max_kl"], extra.get("codec"), rope_theta)
        cfg = cls(**extra)
        spec = CodecSpec.parse(cfg.codec)
        if spec.eviction != "none":
            raise InvalidArgument(
                f"DeltaStoreConnector: codec {cfg.codec!r} evicts tokens ({spec.eviction}); a paged "
                "KV cache needs every token's K and V back",
                hint="use a non-evicting spec: lossless, fp8, k8v8, k4v4, k4v2 (with -hp/-sink options)",
            )
        for name in ("lookup_timeout_s", "load_timeout_s", "save_timeout_s"):
            if not getattr(cfg, name) > 0:
                raise InvalidArgument(f"DeltaStoreConnector: {name} must be > 0")
        if cfg.store_block_size < 1 or cfg.max_pending_saves < 1:
            raise InvalidArgument("DeltaStoreConnector: store_block_size and max_pending_saves must be >= 1")
        return dataclasses.replace(cfg, codec=spec.canonical())


def _codec_for_budget(max_kl: object, codec: object, rope_theta: int | None) -> str:
    """The engine-usable tier for a KL budget (the shipped engine table, measured on text nobody
    tuned on); a budget and an explicit codec together are ambiguous, so they are refused.

    A tier with keys before RoPE was measured at its table model's theta; with this model's
    theta its keys are this model's pre-RoPE keys. A wrong theta would never corrupt data (decode
    inverts exactly what encode removed), only lose the gain, but without a plain-RoPE theta the
    pick is made among the tiers without ``pr<T>``, whose figures then hold as measured. Tiers
    with ``up<layers>`` name the layers one model's calibration found sensitive (another model's
    layers would be arbitrary, or past its depth), so a budget never picks them."""
    if codec is not None:
        raise InvalidArgument(
            "DeltaStoreConnector: give either codec or max_kl in kv_connector_extra_config, not both",
            hint="max_kl picks the codec: drop codec, or drop max_kl to pin one",
        )
    if isinstance(max_kl, bool) or not isinstance(max_kl, int | float) or not max_kl >= 0:
        raise InvalidArgument(f"DeltaStoreConnector: max_kl must be a number >= 0, got {max_kl!r}")
    table = load_table(engine=True)
    table = {
        **table,
        "points": [
            p
            for p in table["points"]
            if not _has_option(p["spec"], "up")
            and (rope_theta is not None or not _has_option(p["spec"], "pr"))
        ],
    }
    try:
        spec = CodecSpec.parse(pick_tier(float(max_kl), table=table, engine=True))
        if spec.rope_theta and rope_theta is not None:
            spec = dataclasses.replace(spec, rope_theta=rope_theta)
        return spec.canonical()
    except NotFound as exc:
        raise InvalidArgument(
            f"DeltaStoreConnector: no engine-usable tier measured within max_kl={max_kl}",
            hint="raise max_kl (lossless, KL 0, always fits), or see `deltastore codecs --engine`",
        ) from exc


def _has_option(spec: str, option: str) -> bool:
    """The spec (possibly one this build cannot parse) has ``option`` (``pr``: pr<T>, ``up``: up<layers>)."""
    return any(
        opt.startswith(option) and opt[len(option) : len(option) + 1].isdigit() for opt in spec.split("-")[1:]
    )


# Architectures whose attention applies RoPE as ``pr<T>`` models it: NeoX layout (the two halves
# of each head rotate together), every channel, one theta for every layer. GPT-J's interleaved
# layout (gptj, chatglm, ...), per-layer thetas (gemma3's local/global) and MLA are left out: a
# ``pr<T>`` block still decodes exactly there, but its measured KL would not hold.
NEOX_ROPE_MODELS = frozenset(
    {
        "llama",
        "mistral",
        "mixtral",
        "qwen2",
        "qwen2_moe",
        "qwen3",
        "qwen3_moe",
        "gemma",
        "gemma2",
        "granite",
        "olmo",
        "olmo2",
        "starcoder2",
        "phi3",
    }
)


def plain_rope_theta(hf_config: Any) -> int | None:
    """The model's RoPE theta when its RoPE is what ``pr<T>`` removes: a NeoX-layout architecture
    (:data:`NEOX_ROPE_MODELS`), every channel rotated (no partial rotary), no scaling, a
    whole-number theta; else None."""
    cfg = hf_config.to_dict() if hasattr(hf_config, "to_dict") else dict(hf_config or {})
    if cfg.get("model_type") not in NEOX_ROPE_MODELS:
        return None
    params = cfg.get("rope_parameters") or {}
    scaling = cfg.get("rope_scaling") or params
    theta = params.get("rope_theta", cfg.get("rope_theta"))
    if scaling.get("rope_type", scaling.get("type", "default")) != "default":
        return None
    if cfg.get("partial_rotary_factor", 1.0) != 1.0 or not isinstance(theta, int | float):
        return None
    return int(theta) if float(theta).is_integer() and 1 <= theta <= 10**10 else None


def save_alignment(vllm_block_size: int, store_block_size: int) -> int:
    """Saved token counts are multiples of this: every segment is then a whole store block that
    other requests dedup against, and every vLLM block is saved whole."""
    return math.lcm(vllm_block_size, store_block_size)


def vllm_fingerprint(
    model: str, hf_config: Any, dtype: str, num_layers: int, kv_heads: int, head_size: int
) -> str:
    """A deterministic model fingerprint from vLLM's config: the checkpoint's name (its last path
    part, never the absolute path), the KV-relevant HF config fields, the KV dtype and shapes.

    Returns ``"<name>@<16 hex>"`` like :func:`deltastore.client.models.model_fingerprint`.
    """
    cfg = hf_config.to_dict() if hasattr(hf_config, "to_dict") else dict(hf_config or {})
    keys = (
        "architectures",
        "model_type",
        "hidden_size",
        "num_attention_heads",
        "rope_theta",
        "rope_scaling",
        "rope_parameters",
        "max_position_embeddings",
        "vocab_size",
    )
    name = os.path.basename(os.path.normpath(str(model))) or str(model)
    doc = {
        "name": name,
        "hf": {k: cfg.get(k) for k in keys},
        "dtype": str(dtype).replace("torch.", ""),
        "layers": num_layers,
        "kv_heads": kv_heads,
        "head_size": head_size,
    }
    digest = blake3.blake3(json.dumps(doc, sort_keys=True, default=str).encode()).hexdigest()[:16]
    return f"{name[:200]}@{digest}"
