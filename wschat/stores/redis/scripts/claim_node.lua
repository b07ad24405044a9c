-- A reaper claims a dead node: 1 if this caller may remove the node's registrations
-- (no concurrent reaper does meanwhile); 0 if the node beat again since it was found
-- silent (with ttl_ms), or is gone (reaped already).
-- The claim is a lease, not a removal: the node's score becomes now, as if it had
-- beaten, so every reaper leaves it alone for one ttl. The claimer removes the node
-- (ZREM) once its registrations are gone; if it fails before that, the node falls
-- silent again and a later beat reaps it.
-- KEYS: nodes   ARGV: node_id [ttl_ms]
local score = redis.call('ZSCORE', KEYS[1], ARGV[1])
if not score then return 0 end
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
if ARGV[2] and tonumber(score) > now - tonumber(ARGV[2]) then
  return 0
end
-- Out and in again: a ZADD first would be refused (OOM) by a Redis at maxmemory, and a
-- worker that died while Redis was full never reaped; a script that wrote already (the
-- ZREM, which never grows memory) may write on.
redis.call('ZREM', KEYS[1], ARGV[1])
redis.call('ZADD', KEYS[1], now, ARGV[1])
return 1
