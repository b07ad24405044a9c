"""Reconnect timing: exponential backoff with full jitter, and what each close code means.

No I/O and no clock: the random source is injected, so the maths is unit-tested.
"""

from __future__ import annotations

import random as _random
from collections.abc import Callable
from dataclasses import dataclass

# Close codes after which reconnecting cannot help: the client must be fixed.
FIX_THE_CLIENT = frozenset({1002, 1003, 1007, 1008, 1009})
# 4001 auth timeout, 4002 token expired: reconnect only with a (fresh) token.
NEEDS_TOKEN = frozenset({4001, 4002})
# 4101 slow consumer, 4102 flooding: reconnect, but after a pause.
PAUSE_FIRST = frozenset({4101, 4102})


@dataclass(frozen=True, slots=True)
class Backoff:
    """Delays ``min_delay + rand(0, min(max_delay, min_delay * 2**attempt))``, capped at
    ``max_delay`` (centrifuge-js's full jitter), so clients dropped together by one
    server spread their reconnects instead of arriving at once.

    Args:
        min_delay: seconds; the first retry waits between this and twice this.
        max_delay: seconds; no delay is longer.
        pause: seconds at least after 4101/4102 (the server asked for a pause).
        random: returns a float in [0, 1); injectable for tests.
        stable_after: seconds a connection must stay up before the delays start again
            from the first; a server that accepts and closes at once (1013 in an outage,
            4102, a draining pod's 1001) is retried with growing delays, not every
            ``min_delay`` by every client together.
    """

    min_delay: float = 0.5
    max_delay: float = 20.0
    pause: float = 5.0
    random: Callable[[], float] = _random.random
    stable_after: float = 10.0

    def delay(self, attempt: int) -> float:
        """Seconds to wait before reconnect attempt ``attempt`` (0 = the first retry)."""
        ceiling = min(self.max_delay, self.min_delay * 2.0 ** min(attempt, 32))
        return min(self.max_delay, self.min_delay + self.random() * ceiling)

    def after_close(self, code: int, attempt: int, *, has_token: bool,
                    can_refresh: bool, retry_after: float = 0.0) -> float | None:
        """Seconds before reconnecting after close ``code``, or None: do not reconnect.

        Args:
            code: the close code (1006 when the connection dropped without one).
            attempt: attempts since the last connection that stayed up ``stable_after``
                (0: the connection just closed did).
            has_token: the client can present some token (a 4001 then needs it).
            can_refresh: a ``get_token`` callback can fetch a fresh token (4002).
            retry_after: seconds the server asked to wait (``retry_after_ms``).
        """
        if code in FIX_THE_CLIENT:
            return None
        if code == 4001:
            return self.delay(attempt) if has_token else None
        if code == 4002:
            return self.delay(attempt) if can_refresh else None
        if 4000 <= code < 4100:
            return None  # 40xx: not with the same credentials
        if code == 1001 and attempt == 0:
            # The server is going away (a deploy): reconnect at once, spread over
            # min_delay so a whole pod's clients do not land in the same instant. Not
            # after a connection that did not stay up: the backoff then grows as below.
            return max(retry_after, self.random() * self.min_delay)
        wait = self.delay(attempt)
        if code in PAUSE_FIRST:
            wait = max(wait, self.pause)
        return max(wait, retry_after)

    def after_refusal(self, status: int, attempt: int, *, can_refresh: bool,
                      retry_after: float = 0.0) -> float | None:
        """Seconds before retrying a handshake refused with HTTP ``status``, or None.

        401 (bad or expired token) retries only with a ``get_token`` callback;
        408 (timeout), 429 (busy) and 5xx (full, shutting down) retry, honouring
        ``Retry-After``; any other status (403 origin, 400 username, 404, ...) will not
        change by retrying. The same in the JS and Rust clients.
        """
        if status == 401:
            return self.delay(attempt) if can_refresh else None
        if status in (408, 429) or status >= 500:
            return max(self.delay(attempt), retry_after)
        return None
