-- With persistence: a committed DM kept for a recipient offline goes to the sender's
-- channel only (their other connections get a copy). It has no history a worker could
-- catch it up from either: if a live worker the sender is connected at is not
-- subscribed to the sender's channel (dm_heard.lua's subscribed(), prepended with
-- charge.lua, which spends no bucket here), nothing is published and the reply says so
-- (the sender is told to retry; the retry publishes it again).
-- Returns 1 published, 0 not every worker of the sender's would have heard it.
-- KEYS: sender_channel nodes sender_nodes sender_nodes   ARGV: msg fresh_ms 0
if not subscribed(KEYS[1], S_NODES, 0, ARGV[2]) then return 0 end
redis.call('PUBLISH', KEYS[1], ARGV[1])
return 1
