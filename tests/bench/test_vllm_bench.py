"""The vLLM benchmark's pieces that need no engine: the engine dtype pick, the decode interval and
the stored-token count of ExampleConnector's files (the engine runs are tests/vllm and the bench)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from deltastore.bench.vllm import _mean_ci, _safetensors_tokens
from deltastore.bench.vllm_harness import engine_dtype


def test_engine_dtype_is_bf16_only_where_the_cpu_computes_it() -> None:
    """bf16 without AVX512-BF16/AMX is emulated (3-4x slower prefill than fp32): read the CPU's
    flags independently of torch's probe."""
    cpuinfo = Path("/proc/cpuinfo")
    if not cpuinfo.exists():
        pytest.skip("no /proc/cpuinfo")
    flags = set()
    for line in cpuinfo.read_text().splitlines():
        if line.startswith("flags"):
            flags |= set(line.split(":", 1)[1].split())
    native = torch.cuda.is_available() or bool({"avx512_bf16", "amx_tile"} & flags)
    assert engine_dtype() == ("bfloat16" if native else "float32")


def test_mean_ci_brackets_the_mean_and_the_ratio() -> None:
    xs = [20.0, 21.0, 22.0, 23.0, 24.0] * 4
    mean, lo, hi = _mean_ci(xs)
    assert mean == pytest.approx(22.0) and lo < mean < hi and hi - lo < 2.0
    ratio, rlo, rhi = _mean_ci(xs, [x * 2 for x in xs])
    assert ratio == pytest.approx(0.5) and rlo < 0.5 < rhi
    assert _mean_ci(xs) == (mean, lo, hi)  # seeded: a report's interval is reproducible


def test_safetensors_tokens_counts_each_prompt_once(tmp_path: Path) -> None:
    """ExampleConnector's layout: a folder per prompt, a [tokens, heads, 2*head_dim] file per layer."""
    for prompt, n in (("a", 896), ("b", 1024)):
        folder = tmp_path / prompt
        folder.mkdir()
        for layer in range(3):
            save_file(
                {"kv_cache": torch.zeros(n, 3, 128, dtype=torch.bfloat16)}, folder / f"l{layer}.safetensors"
            )
    assert _safetensors_tokens(tmp_path) == 896 + 1024
