"""Server settings: one frozen dataclass, read from flags, then ``DELTASTORE_*`` variables.

This is the only place the server reads the environment. Precedence: command-line flag, then
environment variable, then the default below.
"""

from __future__ import annotations

import argparse
import dataclasses
import ipaddress
import os
import re
from collections.abc import Mapping
from pathlib import Path

from deltastore.errors import InvalidArgument

__all__ = ["ServerSettings", "add_setting_arguments", "is_loopback_address", "parse_size"]

_SIZE = re.compile(r"^\s*(\d+)\s*([kmgt]i?b?|b)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def parse_size(text: str | int) -> int:
    """Bytes from ``"1048576"``, ``"64MiB"``, ``"1G"`` (binary units: K = 1024)."""
    if isinstance(text, int):
        return text
    match = _SIZE.match(text)
    if match is None:
        raise InvalidArgument(f"not a size: {text!r}", hint="use a byte count or a unit: 512KiB, 64MiB, 2GiB")
    return int(match.group(1)) * _UNITS[(match.group(2) or "")[:1].lower()]


@dataclasses.dataclass(frozen=True)
class ServerSettings:
    """Everything the ``serve`` process is configured by.

    Attributes:
        data_dir: folder of the embedded LMDB store.
        backend: storage URL; "" means ``lmdb://<data_dir>`` (see ``deltastore.backends.open_backend``).
        grpc_address: ``host:port`` or ``unix:/path/to.sock`` (sidecars sharing a volume).
        http_address: ``host:port`` of the ops HTTP API; "" disables it.
        max_snapshot_bytes: largest sum of payload bytes one PutSnapshot may carry.
        max_message_bytes: largest single gRPC message either way (chunks are ~1 MiB).
        max_tokens: largest token count of one snapshot.
        max_inflight_bytes: most bytes of PutSnapshot payloads one namespace may have in the
            server's memory at once (its concurrent puts together); RESOURCE_EXHAUSTED beyond.
        max_logical_bytes: largest FP16 size of one snapshot's KV, as its payload headers declare
            it (tokens x layers x kv heads x head dim x 4); bounds forged headers.
        chunk_bytes: payload bytes per streamed chunk.
        workers: gRPC handler threads (concurrent RPCs).
        grace_seconds: how long SIGTERM waits for in-flight RPCs before cancelling them.
        stall_seconds: a streaming call with no message either way for this long is cancelled.
        min_rate_bytes: past its first ``stall_seconds``, a streaming call moving fewer bytes per
            second on average is cancelled (a slow reader or writer must not hold a thread).
        max_streams_per_caller: streaming calls one API key may have open at once (auth on);
            0 means half the worker threads.
        max_watches: concurrent ``grpc.health.v1.Health/Watch`` streams (open to anyone).
        auth_file: API keys -> tenants, roles and namespaces (see ``deltastore.server.auth``);
            "" leaves the service open (loopback sidecars, first runs).
        tls_cert, tls_key: PEM server certificate and key; both "" means plaintext.
        tls_client_ca: PEM CA that client certificates must chain to (mTLS); "" means none asked.
        shm_dir: shared-memory directory for GetSnapshotShm (a worker on the same host mounts
            it); "" disables the call.
        shm_max_bytes: most bytes of snapshot files in ``shm_dir`` not yet claimed by a worker.
        shm_mode: ``file`` (default: each export a 0600 file in ``shm_dir``) or ``memfd`` (a
            sealed anonymous memory file handed over a unix socket in ``shm_dir`` to the one caller
            holding its one-time token: nothing another process of the same user could open).
        shm_peers: who may ask for shared memory: ``unix`` (default: callers on the unix socket
            only; a TCP peer that looks local may be a remote caller behind a local proxy) or
            ``loopback`` (also TCP callers from 127.0.0.0/8 and ::1, an explicit choice).
        insecure: allow listening beyond loopback without an auth file (anyone who reaches the
            port reads and deletes every tenant's KV); off, such a start is refused.
    """

    data_dir: Path = Path("./data")
    backend: str = ""
    grpc_address: str = "127.0.0.1:50051"
    http_address: str = "127.0.0.1:8080"
    max_snapshot_bytes: int = 1 << 30
    max_message_bytes: int = 8 << 20
    max_tokens: int = 1 << 20
    max_logical_bytes: int = 1 << 36
    max_inflight_bytes: int = 2 << 30
    chunk_bytes: int = 1 << 20
    workers: int = 16
    grace_seconds: float = 10.0
    stall_seconds: float = 30.0
    min_rate_bytes: int = 16 << 10
    max_streams_per_caller: int = 0
    max_watches: int = 8
    auth_file: str = ""
    tls_cert: str = ""
    tls_key: str = ""
    tls_client_ca: str = ""
    shm_dir: str = ""
    shm_max_bytes: int = 2 << 30
    shm_peers: str = "unix"
    shm_mode: str = "file"
    insecure: bool = False

    def __post_init__(self) -> None:
        for name in (
            "max_snapshot_bytes",
            "max_message_bytes",
            "max_tokens",
            "max_logical_bytes",
            "max_inflight_bytes",
            "chunk_bytes",
            "workers",
            "shm_max_bytes",
        ):
            if getattr(self, name) <= 0:
                raise InvalidArgument(f"{name} must be positive, got {getattr(self, name)}")
        if self.chunk_bytes + (64 << 10) > self.max_message_bytes:
            raise InvalidArgument(
                f"chunk_bytes {self.chunk_bytes} leaves no room for framing under max_message_bytes "
                f"{self.max_message_bytes}"
            )
        if self.min_rate_bytes < 0 or self.max_streams_per_caller < 0 or self.max_watches < 0:
            raise InvalidArgument("min_rate_bytes, max_streams_per_caller and max_watches must be >= 0")
        if self.stall_seconds <= 0:
            raise InvalidArgument(f"stall_seconds must be positive, got {self.stall_seconds}")
        if self.grace_seconds < 0:
            raise InvalidArgument(f"grace_seconds must be >= 0, got {self.grace_seconds}")
        if not self.grpc_address:
            raise InvalidArgument("a gRPC address is required")
        if self.shm_mode not in ("file", "memfd"):
            raise InvalidArgument(f"shm_mode must be 'file' or 'memfd', got {self.shm_mode!r}")
        if self.shm_peers not in ("unix", "loopback"):
            raise InvalidArgument(f"shm_peers must be 'unix' or 'loopback', got {self.shm_peers!r}")

    def check_exposure(self) -> None:
        """Refuse a listener beyond loopback (or a unix socket) without an auth file, unless insecure.

        Without keys every caller is every tenant: it reads token ids and KV, deletes sessions and
        lists namespaces. Secure by default: such a start is an error naming the way out.
        """
        if self.auth_file or self.insecure:
            return
        exposed = [a for a in (self.grpc_address, self.http_address) if a and not is_loopback_address(a)]
        if exposed:
            raise InvalidArgument(
                f"refusing to listen on {', '.join(exposed)} without an auth file: every caller would "
                "read and delete every tenant's data",
                hint="give --auth-file (DELTASTORE_AUTH_FILE), listen on 127.0.0.1 or unix:/path.sock, "
                "or pass --insecure (DELTASTORE_INSECURE=1) to accept it",
            )

    @property
    def backend_url(self) -> str:
        """The storage URL in effect."""
        return self.backend or f"lmdb://{self.data_dir.resolve()}"

    @classmethod
    def load(
        cls, args: argparse.Namespace | None = None, environ: Mapping[str, str] | None = None
    ) -> ServerSettings:
        """Build settings from parsed flags (None where not given) over ``DELTASTORE_*`` variables."""
        env = os.environ if environ is None else environ
        values: dict[str, object] = {}
        for field in dataclasses.fields(cls):
            raw = getattr(args, field.name, None) if args is not None else None
            if raw is None:
                raw = env.get(f"DELTASTORE_{field.name.upper()}")
            if raw is None:
                continue
            values[field.name] = _convert(field.name, field.type, raw)
        return cls(**values)  # type: ignore[arg-type]


def _convert(name: str, type_name: object, raw: object) -> object:
    """Coerce a flag or environment string to the field's type."""
    text = str(raw)
    try:
        if type_name in ("int", int):
            return parse_size(text) if name.endswith("_bytes") else int(text)
        if type_name in ("float", float):
            return float(text)
        if type_name in ("Path", Path):
            return Path(text)
        if type_name in ("bool", bool):
            return _flag(text)
    except ValueError as exc:
        raise InvalidArgument(f"{name}: cannot read {text!r}: {exc}") from None
    return text


def _flag(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("", "0", "false", "no", "off"):
        return False
    raise ValueError("not a boolean (use 1/0, true/false, yes/no, on/off)")


def is_loopback_address(address: str) -> bool:
    """Does a listen address (``host:port``, ``[v6]:port``, ``unix:/path``) stay on this host?"""
    if address.startswith("unix:"):
        return True
    host = address.rpartition(":")[0].strip("[]")
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # "", a hostname other than localhost, or 0.0.0.0-style wildcards spelled oddly
        return False


def add_setting_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags for every setting; defaults are None so the environment can fill them."""
    defaults = ServerSettings()
    flags = {
        "data_dir": ("--data-dir", "folder of the embedded LMDB store"),
        "backend": (
            "--backend",
            "storage URL: lmdb:///path, redis://host:port, redis+cluster://h1:p1,h2:p2 (rediss for TLS); "
            "default lmdb://<data-dir>",
        ),
        "grpc_address": ("--grpc", "gRPC address: host:port or unix:/path/to.sock"),
        "http_address": ("--http", "ops HTTP address host:port ('' disables it)"),
        "max_snapshot_bytes": (
            "--max-snapshot-bytes",
            "largest payload total of one PutSnapshot (e.g. 1GiB)",
        ),
        "max_message_bytes": ("--max-message-bytes", "largest gRPC message (e.g. 8MiB)"),
        "max_tokens": ("--max-tokens", "largest token count of one snapshot"),
        "max_inflight_bytes": (
            "--max-inflight-bytes",
            "most payload bytes of one namespace's puts held in memory at once (e.g. 2GiB)",
        ),
        "max_logical_bytes": (
            "--max-logical-bytes",
            "largest FP16 size of one snapshot's KV as declared by its payloads (e.g. 64GiB)",
        ),
        "chunk_bytes": ("--chunk-bytes", "payload bytes per streamed chunk (e.g. 1MiB)"),
        "workers": ("--workers", "gRPC handler threads"),
        "grace_seconds": ("--grace-seconds", "SIGTERM: seconds to let in-flight RPCs finish"),
        "stall_seconds": ("--stall-seconds", "cancel a streaming call idle this long (seconds)"),
        "min_rate_bytes": (
            "--min-rate-bytes",
            "cancel a streaming call averaging fewer bytes/s past its first --stall-seconds (0 = off)",
        ),
        "max_streams_per_caller": (
            "--max-streams-per-caller",
            "streaming calls one API key may have open at once (0 = half of --workers)",
        ),
        "max_watches": ("--max-watches", "concurrent grpc.health.v1.Health/Watch streams"),
        "auth_file": ("--auth-file", "API keys -> tenants (JSON/TOML); '' = no auth"),
        "tls_cert": ("--tls-cert", "PEM server certificate (TLS on both listeners)"),
        "tls_key": ("--tls-key", "PEM server private key"),
        "tls_client_ca": ("--tls-client-ca", "PEM CA required of client certificates (mTLS)"),
        "shm_max_bytes": (
            "--shm-max-bytes",
            "most bytes of unclaimed snapshot files in --shm-dir (e.g. 2GiB)",
        ),
        "shm_dir": (
            "--shm-dir",
            "shared-memory directory for GetSnapshotShm, e.g. /dev/shm/deltastore ('' = off)",
        ),
        "shm_mode": (
            "--shm-mode",
            "'file' (an export file per get) or 'memfd' (sealed memory handed to the caller only)",
        ),
        "shm_peers": (
            "--shm-peers",
            "who may use --shm-dir: 'unix' (callers on a unix socket) or 'loopback' (also TCP loopback)",
        ),
        "insecure": (
            "--insecure",
            "allow listening beyond loopback without --auth-file (every caller is every tenant)",
        ),
    }
    for field in dataclasses.fields(ServerSettings):
        flag, help_ = flags[field.name]
        env = f"DELTASTORE_{field.name.upper()}"
        if field.type in ("bool", bool):
            parser.add_argument(
                flag,
                dest=field.name,
                default=None,
                action="store_const",
                const="1",
                help=f"{help_} [env {env}]",
            )
            continue
        parser.add_argument(
            flag,
            dest=field.name,
            default=None,
            metavar=field.name.split("_")[0].upper() if field.name != "data_dir" else "DIR",
            help=f"{help_} [env {env}; default {getattr(defaults, field.name)!s}]",
        )
