"""Server settings: one frozen pydantic-settings model, read from flags, then ``DELTASTORE_*`` variables.

The environment is read by :meth:`deltastore.settings.Config.load` (the one module that reads
it). Precedence: command-line flag, then environment variable, then the default below. Every
field ``x`` answers to ``DELTASTORE_X`` and to the flag in its :class:`~deltastore.settings.Cli`
metadata; ``*_bytes`` fields take sizes (``64MiB``).
"""

from __future__ import annotations

import argparse
import ipaddress
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, model_validator

from deltastore.errors import InvalidArgument
from deltastore.settings import Cli, Config, Size, Switch, add_arguments

__all__ = ["ServerSettings", "add_setting_arguments", "is_loopback_address"]


class ServerSettings(Config):
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
        shm_dir: shared-memory directory for GetSnapshotShm and GetPrefixShm (a worker on the same
            host mounts it); "" disables both calls.
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

    data_dir: Annotated[Path, Cli("--data-dir", "folder of the embedded LMDB store")] = Path("./data")
    backend: Annotated[
        str,
        Cli(
            "--backend",
            "storage URL: lmdb:///path, redis://host:port, redis+cluster://h1:p1,h2:p2 (rediss for TLS); "
            "default lmdb://<data-dir>",
        ),
    ] = ""
    grpc_address: Annotated[str, Cli("--grpc", "gRPC address: host:port or unix:/path/to.sock")] = Field(
        default="127.0.0.1:50051", min_length=1
    )
    http_address: Annotated[str, Cli("--http", "ops HTTP address host:port ('' disables it)")] = (
        "127.0.0.1:8080"
    )
    max_snapshot_bytes: Annotated[
        Size, Cli("--max-snapshot-bytes", "largest payload total of one PutSnapshot (e.g. 1GiB)")
    ] = Field(default=1 << 30, gt=0)
    max_message_bytes: Annotated[Size, Cli("--max-message-bytes", "largest gRPC message (e.g. 8MiB)")] = (
        Field(default=8 << 20, gt=0)
    )
    max_tokens: Annotated[int, Cli("--max-tokens", "largest token count of one snapshot")] = Field(
        default=1 << 20, gt=0
    )
    max_logical_bytes: Annotated[
        Size,
        Cli(
            "--max-logical-bytes",
            "largest FP16 size of one snapshot's KV as declared by its payloads (e.g. 64GiB)",
        ),
    ] = Field(default=1 << 36, gt=0)
    max_inflight_bytes: Annotated[
        Size,
        Cli(
            "--max-inflight-bytes",
            "most payload bytes of one namespace's puts held in memory at once (e.g. 2GiB)",
        ),
    ] = Field(default=2 << 30, gt=0)
    chunk_bytes: Annotated[Size, Cli("--chunk-bytes", "payload bytes per streamed chunk (e.g. 1MiB)")] = (
        Field(default=1 << 20, gt=0)
    )
    workers: Annotated[int, Cli("--workers", "gRPC handler threads")] = Field(default=16, gt=0)
    grace_seconds: Annotated[
        float, Cli("--grace-seconds", "SIGTERM: seconds to let in-flight RPCs finish")
    ] = Field(default=10.0, ge=0)
    stall_seconds: Annotated[
        float, Cli("--stall-seconds", "cancel a streaming call idle this long (seconds)")
    ] = Field(default=30.0, gt=0)
    min_rate_bytes: Annotated[
        Size,
        Cli(
            "--min-rate-bytes",
            "cancel a streaming call averaging fewer bytes/s past its first --stall-seconds (0 = off)",
        ),
    ] = Field(default=16 << 10, ge=0)
    max_streams_per_caller: Annotated[
        int,
        Cli(
            "--max-streams-per-caller",
            "streaming calls one API key may have open at once (0 = half of --workers)",
        ),
    ] = Field(default=0, ge=0)
    max_watches: Annotated[int, Cli("--max-watches", "concurrent grpc.health.v1.Health/Watch streams")] = (
        Field(default=8, ge=0)
    )
    auth_file: Annotated[str, Cli("--auth-file", "API keys -> tenants (JSON/TOML); '' = no auth")] = ""
    tls_cert: Annotated[str, Cli("--tls-cert", "PEM server certificate (TLS on both listeners)")] = ""
    tls_key: Annotated[str, Cli("--tls-key", "PEM server private key")] = ""
    tls_client_ca: Annotated[str, Cli("--tls-client-ca", "PEM CA required of client certificates (mTLS)")] = (
        ""
    )
    shm_dir: Annotated[
        str,
        Cli(
            "--shm-dir",
            "shared-memory directory for GetSnapshotShm and GetPrefixShm, e.g. /dev/shm/deltastore ('' = off)",
        ),
    ] = ""
    shm_max_bytes: Annotated[
        Size, Cli("--shm-max-bytes", "most bytes of unclaimed snapshot files in --shm-dir (e.g. 2GiB)")
    ] = Field(default=2 << 30, gt=0)
    shm_peers: Annotated[
        Literal["unix", "loopback"],
        Cli(
            "--shm-peers",
            "who may use --shm-dir: 'unix' (callers on a unix socket) or 'loopback' (also TCP loopback)",
        ),
    ] = "unix"
    shm_mode: Annotated[
        Literal["file", "memfd"],
        Cli(
            "--shm-mode",
            "'file' (an export file per get) or 'memfd' (sealed memory handed to the caller only)",
        ),
    ] = "file"
    insecure: Annotated[
        Switch,
        Cli(
            "--insecure", "allow listening beyond loopback without --auth-file (every caller is every tenant)"
        ),
    ] = False

    @model_validator(mode="after")
    def _room_for_framing(self) -> ServerSettings:
        if self.chunk_bytes + (64 << 10) > self.max_message_bytes:
            raise InvalidArgument(
                f"chunk_bytes {self.chunk_bytes} leaves no room for framing under max_message_bytes "
                f"{self.max_message_bytes}"
            )
        return self

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
    add_arguments(parser, ServerSettings)
