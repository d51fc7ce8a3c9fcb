"""The packed layouts of rings, profiles, vectors and capped sets: the bytes of one Redis
hash field each, which the memory store holds as they are.

Why: a warm key used to hold hundreds of small objects — a `[stamp, value]` cell per ring
bucket, three floats per hour-of-week slot, three fields per EWM — about 80 KB in Redis
and more in Python. Now (both stores alike, byte for byte):

* a ring is a tag byte, an int32 epoch, then its cells. Stamps are offsets k = stamp -
  epoch + 1 (one byte while the ring's stamps span under 255 buckets, else two), values
  32-bit floats while every one is exact as one, else doubles. While a ring has at most
  `SPARSE_MAX` cells they are (uint16 slot, k, value) (an address seen once holds a cell
  or two, not a run of empty slots); past that, (k, value) per slot up to the highest
  written, k = 0 for an empty slot. Tags: sparse a (k 2 bytes, floats), b (2, doubles),
  e (1, floats), f (1, doubles); dense c, d, g, h likewise. A zero byte pads the field to
  an odd length. A ring whose stamps span 65,535 buckets or more takes the wide forms:
  `S` then (uint16 slot, int32 stamp, double) cells, or (even length, no tag) an (int32
  stamp, double) per slot. Any write may repack the ring in the narrowest form that holds
  it (`_encode`); the Lua script does the same, so the bytes stay equal;
* a profile is (n, m, v) doubles per slot (n = 0: unwritten), a vector a double per
  slot (NaN: unwritten), a capped set (member hash, time) doubles per member.

A slot whose stamp is not the one asked for is stale and reads as 0; a write to a stale
slot starts it afresh; a write older than the slot's stamp is refused (too late).
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Iterable, Sequence
from functools import lru_cache
from typing import Any, NamedTuple

PROFILE_MARK = "#"
"""`name#slot:part` is part m, v or n of slot `slot` of the packed profile `name` (EWM
and GET on it); `name#slot` alone is one scalar of the packed vector `name` (INCR, GET,
and the remembered value of EWM_GAP and EWM_SAME): one double per slot, NaN while
unwritten. A name is used one way or the other, never both."""


EMPTY_STAMP = -(2**31)
"""The stamp a slot without a cell reads as (stamps are bucket numbers: minutes, hours,
days since the epoch, all far above it)."""
SPARSE_MAX = 8
"""Live buckets a ring holds as (slot, stamp, value) cells before it turns dense."""
MAX_K = 65535
"""Stamps are kept as offsets k = stamp - epoch + 1 from the ring's epoch, in one byte
while they span less than 255 buckets, else two (k = 0: an empty dense slot)."""


class _Format(NamedTuple):
    sparse: bool
    header: int
    cell: struct.Struct
    offset: bool
    """Stamps are offsets from the int32 epoch after the tag (else absolute int32)."""
    f32: bool
    max_k: int
    empty: bytes
    """A dense slot without a cell."""
    size: int
    empty_k: int
    """What an empty dense slot holds where a stamp would be."""
    slots: dict[int, struct.Struct]
    """Unpackers of the slots alone of a sparse ring, by its number of cells."""


def _format(sparse: bool, cell: str, f32: bool = False, max_k: int = 0) -> _Format:
    packer, offset = struct.Struct(cell), max_k > 0
    empty_k = 0 if offset else EMPTY_STAMP
    empty = b"" if sparse else packer.pack(empty_k, 0.0)
    header = 5 if offset else (1 if sparse else 0)
    return _Format(sparse, header, packer, offset, f32, max_k, empty, packer.size, empty_k,
                   {})


_FORMATS = {
    ord("a"): _format(True, "<HHf", True, MAX_K),
    ord("b"): _format(True, "<HHd", False, MAX_K),
    ord("c"): _format(False, "<Hf", True, MAX_K),
    ord("d"): _format(False, "<Hd", False, MAX_K),
    ord("e"): _format(True, "<HBf", True, 255),
    ord("f"): _format(True, "<HBd", False, 255),
    ord("g"): _format(False, "<Bf", True, 255),
    ord("h"): _format(False, "<Bd", False, 255),
    ord("S"): _format(True, "<Hid"),
}
_TAGS = {(sparse, narrow, short): tag for tag, sparse, narrow, short in (
    ("a", True, True, False), ("b", True, False, False), ("c", False, True, False),
    ("d", False, False, False), ("e", True, True, True), ("f", True, False, True),
    ("g", False, True, True), ("h", False, False, True))}
"""The tag of (sparse, 32-bit values, one-byte offsets)."""
_WIDE = _format(False, "<id")
_EPOCH = struct.Struct("<i")
_SLOT = struct.Struct("<H")
_F32 = struct.Struct("<f")


def _fmt(blob: bytes) -> _Format:
    """A tagged ring is of odd length (a zero byte pads it); an even one is wide."""
    return _WIDE if len(blob) % 2 == 0 else _FORMATS[blob[0]]


def _end(blob: bytes, f: _Format) -> int:
    """Where the ring's last whole cell ends (before the padding byte, if any)."""
    return len(blob) - (len(blob) - f.header) % f.cell.size


def _padded(blob: bytes, f: _Format) -> bytes:
    """A tagged ring padded to an odd length (the wide forms need none)."""
    return blob + b"\0" if f.offset and len(blob) % 2 == 0 else blob


def _fits_f32(value: float) -> bool:
    """Whether a 32-bit float holds `value` exactly (counts and sizes do; money rarely)."""
    if -16_777_216.0 <= value <= 16_777_216.0 and value == int(value):
        return True  # an integer up to 2**24
    try:
        return _F32.unpack(_F32.pack(value))[0] == value
    except OverflowError:
        return False


_Place = tuple[_Format, int, int, int, int, float]
"""Where a slot's cell is in a ring: its format, stamp base (stamp = k + base), the
offset of the cell (-1: none), the end of the last whole cell, and the (stamp, value)
the cell holds ((EMPTY_STAMP, 0.0) when none)."""


def _place(blob: bytes, slot: int) -> _Place:
    if len(blob) % 2:
        f = _FORMATS[blob[0]]
        base = _EPOCH.unpack_from(blob, 1)[0] - 1 if f.offset else 0
    else:
        f, base = _WIDE, 0
    size, header = f.size, f.header
    end = len(blob) - (len(blob) - header) % size
    if f.sparse:
        n = (end - header) // size
        unpacker = f.slots.get(n)
        if unpacker is None:
            unpacker = f.slots[n] = struct.Struct("<" + ("H" + "x" * (size - 2)) * n)
        slots = unpacker.unpack_from(blob, header)
        if slot in slots:
            off = header + slots.index(slot) * size
            _, k, value = f.cell.unpack_from(blob, off)
            return f, base, off, end, k + base, value
        return f, base, -1, end, EMPTY_STAMP, 0.0
    off = header + slot * size
    if off + size > end:
        return f, base, -1, end, EMPTY_STAMP, 0.0
    k, value = f.cell.unpack_from(blob, off)
    if k == f.empty_k:
        return f, base, off, end, EMPTY_STAMP, 0.0
    return f, base, off, end, k + base, value


def _cell(blob: bytes | None, slot: int) -> tuple[int, float]:
    """(stamp, value) of `slot`'s cell; (EMPTY_STAMP, 0.0) when it has none."""
    if not blob:
        return EMPTY_STAMP, 0.0
    at = _place(blob, slot)
    return at[4], at[5]


def ring_cells(blob: bytes | None) -> list[tuple[int, int, float]]:
    """(slot, stamp, value) of each written cell of a packed ring, any format."""
    if not blob:
        return []
    f = _fmt(blob)
    base = _EPOCH.unpack_from(blob, 1)[0] - 1 if f.offset else 0
    cells = f.cell.iter_unpack(memoryview(blob)[f.header:_end(blob, f)])
    if f.sparse:
        return [(slot, st + base, value) for slot, st, value in cells]
    empty = 0 if f.offset else EMPTY_STAMP
    return [(slot, st + base, value) for slot, (st, value) in enumerate(cells) if st != empty]


def _encode(cells: dict[int, tuple[int, float]]) -> bytes:
    """The canonical packing of a ring's cells (the Lua script's `ring_encode`): sparse
    while it has at most SPARSE_MAX cells (in slot order), else dense up to the highest
    slot; 32-bit values when each is exact as one; stamps as one-byte offsets from the
    oldest stamp when they span less than 255 buckets, two-byte ones when less than
    65535, else the wide forms (absolute int32 stamps, doubles)."""
    slots = sorted(cells)
    stamps = [cells[s][0] for s in slots]
    lo = min(stamps)
    span, sparse = max(stamps) - lo, len(slots) <= SPARSE_MAX
    if span >= MAX_K:
        if sparse:
            f = _FORMATS[ord("S")]
            return b"S" + b"".join(f.cell.pack(s, *cells[s]) for s in slots)
        return b"".join(_WIDE.cell.pack(*cells[s]) if s in cells else _WIDE.empty
                        for s in range(slots[-1] + 1))
    narrow = all(_fits_f32(cells[s][1]) for s in slots)
    tag = _TAGS[(sparse, narrow, span < 255)]
    f, base = _FORMATS[ord(tag)], lo - 1
    head = tag.encode() + _EPOCH.pack(lo)
    if sparse:
        body = b"".join(f.cell.pack(s, cells[s][0] - base, cells[s][1]) for s in slots)
    else:
        body = b"".join(f.cell.pack(cells[s][0] - base, cells[s][1]) if s in cells
                        else f.empty for s in range(slots[-1] + 1))
    return _padded(head + body, f)


def _put(blob: bytes, at: _Place, slot: int, stamp: int, value: float) -> bytes:
    """`blob` with `slot`'s cell (at `at`) set to (stamp, value): in place when its
    format holds them (the Lua script's `cell_put`), else packed afresh (`_encode`)."""
    f, base, off, end = at[0], at[1], at[2], at[3]
    k = stamp - base
    if not f.offset or (1 <= k <= f.max_k and (not f.f32 or _fits_f32(value))):
        size = f.size
        if off >= 0:
            cell = f.cell.pack(slot, k, value) if f.sparse else f.cell.pack(k, value)
            return b"".join((blob[:off], cell, blob[off + size:]))
        if not f.sparse:
            gap = (f.header + slot * size - end) // size
            return _padded(blob[:end] + f.empty * gap + f.cell.pack(k, value), f)
        if (end - f.header) // size < SPARSE_MAX:
            return _padded(blob[:end] + f.cell.pack(slot, k, value), f)
    cells = {s: (st, v) for s, st, v in ring_cells(blob)}
    cells[slot] = (stamp, value)
    return _encode(cells)


def ring_add(blob: bytes | None, slot: int, stamp: int,
             amount: float) -> tuple[bytes | None, float | None]:
    """Add to bucket `stamp` in `slot`: (the ring after, the bucket's new value), or
    (the ring unchanged, None) when the slot holds a newer bucket."""
    if not blob:
        value = 0.0 + amount
        return _encode({slot: (stamp, value)}), value
    at = _place(blob, slot)
    held = at[4]
    if held > stamp:
        return blob, None
    value = (at[5] if held == stamp else 0.0) + amount  # a newer bucket starts afresh
    return _put(blob, at, slot, stamp, value), value


def ring_max(blob: bytes | None, slot: int, stamp: int,
             value: float) -> tuple[bytes | None, float | None]:
    """Keep the largest value of bucket `stamp` in `slot` (as `ring_add`)."""
    if not blob:
        return _encode({slot: (stamp, value)}), value
    at = _place(blob, slot)
    held, kept = at[4], at[5]
    if held > stamp:
        return blob, None
    if held != stamp or value > kept:
        return _put(blob, at, slot, stamp, value), value
    return blob, kept


def bucket(blob: bytes | None, size: int, stamp: int) -> float:
    """The value of bucket `stamp` in a ring of `size` slots (0.0 when stale)."""
    return _values(blob, size, (stamp,))[0] if blob else 0.0


_UNPACKERS: dict[tuple[str, int], struct.Struct] = {}


def _flat(blob: bytes) -> tuple[_Format, int, tuple[Any, ...]]:
    """(format, base, every cell's fields in one flat tuple): stamp = k + base."""
    f = _WIDE if len(blob) % 2 == 0 else _FORMATS[blob[0]]
    n = (len(blob) - f.header) // f.cell.size
    key = (f.cell.format, n)
    unpacker = _UNPACKERS.get(key)
    if unpacker is None:
        unpacker = _UNPACKERS[key] = struct.Struct("<" + f.cell.format[1:] * n)
    base = _EPOCH.unpack_from(blob, 1)[0] - 1 if f.offset else 0
    return f, base, unpacker.unpack_from(blob, f.header)


def _values(blob: bytes, size: int, stamps: Sequence[int]) -> list[float]:
    """The value of each bucket `stamp` of a ring of `size` slots (0.0 when stale): its
    slot's cell, when that holds this stamp."""
    f = _WIDE if len(blob) % 2 == 0 else _FORMATS[blob[0]]
    if not f.sparse and 8 * len(stamps) < len(blob):  # a few cells of a long ring
        return _few_values(blob, f, size, stamps)
    f, base, flat = _flat(blob)
    if f.sparse:
        held = {flat[i]: (flat[i + 1] + base, flat[i + 2]) for i in range(0, len(flat), 3)}
        return [cell[1] if (cell := held.get(st % size)) is not None and cell[0] == st
                else 0.0 for st in stamps]
    # dense: k == 0 (or the wide forms' EMPTY_STAMP) is an empty slot, never a stamp
    ks, vs, empty = flat[0::2], flat[1::2], (0 if f.offset else EMPTY_STAMP)
    n = len(ks)
    return [vs[j] if (j := st % size) < n and ks[j] + base == st and ks[j] != empty
            else 0.0 for st in stamps]


def _few_values(blob: bytes, f: _Format, size: int, stamps: Sequence[int]) -> list[float]:
    """`_values` of a dense ring, cell by cell."""
    base = _EPOCH.unpack_from(blob, 1)[0] - 1 if f.offset else 0
    cell, width = f.cell, f.cell.size
    last = len(blob) - (len(blob) - f.header) % width - width
    empty, out = (0 if f.offset else EMPTY_STAMP), []
    for stamp in stamps:
        off = f.header + (stamp % size) * width
        if off <= last:
            k, value = cell.unpack_from(blob, off)
            if k + base == stamp and k != empty:
                out.append(value)
                continue
        out.append(0.0)
    return out


def ring_windows(blob: bytes | None, size: int, stamp: int,
                 ns: tuple[int, ...]) -> list[float]:
    """For each n: the sum of the live buckets stamp-n+1..stamp (at most `size`), summed
    newest first, then the edge bucket stamp-n."""
    if not blob:
        return [0.0] * (2 * len(ns))
    if len(blob) % 2 and _FORMATS[blob[0]].sparse:
        return _sparse_windows(blob, size, stamp, ns)
    vals = _values(blob, size, range(stamp, stamp - max(ns) - 1, -1))
    out: list[float] = []
    for n in ns:
        out.append(sum(vals[:n if n < size else size], 0.0))
        out.append(vals[n])
    return out


def _sparse_windows(blob: bytes, size: int, stamp: int, ns: tuple[int, ...]) -> list[float]:
    """`ring_windows` of a sparse ring (an address seen a few times, a quiet key), from
    its few cells rather than bucket by bucket: the same sums, since the live cells are
    added in the same order (newest first) and the empty buckets added nothing."""
    _, base, flat = _flat(blob)
    reach = max(ns)
    live = sorted(((st, flat[i + 2]) for i in range(0, len(flat), 3)
                   if 0 <= stamp - (st := flat[i + 1] + base) <= reach
                   and flat[i] == st % size), reverse=True)
    out: list[float] = []
    for n in ns:
        width, total, edge = min(n, size), 0.0, 0.0
        for st, value in live:
            if stamp - st < width:
                total += value
            elif stamp - st == n:
                edge = value
        out.extend((total, edge))
    return out


def ring_read(op: tuple[Any, ...], blob: bytes | None) -> Any:
    """The result of a ring read op (RING_GET, RING_SUM, RING_WINDOWS, RING_VALUES; see
    `features.stores.base`) on a packed ring. Both stores answer ring reads with this one
    function: the memory store on the ring it holds, the Redis store on the field its
    script returns (the same bytes)."""
    code = op[0]
    if code == "ring_windows":
        return ring_windows(blob, op[2], op[3], op[5:5 + op[4]])
    if code == "ring_values":
        stamps = op[4:4 + op[3]]
        return _values(blob, op[2], stamps) if blob else [0.0] * len(stamps)
    if code == "ring_get":
        held, value = _cell(blob, op[2])
        return value if held == op[3] else 0.0
    _, _, size, lo, hi = op  # ring_sum
    total = 0.0
    if blob:
        for value in _values(blob, size, range(max(lo, hi - size + 1), hi + 1)):
            total += value
    return total


def unpack_ring(blob: bytes) -> bytes:
    """A ring as the memory store holds it, from the Redis field: the same bytes."""
    return bytes(blob)


def ring_of_cells(cells: Iterable[tuple[int, int, float]]) -> bytes | None:
    """A packed ring holding (slot, stamp, value) cells (snapshots of older layouts)."""
    held = {int(slot): (int(stamp), float(value)) for slot, stamp, value in cells}
    return _encode(held) if held else None


@lru_cache(maxsize=8192)
def profile_slot(name: str) -> tuple[str, int, str] | None:
    """(profile, slot, part) of `profile#slot[:part]`, or None for a plain name."""
    if PROFILE_MARK not in name:
        return None
    base, _, rest = name.partition(PROFILE_MARK)
    slot, _, part = rest.partition(":")
    if not slot.isdigit():
        return None
    return base, int(slot), part


_TRIPLE = struct.Struct("<ddd")
_DOUBLE = struct.Struct("<d")
_NAN8 = _DOUBLE.pack(float("nan"))


def profile_get(profile: bytes | None, slot: int) -> tuple[float, float, float]:
    """(n, m, v) of a profile slot; n == 0 when it was never written."""
    off = 24 * slot
    if profile is None or off + 24 > len(profile):
        return 0.0, 0.0, 0.0
    return _TRIPLE.unpack_from(profile, off)


def profile_put(profile: bytes | None, slot: int, n: float, m: float, v: float) -> bytes:
    """The profile with slot `slot` set (the slots before it, if new, unwritten)."""
    off, held = 24 * slot, profile or b""
    if off > len(held):
        held += bytes(off - len(held))
    return b"".join((held[:off], _TRIPLE.pack(n, m, v), held[off + 24:]))


def profile_part(profile: bytes | None, slot: int, part: str) -> float | None:
    """GET of `profile#slot:part` (m, v or n): None when the slot was never written.
    Without a part, the scalar `vector#slot` (`scalar_get`)."""
    if not part:
        return scalar_get(profile, slot)
    off = 24 * slot
    if profile is None or off + 24 > len(profile):
        return None
    n, m, v = _TRIPLE.unpack_from(profile, off)
    if n == 0.0:
        return None
    return m if part == "m" else v if part == "v" else n if part == "n" else None


def scalar_get(vector: bytes | None, slot: int) -> float | None:
    """Slot `slot` of a packed vector of scalars (`name#slot`, no part): None when it was
    never written (NaN marks an unwritten slot)."""
    off = 8 * slot
    if vector is None or off + 8 > len(vector):
        return None
    x = _DOUBLE.unpack_from(vector, off)[0]
    return None if x != x else x


def scalar_put(vector: bytes | None, slot: int, x: float) -> bytes:
    """The vector with slot `slot` set (the slots before it, if new, unwritten)."""
    off, held = 8 * slot, vector or b""
    if off > len(held):
        held += _NAN8 * ((off - len(held)) // 8)
    return b"".join((held[:off], _DOUBLE.pack(x), held[off + 8:]))


def ewm_next(n: float, m: float, v: float, x: float, alpha: float) -> tuple[float, float, float]:
    """One step of an exponentially weighted mean and variance (n counts the steps)."""
    if n == 0.0:
        return 1.0, x, 0.0
    diff = x - m
    incr = alpha * diff
    return n + 1.0, m + incr, (1 - alpha) * (v + diff * incr)


_PAIR = struct.Struct("<dd")


def set_members(blob: bytes | None) -> dict[float, float]:
    """A capped set's {member hash: time}, in the order the field packs them (as the
    script appends a new member and keeps the order when it drops some)."""
    return dict(_PAIR.iter_unpack(blob)) if blob else {}


def set_find(blob: bytes, member: int) -> int:
    """The byte offset of `member`'s (hash, time) pair in a capped set's field, or -1."""
    key = _DOUBLE.pack(member)
    off = blob.find(key)
    while off % 16 and off >= 0:  # a time that happens to hold the same bytes
        off = blob.find(key, off + 1)
    return off


def set_times(blob: bytes) -> tuple[float, ...]:
    """The time of each member of a capped set's field, in order."""
    n = len(blob) // 16
    unpacker = _UNPACKERS.get(("dd", n))
    if unpacker is None:
        unpacker = _UNPACKERS["dd", n] = struct.Struct("<" + "dd" * n)
    return unpacker.unpack(blob)[1::2]


def set_bytes(members: dict[Any, float]) -> bytes:
    """A capped set's field: (member hash, time) doubles per member, in order."""
    return struct.pack(f"<{2 * len(members)}d", *(x for pair in members.items() for x in pair))


@lru_cache(maxsize=65_536)
def member_hash(member: str) -> int:
    """The 48-bit integer a capped set (RECENT_ADD, RECENT_COUNT, SEEN_ADD) keeps for a
    member: exact as a double in Lua, small to store, and the member itself (an address,
    a key id, a user agent) is never stored. BLAKE2b rather than a checksum, so a client
    cannot craft a user agent that passes for one already seen; two members colliding by
    chance is a 1-in-10^14 event per pair."""
    return int.from_bytes(hashlib.blake2b(str(member).encode(), digest_size=6).digest(),
                          "little")


@lru_cache(maxsize=16)
def _sums_struct(n: int) -> struct.Struct:
    return struct.Struct(f"<{n + 1}d")


def decay_add(held: bytes | None, ts: float, half_lives: Sequence[float],
              deltas: Sequence[float]) -> bytes:
    """DECAY_ADD (see `features.stores.base`) on a field of decayed sums: the reference
    time T, then one double per sum. The Lua script computes the same numbers in the same
    order, so both stores hold the same bytes.

    Why packed: every learned event of a key decays and adds its ~130 sums, and printing
    and parsing them as 17-digit text cost ~70 µs an event, more than the arithmetic; the
    text was also 2.4 KB of the key's state, the doubles are 1 KB. Each decay factor is
    computed once per distinct half-life: the very float the script computes per sum."""
    packer = _sums_struct(len(deltas))
    t0, values = 0.0, None
    if held is not None and len(held) == packer.size:
        t0, *values = packer.unpack(held)
    t1 = max(t0, ts)
    old = ({hl: 0.5 ** ((t1 - t0) / hl) for hl in set(half_lives) if hl > 0}
           if values is not None and t1 > t0 else {})
    new = {hl: 0.5 ** ((t1 - ts) / hl) for hl in set(half_lives) if hl > 0} if t1 > ts else {}
    out = []
    for j, d in enumerate(deltas):
        hl = half_lives[j]
        a = values[j] if values is not None and hl >= 0 else 0.0
        b = float(d)
        if hl > 0:
            if hl in old:
                a = a * old[hl]
            if hl in new:
                b = b * new[hl]
        out.append(a + b)
    return packer.pack(t1, *out)


def decayed_sums(held: bytes | None, n: int) -> tuple[float, list[float]] | None:
    """(T, sums) of a DECAY_ADD field holding `n` sums; None when absent or of another
    length."""
    packer = _sums_struct(n)
    if held is None or len(held) != packer.size:
        return None
    t, *values = packer.unpack(held)
    return t, values
