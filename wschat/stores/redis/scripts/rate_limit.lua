-- RedisRateLimiter's check: charge.lua (prepended) spends the buckets.
-- KEYS: bucket   ARGV: rate burst cost 1   Returns retry_after_ms (0: allowed).
return RETRY
