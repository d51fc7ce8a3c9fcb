"""`GET /metrics`: counters per app, latency histogram, alert and component readings."""

from __future__ import annotations

import re

from fastapi.testclient import TestClient

from serving.api.app import create_app
from tests.conftest import make_settings
from tests.ops_servers import closed_port_url
from tests.test_alerts import failing_events


def samples(text: str, name: str) -> list[tuple[dict[str, str], float]]:
    """All samples of `name` in a Prometheus exposition, as (labels, value)."""
    out = []
    for line in text.splitlines():
        m = re.match(r"^([a-zA-Z_:][\w:]*)(\{(.*)\})? (\S+)$", line)
        if m and m.group(1) == name:
            out.append((dict(re.findall(r'(\w+)="([^"]*)"', m.group(3) or "")),
                        float(m.group(4))))
    return out


def value(text: str, name: str, **labels: str) -> float:
    """The sample `name{labels}` (labels in any order)."""
    for found, v in samples(text, name):
        if found == labels:
            return v
    raise AssertionError(f"{name}{labels} not in metrics")


def test_two_apps_in_one_process_keep_separate_metrics() -> None:
    with TestClient(create_app(make_settings())) as a, \
            TestClient(create_app(make_settings())) as b:
        a.post("/v1/events:batch", json=failing_events("sk-live-metrics-a", n=5))
        b.post("/v1/events", json=failing_events("sk-live-metrics-b", n=1)[0])
        ma, mb = a.get("/metrics"), b.get("/metrics")
    assert ma.status_code == 200 and ma.headers["content-type"].startswith("text/plain")
    assert value(ma.text, "keywatch_events_scored_total", decision="allow",
                 severity="none") == 5
    assert value(mb.text, "keywatch_events_scored_total", decision="allow",
                 severity="none") == 1
    assert value(ma.text, "keywatch_scoring_latency_seconds_count") == 5
    assert value(mb.text, "keywatch_scoring_latency_seconds_count") == 1
    assert value(ma.text, "keywatch_scoring_latency_seconds_bucket", le="0.0001") >= 0
    assert value(ma.text, "keywatch_scoring_latency_seconds_bucket", le="0.1") <= 5


def test_alert_counters_model_info_bans_and_log_writes() -> None:
    app = create_app(make_settings())
    app.state.ops.bans_active = lambda: 3
    with TestClient(app) as c:
        c.post("/v1/events:batch", json=failing_events("sk-live-metrics-alerts", n=30))
        app.state.ops.flush()
        text = c.get("/metrics").text
    flagged = value(text, "keywatch_events_scored_total", decision="allow", severity="medium")
    assert flagged >= 1
    assert value(text, "keywatch_alerts_raised_total") == 1
    assert value(text, "keywatch_alerts_deduplicated_total") == flagged - 1
    assert value(text, "keywatch_alerts_suppressed_total") == 0
    info = {labels["slot"]: v for labels, v in samples(text, "keywatch_model_info")}
    assert info.keys() >= {"online", "offline"} and set(info.values()) == {1.0}
    assert value(text, "keywatch_bans_active") == 3
    assert value(text, "keywatch_log_lines_written_total", log="siem") == 1
    assert value(text, "keywatch_log_write_errors_total", log="alerts") == 0
    assert value(text, "keywatch_store_errors_total") == 0
    assert not re.search(r"k_[0-9a-f]{32}", text)  # no key ids as labels


def test_store_errors_are_counted() -> None:
    settings = make_settings(store="redis://" + closed_port_url().split("//", 1)[1],
                             redis_timeout_s=0.2, redis_outage_policy="error")
    with TestClient(create_app(settings)) as c:
        r = c.post("/v1/events", json=failing_events("sk-live-store-down", n=1)[0])
        assert r.status_code == 503
        text = c.get("/metrics").text
    assert value(text, "keywatch_store_errors_total") == 1
    assert value(text, "keywatch_ops_hook_errors_total") == 0


def test_a_failing_reader_does_not_break_the_scrape() -> None:
    app = create_app(make_settings())

    def broken() -> int:
        raise RuntimeError("ban index unavailable")

    app.state.ops.bans_active = broken
    with TestClient(app) as c:
        r = c.get("/metrics")
    assert r.status_code == 200 and "keywatch_events_scored_total" in r.text
