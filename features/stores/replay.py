"""How the Redis store splits a request between its script and the client.

Why: one Redis core serves every keywatch replica, and Lua time per op was the ceiling on
events per second (decoding each op into Lua tables, reading bucket after bucket,
formatting every number it answers). So the script only applies the ops that change state
and returns the fields they touch as they were *before*; the client rebuilds that prior
state and runs every op on it with the memory store's own op code (`memory.replay_ops`),
which yields exactly the answers the ops would have had inside the script, in order.
Reads never reach Lua, and each op's answer has one implementation for both stores.

`plan_request` lists, per request, the hash fields to fetch (with how to rebuild each),
and the ops to send: those that change state, in the form the script takes (capped-set
members hashed: `packed.member_hash`). The sorted-set ops of the enforcement indexes
(ZSET, ZREM, ZITEMS) are answered by the script itself.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from features.stores.base import (
    BLOB_PREFIX,
    BUDGET_ADD,
    CLAIM,
    DECAY_ADD,
    DEL,
    EWM,
    EWM_GAP,
    EWM_SAME,
    GET,
    GETS,
    INCR,
    LIMIT,
    LOG_APPEND,
    LOG_READ,
    OP_CODES,
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
    check_blob_fields,
    data_error,
    is_enforcement_field,
)
from features.stores.packed import member_hash, profile_slot, unpack_ring

PLAIN, NUMBER, RING, CAPPED_SET, PROFILE = range(5)
"""How a fetched field is rebuilt: text, a float (as the memory store keeps EWM state and
the EWM_GAP/EWM_SAME fields), a packed ring, a packed capped set, a packed profile."""
SET_PREFIX = "z|"
"""Field of the capped set `name` in the entity hash: `z|name`."""
LIMIT_FIELDS = ("lim:until", "lim:rate", "lim:burst", "lim:tat", "lim:tat_e")
IN_SCRIPT = frozenset((ZSET, ZREM, ZITEMS, CLAIM, REMEMBER, LOG_APPEND, LOG_READ))
"""Ops on sorted sets (enforcement indexes, idempotency claims, logs): the script answers
them itself."""
_CHANGES = frozenset((SET, DEL, INCR, RING_ADD, RING_MAX, EWM, EWM_GAP, EWM_SAME, RECENT_ADD,
                      SEEN_ADD, PERSIST, BUDGET_ADD, DECAY_ADD)) | IN_SCRIPT
_HASHED = frozenset((RECENT_ADD, SEEN_ADD))
_RINGS = frozenset((RING_ADD, RING_MAX, RING_GET, RING_SUM, RING_WINDOWS, RING_VALUES))
_SETS = frozenset((RECENT_ADD, RECENT_COUNT, SEEN_ADD))


def _ewm_fields(name: str, out: dict[str, int]) -> None:
    where = profile_slot(name)
    if where is not None:
        out[where[0]] = PROFILE
        return
    for part in (":m", ":v", ":n"):
        out[name + part] = NUMBER


def _plain(name: str, out: dict[str, int]) -> None:
    where = profile_slot(name)
    if where is not None:
        out[where[0]] = PROFILE
    elif name[:2] == BLOB_PREFIX:  # bytes kept as they are, as a profile's
        out[name] = PROFILE
    elif name not in out:
        out[name] = PLAIN


def _touches(op: tuple[Any, ...], out: dict[str, int]) -> None:
    """Record the fields `op` reads or writes, with how to rebuild them."""
    code = op[0]
    if code in _RINGS:
        out[op[1]] = RING
    elif code in _SETS:
        out[SET_PREFIX + op[1]] = CAPPED_SET
    elif code in (GET, SET, DEL, INCR, DECAY_ADD):
        _plain(op[1], out)
    elif code == GETS:
        for name in op[2:2 + op[1]]:
            _plain(name, out)
    elif code == EWM:
        _ewm_fields(op[1], out)
    elif code in (EWM_GAP, EWM_SAME):
        _ewm_fields(op[1], out)
        where = profile_slot(op[2])
        out[where[0] if where else op[2]] = PROFILE if where else NUMBER
    elif code == BUDGET_ADD:
        for name in (op[1], op[1] + ":p", op[1] + ":over"):
            _plain(name, out)
    elif code == LIMIT:
        for name in LIMIT_FIELDS:
            out[name] = PLAIN
    elif code == PERSIST:
        out[PERSIST_FIELD] = PLAIN


KEEP_FIELDS = (PERSIST_FIELD, "ban:until", "lim:until")
"""Fields the script reads to set the entity's TTL: always fetched."""


Plan = tuple[list[str], list[int], list[Any], int]


def plan_request(ops: Sequence[tuple[Any, ...]]) -> Plan:
    """(fields to fetch, how to rebuild each, ops for the script, how many of the fields,
    first, the script's writes need)."""
    check_blob_fields(ops)
    touched: dict[str, int] = dict.fromkeys(KEEP_FIELDS, PLAIN)
    read_only: dict[str, int] = {}
    sent: list[Any] = []
    for op in ops:
        code = op[0] if op else None
        if code not in OP_CODES:
            raise data_error(f"unknown store operation {code!r}")
        if code in _CHANGES or (code == LIMIT and op[1] != "peek"):
            _touches(op, touched)
            sent.append((code, op[1], member_hash(op[2]), *op[3:]) if code in _HASHED
                        else op)
        else:
            _touches(op, read_only)
    n_written = len(touched)
    for name, kind in read_only.items():
        if name not in touched or kind != PLAIN:
            touched[name] = kind if name not in touched else max(kind, touched[name])
    return list(touched), list(touched.values()), sent, n_written


def rebuild(state: Any, fields: Sequence[str], kinds: Sequence[int],
            values: Sequence[bytes | None]) -> Any:
    """Fill a detached memory-store state (`memory.new_state`) with fetched fields."""
    for name, kind, raw in zip(fields, kinds, values, strict=True):
        if raw is None:
            continue
        if kind == RING:
            state.rings[name] = unpack_ring(raw)
        elif kind == CAPPED_SET:
            state.sets[name[len(SET_PREFIX):]] = bytes(raw)
        elif kind == PROFILE:
            state.profiles[name] = bytes(raw)
        elif is_enforcement_field(name):
            state.enf[name] = raw.decode()
        elif kind == NUMBER:
            state.hash[name] = float(raw)
        else:
            state.hash[name] = raw.decode()
    return state


def _number_text(value: Any) -> bytes:
    """A plain field's value as the script writes it: text as is, numbers with 17
    significant digits (an exact round trip)."""
    if isinstance(value, str):
        return value.encode()
    return f"{value:.17g}".encode()


def pack_field(state: Any, name: str, kind: int) -> bytes | None:
    """The inverse of `rebuild` for one field: its value in the script's layout, from a
    memory-store state (None: the field is absent, or an empty capped set). Rings,
    profiles, vectors and capped sets are held as the very bytes of the Redis field."""
    if kind == RING:
        return state.rings.get(name)
    if kind == CAPPED_SET:
        return state.sets.get(name[len(SET_PREFIX):]) or None
    if kind == PROFILE:
        return state.profiles.get(name)
    value = (state.enf.get(name) if is_enforcement_field(name)
             else state.hash.get(name))
    return None if value is None else _number_text(value)


def written_values(state: Any, plan: Plan) -> dict[str, bytes | None]:
    """Each field the plan's writes touch, packed from the state after the ops."""
    fields, kinds, _, n_written = plan
    return {name: pack_field(state, name, kind)
            for name, kind in zip(fields[:n_written], kinds[:n_written], strict=True)}
