-- A connection ended (or its node was reaped): its user counts one connection less, and
-- this node is no longer among the user's nodes once it has none of them left.
-- KEYS: node_conns presence user_nodes   ARGV: conn user_id node_id
if redis.call('HDEL', KEYS[1], ARGV[1]) == 1 then
  if redis.call('HINCRBY', KEYS[2], ARGV[2], -1) <= 0 then redis.call('HDEL', KEYS[2], ARGV[2]) end
  if redis.call('HINCRBY', KEYS[3], ARGV[3], -1) <= 0 then redis.call('HDEL', KEYS[3], ARGV[3]) end
end
return 1
