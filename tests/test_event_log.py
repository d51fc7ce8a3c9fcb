"""The event log: every accepted event, no raw key, day partitions, disk failures survived."""

from __future__ import annotations

import json
from pathlib import Path

from fastapi.testclient import TestClient

from features.contract import Event
from serving.api.app import create_app
from serving.engine.event_log import EventLog, read_event_log
from tests.conftest import make_settings

T0 = 1_794_999_960


def test_served_events_are_logged_without_the_raw_key(tmp_path: Path) -> None:
    settings = make_settings(data_dir=tmp_path)
    with TestClient(create_app(settings)) as client:
        client.post("/v1/events", json={"api_key": "sk-live-logged", "timestamp": T0,
                                        "tokens": 5})
        client.post("/v1/events:batch", json=[
            {"api_key": "sk-live-logged", "timestamp": T0 + 86400, "tokens": 6},
            {"api_key": "sk-live-other", "timestamp": T0 + 1, "tokens": 7}])
        client.post("/v1/events", json={"api_key": "sk-live-logged", "tokens": -1})  # refused
    records = read_event_log(tmp_path / "events")
    assert [r["tokens"] for r in records] == [5, 7, 6]
    assert all(r["key_id"].startswith("k_") and "api_key" not in r for r in records)
    parts = sorted(p.name for p in (tmp_path / "events").iterdir())
    assert parts == ["date=2026-11-18", "date=2026-11-19"]
    for path in (tmp_path / "events").rglob("*.jsonl"):
        assert "sk-live" not in path.read_text()


def test_a_failing_disk_loses_nothing_and_recovers(tmp_path: Path) -> None:
    blocker = tmp_path / "events"
    blocker.write_text("not a directory")  # every write into events/ now fails
    elog = EventLog(blocker, flush_interval_s=3600)
    for i in range(10):
        elog.append(Event(api_key="sk", timestamp=T0 + i, tokens=i), "k_x")
    assert elog.flush() is False
    assert elog.status()["buffered"] == 10 and elog.write_errors == 1
    assert not elog.healthy and "Error" in (elog.last_error or "")
    blocker.unlink()
    assert elog.flush() is True
    assert [r["tokens"] for r in read_event_log(blocker)] == list(range(10))
    assert elog.healthy


def test_retention_prunes_old_partitions(tmp_path: Path) -> None:
    elog = EventLog(tmp_path, retention_days=2)
    for day in range(5):
        elog.append(Event(api_key="sk", timestamp=T0 + day * 86400), "k_x")
    elog.flush()
    removed = elog.prune(now=T0 + 4 * 86400 + 60)
    assert removed == ["date=2026-11-18", "date=2026-11-19"]
    assert len(read_event_log(tmp_path)) == 3


def test_a_torn_line_is_skipped(tmp_path: Path) -> None:
    part = tmp_path / "date=2026-11-18"
    part.mkdir()
    (part / "events-1.jsonl").write_text(json.dumps({"timestamp": T0, "key_id": "k"})
                                         + "\n{\"timest")
    assert len(read_event_log(tmp_path)) == 1
