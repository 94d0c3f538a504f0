"""The connector's configuration: the README's and compose's lines are valid, bad specs are refused."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import pytest
import yaml

from deltastore.codecs import CodecSpec
from deltastore.errors import InvalidArgument
from deltastore.integrations.vllm.config import ConnectorConfig, plain_rope_theta, save_alignment

ROOT = Path(__file__).resolve().parents[2]


def _checked(kv: dict) -> ConnectorConfig:
    assert kv["kv_connector"] == "DeltaStoreConnector"
    assert kv["kv_connector_module_path"] == "deltastore.integrations.vllm.connector"
    assert kv["kv_load_failure_policy"] == "recompute"
    from vllm.config import KVTransferConfig

    KVTransferConfig(**kv)  # vLLM accepts it
    return ConnectorConfig.from_extra(kv["kv_connector_extra_config"])


def test_readme_vllm_serve_line_is_valid() -> None:
    (line,) = re.findall(r"^vllm serve .*$", (ROOT / "README.md").read_text(), flags=re.M)
    cfg = _checked(json.loads(re.search(r"--kv-transfer-config '(.*)'", line).group(1)))
    assert cfg.codec == CodecSpec.parse("k4v2").canonical()


def test_compose_inference_service_is_valid() -> None:
    svc = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]["inference"]
    cmd = svc["command"]
    cfg = _checked(json.loads(cmd[cmd.index("--kv-transfer-config") + 1]))
    assert cfg.target == svc["environment"]["DELTASTORE_TARGET"]


@pytest.mark.parametrize("spec", ["k4v2-keep50", "k4v2-pe50"])
def test_evicting_codecs_are_refused(spec: str) -> None:
    with pytest.raises(InvalidArgument, match="evicts tokens"):
        ConnectorConfig.from_extra({"target": "x:1", "codec": spec})


def test_unknown_keys_and_missing_target_are_refused() -> None:
    with pytest.raises(InvalidArgument, match="unknown"):
        ConnectorConfig.from_extra({"target": "x:1", "codek": "k4v2"})
    with pytest.raises(InvalidArgument, match="target"):
        ConnectorConfig.from_extra({"codec": "k4v2"})


def test_alignment() -> None:
    assert save_alignment(128, 64) == 128 and save_alignment(16, 64) == 64


@pytest.mark.parametrize("budget", [0.0, 0.002, 0.02, 0.05, 1.0])
def test_max_kl_picks_the_engine_tier_for_the_budget(budget: float) -> None:
    from deltastore.codecs.tiers import load_table, pick_tier

    cfg = ConnectorConfig.from_extra(
        {"target": "x:1", "max_kl": budget}, rope_theta=100000
    )  # the table's model
    usable = [p for p in load_table(engine=True)["points"] if not CodecSpec.parse(p["spec"]).up_layers]
    assert cfg.codec == CodecSpec.parse(pick_tier(budget, engine=True, table={"points": usable})).canonical()
    assert not CodecSpec.parse(cfg.codec).evicts and cfg.max_kl == budget
    point = next(
        p for p in load_table(engine=True)["points"] if CodecSpec.parse(p["spec"]).canonical() == cfg.codec
    )
    assert point.get("kl_hi", point["kl_mean"]) <= budget  # the budget holds at the interval's upper end


def test_max_kl_is_exclusive_with_codec_and_must_be_a_budget() -> None:
    with pytest.raises(InvalidArgument, match="either codec or max_kl"):
        ConnectorConfig.from_extra({"target": "x:1", "codec": "k4v2", "max_kl": 0.02})
    for bad in (-0.1, "0.02", True, float("nan")):
        with pytest.raises(InvalidArgument, match="max_kl must be a number"):
            ConnectorConfig.from_extra({"target": "x:1", "max_kl": bad})


@pytest.mark.parametrize(
    ("hf", "theta"),
    [
        ({"model_type": "llama", "rope_theta": 500000.0}, 500000),
        (
            {"model_type": "qwen2", "rope_parameters": {"rope_theta": 100000.0, "rope_type": "default"}},
            100000,
        ),
        (
            {
                "model_type": "llama",
                "rope_theta": 500000.0,
                "rope_scaling": {"rope_type": "llama3", "factor": 8.0},
            },
            None,
        ),
        ({"model_type": "phi3", "rope_theta": 10000.0, "partial_rotary_factor": 0.5}, None),
        ({"model_type": "llama", "rope_theta": 10000.5}, None),
        ({"model_type": "gptj", "rope_theta": 10000.0}, None),  # interleaved (GPT-J) layout
        ({"rope_theta": 10000.0}, None),  # architecture unknown
        ({}, None),
    ],
)
def test_plain_rope_theta(hf: dict, theta: int | None) -> None:
    assert plain_rope_theta(hf) == theta


@pytest.mark.parametrize("budget", [0.002, 0.01, 0.024, 0.05, 0.1, 0.2])
def test_max_kl_tiers_with_keys_before_rope_take_the_models_theta(budget: float) -> None:
    """A pr<T> pick gets this model's theta; a model without plain RoPE picks among the others."""
    from deltastore.codecs.tiers import load_table, pick_tier

    with_rope = CodecSpec.parse(ConnectorConfig.from_extra({"target": "x:1", "max_kl": budget}, 500000).codec)
    without = CodecSpec.parse(ConnectorConfig.from_extra({"target": "x:1", "max_kl": budget}).codec)
    assert not without.rope_theta
    assert not with_rope.up_layers  # calibrated for one model: never picked by a budget
    points = [p for p in load_table(engine=True)["points"] if not CodecSpec.parse(p["spec"]).up_layers]
    picked = CodecSpec.parse(pick_tier(budget, engine=True, table={"points": points}))
    assert with_rope.rope_theta == (500000 if picked.rope_theta else 0)
    assert dataclasses.replace(with_rope, rope_theta=picked.rope_theta) == picked
    plain = [p for p in points if not CodecSpec.parse(p["spec"]).rope_theta]
    assert without == CodecSpec.parse(pick_tier(budget, engine=True, table={"points": plain}))


@pytest.mark.parametrize(
    ("extra", "piecewise"), [({"target": "x"}, True), ({"target": "x", "load": False}, False)]
)
def test_loads_ask_vllm_for_piecewise_cuda_graphs(extra: dict, piecewise: bool) -> None:
    """Layer waits run between attention layers: a full CUDA graph replay would skip them and read
    blocks before they land, so a loading connector must make vLLM capture piecewise graphs."""
    from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorBase_V1

    from deltastore.integrations.vllm.connector import DeltaStoreConnector

    assert "requires_piecewise_for_cudagraph" in DeltaStoreConnector.__dict__
    assert DeltaStoreConnector.requires_piecewise_for_cudagraph(extra) is piecewise
    assert KVConnectorBase_V1.requires_piecewise_for_cudagraph(extra) is False  # vLLM's default


def test_more_than_one_kv_cache_group_is_refused(model_dir: Path) -> None:
    """Loads and saves address every layer with group 0's block ids: an engine whose hybrid KV cache
    manager made several groups (sliding-window layers) must be refused, not half-written."""
    import torch
    from vllm.config import KVTransferConfig
    from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorRole
    from vllm.engine.arg_utils import EngineArgs
    from vllm.v1.kv_cache_interface import FullAttentionSpec, KVCacheConfig, KVCacheGroupSpec

    from deltastore.integrations.vllm.connector import DeltaStoreConnector

    kv = {
        "kv_connector": "DeltaStoreConnector",
        "kv_connector_module_path": "deltastore.integrations.vllm.connector",
        "kv_role": "kv_both",
        "kv_connector_extra_config": {"target": "127.0.0.1:9"},
    }
    vllm_config = EngineArgs(
        model=str(model_dir),
        kv_transfer_config=KVTransferConfig(**kv),
        max_model_len=2048,
        enforce_eager=True,
    ).create_engine_config()
    spec = FullAttentionSpec(block_size=128, num_kv_heads=3, head_size=64, dtype=torch.bfloat16)

    def groups(n: int) -> KVCacheConfig:
        return KVCacheConfig(
            num_blocks=4, kv_cache_tensors=[], kv_cache_groups=[KVCacheGroupSpec(["a"], spec)] * n
        )

    DeltaStoreConnector(vllm_config, KVConnectorRole.SCHEDULER, groups(1))
    with pytest.raises(ValueError, match="one KV cache group, the engine has 2"):
        DeltaStoreConnector(vllm_config, KVConnectorRole.SCHEDULER, groups(2))
