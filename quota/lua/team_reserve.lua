-- team_reserve.lua: the team step of a reservation: debit a request's estimated cost from its
-- team's budget, in the team's own slot (a consumer's keys and its team's may live in different
-- Redis Cluster slots, so no script touches both). Taken only for consumers whose team has a
-- budget, after (or alongside) the consumer's `reserve.lua`; the gateway compensates the
-- consumer's reservation when this refuses. The twin of `MemoryStore::reserve_team`.
--
-- KEYS[1] tg:team:{TEAM}         hash: budget (currency units), budget_period, budget_action
--                                (read only)
-- KEYS[2] tg:teamspend:{TEAM}    hash: w (budget window start, unix s), spent (nano-units)
-- KEYS[3] tg:tresv:{TEAM}:RID    string: "cost window" of this reservation until it is settled,
--                                or "x" (a tombstone: abandoned, or settled after a retry)
-- ARGV[1] the estimate's cost in nano-units (whole number)
-- ARGV[2] milliseconds added to Redis TIME (a test hook; 0 in production)
-- ARGV[3] milliseconds the reservation record lives when never settled
--
-- Returns an array of strings:
--   {"N"}                                                             the team has no budget
--   {"A", budget_nano, spent_nano, window, window_end, period, action} admitted (debited)
--   {"B", retry_after_ms, remaining_nano, budget_nano, period}         budget spent
--   {"C"}                                  this reservation id was abandoned: nothing debited
-- Raises "TGBADFIELD ..." when an operator stored a field that is not a valid value.
--
-- Invariant: spent + cost never passes the budget under action "block" (a refusal writes
-- nothing); a reservation id debits at most once, like reserve.lua.

local function int(x)
  return string.format('%d', x)
end

-- Days since 1970-01-01 of a civil date, and back (H. Hinnant's algorithms).
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
local function window_bounds(period, now_s, field)
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
  error({err = 'TGBADFIELD ' .. KEYS[1] .. ' ' .. field .. ' is not hour|day|week|month: ' .. period})
end

local t = redis.call('TIME')
local now_us = tonumber(t[1]) * 1000000 + tonumber(t[2]) + tonumber(ARGV[2]) * 1000
local now_s = (now_us - math.fmod(now_us, 1000000)) / 1000000
local cost = tonumber(ARGV[1])

local f = redis.call('HMGET', KEYS[1], 'budget', 'budget_period', 'budget_action')
if not f[1] or f[1] == '' then
  return {'N'}
end
local b = tonumber(f[1])
if not b or b < 0 or b ~= b or b == math.huge then
  error({err = 'TGBADFIELD ' .. KEYS[1] .. ' budget is not an amount: ' .. f[1]})
end
local budget = math.floor(b * 1000000000 + 0.5)
local period = (f[2] and f[2] ~= '') and f[2] or 'month'
local action = (f[3] and f[3] ~= '') and f[3] or 'block'
if action ~= 'block' and action ~= 'alert' then
  error({err = 'TGBADFIELD ' .. KEYS[1] .. ' budget_action is not block|alert: ' .. action})
end
local window, window_end = window_bounds(period, now_s, 'budget_period')

local spent = 0
local sp = redis.call('HMGET', KEYS[2], 'w', 'spent')
if sp[1] and tonumber(sp[1]) == window then
  spent = tonumber(sp[2]) or 0
end

-- A replay of a reservation already made (or abandoned): never debit twice.
local prior = redis.call('GET', KEYS[3])
if prior == 'x' then
  return {'C'}
elseif prior then
  local window_p = string.match(prior, '^%S+ (%S+)$') or int(window)
  return {'A', int(budget), int(spent), window_p, int(window_end), period, action}
end

if action == 'block' and spent + cost > budget then
  return {'B', int(math.max(window_end - now_s, 1) * 1000), int(budget - spent), int(budget), period}
end
redis.call('HSET', KEYS[2], 'w', int(window), 'spent', int(spent + cost))
redis.call('EXPIRE', KEYS[2], int(window_end - now_s + 86400))
redis.call('SET', KEYS[3], int(cost) .. ' ' .. int(window), 'PX', ARGV[3])
return {'A', int(budget), int(spent + cost), int(window), int(window_end), period, action}
