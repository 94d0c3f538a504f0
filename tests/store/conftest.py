"""Fixtures of the store tests; the engines they run on are listed in ``store_testlib.BACKENDS``."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from store_testlib import BACKENDS, BackendFactory

from deltastore.backend import Backend
from deltastore.settings import StoreConfig
from deltastore.store import Store


@pytest.fixture(params=sorted(BACKENDS))
def backend_factory(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[BackendFactory]:
    make = BACKENDS[request.param](request, tmp_path)
    opened: list[Backend] = []

    def tracked(name: str = "default") -> Backend:
        backend = make(name)
        opened.append(backend)
        return backend

    yield tracked
    for backend in opened:
        backend.close()


@pytest.fixture
def store_factory(backend_factory: BackendFactory) -> Callable[..., Store]:
    """``store_factory(config=None, clock=None, name="default") -> Store`` on the engine under test."""

    def make(
        config: StoreConfig | None = None, clock: Callable[[], float] | None = None, name: str = "default"
    ) -> Store:
        kwargs = {} if clock is None else {"clock": clock}
        return Store(backend_factory(name), config or StoreConfig(), **kwargs)

    return make


@pytest.fixture
def store(store_factory: Callable[..., Store]) -> Store:
    return store_factory()
