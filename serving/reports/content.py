"""What a security report holds: incidents, the report itself, and report time ranges.

How a report is built is described in `serving.reports.report`."""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

from features.contract import event_time_iso, parse_timestamp
from serving.engine.decision import severity_rank

log = logging.getLogger("keywatch.report")


INCIDENT_GAP_S = 3600.0
BURST_GAP_S = 300.0
BURST_LOOKBACK_S = 3600.0
BLOCKING = ("block", "throttle")
_RELATIVE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(m|h|d|w)\s*$")
_UNIT = {"m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_when(value: str | float | None, *, now: float) -> float | None:
    """RFC 3339, epoch seconds, or a span back from `now` such as `24h`, `7d`, `2w`."""
    if value is None or value == "":
        return None
    if isinstance(value, str):
        m = _RELATIVE.match(value.lower())
        if m:
            return now - float(m.group(1)) * _UNIT[m.group(2)]
    return parse_timestamp(value, now=math.inf)


# ---- the data ------------------------------------------------------------------------------
@dataclass(slots=True)
class Incident:
    incident_id: str
    key_id: str
    """The key, or `ip:<address>` for an incident about an address (stuffing)."""
    first_seen_ts: float
    last_seen_ts: float
    severity: str
    codes: list[str]
    titles: list[str]
    alerts: int
    decisions: int
    start_ts: float
    start_source: str
    """"label" (the labelled first anomalous event) or "burst" (estimated)."""
    label: str | None = None
    contained_ts: float | None = None
    contained_by: str | None = None
    spent_usd: float = 0.0
    saved_usd: float = 0.0
    burn_usd_per_h: float = 0.0
    events: int = 0
    blocked_events: int = 0
    source_ips: list[str] = field(default_factory=list)
    dry_run: bool = False
    feedback: str | None = None
    keys: int = 1

    @property
    def time_to_detect_s(self) -> float:
        return max(0.0, self.first_seen_ts - self.start_ts)

    @property
    def time_to_contain_s(self) -> float | None:
        if self.contained_ts is None:
            return None
        return max(0.0, self.contained_ts - self.first_seen_ts)

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.update(first_seen=event_time_iso(self.first_seen_ts),
                 last_seen=event_time_iso(self.last_seen_ts),
                 start=event_time_iso(self.start_ts),
                 contained=event_time_iso(self.contained_ts) if self.contained_ts else None,
                 time_to_detect_s=round(self.time_to_detect_s, 1),
                 time_to_contain_s=(round(self.time_to_contain_s, 1)
                                    if self.time_to_contain_s is not None else None))
        return d


@dataclass(slots=True)
class SecurityReport:
    since: float
    until: float
    generated_at: float
    incidents: list[Incident]
    keys: list[dict[str, Any]]
    money: dict[str, float]
    feedback: dict[str, Any]
    models: dict[str, Any]
    health: dict[str, Any]
    hourly: dict[str, list[float]]
    sources: dict[str, Any]

    def summary(self) -> dict[str, Any]:
        """The short form: what a webhook or the JSON endpoint gets."""
        worst = max(self.incidents, key=lambda i: (severity_rank(i.severity), i.spent_usd),
                    default=None)
        return {
            "type": "keywatch.report",
            "since": event_time_iso(self.since), "until": event_time_iso(self.until),
            "generated_at": event_time_iso(self.generated_at),
            "events": self.health.get("events", 0),
            "incidents": len(self.incidents),
            "incidents_by_severity": count_by(i.severity for i in self.incidents),
            "money": self.money,
            "false_positives": self.feedback.get("false_positive", 0),
            "worst_incident": worst.as_dict() if worst is not None else None,
            "current_model": self.models.get("current"),
        }

    def as_dict(self) -> dict[str, Any]:
        return {**self.summary(), "incident_list": [i.as_dict() for i in self.incidents],
                "riskiest_keys": self.keys, "feedback": self.feedback, "models": self.models,
                "health": self.health, "sources": self.sources}


def count_by(items: Iterable[str]) -> dict[str, int]:
    out: dict[str, int] = {}
    for x in items:
        out[x] = out.get(x, 0) + 1
    return out


