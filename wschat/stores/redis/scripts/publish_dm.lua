-- With persistence: a committed DM to a recipient online, published as post_dm.lua
-- publishes one: to the recipient, then (once, if another user) to the sender. A DM has
-- no history a worker could catch it up from: if a worker the recipient or the sender is
-- connected at is not subscribed to their channel (dm_heard.lua, prepended with
-- charge.lua, which spends no bucket here), nothing is published and the reply says so
-- (the sender is told to retry).
-- Returns 1 published, 0 not every worker of the two would have heard it.
-- KEYS: recipient_channel sender_channel nodes recipient_nodes sender_nodes
-- ARGV: msg fresh_ms 0
if not HEARD(KEYS[1], KEYS[2], ARGV[2]) then return 0 end
redis.call('PUBLISH', KEYS[1], ARGV[1])
if KEYS[2] ~= KEYS[1] then redis.call('PUBLISH', KEYS[2], ARGV[1]) end
return 1
