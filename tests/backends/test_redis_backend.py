"""Redis-specific guarantees beyond the shared contract: URLs, snapshot views over live commits,
fencing of expired writers, recovery of payloads a crashed writer left, placement on a cluster,
and clear errors (the contract and store suites run on Redis through ``store_testlib.BACKENDS``)."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
from redis_harness import OPTIONS

from deltastore.backend import WriteBatch
from deltastore.backends.redis import RedisBackend, RedisConfig
from deltastore.backends.redis.payloads import chunks
from deltastore.bench.redis_local import LocalRedis, LocalRedisCluster
from deltastore.errors import BackendUnavailable, IncompatibleFormat, InvalidArgument, StoreFull


def _payload_keys(backend: RedisBackend) -> set[bytes]:
    return set(backend.client.scan_iter(match=f"{backend.prefix}:d:*", count=1000))


def test_url_options_are_split_off_and_checked() -> None:
    cfg = RedisConfig.from_url("redis://u:p@10.0.0.1:7000/2?prefix=team-a&lock_lease_ms=500&health=1")
    assert (cfg.prefix, cfg.lock_lease_ms, cfg.cluster) == ("team-a", 500, False)
    assert cfg.url == "redis://u:p@10.0.0.1:7000/2?health=1"
    assert RedisConfig.from_url("redis+cluster://a:1,b:2?timeout_s=3").cluster
    for bad in (
        "http://h:1",
        "redis://h:1?prefix=has{brace}",
        "redis://h:1?lock_lease_ms=soon",
        "redis://h:1?view_lease_ms=5",
    ):
        with pytest.raises(InvalidArgument):
            RedisConfig.from_url(bad)


def test_payload_writes_renew_the_lease_per_bounded_chunk() -> None:
    items = [("a", b"x" * 10), ("b", b"x" * 10), ("c", b"x" * 25), ("d", b"x" * 1)]
    assert [[n for n, _ in c] for c in chunks(items, 20)] == [["a", "b"], ["c"], ["d"]]


def test_a_view_reads_one_version_while_commits_replace_and_free_payloads(
    cluster_backend: RedisBackend,
) -> None:
    b = cluster_backend

    def fill(t: WriteBatch) -> None:
        for i in range(5):
            t.put("blocks", b"b%d" % i, b"old%d" % i * 1000)
        t.put("manifests", b"m", b"v1")
        t.incr("refs", b"r", 3)

    b.transact(fill)
    with b.read() as view:

        def churn(t: WriteBatch) -> None:
            t.delete("blocks", b"b0")
            t.put("blocks", b"b1", b"new")
            t.put("blocks", b"b9", b"added")
            t.delete("manifests", b"m")
            t.incr("refs", b"r", -3)

        b.transact(churn)
        b.transact(lambda t: t.put("blocks", b"b1", b"newer"))
        assert view.get("blocks", b"b0") == b"old0" * 1000
        assert view.get("blocks", b"b1") == b"old1" * 1000
        assert view.get("blocks", b"b9") is None
        assert view.get("manifests", b"m") == b"v1"
        assert view.get_counter("refs", b"r") == 3
        assert [k for k, _ in view.scan("blocks")] == [b"b%d" % i for i in range(5)]
        assert dict(view.scan_counters("refs")) == {b"r": 3}
        # Replaced payloads stay while the view may read them.
        assert len(_payload_keys(b)) == 8
    with b.read() as view:
        assert [k for k, _ in view.scan("blocks")] == [b"b1", b"b2", b"b3", b"b4", b"b9"]
        assert view.get("blocks", b"b1") == b"newer"
    # The next commit with no view open trims the history and frees the replaced payloads.
    b.transact(lambda t: t.put("meta", b"x", b"1"))
    assert b.info()["history_entries"] == 0
    assert b.info()["free_payloads"] == 0
    assert len(_payload_keys(b)) == 5


def test_a_view_past_its_lease_fails_as_unavailable(cluster_url: str) -> None:
    b = RedisBackend.from_url(cluster_url.replace("view_lease_ms=30000", "view_lease_ms=100"))
    b.transact(lambda t: t.put("blocks", b"k", b"v1"))
    with b.read() as view:
        time.sleep(0.2)  # past the lease; the next commit drops the view and trims its history
        b.transact(lambda t: t.put("blocks", b"k", b"v2"))
        with pytest.raises(BackendUnavailable, match="expired"):
            view.get("blocks", b"k")
    with b.read() as view:
        assert view.get("blocks", b"k") == b"v2"
    b.close()


def test_scans_page_through_many_keys_at_one_version(cluster_backend: RedisBackend) -> None:
    b = cluster_backend
    keys = [b"k%04d" % i for i in range(700)]  # several pages of the scan script
    b.transact(lambda t: [t.put("sessions", k, k) for k in keys])
    with b.read() as view:
        b.transact(lambda t: [t.delete("sessions", k) for k in keys[::2]])
        got = list(view.scan("sessions", b"k0"))
    assert [k for k, _ in got] == keys
    assert all(k == v for k, v in got)
    with b.read() as view:
        assert [k for k, _ in view.scan("sessions")] == keys[1::2]


def test_a_writer_whose_lease_expired_commits_nothing_and_runs_again(cluster_url: str) -> None:
    slow = RedisBackend.from_url(cluster_url.replace("lock_lease_ms=3000", "lock_lease_ms=200"))
    fast = RedisBackend.from_url(cluster_url)
    calls = 0

    def slow_fn(t: WriteBatch) -> int:
        nonlocal calls
        calls += 1
        seen = t.get_counter("counters", b"n")
        t.put("blocks", b"slow", b"payload")
        if calls == 1:
            time.sleep(0.3)  # past the 200 ms lease: the other writer takes the lock meanwhile
            fast.transact(lambda f: f.incr("counters", b"n", 10))
        t.incr("counters", b"n", 1)
        return seen

    assert slow.transact(slow_fn) == 10  # the second run saw the other writer's commit
    assert calls == 2
    with slow.read() as view:
        assert view.get_counter("counters", b"n") == 11
        assert view.get("blocks", b"slow") == b"payload"
    assert len(_payload_keys(slow)) == 1  # the first run's payload was never committed, nor kept
    slow.close()
    fast.close()


def test_a_transaction_that_raises_releases_the_lock_at_once(cluster_backend: RedisBackend) -> None:
    b = cluster_backend

    def fail(t: WriteBatch) -> None:
        t.put("meta", b"k", b"v")
        raise KeyError("abort")

    with pytest.raises(KeyError):
        b.transact(fail)
    assert b.client.get(b.writer.lock_key) is None  # the next writer need not wait out the lease
    b.transact(lambda t: t.put("meta", b"k", b"w"))
    with b.read() as view:
        assert view.get("meta", b"k") == b"w"


def test_payloads_of_a_writer_that_died_before_committing_are_freed(cluster_url: str) -> None:
    dead = RedisBackend.from_url(cluster_url.replace("lock_lease_ms=3000", "lock_lease_ms=200"))
    # The dying writer's steps up to its commit: lock, intent, payload written; then it is gone.
    lock = dead.writer.acquire()
    name = dead.payloads.new_name()
    scripts = dead.meta.scripts
    scripts(scripts.intent, lock.local.token, 200, name)
    dead.client.set(name, b"orphan")
    live = RedisBackend.from_url(cluster_url)
    live.transact(lambda t: t.put("blocks", b"k", b"v"))  # waits out the lease, then commits
    with live.read() as view:
        assert [k for k, _ in view.scan("blocks")] == [b"k"]
    assert dead.client.get(name) is None
    assert len(_payload_keys(live)) == 1
    dead.close()
    live.close()


def test_metadata_shares_one_slot_and_payloads_spread_over_every_node(cluster_backend: RedisBackend) -> None:
    b = cluster_backend
    b.transact(lambda t: [t.put("blocks", b"%d" % i, b"x" * 100) for i in range(60)])
    b.transact(lambda t: [t.put(ks, b"k", b"v") for ks in ("manifests", "refs", "sessions", "counters")])
    meta = list(b.client.scan_iter(match=f"{b.tag}:*"))
    assert len(meta) >= 10
    assert len({b.client.keyslot(k) for k in meta}) == 1
    per_node = {
        node.name: sum(1 for _ in b.client.scan_iter(match=f"{b.prefix}:d:*", target_nodes=[node]))
        for node in b.client.get_primaries()
    }
    assert len(per_node) == 3 and all(n > 0 for n in per_node.values()), per_node
    assert sum(per_node.values()) == 60
    info = b.info()
    assert (info["mode"], len(info["nodes"]), info["blocks"]) == ("cluster", 3, 60)
    assert info["used_memory_bytes"] > 60 * 100


def test_concurrent_writers_on_two_handles_serialize(cluster_url: str) -> None:
    handles = [RedisBackend.from_url(cluster_url) for _ in range(2)]

    def work(b: RedisBackend) -> None:
        for _ in range(25):
            b.transact(lambda t: t.incr("counters", b"n", t.get_counter("counters", b"step") + 1))

    threads = [threading.Thread(target=work, args=(h,)) for h in handles for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    with handles[0].read() as view:
        assert view.get_counter("counters", b"n") == 100
    for h in handles:
        h.close()


def test_a_commit_replayed_after_its_reply_was_lost_answers_committed(cluster_backend: RedisBackend) -> None:
    # redis-py's Retry resends a command whose connection failed before the reply came back;
    # the commit may have run. Its replay must answer "committed", not "lock lost" (a lost lock
    # would run the transaction again and apply it twice).
    b = cluster_backend
    lock = b.writer.acquire()
    scripts = b.meta.scripts
    # ARGV after the tag: token, lease, no out-of-line keyspaces, no data keys, one write, trim budget.
    args = [lock.local.token, 3000, 0, 0, 1, "counters", b"n", b"p", b"\x01" + bytes(7), 4096]
    first = scripts(scripts.commit, *args)
    assert scripts(scripts.commit, *args) == first
    assert b.info()["commit_seq"] == first[0]
    b.transact(lambda t: t.incr("counters", b"n", 1))  # the lock was released by the first run
    with b.read() as view:
        assert view.get_counter("counters", b"n") == 2


def test_an_unreachable_server_is_unavailable() -> None:
    with pytest.raises(BackendUnavailable):
        RedisBackend.from_url(f"redis://127.0.0.1:1/0?{OPTIONS}")


def test_an_evicting_redis_is_refused_and_out_of_memory_is_store_full(own_redis: LocalRedis) -> None:
    with own_redis.client() as admin:
        admin.config_set("maxmemory-policy", "allkeys-lru")
        with pytest.raises(InvalidArgument, match="noeviction"):
            RedisBackend.from_url(own_redis.url)
        admin.config_set("maxmemory-policy", "noeviction")
        backend = RedisBackend.from_url(own_redis.url)
        backend.transact(lambda t: t.put("blocks", b"small", b"x"))
        admin.config_set("maxmemory", str(4 << 20))
        with pytest.raises(StoreFull):
            backend.transact(lambda t: [t.put("blocks", b"big%d" % i, b"y" * (1 << 20)) for i in range(8)])
        admin.config_set("maxmemory", "0")
    with backend.read() as view:
        assert [k for k, _ in view.scan("blocks")] == [b"small"]
    backend.close()


def test_a_cluster_with_one_evicting_node_is_refused(own_cluster: LocalRedisCluster) -> None:
    with own_cluster.nodes[1].client() as admin:
        admin.config_set("maxmemory-policy", "volatile-lru")
    with pytest.raises(InvalidArgument, match="volatile-lru"):
        RedisBackend.from_url(own_cluster.url)


def test_wait_replicas_acknowledges_only_replicated_commits(own_redis: LocalRedis, tmp_path: Path) -> None:
    replica = LocalRedis(tmp_path / "replica", appendfsync="no", replica_of=own_redis.port).start()
    try:
        backend = RedisBackend.from_url(f"{own_redis.url}?wait_replicas=1&wait_timeout_ms=5000")
        backend.transact(lambda t: t.put("manifests", b"m", b"replicated"))
        with replica.client() as r:
            assert r.hget("{deltastore}:v:manifests", b"m").endswith(b"replicated")
    finally:
        replica.stop()
    backend = RedisBackend.from_url(f"{own_redis.url}?wait_replicas=1&wait_timeout_ms=200")
    with pytest.raises(BackendUnavailable, match="0 of 1 replicas"):
        backend.transact(lambda t: t.put("manifests", b"m2", b"primary only"))
    with backend.read() as view:  # applied on the primary (a retry would be a no-op), lock released
        assert view.get("manifests", b"m2") == b"primary only"
    assert backend.client.get("{deltastore}:lock") is None
    backend.close()


def test_wait_replicas_on_a_cluster_without_replicas_is_unavailable(cluster_url: str) -> None:
    backend = RedisBackend.from_url(f"{cluster_url}&wait_replicas=1&wait_timeout_ms=100")
    with pytest.raises(BackendUnavailable, match="0 of 1 replicas"):
        backend.transact(lambda t: t.put("blocks", b"k", b"v"))
    backend.close()


def test_another_layout_under_the_prefix_is_refused(own_redis: LocalRedis) -> None:
    with own_redis.client() as admin:
        admin.set("{old}:format", b"deltastore-redis/0")
    with pytest.raises(IncompatibleFormat):
        RedisBackend.from_url(f"{own_redis.url}?prefix=old")
