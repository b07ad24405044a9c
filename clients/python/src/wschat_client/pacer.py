"""Send pacing: how many sends may be on the wire, and when the next may go.

No I/O and no clock: every call takes ``now`` (seconds on any monotonic clock), so
the maths is unit-tested. The JavaScript (``pacer.ts``) and Rust (``pacer.rs``)
libraries hold the same rules.
"""

from __future__ import annotations

import math
import random as _random
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

# A bucket refilled for exactly one token's time must hold that token, whatever
# floating point makes of the division.
EPSILON = 1e-9
# Paced sends go this much slower than the server's rate: what its bucket saves up
# absorbs the jitter of the way there (a send that arrives a little early is refused).
PACE_MARGIN = 1.1
# The pace is forgotten after this many intervals with no write, no refusal and no
# acknowledgement.
PACE_MEMORY = 10


@dataclass(slots=True)
class Pacer:
    """A send window, and after the server's ``rate_limited`` a copy of its token bucket.

    Until the first ``rate_limited`` only the window holds sends back: ``limit`` written
    and not yet acknowledged. The server's bucket is the user's; when it refuses a send
    it says how long until the bucket holds a token again (``retry_after_ms``). The
    send written before the refused one took a token (or was refused for the same
    one), so from that write to the next token is at most one token's refill time,
    and exactly that when the bucket was left empty. But the bucket is shared with the
    user's other connections (and ``typing``, and for guests the address's bucket): the
    write before may be long ago, and another connection emptied the bucket since. So
    that gap counts for at most one token's time as far as it is known: ``retry_after``
    (never more than one token's time), or the token time the pace already stands for
    (``interval`` less its tenth) if longer. The first span is then between
    ``retry_after`` and twice it (the pace at worst about half the server's rate), a
    later one adds at most ``retry_after`` (and a tenth) to the pace, and a quiet
    spell is never taken for the pace. The longest span seen, plus a tenth, is the
    pace (``interval``); a span too short draws another refusal, whose gap (a paced
    one: the pace) lengthens it past the server's token time. From then on:

    - the window drops to one send and widens by one per acknowledgement;
    - nothing is written before the ``retry_after_ms`` has passed;
    - each send spends a token of a local bucket refilled one per ``interval`` and
      holding at most ``limit``, so a long queue goes out at the server's rate instead
      of drawing a refusal for most sends, and after a quiet spell a whole window may
      go at once again.

    The pace only grows while refusals come, so it is forgotten (``interval`` back to
    0, as before any refusal) once the connection has neither written, nor been
    refused, nor had a send acknowledged for ``PACE_MEMORY`` intervals: a connection
    that keeps writing keeps its pace (a long queue draws no new window of refusals),
    and so does one whose writes wait for acknowledgements (a round trip longer than
    ``PACE_MEMORY`` intervals, the window full: the acknowledgement shows it is still
    in the paced exchange, and forgetting there would learn the pace again with a
    window of refusals every round trip); a quiet one (the window not full: nothing
    waited) forgets it, and the late acknowledgement of a send written before the quiet
    spell does not bring it back; it starts afresh with its
    next refusal (at most a window of them, ``limit``, within the server's burst), so a
    pace learnt from another connection's burst, or a slower one, does not last.

    :meth:`reset` (a new connection, perhaps to a server with other limits) forgets the
    pace but keeps a pause that has not ended (the bucket is the user's, not the
    connection's).

    Args:
        limit: sends on the wire at most (``max_in_flight``).
    """

    limit: int
    window: int = field(init=False)
    interval: float = 0.0  # seconds per token; 0 until a rate_limited told us
    paused_until: float = 0.0
    _tokens: float = 0.0
    _stamp: float = 0.0  # when ``_tokens`` was counted
    _fresh: float = 0.0  # the latest write, refusal or acknowledgement while paced
    _writes: deque[float] = field(default_factory=lambda: deque(maxlen=64))

    def __post_init__(self) -> None:
        self.limit = max(1, self.limit)
        self.window = self.limit

    def next_at(self, now: float, in_flight: int) -> float | None:
        """When the next send may be written (``now`` if at once), with ``in_flight``
        sends unacknowledged; None while the window is full (an acknowledgement frees
        a place)."""
        if in_flight >= self.window:
            return None
        at = max(now, self.paused_until)
        if self.interval and not self._stale(at):
            tokens = self._tokens_at(at)
            if tokens < 1 - EPSILON:
                at += (1 - tokens) * self.interval
        return at

    def sent(self, now: float) -> None:
        """A send was written at ``now`` (when :meth:`next_at` allowed it)."""
        self._writes.append(now)
        self._forget_stale(now)
        if self.interval:
            self._tokens = max(0.0, self._tokens_at(now) - 1)
            self._stamp = self._fresh = now

    def acknowledged(self, now: float, in_flight: int) -> None:
        """A send's echo came at ``now``, with ``in_flight`` sends unacknowledged (this one
        among them): the window widens by one, up to ``limit``. With the window full
        (writes waited for this acknowledgement) the pace stays fresh, however long the
        round trip was; otherwise a pace already stale is forgotten first, as by a write,
        and the acknowledgement does not bring it back."""
        if in_flight < self.window:
            self._forget_stale(now)
        self.window = min(self.limit, self.window + 1)
        if self.interval:
            self._fresh = now

    def rate_limited(self, now: float, retry_after: float,
                     written_at: float | None = None) -> None:
        """The server refused, at ``now``, a send written at ``written_at``: no token
        for ``retry_after`` seconds."""
        self.window = 1
        self.pause(now + retry_after)
        self._forget_stale(now)
        if retry_after > 0:
            span = retry_after
            if written_at is not None:
                # The writes up to the refused one, in order; the one before it. The
                # gap since then counts for at most one token's time as far as we know
                # it (another connection may have emptied the bucket in it).
                earlier = [t for t in self._writes if t <= written_at]
                if len(earlier) >= 2:
                    token = max(retry_after, self.interval / PACE_MARGIN)
                    span += min(written_at - earlier[-2], token)
            self.interval = max(self.interval, span * PACE_MARGIN)
            # The server's bucket holds its next token at now + retry_after.
            self._tokens = max(0.0, 1 - retry_after / self.interval)
            self._stamp = self._fresh = now

    def pause(self, until: float) -> None:
        """No send before ``until`` (the server cannot take one: ``unavailable``)."""
        self.paused_until = max(self.paused_until, until)

    def reset(self, limit: int | None = None) -> None:
        """A new connection: a full window, no pace; a pause not yet over stays."""
        if limit is not None:
            self.limit = max(1, limit)
        self.window = self.limit
        self.interval = self._tokens = self._stamp = self._fresh = 0.0
        self._writes.clear()

    def _stale(self, now: float) -> bool:
        """Whether the pace is too old at ``now``: no write, no refusal and no
        acknowledgement for ``PACE_MEMORY`` intervals (``_fresh`` is the latest)."""
        return now - self._fresh >= PACE_MEMORY * self.interval

    def _forget_stale(self, now: float) -> None:
        if self.interval and self._stale(now):
            self.interval = self._tokens = 0.0

    def _tokens_at(self, now: float) -> float:
        return min(float(self.limit), self._tokens + max(0.0, now - self._stamp) / self.interval)


# Joins on the wire at once, by default (the JS and Rust clients keep the same number).
JOIN_WINDOW = 4
# The other requests (ping, history, list_users, leave, moderation) on the wire at once, by
# default: they draw on the same request bucket, paced by a JoinPacer of their own.
REQUEST_WINDOW = 4
# A refused join written after a refusal doubles the pause, up to 2**(JOIN_PROBES_MAX - 1)
# (32) times ``retry_after_ms``, and the jitter (once to twice that).
JOIN_PROBES_MAX = 6
# The shortest pause after a rate_limited join, seconds, whatever its retry_after_ms (the
# server's is at least 1 ms; a 0 from a proxy or a buggy server would never grow by doubling,
# and the refusals would come back to back). A missing retry_after_ms is a second, as in the
# JS and Rust clients.
JOIN_RETRY_FLOOR = 0.05
JOIN_RETRY_DEFAULT = 1.0


@dataclass(slots=True)
class JoinPacer:
    """When the next ``join`` may be written: a connection rejoining many rooms draws on
    the user's request bucket (``RATE_LIMIT_REQUESTS_BURST``), which every connection of
    the user shares, and more than ``2 x RATE_LIMIT_BURST`` refusals in a row get the
    connection closed (4102). So:

    - at most ``limit`` joins are unanswered (a :class:`Pacer` window), so at most that
      many are refused together once the bucket is empty;
    - after a ``rate_limited`` join none is written before its ``retry_after_ms`` (at least
      ``JOIN_RETRY_FLOOR``), then one at a time and at the server's pace (the :class:`Pacer`
      rules);
    - a join written after a refusal and refused too (another connection of the user took
      the tokens meanwhile) makes the pause grow: ``retry_after`` times ``2**(n-1)`` (at
      most 32), from once to twice that (jitter, so two tabs do not keep colliding), for
      the ``n``-th refusal since the latest ``joined`` (the first: ``retry_after``). So
      a few refusals come in a row, not a flood.

    A new connection starts with a clean join pacer (:meth:`reset`): the pause and the count
    of refusals belong to the connection they were learnt on (the next may be to another
    server, with other limits, and what the user's bucket holds by then is the server's to
    say: at most a window of joins is refused before the new connection learns it again).

    No I/O and no clock, like :class:`Pacer`. ``key``: the join's request id.
    """

    limit: int = JOIN_WINDOW
    random: Callable[[], float] = _random.random
    pacer: Pacer = field(init=False)
    in_flight: dict[object, float] = field(default_factory=dict)  # key -> when written
    probes: int = 0  # refused joins written after a refusal, since the latest joined
    refused_at: float = -math.inf  # when the latest refusal came

    def __post_init__(self) -> None:
        self.limit = max(1, self.limit)
        self.pacer = Pacer(self.limit)

    def next_at(self, now: float) -> float | None:
        """When the next join may be written (``now``: at once); None: the window is full."""
        return self.pacer.next_at(now, len(self.in_flight))

    def sent(self, key: object, now: float) -> None:
        self.in_flight[key] = now
        self.pacer.sent(now)

    def joined(self, key: object, now: float) -> bool:
        """The join ``key`` was answered ``joined``; False if it is none of ours."""
        if key not in self.in_flight:
            return False
        self.pacer.acknowledged(now, len(self.in_flight))
        del self.in_flight[key]
        self.probes = 0
        return True

    def refused(self, key: object, now: float, retry_after: float | None) -> bool:
        """The join ``key`` was refused: ``retry_after`` seconds for ``rate_limited``
        (its ``retry_after_ms``; None for another refusal). False if it is none of ours."""
        written_at = self.in_flight.pop(key, None)
        if written_at is None:
            return False
        if retry_after is not None:
            self._limited(now, retry_after, written_at, written_at)
        return True

    def sent_unpaced(self, now: float) -> None:
        """A request this pacer did not write (the ``ping`` behind a join; a join, for the
        request pacer; a request, for the join pacer) was written at ``now``: the server charges
        it to the same bucket, so it spends a token of the learnt pace (and counts as a write)
        as one of the pacer's own does, but it takes no place in the window (its answer is none
        of the pacer's). Without a learnt pace there is no token to spend."""
        self.pacer.sent(now)

    def refused_unpaced(self, now: float, retry_after: float, written_at: float) -> None:
        """A request this pacer did not write (the ``ping`` behind a join, written at once),
        written at ``written_at``, was refused ``rate_limited`` at ``now``: the bucket is the
        user's, so the same pause as for a refusal of one of its own (:meth:`refused`), the
        refused ones in a row counted alike. It is none of the pacer's requests: the pace is
        learnt from ``retry_after`` alone."""
        self._limited(now, retry_after, written_at, None)

    def _limited(self, now: float, retry_after: float, written_at: float,
                 pace_from: float | None) -> None:
        """:meth:`refused`'s pause; ``pace_from``: the refused write among the pacer's, if it
        is one."""
        # The pace is learnt from what the server said; the pause is at least the floor.
        self.pacer.rate_limited(now, retry_after, pace_from)
        wait = max(retry_after, JOIN_RETRY_FLOOR)
        self.pacer.pause(now + wait)
        if written_at > self.refused_at:
            self.probes = min(self.probes + 1, JOIN_PROBES_MAX)
            if self.probes > 1:
                grown = wait * 2 ** (self.probes - 1) * (1 + self.random())
                self.pacer.pause(now + grown)
        self.refused_at = now

    def reset(self) -> None:
        """A new connection: nothing in flight, a full window, no pace, no pause, no
        refusal."""
        self.in_flight.clear()
        self.pacer = Pacer(self.limit)
        self.probes = 0
        self.refused_at = -math.inf
