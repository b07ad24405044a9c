-- A connection ended (or its node was reaped): its user counts one connection less.
-- KEYS: node_conns presence   ARGV: conn user_id
if redis.call('HDEL', KEYS[1], ARGV[1]) == 1 then
  if redis.call('HINCRBY', KEYS[2], ARGV[2], -1) <= 0 then redis.call('HDEL', KEYS[2], ARGV[2]) end
end
return 1
