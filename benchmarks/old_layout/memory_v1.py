"""The memory store as it was before packed state: the baseline of the state figures.

Kept only for `benchmarks.state_bench` (the same ops on the old layout, measured in the
same run): a ring was a dict of `[stamp, value]` cells, the hour-of-week profile 504
floats in the entity's hash, a capped set a dict of member strings, and the store was
bounded by an entity count. Not used by the product.

(Its original description follows.) The embedded default store: per-entity dicts in this
process, bounded by LRU eviction.

It applies the same generic operations as the Redis store's Lua script, with the same
semantics, so that a single process needs nothing else installed and a test can compare
the two backends op for op. It is also the engine of the batch feature extractor, so it
is written for speed: each op is a small function of the op tuple, and ring buckets are
kept as native `[stamp, value]` cells rather than hash strings (they are read and written
only through the RING_* ops, never with GET/SET).

Memory is bounded three ways: at most `max_entities` entities (least recently used
evicted first), every set capped by its op, and entities idle for longer than
`idle_ttl_s` in event time dropped — lazily when touched again, and eagerly from the cold
end of the LRU order as new entities arrive (the Redis store gets the same from key TTLs).

That bound applies to *feature* state only, which may be evicted (`evictions`,
`expirations` count it; a key that comes back starts its windows and baselines afresh).
Enforcement state is kept apart and never evicted: an entity's `ban:*` and `lim:*` fields
(bans, offences, limits) live in a dict of their own beside the LRU, and global entities
(kind `g`: ban and limit indexes, allow-list, audit trail) are pinned. So a flood of
random keys and addresses cannot push a ban out. With a journal
(`features.stores.journal`), every call that changes enforcement state is on disk before
it returns, and replayed at start, so `kill -9` loses no ban and no admin act.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from features.stores.base import (
    BUDGET_ADD,
    DEL,
    EWM,
    EWM_GAP,
    EWM_SAME,
    GET,
    GETS,
    GLOBAL_KIND,
    INCR,
    LIMIT,
    PERSIST,
    PERSIST_FIELD,
    RECENT_ADD,
    RECENT_COUNT,
    RING_ADD,
    RING_GET,
    RING_MAX,
    RING_SUM,
    RING_VALUES,
    RING_WINDOWS,
    SEEN_ADD,
    SET,
    ZITEMS,
    ZREM,
    ZSET,
    EntityOps,
    StateStore,
    StoreError,
    is_enforcement_field,
)
from features.stores.journal import EnforcementJournal, enforcement_writes
from features.stores.snapshot import SnapshotError, read_snapshot, write_snapshot


@dataclass(slots=True)
class _EntityState:
    hash: dict[str, Any] = field(default_factory=dict)
    zsets: dict[str, dict[str, float]] = field(default_factory=dict)
    rings: dict[str, dict[int, list[Any]]] = field(default_factory=dict)
    last_ts: float = 0.0
    enf: dict[str, Any] | None = None
    """The entity's enforcement fields: the store's own dict for it, outside the LRU."""


_FEATURE_FIELDS = ("hash", "zsets", "rings", "last_ts")


def _fmt(value: float) -> str:
    """Format a number the way Redis' HINCRBYFLOAT does for the values we store."""
    if value == int(value) and abs(value) < 1e15:
        return str(int(value))
    return repr(value)


_IDLE_SWEEP = 2
"""Cold entities checked for idleness per new entity (amortised, O(1))."""


class OldLayoutMemoryStore(StateStore):
    """Per-entity state in process memory.

    Parameters
    ----------
    max_entities:
        Least-recently-used entities beyond this count are evicted, so a flood of
        distinct source IPs cannot grow memory without bound.
    idle_ttl_s:
        An entity whose newest event is older than this (in event time, relative to the
        newest event the store has seen) is treated as expired and starts afresh.
    """

    name = "memory"

    def __init__(self, *, max_entities: int = 200_000, idle_ttl_s: float = 8 * 86400,
                 journal_path: Path | None = None, journal_fsync: bool = True) -> None:
        self.max_entities = max_entities
        self.idle_ttl_s = idle_ttl_s
        self._entities: OrderedDict[tuple[str, str], _EntityState] = OrderedDict()
        self._pinned: dict[tuple[str, str], _EntityState] = {}
        self._enforcement: dict[tuple[str, str], dict[str, Any]] = {}
        self._lock = threading.Lock()
        self._newest_ts = 0.0
        self._current: tuple[str, str] = ("", "")
        self.evictions = 0
        self.expirations = 0
        self.journal: EnforcementJournal | None = None
        if journal_path is not None:
            self.journal = EnforcementJournal(journal_path, fsync=journal_fsync)
            self.replay_journal()

    def __len__(self) -> int:
        return len(self._entities)

    def stats(self) -> dict[str, float]:
        """Feature state dropped so far, and enforcement state held (for /metrics)."""
        return {"feature_evictions": self.evictions, "feature_expirations": self.expirations,
                "enforcement_entities": self.enforcement_entities()}

    def enforcement_entities(self) -> int:
        """Entities holding enforcement state (never evicted), global ones included."""
        return len(self._enforcement) + len(self._pinned)

    def replay_journal(self) -> int:
        """Apply the journal's writes (at start, and over a restored snapshot)."""
        if self.journal is None:
            return 0
        n = 0
        with self._lock:
            for requests in self.journal.records():
                for req in requests:
                    self._apply(req)
                n += 1
        return n

    def ping(self) -> bool:
        return True

    def describe(self) -> str:
        return f"memory ({len(self._entities)} entities)"

    def execute(self, requests: Sequence[EntityOps]) -> list[list[Any]]:
        with self._lock:
            results = [self._apply(req) for req in requests]
            if self.journal is not None:
                writes = enforcement_writes(requests)
                if writes:  # on disk before the caller hears it was done
                    try:
                        self.journal.append(writes, time.time())
                    except (OSError, ValueError) as exc:
                        raise StoreError(f"enforcement journal write failed: {exc}") from exc
            return results

    def snapshot(self, path: Path) -> int:
        """Write all state to `path` atomically (see `features.stores.snapshot`); the
        journal written so far is compacted into it."""
        with self._lock:
            payload = self.export_state()
            if self.journal is not None:
                self.journal.rotate()
        n = write_snapshot(payload, path)
        if self.journal is not None:
            self.journal.drop_old()
        return n

    def close(self) -> None:
        if self.journal is not None:
            self.journal.close()

    def restore(self, path: Path) -> int:
        """Replace all state with a snapshot's; raises SnapshotError (leaving the store
        untouched) if it is corrupt or does not hold memory-store state."""
        payload = read_snapshot(path)
        try:
            entities = [((str(kind), str(entity_id)), _state_of(fields))
                        for kind, entity_id, fields in payload["entities"]]
            pinned = {(str(kind), str(entity_id)): _state_of(fields)
                      for kind, entity_id, fields in payload.get("pinned", [])}
            enforcement = {(str(kind), str(entity_id)): dict(fields)
                           for kind, entity_id, fields in payload.get("enforcement", [])}
            newest_ts = float(payload["newest_ts"])
        except Exception as exc:
            raise SnapshotError(f"{path} does not hold memory-store state: {exc}") from None
        with self._lock:
            self._entities.clear()
            self._pinned.clear()
            self._enforcement.clear()
            for key, state in entities:
                if key[0] == GLOBAL_KIND:  # written before global entities were pinned
                    self._pinned[key] = state
                    continue
                self._entities[key] = state
                # enforcement fields written before they were kept apart move out of the hash
                moved = {f: state.hash.pop(f) for f in list(state.hash)
                         if is_enforcement_field(f)}
                if moved:
                    enforcement.setdefault(key, {}).update(moved)
            self._pinned.update(pinned)
            self._enforcement.update(enforcement)
            for key, state in self._entities.items():
                state.enf = self._enforcement.get(key)
            self._newest_ts = newest_ts
            while len(self._entities) > self.max_entities:
                self._entities.popitem(last=False)
        self.replay_journal()  # acts since that snapshot
        return len(entities) + len(pinned)

    def export_state(self) -> dict[str, Any]:
        """All state as plain values, entities in LRU order (caller holds the lock)."""
        def plain(states: dict[tuple[str, str], _EntityState]) -> list[Any]:
            return [(kind, entity_id, _plain(state)) for (kind, entity_id), state
                    in states.items()]

        return {"newest_ts": self._newest_ts, "entities": plain(self._entities),
                "pinned": plain(self._pinned),
                "enforcement": [(kind, entity_id, dict(fields))
                                for (kind, entity_id), fields in self._enforcement.items()]}

    def _entity(self, kind: str, entity_id: str) -> _EntityState:
        key = (kind, entity_id)
        if kind == GLOBAL_KIND:  # enforcement as a whole: pinned, never evicted
            pinned = self._pinned.get(key)
            if pinned is None:
                pinned = self._pinned[key] = _EntityState()
            return pinned
        entities = self._entities
        state = entities.get(key)
        if state is not None:
            if (state.last_ts and self._newest_ts - state.last_ts > self.idle_ttl_s
                    and state.hash.get(PERSIST_FIELD) != "1"):
                state = _EntityState(enf=self._enforcement.get(key))
                entities[key] = state
                self.expirations += 1
            entities.move_to_end(key)
            return state
        state = _EntityState(enf=self._enforcement.get(key))
        # drop idle entities from the cold end, so memory follows the active population
        for _ in range(_IDLE_SWEEP):
            cold_key = next(iter(entities), None)
            if cold_key is None:
                break
            cold = entities[cold_key]
            if not (cold.last_ts and self._newest_ts - cold.last_ts > self.idle_ttl_s):
                break
            if cold.hash.get(PERSIST_FIELD) == "1":  # a permanent ban never idles out
                entities.move_to_end(cold_key)
                continue
            del entities[cold_key]
            self.expirations += 1
        entities[key] = state
        spared = 0
        while len(entities) > self.max_entities and spared <= len(entities):
            cold_key, cold = entities.popitem(last=False)
            if cold.hash.get(PERSIST_FIELD) == "1":  # pinned: back to the warm end
                entities[cold_key] = cold
                spared += 1
                continue
            self.evictions += 1
        return state

    def _apply(self, req: EntityOps) -> list[Any]:
        # Resolve every op first so that a bad op never leaves the entity half-updated.
        ops = req.ops
        try:
            handlers = [_HANDLERS[op[0]] for op in ops]
        except (KeyError, IndexError, TypeError):
            bad = next((op for op in ops if not op or op[0] not in _HANDLERS), ())
            raise StoreError(f"unknown store operation {bad[:1]!r}") from None
        state = self._entity(req.kind, req.entity_id)
        self._current = (req.kind, req.entity_id)
        return [h(self, state, op) for h, op in zip(handlers, ops, strict=False)]

    # --- operations (same semantics as stores/lua/apply_ops.lua); op = (code, *args) ------
    def _get(self, s: _EntityState, op: tuple[Any, ...]) -> str | None:
        fld = op[1]
        if fld[:4] in _ENF:
            return s.enf.get(fld) if s.enf is not None else None
        return s.hash.get(fld)

    def _set(self, s: _EntityState, op: tuple[Any, ...]) -> None:
        fld = op[1]
        if fld[:4] in _ENF:
            if s.enf is None:  # first enforcement write: the entity's dict, outside the LRU
                s.enf = self._enforcement.setdefault(self._current, {})
            s.enf[fld] = str(op[2])
            return
        s.hash[fld] = str(op[2])

    def _del(self, s: _EntityState, op: tuple[Any, ...]) -> None:
        fld = op[1]
        if fld[:4] in _ENF:
            if s.enf is not None:
                s.enf.pop(fld, None)
            return
        s.hash.pop(fld, None)

    def _limit(self, s: _EntityState, op: tuple[Any, ...]) -> list[float]:
        mode, now = op[1], float(op[2])
        enf = s.enf
        if enf is None:
            return [-1.0, 0.0, 0.0, 0.0, 0.0]
        until = float(enf.get("lim:until") or 0.0)
        rate = float(enf.get("lim:rate") or 0.0)
        if until <= now or rate <= 0:
            return [-1.0, 0.0, 0.0, 0.0, 0.0]
        status, retry, tat, tat_e = gcra(mode, now, rate, float(enf.get("lim:burst") or 1),
                                         until, float(enf.get("lim:tat") or 0.0),
                                         float(enf.get("lim:tat_e") or 0.0))
        if mode == "take" and status == 1.0:
            enf["lim:tat"] = _g17(tat)
        elif mode == "count":
            enf["lim:tat_e"] = _g17(tat_e)
        return [status, retry, rate, until, float(enf.get("lim:burst") or 1)]

    def _incr(self, s: _EntityState, op: tuple[Any, ...]) -> float:
        fld = op[1]
        value = float(s.hash.get(fld, "0")) + float(op[2])
        s.hash[fld] = _fmt(value)
        return value

    def _ring_add(self, s: _EntityState, op: tuple[Any, ...]) -> float | None:
        _, name, slot, stamp, amount = op
        ring = s.rings.get(name)
        if ring is None:
            ring = s.rings[name] = {}
        cell = ring.get(slot)
        if cell is None:
            value = float(amount)
            ring[slot] = [stamp, value]
            return value
        held = cell[0]
        if held > stamp:
            return None
        if held != stamp:
            cell[0] = stamp
            cell[1] = 0.0
        cell[1] += float(amount)
        return cell[1]

    def _ring_max(self, s: _EntityState, op: tuple[Any, ...]) -> float | None:
        _, name, slot, stamp, value = op
        value = float(value)
        cell = s.rings.setdefault(name, {}).setdefault(slot, [stamp, value])
        if cell[0] > stamp:
            return None
        if cell[0] != stamp or value > cell[1]:  # a newer hour starts afresh
            cell[0], cell[1] = stamp, value
        return cell[1]

    def _ring_get(self, s: _EntityState, op: tuple[Any, ...]) -> float:
        ring = s.rings.get(op[1])
        if ring is None:
            return 0.0
        cell = ring.get(op[2])
        return cell[1] if cell is not None and cell[0] == op[3] else 0.0

    def _ring_sum(self, s: _EntityState, op: tuple[Any, ...]) -> float:
        _, name, size, lo, hi = op
        ring = s.rings.get(name)
        if not ring:
            return 0.0
        lo = max(lo, hi - size + 1)
        total = 0.0
        # each slot holds one stamp, and the stamps of the range have distinct slots
        for slot, (stamp, value) in ring.items():
            if lo <= stamp <= hi and stamp % size == slot:
                total += value
        return total

    def _ring_windows(self, s: _EntityState, op: tuple[Any, ...]) -> list[float]:
        name, size, stamp, k = op[1], op[2], op[3], op[4]
        ring = s.rings.get(name)
        if not ring:
            return [0.0] * (2 * k)
        ns = op[5:5 + k]
        top = max(ns)
        by_offset = [0.0] * (top + 1)  # bucket values, newest (offset 0) first
        for slot, cell in ring.items():
            offset = stamp - cell[0]
            if 0 <= offset <= top and cell[0] % size == slot:
                by_offset[offset] = cell[1]
        out: list[float] = []
        for n in ns:
            # summed newest first, as the Lua script does
            out.append(sum(by_offset[:n if n < size else size], 0.0))
            out.append(by_offset[n])
        return out

    def _ring_values(self, s: _EntityState, op: tuple[Any, ...]) -> list[float]:
        ring = s.rings.get(op[1]) or {}
        size, k = op[2], op[3]
        out: list[float] = []
        for stamp in op[4:4 + k]:
            cell = ring.get(stamp % size)
            out.append(cell[1] if cell is not None and cell[0] == stamp else 0.0)
        return out

    def _gets(self, s: _EntityState, op: tuple[Any, ...]) -> list[str | None]:
        get = s.hash.get
        return [get(f) for f in op[2:2 + op[1]]]

    def _ewm_update(self, s: _EntityState, name: str, x: float, alpha: float) -> None:
        # Kept as floats (the Lua script writes them with 17 significant digits, which
        # round-trips exactly): GET returns the float, callers parse with float().
        h = s.hash
        nf = f"{name}:n"
        n = h.get(nf)
        if n is None:
            h[f"{name}:m"] = x
            h[f"{name}:v"] = 0.0
            h[nf] = 1.0
            return
        mf, vf = f"{name}:m", f"{name}:v"
        m = float(h[mf])
        diff = x - m
        incr = alpha * diff
        h[mf] = m + incr
        h[vf] = (1 - alpha) * (float(h[vf]) + diff * incr)
        h[nf] = float(n) + 1.0

    def _ewm(self, s: _EntityState, op: tuple[Any, ...]) -> None:
        self._ewm_update(s, op[1], float(op[2]), float(op[3]))

    def _ewm_gap(self, s: _EntityState, op: tuple[Any, ...]) -> Any:
        _, name, fld, ts, alpha, max_gap = op
        h = s.hash
        held = h.get(fld)
        if ts > s.last_ts:
            s.last_ts = ts
            if ts > self._newest_ts:
                self._newest_ts = ts
        if held is None:
            h[fld] = float(ts)
            return None
        gap = ts - held
        if gap >= 0:
            self._ewm_update(s, name, gap if gap < max_gap else float(max_gap), alpha)
            h[fld] = float(ts)
        return held

    def _ewm_same(self, s: _EntityState, op: tuple[Any, ...]) -> Any:
        _, name, fld, x, alpha = op
        h = s.hash
        held = h.get(fld)
        x = float(x)
        if held is not None:
            self._ewm_update(s, name, 1.0 if held == x else 0.0, alpha)
        h[fld] = x
        return held

    def _recent_add(self, s: _EntityState, op: tuple[Any, ...]) -> int:
        _, zname, member, ts, window_s, cap = op
        z = s.zsets.get(zname)
        if z is None:
            z = s.zsets[zname] = {}
        held = z.get(member)
        if held is None or held < ts:
            z[member] = ts
        if ts > s.last_ts:
            s.last_ts = ts
            if ts > self._newest_ts:
                self._newest_ts = ts
        cutoff = ts - window_s
        stale = [m for m, t in z.items() if t <= cutoff]
        for m in stale:
            del z[m]
        if len(z) > cap:
            _cap(z, cap)
        return len(z)

    def _recent_count(self, s: _EntityState, op: tuple[Any, ...]) -> int:
        z = s.zsets.get(op[1])
        if not z:
            return 0
        cutoff = op[2] - op[3]
        return sum(1 for t in z.values() if t > cutoff)

    def _seen_add(self, s: _EntityState, op: tuple[Any, ...]) -> int:
        _, zname, member, ts, cap = op
        z = s.zsets.get(zname)
        if z is None:
            z = s.zsets[zname] = {}
        if ts > s.last_ts:
            s.last_ts = ts
            if ts > self._newest_ts:
                self._newest_ts = ts
        held = z.get(member)
        if held is None or held < ts:
            z[member] = ts
        if len(z) > cap:
            _cap(z, cap)
        return 1 if held is None else 0


    def _zset(self, s: _EntityState, op: tuple[Any, ...]) -> None:
        _, zname, member, score, cap = op
        z = s.zsets.setdefault(zname, {})
        z[member] = float(score)
        _cap(z, cap)

    def _zrem(self, s: _EntityState, op: tuple[Any, ...]) -> int:
        z = s.zsets.get(op[1], {})
        return 1 if z.pop(op[2], None) is not None else 0

    def _zitems(self, s: _EntityState, op: tuple[Any, ...]) -> list[Any]:
        _, zname, min_score, limit = op
        z = s.zsets.get(zname, {})
        # ZREVRANGEBYSCORE order: highest score first, ties by member, reversed
        items = sorted(((m, t) for m, t in z.items() if t >= float(min_score)),
                       key=lambda kv: (kv[1], kv[0]), reverse=True)
        return [[m, t] for m, t in items[: int(limit)]]

    def _persist(self, s: _EntityState, op: tuple[Any, ...]) -> None:
        if int(op[1]):
            s.hash[PERSIST_FIELD] = "1"
        else:
            s.hash.pop(PERSIST_FIELD, None)

    def _budget_add(self, s: _EntityState, op: tuple[Any, ...]) -> list[float]:
        _, name, period, amount, limit = op
        h = s.hash
        pf, of = f"{name}:p", f"{name}:over"
        held = h.get(pf)
        period, amount, limit = float(period), float(amount), float(limit)
        if held is not None and float(held) > period:
            return [-1.0, float(h.get(name, 0.0)), float(h.get(of, 0.0))]
        if held is None or float(held) < period:
            h[pf] = _fmt(period)
            h[name] = "0"
            h[of] = "0"
        total, over = float(h.get(name, 0.0)), float(h.get(of, 0.0))
        if total + amount <= limit:
            total += amount
            h[name] = _fmt(total)
            return [1.0, total, over]
        over += amount
        h[of] = _fmt(over)
        return [0.0, total, over]


_ENF = frozenset(("ban:", "lim:"))


def _plain(state: _EntityState) -> dict[str, Any]:
    """An entity's feature state as plain values (its enforcement dict is saved apart)."""
    enf, state.enf = state.enf, None
    try:
        return dataclasses.asdict(state)
    finally:
        state.enf = enf


def _state_of(fields: dict[str, Any]) -> _EntityState:
    return _EntityState(**{k: v for k, v in fields.items() if k in _FEATURE_FIELDS})


def gcra(mode: str, now: float, rate_per_min: float, burst: float, until: float,
         tat: float, tat_e: float) -> tuple[float, float, float, float]:
    """One step of the limit meter (see LIMIT in `features.stores.base`); the Lua script
    does the same. Returns (status, retry_after_s, tat, tat_e)."""
    interval = 60.0 / rate_per_min
    tolerance = interval * (max(burst, 1.0) - 1.0)
    held = max(tat, tat_e, now)
    conforms = held - tolerance <= now
    if mode == "take":
        if conforms:
            return 1.0, 0.0, held + interval, tat_e
        return 0.0, held - tolerance - now, tat, tat_e
    if mode == "count":
        own = max(tat_e, now)
        new_e = min(own + interval, max(until, now))
        after = max(tat, new_e, now)
        return (1.0 if own - tolerance <= now else 0.0,
                max(0.0, after - tolerance - now), tat, new_e)
    return (1.0 if conforms else 0.0), (0.0 if conforms else held - tolerance - now), tat, tat_e


def _g17(value: float) -> str:
    """17 significant digits, as the Lua script writes them (exact float round trip)."""
    return f"{value:.17g}"


def _cap(z: dict[str, float], cap: int) -> None:
    """Drop the oldest members beyond `cap` (ties broken by member, as Redis does)."""
    excess = len(z) - cap
    if excess > 0:
        for m, _ in sorted(z.items(), key=lambda kv: (kv[1], kv[0]))[:excess]:
            del z[m]


_HANDLERS = {
    GET: OldLayoutMemoryStore._get,
    SET: OldLayoutMemoryStore._set,
    DEL: OldLayoutMemoryStore._del,
    INCR: OldLayoutMemoryStore._incr,
    RING_ADD: OldLayoutMemoryStore._ring_add,
    RING_MAX: OldLayoutMemoryStore._ring_max,
    RING_GET: OldLayoutMemoryStore._ring_get,
    RING_SUM: OldLayoutMemoryStore._ring_sum,
    EWM: OldLayoutMemoryStore._ewm,
    RECENT_ADD: OldLayoutMemoryStore._recent_add,
    RECENT_COUNT: OldLayoutMemoryStore._recent_count,
    SEEN_ADD: OldLayoutMemoryStore._seen_add,
    EWM_GAP: OldLayoutMemoryStore._ewm_gap,
    EWM_SAME: OldLayoutMemoryStore._ewm_same,
    GETS: OldLayoutMemoryStore._gets,
    RING_WINDOWS: OldLayoutMemoryStore._ring_windows,
    RING_VALUES: OldLayoutMemoryStore._ring_values,
    ZSET: OldLayoutMemoryStore._zset,
    ZREM: OldLayoutMemoryStore._zrem,
    ZITEMS: OldLayoutMemoryStore._zitems,
    PERSIST: OldLayoutMemoryStore._persist,
    BUDGET_ADD: OldLayoutMemoryStore._budget_add,
    LIMIT: OldLayoutMemoryStore._limit,
}
