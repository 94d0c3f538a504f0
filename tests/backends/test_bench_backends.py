"""`deltastore bench backends` runs end to end on a tiny workload and reports ratios to LMDB."""

from __future__ import annotations

import json
from pathlib import Path

from redis_harness import require_redis_server, require_shared_redis

from deltastore.bench.redis_local import LocalRedisCluster
from deltastore.cli import main


def test_bench_backends_writes_json_table_and_plot(tmp_path: Path, redis_cluster: LocalRedisCluster) -> None:
    require_redis_server()
    require_shared_redis()
    out = tmp_path / "bench" / "backends.json"
    argv = ["bench", "backends", "--json", str(out), "--sessions", "2", "--turns", "2", "--threads", "2"]
    argv += ["--redis", "redis://127.0.0.1:6379/0", "--cluster", redis_cluster.url]
    assert main(argv) == 0
    doc = json.loads(out.read_text())
    results = doc["results"]
    assert list(results) == ["lmdb", "redis", "redis-cluster"]
    for name, r in results.items():
        for op in ("put", "get"):
            assert r[op]["ops_per_s"] > 0 and r[op]["p99_ms"] >= r[op]["p50_ms"] > 0
            if name == "lmdb":
                assert r[op]["throughput_vs_lmdb"] == 1.0
        # Same workload, same savings: the engine does not change what is stored.
        assert r["savings_ratio"] == results["lmdb"]["savings_ratio"]
    assert "| redis-cluster |" in out.with_suffix(".md").read_text()
    assert out.with_suffix(".png").stat().st_size > 0
