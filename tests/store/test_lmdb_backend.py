"""What only the LMDB engine promises: format refusal, one handle per process, a bounded map."""

from __future__ import annotations

import os
from pathlib import Path

import lmdb
import pytest

from deltastore.backends.lmdb_backend import LMDB_FORMAT, LmdbBackend, LmdbConfig
from deltastore.errors import DeltaStoreError, IncompatibleFormat, InvalidArgument, StoreFull
from deltastore.store import Store


def test_unknown_backend_format_is_refused(tmp_path: Path) -> None:
    LmdbBackend(LmdbConfig(path=tmp_path)).close()
    env = lmdb.open(str(tmp_path), max_dbs=8)
    with env.begin(write=True) as txn:
        txn.put(b"backend_format", b"deltastore-lmdb/99", db=env.open_db(b"meta", txn=txn))
    env.close()
    with pytest.raises(IncompatibleFormat, match="99"):
        LmdbBackend(LmdbConfig(path=tmp_path))
    assert LMDB_FORMAT != b"deltastore-lmdb/99"


def test_unknown_store_format_is_refused(tmp_path: Path) -> None:
    with LmdbBackend(LmdbConfig(path=tmp_path)) as backend:
        backend.transact(lambda t: t.put("meta", b"store_format", b"deltastore-store/7"))
        with pytest.raises(IncompatibleFormat):
            Store(backend)


def test_second_handle_in_one_process_is_refused(tmp_path: Path) -> None:
    with LmdbBackend(LmdbConfig(path=tmp_path)), pytest.raises(DeltaStoreError, match="already open"):
        LmdbBackend(LmdbConfig(path=tmp_path))
    LmdbBackend(LmdbConfig(path=tmp_path)).close()  # closed handles free the directory


def test_map_full_at_max_raises_store_full_and_keeps_data(tmp_path: Path) -> None:
    cfg = LmdbConfig(path=tmp_path, map_size=1 << 20, max_map_size=4 << 20, sync=False)
    with LmdbBackend(cfg) as backend:
        backend.transact(lambda t: t.put("blocks", b"small", b"x" * 1000))
        with pytest.raises(StoreFull, match="map") as info:
            backend.transact(lambda t: t.put("blocks", b"huge", b"y" * (8 << 20)))
        assert "MAX_MAP_SIZE" in info.value.hint
        assert backend.info()["map_size"] == 4 << 20
        with backend.read() as view:
            assert view.get("blocks", b"huge") is None
            assert bytes(view.get("blocks", b"small")) == b"x" * 1000


def test_grown_map_reopens_and_grows_again(tmp_path: Path) -> None:
    cfg = LmdbConfig(path=tmp_path, map_size=1 << 20, max_map_size=1 << 30, sync=False)
    with LmdbBackend(cfg) as backend:
        backend.transact(lambda t: t.put("blocks", b"k", b"z" * (3 << 20)))
        assert backend.info()["map_size"] >= 4 << 20
    with LmdbBackend(cfg) as backend:  # opened with a map smaller than the data file
        backend.transact(lambda t: t.put("blocks", b"k2", b"w" * (6 << 20)))
        with backend.read() as view:
            assert len(view.get("blocks", b"k")) == 3 << 20
            assert len(view.get("blocks", b"k2")) == 6 << 20


def test_use_after_fork_is_refused(tmp_path: Path) -> None:
    with LmdbBackend(LmdbConfig(path=tmp_path)) as backend:
        pid = os.fork()
        if pid == 0:  # child: the inherited handle must refuse to work
            try:
                backend.transact(lambda t: t.put("meta", b"child", b"1"))
                code = 1
            except DeltaStoreError as exc:
                code = 0 if "fork" in str(exc) else 2
            os._exit(code)
        _, status = os.waitpid(pid, 0)
        assert os.WEXITSTATUS(status) == 0
        with backend.read() as view:
            assert view.get("meta", b"child") is None


def test_config_is_validated(tmp_path: Path) -> None:
    with pytest.raises(InvalidArgument):
        LmdbConfig(path=tmp_path, map_size=1024)
    with pytest.raises(InvalidArgument):
        LmdbConfig(path=tmp_path, map_size=2 << 30, max_map_size=1 << 30)
