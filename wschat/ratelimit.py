"""Token buckets: ``RATE_LIMIT`` tokens per second, at most ``RATE_LIMIT_BURST`` saved up.

The maths lives in :func:`take` (pure, clock injected) so the memory and the
Redis limiter (a Lua port of the same function) agree exactly.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Callable


def take(tokens: float, last: float, now: float, rate: float, burst: float
         ) -> tuple[float, float, int]:
    """One request against a bucket.

    Returns:
        (tokens left, new timestamp, retry_after_ms); retry_after_ms is 0 when
        the request is allowed, else how long until one token is available.
    """
    tokens = min(burst, tokens + max(0.0, now - last) * rate)
    if tokens >= 1.0:
        return tokens - 1.0, now, 0
    return tokens, now, max(1, int((1.0 - tokens) / rate * 1000 + 0.999))


class RateLimiter(ABC):
    @abstractmethod
    def hit(self, key: str) -> int:
        """Spend one token of ``key``'s bucket; 0 if allowed, else retry-after in ms."""


class MemoryRateLimiter(RateLimiter):
    """Buckets in this process; idle full buckets are forgotten to keep memory flat."""

    def __init__(self, rate: float, burst: int, clock: Callable[[], float] = time.monotonic
                 ) -> None:
        self.rate, self.burst = rate, float(burst)
        self._clock = clock
        self._buckets: dict[str, tuple[float, float]] = {}
        self._next_sweep = 0.0

    def hit(self, key: str) -> int:
        now = self._clock()
        tokens, last = self._buckets.get(key, (self.burst, now))
        tokens, last, retry_ms = take(tokens, last, now, self.rate, self.burst)
        self._buckets[key] = (tokens, last)
        if now >= self._next_sweep:
            self._sweep(now)
        return retry_ms

    def _sweep(self, now: float) -> None:
        refill = self.burst / self.rate  # a bucket untouched this long is full again
        self._buckets = {k: v for k, v in self._buckets.items() if now - v[1] < refill}
        self._next_sweep = now + max(refill, 1.0)
