"""One population model for every replica: each learns the same ordered log.

Why: the population model (River HalfSpaceTrees, `models.online.PopulationDetector`) used
to learn in the process that scored an event. Fed alternately, two replicas on one Redis
each learned half the traffic, warmed up later and calibrated on different scores, and
disagreed with a single process on 22% of decisions (`model_anomaly` firing in one and
not the other). Which replica receives an event must not change its decision.

How: an event the pipeline leaves unflagged is not learned where it was scored; its model
vector is appended to a log in the shared store (`LOG_APPEND` on the population entity,
sent with the scorer's next round trip, like every learning write). Every event's round
trip also reads the log's entries after this replica's position (`LOG_READ`, in the same
call), and the replica learns them in log order before it scores. Learning is
deterministic (protected, sampled and calibrated exactly as before), so every replica
holds the model of the same log prefix: the one scoring an event lags a single process by
at most the entries other replicas have not sent yet (with deferred learning, one per
other replica). On one process nothing changes: the previous event's entry is appended and
read back in the next event's round trip, before that event is scored, as it was learned
before. The learning log is mergeable in the sense that matters: whichever replica
appends, all of them converge on one model.

Costs: each replica learns every offered event, not only its own (learning is the costlier
half of HalfSpaceTrees, and with `learn_every=2` half the offered events are learned), and
an entry is ~24 numbers of JSON in the store. The log keeps its newest `cap` entries (the
model's memory is shorter: two reference windows and the calibration window); a replica
that starts against an existing log learns that retained tail first, `read_limit` entries
per round trip, and is then one of the others (its scaler's min/max, which never forget,
may differ slightly). Positions are kept per log id (set by the log's first append), so the
local store of a fail_open outage, with a log of its own, does not disturb the position in
the shared one; they are checkpointed with the model.
"""

from __future__ import annotations

import logging
import uuid
from typing import Any

import orjson

from features.extractor import POPULATION, POPULATION_ID
from features.stores.base import LOG_APPEND, LOG_READ, EntityOps
from models.online import PendingEvent, PopulationDetector

log = logging.getLogger("keywatch.population")

LOG_NAME = "poplog"


class PopulationLog:
    """Reads and writes the population's learning log for one replica (not thread-safe:
    the caller holds the lock that guards the model)."""

    def __init__(self, population: PopulationDetector, *, cap: int = 10_000,
                 read_limit: int = 500) -> None:
        self.population = population
        self.cap = cap
        self.read_limit = read_limit
        self.positions: dict[str, int] = dict(getattr(population, "log_positions", {}))
        self.current: str | None = getattr(population, "log_current", None)
        self.writer_id = uuid.uuid4().hex
        self.gaps = 0
        self.learned_from_log = 0
        self.behind = 0
        """Entries appended to the log that this replica has not learned yet."""
        self._own: dict[str, tuple[int, PendingEvent]] = {}
        """Entries this replica appended, with the position it scored them at: read back
        with nothing learned in between, the scoring's HST walk is reused (one process:
        always), else the entry is scored again on the model as it now is."""

    def plan(self, population_ops: EntityOps) -> int:
        """Queue the read of the entries after this replica's position; its result index."""
        after = self.positions.get(self.current, 0) if self.current is not None else 0
        return population_ops.add(LOG_READ, LOG_NAME, after, self.read_limit)

    def catch_up(self, result: list[Any] | None) -> int:
        """Learn the entries read by `plan`, in order; returns how many were learned.

        A read from a log this replica was not positioned on (a new log, or the local log
        of an outage and back) is not learned: the position switches, and the next read is
        made from the right place."""
        if not result:
            return 0
        log_id, head, entries = result
        if log_id is None:
            return 0
        if log_id != self.current:
            self.current = log_id
            self.positions.setdefault(log_id, 0)
            return 0
        pos = self.positions.get(log_id, 0)
        learned = 0
        for seq, entry in entries:
            if seq <= pos:
                continue  # learned already (another thread of this replica read it too)
            if seq > pos + 1 and pos > 0:
                self.gaps += 1
                log.warning("population log: entries %d..%d were trimmed before this replica "
                            "read them", pos + 1, seq - 1)
            own = self._own.pop(entry, None)
            if own is not None and own[0] == pos:
                self.population.learn_pending(own[1])
            else:
                self.population.learn_one(orjson.loads(entry))
            pos = seq
            learned += 1
        self.positions[log_id] = pos
        self.learned_from_log += learned
        self.behind = head - pos
        return learned

    def append(self, pending: PendingEvent) -> EntityOps:
        """The write offering one scored event's model vector to every replica's model."""
        entry = orjson.dumps(pending.clean).decode()
        if len(self._own) > 10_000:  # entries never read back (an outage): forget them
            self._own.clear()
        if self.current is not None:
            self._own[entry] = (self.positions.get(self.current, 0), pending)
        return EntityOps(POPULATION, POPULATION_ID, [
            (LOG_APPEND, LOG_NAME, entry, self.cap, self.writer_id)])

    def checkpoint(self) -> None:
        """Keep the positions with the model, so a restart resumes where it was."""
        self.population.log_positions = dict(self.positions)  # type: ignore[attr-defined]
        self.population.log_current = self.current  # type: ignore[attr-defined]
