"""Idle sessions expire on a timer: a read-mostly server stops serving their prefixes."""

from __future__ import annotations

import time
from pathlib import Path

from service_helpers import BLOCK_SIZE, MODEL, make_cache

from deltastore.client.sync import DeltaStoreClient
from deltastore.server.app import Service
from deltastore.server.settings import ServerSettings
from deltastore.settings import StoreConfig
from deltastore.store import Store

TTL_S = 0.6


def test_expired_sessions_stop_serving_prefixes_without_any_write(tmp_path: Path) -> None:
    settings = ServerSettings(data_dir=tmp_path / "data", grpc_address="127.0.0.1:0", http_address="")
    store = Store.open(settings.data_dir, StoreConfig(block_size=BLOCK_SIZE, session_ttl_s=TTL_S))
    service = Service(settings, store=store).start()
    try:
        tokens = list(range(2 * BLOCK_SIZE))
        with DeltaStoreClient(f"127.0.0.1:{service.grpc_port}", timeout=20) as client:
            client.put_snapshot("chat", 0, tokens, make_cache(len(tokens)), model=MODEL, codec="k4v2")
            assert client.lookup_prefix(tokens, model=MODEL, codec="k4v2") == len(tokens)
            # no put, no session read: only the server's own timer can expire it
            deadline = time.monotonic() + 10 * TTL_S + 5
            while client.lookup_prefix(tokens, model=MODEL, codec="k4v2") and time.monotonic() < deadline:
                time.sleep(0.1)
            assert client.lookup_prefix(tokens, model=MODEL, codec="k4v2") == 0
            assert client.get_prefix(tokens, model=MODEL, codec="k4v2") is None
            assert client.savings()["sessions"] == 0
        assert service.janitor.expired == 1
    finally:
        service.stop()
