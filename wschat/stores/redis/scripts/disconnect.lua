-- A connection ended (or its node was reaped): its user counts one connection less, and
-- this node is no longer among the user's nodes once it has none of them left.
-- KEYS: node_conns presence user_nodes   ARGV: conn user_id node_id [last]
-- last = '1' (the worker's own disconnects): this node has no other connection of the
-- user, so it leaves her nodes whatever its count there says (a reaper of the release
-- before user_nodes took her connections here out without counting them off, and the
-- worker registered them again on top). The reaper passes none: it counts them off.
if redis.call('HDEL', KEYS[1], ARGV[1]) == 1 then
  if redis.call('HINCRBY', KEYS[2], ARGV[2], -1) <= 0 then redis.call('HDEL', KEYS[2], ARGV[2]) end
  if redis.call('HINCRBY', KEYS[3], ARGV[3], -1) <= 0 then redis.call('HDEL', KEYS[3], ARGV[3]) end
end
if ARGV[4] == '1' then redis.call('HDEL', KEYS[3], ARGV[3]) end
return 1
