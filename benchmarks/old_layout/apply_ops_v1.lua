-- Apply keywatch's generic state operations to one entity, atomically.
-- KEYS[1] is the entity hash; KEYS[2..] are its sorted sets, in the order named in ARGV[2].
-- ARGV[1]: ttl seconds. ARGV[2]: JSON [[zset names...], [[code, args...], ...]].
-- Returns JSON: one result per op. Results are strings (or false for nil, or arrays of
-- them) so that no precision is lost: numbers are formatted with %.17g, never with
-- tostring (which keeps 14 digits) nor cjson's number encoding.
-- JSON in and out (rather than one ARGV per argument and a RESP array back) keeps the
-- client's encoding and parsing to one C call each: ~100 ops per event stay cheap.
-- Server time goes to per-field work (an event touches hundreds of hash fields, mostly
-- ring buckets: building each name, HMGET, tonumber, %.17g), not to the ~90 redis.calls:
-- a version that loaded every field with one HMGET into a Lua table and wrote back with
-- one HSET made half the calls and was no faster, its bookkeeping costing what the
-- calls saved. So ring reads fetch a bucket's value only when its stamp is live. Packing
-- each ring's buckets into a few JSON fields measured ~10% faster than one field per
-- bucket, but is a layout change that existing state would need migrating to.
local h = KEYS[1]
local ttl = tonumber(ARGV[1])
local spec = cjson.decode(ARGV[2])
local zkeys = {}
for j, name in ipairs(spec[1]) do zkeys[name] = KEYS[1 + j] end
local ops = spec[2]
local out = {}

local function num(x)
  if type(x) == 'number' then return string.format('%.17g', x) end
  return x
end

-- one EWM step on name:m / name:v / name:n; `n, m, v` are the held strings (or false);
-- extra field/value pairs are written in the same HSET
local function ewm_step(name, x, alpha, n, m, v, ...)
  n = tonumber(n or '0')
  if n == 0 then
    m = x
    v = 0
  else
    m = tonumber(m)
    v = tonumber(v)
    local diff = x - m
    local incr = alpha * diff
    m = m + incr
    v = (1 - alpha) * (v + diff * incr)
  end
  redis.call('HSET', h, name .. ':m', string.format('%.17g', m),
    name .. ':v', string.format('%.17g', v), name .. ':n', string.format('%d', n + 1), ...)
end

local function ewm(name, x, alpha)
  local held = redis.call('HMGET', h, name .. ':n', name .. ':m', name .. ':v')
  ewm_step(name, x, alpha, held[1], held[2], held[3])
end

-- bucket values of ring `name` at the given stamps (0 when the slot holds another stamp).
-- The stamps are read first and only the live buckets' values after: a ring is mostly
-- stale or empty slots (a key quiet for hours, an address seen once), and every field
-- read costs far more than the second HMGET.
local function ring_buckets(name, size, stamps)
  local prefix = name .. ':'
  local slots, stamp_fields = {}, {}
  for j = 1, #stamps do
    local slot = string.format('%d', stamps[j] % size)
    slots[j] = slot
    stamp_fields[j] = prefix .. slot .. ':t'
  end
  local held = redis.call('HMGET', h, unpack(stamp_fields))
  local vals, live, at = {}, {}, {}
  for j = 1, #stamps do
    vals[j] = 0
    if held[j] and tonumber(held[j]) == stamps[j] then
      live[#live + 1] = prefix .. slots[j]
      at[#at + 1] = j
    end
  end
  if #live > 0 then
    local raw = redis.call('HMGET', h, unpack(live))
    for k = 1, #live do vals[at[k]] = tonumber(raw[k] or '0') end
  end
  return vals
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

-- refuse an unknown op before anything is applied
local known = {get = 1, set = 1, del = 1, incr = 1, ring_add = 1, ring_max = 1, ring_get = 1,
  ring_sum = 1, ewm = 1, recent_add = 1, recent_count = 1, seen_add = 1, ewm_gap = 1, ewm_same = 1,
  gets = 1, ring_windows = 1, ring_values = 1, zset = 1, zrem = 1, zitems = 1, persist = 1,
  budget_add = 1, limit = 1}
for _, op in ipairs(ops) do
  if not known[op[1]] then
    return redis.error_reply('unknown store operation ' .. tostring(op[1]))
  end
end

for _, op in ipairs(ops) do
  local code = op[1]
  if code == 'get' then
    out[#out + 1] = redis.call('HGET', h, op[2])
  elseif code == 'set' then
    redis.call('HSET', h, op[2], num(op[3]))
    out[#out + 1] = false
  elseif code == 'del' then
    redis.call('HDEL', h, op[2])
    out[#out + 1] = false
  elseif code == 'incr' then
    out[#out + 1] = redis.call('HINCRBYFLOAT', h, op[2], num(op[3]))
  elseif code == 'ring_add' then
    local vf = op[2] .. ':' .. string.format('%d', op[3])
    local tf = vf .. ':t'
    local stamp = op[4]
    local held = redis.call('HGET', h, tf)
    if held and tonumber(held) > stamp then
      out[#out + 1] = false
    elseif held and tonumber(held) == stamp then
      out[#out + 1] = redis.call('HINCRBYFLOAT', h, vf, num(op[5]))
    else  -- a fresh bucket: its value is the amount
      local amount = num(op[5])
      redis.call('HSET', h, tf, string.format('%d', stamp), vf, amount)
      out[#out + 1] = amount
    end
  elseif code == 'ring_max' then
    local vf = op[2] .. ':' .. string.format('%d', op[3])
    local tf = vf .. ':t'
    local stamp = op[4]
    local held = redis.call('HMGET', h, tf, vf)
    if held[1] and tonumber(held[1]) > stamp then
      out[#out + 1] = false
    elseif held[1] and tonumber(held[1]) == stamp and tonumber(held[2] or '0') >= op[5] then
      out[#out + 1] = held[2]
    else  -- a fresh bucket, or a larger value: the bucket holds it
      local value = num(op[5])
      redis.call('HSET', h, tf, string.format('%d', stamp), vf, value)
      out[#out + 1] = value
    end
  elseif code == 'ring_get' then
    local vf = op[2] .. ':' .. string.format('%d', op[3])
    local raw = redis.call('HMGET', h, vf .. ':t', vf)
    if raw[1] and tonumber(raw[1]) == op[4] then
      out[#out + 1] = raw[2] or '0'
    else
      out[#out + 1] = '0'
    end
  elseif code == 'ring_sum' then
    local size, lo, hi = op[3], op[4], op[5]
    if lo < hi - size + 1 then lo = hi - size + 1 end
    local stamps = {}
    for stamp = lo, hi do stamps[#stamps + 1] = stamp end
    local total = 0
    if #stamps > 0 then
      local vals = ring_buckets(op[2], size, stamps)
      for j = 1, #vals do total = total + vals[j] end
    end
    out[#out + 1] = string.format('%.17g', total)
  elseif code == 'ewm' then
    ewm(op[2], op[3], op[4])
    out[#out + 1] = false
  elseif code == 'recent_add' then
    local zk = zkeys[op[2]]
    local ts = op[4]
    redis.call('ZADD', zk, 'GT', ts, op[3])
    redis.call('ZREMRANGEBYSCORE', zk, '-inf', ts - op[5])
    out[#out + 1] = string.format('%d', cap_z(zk, op[6]))
  elseif code == 'recent_count' then
    local cutoff = string.format('%.17g', op[3] - op[4])
    out[#out + 1] = string.format('%d', redis.call('ZCOUNT', zkeys[op[2]], '(' .. cutoff, '+inf'))
  elseif code == 'seen_add' then
    local zk = zkeys[op[2]]
    -- ZADD without CH counts only new members: 1 when the member is new
    local added = redis.call('ZADD', zk, 'GT', op[4], op[3])
    cap_z(zk, op[5])
    out[#out + 1] = added == 1 and '1' or '0'
  elseif code == 'ewm_gap' then
    local name, fld, ts = op[2], op[3], op[4]
    local held = redis.call('HMGET', h, fld, name .. ':n', name .. ':m', name .. ':v')
    if not held[1] then
      redis.call('HSET', h, fld, string.format('%.17g', ts))
    else
      local gap = ts - tonumber(held[1])
      if gap >= 0 then
        if gap > op[6] then gap = op[6] end
        ewm_step(name, gap, op[5], held[2], held[3], held[4], fld, string.format('%.17g', ts))
      end
    end
    out[#out + 1] = held[1]
  elseif code == 'ewm_same' then
    local name, fld, x = op[2], op[3], tonumber(op[4])
    local held = redis.call('HMGET', h, fld, name .. ':n', name .. ':m', name .. ':v')
    if held[1] then
      local same = 0
      if tonumber(held[1]) == x then same = 1 end
      ewm_step(name, same, op[5], held[2], held[3], held[4], fld, string.format('%.17g', x))
    else
      redis.call('HSET', h, fld, string.format('%.17g', x))
    end
    out[#out + 1] = held[1]
  elseif code == 'gets' then
    local fields = {}
    for j = 1, op[2] do fields[j] = op[2 + j] end
    out[#out + 1] = redis.call('HMGET', h, unpack(fields))
  elseif code == 'ring_windows' then
    local name, size, stamp, k = op[2], op[3], op[4], op[5]
    local maxn = 0
    for j = 1, k do
      if op[5 + j] > maxn then maxn = op[5 + j] end
    end
    local stamps = {}
    for off = 0, maxn do stamps[off + 1] = stamp - off end
    local vals = ring_buckets(name, size, stamps)
    local res = {}
    for j = 1, k do
      local n = op[5 + j]
      local whole = 0
      local top = n
      if top > size then top = size end
      for off = 0, top - 1 do whole = whole + vals[off + 1] end  -- newest first
      res[#res + 1] = string.format('%.17g', whole)
      res[#res + 1] = string.format('%.17g', vals[n + 1])
    end
    out[#out + 1] = res
  elseif code == 'ring_values' then
    local size, k = op[3], op[4]
    local stamps = {}
    for j = 1, k do stamps[j] = op[4 + j] end
    local vals = ring_buckets(op[2], size, stamps)
    local res = {}
    for j = 1, k do res[j] = string.format('%.17g', vals[j]) end
    out[#out + 1] = res
  elseif code == 'zset' then
    local zk = zkeys[op[2]]
    redis.call('ZADD', zk, string.format('%.17g', op[4]), op[3])
    cap_z(zk, op[5])
    out[#out + 1] = false
  elseif code == 'zrem' then
    out[#out + 1] = string.format('%d', redis.call('ZREM', zkeys[op[2]], op[3]))
  elseif code == 'zitems' then
    local raw = redis.call('ZREVRANGEBYSCORE', zkeys[op[2]], '+inf',
      string.format('%.17g', op[3]), 'WITHSCORES', 'LIMIT', 0, op[4])
    local items = {}
    for j = 1, #raw, 2 do items[#items + 1] = {raw[j], raw[j + 1]} end
    if #items == 0 then out[#out + 1] = false else out[#out + 1] = items end
  elseif code == 'budget_add' then
    -- check-and-increment in one atomic step: exact budgets across replicas
    local name, period, amount, limit = op[2], op[3], op[4], op[5]
    local pf, of = name .. ':p', name .. ':over'
    local held = redis.call('HMGET', h, pf, name, of)
    local total, over = tonumber(held[2] or '0'), tonumber(held[3] or '0')
    if held[1] and tonumber(held[1]) > period then
      out[#out + 1] = {'-1', string.format('%.17g', total), string.format('%.17g', over)}
    else
      if (not held[1]) or tonumber(held[1]) < period then
        total, over = 0, 0
        redis.call('HSET', h, pf, string.format('%.17g', period), name, '0', of, '0')
      end
      if total + amount <= limit then
        total = total + amount
        redis.call('HSET', h, name, string.format('%.17g', total))
        out[#out + 1] = {'1', string.format('%.17g', total), string.format('%.17g', over)}
      else
        over = over + amount
        redis.call('HSET', h, of, string.format('%.17g', over))
        out[#out + 1] = {'0', string.format('%.17g', total), string.format('%.17g', over)}
      end
    end
  elseif code == 'limit' then
    -- the GCRA limit meter, as `gcra` in features/stores/memory.py (wall time)
    local mode, now = op[2], op[3]
    local held = redis.call('HMGET', h, 'lim:until', 'lim:rate', 'lim:burst', 'lim:tat',
      'lim:tat_e')
    local lim_until, rate = tonumber(held[1] or '0'), tonumber(held[2] or '0')
    if lim_until <= now or rate <= 0 then
      out[#out + 1] = {'-1', '0', '0', '0', '0'}
    else
      local burst = tonumber(held[3] or '1')
      local tat, tat_e = tonumber(held[4] or '0'), tonumber(held[5] or '0')
      local interval = 60.0 / rate
      local tol = interval * (math.max(burst, 1) - 1)
      local hv = math.max(tat, tat_e, now)
      local status, retry = 0, 0
      if mode == 'take' then
        if hv - tol <= now then
          status = 1
          redis.call('HSET', h, 'lim:tat', string.format('%.17g', hv + interval))
        else
          retry = hv - tol - now
        end
      elseif mode == 'count' then
        local own = math.max(tat_e, now)
        local new_e = math.min(own + interval, math.max(lim_until, now))
        redis.call('HSET', h, 'lim:tat_e', string.format('%.17g', new_e))
        if own - tol <= now then status = 1 end
        retry = math.max(0, math.max(tat, new_e, now) - tol - now)
      elseif hv - tol <= now then
        status = 1
      else
        retry = hv - tol - now
      end
      out[#out + 1] = {string.format('%d', status), string.format('%.17g', retry),
        string.format('%.17g', rate), string.format('%.17g', lim_until),
        string.format('%.17g', burst)}
    end
  elseif code == 'persist' then
    if tonumber(op[2]) == 1 then redis.call('HSET', h, '_persist', '1')
    else redis.call('HDEL', h, '_persist') end
    out[#out + 1] = false
  else
    return redis.error_reply('unknown store operation ' .. tostring(code))
  end
end

-- a permanent ban keeps the entity; a ban or a limit keeps it at least until it ends
-- (their ends are wall time), however idle; otherwise the idle TTL
local keep = redis.call('HMGET', h, '_persist', 'ban:until', 'lim:until')
if keep[1] == '1' then
  for k = 1, #KEYS do redis.call('PERSIST', KEYS[k]) end
elseif ttl > 0 then
  local t = ttl
  if keep[2] or keep[3] then
    local now = tonumber(redis.call('TIME')[1])
    local hold = math.max(tonumber(keep[2] or '0') or 0, tonumber(keep[3] or '0') or 0)
    local left = math.ceil(math.min(hold - now, 315360000))
    if left > t then t = left end
  end
  for k = 1, #KEYS do redis.call('EXPIRE', KEYS[k], t) end
end
if #out == 0 then return '[]' end
return cjson.encode(out)
