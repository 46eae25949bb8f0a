-- settle.lua: apply a batch of settlements of ONE consumer and add its usage totals.
-- The twin of `MemoryStore::settle` (quota/src/memory.rs). Different consumers live in
-- different slots, so the caller sends one call per consumer, pipelined.
--
-- KEYS[1]    tg:bucket:{ID}           hash: tokens (float), ts (unix us); absent = full
-- KEYS[2]    tg:quota:{ID}            hash: w (window start, unix s), used
-- KEYS[3]    tg:settled:{ID}:BATCH    string marker: this batch was applied (1 h TTL)
-- KEYS[4]    tg:spend:{ID}            hash: w (budget window start, unix s), spent (nano-units)
-- KEYS[5..]  tg:usage:{ID}:YYYYMMDD   hash: "<team>|<model>|<backend>|<metric>" -> integer
--            tg:resv:{ID}:RID         reservation records (see reserve.lua)
--            tg:dims:{ID}:YYYYMMDD    hash: "<dim>|<value>|<team>|<metric>" -> integer, and
--                                     "#v|<dim>|<value>" (a value kept), "#n|<dim>" (how many)
-- ARGV[1]    milliseconds added to Redis TIME (a test hook; 0 in production)
-- ARGV[2]    usage retention in seconds (EXPIRE of every usage key written)
-- ARGV[3]    n, the number of corrections that follow
-- ARGV[4]    milliseconds a tombstone lives
-- then n x   KEYS index of the reservation record ("0" = none), mode, delta (actual -
--            reserved, may be negative), tpm ("" = no bucket), window start ("any" = whatever
--            window the quota counter holds: usage from an outage), cost delta (nano-units,
--            actual - reserved), budget window start ("any" as for the quota; a live record's
--            own budget window wins). Modes:
--              "c" settled: correct by delta if the record lives, drop the record
--              "r" settled after a retried reserve: the same, and leave a tombstone
--              "a" abandoned: refund what the record says was debited (tokens and cost, if it
--                  exists) and leave a tombstone; the deltas, tpm and windows are ignored
-- then m x   KEYS index of the usage key, "<team>|<model>|<backend>", in, out, cached, req, cost,
--            saved, savedcost (the last two: tokens and cost a cache hit saved; written only
--            when not 0)
-- then, optionally, "dims", cap, retention in seconds, and k x: KEYS index of the dims key,
--            dimension, value, team, in, out, cached, req, cost, saved, savedcost
--
-- Returns n, or -1 when this batch was applied before (a retry after a lost reply).
--
-- Invariant: a correction is applied in order, each as the memory store does: the bucket is
-- refilled to now, then debited by delta (a refund never lifts it above capacity); the quota
-- counter moves by delta, never below 0, and only if it still counts the reservation's
-- window; the budget's spend likewise by the cost delta in its own window. Usage counters only grow (HINCRBY), and every key written carries a TTL. A batch is
-- applied at most once: a caller that lost the reply retries with the same batch id. A
-- reservation with a record is corrected at most once (while the record lives), and never
-- after a tombstone. A dimension keeps at most `cap` distinct values per consumer and day
-- (the "#n" count only grows while below it, atomically with the check): any later value is
-- counted as "other", on every replica alike.

local function int(x)
  return string.format('%d', x)
end

if not redis.call('SET', KEYS[3], '1', 'NX', 'PX', 3600000) then
  return -1
end

local t = redis.call('TIME')
local now_us = tonumber(t[1]) * 1000000 + tonumber(t[2]) + tonumber(ARGV[1]) * 1000
local retention = ARGV[2]
local n = tonumber(ARGV[3])
local tombstone_ms = ARGV[4]

local function correct_money(delta, bwindow)
  if delta == 0 or bwindow == '-' then
    return
  end
  local sp = redis.call('HMGET', KEYS[4], 'w', 'spent')
  if sp[1] and (bwindow == 'any' or tonumber(sp[1]) == tonumber(bwindow)) then
    redis.call('HSET', KEYS[4], 'spent', int(math.max((tonumber(sp[2]) or 0) + delta, 0)))
  end
end

local function correct(delta, tpm, window)
  if delta == 0 then
    return
  end
  if tpm ~= '' then
    local cap = tonumber(tpm)
    local b = redis.call('HMGET', KEYS[1], 'tokens', 'ts')
    local level = cap
    if b[1] and b[2] then
      local elapsed = math.max(now_us - tonumber(b[2]), 0)
      level = math.min(tonumber(b[1]) + elapsed * cap / 60000000, cap)
    end
    level = math.min(level - delta, cap)
    redis.call('HSET', KEYS[1], 'tokens', string.format('%.17g', level), 'ts', int(now_us))
    local ttl = 86400000
    if cap > 0 then ttl = math.ceil((cap - level) * 60000 / cap) + 1000 end
    redis.call('PEXPIRE', KEYS[1], int(ttl))
  end
  local q = redis.call('HMGET', KEYS[2], 'w', 'used')
  if q[1] and (window == 'any' or tonumber(q[1]) == tonumber(window)) then
    redis.call('HSET', KEYS[2], 'used', int(math.max((tonumber(q[2]) or 0) + delta, 0)))
  end
end

local i = 5
for _ = 1, n do
  local rkey = tonumber(ARGV[i])
  local mode = ARGV[i + 1]
  local delta = tonumber(ARGV[i + 2])
  local tpm = ARGV[i + 3]
  local window = ARGV[i + 4]
  local cost_delta = tonumber(ARGV[i + 5])
  local bwindow = ARGV[i + 6]
  i = i + 7
  if mode == 'a' then
    local rec = redis.call('GET', KEYS[rkey])
    if rec and rec ~= 'x' then
      local tokens, w, cap, cost, bw = string.match(rec, '^(%S+) (%S+) (%S+) ?(%S*) ?(%S*)$')
      if cap == '-' then cap = '' end
      correct(-tonumber(tokens), cap, w)
      if cost ~= '' and bw ~= '' then
        correct_money(-tonumber(cost), bw)
      end
    end
    redis.call('SET', KEYS[rkey], 'x', 'PX', tombstone_ms)
  elseif rkey == 0 then
    correct(delta, tpm, window)
    correct_money(cost_delta, bwindow)
  else
    -- Only a live record is corrected: settling one reservation twice corrects it once.
    local rec = redis.call('GET', KEYS[rkey])
    if rec and rec ~= 'x' then
      correct(delta, tpm, window)
      local bw = string.match(rec, '^%S+ %S+ %S+ %S+ (%S+)$')
      if bw then
        correct_money(cost_delta, bw)
      end
    end
    if mode == 'r' then
      redis.call('SET', KEYS[rkey], 'x', 'PX', tombstone_ms)
    else
      redis.call('DEL', KEYS[rkey])
    end
  end
end

while i + 8 <= #ARGV and ARGV[i] ~= 'dims' do
  local key = KEYS[tonumber(ARGV[i])]
  local prefix = ARGV[i + 1]
  redis.call('HINCRBY', key, prefix .. '|in', ARGV[i + 2])
  redis.call('HINCRBY', key, prefix .. '|out', ARGV[i + 3])
  redis.call('HINCRBY', key, prefix .. '|cached', ARGV[i + 4])
  redis.call('HINCRBY', key, prefix .. '|req', ARGV[i + 5])
  redis.call('HINCRBY', key, prefix .. '|cost', ARGV[i + 6])
  if ARGV[i + 7] ~= '0' then
    redis.call('HINCRBY', key, prefix .. '|saved', ARGV[i + 7])
  end
  if ARGV[i + 8] ~= '0' then
    redis.call('HINCRBY', key, prefix .. '|savedcost', ARGV[i + 8])
  end
  redis.call('EXPIRE', key, retention)
  i = i + 9
end

if ARGV[i] == 'dims' then
  local cap = tonumber(ARGV[i + 1])
  local dim_retention = ARGV[i + 2]
  local metrics = {'in', 'out', 'cached', 'req', 'cost', 'saved', 'savedcost'}
  i = i + 3
  while i + 10 <= #ARGV do
    local key = KEYS[tonumber(ARGV[i])]
    local dim = ARGV[i + 1]
    local value = ARGV[i + 2]
    if value ~= 'other' and redis.call('HEXISTS', key, '#v|' .. dim .. '|' .. value) == 0 then
      if (tonumber(redis.call('HGET', key, '#n|' .. dim)) or 0) < cap then
        redis.call('HSET', key, '#v|' .. dim .. '|' .. value, '1')
        redis.call('HINCRBY', key, '#n|' .. dim, 1)
      else
        value = 'other'
      end
    end
    local prefix = dim .. '|' .. value .. '|' .. ARGV[i + 3] .. '|'
    for j = 1, 7 do
      if j <= 5 or ARGV[i + 3 + j] ~= '0' then
        redis.call('HINCRBY', key, prefix .. metrics[j], ARGV[i + 3 + j])
      end
    end
    redis.call('EXPIRE', key, dim_retention)
    i = i + 11
  end
end
return n
