-- breaker_probe.lua: grant the one probe of a trip whose time is up.
--
-- KEYS[1] tg:breaker:{BACKEND}   (see breaker_failure.lua)
-- ARGV[1] lease ms: a probe not resolved within this long may be granted again
-- ARGV[2] the longest trip (ms): a stored open_until further ahead counts as closed
--
-- Returns 1 when the caller may probe now, else 0.
--
-- Invariant: exactly one grant per trip while its holder lives (probe_trip = trip), so the
-- cluster sends one probe to a tripped backend, not one per replica.

local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local max_ms = tonumber(ARGV[2]) or 86400000
local h = redis.call('HMGET', KEYS[1], 'open_until', 'trip', 'probe_trip', 'probe_at')
local open_until = tonumber(h[1] or '0') or 0
if open_until ~= math.floor(open_until) or open_until < 0 or open_until > now + max_ms then
  open_until = 0
end
if open_until == 0 or open_until > now then
  return 0
end
local trip = h[2] or '0'
if h[3] == trip and now - (tonumber(h[4] or '0') or 0) < tonumber(ARGV[1]) then
  return 0
end
redis.call('HSET', KEYS[1], 'probe_trip', trip, 'probe_at', now)
return 1
