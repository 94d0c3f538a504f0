"""Prometheus metrics of one server: RPCs, bytes on the wire, latency, and the store's savings.

Each server owns its registry (tests run several servers in one process). The savings gauges
are read from the store at scrape time, so they never drift from the store's own counters.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

__all__ = ["Metrics"]

# Latency buckets in seconds: sub-millisecond metadata calls up to multi-second large snapshots.
_LATENCY_BUCKETS = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
)


class Metrics:
    """The metric families of one server instance."""

    def __init__(self, savings: Callable[[], Mapping[str, Any]] | None = None) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "deltastore_grpc_requests",
            "gRPC calls by method and final status code",
            ("method", "code"),
            registry=self.registry,
        )
        self.errors = Counter(
            "deltastore_grpc_errors",
            "gRPC calls that ended with a non-OK status, by method and code",
            ("method", "code"),
            registry=self.registry,
        )
        self.latency = Histogram(
            "deltastore_grpc_request_duration_seconds",
            "gRPC call duration in seconds, by method",
            ("method",),
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.bytes_received = Counter(
            "deltastore_grpc_received_bytes",
            "segment payload bytes received from clients, by method",
            ("method",),
            registry=self.registry,
        )
        self.bytes_sent = Counter(
            "deltastore_grpc_sent_bytes",
            "segment payload bytes sent to clients, by method",
            ("method",),
            registry=self.registry,
        )
        self.http_requests = Counter(
            "deltastore_http_requests",
            "ops HTTP requests by route and status",
            ("route", "status"),
            registry=self.registry,
        )
        if savings is not None:
            self.registry.register(_SavingsCollector(savings))

    def observe(self, method: str, code: str, seconds: float) -> None:
        """Record one finished gRPC call."""
        self.requests.labels(method, code).inc()
        if code != "OK":
            self.errors.labels(method, code).inc()
        self.latency.labels(method).observe(seconds)

    def exposition(self) -> bytes:
        """The registry in the Prometheus text format."""
        return generate_latest(self.registry)


class _SavingsCollector(Collector):
    """Gauges of the store's savings accounting, whole store and per namespace."""

    _FIELDS = (
        ("logical_bytes", "FP16 bytes of every live snapshot, each as if stored alone"),
        ("stored_bytes", "every byte stored: payloads, manifests, index entries"),
        ("ratio", "logical_bytes / stored_bytes"),
        ("snapshots", "live snapshots"),
        ("sessions", "live sessions"),
        ("blocks", "distinct stored segments"),
    )

    def __init__(self, savings: Callable[[], Mapping[str, Any]]) -> None:
        self._savings = savings

    def collect(self) -> Iterator[GaugeMetricFamily]:
        report = self._savings()
        namespaces: Mapping[str, Mapping[str, Any]] = report.get("namespaces") or {}
        for field, help_ in self._FIELDS:
            name = "deltastore_savings_ratio" if field == "ratio" else f"deltastore_{field}"
            yield GaugeMetricFamily(name, help_, value=float(report.get(field, 0)))
            per_ns = GaugeMetricFamily(
                f"{name.replace('deltastore_', 'deltastore_namespace_')}", help_, labels=("namespace",)
            )
            for ns, figures in sorted(namespaces.items()):
                per_ns.add_metric((ns,), float(figures.get(field, 0)))
            yield per_ns
        layers = GaugeMetricFamily(
            "deltastore_savings_factor",
            "savings factor of each layer (their product is the ratio)",
            labels=("layer",),
        )
        for layer, factor in sorted((report.get("layers") or {}).items()):
            layers.add_metric((layer,), float(factor))
        yield layers
