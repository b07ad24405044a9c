-- A connection of this node counts its user online (once per connection).
-- KEYS: node_conns presence   ARGV: conn user_id
if redis.call('HSETNX', KEYS[1], ARGV[1], ARGV[2]) == 1 then
  redis.call('HINCRBY', KEYS[2], ARGV[2], 1)
end
return 1
