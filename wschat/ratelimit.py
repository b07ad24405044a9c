"""Token buckets: ``RATE_LIMIT`` tokens per second, at most ``RATE_LIMIT_BURST`` saved up.

The maths lives in :func:`take` (pure, clock injected) so the memory limiter
and the Redis limiter (``stores/redis/scripts/charge.lua``, a step-by-step port
of the same function) agree exactly. With Redis, a room message or DM spends
its tokens inside the script that posts it (a :data:`Charge` handed to
``post_room``/``post_dm``): one round trip for both. A bucket that has not been touched for
``(burst - tokens) / rate`` seconds is full again, which is exactly what a
missing bucket means: both limiters forget such buckets (memory: a periodic
sweep; Redis: the key's TTL), so idle users cost nothing.
"""

from __future__ import annotations

import ipaddress
import logging
import math
import time
from abc import ABC, abstractmethod
from collections.abc import Callable

from .errors import WschatError

log = logging.getLogger("wschat.ratelimit")

#: Buckets a request spends one token of each, in order, as (key, rate, burst); the
#: first that refuses stops it (the ones after it are not touched).
Charge = tuple[tuple[str, float, float], ...]


class RateLimited(WschatError):
    """A store refused a post because a bucket of its :data:`Charge` is empty."""

    def __init__(self, retry_after_ms: int) -> None:
        super().__init__(f"rate limited for {retry_after_ms} ms")
        self.retry_after_ms = retry_after_ms


def address_key(addr: str) -> str:
    """The key a client address is counted under by per-address limits (the guests'
    buckets, ``MAX_CONNECTIONS_PER_IP``): the client, not each address it may use.

    An IPv6 address counts as its /64 (one host, or one subscriber, is given a whole /64
    and may use any address in it); an IPv4-mapped IPv6 address as its IPv4 address; a
    port a proxy wrote after the address (``1.2.3.4:5678``, ``[2001:db8::1]:443``) is
    left out. Anything that is no IP address counts as it is."""
    host = addr.strip()
    if host.startswith("["):  # [v6] or [v6]:port
        host = host[1:].partition("]")[0]
    elif host.count(":") == 1:  # v4:port
        host = host.partition(":")[0]
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return addr
    if ip.version == 4:
        return str(ip)
    if ip.ipv4_mapped is not None:
        return str(ip.ipv4_mapped)
    return f"{ipaddress.IPv6Address(int(ip) >> 64 << 64)}/64"


# A client that waited exactly retry_after_ms must get its token, whatever
# floating point makes of the refill (0.05 s x 20/s may come out as 0.9999...).
EPSILON = 1e-9


def take(tokens: float, last: float, now: float, rate: float, burst: float,
         cost: float = 1.0) -> tuple[float, float, int]:
    """One request costing ``cost`` tokens (at most ``burst``) against a bucket (``rate``
    finite and > 0: the settings see to it, :data:`wschat.config.MAX_RATE`).

    Returns:
        (tokens left, new timestamp, retry_after_ms); retry_after_ms is 0 when
        the request is allowed, else how long until ``cost`` tokens are available.
    """
    # min() and max() spelled as comparisons (the noqa's): this runs for every bucket of
    # every post, and a builtin call costs more than a comparison.
    if cost > burst:  # noqa: PLR1730
        cost = burst
    if now > last:
        tokens += (now - last) * rate
    if tokens > burst:  # noqa: PLR1730
        tokens = burst
    if tokens >= cost - EPSILON:
        tokens -= cost
        return (tokens if tokens > 0.0 else 0.0), now, 0  # noqa: FURB136
    return tokens, now, max(1, math.ceil((cost - tokens) / rate * 1000))


class RateLimiter(ABC):
    """Named token buckets sharing one ``rate`` and ``burst`` unless a call overrides them."""

    rate: float
    burst: float

    @abstractmethod
    def hit(self, key: str, rate: float | None = None, burst: float | None = None,
            cost: float = 1.0) -> int:
        """Spend ``cost`` tokens (default one) of ``key``'s bucket.

        Args:
            key: the bucket (``u:<user_id>``, ``ip:<address>``, ...).
            rate, burst: this bucket's parameters if not the limiter's own; a
                key must always be used with the same ones.
            cost: tokens this request costs (capped at ``burst``).

        Returns:
            0 if allowed, else the milliseconds until a token is available.
        """


    def spend(self, charge: Charge, cost: float = 1.0) -> int:
        """Spend ``cost`` tokens of each bucket of ``charge``, in order; the first that
        refuses stops it (the buckets after it are not touched).

        Returns:
            0 if every bucket paid, else the refusing bucket's milliseconds until it can.
        """
        for key, rate, burst in charge:
            retry_ms = self.hit(key, rate, burst, cost)
            if retry_ms:
                return retry_ms
        return 0


class MemoryRateLimiter(RateLimiter):
    """Buckets in this process; idle (full again) buckets are forgotten to keep memory flat."""

    def __init__(self, rate: float, burst: float, clock: Callable[[], float] = time.monotonic
                 ) -> None:
        self.rate, self.burst = float(rate), float(burst)
        self._clock = clock
        # key -> (tokens, last, full_at): full_at is when the bucket is full again.
        self._buckets: dict[str, tuple[float, float, float]] = {}
        self._next_sweep = 0.0

    def hit(self, key: str, rate: float | None = None, burst: float | None = None,
            cost: float = 1.0) -> int:
        return self.spend(((key, self.rate if rate is None else float(rate),
                            self.burst if burst is None else float(burst)),), cost)

    def spend(self, charge: Charge, cost: float = 1.0) -> int:
        # RateLimiter.spend with the clock read once and the sweep checked once (a
        # message's one or two buckets are on every post's path); hit() is a charge of one.
        now = self._clock()
        buckets = self._buckets
        retry_ms = 0
        for key, rate, burst in charge:
            tokens, last, _ = buckets.get(key) or (burst, now, now)
            tokens, last, retry_ms = take(tokens, last, now, rate, burst, cost)
            buckets[key] = (tokens, last, last + (burst - tokens) / rate)
            if retry_ms:
                break
        if now >= self._next_sweep:
            self._sweep(now)
        return retry_ms

    def __len__(self) -> int:
        """Buckets held (full ones may linger until the next sweep)."""
        return len(self._buckets)

    def _sweep(self, now: float) -> None:
        self._buckets = {k: v for k, v in self._buckets.items() if v[2] > now}
        self._next_sweep = now + max(1.0, self.burst / self.rate)
