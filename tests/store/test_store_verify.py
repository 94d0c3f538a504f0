"""`deltastore verify`: exit 0 on a clean store, non-zero with a report for each broken invariant."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from store_testlib import put, random_tokens

from deltastore.accounting import global_counter_key
from deltastore.backend import WriteBatch
from deltastore.backends.lmdb_backend import LmdbBackend, LmdbConfig
from deltastore.manifest import block_key, encode_block, global_ref_key, manifest_key
from deltastore.settings import StoreConfig
from deltastore.store import Store

B = 16


def _populate(data_dir: Path) -> list[bytes]:
    """A small store; returns the segment keys of acme/a/1."""
    with Store.open(data_dir, StoreConfig(block_size=B)) as store:
        prefix = random_tokens(1, 2 * B)
        put(store, "acme", "a", 0, [*prefix, 1, 2])
        put(store, "acme", "a", 1, [*prefix, 1, 2, 3], parent=0)
        put(store, "acme", "b", 0, [*prefix, 9])
        return [s.key for s in store.plan_snapshot("acme", "a", "m1", "k4v2", [*prefix, 1, 2, 3], 0).segments]


def _verify(data_dir: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "deltastore", "verify", "--data-dir", str(data_dir)],
        capture_output=True,
        text=True,
        timeout=120,
    )


def _tamper(data_dir: Path, fn: Callable[[WriteBatch], object]) -> None:
    with LmdbBackend(LmdbConfig(path=data_dir)) as backend:
        backend.transact(fn)


def test_clean_store_exits_zero(tmp_path: Path) -> None:
    _populate(tmp_path)
    proc = _verify(tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "clean" in proc.stdout and "3 manifests" in proc.stdout


def test_missing_directory_is_an_error(tmp_path: Path) -> None:
    proc = _verify(tmp_path / "nothing")
    assert proc.returncode == 2 and "no store" in proc.stderr


def _flip_payload(key: bytes) -> Callable[[WriteBatch], None]:
    def fn(t: WriteBatch) -> None:
        bkey = block_key("acme", key)
        raw = bytearray(t.get("blocks", bkey))
        raw[-3] ^= 0xFF
        t.put("blocks", bkey, bytes(raw))

    return fn


def _drop_block(key: bytes) -> Callable[[WriteBatch], None]:
    return lambda t: t.delete("blocks", block_key("acme", key))


def _bump_ref(key: bytes) -> Callable[[WriteBatch], None]:
    return lambda t: t.incr("refs", global_ref_key("acme", key), 1)


def _orphan(_key: bytes) -> Callable[[WriteBatch], None]:
    return lambda t: t.put("blocks", block_key("acme", b"\x07" * 32), encode_block(b"\0" * 4, b"x", 10))


def _drift(_key: bytes) -> Callable[[WriteBatch], None]:
    return lambda t: t.incr("counters", global_counter_key("logical"), 1)


def _corrupt_manifest(_key: bytes) -> Callable[[WriteBatch], None]:
    def fn(t: WriteBatch) -> None:
        mkey = manifest_key("acme", "b", 0)
        raw = bytearray(t.get("manifests", mkey))
        raw[10] ^= 1
        t.put("manifests", mkey, bytes(raw))

    return fn


@pytest.mark.parametrize(
    ("damage", "expect"),
    [
        (_flip_payload, "digest mismatch"),
        (_drop_block, "points at no block"),
        (_bump_ref, "refcount"),
        (_orphan, "leak"),
        (_drift, "counter glogical"),
        (_corrupt_manifest, "manifest acme/b/0"),
    ],
)
def test_each_broken_invariant_is_reported(
    tmp_path: Path, damage: Callable[[str], Callable[[WriteBatch], None]], expect: str
) -> None:
    keys = _populate(tmp_path)
    _tamper(tmp_path, damage(keys[-1]))
    proc = _verify(tmp_path)
    assert proc.returncode == 1, proc.stdout
    assert "PROBLEM" in proc.stdout and expect in proc.stdout, proc.stdout
