-- Between charge.lua and take_id.lua in post_dm_online: a DM to a user with no
-- connection anywhere is refused ({3, ''}: user_not_found) before it takes an id,
-- in the same round trip. Not checked when a bucket already refused (the rate limit
-- answers first, as with separate checks).
-- KEYS: ... [dedupe] presence, then dm_heard.lua's three and the buckets
-- ARGV: ... recipient_id, then the bucket tail
if RETRY == 0 then
  local count = tonumber(redis.call('HGET', KEYS[NK], ARGV[#ARGV - 1 - 3 * NB]) or '0')
  if count <= 0 then return {3, ''} end
end
NK = NK - 1  -- take_id.lua sees the keys before the presence hash
