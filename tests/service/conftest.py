"""Fixtures: a real service (LMDB in a temp dir, gRPC and HTTP on ephemeral loopback ports)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from service_helpers import start_service

from deltastore.client.sync import DeltaStoreClient
from deltastore.server.app import Service


@pytest.fixture
def service(tmp_path: Path) -> Iterator[Service]:
    svc = start_service(tmp_path)
    try:
        yield svc
    finally:
        svc.stop()


@pytest.fixture
def client(service: Service) -> Iterator[DeltaStoreClient]:
    with DeltaStoreClient(f"127.0.0.1:{service.grpc_port}", timeout=20) as c:
        yield c


@pytest.fixture
def http(service: Service) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=f"http://127.0.0.1:{service.http_port}", timeout=20) as h:
        yield h
