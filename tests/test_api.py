"""The HTTP API end to end: decisions, health, and bad input refused with named fields."""

from __future__ import annotations

import json

import pytest
from fastapi.testclient import TestClient

from features.contract import Event
from features.keys import KeyHasher
from tests.conftest import TEST_SECRET

T0 = 1_794_999_960  # 2026-11-18, on a minute boundary


def ev(**kw: object) -> dict[str, object]:
    base: dict[str, object] = {
        "api_key": "sk-live-abc123", "timestamp": T0, "endpoint": "/v1/chat/completions",
        "status": 200, "tokens": 420, "latency_ms": 812.5, "source_ip": "81.2.69.160",
        "user_agent": "openai-python/1.54.3", "model": "gpt-4o-mini",
    }
    base.update(kw)
    return base


def test_single_event_gets_a_decision_with_the_key_id_not_the_key(client: TestClient) -> None:
    r = client.post("/v1/events", json=ev())
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["key_id"] == KeyHasher(TEST_SECRET).key_id("sk-live-abc123")
    assert body["decision"] == "allow" and body["severity"] == "none"
    assert set(body) >= {"key_id", "decision", "severity", "score", "reasons", "action",
                         "model_versions"}
    assert "sk-live-abc123" not in r.text


def test_rfc3339_and_epoch_timestamps_are_the_same_time(client: TestClient) -> None:
    a = client.post("/v1/events", json=ev(timestamp="2026-11-18T07:33:20Z")).json()
    b = client.post("/v1/events", json=ev(timestamp=1_794_987_200)).json()
    assert a["event_time"] == b["event_time"] == "2026-11-18T07:33:20Z"


def test_unknown_fields_are_ignored(client: TestClient) -> None:
    r = client.post("/v1/events", json=ev(something_new={"x": 1}))
    assert r.status_code == 200


def test_rate_limit_throttles_a_runaway_key_and_never_bans_it(client: TestClient) -> None:
    events = [ev(timestamp=T0 + i * 0.01, api_key="sk-runaway") for i in range(3100)]
    decisions = []
    for start in range(0, len(events), 1000):
        r = client.post("/v1/events:batch", json=events[start:start + 1000])
        assert r.status_code == 200, r.text
        decisions.extend(r.json())
    verdicts = [d["decision"] for d in decisions]
    assert verdicts[0] == "allow"
    assert verdicts[650] == "throttle"
    assert decisions[650]["reasons"][0]["code"] == "rate_limit_1m"
    # past the hard limit it is still volume from the key's own client: a throttle with a
    # limit and a duration, never a ban (issue 17)
    assert "block" not in verdicts and verdicts[3050] == "throttle"
    action = next(d["action"] for d in decisions if d["decision"] == "throttle")  # as set
    assert action["type"] == "throttle" and action["limit_per_min"] >= 5
    assert action["duration_s"] > 0 and action["until"]
    # another key is unaffected
    other = client.post("/v1/events", json=ev(timestamp=T0 + 600, api_key="sk-other")).json()
    assert other["decision"] == "allow"


def test_batch_returns_decisions_in_input_order(client: TestClient) -> None:
    keys = [f"sk-{i}" for i in range(5)]
    r = client.post("/v1/events:batch", json={"events": [ev(api_key=k) for k in keys]})
    assert r.status_code == 200
    hasher = KeyHasher(TEST_SECRET)
    assert [d["key_id"] for d in r.json()] == [hasher.key_id(k) for k in keys]


def test_health_and_ready(client: TestClient) -> None:
    assert client.get("/healthz").json() == {"status": "ok"}
    ready = client.get("/readyz")
    assert ready.status_code == 200 and ready.json()["status"] == "ready"
    assert client.get("/docs").status_code == 200
    assert "/v1/events:batch" in client.get("/openapi.json").json()["paths"]


BAD_EVENTS = [
    ("missing api_key", {k: v for k, v in ev().items() if k != "api_key"}, 422, "api_key"),
    ("malformed ip", ev(source_ip="300.1.2.3"), 422, "source_ip"),
    ("negative tokens", ev(tokens=-5), 422, "tokens"),
    ("negative latency", ev(latency_ms=-1.0), 422, "latency_ms"),
    ("unparseable timestamp", ev(timestamp="yesterday at noon"), 422, "timestamp"),
    ("timestamp in the future", ev(timestamp=4_000_000_000), 422, "timestamp"),
    ("huge user agent", ev(user_agent="x" * 5000), 422, "user_agent"),
    ("bad status", ev(status=42), 422, "status"),
    ("empty api_key", ev(api_key=""), 422, "api_key"),
]


@pytest.mark.parametrize(("case", "payload", "status", "field"), BAD_EVENTS,
                         ids=[c[0] for c in BAD_EVENTS])
def test_bad_single_event_is_refused_naming_the_field(
    client: TestClient, case: str, payload: dict[str, object], status: int, field: str
) -> None:
    r = client.post("/v1/events", json=payload)
    assert r.status_code == status, r.text
    body = r.json()
    assert field in body["error"]
    assert any(d["field"] == field for d in body["detail"])


@pytest.mark.parametrize(("case", "payload", "status", "field"), BAD_EVENTS,
                         ids=[c[0] for c in BAD_EVENTS])
def test_batch_with_one_bad_event_is_refused_whole(
    client: TestClient, case: str, payload: dict[str, object], status: int, field: str
) -> None:
    good = ev(api_key="sk-batch-good")
    r = client.post("/v1/events:batch", json=[good, good, payload])
    assert r.status_code == status, r.text
    assert r.json()["detail"][0]["field"].startswith(f"2.{field}")
    assert "event 2" in r.json()["error"]
    # nothing was applied: the good key's first event now is still its first
    first = client.post("/v1/events", json=good).json()
    assert first["severity"] == "none"
    scorer = client.app.state.scorer  # type: ignore[attr-defined]
    _, features = scorer.score_with_features(Event.model_validate(good))
    assert features["requests_count_by_key_1m"] == 2  # the refused batch counted nothing


def test_non_json_bodies_are_refused(client: TestClient) -> None:
    r = client.post("/v1/events", content=b"{not json", headers={"content-type":
                                                                   "application/json"})
    assert r.status_code == 400 and "JSON" in r.json()["error"]
    r = client.post("/v1/events:batch", content=b"[{", headers={"content-type":
                                                                  "application/json"})
    assert r.status_code == 400 and "JSON" in r.json()["error"]


@pytest.mark.parametrize(("body", "status", "message"), [
    (b"", 400, "not valid JSON"),
    (b"[]", 422, "body: Input should be an object"),
    (b"null", 422, "body: Input should be an object"),
    ("{\"api_key\": \"\u00e9\"}".encode("latin-1"), 400, "not valid JSON"),
], ids=["empty", "list", "null", "not utf-8"])
def test_single_event_body_that_is_no_event_is_refused(
    client: TestClient, body: bytes, status: int, message: str
) -> None:
    r = client.post("/v1/events", content=body, headers={"content-type": "application/json"})
    assert r.status_code == status, r.text
    assert message in r.json()["error"]
    assert r.json()["detail"][0]["field"] == "body"


def test_single_event_is_read_as_json_whatever_its_content_type(client: TestClient) -> None:
    """Gateways that forget the header still get scored, not a confusing field error."""
    for headers in ({}, {"content-type": "text/plain"}):
        r = client.post("/v1/events", content=json.dumps(ev(api_key="sk-no-ctype")).encode(),
                        headers=headers)
        assert r.status_code == 200, r.text
        assert r.headers["content-type"] == "application/json"
        assert r.json()["key_id"] == KeyHasher(TEST_SECRET).key_id("sk-no-ctype")


def test_openapi_documents_the_event_body_and_the_decision(client: TestClient) -> None:
    spec = client.get("/openapi.json").json()
    event = spec["components"]["schemas"]["Event"]
    assert {"api_key", "timestamp", "source_ip"} <= set(event["properties"])
    assert "api_key" in event["required"]
    op = spec["paths"]["/v1/events"]["post"]
    schema = op["requestBody"]["content"]["application/json"]["schema"]
    assert schema == {"$ref": "#/components/schemas/Event"}
    ok = op["responses"]["200"]["content"]["application/json"]["schema"]
    assert ok == {"$ref": "#/components/schemas/Decision"}


def test_batch_over_the_size_limit_is_413(client: TestClient) -> None:
    r = client.post("/v1/events:batch", json=[ev()] * 1001)
    assert r.status_code == 413
    assert "1001" in r.json()["error"]
    r = client.post("/v1/events:batch", json=[])
    assert r.status_code == 422


def test_raw_key_never_appears_in_any_response(client: TestClient) -> None:
    raw = "sk-live-SECRET-do-not-leak"
    bodies = [client.post("/v1/events", json=ev(api_key=raw)).text,
              client.post("/v1/events:batch", json=[ev(api_key=raw)]).text,
              client.post("/v1/events", json=ev(api_key=raw, tokens=-1)).text]
    assert all(raw not in b for b in bodies)
    assert raw not in json.dumps(client.get("/openapi.json").json())
