"""Two replicas on one Redis answer the same about alerts, feedback and decision stats, and
each alert reaches the webhook once (they used to keep all of it per process)."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient

from serving.api.app import create_app
from tests.conftest import ADMIN_TOKEN, make_settings
from tests.ops_servers import RecordingWebhook

AUTH = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


def failing_calls(key: int, t0: float) -> list[dict]:
    """60 refused logins on one key: 41 of them alert-worthy (failure_rate, medium). Of
    varied sizes: one identical request a second would be a runaway loop as well."""
    return [{"api_key": f"sk-shared-{key}", "timestamp": t0 + i, "status": 401,
             "source_ip": f"198.51.100.{i % 50}", "event_id": f"s{key}-{i}", "tokens": i}
            for i in range(60)]


@pytest.fixture
def replicas(store_url: str) -> Iterator[tuple[TestClient, TestClient, RecordingWebhook]]:
    with RecordingWebhook() as hook:
        settings = [make_settings(store=store_url, event_log=False, alert_webhook_url=hook.url)
                    for _ in range(2)]  # each replica its own data directory
        with TestClient(create_app(settings[0])) as a, TestClient(create_app(settings[1])) as b:
            yield a, b, hook


@pytest.fixture(params=["redis", "cluster"])
def store_url(request: pytest.FixtureRequest) -> str:
    """A single Redis, and a three-master Redis Cluster."""
    return request.getfixturevalue("redis_url" if request.param == "redis" else "cluster_url")


def _feed(a: TestClient, b: TestClient) -> None:
    t0 = time.time() - 600
    for key in range(3):
        events = failing_calls(key, t0)
        for n, start in enumerate(range(0, 60, 10)):  # batches alternate between replicas
            r = (a, b)[n % 2].post("/v1/events:batch", json=events[start:start + 10])
            assert r.status_code == 200


def _alerts(c: TestClient) -> list[tuple[str, str, int, str]]:
    body = c.get("/v1/alerts", headers=AUTH).json()
    return sorted((x["alert_id"], x["key_id"], x["count"], x["status"]) for x in body["alerts"])


def test_replicas_list_the_same_alerts_and_each_is_sent_once(replicas) -> None:  # type: ignore[no-untyped-def]
    a, b, hook = replicas
    _feed(a, b)
    on_a, on_b = _alerts(a), _alerts(b)
    assert on_a == on_b
    assert len(on_a) == 3 and {count for _, _, count, _ in on_a} == {41}
    assert hook.wait_for(3)
    time.sleep(0.3)  # a second send of the same alert would arrive by now
    raised = [body["alert"]["alert_id"] for body in hook.bodies if body["event"] == "raised"]
    assert sorted(raised) == sorted(alert_id for alert_id, *_ in on_a)


def test_feedback_on_one_replica_is_seen_by_the_other(replicas) -> None:  # type: ignore[no-untyped-def]
    a, b, _ = replicas
    _feed(a, b)
    alert_id, key_id, _, _ = _alerts(a)[0]
    r = a.post(f"/v1/alerts/{alert_id}/feedback", headers=AUTH,
               json={"verdict": "false_positive", "allowlist_rule": True, "note": "test"})
    assert r.status_code == 201, r.text
    statuses = {x[0]: x[3] for x in _alerts(b)}
    assert statuses[alert_id] == "false_positive"
    suppressed = b.get("/v1/suppressions", headers=AUTH).json()
    assert any(s["key_id"] == key_id for s in suppressed.get("suppressions", suppressed))


def test_decision_stats_count_every_replica(replicas) -> None:  # type: ignore[no-untyped-def]
    a, b, _ = replicas
    _feed(a, b)
    time.sleep(0.8)  # each replica sends its counts every half second
    series = [c.get("/v1/stats/decisions?bucket=60&buckets=30", headers=AUTH).json()
              for c in (a, b)]
    assert series[0]["totals"] == series[1]["totals"]
    assert series[0]["totals"]["events"] == 180


def test_a_replica_started_later_and_restarted_answers_the_same(replicas) -> None:  # type: ignore[no-untyped-def]
    a, b, _ = replicas
    _feed(a, b)
    alert_id = _alerts(a)[0][0]
    assert a.post(f"/v1/alerts/{alert_id}/feedback", headers=AUTH,
                  json={"verdict": "confirmed", "note": "seen"}).status_code == 201
    settings = make_settings(store=a.app.state.settings.store, event_log=False)  # type: ignore[attr-defined]
    for _ in range(2):  # a new replica, then the same one restarted
        with TestClient(create_app(settings)) as c:
            assert _alerts(c) == _alerts(a)
    lines = (settings.data_dir / "feedback.jsonl").read_text().splitlines()
    assert len(lines) == 1  # the log was read twice, the verdict kept once
