"""API-key authentication and tenant isolation for the gRPC service and the ops HTTP API.

Off unless an auth file is configured (``--auth-file`` / ``DELTASTORE_AUTH_FILE``), so a first
``make serve`` works as before. The file (JSON, or TOML when it ends in ``.toml``)::

    {
      "keys": {
        "sha256:<64 hex digits of sha256(key)>": {"tenant": "acme"},
        "a-raw-key-of-at-least-16-chars": {"role": "ops"}
      },
      "tenants": {
        "acme": {"namespaces": ["acme", "acme-eval"], "shared": {"public": "read"}},
        "platform": {"namespaces": [], "shared": {"public": "write"}}
      },
      "shared_namespaces": ["public"],
      "cross_tenant_dedup_groups": []
    }

Rules, and why:

- A key is presented as ``authorization: Bearer <key>`` (or ``x-api-key: <key>``) in gRPC
  metadata or HTTP headers. Keys are kept only as SHA-256 digests and compared with
  :func:`hmac.compare_digest` against every configured digest (no early exit), so neither the
  comparison nor the lookup time depends on how much of a key matched. Keys are never logged.
- Roles: ``tenant`` keys use their tenant's namespaces through every call; ``ops`` keys may only
  read savings (``GetSavings``, ``/v1/savings``, the savings page) and ``/metrics``.
- Every namespace belongs to at most one tenant (default: the namespace named like the tenant).
  ``""`` and ``"default"`` mean the caller's home namespace (its first), so existing clients keep
  working and two tenants' "default" never meet.
- A namespace outside the caller's grants answers PERMISSION_DENIED, decided from this file alone
  before the store is touched: the answer is the same whether that namespace exists, is empty or
  holds data, so it cannot be used to infer anything (NOT_FOUND would have to consult the store
  to be consistent with real absences, and a store lookup is what leaks).
- Sharing is explicit opt-in twice: the operator lists the namespace in ``shared_namespaces`` and
  each tenant that uses it names it under ``shared`` with ``"read"`` (plan, get, lookup, list,
  savings) or ``"write"`` (also put and delete). Writers of a shared namespace can place KV under a
  prefix others will reuse, so grant ``write`` to the party that owns the shared prompt only.
- Dedup across namespaces (``DELTASTORE_SHARED_NAMESPACES``) is a side channel: a plan's
  ``present`` flags and ``LookupPrefix`` reveal what the other namespaces stored. The server
  refuses to start when a dedup group spans namespaces of different owners, unless the group is
  listed in ``cross_tenant_dedup_groups``.

The file's schema is ``server/auth_file.py``; the principal a key stands for, and how handlers
resolve a request's namespace from it, ``server/principal.py``. Here: the policy the file builds
and its two enforcement points, the gRPC handler layer and the ASGI middleware.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
from collections.abc import Awaitable, Callable, Iterable, Mapping, MutableMapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from deltastore.errors import AuthError, DeltaStoreError, InvalidArgument, NotFound, PermissionDenied
from deltastore.manifest import check_name
from deltastore.server.auth_file import DIGEST, AuthFile, Identity, parse_auth_file, read_auth_file
from deltastore.server.handlers import Handler
from deltastore.server.principal import HOME_ALIASES, Access, Principal, Role, acting_as, run_as
from deltastore.server.status import error_body, grpc_code, http_status
from deltastore.v1.protocol import ERROR_TYPE_KEY

__all__ = ["AuthLayer", "AuthPolicy", "HttpAuth", "load_auth_file", "presented_key"]

log = logging.getLogger(__name__)

MIN_KEY_CHARS = 16
_SERVICE = "/deltastore.v1.DeltaStore/"
_OPEN_GRPC_PREFIXES = ("/grpc.health.v1.Health/",)
OPS_METHODS = frozenset({"GetSavings"})
"""The one DeltaStore call ops keys may make."""


@dataclass(frozen=True)
class _Key:
    digest: bytes
    principal: Principal


class AuthPolicy:
    """Keys, tenants and grants, checked once at load; see the module docstring for the file."""

    def __init__(self, raw: Mapping[str, Any] | AuthFile, *, source: str = "auth config") -> None:
        self.source = source
        file = raw if isinstance(raw, AuthFile) else parse_auth_file(raw, source)
        self.shared = frozenset(file.shared_namespaces)
        self.cross_tenant_groups = frozenset(file.cross_tenant_dedup_groups)
        self.owner: dict[str, str] = {}  # exclusive namespace -> tenant
        self._tenants: dict[str, Principal] = {}
        named = {i.tenant for i in (*file.keys.values(), *file.certs.values()) if i.tenant}
        for tenant in sorted(set(file.tenants) | named):
            check_name("tenant", tenant)
            entry = file.tenants.get(tenant)
            own = [tenant] if entry is None or entry.namespaces is None else entry.namespaces
            self._tenants[tenant] = self._tenant(tenant, own, entry.shared if entry else {})
        self._keys: list[_Key] = []
        for key_text, identity in file.keys.items():
            digest = _digest(key_text, source)
            if any(hmac.compare_digest(digest, k.digest) for k in self._keys):
                raise InvalidArgument(f"{source}: the same key is configured twice")
            self._keys.append(_Key(digest, self._principal(identity)))
        # mTLS: a client certificate's subject common name -> a tenant (or the ops role).
        self.certs: dict[str, Principal] = {cn: self._principal(i) for cn, i in file.certs.items()}

    def _principal(self, identity: Identity) -> Principal:
        if identity.role is Role.OPS:
            return Principal(identity.tenant or "ops", Role.OPS, None, {})
        return self._tenants[str(identity.tenant)]

    def replace_with(self, other: AuthPolicy) -> None:
        """Take over another policy's keys, tenants and grants (a reloaded auth file), in place.

        The gRPC layer and the HTTP middleware hold this object, so both switch at once;
        each lookup reads one attribute (the key list, the owner map), never a half-updated one.
        """
        self.__dict__.update(other.__dict__)

    def _tenant(self, tenant: str, own: list[str], shared: Mapping[str, Access]) -> Principal:
        source = self.source
        grants: dict[str, Access] = {}
        for ns in own:
            if ns in self.shared or ns in self.owner:
                other = "a shared namespace" if ns in self.shared else f"tenant {self.owner[ns]!r}'s"
                raise InvalidArgument(f"{source}: tenant {tenant!r} claims namespace {ns!r}, already {other}")
            if ns in HOME_ALIASES:
                raise InvalidArgument(
                    f"{source}: 'default' names the caller's home namespace; pick another name"
                )
            self.owner[ns] = tenant
            grants[ns] = Access.WRITE
        for ns, access in shared.items():
            if ns not in self.shared:
                raise InvalidArgument(
                    f"{source}: tenant {tenant!r} joins {ns!r}, which is not in shared_namespaces",
                    hint="sharing is opt-in: list the namespace in shared_namespaces first",
                )
            grants[ns] = access
        return Principal(tenant, Role.TENANT, own[0] if own else None, grants)

    def authenticate(self, presented: str | None) -> Principal:
        """The principal of a presented key; AuthError if missing or unknown (constant time)."""
        if not presented:
            raise AuthError("missing API key", hint="send 'authorization: Bearer <key>'")
        digest = hashlib.sha256(presented.encode("utf-8", "surrogateescape")).digest()
        found: Principal | None = None
        for entry in self._keys:  # every entry, no early exit
            if hmac.compare_digest(digest, entry.digest):
                found = entry.principal
        if found is None:
            raise AuthError("unknown API key")
        return found

    def authenticate_cert(self, common_name: str | None) -> Principal:
        """The principal of a verified client certificate's common name (mTLS); AuthError if unmapped."""
        found = self.certs.get(common_name or "")
        if found is None:
            raise AuthError(
                "no API key, and the client certificate maps to no tenant",
                hint="send 'authorization: Bearer <key>', or list the certificate's CN under 'certs'",
            )
        return found

    def check_dedup_groups(self, groups: Mapping[str, str]) -> None:
        """Refuse dedup groups that let one owner's namespaces probe another's (see module doc)."""
        owners: dict[str, set[str]] = {}
        for ns, group in groups.items():
            owner = self.owner.get(ns) or (f"shared namespace {ns!r}" if ns in self.shared else None)
            if owner is not None:
                owners.setdefault(group, set()).add(owner)
        for group, who in sorted(owners.items()):
            if len(who) > 1 and group not in self.cross_tenant_groups:
                raise InvalidArgument(
                    f"dedup group {group!r} spans {sorted(who)}: they could infer each other's prompts",
                    hint=f"split the group, or opt in by listing it in cross_tenant_dedup_groups of {self.source}",
                )


def load_auth_file(path: str | Path) -> AuthPolicy:
    """The policy of an auth file (JSON, or TOML for ``*.toml``; see ``server/auth_file.py``)."""
    return AuthPolicy(read_auth_file(path), source=str(path))


def _digest(key_text: str, source: str) -> bytes:
    match = DIGEST.match(key_text)
    if match:
        return bytes.fromhex(match.group(1))
    if len(key_text) < MIN_KEY_CHARS:
        raise InvalidArgument(
            f"{source}: a raw key is shorter than {MIN_KEY_CHARS} characters",
            hint="use a random key (e.g. `python -c 'import secrets; print(secrets.token_urlsafe(32))'`)",
        )
    return hashlib.sha256(key_text.encode()).digest()


def presented_key(headers: Iterable[tuple[str, str | bytes]]) -> str | None:
    """The key in ``authorization: Bearer <key>`` or ``x-api-key`` (header names lower case)."""
    bearer = api_key = None
    for name, value in headers:
        text = value.decode("latin-1") if isinstance(value, bytes) else value
        if name == "authorization":
            scheme, _, rest = text.strip().partition(" ")
            bearer = rest.strip() if scheme.lower() == "bearer" else ""
        elif name == "x-api-key":
            api_key = text.strip()
    return bearer if bearer is not None else api_key


# -- gRPC --------------------------------------------------------------------------------------


class AuthLayer:
    """Authenticate every call but health checks and hand its principal to the handler.

    A :data:`~deltastore.server.handlers.Layer`. The caller is resolved once per call (API key,
    or the verified client certificate when no key is sent) and the handler runs as it
    (:func:`deltastore.server.principal.run_as`); DeltaStore handlers then resolve and check the
    namespace of the request themselves. Ops keys reach only ``GetSavings`` of the DeltaStore
    service; reflection takes any valid key.
    """

    def __init__(self, policy: AuthPolicy) -> None:
        self.policy = policy

    def __call__(self, handler: Handler) -> Handler:
        if handler.method.startswith(_OPEN_GRPC_PREFIXES):
            return handler
        method = handler.method

        def authenticated(request: Any, context: grpc.ServicerContext) -> Any:
            try:
                principal = self._principal(method, context)
            except DeltaStoreError as exc:
                log.info("%s from %s refused: %s", method, context.peer(), exc.message)
                context.set_trailing_metadata(((ERROR_TYPE_KEY, type(exc).__name__),))
                context.abort(grpc_code(exc), str(exc))
            return run_as(principal, handler.behavior, handler.response_streaming)(request, context)

        return handler.replace(behavior=authenticated)

    def _principal(self, method: str, context: grpc.ServicerContext) -> Principal:
        presented = presented_key((m.key, m.value) for m in context.invocation_metadata() or ())
        if presented is None and self.policy.certs:
            names = (context.auth_context() or {}).get("x509_common_name") or []
            principal = self.policy.authenticate_cert(names[0].decode() if names else None)
        else:
            principal = self.policy.authenticate(presented)
        name = method[len(_SERVICE) :]
        if method.startswith(_SERVICE) and principal.role is Role.OPS and name not in OPS_METHODS:
            raise PermissionDenied("ops keys may only read savings and metrics")
        return principal


# -- HTTP --------------------------------------------------------------------------------------

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

OPEN_PATHS = frozenset({"/healthz", "/readyz"})
OPS_PATHS = frozenset({"/", "/metrics", "/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json"})
SAVINGS_PATH = "/v1/savings"
SESSIONS_PREFIX = "/v1/sessions/"


class HttpAuth:
    """ASGI middleware in front of the ops app: the same keys, roles and namespaces as gRPC.

    Default deny: a path not listed here answers 404 after authentication, so a route added to the
    app stays unreachable until its policy is written down here.
    """

    def __init__(self, app: ASGIApp, policy: AuthPolicy) -> None:
        self.app = app
        self.policy = policy

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in OPEN_PATHS:
            await self.app(scope, receive, send)
            return
        path: str = scope["path"]
        headers = [(k.decode("latin-1").lower(), v) for k, v in scope.get("headers", [])]
        try:
            principal = self.policy.authenticate(presented_key(headers))
            if path in OPS_PATHS or (path == SAVINGS_PATH and principal.role is Role.OPS):
                if principal.role is not Role.OPS:
                    raise PermissionDenied(f"{path} is for ops keys")
            elif not (path == SAVINGS_PATH or (path.startswith(SESSIONS_PREFIX) and path.count("/") == 3)):
                raise NotFound(f"no route {path}")
        except DeltaStoreError as exc:
            await _json_error(send, exc)
            return
        # The routes resolve their namespace from the principal (deltastore.server.principal),
        # as the gRPC handlers do; the request itself is passed on as the caller sent it.
        with acting_as(principal):
            await self.app(scope, receive, send)


async def _json_error(send: Send, exc: DeltaStoreError) -> None:
    body = json.dumps(error_body(exc)).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if isinstance(exc, AuthError):
        headers.append((b"www-authenticate", b'Bearer realm="deltastore"'))
    await send({"type": "http.response.start", "status": http_status(exc), "headers": headers})
    await send({"type": "http.response.body", "body": body})
