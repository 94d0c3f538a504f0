"""The worker-side client: put and get KV-cache snapshots over gRPC, HF transformers integration.

Public API::

    from deltastore.client import DeltaStoreClient, AsyncDeltaStoreClient
    with DeltaStoreClient("127.0.0.1:50051") as ds:
        ds.put_snapshot("session-1", 0, token_ids, cache, model=model, codec="k4v2")
        restored = ds.get_snapshot("session-1", 0, model=model, device="cuda")

Imports are lazy so ``deltastore.client.models`` stays light for tools that only load models.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from deltastore.client.aio import AsyncDeltaStoreClient
    from deltastore.client.results import FetchedPrefix, Plan, PutResult, RestoredSnapshot, SnapshotSummary
    from deltastore.client.sync import DeltaStoreClient
    from deltastore.client.wire import Retry

__all__ = [
    "AsyncDeltaStoreClient",
    "DeltaStoreClient",
    "FetchedPrefix",
    "Plan",
    "PutResult",
    "RestoredSnapshot",
    "Retry",
    "SnapshotSummary",
]

_HOME = {
    "AsyncDeltaStoreClient": "deltastore.client.aio",
    "DeltaStoreClient": "deltastore.client.sync",
    "FetchedPrefix": "deltastore.client.results",
    "Plan": "deltastore.client.results",
    "PutResult": "deltastore.client.results",
    "RestoredSnapshot": "deltastore.client.results",
    "Retry": "deltastore.client.wire",
    "SnapshotSummary": "deltastore.client.results",
}


def __getattr__(name: str) -> Any:
    if name in _HOME:
        return getattr(importlib.import_module(_HOME[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
