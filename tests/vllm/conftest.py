"""Real parts for the vLLM tests: the SmolLM2 checkpoint (converted once, cached under .cache/),
a DeltaStore server process over LMDB in a temp dir, one in-process vLLM engine with the
DeltaStore connector (lossless), and a runner for fresh engine processes.

These run in the vLLM venv (``make test-vllm``); without vLLM installed they are skipped.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from deltastore.bench.vllm_harness import engine_env

# Before torch loads (importorskip imports it): OMP_NUM_THREADS=1 only takes effect then, and the
# in-process engine must compute as the fresh engine processes do (engine_run.py) for the
# bit-for-bit comparisons (with torch's default of one thread per core they differ).
engine_env()
pytest.importorskip("vllm", reason="the vLLM tests run in the vLLM venv: make test-vllm")

from deltastore.bench.vllm_harness import (  # noqa: E402
    ServerProcess,
    kv_transfer_config,
    make_llm,
    prompt_tokens,
)
from deltastore.bench.vllm_model import smollm2_checkpoint  # noqa: E402

HERE = Path(__file__).parent
TEXT = (Path(__file__).parents[2] / "bench" / "data" / "gardiner_french_revolution.txt").read_text()


def connector_kv(target: str, codec: str | None = "lossless", **extra: Any) -> dict[str, Any]:
    """A DeltaStore kv_transfer_config with short timeouts (tests must not stall); ``codec`` None:
    none given (``max_kl`` in ``extra`` picks it)."""
    opts = {
        **({"codec": codec} if codec is not None else {}),
        "cooldown_s": 0.3,
        "lookup_timeout_s": 1.0,
        "load_timeout_s": 5.0,
        "save_timeout_s": 10.0,
        **extra,
    }
    return kv_transfer_config("deltastore", target=target, **opts)


@pytest.fixture(scope="session")
def model_dir() -> Path:
    return smollm2_checkpoint()


@pytest.fixture(scope="session")
def texts(model_dir: Path) -> dict[str, list[int]]:
    """Token-id pieces cut from one real text: a 700-token system prompt, two questions, chat turns."""
    (ids,) = prompt_tokens(model_dir, [TEXT])
    return {
        "sys": ids[:700],
        "q1": ids[3000:3060],
        "q2": ids[4000:4060],
        "chat": ids[5000:5300],
        "u": ids[6000:6200],
    }


@pytest.fixture(scope="session")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    srv = ServerProcess(tmp_path_factory.mktemp("vllm-store") / "data").start()
    try:
        yield srv
    finally:
        srv.stop()


@pytest.fixture(scope="session")
def llm(model_dir: Path, server: ServerProcess) -> Any:
    """One in-process engine with the connector (lossless), shared by the tests of this session."""
    return make_llm(model_dir, kv=connector_kv(server.target))


def fresh_engine(
    tmp_path: Path, model_dir: Path, kv: dict[str, Any] | None, phases: list[dict]
) -> list[dict]:
    """Run phases in a new engine process (nothing of this process's caches is shared)."""
    spec = tmp_path / "spec.json"
    out = tmp_path / "out.json"
    spec.write_text(json.dumps({"model": str(model_dir), "kv": kv, "phases": phases}))
    proc = subprocess.run(
        [sys.executable, str(HERE / "engine_run.py"), str(spec), str(out)],
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(out.read_text())
