-- A direct message: charge.lua and take_id.lua (prepended) spend the sender's tokens,
-- deduplicate and take the next id; this PUBLISHes to the
-- recipient and (once, if another user) the sender.
-- A DM has no history to be caught up from: if a worker the recipient or the sender is
-- connected at is not subscribed to their channel (its pub/sub connection is being
-- made again, or it died and is not reaped yet: dm_heard.lua), a connection would
-- never get it. It is then not stored ({4, ''}: unavailable, the dedupe key dropped so
-- that a retry posts it), and nothing is published.
-- Returns {0, id} (the worker splices it into its draft as this did: the event is
-- not sent back), {1, "<id> <timestamp_ms>"} for a retry (take_id.lua),
-- {2, retry_after_ms} when a bucket refused, or {4, ''}.
-- KEYS: dm_seq recipient_channel sender_channel [dedupe] [presence]
--       nodes recipient_nodes sender_nodes [buckets...]
-- ARGV: prefix suffix dedupe_ttl timestamp_ms fresh_ms [recipient_id]
--       [rate burst cost]... NB
if not HEARD(KEYS[2], KEYS[3], ARGV[5]) then
  if dedupe then redis.call('DEL', dedupe) end
  return {4, ''}
end
redis.call('PUBLISH', KEYS[2], msg)
if KEYS[3] ~= KEYS[2] then redis.call('PUBLISH', KEYS[3], msg) end
return {0, n}
