"""Typed configuration, and the one module that reads ``DELTASTORE_*`` environment variables.

Every settings class (the store's policy, the LMDB environment, the server's limits and
addresses in ``deltastore.server.settings``) is a frozen pydantic-settings model deriving from
:class:`Config`. Constructing one reads only its arguments (a store built in a test or a library
never picks up the environment by surprise); :meth:`Config.load` adds the environment and
command-line flags with the precedence flag > environment variable > default. A value that does
not validate is an :class:`~deltastore.errors.InvalidArgument` naming the flag, variable or field
it came from. Sizes are byte counts or units (``64MiB``, ``1G``; binary: K = 1024).

Store and LMDB variables (the server's are listed in ``deltastore.server.settings``):

| variable | meaning | default |
|---|---|---|
| ``DELTASTORE_DATA_DIR`` | LMDB directory | ``./data`` |
| ``DELTASTORE_BLOCK_SIZE`` | tokens per aligned block (new sessions) | 64 |
| ``DELTASTORE_MAX_STORED_BYTES`` | capacity; past it, the LRU session of the namespace storing the most is evicted | unlimited |
| ``DELTASTORE_NAMESPACE_QUOTA_BYTES`` | stored bytes per namespace; past it, that namespace's own LRU sessions are evicted | unlimited |
| ``DELTASTORE_SESSION_TTL_S`` | sessions idle longer than this expire | never |
| ``DELTASTORE_SHARED_NAMESPACES`` | ``ns=group,ns2=group``: namespaces that dedup together | none |
| ``DELTASTORE_TOUCH_INTERVAL_S`` | reads refresh a session's LRU clock at most this often | 10 |
| ``DELTASTORE_EXPIRE_BATCH`` | expired sessions deleted per put, at most | 16 |
| ``DELTASTORE_LMDB_MAP_SIZE`` | initial LMDB map size | 1 GiB |
| ``DELTASTORE_LMDB_MAX_MAP_SIZE`` | the map never grows past this | 256 GiB |
| ``DELTASTORE_LMDB_SYNC`` | ``1``/``on``/``true``/``yes``: fdatasync per commit (power-loss safe); ``0``/``off``/``false``/``no``: kill -9 safe only; anything else is refused | 1 |

A store variable set to the empty string counts as unset.
"""

from __future__ import annotations

import argparse
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, NamedTuple, TypeVar

from pydantic import (
    AfterValidator,
    AliasChoices,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
)
from pydantic.fields import FieldInfo
from pydantic_settings import (
    BaseSettings,
    EnvSettingsSource,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

from deltastore.addressing import DEFAULT_BLOCK_SIZE, MAX_BLOCK_SIZE
from deltastore.backends.lmdb_backend import LmdbConfig
from deltastore.errors import DeltaStoreError, InvalidArgument
from deltastore.manifest import check_name

__all__ = [
    "ENV_PREFIX",
    "Cli",
    "Config",
    "LmdbSettings",
    "Settings",
    "Size",
    "StoreConfig",
    "Switch",
    "add_arguments",
    "invalid_argument",
    "load_settings",
    "parse_size",
]

ENV_PREFIX = "DELTASTORE_"

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


def _size(value: object) -> object:
    return parse_size(value) if isinstance(value, str) else value


def _switch(value: object) -> object:
    """``1/0, true/false, yes/no, on/off`` (any case); the empty string is off."""
    if not isinstance(value, str):
        return value
    lowered = value.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("", "0", "false", "no", "off"):
        return False
    raise InvalidArgument(f"not a boolean: {value!r}", hint="use 1/0, true/false, yes/no, on/off")


Size = Annotated[int, BeforeValidator(_size)]
"""A byte count that also reads unit strings (``64MiB``)."""
Switch = Annotated[bool, BeforeValidator(_switch)]
"""A boolean that reads ``1/0, true/false, yes/no, on/off``; ``""`` is off."""


class Cli(NamedTuple):
    """A setting's command-line flag, as field metadata: ``Annotated[int, Cli("--workers", "...")]``."""

    flag: str
    help: str


def invalid_argument(
    exc: ValidationError, spelled: Mapping[str, str] | None = None, *, hidden: tuple[str, ...] = ()
) -> InvalidArgument:
    """One InvalidArgument for a failed validation, naming where each bad value came from.

    ``spelled`` maps a top-level field to how the caller wrote it (``--workers``,
    ``DELTASTORE_WORKERS``); other fields are named by their dotted location. Under a top-level
    field in ``hidden`` the next name is a secret (an API key) and shows as ``<key>``. Messages
    our own validators raised (a DeltaStoreError) are kept with their hint.
    """
    spelled = spelled or {}
    parts: list[str] = []
    hint = ""
    for error in exc.errors(include_url=False):
        cause = (error.get("ctx") or {}).get("error")
        if isinstance(cause, DeltaStoreError):
            message, hint = cause.message, cause.hint or hint
        else:
            message = "unknown entry" if error["type"] == "extra_forbidden" else error["msg"]
        loc = [str(p) for p in error["loc"]]
        if not loc:  # a check across fields: its message names them
            parts.append(message)
            continue
        if loc[0] in hidden and len(loc) > 1:
            loc[1] = "<key>"
        where = ".".join([spelled.get(loc[0], loc[0]), *loc[1:]])
        value = error.get("input")
        scalar = isinstance(value, str | int | float) and error["type"] != "missing"
        parts.append(f"{where}={value!r}: {message}" if scalar else f"{where}: {message}")
    return InvalidArgument("; ".join(parts), hint=hint)


C = TypeVar("C", bound="Config")


class Config(BaseSettings):
    """Base of every settings model: frozen, unknown fields refused, errors as InvalidArgument."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX, env_prefix_target="all", frozen=True, extra="forbid", validate_by_name=True
    )

    def __init__(self, *, _spelled: Mapping[str, str] | None = None, **values: Any) -> None:
        """Validate ``values``; ``_spelled``: how the caller wrote each one (see :meth:`load`)."""
        try:
            super().__init__(**values)
        except ValidationError as exc:
            raise invalid_argument(exc, _spelled) from None

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        """Constructing reads the arguments only; :meth:`load` is the one way in for the environment."""
        return (init_settings,)

    @classmethod
    def load(
        cls: type[C],
        flags: argparse.Namespace | Mapping[str, object] | None = None,
        environ: Mapping[str, str] | None = None,
    ) -> C:
        """The settings from ``flags`` over ``DELTASTORE_*`` variables over the defaults.

        ``flags``: parsed arguments or a mapping, None where a flag was not given; ``environ``
        defaults to the process environment (tests pass their own).
        """
        if isinstance(flags, argparse.Namespace):
            flags = {name: getattr(flags, name, None) for name in cls.model_fields}
        environ = os.environ if environ is None else environ
        source = EnvSettingsSource(cls)
        source.env_vars = {
            k.lower(): v for k, v in environ.items() if not (source.env_ignore_empty and v == "")
        }
        from_env = source()
        given = {name: value for name, value in (flags or {}).items() if value is not None}
        spelled = {name: cls._variable(name, source.env_vars) for name in from_env}
        spelled.update((name, cls._flag(name)) for name in given)
        return cls(_spelled=spelled, **{**from_env, **given})

    @classmethod
    def _variable(cls, name: str, env_vars: Mapping[str, object]) -> str:
        """The environment variable a field was read from (a field may answer to several names)."""
        prefix = str(cls.model_config.get("env_prefix", ""))
        alias = cls.model_fields[name].validation_alias
        names = (
            [n for n in alias.choices if isinstance(n, str)] if isinstance(alias, AliasChoices) else [name]
        )
        found = [n for n in names if (prefix + n).lower() in env_vars] or [name]
        return (prefix + found[-1]).upper()

    @classmethod
    def _flag(cls, name: str) -> str:
        cli = _cli(cls.model_fields[name])
        return cli.flag if cli else name


def _cli(info: FieldInfo) -> Cli | None:
    return next((m for m in info.metadata if isinstance(m, Cli)), None)


def add_arguments(parser: argparse.ArgumentParser, model: type[Config]) -> None:
    """A flag for every field of ``model`` that has :class:`Cli` metadata; defaults are None so the
    environment can fill them (see :meth:`Config.load`)."""
    prefix = str(model.model_config.get("env_prefix", ""))
    for name, info in model.model_fields.items():
        cli = _cli(info)
        if cli is None:
            continue
        env = f"{prefix}{name}".upper()
        if info.annotation is bool:
            parser.add_argument(
                cli.flag,
                dest=name,
                default=None,
                action="store_const",
                const="1",
                help=f"{cli.help} [env {env}]",
            )
            continue
        parser.add_argument(
            cli.flag,
            dest=name,
            default=None,
            metavar="DIR" if name == "data_dir" else name.split("_")[0].upper(),
            help=f"{cli.help} [env {env}; default {info.default!s}]",
        )


def _groups(value: object) -> object:
    """``ns=group,ns2=group`` (the environment's spelling) as a mapping; mappings pass through."""
    if not isinstance(value, str):
        return value
    groups: dict[str, str] = {}
    for item in filter(None, (part.strip() for part in value.split(","))):
        ns, sep, group = item.partition("=")
        if not sep:
            raise InvalidArgument(f"entry {item!r} is not ns=group")
        groups[ns.strip()] = group.strip()
    return groups


def _names(groups: dict[str, str]) -> dict[str, str]:
    for ns, group in groups.items():
        check_name("namespace", ns)
        check_name("shared group", group)
    return groups


class StoreConfig(Config):
    """Policy of a :class:`~deltastore.store.Store`.

    Attributes:
        block_size: tokens per aligned block for new sessions (see :mod:`deltastore.addressing`).
        max_stored_bytes: capacity in stored bytes (payloads, manifests, index); a put that
            would exceed it evicts whole sessions: the least recently used session of the
            namespace that stores the most (so one tenant cannot evict every other). None:
            unlimited.
        namespace_quota_bytes: stored bytes one namespace may hold (as if stored alone); a put
            past it evicts that namespace's own least recently used sessions, never another's,
            or fails with StoreFull. None: unlimited.
        session_ttl_s: a session not read or written for this many seconds expires (it reads
            as absent and is deleted by the next puts or by ``expire_sessions``). None: never.
        shared_groups: namespace -> dedup group (``DELTASTORE_SHARED_NAMESPACES``); namespaces
            of one group dedup against each other. Every other namespace dedups only within
            itself (tenants never see each other's blocks, not even as a plan's ``present`` flag).
        touch_interval_s: reads refresh a session's LRU clock at most this often (each refresh
            is a durable write).
        expire_batch: expired sessions deleted per put, at most (bounds a put's latency).
    """

    model_config = SettingsConfigDict(env_ignore_empty=True)

    block_size: int = Field(default=DEFAULT_BLOCK_SIZE, ge=1, le=MAX_BLOCK_SIZE)
    max_stored_bytes: Size | None = Field(default=None, gt=0)
    namespace_quota_bytes: Size | None = Field(default=None, gt=0)
    session_ttl_s: float | None = Field(default=None, gt=0)
    shared_groups: Annotated[dict[str, str], NoDecode, BeforeValidator(_groups), AfterValidator(_names)] = (
        Field(default_factory=dict, validation_alias=AliasChoices("shared_groups", "shared_namespaces"))
    )
    touch_interval_s: float = Field(default=10.0, ge=0)
    expire_batch: int = Field(default=16, ge=0)

    def domain(self, namespace: str) -> str:
        """The dedup domain of a namespace: itself, or ``shared:<group>``."""
        group = self.shared_groups.get(namespace)
        return f"shared:{group}" if group else namespace


class LmdbSettings(Config):
    """The LMDB environment's options read from ``DELTASTORE_LMDB_*`` (its path is the store's)."""

    model_config = SettingsConfigDict(env_prefix=f"{ENV_PREFIX}LMDB_", env_ignore_empty=True)

    map_size: Size = LmdbConfig.map_size
    max_map_size: Size = LmdbConfig.max_map_size
    sync: Switch = LmdbConfig.sync

    def at(self, path: Path) -> LmdbConfig:
        """These options for the environment in ``path``."""
        return LmdbConfig(path=path, map_size=self.map_size, max_map_size=self.max_map_size, sync=self.sync)


class _DataDir(Config):
    model_config = SettingsConfigDict(env_ignore_empty=True)

    data_dir: Path = Path("./data")


class Settings(BaseModel):
    """Everything a process needs to open the embedded store."""

    model_config = ConfigDict(frozen=True, arbitrary_types_allowed=True)

    data_dir: Path
    store: StoreConfig
    lmdb: LmdbConfig


def load_settings(data_dir: str | Path | None = None, env: Mapping[str, str] | None = None) -> Settings:
    """Settings from the environment; an explicit ``data_dir`` (e.g. ``--data-dir``) wins."""
    path = _DataDir.load({"data_dir": data_dir or None}, env).data_dir
    return Settings(
        data_dir=path, store=StoreConfig.load(environ=env), lmdb=LmdbSettings.load(environ=env).at(path)
    )
