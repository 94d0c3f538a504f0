"""Shared-memory export of snapshots, for an inference worker on the same host.

A sidecar and its worker can share a memory-backed directory (``/dev/shm``, or a Kubernetes
``emptyDir`` with ``medium: Memory`` mounted in both containers). GetSnapshotShm (GetPrefixShm
for a prefix) copies a snapshot's verified payloads once, out of the store, into a new file
there; the worker maps the file and decodes straight from it, where the stream path frames,
sends, receives and joins every byte. The worker unlinks the file once it has opened it.

Files are created with mode 0600 (the worker runs as the server's user) under names the server
picks (``O_EXCL``), so a client never names a path the server opens. Memory-backed files count
against the host's (or the pod's) memory, so what is not yet claimed is bounded: at most
``max_bytes`` in all (RESOURCE_EXHAUSTED beyond), and files a worker never claimed (it died, its
deadline passed, it looks in another directory) are removed after ``ORPHAN_SECONDS`` by a sweeper
thread.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import stat
import tempfile
import threading
import time
import weakref
from collections.abc import Callable
from pathlib import Path

from deltastore.errors import ChecksumMismatch, NotConfigured, ResourceExhausted
from deltastore.store import PlannedSegment, SnapshotStream
from deltastore.v1.protocol import SHM_FILE_PREFIX

__all__ = ["ORPHAN_SECONDS", "ShmExporter", "check_room", "prepare_private_dir"]

log = logging.getLogger(__name__)

ORPHAN_SECONDS = 60.0
_FULL = (errno.ENOSPC, errno.EDQUOT)


class ShmExporter:
    """Writes snapshots into files of ``directory`` (created 0700 if missing).

    Args:
        directory: the shared directory.
        max_bytes: the most bytes of unclaimed files (and exports in progress) at once.
    """

    def __init__(self, directory: str | Path, max_bytes: int) -> None:
        self.directory = Path(directory)
        self.max_bytes = max_bytes
        self._lock = threading.Lock()
        self._reserved = 0  # bytes of exports in progress
        self._writing: set[str] = set()  # their files: counted in _reserved, never by sweep()
        self._prepare()
        self.sweep()
        _start_sweeper(self)

    def export(self, snap: SnapshotStream) -> str:
        """Write the payloads of ``snap`` back to back into a new file; return its name.

        Payloads are verified as they are read (``SnapshotStream.map``); on any error the file is
        removed before the error propagates.

        Raises:
            ResourceExhausted: the unclaimed files would pass ``max_bytes``, or the directory is full.
            NotConfigured: the directory cannot be used (removed and not re-creatable, not writable).
        """
        total = snap.payload_bytes
        with self._lock:
            self._prepare()
            check_room(self.sweep() + self._reserved, total, self.max_bytes)
            self._reserved += total
        names: list[str] = []
        try:
            return self._write(snap, names)
        finally:
            with self._lock:  # the reservation and the in-progress file go together: counted once
                self._reserved -= total
                self._writing.difference_update(names)

    def discard(self, name: str) -> None:
        """Remove an export no caller will claim (the call ended before its answer was sent)."""
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.directory / name)

    def sweep(self, now: float | None = None) -> int:
        """Remove export files older than ``ORPHAN_SECONDS``; return the bytes of those left."""
        cutoff = (time.time() if now is None else now) - ORPHAN_SECONDS
        removed, left = 0, 0
        try:
            entries = list(os.scandir(self.directory))
        except OSError as exc:
            raise self._unusable(exc) from None
        for entry in entries:
            if not entry.name.startswith(SHM_FILE_PREFIX) or entry.name in self._writing:
                continue  # an export being written is counted once, by its reservation
            try:
                stat = entry.stat(follow_symlinks=False)
                if stat.st_mtime < cutoff:
                    os.unlink(entry.path)
                    removed += 1
                else:
                    left += stat.st_size
            except FileNotFoundError:  # its worker claimed it meanwhile
                continue
        if removed:
            log.warning("removed %d shared-memory snapshot file(s) no worker claimed", removed)
        return left

    def _prepare(self) -> None:
        prepare_private_dir(self.directory, self._unusable)

    def _write(self, snap: SnapshotStream, names: list[str]) -> str:
        try:
            with self._lock:  # registered before sweep() can see it
                fd, path = tempfile.mkstemp(prefix=SHM_FILE_PREFIX, dir=self.directory)
                self._writing.add(os.path.basename(path))
                names.append(os.path.basename(path))
        except OSError as exc:
            raise self._unusable(exc) from None
        try:

            def write(seg: PlannedSegment, _fp16: int, payload: memoryview) -> None:
                if len(payload) != seg.size_bytes:
                    raise ChecksumMismatch(seg.key.hex(), f"{seg.size_bytes} bytes", f"{len(payload)} bytes")
                written = 0
                try:
                    while written < len(payload):  # write() into tmpfs: no page faults, unlike a mapping
                        written += os.write(fd, payload[written:])
                except OSError as exc:
                    raise self._unusable(exc) from None

            for _ in snap.map(write):
                pass
        except BaseException:
            os.unlink(path)
            raise
        finally:
            os.close(fd)
        return os.path.basename(path)

    def _unusable(self, exc: OSError) -> ResourceExhausted | NotConfigured:
        where = f"the shared-memory directory {self.directory}"
        if exc.errno in _FULL:
            return ResourceExhausted(
                f"cannot write a snapshot into {where}: {exc.strerror}",
                hint="give the directory more room (e.g. a larger /dev/shm), or read with GetSnapshot",
            )
        return NotConfigured(
            f"cannot use {where}: {exc.strerror}", hint="check --shm-dir: it must be a writable directory"
        )


def check_room(pending: int, total: int, max_bytes: int) -> None:
    """Refuse an export of ``total`` bytes when ``pending`` unclaimed ones leave no room."""
    if pending + total > max_bytes:
        raise ResourceExhausted(
            f"{pending} bytes of shared-memory exports are not yet claimed; {total} more would pass "
            f"the limit of {max_bytes}",
            hint="raise --shm-max-bytes, or read with GetSnapshot",
        )


def prepare_private_dir(directory: Path, unusable: Callable[[OSError], Exception]) -> None:
    """Create the shared directory 0700 if missing; refuse one that is not ours and private."""
    try:  # again on every export: a cleanup job may have removed the directory
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        st = os.lstat(directory)
    except OSError as exc:
        raise unusable(exc) from None
    # A directory someone else made (or can write) lets them read, replace or unlink an
    # export before its worker maps it: accept only our own, private one (not a link).
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid() or st.st_mode & 0o077:
        raise NotConfigured(
            f"the shared-memory directory {directory} is "
            + ("not a directory (a link?)" if not stat.S_ISDIR(st.st_mode) else
               f"mode {stat.S_IMODE(st.st_mode):o}, owner uid {st.st_uid}")
            + f"; it must be a directory of uid {os.geteuid()} with mode 700",
            hint="chmod 700 and chown it to the server's user, or let the server create it",
        )  # fmt: skip


def _start_sweeper(exporter: ShmExporter) -> None:
    """Sweep every ORPHAN_SECONDS / 2 while the exporter lives (a weak reference: no leak)."""
    ref = weakref.ref(exporter)
    stop = threading.Event()

    def run() -> None:
        while not stop.wait(ORPHAN_SECONDS / 2):
            target = ref()
            if target is None:
                return
            try:
                target.sweep()
            except (NotConfigured, ResourceExhausted) as exc:
                log.warning("shared-memory sweep: %s", exc.message)
            del target

    weakref.finalize(exporter, stop.set)
    threading.Thread(target=run, name="deltastore-shm-sweeper", daemon=True).start()
