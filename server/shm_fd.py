"""Shared-memory export with a per-caller boundary: a sealed memfd handed over a unix socket.

``--shm-mode file`` (``deltastore.server.shm``) writes each export into a file of the shared
directory: any process of the server's user that mounts it can open, read or unlink the file
before its worker maps it. ``--shm-mode memfd`` leaves nothing in the directory but a unix socket
(``SHM_FD_SOCKET``): GetSnapshotShm (and GetPrefixShm) writes the verified payloads into an
anonymous memory file (``memfd_create``), seals it against writing, growing and shrinking, and
answers a one-time random token (128 bits) in place of a file name. Only the caller of that
(authenticated) call learns it; its worker connects to the socket, sends the token and receives
the file descriptor (``SCM_RIGHTS``); the token is then gone. A process of another tenant that
lists the directory finds nothing to open, and guessing a token is hopeless. Unclaimed exports are closed after
``ORPHAN_SECONDS`` and count against ``max_bytes`` meanwhile.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import secrets
import socket
import threading
import time
from pathlib import Path

from deltastore.errors import ChecksumMismatch, NotConfigured, ResourceExhausted
from deltastore.server.shm import ORPHAN_SECONDS, check_room, prepare_private_dir
from deltastore.store import PlannedSegment, SnapshotStream
from deltastore.v1.protocol import SHM_FD_PREFIX, SHM_FD_SOCKET

__all__ = ["SEALS", "MemfdExporter"]

log = logging.getLogger(__name__)

SEALS = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE | fcntl.F_SEAL_SEAL
"""Seals every export carries: nobody (the server included) can change it once handed out."""
_TOKEN_CHARS = 32


class MemfdExporter:
    """Exports snapshots as sealed memfds claimed with one-time tokens over a unix socket.

    Args:
        directory: the shared directory (checked as for file exports: the server's own, 0700).
        max_bytes: the most bytes of unclaimed exports (and exports in progress) at once.
    """

    def __init__(self, directory: str | Path, max_bytes: int) -> None:
        self.directory = Path(directory)
        self.max_bytes = max_bytes
        prepare_private_dir(self.directory, self._unusable)  # the same checks as for files
        self._lock = threading.Lock()
        self._pending: dict[str, tuple[int, int, float]] = {}  # token -> (fd, bytes, created)
        self._reserved = 0
        self.path = self.directory / SHM_FD_SOCKET
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)  # a socket left by a previous run
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o177)  # the socket is 0600: the server's user only
        try:
            self._sock.bind(str(self.path))
        finally:
            os.umask(old)
        self._sock.listen(64)
        self._closed = threading.Event()
        threading.Thread(target=self._serve, name="deltastore-shm-fd", daemon=True).start()

    def _unusable(self, exc: OSError) -> NotConfigured:
        return NotConfigured(f"cannot use the shared-memory directory {self.directory}: {exc.strerror}")

    def export(self, snap: SnapshotStream) -> str:
        """Write the payloads of ``snap`` into a sealed memfd; return the token that claims it."""
        total = snap.payload_bytes
        with self._lock:
            self._sweep_locked()
            check_room(
                sum(size for _, size, _ in self._pending.values()) + self._reserved, total, self.max_bytes
            )
            self._reserved += total
        fd = -1
        try:
            fd = os.memfd_create("deltastore-snapshot", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)

            def write(seg: PlannedSegment, _fp16: int, payload: memoryview) -> None:
                if len(payload) != seg.size_bytes:
                    raise ChecksumMismatch(seg.key.hex(), f"{seg.size_bytes} bytes", f"{len(payload)} bytes")
                written = 0
                while written < len(payload):
                    written += os.write(fd, payload[written:])

            for _ in snap.map(write):
                pass
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, SEALS)
            token = secrets.token_hex(_TOKEN_CHARS // 2)
            with self._lock:
                self._pending[token] = (fd, total, time.monotonic())
            fd = -1
            return SHM_FD_PREFIX + token
        except OSError as exc:
            raise ResourceExhausted(f"cannot make a shared-memory export: {exc.strerror}") from None
        finally:
            if fd >= 0:
                os.close(fd)
            with self._lock:
                self._reserved -= total

    def discard(self, name: str) -> None:
        """Close an export no caller will claim."""
        with self._lock:
            entry = self._pending.pop(name.removeprefix(SHM_FD_PREFIX), None)
        if entry is not None:
            os.close(entry[0])

    def close(self) -> None:
        self._closed.set()
        with contextlib.suppress(OSError):
            self._sock.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
        with self._lock:
            fds = [fd for fd, _, _ in self._pending.values()]
            self._pending.clear()
        for fd in fds:
            os.close(fd)

    def _sweep_locked(self) -> None:
        cutoff = time.monotonic() - ORPHAN_SECONDS
        old = [t for t, (_, _, created) in self._pending.items() if created < cutoff]
        for token in old:
            os.close(self._pending.pop(token)[0])
        if old:
            log.warning("closed %d shared-memory export(s) no worker claimed", len(old))

    def _serve(self) -> None:
        while not self._closed.is_set():
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            with conn:
                try:
                    conn.settimeout(5)
                    token = conn.recv(_TOKEN_CHARS + 2).strip().decode("ascii", "replace")
                    with self._lock:
                        self._sweep_locked()
                        entry = self._pending.pop(token, None)
                    if entry is None:
                        conn.sendall(b"0")  # unknown, claimed already, or expired: nothing revealed
                        continue
                    try:
                        socket.send_fds(conn, [b"1"], [entry[0]])
                    finally:
                        os.close(entry[0])
                except OSError as exc:
                    log.warning("shared-memory hand-over failed: %s", exc)
