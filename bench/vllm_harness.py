"""Real parts for the vLLM tests and benchmark: a DeltaStore server process, an in-process vLLM
engine with (or without) a KV connector, greedy runs over token-id prompts.

Environment first: :func:`engine_env` must be applied before ``vllm`` is imported (in-process
engine, one OMP thread, offline, a small KV pool).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "CONNECTOR_MODULE",
    "ServerProcess",
    "engine_dtype",
    "engine_env",
    "free_port",
    "kv_transfer_config",
    "make_llm",
    "prompt_tokens",
    "run_prompts",
]

CONNECTOR_MODULE = "deltastore.integrations.vllm.connector"


def engine_env(kv_space_gib: int = 1) -> dict[str, str]:
    """Environment for a lean in-process CPU engine (also applied to ``os.environ``)."""
    env = {
        "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
        "OMP_NUM_THREADS": "1",
        "VLLM_CPU_KVCACHE_SPACE": str(kv_space_gib),
        "VLLM_CPU_NUM_OF_RESERVED_CPU": "1",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "VLLM_NO_USAGE_STATS": "1",
        "DO_NOT_TRACK": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }
    os.environ.update(env)
    return env


def engine_dtype() -> str:
    """``bfloat16`` where the device computes it natively (CUDA, or a CPU with AVX512-BF16 or
    AMX), else ``float32``.

    Without native bf16, torch's bf16 GEMMs are emulated and prefill is 3-4x slower than in fp32
    (measured, SmolLM2, 1000-token prompt, one thread, ISA capped by ONEDNN_MAX_CPU_ISA and
    ATEN_CPU_CAPABILITY on an AMX Xeon: AVX2 68 tok/s bf16 vs 284 fp32, AVX-512 153 vs 505; with
    AMX bf16 ~2000 vs 552 fp32). Earlier runs on an "AMD EPYC" host (ISA not recorded) prefilled
    at 25-35 tok/s in bf16, which fits this.
    """
    import torch

    if (
        torch.cuda.is_available()
        or torch.cpu._is_avx512_bf16_supported()
        or torch.cpu._is_amx_tile_supported()
    ):
        return "bfloat16"
    return "float32"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class ServerProcess:
    """``deltastore serve`` over LMDB in ``data_dir`` on fixed loopback ports (restartable).

    With ``shm_dir`` it serves gRPC on a unix socket next to ``data_dir`` instead, with
    ``--shm-dir`` (GetSnapshotShm/GetPrefixShm serve callers on the unix socket only).
    """

    data_dir: Path
    grpc_port: int = field(default_factory=free_port)
    http_port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None
    shm_dir: Path | None = None

    @property
    def target(self) -> str:
        if self.shm_dir is not None:
            return f"unix:{self.data_dir.parent / self.data_dir.name}.sock"
        return f"127.0.0.1:{self.grpc_port}"

    @property
    def http(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def start(self, timeout: float = 60.0) -> ServerProcess:
        import grpc

        self.data_dir.mkdir(parents=True, exist_ok=True)
        log = open(self.data_dir.parent / f"{self.data_dir.name}-server.log", "ab")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [
                *(sys.executable, "-m", "deltastore", "serve", "--data-dir", str(self.data_dir)),
                *("--grpc", self.target, "--http", f"127.0.0.1:{self.http_port}", "--grace-seconds", "1"),
                *(("--shm-dir", str(self.shm_dir)) if self.shm_dir is not None else ()),
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"deltastore serve exited with {self.proc.returncode}")
            with grpc.insecure_channel(self.target) as ch:
                try:
                    grpc.channel_ready_future(ch).result(timeout=0.5)
                    return self
                except grpc.FutureTimeoutError:
                    pass
            if time.monotonic() > deadline:
                self.kill()
                raise RuntimeError("deltastore serve did not come up")

    def kill(self) -> None:
        """SIGKILL (a crash), then reap."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(30)
        self.proc = None

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(30)
        self.proc = None

    def savings(self, namespace: str | None = None) -> dict[str, Any]:
        import httpx

        params = {"namespace": namespace} if namespace else {}
        return httpx.get(f"{self.http}/v1/savings", params=params, timeout=30).json()

    def sent_bytes(self, method: str) -> float:
        """Payload bytes the server sent for ``method`` (its /metrics)."""
        import httpx
        from prometheus_client.parser import text_string_to_metric_families

        text = httpx.get(f"{self.http}/metrics", timeout=30).text
        return sum(
            sample.value
            for family in text_string_to_metric_families(text)
            for sample in family.samples
            if sample.name == "deltastore_grpc_sent_bytes_total" and sample.labels.get("method") == method
        )


def kv_transfer_config(connector: str | None, **extra: Any) -> dict[str, Any] | None:
    """The ``kv_transfer_config`` of a run: ``deltastore``, ``example`` (vLLM's disk reference) or None."""
    if connector is None:
        return None
    if connector == "deltastore":
        return {
            "kv_connector": "DeltaStoreConnector",
            "kv_connector_module_path": CONNECTOR_MODULE,
            "kv_role": "kv_both",
            "kv_load_failure_policy": "recompute",
            "kv_connector_extra_config": extra,
        }
    if connector == "example":
        return {
            "kv_connector": "ExampleConnector",
            "kv_role": "kv_both",
            "kv_connector_extra_config": {"shared_storage_path": str(extra["path"])},
        }
    raise ValueError(f"unknown connector {connector!r}")


def make_llm(
    model_dir: str | Path,
    *,
    kv: dict[str, Any] | None = None,
    prefix_caching: bool = True,
    max_model_len: int = 2048,
    kv_space_gib: int = 1,
    num_blocks: int | None = None,
    seed: int = 0,
    dtype: str | None = None,
) -> Any:
    """An in-process ``vllm.LLM`` (eager; ``dtype`` default :func:`engine_dtype`) with an optional
    ``kv_transfer_config`` dict."""
    engine_env(kv_space_gib)
    from vllm import LLM
    from vllm.config import KVTransferConfig

    kwargs: dict[str, Any] = {}
    if kv is not None:
        kwargs["kv_transfer_config"] = KVTransferConfig(**kv)
    return LLM(
        model=str(model_dir),
        dtype=dtype or engine_dtype(),
        max_model_len=max_model_len,
        enforce_eager=True,
        enable_prefix_caching=prefix_caching,
        seed=seed,
        disable_log_stats=False,
        num_gpu_blocks_override=num_blocks,
        **kwargs,
    )


@dataclass
class Run:
    token_ids: list[int]
    text: str
    ttft_s: float | None
    seconds: float
    logprobs: list[dict[int, float]]


def run_prompts(
    llm: Any,
    prompts: Sequence[Sequence[int]],
    *,
    max_tokens: int = 16,
    logprobs: int = 0,
    params: Sequence[dict[str, Any] | None] | None = None,
) -> list[Run]:
    """Greedy generation of each token-id prompt, one request at a time (TTFT per request)."""
    from vllm import SamplingParams, TokensPrompt

    out: list[Run] = []
    for i, prompt in enumerate(prompts):
        extra = {"kv_transfer_params": params[i]} if params and params[i] else None
        sp = SamplingParams(
            temperature=0.0,
            max_tokens=max_tokens,
            logprobs=logprobs or None,
            extra_args=extra,
            ignore_eos=True,
        )
        started = time.perf_counter()
        (res,) = llm.generate([TokensPrompt(prompt_token_ids=list(prompt))], sp, use_tqdm=False)
        seconds = time.perf_counter() - started
        comp = res.outputs[0]
        ttft = None
        m = getattr(res, "metrics", None)
        if m is not None and getattr(m, "first_token_latency", None):
            ttft = float(m.first_token_latency)
        lps: list[dict[int, float]] = []
        for step in comp.logprobs or []:
            lps.append({int(t): float(lp.logprob) for t, lp in step.items()})
        out.append(Run(list(comp.token_ids), comp.text, ttft, seconds, lps))
    return out


def prompt_tokens(model_dir: str | Path, texts: Sequence[str]) -> list[list[int]]:
    """Token ids of each text with the checkpoint's tokenizer (no special tokens added)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    return [tok(t, add_special_tokens=False)["input_ids"] for t in texts]


@contextlib.contextmanager
def server(data_dir: Path) -> Iterator[ServerProcess]:
    srv = ServerProcess(data_dir).start()
    try:
        yield srv
    finally:
        srv.stop()


def dump(obj: Any) -> str:
    return json.dumps(obj, default=lambda o: o.__dict__)
