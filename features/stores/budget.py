"""What the memory store's feature state costs in bytes, and the budget that bounds it.

Why a budget in bytes rather than a count of entities: a warm key holds a few KiB (its
rings, hour-of-week profile and capped sets), an address seen once a few hundred bytes,
so a count says little about memory. The estimate is computed from the sizes of an
entity's containers (a few C-level `len` calls, cheap enough for every touch) with
per-item costs measured with `tracemalloc` on CPython 3.11 (`keywatch bench` prints the
estimate beside the measured figure for warm keys and addresses).

Eviction order: idle addresses go first, then keys. An address's state (counters, the
keys seen from it) is short-lived and rebuilt by its next events; a key's state holds its
learned baselines and profile. So under pressure the least recently used address is
evicted while any address is held, and only then the least recently used key.
"""

from __future__ import annotations

from typing import Any

ENTITY_BYTES = 800
"""The entity itself: its state object, its dicts, its place in the LRU and its id."""
FIELD_BYTES = 130
"""One plain hash field: its name, its value (a short string or a float), a dict slot."""
PACKED_BYTES = 100
"""One packed field (ring, profile, vector, capped set), besides its bytes: the bytes
object, its name and its dict slot."""
SET_BYTES = 250
"""One sorted set (claims, logs, indexes), besides its members: the dict and its name."""
MEMBER_BYTES = 100
"""One member of a sorted set: the member, its score and the dict slot."""


def entity_bytes(state: Any) -> int:
    """Estimated bytes of an entity's feature state (`memory._EntityState`)."""
    rings, profiles, sets, zsets = state.rings, state.profiles, state.sets, state.zsets
    size = (ENTITY_BYTES + FIELD_BYTES * len(state.hash)
            + PACKED_BYTES * (len(rings) + len(profiles) + len(sets))
            + sum(map(len, rings.values())) + sum(map(len, profiles.values()))
            + sum(map(len, sets.values())))
    if zsets:
        size += SET_BYTES * len(zsets) + MEMBER_BYTES * sum(map(len, zsets.values()))
    # a claim's remembered decision (hundreds of characters) is far longer than the
    # plain value FIELD_BYTES allows for
    return size + state.remembered
