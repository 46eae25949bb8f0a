-- cache_total.lua: count one stored entry in its cache's total and keep the total bounded.
-- The twin of `MemoryCache::put` (quota/src/cache/memory.rs), whole-cache part.
--
-- KEYS[1]  tg:cache:{CACHE}:all   zset: "PART:KEY" -> expiry (unix us)
-- ARGV[1]  the member added, "PART:KEY"
-- ARGV[2]  its expiry (unix us), as cache_put.lua returned it
-- ARGV[3]  max_total_entries
-- ARGV[4..] members to remove first (entries cache_put.lua evicted from their partition)
--
-- Returns the members evicted beyond max_total_entries: the caller deletes their entries and
-- removes them from their partition's order.
--
-- Invariant: the zset holds every live entry of the cache, scored by expiry; expired members
-- are dropped on every call, so ZCARD (after a clean) is the cache's entry count.

local t = redis.call('TIME')
local now_us = tonumber(t[1]) * 1000000 + tonumber(t[2])
for i = 4, #ARGV do
  redis.call('ZREM', KEYS[1], ARGV[i])
end
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', string.format('%d', now_us))
redis.call('ZADD', KEYS[1], ARGV[2], ARGV[1])
local out = {}
local over = redis.call('ZCARD', KEYS[1]) - tonumber(ARGV[3])
if over > 0 then
  local old = redis.call('ZPOPMIN', KEYS[1], over)
  for i = 1, #old, 2 do
    table.insert(out, old[i])
  end
end
local last = redis.call('ZRANGE', KEYS[1], -1, -1, 'WITHSCORES')
redis.call('PEXPIREAT', KEYS[1], math.floor(tonumber(last[2]) / 1000) + 1)
return out
