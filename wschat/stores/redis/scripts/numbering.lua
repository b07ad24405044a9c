-- Prepended to every script that gives a room's sequence an expiry or takes it off: the
-- room's epoch (the name of its numbering, joined's `epoch`; room_epoch.lua) gets the
-- same, in the same step, so it never outlives the sequence: a numbering that starts
-- again from 1 is never named as the old one was. Its key is named from the seq key's
-- (same hash tag, same slot).
local function epoch_of(seq)
  return (string.gsub(seq, '}:seq$', '}:epoch'))
end
-- Returns the clock reading it counted from: a history's expiry set from it beside the
-- numbering (ROOM_TTL, never longer than ROOM_NUMBERING_TTL) never ends after the seq's.
local function expire_numbering(seq, ttl)
  -- One instant for both: each EXPIRE counts from its own reading of the clock (Redis 7.0
  -- does not stop it during a script), so the epoch's could end a few ms after the seq's.
  local t = redis.call('TIME')
  local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
  local at = now + tonumber(ttl) * 1000
  redis.call('PEXPIREAT', seq, at)
  redis.call('PEXPIREAT', epoch_of(seq), at)
  return now
end
local function persist_numbering(seq)
  redis.call('PERSIST', seq)
  redis.call('PERSIST', epoch_of(seq))
end
