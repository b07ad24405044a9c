-- A direct message: deduplicate, take the next id, PUBLISH to the recipient and
-- (once, if another user) the sender. Returns {duplicate, event}.
-- KEYS: dm_seq recipient_channel sender_channel [dedupe]
-- ARGV: prefix suffix dedupe_ttl
if KEYS[4] then
  local seen = redis.call('GET', KEYS[4])
  if seen then return {1, seen} end
end
local id = redis.call('INCR', KEYS[1])
local msg = ARGV[1] .. string.format('%d', id) .. ARGV[2]
if KEYS[4] then redis.call('SET', KEYS[4], msg, 'EX', ARGV[3]) end
redis.call('PUBLISH', KEYS[2], msg)
if KEYS[3] ~= KEYS[2] then redis.call('PUBLISH', KEYS[3], msg) end
return {0, msg}
