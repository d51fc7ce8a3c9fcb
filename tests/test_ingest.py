"""Live ingestion: a re-sent event changes nothing, and a client's clock cannot move a key's
windows. Run on the memory store and on a real Redis, through the real HTTP API."""

from __future__ import annotations

import io
import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from fastapi.testclient import TestClient

from features.stores.packed import ring_cells
from serving.api.app import create_app
from serving.engine.factory import build_scorer
from serving.engine.replay import replay
from serving.settings import Settings
from tests.conftest import make_settings
from tests.state_probe import redis_request_total

NOW = time.time()


def live_settings(store: str, **overrides: object) -> Settings:
    """The live service as shipped: the default skew bound (5 min ahead, 1 h behind)."""
    return make_settings(store=store, event_log=False, event_max_behind_s=3600.0, **overrides)


@pytest.fixture(params=["memory", "redis"])
def store(request: pytest.FixtureRequest) -> Iterator[str]:
    if request.param == "memory":
        yield "memory"
    else:
        yield request.getfixturevalue("redis_url")


def ev(i: int, key: str, *, t0: float, event_id: bool = True, **extra: object) -> dict:
    body: dict[str, object] = {"api_key": key, "timestamp": t0 + i * 0.01,
                               "source_ip": f"203.0.113.{i % 5}", "tokens": 200 + i % 7,
                               "endpoint": "/v1/chat/completions", "latency_ms": 30.0}
    if event_id:
        body["event_id"] = f"{key}-{i}"
    return {**body, **extra}


def counted(c: TestClient, store: str, key: str) -> float:
    """Requests the store holds for `key` (Redis: read raw; memory: the next event's view)."""
    scorer = c.app.state.scorer  # type: ignore[attr-defined]
    scorer.flush()
    if store != "memory":
        return redis_request_total(redis.Redis.from_url(store), key)
    probe = c.post("/v1/events", json=ev(0, key, t0=NOW, event_id=False, tokens=1))
    assert probe.status_code == 200
    state = scorer.store.export_state()
    key_id = probe.json()["key_id"]
    hour = next(s for kind, eid, s in state["entities"] if (kind, eid) == ("k", key_id))
    cells = ring_cells(hour["rings"]["requests:h"])
    return sum(v for _, _, v in cells) - 1  # less the probe itself


def test_a_resent_event_gets_the_first_decision_and_changes_nothing(store: str) -> None:
    with TestClient(create_app(live_settings(store))) as c:
        first = [c.post("/v1/events", json=ev(i, "sk-once", t0=NOW - 30)).json()
                 for i in range(40)]
        again = [c.post("/v1/events", json=ev(i, "sk-once", t0=NOW - 30)).json()
                 for i in range(40)]
        assert again == first
        assert counted(c, store, "sk-once") == 40


def test_a_retried_batch_is_applied_once(store: str) -> None:
    batch = [ev(i, f"sk-batch-{i % 3}", t0=NOW - 60) for i in range(120)]
    with TestClient(create_app(live_settings(store))) as c:
        first = c.post("/v1/events:batch", json=batch)
        assert first.status_code == 200
        for _ in range(3):  # the client's retries after a lost answer
            r = c.post("/v1/events:batch", json=batch)
            assert r.status_code == 200 and r.json() == first.json()
        assert [counted(c, store, f"sk-batch-{k}") for k in range(3)] == [40, 40, 40]


def test_a_repeat_on_another_replica_is_answered_from_the_store(redis_url: str) -> None:
    """On Redis a service sends an event's learning at once, the decision remembered
    with the key's claim among it: another replica answers a repeat with that decision."""
    with TestClient(create_app(live_settings(redis_url))) as a, \
            TestClient(create_app(live_settings(redis_url))) as b:
        body = ev(0, "sk-two-replicas", t0=NOW)
        first = a.post("/v1/events", json=body)
        again = b.post("/v1/events", json=body)
        assert again.status_code == 200 and again.json() == first.json()
        client = redis.Redis.from_url(redis_url)
        assert redis_request_total(client, "sk-two-replicas") == 1
        key_hash = f"kw:{{k:{first.json()['key_id']}}}:h"
        kept = client.hget(key_hash, f"_c:{body['event_id']}")
        assert kept is not None and b'"reasons"' not in kept  # defaults left out
        assert len(kept) < 0.75 * len(first.content)


def test_a_repeat_before_the_decision_is_remembered_is_not_applied(redis_url: str) -> None:
    settings = live_settings(redis_url, learn_writes="deferred")
    with TestClient(create_app(settings)) as a, TestClient(create_app(settings)) as b:
        body = ev(0, "sk-two-replicas", t0=NOW)
        first = a.post("/v1/events", json=body)
        # deferred, replica A remembers the decision with its next round trip: until then B
        # knows the event was applied, not what was answered, and says so
        early = b.post("/v1/events", json=body)
        assert early.status_code == 409 and "not applied again" in early.json()["error"]
        a.app.state.scorer.flush()  # type: ignore[attr-defined]
        late = b.post("/v1/events", json=body)
        assert late.status_code == 200 and late.json() == first.json()
        assert redis_request_total(redis.Redis.from_url(redis_url), "sk-two-replicas") == 1


def test_events_without_an_id_are_each_applied(store: str) -> None:
    with TestClient(create_app(live_settings(store))) as c:
        for _ in range(2):
            assert c.post("/v1/events", json=ev(0, "sk-anon", t0=NOW,
                                                event_id=False)).status_code == 200
        assert counted(c, store, "sk-anon") == 2


# ---- one clock ------------------------------------------------------------------------------
def _flood(c: TestClient, key: str, *, future_at: int | None) -> tuple[int, list[int]]:
    """3,300 calls in 33 s two minutes ago (over the 3,000-a-minute limit), one of them
    possibly stamped 23 h ahead; the number refused (throttled or blocked), and the
    statuses of the requests."""
    t0 = (time.time() // 60 - 2) * 60  # on a minute edge: every run fills the same buckets
    blocks, statuses = 0, []
    for start in range(0, 3300, 300):
        batch = [ev(i, key, t0=t0) for i in range(start, start + 300)]
        if future_at is not None and start <= future_at < start + 300:
            bad = {**batch[future_at - start], "timestamp": t0 + 23 * 3600}
            r = c.post("/v1/events", json=bad)
            statuses.append(r.status_code)
            if r.status_code == 200:
                blocks += r.json()["decision"] != "allow"
        r = c.post("/v1/events:batch", json=batch)
        statuses.append(r.status_code)
        blocks += sum(d["decision"] != "allow" for d in r.json())
    return blocks, statuses


def _flood_alone(store: str, run: str, future_at: int | None,
                 **overrides: object) -> tuple[int, list[int], dict]:
    """`_flood` in a service of its own (own state, rules only), so runs compare exactly."""
    settings = live_settings(store, models=False, redis_namespace=f"kw-{run}", **overrides)
    with TestClient(create_app(settings)) as c:
        blocks, statuses = _flood(c, "sk-clock", future_at=future_at)
        bound = c.app.state.scorer.clock_bound.status()  # type: ignore[attr-defined]
    return blocks, statuses, bound


def test_an_event_stamped_a_day_ahead_cannot_erase_later_blocks(store: str) -> None:
    baseline, _, _ = _flood_alone(store, "a", None)
    blocks, statuses, bound = _flood_alone(store, "b", 1000)
    assert baseline > 200
    # the same flood blocks the same (bans run on the wall clock: a loaded machine may
    # shift a ban's end by an event or two, never by the hundreds a moved window would)
    assert abs(blocks - baseline) <= max(2, baseline // 50), (blocks, baseline)
    assert statuses.count(422) == 1 and bound["refused"] == 1


def test_readiness_reports_the_clock_and_repeats(store: str) -> None:
    with TestClient(create_app(live_settings(store))) as c:
        body = ev(0, "sk-ready", t0=NOW)
        c.post("/v1/events", json=body)
        c.post("/v1/events", json=body)
        c.post("/v1/events", json={**body, "event_id": "far", "timestamp": NOW + 7200})
        ingest = c.get("/readyz").json()["ingest"]
    assert ingest["clock"]["refused"] == 1 and ingest["dedupe"]["repeats"] == 1
    assert ingest["population_log"]["gaps"] == 0


def test_clamping_keeps_the_windows_on_the_server_clock(store: str) -> None:
    baseline, _, _ = _flood_alone(store, "c", None, event_skew_action="clamp")
    blocks, statuses, bound = _flood_alone(store, "d", 1000, event_skew_action="clamp")
    assert set(statuses) == {200} and bound["clamped"] == 1
    # the clamped event itself may add one; the wall clock may shift a ban's end by one
    assert abs(blocks - baseline) <= max(2, baseline // 50), (blocks, baseline)


def test_a_refused_batch_applies_none_of_its_events(store: str) -> None:
    batch = [ev(i, "sk-skew-batch", t0=NOW - 10) for i in range(20)]
    batch[7] = {**batch[7], "timestamp": NOW - 3 * 3600}
    with TestClient(create_app(live_settings(store))) as c:
        r = c.post("/v1/events:batch", json=batch)
        assert r.status_code == 422
        assert r.json()["detail"][0]["field"] == "7.timestamp"
        assert "behind the server clock" in r.json()["error"]
        assert counted(c, store, "sk-skew-batch") == 0


def test_replay_keeps_event_time_with_no_skew_check(tmp_path: Path) -> None:
    week_ago = time.time() - 7 * 86400
    path = tmp_path / "events.jsonl"
    path.write_text("".join(json.dumps(ev(i, "sk-replay", t0=week_ago)) + "\n"
                            for i in range(50)))
    out = io.StringIO()
    summary = replay(build_scorer(make_settings(models=False)), path, out, progress=False)
    assert summary.scored == 50 and summary.failed == 0
    times = [json.loads(line)["event_time"] for line in out.getvalue().splitlines()]
    assert times[0].startswith(time.strftime("%Y-%m-%d", time.gmtime(week_ago)))
