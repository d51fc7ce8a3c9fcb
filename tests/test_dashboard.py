"""The dashboard end to end: a real uvicorn server fed simulated traffic, the page rendered
by headless Chromium, the data endpoints behind the admin token, and the unban flow.

The server scores a contiguous slice of a small simulation (shifted to end a minute ago,
so the bans it earns are still active by the wall clock the admin API uses), which is
enough to raise alerts of several kinds and to ban a resold key. Chromium runs the page's
own JavaScript against that server; we read the rendered DOM (`--dump-dom`) and take a
screenshot. Set KEYWATCH_UPDATE_DASHBOARD_PNG=1 to refresh `docs/dashboard.png` from it.

The Chromium part is skipped only when no Chromium binary exists (CI installs one).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from features.contract import parse_timestamp
from serving.alerts.pipeline import AlertPipeline
from serving.alerts.stats import DecisionStats
from serving.api.app import create_app
from serving.engine.decision import Decision, Reason
from tests.conftest import ADMIN_TOKEN, make_settings
from tests.ops_servers import serve_in_thread
from training.simulator import simulate

REPO = Path(__file__).resolve().parents[1]
DOCS_PNG = REPO / "docs" / "dashboard.png"
EVENTS_TO_SCORE = 4000
SWEEP = 30
BATCH = 1000
XSS_REASON = '<img src=x onerror="document.title=\'pwned\'"><script>alert(1)</script>'
XSS_IP = "203.0.113.66"
AUTH = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


@dataclass
class FedServer:
    url: str
    verdicts: Counter[str]


def chromium_binary() -> str | None:
    """The Chromium to drive: $KEYWATCH_CHROMIUM, else the usual names on PATH."""
    override = os.environ.get("KEYWATCH_CHROMIUM")
    if override:
        return override
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        found = shutil.which(name)
        if found:
            return found
    return None


def simulated_events(out: Path) -> list[dict[str, object]]:
    """The first EVENTS_TO_SCORE events of a 10-key, 1-day simulation, moved to end
    a minute ago, then a credential-stuffing sweep: the page must show an automatic ban
    still in force by the admin API's clock, whatever the slice's own incidents led to."""
    summary = simulate(out, keys=10, days=1, seed=3)
    events = []
    with summary.events_path.open(encoding="utf-8") as fh:
        for line in fh:
            events.append(json.loads(line))
            if len(events) == EVENTS_TO_SCORE:
                break
    stamps = [parse_timestamp(e["timestamp"], now=float("inf")) for e in events]
    shift = time.time() - 60 - stamps[-1]
    for event, ts in zip(events, stamps, strict=True):
        event["timestamp"] = ts + shift
    end = stamps[-1] + shift
    events += [{"api_key": f"sk-guess-{i:04d}", "timestamp": end + 1 + i * 0.5,
                "endpoint": "/v1/chat/completions", "status": 401, "tokens": 0,
                "source_ip": "45.155.205.17", "user_agent": "python-requests/2.31"}
               for i in range(SWEEP)]
    return events


@pytest.fixture(scope="module")
def fed_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FedServer]:
    events = simulated_events(tmp_path_factory.mktemp("sim"))
    app = create_app(make_settings(data_dir=tmp_path_factory.mktemp("data")))
    with serve_in_thread(app) as url, httpx.Client(base_url=url, timeout=60) as http:
        verdicts: Counter[str] = Counter()
        for i in range(0, len(events), BATCH):
            resp = http.post("/v1/events:batch", json=events[i:i + BATCH])
            resp.raise_for_status()
            verdicts.update(d["decision"] for d in resp.json())
        # a manual ban whose reason is hostile markup: the page must show it as text
        http.post("/admin/bans", headers=AUTH, json={
            "ip": XSS_IP, "duration": "1h", "reason": XSS_REASON}).raise_for_status()
        yield FedServer(url=url, verdicts=verdicts)


def admin_client(server: FedServer) -> httpx.Client:
    return httpx.Client(base_url=server.url, headers=AUTH, timeout=30)


# ---- the aggregates, in process ------------------------------------------------------------
def test_decision_stats_ring_stays_bounded_and_drops_what_it_forgot() -> None:
    stats = DecisionStats(base_bucket_s=60, max_buckets=10)
    t0 = 1_795_000_000 - 1_795_000_000 % 3600  # on an hour boundary
    for minute in range(25):  # 25 minutes through a 10-minute ring
        stats.add(t0 + minute * 60 + 5, "allow", "none")
    stats.add(t0 + 24 * 60 + 30, "block", "critical")
    stats.add(t0 + 20 * 60, "throttle", "high")  # late, but still inside the ring
    stats.add(t0 + 3 * 60, "block", "critical")  # older than the ring: dropped
    series = stats.series(bucket_s=60, buckets=12)
    assert stats.dropped == 1
    assert [b["total"] for b in series["buckets"]] == [0, 0, 1, 1, 1, 1, 1, 2, 1, 1, 1, 2]
    assert [b["complete"] for b in series["buckets"]] == [False] * 2 + [True] * 10
    assert series["totals"]["decisions"] == {"allow": 10, "throttle": 1, "block": 1}
    assert series["totals"]["severities"]["critical"] == 1
    coarse = stats.series(bucket_s=300, buckets=2)  # 5-minute sums aligned on :00, :05…
    assert [b["start_ts"] for b in coarse["buckets"]] == [t0 + 900, t0 + 1200]
    assert [b["total"] for b in coarse["buckets"]] == [5, 7]
    with pytest.raises(ValueError, match="multiple of 60"):
        stats.series(bucket_s=90)
    assert DecisionStats().series()["buckets"] == []


def test_riskiest_keys_rank_by_severity_then_volume_and_skip_false_positives() -> None:
    def decision(key_id: str, severity: str, code: str) -> Decision:
        return Decision(key_id=key_id, decision="block" if severity == "critical" else "allow",
                        severity=severity, score=0.9,  # type: ignore[arg-type]
                        reasons=[Reason(code=code, severity=severity,  # type: ignore[arg-type]
                                        message=f"{code} fired")])

    loud, worst, dismissed = ("k_" + c * 32 for c in "abc")
    pipeline = AlertPipeline(dedup_window_s=600)
    t0 = 1_795_000_000.0
    for i in range(5):
        pipeline.observe(t0 + i, loud, "192.0.2.1", decision(loud, "high", "burst"))
    pipeline.observe(t0, worst, "192.0.2.2", decision(worst, "critical", "impossible_travel"))
    fp = pipeline.observe(t0, dismissed, None, decision(dismissed, "critical", "key_sharing"))
    assert fp is not None
    pipeline.set_status(fp.alert_id, "false_positive")
    ranked = pipeline.riskiest_keys(10)
    assert [r["key_id"] for r in ranked] == [worst, loud]
    assert ranked[1]["decisions"] == 5 and ranked[1]["codes"] == {"burst": 5}
    assert ranked[0]["worst_decision"] == "block" and ranked[0]["source_ips"] == ["192.0.2.2"]


# ---- the API the page uses ---------------------------------------------------------------
DATA_ENDPOINTS = ("/v1/stats/decisions", "/v1/stats/keys", "/v1/alerts", "/admin/bans",
                  "/admin/limits",
                  "/v1/keys/k_" + "0" * 32)


def test_page_is_open_but_every_data_endpoint_needs_the_token(fed_server: FedServer) -> None:
    with httpx.Client(base_url=fed_server.url, timeout=30) as http:
        page = http.get("/dashboard")
        assert page.status_code == 200
        assert page.headers["content-type"].startswith("text/html")
        csp = page.headers["content-security-policy"]
        assert "script-src 'self'" in csp and "unsafe-inline" not in csp
        assert page.headers["referrer-policy"] == "no-referrer"
        script = http.get("/dashboard/dashboard.js")
        assert script.status_code == 200 and "javascript" in script.headers["content-type"]
        assert "innerHTML" not in script.text and "insertAdjacentHTML" not in script.text
        assert http.get("/dashboard/dashboard.css").status_code == 200
        assert http.get("/dashboard/..%2Fapp.py").status_code == 404
        assert http.get("/dashboard/settings.py").status_code == 404
        for path in DATA_ENDPOINTS:
            for headers in ({}, {"Authorization": "Bearer wrong-token"}):
                resp = http.get(path, headers=headers)
                assert resp.status_code == 401, (path, headers, resp.text)
                assert resp.json() == {"error": "missing or wrong admin token"}
        assert http.post("/admin/unban", json={"ip": XSS_IP}).status_code == 401


def test_decision_stats_count_every_scored_event(fed_server: FedServer) -> None:
    with admin_client(fed_server) as http:
        stats = http.get("/v1/stats/decisions", params={"bucket": 3600, "buckets": 48}).json()
        assert stats["clock"] == "event time" and stats["bucket_s"] == 3600
        assert len(stats["buckets"]) == 48
        assert stats["totals"]["events"] == EVENTS_TO_SCORE + SWEEP
        for verdict in ("allow", "throttle", "block"):
            assert stats["totals"]["decisions"][verdict] == fed_server.verdicts[verdict]
        starts = [b["start_ts"] for b in stats["buckets"]]
        assert starts == sorted(starts) and all(b % 3600 == 0 for b in starts)

        fine = http.get("/v1/stats/decisions", params={"bucket": 60, "buckets": 30}).json()
        assert len(fine["buckets"]) == 30 and fine["end"] == stats["end"]
        assert sum(b["total"] for b in fine["buckets"]) <= EVENTS_TO_SCORE + SWEEP
        assert http.get("/v1/stats/decisions", params={"bucket": 90}).status_code == 422

        risky = http.get("/v1/stats/keys", params={"limit": 5}).json()["keys"]
        assert risky, "the simulated incidents should raise alerts"
        ranks = ["none", "low", "medium", "high", "critical"]
        order = [(ranks.index(k["max_severity"]), k["decisions"]) for k in risky]
        assert order == sorted(order, reverse=True)
        assert all(k["key_id"].startswith("k_") and k["codes"] for k in risky)


def test_unban_flow_the_button_uses(fed_server: FedServer) -> None:
    """The Unban button posts {scope: target} from the /admin/bans row to /admin/unban."""
    raw_key = "sk-dashboard-unban-test-0001"
    with admin_client(fed_server) as http:
        banned = http.post("/admin/bans", json={"key": raw_key, "duration": "30m",
                                                "reason": "test"}).json()
        http.post("/admin/bans", json={"ip": "198.51.100.7", "duration": "30m"})
        assert not http.post("/v1/check", json={"api_key": raw_key}).json()["allowed"]
        rows = {(b["scope"], b["target"]) for b in http.get("/admin/bans").json()["bans"]}
        assert {("key", banned["target"]), ("ip", "198.51.100.7")} <= rows

        for scope, target in (("key", banned["target"]), ("ip", "198.51.100.7")):
            resp = http.post("/admin/unban", json={scope: target,
                                                   "reason": "unbanned from the dashboard"})
            assert resp.status_code == 200
            assert resp.json() == {"scope": scope, "target": target, "banned": False}
        rows = {(b["scope"], b["target"]) for b in http.get("/admin/bans").json()["bans"]}
        assert ("key", banned["target"]) not in rows and ("ip", "198.51.100.7") not in rows
        assert http.post("/v1/check", json={"api_key": raw_key}).json()["allowed"]
        audit = http.get("/admin/audit", params={"limit": 5}).json()["entries"]
        assert [e["action"] for e in audit[:2]] == ["unban", "unban"]

    script = (REPO / "serving" / "api" / "static" / "dashboard.js").read_text(encoding="utf-8")
    assert '"/admin/unban"' in script and "{ key: ban.target" in script
    assert "{ ip: ban.target" in script


# ---- the page in a real browser ------------------------------------------------------------
def chromium_args(binary: str, profile: str) -> list[str]:
    return [binary, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
            "--no-first-run", "--disable-background-networking",
            "--disable-component-update", "--disable-sync", "--hide-scrollbars",
            f"--user-data-dir={profile}", "--virtual-time-budget=5000"]


def run_chromium(binary: str, profile: Path, extra: list[str],
                 url: str) -> subprocess.Popen[str]:
    """One headless Chromium with a fresh profile (under pytest's tmp dir, cleaned up)."""
    profile.mkdir()
    return subprocess.Popen([*chromium_args(binary, str(profile)), *extra, url],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(proc: subprocess.Popen[str], what: str) -> str:
    try:
        out, err = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        pytest.fail(f"chromium ({what}) did not finish in 60 s: {err[-2000:]}")
    assert proc.returncode == 0, f"chromium ({what}) failed: {err[-2000:]}"
    return out


def test_dashboard_renders_in_headless_chromium(fed_server: FedServer, tmp_path: Path) -> None:
    binary = chromium_binary()
    if binary is None:
        pytest.skip("no chromium binary found (CI installs Debian's chromium); "
                    "the API-level dashboard tests still ran")
    with admin_client(fed_server) as http:
        alerts = http.get("/v1/alerts", params={"limit": 40}).json()["alerts"]
        risky = http.get("/v1/stats/keys", params={"limit": 10}).json()["keys"]
        bans = http.get("/admin/bans").json()["bans"]
    auto_bans = [b for b in bans if b["by"] == "keywatch"]
    assert alerts and risky and auto_bans, "the simulated slice should alert and ban"

    page = f"{fed_server.url}/dashboard"
    shot = tmp_path / "dashboard.png"
    # the three browsers run side by side: the data does not change while they look
    dom_proc = run_chromium(binary, tmp_path / "profile-dom", ["--dump-dom"],
                            f"{page}#token={ADMIN_TOKEN}")
    shot_proc = run_chromium(binary, tmp_path / "profile-shot",
                             [f"--screenshot={shot}", "--window-size=1400,1500"],
                             f"{page}#token={ADMIN_TOKEN}")
    anon_proc = run_chromium(binary, tmp_path / "profile-anon", ["--dump-dom"], page)
    dom = finish(dom_proc, "dump-dom")
    finish(shot_proc, "screenshot")
    anon = finish(anon_proc, "dump-dom without token")

    assert 'data-state="loaded"' in dom, dom[-3000:]
    assert ADMIN_TOKEN not in dom, "the token must not end up in the page"
    # recent alerts, with their reason codes
    assert dom.count('class="alert-row"') == len(alerts)
    for code in {r["code"] for a in alerts for r in a["reasons"]}:
        assert f">{code}</span>" in dom, code
    # riskiest keys, in the API's order, the first one's timeline opened
    rows = re.findall(r'<tr class="key-row[^"]*" data-key="(k_[0-9a-f]{32})"', dom)
    assert rows == [k["key_id"] for k in risky]
    assert f'<span id="key-title" class="mono">{risky[0]["key_id"]}</span>' in dom
    assert dom.count('<li class="decision') >= 1
    # active bans with an Unban button, the scored ban among them
    for ban in auto_bans:
        assert f'class="ban-row" data-scope="{ban["scope"]}" data-target="{ban["target"]}"' in dom
    assert dom.count(">Unban</button>") == len(bans)
    # the chart: an SVG with stacked bars, blocks among them
    assert '<svg id="decisions-chart"' in dom and 'class="bar bar-block"' in dom
    # hostile text from the API is shown as text, never parsed as markup
    assert "&lt;img src=x onerror=" in dom and "&lt;script&gt;alert(1)" in dom
    assert "<img" not in dom and "pwned" not in dom.split("</title>")[0]

    assert 'data-state="no-token"' in anon and 'class="alert-row"' not in anon
    assert "Enter the admin token" in anon

    png = shot.read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 20_000
    if os.environ.get("KEYWATCH_UPDATE_DASHBOARD_PNG") == "1":
        DOCS_PNG.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(shot, DOCS_PNG)
