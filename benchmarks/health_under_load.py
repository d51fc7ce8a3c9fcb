"""Health checks under scoring load: `/healthz` latency idle and while 1,000-event batches
are scored, on the memory store, against a real uvicorn server on loopback.

Why: a liveness probe that waits behind scoring gets a busy replica killed. Scoring runs
in the thread pool so the event loop stays free; this prints the probe's latency during
batches as a ratio of its idle latency (the ratio, not the milliseconds, is what carries
from one machine to another).

    python -m benchmarks.health_under_load [--batches 6] [--probes 200]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import uvicorn

from features.stores.local_server import free_port
from serving.api.app import create_app
from serving.settings import Settings

T0 = 1_794_999_960


def _batch(n: int, offset: int) -> list[dict[str, object]]:
    return [{"api_key": f"sk-bench-{i % 50}", "timestamp": T0 + (offset + i) * 0.01,
             "source_ip": f"198.51.100.{i % 200}", "tokens": 100 + i % 50,
             "latency_ms": 20.0, "endpoint": "/v1/chat/completions"} for i in range(n)]


def _probe(client: httpx.Client, url: str, n: int, stop: threading.Event | None = None
           ) -> list[float]:
    out = []
    for _ in range(n):
        if stop is not None and stop.is_set():
            break
        t = time.perf_counter()
        client.get(url)
        out.append((time.perf_counter() - t) * 1000)
        time.sleep(0.005)
    return out


def run(batches: int = 6, probes: int = 200) -> dict[str, float]:
    settings = Settings(secret="bench-secret-0123456789", data_dir=Path(tempfile.mkdtemp()),
                        event_log=False)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(settings), host="127.0.0.1", port=port,
                                           log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.05)
    try:
        with httpx.Client(timeout=60) as client:
            idle = _probe(client, base + "/healthz", probes)
            stop = threading.Event()
            loaded: list[float] = []

            def probe_loaded() -> None:
                with httpx.Client(timeout=60) as c:
                    loaded.extend(_probe(c, base + "/healthz", 100_000, stop))

            prober = threading.Thread(target=probe_loaded)
            t = time.perf_counter()
            prober.start()
            for b in range(batches):
                r = client.post(base + "/v1/events:batch", json=_batch(1000, b * 1000))
                r.raise_for_status()
            batch_s = (time.perf_counter() - t) / batches
            stop.set()
            prober.join()
    finally:
        server.should_exit = True
        thread.join(timeout=10)
    result = {"idle_p50_ms": float(np.percentile(idle, 50)),
              "loaded_p50_ms": float(np.percentile(loaded, 50)),
              "loaded_p99_ms": float(np.percentile(loaded, 99)),
              "batch_s": batch_s, "probes_during_load": len(loaded)}
    result["loaded_over_idle_p50"] = result["loaded_p50_ms"] / result["idle_p50_ms"]
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, default=6)
    parser.add_argument("--probes", type=int, default=200)
    args = parser.parse_args()
    print(json.dumps(run(args.batches, args.probes), indent=2))


if __name__ == "__main__":
    main()
