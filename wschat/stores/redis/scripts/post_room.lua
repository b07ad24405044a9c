-- A room message in one round trip: deduplicate, take the next id, append to the
-- history, PUBLISH (payload: an empty exclude id, a newline, the event).
-- Returns {duplicate, event}.
-- KEYS: seq hist channel [dedupe]
-- ARGV: prefix suffix history_size dedupe_ttl
if KEYS[4] then
  local seen = redis.call('GET', KEYS[4])
  if seen then return {1, seen} end
end
local id = redis.call('INCR', KEYS[1])
local msg = ARGV[1] .. string.format('%d', id) .. ARGV[2]
redis.call('RPUSH', KEYS[2], msg)
redis.call('LTRIM', KEYS[2], -tonumber(ARGV[3]), -1)
if KEYS[4] then redis.call('SET', KEYS[4], msg, 'EX', ARGV[4]) end
redis.call('PUBLISH', KEYS[3], '\n' .. msg)
return {0, msg}
