-- cache_put.lua: store a batch of answers; for each, in order, keep its partition bounded,
-- count it in its cache's total and keep the whole cache bounded. Entry by entry the twin of
-- `MemoryCache::put` (quota/src/cache/memory.rs); one call stores what the writer has queued
-- (quota/src/cache/writer.rs), so the clock, the dropping of expired members, the counts and
-- the orders' TTLs are read and written once per batch, not once per answer.
--
-- The cache's store is one server (a standalone Redis or Valkey, or a Sentinel-managed
-- master: `[[cache]] store_url`), so one script may touch every partition's keys and the
-- cache's total, which carry different hash tags.
--
-- Entry i (1-based) of the batch:
-- KEYS[3i-2]  tg:cache:{CACHE:PART}:e:KEY   hash: a (answer), p (prompt text), part (PART),
--                                           v (float32 little-endian vector, semantic only)
-- KEYS[3i-1]  tg:cache:{CACHE:PART}:order   zset: KEY -> expiry (unix us)
-- KEYS[3i]    tg:cache:{CACHE}:all          zset: "PART:KEY" -> expiry (unix us)
-- ARGV[9i-8]  ttl in milliseconds
-- ARGV[9i-7]  max_entries of the partition
-- ARGV[9i-6]  KEY
-- ARGV[9i-5]  answer
-- ARGV[9i-4]  prompt text ("" for exact-only entries)
-- ARGV[9i-3]  PART
-- ARGV[9i-2]  vector bytes ("" = none)
-- ARGV[9i-1]  CACHE
-- ARGV[9i]    max_total_entries of the cache
--
-- Returns, per entry, its expiry (unix us) and the number of entries its storing evicted.
--
-- Invariant: a partition's order holds every live entry of the partition and the total every
-- live entry of the cache, each scored by when it expires; members whose entry has expired
-- are dropped; beyond max_entries in the partition, then beyond max_total_entries in the
-- cache, the soonest to expire (with one TTL per cache: the oldest) are deleted from both.
-- Every key carries a TTL.

local t = redis.call('TIME')
local now_us = tonumber(t[1]) * 1000000 + tonumber(t[2])
local now = string.format('%d', now_us)

local function entry_key(cache, part, key)
  return 'tg:cache:{' .. cache .. ':' .. part .. '}:e:' .. key
end

local function order_key(cache, part)
  return 'tg:cache:{' .. cache .. ':' .. part .. '}:order'
end

-- Members of each sorted set touched by this batch, once its expired members are dropped.
local counts = {}
local touched = {}
local function count(k)
  local n = counts[k]
  if n == nil then
    redis.call('ZREMRANGEBYSCORE', k, '-inf', now)
    n = redis.call('ZCARD', k)
    counts[k] = n
    touched[#touched + 1] = k
  end
  return n
end

-- Adds a member; returns how many the set holds beyond `max`.
local function add(k, score, member, max)
  local n = count(k) + redis.call('ZADD', k, score, member)
  counts[k] = n
  return n - max
end

-- Pops the `over` soonest to expire of `k`.
local function pop(k, over)
  local old = redis.call('ZPOPMIN', k, over)
  counts[k] = counts[k] - #old / 2
  return old
end

local out = {}
for i = 1, #KEYS / 3 do
  local entry, order, total = KEYS[3 * i - 2], KEYS[3 * i - 1], KEYS[3 * i]
  local a = 9 * (i - 1)
  local ttl_ms, max_entries, key = tonumber(ARGV[a + 1]), tonumber(ARGV[a + 2]), ARGV[a + 3]
  local part, vector, cache = ARGV[a + 6], ARGV[a + 7], ARGV[a + 8]
  local max_total = tonumber(ARGV[a + 9])
  local expiry = string.format('%d', now_us + ttl_ms * 1000)

  redis.call('DEL', entry)
  if vector ~= '' then
    redis.call('HSET', entry, 'a', ARGV[a + 4], 'p', ARGV[a + 5], 'part', part, 'v', vector)
  else
    redis.call('HSET', entry, 'a', ARGV[a + 4], 'p', ARGV[a + 5], 'part', part)
  end
  redis.call('PEXPIRE', entry, ttl_ms)

  -- The partition.
  local evicted = 0
  local over = add(order, expiry, key, max_entries)
  if over > 0 then
    local old = pop(order, over)
    for j = 1, #old, 2 do
      redis.call('DEL', entry_key(cache, part, old[j]))
      if count(total) > 0 then
        counts[total] = counts[total] - redis.call('ZREM', total, part .. ':' .. old[j])
      end
      evicted = evicted + 1
    end
  end

  -- The whole cache.
  over = add(total, expiry, part .. ':' .. key, max_total)
  if over > 0 then
    local old = pop(total, over)
    for j = 1, #old, 2 do
      local p, k = string.match(old[j], '^([^:]*):(.*)$')
      if p then
        redis.call('DEL', entry_key(cache, p, k))
        local o = order_key(cache, p)
        if count(o) > 0 then
          counts[o] = counts[o] - redis.call('ZREM', o, k)
        end
        evicted = evicted + 1
      end
    end
  end
  out[#out + 1] = expiry
  out[#out + 1] = evicted
end

-- A sorted set's key lives until its newest member expires.
for _, k in ipairs(touched) do
  local last = redis.call('ZRANGE', k, -1, -1, 'WITHSCORES')
  if last[2] then
    redis.call('PEXPIREAT', k, math.floor(tonumber(last[2]) / 1000) + 1)
  end
end
return out
