-- Join a connection to a room; the user's first connection there is recorded in
-- order and counted. Returns {first, user_id, name, user_id, name, ...} (members
-- in join order).
-- KEYS: conns counts names order seq hist rooms memberships node_memberships
-- ARGV: room conn user_id username membership_token
local conns, counts, names, order, seq, hist = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6]
local first = 0
if redis.call('HEXISTS', conns, ARGV[2]) == 0 then
  if redis.call('HLEN', conns) == 0 then
    redis.call('SADD', KEYS[7], ARGV[1])
    persist_numbering(seq)
    redis.call('PERSIST', hist)
  end
  redis.call('HSET', conns, ARGV[2], ARGV[3])
  redis.call('SADD', KEYS[9], ARGV[5])
  if redis.call('HINCRBY', counts, ARGV[3], 1) == 1 then
    redis.call('HSET', names, ARGV[3], ARGV[4])
    local t = redis.call('TIME')
    redis.call('ZADD', order, t[1] * 1000000 + t[2], ARGV[3])
    redis.call('INCR', KEYS[8])
    first = 1
  end
end
local out = {first}
local ids = redis.call('ZRANGE', order, 0, -1)
for i = 1, #ids, 500 do
  local chunk = {}
  for j = i, math.min(i + 499, #ids) do chunk[#chunk + 1] = ids[j] end
  local got = redis.call('HMGET', names, unpack(chunk))
  for j = 1, #chunk do
    out[#out + 1] = chunk[j]
    out[#out + 1] = got[j] or chunk[j]
  end
end
return out
