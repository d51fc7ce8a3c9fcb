"""What an operator looking at one key wants first: its recent noteworthy decisions.

Every scored event updates a small per-key summary (counts, sums, last addresses); only
non-trivial decisions (a reason, a severity above none, or a verdict other than allow)
are kept in a per-key ring, so a key's thousands of quiet calls do not push out the
three that matter. Keys are kept in LRU order and the least recently seen are evicted
past `max_keys`, so memory stays bounded whatever the key cardinality.
"""

from __future__ import annotations

import threading
from collections import OrderedDict, deque
from typing import Any

from features.contract import Event, event_time_iso
from serving.engine.decision import Decision

MAX_IPS_PER_KEY = 20
MAX_CODES_PER_KEY = 50


def is_trivial(decision: Decision) -> bool:
    return decision.decision == "allow" and decision.severity == "none" and not decision.reasons


class _KeyState:
    __slots__ = ("auth_failures", "by_severity", "by_verdict", "codes", "events", "failures",
                 "first_seen", "ips", "last_seen", "latency_ms_sum", "recent", "tokens_sum")

    def __init__(self, per_key: int, ts: float) -> None:
        self.first_seen = ts
        self.last_seen = ts
        self.events = 0
        self.tokens_sum = 0
        self.latency_ms_sum = 0.0
        self.failures = 0
        self.auth_failures = 0
        self.by_verdict: dict[str, int] = {}
        self.by_severity: dict[str, int] = {}
        self.codes: dict[str, int] = {}
        self.ips: OrderedDict[str, None] = OrderedDict()
        self.recent: deque[dict[str, Any]] = deque(maxlen=per_key)


class KeyActivityIndex:
    """Bounded per-key recent decisions and running totals, LRU over keys."""

    def __init__(self, *, per_key: int = 50, max_keys: int = 10_000) -> None:
        self.per_key = per_key
        self.max_keys = max_keys
        self._keys: OrderedDict[str, _KeyState] = OrderedDict()
        self._lock = threading.Lock()
        self.evicted = 0

    def observe(self, event: Event, decision: Decision) -> None:
        ts = event.timestamp
        key_id = decision.key_id
        trivial = is_trivial(decision)
        with self._lock:
            state = self._keys.get(key_id)
            if state is None:
                state = _KeyState(self.per_key, ts)
                self._keys[key_id] = state
                if len(self._keys) > self.max_keys:
                    self._keys.popitem(last=False)
                    self.evicted += 1
            else:
                self._keys.move_to_end(key_id)
            state.events += 1
            state.first_seen = min(state.first_seen, ts)
            state.last_seen = max(state.last_seen, ts)
            state.tokens_sum += event.tokens
            state.latency_ms_sum += event.latency_ms
            if event.status >= 400:
                state.failures += 1
                if event.status in (401, 403):
                    state.auth_failures += 1
            state.by_verdict[decision.decision] = state.by_verdict.get(decision.decision, 0) + 1
            state.by_severity[decision.severity] = state.by_severity.get(decision.severity, 0) + 1
            if event.source_ip:
                state.ips[event.source_ip] = None
                state.ips.move_to_end(event.source_ip)
                if len(state.ips) > MAX_IPS_PER_KEY:
                    state.ips.popitem(last=False)
            if trivial:
                return
            for reason in decision.reasons:
                if reason.code in state.codes or len(state.codes) < MAX_CODES_PER_KEY:
                    state.codes[reason.code] = state.codes.get(reason.code, 0) + 1
            state.recent.append({
                "event_time": event_time_iso(ts),
                "decision": decision.decision,
                "severity": decision.severity,
                "score": decision.score,
                "reasons": [{"code": r.code, "severity": r.severity, "message": r.message}
                            for r in decision.reasons],
                "action": decision.action.model_dump(exclude_none=True),
                "source_ip": event.source_ip,
                "endpoint": event.endpoint,
                "status": event.status,
                "dry_run": decision.dry_run,
            })

    def __contains__(self, key_id: str) -> bool:
        return key_id in self._keys

    def __len__(self) -> int:
        return len(self._keys)

    def summary(self, key_id: str) -> dict[str, Any] | None:
        """Recent decisions (newest first) and a baseline summary, or None if never seen."""
        with self._lock:
            state = self._keys.get(key_id)
            if state is None:
                return None
            n = max(state.events, 1)
            return {
                "recent_decisions": list(reversed(state.recent)),
                "baseline": {
                    "first_seen": event_time_iso(state.first_seen),
                    "last_seen": event_time_iso(state.last_seen),
                    "events": state.events,
                    "tokens_mean": round(state.tokens_sum / n, 2),
                    "latency_ms_mean": round(state.latency_ms_sum / n, 2),
                    "failure_ratio": round(state.failures / n, 4),
                    "auth_failure_ratio": round(state.auth_failures / n, 4),
                    "decisions": dict(state.by_verdict),
                    "severities": dict(state.by_severity),
                    "reason_codes": dict(state.codes),
                    "recent_source_ips": list(reversed(state.ips)),
                    "note": "since this process started (or the key was last evicted)",
                },
            }
