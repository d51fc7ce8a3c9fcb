"""Wrap the generic-ops Lua script as a function, so a guard can run around it atomically.

Why: exactly-once replays (outage spool) and at-most-once re-scoring (stream worker) need
a check and a mark in the *same* atomic call as the state update itself. Rather than
copying `lua/apply_ops.lua` (and forgetting to follow the ops added to it later), the
script text is embedded unchanged as `local function apply_ops(KEYS, ARGV) ... end` and a
small guard is appended. The script reads only its `KEYS`/`ARGV` parameters and ends with
`return reply`, so the wrapped function behaves exactly like the script.
"""

from __future__ import annotations

from importlib import resources

APPLY_OPS_LUA = resources.files("features.stores").joinpath("lua/apply_ops.lua").read_text()


def wrap_apply_ops(guard: str) -> str:
    """`apply_ops` as a local function, followed by the guard's Lua text."""
    return "local function apply_ops(KEYS, ARGV)\n" + APPLY_OPS_LUA + "\nend\n" + guard


REPLAY_GUARD = wrap_apply_ops("""
-- ARGV[last-2] = mark field, ARGV[last-1] = expected mark (-1: none), ARGV[last] = seq
local na = #ARGV
local field, expect, seq = ARGV[na - 2], tonumber(ARGV[na - 1]), tonumber(ARGV[na])
local h = KEYS[1]
local cur = tonumber(redis.call('HGET', h, field) or '-1')
if cur >= seq then return 0 end
if cur ~= expect then
  return redis.error_reply('KWCHAIN an earlier spooled write of this entity is missing')
end
local inner = {}
for k = 1, na - 3 do inner[k] = ARGV[k] end
local out = apply_ops(KEYS, inner)
if type(out) == 'table' and out.err then return out end
-- the mark is a write of the hash like any other: it gets a new version token (`_v`,
-- the request's own, inner[3]), so a replica's held copy of the entity, which may hold
-- the mark, is not trusted past it even when the ops themselves changed nothing
redis.call('HSET', h, field, ARGV[na], '_v', inner[3])
local ttl = tonumber(inner[1])
if ttl > 0 then redis.call('EXPIRE', h, ttl) end
return 1
""")
"""Apply a spooled entity request once, and only after its predecessor on that entity.

The entity hash field `field` holds the seq of the last spooled request applied. A
request whose seq is not above it was applied already (skip); one whose expected
predecessor is not the last applied is refused, so a failure earlier in a pipeline
stops the later writes of the same entity instead of letting them jump the queue."""
