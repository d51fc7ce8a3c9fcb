"""The Redis store as it was before packed state: the baseline of the state figures.

Kept only for `benchmarks.state_bench`, so that every store figure is a ratio against the
previous design measured in the same run: `apply_ops_v1.lua` kept a hash field and a stamp
field per ring bucket, three fields per hour-of-week slot and a sorted set key per capped
set, computed every read in Lua, and each request was its own script call. Not used by
the product.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import orjson

from features.stores.base import (
    BUDGET_ADD,
    GETS,
    INCR,
    LIMIT,
    RECENT_ADD,
    RECENT_COUNT,
    RING_ADD,
    RING_GET,
    RING_MAX,
    RING_SUM,
    RING_VALUES,
    RING_WINDOWS,
    SEEN_ADD,
    ZITEMS,
    ZREM,
    ZSET,
    EntityOps,
)
from features.stores.redis_store import LuaScript, RedisStore, _to_json

OLD_APPLY_OPS = LuaScript((Path(__file__).parent / "apply_ops_v1.lua").read_text())
_ZSET_OPS = frozenset((RECENT_ADD, RECENT_COUNT, SEEN_ADD, ZSET, ZREM, ZITEMS))
_FLOAT_OPS = frozenset((INCR, RING_ADD, RING_MAX, RING_GET, RING_SUM))
_LIST_FLOAT_OPS = frozenset((RING_WINDOWS, RING_VALUES, BUDGET_ADD, LIMIT))


class OldLayoutRedisStore(RedisStore):
    """`RedisStore` with the previous script, encoding and replies."""

    name = "redis-v1"

    def encode(self, req: EntityOps) -> tuple[list[str], list[str | bytes]]:
        prefix = self.entity_prefix(req.kind, req.entity_id)
        znames = list(dict.fromkeys([op[1] for op in req.ops if op[0] in _ZSET_OPS]))
        return ([f"{prefix}:h", *[f"{prefix}:z:{z}" for z in znames]],
                [self._ttl_arg, _to_json([znames, req.ops])])

    def execute(self, requests: Sequence[EntityOps]) -> list[list[Any]]:
        raw = self.run_script(OLD_APPLY_OPS, [self.encode(req) for req in requests])
        return [_decode(req, res) for req, res in zip(requests, raw, strict=True)]


def _decode(req: EntityOps, raw: Any) -> list[Any]:
    values = orjson.loads(raw)
    if not isinstance(values, list):  # cjson writes an empty table as {}
        values = []
    results: list[Any] = []
    for op, value in zip(req.ops, values, strict=True):
        code = op[0]
        if code == ZITEMS:
            results.append([[m, float(t)] for m, t in value] if isinstance(value, list) else [])
        elif value is False or value is None:
            results.append(None)
        elif code in _FLOAT_OPS:
            results.append(float(value))
        elif code in _ZSET_OPS:
            results.append(int(value))
        elif code in _LIST_FLOAT_OPS:
            results.append(list(map(float, value)) if isinstance(value, list) else [])
        elif code == GETS:
            results.append([None if x is False else x for x in value]
                           if isinstance(value, list) else [])
        else:
            results.append(value)
    return results
