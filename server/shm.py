"""Shared-memory export of snapshots, for an inference worker on the same host.

A sidecar and its worker can share a memory-backed directory (``/dev/shm``, or a Kubernetes
``emptyDir`` with ``medium: Memory`` mounted in both containers). GetSnapshotShm copies a
snapshot's verified payloads once, out of the store, into a new file there; the worker maps the
file and decodes straight from it, where the stream path frames, sends, receives and joins every
byte. The worker unlinks the file once it has mapped it; files a worker never claimed (it died,
or its deadline passed) are removed after ``ORPHAN_SECONDS``.

Files are created with mode 0600 under names the server picks (``O_EXCL``), so a client never
names a path the server opens. Access to the directory is the boundary, as with a unix socket.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from pathlib import Path

from deltastore.errors import ChecksumMismatch, ResourceExhausted
from deltastore.store import PlannedSegment, SnapshotStream

__all__ = ["ORPHAN_SECONDS", "PREFIX", "ShmExporter"]

log = logging.getLogger(__name__)

PREFIX = "deltastore-get-"
ORPHAN_SECONDS = 60.0


class ShmExporter:
    """Writes snapshots into files of ``directory`` (created 0700 if missing)."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)

    def export(self, snap: SnapshotStream) -> str:
        """Write the payloads of ``snap`` back to back into a new file; return its name.

        Payloads are verified as they are read (``SnapshotStream.map``); on any error the file is
        removed before the error propagates.
        """
        self.sweep()
        try:
            fd, path = tempfile.mkstemp(prefix=PREFIX, dir=self.directory)
        except OSError as exc:
            raise self._unwritable(exc) from None
        try:

            def write(seg: PlannedSegment, _fp16: int, payload: memoryview) -> None:
                if len(payload) != seg.size_bytes:
                    raise ChecksumMismatch(seg.key, f"{seg.size_bytes} bytes", f"{len(payload)} bytes")
                written = 0
                while written < len(payload):  # write() into tmpfs: no page faults, unlike a mapping
                    written += os.write(fd, payload[written:])

            for _ in snap.map(write):
                pass
        except OSError as exc:  # the directory's filesystem is full, most likely
            os.unlink(path)
            raise self._unwritable(exc) from None
        except BaseException:
            os.unlink(path)
            raise
        finally:
            os.close(fd)
        return os.path.basename(path)

    def _unwritable(self, exc: OSError) -> ResourceExhausted:
        return ResourceExhausted(
            f"cannot write a snapshot into the shared-memory directory {self.directory}: {exc.strerror}",
            hint="give the directory more room (e.g. a larger /dev/shm), or read with GetSnapshot",
        )

    def sweep(self, now: float | None = None) -> int:
        """Remove export files older than ``ORPHAN_SECONDS``; return how many."""
        cutoff = (time.time() if now is None else now) - ORPHAN_SECONDS
        removed = 0
        for entry in os.scandir(self.directory):
            try:
                if entry.name.startswith(PREFIX) and entry.stat(follow_symlinks=False).st_mtime < cutoff:
                    os.unlink(entry.path)
                    removed += 1
            except FileNotFoundError:  # its worker claimed it meanwhile
                continue
        if removed:
            log.warning("removed %d shared-memory snapshot file(s) no worker claimed", removed)
        return removed
