"""The ops HTTP API: savings, sessions, health, readiness, Prometheus metrics, docs, the page."""

from __future__ import annotations

import httpx
from prometheus_client.parser import text_string_to_metric_families
from service_helpers import MODEL, make_cache

from deltastore.client.sync import DeltaStoreClient
from deltastore.server.app import Service

TOKENS = list(range(100, 200))


def test_health_readiness_and_docs(service: Service, http: httpx.Client) -> None:
    assert http.get("/healthz").json() == {"status": "ok"}
    assert http.get("/readyz").status_code == 200
    spec = http.get("/openapi.json").json()
    assert {"/v1/savings", "/v1/sessions/{session}", "/healthz", "/readyz", "/metrics"} <= set(spec["paths"])
    assert "swagger" in http.get("/docs").text.lower()
    service._draining = True  # what SIGTERM sets first
    assert http.get("/readyz").status_code == 503
    service._draining = False


def test_savings_and_sessions(client: DeltaStoreClient, http: httpx.Client) -> None:
    empty = http.get("/v1/savings").json()
    assert empty["logical_bytes"] == 0 and empty["ratio"] == 0 and empty["namespaces"] == {}
    client.put_snapshot("chat-1", 0, TOKENS, make_cache(100), model=MODEL, codec="k4v2")
    body = http.get("/v1/savings").json()
    for key in ("logical_bytes", "stored_bytes", "ratio", "layers", "snapshots", "sessions", "blocks"):
        assert key in body and key in body["namespaces"]["default"]
    assert set(body["layers"]) == {"codec", "prefix_dedup", "temporal_delta"}
    assert body["logical_bytes"] == 2 * 2 * 2 * 100 * 64 * 2  # layers x (K,V) x heads x tokens x dim x 2 B
    assert http.get("/v1/savings", params={"namespace": "default"}).json()["snapshots"] == 1
    session = http.get("/v1/sessions/chat-1").json()
    assert [s["turn"] for s in session["snapshots"]] == [0]
    assert session["snapshots"][0]["n_tokens"] == 100
    missing = http.get("/v1/sessions/nobody")
    assert missing.status_code == 404
    assert missing.json()["error"]["code"] == "NOT_FOUND"
    nowhere = http.get("/v2/nothing")
    assert nowhere.status_code == 404 and nowhere.json()["error"]["code"] == "NOT_FOUND"
    bad = http.get("/v1/savings", params={"namespace": "bad/name"})
    assert bad.status_code == 400 and bad.json()["error"]["code"] == "INVALID_ARGUMENT"


def test_metrics_parse_and_count(client: DeltaStoreClient, http: httpx.Client) -> None:
    put = client.put_snapshot("m", 0, TOKENS, make_cache(100), model=MODEL, codec="k4v2")
    client.get_snapshot("m", 0, as_cache=False)
    http.get("/healthz")
    families = {f.name: f for f in text_string_to_metric_families(http.get("/metrics").text)}

    def value(name: str, sample: str, **labels: str) -> float:
        return sum(
            s.value
            for s in families[name].samples
            if s.name == sample and all(s.labels.get(k) == v for k, v in labels.items())
        )

    assert (
        value("deltastore_grpc_requests", "deltastore_grpc_requests_total", method="PutSnapshot", code="OK")
        == 1
    )
    assert value("deltastore_grpc_received_bytes", "deltastore_grpc_received_bytes_total") == put.sent_bytes
    assert value("deltastore_grpc_sent_bytes", "deltastore_grpc_sent_bytes_total") == put.sent_bytes
    assert (
        value(
            "deltastore_grpc_request_duration_seconds",
            "deltastore_grpc_request_duration_seconds_count",
            method="GetSnapshot",
        )
        == 1
    )
    assert value("deltastore_logical_bytes", "deltastore_logical_bytes") == put.logical_bytes
    assert value("deltastore_stored_bytes", "deltastore_stored_bytes") > 0
    assert value("deltastore_savings_ratio", "deltastore_savings_ratio") > 1
    assert value("deltastore_namespace_snapshots", "deltastore_namespace_snapshots", namespace="default") == 1
    assert {s.labels["layer"] for s in families["deltastore_savings_factor"].samples} == {
        "codec",
        "prefix_dedup",
        "temporal_delta",
    }
    assert (
        value("deltastore_http_requests", "deltastore_http_requests_total", route="/healthz", status="200")
        == 1
    )


def test_index_page_inlines_current_savings(client: DeltaStoreClient, http: httpx.Client) -> None:
    client.put_snapshot("p", 0, TOKENS, make_cache(100), model=MODEL, codec="k4v2")
    page = http.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "__INITIAL_SAVINGS__" not in page.text
    assert '"snapshots": 1' in page.text and "prefix dedup" in page.text
