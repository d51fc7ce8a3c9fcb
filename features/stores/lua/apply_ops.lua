-- Apply keywatch's generic state operations to one entity, atomically.
-- KEYS[1] is the entity hash; KEYS[2..] are its sorted sets, in the order named by ARGV.
-- ARGV: ttl_seconds, n_zsets, zset names..., then the ops, each "code" followed by its args.
-- Every result is returned as a string (or false for nil) so no precision is lost.
local h = KEYS[1]
local ttl = tonumber(ARGV[1])
local nz = tonumber(ARGV[2])
local zkeys = {}
for i = 1, nz do zkeys[ARGV[2 + i]] = KEYS[1 + i] end
local i = 3 + nz
local out = {}

local function cap_z(zk, cap)
  local card = redis.call('ZCARD', zk)
  if card > cap then redis.call('ZREMRANGEBYRANK', zk, 0, card - cap - 1) end
end

local function ewm(name, x, alpha)
  local n = tonumber(redis.call('HGET', h, name .. ':n') or '0')
  local m, v
  if n == 0 then
    m = x
    v = 0
  else
    m = tonumber(redis.call('HGET', h, name .. ':m'))
    v = tonumber(redis.call('HGET', h, name .. ':v'))
    local diff = x - m
    local incr = alpha * diff
    m = m + incr
    v = (1 - alpha) * (v + diff * incr)
  end
  redis.call('HSET', h, name .. ':m', string.format('%.17g', m),
    name .. ':v', string.format('%.17g', v), name .. ':n', tostring(n + 1))
end

-- bucket values of ring `name` at the given stamps (0 when the slot holds another stamp)
local function ring_buckets(name, size, stamps)
  local fields = {}
  for j = 1, #stamps do
    local vf = name .. ':' .. tostring(stamps[j] % size)
    fields[#fields + 1] = vf .. ':t'
    fields[#fields + 1] = vf
  end
  local raw = redis.call('HMGET', h, unpack(fields))
  local vals = {}
  for j = 1, #stamps do
    local held = raw[2 * j - 1]
    if held and tonumber(held) == stamps[j] then
      vals[j] = tonumber(raw[2 * j] or '0')
    else
      vals[j] = 0
    end
  end
  return vals
end

while i <= #ARGV do
  local code = ARGV[i]
  if code == 'get' then
    out[#out + 1] = redis.call('HGET', h, ARGV[i + 1])
    i = i + 2
  elseif code == 'set' then
    redis.call('HSET', h, ARGV[i + 1], ARGV[i + 2])
    out[#out + 1] = false
    i = i + 3
  elseif code == 'del' then
    redis.call('HDEL', h, ARGV[i + 1])
    out[#out + 1] = false
    i = i + 2
  elseif code == 'incr' then
    out[#out + 1] = redis.call('HINCRBYFLOAT', h, ARGV[i + 1], ARGV[i + 2])
    i = i + 3
  elseif code == 'ring_add' then
    local vf = ARGV[i + 1] .. ':' .. ARGV[i + 2]
    local tf = vf .. ':t'
    local stamp = tonumber(ARGV[i + 3])
    local held = redis.call('HGET', h, tf)
    if held and tonumber(held) > stamp then
      out[#out + 1] = false
    else
      if (not held) or tonumber(held) ~= stamp then
        redis.call('HSET', h, tf, ARGV[i + 3], vf, '0')
      end
      out[#out + 1] = redis.call('HINCRBYFLOAT', h, vf, ARGV[i + 4])
    end
    i = i + 5
  elseif code == 'ring_get' then
    local vf = ARGV[i + 1] .. ':' .. ARGV[i + 2]
    local held = redis.call('HGET', h, vf .. ':t')
    if held and tonumber(held) == tonumber(ARGV[i + 3]) then
      out[#out + 1] = redis.call('HGET', h, vf) or '0'
    else
      out[#out + 1] = '0'
    end
    i = i + 4
  elseif code == 'ring_sum' then
    local size = tonumber(ARGV[i + 2])
    local lo = tonumber(ARGV[i + 3])
    local hi = tonumber(ARGV[i + 4])
    if lo < hi - size + 1 then lo = hi - size + 1 end
    local total = 0
    for stamp = lo, hi do
      local vf = ARGV[i + 1] .. ':' .. tostring(stamp % size)
      local held = redis.call('HGET', h, vf .. ':t')
      if held and tonumber(held) == stamp then
        total = total + tonumber(redis.call('HGET', h, vf) or '0')
      end
    end
    out[#out + 1] = string.format('%.17g', total)
    i = i + 5
  elseif code == 'ewm' then
    ewm(ARGV[i + 1], tonumber(ARGV[i + 2]), tonumber(ARGV[i + 3]))
    out[#out + 1] = false
    i = i + 4
  elseif code == 'ewm_gap' then
    local held = redis.call('HGET', h, ARGV[i + 2])
    if not held then
      redis.call('HSET', h, ARGV[i + 2], ARGV[i + 3])
    else
      local gap = tonumber(ARGV[i + 3]) - tonumber(held)
      if gap >= 0 then
        local cap = tonumber(ARGV[i + 5])
        if gap > cap then gap = cap end
        ewm(ARGV[i + 1], gap, tonumber(ARGV[i + 4]))
        redis.call('HSET', h, ARGV[i + 2], ARGV[i + 3])
      end
    end
    out[#out + 1] = held
    i = i + 6
  elseif code == 'ewm_same' then
    local held = redis.call('HGET', h, ARGV[i + 2])
    if held then
      local same = 0
      if tonumber(held) == tonumber(ARGV[i + 3]) then same = 1 end
      ewm(ARGV[i + 1], same, tonumber(ARGV[i + 4]))
    end
    redis.call('HSET', h, ARGV[i + 2], ARGV[i + 3])
    out[#out + 1] = held
    i = i + 5
  elseif code == 'recent_add' then
    local zk = zkeys[ARGV[i + 1]]
    local ts = tonumber(ARGV[i + 3])
    redis.call('ZADD', zk, 'GT', ts, ARGV[i + 2])
    redis.call('ZREMRANGEBYSCORE', zk, '-inf', ts - tonumber(ARGV[i + 4]))
    cap_z(zk, tonumber(ARGV[i + 5]))
    out[#out + 1] = tostring(redis.call('ZCARD', zk))
    i = i + 6
  elseif code == 'recent_count' then
    local zk = zkeys[ARGV[i + 1]]
    local ts = tonumber(ARGV[i + 2])
    -- %.17g, not tostring (14 digits): an epoch time minus a window must stay exact
    local cutoff = string.format('%.17g', ts - tonumber(ARGV[i + 3]))
    out[#out + 1] = tostring(redis.call('ZCOUNT', zk, '(' .. cutoff, '+inf'))
    i = i + 4
  elseif code == 'seen_add' then
    local zk = zkeys[ARGV[i + 1]]
    local ts = tonumber(ARGV[i + 3])
    local is_new = redis.call('ZSCORE', zk, ARGV[i + 2]) == false
    redis.call('ZADD', zk, 'GT', ts, ARGV[i + 2])
    cap_z(zk, tonumber(ARGV[i + 4]))
    out[#out + 1] = is_new and '1' or '0'
    i = i + 5
  elseif code == 'gets' then
    local k = tonumber(ARGV[i + 1])
    local fields = {}
    for j = 1, k do fields[j] = ARGV[i + 1 + j] end
    out[#out + 1] = redis.call('HMGET', h, unpack(fields))
    i = i + 2 + k
  elseif code == 'ring_windows' then
    local name = ARGV[i + 1]
    local size = tonumber(ARGV[i + 2])
    local stamp = tonumber(ARGV[i + 3])
    local k = tonumber(ARGV[i + 4])
    local maxn = 0
    for j = 1, k do
      local n = tonumber(ARGV[i + 4 + j])
      if n > maxn then maxn = n end
    end
    local stamps = {}
    for off = 0, maxn do stamps[off + 1] = stamp - off end
    local vals = ring_buckets(name, size, stamps)
    local res = {}
    for j = 1, k do
      local n = tonumber(ARGV[i + 4 + j])
      local whole = 0
      local top = n
      if top > size then top = size end
      for off = 0, top - 1 do whole = whole + vals[off + 1] end
      res[#res + 1] = string.format('%.17g', whole)
      res[#res + 1] = string.format('%.17g', vals[n + 1])
    end
    out[#out + 1] = res
    i = i + 5 + k
  elseif code == 'ring_values' then
    local size = tonumber(ARGV[i + 2])
    local k = tonumber(ARGV[i + 3])
    local stamps = {}
    for j = 1, k do stamps[j] = tonumber(ARGV[i + 3 + j]) end
    local vals = ring_buckets(ARGV[i + 1], size, stamps)
    local res = {}
    for j = 1, k do res[j] = string.format('%.17g', vals[j]) end
    out[#out + 1] = res
    i = i + 4 + k
  else
    return redis.error_reply('unknown store operation ' .. tostring(code))
  end
end

if ttl > 0 then
  for k = 1, #KEYS do redis.call('EXPIRE', KEYS[k], ttl) end
end
return out
