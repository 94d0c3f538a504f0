"""The auth file's schema: what ``--auth-file`` may say, checked field by field as it is read.

The file (JSON, or TOML when it ends in ``.toml``) maps API keys and client-certificate names to
tenants or the ops role, and tenants to namespaces (see ``deltastore.server.auth`` for the rules
and why). Every entry is typed here; unknown entries are refused (a misspelled ``tenat`` must not
silently grant nothing, or everything). Rules across entries (who owns which namespace, shared
opt-ins, key digests) are the policy's, in ``deltastore.server.auth``.
"""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, model_validator

from deltastore.errors import InvalidArgument
from deltastore.manifest import check_name
from deltastore.server.principal import Access, Role
from deltastore.settings import invalid_argument

__all__ = ["DIGEST", "AuthFile", "Identity", "TenantEntry", "parse_auth_file", "read_auth_file"]

log = logging.getLogger(__name__)

DIGEST = re.compile(r"^sha256:([0-9a-f]{64})$")
"""A key given as the SHA-256 digest of the real one (the file then holds no secret)."""


def _name(name: str) -> str:
    return check_name("name", name)


def _unique(names: list[str]) -> list[str]:
    if len(set(names)) != len(names):
        raise InvalidArgument("lists a name twice")
    return names


Names = Annotated[list[Annotated[str, AfterValidator(_name)]], AfterValidator(_unique)]
"""Namespace or group names, each ``[A-Za-z0-9][A-Za-z0-9._-]{0,63}``, none twice."""


class _Entry(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class Identity(_Entry):
    """Who a key (``keys``) or a client certificate's common name (``certs``) stands for."""

    tenant: str | None = None
    role: Role = Role.TENANT

    @model_validator(mode="after")
    def _tenant_named(self) -> Identity:
        if self.role is Role.TENANT and not self.tenant:
            raise InvalidArgument("a tenant entry needs a 'tenant' (or role 'ops')")
        if self.tenant:
            check_name("tenant", self.tenant)
        return self


class TenantEntry(_Entry):
    """A tenant's own namespaces (default: the one named like the tenant) and shared ones it joins."""

    namespaces: Names | None = None
    shared: dict[str, Access] = Field(default_factory=dict)


class AuthFile(_Entry):
    """The whole file."""

    keys: dict[str, Identity]
    certs: dict[str, Identity] = Field(default_factory=dict)
    tenants: dict[str, TenantEntry] = Field(default_factory=dict)
    shared_namespaces: Names = Field(default_factory=list)
    cross_tenant_dedup_groups: Names = Field(default_factory=list)

    @model_validator(mode="after")
    def _some_key(self) -> AuthFile:
        if not self.keys:
            raise InvalidArgument("no keys configured", hint="add at least one key, or drop the file")
        return self

    @property
    def raw_keys(self) -> list[str]:
        """Keys written in clear (not as ``sha256:`` digests)."""
        return [k for k in self.keys if not DIGEST.match(k)]


def parse_auth_file(raw: Any, source: str = "auth config") -> AuthFile:
    """The schema of parsed file contents; InvalidArgument naming ``source`` and the entry.

    A key never appears in the message: a bad entry under ``keys`` is named ``keys.<key>``.
    """
    try:
        return AuthFile.model_validate(raw)
    except ValidationError as exc:
        error = invalid_argument(exc, hidden=("keys",))
        raise InvalidArgument(f"{source}: {error.message}", hint=error.hint) from None


def read_auth_file(path: str | Path) -> AuthFile:
    """Read and check an auth file (JSON, or TOML for ``*.toml``); warn when others can read raw keys."""
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
    parsed = parse_auth_file(raw, str(path))
    if os.stat(path).st_mode & 0o077 and parsed.raw_keys:
        log.warning(
            "auth file %s holds raw keys and is readable by others; chmod 600 or use sha256: digests", path
        )
    return parsed
