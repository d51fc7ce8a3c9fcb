"""The Redis store's copy of the entities this replica wrote last, and their tokens.

Why: the Redis core every replica shares was spending its time applying ops that the
replica could compute itself. Every write of an entity sets a new random token in its
`_v` field (`lua/apply_ops.lua`). A replica that holds the fields of an entity at the
token the entity is still at knows exactly what the script would compute, so it computes
the results and the new fields itself and sends only those, with the token: Redis checks
the token and stores the fields, a few microseconds. When another replica (or an admin
act, or an expiry) changed the entity since, the token differs and the script applies
the ops itself, in the same call, as it always did: one round trip either way, and a
copy is never trusted past a change.

A round trip that fails (Redis down, a timeout) leaves the copy as it was: if the write
was applied all the same, the entity is at a token the copy does not hold, and the next
call takes the slow path. Nothing is applied twice and no copy runs ahead of Redis.

The copy holds raw field values in the script's layout (`replay.pack_field`), so the
client rebuilds its state with the same code whichever path answered. It is bounded by a
byte budget, least recently used first out; an entity that was dropped only costs one
slower call.
"""

from __future__ import annotations

import os
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from itertools import count

_FIELD_OVERHEAD = 72
"""Bytes a held field costs beyond its name and value (dict slot, bytes object)."""


@dataclass(slots=True)
class CachedEntity:
    """The fields of an entity as they are at `token` (None: known to be absent)."""

    token: bytes
    raw: dict[str, bytes | None] = field(default_factory=dict)
    size: int = 0
    kept: float = 0.0
    """When the entity's TTL was last refreshed (monotonic clock)."""

    def holds(self, names: list[str]) -> bool:
        raw = self.raw
        return all(name in raw for name in names)

    def update(self, values: dict[str, bytes | None]) -> None:
        raw = self.raw
        for name, value in values.items():
            old = raw.get(name)
            if name not in raw:
                self.size += len(name) + _FIELD_OVERHEAD
            self.size += (len(value) if value else 0) - (len(old) if old else 0)
            raw[name] = value


class EntityCache:
    """Entity copies by (kind, id), within `max_bytes` (0: hold nothing)."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = int(max_bytes)
        self._held: OrderedDict[tuple[str, str], CachedEntity] = OrderedDict()
        self._bytes = 0
        self._prefix = os.urandom(6).hex()
        self._count = count(1)
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._held)

    @property
    def bytes(self) -> int:
        return self._bytes

    def new_token(self) -> bytes:
        """A token no other writer uses: a random per-process prefix and a counter."""
        return f"{self._prefix}{next(self._count):x}".encode()

    def get(self, key: tuple[str, str]) -> CachedEntity | None:
        entry = self._held.get(key)
        if entry is not None:
            self._held.move_to_end(key)
        return entry

    def put(self, key: tuple[str, str], token: bytes | None,
            values: dict[str, bytes | None], *, merge: bool, kept: bool) -> None:
        """Hold `values` at `token`, added to the held copy when `merge` (the entity
        was still at the held copy's token), else replacing it; `kept`: this call
        refreshed the entity's TTL."""
        old = self._held.pop(key, None)
        if old is not None:
            self._bytes -= old.size
        if token is None or self.max_bytes <= 0:
            return
        entry = old if merge and old is not None else CachedEntity(token)
        entry.token = token
        if kept:
            entry.kept = time.monotonic()
        entry.update(values)
        self._held[key] = entry
        self._bytes += entry.size
        while self._bytes > self.max_bytes and self._held:
            _, dropped = self._held.popitem(last=False)
            self._bytes -= dropped.size
