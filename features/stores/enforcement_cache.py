"""A replica's copy of the shared store's enforcement state, for a Redis outage.

Why: under `fail_open` a replica that loses Redis answers from a fresh local store, which
knows no ban, limit or allow-list entry, so every ban (permanent ones included) was
lifted for the length of the outage, which an attacker can cause or wait for. The
`EnforcementCache` re-reads the enforcement indexes every `refresh_s` seconds while Redis
is healthy (one round trip, plus one for the entries that are new or changed), and when
an outage begins `ResilientStore` seeds its local store with them: bans, limits and the
allow-list the replica last knew keep being enforced, by the same code reading the same
fields. A ban set during the outage is enforced by the replica that set it and spooled
for the others.

The cache is generic: the serving layer names the global index entities (whose members
are `<scope>:<entity id>`), the entity kind of each scope, and the fields to copy.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Mapping, Sequence
from typing import Any

from features.stores.base import GETS, GLOBAL_KIND, SET, ZITEMS, ZSET, EntityOps, StateStore

log = logging.getLogger("keywatch.store")

INDEX_ZSET = "index"
MAX_CACHED = 100_000


class EnforcementCache:
    """Active bans and limits (and the allow-list) as last read from `primary`.

    Parameters
    ----------
    indexes:
        Names of global entities whose `index` sorted set lists members `<scope>:<id>`
        scored by when they end (bans, limits); entries that ended are not cached.
    plain_indexes:
        Global entities copied as they are (the allow-list).
    scope_kinds:
        Entity kind of each scope (`{"key": "k", "ip": "ip"}`).
    fields:
        The enforcement fields copied for each indexed entity.
    """

    def __init__(self, primary: StateStore, *, indexes: Sequence[str],
                 plain_indexes: Sequence[str] = (), scope_kinds: Mapping[str, str],
                 fields: Sequence[str], refresh_s: float = 3.0) -> None:
        self.primary = primary
        self.indexes = tuple(indexes)
        self.plain_indexes = tuple(plain_indexes)
        self.scope_kinds = dict(scope_kinds)
        self.fields = tuple(fields)
        self.refresh_s = refresh_s
        self._lock = threading.Lock()
        self._items: dict[str, list[list[Any]]] = {}
        self._entities: dict[tuple[str, str], list[Any]] = {}
        self._scores: dict[tuple[str, str], float] = {}
        self.refreshed_at: float | None = None
        self.refreshes = 0
        self.errors = 0

    def refresh(self) -> None:
        """Read the indexes, then the fields of entries new or changed since last time."""
        names = (*self.indexes, *self.plain_indexes)
        reads = [EntityOps(GLOBAL_KIND, n, [(ZITEMS, INDEX_ZSET, "-inf", MAX_CACHED)])
                 for n in names]
        items = {n: res[0] or [] for n, res in zip(names, self.primary.execute(reads),
                                                   strict=True)}
        now = time.time()
        wanted: dict[tuple[str, str], float] = {}
        for name in self.indexes:
            live = [[m, t] for m, t in items[name] if float(t) > now]
            items[name] = live
            for member, until in live:
                scope, _, entity_id = str(member).partition(":")
                key = (self.scope_kinds.get(scope, scope), entity_id)
                wanted[key] = max(wanted.get(key, 0.0), float(until))
        with self._lock:
            stale = [k for k in wanted if self._scores.get(k) != wanted[k]]
        fetched = self._fetch(stale)
        with self._lock:
            self._items = items
            self._entities = {k: v for k, v in self._entities.items() if k in wanted}
            self._entities.update(fetched)
            self._scores = {k: wanted[k] for k in wanted if k in self._entities}
            self.refreshed_at = now
            self.refreshes += 1

    def _fetch(self, keys: list[tuple[str, str]]) -> dict[tuple[str, str], list[Any]]:
        out: dict[tuple[str, str], list[Any]] = {}
        for start in range(0, len(keys), 500):
            chunk = keys[start:start + 500]
            reads = [EntityOps(kind, eid, [(GETS, len(self.fields), *self.fields)])
                     for kind, eid in chunk]
            for key, res in zip(chunk, self.primary.execute(reads), strict=True):
                out[key] = res[0]
        return out

    def seed_ops(self) -> list[EntityOps]:
        """Writes that give an empty store the cached state (ZSET/SET, no journal)."""
        with self._lock:
            items, entities = dict(self._items), dict(self._entities)
        ops: list[EntityOps] = []
        for name, entries in items.items():
            if entries:
                ops.append(EntityOps(GLOBAL_KIND, name, [
                    (ZSET, INDEX_ZSET, m, float(t), MAX_CACHED) for m, t in entries]))
        for (kind, eid), values in entities.items():
            sets = [(SET, f, v) for f, v in zip(self.fields, values, strict=False)
                    if v is not None]
            if sets:
                ops.append(EntityOps(kind, eid, sets))
        return ops

    def describe(self) -> dict[str, Any]:
        with self._lock:
            return {"entities": len(self._entities),
                    "refreshed_at": self.refreshed_at, "refreshes": self.refreshes,
                    "errors": self.errors}
