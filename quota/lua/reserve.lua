-- reserve.lua: admit or refuse one request of one consumer and debit it, in one round trip.
-- The twin of `MemoryStore::reserve` (quota/src/memory.rs), decision for decision.
--
-- KEYS[1] tg:consumer:{ID}  hash: team, tpm, quota, quota_period, models, disabled, budget,
--                           budget_period, budget_action (read only)
-- KEYS[2] tg:bucket:{ID}    hash: tokens (float), ts (unix us); absent = full
-- KEYS[3] tg:quota:{ID}     hash: w (window start, unix s), used
-- KEYS[4] tg:resv:{ID}:RID  string: "tokens window tpm cost bwindow" of this reservation until
--                           it is settled, or "x" (a tombstone: abandoned, or settled after a
--                           retry); tpm and bwindow are "-" when there is no bucket or budget
-- KEYS[5] tg:spend:{ID}     hash: w (budget window start, unix s), spent (nano-units)
-- ARGV[1] model
-- ARGV[2] tokens to debit (whole number)
-- ARGV[3] "1" = the consumer must have a stored record (key auth), "0" = defaults may apply
-- ARGV[4] default tpm, "" = no per-minute limit
-- ARGV[5] default quota, "" = no period quota
-- ARGV[6] default quota period: hour | day | week | month
-- ARGV[7] milliseconds added to Redis TIME (a test hook; 0 in production)
-- ARGV[8] milliseconds the reservation record lives when never settled
-- ARGV[9] the estimate's cost in nano-units (whole number), debited from the budget if any
--
-- Returns an array of strings, the verdict first (numbers as strings: no float truncation):
--   {"A", team, remaining_tpm | "", remaining_quota | "", window_start, tpm | "", quota | "", period,
--    budget_nano | "", spent_nano | "", budget_window | "", budget_window_end | "",
--    budget_period | "", budget_action | ""}                                      admitted
--   {"R", retry_after_ms, remaining_tpm}                                           rate limited
--   {"Q", retry_after_ms, remaining_quota}                                         quota spent
--   {"B", retry_after_ms, remaining_nano, budget_nano, budget_period}              budget spent
--   {"M"} model not allowed, {"D"} disabled, {"U"} unknown consumer
--   {"C"} this reservation id was abandoned: nothing debited, now or ever
-- Raises "TGBADFIELD ..." when an operator stored a field that is not a valid value.
--
-- Invariant: the bucket, the quota and the budget are debited together or not at all; a
-- refusal writes nothing. A budget with action "alert" is debited but never refuses. A reservation id debits at most once: a second call with the same id (a retry
-- after a lost answer) answers "A" without debiting while the record lives, "C" once it is a
-- tombstone. Decision order: unknown, disabled, model, replay, quota, budget, bucket.

local function int(x)
  return string.format('%d', x)
end

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
local now_us = tonumber(t[1]) * 1000000 + tonumber(t[2]) + tonumber(ARGV[7]) * 1000
local now_s = (now_us - math.fmod(now_us, 1000000)) / 1000000

local model = ARGV[1]
local tokens = tonumber(ARGV[2])
local tpm = whole(ARGV[4], 'default tpm')
local quota = whole(ARGV[5], 'default quota')
local period = ARGV[6]
local team = ''

local budget, budget_period, budget_action = nil, nil, nil
local f = redis.call('HMGET', KEYS[1], 'team', 'tpm', 'quota', 'quota_period', 'models', 'disabled',
  'budget', 'budget_period', 'budget_action')
if redis.call('EXISTS', KEYS[1]) == 1 then
  if f[6] == '1' or f[6] == 'true' then
    return {'D'}
  end
  if f[5] and f[5] ~= '' then
    local allowed, any = false, false
    for m in string.gmatch(f[5], '[^,]+') do
      m = string.match(m, '^%s*(.-)%s*$')
      if m ~= '' then
        any = true
        if m == model then
          allowed = true
          break
        end
      end
    end
    if any and not allowed then
      return {'M'}
    end
  end
  team = f[1] or ''
  tpm = whole(f[2], 'tpm') or tpm
  local q = whole(f[3], 'quota')
  if q then
    quota = q
    if f[4] and f[4] ~= '' then period = f[4] end
  end
  if f[7] and f[7] ~= '' then
    local b = tonumber(f[7])
    if not b or b < 0 or b ~= b or b == math.huge then
      error({err = 'TGBADFIELD ' .. KEYS[1] .. ' budget is not an amount: ' .. f[7]})
    end
    budget = math.floor(b * 1000000000 + 0.5)
    budget_period = (f[8] and f[8] ~= '') and f[8] or 'month'
    budget_action = (f[9] and f[9] ~= '') and f[9] or 'block'
    if budget_action ~= 'block' and budget_action ~= 'alert' then
      error({err = 'TGBADFIELD ' .. KEYS[1] .. ' budget_action is not block|alert: ' .. budget_action})
    end
  end
elseif ARGV[3] == '1' then
  return {'U'}
end

local window, window_end = window_bounds(period, now_s, 'quota_period')

-- A replay of a reservation already made (or abandoned): never debit twice.
local prior = redis.call('GET', KEYS[4])
if prior == 'x' then
  return {'C'}
elseif prior then
  local window_p = string.match(prior, '^%S+ (%S+)')
  return {'A', team, '', '', window_p or int(window), tpm and int(tpm) or '',
    quota and int(quota) or '', period, '', '', '', '', '', ''}
end

-- Quota first: a spent quota outlasts any per-minute wait.
local used = 0
if quota then
  local q = redis.call('HMGET', KEYS[3], 'w', 'used')
  if q[1] and tonumber(q[1]) == window then
    used = tonumber(q[2]) or 0
  end
  if used + tokens > quota then
    return {'Q', int(math.max(window_end - now_s, 1) * 1000), int(quota - used)}
  end
end

-- The budget: a spent budget outlasts any per-minute wait too.
local cost = tonumber(ARGV[9])
local spent, bwindow, bwindow_end = 0, nil, nil
if budget then
  bwindow, bwindow_end = window_bounds(budget_period, now_s, 'budget_period')
  local sp = redis.call('HMGET', KEYS[5], 'w', 'spent')
  if sp[1] and tonumber(sp[1]) == bwindow then
    spent = tonumber(sp[2]) or 0
  end
  if budget_action == 'block' and spent + cost > budget then
    return {'B', int(math.max(bwindow_end - now_s, 1) * 1000), int(budget - spent), int(budget),
      budget_period}
  end
end

local level = 0
if tpm then
  -- A zero limit refuses everything (an operator's off switch for traffic).
  if tpm == 0 then
    return {'R', '60000', '0'}
  end
  local b = redis.call('HMGET', KEYS[2], 'tokens', 'ts')
  if b[1] and b[2] then
    local elapsed = math.max(now_us - tonumber(b[2]), 0)
    level = math.min(tonumber(b[1]) + elapsed * tpm / 60000000, tpm)
  else
    level = tpm
  end
  -- A request larger than the whole bucket passes when the bucket is full.
  local need = math.min(tokens, tpm)
  if level < need then
    local retry = 60000
    if tpm > 0 then
      retry = math.max(math.ceil((need - level) * 60000 / tpm), 1)
    end
    return {'R', int(retry), int(math.floor(level))}
  end
end

-- Admitted: debit both.
local rem_tpm = ''
if tpm then
  level = level - tokens
  redis.call('HSET', KEYS[2], 'tokens', string.format('%.17g', level), 'ts', int(now_us))
  -- Expire when refilled to full (+1 s): an absent bucket is a full one.
  local ttl = 86400000
  if tpm > 0 then ttl = math.ceil((tpm - level) * 60000 / tpm) + 1000 end
  redis.call('PEXPIRE', KEYS[2], int(ttl))
  rem_tpm = int(math.floor(level))
end
local rem_quota = ''
if quota then
  redis.call('HSET', KEYS[3], 'w', int(window), 'used', int(used + tokens))
  redis.call('EXPIRE', KEYS[3], int(window_end - now_s + 86400))
  rem_quota = int(quota - used - tokens)
end
local b_out = {'', '', '', '', '', ''}
if budget then
  redis.call('HSET', KEYS[5], 'w', int(bwindow), 'spent', int(spent + cost))
  redis.call('EXPIRE', KEYS[5], int(bwindow_end - now_s + 86400))
  b_out = {int(budget), int(spent + cost), int(bwindow), int(bwindow_end), budget_period, budget_action}
end
redis.call('SET', KEYS[4], int(tokens) .. ' ' .. int(window) .. ' ' .. (tpm and int(tpm) or '-')
  .. ' ' .. int(cost) .. ' ' .. (budget and int(bwindow) or '-'), 'PX', ARGV[8])
return {'A', team, rem_tpm, rem_quota, int(window), tpm and int(tpm) or '', quota and int(quota) or '', period,
  b_out[1], b_out[2], b_out[3], b_out[4], b_out[5], b_out[6]}
