"""Optional TLS and mutual TLS for both listeners, from PEM files.

``--tls-cert`` and ``--tls-key`` turn TLS on for gRPC and the ops HTTP API; ``--tls-client-ca``
also requires every client to present a certificate signed by that CA (mTLS). API keys still
name the tenant: mTLS proves the caller is a machine the operator enrolled, the key which tenant
it acts for. A unix socket stays plaintext (its file permissions are the boundary).
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from deltastore.errors import InvalidArgument

__all__ = ["TlsFiles"]


@dataclass(frozen=True)
class TlsFiles:
    """PEM files of the server's identity and, for mTLS, the CA its clients' certificates chain to."""

    cert: Path
    key: Path
    client_ca: Path | None = None

    @classmethod
    def from_paths(cls, cert: str, key: str, client_ca: str) -> TlsFiles | None:
        """None when TLS is off (no cert and no key); InvalidArgument for a half configuration."""
        if not cert and not key:
            if client_ca:
                raise InvalidArgument("--tls-client-ca needs --tls-cert and --tls-key")
            return None
        if not (cert and key):
            raise InvalidArgument("TLS needs both --tls-cert and --tls-key")
        files = cls(Path(cert), Path(key), Path(client_ca) if client_ca else None)
        for path in (files.cert, files.key, files.client_ca):
            if path is not None and not path.is_file():
                raise InvalidArgument(f"TLS file {path} does not exist")
        return files

    def grpc_credentials(self) -> grpc.ServerCredentials:
        ca = self.client_ca.read_bytes() if self.client_ca else None
        return grpc.ssl_server_credentials(
            [(self.key.read_bytes(), self.cert.read_bytes())],
            root_certificates=ca,
            require_client_auth=ca is not None,
        )

    def uvicorn_options(self) -> dict[str, Any]:
        """Keyword arguments of ``uvicorn.Config`` for the same identity and client policy."""
        options: dict[str, Any] = {"ssl_certfile": str(self.cert), "ssl_keyfile": str(self.key)}
        if self.client_ca is not None:
            options.update(ssl_ca_certs=str(self.client_ca), ssl_cert_reqs=ssl.CERT_REQUIRED)
        return options
