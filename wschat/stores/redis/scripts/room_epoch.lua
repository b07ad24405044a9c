-- A room's epoch, for a member's `joined`: the name of its numbering, made here (ARGV[1])
-- if it has none. It lives exactly as long as the room's sequence (numbering.lua gives
-- both the same expiry at once), so a made one takes the sequence's remaining time.
-- A leave by a worker of a release before epochs (a rolling update) gives the sequence
-- alone its expiry: an epoch left without one beside a sequence with one gets the
-- sequence's here, and one left after its sequence expired is named anew by the first
-- join of the emptied room (no id was issued in a numbering without a sequence, and no
-- other member was told its name, so nothing could be counted in it).
-- KEYS: seq epoch conns   ARGV: new_epoch
local epoch = redis.call('GET', KEYS[2])
if epoch and redis.call('EXISTS', KEYS[1]) == 0 and redis.call('HLEN', KEYS[3]) <= 1 then
  epoch = false
end
if not epoch then
  epoch = ARGV[1]
  redis.call('SET', KEYS[2], epoch)
end
-- The clock read before the seq's remaining time: an end at that reading plus it is never
-- after the seq's (a PEXPIRE counts from a later reading: Redis 7.0 does not stop the
-- clock during a script).
local t = redis.call('TIME')
local ttl = redis.call('PTTL', KEYS[1])
if ttl > 0 and redis.call('PTTL', KEYS[2]) == -1 then
  redis.call('PEXPIREAT', KEYS[2], tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) + ttl)
end
return epoch
