"""The state-store interface: a tiny, generic operation set applied atomically per entity.

Features are defined once, in Python (`features.extractor`). They need a handful of
primitive updates on per-entity state — time-bucketed counters, "last seen" fields,
distinct members over a window, novelty — and read-backs of the same. Expressing them as
a list of generic operations lets one definition run on any backend: the memory store
applies them with dicts, the Redis store ships the same list to a Lua script, so an event
costs one atomic round trip however many counters it touches.

Entities are `(kind, id)` pairs such as `("k", key_id)` or `("ip", "203.0.113.9")`.
Values read back are strings, or the float held for numeric fields (EWM statistics, the
EWM_GAP/EWM_SAME fields): callers parse what they read with `float()`, which accepts
both. Ring buckets are private to the RING_* ops (not readable with GET), and capped sets
to RECENT_ADD/RECENT_COUNT/SEEN_ADD (they keep member hashes, not members). An EWM named
`name#slot` is slot `slot` of the packed profile `name` (GET `name#slot:m`, `:v`, `:n`
read it), so a 168-slot hour-of-week profile is one field, not 504. How each backend
lays the state out: `features.stores.packed`; how the Redis store splits the work
between its script and the client: `features.stores.replay`.

Adding an op means: its code here, its handler in `memory` (which answers it on both
stores), its fields in `replay._touches`, and, if it changes state, its write in
`lua/apply_ops.lua`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

# Operation codes. Each op is a tuple (code, *args); results come back in the same order.
GET = "get"  # (GET, field) -> str | None
SET = "set"  # (SET, field, value: str) -> None
DEL = "del"  # (DEL, field) -> None
INCR = "incr"  # (INCR, field, amount: float) -> float (new value)
RING_ADD = "ring_add"  # (RING_ADD, name, slot, stamp, amount) -> float | None (None: too late)
RING_MAX = "ring_max"  # (RING_MAX, name, slot, stamp, value) -> float | None (None: too late)
#   as RING_ADD, but the bucket keeps the largest value of its stamp instead of the sum
RING_GET = "ring_get"  # (RING_GET, name, slot, stamp) -> float (0.0 when the slot is stale)
RING_SUM = "ring_sum"  # (RING_SUM, name, size, stamp_lo, stamp_hi) -> float over live slots
EWM = "ewm"  # (EWM, name, x, alpha) -> None; updates name:m, name:v, name:n
RECENT_ADD = "recent_add"  # (RECENT_ADD, zname, member, ts, window_s, cap) -> int distinct
RECENT_COUNT = "recent_count"  # (RECENT_COUNT, zname, ts, window_s) -> int distinct
SEEN_ADD = "seen_add"  # (SEEN_ADD, zname, member, ts, cap) -> int (1 if new, else 0)
# Observations that depend on the previous event, which the client cannot know before its
# single round trip, so the store computes them atomically:
EWM_GAP = "ewm_gap"  # (EWM_GAP, name, field, ts, alpha, max_gap) -> str | None (old field)
#   gap = ts - field; when the field exists and gap >= 0: EWM(name, min(gap, max_gap)) and
#   field := ts. A late event (gap < 0) changes nothing; a first one only sets the field.
EWM_SAME = "ewm_same"  # (EWM_SAME, name, field, x, alpha) -> str | None (old field)
#   when the field exists: EWM(name, 1.0 if x == field else 0.0); always field := x.

# Batched reads, so that an event needs a few dozen ops rather than a hundred (ops are
# variable-length: a count precedes the repeated arguments):
GETS = "gets"  # (GETS, k, field_1, ..., field_k) -> list[str | None]
RING_WINDOWS = "ring_windows"  # (RING_WINDOWS, name, size, stamp, k, n_1, ..., n_k)
#   -> list[float] of 2k: for each n, the sum of the live buckets stamp-n+1..stamp (at most
#   `size` of them, as RING_SUM) and then the edge bucket stamp-n (as RING_GET)
RING_VALUES = "ring_values"  # (RING_VALUES, name, size, k, stamp_1, ..., stamp_k)
#   -> list[float]: each bucket as RING_GET (0.0 when stale)

# Small indexes on "global" entities (active bans, allow-list, audit trail):
ZSET = "zset"  # (ZSET, zname, member, score, cap) -> None; sets the score, keeps the top `cap`
ZREM = "zrem"  # (ZREM, zname, member) -> int (1 if it was there)
ZITEMS = "zitems"  # (ZITEMS, zname, min_score, limit) -> [[member, score], ...] highest first
PERSIST = "persist"  # (PERSIST, 1 | 0) -> None; 1: the entity never idles out (a permanent ban)

# Budgets: a check-and-increment that must be exact across replicas, so the store does it
BUDGET_ADD = "budget_add"  # (BUDGET_ADD, name, period, amount, limit) -> [status, total, over]
#   fields `name` (admitted total), `name:p` (its period), `name:over` (refused total).
#   A newer period resets both totals. Then amount is added to `name` only if the total
#   stays <= limit (status 1); otherwise it is added to `name:over` (status 0). An event
#   of an older, closed period changes nothing (status -1). Exact when amount and limit
#   are integers (callers count micro-dollars), as every number is a double < 2**53.

# Limits (throttles as state): a GCRA meter on the entity's `lim:*` fields, in wall time.
LIMIT = "limit"  # (LIMIT, mode, now) -> [status, retry_after_s, rate_per_min, until, burst]
#   The limit is `lim:rate` calls a minute with a burst of `lim:burst`, active while
#   `lim:until` > now. status -1: no active limit (nothing changes). Two theoretical
#   arrival times are kept: `lim:tat` advanced by admissions (mode "take", the gateway's
#   pre-flight), `lim:tat_e` by served calls reported as events (mode "count"); a call
#   conforms when max(tat, tat_e) - (burst - 1) * interval <= now, so a gateway that both
#   asks and reports is metered once. "take": status 1 and tat advances when the call
#   conforms, else status 0 and retry_after_s says when the next one fits. "count": tat_e
#   advances (capped at `lim:until`), status says whether the call conformed. "peek":
#   status only. Enforcement fields (`ban:*`, `lim:*`) are wall time, never event time.

# Idempotency: an event's id claimed on every entity it touches, in the same atomic call
# as its ops, so a re-sent event changes nothing (see `serving.engine.ingest`):
CLAIM = "claim"  # (CLAIM, zname, token, expires_at, now) -> str | None; FIRST op only
#   forgets claims expired at `now`; when `token` is still claimed, returns its remembered
#   value ("" before REMEMBER) and the request's other ops are NOT applied (results
#   None); otherwise claims it until `expires_at` and returns None.
REMEMBER = "remember"  # (REMEMBER, zname, token, value) -> None; the claimed token's value

# A shared, ordered log (the population model's learning log, `models.population_log`):
LOG_APPEND = "log_append"  # (LOG_APPEND, name, entry: str, cap, new_id) -> int seq
#   appends `entry` with the next sequence number (1, 2, ...), keeps the newest `cap`;
#   the log's id is set to `new_id` by its first append (so a reader can tell two logs apart)
LOG_READ = "log_read"  # (LOG_READ, name, after, limit) -> [id | None, head, [[seq, entry]...]]
#   up to `limit` entries with seq > after, oldest first; head = the last seq appended

# Mergeable decayed sums (a key's streaming detectors, `models.streaming`):
DECAY_ADD = "decay_add"  # (DECAY_ADD, field, ts, half_lives, deltas) -> None
#   the field (named `b|...`, `BLOB_PREFIX`) holds packed doubles T, v1, v2, ...
#   (`packed.decay_add`): sums held at reference time T. With
#   T' = max(T, ts), each v_i becomes v_i * 0.5 ** ((T' - T) / hl_i)
#   + d_i * 0.5 ** ((T' - ts) / hl_i) (hl_i = 0: no decay; hl_i < 0: v_i is replaced by
#   d_i, a value that is not a sum), and T becomes T'. Additions commute, so replicas
#   sending their deltas in any order hold one state. A held vector of another length is
#   replaced by the delta.

BLOB_PREFIX = "b|"
"""A field named `b|name` holds bytes the ops pack themselves (DECAY_ADD's sums,
`packed.decay_add`): kept as they are, like a profile, never decoded as text. DECAY_ADD
writes only such fields, SET never does (GET, GETS and DEL take both kinds)."""


def check_blob_fields(ops: Sequence[tuple[Any, ...]]) -> None:
    """Refuse (a data error) a request that would write packed sums into a text field
    (DECAY_ADD without the `b|` prefix) or text into a packed field (SET with it). Both
    stores call it before applying any op of the request."""
    for op in ops:
        if op and op[0] in (DECAY_ADD, SET) and len(op) > 1 and (
                (str(op[1])[:2] == BLOB_PREFIX) != (op[0] == DECAY_ADD)):
            raise data_error(f"{op[0]} cannot write field {op[1]!r} (see BLOB_PREFIX)")


OP_CODES = (GET, SET, DEL, INCR, RING_ADD, RING_MAX, RING_GET, RING_SUM, EWM,
    RECENT_ADD, RECENT_COUNT, SEEN_ADD, EWM_GAP, EWM_SAME, GETS, RING_WINDOWS, RING_VALUES,
    ZSET, ZREM, ZITEMS, PERSIST, BUDGET_ADD, LIMIT, CLAIM, REMEMBER, LOG_APPEND, LOG_READ,
    DECAY_ADD)
CLAIM_FIELD_PREFIX = "_c:"
"""Hash field `_c:<token>` holds a claimed token's remembered value."""
PERSIST_FIELD = "_persist"

ENFORCEMENT_PREFIXES = ("ban:", "lim:")
"""Hash fields that are enforcement state (bans, offences, limits), not features. The
memory store keeps them apart, never evicted and journaled; see `features.stores.memory`."""
GLOBAL_KIND = "g"
"""Entities of this kind (ban and limit indexes, allow-list, audit) are enforcement state
as a whole."""


def is_enforcement_field(name: Any) -> bool:
    return isinstance(name, str) and name[:4] in ENFORCEMENT_PREFIXES

Op = tuple[Any, ...]


def format_number(value: Any) -> str:
    """How numbers travel to and are stored by every backend: integral floats as
    integers, other floats by `repr` (shortest exact round trip)."""
    if isinstance(value, float):
        if value == int(value) and abs(value) < 1e15:
            return str(int(value))
        return repr(value)
    return str(value)


class StoreError(RuntimeError):
    """The state store failed; no operation of the failing request was applied."""


def data_error(message: str) -> StoreError:
    """A `StoreError` for a request that is wrong in itself (bad data, not an outage):
    retrying it cannot help (`data_error` is set)."""
    error = StoreError(message)
    error.data_error = True  # type: ignore[attr-defined]
    return error


@dataclass(slots=True)
class EntityOps:
    """Operations applied atomically, in order, to one entity's state."""

    kind: str
    entity_id: str
    ops: list[Op] = field(default_factory=list)

    def add(self, *op: Any) -> int:
        """Append an op and return the index of its result."""
        self.ops.append(op)
        return len(self.ops) - 1


class StateStore(ABC):
    """Per-entity state shared by every scorer that uses the same store."""

    name: str = "abstract"

    @abstractmethod
    def execute(self, requests: Sequence[EntityOps]) -> list[list[Any]]:
        """Apply each entity's ops atomically and return their results.

        All requests go in one round trip where the backend has one. Each entity's ops
        are atomic; different entities are independent (they may live on different
        Redis Cluster nodes).
        """

    @abstractmethod
    def ping(self) -> bool:
        """True when the store is reachable."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release connections or files."""

    def describe(self) -> str:
        return self.name
