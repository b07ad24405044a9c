-- After charge.lua in post_dm and publish_dm: a DM has no history a worker could catch
-- it up from, so it may go out only if every live worker the recipient is connected at
-- (at least one) is subscribed to the recipient's channel now, and every live worker of
-- the sender's to the sender's (their other connections get it too). A worker whose
-- pub/sub connection is being made again is not: the DM is then refused (the sender
-- retries), not acknowledged and lost on that worker's connections. A worker counts as
-- live while its heartbeat is younger than fresh_ms; a dead one (killed, its
-- connections gone) stops counting then, before it is reaped.
-- KEYS: ... nodes (the heartbeats), the recipient's and the sender's user_nodes, then
-- the buckets.   Leaves HEARD(recipient_channel, sender_channel, fresh_ms) and NK, the
-- keys before these three.
local NODES, R_NODES, S_NODES = KEYS[NK - 2], KEYS[NK - 1], KEYS[NK]
NK = NK - 3
local function subscribed(channel, user_nodes, at_least, fresh_ms)
  local hearing = redis.call('PUBSUB', 'NUMSUB', channel)[2]
  if hearing >= math.max(redis.call('HLEN', user_nodes), at_least) then
    return true  -- every worker it is connected at (the usual case: no beat read)
  end
  local t = redis.call('TIME')
  local since_ms = t[1] * 1000 + math.floor(t[2] / 1000) - tonumber(fresh_ms)
  local live = 0
  for _, id in ipairs(redis.call('HKEYS', user_nodes)) do
    local beat = redis.call('ZSCORE', NODES, id)
    if beat and tonumber(beat) >= since_ms then live = live + 1 end
  end
  return hearing >= math.max(live, at_least)
end
local function HEARD(recipient_channel, sender_channel, fresh_ms)
  return subscribed(recipient_channel, R_NODES, 1, fresh_ms)
    and (sender_channel == recipient_channel
         or subscribed(sender_channel, S_NODES, 0, fresh_ms))
end
