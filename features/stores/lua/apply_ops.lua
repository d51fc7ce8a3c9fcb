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
    out[#out + 1] = tostring(total)
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
    out[#out + 1] = tostring(redis.call('ZCOUNT', zk, '(' .. tostring(ts - tonumber(ARGV[i + 3])), '+inf'))
    i = i + 4
  elseif code == 'seen_add' then
    local zk = zkeys[ARGV[i + 1]]
    local ts = tonumber(ARGV[i + 3])
    local is_new = redis.call('ZSCORE', zk, ARGV[i + 2]) == false
    redis.call('ZADD', zk, 'GT', ts, ARGV[i + 2])
    cap_z(zk, tonumber(ARGV[i + 4]))
    out[#out + 1] = is_new and '1' or '0'
    i = i + 5
  else
    return redis.error_reply('unknown store operation ' .. tostring(code))
  end
end

if ttl > 0 then
  for k = 1, #KEYS do redis.call('EXPIRE', KEYS[k], ttl) end
end
return out
