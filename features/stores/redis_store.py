"""The shared store: per-entity state in Redis, one atomic Lua call per entity.

Layout: entity `(kind, id)` lives in the hash `<ns>:{<kind>:<id>}:h` and its sorted sets
`<ns>:{<kind>:<id>}:z:<name>`. The braces are a Redis Cluster hash tag, so an entity's
keys share a slot and its script is legal on a cluster. Every key is given the idle TTL on
every touch, so idle entities expire on their own. All entities of one event go out in a
single pipeline: one network round trip per event. An entity's ops travel as one JSON
argument and its results come back as one JSON string (the script uses Redis' built-in
cjson): encoding ~100 ops as separate arguments and parsing a ~130-item reply cost more
client time than the round trip itself.

The round trip itself is written as raw RESP on a pooled connection (`run_script`):
redis-py's pipeline costs more client time per EVALSHA than packing it by hand, and the
stores that wrap the same script (`once`, `resilient`) share this one path, with its
reload-on-NOSCRIPT.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from importlib import resources
from typing import Any

import orjson
import redis
from redis.exceptions import NoScriptError, ResponseError

from features.stores.base import (
    BUDGET_ADD,
    CLAIM,
    GETS,
    INCR,
    LIMIT,
    LOG_APPEND,
    LOG_READ,
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
    ZITEMS,
    ZREM,
    ZSET,
    EntityOps,
    StateStore,
    StoreError,
)

_ZSET_OPS = frozenset((RECENT_ADD, RECENT_COUNT, SEEN_ADD, ZSET, ZREM, ZITEMS, CLAIM,
                       REMEMBER, LOG_APPEND, LOG_READ))
_FLOAT_OPS = frozenset((INCR, RING_ADD, RING_MAX, RING_GET, RING_SUM))
_LIST_FLOAT_OPS = frozenset((RING_WINDOWS, RING_VALUES, BUDGET_ADD, LIMIT))
_LUA = resources.files("features.stores").joinpath("lua/apply_ops.lua").read_text()
_strict_json: Callable[[Any], str] = json.JSONEncoder(
    ensure_ascii=False, allow_nan=False, separators=(",", ":"), check_circular=False).encode


def _to_json(ops: Any) -> bytes:
    """The ops as compact JSON, by orjson (an event's ops encode ~8x faster than with the
    standard library, byte for byte the same text). orjson writes NaN and infinities as
    null where the standard encoder refuses them: any null is re-encoded strictly, so a
    non-finite number is still an error, never a silent nil in the script."""
    raw = orjson.dumps(ops)
    if b"null" in raw:
        return _strict_json(ops).encode()
    return raw


class LuaScript:
    """A Lua script run by its SHA1; `run_script` loads it when Redis does not know it.

    The SHA1 is computed here, so the first call needs no SCRIPT LOAD round trip of its
    own unless the server has never seen the script (or lost it in a restart).
    """

    __slots__ = ("sha", "text")

    def __init__(self, text: str) -> None:
        self.text = text
        self.sha = hashlib.sha1(text.encode()).hexdigest()


APPLY_OPS = LuaScript(_LUA)


def _bulk(value: str | bytes) -> bytes:
    raw = value.encode() if isinstance(value, str) else value
    return b"$%d\r\n%b\r\n" % (len(raw), raw)


def pack_evalsha(sha: str, keys: Sequence[str], argv: Sequence[str | bytes]) -> bytes:
    """One EVALSHA in RESP, as redis-py would write it, without its per-argument cost."""
    nkeys = str(len(keys)).encode()
    head = b"*%d\r\n$7\r\nEVALSHA\r\n$%d\r\n%b\r\n$%d\r\n%b\r\n" % (
        3 + len(keys) + len(argv), len(sha), sha.encode(), len(nkeys), nkeys)
    return head + b"".join([_bulk(a) for a in keys]) + b"".join([_bulk(a) for a in argv])


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

    def encode(self, req: EntityOps) -> tuple[list[str], list[str | bytes]]:
        """apply_ops' KEYS (the hash, then each sorted set the ops name) and ARGV (the
        TTL and the ops as one JSON text)."""
        prefix = self.entity_prefix(req.kind, req.entity_id)
        znames = list(dict.fromkeys([op[1] for op in req.ops if op[0] in _ZSET_OPS]))
        payload = _to_json([znames, req.ops])
        return ([f"{prefix}:h", *[f"{prefix}:z:{z}" for z in znames]],
                [self._ttl_arg, payload])

    def execute(self, requests: Sequence[EntityOps]) -> list[list[Any]]:
        raw = self.run_script(APPLY_OPS, [self.encode(req) for req in requests])
        return [self._decode(req, res) for req, res in zip(requests, raw, strict=True)]

    def run_script(self, script: LuaScript,
                   calls: Sequence[tuple[Sequence[str], Sequence[str | bytes]]]) -> list[Any]:
        """EVALSHA `script` once per (KEYS, ARGV), all in one round trip; the replies.

        When Redis answers NOSCRIPT (a restart or SCRIPT FLUSH lost the script), the
        script is loaded and exactly the refused calls are sent again: a refused EVALSHA
        ran nothing, and the others must not run twice. Any failure is a `StoreError`.
        """
        packed = [pack_evalsha(script.sha, keys, argv) for keys, argv in calls]
        try:
            replies = self._run_on(self.client, script, packed)
            for reply in replies:
                if isinstance(reply, ResponseError):
                    raise reply
        except redis.RedisError as exc:
            error = StoreError(f"redis store failed: {exc}")
            # a key holding the wrong type (or a value the script cannot read) is bad data,
            # not an outage: retrying the same writes fails the same way for ever
            error.data_error = isinstance(exc, ResponseError) and (  # type: ignore[attr-defined]
                "WRONGTYPE" in str(exc) or "user_script" in str(exc))
            raise error from exc
        return replies

    def _run_on(self, client: redis.Redis, script: LuaScript, packed: list[bytes]) -> list[Any]:
        """One round trip to one server, loading the script if it says NOSCRIPT; the
        replies, errors included (the caller decides what an error means)."""
        replies = self._round_trip(packed, client)
        missing = [i for i, r in enumerate(replies) if isinstance(r, NoScriptError)]
        if missing:
            client.script_load(script.text)
            self.round_trips += 1
            for i, reply in zip(missing, self._round_trip([packed[i] for i in missing], client),
                                strict=True):
                replies[i] = reply
        return replies

    def _round_trip(self, packed: list[bytes], client: redis.Redis | None = None) -> list[Any]:
        """Write the packed commands at once, then read every reply (errors included, so
        the connection stays in step); retried like redis-py retries a pipeline."""
        pool = (client or self.client).connection_pool
        conn = pool.get_connection()
        command = b"".join(packed)
        count = len(packed)

        def send() -> list[Any]:
            conn.send_packed_command([command])
            replies: list[Any] = []
            for _ in range(count):
                try:
                    replies.append(conn.read_response())
                except ResponseError as exc:
                    replies.append(exc)
            return replies

        try:
            self.round_trips += 1
            return conn.retry.call_with_retry(send, lambda _error: conn.disconnect())
        except BaseException:
            conn.disconnect()  # a reply may be left unread: never reuse this socket
            raise
        finally:
            pool.release(conn)

    @staticmethod
    def _decode(req: EntityOps, raw: Any) -> list[Any]:
        values = orjson.loads(raw)
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
            elif code == CLAIM:
                results.append(value)
            elif code == LOG_APPEND:
                results.append(int(value))
            elif code == LOG_READ:
                log_id, head, entries = value
                results.append([log_id or None, int(head),
                                [[int(q), e] for q, e in entries]
                                if isinstance(entries, list) else []])
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
