-- A connection of this node counts its user online (once per connection), and this
-- node among the nodes the user is connected at (how many workers a DM to them must reach).
-- KEYS: node_conns presence user_nodes   ARGV: conn user_id node_id
if redis.call('HSETNX', KEYS[1], ARGV[1], ARGV[2]) == 1 then
  redis.call('HINCRBY', KEYS[2], ARGV[2], 1)
  redis.call('HINCRBY', KEYS[3], ARGV[3], 1)
end
return 1
