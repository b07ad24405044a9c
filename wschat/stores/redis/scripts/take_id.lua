-- The start of post_room.lua and post_dm.lua (after charge.lua): refuse when a bucket
-- refused ({2, retry_after_ms}), answer a retry with what the dedupe key holds ({1,
-- "<id> <timestamp_ms>"}: the store finds the original in the history, or rebuilds it
-- from the retry's draft), else take the next id, splice it into the draft and
-- remember the id and timestamp (not the event: a key per message for an hour).
-- Leaves the event in `msg` and its id in `n`.
-- KEYS: seq ... [4]=dedupe (optional), then the buckets
-- ARGV: prefix suffix dedupe_ttl timestamp_ms ...
if RETRY > 0 then return {2, RETRY} end
local dedupe = NK >= 4 and KEYS[4]
if dedupe then
  local seen = redis.call('GET', dedupe)
  if seen then return {1, seen} end
end
local n = redis.call('INCR', KEYS[1])
local id = string.format('%d', n)
local msg = ARGV[1] .. id .. ARGV[2]
if dedupe then redis.call('SET', dedupe, id .. ' ' .. ARGV[4], 'EX', ARGV[3]) end
