-- A room message in one round trip: take_id.lua (prepended) deduplicates and takes
-- the next id; this appends to the history and PUBLISHes (payload: an empty
-- exclude id, a newline, the event). Returns {duplicate, event}.
-- KEYS: seq hist channel [dedupe]
-- ARGV: prefix suffix dedupe_ttl history_size
redis.call('RPUSH', KEYS[2], msg)
redis.call('LTRIM', KEYS[2], -tonumber(ARGV[4]), -1)
redis.call('PUBLISH', KEYS[3], '\n' .. msg)
return {0, msg}
