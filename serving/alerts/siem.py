"""SIEM export: alerts as OCSF Detection Findings, one JSON line each, ready to tail.

OCSF (Open Cybersecurity Schema Framework) is what Splunk, Elastic, Sentinel, Datadog and
AWS Security Lake ingest without a custom parser, and Detection Finding (class 2004,
category 2 Findings) is the class their pipelines already route to analysts. A finding is
written when an alert is raised (activity Create), when it escalates (Update) and when an
operator gives feedback on it (Update, or Close for a false positive). Repeats absorbed by
de-duplication are not written one by one: the finding carries the running `count`.

The API key appears only as its `key_id` (an HMAC; the raw key never reaches this module),
as the actor's credential id and as an observable of type "User Credential ID".
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from serving.engine.jsonl_writer import RotatingJsonlWriter, read_jsonl
from serving.observability.redaction import redact_value

OCSF_SCHEMA_VERSION = "1.3.0"
PRODUCT = {"name": "keywatch", "vendor_name": "keywatch", "version": "0.1.0"}

CLASS_UID = 2004
CATEGORY_UID = 2

ACTIVITIES: dict[str, tuple[int, str]] = {
    "create": (1, "Create"),
    "update": (2, "Update"),
    "close": (3, "Close"),
}

# our tiers → OCSF severity_id (0 Unknown, 1 Informational, 2 Low, 3 Medium, 4 High,
# 5 Critical, 6 Fatal); "none" only reaches SIEM for a non-allow verdict without a reason.
SEVERITY_IDS: dict[str, tuple[int, str]] = {
    "none": (1, "Informational"),
    "low": (2, "Low"),
    "medium": (3, "Medium"),
    "high": (4, "High"),
    "critical": (5, "Critical"),
}

# alert status → OCSF finding status_id (1 New, 2 In Progress, 3 Suppressed, 4 Resolved)
STATUS_IDS: dict[str, tuple[int, str]] = {
    "open": (1, "New"),
    "confirmed": (2, "In Progress"),
    "false_positive": (3, "Suppressed"),
    "resolved": (4, "Resolved"),
}

# our verdict → OCSF action_id (1 Allowed, 2 Denied, 99 Other)
ACTION_IDS: dict[str, tuple[int, str]] = {
    "allow": (1, "Allowed"),
    "throttle": (99, "Throttled"),
    "block": (2, "Denied"),
}

OBSERVABLE_IP = (2, "IP Address")
OBSERVABLE_CREDENTIAL = (19, "User Credential ID")


def _ms(ts: float | None) -> int | None:
    return None if ts is None else round(ts * 1000)


def _observables(alert: dict[str, Any]) -> list[dict[str, Any]]:
    """The key's id and every address the alert covers, as OCSF observables."""
    source_ip = alert.get("source_ip")
    observables: list[dict[str, Any]] = [{
        "name": "actor.user.credential_uid", "type_id": OBSERVABLE_CREDENTIAL[0],
        "type": OBSERVABLE_CREDENTIAL[1], "value": alert["key_id"]}]
    for ip in alert.get("source_ips") or ([source_ip] if source_ip else []):
        observables.append({"name": "src_endpoint.ip", "type_id": OBSERVABLE_IP[0],
                            "type": OBSERVABLE_IP[1], "value": ip})
    return observables


def _evidences(alert: dict[str, Any]) -> list[dict[str, Any]]:
    """One evidence per reason (at least one), each naming the key and the address."""
    source_ip = alert.get("source_ip")
    base = {"actor": {"user": {"credential_uid": alert["key_id"]}},
            **({"src_endpoint": {"ip": source_ip}} if source_ip else {})}
    return [{**base, "data": {"code": r.get("code"), "severity": r.get("severity"),
                              "message": r.get("message"),
                              "evidence": r.get("evidence", {})}}
            for r in alert.get("reasons", [])] or [base]


def _classification(alert: dict[str, Any], activity: str) -> dict[str, Any]:
    """The OCSF class, activity, severity, status and action ids and names."""
    activity_id, activity_name = ACTIVITIES[activity]
    severity_id, severity_name = SEVERITY_IDS.get(alert["severity"], (0, "Unknown"))
    status_id, status_name = STATUS_IDS.get(alert.get("status", "open"), (99, "Other"))
    action_id, action_name = ACTION_IDS.get(alert.get("decision", "allow"), (0, "Unknown"))
    return {
        "activity_id": activity_id, "activity_name": activity_name,
        "category_uid": CATEGORY_UID, "category_name": "Findings",
        "class_uid": CLASS_UID, "class_name": "Detection Finding",
        "type_uid": CLASS_UID * 100 + activity_id,
        "type_name": f"Detection Finding: {activity_name}",
        "severity_id": severity_id, "severity": severity_name,
        "status_id": status_id, "status": status_name,
        "action_id": action_id, "action": action_name,
    }


def _finding_info(alert: dict[str, Any]) -> dict[str, Any]:
    key_id = alert["key_id"]
    return {
        "uid": alert["alert_id"],
        "title": f"{alert['code']} on API key {key_id}",
        "desc": alert.get("title", ""),
        "types": ["API Key Abuse", alert["code"]],
        "analytic": {"uid": alert["code"], "name": alert["code"], "type_id": 1,
                     "type": "Rule"},
        "created_time": _ms(alert.get("raised_at")),
        "first_seen_time": _ms(alert.get("first_seen_ts")),
        "last_seen_time": _ms(alert.get("last_seen_ts")),
    }


def detection_finding(alert: dict[str, Any], *, activity: str = "create",
                      time_s: float | None = None) -> dict[str, Any]:
    """One OCSF Detection Finding for an alert (in its `Alert.to_dict()` form).

    `time_s` is when this activity happened; by default the event time of the alert's
    first (Create) or latest (Update/Close) observed event, so replays stay reproducible.
    """
    if time_s is None:
        time_s = alert.get("first_seen_ts" if activity == "create" else "last_seen_ts")
    key_id = alert["key_id"]
    finding: dict[str, Any] = {
        **_classification(alert, activity),
        "time": _ms(time_s),
        "is_alert": True,
        "message": alert.get("title", ""),
        "count": alert.get("count", 1),
        "risk_score": round(float(alert.get("score", 0.0)) * 100),
        "finding_info": _finding_info(alert),
        "metadata": {
            "product": dict(PRODUCT),
            "version": OCSF_SCHEMA_VERSION,
            "log_name": "keywatch-findings",
            "uid": f"{alert['alert_id']}-{activity}-{alert.get('count', 1)}",
        },
        "actor": {"user": {"uid": key_id, "credential_uid": key_id, "type": "API key"}},
        "observables": _observables(alert),
        "evidences": _evidences(alert),
        "unmapped": {"keywatch": {
            "decision": alert.get("decision"), "action": alert.get("action", {}),
            "score": alert.get("score"), "dry_run": alert.get("dry_run", False),
            "status": alert.get("status", "open")}},
    }
    if alert.get("source_ip"):
        finding["src_endpoint"] = {"ip": alert["source_ip"]}
    return redact_value(finding)


class SiemExporter:
    """Writes findings to a rotating JSONL file (`<data_dir>/siem/findings.jsonl`)."""

    def __init__(self, writer: RotatingJsonlWriter) -> None:
        self.writer = writer
        self.exported = 0

    @classmethod
    def at(cls, path: Path, *, max_bytes: int = 50 * 1024 * 1024,
           keep_files: int = 5) -> SiemExporter:
        return cls(RotatingJsonlWriter(path, max_bytes=max_bytes, keep_files=keep_files))

    def export(self, alert: dict[str, Any], *, activity: str = "create",
               time_s: float | None = None) -> None:
        self.writer.write(detection_finding(alert, activity=activity, time_s=time_s))
        self.exported += 1

    def export_feedback(self, alert: dict[str, Any]) -> None:
        """A feedback verdict is an Update, a false positive also closes the finding."""
        activity = "close" if alert.get("status") == "false_positive" else "update"
        self.export(alert, activity=activity, time_s=time.time())

    def read(self) -> list[dict[str, Any]]:
        """Everything still on disk, oldest first (tests and the `report` verb)."""
        self.writer.flush()
        return read_jsonl(self.writer.files())
