"""The security report from simulated traffic with incidents, through the served app."""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from serving.api.app import create_app
from serving.cli.main import main
from serving.schedules.cron import next_fire, weekly_cron
from serving.schedules.reports import ReportScheduler
from tests.conftest import ADMIN_TOKEN, TEST_SECRET, make_settings
from training.simulator import simulate

AUTH = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
START = "2026-11-02T00:00:00Z"
CUT = "2026-11-03T00:00:00Z"
"""The first day of a small simulated population: the first incidents fall in it."""


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[TestClient, Path]]:
    root = tmp_path_factory.mktemp("report")
    sim = simulate(root / "sim", keys=10, days=2, seed=0, progress=False)
    cut = datetime.fromisoformat(CUT.replace("Z", "+00:00")).timestamp()
    lines = []
    with sim.events_path.open() as fh:
        for line in fh:
            ts = json.loads(line)["timestamp"]
            if datetime.fromisoformat(ts.replace("Z", "+00:00")).timestamp() >= cut:
                break
            lines.append(json.loads(line))
    settings = make_settings(models=False, siem_log=False, report_dir=root / "reports")
    with TestClient(create_app(settings)) as client:
        for i in range(0, len(lines), 1000):
            r = client.post("/v1/events:batch", json=lines[i:i + 1000])
            assert r.status_code == 200
        yield client, root


def test_report_contains_the_labelled_incident_with_its_money(
        served: tuple[TestClient, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    client, root = served
    data_dir = client.app.state.settings.data_dir  # type: ignore[attr-defined]
    client.app.state.event_log.flush()  # type: ignore[attr-defined]
    client.app.state.ops.alerts.snapshot_counts()  # type: ignore[attr-defined]
    client.app.state.ops.flush()  # type: ignore[attr-defined]
    monkeypatch.setenv("KEYWATCH_SECRET", TEST_SECRET)
    out = root / "cli-report"
    assert main(["report", "--since", START, "--until", CUT, "--out", str(out),
                 "--data-dir", str(data_dir), "--labels", str(root / "sim")]) == 0

    data = json.loads((out / "report.json").read_text())
    labels = json.loads((root / "sim" / "incidents.json").read_text())
    drain = next(lb for lb in labels if lb["scenario"] == "token_drain")
    # about the key, or about the intruder's address when the ban landed there
    found = [i for i in data["incident_list"]
             if (i.get("label") or "").startswith(drain["id"])]
    assert found, "the token-drain incident must be in the report"
    inc = found[0]
    assert inc["label"].startswith(drain["id"]) and inc["start_source"] == "label"
    # what it spent before it was stopped (nothing, when stopped at its first call) and
    # what blocking it saved
    assert inc["spent_usd"] >= 0 and inc["saved_usd"] > 0 and inc["burn_usd_per_h"] > 0
    assert inc["time_to_detect_s"] >= 0 and inc["codes"]
    assert data["money"]["spent_usd"] > 0 and data["events"] > 1000

    md = (out / "report.md").read_text()
    assert "## Incidents" in md and inc["key_id"] in md and drain["id"] in md
    assert "## Money" in md and "## Riskiest keys" in md and "## Health" in md
    html = (out / "report.html").read_text()
    assert "<table>" in html and "<script" not in html and "plots/spend_per_hour.png" in html
    assert (out / "plots" / "spend_per_hour.png").read_bytes()[:4] == b"\x89PNG"
    assert "sk-live" not in md + html + (out / "report.json").read_text()

    # every alert of the run states the money at stake
    alerts = [json.loads(x) for x in (data_dir / "alerts" / "alerts.jsonl").open()]
    assert alerts and all("burn_usd_per_h" in a["money"] for a in alerts)
    assert any("burning $" in a["title"] for a in alerts)


def test_report_endpoint_needs_the_admin_token_and_writes_the_report(
        served: tuple[TestClient, Path]) -> None:
    client, root = served
    assert client.get("/v1/report", params={"since": START}).status_code == 401
    r = client.get("/v1/report", params={"since": START, "until": CUT}, headers=AUTH)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/markdown")
    assert r.text.startswith("# keywatch security report") and "## Incidents" in r.text
    j = client.get("/v1/report", params={"since": START, "until": CUT, "format": "json"},
                   headers=AUTH).json()
    assert j["incidents"] >= 1 and j["health"]["events_scored"] >= j["events"] > 0
    assert j["health"]["latency_p99_s"] is not None
    assert Path(j["paths"]["html"]).is_file() and str(root / "reports") in j["paths"]["html"]
    bad = client.get("/v1/report", params={"since": CUT, "until": START}, headers=AUTH)
    assert bad.status_code == 422


def test_schedule_times_and_a_failing_run_does_not_stop_it() -> None:
    assert weekly_cron("Monday 07:30") == "30 7 * * 1" and weekly_cron("fri") == "0 7 * * 5"
    assert weekly_cron("0 6 * * 0") == "0 6 * * 0"
    with pytest.raises(ValueError):
        weekly_cron("someday 25:00")
    thu = datetime(2026, 1, 1, 9, 0, tzinfo=UTC)
    assert next_fire(weekly_cron("mon"), thu) == datetime(2026, 1, 5, 7, 0, tzinfo=UTC)
    calls = []

    def run(kind: str, since: float, until: float) -> None:
        calls.append((kind, until - since))
        raise RuntimeError("disk full")

    sched = ReportScheduler(run=run, daily_at="06:00", weekly_on="mon 06:00")
    assert sched.next_due(thu) == (datetime(2026, 1, 2, 6, 0, tzinfo=UTC), ["daily"])
    monday = datetime(2026, 1, 5, 5, 0, tzinfo=UTC)
    assert sched.next_due(monday) == (datetime(2026, 1, 5, 6, 0, tzinfo=UTC), ["weekly", "daily"])
    result = sched.run_once("weekly", thu)
    assert calls == [("weekly", 7 * 86400.0)] and result["ok"] is False
    assert "disk full" in result["error"]
