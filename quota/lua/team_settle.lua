-- team_settle.lua: apply a batch's corrections of ONE team's budget (the team step of
-- reservations, see team_reserve.lua). The twin of the team part of `MemoryStore::settle`.
--
-- KEYS[1]    tg:teamspend:{TEAM}         hash: w (budget window start, unix s), spent (nano)
-- KEYS[2]    tg:tsettled:{TEAM}:BATCH    string marker: this batch was applied (1 h TTL)
-- KEYS[3..]  tg:tresv:{TEAM}:RID         reservation records (see team_reserve.lua)
-- ARGV[1]    milliseconds a tombstone lives
-- ARGV[2]    n, the number of corrections that follow
-- then n x   KEYS index of the record ("0" = none), mode, cost delta (actual - reserved, may
--            be negative), window start ("any" = whatever window the counter holds: usage
--            admitted without the team step). Modes as in settle.lua:
--              "c" settled: correct by delta if the record lives, drop the record
--              "r" settled after a retried reserve: the same, and leave a tombstone
--              "a" abandoned (or compensated): refund what the record says was debited, if it
--                  exists, and leave a tombstone
--
-- Returns n, or -1 when this batch was applied before.
--
-- Invariant: spent moves by each delta, never below 0, only in the window the reservation
-- debited (a live record's own window); a reservation is corrected at most once.

if not redis.call('SET', KEYS[2], '1', 'NX', 'PX', 3600000) then
  return -1
end

local function correct(delta, window)
  if delta == 0 then
    return
  end
  local sp = redis.call('HMGET', KEYS[1], 'w', 'spent')
  if sp[1] and (window == 'any' or tonumber(sp[1]) == tonumber(window)) then
    redis.call('HSET', KEYS[1], 'spent', string.format('%d', math.max((tonumber(sp[2]) or 0) + delta, 0)))
  end
end

local tombstone_ms = ARGV[1]
local n = tonumber(ARGV[2])
local i = 3
for _ = 1, n do
  local rkey = tonumber(ARGV[i])
  local mode = ARGV[i + 1]
  local delta = tonumber(ARGV[i + 2])
  local window = ARGV[i + 3]
  i = i + 4
  if rkey == 0 then
    correct(delta, window)
  else
    local rec = redis.call('GET', KEYS[rkey])
    if rec and rec ~= 'x' then
      local cost, w = string.match(rec, '^(%S+) (%S+)$')
      if mode == 'a' then
        correct(-tonumber(cost), w)
      else
        correct(delta, w)
      end
    end
    if mode == 'c' then
      redis.call('DEL', KEYS[rkey])
    else
      redis.call('SET', KEYS[rkey], 'x', 'PX', tombstone_ms)
    end
  end
end
return n
