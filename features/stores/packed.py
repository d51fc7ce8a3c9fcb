"""The packed layouts of rings and profiles, as the memory store holds them.

Why: a warm key used to hold hundreds of small objects — a `[stamp, value]` cell per ring
bucket and three floats per hour-of-week slot — about 80 KB in Redis and more in Python.
A ring is now one flat `array('d')`: while it has at most `SPARSE_MAX` live buckets,
`[SPARSE, slot, stamp, value, ...]` (an address seen once holds a cell or two, not a run
of empty slots); past that, `(stamp, value)` pairs indexed by slot, up to the highest slot
written. A profile is one `array('d')` of `(n, m, v)` triples indexed by slot. The Lua
script packs the same cells into one hash field (`lua/apply_ops.lua`), with the same
semantics.

A slot whose stamp is not the one asked for is stale and reads as 0; a write to a stale
slot starts it afresh; a write older than the slot's stamp is refused (too late).
"""

from __future__ import annotations

import hashlib
import struct
from array import array
from collections.abc import Sequence
from functools import lru_cache
from typing import Any

EMPTY_STAMP = float(-(2**31))
"""The stamp of a never-written ring slot (stamps are bucket numbers: minutes, hours,
days since the epoch, all far above it; Redis packs them as 32-bit integers)."""
PROFILE_MARK = "#"
"""`name#slot:part` is part m, v or n of slot `slot` of the packed profile `name` (EWM
and GET on it); `name#slot` alone is one scalar of the packed vector `name` (INCR, GET,
and the remembered value of EWM_GAP and EWM_SAME): one double per slot, NaN while
unwritten. A name is used one way or the other, never both."""


SPARSE = float(-(2**31) - 1)
"""First item of a sparse ring (below any int32 stamp, so never a dense ring's first)."""
SPARSE_MAX = 8
"""Live buckets a ring holds as (slot, stamp, value) cells before it turns dense."""


def new_ring() -> array:
    return array("d", (SPARSE,))


def _grow(ring: array, slot: int) -> None:
    missing = slot + 1 - len(ring) // 2
    if missing > 0:
        ring.extend((EMPTY_STAMP, 0.0) * missing)


def _locate(ring: Sequence[float], slot: int) -> int:
    """Index of the stamp of `slot`'s cell in a non-empty ring, or -1 (no cell)."""
    if ring[0] == SPARSE:
        for i in range(1, len(ring), 3):
            if ring[i] == slot:
                return i + 1
        return -1
    i = 2 * slot
    return i if i < len(ring) else -1


def _place(ring: array, slot: int) -> int:
    """Index of the stamp of `slot`'s cell, made (empty) when there is none."""
    i = _locate(ring, slot)
    if i >= 0:
        return i
    if ring[0] == SPARSE:
        if len(ring) // 3 < SPARSE_MAX:
            ring.extend((slot, EMPTY_STAMP, 0.0))
            return len(ring) - 2
        dense = array("d")
        for j in range(1, len(ring), 3):
            at = int(ring[j])
            _grow(dense, at)
            dense[2 * at], dense[2 * at + 1] = ring[j + 1], ring[j + 2]
        ring[:] = dense
    _grow(ring, slot)
    return 2 * slot


def ring_cells(ring: Sequence[float]) -> list[tuple[int, float, float]]:
    """(slot, stamp, value) of each written cell of a ring, sparse or dense."""
    if not ring:
        return []
    if ring[0] == SPARSE:
        return [(int(ring[i]), ring[i + 1], ring[i + 2]) for i in range(1, len(ring), 3)]
    return [(i // 2, ring[i], ring[i + 1]) for i in range(0, len(ring), 2)
            if ring[i] != EMPTY_STAMP]


def ring_add(ring: array, slot: int, stamp: int, amount: float) -> float | None:
    """Add to bucket `stamp` in `slot`; its new value, or None when the slot is newer."""
    i = _place(ring, slot)
    held = ring[i]
    if held > stamp:
        return None
    if held != stamp:
        ring[i] = stamp
        ring[i + 1] = 0.0
    ring[i + 1] += amount
    return ring[i + 1]


def ring_max(ring: array, slot: int, stamp: int, value: float) -> float | None:
    """Keep the largest value of bucket `stamp` in `slot` (None when the slot is newer)."""
    i = _place(ring, slot)
    held = ring[i]
    if held > stamp:
        return None
    if held != stamp or value > ring[i + 1]:  # a newer bucket starts afresh
        ring[i] = stamp
        ring[i + 1] = value
    return ring[i + 1]


def bucket(ring: Sequence[float] | None, size: int, stamp: int) -> float:
    """The value of bucket `stamp` in a ring of `size` slots (0.0 when stale)."""
    if not ring:
        return 0.0
    i = _locate(ring, stamp % size)
    if i >= 0 and ring[i] == stamp:
        return ring[i + 1]
    return 0.0


def ring_windows(ring: Sequence[float] | None, size: int, stamp: int,
                 ns: tuple[int, ...]) -> list[float]:
    """For each n: the sum of the live buckets stamp-n+1..stamp (at most `size`), summed
    newest first as the Lua script does, then the edge bucket stamp-n."""
    if not ring:
        return [0.0] * (2 * len(ns))
    vals = [bucket(ring, size, stamp - off) for off in range(max(ns) + 1)]
    out: list[float] = []
    for n in ns:
        out.append(sum(vals[:n if n < size else size], 0.0))
        out.append(vals[n])
    return out


def ring_read(op: tuple[Any, ...], ring: Sequence[float] | None) -> Any:
    """The result of a ring read op (RING_GET, RING_SUM, RING_WINDOWS, RING_VALUES; see
    `features.stores.base`) on a ring's flat (stamp, value) cells. Both stores answer
    ring reads with this one function: the memory store on its array, the Redis store on
    the packed field its script returns (`unpack_ring`)."""
    code = op[0]
    if code == "ring_windows":
        return ring_windows(ring, op[2], op[3], op[5:5 + op[4]])
    if code == "ring_values":
        size = op[2]
        return [bucket(ring, size, stamp) for stamp in op[4:4 + op[3]]]
    if code == "ring_get":
        i = _locate(ring, op[2]) if ring else -1
        return ring[i + 1] if i >= 0 and ring[i] == op[3] else 0.0
    _, _, size, lo, hi = op  # ring_sum
    total = 0.0
    if ring:
        for stamp in range(max(lo, hi - size + 1), hi + 1):
            total += bucket(ring, size, stamp)
    return total


_CELL = struct.Struct("<id")
_UNPACKERS: dict[int, struct.Struct] = {}


_SPARSE_CELL = struct.Struct("<Hid")


def unpack_ring(blob: bytes) -> Sequence[float]:
    """The flat (stamp, value) cells of a ring packed by the Lua script: dense (even
    length: 12 bytes a slot, little-endian int32 stamp and double value) or sparse (odd
    length: `S`, then 14-byte (uint16 slot, int32 stamp, double value) cells), as the
    memory store holds a ring (`new_ring`)."""
    if len(blob) % 2:
        ring = new_ring()
        for cell in _SPARSE_CELL.iter_unpack(blob[1:]):
            ring.extend(cell)
        return ring
    n = len(blob) // _CELL.size
    unpacker = _UNPACKERS.get(n)
    if unpacker is None:
        unpacker = _UNPACKERS[n] = struct.Struct("<" + "id" * n)
    return unpacker.unpack(blob[:n * _CELL.size])


def profile_slot(name: str) -> tuple[str, int, str] | None:
    """(profile, slot, part) of `profile#slot[:part]`, or None for a plain name."""
    if PROFILE_MARK not in name:
        return None
    base, _, rest = name.partition(PROFILE_MARK)
    slot, _, part = rest.partition(":")
    if not slot.isdigit():
        return None
    return base, int(slot), part


def profile_get(profile: array | None, slot: int) -> tuple[float, float, float]:
    """(n, m, v) of a profile slot; n == 0 when it was never written."""
    i = 3 * slot
    if profile is None or i + 3 > len(profile):
        return 0.0, 0.0, 0.0
    return profile[i], profile[i + 1], profile[i + 2]


def profile_put(profile: array, slot: int, n: float, m: float, v: float) -> None:
    i = 3 * slot
    if i + 3 > len(profile):
        profile.extend((0.0,) * (i + 3 - len(profile)))
    profile[i], profile[i + 1], profile[i + 2] = n, m, v


def profile_part(profile: array | None, slot: int, part: str) -> float | None:
    """GET of `profile#slot:part` (m, v or n): None when the slot was never written.
    Without a part, the scalar `vector#slot` (`scalar_get`)."""
    if not part:
        return scalar_get(profile, slot)
    n, m, v = profile_get(profile, slot)
    if n == 0.0:
        return None
    return {"m": m, "v": v, "n": n}.get(part)


def scalar_get(vector: array | None, slot: int) -> float | None:
    """Slot `slot` of a packed vector of scalars (`name#slot`, no part): None when it was
    never written (NaN marks an unwritten slot)."""
    if vector is None or slot >= len(vector):
        return None
    x = vector[slot]
    return None if x != x else x


def scalar_put(vector: array, slot: int, x: float) -> None:
    if slot >= len(vector):
        vector.extend((_NAN,) * (slot + 1 - len(vector)))
    vector[slot] = x


_NAN = float("nan")


def ewm_next(n: float, m: float, v: float, x: float, alpha: float) -> tuple[float, float, float]:
    """One step of an exponentially weighted mean and variance (n counts the steps)."""
    if n == 0.0:
        return 1.0, x, 0.0
    diff = x - m
    incr = alpha * diff
    return n + 1.0, m + incr, (1 - alpha) * (v + diff * incr)


@lru_cache(maxsize=65_536)
def member_hash(member: str) -> int:
    """The 48-bit integer a capped set (RECENT_ADD, RECENT_COUNT, SEEN_ADD) keeps for a
    member: exact as a double in Lua, small to store, and the member itself (an address,
    a key id, a user agent) is never stored. BLAKE2b rather than a checksum, so a client
    cannot craft a user agent that passes for one already seen; two members colliding by
    chance is a 1-in-10^14 event per pair."""
    return int.from_bytes(hashlib.blake2b(str(member).encode(), digest_size=6).digest(),
                          "little")
