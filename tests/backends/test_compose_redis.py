"""The docker-compose ``redis`` profile: a durable 3-node cluster and two servers sharing it."""

from __future__ import annotations

from pathlib import Path

import yaml

from deltastore.backends.redis import RedisConfig

ROOT = Path(__file__).resolve().parents[2]


def test_compose_redis_profile_runs_two_servers_on_a_durable_cluster() -> None:
    services = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]
    nodes = [f"redis-{i}" for i in (1, 2, 3)]
    for name in nodes:
        node = services[name]
        assert node["profiles"] == ["redis"]
        flags = dict(zip(node["command"][1::2], node["command"][2::2], strict=False))
        assert flags["--appendfsync"] == "always" and flags["--maxmemory-policy"] == "noeviction"
        assert flags["--cluster-announce-hostname"] == name
    servers = [
        s
        for s in services.values()
        if "redis" in s.get("profiles", []) and "--backend" in s.get("command", [])
    ]
    assert len(servers) == 2
    for server in servers:
        config = RedisConfig.from_url(server["command"][server["command"].index("--backend") + 1])
        assert config.cluster and all(f"{n}:6379" in config.url for n in nodes)
    assert "profiles" not in services["deltastore"]
