"""A small keep-alive HTTP/1.1 load generator for loopback benchmarks.

Each of `concurrency` connections sends its next request as soon as the previous answer
arrives, for a fixed number of requests. The same client drives both the service and the
baseline endpoint, so their ratio is fair even though the client shares the machine.
Requests go only to the given loopback host and port, and the run is bounded in count.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np


@dataclass(slots=True)
class LoadResult:
    requests: int
    errors: int
    seconds: float
    latencies_ms: list[float]

    @property
    def rps(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0

    def pct(self, q: float) -> float:
        return float(np.percentile(self.latencies_ms, q)) if self.latencies_ms else 0.0

    @classmethod
    def merge(cls, parts: list[LoadResult]) -> LoadResult:
        """Several runs against one server as one: their requests over their summed time."""
        return cls(sum(p.requests for p in parts), sum(p.errors for p in parts),
                   sum(p.seconds for p in parts),
                   [ms for p in parts for ms in p.latencies_ms])

    def as_dict(self) -> dict[str, float]:
        return {"requests": self.requests, "errors": self.errors,
                "requests_per_s": round(self.rps, 1), "p50_ms": round(self.pct(50), 3),
                "p99_ms": round(self.pct(99), 3)}


def _request(path: str, body: bytes, host: str, port: int) -> bytes:
    return (f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
            ).encode() + body


async def _read_response(reader: asyncio.StreamReader) -> int:
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    length = 0
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":", 1)[1])
    if length:
        await reader.readexactly(length)
    return status


async def _run(host: str, port: int, path: str, bodies: Callable[[int], bytes],
               total: int, concurrency: int, start: int) -> LoadResult:
    counter = iter(range(start, start + total))
    latencies: list[float] = []
    errors = 0

    async def worker() -> None:
        nonlocal errors
        reader, writer = await asyncio.open_connection(host, port)
        try:
            for i in counter:
                t0 = time.perf_counter()
                writer.write(_request(path, bodies(i), host, port))
                status = await _read_response(reader)
                latencies.append((time.perf_counter() - t0) * 1000)
                if status >= 400:
                    errors += 1
        finally:
            writer.close()

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return LoadResult(total, errors, time.perf_counter() - t0, latencies)


def run_load(host: str, port: int, path: str, bodies: Callable[[int], bytes], *,
             total: int, concurrency: int, start: int = 0) -> LoadResult:
    """Send `total` requests, bodies `start`, `start + 1`, … , over `concurrency`
    keep-alive connections."""
    if host not in ("127.0.0.1", "localhost", "::1"):
        raise ValueError("load tests only target loopback")
    return asyncio.run(_run(host, port, path, bodies, total, concurrency, start))


def json_bodies(payloads: list[dict[str, object]]) -> Callable[[int], bytes]:
    encoded = [json.dumps(p).encode() for p in payloads]
    return lambda i: encoded[i % len(encoded)]
