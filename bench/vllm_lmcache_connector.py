"""The engine-side half of :mod:`deltastore.bench.vllm_lmcache`: LMCache's missing CPU copy layer
and vLLM's LMCache connector that installs it (loaded by the engine through
``kv_connector_module_path``; imports vLLM, and LMCache only inside the connector's init).
"""

from __future__ import annotations

from typing import Any

from vllm.distributed.kv_transfer.kv_connector.v1.lmcache_connector import LMCacheConnectorV1

__all__ = ["LMCacheCpuConnector"]


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
