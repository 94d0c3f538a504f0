"""Throwaway Redis servers and clusters on loopback ports, for tests, benchmarks and trying out.

``LocalRedisCluster(directory, nodes=3).start()`` runs ``redis-server`` processes (cluster mode,
append-only file fsynced per write by default, so a killed node restarts with every acknowledged
write) and joins them with ``redis-cli --cluster create``; ``kill(i)`` / ``restart(i)`` drive
fault tests; ``url`` is the ``redis+cluster://`` URL of the backend. Valkey works the same
(``valkey-server`` / ``valkey-cli`` are used when Redis is not installed).
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from pathlib import Path

import redis

from deltastore.errors import BackendUnavailable, DeltaStoreError

__all__ = ["LocalRedis", "LocalRedisCluster", "redis_binaries"]

CLUSTER_BUS_OFFSET = 10_000  # Redis Cluster's node-to-node port is the client port + 10000
_START_TIMEOUT_S = 20.0


def redis_binaries() -> tuple[str, str]:
    """Paths of (server, cli): Redis, else Valkey; raises DeltaStoreError when neither is installed."""
    for server, cli in (("redis-server", "redis-cli"), ("valkey-server", "valkey-cli")):
        server_path, cli_path = shutil.which(server), shutil.which(cli)
        if server_path and cli_path:
            return server_path, cli_path
    raise DeltaStoreError(
        "redis-server (or valkey-server) and its cli are not installed",
        hint="apt-get install redis-server, or point the backend URL at an existing Redis",
    )


def _free_port() -> int:
    """A loopback port that is free, and whose cluster bus port is free too."""
    for _ in range(100):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port + CLUSTER_BUS_OFFSET > 65535:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port + CLUSTER_BUS_OFFSET))
            except OSError:
                continue
        return port
    raise DeltaStoreError("no free loopback port pair for a Redis node")


class LocalRedis:
    """One ``redis-server`` on 127.0.0.1 with its files in ``directory``.

    Args:
        directory: working directory (append-only files, cluster config, log).
        cluster: run in cluster mode (joined by :class:`LocalRedisCluster`).
        appendfsync: ``always`` (every acknowledged write survives kill -9), ``everysec``, or
            ``no`` (then nothing is persisted at all: no append-only file).
        port: client port (0: pick a free one).
        replica_of: port of a local primary to replicate (0: none).
    """

    def __init__(
        self,
        directory: Path,
        *,
        cluster: bool = False,
        appendfsync: str = "always",
        port: int = 0,
        replica_of: int = 0,
    ) -> None:
        self.directory = Path(directory)
        self.cluster = cluster
        self.replica_of = replica_of
        self.appendfsync = appendfsync
        self.port = port or _free_port()
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def _args(self) -> list[str]:
        args = [
            redis_binaries()[0],
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--dir", str(self.directory),
            "--save", "",
            "--logfile", "redis.log",
            "--maxmemory-policy", "noeviction",
            "--protected-mode", "no",
        ]  # fmt: skip
        if self.appendfsync == "no":
            args += ["--appendonly", "no"]
        else:
            args += ["--appendonly", "yes", "--appendfsync", self.appendfsync]
        if self.replica_of:
            args += ["--replicaof", "127.0.0.1", str(self.replica_of)]
        if self.cluster:
            args += [
                "--cluster-enabled", "yes",
                "--cluster-config-file", "nodes.conf",
                "--cluster-node-timeout", "2000",
                # Slots on live nodes keep serving while another node is down.
                "--cluster-require-full-coverage", "no",
            ]  # fmt: skip
        return args

    def client(self) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=5, socket_connect_timeout=2)

    def start(self) -> LocalRedis:
        self.directory.mkdir(parents=True, exist_ok=True)
        self._proc = subprocess.Popen(self._args(), cwd=self.directory, stdout=subprocess.DEVNULL)
        deadline = time.monotonic() + _START_TIMEOUT_S
        with self.client() as client:
            while True:
                try:
                    # A replica is started once it replicates (its first sync may wait seconds
                    # for repl-diskless-sync-delay): WAIT on the primary counts it from then on.
                    if client.ping() and (
                        not self.replica_of or client.info("replication")["master_link_status"] == "up"
                    ):
                        return self
                except (redis.ConnectionError, redis.exceptions.BusyLoadingError):
                    pass
                if self._proc.poll() is not None or time.monotonic() > deadline:
                    log = (self.directory / "redis.log").read_text(errors="replace")[-2000:]
                    raise BackendUnavailable(f"redis-server on port {self.port} did not start:\n{log}")
                time.sleep(0.02)

    def kill(self) -> None:
        """SIGKILL: no shutdown save, like a crash."""
        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait()

    def stop(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()

    def __enter__(self) -> LocalRedis:
        return self.start()

    def __exit__(self, *_exc: object) -> None:
        self.stop()


class LocalRedisCluster:
    """A Redis Cluster of ``nodes`` masters (no replicas) on loopback ports under ``directory``."""

    def __init__(self, directory: Path, *, nodes: int = 3, appendfsync: str = "always") -> None:
        if nodes < 3:
            raise DeltaStoreError("Redis Cluster needs at least 3 master nodes")
        self.directory = Path(directory)
        self.nodes = [
            LocalRedis(self.directory / f"node{i}", cluster=True, appendfsync=appendfsync)
            for i in range(nodes)
        ]

    @property
    def url(self) -> str:
        return "redis+cluster://" + ",".join(f"127.0.0.1:{n.port}" for n in self.nodes)

    def start(self) -> LocalRedisCluster:
        for node in self.nodes:
            node.start()
        cli = redis_binaries()[1]
        addrs = [f"127.0.0.1:{n.port}" for n in self.nodes]
        done = subprocess.run(
            [cli, "--cluster", "create", *addrs, "--cluster-replicas", "0", "--cluster-yes"],
            capture_output=True,
            timeout=60,
        )
        if done.returncode != 0:
            self.stop()
            raise BackendUnavailable(f"redis-cli --cluster create failed: {done.stdout[-2000:]!r}")
        self.wait_healthy()
        return self

    def wait_healthy(self, timeout_s: float = _START_TIMEOUT_S) -> None:
        """Until every node reports the cluster ok with all 16384 slots served by known nodes."""
        deadline = time.monotonic() + timeout_s
        while True:
            if all(self._node_ok(n) for n in self.nodes):
                return
            if time.monotonic() > deadline:
                raise BackendUnavailable("the local Redis Cluster did not become healthy")
            time.sleep(0.05)

    def _node_ok(self, node: LocalRedis) -> bool:
        try:
            with node.client() as client:
                info = client.cluster("INFO")
                if isinstance(info, bytes | str):
                    text = info.decode() if isinstance(info, bytes) else info
                    info = dict(line.split(":", 1) for line in text.split() if ":" in line)
                nodes = client.cluster("NODES")
        except (redis.ConnectionError, redis.exceptions.BusyLoadingError, redis.ResponseError):
            return False
        text = nodes.decode() if isinstance(nodes, bytes) else str(nodes)
        healthy = "fail" not in text and "handshake" not in text and "noaddr" not in text
        return (
            str(info.get("cluster_state")) == "ok"
            and int(info.get("cluster_slots_ok", 0)) == 16384
            and healthy
        )

    def kill(self, index: int) -> None:
        self.nodes[index].kill()

    def restart(self, index: int) -> None:
        """Start a killed node again on its port and files; waits for the cluster to be healthy."""
        self.nodes[index].start()
        self.wait_healthy(60)

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()

    def __enter__(self) -> LocalRedisCluster:
        return self.start()

    def __exit__(self, *_exc: object) -> None:
        self.stop()
