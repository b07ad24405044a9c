-- The start of post_room.lua and post_dm.lua (keys.script prepends it): answer a
-- retry with the stored event, else take the next id, splice it into the draft and
-- remember the event for retries. Leaves the event in `msg`.
-- KEYS: seq ... [4]=dedupe (optional)   ARGV: prefix suffix dedupe_ttl ...
if KEYS[4] then
  local seen = redis.call('GET', KEYS[4])
  if seen then return {1, seen} end
end
local id = redis.call('INCR', KEYS[1])
local msg = ARGV[1] .. string.format('%d', id) .. ARGV[2]
if KEYS[4] then redis.call('SET', KEYS[4], msg, 'EX', ARGV[3]) end
