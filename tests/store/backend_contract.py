"""The contract every storage backend meets (see deltastore/backend.py), as one reusable suite.

Bound to the engines of ``store_testlib.BACKENDS`` by ``test_backend_contract.py``; its tests
take the ``backend_factory`` fixture (``factory(name) -> Backend``, same name = same data).
"""

from __future__ import annotations

import threading

import pytest
from store_testlib import BackendFactory

from deltastore.backend import KEYSPACES, WriteBatch
from deltastore.errors import InvalidArgument


class Boom(Exception):
    pass


class BackendContract:
    """Generic tests of the Backend interface; subclass to run them."""

    def test_put_get_and_absent(self, backend_factory: BackendFactory) -> None:
        b = backend_factory()
        b.transact(lambda t: t.put("blocks", b"k1", b"v1"))
        with b.read() as view:
            assert bytes(view.get("blocks", b"k1")) == b"v1"
            assert view.get("blocks", b"nope") is None
            assert view.get("manifests", b"k1") is None  # keyspaces are separate

    def test_get_head_reads_a_prefix_and_the_length(self, backend_factory: BackendFactory) -> None:
        backend = backend_factory()
        value = bytes(range(256)) * 64
        backend.transact(lambda b: b.put("blocks", b"k", value))

        def in_batch(b: WriteBatch) -> None:
            b.put("blocks", b"mine", b"abc")
            head, total = b.get_head("blocks", b"mine", 2)
            assert (bytes(head), total) == (b"ab", 3)
            head, total = b.get_head("blocks", b"k", 48)
            assert (bytes(head), total) == (value[:48], len(value))

        backend.transact(in_batch)
        with backend.read() as view:
            head, total = view.get_head("blocks", b"k", 48)
            assert (bytes(head), total) == (value[:48], len(value))
            assert view.get_head("blocks", b"absent", 48) is None

    def test_put_replaces(self, backend_factory: BackendFactory) -> None:
        b = backend_factory()
        b.transact(lambda t: t.put("meta", b"k", b"one"))
        b.transact(lambda t: t.put("meta", b"k", b"two"))
        with b.read() as view:
            assert bytes(view.get("meta", b"k")) == b"two"

    def test_delete(self, backend_factory: BackendFactory) -> None:
        b = backend_factory()
        b.transact(lambda t: t.put("sessions", b"k", b"v"))
        assert b.transact(lambda t: t.delete("sessions", b"k")) is True
        assert b.transact(lambda t: t.delete("sessions", b"k")) is False
        with b.read() as view:
            assert view.get("sessions", b"k") is None

    def test_counters_start_at_zero_and_vanish_at_zero(self, backend_factory: BackendFactory) -> None:
        b = backend_factory()
        with b.read() as view:
            assert view.get_counter("refs", b"c") == 0
        assert b.transact(lambda t: t.incr("refs", b"c", 5)) == 5
        assert b.transact(lambda t: t.incr("refs", b"c", -7)) == -2
        assert b.transact(lambda t: t.incr("refs", b"c", 2)) == 0
        b.transact(lambda t: t.incr("refs", b"d", 1 << 40))
        with b.read() as view:
            assert view.get_counter("refs", b"c") == 0
            assert dict(view.scan_counters("refs")) == {b"d": 1 << 40}

    def test_scan_prefix_in_key_order(self, backend_factory: BackendFactory) -> None:
        b = backend_factory()
        keys = [b"a\x00", b"a\x01z", b"a\xff", b"ab", b"b", b"a"]

        def fill(t: WriteBatch) -> None:
            for i, k in enumerate(keys):
                t.put("manifests", k, bytes([i]))

        b.transact(fill)
        with b.read() as view:
            got = [(k, bytes(v)) for k, v in view.scan("manifests", b"a")]
            everything = [k for k, _ in view.scan("manifests")]
            assert [k for k, _ in view.scan("manifests", b"zz")] == []
        assert [k for k, _ in got] == sorted(k for k in keys if k.startswith(b"a"))
        assert all(v == bytes([keys.index(k)]) for k, v in got)
        assert everything == sorted(keys)

    def test_transaction_reads_its_own_writes(self, backend_factory: BackendFactory) -> None:
        b = backend_factory()

        def fn(t: WriteBatch) -> tuple[bytes, int, list[bytes]]:
            t.put("blocks", b"x", b"1")
            t.incr("counters", b"n", 3)
            return (
                bytes(t.get("blocks", b"x")),
                t.get_counter("counters", b"n"),
                [k for k, _ in t.scan("blocks")],
            )

        assert b.transact(fn) == (b"1", 3, [b"x"])

    def test_failed_transaction_leaves_nothing(self, backend_factory: BackendFactory) -> None:
        b = backend_factory()
        b.transact(lambda t: t.put("blocks", b"keep", b"old"))

        def fn(t: WriteBatch) -> None:
            for i in range(200):
                t.put("blocks", b"k%d" % i, b"v" * 1000)
                t.incr("refs", b"r%d" % i, 1)
            t.put("blocks", b"keep", b"new")
            t.delete("blocks", b"keep")
            raise Boom

        with pytest.raises(Boom):
            b.transact(fn)
        with b.read() as view:
            assert [k for k, _ in view.scan("blocks")] == [b"keep"]
            assert bytes(view.get("blocks", b"keep")) == b"old"
            assert list(view.scan_counters("refs")) == []

    def test_read_view_is_a_consistent_snapshot(self, backend_factory: BackendFactory) -> None:
        b = backend_factory()
        b.transact(lambda t: t.put("blocks", b"k", b"before"))
        with b.read() as view:
            done = threading.Event()

            def writer() -> None:
                b.transact(lambda t: (t.put("blocks", b"k", b"after"), t.put("blocks", b"k2", b"new")))
                done.set()

            thread = threading.Thread(target=writer)
            thread.start()
            assert done.wait(30)
            assert bytes(view.get("blocks", b"k")) == b"before"
            assert view.get("blocks", b"k2") is None
        thread.join()
        with b.read() as view:
            assert bytes(view.get("blocks", b"k")) == b"after"

    def test_large_values_and_growth(self, backend_factory: BackendFactory) -> None:
        b = backend_factory()
        big = bytes(range(256)) * (16 * 1024)  # 4 MiB, past the test factories' 1 MiB initial map

        def fill(t: WriteBatch) -> None:
            for i in range(3):
                t.put("blocks", b"big%d" % i, big)

        b.transact(fill)
        with b.read() as view:
            assert all(bytes(view.get("blocks", b"big%d" % i)) == big for i in range(3))

    def test_durable_across_reopen(self, backend_factory: BackendFactory) -> None:
        b = backend_factory("durable")
        b.transact(lambda t: (t.put("manifests", b"m", b"payload"), t.incr("counters", b"c", 9)))
        b.close()
        again = backend_factory("durable")
        with again.read() as view:
            assert bytes(view.get("manifests", b"m")) == b"payload"
            assert view.get_counter("counters", b"c") == 9

    def test_concurrent_increments_are_not_lost(self, backend_factory: BackendFactory) -> None:
        b = backend_factory()

        def work() -> None:
            for _ in range(50):
                b.transact(lambda t: t.incr("counters", b"n", 1))

        threads = [threading.Thread(target=work) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        with b.read() as view:
            assert view.get_counter("counters", b"n") == 200

    def test_every_keyspace_and_unknown_ones(self, backend_factory: BackendFactory) -> None:
        b = backend_factory()

        def fill(t: WriteBatch) -> None:
            for ks in KEYSPACES:
                t.put(ks, b"k", ks.encode())

        b.transact(fill)
        with b.read() as view:
            assert [bytes(view.get(ks, b"k")) for ks in KEYSPACES] == [ks.encode() for ks in KEYSPACES]
            with pytest.raises(InvalidArgument):
                view.get("nope", b"k")

    def test_info_is_json_ready(self, backend_factory: BackendFactory) -> None:
        import json

        info = backend_factory().info()
        assert json.loads(json.dumps(info))["backend"]
