-- Token buckets, spent in order (wschat.ratelimit.take() ported step by step): the
-- start of rate_limit.lua, and of post_room.lua and post_dm.lua when a message pays
-- for itself in the same call (one round trip for the limit and the post).
-- KEYS: ... then the NB bucket keys last: "<tokens> <last>" or missing (= full)
-- ARGV: ... then rate burst cost for each bucket, then NB
-- Leaves RETRY (0: every bucket paid; else ms until the refusing bucket has the
-- tokens; the buckets after it are not touched) and NK, the keys before the buckets.
-- The clock is the Redis server's TIME, shared by every worker and pod; a bucket
-- expires when it would be full again, so a missing key means the same.
local NB = tonumber(ARGV[#ARGV])
local NK = #KEYS - NB
local RETRY = 0
if NB > 0 then
  local t = redis.call('TIME')
  local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
  local base = #ARGV - 1 - 3 * NB
  for i = 1, NB do
    local key = KEYS[NK + i]
    local rate, burst = tonumber(ARGV[base + 3 * i - 2]), tonumber(ARGV[base + 3 * i - 1])
    local cost = math.min(tonumber(ARGV[base + 3 * i]), burst)
    local tokens, last = burst, now
    local saved = redis.call('GET', key)
    if saved then
      local a, b = string.match(saved, '^(%S+) (%S+)$')
      if a then tokens, last = tonumber(a), tonumber(b) end
    end
    local elapsed = now - last
    if elapsed < 0 then elapsed = 0 end
    tokens = math.min(burst, tokens + elapsed * rate)
    if tokens >= cost - 1e-9 then
      tokens = math.max(0, tokens - cost)
    else
      RETRY = math.max(1, math.ceil((cost - tokens) / rate * 1000))
    end
    local ttl = math.ceil((burst - tokens) / rate * 1000)
    redis.call('SET', key, string.format('%.17g %.6f', tokens, now), 'PX', ttl)
    if RETRY > 0 then break end
  end
end
