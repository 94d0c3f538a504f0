"""Secure by default: no open listener beyond loopback without keys; no secret in any log line."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from trust_helpers import KEY_ACME, ServeProcess, client, start_service, write_auth

from deltastore.backends import redact_url
from deltastore.bench.redis_local import LocalRedis
from deltastore.errors import InvalidArgument
from deltastore.server.app import add_arguments
from deltastore.server.settings import ServerSettings, is_loopback_address

ROOT = Path(__file__).resolve().parents[2]
OPEN = ["0.0.0.0:0", "[::]:0", ":0", "myhost.example:0", "10.1.2.3:0"]


@pytest.mark.parametrize("where", ["grpc_address", "http_address"])
def test_refuses_to_listen_beyond_loopback_without_keys(tmp_path: Path, where: str, reliability) -> None:
    for address in OPEN:
        with pytest.raises(InvalidArgument, match="without an auth file"):
            start_service(tmp_path / address.replace(":", "_"), **{where: address})
    reliability.record(
        f"start with {where.split('_')[0]} on a non-loopback address and no auth file",
        len(OPEN),
        "refused at start, naming --auth-file and --insecure",
    )


def test_loopback_auth_file_or_insecure_start(tmp_path: Path, reliability) -> None:
    assert all(
        is_loopback_address(a)
        for a in ("127.0.0.1:1", "127.8.9.1:1", "localhost:1", "[::1]:1", "unix:/tmp/x.sock")
    )
    assert not any(is_loopback_address(a) for a in OPEN)
    auth = write_auth(tmp_path / "auth.json")
    for svc, key in (
        (start_service(tmp_path / "a", grpc_address="0.0.0.0:0", auth_file=str(auth)), KEY_ACME),
        (start_service(tmp_path / "b", grpc_address="0.0.0.0:0", insecure=True), None),
    ):
        try:
            with client(svc.grpc_port, key, "acme" if key else "default") as c:
                assert c.savings() is not None
        finally:
            svc.stop()
    reliability.record("non-loopback start with an auth file, or with --insecure", 2, "serves")


def test_cli_refuses_open_start(tmp_path: Path, reliability) -> None:
    cmd = [sys.executable, "-m", "deltastore", "serve", "--data-dir", str(tmp_path / "d")]
    cmd += ["--grpc", "0.0.0.0:0", "--http", ""]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert done.returncode != 0 and "without an auth file" in done.stderr + done.stdout
    assert "deltastore serving" not in done.stdout
    env_done = subprocess.run(
        [*cmd[:-4], "--http", ""],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "DELTASTORE_GRPC_ADDRESS": "0.0.0.0:0"},
    )
    assert env_done.returncode != 0 and "without an auth file" in env_done.stderr + env_done.stdout
    reliability.record(
        "`deltastore serve --grpc 0.0.0.0:0` (flag / environment) without keys", 2, "exit != 0"
    )


def test_container_files_start_secure(reliability) -> None:
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    secrets = compose["secrets"]
    checked = 0
    for name, svc in compose["services"].items():
        if "deltastore" not in name or "command" not in svc or svc.get("entrypoint"):
            continue
        env = {k: str(v) for k, v in (svc.get("environment") or {}).items()}
        parser = argparse.ArgumentParser()
        add_arguments(parser)
        settings = ServerSettings.load(parser.parse_args(svc["command"]), env)
        assert not settings.insecure and settings.auth_file.startswith("/run/secrets/"), name
        assert Path(settings.auth_file).name in svc["secrets"] and Path(settings.auth_file).name in secrets
        settings.check_exposure()
        checked += 1
    assert checked >= 3
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert "DELTASTORE_AUTH_FILE=/run/secrets/deltastore-auth" in dockerfile
    assert (
        "DELTASTORE_INSECURE=1 \\" not in dockerfile and "--insecure" not in dockerfile.split("ENTRYPOINT")[1]
    )
    reliability.record("compose services and image defaults", checked + 1, "each needs an auth-file secret")


def test_backend_password_never_printed(tmp_path: Path, reliability) -> None:
    secret = "hunter2-backend-secret-9f8e"
    assert secret not in redact_url(f"redis://user:{secret}@h:1/0")
    assert secret not in redact_url(f"rediss+cluster://:{secret}@h1:1,h2:2?prefix=x")
    assert redact_url("lmdb:///srv/ds") == "lmdb:///srv/ds"
    with LocalRedis(tmp_path / "redis", appendfsync="no") as redis_node:
        with redis_node.client() as admin:
            admin.config_set("requirepass", secret)
        url = f"redis://:{secret}@127.0.0.1:{redis_node.port}/0"
        server = ServeProcess(tmp_path / "d", "--backend", url, "--log-level", "DEBUG")
        try:
            banner = server.banner
            assert "backend=redis://:***@127.0.0.1" in banner
            with client(server.grpc_port, None) as c:
                c.savings()
        finally:
            server.stop()
        out = (server.proc.stdout.read() if server.proc.stdout else "") + "".join(server.stderr) + banner
        assert secret not in out
        bad = subprocess.run(
            [
                sys.executable,
                "-m",
                "deltastore",
                "verify",
                "--backend",
                url.replace("redis://", "redis+x://"),
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert bad.returncode != 0 and secret not in bad.stdout + bad.stderr
    reliability.record(
        "backend URL with a password: serve banner, debug log, error messages", 3, "password shown as ***"
    )
