"""Alerts: the decisions an operator should hear about, de-duplicated, kept and delivered.

Fed with every decision (`AlertPipeline.observe`), the pipeline raises an alert when the
severity is at least `min_severity` (default medium) or the verdict is not allow. The
alert is keyed by (subject, rule code), the code being that of the decision's most severe
reason and the subject its scope: the key, or for an address-scoped reason (a banned
address, credential stuffing) the address, so one incident from one address is one
alert counting the keys tried (`keys_tried`), not one alert per key. A second decision
for the same pair within `dedup_window_s` of the alert being
raised is counted on the open alert (`count`, `last_seen`) instead of being sent again,
unless it is more severe, in which case the alert escalates and is sent once more. After
the window a new alert is raised, which doubles as a reminder that the abuse goes on.
Windows run on event time, like every other window in keywatch, so replays reproduce.

Raised alerts go to a bounded in-memory ring (what `GET /v1/alerts` pages through), an
optional JSONL alert log (reloaded at startup, so the ring and feedback survive a
restart), the SIEM export, and the sinks. Everything on the scoring path is in-memory;
disks and networks are reached from background threads.

Every alert states the money at stake: `spent_usd` sums the estimated cost of the
decisions counted on it, and `burn_usd_per_h` / `key_spend_usd_24h` are the key's burn
rate and 24-hour spend at its latest decision (from the decision's `money`).

An operator's (key_id, rule code) suppression (see `serving.alerts.feedback`) is honoured here:
a reason whose pair is suppressed does not raise an alert.

With a shared store (`shared=SharedOps`, see `serving.alerts.shared`) the ring is a replica
of the store's ordered operations log, shared by every keywatch replica: raising is
claimed in the store for the dedup window from its first event (so each alert is sent
once, by one replica), and counts, escalations and statuses are log records applied by
every replica before it answers.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from features.contract import event_time_iso
from serving.alerts.shared import RecordHandler, SharedOps
from serving.alerts.siem import SiemExporter
from serving.alerts.sinks import Notification, WebhookSink
from serving.engine.decision import SEVERITIES, Decision, severity_rank
from serving.engine.jsonl_writer import RotatingJsonlWriter, read_jsonl

log = logging.getLogger("keywatch.alerts")

MAX_IPS_PER_ALERT = 10
MAX_KEYS_COUNTED = 10_000
"""Distinct keys counted on one address alert (beyond it, `keys_tried` stops growing)."""
MAX_KEYS_LISTED = 10
STATUSES = ("open", "confirmed", "false_positive")
_VERDICT_RANK = {"allow": 0, "throttle": 1, "block": 2}


@dataclass(slots=True)
class Alert:
    """One alert: a (key, rule) pair that fired, and how often within its window."""

    alert_id: str
    seq: int
    key_id: str
    code: str
    title: str
    severity: str
    decision: str
    score: float
    action: dict[str, Any]
    reasons: list[dict[str, Any]]
    first_seen_ts: float
    last_seen_ts: float
    raised_at: float
    source_ip: str | None = None
    source_ips: list[str] = field(default_factory=list)
    count: int = 1
    escalations: int = 0
    status: str = "open"
    dry_run: bool = False
    spent_usd: float = 0.0
    burn_usd_per_h: float = 0.0
    key_spend_usd_24h: float = 0.0
    subject: str = "key"
    """`key`: the alert is about `key_id`; `address`: about `source_ip`, whatever keys
    it tried (`keys_tried` distinct, the first few in `key_ids`)."""
    key_ids: list[str] = field(default_factory=list)
    keys_tried: int = 1
    _keys: set[str] = field(default_factory=set, repr=False)

    def add_key(self, key_id: str) -> None:
        if key_id in self._keys or len(self._keys) >= MAX_KEYS_COUNTED:
            return
        self._keys.add(key_id)
        self.keys_tried = max(self.keys_tried, len(self._keys))
        if len(self.key_ids) < MAX_KEYS_LISTED:
            self.key_ids.append(key_id)

    def add_money(self, decision: Decision) -> None:
        m = decision.money
        if m is not None:
            self.spent_usd += m.cost_usd
            self.burn_usd_per_h = m.burn_usd_per_h
            self.key_spend_usd_24h = m.spend_usd_24h

    def add_ip(self, ip: str | None) -> None:
        if ip and ip not in self.source_ips and len(self.source_ips) < MAX_IPS_PER_ALERT:
            self.source_ips.append(ip)

    def to_dict(self) -> dict[str, Any]:
        return {
            "alert_id": self.alert_id,
            "key_id": self.key_id,
            "subject": self.subject,
            "keys_tried": self.keys_tried,
            "key_ids": list(self.key_ids),
            "source_ip": self.source_ip,
            "source_ips": list(self.source_ips),
            "code": self.code,
            "title": self.title,
            "severity": self.severity,
            "decision": self.decision,
            "score": self.score,
            "action": dict(self.action),
            "reasons": [dict(r) for r in self.reasons],
            "first_seen": event_time_iso(self.first_seen_ts),
            "last_seen": event_time_iso(self.last_seen_ts),
            "first_seen_ts": self.first_seen_ts,
            "last_seen_ts": self.last_seen_ts,
            "raised_at": self.raised_at,
            "count": self.count,
            "escalations": self.escalations,
            "status": self.status,
            "dry_run": self.dry_run,
            "money": {"spent_usd": round(self.spent_usd, 6),
                      "burn_usd_per_h": round(self.burn_usd_per_h, 6),
                      "key_spend_usd_24h": round(self.key_spend_usd_24h, 6)},
        }

    @classmethod
    def from_dict(cls, rec: dict[str, Any], seq: int) -> Alert:
        return cls(
            alert_id=rec["alert_id"], seq=seq, key_id=rec["key_id"], code=rec["code"],
            title=rec.get("title", ""), severity=rec["severity"],
            decision=rec.get("decision", "allow"), score=float(rec.get("score", 0.0)),
            action=dict(rec.get("action") or {}), reasons=list(rec.get("reasons") or []),
            first_seen_ts=float(rec["first_seen_ts"]), last_seen_ts=float(rec["last_seen_ts"]),
            raised_at=float(rec.get("raised_at", 0.0)), source_ip=rec.get("source_ip"),
            source_ips=list(rec.get("source_ips") or []), count=int(rec.get("count", 1)),
            escalations=int(rec.get("escalations", 0)), status=rec.get("status", "open"),
            dry_run=bool(rec.get("dry_run", False)),
            spent_usd=float((rec.get("money") or {}).get("spent_usd", 0.0)),
            burn_usd_per_h=float((rec.get("money") or {}).get("burn_usd_per_h", 0.0)),
            key_spend_usd_24h=float((rec.get("money") or {}).get("key_spend_usd_24h", 0.0)),
            subject=rec.get("subject", "key"), key_ids=list(rec.get("key_ids") or []),
            keys_tried=int(rec.get("keys_tried", 1)),
        )


@dataclass(frozen=True, slots=True)
class AlertQuery:
    """Filters for `AlertPipeline.query`; all optional, combined with AND."""

    key_id: str | None = None
    source_ip: str | None = None
    code: str | None = None
    min_severity: str | None = None
    since: float | None = None
    until: float | None = None
    status: str | None = None

    def matches(self, a: Alert) -> bool:
        return (
            (self.key_id is None or a.key_id == self.key_id
             or self.key_id in a._keys)  # a key tried from an address an alert covers
            and (self.source_ip is None or a.source_ip == self.source_ip
                 or self.source_ip in a.source_ips)
            and (self.code is None or a.code == self.code)
            and (self.min_severity is None
                 or severity_rank(a.severity) >= severity_rank(self.min_severity))
            and (self.since is None or a.last_seen_ts >= self.since)
            and (self.until is None or a.first_seen_ts < self.until)
            and (self.status is None or a.status == self.status)
        )


class AlertPipeline:
    """Decides which decisions become alerts, de-duplicates, stores and dispatches them."""

    def __init__(
        self,
        *,
        min_severity: str = "medium",
        dedup_window_s: float = 600.0,
        ring_size: int = 10_000,
        alert_log: RotatingJsonlWriter | None = None,
        siem: SiemExporter | None = None,
        sinks: Sequence[WebhookSink] = (),
        is_suppressed: Callable[[str, str], bool] | None = None,
        shared: SharedOps | None = None,
    ) -> None:
        if min_severity not in SEVERITIES:
            raise ValueError(f"min_severity must be one of {', '.join(SEVERITIES)}")
        self.min_rank = severity_rank(min_severity)
        self.min_severity = min_severity
        self.dedup_window_s = dedup_window_s
        self.alert_log = alert_log
        self.siem = siem
        self.sinks = list(sinks)
        self.is_suppressed = is_suppressed
        self._ring: deque[Alert] = deque(maxlen=ring_size)
        self._by_id: dict[str, Alert] = {}
        self._open: dict[tuple[str, str], Alert] = {}
        self._logged_count: dict[str, int] = {}
        self._lock = threading.Lock()
        self._seq = 0
        self._since_purge = 0
        self.clock = 0.0
        """Latest event time seen: 'now' for windows, in event time."""
        self.raised = 0
        self.deduplicated = 0
        self.escalated = 0
        self.suppressed = 0
        self.shared = shared
        self.on_record: dict[str, RecordHandler] = {}
        """Shared mode: handlers of other log records (feedback), by record type."""
        self._outbox: list[dict[str, Any]] = []
        if alert_log is not None and shared is None:
            self._load(alert_log)

    # ---- the scoring-path hook --------------------------------------------------------
    def qualifies(self, decision: Decision) -> bool:
        return decision.decision != "allow" or severity_rank(decision.severity) >= self.min_rank

    def observe(self, event_ts: float, key_id: str, source_ip: str | None,
                decision: Decision) -> Alert | None:
        """Raise, count or ignore one decision; returns the alert it landed on, if any."""
        if not self.qualifies(decision):
            return None
        reasons = decision.reasons
        candidates = reasons
        if self.is_suppressed is not None and reasons:
            candidates = [r for r in reasons if not self.is_suppressed(key_id, r.code)]
            if len(candidates) < len(reasons):
                effective = max((severity_rank(r.severity) for r in candidates), default=0)
                if effective < self.min_rank:  # what made it alert-worthy is suppressed
                    with self._lock:
                        self.suppressed += 1
                    return None
        primary = max(candidates, key=lambda r: severity_rank(r.severity)) if candidates else None
        code = primary.code if primary is not None else f"decision_{decision.decision}"
        title = primary.message if primary is not None else (
            f"{decision.decision} at severity {decision.severity}")
        by_address = primary is not None and primary.scope == "ip" and bool(source_ip)
        subject = f"ip:{source_ip}" if by_address else key_id
        if self.shared is not None:
            return self._observe_shared(event_ts, key_id, source_ip, code, title, decision,
                                        by_address=by_address)
        note: tuple[str, Alert] | None = None
        with self._lock:
            self.clock = max(self.clock, event_ts)
            alert = self._open.get((subject, code))
            if alert is not None and abs(event_ts - alert.first_seen_ts) < self.dedup_window_s:
                alert.count += 1
                alert.add_key(key_id)
                alert.first_seen_ts = min(alert.first_seen_ts, event_ts)
                alert.last_seen_ts = max(alert.last_seen_ts, event_ts)
                alert.add_ip(source_ip)
                alert.add_money(decision)
                self.deduplicated += 1
                if severity_rank(decision.severity) > severity_rank(alert.severity):
                    self._update_from(alert, decision, title)
                    alert.escalations += 1
                    self.escalated += 1
                    note = ("escalated", alert)
            else:
                alert = self._new_alert(event_ts, key_id, source_ip, code, title, decision)
                if by_address:
                    alert.subject = "address"
                    self._open[(subject, code)] = alert
                note = ("raised", alert)
            self._maybe_purge()
            snapshot = alert.to_dict() if note is not None else None
        if note is not None and snapshot is not None:
            self._dispatch(note[0], snapshot)
        return alert

    # ---- shared mode ------------------------------------------------------------------
    def _observe_shared(self, ts: float, key_id: str, source_ip: str | None, code: str,
                        title: str, decision: Decision, *, by_address: bool) -> Alert | None:
        """Claim or count: the one replica that claims the (subject, rule) raises. The
        subject is the key, or the address for an address-scoped reason (claimed on the
        address's entity, so every key it tries counts on one alert). The claim lasts the
        dedup window from the first event in event time, as one process' alert does."""
        shared = self.shared
        assert shared is not None
        subject = f"ip:{source_ip}" if by_address else key_id
        entity = ("ip", str(source_ip)) if by_address else ("k", key_id)
        with self._lock:
            self.clock = max(self.clock, ts)
            alert = self._open.get((subject, code))
            if alert is not None and abs(ts - alert.first_seen_ts) >= self.dedup_window_s:
                alert = None
        expires = (alert.first_seen_ts if alert is not None else ts) + self.dedup_window_s
        if alert is None:
            fresh = self._build_alert(ts, key_id, source_ip, code, title, decision)
            if by_address:
                fresh.subject = "address"
            alert_id, won = shared.claim(entity, f"al|{code}", fresh.alert_id,
                                         now=ts, expires_at=expires)
            if won:
                snapshot = fresh.to_dict()
                self._outbox.append({"r": "raised", **snapshot})
                self._dispatch("raised", snapshot)
                return fresh
        else:
            alert_id = alert.alert_id
        money = decision.money
        self._outbox.append({"r": "seen", "alert_id": alert_id, "ts": ts, "ip": source_ip,
                             "key": key_id,
                             "cost": money.cost_usd if money else 0.0,
                             "burn": money.burn_usd_per_h if money else None,
                             "spend24": money.spend_usd_24h if money else None})
        rank = severity_rank(decision.severity)
        if alert is not None and rank > severity_rank(alert.severity):
            _, won = shared.claim(entity, f"esc|{alert_id}|{rank}", alert_id, now=ts,
                                  expires_at=expires)
            if won:
                upgrade = self._build_alert(ts, key_id, source_ip, code, title, decision)
                record = {"r": "escalated", "alert_id": alert_id,
                          **{k: v for k, v in upgrade.to_dict().items() if k in (
                              "severity", "decision", "score", "title", "action", "reasons")}}
                self._outbox.append(record)
                self.publish()
                self.sync()
                current = self._by_id.get(alert_id)
                if current is not None:
                    self._dispatch("escalated", current.to_dict())
        return alert

    def publish(self) -> None:
        """Shared mode: send this replica's pending log records (one call)."""
        if self.shared is None:
            return
        with self._lock:
            records, self._outbox = self._outbox, []
        self.shared.publish(records)

    def publish_now(self, record: dict[str, Any]) -> None:
        """Shared mode: append one record (an operator's act) and apply the log."""
        with self._lock:
            self._outbox.append(record)
        self.publish()
        self.sync()

    def sync(self) -> None:
        """Shared mode: apply what every replica appended to the log since the last sync."""
        if self.shared is None:
            return
        records = self.shared.read()
        if not records:
            return
        with self._lock:
            for rec in records:
                kind = rec.get("r")
                handler = self.on_record.get(str(kind))
                if handler is not None:
                    handler(rec)
                else:
                    self._apply_record(rec)

    def _apply_record(self, rec: dict[str, Any]) -> None:
        kind = rec.get("r")
        if kind == "raised":
            if rec["alert_id"] in self._by_id:
                return
            self._seq += 1
            alert = Alert.from_dict(rec, self._seq)
            self._remember(alert)
            self._open[(_subject(alert), alert.code)] = alert
            self.clock = max(self.clock, alert.last_seen_ts)
            self.raised += 1
            return
        alert = self._by_id.get(str(rec.get("alert_id")))
        if alert is None:
            return
        if kind == "seen":
            ts = float(rec["ts"])
            alert.count += 1
            alert.first_seen_ts = min(alert.first_seen_ts, ts)
            alert.last_seen_ts = max(alert.last_seen_ts, ts)
            alert.add_ip(rec.get("ip"))
            if rec.get("key"):
                alert.add_key(str(rec["key"]))
            alert.spent_usd += float(rec.get("cost") or 0.0)
            if rec.get("burn") is not None:
                alert.burn_usd_per_h = float(rec["burn"])
                alert.key_spend_usd_24h = float(rec["spend24"])
            self.clock = max(self.clock, ts)
            self.deduplicated += 1
        elif kind == "escalated":
            for name in ("severity", "decision", "score", "title", "action", "reasons"):
                setattr(alert, name, rec[name])
            alert.escalations += 1
            self.escalated += 1
        elif kind == "status":
            alert.status = rec["status"]
            pair = (_subject(alert), alert.code)
            if alert.status == "false_positive" and self._open.get(pair) is alert:
                del self._open[pair]

    def _build_alert(self, ts: float, key_id: str, source_ip: str | None, code: str,
                     title: str, decision: Decision) -> Alert:
        alert = Alert(
            alert_id="al_" + uuid.uuid4().hex[:20], seq=0, key_id=key_id, code=code,
            title=title, severity=decision.severity, decision=decision.decision,
            score=decision.score, action=decision.action.model_dump(exclude_none=True),
            reasons=[r.model_dump() for r in decision.reasons], first_seen_ts=ts,
            last_seen_ts=ts, raised_at=time.time(), source_ip=source_ip,
            dry_run=decision.dry_run)
        alert.add_ip(source_ip)
        alert.add_key(key_id)
        alert.add_money(decision)
        return alert

    def _new_alert(self, ts: float, key_id: str, source_ip: str | None, code: str,
                   title: str, decision: Decision) -> Alert:
        self._seq += 1
        alert = Alert(
            alert_id="al_" + uuid.uuid4().hex[:20], seq=self._seq, key_id=key_id, code=code,
            title=title, severity=decision.severity, decision=decision.decision,
            score=decision.score, action=decision.action.model_dump(exclude_none=True),
            reasons=[r.model_dump() for r in decision.reasons], first_seen_ts=ts,
            last_seen_ts=ts, raised_at=time.time(), source_ip=source_ip,
            dry_run=decision.dry_run)
        alert.add_ip(source_ip)
        alert.add_key(key_id)
        alert.add_money(decision)
        self._remember(alert)
        self._open[(key_id, code)] = alert
        self.raised += 1
        return alert

    @staticmethod
    def _update_from(alert: Alert, decision: Decision, title: str) -> None:
        alert.severity = decision.severity
        alert.decision = decision.decision
        alert.score = decision.score
        alert.title = title
        alert.action = decision.action.model_dump(exclude_none=True)
        alert.reasons = [r.model_dump() for r in decision.reasons]

    def _remember(self, alert: Alert) -> None:
        if self._ring.maxlen is not None and len(self._ring) == self._ring.maxlen:
            old = self._ring[0]
            self._by_id.pop(old.alert_id, None)
            self._logged_count.pop(old.alert_id, None)
        self._ring.append(alert)
        self._by_id[alert.alert_id] = alert

    def _maybe_purge(self) -> None:
        """Forget (key, code) pairs whose window has closed, so `_open` stays bounded."""
        self._since_purge += 1
        if self._since_purge < 1024 and len(self._open) < 100_000:
            return
        self._since_purge = 0
        horizon = self.clock - self.dedup_window_s
        self._open = {k: a for k, a in self._open.items() if a.first_seen_ts > horizon}

    def _dispatch(self, event: str, alert: dict[str, Any]) -> None:
        """Log, export and queue for the sinks; all non-blocking."""
        if self.alert_log is not None:
            self.alert_log.write({"record": event, **alert})
            self._logged_count[alert["alert_id"]] = alert["count"]
        if self.siem is not None:
            self.siem.export(alert, activity="create" if event == "raised" else "update")
        notification: Notification = {"type": "keywatch.alert", "event": event, "alert": alert}
        for sink in self.sinks:
            sink.submit(notification)

    # ---- reading ----------------------------------------------------------------------
    def get(self, alert_id: str) -> Alert | None:
        self.sync()
        return self._by_id.get(alert_id)

    def query(self, q: AlertQuery, *, limit: int = 50,
              cursor: int | None = None) -> tuple[list[dict[str, Any]], int | None]:
        """Alerts matching `q`, newest first; `cursor` continues after a previous page.

        Returns the page and the cursor for the next one (None at the end).
        """
        self.sync()
        out: list[Alert] = []
        with self._lock:
            for alert in reversed(self._ring):
                if cursor is not None and alert.seq >= cursor:
                    continue
                if q.matches(alert):
                    out.append(alert)
                    if len(out) > limit:
                        break
            page = [a.to_dict() for a in out[:limit]]
        next_cursor = out[limit - 1].seq if len(out) > limit else None
        return page, next_cursor

    def active_for_key(self, key_id: str) -> list[dict[str, Any]]:
        """Alerts on this key seen within the dedup window and not dismissed."""
        self.sync()
        with self._lock:
            horizon = self.clock - self.dedup_window_s
            return [a.to_dict() for a in reversed(self._ring)
                    if a.key_id == key_id and a.last_seen_ts > horizon
                    and a.status != "false_positive"]

    def count_for_key(self, key_id: str) -> int:
        self.sync()
        with self._lock:
            return sum(1 for a in self._ring if a.key_id == key_id)

    def riskiest_keys(self, limit: int = 10) -> list[dict[str, Any]]:
        """Keys ranked by what their alerts say: worst severity, then how many decisions
        the alerts stand for, then recency. Alerts marked false_positive do not count,
        so an operator's verdict takes a key off the list.

        One pass over the ring (bounded by `ring_size`); the dashboard's "riskiest keys".
        """
        self.sync()
        per_key: dict[str, dict[str, Any]] = {}
        with self._lock:
            for a in self._ring:
                if a.status == "false_positive":
                    continue
                row = per_key.get(a.key_id)
                if row is None:
                    row = per_key[a.key_id] = {
                        "key_id": a.key_id, "max_severity": a.severity, "alerts": 0,
                        "decisions": 0, "open": 0, "codes": {}, "worst_decision": "allow",
                        "last_seen_ts": a.last_seen_ts, "source_ips": []}
                row["alerts"] += 1
                row["decisions"] += a.count
                row["open"] += a.status == "open"
                row["codes"][a.code] = row["codes"].get(a.code, 0) + a.count
                if severity_rank(a.severity) > severity_rank(row["max_severity"]):
                    row["max_severity"] = a.severity
                if _VERDICT_RANK.get(a.decision, 0) > _VERDICT_RANK[row["worst_decision"]]:
                    row["worst_decision"] = a.decision
                row["last_seen_ts"] = max(row["last_seen_ts"], a.last_seen_ts)
                for ip in a.source_ips:
                    if ip not in row["source_ips"] and len(row["source_ips"]) < MAX_IPS_PER_ALERT:
                        row["source_ips"].append(ip)
        ranked = sorted(per_key.values(), key=lambda r: (
            severity_rank(r["max_severity"]), r["decisions"], r["last_seen_ts"]), reverse=True)
        for row in ranked[:limit]:
            row["last_seen"] = event_time_iso(row["last_seen_ts"])
            row["codes"] = dict(sorted(row["codes"].items(), key=lambda kv: -kv[1]))
        return ranked[:limit]

    # ---- operator actions -------------------------------------------------------------
    def set_status(self, alert_id: str, status: str) -> dict[str, Any] | None:
        """Mark an alert confirmed / false_positive; logged and exported to the SIEM."""
        if status not in STATUSES:
            raise ValueError(f"status must be one of {', '.join(STATUSES)}")
        if self.shared is not None:
            if self.get(alert_id) is None:
                return None
            self.publish_now({"r": "status", "alert_id": alert_id, "status": status})
        with self._lock:
            alert = self._by_id.get(alert_id)
            if alert is None:
                return None
            alert.status = status  # (shared: applied by the sync already; the same value)
            pair = (_subject(alert), alert.code)
            if status == "false_positive" and self._open.get(pair) is alert:
                del self._open[pair]  # the next decision for the pair starts afresh
            snapshot = alert.to_dict()
        if self.alert_log is not None:
            self.alert_log.write({"record": "feedback", **snapshot})
            self._logged_count[alert_id] = snapshot["count"]
        if self.siem is not None:
            self.siem.export_feedback(snapshot)
        return snapshot

    # ---- lifecycle --------------------------------------------------------------------
    def _load(self, writer: RotatingJsonlWriter) -> None:
        """Rebuild the ring from the alert log (latest line per alert wins)."""
        latest: dict[str, dict[str, Any]] = {}
        for rec in read_jsonl(writer.files()):
            if "alert_id" in rec and "first_seen_ts" in rec:
                latest[rec["alert_id"]] = rec  # dict keeps first-appearance order
        records = list(latest.values())[-(self._ring.maxlen or len(latest)):]
        for rec in records:
            try:
                self._seq += 1
                alert = Alert.from_dict(rec, self._seq)
            except (KeyError, TypeError, ValueError):
                continue
            self._remember(alert)
            self._logged_count[alert.alert_id] = alert.count
            self.clock = max(self.clock, alert.last_seen_ts)
        horizon = self.clock - self.dedup_window_s
        for alert in self._ring:
            if alert.first_seen_ts > horizon and alert.status != "false_positive":
                self._open[(_subject(alert), alert.code)] = alert

    def snapshot_counts(self) -> None:
        """Log alerts whose repeat count grew since last logged, so restarts keep counts."""
        if self.alert_log is None:
            return
        with self._lock:
            changed = [a.to_dict() for a in self._ring
                       if self._logged_count.get(a.alert_id) != a.count]
        for alert in changed:
            self.alert_log.write({"record": "update", **alert})
            self._logged_count[alert["alert_id"]] = alert["count"]

    def close(self, timeout: float = 5.0) -> None:
        self.snapshot_counts()
        deadline = time.monotonic() + timeout
        for sink in self.sinks:
            sink.close(max(0.1, deadline - time.monotonic()))

    def stats(self) -> dict[str, Any]:
        return {"raised": self.raised, "deduplicated": self.deduplicated,
                "escalated": self.escalated, "suppressed": self.suppressed,
                "in_ring": len(self._ring), "open_pairs": len(self._open),
                "sinks": [s.stats() for s in self.sinks]}


def observe_all(pipeline: AlertPipeline, items: Iterable[tuple[float, str, str | None, Decision]]
                ) -> list[Alert | None]:
    """Convenience for replays and notebooks: feed many decisions in order."""
    return [pipeline.observe(ts, key_id, ip, d) for ts, key_id, ip, d in items]


def _subject(alert: Alert) -> str:
    """The key of an alert's open pair: the key, or `ip:<address>` for an address alert."""
    return f"ip:{alert.source_ip}" if alert.subject == "address" else alert.key_id
