"""Helpers of the trust tests: keys and auth files, services, certificates, subprocess servers.

A uniquely named module (tests/ folders are not packages).
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import torch

from deltastore.client.auth import ApiKey
from deltastore.client.sync import DeltaStoreClient
from deltastore.server.app import Service
from deltastore.server.settings import ServerSettings
from deltastore.settings import StoreConfig
from deltastore.store import Store
from deltastore.v1 import deltastore_pb2 as pb
from deltastore.v1 import deltastore_pb2_grpc as pb_grpc

MODEL = "trust-model@00000000"
BLOCK = 16
KEY_ACME = "acme-key-7f3a9c1e5b2d4f6a8c0e"
KEY_GLOBEX = "globex-key-0b1d3f5a7c9e2b4d6f8a"
KEY_PLATFORM = "platform-key-5e7a9c1b3d5f7a9c1e3b"
KEY_OPS = "ops-key-2c4e6a8b0d2f4a6c8e0b2d"
ALL_KEYS = (KEY_ACME, KEY_GLOBEX, KEY_PLATFORM, KEY_OPS)


def auth_config(**extra: Any) -> dict[str, Any]:
    """acme (two namespaces, reads 'public'), globex (its own), platform (writes 'public'), ops."""
    return {
        "keys": {
            KEY_ACME: {"tenant": "acme"},
            "sha256:" + hashlib.sha256(KEY_GLOBEX.encode()).hexdigest(): {"tenant": "globex"},
            KEY_PLATFORM: {"tenant": "platform"},
            KEY_OPS: {"role": "ops"},
        },
        "tenants": {
            "acme": {"namespaces": ["acme", "acme-eval"], "shared": {"public": "read"}},
            "platform": {"namespaces": [], "shared": {"public": "write"}},
        },
        "shared_namespaces": ["public"],
        **extra,
    }


def write_auth(path: Path, config: dict[str, Any] | None = None) -> Path:
    path.write_text(json.dumps(config if config is not None else auth_config()))
    path.chmod(0o600)
    return path


def make_cache(
    n_tokens: int, *, layers: int = 2, heads: int = 1, seed: int = 0
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """A small synthetic cache: per layer (K, V), each (heads, n_tokens, 64) fp16."""
    gen = torch.Generator().manual_seed(seed)
    return [
        (
            torch.randn(heads, n_tokens, 64, generator=gen).half(),
            torch.randn(heads, n_tokens, 64, generator=gen).half(),
        )
        for _ in range(layers)
    ]


def tokens_for(seed: int, n: int) -> list[int]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 49152, (n,), generator=gen).tolist()


def start_service(tmp_path: Path, *, store_config: StoreConfig | None = None, **overrides: object) -> Service:
    """A started in-process service over a fresh LMDB store (16-token blocks), loopback port 0."""
    fields: dict[str, object] = {
        "data_dir": tmp_path / "data",
        "grpc_address": "127.0.0.1:0",
        "http_address": "127.0.0.1:0",
        "grace_seconds": 1.0,
        **overrides,
    }
    settings = ServerSettings(**fields)  # type: ignore[arg-type]
    store = Store.open(settings.data_dir, store_config or StoreConfig(block_size=BLOCK))
    try:
        return Service(settings, store=store).start()
    except BaseException:
        store.close()
        raise


def client(port: int, key: str | None, namespace: str = "default", **kwargs: Any) -> DeltaStoreClient:
    return DeltaStoreClient(
        f"127.0.0.1:{port}",
        namespace=namespace,
        timeout=kwargs.pop("timeout", 20),
        interceptors=[ApiKey(key)] if key else (),
        **kwargs,
    )


def stub(channel: grpc.Channel) -> pb_grpc.DeltaStoreStub:
    return pb_grpc.DeltaStoreStub(channel)


def metadata(key: str | None) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {key}"),) if key else ()


SERVICE = pb.DESCRIPTOR.services_by_name["DeltaStore"]


def call_every_method(
    channel: grpc.Channel, key: str | None, namespace: str, session: str = "s", turn: int = 0
) -> dict[str, grpc.StatusCode]:
    """Call every DeltaStore method once in ``namespace``; the status code of each."""
    s = stub(channel)
    tokens = tokens_for(1, 40)
    header = pb.SnapshotHeader(
        namespace=namespace, session=session, turn=turn, model=MODEL, codec="k4v2", token_ids=tokens
    )
    calls = {
        "PlanSnapshot": lambda md: s.PlanSnapshot(
            pb.PlanSnapshotRequest(
                namespace=namespace, session=session, model=MODEL, codec="k4v2", token_ids=tokens
            ),
            metadata=md,
            timeout=10,
        ),
        "PutSnapshot": lambda md: s.PutSnapshot(
            iter([pb.PutSnapshotRequest(header=header)]), metadata=md, timeout=10
        ),
        "GetSnapshot": lambda md: list(
            s.GetSnapshot(
                pb.GetSnapshotRequest(namespace=namespace, session=session, turn=turn),
                metadata=md,
                timeout=10,
            )
        ),
        "GetSnapshotShm": lambda md: s.GetSnapshotShm(
            pb.GetSnapshotRequest(namespace=namespace, session=session, turn=turn), metadata=md, timeout=10
        ),
        "LookupPrefix": lambda md: s.LookupPrefix(
            pb.LookupPrefixRequest(namespace=namespace, model=MODEL, codec="k4v2", token_ids=tokens),
            metadata=md,
            timeout=10,
        ),
        "GetPrefix": lambda md: list(
            s.GetPrefix(
                pb.GetPrefixRequest(namespace=namespace, model=MODEL, codec="k4v2", token_ids=tokens),
                metadata=md,
                timeout=10,
            )
        ),
        "GetPrefixShm": lambda md: s.GetPrefixShm(
            pb.GetPrefixRequest(namespace=namespace, model=MODEL, codec="k4v2", token_ids=tokens),
            metadata=md,
            timeout=10,
        ),
        "HasBlocks": lambda md: s.HasBlocks(
            pb.HasBlocksRequest(namespace=namespace, keys=[bytes(32)]), metadata=md, timeout=10
        ),
        "DeleteSnapshot": lambda md: s.DeleteSnapshot(
            pb.DeleteSnapshotRequest(namespace=namespace, session=session, turn=turn), metadata=md, timeout=10
        ),
        "DeleteSession": lambda md: s.DeleteSession(
            pb.DeleteSessionRequest(namespace=namespace, session=session), metadata=md, timeout=10
        ),
        "ListSnapshots": lambda md: s.ListSnapshots(
            pb.ListSnapshotsRequest(namespace=namespace, session=session), metadata=md, timeout=10
        ),
        "GetSavings": lambda md: s.GetSavings(
            pb.GetSavingsRequest(namespace=namespace), metadata=md, timeout=10
        ),
    }
    assert set(calls) == {m.name for m in SERVICE.methods}, "a new rpc needs a trust test"
    codes: dict[str, grpc.StatusCode] = {}
    for name, call in calls.items():
        try:
            call(metadata(key))
            codes[name] = grpc.StatusCode.OK
        except grpc.RpcError as exc:
            codes[name] = exc.code()
    return codes


# -- certificates ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Pki:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    rogue_cert: Path  # a client certificate from another CA
    rogue_key: Path


def make_pki(folder: Path) -> Pki:
    """A CA, a server certificate for 127.0.0.1/localhost, a client certificate, and a rogue one."""
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    folder.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.timezone.utc)

    def name(cn: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    def key() -> ec.EllipticCurvePrivateKey:
        return ec.generate_private_key(ec.SECP256R1())

    def ca(cn: str) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
        k = key()
        cert = (
            x509.CertificateBuilder()
            .subject_name(name(cn))
            .issuer_name(name(cn))
            .public_key(k.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(k, hashes.SHA256())
        )
        return k, cert

    def leaf(cn: str, issuer: tuple[ec.EllipticCurvePrivateKey, x509.Certificate], server: bool):
        k = key()
        builder = (
            x509.CertificateBuilder()
            .subject_name(name(cn))
            .issuer_name(issuer[1].subject)
            .public_key(k.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.ExtendedKeyUsage(
                    [ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH]
                ),
                critical=False,
            )
        )
        if server:
            builder = builder.add_extension(
                x509.SubjectAlternativeName(
                    [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
                ),
                critical=False,
            )
        return k, builder.sign(issuer[0], hashes.SHA256())

    def write(stem: str, pair: tuple[ec.EllipticCurvePrivateKey, x509.Certificate]) -> tuple[Path, Path]:
        cert_path, key_path = folder / f"{stem}.crt", folder / f"{stem}.key"
        cert_path.write_bytes(pair[1].public_bytes(serialization.Encoding.PEM))
        key_path.write_bytes(
            pair[0].private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
        )
        return cert_path, key_path

    root = ca("deltastore test CA")
    ca_path, _ = write("ca", root)
    server_cert, server_key = write("server", leaf("localhost", root, True))
    client_cert, client_key = write("client", leaf("worker-1", root, False))
    rogue_cert, rogue_key = write("rogue", leaf("worker-x", ca("rogue CA"), False))
    return Pki(ca_path, server_cert, server_key, client_cert, client_key, rogue_cert, rogue_key)


# -- subprocess servers ------------------------------------------------------------------------

_SERVING = re.compile(r"grpc=(\S+) http=(\S+)")


class ServeProcess:
    """``deltastore serve`` in a child process (SIGKILL-able, its RSS measurable)."""

    def __init__(self, data_dir: Path, *args: str, env: dict[str, str] | None = None) -> None:
        cmd = [
            sys.executable,
            "-m",
            "deltastore",
            "serve",
            "--data-dir",
            str(data_dir),
            "--grpc",
            "127.0.0.1:0",
            "--http",
            "127.0.0.1:0",
            "--grace-seconds",
            "1",
            "--log-level",
            "WARNING",
            *args,
        ]
        self.proc = subprocess.Popen(
            cmd,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, "DELTASTORE_BLOCK_SIZE": str(BLOCK), **(env or {})},
        )
        self.stderr: list[str] = []
        threading.Thread(target=self._drain_stderr, daemon=True).start()
        line = self.proc.stdout.readline() if self.proc.stdout else ""
        self.banner = line
        match = _SERVING.search(line)
        if match is None:
            self.proc.kill()
            self.proc.wait()
            raise RuntimeError(f"serve did not start: {line!r} {''.join(self.stderr)[-2000:]}")
        self.grpc = match.group(1)
        self.http = match.group(2)
        self.grpc_port = int(self.grpc.rpartition(":")[2])

    def _drain_stderr(self) -> None:
        for line in self.proc.stderr or ():
            self.stderr.append(line)

    def rss_bytes(self) -> int:
        """Resident set size of the server process, from /proc (Linux)."""
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise RuntimeError("no VmRSS")

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.kill()


def wait_healthy(channel: grpc.Channel, timeout: float = 30) -> None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    deadline = time.monotonic() + timeout
    health = health_pb2_grpc.HealthStub(channel)
    while True:
        try:
            if (
                health.Check(health_pb2.HealthCheckRequest(), timeout=2).status
                == health_pb2.HealthCheckResponse.SERVING
            ):
                return
        except grpc.RpcError:
            if time.monotonic() > deadline:
                raise
        time.sleep(0.05)


def chunks_of(items: Sequence[Any], n: int) -> Iterator[Sequence[Any]]:
    for i in range(0, len(items), n):
        yield items[i : i + n]


# Not protobuf: a truncated varint, a field with wire type 7 (none exists), a length past the end.
GARBAGE = [b"\x08\xff", b"\x0f\x01\x02", b"\x0a\xff\x7f" + b"x" * 3]


def send_garbage(port: int, metadata: Sequence[tuple[str, str]] = ()) -> int:
    """Raw bytes to every rpc, bypassing any client; asserts INVALID_ARGUMENT naming the rpc each
    time (never INTERNAL or UNKNOWN). Returns the number of calls made."""
    tried = 0
    with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
        for method in (m.name for m in SERVICE.methods):
            path = f"/deltastore.v1.DeltaStore/{method}"
            for data in GARBAGE:
                try:
                    if method == "PutSnapshot":
                        ch.stream_unary(path)(iter([data]), metadata=metadata, timeout=10)
                    elif method in ("GetSnapshot", "GetPrefix"):
                        list(ch.unary_stream(path)(data, metadata=metadata, timeout=10))
                    else:
                        ch.unary_unary(path)(data, metadata=metadata, timeout=10)
                except grpc.RpcError as exc:
                    assert exc.code() == grpc.StatusCode.INVALID_ARGUMENT, (method, exc.code(), exc.details())
                    assert method in exc.details() and "does not parse" in exc.details(), exc.details()
                else:
                    raise AssertionError(f"{method} accepted bytes that are not protobuf")
                tried += 1
    return tried
