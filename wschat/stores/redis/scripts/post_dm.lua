-- A direct message: take_id.lua (prepended) deduplicates and takes the next id;
-- this PUBLISHes to the recipient and (once, if another user) the sender.
-- Returns {duplicate, event}.
-- KEYS: dm_seq recipient_channel sender_channel [dedupe]
-- ARGV: prefix suffix dedupe_ttl
redis.call('PUBLISH', KEYS[2], msg)
if KEYS[3] ~= KEYS[2] then redis.call('PUBLISH', KEYS[3], msg) end
return {0, msg}
