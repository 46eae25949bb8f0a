-- breaker_close.lua: close a backend's circuit after a success.
--
-- KEYS[1] tg:breaker:{BACKEND}   KEYS[2] tg:bfail:{BACKEND}
-- ARGV[1] channel to publish on (tg:breaker)
-- ARGV[2] the longest trip (ms): a stored open_until further ahead is not one (see below)
--
-- Returns 1 if the circuit was half-open (its trip time up) and is now closed, else 0: a success
-- of a request sent before the trip never cuts a trip short. Publishes "BACKEND 0 trip now"
-- on a change.
--
-- Invariant: the trip counter survives (it only grows); the failure window starts empty. An
-- open_until that is not an integer within one trip from now (written by an older version)
-- counts as closed, as in breaker_failure.lua, and is rewritten so.

local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local max_ms = tonumber(ARGV[2]) or 86400000
local h = redis.call('HMGET', KEYS[1], 'open_until', 'trip')
local open_until = tonumber(h[1] or '0') or 0
if open_until ~= math.floor(open_until) or open_until < 0 or open_until > now + max_ms then
  -- Not a circuit this version could have written: rewrite it closed, with a TTL.
  redis.call('HSET', KEYS[1], 'open_until', 0)
  redis.call('PEXPIRE', KEYS[1], 86400000)
  return 0
end
if open_until == 0 or open_until > now then
  return 0
end
local trip = h[2] or '0'
redis.call('HSET', KEYS[1], 'open_until', 0, 'trip', trip, 'probe_trip', '', 'probe_at', 0)
redis.call('PEXPIRE', KEYS[1], 86400000)
redis.call('DEL', KEYS[2])
redis.call('PUBLISH', ARGV[1], string.format('%s 0 %s %d', string.match(KEYS[1], '{(.*)}'), trip, now))
return 1
