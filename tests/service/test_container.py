"""The container files, checked without a Docker engine (none runs here): parse and cross-check."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import yaml

from deltastore.cli import build_parser
from deltastore.server.app import Service
from deltastore.server.settings import ServerSettings

ROOT = Path(__file__).resolve().parents[2]


def _dockerfile() -> list[tuple[str, str]]:
    """(instruction, arguments) of the Dockerfile, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", (ROOT / "Dockerfile").read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            op, _, rest = line.partition(" ")
            out.append((op.upper(), rest.strip()))
    return out


def test_dockerfile() -> None:
    ins = _dockerfile()
    ops = [op for op, _ in ins]
    assert ops[0] == "ARG" and ins[0][1].startswith("BASE_IMAGE=") and ops[1] == "FROM"
    assert ins[1][1] == "${BASE_IMAGE}"
    # The server image is the server and store only: no torch, no worker extras.
    runs = " ".join(a for op, a in ins if op == "RUN")
    assert "torch" not in runs and "pip install . " in runs + " " and "[" not in runs
    expose = {p for op, a in ins if op == "EXPOSE" for p in a.split()}
    assert expose == {"50051", "8080"}
    assert ("VOLUME", '["/data"]') in ins
    [health] = [a for op, a in ins if op == "HEALTHCHECK"]
    assert "/healthz" in health and "8080" in health
    [entry] = [a for op, a in ins if op == "ENTRYPOINT"]
    assert json.loads(entry) == ["deltastore", "serve"]  # exec form: PID 1 gets SIGTERM
    assert "USER" in ops
    for op, a in ins:  # every copied source exists in the repository
        if op == "COPY":
            for src in a.split()[:-1]:
                assert (ROOT / src).exists(), src
    env = " ".join(a for op, a in ins if op == "ENV")
    assert "DELTASTORE_GRPC_ADDRESS=0.0.0.0:50051" in env and "DELTASTORE_HTTP_ADDRESS=0.0.0.0:8080" in env
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert ".venv*" in ignored and ".git" in ignored


def test_compose_file() -> None:
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    ds = compose["services"]["deltastore"]
    assert ds["build"]["context"] == "."
    assert {"50051:50051", "8080:8080"} <= set(ds["ports"])
    [volume] = ds["volumes"]
    name, mount = volume.split(":")
    assert mount == "/data" and name in compose["volumes"]
    assert any("/healthz" in part for part in ds["healthcheck"]["test"])
    # The command is a valid `deltastore serve` invocation whose addresses match the ports.
    argv = ["serve", *ds["command"]]
    args = build_parser(argv).parse_args(argv)
    settings = ServerSettings.load(args, {})
    assert settings.grpc_address.endswith(":50051") and settings.http_address.endswith(":8080")
    assert str(settings.data_dir) == mount
    worker = compose["services"]["inference"]
    assert worker["depends_on"]["deltastore"]["condition"] == "service_healthy"
    assert worker["environment"]["DELTASTORE_TARGET"] == "deltastore:50051"


def test_healthcheck_command_against_a_live_service(service: Service) -> None:
    """Run the compose healthcheck's own command against a real server (port swapped in)."""
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    test = compose["services"]["deltastore"]["healthcheck"]["test"]
    assert test[0] == "CMD"
    argv = [part.replace("8080", str(service.http_port)) for part in test[1:]]
    argv[0] = sys.executable if argv[0] == "python3" else argv[0]
    assert subprocess.run(argv, timeout=30).returncode == 0, shlex.join(argv)
    dead = [part.replace(str(service.http_port), "1") for part in argv]
    assert subprocess.run(dead, timeout=30, capture_output=True).returncode != 0
