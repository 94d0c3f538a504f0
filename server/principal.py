"""Who a call acts for, and the namespace it may act in.

The auth layer (``deltastore.server.auth``) resolves the caller's :class:`Principal` once per
call and runs the handler inside :func:`run_as`; the handlers then ask :func:`namespace_for` for
the namespace a request acts in. The request message itself is never rewritten: what the caller
sent stays what it sent, and the decision sits in one typed place. With auth off there is no
principal and a request's namespace is used as given (``""`` meaning ``"default"``).

The principal lives in a context variable set in a context of the call's own
(:func:`contextvars.copy_context`), so it never outlives the call nor leaks to the next call on
the same worker thread; a streaming response is produced step by step inside that context.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from enum import Enum
from typing import Any

from deltastore.errors import PermissionDenied

__all__ = [
    "DEFAULT_NAMESPACE",
    "Access",
    "Principal",
    "Role",
    "acting_as",
    "current_principal",
    "namespace_for",
    "run_as",
    "savings_namespace",
]

DEFAULT_NAMESPACE = "default"
HOME_ALIASES = ("", DEFAULT_NAMESPACE)
"""Namespaces that mean the caller's home namespace (its first), so two tenants' "default" never meet."""


class Role(str, Enum):
    TENANT = "tenant"
    OPS = "ops"


class Access(str, Enum):
    READ = "read"
    WRITE = "write"


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
        if requested in HOME_ALIASES:
            if self.home is None:
                raise PermissionDenied(f"tenant {self.tenant!r} has no home namespace; name one")
            return self.home
        granted = self.grants.get(requested)
        if granted is None or (access is Access.WRITE and granted is not Access.WRITE):
            verb = "write to" if granted is not None else "use"
            raise PermissionDenied(f"tenant {self.tenant!r} may not {verb} namespace {requested!r}")
        return requested


_CURRENT: contextvars.ContextVar[Principal | None] = contextvars.ContextVar("principal", default=None)


def current_principal() -> Principal | None:
    """The principal of the call being handled; None with auth off."""
    return _CURRENT.get()


def _authenticated(auth_on: bool) -> Principal | None:
    """The call's principal; None only with auth off. Fails closed: with auth on, a handler that
    runs without one (its call's context lost on the way: another thread pool, a new layer out of
    order) is refused, never served as if auth were off."""
    principal = _CURRENT.get()
    if principal is None and auth_on:
        raise PermissionDenied(
            "this call reached its handler without an authenticated caller",
            hint="a server bug: report it (the call was refused, nothing was read or written)",
        )
    return principal


def namespace_for(requested: str, access: Access, *, auth_on: bool) -> str:
    """The namespace this call acts in: checked against the caller's grants (auth on), or as asked."""
    principal = _authenticated(auth_on)
    if principal is None:
        return requested or DEFAULT_NAMESPACE
    return principal.namespace_for(requested, access)


def savings_namespace(requested: str, *, auth_on: bool) -> str | None:
    """The namespace whose savings a call reads (None: the whole store).

    Ops keys (and callers with auth off) read any namespace or the total; a tenant reads its own.
    """
    principal = _authenticated(auth_on)
    if principal is None or principal.role is Role.OPS:
        return requested or None
    return principal.namespace_for(requested, Access.READ)


@contextlib.contextmanager
def acting_as(principal: Principal) -> Iterator[None]:
    """The caller's principal for the block: the ops HTTP API's requests (one asyncio task each;
    its sync routes run in a thread that copies the task's context, so they see it too)."""
    token = _CURRENT.set(principal)
    try:
        yield
    finally:
        _CURRENT.reset(token)


def run_as(
    principal: Principal, behavior: Callable[[Any, Any], Any], streaming_response: bool
) -> Callable[[Any, Any], Any]:
    """``behavior`` run with ``principal`` as the call's principal (see the module docstring)."""

    def unary(request: Any, context: Any) -> Any:
        call = contextvars.copy_context()
        call.run(_CURRENT.set, principal)
        return call.run(behavior, request, context)

    def streaming(request: Any, context: Any) -> Iterator[Any]:
        call = contextvars.copy_context()
        call.run(_CURRENT.set, principal)
        responses = call.run(behavior, request, context)
        try:
            while True:
                try:
                    item = call.run(next, responses)
                except StopIteration:
                    return
                yield item
        finally:
            close = getattr(responses, "close", None)
            if close is not None:
                call.run(close)

    return streaming if streaming_response else unary
