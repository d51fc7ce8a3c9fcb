"""A Redis store whose writes can be applied at most once per token, for the stream worker.

Why: the stream worker delivers at least once — an event whose worker died after the
state update but before the decision was published is delivered again to another worker.
Scoring it again must neither count it twice nor decide it from different numbers. Inside
`with store.once(token):` every entity request is sent through a wrapper of the same Lua
script (`lua/apply_ops.lua`, unchanged, wrapped as a function) that first looks for a
result cached under `<entity prefix>:once:<digest>`, where the digest covers the token and
the request's ops. On the first call it applies the ops and caches the script's reply (the
fields as they were before, from which the client computes every result) in the same
atomic script call; on a repeat it applies nothing and returns the cached reply.
So a re-scored event reads back exactly what it read the first time, and its decision is
the same.

A call computed on the store's copy of its entity (the fast path, `RedisStore`) sends its
results with it, and the wrapper caches those (with the sorted-set ops' answers) instead
of a reply holding the fields before the ops, which the fast path never reads: a worker
then costs the Redis core what a service's call does, not a full application of the ops
in Lua for every call. A repeat answers from the cache whichever path the first took.

The cache keys live in the entity's hash-tag slot (legal on a cluster), expire after
`once_ttl_s`, and the worker deletes them once the decision is published.

Outside a `once` scope the store behaves exactly like `RedisStore`.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from features.stores.base import LIMIT, LOG_APPEND, LOG_READ, EntityOps
from features.stores.lua_wrap import wrap_apply_ops
from features.stores.redis_store import (
    LocalResult,
    LuaScript,
    RedisStore,
    fill_sorted_set_results,
)
from features.stores.replay import IN_SCRIPT, Plan, plan_request
from features.stores.results_codec import decode_results, encode_results

ONCE_LUA = wrap_apply_ops("""
local n = #KEYS
local once_key = KEYS[n]
local cached = redis.call('GET', once_key)
if cached then return {'~', cmsgpack.unpack(cached)} end
local inner_keys, inner_argv = {}, {}
for k = 1, n - 1 do inner_keys[k] = KEYS[k] end
for k = 1, #ARGV - 2 do inner_argv[k] = ARGV[k] end
local out = apply_ops(inner_keys, inner_argv)
if type(out) == 'table' and out.err then return out end
local kept = out
if out == '=' then kept = {'=', ARGV[#ARGV - 1], ''}
elseif out[1] == '=' then kept = {'=', ARGV[#ARGV - 1], out[2]} end
redis.call('SET', once_key, cmsgpack.pack(kept), 'EX', tonumber(ARGV[#ARGV]))
return out
""")
"""apply_ops.lua as a function, plus: KEYS[last] = the once key; ARGV[last - 1] = the
results the client computed (when it sent the call's fast path), ARGV[last] = the key's
TTL. A repeat answers ['~', what was kept]: the script's reply, or ['=', the client's
results, the sorted-set ops' answers] when the first call took the fast path."""
ONCE = LuaScript(ONCE_LUA)


class OnceRedisStore(RedisStore):
    """`RedisStore` plus `once(token)`: idempotent, result-caching writes per token.

    Not meant to be shared between threads while a `once` scope is open (the stream
    worker scores one event at a time).
    """

    def __init__(self, url: str, *, once_ttl_s: int = 86_400, **kwargs: Any) -> None:
        super().__init__(url, **kwargs)
        self.once_ttl_s = int(once_ttl_s)
        self._token: str | None = None
        self._once_keys: list[str] = []

    @contextmanager
    def once(self, token: str) -> Iterator[list[str]]:
        """Scope in which every write is applied at most once for `token`.

        Yields the list of cache keys used, which the caller may delete when the work
        protected by the token is durably done.
        """
        if self._token is not None:
            raise RuntimeError("once scopes do not nest")
        self._token, self._once_keys = token, []
        try:
            yield self._once_keys
        finally:
            self._token = None

    def once_key(self, req: EntityOps, token: str) -> str:
        """The cache key of a request under `token`: a digest of the token and the ops.
        What differs between the worker that first scored the event and one scoring it
        again is left out: the clock a limit is metered at (`LIMIT`'s `now`, the server's
        time), a log read's position (where this process' population model stands; the
        cached read is handed back, so the event is scored from the same numbers) and a
        log append's writer id."""
        ops = [op[:2] if op and op[0] in (LIMIT, LOG_READ)
               else op[:4] if op and op[0] == LOG_APPEND else op for op in req.ops]
        digest = hashlib.sha256(
            json.dumps([token, ops], default=str, separators=(",", ":")).encode()
        ).hexdigest()[:32]
        return f"{self.entity_prefix(req.kind, req.entity_id)}:once:{digest}"

    def execute(self, requests: Sequence[EntityOps]) -> list[list[Any]]:
        token = self._token
        if token is None:
            return super().execute(requests)
        plans = [plan_request(req.ops) for req in requests]
        tokens = [self.cache.new_token() for _ in requests]
        computed = self._compute_all(list(requests), plans, tokens)
        blobs = [_results_blob(local) for local in computed]
        locals_ = [local if blob else None for local, blob in zip(computed, blobs, strict=True)]
        calls = []
        for req, plan, local, blob, call_token in zip(requests, plans, locals_, blobs, tokens,
                                                      strict=True):
            keys, argv = self._encode(req, plan, local, call_token)
            key = self.once_key(req, token)
            self._once_keys.append(key)
            calls.append(([*keys, key], [*argv, blob, str(self.once_ttl_s)]))
        raw = self.run_script(ONCE, calls)
        return [self._answer(*call)
                for call in zip(requests, raw, plans, locals_, tokens, strict=True)]

    def _answer(self, req: EntityOps, raw: Any, plan: Plan, local: LocalResult | None,
                token: bytes) -> list[Any]:
        """A first application settles like any call (the copy follows it); a repeat
        answers what the first application answered, and leaves the copy alone."""
        if not (isinstance(raw, list) and raw and raw[0] == b"~"):
            return self._settle(req, raw, plan, local, token)
        kept = raw[1]
        if kept[0] != b"=":
            return self._decode(req, kept, plan)
        results = decode_results(kept[1])
        if kept[2]:
            in_script = [i for i, op in enumerate(req.ops) if op[0] in IN_SCRIPT]
            fill_sorted_set_results(req, results, in_script, kept[2])
        return results


def _results_blob(local: LocalResult | None) -> bytes:
    """A computed call's results encoded for the once cache; b"" when there are none, or
    when they hold a value the encoding does not keep (the call is then applied in the
    script, whose reply is kept)."""
    if local is None:
        return b""
    try:
        return encode_results(local.results)
    except TypeError:
        return b""
