"""Helpers shared by the service tests (a uniquely named module: tests/ folders are not packages)."""

from __future__ import annotations

from pathlib import Path

import torch

from deltastore.server.app import Service
from deltastore.server.settings import ServerSettings
from deltastore.settings import StoreConfig
from deltastore.store import Store

MODEL = "test-model@0123456789abcdef"


def make_cache(
    n_tokens: int,
    *,
    layers: int = 2,
    heads: int = 2,
    head_dim: int = 64,
    dtype: torch.dtype = torch.float16,
    seed: int = 0,
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """A synthetic cache: per layer (K, V), each (heads, n_tokens, head_dim)."""
    gen = torch.Generator().manual_seed(seed)
    return [
        (
            torch.randn(heads, n_tokens, head_dim, generator=gen).to(dtype),
            torch.randn(heads, n_tokens, head_dim, generator=gen).to(dtype),
        )
        for _ in range(layers)
    ]


BLOCK_SIZE = 64  # pinned, so segment counts below do not follow the store's default


def start_service(tmp_path: Path, **overrides: object) -> Service:
    """A started service over a fresh LMDB store with 64-token blocks."""
    fields: dict[str, object] = {
        "data_dir": tmp_path / "data",
        "grpc_address": "127.0.0.1:0",
        "http_address": "127.0.0.1:0",
        "grace_seconds": 2.0,
        **overrides,
    }
    settings = ServerSettings(**fields)  # type: ignore[arg-type]
    store = Store.open(settings.data_dir, StoreConfig(block_size=BLOCK_SIZE))
    return Service(settings, store=store).start()
