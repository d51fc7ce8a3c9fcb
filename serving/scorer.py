"""The one path from an event to a decision, shared by the API, `replay` and notebooks.

event → key id → features (one store round trip) → detectors → rules → fusion →
response → decision. Baseline learning happens only for events that were not flagged,
and is sent to the store ahead of the next event's operations, so it costs no extra
round trip and an attacker cannot teach the baselines that the attack is normal.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable
from typing import Any

from features.contract import Event, event_time_iso
from features.extractor import FeatureExtractor, FeatureVector
from features.keys import KeyHasher
from features.stores.base import EntityOps, StateStore
from serving.decision import Action, Decision, Reason, max_severity, severity_rank
from serving.responses import (
    EscalationLadder,
    add_ban_reads,
    ban_action,
    ban_ops,
    read_ban,
)
from serving.rules import FOUNDATION_RULES, ThresholdRule, evaluate_rules

SEVERITY_SCORE = {"none": 0.0, "low": 0.3, "medium": 0.55, "high": 0.8, "critical": 0.95}
THROTTLE_RETRY_S = 60


class Scorer:
    """Scores events against shared state; safe to call from several threads."""

    def __init__(
        self,
        *,
        store: StateStore,
        hasher: KeyHasher,
        extractor: FeatureExtractor | None = None,
        rules: tuple[ThresholdRule, ...] = FOUNDATION_RULES,
        ladder: EscalationLadder | None = None,
        dry_run: bool = False,
    ) -> None:
        self.store = store
        self.hasher = hasher
        self.extractor = extractor or FeatureExtractor()
        self.rules = rules
        self.ladder = ladder or EscalationLadder()
        self.dry_run = dry_run
        self._pending: list[EntityOps] = []
        self._lock = threading.Lock()

    # ---- public -----------------------------------------------------------------------
    def score(self, event: Event) -> Decision:
        decision, _ = self.score_with_features(event)
        return decision

    def score_many(self, events: Iterable[Event]) -> list[Decision]:
        return [self.score(e) for e in events]

    def flush(self) -> None:
        """Send queued baseline updates now (end of a replay, shutdown, idle timer)."""
        pending = self._take_pending()
        if pending:
            try:
                self.store.execute(pending)
            except Exception as exc:
                if not getattr(exc, "writes_kept", False):  # spooled writes: not again
                    self._requeue(pending)
                raise

    def model_versions(self) -> dict[str, str | None]:
        return {"online": None, "offline": None}

    # ---- pipeline ---------------------------------------------------------------------
    def score_with_features(self, event: Event) -> tuple[Decision, FeatureVector]:
        key_id = self.hasher.key_id(event.api_key)
        ts = event.timestamp
        plan = self.extractor.plan(event, key_id)
        key_ban_idx = add_ban_reads(plan.key_ops)
        ip_ban_idx = add_ban_reads(plan.ip_ops) if plan.ip_ops is not None else None

        pending = self._take_pending()
        try:
            results = self.store.execute([*pending, *plan.requests()])[len(pending):]
        except Exception as exc:
            if not getattr(exc, "writes_kept", False):  # spooled writes: not again
                self._requeue(pending)
            raise
        fv = self.extractor.build(plan, results)

        reasons: list[Reason] = evaluate_rules(self.rules, fv)
        key_ban = read_ban(results[0], key_ban_idx)
        ip_ban = read_ban(results[1], ip_ban_idx) if ip_ban_idx is not None else None
        banned_action: Action | None = None
        if key_ban.active(ts):
            reasons.insert(0, Reason(code="banned_key", severity="critical",
                                     message=f"key is banned until {event_time_iso(key_ban.until)}",
                                     evidence={"until": event_time_iso(key_ban.until)}))
            banned_action = ban_action("key", key_ban.until, ts)
        elif ip_ban is not None and ip_ban.active(ts):
            reasons.insert(0, Reason(code="banned_ip", severity="critical",
                                     message=f"address is banned until "
                                             f"{event_time_iso(ip_ban.until)}",
                                     evidence={"until": event_time_iso(ip_ban.until)}))
            banned_action = ban_action("ip", ip_ban.until, ts)

        severity = max_severity(*(r.severity for r in reasons))
        score = SEVERITY_SCORE[severity]
        verdict, action = "allow", Action(type="log" if reasons else "none")
        if banned_action is not None:
            verdict, action = "block", banned_action
        elif severity == "critical":
            duration, level = self.ladder.next_duration(key_ban, ts)
            until = ts + duration
            if not self.dry_run:
                self.store.execute([ban_ops("k", key_id, until=until, level=level, ts=ts)])
            verdict, action = "block", ban_action("key", until, ts)
        elif severity == "high":
            verdict = "throttle"
            action = Action(type="throttle", scope="key", retry_after_s=THROTTLE_RETRY_S)
        elif severity == "medium":
            action = Action(type="alert", scope="key")
        if self.dry_run and verdict != "allow":
            verdict = "allow"

        if severity_rank(severity) < severity_rank("medium"):
            with self._lock:
                self._pending.extend(self.extractor.learn_ops(fv))

        decision = Decision(
            key_id=key_id,
            decision=verdict,  # type: ignore[arg-type]
            severity=severity,  # type: ignore[arg-type]
            score=score,
            reasons=reasons,
            action=action,
            model_versions=self.model_versions(),
            event_time=event_time_iso(ts),
            dry_run=self.dry_run,
        )
        return decision, fv

    def _take_pending(self) -> list[EntityOps]:
        with self._lock:
            pending, self._pending = self._pending, []
        return pending

    def _requeue(self, pending: list[EntityOps]) -> None:
        with self._lock:
            self._pending[:0] = pending


def decision_line(decision: Decision) -> dict[str, Any]:
    """The JSON form written by `replay`, one line per event."""
    return decision.model_dump(mode="json")
