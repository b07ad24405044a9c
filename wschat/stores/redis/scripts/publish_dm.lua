-- With persistence: a committed DM to a recipient online, published as post_dm.lua
-- publishes one: to the recipient, then (once, if another user) to the sender. A DM has
-- no history a worker could catch it up from: if no worker is subscribed to the
-- recipient's channel (its pub/sub connection is being made again, or it died and is
-- not reaped yet), nobody would ever get it, so the sender's channel hears nothing
-- either and the reply says so (the sender is told to retry).
-- Returns 1 published, 0 nobody subscribed to the recipient's channel.
-- KEYS: recipient_channel sender_channel   ARGV: msg
if redis.call('PUBLISH', KEYS[1], ARGV[1]) == 0 then return 0 end
if KEYS[2] ~= KEYS[1] then redis.call('PUBLISH', KEYS[2], ARGV[1]) end
return 1
