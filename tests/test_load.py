"""A bounded load test against a real uvicorn server process: no errors, no lost events,
flat memory. Bounded in requests and in time: the request count is sized from a short
warm-up so the measured part lasts about 20 s however busy the machine is."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from benchmarks.http_load import run_load
from features.stores.local_server import free_port
from serving.engine.event_log import read_event_log
from tests.conftest import TEST_SECRET

ROOT = Path(__file__).resolve().parents[1]
CONCURRENCY = 32
TARGET_S = 20.0
MAX_REQUESTS = 60_000
RSS_GROWTH_LIMIT_KB = 30 * 1024


def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def make_bodies(n: int, offset: int) -> list[bytes]:
    """Distinct events: 400 keys from 250 addresses, each with its own event id."""
    now = time.time()
    return [json.dumps({
        "api_key": f"sk-load-{i % 400}", "event_id": f"load-{offset + i}",
        "timestamp": now - 60 + (i % 6000) * 0.01, "source_ip": f"10.{i % 250}.0.1",
        "endpoint": "/v1/chat/completions", "tokens": 200 + i % 300,
        "latency_ms": 50.0 + i % 40, "status": 200 if i % 50 else 500,
    }).encode() for i in range(n)]


@pytest.mark.slow
def test_sustained_load_has_no_errors_no_lost_events_and_flat_memory(tmp_path: Path) -> None:
    port = free_port()
    env = {**os.environ, "KEYWATCH_SECRET": TEST_SECRET, "KEYWATCH_DATA_DIR": str(tmp_path),
           "KEYWATCH_STORE": "memory", "PYTHONPATH": str(ROOT)}
    # the server's log goes to a file: a pipe nobody reads fills up, and a service whose
    # log writes block stops answering
    server_log = (tmp_path / "server.log").open("wb")
    server = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "--factory", "serving.api.app:app_from_env",
         "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning"],
        env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=server_log)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert server.poll() is None, (tmp_path / "server.log").read_text()
            assert time.monotonic() < deadline, "server did not start"
            time.sleep(0.1)

        sent = 0

        def phase(n: int) -> tuple[int, float]:
            nonlocal sent
            bodies = make_bodies(n, sent)
            result = run_load("127.0.0.1", port, "/v1/events", lambda i: bodies[i],
                              total=n, concurrency=CONCURRENCY)
            sent += n
            assert result.errors == 0
            return n, result.rps

        _, rps = phase(2000)  # warm-up, and how fast this machine is right now
        total = int(min(MAX_REQUESTS, max(6000, rps * TARGET_S)))
        phase(total // 3)
        rss_third = rss_kb(server.pid)
        t0 = time.monotonic()
        _, rps_end = phase(total - total // 3)
        rss_end = rss_kb(server.pid)
        took = time.monotonic() - t0
    finally:
        server.send_signal(signal.SIGTERM)  # graceful: the event log is flushed
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait(timeout=10)
        server_log.close()

    logged = read_event_log(tmp_path / "events")
    assert len(logged) == sent  # no lost events
    assert len({r["event_id"] for r in logged}) == sent
    assert rss_end - rss_third < RSS_GROWTH_LIMIT_KB, (rss_third, rss_end)
    print(json.dumps({"requests": sent, "rps_last_phase": round(rps_end),
                      "last_phase_s": round(took, 1), "rss_third_mb": round(rss_third / 1024),
                      "rss_end_mb": round(rss_end / 1024)}))
