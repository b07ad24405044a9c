"""The send pacer's maths: the window, the pause and the pace after rate_limited."""

from __future__ import annotations

import heapq
import math
from itertools import count, pairwise

import pytest

from wschat_client.pacer import JOIN_RETRY_FLOOR, JOIN_WINDOW, JoinPacer, Pacer


def drain(pacer: Pacer, now: float, waiting: int, in_flight: int = 0) -> int:
    """Write sends while the pacer allows at ``now``; how many went."""
    written = 0
    while written < waiting and pacer.next_at(now, in_flight + written) == now:
        pacer.sent(now)
        written += 1
    return written


def test_only_the_window_holds_sends_back_before_any_refusal() -> None:
    """A full window goes at once; the next waits for an acknowledgement (None)."""
    pacer = Pacer(16)
    assert drain(pacer, 0.0, 100) == 16
    assert pacer.next_at(0.0, 16) is None
    assert pacer.next_at(0.0, 15) == 0.0


def test_rate_limited_pauses_and_drops_the_window_to_one() -> None:
    """Nothing before retry_after; then one send; each acknowledgement widens by one."""
    pacer = Pacer(4)
    pacer.rate_limited(10.0, 0.1)
    assert pacer.next_at(10.0, 0) == pytest.approx(10.1)
    assert drain(pacer, 10.1, 5) == 1
    assert pacer.next_at(10.1, 1) is None
    pacer.acknowledged(10.1, 1)
    assert pacer.window == 2
    for _ in range(5):
        pacer.acknowledged(10.1, 0)
    assert pacer.window == 4


def test_after_rate_limited_sends_go_at_the_server_s_pace() -> None:
    """A long queue goes one send per interval (the longest retry_after seen, plus a
    tenth), not in bursts the empty bucket would refuse."""
    pacer = Pacer(16)
    pacer.rate_limited(0.0, 0.02)
    pacer.rate_limited(0.001, 0.019)  # the rest of the batch: the same token
    assert pacer.interval == pytest.approx(0.022)
    now, times = 0.0, []
    for _ in range(20):
        now = pacer.next_at(now, 0)  # each acknowledged before the next (in_flight 0)
        times.append(now)
        pacer.sent(now)
        pacer.acknowledged(now, 1)
    gaps = [b - a for a, b in pairwise(times)]
    assert times[0] == pytest.approx(0.02)
    assert gaps == pytest.approx([0.022] * 19)


def test_a_quiet_spell_refills_the_local_bucket_up_to_the_window() -> None:
    """After idling for a whole window's worth of tokens, a full window goes at once;
    after half of it, half."""
    pacer = Pacer(8)
    pacer.rate_limited(0.0, 0.1)
    for _ in range(8):
        pacer.acknowledged(0.0, 0)
    assert drain(pacer, 0.1, 100) == 1
    assert drain(pacer, 0.1 + 4 * pacer.interval, 100) == 4
    assert drain(pacer, 100.0, 100) == 8


def test_reset_forgets_the_pace_but_not_a_pause() -> None:
    """A new connection: full window, no pace; a retry_after not yet over still holds."""
    pacer = Pacer(4)
    pacer.rate_limited(0.0, 1.0)
    pacer.reset(6)
    assert (pacer.window, pacer.interval) == (6, 0.0)
    assert pacer.next_at(0.5, 0) == 1.0
    assert drain(pacer, 1.0, 100) == 6


def test_a_pace_guessed_too_fast_is_corrected_by_the_next_refusal() -> None:
    """The first refusal came when the bucket was half full again (retry_after 10 ms of
    a 20 ms token): the paced send after it is refused too, and the span from the write
    before it to the next token becomes the pace, the gap counted for at most the token
    time the pace stood for (10 ms): 19 ms plus a tenth, past the server's 20 ms."""
    pacer = Pacer(16)
    pacer.sent(0.0)  # accepted: the bucket is empty from here
    pacer.sent(0.010)
    pacer.rate_limited(0.011, 0.010, written_at=0.010)
    assert pacer.interval == pytest.approx(0.02 * 1.1)  # 10 ms since the write before + 10 ms
    fast = Pacer(16)
    fast.sent(0.010)
    fast.rate_limited(0.011, 0.010, written_at=0.010)  # no write before it known
    assert fast.interval == pytest.approx(0.011)
    first = fast.next_at(0.011, 0)
    assert first == pytest.approx(0.021)
    fast.sent(first)  # accepted: the server's bucket is empty at 21 ms
    second = fast.next_at(first, 0)
    assert second == pytest.approx(0.032)
    fast.sent(second)  # 11 ms later: the server needs 9 more
    fast.rate_limited(second + 0.001, 0.009, written_at=second)
    assert fast.interval == pytest.approx(0.019 * 1.1)
    assert fast.interval > 0.02


def test_a_refusal_after_a_quiet_spell_does_not_make_the_quiet_spell_the_pace() -> None:
    """One write, a quiet minute, then a send refused for 100 ms because another
    connection of the same user (the bucket is the user's) emptied the bucket: the gap
    since the write before counts for at most retry_after, so the next sends go about
    0.2 s apart, not a minute."""
    pacer = Pacer(16)
    pacer.sent(0.0)
    pacer.sent(60.0)
    pacer.rate_limited(60.005, 0.1, written_at=60.0)
    assert pacer.interval == pytest.approx(0.2 * 1.1)  # (0.1 + min(60, 0.1)) plus a tenth
    now = pacer.next_at(60.005, 0)
    assert now == pytest.approx(60.105)  # the retried send: when the server has a token
    pacer.sent(now)
    pacer.acknowledged(now, 1)
    for _ in range(3):
        at = pacer.next_at(now, 0)
        assert at - now <= 0.2 * 1.1 + 1e-9
        now = at
        pacer.sent(now)
        pacer.acknowledged(now, 1)


def test_the_pace_is_forgotten_after_a_quiet_spell_and_learnt_again() -> None:
    """Ten intervals with no write and no refusal: the pace is forgotten (a whole window
    goes at once, not only the ten tokens the local bucket saved); a new refusal learns
    it again. A connection that keeps writing keeps its pace."""
    pacer = Pacer(16)
    pacer.rate_limited(0.0, 0.1)
    interval = pacer.interval
    for _ in range(16):
        pacer.acknowledged(0.0, 0)
    now = 0.1
    for _ in range(30):  # a long paced queue: no refusal, but writes all along
        now = pacer.next_at(now, 0)
        pacer.sent(now)
    assert pacer.interval == interval
    assert drain(pacer, now + 9 * interval, 100) == 9  # nine intervals: still paced
    quiet = now + 9 * interval + 10.5 * interval
    assert drain(pacer, quiet, 100) == 16  # the pace is forgotten: the whole window
    assert pacer.interval == 0.0
    pacer.rate_limited(quiet + 0.001, 0.05)
    assert pacer.interval == pytest.approx(0.055)


def test_an_acknowledgement_keeps_the_pace_across_a_long_round_trip() -> None:
    """A round trip of twenty intervals, the window full: no write and no refusal for
    longer than ten intervals, but the acknowledgement shows the connection is still in
    the paced exchange, so the pace stays. Ten quiet intervals after the acknowledgement
    (no write, no refusal, no acknowledgement) forget it as before."""
    pacer = Pacer(16)
    pacer.rate_limited(0.0, 0.1)
    interval = pacer.interval
    now = pacer.next_at(0.0, 0)
    pacer.sent(now)
    assert pacer.next_at(now, 1) is None  # the window (one) is full
    now += 20 * interval  # the round trip
    pacer.acknowledged(now, 1)  # the window (one) was full
    assert drain(pacer, now, 100) == 2  # the window (two); the local bucket saved them
    assert pacer.interval == interval  # still paced
    pacer.acknowledged(now + 5 * interval, 2)
    quiet = now + 15.5 * interval  # ten and a half intervals after the acknowledgement
    assert drain(pacer, quiet, 100) == 3
    assert pacer.interval == 0.0  # forgotten


def test_a_late_acknowledgement_does_not_bring_back_a_pace_forgotten_in_a_quiet_spell() -> None:
    """One send on the wire, the window (16) not full, then eleven intervals with no write,
    no refusal and no acknowledgement: nothing waited for an acknowledgement, so the pace
    is forgotten (the whole window may go), and the late acknowledgement of that send does
    not bring it back (the local bucket held eleven tokens then, not the whole window). A
    full window waiting for its acknowledgement keeps the pace (the test above)."""
    pacer = Pacer(16)
    pacer.rate_limited(0.0, 0.1)
    interval = pacer.interval
    for _ in range(15):
        pacer.acknowledged(0.0, 0)  # the window back to 16
    now = pacer.next_at(0.0, 0)
    pacer.sent(now)
    late = now + 11 * interval
    assert pacer.next_at(late, 1) == late  # forgotten: no wait for a token
    pacer.acknowledged(late, 1)  # one on the wire: the window (16) was not full
    assert pacer.interval == 0.0, "the late acknowledgement brought the pace back"
    assert drain(pacer, late, 100) == 16


def simulate(sends: int, rate: float, burst: int, latency: float, limit: int = 16) -> int:
    """``sends`` queued at once, written when the pacer allows, to a server ``latency``
    seconds away each way whose bucket (``rate`` per second, ``burst``) answers as
    ``wschat.ratelimit.take`` does: an echo, or ``rate_limited`` with ``retry_after_ms``;
    a refused send is written again. Returns the number of refusals."""
    pacer = Pacer(limit)
    events: list[tuple[float, int, str, float]] = []  # (time, order, what, written at)
    order = count()
    tokens, last, queued, in_flight, refusals = float(burst), 0.0, sends, 0, 0
    write_due = False

    def write(now: float) -> None:
        nonlocal queued, in_flight, write_due
        while queued:
            at = pacer.next_at(now, in_flight)
            if at is None:
                return
            if at > now:
                if not write_due:
                    write_due = True
                    heapq.heappush(events, (at, next(order), "write", 0.0))
                return
            pacer.sent(now)
            queued, in_flight = queued - 1, in_flight + 1
            heapq.heappush(events, (now + latency, next(order), "arrive", now))

    write(0.0)
    while events:
        now, _, what, written_at = heapq.heappop(events)
        if what == "arrive":
            tokens = min(burst, tokens + (now - last) * rate)
            last = now
            if tokens >= 1 - 1e-9:
                tokens = max(0.0, tokens - 1)
                heapq.heappush(events, (now + latency, next(order), "echo", written_at))
            else:
                retry_ms = max(1, math.ceil((1 - tokens) / rate * 1000))
                heapq.heappush(events, (now + latency, next(order), f"refused {retry_ms}",
                                        written_at))
            continue
        if what == "write":
            write_due = False
        elif what == "echo":
            pacer.acknowledged(now, in_flight)
            in_flight -= 1
        elif what.startswith("refused"):
            in_flight, queued, refusals = in_flight - 1, queued + 1, refusals + 1
            pacer.rate_limited(now, int(what.split()[1]) / 1000, written_at)
        write(now)
    assert queued == in_flight == 0
    return refusals


def test_a_round_trip_longer_than_ten_intervals_does_not_relearn_the_pace() -> None:
    """300 sends at a server of 20/s with a burst of 20, 0.3 s away each way (0.6 s, over
    ten of the pacer's 55 ms intervals): the window, not the pace, holds writes back
    between acknowledgements. Forgetting the pace in that wait learnt it again, with a
    window of refusals, every few round trips (24 refusals); kept fresh by the
    acknowledgements it is learnt once (4)."""
    assert simulate(300, rate=20, burst=20, latency=0.3) <= 6
    assert simulate(300, rate=20, burst=20, latency=0.01) <= 20  # a short one: about a window


def test_joins_go_a_window_at_a_time() -> None:
    """A reconnect's 70 rejoins: JOIN_WINDOW (4) on the wire, the next when one is answered."""
    joins = JoinPacer(random=lambda: 0.5)
    for key in range(JOIN_WINDOW):
        assert joins.next_at(0.0) == 0.0
        joins.sent(key, 0.0)
    assert joins.next_at(0.0) is None
    assert joins.joined(0, 0.01)
    assert not joins.joined(0, 0.01), "answered already"
    assert joins.next_at(0.01) == 0.01


def test_a_rate_limited_join_holds_every_join_until_retry_after_then_one_at_a_time() -> None:
    """The window refused together: nothing before retry_after_ms, then one join, and the
    rest at the pace learnt; only the window's joins were refused in a row."""
    joins = JoinPacer(random=lambda: 0.5)
    for key in range(4):
        joins.sent(key, 0.0)
    assert joins.joined(0, 0.001)
    for key in (1, 2, 3):  # the bucket is empty: the rest of the window is refused
        assert joins.refused(key, 0.002, 0.1)
    assert joins.next_at(0.002) == pytest.approx(0.102)
    joins.sent(4, 0.102)
    assert joins.next_at(0.102) is None, "one at a time after a refusal"
    assert joins.joined(4, 0.103)
    at = joins.next_at(0.103)
    assert at is not None and at > 0.103 + 0.09, "paced at the server's rate, about 0.1 s"


def test_a_join_refused_again_after_the_pause_doubles_it_with_jitter() -> None:
    """Another tab of the user took the tokens: each join refused after a refusal waits
    twice as long as the one before (times 1 to 2, the jitter), until a joined."""
    rnd = iter([0.0] * 7 + [1.0])
    joins = JoinPacer(random=lambda: next(rnd))
    joins.sent("a", 0.0)
    joins.refused("a", 0.0, 0.1)
    assert joins.next_at(0.0) == pytest.approx(0.1)
    now, waits = 0.1, []
    for n in range(8):
        joins.sent(n, now)
        joins.refused(n, now, 0.1)
        at = joins.next_at(now)
        assert at is not None
        waits.append(round(at - now, 6))
        now = at
    assert waits[:7] == [0.2, 0.4, 0.8, 1.6, 3.2, 3.2, 3.2], "at most 32 times retry_after"
    assert waits[7] == 6.4, "the jitter: up to twice that"
    joins.sent("b", now)
    assert joins.joined("b", now)
    joins.sent("c", now + 1)
    joins.refused("c", now + 1, 0.1)
    assert joins.next_at(now + 1) == pytest.approx(now + 1.1), "a joined starts the doubling again"


def test_a_refused_request_the_pacer_did_not_write_pauses_as_one_of_its_own() -> None:
    """The ping behind a join (written at once, not by the request pacer) refused
    rate_limited: the same pause as for a refusal of one of the pacer's own requests, and it
    counts in the refusals in a row by when it was written; the window drops to one."""
    requests = JoinPacer(random=lambda: 0.0)
    requests.refused_unpaced(0.010, 0.1, 0.005)
    assert requests.next_at(0.010) == pytest.approx(0.110), "not before retry_after"
    requests.refused_unpaced(0.012, 0.1, 0.006)  # written with the first, refused with it
    assert requests.next_at(0.012) == pytest.approx(0.112), "not doubled"
    requests.refused_unpaced(0.150, 0.1, 0.120)  # written after a refusal, refused too
    assert requests.next_at(0.150) == pytest.approx(0.350), "doubled"
    requests.sent("a", 0.4)
    assert requests.next_at(0.4) is None, "one at a time after a refusal, as after its own"
    assert requests.joined("a", 0.401), "its own request is still its own"
    floor = JoinPacer(random=lambda: 0.0)
    floor.refused_unpaced(0.0, 0.0, 0.0)
    assert floor.next_at(0.0) == pytest.approx(JOIN_RETRY_FLOOR), "retry_after_ms 0: the floor"


def test_a_request_the_pacer_did_not_write_spends_a_token_of_the_pace_and_no_place() -> None:
    """The ping behind a join (written at once, not by the request pacer) spends a token of
    the learnt pace, as one of the pacer's own requests does (the server charges it to the
    same bucket), and takes no place in the window; with no pace learnt, nothing waits."""
    requests = JoinPacer(limit=2, random=lambda: 0.0)
    requests.sent("a", 0.0)
    requests.refused("a", 0.0, 0.1)  # the pace: 0.11 s a token
    requests.sent("a", 0.1)
    assert requests.joined("a", 0.1)
    assert requests.next_at(0.32) == pytest.approx(0.32), "two tokens saved up (the window)"
    requests.sent_unpaced(0.32)
    assert requests.next_at(0.32) == pytest.approx(0.32), "one token left"
    requests.sent_unpaced(0.32)
    assert requests.next_at(0.32) == pytest.approx(0.43), "none left: wait for its refill"
    requests.sent("b", 0.43)
    requests.sent("c", 0.54)
    assert requests.next_at(0.54) is None, "the window: its own two, the pings none of it"
    assert requests.joined("b", 0.541), "its own requests are still its own"
    unpaced = JoinPacer(limit=2)
    unpaced.sent_unpaced(0.0)
    unpaced.sent_unpaced(0.0)
    assert unpaced.next_at(0.0) == 0.0, "no pace learnt: no token to spend, nothing waits"


def test_other_join_refusals_free_a_place_and_pause_nothing() -> None:
    joins = JoinPacer(limit=1)
    joins.sent("a", 0.0)
    assert joins.next_at(0.0) is None
    assert joins.refused("a", 0.0, None)  # unavailable: the client retries it after a backoff
    assert joins.next_at(0.0) == 0.0
    assert not joins.refused("zzz", 0.0, 0.1), "none of ours"
    assert joins.next_at(0.0) == 0.0


def test_a_new_connection_starts_with_a_clean_join_pacer() -> None:
    """No pause, no pace, no count of refusals from the old connection: a join refused for
    2 s there no longer holds the new one's joins, and its first refusal pauses for its own
    retry_after_ms, not a doubled one."""
    joins = JoinPacer(random=lambda: 0.0)
    for key in range(4):
        joins.sent(key, 0.0)
    joins.refused(0, 0.0, 2.0)
    joins.reset()
    assert joins.next_at(1.0) == 1.0, "the old connection's pause is gone"
    assert not joins.joined(1, 1.0)
    joins.sent(10, 1.0)
    joins.refused(10, 1.0, 0.1)
    assert joins.next_at(1.0) == pytest.approx(1.1), "the new connection's own pause"


def test_a_join_refused_with_no_wait_pauses_for_the_floor_and_grows_from_it() -> None:
    """retry_after_ms 0 (never the server's, which says at least 1 ms) still pauses the
    joins, for JOIN_RETRY_FLOOR, and the pause doubles from it; a wait over the floor is
    the server's."""
    joins = JoinPacer(random=lambda: 0.0)
    joins.sent(1, 0.0)
    joins.refused(1, 0.0, 0.0)
    assert joins.next_at(0.0) == pytest.approx(JOIN_RETRY_FLOOR)
    joins.sent(2, JOIN_RETRY_FLOOR)
    joins.refused(2, JOIN_RETRY_FLOOR, 0.0)
    assert joins.next_at(JOIN_RETRY_FLOOR) == pytest.approx(3 * JOIN_RETRY_FLOOR), "doubled"
    slow = JoinPacer(random=lambda: 0.0)
    slow.sent(1, 0.0)
    slow.refused(1, 0.0, 0.3)
    assert slow.next_at(0.0) == pytest.approx(0.3)
