"""The connector's counters: vLLM's per-interval connector stats and cumulative totals per process."""

from __future__ import annotations

import dataclasses
import threading
import weakref
from typing import Protocol

from vllm.distributed.kv_transfer.kv_connector.v1.metrics import KVConnectorStats

__all__ = ["COUNTERS", "Counters", "DeltaStoreConnectorStats", "connector_totals", "instances", "register"]

COUNTERS = (
    "lookups",
    "lookup_hits",
    "lookup_errors",
    "loads",
    "load_errors",
    "tokens_loaded",
    "bytes_loaded",
    "load_seconds",
    "layers_loaded",  # one per layer of each load written into the paged cache
    "layer_waits",  # wait_for_layer_load calls of steps with loads (the forward's per-layer waits)
    "load_wait_seconds",  # time those waits blocked the forward pass
    "saves",
    "save_errors",
    "saves_skipped",
    "tokens_saved",
    "bytes_written",
    "segments_encoded",
    "save_seconds",
)


@dataclasses.dataclass
class DeltaStoreConnectorStats(KVConnectorStats):
    """Counters since the last report (vLLM aggregates them across workers and logs them)."""

    def __post_init__(self) -> None:
        for name in COUNTERS:
            self.data.setdefault(name, 0)

    def reset(self) -> None:
        self.data = dict.fromkeys(COUNTERS, 0)

    def aggregate(self, other: KVConnectorStats) -> KVConnectorStats:
        for k, v in other.data.items():
            self.data[k] = self.data.get(k, 0) + v
        return self

    def reduce(self) -> dict[str, int | float]:
        return dict(self.data)

    def is_empty(self) -> bool:
        return not any(self.data.values())


class Counters:
    """Thread-safe cumulative counters plus the interval that vLLM collects."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.total: dict[str, float] = dict.fromkeys(COUNTERS, 0)
        self.interval: dict[str, float] = dict.fromkeys(COUNTERS, 0)

    def add(self, **values: float) -> None:
        with self._lock:
            for k, v in values.items():
                self.total[k] += v
                self.interval[k] += v

    def take_interval(self) -> dict[str, float]:
        with self._lock:
            out = self.interval
            self.interval = dict.fromkeys(COUNTERS, 0)
            return out


class _Counted(Protocol):
    counters: Counters


_INSTANCES: weakref.WeakSet[_Counted] = weakref.WeakSet()


def register(instance: _Counted) -> None:
    """Count ``instance`` (a connector, either role) in :func:`connector_totals`."""
    _INSTANCES.add(instance)


def instances() -> list[_Counted]:
    """The registered instances still alive."""
    return list(_INSTANCES)


def connector_totals() -> dict[str, float]:
    """Cumulative counters of every connector instance in this process (both roles)."""
    out: dict[str, float] = dict.fromkeys(COUNTERS, 0)
    for inst in instances():
        for k, v in inst.counters.total.items():
            out[k] += v
    return out
