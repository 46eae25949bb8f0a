-- heartbeat.lua: mark a replica alive and count the live ones.
--
-- KEYS[1] tg:replicas            sorted set: replica id -> last heartbeat (unix ms)
-- ARGV[1] replica id             ARGV[2] ttl ms (a replica silent this long is gone)
--
-- Returns the number of live replicas (>= 1).
--
-- Invariant: the set holds only replicas heard from within the ttl, and expires when all stop.

local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ttl = tonumber(ARGV[2])
redis.call('ZADD', KEYS[1], now, ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - ttl)
redis.call('PEXPIRE', KEYS[1], ttl * 2)
return redis.call('ZCARD', KEYS[1])
