"""Security: raw API keys never come to rest anywhere; ingestion has size and token guards."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from fastapi.testclient import TestClient

from features.stores.local_server import LocalRedisServer
from serving.api.app import create_app
from serving.cli.worker import WorkerConfig, build_worker
from tests.conftest import make_settings

T0 = 1_794_999_960
RAW_KEYS = [f"sk-live-RAWSECRET{i}-9f8e7d6c5b4a39281706" for i in range(4)]
MARKERS = [k.encode() for k in RAW_KEYS] + [b"RAWSECRET"]


def ev(i: int, key: str) -> dict[str, object]:
    return {"api_key": key, "timestamp": T0 + i * 0.05, "source_ip": f"203.0.113.{i % 5}",
            "endpoint": "/v1/chat/completions", "tokens": 300, "latency_ms": 90.0,
            "user_agent": "gw/1.0", "event_id": f"sec-{i}"}


def _leaks(blob: bytes) -> list[bytes]:
    return [m for m in MARKERS if m in blob]


def scan_files(root: Path) -> dict[str, list[bytes]]:
    """Every file under root (event log, spool, snapshot, rejected writes...)."""
    found = {}
    for path in root.rglob("*"):
        if path.is_file():
            hits = _leaks(path.read_bytes())
            if hits:
                found[str(path.relative_to(root))] = hits
    return found


def scan_redis(client: redis.Redis) -> tuple[int, dict[str, list[bytes]]]:
    """Every key name and value in every database in use (SCAN + DUMP + typed reads)."""
    found: dict[str, list[bytes]] = {}
    keys = 0
    for key in client.scan_iter(count=1000):
        keys += 1
        parts: list[bytes] = [key, client.dump(key) or b""]
        kind = client.type(key)
        if kind == b"string":
            parts.append(client.get(key) or b"")
        elif kind == b"hash":
            for f, v in client.hgetall(key).items():
                parts += [f, v]
        elif kind == b"zset":
            parts += [m for m, _ in client.zrange(key, 0, -1, withscores=True)]
        elif kind == b"list":
            parts += client.lrange(key, 0, -1)
        elif kind == b"set":
            parts += list(client.smembers(key))
        elif kind == b"stream":
            for _, fields in client.xrange(key):
                for f, v in fields.items():
                    parts += [f, v]
        hits = _leaks(b"\0".join(parts))
        if hits:
            found[key.decode(errors="replace")] = hits
    return keys, found


def _runaway(c: TestClient, key: str) -> list[str]:
    """A key in a loop: 3,100 calls in 31 s gets it throttled (volume alone never bans);
    then the key is tried with others from one address, which gets the address banned."""
    texts = []
    for start in range(0, 3100, 1000):
        batch = [{**ev(0, key), "timestamp": T0 + i * 0.01, "event_id": f"loop-{i}"}
                 for i in range(start, min(3100, start + 1000))]
        r = c.post("/v1/events:batch", json=batch)
        assert r.status_code == 200, r.text
        texts.append(r.text)
    assert '"throttle"' in texts[-1]
    stuffing = [{**ev(0, key if i == 0 else f"{key}-guess-{i}"), "timestamp": T0 + 40 + i,
                 "status": 401, "source_ip": "203.0.113.99", "event_id": f"guess-{i}"}
                for i in range(30)]
    r = c.post("/v1/events:batch", json=stuffing)
    assert r.status_code == 200, r.text
    texts.append(r.text)
    assert '"block"' in texts[-1]
    return texts


def _send_traffic(c: TestClient, start: int, n: int) -> list[str]:
    texts = []
    for i in range(start, start + n, 50):
        r = c.post("/v1/events:batch", json=[ev(j, RAW_KEYS[j % 4]) for j in range(i, i + 50)])
        assert r.status_code == 200, r.text
        texts.append(r.text)
    for i in range(start, start + 20):
        r = c.post("/v1/events", json=ev(i, RAW_KEYS[i % 4]))
        assert r.status_code == 200
        texts.append(r.text)
    return texts


@pytest.fixture
def all_logs(caplog: pytest.LogCaptureFixture) -> Iterator[pytest.LogCaptureFixture]:
    with caplog.at_level(logging.DEBUG):
        yield caplog


def test_no_raw_key_anywhere_with_the_memory_store(
        tmp_path: Path, all_logs: pytest.LogCaptureFixture) -> None:
    settings = make_settings(data_dir=tmp_path)
    with TestClient(create_app(settings)) as c:
        texts = _send_traffic(c, 0, 1000) + _runaway(c, RAW_KEYS[0])
    assert (tmp_path / "state.snapshot").exists()
    assert list((tmp_path / "events").rglob("*.jsonl"))
    assert scan_files(tmp_path) == {}
    assert not _leaks("\n".join(texts).encode())
    assert not _leaks(all_logs.text.encode())


def test_no_raw_key_anywhere_with_redis_through_an_outage_and_the_worker(
        tmp_path: Path, all_logs: pytest.LogCaptureFixture) -> None:
    server = LocalRedisServer().start()
    try:
        settings = make_settings(store=server.url, data_dir=tmp_path,
                                 redis_retry_interval_s=0.1)
        with TestClient(create_app(settings)) as c:
            texts = _send_traffic(c, 0, 500) + _runaway(c, RAW_KEYS[1])
            server.kill()
            texts += _send_traffic(c, 1000, 500)  # spooled to disk meanwhile
            spool_files = list((tmp_path / "spool").rglob("seg-*.jsonl"))
            assert spool_files and sum(p.stat().st_size for p in spool_files) > 10_000
            assert scan_files(tmp_path) == {}  # the spool holds key ids, never keys
            server.start()
            store = c.app.state.scorer.store  # type: ignore[attr-defined]
            deadline = time.monotonic() + 15
            while store.status()["state"] != "ok" and time.monotonic() < deadline:
                time.sleep(0.05)
            assert store.status()["state"] == "ok"
            texts += _send_traffic(c, 2000, 500)
        # the stream path: raw events sit in kw:events only until they are scored
        client = redis.Redis.from_url(server.url)
        for i in range(3500, 3700):
            client.xadd("kw:events", {"event": json.dumps(ev(i, RAW_KEYS[i % 4]))})
        assert set(scan_redis(client)[1]) == {"kw:events"}  # the scan does see raw keys
        worker = build_worker(settings, WorkerConfig(consumer="sec", block_ms=50))
        stats = worker.run(idle_exit_s=0.3)
        worker.store.close()
        assert stats.scored == 200
        n_keys, leaks = scan_redis(client)
        assert n_keys > 20 and leaks == {}
        assert scan_files(tmp_path) == {}
        assert not _leaks("\n".join(texts).encode())
        assert not _leaks(all_logs.text.encode())
    finally:
        server.close()


# ---- size limits and the ingestion token ---------------------------------------------------
def test_oversized_bodies_are_refused_with_413_on_both_endpoints(tmp_path: Path) -> None:
    settings = make_settings(data_dir=tmp_path, max_body_bytes=2000, event_log=False)
    with TestClient(create_app(settings)) as c:
        small = ev(0, "sk-size")
        assert c.post("/v1/events", json=small).status_code == 200
        big = {**small, "user_agent": "x" * 1990}
        r = c.post("/v1/events", json=big)
        assert r.status_code == 413 and "2000 bytes" in r.json()["error"]
        r = c.post("/v1/events:batch", json=[small] * 20)
        assert r.status_code == 413
        # a chunked body without Content-Length is cut off while it streams in
        body = json.dumps(big).encode()
        chunks = iter([body[i:i + 500] for i in range(0, len(body), 500)])
        r = c.post("/v1/events", content=chunks, headers={"content-type": "application/json"})
        assert r.status_code == 413
        chunks = iter([json.dumps([small] * 20).encode()])
        r = c.post("/v1/events:batch", content=chunks,
                   headers={"content-type": "application/json"})
        assert r.status_code == 413
        assert c.post("/v1/events:batch", json=[small] * 3).status_code == 200


def test_the_ingestion_token_is_required_when_set(tmp_path: Path) -> None:
    token = "ingest-token-5e2b9c0d7a41"
    settings = make_settings(data_dir=tmp_path, ingest_token=token, event_log=False)
    good = {"Authorization": f"Bearer {token}"}
    with TestClient(create_app(settings)) as c:
        for path, body in (("/v1/events", ev(0, "sk-tok")),
                           ("/v1/events:batch", [ev(1, "sk-tok")])):
            r = c.post(path, json=body)
            assert r.status_code == 401 and r.headers["www-authenticate"].startswith("Bearer")
            assert c.post(path, json=body, headers={"Authorization": "Bearer nope"}
                          ).status_code == 401
            assert c.post(path, json=body, headers={"Authorization": token}).status_code == 401
            assert c.post(path, json=body, headers=good).status_code == 200
        # health checks stay open for the orchestrator
        assert c.get("/healthz").status_code == 200
        assert c.get("/readyz").status_code == 200
        assert "ingest_token" not in repr(settings) or token not in repr(settings)
