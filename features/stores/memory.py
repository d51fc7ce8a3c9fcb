"""The embedded default store: per-entity dicts in this process, bounded by LRU eviction.

It applies the same generic operations as the Redis store's Lua script, with the same
semantics, so that a single process needs nothing else installed and a test can compare
the two backends op for op. It is also the engine of the batch feature extractor, so it
is written for speed: each op is a small function of the op tuple. Rings, profiles,
vectors and capped sets are held as the very bytes the Lua script packs into the Redis
hash (`features.stores.packed`): one `bytes` object per field, not an object per bucket.

Memory is bounded three ways: the feature state's estimated bytes stay within `max_mb`
(least recently used evicted first, addresses before keys: `features.stores.budget`;
optionally also at most `max_entities` entities), every set is capped by its op, and
entities idle for longer than `idle_ttl_s` in event time are dropped — lazily when touched
again, and eagerly from the cold end of the LRU order as new entities arrive (the Redis
store gets the same from key TTLs).

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

import struct
import sys
import threading
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from features.stores.base import (
    BLOB_PREFIX,
    BUDGET_ADD,
    CLAIM,
    CLAIM_FIELD_PREFIX,
    DECAY_ADD,
    DEL,
    EWM,
    EWM_GAP,
    EWM_SAME,
    GET,
    GETS,
    GLOBAL_KIND,
    INCR,
    LIMIT,
    LOG_APPEND,
    LOG_READ,
    PERSIST,
    PERSIST_FIELD,
    RECENT_ADD,
    RECENT_COUNT,
    REMEMBER,
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
    check_blob_fields,
    is_enforcement_field,
)
from features.stores.budget import entity_bytes
from features.stores.journal import EnforcementJournal, enforcement_writes
from features.stores.packed import (
    EMPTY_STAMP,
    PROFILE_MARK,
    decay_add,
    ewm_next,
    member_hash,
    profile_get,
    profile_part,
    profile_put,
    profile_slot,
    ring_add,
    ring_max,
    ring_of_cells,
    ring_read,
    scalar_get,
    scalar_put,
    set_bytes,
    set_find,
    set_members,
    set_times,
)
from features.stores.snapshot import SnapshotError, read_snapshot, write_snapshot


@dataclass(slots=True)
class _EntityState:
    hash: dict[str, Any] = field(default_factory=dict)
    zsets: dict[str, dict[str, float]] = field(default_factory=dict)
    """Sorted sets of members (claims, logs, the global entities' indexes)."""
    sets: dict[str, bytes] = field(default_factory=dict)
    """Capped sets (RECENT_ADD, SEEN_ADD): (member hash, time) doubles per member, the
    bytes the Redis hash holds in `z|name`."""
    rings: dict[str, bytes] = field(default_factory=dict)
    """Packed rings, the bytes the Redis hash holds (`features.stores.packed`)."""
    profiles: dict[str, bytes] = field(default_factory=dict)
    """Packed profiles (`name#slot:part`: (n, m, v) per slot) and vectors (`name#slot`),
    the bytes the Redis hash holds."""
    last_ts: float = 0.0
    size: int = 0
    """Estimated bytes of the feature state (`features.stores.budget`), as last applied."""
    logs: dict[str, dict[str, Any]] = field(default_factory=dict)
    """LOG_* logs: {"id", "first" (seq of entries[0]), "entries"}, plain values so that
    snapshots (builtins only) keep them."""
    enf: dict[str, Any] | None = None
    """The entity's enforcement fields: the store's own dict for it, outside the LRU."""
    remembered: int = 0
    """Characters of the claims' remembered values in `hash` (a decision each, for the
    dedupe window): kept as they change, so the byte estimate need not scan the hash."""


_FEATURE_FIELDS = ("hash", "zsets", "sets", "rings", "profiles", "last_ts", "logs")


def _fmt(value: float) -> str:
    """Format a number the way Redis' HINCRBYFLOAT does for the values we store."""
    if value == int(value) and abs(value) < 1e15:
        return str(int(value))
    return repr(value)


DEFAULT_MAX_MB = 256.0
"""Default budget of the feature state: about 25,000 warm keys, or 250,000 addresses."""
ADDRESS_KIND = "ip"
"""Entities of this kind are evicted first (`features.stores.budget`)."""

_IDLE_SWEEP = 2
"""Cold entities checked for idleness per new entity (amortised, O(1))."""


class MemoryStore(StateStore):
    """Per-entity state in process memory.

    Parameters
    ----------
    max_mb:
        Budget of the feature state in MiB (estimated, `features.stores.budget`): beyond
        it the least recently used addresses are evicted, then keys, so a flood of
        distinct source IPs cannot grow memory without bound. None: no byte budget.
    max_entities:
        Optionally, also at most this many entities (None: no count bound).
    idle_ttl_s:
        An entity whose newest event is older than this (in event time, relative to the
        newest event the store has seen) is treated as expired and starts afresh.
    """

    name = "memory"

    def __init__(self, *, max_mb: float | None = DEFAULT_MAX_MB,
                 max_entities: int | None = None, idle_ttl_s: float = 8 * 86400,
                 journal_path: Path | None = None, journal_fsync: bool = True) -> None:
        self.max_mb = max_mb
        self.max_bytes = int(max_mb * 2**20) if max_mb else None
        self.max_entities = max_entities
        self.idle_ttl_s = idle_ttl_s
        self._entities: OrderedDict[tuple[str, str], _EntityState] = OrderedDict()
        """Keys (and any kind but addresses and globals), least recently used first."""
        self._addresses: OrderedDict[tuple[str, str], _EntityState] = OrderedDict()
        self._bytes = 0
        self.address_evictions = 0
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
        return len(self._entities) + len(self._addresses)

    @property
    def feature_bytes(self) -> int:
        """Estimated bytes of all evictable feature state (bounded by `max_mb`)."""
        return self._bytes

    def stats(self) -> dict[str, float]:
        """Feature state dropped so far and held, and enforcement state held (/metrics)."""
        return {"feature_evictions": self.evictions,
                "feature_address_evictions": self.address_evictions,
                "feature_expirations": self.expirations,
                "feature_bytes": self._bytes,
                "feature_entities": len(self),
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
        return f"memory ({len(self)} entities, {self._bytes / 2**20:.1f} MiB)"

    def execute(self, requests: Sequence[EntityOps]) -> list[list[Any]]:
        with self._lock:
            results = [self._apply(req) for req in requests]
            if self._over():
                self._bound()
            if self.journal is not None:
                writes = enforcement_writes(_applied(requests, results))
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
            self._addresses.clear()
            self._bytes = 0
            self._pinned.clear()
            self._enforcement.clear()
            for key, state in entities:
                if key[0] == GLOBAL_KIND:  # written before global entities were pinned
                    self._pinned[key] = state
                    continue
                self._lru(key[0])[key] = state
                state.size = entity_bytes(state)
                self._bytes += state.size
                # enforcement fields written before they were kept apart move out of the hash
                moved = {f: state.hash.pop(f) for f in list(state.hash)
                         if is_enforcement_field(f)}
                if moved:
                    enforcement.setdefault(key, {}).update(moved)
            self._pinned.update(pinned)
            self._enforcement.update(enforcement)
            for lru in (self._entities, self._addresses):
                for key, state in lru.items():
                    state.enf = self._enforcement.get(key)
            self._newest_ts = newest_ts
            self._bound()
        self.replay_journal()  # acts since that snapshot
        return len(entities) + len(pinned)

    def export_state(self) -> dict[str, Any]:
        """All state as plain values, entities in LRU order (caller holds the lock)."""
        def plain(states: dict[tuple[str, str], _EntityState]) -> list[Any]:
            return [(kind, entity_id, _plain(state)) for (kind, entity_id), state
                    in states.items()]

        return {"newest_ts": self._newest_ts,
                "entities": plain(self._addresses) + plain(self._entities),
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
        entities = self._lru(kind)
        state = entities.get(key)
        if state is not None:
            if (state.last_ts and self._newest_ts - state.last_ts > self.idle_ttl_s
                    and state.hash.get(PERSIST_FIELD) != "1"):
                self._bytes -= state.size
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
            self._bytes -= cold.size
            self.expirations += 1
        entities[key] = state
        return state

    def _lru(self, kind: str) -> OrderedDict[tuple[str, str], _EntityState]:
        return self._addresses if kind == ADDRESS_KIND else self._entities

    def _over(self) -> bool:
        return bool((self.max_bytes is not None and self._bytes > self.max_bytes)
                    or (self.max_entities is not None and len(self) > self.max_entities))

    def _bound(self) -> None:
        """Evict feature state, least recently used first, addresses before keys (see
        `features.stores.budget`), until the store is within its bounds. A permanently
        banned entity is never evicted (it goes back to the warm end)."""
        for lru in (self._addresses, self._entities):
            spared = 0
            while lru and spared < len(lru) and self._over():
                cold_key, cold = lru.popitem(last=False)
                if cold.hash.get(PERSIST_FIELD) == "1":
                    lru[cold_key] = cold
                    spared += 1
                    continue
                self._bytes -= cold.size
                self.evictions += 1
                if lru is self._addresses:
                    self.address_evictions += 1

    def _apply(self, req: EntityOps) -> list[Any]:
        # Resolve every op first so that a bad op never leaves the entity half-updated.
        ops = req.ops
        try:
            handlers = [_HANDLERS[op[0]] for op in ops]
        except (KeyError, IndexError, TypeError):
            bad = next((op for op in ops if not op or op[0] not in _HANDLERS), ())
            raise StoreError(f"unknown store operation {bad[:1]!r}") from None
        if MemoryStore._set in handlers or MemoryStore._decay_add in handlers:
            check_blob_fields(ops)
        state = self._entity(req.kind, req.entity_id)
        self._current = (req.kind, req.entity_id)
        if ops and ops[0][0] == CLAIM:
            held = _claim(state, ops[0])
            if held is not None:  # a repeat: nothing of this request is applied
                self._resize(req.kind, state)  # but expired claims were forgotten
                return [held, *([None] * (len(ops) - 1))]
        results = [h(self, state, op) for h, op in zip(handlers, ops, strict=False)]
        self._resize(req.kind, state)
        return results

    def _resize(self, kind: str, state: _EntityState) -> None:
        """Bring the store's byte count to the entity's state as it now is."""
        if kind != GLOBAL_KIND:
            size = entity_bytes(state)
            self._bytes += size - state.size
            state.size = size

    # --- operations (same semantics as stores/lua/apply_ops.lua); op = (code, *args) ------
    def _get(self, s: _EntityState, op: tuple[Any, ...]) -> Any:
        fld = op[1]
        if fld[:4] in _ENF:
            return s.enf.get(fld) if s.enf is not None else None
        if PROFILE_MARK in fld:
            return _profile_read(s, fld)
        if fld[:2] == BLOB_PREFIX:
            return s.profiles.get(fld)
        return s.hash.get(fld)

    def _set(self, s: _EntityState, op: tuple[Any, ...]) -> None:
        fld = op[1]
        if fld[:4] in _ENF:
            if s.enf is None:  # first enforcement write: the entity's dict, outside the LRU
                s.enf = self._enforcement.setdefault(self._current, {})
            s.enf[fld] = str(op[2])
            return
        s.hash[fld if fld in s.hash else sys.intern(fld)] = str(op[2])

    def _del(self, s: _EntityState, op: tuple[Any, ...]) -> None:
        fld = op[1]
        if fld[:4] in _ENF:
            if s.enf is not None:
                s.enf.pop(fld, None)
            return
        if fld[:2] == BLOB_PREFIX:
            s.profiles.pop(fld, None)
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
        if PROFILE_MARK in fld:
            value = (_scalar(s, fld) or 0.0) + float(op[2])
            _put_scalar(s, fld, value)
            return value
        value = float(s.hash.get(fld, "0")) + float(op[2])
        s.hash[fld] = _fmt(value)
        return value

    def _ring_add(self, s: _EntityState, op: tuple[Any, ...]) -> float | None:
        rings = s.rings
        rings[op[1]], value = ring_add(rings.get(op[1]), op[2], op[3], float(op[4]))
        return value

    def _ring_max(self, s: _EntityState, op: tuple[Any, ...]) -> float | None:
        rings = s.rings
        rings[op[1]], value = ring_max(rings.get(op[1]), op[2], op[3], float(op[4]))
        return value

    def _ring_read(self, s: _EntityState, op: tuple[Any, ...]) -> Any:
        return ring_read(op, s.rings.get(op[1]))

    def _gets(self, s: _EntityState, op: tuple[Any, ...]) -> list[Any]:
        get = s.hash.get
        out = [_profile_read(s, f) if PROFILE_MARK in f
               else s.profiles.get(f) if f[:2] == BLOB_PREFIX else get(f)
               for f in op[2:2 + op[1]]]
        if s.enf is not None:  # enforcement fields live apart (never evicted)
            for i, f in enumerate(op[2:2 + op[1]]):
                if f[:4] in _ENF:
                    out[i] = s.enf.get(f)
        return out

    def _ewm_update(self, s: _EntityState, name: str, x: float, alpha: float) -> None:
        # Kept as floats (the Lua script writes them with 17 significant digits, which
        # round-trips exactly): GET returns the float, callers parse with float().
        if PROFILE_MARK in name:
            where = profile_slot(name)
            if where is not None:
                base, slot = where[0], where[1]
                profile = s.profiles.get(base)
                s.profiles[base] = profile_put(profile, slot,
                                               *ewm_next(*profile_get(profile, slot), x, alpha))
                return
        h = s.hash
        nf = f"{name}:n"
        n = h.get(nf)
        if n is None:
            h[f"{name}:m"] = x
            h[f"{name}:v"] = 0.0
            h[nf] = 1.0
            return
        mf, vf = f"{name}:m", f"{name}:v"
        h[nf], h[mf], h[vf] = ewm_next(float(n), float(h[mf]), float(h[vf]), x, alpha)

    def _ewm(self, s: _EntityState, op: tuple[Any, ...]) -> None:
        self._ewm_update(s, op[1], float(op[2]), float(op[3]))

    def _ewm_gap(self, s: _EntityState, op: tuple[Any, ...]) -> Any:
        _, name, fld, ts, alpha, max_gap = op
        held = _scalar(s, fld)
        if ts > s.last_ts:
            s.last_ts = ts
            if ts > self._newest_ts:
                self._newest_ts = ts
        if held is None:
            _put_scalar(s, fld, float(ts))
            return None
        gap = ts - held
        if gap >= 0:
            self._ewm_update(s, name, gap if gap < max_gap else float(max_gap), alpha)
            _put_scalar(s, fld, float(ts))
        return held

    def _ewm_same(self, s: _EntityState, op: tuple[Any, ...]) -> Any:
        _, name, fld, x, alpha = op
        held = _scalar(s, fld)
        x = float(x)
        if held is not None:
            self._ewm_update(s, name, 1.0 if held == x else 0.0, alpha)
        _put_scalar(s, fld, x)
        return held

    def _recent_add(self, s: _EntityState, op: tuple[Any, ...]) -> int:
        _, zname, member, ts, window_s, cap = op
        member = member_hash(member)
        if ts > s.last_ts:
            s.last_ts = ts
            if ts > self._newest_ts:
                self._newest_ts = ts
        cutoff = ts - window_s
        blob = s.sets.get(zname)
        if blob and min(set_times(blob)) > cutoff and len(blob) // 16 <= cap:
            n = _touch_set(s, zname, blob, member, ts, cap)  # nothing to forget
            if n:
                return n
        z = set_members(blob)
        held = z.get(member)
        if held is None or held < ts:
            z[member] = ts
        z = {m: t for m, t in z.items() if t > cutoff}
        if len(z) > cap:
            _cap(z, cap)
        _keep_set(s, zname, z)
        return len(z)

    def _recent_count(self, s: _EntityState, op: tuple[Any, ...]) -> int:
        z = s.sets.get(op[1])
        if not z:
            return 0
        cutoff = op[2] - op[3]
        return sum(1 for t in set_times(z) if t > cutoff)

    def _seen_add(self, s: _EntityState, op: tuple[Any, ...]) -> int:
        _, zname, member, ts, cap = op
        member = member_hash(member)
        if ts > s.last_ts:
            s.last_ts = ts
            if ts > self._newest_ts:
                self._newest_ts = ts
        blob = s.sets.get(zname)
        if blob and len(blob) // 16 <= cap:
            found = set_find(blob, member) >= 0
            if _touch_set(s, zname, blob, member, ts, cap):
                return 0 if found else 1
        z = set_members(blob)
        held = z.get(member)
        if held is None or held < ts:
            z[member] = ts
        if len(z) > cap:
            _cap(z, cap)
        _keep_set(s, zname, z)
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

    def _claimed(self, s: _EntityState, op: tuple[Any, ...]) -> None:
        return None  # applied by `_claim` before the other ops

    def _remember(self, s: _EntityState, op: tuple[Any, ...]) -> None:
        _, zname, token, value = op
        if token in s.zsets.get(zname, {}):
            text = str(value)
            old = s.hash.get(CLAIM_FIELD_PREFIX + token)
            s.hash[CLAIM_FIELD_PREFIX + token] = text
            s.remembered += len(text) - (len(old) if old is not None else 0)

    def _log_append(self, s: _EntityState, op: tuple[Any, ...]) -> int:
        _, name, entry, cap, new_id = op
        log = s.logs.setdefault(name, {"id": new_id, "first": 1, "entries": []})
        entries = log["entries"]
        entries.append(str(entry))
        if len(entries) > cap + cap // 4 + 1:  # trimmed in steps: amortised O(1)
            drop = len(entries) - cap
            del entries[:drop]
            log["first"] += drop
        return int(log["first"] + len(entries) - 1)

    def _decay_add(self, s: _EntityState, op: tuple[Any, ...]) -> None:
        _, fld, ts, half_lives, deltas = op
        s.profiles[fld] = decay_add(s.profiles.get(fld), float(ts), half_lives, deltas)

    def _log_read(self, s: _EntityState, op: tuple[Any, ...]) -> list[Any]:
        _, name, after, limit = op
        log = s.logs.get(name)
        if log is None:
            return [None, 0, []]
        first, entries = log["first"], log["entries"]
        head = first + len(entries) - 1
        start = max(int(after) + 1, first)
        stop = min(head, start + int(limit) - 1)
        return [log["id"], head, [[q, entries[q - first]] for q in range(start, stop + 1)]]

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


def _profile_read(s: _EntityState, fld: str) -> Any:
    where = profile_slot(fld)
    if where is None:
        return s.hash.get(fld)
    return profile_part(s.profiles.get(where[0]), where[1], where[2])


def _touch_set(s: _EntityState, name: str, blob: bytes, member: int, ts: float,
               cap: int) -> int:
    """Add `member` at `ts` to a capped set within its cap, or move its time forward, in
    the field's bytes (as the script does, and as repacking would): the set's size, or
    0 when adding would pass the cap."""
    off = set_find(blob, member)
    if off >= 0:
        if struct.unpack_from("<d", blob, off + 8)[0] < ts:
            s.sets[name] = blob[:off + 8] + struct.pack("<d", ts) + blob[off + 16:]
        return len(blob) // 16
    if len(blob) // 16 >= cap:
        return 0
    s.sets[name] = blob + struct.pack("<dd", member, ts)
    return len(blob) // 16 + 1


def _keep_set(s: _EntityState, name: str, members: dict[Any, float]) -> None:
    if members:
        # names built per event (`ips:<country>`) are kept once for all entities
        s.sets[name if name in s.sets else sys.intern(name)] = set_bytes(members)
    else:  # as the script deletes an emptied set's field
        s.sets.pop(name, None)


def _scalar(s: _EntityState, fld: str) -> float | None:
    """The number held in `fld`: a plain field, or a slot of a packed vector (`v#slot`)."""
    where = profile_slot(fld) if PROFILE_MARK in fld else None
    if where is None:
        held = s.hash.get(fld)
        return None if held is None else float(held)
    return scalar_get(s.profiles.get(where[0]), where[1])


def _put_scalar(s: _EntityState, fld: str, x: float) -> None:
    where = profile_slot(fld) if PROFILE_MARK in fld else None
    if where is None:
        s.hash[fld] = x
        return
    s.profiles[where[0]] = scalar_put(s.profiles.get(where[0]), where[1], x)


def _plain(state: _EntityState) -> dict[str, Any]:
    """An entity's feature state as plain values (its enforcement dict is saved apart)."""
    return {"hash": dict(state.hash), "zsets": {z: dict(m) for z, m in state.zsets.items()},
            "sets": dict(state.sets), "rings": dict(state.rings),
            "profiles": dict(state.profiles),
            "last_ts": state.last_ts,
            "logs": {name: {**log, "entries": list(log["entries"])}
                     for name, log in state.logs.items()}}


def _state_of(fields: dict[str, Any]) -> _EntityState:
    state = _EntityState(**{k: v for k, v in fields.items() if k in _FEATURE_FIELDS})
    state.rings = {name: ring for name, cells in state.rings.items()
                   if (ring := _ring_of(cells)) is not None}
    state.profiles = {name: values if isinstance(values, bytes)  # older: lists of doubles
                      else struct.pack(f"<{len(values)}d", *values)
                      for name, values in state.profiles.items()}
    # capped sets of older snapshots: {member hash: time} among the sorted sets (older
    # still hold members, not their hashes: each is new once)
    for name in [z for z, m in state.zsets.items() if m and isinstance(next(iter(m)), int)]:
        state.sets[name] = set_bytes(state.zsets.pop(name))
    state.remembered = sum(len(str(v)) for f, v in state.hash.items()
                           if f.startswith(CLAIM_FIELD_PREFIX))
    return state


def _ring_of(held: Any) -> bytes | None:
    """A packed ring from a snapshot: its bytes, or as older snapshots held it, a flat
    list of doubles (`[SPARSE, slot, stamp, value, ...]` or `(stamp, value)` per slot) or
    {slot: [stamp, value]}."""
    if isinstance(held, bytes):
        return held
    if isinstance(held, dict):
        return ring_of_cells((slot, st, v) for slot, (st, v) in held.items())
    flat = list(held)
    if flat and flat[0] == _OLD_SPARSE:
        return ring_of_cells(zip(flat[1::3], flat[2::3], flat[3::3], strict=True))
    return ring_of_cells((slot, st, v) for slot, (st, v)
                         in enumerate(zip(flat[::2], flat[1::2], strict=True))
                         if st != EMPTY_STAMP)


_OLD_SPARSE = float(-(2**31) - 1)
"""First item of a sparse ring in snapshots that held rings as lists of doubles."""


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


def _applied(requests: Sequence[EntityOps], results: list[list[Any]]) -> list[EntityOps]:
    """The requests a call applied: a repeated claim (see CLAIM) applied nothing of its own,
    so it has nothing to journal."""
    return [req for req, res in zip(requests, results, strict=True)
            if not (req.ops and req.ops[0][0] == CLAIM and res[0] is not None)]


def _claim(s: _EntityState, op: tuple[Any, ...]) -> str | None:
    """CLAIM: forget expired claims, then the held value of a live claim (a repeat), or
    None after claiming the token (as the Lua script does; it forgets 64 per call)."""
    _, zname, token, expires_at, now = op
    z = s.zsets.setdefault(zname, {})
    expired = []
    for m, t in z.items():  # insertion order is expiry order (one window per store user)
        if t > float(now) or len(expired) >= 64:
            break
        expired.append(m)
    for old in expired:
        del z[old]
        kept = s.hash.pop(CLAIM_FIELD_PREFIX + old, None)
        if kept is not None:
            s.remembered -= len(kept)
    if token in z:
        return str(s.hash.get(CLAIM_FIELD_PREFIX + token, ""))
    z[token] = float(expires_at)
    return None


def _g17(value: float) -> str:
    """17 significant digits, as the Lua script writes them (exact float round trip)."""
    return f"{value:.17g}"


def _cap(z: dict[str, float], cap: int) -> None:
    """Drop the oldest members beyond `cap` (ties broken by member, as Redis does)."""
    excess = len(z) - cap
    if excess > 0:
        for m, _ in sorted(z.items(), key=lambda kv: (kv[1], kv[0]))[:excess]:
            del z[m]


def new_state() -> _EntityState:
    """A detached entity state (not held by any store), for `replay_ops`."""
    return _EntityState(enf={})


def replay_ops(state: _EntityState, ops: Sequence[tuple[Any, ...]],
               given: dict[int, Any]) -> list[Any]:
    """Every op's result on a detached state, by the memory store's op code: how the
    Redis store answers from the fields its script returns (`features.stores.redis_store`),
    so each op's answer has one implementation. `given`: results known already (by op
    index), such as those of sorted-set ops, which the script computes."""
    return [given[i] if i in given else _HANDLERS[op[0]](_REPLAYER, state, op)
            for i, op in enumerate(ops)]


_HANDLERS = {
    GET: MemoryStore._get,
    SET: MemoryStore._set,
    DEL: MemoryStore._del,
    INCR: MemoryStore._incr,
    RING_ADD: MemoryStore._ring_add,
    RING_MAX: MemoryStore._ring_max,
    RING_GET: MemoryStore._ring_read,
    RING_SUM: MemoryStore._ring_read,
    EWM: MemoryStore._ewm,
    RECENT_ADD: MemoryStore._recent_add,
    RECENT_COUNT: MemoryStore._recent_count,
    SEEN_ADD: MemoryStore._seen_add,
    EWM_GAP: MemoryStore._ewm_gap,
    EWM_SAME: MemoryStore._ewm_same,
    GETS: MemoryStore._gets,
    RING_WINDOWS: MemoryStore._ring_read,
    RING_VALUES: MemoryStore._ring_read,
    ZSET: MemoryStore._zset,
    ZREM: MemoryStore._zrem,
    ZITEMS: MemoryStore._zitems,
    PERSIST: MemoryStore._persist,
    BUDGET_ADD: MemoryStore._budget_add,
    LIMIT: MemoryStore._limit,
    CLAIM: MemoryStore._claimed,
    REMEMBER: MemoryStore._remember,
    LOG_APPEND: MemoryStore._log_append,
    LOG_READ: MemoryStore._log_read,
    DECAY_ADD: MemoryStore._decay_add,
}

_REPLAYER = MemoryStore(max_mb=None)
"""The store object `replay_ops` runs handlers with (they touch only the state given and
its event-time clock)."""
