"""SIEM export: OCSF Detection Finding shape, severity mapping, rotation, and via the app."""

from __future__ import annotations

import json
from pathlib import Path

from fastapi.testclient import TestClient

from serving.alerts.pipeline import AlertPipeline, AlertQuery
from serving.alerts.siem import SiemExporter, detection_finding
from serving.api.app import create_app
from serving.engine.jsonl_writer import RotatingJsonlWriter, read_jsonl
from tests.conftest import ADMIN_TOKEN, make_settings
from tests.test_alerts import KEY_A, T0, decision, failing_events

REQUIRED = {"activity_id", "category_uid", "class_uid", "type_uid", "severity_id", "time",
            "metadata", "finding_info", "status_id"}


def test_finding_has_the_ocsf_detection_finding_shape() -> None:
    p = AlertPipeline()
    alert = p.observe(T0 + 0.25, KEY_A, "81.2.69.160",
                      decision(severity="critical", verdict="block",
                               codes=("impossible_travel",)))
    f = detection_finding(alert.to_dict())  # type: ignore[union-attr]
    assert set(f) >= REQUIRED
    assert (f["class_uid"], f["category_uid"], f["activity_id"], f["type_uid"]) == (
        2004, 2, 1, 200401)
    assert (f["class_name"], f["category_name"]) == ("Detection Finding", "Findings")
    assert (f["severity_id"], f["severity"]) == (5, "Critical")
    assert f["time"] == int((T0 + 0.25) * 1000) and isinstance(f["time"], int)
    assert (f["status_id"], f["status"]) == (1, "New")
    assert (f["action_id"], f["action"]) == (2, "Denied")
    info = f["finding_info"]
    assert info["uid"] == alert.alert_id  # type: ignore[union-attr]
    assert info["title"] and info["desc"] == "impossible_travel fired"
    assert "impossible_travel" in info["types"]
    assert info["analytic"] == {"uid": "impossible_travel", "name": "impossible_travel",
                                "type_id": 1, "type": "Rule"}
    meta = f["metadata"]
    assert meta["product"]["name"] == "keywatch" and meta["product"]["vendor_name"]
    assert meta["version"].startswith("1.")
    obs = {(o["type_id"], o["value"]) for o in f["observables"]}
    assert obs == {(19, KEY_A), (2, "81.2.69.160")}
    ev = f["evidences"][0]
    assert ev["actor"]["user"]["credential_uid"] == KEY_A
    assert ev["src_endpoint"]["ip"] == "81.2.69.160"
    assert ev["data"]["code"] == "impossible_travel"
    assert f["src_endpoint"] == {"ip": "81.2.69.160"}
    json.dumps(f)


def test_severity_tiers_map_to_ocsf_ids() -> None:
    p = AlertPipeline(min_severity="low")
    ids = {}
    for i, sev in enumerate(("low", "medium", "high", "critical")):
        a = p.observe(T0, f"k_{i:032x}", None, decision(f"k_{i:032x}", severity=sev))
        ids[sev] = detection_finding(a.to_dict())["severity_id"]  # type: ignore[union-attr]
    assert ids == {"low": 2, "medium": 3, "high": 4, "critical": 5}


def test_files_rotate_by_size_and_keep_n(tmp_path: Path) -> None:
    path = tmp_path / "siem" / "findings.jsonl"
    writer = RotatingJsonlWriter(path, max_bytes=4096, keep_files=2)
    siem = SiemExporter(writer)
    p = AlertPipeline(siem=siem)
    for i in range(60):
        p.observe(T0 + i, f"k_{i:032x}", "10.1.2.3", decision(f"k_{i:032x}"))
        if i % 7 == 0:
            writer.flush()
    writer.flush()
    names = sorted(x.name for x in path.parent.iterdir())
    assert names == ["findings.jsonl", "findings.jsonl.1", "findings.jsonl.2"]
    assert writer.rotations > 2
    for f in writer.files():
        assert f.stat().st_size <= 4096
    records = read_jsonl(writer.files())
    assert all(r["class_uid"] == 2004 for r in records)
    # the newest finding is kept; the oldest rotated out
    uids = [r["finding_info"]["uid"] for r in records]
    assert uids[-1] == p.query(AlertQuery(), limit=1)[0][0]["alert_id"]
    assert len(records) < 60


def test_a_failing_disk_keeps_findings_buffered(tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("x")
    writer = RotatingJsonlWriter(blocker / "findings.jsonl")
    writer.write({"a": 1})
    assert writer.flush() is False
    assert writer.status()["write_errors"] == 1 and writer.status()["buffered"] == 1
    blocker.unlink()
    assert writer.flush() is True and writer.status()["written"] == 1


def test_the_app_writes_create_and_close_findings() -> None:
    settings = make_settings()
    auth = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    with TestClient(create_app(settings)) as c:
        c.post("/v1/events:batch", json=failing_events("sk-live-siem-key"))
        alert = c.get("/v1/alerts", headers=auth).json()["alerts"][0]
        c.post(f"/v1/alerts/{alert['alert_id']}/feedback", headers=auth,
               json={"verdict": "false_positive"})
    findings = read_jsonl([settings.data_dir / "siem" / "findings.jsonl"])
    assert [(f["activity_id"], f["status"]) for f in findings] == [(1, "New"),
                                                                  (3, "Suppressed")]
    assert findings[0]["finding_info"]["uid"] == alert["alert_id"]
    assert findings[0]["severity_id"] == 3
