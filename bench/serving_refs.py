"""The serving benchmark's processes and ceilings: a DeltaStore server, a raw gRPC byte stream, memcpy.

Ceilings are measured in the same run as the service, on the same bytes, so every throughput is
reported as a ratio to what the machine and the transport can do at that moment. The raw stream
is a bare gRPC service in its own process that moves opaque 1 MiB messages with no framing,
protobuf, digest or storage: the best any gRPC service in Python can do with those bytes.

``python -m deltastore.bench.serving_refs`` runs that raw stream server and prints its port.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from concurrent import futures
from pathlib import Path

from deltastore.errors import InvalidArgument

__all__ = ["RawStream", "ServerProcess", "disk_sync_seconds", "memcpy_gbps", "process_rss_bytes"]

_RAW_SERVICE = "deltastore.bench.RawStream"
_READY = re.compile(rb"grpc=(\S+) http=(\S+)")
_START_TIMEOUT_S = 60.0


def process_rss_bytes(pid: int) -> dict[str, int]:
    """Resident set of a process: current (VmRSS) and peak (VmHWM), in bytes (Linux /proc)."""
    out = {"rss_bytes": 0, "peak_rss_bytes": 0}
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return out
    for line in text.splitlines():
        name, _, value = line.partition(":")
        if name in ("VmRSS", "VmHWM"):
            out["rss_bytes" if name == "VmRSS" else "peak_rss_bytes"] = int(value.split()[0]) * 1024
    return out


def _read_ready_line(proc: subprocess.Popen[bytes], what: str) -> bytes:
    """The first stdout line of a child process, or an error with its stderr if it died first."""
    if proc.stdout is None:
        raise InvalidArgument(f"{what}: started without a stdout pipe")
    line = proc.stdout.readline()
    if not line:
        err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
        proc.wait(timeout=5)
        raise InvalidArgument(f"{what} did not start (exit {proc.returncode}): {err[-2000:]}")
    return line


def terminate(proc: subprocess.Popen[bytes], *, grace_s: float) -> None:
    """SIGTERM a child, give it ``grace_s`` to drain, then kill it; close its pipes."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    for stream in (proc.stdout, proc.stderr):
        if stream is not None:
            stream.close()


class ServerProcess:
    """``deltastore serve`` in a child process over a fresh LMDB directory, on free ports.

    Args:
        block_size: tokens per aligned block (``DELTASTORE_BLOCK_SIZE``); None keeps the default.
        env: extra ``DELTASTORE_*`` settings.

    Attributes:
        shm_dir: its shared-memory directory for GetSnapshotShm (in ``/dev/shm`` where there is one).
    """

    def __init__(self, *, block_size: int | None = None, env: dict[str, str] | None = None) -> None:
        self._tmp = tempfile.TemporaryDirectory(prefix="deltastore-bench-")
        self.data_dir = Path(self._tmp.name) / "data"
        shm_root = "/dev/shm" if os.path.isdir("/dev/shm") else None
        self._shm = tempfile.TemporaryDirectory(prefix="deltastore-bench-shm-", dir=shm_root)
        self.shm_dir = self._shm.name
        # The benchmark's own private server, read by clients over TCP loopback: trust those for
        # shared memory (a production server serves it on its unix socket only).
        child_env = dict(
            os.environ, DELTASTORE_SHM_DIR=self.shm_dir, DELTASTORE_SHM_PEERS="loopback", **(env or {})
        )
        if block_size is not None:
            child_env["DELTASTORE_BLOCK_SIZE"] = str(block_size)
        cmd = [sys.executable, "-m", "deltastore", "serve", "--data-dir", str(self.data_dir)]
        cmd += ["--grpc", "127.0.0.1:0", "--http", "", "--log-level", "WARNING"]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=child_env)
        try:
            match = _READY.search(_read_ready_line(self.proc, "deltastore serve"))
            if match is None:
                raise InvalidArgument("deltastore serve printed no address line")
            self.target = match.group(1).decode()
        except BaseException:
            self.cleanup()
            raise

    def rss(self) -> dict[str, int]:
        return process_rss_bytes(self.proc.pid)

    def stop(self) -> None:
        """Drain (SIGTERM) and wait; the data directory stays until :meth:`cleanup`."""
        terminate(self.proc, grace_s=30)

    def cleanup(self) -> None:
        self.stop()
        self._tmp.cleanup()
        self._shm.cleanup()

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.cleanup()


def memcpy_gbps(nbytes: int, *, repeats: int = 5) -> float:
    """Best-of memcpy rate in GB/s (1e9 bytes/s) for a buffer of ``nbytes``."""
    import torch

    src = torch.ones(nbytes, dtype=torch.uint8)
    dst = torch.empty_like(src)
    dst.copy_(src)  # fault the pages in before timing
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - t0)
    return nbytes / best / 1e9


def disk_sync_seconds(payloads: Sequence[bytes]) -> float:
    """Seconds to write these bytes to a new file and fdatasync it.

    The file lives where the benchmark's server keeps its data (the temp directory): the floor of
    a durable put, which commits with one fdatasync. Virtual disks absorb a burst in a write-back
    cache and then slow down, so measure it next to what it is compared with.
    """
    with tempfile.NamedTemporaryFile(prefix="deltastore-bench-disk-") as f:
        t0 = time.perf_counter()
        for p in payloads:
            f.write(p)
        f.flush()
        os.fdatasync(f.fileno())
        return time.perf_counter() - t0


# -- raw gRPC byte stream ------------------------------------------------------------------------


def _serve_raw() -> None:
    """Run the raw stream service until SIGTERM: Sink counts a client stream, Source sends one."""
    import threading

    import grpc

    def sink(requests: Iterator[bytes], _context: grpc.ServicerContext) -> bytes:
        return sum(len(r) for r in requests).to_bytes(8, "little")

    def source(request: bytes, _context: grpc.ServicerContext) -> Iterator[bytes]:
        total, chunk = int.from_bytes(request[:8], "little"), int.from_bytes(request[8:16], "little")
        block = os.urandom(chunk)
        for offset in range(0, total, chunk):
            yield block[: min(chunk, total - offset)]

    handler = grpc.method_handlers_generic_handler(
        _RAW_SERVICE,
        {
            "Sink": grpc.stream_unary_rpc_method_handler(sink),
            "Source": grpc.unary_stream_rpc_method_handler(source),
        },
    )
    limit = 64 << 20
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=4),
        options=[("grpc.max_receive_message_length", limit), ("grpc.max_send_message_length", limit)],
    )
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    print(f"raw-stream port={port}", flush=True)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    stop.wait()
    server.stop(1).wait()


class RawStream:
    """Client of the raw stream server (started in a child process by the constructor)."""

    def __init__(self) -> None:
        import grpc

        self.proc = subprocess.Popen(
            [sys.executable, "-m", "deltastore.bench.serving_refs"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        line = _read_ready_line(self.proc, "raw gRPC stream server")
        port = int(line.split(b"port=")[1])
        limit = 64 << 20
        self._channel = grpc.insecure_channel(
            f"127.0.0.1:{port}",
            [("grpc.max_receive_message_length", limit), ("grpc.max_send_message_length", limit)],
        )
        self._sink = self._channel.stream_unary(f"/{_RAW_SERVICE}/Sink")
        self._source = self._channel.unary_stream(f"/{_RAW_SERVICE}/Source")

    def send(self, payloads: Sequence[bytes], chunk: int) -> float:
        """Stream these payloads to the server cut into ``chunk``-byte messages; seconds taken.

        Messages are sliced as they are sent, as the DeltaStore client does.
        """
        total = sum(len(p) for p in payloads)
        messages = (bytes(memoryview(p)[o : o + chunk]) for p in payloads for o in range(0, len(p), chunk))
        t0 = time.perf_counter()
        got = int.from_bytes(self._sink(messages, timeout=600), "little")
        elapsed = time.perf_counter() - t0
        if got != total:
            raise InvalidArgument(f"raw stream server received {got} bytes of {total}")
        return elapsed

    def receive(self, total: int, chunk: int) -> float:
        """Stream ``total`` bytes from the server in ``chunk``-byte messages; seconds taken."""
        request = total.to_bytes(8, "little") + chunk.to_bytes(8, "little")
        t0 = time.perf_counter()
        got = sum(len(m) for m in self._source(request, timeout=600))
        elapsed = time.perf_counter() - t0
        if got != total:
            raise InvalidArgument(f"raw stream server sent {got} bytes of {total}")
        return elapsed

    def close(self) -> None:
        self._channel.close()
        terminate(self.proc, grace_s=10)

    def __enter__(self) -> RawStream:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()


if __name__ == "__main__":
    _serve_raw()
