-- cache_put.lua: store one answer, keep its partition bounded, count it in its cache's total
-- and keep the whole cache bounded. The twin of `MemoryCache::put` (quota/src/cache/memory.rs).
--
-- The cache's store is one server (a standalone Redis or Valkey, or a Sentinel-managed
-- master: `[[cache]] store_url`), so one script may touch the partition's keys and the
-- cache's total, which carry different hash tags.
--
-- KEYS[1]  tg:cache:{CACHE:PART}:e:KEY   hash: a (answer), p (prompt text), part (PART),
--                                        v (float32 little-endian vector, semantic only)
-- KEYS[2]  tg:cache:{CACHE:PART}:order   zset: KEY -> expiry (unix us)
-- KEYS[3]  tg:cache:{CACHE}:all          zset: "PART:KEY" -> expiry (unix us)
-- ARGV[1]  ttl in milliseconds
-- ARGV[2]  max_entries of the partition
-- ARGV[3]  KEY
-- ARGV[4]  answer
-- ARGV[5]  prompt text ("" for exact-only entries)
-- ARGV[6]  PART
-- ARGV[7]  vector bytes ("" = none)
-- ARGV[8]  CACHE
-- ARGV[9]  max_total_entries of the cache
--
-- Returns the entry's expiry (unix us) and the number of entries evicted.
--
-- Invariant: a partition's order holds every live entry of the partition and the total every
-- live entry of the cache, each scored by when it expires; members whose entry has expired
-- are dropped; beyond max_entries in the partition, then beyond max_total_entries in the
-- cache, the soonest to expire (with one TTL per cache: the oldest) are deleted from both.
-- Every key carries a TTL.

local t = redis.call('TIME')
local now_us = tonumber(t[1]) * 1000000 + tonumber(t[2])
local now = string.format('%d', now_us)
local ttl_ms = tonumber(ARGV[1])
local expiry = string.format('%d', now_us + ttl_ms * 1000)
local cache = ARGV[8]

local function entry_key(part, key)
  return 'tg:cache:{' .. cache .. ':' .. part .. '}:e:' .. key
end

local function order_key(part)
  return 'tg:cache:{' .. cache .. ':' .. part .. '}:order'
end

-- A sorted set's key lives until its newest member expires.
local function expire_at_newest(k)
  local last = redis.call('ZRANGE', k, -1, -1, 'WITHSCORES')
  if last[2] then
    redis.call('PEXPIREAT', k, math.floor(tonumber(last[2]) / 1000) + 1)
  end
end

redis.call('DEL', KEYS[1])
if ARGV[7] ~= '' then
  redis.call('HSET', KEYS[1], 'a', ARGV[4], 'p', ARGV[5], 'part', ARGV[6], 'v', ARGV[7])
else
  redis.call('HSET', KEYS[1], 'a', ARGV[4], 'p', ARGV[5], 'part', ARGV[6])
end
redis.call('PEXPIRE', KEYS[1], ttl_ms)

-- The partition.
local evicted = 0
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)
redis.call('ZADD', KEYS[2], expiry, ARGV[3])
local over = redis.call('ZCARD', KEYS[2]) - tonumber(ARGV[2])
if over > 0 then
  local old = redis.call('ZPOPMIN', KEYS[2], over)
  for i = 1, #old, 2 do
    redis.call('DEL', entry_key(ARGV[6], old[i]))
    redis.call('ZREM', KEYS[3], ARGV[6] .. ':' .. old[i])
    evicted = evicted + 1
  end
end
expire_at_newest(KEYS[2])

-- The whole cache.
redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', now)
redis.call('ZADD', KEYS[3], expiry, ARGV[6] .. ':' .. ARGV[3])
over = redis.call('ZCARD', KEYS[3]) - tonumber(ARGV[9])
if over > 0 then
  local old = redis.call('ZPOPMIN', KEYS[3], over)
  for i = 1, #old, 2 do
    local part, key = string.match(old[i], '^([^:]*):(.*)$')
    if part then
      redis.call('DEL', entry_key(part, key))
      redis.call('ZREM', order_key(part), key)
      evicted = evicted + 1
    end
  end
end
expire_at_newest(KEYS[3])
return {expiry, evicted}
