"""The worker's side of GetSnapshotShm and GetPrefixShm: map the export, hand out its payloads.

The server writes a snapshot's payloads back to back into a new file of a directory both mount
(``deltastore serve --shm-dir``; see ``deltastore.server.shm``). The worker opens it, unlinks it
at once (nothing is left behind whatever happens next), maps it read-only and decodes straight
from the mapping: no stream, no reassembly.
"""

from __future__ import annotations

import contextlib
import fcntl
import mmap
import os
import re
import socket
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from deltastore.client.results import FetchedPrefix, RestoredSnapshot
from deltastore.client.wire import DEFAULT_MAX_DECODED_BYTES, checked_prefix, decode_snapshot
from deltastore.errors import InvalidArgument, NotConfigured, ResourceExhausted
from deltastore.v1 import deltastore_pb2 as pb
from deltastore.v1.protocol import SHM_FD_PREFIX, SHM_FD_SOCKET, SHM_FILE_PREFIX

if TYPE_CHECKING:
    import torch

__all__ = ["decode_mapped", "fetch_mapped", "mapped_payloads"]

_NAME = re.compile(re.escape(SHM_FILE_PREFIX) + r"[A-Za-z0-9_]{1,64}")
_FD_NAME = re.compile(re.escape(SHM_FD_PREFIX) + r"[0-9a-f]{32}")
_SEALS = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE


def _claim_memfd(shm_dir: Path, name: str) -> int:
    """The sealed memfd behind a one-time token, received over the server's unix socket."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
            conn.settimeout(10)
            conn.connect(str(shm_dir / SHM_FD_SOCKET))
            conn.sendall(name.removeprefix(SHM_FD_PREFIX).encode("ascii") + b"\n")
            _, fds, _, _ = socket.recv_fds(conn, 16, 1)
    except OSError as exc:
        raise NotConfigured(
            f"cannot claim the shared-memory export from {shm_dir / SHM_FD_SOCKET}: {exc.strerror or exc}",
            hint="shm_dir must be the server's --shm-dir as mounted here",
        ) from None
    if not fds:
        raise NotConfigured("the server holds no export under that token (claimed already, or expired)")
    for extra in fds[1:]:
        os.close(extra)
    return fds[0]


@contextlib.contextmanager
def mapped_payloads(
    shm_dir: str | Path, reply: pb.GetSnapshotShmResponse, max_bytes: int
) -> Iterator[list[memoryview]]:
    """The payloads of ``reply``, in segment order, as views of its file (valid inside the block).

    Raises:
        InvalidArgument: the reply names no file the server would have made, not a regular file,
            or one whose size is not the sum of the segment sizes.
        NotConfigured: the file cannot be opened or removed here (``shm_dir`` is not the server's
            directory, or not readable and writable by this user).
        ResourceExhausted: the snapshot is larger than ``max_bytes``.
    """
    name = reply.file
    from_file = not _FD_NAME.fullmatch(name)
    if from_file and not _NAME.fullmatch(name):
        raise InvalidArgument(f"the server named an invalid shared-memory file {name!r}")
    path = Path(shm_dir) / name
    if not from_file:
        fd = _claim_memfd(Path(shm_dir), name)
    else:
        try:  # never follow a link, never block on a FIFO someone left there
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        except OSError as exc:
            raise NotConfigured(
                f"cannot open the snapshot file the server wrote, {path}: {exc.strerror}",
                hint="shm_dir must be the server's --shm-dir as mounted here, readable by this user",
            ) from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise InvalidArgument(f"{path} is not a regular file")
        if from_file:
            try:
                os.unlink(path)
            except OSError as exc:
                raise NotConfigured(
                    f"cannot remove {path} after opening it: {exc.strerror}",
                    hint="mount shm_dir writable here; the server removes unclaimed files after a minute",
                ) from None
            folder = os.stat(shm_dir)
            if info.st_uid != folder.st_uid or stat.S_IMODE(info.st_mode) != 0o600 or folder.st_mode & 0o022:
                # The server makes each export 0600 in its own directory: anything else was made or
                # can be swapped by someone else. (Its bytes are checked against their digests too.)
                raise InvalidArgument(
                    f"{path} is not an export of the server: mode {stat.S_IMODE(info.st_mode):o}, owner uid "
                    f"{info.st_uid}, in a directory of uid {folder.st_uid} mode {stat.S_IMODE(folder.st_mode):o}"
                )
        elif fcntl.fcntl(fd, fcntl.F_GET_SEALS) & _SEALS != _SEALS:
            raise InvalidArgument("the shared-memory export is not sealed against writing")
        sizes = [s.size_bytes for s in reply.info.segments]
        total = sum(sizes)
        if total > max_bytes:
            raise ResourceExhausted(f"snapshot of {total} bytes exceeds this client's limit of {max_bytes}")
        if info.st_size != total:
            raise InvalidArgument(f"{path} holds {info.st_size} bytes, its segments {total}")
        # MAP_POPULATE maps every page in one call instead of one fault per page as they are read.
        flags = mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0)
        mapping = mmap.mmap(fd, total, flags=flags, prot=mmap.PROT_READ) if total else None
    finally:
        os.close(fd)
    whole = memoryview(mapping) if mapping is not None else memoryview(b"")
    views, offset = [], 0
    for size in sizes:
        views.append(whole[offset : offset + size])
        offset += size
    try:
        yield views
    finally:
        for v in (*views, whole):
            v.release()
        if mapping is not None:
            with contextlib.suppress(BufferError):  # a caller still holds a view: freed with it
                mapping.close()


def decode_mapped(
    shm_dir: str | Path,
    reply: pb.GetSnapshotShmResponse,
    max_bytes: int,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    as_cache: bool = True,
    config: Any = None,
    max_decoded_bytes: int = DEFAULT_MAX_DECODED_BYTES,
) -> RestoredSnapshot:
    """Decode the snapshot of a GetSnapshotShm reply straight from its file (see ``decode_snapshot``)."""
    with mapped_payloads(shm_dir, reply, max_bytes) as views:
        return decode_snapshot(
            reply.info,
            views,
            device=device,
            dtype=dtype,
            as_cache=as_cache,
            config=config,
            max_decoded_bytes=max_decoded_bytes,
        )


def fetch_mapped(
    shm_dir: str | Path,
    reply: pb.GetSnapshotShmResponse,
    max_bytes: int,
    *,
    max_decoded_bytes: int,
    dtype: torch.dtype | None,
    start: int = 0,
) -> FetchedPrefix | None:
    """A GetPrefixShm reply as a checked :class:`FetchedPrefix` whose payloads are views of the
    export, unmapped when it closes; None when nothing matched (see ``checked_prefix``)."""
    if not reply.info.segments:  # nothing matched: the server exported nothing
        return None
    mapping = contextlib.ExitStack()
    views = mapping.enter_context(mapped_payloads(shm_dir, reply, max_bytes))
    return checked_prefix(
        reply.info, views, max_decoded_bytes=max_decoded_bytes, dtype=dtype, start=start, close=mapping.close
    )
