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

Why one long module: the auth file's schema, the policy it builds and its two enforcement
points (gRPC interceptor, ASGI middleware) change together; splitting policy from enforcement
is listed as next structure work.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import re
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping, MutableMapping
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlencode

import grpc
from google.protobuf.message import Message

from deltastore.errors import AuthError, DeltaStoreError, InvalidArgument, NotFound, PermissionDenied
from deltastore.manifest import check_name
from deltastore.server.malformed import Malformed
from deltastore.server.status import error_body, grpc_code, http_status
from deltastore.v1.protocol import ERROR_TYPE_KEY

__all__ = [
    "AuthInterceptor",
    "AuthPolicy",
    "HttpAuth",
    "Principal",
    "Role",
    "load_auth_file",
]

log = logging.getLogger(__name__)

MIN_KEY_CHARS = 16
_DIGEST = re.compile(r"^sha256:([0-9a-f]{64})$")
_HOME_ALIASES = ("", "default")
_SERVICE = "/deltastore.v1.DeltaStore/"
_OPEN_GRPC_PREFIXES = ("/grpc.health.v1.Health/",)


class Role(str, Enum):
    TENANT = "tenant"
    OPS = "ops"


class Access(str, Enum):
    READ = "read"
    WRITE = "write"


# gRPC method -> the access it needs to its namespace. GetSavings is the one call ops may make.
METHOD_ACCESS: dict[str, Access] = {
    "PlanSnapshot": Access.READ,
    "PutSnapshot": Access.WRITE,
    "GetSnapshot": Access.READ,
    "GetSnapshotShm": Access.READ,
    "LookupPrefix": Access.READ,
    "GetPrefix": Access.READ,
    "HasBlocks": Access.READ,
    "DeleteSnapshot": Access.WRITE,
    "DeleteSession": Access.WRITE,
    "ListSnapshots": Access.READ,
    "GetSavings": Access.READ,
}
OPS_METHODS = frozenset({"GetSavings"})


@dataclass(frozen=True)
class Principal:
    """Who a key belongs to and what it may touch.

    Attributes:
        tenant: tenant name (``"ops"`` for ops keys without one); shown in logs, never the key.
        role: tenant or ops.
        home: namespace that ``""`` / ``"default"`` resolve to (None: the tenant has none).
        grants: namespace -> access (exclusive namespaces are ``write``).
    """

    tenant: str
    role: Role
    home: str | None
    grants: Mapping[str, Access]

    def namespace_for(self, requested: str, access: Access) -> str:
        """The namespace a tenant's request acts in, or PermissionDenied (decided without the store)."""
        if self.role is Role.OPS:
            raise PermissionDenied("ops keys may only read savings and metrics")
        if requested in _HOME_ALIASES:
            if self.home is None:
                raise PermissionDenied(f"tenant {self.tenant!r} has no home namespace; name one")
            return self.home
        granted = self.grants.get(requested)
        if granted is None or (access is Access.WRITE and granted is not Access.WRITE):
            verb = "write to" if granted is not None else "use"
            raise PermissionDenied(f"tenant {self.tenant!r} may not {verb} namespace {requested!r}")
        return requested


@dataclass(frozen=True)
class _Key:
    digest: bytes
    principal: Principal


class AuthPolicy:
    """Keys, tenants and grants, checked once at load; see the module docstring for the file."""

    def __init__(self, raw: Mapping[str, Any], *, source: str = "auth config") -> None:
        self.source = source
        shared = _names(raw.get("shared_namespaces", []), "shared_namespaces", source)
        self.shared = frozenset(shared)
        tenants_raw = _mapping(raw.get("tenants", {}), "tenants", source)
        keys_raw = _mapping(raw.get("keys", {}), "keys", source)
        if not keys_raw:
            raise InvalidArgument(
                f"{source}: no keys configured", hint="add at least one key, or drop the file"
            )
        self.cross_tenant_groups = frozenset(
            _names(raw.get("cross_tenant_dedup_groups", []), "cross_tenant_dedup_groups", source)
        )
        unknown = set(raw) - {"keys", "certs", "tenants", "shared_namespaces", "cross_tenant_dedup_groups"}
        if unknown:
            raise InvalidArgument(f"{source}: unknown top-level entries {sorted(unknown)}")

        self.owner: dict[str, str] = {}  # exclusive namespace -> tenant
        self._tenants: dict[str, Principal] = {}
        certs_raw = _mapping(raw.get("certs", {}), "certs", source)
        named = {
            str(v.get("tenant"))
            for v in (*keys_raw.values(), *certs_raw.values())
            if isinstance(v, Mapping) and v.get("tenant")
        }
        for tenant in sorted(set(tenants_raw) | named):
            check_name("tenant", tenant)
            self._tenants[tenant] = self._tenant(tenant, tenants_raw.get(tenant, {}), shared, source)

        self._keys: list[_Key] = []
        for key_text, entry in keys_raw.items():
            entry = _mapping(entry, "key entry", source)
            try:
                role = Role(entry.get("role", "tenant"))
            except ValueError:
                raise InvalidArgument(
                    f"{source}: role must be 'tenant' or 'ops', got {entry.get('role')!r}"
                ) from None
            owner = entry.get("tenant")
            if role is Role.TENANT:
                if not owner:
                    raise InvalidArgument(f"{source}: a tenant key needs a 'tenant'")
                principal = self._tenants[str(owner)]
            else:
                principal = Principal(str(owner or "ops"), Role.OPS, None, {})
            digest = _digest(str(key_text), source)
            if any(hmac.compare_digest(digest, k.digest) for k in self._keys):
                raise InvalidArgument(f"{source}: the same key is configured twice")
            self._keys.append(_Key(digest, principal))
        # mTLS: a client certificate's subject common name -> a tenant (or the ops role).
        self.certs: dict[str, Principal] = {}
        for common_name, entry in certs_raw.items():
            entry = _mapping(entry, "cert entry", source)
            if entry.get("role", "tenant") == "ops":
                self.certs[str(common_name)] = Principal(
                    str(entry.get("tenant") or "ops"), Role.OPS, None, {}
                )
            elif entry.get("tenant"):
                self.certs[str(common_name)] = self._tenants[str(entry["tenant"])]
            else:
                raise InvalidArgument(f"{source}: cert {common_name!r} needs a 'tenant' or role 'ops'")

    def replace_with(self, other: AuthPolicy) -> None:
        """Take over another policy's keys, tenants and grants (a reloaded auth file), in place.

        The gRPC interceptor and the HTTP middleware hold this object, so both switch at once;
        each lookup reads one attribute (the key list, the owner map), never a half-updated one.
        """
        self.__dict__.update(other.__dict__)

    def _tenant(self, tenant: str, raw: Any, shared: list[str], source: str) -> Principal:
        raw = _mapping(raw, f"tenants.{tenant}", source)
        own = _names(raw.get("namespaces", [tenant]), f"tenants.{tenant}.namespaces", source)
        grants: dict[str, Access] = {}
        for ns in own:
            if ns in shared or ns in self.owner:
                other = "a shared namespace" if ns in shared else f"tenant {self.owner[ns]!r}'s"
                raise InvalidArgument(f"{source}: tenant {tenant!r} claims namespace {ns!r}, already {other}")
            if ns in _HOME_ALIASES:
                raise InvalidArgument(
                    f"{source}: 'default' names the caller's home namespace; pick another name"
                )
            self.owner[ns] = tenant
            grants[ns] = Access.WRITE
        for ns, mode in _mapping(raw.get("shared", {}), f"tenants.{tenant}.shared", source).items():
            if ns not in shared:
                raise InvalidArgument(
                    f"{source}: tenant {tenant!r} joins {ns!r}, which is not in shared_namespaces",
                    hint="sharing is opt-in: list the namespace in shared_namespaces first",
                )
            try:
                grants[ns] = Access(mode)
            except ValueError:
                raise InvalidArgument(
                    f"{source}: shared access must be 'read' or 'write', got {mode!r}"
                ) from None
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
    """Read an auth file (JSON, or TOML for ``*.toml``); warn when others can read its raw keys."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise InvalidArgument(f"cannot read auth file {path}: {exc.strerror}") from None
    try:
        if path.suffix == ".toml":
            import tomllib  # Python 3.11+; JSON works everywhere

            raw = tomllib.loads(text)
        else:
            raw = json.loads(text)
    except (ImportError, ValueError) as exc:  # TOMLDecodeError and JSONDecodeError are ValueErrors
        raise InvalidArgument(f"auth file {path} does not parse: {exc}") from None
    policy = AuthPolicy(_mapping(raw, "auth file", str(path)), source=str(path))
    if os.stat(path).st_mode & 0o077 and any(not _DIGEST.match(k) for k in raw.get("keys", {})):
        log.warning(
            "auth file %s holds raw keys and is readable by others; chmod 600 or use sha256: digests", path
        )
    return policy


def _mapping(value: Any, what: str, source: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise InvalidArgument(f"{source}: {what} must be a table/object, got {type(value).__name__}")
    return value


def _names(value: Any, what: str, source: str) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise InvalidArgument(f"{source}: {what} must be a list of names")
    for name in value:
        check_name(what, name)
    if len(set(value)) != len(value):
        raise InvalidArgument(f"{source}: {what} lists a name twice")
    return list(value)


def _digest(key_text: str, source: str) -> bytes:
    match = _DIGEST.match(key_text)
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


def _fail(context: grpc.ServicerContext, exc: DeltaStoreError) -> None:
    context.set_trailing_metadata(((ERROR_TYPE_KEY, type(exc).__name__),))
    context.abort(grpc_code(exc), str(exc))


class AuthInterceptor(grpc.ServerInterceptor):
    """Authenticate every call but health checks; resolve or refuse the namespace of DeltaStore calls.

    The resolved namespace is written into the request before the handler sees it, so the service
    itself never acts on a namespace the caller did not prove it may use.
    """

    def __init__(self, policy: AuthPolicy) -> None:
        self.policy = policy

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler | None],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = continuation(details)
        method: str = details.method
        if handler is None or method.startswith(_OPEN_GRPC_PREFIXES):
            return handler
        metadata = details.invocation_metadata or ()
        presented = presented_key((m.key, m.value) for m in metadata)
        if presented is None and self.policy.certs:
            return self._by_certificate(handler, method)
        try:
            principal = self.policy.authenticate(presented)
        except AuthError as exc:
            return _refusing(handler, exc, method)
        return _authorized(handler, principal, method)

    def _by_certificate(self, handler: grpc.RpcMethodHandler, method: str) -> grpc.RpcMethodHandler:
        """No key: the tenant of the verified client certificate, known only once the call runs."""

        def behavior(request: Any, context: grpc.ServicerContext) -> Any:
            names = (context.auth_context() or {}).get("x509_common_name") or []
            try:
                principal = self.policy.authenticate_cert(names[0].decode() if names else None)
            except AuthError as exc:
                log.info("%s from %s refused: %s", method, context.peer(), exc.message)
                _fail(context, exc)
            chosen = _authorized(handler, principal, method)
            run = chosen.unary_unary or chosen.unary_stream or chosen.stream_unary or chosen.stream_stream
            return run(request, context)

        return _replace(handler, behavior)


def _authorized(handler: grpc.RpcMethodHandler, principal: Principal, method: str) -> grpc.RpcMethodHandler:
    """The handler as ``principal`` may run it: scoped to its namespaces, or refused."""
    if not method.startswith(_SERVICE):  # reflection: any valid key
        return handler
    name = method[len(_SERVICE) :]
    if principal.role is Role.OPS and name not in OPS_METHODS:
        return _refusing(handler, PermissionDenied("ops keys may only read savings and metrics"), method)
    return _scoped(handler, principal, name)


def _resolve(principal: Principal, name: str, request: Any, field: Any) -> None:
    """Rewrite ``field.namespace`` to the namespace the principal acts in (ops: unchanged)."""
    if principal.role is Role.OPS:
        return
    field.namespace = principal.namespace_for(field.namespace, METHOD_ACCESS.get(name, Access.WRITE))


def _scoped(handler: grpc.RpcMethodHandler, principal: Principal, name: str) -> grpc.RpcMethodHandler:
    """The same handler, acting only in the namespaces ``principal`` may use."""
    if handler.request_streaming:
        inner_stream = handler.stream_unary or handler.stream_stream

        def headers_checked(requests: Iterator[Any]) -> Iterator[Any]:
            # Raised inside the service's own error mapping, so it is counted like any failure.
            for i, msg in enumerate(requests):
                # A chunk sent first, or bytes that did not parse, carry no namespace: the service
                # refuses them itself (INVALID_ARGUMENT).
                if i == 0 and isinstance(msg, Message) and msg.WhichOneof("part") == "header":
                    _resolve(principal, name, msg, msg.header)
                yield msg

        def stream_behavior(requests: Iterator[Any], context: grpc.ServicerContext) -> Any:
            return inner_stream(headers_checked(requests), context)

        return _replace(handler, stream_behavior)

    inner = handler.unary_unary or handler.unary_stream

    def unary_behavior(request: Any, context: grpc.ServicerContext) -> Any:
        if isinstance(request, Malformed):  # no namespace to check: the handler refuses it
            return inner(request, context)
        try:
            _resolve(principal, name, request, request)
        except PermissionDenied as exc:
            log.info("%s refused for tenant %s: %s", name, principal.tenant, exc.message)
            _fail(context, exc)
        return inner(request, context)

    return _replace(handler, unary_behavior)


def _refusing(handler: grpc.RpcMethodHandler, exc: DeltaStoreError, method: str) -> grpc.RpcMethodHandler:
    """A handler of the same kind that fails the call with ``exc`` and never runs the real one."""

    def behavior(_request: Any, context: grpc.ServicerContext) -> Any:
        log.info("%s from %s refused: %s", method, context.peer(), exc.message)
        _fail(context, exc)

    return _replace(handler, behavior)


def _replace(handler: grpc.RpcMethodHandler, behavior: Callable[..., Any]) -> grpc.RpcMethodHandler:
    kinds = {
        (False, False): grpc.unary_unary_rpc_method_handler,
        (False, True): grpc.unary_stream_rpc_method_handler,
        (True, False): grpc.stream_unary_rpc_method_handler,
        (True, True): grpc.stream_stream_rpc_method_handler,
    }
    make = kinds[(handler.request_streaming, handler.response_streaming)]
    return make(
        behavior,
        request_deserializer=handler.request_deserializer,
        response_serializer=handler.response_serializer,
    )


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
            elif path == SAVINGS_PATH or (path.startswith(SESSIONS_PREFIX) and path.count("/") == 3):
                scope = self._scoped(scope, principal)
            else:
                raise NotFound(f"no route {path}")
        except DeltaStoreError as exc:
            await _json_error(send, exc)
            return
        await self.app(scope, receive, send)

    @staticmethod
    def _scoped(scope: Scope, principal: Principal) -> Scope:
        """The request with its ``namespace`` query parameter replaced by the resolved one."""
        query = parse_qsl(scope.get("query_string", b"").decode("latin-1"), keep_blank_values=True)
        requested = next((v for k, v in reversed(query) if k == "namespace"), "")
        namespace = principal.namespace_for(requested, Access.READ)
        rest = [(k, v) for k, v in query if k != "namespace"]
        return {**scope, "query_string": urlencode([*rest, ("namespace", namespace)]).encode()}


async def _json_error(send: Send, exc: DeltaStoreError) -> None:
    body = json.dumps(error_body(exc)).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if isinstance(exc, AuthError):
        headers.append((b"www-authenticate", b'Bearer realm="deltastore"'))
    await send({"type": "http.response.start", "status": http_status(exc), "headers": headers})
    await send({"type": "http.response.body", "body": body})
