"""Restarts: bans, counters and baselines survive a restart of the service."""

from __future__ import annotations

import hashlib
import json
import logging
import pickle
import random
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from features.stores.base import EntityOps
from features.stores.memory import MemoryStore
from features.stores.snapshot import MAGIC, SnapshotError
from serving.api.app import create_app
from serving.settings import Settings
from tests.conftest import ADMIN_TOKEN, make_settings
from tests.test_stores import random_ops

T0 = 1_794_999_960


def ev(i: int, key: str, **kw: object) -> dict[str, object]:
    return {"api_key": key, "timestamp": T0 + i * 0.01, "source_ip": "81.2.69.160",
            "endpoint": "/v1/chat/completions", "tokens": 420, "latency_ms": 800.0, **kw}


def fill(store: MemoryStore, seed: int, n: int = 300) -> None:
    rng = random.Random(seed)
    for i in range(n):
        req = EntityOps(rng.choice(["k", "ip"]), f"e{rng.randint(0, 30)}")
        req.ops.extend(random_ops(rng, 1_700_000_000.0 + i * 7))
        store.execute([req])


def test_a_snapshot_restores_exactly_the_same_state(tmp_path: Path) -> None:
    before = MemoryStore()
    fill(before, seed=1)
    path = tmp_path / "state.snapshot"
    assert before.snapshot(path) == len(before)
    after = MemoryStore()
    assert after.restore(path) == len(before)
    # the same further operations give the same results on both
    rng_a, rng_b = random.Random(7), random.Random(7)
    for i in range(200):
        ts = 1_700_003_000.0 + i
        a = EntityOps("k", f"e{rng_a.randint(0, 30)}", random_ops(rng_a, ts))
        b = EntityOps("k", f"e{rng_b.randint(0, 30)}", random_ops(rng_b, ts))
        assert before.execute([a]) == after.execute([b])
    assert list(before._entities) == list(after._entities)  # LRU order kept too
    assert not list(tmp_path.glob(".*tmp"))  # no temp file left behind


def test_a_corrupt_or_foreign_snapshot_is_refused(tmp_path: Path) -> None:
    store = MemoryStore()
    fill(store, seed=2, n=50)
    path = tmp_path / "state.snapshot"
    store.snapshot(path)
    good = path.read_bytes()

    target = MemoryStore()
    flipped = bytearray(good)
    flipped[-10] ^= 0xFF
    path.write_bytes(bytes(flipped))
    with pytest.raises(SnapshotError, match="SHA-256"):
        target.restore(path)
    path.write_bytes(good[: len(good) // 2])  # truncated
    with pytest.raises(SnapshotError, match="corrupt"):
        target.restore(path)
    path.write_bytes(b"hello")
    with pytest.raises(SnapshotError, match="not a keywatch snapshot"):
        target.restore(path)
    # a correctly hashed file that smuggles a callable is refused before it can run
    evil = pickle.dumps({"newest_ts": 0.0, "entities": [], "x": print})
    header = json.dumps({"format": 1, "sha256": hashlib.sha256(evil).hexdigest()}).encode()
    path.write_bytes(MAGIC + header + b"\n" + evil)
    with pytest.raises(SnapshotError, match="only plain values"):
        target.restore(path)
    assert len(target) == 0  # untouched by every refused file


AUTH = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


def _runaway(c: TestClient, key: str, n: int) -> list[dict[str, object]]:
    decisions: list[dict[str, object]] = []
    for start in range(0, n, 1000):
        batch = [ev(i, key) for i in range(start, min(n, start + 1000))]
        r = c.post("/v1/events:batch", json=batch)
        assert r.status_code == 200, r.text
        decisions.extend(r.json())
    return decisions


def _restart_check(settings: Settings) -> None:
    with TestClient(create_app(settings)) as c:
        # volume alone throttles and never bans (issue 17): the ban is an operator's act
        assert c.post("/v1/events", json=ev(0, "sk-restart-banned")).json()["decision"] == "allow"
        r = c.post("/admin/bans", json={"key": "sk-restart-banned", "duration": "24h",
                                        "reason": "leaked"}, headers=AUTH)
        assert r.status_code == 200, r.text
        busy = _runaway(c, "sk-restart-busy", 700)  # throttled by its 1-minute count
        assert busy[-1]["decision"] == "throttle"
    with TestClient(create_app(settings)) as c:  # a new process, same state
        later = c.post("/v1/events", json=ev(60_000, "sk-restart-banned")).json()
        assert later["decision"] == "block" and later["reasons"][0]["code"] == "banned_key"
        # the counters came back too: one more call in the same minute is still throttled
        again = c.post("/v1/events", json=ev(701, "sk-restart-busy")).json()
        assert again["decision"] == "throttle", again
        fresh = c.post("/v1/events", json=ev(701, "sk-restart-new")).json()
        assert fresh["decision"] == "allow"


def test_bans_and_counters_survive_a_restart_with_the_memory_store(tmp_path: Path) -> None:
    settings = make_settings(data_dir=tmp_path, event_log=False)
    _restart_check(settings)
    assert (tmp_path / "state.snapshot").exists()


def test_redis_state_survives_a_restart_of_the_app(redis_url: str, tmp_path: Path) -> None:
    _restart_check(make_settings(store=redis_url, data_dir=tmp_path, event_log=False))
    assert not (tmp_path / "state.snapshot").exists()  # Redis keeps the state itself


def test_a_corrupt_snapshot_at_start_is_set_aside_and_the_app_starts_empty(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    (tmp_path / "state.snapshot").write_bytes(MAGIC + b'{"format": 1, "sha256": "00"}\nxx')
    settings = make_settings(data_dir=tmp_path, event_log=False)
    with caplog.at_level(logging.WARNING, logger="keywatch"), \
            TestClient(create_app(settings)) as c:
        assert c.post("/v1/events", json=ev(0, "sk-after-corrupt")).status_code == 200
    assert any("refusing the state snapshot" in r.getMessage() for r in caplog.records)
    assert len(list(tmp_path.glob("state.snapshot.corrupt-*"))) == 1
    store = MemoryStore()
    assert store.restore(tmp_path / "state.snapshot") >= 1  # a good one written at shutdown
