-- The start of post_room.lua and post_dm.lua (after charge.lua): refuse when a bucket
-- refused ({2, retry_after_ms}), answer a retry with the stored event, else take the
-- next id, splice it into the draft and remember the event for retries. Leaves the
-- event in `msg`.
-- KEYS: seq ... [4]=dedupe (optional), then the buckets   ARGV: prefix suffix dedupe_ttl ...
if RETRY > 0 then return {2, RETRY} end
local dedupe = NK >= 4 and KEYS[4]
if dedupe then
  local seen = redis.call('GET', dedupe)
  if seen then return {1, seen} end
end
local id = redis.call('INCR', KEYS[1])
local msg = ARGV[1] .. string.format('%d', id) .. ARGV[2]
if dedupe then redis.call('SET', dedupe, msg, 'EX', ARGV[3]) end
