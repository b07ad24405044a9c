-- A direct message: charge.lua and take_id.lua (prepended) spend the sender's tokens,
-- deduplicate and take the next id; this PUBLISHes to the
-- recipient and (once, if another user) the sender.
-- Returns {0, id} (the worker splices it into its draft as this did: the event is
-- not sent back), {1, "<id> <timestamp_ms>"} for a retry (take_id.lua), or
-- {2, retry_after_ms} when a bucket refused.
-- KEYS: dm_seq recipient_channel sender_channel [dedupe] [buckets...]
-- ARGV: prefix suffix dedupe_ttl timestamp_ms [recipient_id] [rate burst cost]... NB
redis.call('PUBLISH', KEYS[2], msg)
if KEYS[3] ~= KEYS[2] then redis.call('PUBLISH', KEYS[3], msg) end
return {0, n}
