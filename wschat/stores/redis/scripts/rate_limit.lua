-- RedisRateLimiter's check: charge.lua (prepended) spends the buckets.
-- KEYS: the NB buckets   ARGV: rate burst cost for each, then NB
-- Returns retry_after_ms (0: every bucket paid; else the refusing bucket's).
return RETRY
