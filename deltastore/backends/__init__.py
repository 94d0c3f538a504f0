"""Storage backends behind one interface (:class:`deltastore.backend.Backend`), opened by URL.

``lmdb:///path`` (or a bare path) is the embedded default; ``redis://host:port``,
``rediss://...``, ``redis+cluster://host:port,host:port`` and ``rediss+cluster://...`` open the
Redis backend (see :mod:`deltastore.backends.redis`). Both ``deltastore serve`` and
``deltastore verify`` open stores through :func:`open_backend`, so they accept the same URLs.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING
from urllib.parse import urlsplit, urlunsplit

from deltastore.errors import InvalidArgument

if TYPE_CHECKING:
    from deltastore.backend import Backend
    from deltastore.backends.lmdb_backend import LmdbConfig

__all__ = ["OPENERS", "open_backend", "redact_url"]


def redact_url(url: str) -> str:
    """The URL with any password (``redis://user:secret@host``) replaced by ``***``: safe to log.

    Every message, log line and printed banner that shows a backend URL goes through this.
    """
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparseable backend URL>"
    userinfo, at, hostinfo = parts.netloc.rpartition("@")
    if not at:
        return url
    user, colon, _password = userinfo.partition(":")
    netloc = f"{user}{':***' if colon else ''}@{hostinfo}"
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


def _open_lmdb(url: str, lmdb: LmdbConfig | None) -> Backend:
    from dataclasses import replace
    from pathlib import Path

    from deltastore.backends.lmdb_backend import LmdbBackend, LmdbConfig

    parts = urlsplit(url)
    path = (parts.netloc + parts.path) if parts.scheme else url
    if not path:
        raise InvalidArgument(
            f"backend URL {redact_url(url)!r} names no directory", hint="use lmdb:///absolute/path"
        )
    return LmdbBackend(replace(lmdb, path=Path(path)) if lmdb else LmdbConfig(path=Path(path)))


def _open_redis(url: str, lmdb: LmdbConfig | None) -> Backend:
    from deltastore.backends.redis import RedisBackend

    return RedisBackend.from_url(url)


OPENERS: dict[str, Callable[[str, LmdbConfig | None], Backend]] = {
    "lmdb": _open_lmdb,
    "": _open_lmdb,
    **dict.fromkeys(("redis", "rediss", "redis+cluster", "rediss+cluster"), _open_redis),
}
"""Backend URL scheme -> opener. A new backend registers its scheme here."""


def open_backend(url: str, lmdb: LmdbConfig | None = None) -> Backend:
    """Open the backend a URL names; ``lmdb``: the LMDB options for ``lmdb://`` (its path is the URL's).

    The only place that builds a backend: the store, server and tools name one by URL.
    """
    scheme = urlsplit(url).scheme
    opener = OPENERS.get(scheme)
    if opener is None:
        known = ", ".join(f"{s}://" for s in sorted(OPENERS) if s)
        raise InvalidArgument(
            f"unknown backend {scheme!r} in {redact_url(url)!r}", hint=f"supported: {known}"
        )
    return opener(url, lmdb)
