-- seed_consumer.lua: write a consumer from configuration only if the store has none by that id.
--
-- KEYS[1] tg:consumer:{ID}  hash: team, tpm, quota, quota_period, models, disabled
-- ARGV    field, value, field, value, ... (at least one pair)
--
-- Returns 1 if the hash was written, 0 if a record already existed (left untouched).
--
-- Invariant: an existing record is never modified — once seeded, the store wins over the
-- configuration file, so an operator's HSET survives a gateway restart.

if redis.call('EXISTS', KEYS[1]) == 1 then
  return 0
end
redis.call('HSET', KEYS[1], unpack(ARGV))
return 1
