"""The shared store: per-entity state in Redis, one atomic Lua call per entity.

Layout: entity `(kind, id)` lives in the hash `<ns>:{<kind>:<id>}:h` and its sorted sets
`<ns>:{<kind>:<id>}:z:<name>`. The braces are a Redis Cluster hash tag, so an entity's
keys share a slot and its script is legal on a cluster. Every key is given the idle TTL on
every touch, so idle entities expire on their own. All entities of one event go out in a
single pipeline: one network round trip per event. An entity's ops travel as one JSON
argument and its results come back as one JSON string (the script uses Redis' built-in
cjson): encoding ~100 ops as separate arguments and parsing a ~130-item reply cost more
client time than the round trip itself.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from importlib import resources
from typing import Any

import redis

from features.stores.base import (
    BUDGET_ADD,
    GETS,
    INCR,
    RECENT_ADD,
    RECENT_COUNT,
    RING_ADD,
    RING_GET,
    RING_SUM,
    RING_VALUES,
    RING_WINDOWS,
    SEEN_ADD,
    ZITEMS,
    ZREM,
    ZSET,
    EntityOps,
    StateStore,
    StoreError,
)

_ZSET_OPS = frozenset((RECENT_ADD, RECENT_COUNT, SEEN_ADD, ZSET, ZREM, ZITEMS))
_FLOAT_OPS = frozenset((INCR, RING_ADD, RING_GET, RING_SUM))
_LIST_FLOAT_OPS = frozenset((RING_WINDOWS, RING_VALUES, BUDGET_ADD))
_LUA = resources.files("features.stores").joinpath("lua/apply_ops.lua").read_text()




class RedisStore(StateStore):
    """State in a Redis server (or cluster) shared by every keywatch replica.

    Parameters
    ----------
    url:
        A `redis://` or `unix://` URL.
    namespace:
        Prefix of every key, so several deployments can share one Redis.
    idle_ttl_s:
        Seconds after its last touch at which an entity's keys expire.
    timeout_s:
        Socket connect/read timeout; a stalled Redis never hangs a request for longer.
    """

    name = "redis"

    def __init__(
        self,
        url: str,
        *,
        namespace: str = "kw",
        idle_ttl_s: int = 8 * 86400,
        timeout_s: float = 0.5,
        client: redis.Redis | None = None,
    ) -> None:
        self.url = url
        self.namespace = namespace
        self.idle_ttl_s = int(idle_ttl_s)
        self.client = client or redis.Redis.from_url(
            url,
            socket_timeout=timeout_s,
            socket_connect_timeout=timeout_s,
            decode_responses=True,
            health_check_interval=30,
        )
        self._ttl_arg = str(self.idle_ttl_s)
        self._sha: str | None = None
        self.round_trips = 0

    def describe(self) -> str:
        return f"redis ({self._safe_url()})"

    def _safe_url(self) -> str:
        # never show a password from the URL
        if "@" in self.url:
            scheme, _, rest = self.url.partition("://")
            return f"{scheme}://***@{rest.split('@', 1)[1]}"
        return self.url

    def entity_prefix(self, kind: str, entity_id: str) -> str:
        return f"{self.namespace}:{{{kind}:{entity_id}}}"

    def ping(self) -> bool:
        try:
            return bool(self.client.ping())
        except redis.RedisError:
            return False

    def close(self) -> None:
        self.client.close()

    def _encode(self, req: EntityOps) -> list[Any]:
        """EVALSHA arguments: the entity's keys, its TTL and its ops as one JSON text."""
        prefix = self.entity_prefix(req.kind, req.entity_id)
        znames: list[str] = []
        for op in req.ops:
            if op[0] in _ZSET_OPS and op[1] not in znames:
                znames.append(op[1])
        payload = json.dumps([znames, req.ops], ensure_ascii=False, allow_nan=False,
                             separators=(",", ":"))
        return [1 + len(znames), f"{prefix}:h", *(f"{prefix}:z:{z}" for z in znames),
                self._ttl_arg, payload]

    def _encode_split(self, req: EntityOps) -> tuple[list[str], list[str]]:
        """The same arguments as (KEYS, ARGV), for scripts that wrap apply_ops."""
        enc = self._encode(req)
        n = int(enc[0])
        return [str(k) for k in enc[1:1 + n]], [str(a) for a in enc[1 + n:]]

    def execute(self, requests: Sequence[EntityOps]) -> list[list[Any]]:
        encoded = [self._encode(req) for req in requests]
        try:
            try:
                raw = self._send(encoded)
            except redis.exceptions.NoScriptError:
                # Redis restarted or flushed its script cache: load once and resend.
                # Nothing was applied: EVALSHA of an unknown script runs nothing.
                self._sha = None
                raw = self._send(encoded)
        except redis.RedisError as exc:
            raise StoreError(f"redis store failed: {exc}") from exc
        return [self._decode(req, res) for req, res in zip(requests, raw, strict=True)]

    def _send(self, encoded: list[list[Any]]) -> list[Any]:
        if self._sha is None:
            self._sha = self.client.script_load(_LUA)
            self.round_trips += 1
        pipe = self.client.pipeline(transaction=False)
        for args in encoded:
            pipe.execute_command("EVALSHA", self._sha, *args)
        self.round_trips += 1
        return pipe.execute()

    @staticmethod
    def _decode(req: EntityOps, raw: Any) -> list[Any]:
        values = json.loads(raw)
        if not isinstance(values, list):  # cjson writes an empty table as {}
            values = []
        results: list[Any] = []
        for op, value in zip(req.ops, values, strict=True):
            code = op[0]
            if code == ZITEMS:
                results.append([[m, float(t)] for m, t in value]
                               if isinstance(value, list) else [])
            elif value is False or value is None:
                results.append(None)
            elif code in _FLOAT_OPS:
                results.append(float(value))
            elif code in _ZSET_OPS:
                results.append(int(value))
            elif code in _LIST_FLOAT_OPS:
                results.append([float(x) for x in value] if isinstance(value, list) else [])
            elif code == GETS:
                results.append([None if x is False else x for x in value]
                                if isinstance(value, list) else [])
            else:
                results.append(value)
        return results
