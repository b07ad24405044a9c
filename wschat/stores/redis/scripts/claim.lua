-- A place for a connection of the user about to be registered (connect.lua takes it over
-- by its conn id), if she holds fewer than `cap` connections across every worker and pod:
-- those registered (presence) and the places claimed and not yet expired (an upgrade's
-- handshake, an auth's registration, still under way). One script: concurrent claims on
-- many workers cannot all see the same count. A place expires by itself (a worker that
-- died holding it); the clock is Redis's, shared by every worker. The ZADD is the first
-- write: a Redis at maxmemory refuses it (OOM), as it would the registration; a removal
-- first would let every write after it through.
-- KEYS: presence user_claims   ARGV: user_id conn cap ttl_ms
-- Reply: 1 (claimed) or 0 (the user is at the cap).
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local held = tonumber(redis.call('HGET', KEYS[1], ARGV[1]) or '0')
  + redis.call('ZCOUNT', KEYS[2], '(' .. now, '+inf')
if held >= tonumber(ARGV[3]) then return 0 end
redis.call('ZADD', KEYS[2], now + tonumber(ARGV[4]), ARGV[2])
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)
redis.call('PEXPIRE', KEYS[2], ARGV[4])
return 1
