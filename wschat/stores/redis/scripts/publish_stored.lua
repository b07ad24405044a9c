-- With persistence the database numbers room messages; this publishes a committed
-- one in id order across workers: "seq" is then the highest id published. An id
-- whose predecessor is not published yet waits in "held" until it is.
-- Returns 1 published (with whatever it released), 0 held, -1 already past it.
-- KEYS: seq hist channel held
-- ARGV: id msg history_size room_ttl numbering_ttl unattended
local id = tonumber(ARGV[1])
local seq = tonumber(redis.call('GET', KEYS[1]) or '0')
if id <= seq then return -1 end
if id > seq + 1 then
  redis.call('HSET', KEYS[4], ARGV[1], ARGV[2])
  redis.call('EXPIRE', KEYS[4], 300)
  return 0
end
local msg = ARGV[2]
local began = false  -- the history: this began it
while msg do
  if redis.call('RPUSH', KEYS[2], msg) == 1 then began = true end
  redis.call('PUBLISH', KEYS[3], '\n' .. msg)
  seq = seq + 1
  local nxt = string.format('%d', seq + 1)
  msg = redis.call('HGET', KEYS[4], nxt)
  if msg then redis.call('HDEL', KEYS[4], nxt) end
end
redis.call('SET', KEYS[1], seq, 'KEEPTTL')
redis.call('LTRIM', KEYS[2], -tonumber(ARGV[3]), -1)
-- A room nobody is in gets its TTLs (unattended.lua), looked at as post_room.lua does
-- (ARGV[6] '1': the server API's messages, or the releaser's, whose sender's leave may
-- have come first).
if ARGV[6] == '1' or began then
  expire_if_unattended(KEYS[1], KEYS[2], ARGV[4], ARGV[5])
end
return 1
