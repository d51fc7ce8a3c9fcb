"""The shared store: per-entity state in Redis, one atomic Lua call per entity.

Layout: entity `(kind, id)` lives in the hash `<ns>:{<kind>:<id>}:h` (its rings, profile
and capped sets packed into fields of it: `features.stores.packed`), and the enforcement
indexes in sorted sets `<ns>:{<kind>:<id>}:z:<name>`. The braces are a Redis Cluster hash
tag, so an entity's keys share a slot and its script is legal on a cluster. Every key is
given the idle TTL on every touch, so idle entities expire on their own. All entities of
one event go out in a single pipeline: one network round trip per event, and one script
call per entity (the requests of one entity in a batch, such as the previous event's
learning and this event's counters on the population, are merged in order). The script
applies the writes and returns the touched fields as they were; this client answers
every op from them with the memory store's code (`features.stores.replay`), so reads,
sums and number formatting never run on the one Redis core every replica shares. An
entity's request travels as one JSON argument (the script uses Redis' built-in cjson):
encoding ~100 ops as separate arguments cost more client time than the round trip.

The round trip itself is written as raw RESP on a pooled connection (`run_script`):
redis-py's pipeline costs more client time per EVALSHA than packing it by hand, and the
stores that wrap the same script (`once`, `resilient`) share this one path, with its
reload-on-NOSCRIPT.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib import resources
from typing import Any

import orjson
import redis
from redis.exceptions import NoScriptError, ResponseError

from features.stores.base import (
    CLAIM,
    LOG_APPEND,
    LOG_READ,
    ZITEMS,
    ZREM,
    ZSET,
    EntityOps,
    StateStore,
    StoreError,
)
from features.stores.entity_cache import CachedEntity, EntityCache
from features.stores.memory import new_state, replay_ops
from features.stores.replay import (
    IN_SCRIPT,
    KEEP_FIELDS,
    Plan,
    plan_request,
    rebuild,
    written_values,
)

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
SLOW_PATH_SUFFIX = b"/s"
"""What the script appends to a call's token when it applied the ops itself (the entity
was not at the client's token): the token a computed call writes differs from it."""
_CREATES_KEYS = frozenset((ZSET, LOG_APPEND, CLAIM))
"""In-script ops that may create a sorted-set key, which must then be given its TTL."""


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
    cache_mb:
        Budget of the copies of the entities this replica wrote last
        (`features.stores.entity_cache`); 0 sends every call's ops to Redis.
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
        cache_mb: float = 64.0,
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
        # the script's replies carry packed binary fields: read them undecoded
        self._raw_pool = (raw_pool(self.client) if isinstance(self.client, redis.Redis)
                          else None)  # a cluster keeps one per node
        self._ttl_arg = str(self.idle_ttl_s)
        self.round_trips = 0
        self.cache = EntityCache(int(cache_mb * 2**20))
        self._keep_every = self.idle_ttl_s / 64
        """A call computed here refreshes the idle TTL when this many seconds passed since
        the entity's last refresh (or when a ban, a limit or a permanent ban changed): an
        idle entity expires between 63/64 of its TTL and its TTL after its last use."""

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
        if self._raw_pool is not None:
            self._raw_pool.disconnect()

    def encode(self, req: EntityOps) -> tuple[list[str], list[str | bytes]]:
        """apply_ops' KEYS (the hash, then each sorted set the ops name) and ARGV (the
        TTL, no cached copy, a new token, and one JSON text: sorted-set names, the ops
        that change state, the fields to fetch; see `features.stores.replay`)."""
        return self._encode(req, plan_request(req.ops), None, self.cache.new_token())

    def _encode(self, req: EntityOps, plan: Plan, local: LocalResult | None,
                token: bytes) -> tuple[list[str], list[str | bytes]]:
        prefix = self.entity_prefix(req.kind, req.entity_id)
        fields, _, sent, n_written = plan
        znames = list(dict.fromkeys([op[1] for op in sent if op[0] in IN_SCRIPT]))
        payload = _to_json([znames, n_written, sent, fields])
        keys = [f"{prefix}:h", *[f"{prefix}:z:{z}" for z in znames]]
        if local is None:
            return keys, [self._ttl_arg, b"", token, b"0", b"0", b"1", b"", payload]
        pairs = [x for name, value in local.changed.items() if value is not None
                 for x in (name, value)]
        dels = [name for name, value in local.changed.items() if value is None]
        zspec = (_to_json([znames, [req.ops[i] for i in local.in_script]])
                 if local.in_script else b"")
        return keys, [self._ttl_arg, local.token, token, str(len(pairs) // 2),
                      str(len(dels)), b"1" if local.keep else b"0", *pairs, *dels, zspec,
                      payload]

    def execute(self, requests: Sequence[EntityOps]) -> list[list[Any]]:
        merged, parts = merge_by_entity(requests)
        plans = [plan_request(req.ops) for req in merged]
        tokens = [self.cache.new_token() for _ in merged]
        locals_ = self._compute_all(merged, plans, tokens)
        raw = self.run_script(APPLY_OPS, [
            self._encode(req, plan, local, token)
            for req, plan, local, token in zip(merged, plans, locals_, tokens, strict=True)])
        results = [self._settle(*call) for call in zip(merged, raw, plans, locals_, tokens,
                                                       strict=True)]
        if len(merged) == len(requests):
            return results
        return [results[m][start:start + len(req.ops)]
                for req, (m, start) in zip(requests, parts, strict=True)]

    def _compute_all(self, merged: list[EntityOps], plans: list[Plan],
                     tokens: list[bytes]) -> list[LocalResult | None]:
        """Each call computed on the held copy where it can be. An entity with two calls
        in the round trip (a claim is a call of its own) has its later call computed on
        the copy as the earlier call leaves it, at the token that call writes: the
        script runs them in order, so the later one is not refused for a token its own
        predecessor moved."""
        if not self.cache.max_bytes:
            return [None] * len(merged)
        keys = [(req.kind, req.entity_id) for req in merged]
        if len(set(keys)) == len(keys):
            return [self._compute_locally(req, plan, self.cache.get(key))
                    for req, plan, key in zip(merged, plans, keys, strict=True)]
        out: list[LocalResult | None] = []
        ahead: dict[tuple[str, str], CachedEntity | None] = {}
        for req, plan, key, token in zip(merged, plans, keys, tokens, strict=True):
            entry = ahead[key] if key in ahead else self.cache.get(key)
            local = self._compute_locally(req, plan, entry)
            out.append(local)
            ahead[key] = None if local is None or entry is None else CachedEntity(
                token if local.changed else local.token, {**entry.raw, **local.changed},
                kept=entry.kept)
        return out

    def _compute_locally(self, req: EntityOps, plan: Plan,
                         entry: CachedEntity | None) -> LocalResult | None:
        """The request's results and changed fields computed on `entry`, the held copy
        of the entity, when it holds every field the request touches."""
        fields, kinds, _, _ = plan
        if entry is None or not entry.holds(fields):
            return None
        raw = entry.raw
        state = rebuild(new_state(), fields, kinds, [raw[name] for name in fields])
        in_script = [i for i, op in enumerate(req.ops) if op[0] in IN_SCRIPT]
        results = replay_ops(state, req.ops, dict.fromkeys(in_script))
        changed = {name: value for name, value in written_values(state, plan).items()
                   if value != raw[name]}
        keep = (time.monotonic() - entry.kept > self._keep_every
                or not changed.keys().isdisjoint(KEEP_FIELDS)
                or any(req.ops[i][0] in _CREATES_KEYS for i in in_script))
        return LocalResult(entry.token, results, changed, keep, in_script)

    def _settle(self, req: EntityOps, raw: Any, plan: Plan, local: LocalResult | None,
                token: bytes) -> list[Any]:
        """The request's results from the script's reply, and the held copy brought to
        the entity's new token."""
        key = (req.kind, req.entity_id)
        if raw == b"=" or raw[0] == b"=":  # the copy was current: Redis stored what was
            self.cache.hits += 1  # computed here, and ran the sorted-set ops
            assert local is not None
            self.cache.put(key, token if local.changed else local.token, local.changed,
                           merge=True, kept=local.keep)
            if local.in_script:
                fill_sorted_set_results(req, local.results, local.in_script, raw[1])
            return local.results
        self.cache.misses += 1
        if raw[0] == b"!":  # a token still claimed (CLAIM): nothing was applied
            return self._decode(req, raw, plan)
        results, state = self._decode_state(req, raw, plan)
        values: dict[str, bytes | None] = dict(zip(plan[0], raw[1], strict=True))
        after = written_values(state, plan)
        wrote = any(value != values[name] for name, value in after.items())
        values.update(after)
        current = raw[2] if len(raw) > 2 else None
        held = self.cache.get(key)
        self.cache.put(key, token + SLOW_PATH_SUFFIX if wrote else current, values,
                       merge=held is not None and held.token == current, kept=True)
        return results

    def run_script(self, script: LuaScript,
                   calls: Sequence[tuple[Sequence[str], Sequence[str | bytes]]]) -> list[Any]:
        """EVALSHA `script` once per (KEYS, ARGV), all in one round trip; the replies.

        When Redis answers NOSCRIPT (a restart or SCRIPT FLUSH lost the script), the
        script is loaded and exactly the refused calls are sent again: a refused EVALSHA
        ran nothing, and the others must not run twice. Any failure is a `StoreError`.
        """
        packed = [pack_evalsha(script.sha, keys, argv) for keys, argv in calls]
        try:
            replies = self._run_on(self.client, self._raw_pool, script, packed)
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

    def _run_on(self, client: redis.Redis, pool: redis.ConnectionPool, script: LuaScript,
                packed: list[bytes]) -> list[Any]:
        """One round trip to one server (`pool`: raw replies; `client`: the same server,
        to load the script if it says NOSCRIPT); the replies, errors included (the
        caller decides what an error means)."""
        replies = self._round_trip(packed, pool)
        missing = [i for i, r in enumerate(replies) if isinstance(r, NoScriptError)]
        if missing:
            client.script_load(script.text)
            self.round_trips += 1
            for i, reply in zip(missing, self._round_trip([packed[i] for i in missing], pool),
                                strict=True):
                replies[i] = reply
        return replies

    def _round_trip(self, packed: list[bytes], pool: redis.ConnectionPool) -> list[Any]:
        """Write the packed commands at once, then read every reply (errors included, so
        the connection stays in step); retried like redis-py retries a pipeline."""
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
    def _decode(req: EntityOps, raw: Any,
                plan: Plan | None = None) -> list[Any]:
        """Results of `req` from the script's reply: [JSON text of the sorted-set ops'
        results, [each fetched field as it was before the ops], the entity's token]; the
        other ops are answered by replaying them on those fields
        (`features.stores.replay`)."""
        if raw[0] == b"!":  # a token still claimed (CLAIM): nothing was applied
            return [raw[1].decode(), *([None] * (len(req.ops) - 1))]
        return RedisStore._decode_state(req, raw, plan)[0]

    @staticmethod
    def _decode_state(req: EntityOps, raw: Any, plan: Plan | None = None) -> tuple[list[Any],
                                                                                   Any]:
        """(results, the entity's state after the ops) from an applied call's reply."""
        fields, kinds, _, _ = plan if plan is not None else plan_request(req.ops)
        zres = orjson.loads(raw[0])
        given: dict[int, Any] = {}
        if zres:
            at = iter(zres)
            for i, op in enumerate(req.ops):
                if op[0] in IN_SCRIPT:
                    given[i] = sorted_set_result(op[0], next(at))
        state = rebuild(new_state(), fields, kinds, raw[1])
        return replay_ops(state, req.ops, given), state


@dataclass(slots=True)
class LocalResult:
    """A request computed on the held copy of its entity: the copy's token, the results,
    and the fields whose value changed (None: deleted)."""

    token: bytes
    results: list[Any]
    changed: dict[str, bytes | None]
    keep: bool
    """Whether the call refreshes the entity's TTL (see `RedisStore._keep_every`)."""
    in_script: list[int]
    """The sorted-set ops (by index), which the script answers on the fast path too."""


def fill_sorted_set_results(req: EntityOps, results: list[Any], indices: list[int],
                            answers: bytes) -> None:
    """Put the script's answers (JSON, in op order) to the request's sorted-set ops at
    `indices` into the results computed on the copy."""
    for i, value in zip(indices, orjson.loads(answers), strict=True):
        results[i] = sorted_set_result(req.ops[i][0], value)


def sorted_set_result(code: str, value: Any) -> Any:
    """An op answered by the script itself, as the memory store answers it."""
    if code == ZITEMS:
        return [[m, float(t)] for m, t in value] if isinstance(value, list) else []
    if code in (ZREM, LOG_APPEND):
        return int(value)
    if code == LOG_READ:
        log_id, head, entries = value
        return [log_id or None, int(head),
                [[int(q), e] for q, e in entries] if isinstance(entries, list) else []]
    return None  # ZSET, CLAIM (applied), REMEMBER


def raw_pool(client: redis.Redis) -> redis.ConnectionPool:
    """A pool to the same server as `client` whose replies are bytes, not text (the
    script's replies and packed ring fields are binary)."""
    pool = client.connection_pool
    kwargs = {**pool.connection_kwargs, "decode_responses": False}
    return redis.ConnectionPool(connection_class=pool.connection_class, **kwargs)


def merge_by_entity(requests: Sequence[EntityOps]) -> tuple[list[EntityOps],
                                                            list[tuple[int, int]]]:
    """One request per entity, its ops in the order given (entities are independent, so
    only the order within one entity matters), and where each original request's results
    start: (merged index, offset). A script call has a fixed cost on the Redis core.
    A request that opens with CLAIM is a call of its own: a repeated claim applies
    nothing of its call, so no other request may share it."""
    index: dict[tuple[str, str], int] = {}
    merged: list[EntityOps] = []
    copied: set[int] = set()
    parts: list[tuple[int, int]] = []
    for req in requests:
        key = (req.kind, req.entity_id)
        m = index.get(key)
        if req.ops and req.ops[0][0] == CLAIM:
            index.pop(key, None)  # later requests of the entity go after it, apart
            parts.append((len(merged), 0))
            merged.append(req)
            continue
        if m is None:
            index[key] = len(merged)
            parts.append((len(merged), 0))
            merged.append(req)
            continue
        if m not in copied:  # never extend a caller's request in place
            copied.add(m)
            merged[m] = EntityOps(req.kind, req.entity_id, list(merged[m].ops))
        parts.append((m, len(merged[m].ops)))
        merged[m].ops.extend(req.ops)
    return merged, parts
