-- Never lets a sequence (a room's, or the DMs') go backwards, nor an emptied room's
-- sequence lose its expiry (ROOM_NUMBERING_TTL): a plain SET would keep it in Redis for good.
-- A room's sequence (conns and numbering_ttl given) without expiry while nobody is in the
-- room (this SET made it where Redis had none, or an older path left it so) gets
-- numbering_ttl, as after a leave; join.lua takes it off. The DMs' sequence never expires.
-- KEYS: seq [conns]   ARGV: at_least [numbering_ttl]
local current = tonumber(redis.call('GET', KEYS[1]) or '0')
if current < tonumber(ARGV[1]) then redis.call('SET', KEYS[1], ARGV[1], 'KEEPTTL') end
if ARGV[2] and redis.call('TTL', KEYS[1]) == -1 and redis.call('EXISTS', KEYS[2]) == 0 then
  expire_numbering(KEYS[1], ARGV[2])
end
return 1
