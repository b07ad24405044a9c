-- This node's heartbeat. Returns {1 if this node was registered before this beat
-- else 0, ids of nodes silent longer than ttl_ms, ids of the live ones, this one too
-- (epoch.py's peers if Redis loses its data), 1 if this beat listed this node in
-- numbered_by_database anew (not listed before: its first beat, or its listing ran out
-- while it stalled and posts numbered in Redis were taken meanwhile) else 0}.
-- KEYS: nodes numbered_by_database ready
-- ARGV: node_id ttl_ms database ('1': this node numbers messages in the database,
--       ENABLE_PERSISTENCE, and posts numbered in Redis must wait while it lives;
--       gate.lua)
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
local known = redis.call('ZSCORE', KEYS[1], ARGV[1]) and 1 or 0
-- A database-numbering node that died is forgotten once its own listing ran out: its
-- score is the time until which it counts as alive (its beat plus its PRESENCE_TTL), not
-- its beat, so that a node with a shorter PRESENCE_TTL (a rolling update changing both
-- settings) does not drop it between its beats.
-- It comes first: a Redis at maxmemory refuses a script's first write that may grow
-- memory (ZADD) with OOM, and lets the rest of a script that wrote already run. A beat
-- refused so made every worker silent while Redis was full, and the first beat after
-- it reaped every other one as dead (its users offline in every room); this removal
-- (a write that never grows memory) lets the beat through.
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', '(' .. now)
redis.call('ZADD', KEYS[1], now, ARGV[1])
local silent = now - tonumber(ARGV[2])
local anew = 0
if ARGV[3] == '1' then
  anew = redis.call('ZADD', KEYS[2], now + tonumber(ARGV[2]), ARGV[1])
  redis.call('DEL', KEYS[3])
end
return {known, redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', silent),
        redis.call('ZRANGEBYSCORE', KEYS[1], '(' .. silent, '+inf'), anew}
