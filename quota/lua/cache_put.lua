-- cache_put.lua: store one answer in a cache partition and keep the partition bounded.
-- The twin of `MemoryCache::put` (quota/src/cache/memory.rs), partition part.
--
-- KEYS[1]  tg:cache:{CACHE:PART}:e:KEY   hash: a (answer), p (prompt text), part (PART),
--                                        v (float32 little-endian vector, semantic only)
-- KEYS[2]  tg:cache:{CACHE:PART}:order   zset: KEY -> expiry (unix us)
-- ARGV[1]  ttl in milliseconds
-- ARGV[2]  max_entries of the partition
-- ARGV[3]  KEY
-- ARGV[4]  answer
-- ARGV[5]  prompt text ("" for exact-only entries)
-- ARGV[6]  PART
-- ARGV[7]  vector bytes ("" = none)
-- ARGV[8]  the entry key prefix, tg:cache:{CACHE:PART}:e: (evicted entries are deleted by
--          name; they share KEYS[1]'s hash tag, so the script still touches one slot)
--
-- Returns {expiry in unix us, evicted KEY...}.
--
-- Invariant: the order holds every live entry of the partition, scored by when it expires;
-- members whose entry has expired are dropped; beyond max_entries the soonest to expire (with
-- one TTL per cache: the oldest) are deleted. Every key carries a TTL.

local t = redis.call('TIME')
local now_us = tonumber(t[1]) * 1000000 + tonumber(t[2])
local ttl_ms = tonumber(ARGV[1])
local expiry = now_us + ttl_ms * 1000

redis.call('DEL', KEYS[1])
if ARGV[7] ~= '' then
  redis.call('HSET', KEYS[1], 'a', ARGV[4], 'p', ARGV[5], 'part', ARGV[6], 'v', ARGV[7])
else
  redis.call('HSET', KEYS[1], 'a', ARGV[4], 'p', ARGV[5], 'part', ARGV[6])
end
redis.call('PEXPIRE', KEYS[1], ttl_ms)

redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', string.format('%d', now_us))
redis.call('ZADD', KEYS[2], string.format('%d', expiry), ARGV[3])
local out = {string.format('%d', expiry)}
local over = redis.call('ZCARD', KEYS[2]) - tonumber(ARGV[2])
if over > 0 then
  local old = redis.call('ZPOPMIN', KEYS[2], over)
  for i = 1, #old, 2 do
    redis.call('DEL', ARGV[8] .. old[i])
    table.insert(out, old[i])
  end
end
local last = redis.call('ZRANGE', KEYS[2], -1, -1, 'WITHSCORES')
redis.call('PEXPIREAT', KEYS[2], math.floor(tonumber(last[2]) / 1000) + 1)
return out
