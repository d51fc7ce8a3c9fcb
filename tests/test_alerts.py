"""Alerts: which decisions alert, de-duplication, storage, real webhook delivery, the API."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from features.keys import KeyHasher
from serving.alerts.feedback import feedback_for_retrain
from serving.alerts.pipeline import AlertPipeline, AlertQuery
from serving.alerts.sinks import WebhookSink, slack_body
from serving.api.app import create_app
from serving.engine.decision import Action, Decision, Reason
from serving.engine.jsonl_writer import RotatingJsonlWriter
from tests.conftest import ADMIN_TOKEN, TEST_SECRET, make_settings
from tests.ops_servers import RecordingWebhook, closed_port_url

KEY_A = "k_" + "a" * 32
KEY_B = "k_" + "b" * 32
T0 = 1_794_999_960.0
AUTH = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


def decision(key_id: str = KEY_A, severity: str = "medium", verdict: str = "allow",
             codes: tuple[str, ...] = ("failure_rate",)) -> Decision:
    return Decision(
        key_id=key_id, decision=verdict, severity=severity,  # type: ignore[arg-type]
        score={"none": 0.0, "low": 0.3, "medium": 0.55, "high": 0.8, "critical": 0.95}[severity],
        reasons=[Reason(code=c, severity=severity, message=f"{c} fired",  # type: ignore[arg-type]
                        evidence={"value": 1}) for c in codes],
        action=Action(type="alert" if verdict == "allow" else "throttle", scope="key"))


# ---- the pipeline -------------------------------------------------------------------------
def test_only_alert_worthy_decisions_raise_and_repeats_are_counted_not_resent() -> None:
    p = AlertPipeline(dedup_window_s=600)
    assert p.observe(T0, KEY_A, "81.2.69.160", decision(severity="low", codes=("x",))) is None
    first = p.observe(T0, KEY_A, "81.2.69.160", decision())
    assert first is not None and first.count == 1
    again = p.observe(T0 + 60, KEY_A, "81.2.69.142", decision())
    assert again is first and first.count == 2
    assert first.source_ips == ["81.2.69.160", "81.2.69.142"]
    assert first.last_seen_ts == T0 + 60
    # another key, and a non-allow verdict at low severity, alert on their own
    assert p.observe(T0, KEY_B, None, decision(KEY_B)) is not first
    assert p.observe(T0, KEY_A, None, decision(severity="low", verdict="throttle",
                                               codes=("burst",))) is not None
    # after the window a new alert is raised for the same pair (a reminder)
    later = p.observe(T0 + 601, KEY_A, None, decision())
    assert later is not None and later is not first
    assert (p.raised, p.deduplicated) == (4, 1)


def test_a_more_severe_repeat_escalates_the_open_alert() -> None:
    with RecordingWebhook() as hook:
        sink = WebhookSink(hook.url, backoff_s=0.01)
        p = AlertPipeline(sinks=[sink])
        a = p.observe(T0, KEY_A, None, decision(codes=("rate_limit_1m",)))
        p.observe(T0 + 1, KEY_A, None, decision(codes=("rate_limit_1m",)))
        b = p.observe(T0 + 2, KEY_A, None, decision(severity="high", verdict="throttle",
                                                    codes=("rate_limit_1m",)))
        assert a is b and b.severity == "high" and b.escalations == 1 and b.count == 3
        assert hook.wait_for(2)
        p.close()
    assert [body["event"] for body in hook.bodies] == ["raised", "escalated"]
    assert hook.bodies[1]["alert"]["severity"] == "high"


def test_suppressed_pairs_do_not_alert_but_other_rules_still_do() -> None:
    suppressed = {(KEY_A, "failure_rate")}
    p = AlertPipeline(is_suppressed=lambda k, c: (k, c) in suppressed)
    assert p.observe(T0, KEY_A, None, decision()) is None
    assert p.suppressed == 1
    assert p.observe(T0, KEY_B, None, decision(KEY_B)) is not None
    both = p.observe(T0, KEY_A, None, decision(codes=("failure_rate", "new_country")))
    assert both is not None and both.code == "new_country"


def test_query_pages_newest_first_and_filters() -> None:
    p = AlertPipeline()
    for i in range(7):
        p.observe(T0 + i * 700, KEY_A if i % 2 else KEY_B, f"10.0.0.{i}",
                  decision(KEY_A if i % 2 else KEY_B, severity="high" if i == 3 else "medium"))
    page1, cur = p.query(AlertQuery(), limit=3)
    page2, cur2 = p.query(AlertQuery(), limit=3, cursor=cur)
    page3, cur3 = p.query(AlertQuery(), limit=3, cursor=cur2)
    seen = [a["first_seen_ts"] for a in page1 + page2 + page3]
    assert seen == sorted(seen, reverse=True) and len(seen) == 7 and cur3 is None
    assert {a["key_id"] for a in p.query(AlertQuery(key_id=KEY_A))[0]} == {KEY_A}
    assert [a["source_ip"] for a in p.query(AlertQuery(source_ip="10.0.0.4"))[0]] == ["10.0.0.4"]
    assert len(p.query(AlertQuery(min_severity="high"))[0]) == 1
    window = p.query(AlertQuery(since=T0 + 1400, until=T0 + 2800))[0]
    assert [a["first_seen_ts"] for a in window] == [T0 + 2100, T0 + 1400]


def test_alert_log_brings_the_ring_back_after_a_restart(tmp_path: Path) -> None:
    path = tmp_path / "alerts.jsonl"
    p = AlertPipeline(alert_log=RotatingJsonlWriter(path))
    a = p.observe(T0, KEY_A, None, decision())
    p.observe(T0 + 5, KEY_A, None, decision())
    p.close()
    p.alert_log.flush()  # type: ignore[union-attr]
    q = AlertPipeline(alert_log=RotatingJsonlWriter(path))
    restored = q.get(a.alert_id)  # type: ignore[union-attr]
    assert restored is not None and restored.count == 2
    # and it is still the open alert for the pair
    assert q.observe(T0 + 10, KEY_A, None, decision()) is restored
    assert restored.count == 3


# ---- sinks, against a real HTTP server ----------------------------------------------------
def test_webhook_and_slack_receive_the_alert() -> None:
    with RecordingWebhook() as hook, RecordingWebhook() as slack:
        sinks = [WebhookSink(hook.url), WebhookSink(slack.url, body_format="slack")]
        p = AlertPipeline(sinks=sinks)
        alert = p.observe(T0, KEY_A, "81.2.69.160", decision(severity="high",
                                                             verdict="throttle"))
        assert hook.wait_for(1) and slack.wait_for(1)
        p.close()
    body = hook.bodies[0]
    assert body["type"] == "keywatch.alert" and body["event"] == "raised"
    assert body["alert"]["alert_id"] == alert.alert_id  # type: ignore[union-attr]
    assert body["alert"]["key_id"] == KEY_A and body["alert"]["source_ip"] == "81.2.69.160"
    s = slack.bodies[0]
    assert set(s) == {"text", "blocks"} and KEY_A in s["text"]
    assert [b["type"] for b in s["blocks"]] == ["header", "section", "section", "context"]
    assert len(s["blocks"][0]["text"]["text"]) <= 150


def test_slack_body_is_within_block_kit_limits() -> None:
    long = decision(codes=tuple(f"code_{i}" for i in range(20)))
    p = AlertPipeline()
    alert = p.observe(T0, KEY_A, None, long)
    body = slack_body({"event": "raised", "alert": alert.to_dict()})  # type: ignore[union-attr]
    assert all(len(b.get("text", {}).get("text", "")) <= 3000 for b in body["blocks"])
    json.dumps(body)


def test_webhook_retries_after_a_failure_and_then_delivers() -> None:
    with RecordingWebhook(fail_first=1) as hook:
        sink = WebhookSink(hook.url, backoff_s=0.01, max_attempts=3)
        p = AlertPipeline(sinks=[sink])
        p.observe(T0, KEY_A, None, decision())
        assert hook.wait_for(1)
        assert sink.wait_idle()
        p.close()
    assert hook.attempts == 2 and len(hook.bodies) == 1
    stats = sink.stats()
    assert (stats["sent"], stats["failed_attempts"], stats["gave_up"]) == (1, 1, 0)


def test_a_hanging_webhook_never_holds_up_observe_and_drops_are_counted() -> None:
    with RecordingWebhook(hold=True) as hook:
        sink = WebhookSink(hook.url, timeout_s=30, queue_size=2)
        p = AlertPipeline(sinks=[sink])
        p.observe(T0, "k_" + "0" * 32, None, decision("k_" + "0" * 32))
        assert hook.held.wait(5)  # the sink thread is now stuck inside a request
        for i in range(1, 20):
            key = f"k_{i:032x}"
            assert p.observe(T0, key, None, decision(key)) is not None
        # one in flight, two queued, the other 17 dropped and counted
        assert sink.stats()["dropped"] == 17 and p.raised == 20
        hook.release()
        assert sink.wait_idle(10)
        p.close()
    assert sink.stats()["sent"] == 3


def test_an_unreachable_webhook_gives_up_after_bounded_attempts() -> None:
    sink = WebhookSink(closed_port_url() + "/hook", max_attempts=3, backoff_s=0.01)
    p = AlertPipeline(sinks=[sink])
    p.observe(T0, KEY_A, None, decision())
    assert sink.wait_idle(10)
    p.close()
    stats = sink.stats()
    assert (stats["sent"], stats["failed_attempts"], stats["gave_up"]) == (0, 3, 1)
    assert stats["last_error"] == "ConnectError"


# ---- through the API ----------------------------------------------------------------------
def failing_events(api_key: str, n: int = 30, t0: float = T0, ip: str = "81.2.69.160"
                   ) -> list[dict[str, object]]:
    """A client whose requests fail (400), of varied sizes: failing, not a runaway loop
    resending one prompt on a timer (which `runaway_loop` would throttle)."""
    return [{"api_key": api_key, "timestamp": t0 + i, "status": 400, "source_ip": ip,
             "endpoint": "/v1/chat/completions", "tokens": 10 + i} for i in range(n)]


def test_admin_endpoints_need_the_admin_token() -> None:
    with TestClient(create_app(make_settings())) as c:
        r = c.get("/v1/alerts")
        assert r.status_code == 401 and r.headers["www-authenticate"].startswith("Bearer")
        assert r.json() == {"error": "missing or wrong admin token"}
        assert c.get("/v1/alerts", headers={"Authorization": "Bearer nope"}).status_code == 401
        assert c.get("/v1/alerts", headers={"Authorization": ADMIN_TOKEN}).status_code == 401
        assert c.get("/v1/alerts", headers=AUTH).status_code == 200
        assert c.get(f"/v1/keys/{KEY_A}").status_code == 401
    with TestClient(create_app(make_settings(admin_token=None))) as c:
        r = c.get("/v1/alerts", headers=AUTH)
        assert r.status_code == 503 and "KEYWATCH_ADMIN_TOKEN" in r.json()["error"]


def test_alerts_key_page_feedback_and_suppression_end_to_end() -> None:
    settings = make_settings()
    key_id = KeyHasher(TEST_SECRET).key_id("sk-live-failing-key-001")
    with TestClient(create_app(settings)) as c:
        r = c.post("/v1/events:batch", json=failing_events("sk-live-failing-key-001"))
        assert r.status_code == 200
        flagged = [d for d in r.json() if d["severity"] == "medium"]
        assert flagged, "the failure-rate rule should fire"

        body = c.get("/v1/alerts", params={"key_id": key_id}, headers=AUTH).json()
        assert body["count"] == 1 and body["next_cursor"] is None
        alert = body["alerts"][0]
        assert alert["code"] == "failure_rate" and alert["count"] == len(flagged)
        assert c.get("/v1/alerts", params={"min_severity": "high"},
                     headers=AUTH).json()["count"] == 0
        assert c.get("/v1/alerts", params={"since": "2026-11-18T00:00:00Z",
                                           "until": T0 + 3600}, headers=AUTH).json()["count"] == 1
        assert c.get("/v1/alerts", params={"min_severity": "bad"}, headers=AUTH
                     ).status_code == 422

        page = c.get(f"/v1/keys/{key_id}", headers=AUTH).json()
        assert page["seen"] and page["baseline"]["events"] == 30
        assert page["baseline"]["failure_ratio"] == 1.0
        assert len(page["recent_decisions"]) == len(flagged)
        assert page["recent_decisions"][0]["reasons"][0]["code"] == "failure_rate"
        assert [a["alert_id"] for a in page["active_alerts"]] == [alert["alert_id"]]
        raw = c.get("/v1/keys/sk-live-failing-key-001", headers=AUTH)
        assert raw.status_code == 422 and "sk-live" not in raw.text

        fb = c.post(f"/v1/alerts/{alert['alert_id']}/feedback", headers=AUTH,
                    json={"verdict": "false_positive", "note": "batch job retries",
                          "allowlist_rule": True})
        assert fb.status_code == 201, fb.text
        assert fb.json()["suppressed"] is True
        assert fb.json()["alert"]["status"] == "false_positive"
        assert c.post("/v1/alerts/al_nope/feedback", headers=AUTH,
                      json={"verdict": "confirmed"}).status_code == 404
        assert c.post(f"/v1/alerts/{alert['alert_id']}/feedback", headers=AUTH,
                      json={"verdict": "maybe"}).status_code == 422

        # the same rule on the same key no longer alerts
        c.post("/v1/events:batch", json=failing_events("sk-live-failing-key-001", t0=T0 + 60))
        assert c.get("/v1/alerts", params={"key_id": key_id},
                     headers=AUTH).json()["count"] == 1
        assert c.get(f"/v1/keys/{key_id}", headers=AUTH).json()["suppressed_rules"] == [
            "failure_rate"]

    records = feedback_for_retrain(settings.data_dir)
    assert len(records) == 1
    rec = records[0]
    assert rec["verdict"] == "false_positive" and rec["key_id"] == key_id
    assert rec["code"] == "failure_rate" and rec["alert_first_seen_ts"] >= T0

    # a restart keeps the suppression and the alert, and the suppression can be lifted
    with TestClient(create_app(settings)) as c:
        assert c.get(f"/v1/alerts/{alert['alert_id']}", headers=AUTH).json()["feedback"]
        sup = c.get("/v1/suppressions", headers=AUTH).json()["suppressions"]
        assert [(s["key_id"], s["code"]) for s in sup] == [(key_id, "failure_rate")]
        assert c.delete(f"/v1/suppressions/{key_id}/failure_rate",
                        headers=AUTH).status_code == 200
        assert c.delete(f"/v1/suppressions/{key_id}/failure_rate",
                        headers=AUTH).status_code == 404
        c.post("/v1/events:batch", json=failing_events("sk-live-failing-key-001",
                                                       t0=T0 + 2000))
        assert c.get("/v1/alerts", params={"key_id": key_id},
                     headers=AUTH).json()["count"] == 2


def test_the_app_sends_one_webhook_per_alert_not_per_event() -> None:
    with RecordingWebhook() as hook:
        app = create_app(make_settings(alert_webhook_url=hook.url))
        with TestClient(app) as c:
            c.post("/v1/events:batch", json=failing_events("sk-live-one-alert-key"))
            # alerts are queued while scoring, so once the sink is idle all have arrived
            assert app.state.ops.alerts.sinks[0].wait_idle()
        assert len(hook.bodies) == 1
        assert hook.bodies[0]["alert"]["code"] == "failure_rate"


def test_scoring_answers_while_the_webhook_hangs() -> None:
    with RecordingWebhook(hold=True) as hook:
        settings = make_settings(alert_webhook_url=hook.url, alert_queue_size=1,
                                 alert_webhook_timeout_s=30)
        app = create_app(settings)
        with TestClient(app) as c:
            c.post("/v1/events:batch", json=failing_events("sk-live-hang-0"))
            assert hook.held.wait(5)  # the only sink thread is stuck on the first alert
            for i in range(1, 6):
                r = c.post("/v1/events:batch", json=failing_events(f"sk-live-hang-{i}"))
                assert r.status_code == 200 and r.json()[-1]["severity"] == "medium"
            metrics = c.get("/metrics").text
            hook.release()
        sink_stats = app.state.ops.alerts.stats()["sinks"][0]
    assert app.state.ops.alerts.raised == 6
    assert sink_stats["dropped"] == 4  # one in flight, one queued
    assert 'keywatch_alerts_dropped_total{reason="queue_full",sink="webhook"} 4.0' in metrics


@pytest.mark.parametrize("verdict", ["confirmed", "false_positive"])
def test_feedback_note_is_redacted(verdict: str) -> None:
    settings = make_settings()
    with TestClient(create_app(settings)) as c:
        c.post("/v1/events:batch", json=failing_events("sk-live-note-key"))
        alert = c.get("/v1/alerts", headers=AUTH).json()["alerts"][0]
        r = c.post(f"/v1/alerts/{alert['alert_id']}/feedback", headers=AUTH,
                   json={"verdict": verdict, "note": "customer sent sk-live-pasted-1234567"})
        assert r.status_code == 201
        assert "sk-live-pasted" not in r.text
    text = (settings.data_dir / "feedback.jsonl").read_text()
    assert "sk-live-pasted" not in text and "[REDACTED]" in text
