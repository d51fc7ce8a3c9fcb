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
  elseif code == 'counters' then
    local name = ARGV[i + 1]
    local size = tonumber(ARGV[i + 2])
    local stamp = tonumber(ARGV[i + 3])
    local add = {}
    for a in string.gmatch(ARGV[i + 4], '[^,]+') do add[#add + 1] = tonumber(a) end
    local width = #add
    local fields = {}
    for st = stamp - size + 1, stamp do fields[#fields + 1] = name .. ':' .. tostring(st % size) end
    local raw = redis.call('HMGET', h, unpack(fields))
    -- raw[size] is this event's bucket
    local cur = raw[size]
    local vals
    if cur then
      vals = {}
      for x in string.gmatch(cur, '[^,]+') do vals[#vals + 1] = tonumber(x) end
    end
    if (not vals) or vals[1] < stamp then
      vals = {stamp}
      for j = 1, width do vals[j + 1] = add[j] end
    elseif vals[1] == stamp then
      for j = 1, width do vals[j + 1] = vals[j + 1] + add[j] end
    else
      vals = nil  -- too late for this ring: the bucket holds a newer stamp
    end
    if vals then
      local parts = {}
      for j = 1, width + 1 do parts[j] = string.format('%.17g', vals[j]) end
      local enc = table.concat(parts, ',')
      redis.call('HSET', h, fields[size], enc)
      raw[size] = enc
    end
    local outv = {}
    for k = 1, size do
      local b = raw[k]
      local st = stamp - size + k
      local got = false
      if b then
        local bv = {}
        for x in string.gmatch(b, '[^,]+') do bv[#bv + 1] = x end
        if tonumber(bv[1]) == st then
          for j = 1, width do outv[#outv + 1] = bv[j + 1] end
          got = true
        end
      end
      if not got then
        for j = 1, width do outv[#outv + 1] = '0' end
      end
    end
    out[#out + 1] = table.concat(outv, ',')
    i = i + 5
  elseif code == 'ewm' then
    local name = ARGV[i + 1]
    local x = tonumber(ARGV[i + 2])
    local alpha = tonumber(ARGV[i + 3])
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
    out[#out + 1] = false
    i = i + 4
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
  elseif code == 'zset' then
    local zk = zkeys[ARGV[i + 1]]
    redis.call('ZADD', zk, ARGV[i + 3], ARGV[i + 2])
    cap_z(zk, tonumber(ARGV[i + 4]))
    out[#out + 1] = false
    i = i + 5
  elseif code == 'zrem' then
    out[#out + 1] = tostring(redis.call('ZREM', zkeys[ARGV[i + 1]], ARGV[i + 2]))
    i = i + 3
  elseif code == 'zitems' then
    local raw = redis.call('ZREVRANGEBYSCORE', zkeys[ARGV[i + 1]], '+inf', ARGV[i + 2],
      'WITHSCORES', 'LIMIT', 0, tonumber(ARGV[i + 3]))
    local items = {}
    for j = 1, #raw, 2 do items[#items + 1] = {raw[j], raw[j + 1]} end
    out[#out + 1] = items
    i = i + 4
  elseif code == 'persist' then
    if ARGV[i + 1] == '1' then redis.call('HSET', h, '_persist', '1')
    else redis.call('HDEL', h, '_persist') end
    out[#out + 1] = false
    i = i + 2
  else
    return redis.error_reply('unknown store operation ' .. tostring(code))
  end
end

if redis.call('HGET', h, '_persist') == '1' then
  for k = 1, #KEYS do redis.call('PERSIST', KEYS[k]) end
elseif ttl > 0 then
  for k = 1, #KEYS do redis.call('EXPIRE', KEYS[k], ttl) end
end
return out
