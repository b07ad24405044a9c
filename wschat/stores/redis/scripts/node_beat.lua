-- This node's heartbeat. Returns {1 if this node was registered before this beat
-- else 0, ids of nodes silent longer than ttl_ms}.
-- KEYS: nodes   ARGV: node_id ttl_ms
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
local known = redis.call('ZSCORE', KEYS[1], ARGV[1]) and 1 or 0
redis.call('ZADD', KEYS[1], now, ARGV[1])
return {known, redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now - tonumber(ARGV[2]))}
