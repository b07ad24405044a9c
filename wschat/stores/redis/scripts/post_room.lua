-- A room message in one round trip: charge.lua and take_id.lua (prepended) spend the
-- sender's rate-limit tokens, deduplicate and take the next id; this appends to the
-- history and PUBLISHes (payload: an empty exclude id, a newline, the event).
-- Returns {0, id} (the worker splices it into its draft as this did: the event is
-- not sent back), {1, "<id> <timestamp_ms>"} for a retry (take_id.lua), or
-- {2, retry_after_ms} when a bucket refused.
-- KEYS: seq hist channel [dedupe] [buckets...]
-- ARGV: prefix suffix dedupe_ttl timestamp_ms history_size room_ttl numbering_ttl
--       unattended [rate burst cost]... NB
local length = redis.call('RPUSH', KEYS[2], msg)
redis.call('LTRIM', KEYS[2], -tonumber(ARGV[5]), -1)
-- A room nobody is in gets its TTLs (unattended.lua): looked at for the server API's
-- posts (ARGV[8] '1': the only ones meant for a room nobody may be in) and for a post
-- that began the room's history (a member's that landed after the member's leave
-- emptied the room); a member's other posts skip these two commands.
if ARGV[8] == '1' or length == 1 then
  expire_if_unattended(KEYS[1], KEYS[2], ARGV[6], ARGV[7])
end
redis.call('PUBLISH', KEYS[3], '\n' .. msg)
return {0, n}
