-- A reaper claims a dead node: 1 if this caller removed it from the nodes, so it
-- (and no concurrent reaper) removes the node's registrations; with ttl_ms, a node
-- that beat again since it was found silent is left alone (0).
-- KEYS: nodes   ARGV: node_id [ttl_ms]
if ARGV[2] then
  local score = redis.call('ZSCORE', KEYS[1], ARGV[1])
  local t = redis.call('TIME')
  if score and tonumber(score) > t[1] * 1000 + math.floor(t[2] / 1000) - tonumber(ARGV[2]) then
    return 0
  end
end
return redis.call('ZREM', KEYS[1], ARGV[1])
