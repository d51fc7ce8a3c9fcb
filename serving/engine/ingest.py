"""Ingestion guards of the live service: one clock, and each event applied once.

One clock. Windows run on event time, so a replay of last week decides as the service
did. A live service, though, must not let a client's clock move a key's windows: one
event stamped 23 hours ahead would make every later event "late" and empty the key's
minute windows (its later blocks became allows). So live scoring accepts an event's time
only within a skew bound of the server clock (`ClockBound`: by default 5 minutes ahead,
1 hour behind); outside it the event is refused (422, naming the event and the bound) or,
when so configured, clamped (an event too far ahead to the server clock, one too far
behind to the bound); both are counted. Replay has no bound: it keeps
event time throughout.

Once. An event may carry an `event_id` (the client always sets one). The id is claimed on
the entities the event touches (not the population's, see `Scorer._round_trip`), as the
first operation of the same atomic call that applies the event
(`features.stores.base.CLAIM`), for `window_s` of wall time. A re-sent id therefore
changes nothing on them, and is answered with the first decision,
which is remembered with the key's claim (`REMEMBER`, sent with the scorer's next round
trip and kept in a small local cache until then). A repeat that finds the claim but no
decision yet (the first is still in flight on another replica, or its answer was lost
to an outage) is answered 409: it was applied once, and will not be applied again.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from features.contract import Event, event_time_iso
from features.stores.base import CLAIM, REMEMBER, EntityOps

CLAIMS_ZSET = "_claims"
"""Sorted set of an entity's claimed event ids, scored by the wall time they expire."""

SkewAction = Literal["refuse", "clamp"]


class EventTimeRefused(ValueError):
    """An event's time is outside the live skew bound; nothing of its request applied."""

    def __init__(self, message: str, index: int | None = None) -> None:
        super().__init__(message)
        self.index = index


class EventInFlight(RuntimeError):
    """A repeated event id whose first decision is not known yet (see module doc)."""

    def __init__(self, event_id: str) -> None:
        super().__init__(f"event_id {event_id!r} was already applied; its decision is not "
                         "recorded yet (still in flight, or lost to an outage): it is "
                         "not applied again")
        self.event_id = event_id


@dataclass(slots=True)
class ClockBound:
    """How far an event's time may stray from the server clock in live scoring."""

    max_ahead_s: float = 300.0
    max_behind_s: float = 3600.0
    action: SkewAction = "refuse"
    clock: Callable[[], float] = time.time
    refused: int = 0
    clamped: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def admit(self, events: Sequence[Event]) -> list[Event]:
        """The events, checked (and clamped) against the clock, before any is applied:
        one refused event refuses the whole list."""
        now = self.clock()
        lo, hi = now - self.max_behind_s, now + self.max_ahead_s
        out: list[Event] = []
        for n, event in enumerate(events):
            ts = event.timestamp
            if lo <= ts <= hi:
                out.append(event)
                continue
            if self.action == "clamp":  # ahead: to the server clock, never into the future
                out.append(event.model_copy(update={"timestamp": now if ts > hi else lo}))
                with self._lock:
                    self.clamped += 1
                continue
            with self._lock:
                self.refused += 1
            where = "ahead of" if ts > hi else "behind"
            raise EventTimeRefused(
                f"timestamp {event_time_iso(ts)} is {abs(ts - now):.0f}s {where} the server "
                f"clock ({event_time_iso(now)}); live scoring accepts {self.max_ahead_s:.0f}s "
                f"ahead and {self.max_behind_s:.0f}s behind (replay history instead)", n)
        return out

    def status(self) -> dict[str, float | int | str]:
        return {"max_ahead_s": self.max_ahead_s, "max_behind_s": self.max_behind_s,
                "action": self.action, "refused": self.refused, "clamped": self.clamped}


class Dedupe:
    """Claims of event ids in the store, and the decisions answered for them."""

    def __init__(self, *, window_s: float = 900.0, clock: Callable[[], float] = time.time,
                 local_max: int = 10_000) -> None:
        self.window_s = window_s
        self.clock = clock
        self.local_max = local_max
        self.repeats = 0
        self._local: OrderedDict[str, tuple[str, float]] = OrderedDict()
        self._lock = threading.Lock()

    def claim(self, requests: Sequence[EntityOps], event_id: str) -> None:
        """Put the claim first in each entity request of the event."""
        now = self.clock()
        op = (CLAIM, CLAIMS_ZSET, event_id, now + self.window_s, now)
        for req in requests:
            req.ops.insert(0, op)

    def local(self, event_id: str) -> str | None:
        with self._lock:
            held = self._local.get(event_id)
        return held[0] if held is not None and held[1] > self.clock() else None

    def held(self, results: list[list[object]]) -> str | None:
        """The key entity's claim result (None: a first sighting); strips the claims'
        results so that the other indexes planned before `claim` hold."""
        held = results[0][0] if results and results[0] else None
        for res in results:
            del res[0]
        return held if held is None else str(held)

    def remember(self, key_kind: str, key_id: str, event_id: str,
                 decision_json: str) -> EntityOps:
        """The write that records the decision with the key's claim (and the local copy)."""
        with self._lock:
            self._local[event_id] = (decision_json, self.clock() + self.window_s)
            while len(self._local) > self.local_max:
                self._local.popitem(last=False)
        return EntityOps(key_kind, key_id, [(REMEMBER, CLAIMS_ZSET, event_id, decision_json)])


def ingest_status(scorer: Any) -> dict[str, Any]:
    """For `/readyz`: the clock bound's counts, event-id repeats, and how far this
    replica's population model is behind the shared learning log."""
    bound, dedupe = scorer.clock_bound, scorer.dedupe
    pop_log = getattr(scorer.detectors, "population_log", None)
    return {
        "clock": bound.status() if bound is not None else None,
        "dedupe": ({"window_s": dedupe.window_s, "repeats": dedupe.repeats}
                   if dedupe is not None else None),
        "population_log": ({"behind": pop_log.behind, "gaps": pop_log.gaps}
                           if pop_log is not None else None),
    }
