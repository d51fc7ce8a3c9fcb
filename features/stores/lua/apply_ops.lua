-- Apply the writes of keywatch's generic state operations to one entity, atomically,
-- and return the entity's fields as they were before.
-- KEYS[1] is the entity hash; KEYS[2..] are its sorted sets (the enforcement indexes),
-- in the order named in the spec.
-- ARGV[1]: ttl seconds. ARGV[2]: the version token the client's cached copy of the
-- entity was written at, when the client computed this call on it ('' otherwise).
-- ARGV[3]: the token this call writes ('/s' appended when the ops were applied here, so
-- a later call of the round trip, computed on the copy as this call would have left it,
-- is applied here too). ARGV[4], ARGV[5]: w and d. ARGV[6]: '1' when the
-- fast path must refresh the TTL (the client knows when it last did, and when a ban, a
-- limit or a permanent ban changed). Then w (field, new value) pairs and d fields to
-- delete: the client's own result of the ops on its copy. ARGV[7 + 2w + d]: the fast
-- path's sorted-set ops, JSON [[zset names...], [[code, args...]...]] ('' for none): they
-- run here either way (a CLAIM first, so a repeat applies nothing). ARGV[8 + 2w + d]:
-- the spec, JSON
-- [[zset names...], n, [[code, args...]...], [fields...]]: the ops that change state (and
-- ZITEMS), and the hash fields the request touches, the n that those ops read or write
-- first (with `_persist`, `ban:until`, `lim:until`).
-- Returns '=' (or ['=', the JSON text of its sorted-set ops' results]) when the entity is
-- still at the client's token: the client's writes were applied as given, and nothing
-- else ran but the sorted-set ops (the fast path). Otherwise the ops are applied
-- here, and the reply is [the JSON text of the sorted-set ops' results (ZSET, ZREM,
-- ZITEMS, CLAIM, REMEMBER, LOG_APPEND, LOG_READ, in order), [the value each listed field
-- held before the ops (nil when absent)], the token the entity was at before (nil when
-- none)];
-- or, when the first op claims a token still claimed, ['!', the value remembered for it]
-- and nothing is applied.
--
-- Why: one Redis core serves every replica, so it does only what must be atomic. A
-- replica that wrote the entity last holds it already, so it computes the ops' results
-- and the new fields itself and Redis only checks the token and stores them (each write
-- sets a new random token in `_v`, so a copy is current exactly when its token is). Any
-- other call sends the ops: they are applied here, and the client computes every result
-- from the fields as they were before with the memory store's code
-- (features/stores/redis_store.py): one implementation of each op's answer, and no
-- reads, sums or number formatting here.
-- Layout (features/stores/packed.py): a ring is ONE field packing its cells (sparse while
-- it has few, then a cell per slot, stamps as 16-bit offsets from an epoch, values as
-- floats while exact); a profile (EWM names `p#slot`) one field `p` packing
-- (n, m, v) doubles per slot; a capped set one field `z|name` packing (member hash,
-- newest time) doubles per member. Everything else is a plain field, numbers as %.17g.
local h = KEYS[1]
local ttl = tonumber(ARGV[1])
local VERSION = '_v'
local function g17(x) return string.format('%.17g', x) end
local zkeys = {}

-- keep the newest `cap` members of a sorted set
local function cap_z(zk, cap)
  local card = redis.call('ZCARD', zk)
  if card > cap then redis.call('ZREMRANGEBYRANK', zk, 0, card - cap - 1) end
end

-- a shared ordered log: a sorted set of "seq|entry" scored by seq, `name:id`, `name:seq`
local function log_append(op)
  local name, zk = op[2], zkeys[op[2]]
  redis.call('HSETNX', h, name .. ':id', op[5])
  local seq = redis.call('HINCRBY', h, name .. ':seq', 1)
  redis.call('ZADD', zk, seq, string.format('%d', seq) .. '|' .. op[3])
  cap_z(zk, op[4])
  return string.format('%d', seq)
end
local function log_read(op)
  local name = op[2]
  local ids = redis.call('HMGET', h, name .. ':id', name .. ':seq')
  local raw = redis.call('ZRANGEBYSCORE', zkeys[name], '(' .. string.format('%d', op[3]),
    '+inf', 'LIMIT', 0, op[4])
  local entries = {}
  for j = 1, #raw do
    local bar = string.find(raw[j], '|', 1, true)
    entries[j] = {string.sub(raw[j], 1, bar - 1), string.sub(raw[j], bar + 1)}
  end
  if #entries == 0 then entries = false end
  return {ids[1] or false, ids[2] or '0', entries}
end

-- CLAIM (a request's first op): forget the claims expired at `now` (and what they
-- remembered), then the value remembered for `token` when it is still claimed (a repeat:
-- the caller applies nothing of the call), else claim it and return nil. The remembered
-- values live in `_c:<token>` fields that no request reads, so no copy holds them and
-- neither path changes the version token for them (features/stores/entity_cache.py).
local function claim(op)
  local zk, token = zkeys[op[2]], op[3]
  local old = redis.call('ZRANGEBYSCORE', zk, '-inf', g17(op[5]), 'LIMIT', 0, 64)
  if #old > 0 then
    local names = {}
    for j = 1, #old do names[j] = '_c:' .. old[j] end
    redis.call('HDEL', h, unpack(names))
    redis.call('ZREM', zk, unpack(old))
  end
  if redis.call('ZSCORE', zk, token) then
    return redis.call('HGET', h, '_c:' .. token) or ''
  end
  redis.call('ZADD', zk, g17(op[4]), token)
  return nil
end

-- the sorted-set ops that either path runs here, CLAIM (done first, see above) and
-- REMEMBER included: their result, false for none
local function sorted_set_op(op)
  local code = op[1]
  if code == 'claim' then
    return false
  elseif code == 'remember' then
    if redis.call('ZSCORE', zkeys[op[2]], op[3]) then
      redis.call('HSET', h, '_c:' .. op[3], op[4])
    end
    return false
  elseif code == 'zset' then
    local zk = zkeys[op[2]]
    redis.call('ZADD', zk, g17(op[4]), op[3])
    cap_z(zk, op[5])
    return false
  elseif code == 'log_append' then
    return log_append(op)
  elseif code == 'log_read' then
    return log_read(op)
  elseif code == 'zrem' then
    return string.format('%d', redis.call('ZREM', zkeys[op[2]], op[3]))
  end
  local raw = redis.call('ZREVRANGEBYSCORE', zkeys[op[2]], '+inf', g17(op[3]), 'WITHSCORES',
    'LIMIT', 0, op[4])  -- zitems
  local items = {}
  for j = 1, #raw, 2 do items[#items + 1] = {raw[j], raw[j + 1]} end
  if #items == 0 then return false end
  return items
end


-- a permanent ban keeps the entity; a ban or a limit keeps it at least until it ends
-- (their ends are wall time), however idle; otherwise the idle TTL
local function keep_alive(persist, ban_until, lim_until)
  if persist == '1' then
    for k = 1, #KEYS do redis.call('PERSIST', KEYS[k]) end
    return
  end
  if ttl <= 0 then return end
  local t = ttl
  if ban_until or lim_until then
    local now = tonumber(redis.call('TIME')[1])
    local hold = math.max(tonumber(ban_until or '0') or 0, tonumber(lim_until or '0') or 0)
    local left = math.ceil(math.min(hold - now, 315360000))
    if left > t then t = left end
  end
  for k = 1, #KEYS do redis.call('EXPIRE', KEYS[k], t) end
end

local n_pairs, n_dels = tonumber(ARGV[4]), tonumber(ARGV[5])
local spec_at = 7 + 2 * n_pairs + n_dels  -- the fast path's sorted-set ops; then the spec
local current = redis.call('HGET', h, VERSION)
if ARGV[2] ~= '' and current == ARGV[2] then
  -- the fast path: the client computed this call on the entity as it is
  local zspec = false
  if ARGV[spec_at] ~= '' then
    zspec = cjson.decode(ARGV[spec_at])
    for j, name in ipairs(zspec[1]) do zkeys[name] = KEYS[1 + j] end
    local first = zspec[2][1]
    if first and first[1] == 'claim' then  -- a repeat applies nothing of the call
      local remembered = claim(first)
      if remembered then return {'!', remembered} end
    end
  end
  if n_pairs + n_dels > 0 then
    redis.call('HSET', h, VERSION, ARGV[3], unpack(ARGV, 7, 6 + 2 * n_pairs))
  end
  if n_dels > 0 then redis.call('HDEL', h, unpack(ARGV, 7 + 2 * n_pairs, spec_at - 1)) end
  if ARGV[6] == '1' then
    local keep = redis.call('HMGET', h, '_persist', 'ban:until', 'lim:until')
    keep_alive(keep[1], keep[2], keep[3])
  end
  if not zspec then return '=' end
  local zout = {}
  for j, op in ipairs(zspec[2]) do zout[j] = sorted_set_op(op) end
  return {'=', cjson.encode(zout)}
end

local spec = cjson.decode(ARGV[spec_at + 1])
for j, name in ipairs(spec[1]) do zkeys[name] = KEYS[1 + j] end
local n_written, ops, fields = spec[2], spec[3], spec[4]

local CELL = 12
local EMPTY = -2147483648
local EMPTY_CELL = struct.pack('<i4d', EMPTY, 0)
local TRIPLE = 24
local SET_PREFIX = 'z|'


-- refuse an unknown op before anything is applied
local known = {set = 1, del = 1, incr = 1, ring_add = 1, ring_max = 1, ewm = 1, ewm_gap = 1,
  ewm_same = 1, recent_add = 1, seen_add = 1, zset = 1, zrem = 1, zitems = 1, persist = 1,
  budget_add = 1, limit = 1, claim = 1, remember = 1, log_append = 1, log_read = 1,
  decay_add = 1}
for _, op in ipairs(ops) do
  if not known[op[1]] then
    return redis.error_reply('unknown store operation ' .. tostring(op[1]))
  end
end

-- an idempotency claim (first op only): a token still claimed applies nothing, and the
-- reply is {'!', what was remembered for it}
local first = ops[1]
if first and first[1] == 'claim' then
  local remembered = claim(first)
  if remembered then return {'!', remembered} end
end

-- the entity's fields: fetched once, those the writes need held in Lua, written back once
local held, before = {}, redis.call('HMGET', h, unpack(fields))
for j = 1, n_written do held[fields[j]] = before[j] end
local dirty = {}
local function hset(f, v) held[f] = v; dirty[f] = true end

-- `base#slot` names a slot of a packed profile
local function profile_of(name)
  if not string.find(name, '#', 1, true) then return nil end
  local base, slot = string.match(name, '^(.-)#(%d+)$')
  if not base then return nil end
  return base, tonumber(slot)
end
local function profile_get(base, s)
  local blob = held[base]
  local off = s * TRIPLE
  if not blob or #blob < off + TRIPLE then return 0, 0, 0 end
  return struct.unpack('<ddd', blob, off + 1)
end
local function profile_put(base, s, n, m, v)
  local blob = held[base] or ''
  local off = s * TRIPLE
  if #blob < off then blob = blob .. string.rep('\0', off - #blob) end
  hset(base, blob:sub(1, off) .. struct.pack('<ddd', n, m, v) .. blob:sub(off + TRIPLE + 1))
end

-- `base#slot` with no part is one double of the packed vector `base` (NaN: unwritten);
-- a plain name is a plain field holding a number
local NAN8 = '\0\0\0\0\0\0\248\127'
local function number_get(f)
  local base, s = profile_of(f)
  if not base then return tonumber(held[f]) end
  local blob, off = held[base], s * 8
  if not blob or #blob < off + 8 then return nil end
  local x = struct.unpack('<d', blob, off + 1)
  if x ~= x then return nil end
  return x
end
local function number_put(f, x)
  local base, s = profile_of(f)
  if not base then hset(f, g17(x)) return end
  local blob, off = held[base] or '', s * 8
  if #blob < off then blob = blob .. string.rep(NAN8, (off - #blob) / 8) end
  hset(base, blob:sub(1, off) .. struct.pack('<d', x) .. blob:sub(off + 9))
end

-- one step of an exponentially weighted mean and variance
local function ewm_next(n, m, v, x, alpha)
  if n == 0 then return 1, x, 0 end
  local diff = x - m
  local incr = alpha * diff
  return n + 1, m + incr, (1 - alpha) * (v + diff * incr)
end
local function ewm(name, x, alpha)
  local base, s = profile_of(name)
  if base then
    local n, m, v = profile_get(base, s)
    profile_put(base, s, ewm_next(n, m, v, x, alpha))
    return
  end
  local n, m, v = ewm_next(tonumber(held[name .. ':n'] or '0'), tonumber(held[name .. ':m'] or '0'),
    tonumber(held[name .. ':v'] or '0'), x, alpha)
  hset(name .. ':m', g17(m)); hset(name .. ':v', g17(v)); hset(name .. ':n', string.format('%d', n))
end

-- packed rings (features/stores/packed.py holds the same code, and says why). A tag
-- byte, an int32 epoch, then the cells, with stamps as offsets k = stamp - epoch + 1 in
-- one byte while they span less than 255 buckets, else two: sparse while a ring has at
-- most SPARSE_MAX cells, (uint16 slot, k, value) each, then dense, (k, value) per slot up
-- to the highest written, k = 0 for an empty slot; values floats while every one is
-- exact as one, else doubles. A zero byte pads the field to an odd length. A ring whose
-- stamps span more than 16 bits takes the wide forms: 'S' then (uint16 slot, int32
-- stamp, double) cells, or (even length) an (int32 stamp, double) per slot.
local SPARSE_MAX, MAX_K = 8, 65535
local RING_FMT = {
  a = {sparse = true, fmt = '<HHf', size = 8, max_k = MAX_K, f32 = true},
  b = {sparse = true, fmt = '<HHd', size = 12, max_k = MAX_K},
  c = {fmt = '<Hf', size = 6, max_k = MAX_K, f32 = true},
  d = {fmt = '<Hd', size = 10, max_k = MAX_K},
  e = {sparse = true, fmt = '<HBf', size = 7, max_k = 255, f32 = true},
  f = {sparse = true, fmt = '<HBd', size = 11, max_k = 255},
  g = {fmt = '<Bf', size = 5, max_k = 255, f32 = true},
  h = {fmt = '<Bd', size = 9, max_k = 255},
  S = {sparse = true, hdr = 1, fmt = '<Hi4d', size = 14},
}
local WIDE = {hdr = 0, fmt = '<i4d', size = 12, empty = EMPTY_CELL}
for _, f in pairs(RING_FMT) do
  f.off = f.max_k ~= nil
  if f.off then
    f.hdr = 5
    if not f.sparse then f.empty = struct.pack(f.fmt, 0, 0) end
  end
end
-- the tag of (sparse, float values, one-byte offsets)
local function ring_tag(sparse, narrow, short)
  local j = 1
  if not sparse then j = j + 2 end
  if not narrow then j = j + 1 end
  if short then j = j + 4 end
  return string.sub('abcdefgh', j, j)
end
local function ring_fmt(blob)
  if #blob % 2 == 0 then return WIDE end
  return RING_FMT[string.sub(blob, 1, 1)]
end
-- the end of the last whole cell (before the padding byte)
local function ring_end(blob, f) return #blob - (#blob - f.hdr) % f.size end
local function padded(blob, f)
  if f.off and #blob % 2 == 0 then return blob .. '\0' end
  return blob
end
local function fits32(x) return struct.unpack('<f', struct.pack('<f', x)) == x end
-- stamp = k + base
local function ring_base(blob, f)
  if f.off then return struct.unpack('<i4', blob, 2) - 1 end
  return 0
end
-- (stamp, value) of a slot's cell; (EMPTY, 0) when it has none
local function cell(blob, slot)
  if not blob then return EMPTY, 0 end
  local f = ring_fmt(blob)
  local base, stop = ring_base(blob, f), ring_end(blob, f)
  if f.sparse then
    for off = f.hdr + 1, stop, f.size do
      local s, st, v = struct.unpack(f.fmt, blob, off)
      if s == slot then return st + base, v end
    end
    return EMPTY, 0
  end
  local off = f.hdr + slot * f.size
  if stop < off + f.size then return EMPTY, 0 end
  local st, v = struct.unpack(f.fmt, blob, off + 1)
  if f.off and st == 0 then return EMPTY, 0 end
  return st + base, v
end
-- every written cell: cells[slot] = {stamp, value}, and the slots
local function ring_cells(blob)
  local cells, slots, j = {}, {}, 0
  local f = ring_fmt(blob)
  local base = ring_base(blob, f)
  for off = f.hdr + 1, ring_end(blob, f), f.size do
    local s, st, v
    if f.sparse then s, st, v = struct.unpack(f.fmt, blob, off)
    else s = j; st, v = struct.unpack(f.fmt, blob, off) end
    j = j + 1
    if f.sparse or (f.off and st ~= 0) or ((not f.off) and st ~= EMPTY) then
      cells[s] = {st + base, v}
      slots[#slots + 1] = s
    end
  end
  return cells, slots
end
-- the canonical packing of a ring's cells (packed.py `_encode`)
local function ring_encode(cells, slots)
  table.sort(slots)
  local n, lo, hi, narrow = #slots, math.huge, -math.huge, true
  for _, s in ipairs(slots) do
    local st = cells[s][1]
    if st < lo then lo = st end
    if st > hi then hi = st end
    if narrow and not fits32(cells[s][2]) then narrow = false end
  end
  local sparse = n <= SPARSE_MAX
  local f, parts, base
  if hi - lo >= MAX_K then
    if sparse then f, parts = RING_FMT.S, {'S'} else f, parts = WIDE, {} end
    base = 0
  else
    local tag = ring_tag(sparse, narrow, hi - lo < 255)
    f, parts, base = RING_FMT[tag], {tag .. struct.pack('<i4', lo)}, lo - 1
  end
  if f.sparse then
    for _, s in ipairs(slots) do
      parts[#parts + 1] = struct.pack(f.fmt, s, cells[s][1] - base, cells[s][2])
    end
  else
    for s = 0, slots[n] do
      local c = cells[s]
      if c then parts[#parts + 1] = struct.pack(f.fmt, c[1] - base, c[2])
      else parts[#parts + 1] = f.empty end
    end
  end
  return padded(table.concat(parts), f)
end
-- set a slot's cell: in place when the ring's format holds it, else packed afresh
local function cell_put(name, slot, stamp, value)
  local blob = held[name]
  if blob then
    local f = ring_fmt(blob)
    local k, fits = stamp, true
    if f.off then
      k = stamp - ring_base(blob, f)
      fits = k >= 1 and k <= f.max_k and ((not f.f32) or fits32(value))
    end
    local stop = ring_end(blob, f)
    if fits and not f.sparse then
      local off = f.hdr + slot * f.size
      if stop <= off then
        blob = blob:sub(1, stop) .. string.rep(f.empty, (off - stop) / f.size)
        hset(name, padded(blob .. struct.pack(f.fmt, k, value), f))
      else
        hset(name, blob:sub(1, off) .. struct.pack(f.fmt, k, value) .. blob:sub(off + f.size + 1))
      end
      return
    elseif fits then
      for off = f.hdr + 1, stop, f.size do
        if struct.unpack('<H', blob, off) == slot then
          hset(name, blob:sub(1, off - 1) .. struct.pack(f.fmt, slot, k, value) .. blob:sub(off + f.size))
          return
        end
      end
      if (stop - f.hdr) / f.size < SPARSE_MAX then
        hset(name, padded(blob:sub(1, stop) .. struct.pack(f.fmt, slot, k, value), f))
        return
      end
    end
  end
  local cells, slots = {}, {}
  if blob then cells, slots = ring_cells(blob) end
  if not cells[slot] then slots[#slots + 1] = slot end
  cells[slot] = {stamp, value}
  hset(name, ring_encode(cells, slots))
end

-- packed capped sets, unpacked once per call into member hashes and times
local sets, SFMT = {}, {}
local function set_of(name)
  local st = sets[name]
  if st then return st end
  st = {h = {}, t = {}, n = 0}
  local blob = held[SET_PREFIX .. name]
  if blob and #blob >= 16 then
    local n = math.floor(#blob / 16)
    local f = SFMT[n]
    if not f then f = '<' .. string.rep('dd', n); SFMT[n] = f end
    local flat = {struct.unpack(f, blob)}
    for j = 1, n do st.h[j] = flat[2 * j - 1]; st.t[j] = flat[2 * j] end
    st.n = n
  end
  sets[name] = st
  return st
end
-- add a member, or move its time forward (as ZADD GT)
local function set_touch(st, m, ts)
  for j = 1, st.n do
    if st.h[j] == m then
      if st.t[j] < ts then st.t[j] = ts end
      return
    end
  end
  st.n = st.n + 1
  st.h[st.n], st.t[st.n] = m, ts
end
local function set_filter(st, keep)
  local hs, ts, n = {}, {}, 0
  for j = 1, st.n do
    if keep(j) then n = n + 1; hs[n] = st.h[j]; ts[n] = st.t[j] end
  end
  st.h, st.t, st.n = hs, ts, n
end
-- keep the newest `cap` members (the oldest go first, ties by member)
local function set_cap(st, cap)
  if st.n <= cap then return end
  local order = {}
  for j = 1, st.n do order[j] = j end
  table.sort(order, function(a, b)
    if st.t[a] ~= st.t[b] then return st.t[a] < st.t[b] end
    return st.h[a] < st.h[b]
  end)
  local drop = {}
  for j = 1, st.n - cap do drop[order[j]] = true end
  set_filter(st, function(j) return not drop[j] end)
end
local function set_pack(st)
  if st.n == 0 then return false end
  local flat = {}
  for j = 1, st.n do flat[2 * j - 1] = st.h[j]; flat[2 * j] = st.t[j] end
  local f = SFMT[st.n]
  if not f then f = '<' .. string.rep('dd', st.n); SFMT[st.n] = f end
  return struct.pack(f, unpack(flat))
end

-- mergeable decayed sums, packed doubles (T, v1, ...): both decayed to max(T, ts), then
-- added; a decay factor is computed once per half-life (the float features.stores.packed
-- computes), so both stores hold the same bytes
local DFMT = {}
local function decay_add(op)
  local ts, hl, d = tonumber(op[3]), op[4], op[5]
  local f = DFMT[#d]
  if not f then f = '<' .. string.rep('d', #d + 1); DFMT[#d] = f end
  local cur, t0, v = held[op[2]], 0, nil
  if cur and #cur == 8 * (#d + 1) then
    v = {struct.unpack(f, cur)}
    t0 = v[1]
  end
  local t1 = math.max(t0, ts)
  local old, new = {}, {}
  local parts = {}
  for j = 1, #d do
    local a, b, hj = 0, d[j], hl[j]
    if v and hj >= 0 then a = v[j + 1] end
    if hj > 0 then
      if v and t1 > t0 then
        if not old[hj] then old[hj] = 0.5 ^ ((t1 - t0) / hj) end
        a = a * old[hj]
      end
      if t1 > ts then
        if not new[hj] then new[hj] = 0.5 ^ ((t1 - ts) / hj) end
        b = b * new[hj]
      end
    end
    parts[j] = a + b
  end
  hset(op[2], struct.pack(f, t1, unpack(parts)))
end

local zout = {}
for _, op in ipairs(ops) do
  local code = op[1]
  if code == 'ring_add' then
    local name, slot, stamp = op[2], op[3], op[4]
    local st, v = cell(held[name], slot)
    if st <= stamp then
      if st ~= stamp then v = 0 end
      cell_put(name, slot, stamp, v + op[5])
    end
  elseif code == 'ring_max' then
    local name, slot, stamp = op[2], op[3], op[4]
    local st, v = cell(held[name], slot)
    if st < stamp or (st == stamp and op[5] > v) then cell_put(name, slot, stamp, op[5]) end
  elseif code == 'ewm' then
    ewm(op[2], op[3], op[4])
  elseif code == 'ewm_gap' then
    local fld, ts = op[3], op[4]
    local last = number_get(fld)
    if not last then
      number_put(fld, ts)
    else
      local gap = ts - last
      if gap >= 0 then
        if gap > op[6] then gap = op[6] end
        ewm(op[2], gap, op[5])
        number_put(fld, ts)
      end
    end
  elseif code == 'ewm_same' then
    local fld, x = op[3], tonumber(op[4])
    local last = number_get(fld)
    if last then
      local same = 0
      if last == x then same = 1 end
      ewm(op[2], same, op[5])
    end
    number_put(fld, x)
  elseif code == 'recent_add' then
    local st, ts = set_of(op[2]), op[4]
    set_touch(st, op[3], ts)
    local cutoff = ts - op[5]
    set_filter(st, function(j) return st.t[j] > cutoff end)
    set_cap(st, op[6])
    st.dirty = true
  elseif code == 'seen_add' then
    local st = set_of(op[2])
    set_touch(st, op[3], op[4])
    set_cap(st, op[5])
    st.dirty = true
  elseif code == 'set' then
    local v = op[3]
    if type(v) == 'number' then v = g17(v) end
    hset(op[2], v)
  elseif code == 'del' then
    if held[op[2]] then hset(op[2], false) end
  elseif code == 'incr' then
    number_put(op[2], (number_get(op[2]) or 0) + op[3])
  elseif code == 'budget_add' then
    -- check-and-increment in one atomic step: exact budgets across replicas
    local name, period, amount, limit = op[2], op[3], op[4], op[5]
    local pf, of = name .. ':p', name .. ':over'
    if not (held[pf] and tonumber(held[pf]) > period) then
      local total, over = tonumber(held[name] or '0'), tonumber(held[of] or '0')
      if (not held[pf]) or tonumber(held[pf]) < period then
        total, over = 0, 0
        hset(pf, g17(period)); hset(name, '0'); hset(of, '0')
      end
      if total + amount <= limit then hset(name, g17(total + amount))
      else hset(of, g17(over + amount)) end
    end
  elseif code == 'limit' then
    -- the GCRA limit meter, as `gcra` in features/stores/memory.py (wall time)
    local mode, now = op[2], op[3]
    local lim_until, rate = tonumber(held['lim:until'] or '0'), tonumber(held['lim:rate'] or '0')
    if lim_until > now and rate > 0 then
      local burst = tonumber(held['lim:burst'] or '1')
      local tat, tat_e = tonumber(held['lim:tat'] or '0'), tonumber(held['lim:tat_e'] or '0')
      local interval = 60.0 / rate
      local tol = interval * (math.max(burst, 1) - 1)
      local hv = math.max(tat, tat_e, now)
      if mode == 'take' and hv - tol <= now then
        hset('lim:tat', g17(hv + interval))
      elseif mode == 'count' then
        local own = math.max(tat_e, now)
        hset('lim:tat_e', g17(math.min(own + interval, math.max(lim_until, now))))
      end
    end
  elseif code == 'persist' then
    if tonumber(op[2]) == 1 then hset('_persist', '1')
    elseif held['_persist'] then hset('_persist', false) end
  elseif code == 'decay_add' then
    decay_add(op)
  else  -- zset, zrem, zitems, claim, remember, log_append, log_read
    zout[#zout + 1] = sorted_set_op(op)
  end
end

for name, st in pairs(sets) do
  if st.dirty then hset(SET_PREFIX .. name, set_pack(st)) end
end
local writes, dels = {}, {}
for f in pairs(dirty) do
  local v = held[f]
  if v then
    writes[#writes + 1] = f
    writes[#writes + 1] = v
  else
    dels[#dels + 1] = f
  end
end
if #writes > 0 or #dels > 0 then  -- a new state: a new token, marked as the slow path's
  writes[#writes + 1] = VERSION
  writes[#writes + 1] = ARGV[3] .. '/s'
  redis.call('HSET', h, unpack(writes))
end
if #dels > 0 then redis.call('HDEL', h, unpack(dels)) end

keep_alive(held['_persist'], held['ban:until'], held['lim:until'])
local reply = {'[]', before, current}
if #zout > 0 then reply[1] = cjson.encode(zout) end
return reply
