-- tool_call.lua: admit or refuse one MCP tool call of one consumer and count it, in one round
-- trip. The twin of `MemoryStore::tool_call` (quota/src/memory/tools.rs), decision for decision.
--
-- KEYS[1] tg:consumer:{ID}   hash: disabled, quota_period, tool_calls_per_min, tool_calls_quota
--                            (read only; the two tool fields win over ARGV[2] and ARGV[3])
-- KEYS[2] tg:toolrate:{ID}   sorted set: one member per call of the last minute, scored by its
--                            time (unix us); expires a minute after the last call
-- KEYS[3] tg:toolquota:{ID}  hash: w (window start, unix s), used (calls in that window)
-- ARGV[1] "1" = the consumer must have a stored record (key auth), "0" = it may have none
-- ARGV[2] calls per rolling minute, "" = no limit
-- ARGV[3] calls per quota window, "" = no quota
-- ARGV[4] default quota period: hour | day | week | month (the record's quota_period wins)
-- ARGV[5] milliseconds added to Redis TIME (a test hook; 0 in production)
-- ARGV[6] a random id that makes this call's member of KEYS[2] unique
--
-- Returns an array of strings, the verdict first:
--   {"A", remaining_per_min | "", remaining_quota | ""}   admitted and counted
--   {"R", retry_after_ms, limit}                           rolling-minute limit reached
--   {"Q", retry_after_ms, limit}                           period quota spent
--   {"D"} disabled, {"U"} unknown consumer
-- Raises "TGBADFIELD ..." when an operator stored a field that is not a valid value.
--
-- Invariant: a refusal writes nothing; an admission adds exactly one call to both counters.
-- At most `limit` members are ever scored within one minute, so the limit holds exactly
-- whichever replicas send the calls. Decision order: unknown, disabled, quota, minute.

local function whole(v, field)
  if not v or v == '' then
    return nil
  end
  local n = tonumber(v)
  if not n or n < 0 or n ~= math.floor(n) then
    error({err = 'TGBADFIELD ' .. KEYS[1] .. ' ' .. field .. ' is not a whole number: ' .. v})
  end
  return n
end

-- Days since 1970-01-01 of a civil date, and back (as in reserve.lua).
local function days_from_civil(y, m, d)
  if m <= 2 then y = y - 1 end
  local era = math.floor(y / 400)
  local yoe = y - era * 400
  local mp = (m > 2) and (m - 3) or (m + 9)
  local doy = math.floor((153 * mp + 2) / 5) + d - 1
  local doe = yoe * 365 + math.floor(yoe / 4) - math.floor(yoe / 100) + doy
  return era * 146097 + doe - 719468
end

local function civil_from_days(days)
  local z = days + 719468
  local era = math.floor(z / 146097)
  local doe = z - era * 146097
  local yoe = math.floor((doe - math.floor(doe / 1460) + math.floor(doe / 36524)
    - math.floor(doe / 146096)) / 365)
  local doy = doe - (365 * yoe + math.floor(yoe / 4) - math.floor(yoe / 100))
  local mp = math.floor((5 * doy + 2) / 153)
  local m = (mp < 10) and (mp + 3) or (mp - 9)
  local y = yoe + era * 400
  if m <= 2 then y = y + 1 end
  return y, m
end

-- Start and end (unix s, end exclusive) of the fixed UTC window; `window_bounds` in model.rs.
local function window_bounds(period, now_s)
  local day = 86400
  if period == 'hour' then
    local s = now_s - math.fmod(now_s, 3600)
    return s, s + 3600
  elseif period == 'day' then
    local s = now_s - math.fmod(now_s, day)
    return s, s + day
  elseif period == 'week' then
    local days = math.floor(now_s / day)
    local start_day = math.floor((days + 3) / 7) * 7 - 3
    return start_day * day, (start_day + 7) * day
  elseif period == 'month' then
    local y, m = civil_from_days(math.floor(now_s / day))
    local ny, nm = y, m + 1
    if m == 12 then ny, nm = y + 1, 1 end
    return days_from_civil(y, m, 1) * day, days_from_civil(ny, nm, 1) * day
  end
  error({err = 'TGBADFIELD ' .. KEYS[1] .. ' quota_period is not hour|day|week|month: ' .. period})
end

local function int(x)
  return string.format('%d', x)
end

local t = redis.call('TIME')
local now_us = tonumber(t[1]) * 1000000 + tonumber(t[2]) + tonumber(ARGV[5]) * 1000
local now_s = (now_us - math.fmod(now_us, 1000000)) / 1000000

local per_min = whole(ARGV[2], 'default tool_calls_per_min')
local quota = whole(ARGV[3], 'default tool_calls_quota')
local period = ARGV[4]

if redis.call('EXISTS', KEYS[1]) == 1 then
  local f = redis.call('HMGET', KEYS[1], 'disabled', 'quota_period', 'tool_calls_per_min',
    'tool_calls_quota')
  if f[1] == '1' or f[1] == 'true' then
    return {'D'}
  end
  if f[2] and f[2] ~= '' then period = f[2] end
  if f[3] and f[3] ~= '' then per_min = whole(f[3], 'tool_calls_per_min') end
  if f[4] and f[4] ~= '' then quota = whole(f[4], 'tool_calls_quota') end
elseif ARGV[1] == '1' then
  return {'U'}
end

local used, w, w_end = 0, 0, 0
if quota then
  w, w_end = window_bounds(period, now_s)
  local q = redis.call('HMGET', KEYS[3], 'w', 'used')
  if tonumber(q[1]) == w then used = tonumber(q[2]) or 0 end
  if used >= quota then
    return {'Q', int(w_end * 1000 - math.floor(now_us / 1000)), int(quota)}
  end
end

local count = 0
if per_min then
  redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now_us - 60000000)
  count = redis.call('ZCARD', KEYS[2])
  if per_min == 0 then
    return {'R', '60000', '0'}
  end
  if count >= per_min then
    -- The call that leaves the window first is the (count - per_min + 1)th oldest.
    local oldest = redis.call('ZRANGE', KEYS[2], count - per_min, count - per_min, 'WITHSCORES')
    local leaves = tonumber(oldest[2]) + 60000000 - now_us
    return {'R', int(math.max(1, math.ceil(leaves / 1000))), int(per_min)}
  end
  redis.call('ZADD', KEYS[2], now_us, int(now_us) .. ':' .. ARGV[6])
  redis.call('PEXPIRE', KEYS[2], 60000)
end

if quota then
  redis.call('HSET', KEYS[3], 'w', int(w), 'used', int(used + 1))
  redis.call('EXPIREAT', KEYS[3], w_end + 86400)
end

local rm, rq = '', ''
if per_min then rm = int(per_min - count - 1) end
if quota then rq = int(quota - used - 1) end
return {'A', rm, rq}
