-- Apply keywatch's generic state operations to one entity, atomically.
-- KEYS[1] is the entity hash; KEYS[2..] are its sorted sets, in the order named in ARGV[2].
-- ARGV[1]: ttl seconds. ARGV[2]: JSON [[zset names...], [[code, args...], ...]].
-- Returns an array: the JSON text of one result per op, then the packed ring fields the
-- ring reads refer to. Results are strings (or false for nil, or arrays of them) so that
-- no precision is lost: numbers are formatted with %.17g, never with tostring (which
-- keeps 14 digits) nor cjson's number encoding.
--
-- Layout (see features/stores/packed.py): a ring is ONE hash field packing a 12-byte cell
-- per slot (int32 stamp, double value); an hour-of-week profile (EWM names `p#slot`) is
-- one field `p` packing (n, m, v) doubles per slot. Everything else is a plain field.
-- Why: server time went to per-field work (hundreds of bucket fields and their stamps,
-- each named, fetched, parsed and formatted), and one Redis core serves every replica.
-- So the script does only what must be atomic: it lists every hash field its ops touch,
-- fetches them with ONE HMGET, applies the writes to Lua values, and writes what changed
-- with one HSET. A ring read (RING_GET/SUM/WINDOWS/VALUES, sent as [code, name]) answers
-- with the index of the ring's packed field as it stands at that op, and the client
-- computes the sums from it (`features.stores.packed.ring_read`), off the Redis core.
local h = KEYS[1]
local ttl = tonumber(ARGV[1])
local spec = cjson.decode(ARGV[2])
local zkeys = {}
for j, name in ipairs(spec[1]) do zkeys[name] = KEYS[1 + j] end
local ops = spec[2]
local out = {}

local CELL = 12
local EMPTY = -2147483648
local EMPTY_CELL = struct.pack('<i4d', EMPTY, 0)
local TRIPLE = 24
local SET_PREFIX = 'z|'

local function g17(x) return string.format('%.17g', x) end
local function num(x)
  if type(x) == 'number' then return g17(x) end
  return x
end

-- `base#slot[:part]` names a slot of a packed profile
local function profile_of(name)
  if not string.find(name, '#', 1, true) then return nil end
  local base, slot, part = string.match(name, '^(.-)#(%d+):?(%a*)$')
  if not base then return nil end
  return base, tonumber(slot), part
end

-- refuse an unknown op before anything is applied; list the hash fields the ops touch
local names, wanted = {'_persist', 'ban:until', 'lim:until'}, {}
for _, f in ipairs(names) do wanted[f] = true end
local function need(f)
  local base = profile_of(f)
  if base then f = base end
  if not wanted[f] then
    wanted[f] = true
    names[#names + 1] = f
  end
end
local function need_ewm(name)
  if profile_of(name) then need(name) return end
  need(name .. ':m'); need(name .. ':v'); need(name .. ':n')
end
local LIM = {'lim:rate', 'lim:burst', 'lim:tat', 'lim:tat_e'}
local scan = {
  get = function(op) need(op[2]) end, set = function(op) need(op[2]) end,
  del = function(op) need(op[2]) end, incr = function(op) need(op[2]) end,
  ring_add = function(op) need(op[2]) end, ring_max = function(op) need(op[2]) end,
  ring_get = function(op) need(op[2]) end, ring_sum = function(op) need(op[2]) end,
  ring_windows = function(op) need(op[2]) end, ring_values = function(op) need(op[2]) end,
  ewm = function(op) need_ewm(op[2]) end,
  ewm_gap = function(op) need(op[3]); need_ewm(op[2]) end,
  ewm_same = function(op) need(op[3]); need_ewm(op[2]) end,
  gets = function(op) for j = 1, op[2] do need(op[2 + j]) end end,
  budget_add = function(op) need(op[2]); need(op[2] .. ':p'); need(op[2] .. ':over') end,
  limit = function() for _, f in ipairs(LIM) do need(f) end end,
  recent_add = function(op) need(SET_PREFIX .. op[2]) end,
  recent_count = function(op) need(SET_PREFIX .. op[2]) end,
  seen_add = function(op) need(SET_PREFIX .. op[2]) end,
  zset = function() end, zrem = function() end, zitems = function() end,
  persist = function() end,
}
for _, op in ipairs(ops) do
  local f = scan[op[1]]
  if not f then
    return redis.error_reply('unknown store operation ' .. tostring(op[1]))
  end
  f(op)
end

-- the entity's fields: fetched once, changed in Lua, written back once
local held = {}
do
  local raw = redis.call('HMGET', h, unpack(names))
  for j = 1, #names do held[names[j]] = raw[j] end
end
local dirty, ndirty = {}, 0
local function hget(f) return held[f] or nil end
local function hset(f, v)
  held[f] = v
  if not dirty[f] then dirty[f] = true; ndirty = ndirty + 1 end
end
local function hdel(f)
  if held[f] then hset(f, false) end
end

-- packed profiles: (n, m, v) of slot s, or a slot written
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

-- a field's value as the store answers GET (profile slots: their part, nil when unset)
local function read(f)
  local base, s, part = profile_of(f)
  if not base then return held[f] or false end
  local n, m, v = profile_get(base, s)
  if n == 0 then return false end
  if part == 'm' then return g17(m) elseif part == 'v' then return g17(v)
  elseif part == 'n' then return g17(n) end
  return false
end

-- one EWM step; extra field/value pairs are written too
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
  local n = tonumber(held[name .. ':n'] or '0')
  local m = tonumber(held[name .. ':m'] or '0')
  local v = tonumber(held[name .. ':v'] or '0')
  n, m, v = ewm_next(n, m, v, x, alpha)
  hset(name .. ':m', g17(m)); hset(name .. ':v', g17(v)); hset(name .. ':n', string.format('%d', n))
end

-- packed rings: the (stamp, value) cell of a slot; a write replaces one cell
local function cell(blob, slot)
  local off = slot * CELL
  if not blob or #blob < off + CELL then return EMPTY, 0 end
  return struct.unpack('<i4d', blob, off + 1)
end
local function cell_put(name, slot, stamp, value)
  local blob = held[name] or ''
  local off = slot * CELL
  if #blob < off then blob = blob .. string.rep(EMPTY_CELL, (off - #blob) / CELL) end
  hset(name, blob:sub(1, off) .. struct.pack('<i4d', stamp, value) .. blob:sub(off + CELL + 1))
end
-- packed capped sets (RECENT_ADD, RECENT_COUNT, SEEN_ADD): field `z|name` packs a
-- (member hash, newest time) pair of doubles per member; members come hashed to 48-bit
-- integers by the client, so an address or a key id is never stored in clear
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
local function set_changed(name, st)
  st.dirty = true
  local f = SET_PREFIX .. name
  if not dirty[f] then dirty[f] = true; ndirty = ndirty + 1 end
end
-- add a member, or move its time forward (ZADD GT); true when it is new
local function set_touch(st, m, ts)
  for j = 1, st.n do
    if st.h[j] == m then
      if st.t[j] < ts then st.t[j] = ts end
      return false
    end
  end
  st.n = st.n + 1
  st.h[st.n], st.t[st.n] = m, ts
  return true
end
-- keep the members for which keep(j) holds
local function set_filter(st, keep)
  local h, t, n = {}, {}, 0
  for j = 1, st.n do
    if keep(j) then n = n + 1; h[n] = st.h[j]; t[n] = st.t[j] end
  end
  st.h, st.t, st.n = h, t, n
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
  local flat = {}
  for j = 1, st.n do flat[2 * j - 1] = st.h[j]; flat[2 * j] = st.t[j] end
  if st.n == 0 then return false end
  local f = SFMT[st.n]
  if not f then f = '<' .. string.rep('dd', st.n); SFMT[st.n] = f end
  return struct.pack(f, unpack(flat))
end

-- keep the newest `cap` members; returns the cardinality
local function cap_z(zk, cap)
  local card = redis.call('ZCARD', zk)
  if card > cap then
    redis.call('ZREMRANGEBYRANK', zk, 0, card - cap - 1)
    card = cap
  end
  return card
end

local apply = {}
apply.get = function(op) return read(op[2]) end
apply.gets = function(op)
  local res = {}
  for j = 1, op[2] do res[j] = read(op[2 + j]) end
  return res
end
apply.set = function(op) hset(op[2], num(op[3])) return false end
apply.del = function(op) hdel(op[2]) return false end
apply.incr = function(op)
  local v = g17(tonumber(held[op[2]] or '0') + op[3])
  hset(op[2], v)
  return v
end
apply.ring_add = function(op)
  local name, slot, stamp = op[2], op[3], op[4]
  local st, v = cell(held[name], slot)
  if st > stamp then return false end
  if st ~= stamp then v = 0 end
  v = v + op[5]
  cell_put(name, slot, stamp, v)
  return g17(v)
end
apply.ring_max = function(op)
  local name, slot, stamp = op[2], op[3], op[4]
  local st, v = cell(held[name], slot)
  if st > stamp then return false end
  if st ~= stamp or op[5] > v then  -- a fresh bucket, or a larger value: the bucket holds it
    v = op[5]
    cell_put(name, slot, stamp, v)
  end
  return g17(v)
end
local blobs, blob_at = {}, {}
local function ring_ref(op)
  local blob = held[op[2]] or ''
  local k = blob_at[blob]
  if not k then
    blobs[#blobs + 1] = blob
    k = #blobs
    blob_at[blob] = k
  end
  return k
end
apply.ring_get = ring_ref
apply.ring_sum = ring_ref
apply.ring_windows = ring_ref
apply.ring_values = ring_ref
apply.ewm = function(op) ewm(op[2], op[3], op[4]) return false end
apply.ewm_gap = function(op)
  local name, fld, ts = op[2], op[3], op[4]
  local last = held[fld]
  if not last then
    hset(fld, g17(ts))
  else
    local gap = ts - tonumber(last)
    if gap >= 0 then
      if gap > op[6] then gap = op[6] end
      ewm(name, gap, op[5])
      hset(fld, g17(ts))
    end
  end
  return last or false
end
apply.ewm_same = function(op)
  local name, fld, x = op[2], op[3], tonumber(op[4])
  local last = held[fld]
  if last then
    local same = 0
    if tonumber(last) == x then same = 1 end
    ewm(name, same, op[5])
  end
  hset(fld, g17(x))
  return last or false
end
apply.recent_add = function(op)
  local st, ts = set_of(op[2]), op[4]
  set_touch(st, op[3], ts)
  local cutoff = ts - op[5]
  set_filter(st, function(j) return st.t[j] > cutoff end)
  set_cap(st, op[6])
  set_changed(op[2], st)
  return string.format('%d', st.n)
end
apply.recent_count = function(op)
  local st, cutoff, n = set_of(op[2]), op[3] - op[4], 0
  for j = 1, st.n do if st.t[j] > cutoff then n = n + 1 end end
  return string.format('%d', n)
end
apply.seen_add = function(op)
  local st = set_of(op[2])
  local new = set_touch(st, op[3], op[4])
  set_cap(st, op[5])
  set_changed(op[2], st)
  return new and '1' or '0'
end
apply.zset = function(op)
  local zk = zkeys[op[2]]
  redis.call('ZADD', zk, g17(op[4]), op[3])
  cap_z(zk, op[5])
  return false
end
apply.zrem = function(op)
  return string.format('%d', redis.call('ZREM', zkeys[op[2]], op[3]))
end
apply.zitems = function(op)
  local raw = redis.call('ZREVRANGEBYSCORE', zkeys[op[2]], '+inf', g17(op[3]), 'WITHSCORES',
    'LIMIT', 0, op[4])
  local items = {}
  for j = 1, #raw, 2 do items[#items + 1] = {raw[j], raw[j + 1]} end
  if #items == 0 then return false end
  return items
end
apply.budget_add = function(op)
  -- check-and-increment in one atomic step: exact budgets across replicas
  local name, period, amount, limit = op[2], op[3], op[4], op[5]
  local pf, of = name .. ':p', name .. ':over'
  local total, over = tonumber(held[name] or '0'), tonumber(held[of] or '0')
  if held[pf] and tonumber(held[pf]) > period then
    return {'-1', g17(total), g17(over)}
  end
  if (not held[pf]) or tonumber(held[pf]) < period then
    total, over = 0, 0
    hset(pf, g17(period)); hset(name, '0'); hset(of, '0')
  end
  if total + amount <= limit then
    total = total + amount
    hset(name, g17(total))
    return {'1', g17(total), g17(over)}
  end
  over = over + amount
  hset(of, g17(over))
  return {'0', g17(total), g17(over)}
end
apply.limit = function(op)
  -- the GCRA limit meter, as `gcra` in features/stores/memory.py (wall time)
  local mode, now = op[2], op[3]
  local lim_until, rate = tonumber(held['lim:until'] or '0'), tonumber(held['lim:rate'] or '0')
  if lim_until <= now or rate <= 0 then return {'-1', '0', '0', '0', '0'} end
  local burst = tonumber(held['lim:burst'] or '1')
  local tat, tat_e = tonumber(held['lim:tat'] or '0'), tonumber(held['lim:tat_e'] or '0')
  local interval = 60.0 / rate
  local tol = interval * (math.max(burst, 1) - 1)
  local hv = math.max(tat, tat_e, now)
  local status, retry = 0, 0
  if mode == 'take' then
    if hv - tol <= now then
      status = 1
      hset('lim:tat', g17(hv + interval))
    else
      retry = hv - tol - now
    end
  elseif mode == 'count' then
    local own = math.max(tat_e, now)
    local new_e = math.min(own + interval, math.max(lim_until, now))
    hset('lim:tat_e', g17(new_e))
    if own - tol <= now then status = 1 end
    retry = math.max(0, math.max(tat, new_e, now) - tol - now)
  elseif hv - tol <= now then
    status = 1
  else
    retry = hv - tol - now
  end
  return {string.format('%d', status), g17(retry), g17(rate), g17(lim_until), g17(burst)}
end
apply.persist = function(op)
  if tonumber(op[2]) == 1 then hset('_persist', '1') else hdel('_persist') end
  return false
end

for j, op in ipairs(ops) do out[j] = apply[op[1]](op) end

for name, st in pairs(sets) do
  if st.dirty then held[SET_PREFIX .. name] = set_pack(st) end
end
if ndirty > 0 then
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
  if #writes > 0 then redis.call('HSET', h, unpack(writes)) end
  if #dels > 0 then redis.call('HDEL', h, unpack(dels)) end
end

-- a permanent ban keeps the entity; a ban or a limit keeps it at least until it ends
-- (their ends are wall time), however idle; otherwise the idle TTL
if held['_persist'] == '1' then
  for k = 1, #KEYS do redis.call('PERSIST', KEYS[k]) end
elseif ttl > 0 then
  local t = ttl
  local ban_until, lim_until = held['ban:until'], held['lim:until']
  if ban_until or lim_until then
    local now = tonumber(redis.call('TIME')[1])
    local hold = math.max(tonumber(ban_until or '0') or 0, tonumber(lim_until or '0') or 0)
    local left = math.ceil(math.min(hold - now, 315360000))
    if left > t then t = left end
  end
  for k = 1, #KEYS do redis.call('EXPIRE', KEYS[k], t) end
end
local text = '[]'
if #out > 0 then text = cjson.encode(out) end
return {text, unpack(blobs)}
