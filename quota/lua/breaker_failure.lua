-- breaker_failure.lua: count a backend failure; trip the circuit when the rolling window is full.
-- The twin of `MemoryStore::breaker_failure`.
--
-- KEYS[1] tg:breaker:{BACKEND}   hash: open_until (unix ms, absent/0 = closed), trip (counter),
--                                 probe_trip, probe_at (the lease of the trip's one probe)
-- KEYS[2] tg:bfail:{BACKEND}     sorted set of failure times (unix ms) inside the window
-- ARGV[1] failures that trip      ARGV[2] window ms      ARGV[3] trip ms
-- ARGV[4] trip for exactly this many ms ("" = count normally)   ARGV[5] "1" = a probe failed
-- ARGV[6] channel to publish changes on (tg:breaker)
-- ARGV[7] a member unique to this failure (replica id and a counter)
-- ARGV[8] the longest trip or window (ms): longer durations are cut to it
--
-- Returns {open_until, trip, now} as strings after the failure (open_until "0" = closed).
-- Publishes "BACKEND open_until trip now" when the circuit opens or re-opens.
--
-- Invariant: a circuit only opens further (open_until never moves back); every key expires;
-- open_until is an integer at most ARGV[8] ms ahead. A stored open_until that is not (written
-- by an older version) counts as closed and is replaced by the next trip.

local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local max_ms = tonumber(ARGV[8]) or 86400000

-- A duration argument as an integer within 0..max_ms; nil when it is not a number.
local function duration(v)
  local n = tonumber(v)
  if n == nil or n ~= n or n < 0 then
    return nil
  end
  return math.min(math.floor(n), max_ms)
end

-- A stored instant (ms): 0 unless an integer no further ahead than one trip can reach.
local function stored_ms(v)
  local n = tonumber(v or '0')
  if n == nil or n ~= math.floor(n) or n < 0 or n > now + max_ms then
    return 0
  end
  return n
end

local failures = math.max(tonumber(ARGV[1]) or 1, 1)
local window = math.max(duration(ARGV[2]) or 1, 1)
local trip_ms = duration(ARGV[3]) or 0
local h = redis.call('HMGET', KEYS[1], 'open_until', 'trip')
local open_until = stored_ms(h[1])
local trip = tonumber(h[2] or '0') or 0
if trip ~= math.floor(trip) or trip < 0 or trip > 2^52 then
  trip = 0
end

local trip_for = nil
if ARGV[4] ~= '' then
  trip_for = duration(ARGV[4])
end
if trip_for == nil and ARGV[5] == '1' then
  trip_for = trip_ms
elseif trip_for == nil then
  redis.call('ZADD', KEYS[2], now, ARGV[7])
  redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now - window)
  redis.call('PEXPIRE', KEYS[2], window + 1000)
  if redis.call('ZCARD', KEYS[2]) >= failures then
    trip_for = trip_ms
  end
end

if trip_for then
  local until_ms = now + trip_for
  if until_ms > open_until then
    -- A new trip when the circuit was closed or half-open; a longer one extends the current.
    if open_until <= now then
      trip = trip + 1
    end
    open_until = until_ms
    redis.call('HSET', KEYS[1], 'open_until', string.format('%d', open_until), 'trip', string.format('%d', trip))
    redis.call('PEXPIRE', KEYS[1], trip_for + 86400000)
    redis.call('DEL', KEYS[2])
    redis.call('PUBLISH', ARGV[6], string.format('%s %d %d %d', string.match(KEYS[1], '{(.*)}'), open_until, trip, now))
  end
end
return {string.format('%d', open_until), string.format('%d', trip), string.format('%d', now)}
