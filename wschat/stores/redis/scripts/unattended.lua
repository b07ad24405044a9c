-- Prepended (after numbering.lua) to post_room.lua and publish_stored.lua: a room nobody
-- is in keeps its history room_ttl seconds (ROOM_TTL) and its sequence (and epoch)
-- numbering_ttl (ROOM_NUMBERING_TTL) from now, as after its last leave (never joined, or
-- its history expired, they stayed for good); an emptied room's TTLs run on (its history
-- has one). join.lua takes them off. The room's conns key is named from its seq key, not
-- in KEYS (as gate.lua's): same hash tag, same slot.
local function expire_if_unattended(seq, hist, room_ttl, numbering_ttl)
  if redis.call('TTL', hist) == -1
      and redis.call('EXISTS', (string.gsub(seq, '}:seq$', '}:conns'))) == 0 then
    local now = expire_numbering(seq, numbering_ttl)
    redis.call('PEXPIREAT', hist, now + tonumber(room_ttl) * 1000)
  end
end
