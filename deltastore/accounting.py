"""Savings accounting: counters updated in the same transaction as the data they describe.

Four byte totals per scope (the whole store, and each namespace as if stored alone):

- ``L`` logical: FP16 bytes of every live snapshot, each as if stored alone;
- ``Ls`` per-session distinct: FP16 bytes of the distinct segments each session references;
- ``U`` distinct: FP16 bytes of the distinct segments stored;
- ``S`` stored: every byte written, as ``len(key) + len(value)`` of every block record, manifest
  and index entry (refcounts, session records, LRU entries). Counters and the format marker are
  a fixed few hundred bytes per store and not counted; the engine's own page overhead neither
  (LMDB reports it as ``used_bytes`` in ``Backend.info``).

``ratio = L/S = codec * prefix_dedup * temporal_delta`` with ``codec = U/S`` (compression of the
stored KV, net of all metadata), ``prefix_dedup = Ls/U`` (sharing across sessions) and
``temporal_delta = L/Ls`` (turns of a session sharing their earlier turns' segments). The
product is exact by construction. Since counters change only inside the transactions that change
the data, a crash can never make them drift; ``deltastore verify`` recounts them from the data.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping
from typing import Any, TypedDict

from deltastore.backend import ReadView, WriteBatch
from deltastore.manifest import ns_prefix

__all__ = ["COUNTERS", "Ledger", "SavingsLayers", "SavingsReport", "read_counters", "savings_of"]


class SavingsLayers(TypedDict):
    """The factor of each layer; their product is ``ratio``."""

    codec: float
    prefix_dedup: float
    temporal_delta: float


class SavingsReport(TypedDict, total=False):
    """One scope's savings, the shape every boundary speaks: the store's ``savings()``, the ops
    API's ``/v1/savings`` JSON, GetSavings (``Savings`` carries the always-present part) and the
    clients' ``savings()``. The byte breakdowns are the store's and HTTP's only; ``namespaces``
    is present on a store-wide report, ``namespace``/``domain`` on one namespace's."""

    logical_bytes: int
    stored_bytes: int
    ratio: float
    layers: SavingsLayers
    snapshots: int
    sessions: int
    blocks: int
    unique_fp16_bytes: int
    session_fp16_bytes: int
    stored: dict[str, int]
    namespace: str
    domain: str
    namespaces: dict[str, SavingsReport]
    backend: dict[str, Any]


COUNTERS: tuple[str, ...] = (
    "logical",  # L
    "session_fp16",  # Ls
    "unique_fp16",  # U
    "block_bytes",  # S, part 1: block records (keys + records)
    "manifest_bytes",  # S, part 2: manifests (keys + records)
    "index_bytes",  # S, part 3: refcounts, session records, LRU entries
    "snapshots",
    "sessions",
    "blocks",
)
_STORED = ("block_bytes", "manifest_bytes", "index_bytes")
KS = "counters"


def global_counter_key(name: str) -> bytes:
    return b"g" + name.encode()


def ns_counter_key(namespace: str, name: str) -> bytes:
    return b"n" + ns_prefix(namespace) + name.encode()


class Ledger:
    """The counter deltas of one transaction, applied with :meth:`flush` before it commits."""

    def __init__(self) -> None:
        self._deltas: dict[bytes, int] = defaultdict(int)

    def add(self, name: str, delta: int, *, namespace: str | None = None, store: bool = True) -> None:
        """Add to the store-wide counter (when ``store``) and to ``namespace``'s (when given)."""
        if store:
            self._deltas[global_counter_key(name)] += delta
        if namespace is not None:
            self._deltas[ns_counter_key(namespace, name)] += delta

    def pending(self, name: str) -> int:
        """Store-wide delta of ``name`` not yet flushed."""
        return self._deltas.get(global_counter_key(name), 0)

    def stored_delta(self) -> int:
        """Store-wide change of stored bytes ``S`` so far."""
        return sum(self.pending(name) for name in _STORED)

    def flush(self, batch: WriteBatch) -> None:
        for key, delta in self._deltas.items():
            if delta:
                batch.incr(KS, key, delta)
        self._deltas.clear()


def read_counters(view: ReadView, namespace: str | None = None) -> dict[str, int]:
    """The counters of the store (namespace None) or of one namespace."""
    key = global_counter_key if namespace is None else (lambda n: ns_counter_key(namespace, n))
    return {name: view.get_counter(KS, key(name)) for name in COUNTERS}


def stored_bytes(counters: Mapping[str, int]) -> int:
    return sum(counters[name] for name in _STORED)


def savings_of(counters: Mapping[str, int]) -> SavingsReport:
    """The savings report of one scope; all zeros when it is empty."""
    logical, ls, unique = counters["logical"], counters["session_fp16"], counters["unique_fp16"]
    stored = stored_bytes(counters)

    def div(a: int, b: int) -> float:
        return a / b if b else 0.0

    return {
        "logical_bytes": logical,
        "stored_bytes": stored,
        "ratio": div(logical, stored),
        "layers": {
            "codec": div(unique, stored),
            "prefix_dedup": div(ls, unique),
            "temporal_delta": div(logical, ls),
        },
        "unique_fp16_bytes": unique,
        "session_fp16_bytes": ls,
        "stored": {
            "blocks": counters["block_bytes"],
            "manifests": counters["manifest_bytes"],
            "index": counters["index_bytes"],
        },
        "snapshots": counters["snapshots"],
        "sessions": counters["sessions"],
        "blocks": counters["blocks"],
    }
