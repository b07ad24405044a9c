"""The Redis token bucket: the same maths as :func:`wschat.ratelimit.take`, run in
Redis (``scripts/charge.lua``), so every worker and pod spends one shared bucket."""

from __future__ import annotations

import logging
import time
from typing import Any

import redis

from ...ratelimit import Charge, MemoryRateLimiter, RateLimiter
from .keys import OUTAGES, RATE_LIMITS, charged, is_outage, script

log = logging.getLogger("wschat.ratelimit")


class RedisRateLimiter(RateLimiter):
    """Buckets in Redis, shared by every worker and pod: one EVALSHA per check, however
    many buckets it spends (``scripts/rate_limit.lua``). A bucket is ``<tokens> <last>`` under ``prefix + key``,
    the clock is the Redis server's TIME (skew between machines can neither mint nor
    burn tokens), and the key expires when the bucket would be full again.

    If Redis cannot be reached (or is full: ``OOM`` at ``maxmemory``; or refuses for now:
    ``BUSY``, ``READONLY``, ...: :func:`~.keys.is_outage`), buckets fall
    back to this process (:class:`MemoryRateLimiter`): limiting stays on, per worker instead of per
    server, rather than failing every message. Redis is tried again
    ``RETRY_AFTER`` seconds later, so an outage costs one slow check per
    interval, not one per message.

    Args:
        client: a ``redis.Redis`` (``decode_responses=False``).
        rate, burst: tokens per second and bucket size.
        prefix: prepended to every bucket key.
    """

    RETRY_AFTER = 1.0
    FALLBACK_LOG_EVERY = 30.0  # seconds between "Redis unreachable" warnings

    def __init__(self, client: Any, rate: float, burst: float, prefix: str = RATE_LIMITS
                 ) -> None:
        self.rate, self.burst = float(rate), float(burst)
        self.prefix = prefix
        self._script = script(client, "rate_limit", prelude="charge")
        self._fallback = MemoryRateLimiter(rate, burst)
        self._down_until = 0.0
        self._next_warning = 0.0

    def hit(self, key: str, rate: float | None = None, burst: float | None = None,
            cost: float = 1.0) -> int:
        rate = self.rate if rate is None else float(rate)
        burst = self.burst if burst is None else float(burst)
        return self.spend(((key, rate, burst),), cost)

    def spend(self, charge: Charge, cost: float = 1.0) -> int:
        """All of ``charge``'s buckets in one EVALSHA (a guest's own and its address's)."""
        if not charge:
            return 0
        if self._down_until and time.monotonic() < self._down_until:
            return self._fallback.spend(charge, cost)
        keys, args = charged([], [], charge, cost, self.prefix)
        try:
            retry_ms = self._script(keys=keys, args=args)
        except (*OUTAGES, redis.ResponseError) as exc:
            if not is_outage(exc):
                raise
            now = time.monotonic()
            self._down_until = now + self.RETRY_AFTER
            if now >= self._next_warning:
                log.warning("rate limiting per worker: Redis unreachable or full (%s)", exc)
                self._next_warning = now + self.FALLBACK_LOG_EVERY
            return self._fallback.spend(charge, cost)
        self._down_until = 0.0
        return int(retry_ms)
