"""Operator feedback on alerts, rule suppressions, and the reader the retrain job uses.

An operator marks an alert `false_positive` or `confirmed` (with a note) and may ask
that this rule stop alerting for this key (`allowlist_rule`). Feedback is appended to
`<data_dir>/feedback.jsonl` *before* it takes effect in memory, so what an operator was
told was recorded survives a restart, and a failed write changes nothing. Suppressions
are rebuilt from the same file at startup.

With a shared store (`publish` set, see `serving.alerts.shared`), a record goes to the
store's operations log first; every replica applies it (and appends it to its own file,
which the retrain job reads) when it applies the log.

Notes are free text typed by people, who sometimes paste what they are looking at; they
pass through a redactor (by default `redact_text`; the app adds recognition of keys it
has seen, see `Operations`) so a raw key pasted into a note is not stored.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from features.contract import event_time_iso
from serving.engine.jsonl_writer import read_jsonl
from serving.observability.redaction import redact_text

FEEDBACK_FILE = "feedback.jsonl"

log = logging.getLogger("keywatch.feedback")

Verdict = Literal["false_positive", "confirmed"]


class FeedbackIn(BaseModel):
    """The body of `POST /v1/alerts/{alert_id}/feedback`."""

    model_config = ConfigDict(extra="forbid")

    verdict: Verdict
    note: str = Field(default="", max_length=2000)
    allowlist_rule: bool = Field(
        default=False,
        description="stop raising alerts for this rule on this key (key_id, rule code)")


class FeedbackStore:
    """Feedback records and (key_id, rule code) suppressions, durable in a JSONL file."""

    def __init__(self, path: Path | None, *,
                 redact: Callable[[str], str] = redact_text) -> None:
        self.path = Path(path) if path is not None else None
        self.redact = redact
        self._lock = threading.Lock()
        self._records: list[dict[str, Any]] = []
        self._suppressed: dict[tuple[str, str], dict[str, Any]] = {}
        self._seen: set[str] = set()
        self.publish: Callable[[dict[str, Any]], None] | None = None
        """Shared mode: append a record to the shared log (which then applies it here)."""
        if self.path is not None:
            for rec in read_jsonl([self.path]):
                self._apply(rec)

    # ---- queries ----------------------------------------------------------------------
    def is_suppressed(self, key_id: str, code: str) -> bool:
        """True if an operator asked that `code` stop alerting for `key_id`.

        A plain dict lookup, cheap enough for the scoring path (fusion may call it too).
        """
        return (key_id, code) in self._suppressed

    def suppressions(self, key_id: str | None = None) -> list[dict[str, Any]]:
        with self._lock:
            items = list(self._suppressed.values())
        return [s for s in items if key_id is None or s["key_id"] == key_id]

    def for_alert(self, alert_id: str) -> list[dict[str, Any]]:
        with self._lock:
            return [r for r in self._records if r.get("alert_id") == alert_id]

    # ---- changes ----------------------------------------------------------------------
    def record(self, alert: dict[str, Any], feedback: FeedbackIn) -> dict[str, Any]:
        """Store feedback on an alert (in its `to_dict()` form); returns the stored record."""
        now = time.time()
        rec: dict[str, Any] = {
            "type": "feedback",
            "feedback_id": "fb_" + uuid.uuid4().hex[:20],
            "alert_id": alert["alert_id"],
            "key_id": alert["key_id"],
            "code": alert["code"],
            "severity": alert["severity"],
            "source_ip": alert.get("source_ip"),
            "verdict": feedback.verdict,
            "note": self.redact(feedback.note),
            "allowlist_rule": feedback.allowlist_rule,
            "alert_first_seen_ts": alert.get("first_seen_ts"),
            "alert_last_seen_ts": alert.get("last_seen_ts"),
            "alert_first_seen": alert.get("first_seen"),
            "alert_last_seen": alert.get("last_seen"),
            "created_ts": now,
            "created_at": event_time_iso(now),
        }
        self._persist(rec)
        return rec

    def unsuppress(self, key_id: str, code: str) -> bool:
        """Lift a suppression; False if there was none."""
        if not self.is_suppressed(key_id, code):
            return False
        now = time.time()
        self._persist({"type": "unsuppress", "key_id": key_id, "code": code,
                       "created_ts": now, "created_at": event_time_iso(now)})
        return True

    def _persist(self, rec: dict[str, Any]) -> None:
        if self.publish is not None:
            self.publish({"r": rec["type"], **rec})
            return
        self._write_and_apply(rec)

    def apply_shared(self, rec: dict[str, Any]) -> None:
        """A record from the shared log: kept in this replica's file, then applied."""
        rec = {k: v for k, v in rec.items() if k != "r"}
        mark = json.dumps(rec, sort_keys=True)
        if mark in self._seen:  # already in this replica's file (a restart reads the log)
            return
        try:
            self._write_and_apply(rec)
        except OSError as exc:  # the store holds it; this replica's copy is a convenience
            log.warning("feedback record not written to %s: %s", self.path, exc)
            self._apply(rec)

    def _write_and_apply(self, rec: dict[str, Any]) -> None:
        with self._lock:
            if self.path is not None:  # disk first: an OSError here leaves nothing applied
                self.path.parent.mkdir(parents=True, exist_ok=True)
                with self.path.open("a", encoding="utf-8") as fh:
                    fh.write(json.dumps(rec, separators=(",", ":")) + "\n")
                    fh.flush()
                    os.fsync(fh.fileno())
            self._apply_locked(rec)

    def _apply(self, rec: dict[str, Any]) -> None:
        with self._lock:
            self._apply_locked(rec)

    def _apply_locked(self, rec: dict[str, Any]) -> None:
        self._seen.add(json.dumps(rec, sort_keys=True))
        kind = rec.get("type")
        if kind == "feedback":
            self._records.append(rec)
            if rec.get("allowlist_rule"):
                self._suppressed[(rec["key_id"], rec["code"])] = {
                    "key_id": rec["key_id"], "code": rec["code"],
                    "since": rec.get("created_at"), "alert_id": rec.get("alert_id"),
                    "note": rec.get("note", "")}
        elif kind == "unsuppress":
            self._suppressed.pop((rec["key_id"], rec["code"]), None)


def feedback_for_retrain(data_dir: Path) -> list[dict[str, Any]]:
    """Operator verdicts on alerts, for the retrain job; the latest verdict per alert wins.

    Each record has `key_id`, `code`, `verdict` and the alert's event-time span
    `[alert_first_seen_ts, alert_last_seen_ts]` (epoch seconds). How the retrain job
    uses them:

    - `false_positive`: the key's events in that span were normal traffic that was
      flagged. The scorer withheld them from baseline learning, and a job that drops
      flagged events from its training set must *keep* these (they are normal), and an
      evaluation must not count them as attacks.
    - `confirmed`: the span is real abuse: keep those events out of the "normal" data
      the IsolationForest is fitted on, and use them as labelled positives.

    Records are sorted by feedback time. A missing file gives an empty list.
    """
    latest: dict[str, dict[str, Any]] = {}
    for rec in read_jsonl([Path(data_dir) / FEEDBACK_FILE]):
        if rec.get("type") == "feedback" and rec.get("alert_id"):
            latest[rec["alert_id"]] = rec
    return sorted(latest.values(), key=lambda r: r.get("created_ts", 0.0))
