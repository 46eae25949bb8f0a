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
--
-- Returns {open_until, trip, now} as strings after the failure (open_until "0" = closed).
-- Publishes "BACKEND open_until trip now" when the circuit opens or re-opens.
--
-- Invariant: a circuit only opens further (open_until never moves back); every key expires.

local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local failures, window, trip_ms = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local h = redis.call('HMGET', KEYS[1], 'open_until', 'trip')
local open_until = tonumber(h[1] or '0') or 0
local trip = tonumber(h[2] or '0') or 0

local trip_for = nil
if ARGV[4] ~= '' then
  trip_for = tonumber(ARGV[4])
elseif ARGV[5] == '1' then
  trip_for = trip_ms
else
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
    redis.call('HSET', KEYS[1], 'open_until', open_until, 'trip', trip)
    redis.call('PEXPIRE', KEYS[1], trip_for + 86400000)
    redis.call('DEL', KEYS[2])
    redis.call('PUBLISH', ARGV[6], string.format('%s %d %d %d', string.match(KEYS[1], '{(.*)}'), open_until, trip, now))
  end
end
return {string.format('%d', open_until), string.format('%d', trip), string.format('%d', now)}
