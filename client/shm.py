"""The worker's side of GetSnapshotShm: map the file the server wrote, hand out its payloads.

The server writes a snapshot's payloads back to back into a new file of a directory both mount
(``deltastore serve --shm-dir``; see ``deltastore.server.shm``). The worker opens it, unlinks it
at once (nothing is left behind whatever happens next), maps it read-only and decodes straight
from the mapping: no stream, no reassembly.
"""

from __future__ import annotations

import contextlib
import mmap
import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from deltastore.client.wire import RestoredSnapshot, decode_snapshot
from deltastore.errors import InvalidArgument, NotConfigured, ResourceExhausted
from deltastore.v1 import deltastore_pb2 as pb

if TYPE_CHECKING:
    import torch

__all__ = ["decode_mapped", "mapped_payloads"]


@contextlib.contextmanager
def mapped_payloads(
    shm_dir: str | Path, reply: pb.GetSnapshotShmResponse, max_bytes: int
) -> Iterator[list[memoryview]]:
    """The payloads of ``reply``, in segment order, as views of its file (valid inside the block).

    Raises:
        InvalidArgument: the reply names no plain file name, or the file's size is not the sum of
            the segment sizes.
        NotConfigured: the file cannot be opened here (``shm_dir`` is not the server's directory,
            or not readable by this user).
        ResourceExhausted: the snapshot is larger than ``max_bytes``.
    """
    name = reply.file
    if not name or name != os.path.basename(name) or name.startswith("."):
        raise InvalidArgument(f"the server named an invalid shared-memory file {name!r}")
    sizes = [s.size_bytes for s in reply.info.segments]
    total = sum(sizes)
    if total > max_bytes:
        raise ResourceExhausted(f"snapshot of {total} bytes exceeds this client's limit of {max_bytes}")
    path = Path(shm_dir) / name
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError as exc:
        raise NotConfigured(
            f"cannot open the snapshot file the server wrote, {path}: {exc.strerror}",
            hint="shm_dir must be the server's --shm-dir as mounted here, readable by this user",
        ) from None
    try:
        os.unlink(path)
        if os.fstat(fd).st_size != total:
            raise InvalidArgument(f"{path} holds {os.fstat(fd).st_size} bytes, its segments {total}")
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
) -> RestoredSnapshot:
    """Decode the snapshot of a GetSnapshotShm reply straight from its file (see ``decode_snapshot``)."""
    with mapped_payloads(shm_dir, reply, max_bytes) as views:
        return decode_snapshot(
            reply.info, views, device=device, dtype=dtype, as_cache=as_cache, config=config
        )
