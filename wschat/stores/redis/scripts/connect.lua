-- A connection of this node counts its user online (once per connection), and this
-- node among the nodes the user is connected at (how many workers a DM to them must reach).
-- One Redis holds already (a worker's recovery registers its live connections again) is
-- left as it is without a write: a Redis at maxmemory refuses a script's first write
-- that may grow memory (HSETNX, even one that would change nothing) with OOM, and a
-- recovery refused so left the worker not ready for as long as Redis stayed full.
-- The place claim.lua gave the connection (if any) is taken over: it counts in presence now.
-- Taken off last: a write before the HSET would let it through at maxmemory (Redis checks
-- only a script's first write), and a new connection must be refused there.
-- KEYS: node_conns presence user_nodes [user_claims]   ARGV: conn user_id node_id
if redis.call('HEXISTS', KEYS[1], ARGV[1]) == 0 then
  redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
  redis.call('HINCRBY', KEYS[2], ARGV[2], 1)
  redis.call('HINCRBY', KEYS[3], ARGV[3], 1)
end
if KEYS[4] then redis.call('ZREM', KEYS[4], ARGV[1]) end
return 1
