"""Operations state shared by every replica: alerts, their status, feedback, decision stats.

Why: with N replicas on one Redis, each used to keep the alerts, feedback and decision
counts of the events it happened to score, so `/v1/alerts` showed one replica's alerts,
an operator's verdict reached one replica, and the same abuse could raise (and send to
the webhook) one alert per replica.

How, with the state store the scorer already uses (memory or Redis, cluster included):

- Raising is claimed. An alert for (key, rule) is claimed on the key's entity (or the
  address's, for an address alert) for the dedup window from its first event, in event
  time (`CLAIM` + `REMEMBER` of the candidate alert id, one atomic call): the replica
  that wins raises it and sends it to the sinks, exactly once; the others learn its id
  from the claim and count on it. An escalation to a severity is claimed the same way,
  so it too is sent once.
- Everything else is a record in one ordered log (`LOG_APPEND` on the `("g", "ops")`
  entity): raised, seen (counts, addresses, money, merged per request), escalated, status,
  feedback and unsuppress. Every replica applies the log in order to its own alert ring
  and feedback store before it answers a read, so every replica answers the same, and the
  readers (API, dashboard, reports) are unchanged.
- Decision counts are added to rings on the `("g", "stats")` entity (`RING_ADD`, batched:
  sent by the operations flusher every half second), and read from there; a chart is
  therefore at most half a second behind another replica's latest decisions.

Only what the log retains (`log_cap` records) can be replayed to a replica that starts
later; the alert ring holds `ring_size` alerts anyway.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

import orjson

from features.stores.base import (
    CLAIM,
    LOG_APPEND,
    LOG_READ,
    REMEMBER,
    RING_ADD,
    RING_MAX,
    RING_VALUES,
    EntityOps,
    StateStore,
)

log = logging.getLogger("keywatch.ops")

OPS_ENTITY = ("g", "ops")
STATS_ENTITY = ("g", "stats")
LOG_NAME = "alerts"
CLAIMS = "_alerts"
"""Sorted set of alert claims on a key's entity (apart from event-id claims: these expire
in event time)."""


class SharedOps:
    """Claims and the ordered operations log, for one replica."""

    def __init__(self, store: StateStore, *, log_cap: int = 50_000,
                 read_limit: int = 2000) -> None:
        self.store = store
        self.log_cap = log_cap
        self.read_limit = read_limit
        self.writer_id = uuid.uuid4().hex
        self.position = 0
        self.current: str | None = None
        self._lock = threading.Lock()

    def claim(self, entity: tuple[str, str], token: str, candidate: str, *, now: float,
              expires_at: float) -> tuple[str, bool]:
        """(the claimed value, whether this call claimed it) for `token` on the entity
        (the key's, or the address's for an address alert)."""
        req = EntityOps(*entity, [(CLAIM, CLAIMS, token, expires_at, now),
                                      (REMEMBER, CLAIMS, token, candidate)])
        held = self.store.execute([req])[0][0]
        if held is None:
            return candidate, True
        return str(held) or candidate, False

    def publish(self, records: list[dict[str, Any]]) -> None:
        """Append records to the log, in order, in one call."""
        if not records:
            return
        ops = [(LOG_APPEND, LOG_NAME, orjson.dumps(r).decode(), self.log_cap, self.writer_id)
               for r in records]
        self.store.execute([EntityOps(*OPS_ENTITY, ops)])

    def read(self) -> list[dict[str, Any]]:
        """The records appended since the last read (by any replica), oldest first."""
        out: list[dict[str, Any]] = []
        with self._lock:
            for _ in range(1000):
                req = EntityOps(*OPS_ENTITY, [(LOG_READ, LOG_NAME, self.position,
                                               self.read_limit)])
                log_id, head, entries = self.store.execute([req])[0][0]
                if log_id is None:
                    return out
                if log_id != self.current:  # a new log (or the outage's local one)
                    self.current, self.position = log_id, 0
                    continue
                for seq, entry in entries:
                    if seq > self.position:
                        out.append(orjson.loads(entry))
                        self.position = seq
                if self.position >= head or not entries:
                    return out
        return out


class SharedStats:
    """Decision counts per base bucket, added to rings in the store (batched)."""

    def __init__(self, store: StateStore, *, max_buckets: int, flush_s: float = 0.5) -> None:
        self.store = store
        self.max_buckets = max_buckets
        self.flush_s = flush_s
        self._pending: dict[tuple[str, int], int] = {}
        self._newest = -1
        self._last_flush = time.monotonic()
        self._lock = threading.Lock()

    def add(self, idx: int, verdict: str, severity: str) -> None:
        with self._lock:
            for name in ("v:" + verdict, "s:" + severity):
                self._pending[(name, idx)] = self._pending.get((name, idx), 0) + 1
            self._newest = max(self._newest, idx)

    def maybe_flush(self) -> None:
        if time.monotonic() - self._last_flush >= self.flush_s:
            self.flush()

    def flush(self) -> None:
        with self._lock:
            pending, self._pending = self._pending, {}
            newest, self._last_flush = self._newest, time.monotonic()
        if not pending:
            return
        ops: list[tuple[Any, ...]] = [(RING_ADD, name, idx % self.max_buckets, idx, float(n))
                                      for (name, idx), n in sorted(pending.items())]
        ops.append((RING_MAX, "newest", 0, 0, float(newest)))
        try:
            self.store.execute([EntityOps(*STATS_ENTITY, ops)])
        except Exception as exc:  # kept for the next flush; a chart must not break scoring
            with self._lock:
                for key, n in pending.items():
                    self._pending[key] = self._pending.get(key, 0) + n
            log.warning("decision stats not flushed to the store: %s", exc)

    def load(self, names: list[str]) -> tuple[int | None, dict[str, dict[int, int]]]:
        """The newest bucket index and every ring's live buckets {idx: count}."""
        self.flush()
        head = EntityOps(*STATS_ENTITY, [(RING_VALUES, "newest", 1, 1, 0)])
        newest_raw = self.store.execute([head])[0][0]
        newest = int(newest_raw[0]) if newest_raw and newest_raw[0] else None
        if newest is None:
            return None, {}
        stamps = list(range(newest - self.max_buckets + 1, newest + 1))
        req = EntityOps(*STATS_ENTITY, [(RING_VALUES, name, self.max_buckets, len(stamps),
                                         *stamps) for name in names])
        values = self.store.execute([req])[0]
        return newest, {name: {s: int(v) for s, v in zip(stamps, vals, strict=True) if v}
                        for name, vals in zip(names, values, strict=True)}


RecordHandler = Callable[[dict[str, Any]], None]
