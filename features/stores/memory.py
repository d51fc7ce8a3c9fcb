"""The embedded default store: per-entity dicts in this process, bounded by LRU eviction.

It applies the same generic operations as the Redis store's Lua script, with the same
semantics, so that a single process needs nothing else installed and a test can compare
the two backends op for op.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from features.stores.base import (
    COUNTERS,
    DEL,
    EWM,
    GET,
    INCR,
    RECENT_ADD,
    RECENT_COUNT,
    RING_ADD,
    RING_GET,
    RING_SUM,
    SEEN_ADD,
    SET,
    EntityOps,
    StateStore,
    StoreError,
)


@dataclass(slots=True)
class _EntityState:
    hash: dict[str, str] = field(default_factory=dict)
    zsets: dict[str, dict[str, float]] = field(default_factory=dict)
    rings: dict[str, list[list[float] | None]] = field(default_factory=dict)
    last_ts: float = 0.0


def _fmt(value: float) -> str:
    """Format a number the way Redis' HINCRBYFLOAT does for the values we store."""
    if value == int(value) and abs(value) < 1e15:
        return str(int(value))
    return repr(value)


class MemoryStore(StateStore):
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

    def __init__(self, *, max_entities: int = 200_000, idle_ttl_s: float = 8 * 86400) -> None:
        self.max_entities = max_entities
        self.idle_ttl_s = idle_ttl_s
        self._entities: OrderedDict[tuple[str, str], _EntityState] = OrderedDict()
        self._lock = threading.Lock()
        self._newest_ts = 0.0
        self.evictions = 0

    def __len__(self) -> int:
        return len(self._entities)

    def ping(self) -> bool:
        return True

    def describe(self) -> str:
        return f"memory ({len(self._entities)} entities)"

    def execute(self, requests: Sequence[EntityOps]) -> list[list[Any]]:
        with self._lock:
            return [self._apply(req) for req in requests]

    def snapshot(self, path: Path) -> int:
        """Write all state to `path` atomically (see `features.stores.snapshot`)."""
        from features.stores.snapshot import write_snapshot

        return write_snapshot(self, path)

    def restore(self, path: Path) -> int:
        """Replace all state with a snapshot's; raises SnapshotError if it is corrupt."""
        from features.stores.snapshot import read_snapshot

        return read_snapshot(self, path)

    def _entity(self, kind: str, entity_id: str) -> _EntityState:
        key = (kind, entity_id)
        state = self._entities.get(key)
        if state is not None:
            if state.last_ts and self._newest_ts - state.last_ts > self.idle_ttl_s:
                state = _EntityState()
                self._entities[key] = state
            self._entities.move_to_end(key)
            return state
        state = _EntityState()
        self._entities[key] = state
        while len(self._entities) > self.max_entities:
            self._entities.popitem(last=False)
            self.evictions += 1
        return state

    def _apply(self, req: EntityOps) -> list[Any]:
        # Validate first so that a bad op never leaves the entity half-updated.
        for op in req.ops:
            if not op or op[0] not in _HANDLERS:
                raise StoreError(f"unknown store operation {op[:1]!r}")
        state = self._entity(req.kind, req.entity_id)
        results: list[Any] = []
        for op in req.ops:
            results.append(_HANDLERS[op[0]](self, state, *op[1:]))
        return results

    # --- operations (same semantics as stores/lua/apply_ops.lua) -------------------------
    def _get(self, s: _EntityState, fld: str) -> str | None:
        return s.hash.get(fld)

    def _set(self, s: _EntityState, fld: str, value: Any) -> None:
        s.hash[fld] = str(value)

    def _del(self, s: _EntityState, fld: str) -> None:
        s.hash.pop(fld, None)

    def _incr(self, s: _EntityState, fld: str, amount: float) -> float:
        value = float(s.hash.get(fld, "0")) + float(amount)
        s.hash[fld] = _fmt(value)
        return value

    def _ring_add(
        self, s: _EntityState, name: str, slot: int, stamp: int, amount: float
    ) -> float | None:
        vf, tf = f"{name}:{slot}", f"{name}:{slot}:t"
        held = s.hash.get(tf)
        if held is not None and int(held) > stamp:
            return None
        if held is None or int(held) != stamp:
            s.hash[tf] = str(stamp)
            s.hash[vf] = "0"
        return self._incr(s, vf, amount)

    def _ring_get(self, s: _EntityState, name: str, slot: int, stamp: int) -> float:
        held = s.hash.get(f"{name}:{slot}:t")
        if held is None or int(held) != stamp:
            return 0.0
        return float(s.hash.get(f"{name}:{slot}", "0"))

    def _ring_sum(self, s: _EntityState, name: str, size: int, lo: int, hi: int) -> float:
        total = 0.0
        for stamp in range(max(lo, hi - size + 1), hi + 1):
            total += self._ring_get(s, name, stamp % size, stamp)
        return total

    def _counters(self, s: _EntityState, name: str, size: int, stamp: int,
                  amounts: str) -> list[float]:
        ring = s.rings.get(name)
        if ring is None:
            ring = s.rings[name] = [None] * size
        add = [float(a) for a in amounts.split(",")]
        slot = stamp % size
        held = ring[slot]
        if held is None or held[0] < stamp:
            ring[slot] = [float(stamp), *add]
        elif held[0] == stamp:
            for j, a in enumerate(add, start=1):
                held[j] += a
        width = len(add)
        out: list[float] = []
        for st in range(stamp - size + 1, stamp + 1):
            b = ring[st % size]
            if b is not None and b[0] == st:
                out.extend(b[1:])
            else:
                out.extend([0.0] * width)
        return out

    def _ewm(self, s: _EntityState, name: str, x: float, alpha: float) -> None:
        n = float(s.hash.get(f"{name}:n", "0"))
        if n == 0:
            m, v = float(x), 0.0
        else:
            m = float(s.hash[f"{name}:m"])
            v = float(s.hash[f"{name}:v"])
            diff = x - m
            incr = alpha * diff
            m = m + incr
            v = (1 - alpha) * (v + diff * incr)
        s.hash[f"{name}:m"] = _g17(m)
        s.hash[f"{name}:v"] = _g17(v)
        s.hash[f"{name}:n"] = _fmt(n + 1)

    def _touch(self, ts: float) -> None:
        if ts > self._newest_ts:
            self._newest_ts = ts

    def _recent_add(
        self, s: _EntityState, zname: str, member: str, ts: float, window_s: float, cap: int
    ) -> int:
        z = s.zsets.setdefault(zname, {})
        if z.get(member, float("-inf")) < ts:
            z[member] = ts
        self._touch(ts)
        s.last_ts = max(s.last_ts, ts)
        cutoff = ts - window_s
        for m in [m for m, t in z.items() if t <= cutoff]:
            del z[m]
        _cap(z, cap)
        return len(z)

    def _recent_count(self, s: _EntityState, zname: str, ts: float, window_s: float) -> int:
        z = s.zsets.get(zname, {})
        cutoff = ts - window_s
        return sum(1 for t in z.values() if t > cutoff)

    def _seen_add(self, s: _EntityState, zname: str, member: str, ts: float, cap: int) -> int:
        z = s.zsets.setdefault(zname, {})
        self._touch(ts)
        s.last_ts = max(s.last_ts, ts)
        is_new = member not in z
        if is_new or z[member] < ts:
            z[member] = ts
        _cap(z, cap)
        return 1 if is_new else 0


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
    GET: MemoryStore._get,
    SET: MemoryStore._set,
    DEL: MemoryStore._del,
    INCR: MemoryStore._incr,
    RING_ADD: MemoryStore._ring_add,
    RING_GET: MemoryStore._ring_get,
    RING_SUM: MemoryStore._ring_sum,
    EWM: MemoryStore._ewm,
    COUNTERS: MemoryStore._counters,
    RECENT_ADD: MemoryStore._recent_add,
    RECENT_COUNT: MemoryStore._recent_count,
    SEEN_ADD: MemoryStore._seen_add,
}
