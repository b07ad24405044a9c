-- Take a connection out of a room: a user's leave, and the reaper's for each
-- membership of a dead node (so both keep the room's keys the same way).
-- Returns {removed, last, empty, name}: removed 1 if the connection was in the
-- room; last 1 if the user has no connection left there (name: the user's
-- display name, for the offline presence the caller publishes), also when this
-- connection was gone already (a retry whose first run's reply was lost must
-- still announce it); empty 1 if the room has no connection left (its history then
-- expires after room_ttl, its sequence after numbering_ttl: a room used again within
-- it goes on from its last id).
-- KEYS: conns counts names order seq hist rooms memberships node_memberships
-- ARGV: room conn user_id membership_token room_ttl numbering_ttl
local conns, counts, names, order, seq, hist = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6]
if redis.call('HDEL', conns, ARGV[2]) == 0 then
  local gone = redis.call('HEXISTS', counts, ARGV[3]) == 0
  return {0, gone and 1 or 0, redis.call('HLEN', conns) == 0 and 1 or 0, gone and ARGV[3] or ''}
end
redis.call('SREM', KEYS[9], ARGV[4])
local last = 0
local name = ''
if redis.call('HINCRBY', counts, ARGV[3], -1) <= 0 then
  name = redis.call('HGET', names, ARGV[3]) or ARGV[3]
  redis.call('HDEL', counts, ARGV[3])
  redis.call('HDEL', names, ARGV[3])
  redis.call('ZREM', order, ARGV[3])
  redis.call('DECR', KEYS[8])
  last = 1
end
local empty = 0
if redis.call('HLEN', conns) == 0 then
  redis.call('SREM', KEYS[7], ARGV[1])
  redis.call('DEL', counts, names, order)
  local now = expire_numbering(seq, ARGV[6])
  redis.call('PEXPIREAT', hist, now + tonumber(ARGV[5]) * 1000)
  empty = 1
end
return {1, last, empty, name}
