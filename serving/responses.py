"""Responses: turn a severity into an action, and keep ban state in the store.

Ban state lives on the entity (key or source address) in the shared store, so a ban set
by one replica is enforced by every replica on the entity's next event. Durations grow
with the offender's history: each ban within the look-back raises the level.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from features.contract import event_time_iso
from features.stores.base import GET, INCR, SET, EntityOps
from serving.decision import Action

BAN_UNTIL = "ban:until"
BAN_LEVEL = "ban:level"
BAN_LAST = "ban:last"
PERMANENT = 1e18


@dataclass(frozen=True, slots=True)
class BanState:
    until: float = 0.0
    level: int = 0
    last: float = 0.0

    def active(self, ts: float) -> bool:
        return self.until > ts


def add_ban_reads(ops: EntityOps) -> tuple[int, int, int]:
    return ops.add(GET, BAN_UNTIL), ops.add(GET, BAN_LEVEL), ops.add(GET, BAN_LAST)


def read_ban(results: list[Any], idx: tuple[int, int, int]) -> BanState:
    until, level, last = (results[i] for i in idx)
    return BanState(
        until=float(until) if until else 0.0,
        level=int(float(level)) if level else 0,
        last=float(last) if last else 0.0,
    )


@dataclass(frozen=True, slots=True)
class EscalationLadder:
    """Ban durations by repeat offence, and how long a clean record takes to reset it."""

    durations_s: tuple[float, ...] = (1800, 7200, 86400, PERMANENT)
    lookback_s: float = 7 * 86400

    def next_duration(self, state: BanState, ts: float) -> tuple[float, int]:
        level = state.level if ts - state.last <= self.lookback_s else 0
        duration = self.durations_s[min(level, len(self.durations_s) - 1)]
        return duration, level + 1


def ban_ops(kind: str, entity_id: str, *, until: float, level: int, ts: float) -> EntityOps:
    ops = EntityOps(kind, entity_id)
    ops.add(SET, BAN_UNTIL, repr(until))
    ops.add(SET, BAN_LEVEL, str(level))
    ops.add(SET, BAN_LAST, repr(ts))
    return ops


def unban_ops(kind: str, entity_id: str) -> EntityOps:
    ops = EntityOps(kind, entity_id)
    ops.add(SET, BAN_UNTIL, "0")
    return ops


def offence_ops(kind: str, entity_id: str) -> EntityOps:
    ops = EntityOps(kind, entity_id)
    ops.add(INCR, "offences", 1)
    return ops


def ban_action(scope: str, until: float, ts: float) -> Action:
    if until >= PERMANENT:
        return Action(type="perm_ban", scope=scope)  # type: ignore[arg-type]
    return Action(
        type="temp_ban",
        scope=scope,  # type: ignore[arg-type]
        until=event_time_iso(until),
        retry_after_s=max(1, round(until - ts)),
    )
