"""Decisions over time: verdict and severity counts per time bucket, for the dashboard chart.

The ops hook feeds every scored event here, so the structure has to cost O(1) per event
and stay bounded whatever the traffic: it is a fixed ring of `max_buckets` slots of
`base_bucket_s` seconds each (default 24 h of minutes), indexed by event time like every
other window in keywatch, so a replayed history draws the same chart as live traffic.
An event older than the ring's horizon (far out-of-order arrival) is counted in
`dropped` rather than resurrecting a slot that newer buckets already use.

Coarser buckets (5 min, 1 h) are sums of base buckets aligned to multiples of the
requested size, computed at read time; nothing else is stored.

With a shared store (`shared=SharedStats`) the counts are added to rings in the store
(batched, at most every `flush_s`) and a read loads every replica's counts from there.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from features.contract import event_time_iso
from serving.engine.decision import SEVERITIES

if TYPE_CHECKING:
    from features.contract import Event
    from serving.alerts.shared import SharedStats
    from serving.engine.decision import Decision

VERDICTS: tuple[str, ...] = ("allow", "throttle", "block")


class DecisionStats:
    """Bounded per-bucket counts of decisions by verdict and by severity (event time)."""

    def __init__(self, *, base_bucket_s: int = 60, max_buckets: int = 1440,
                 shared: SharedStats | None = None) -> None:
        if base_bucket_s < 1 or max_buckets < 1:
            raise ValueError("base_bucket_s and max_buckets must be at least 1")
        self.base_bucket_s = base_bucket_s
        self.max_buckets = max_buckets
        self._tags: list[int | None] = [None] * max_buckets
        self._verdicts: list[dict[str, int]] = [{} for _ in range(max_buckets)]
        self._severities: list[dict[str, int]] = [{} for _ in range(max_buckets)]
        self._newest: int | None = None
        self._lock = threading.Lock()
        self.dropped = 0
        """Events older than the ring's horizon when they arrived."""
        self.shared = shared

    def observe(self, events: Sequence[Event], decisions: Sequence[Decision]) -> None:
        """Count a scored batch (one lock acquisition for the whole batch)."""
        if self.shared is not None:
            for event, decision in zip(events, decisions, strict=True):
                self.shared.add(math.floor(event.timestamp / self.base_bucket_s),
                                decision.decision, decision.severity)
            self.shared.maybe_flush()
            return
        with self._lock:
            for event, decision in zip(events, decisions, strict=True):
                self._add(event.timestamp, decision.decision, decision.severity)

    def add(self, ts: float, verdict: str, severity: str) -> None:
        """Count one decision made at event time `ts`."""
        with self._lock:
            self._add(ts, verdict, severity)

    def _add(self, ts: float, verdict: str, severity: str) -> None:
        idx = math.floor(ts / self.base_bucket_s)
        newest = self._newest
        if newest is None or idx > newest:
            self._newest = newest = idx
        elif idx <= newest - self.max_buckets:
            self.dropped += 1
            return
        slot = idx % self.max_buckets
        if self._tags[slot] != idx:  # inside the horizon, another tag is an older bucket
            self._tags[slot] = idx
            self._verdicts[slot] = {}
            self._severities[slot] = {}
        verdicts, severities = self._verdicts[slot], self._severities[slot]
        verdicts[verdict] = verdicts.get(verdict, 0) + 1
        severities[severity] = severities.get(severity, 0) + 1

    def series(self, *, bucket_s: int | None = None, buckets: int = 60) -> dict[str, Any]:
        """The last `buckets` buckets of `bucket_s` seconds up to the newest event, oldest
        first, zero-filled so a chart can plot them at even spacing.

        `bucket_s` must be a multiple of the base bucket; buckets reaching past the ring's
        horizon are reported with `complete: false` (their older part is forgotten).
        """
        base = self.base_bucket_s
        bucket_s = base if bucket_s is None else bucket_s
        if bucket_s < base or bucket_s % base:
            raise ValueError(f"bucket must be a positive multiple of {base} seconds")
        if buckets < 1:
            raise ValueError("buckets must be at least 1")
        per = bucket_s // base
        if self.shared is not None:
            self._load_shared()
        with self._lock:
            newest = self._newest
            if newest is None:
                return self._envelope(bucket_s, [], None)
            horizon = newest - self.max_buckets  # base indexes <= horizon are forgotten
            last_group = newest // per
            out: list[dict[str, Any]] = []
            for group in range(last_group - buckets + 1, last_group + 1):
                verdicts = dict.fromkeys(VERDICTS, 0)
                severities = dict.fromkeys(SEVERITIES, 0)
                # only base buckets still in the ring: the work is bounded by the ring
                for idx in range(max(group * per, horizon + 1),
                                 min(group * per + per, newest + 1)):
                    slot = idx % self.max_buckets
                    if self._tags[slot] != idx:
                        continue
                    for name, n in self._verdicts[slot].items():
                        verdicts[name] = verdicts.get(name, 0) + n
                    for name, n in self._severities[slot].items():
                        severities[name] = severities.get(name, 0) + n
                start = group * bucket_s
                out.append({"start": event_time_iso(start), "start_ts": start,
                            "total": sum(verdicts.values()), "decisions": verdicts,
                            "severities": severities,
                            "complete": group * per > horizon})
            return self._envelope(bucket_s, out, (newest + 1) * base)

    def _load_shared(self) -> None:
        """Every replica's counts, from the store, into this ring."""
        assert self.shared is not None
        names = [f"v:{v}" for v in VERDICTS] + [f"s:{s}" for s in SEVERITIES]
        newest, rings = self.shared.load(names)
        with self._lock:
            self._newest = newest
            self._tags = [None] * self.max_buckets
            self._verdicts = [{} for _ in range(self.max_buckets)]
            self._severities = [{} for _ in range(self.max_buckets)]
            for name, buckets in rings.items():
                kind, label = name.split(":", 1)
                for idx, n in buckets.items():
                    slot = idx % self.max_buckets
                    self._tags[slot] = idx
                    (self._verdicts if kind == "v" else self._severities)[slot][label] = n

    def _envelope(self, bucket_s: int, out: list[dict[str, Any]],
                  end_ts: float | None) -> dict[str, Any]:
        totals = dict.fromkeys(VERDICTS, 0)
        severities = dict.fromkeys(SEVERITIES, 0)
        for b in out:
            for name, n in b["decisions"].items():
                totals[name] = totals.get(name, 0) + n
            for name, n in b["severities"].items():
                severities[name] = severities.get(name, 0) + n
        return {
            "bucket_s": bucket_s,
            "base_bucket_s": self.base_bucket_s,
            "retained_s": self.base_bucket_s * self.max_buckets,
            "end": event_time_iso(end_ts) if end_ts is not None else None,
            "clock": "event time",
            "buckets": out,
            "totals": {"events": sum(totals.values()), "decisions": totals,
                       "severities": severities},
            "dropped": self.dropped,
        }
