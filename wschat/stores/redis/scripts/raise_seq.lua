-- Never lets a sequence (a room's, or the DMs') go backwards, nor an emptied room's
-- sequence lose its expiry (ROOM_NUMBERING_TTL): a plain SET would keep it in Redis for good.
-- KEYS: seq   ARGV: at_least
local current = tonumber(redis.call('GET', KEYS[1]) or '0')
if current < tonumber(ARGV[1]) then redis.call('SET', KEYS[1], ARGV[1], 'KEEPTTL') end
return 1
