"""Segment keys at the client's API: 32 raw bytes; a hex string is refused before any call."""

from __future__ import annotations

import asyncio

import pytest

from deltastore.client.aio import AsyncDeltaStoreClient
from deltastore.client.sync import DeltaStoreClient
from deltastore.errors import InvalidArgument

# Nothing listens here: the checks must fail before a call is made (channels connect lazily).
_NOWHERE = "127.0.0.1:9"


def test_has_blocks_refuses_hex_and_short_keys() -> None:
    with DeltaStoreClient(_NOWHERE, timeout=1) as client:
        with pytest.raises(InvalidArgument, match="32 raw bytes, got str"):
            client.has_blocks(["ab" * 32])  # type: ignore[list-item]
        with pytest.raises(InvalidArgument, match="must be 32 bytes, got 16"):
            client.has_blocks([bytes(16)])


def test_async_has_blocks_refuses_hex_keys() -> None:
    async def call() -> None:
        client = AsyncDeltaStoreClient(_NOWHERE, timeout=1)
        try:
            await client.has_blocks(["ab" * 32])  # type: ignore[list-item]
        finally:
            await client.close()

    with pytest.raises(InvalidArgument, match="32 raw bytes, got str"):
        asyncio.run(call())
