-- Prepended to every script that gives a room's sequence an expiry or takes it off: the
-- room's epoch (the name of its numbering, joined's `epoch`; room_epoch.lua) gets the
-- same, in the same step, so it never outlives the sequence: a numbering that starts
-- again from 1 is never named as the old one was. Its key is named from the seq key's
-- (same hash tag, same slot).
local function epoch_of(seq)
  return (string.gsub(seq, '}:seq$', '}:epoch'))
end
local function expire_numbering(seq, ttl)
  redis.call('EXPIRE', seq, ttl)
  redis.call('EXPIRE', epoch_of(seq), ttl)
end
local function persist_numbering(seq)
  redis.call('PERSIST', seq)
  redis.call('PERSIST', epoch_of(seq))
end
