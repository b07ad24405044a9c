//! Send pacing: how many sends may be on the wire, and when the next may go.
//!
//! No I/O and no clock: every call takes `now`, so the maths is unit-tested. The
//! Python (`pacer.py`) and TypeScript (`pacer.ts`) libraries hold the same rules.
//!
//! Until the first `rate_limited` only the window holds sends back: `limit`
//! (`max_in_flight`) written and not yet acknowledged. The server's bucket is the
//! user's; when it refuses a send it says how long until the bucket holds a token
//! again (`retry_after_ms`). The send written before the refused one took a token (or
//! was refused for the same one), so from that write to the next token is at most
//! one token's refill time, and exactly that when the bucket was left empty. But the
//! bucket is shared with the user's other connections (and `typing`, and for guests the
//! address's bucket): the write before may be long ago, and another connection emptied the
//! bucket since. So that gap counts for at most one token's time as far as it is known:
//! `retry_after` (never more than one token's time), or the token time the pace already
//! stands for (`interval` less its tenth) if longer. The first span is then between
//! `retry_after` and twice it (the pace at worst about half the server's rate), a later one
//! adds at most `retry_after` (and a tenth) to the pace, and a quiet spell is never taken for
//! the pace. The longest span seen, plus a tenth, is the pace (`interval`); a span too short
//! draws another refusal, whose gap (a paced one: the pace) lengthens it past the server's
//! token time. From then on:
//!
//! - the window drops to one send and widens by one per acknowledgement;
//! - nothing is written before the `retry_after_ms` has passed;
//! - each send spends a token of a local bucket refilled one per `interval` and
//!   holding at most `limit`, so a long queue goes out at the server's rate instead
//!   of drawing a refusal for most sends, and after a quiet spell a whole window may
//!   go at once again.
//!
//! The pace only grows while refusals come, so it is forgotten (`interval` back to zero, as
//! before any refusal) once the connection has neither written, nor been refused, nor had a
//! send acknowledged for `PACE_MEMORY` intervals: a connection that keeps writing keeps its
//! pace (a long queue draws no new window of refusals), and so does one whose writes wait for
//! acknowledgements (a round trip longer than `PACE_MEMORY` intervals, the window full: the
//! acknowledgement shows it is still in the paced exchange, and forgetting there would learn
//! the pace again with a window of refusals every round trip); a quiet one (the window not
//! full: nothing waited) forgets it, and the late acknowledgement of a send written before the
//! quiet spell does not bring it back; it starts afresh with
//! its next refusal (at most a window of them, `limit`, within the server's burst), so a pace
//! learnt from another connection's burst, or a slower one, does not last.
//!
//! [`Pacer::reset`] (a new connection, perhaps to a server with other limits)
//! forgets the pace but keeps a pause that has not ended (the bucket is the user's,
//! not the connection's).

use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// Paced sends go this much slower than the server's rate: what its bucket saves up
/// absorbs the jitter of the way there (a send that arrives a little early is refused).
const PACE_MARGIN: f64 = 1.1;
/// A bucket refilled for exactly one token's time must hold that token, whatever
/// floating point makes of it.
const EPSILON: f64 = 1e-9;
/// The pace is forgotten after this many intervals with no write, no refusal and no
/// acknowledgement.
const PACE_MEMORY: u32 = 10;
/// Write times kept to find the one before a refused send.
const WRITES_KEPT: usize = 64;

#[derive(Debug)]
pub(crate) struct Pacer {
    limit: usize,
    window: usize,
    /// Time per token; zero until a `rate_limited` told us.
    interval: Duration,
    paused_until: Option<Instant>,
    tokens: f64,
    /// When `tokens` was counted.
    stamp: Option<Instant>,
    /// The latest write, refusal or acknowledgement while paced.
    fresh: Option<Instant>,
    writes: VecDeque<Instant>,
}

impl Pacer {
    pub(crate) fn new(limit: usize) -> Self {
        let limit = limit.max(1);
        Pacer {
            limit,
            window: limit,
            interval: Duration::ZERO,
            paused_until: None,
            tokens: 0.0,
            stamp: None,
            fresh: None,
            writes: VecDeque::new(),
        }
    }

    /// When the next send may be written (`now` if at once), with `in_flight` sends
    /// unacknowledged; `None` while the window is full (an acknowledgement frees a place).
    pub(crate) fn next_at(&self, now: Instant, in_flight: usize) -> Option<Instant> {
        if in_flight >= self.window {
            return None;
        }
        let mut at = self.paused_until.map_or(now, |until| until.max(now));
        if !self.interval.is_zero() && !self.stale(at) {
            let tokens = self.tokens_at(at);
            if tokens < 1.0 - EPSILON {
                at += self.interval.mul_f64(1.0 - tokens);
            }
        }
        Some(at)
    }

    /// A send was written at `now` (when [`Pacer::next_at`] allowed it).
    pub(crate) fn sent(&mut self, now: Instant) {
        self.writes.push_back(now);
        if self.writes.len() > WRITES_KEPT {
            self.writes.pop_front();
        }
        self.forget_stale(now);
        if !self.interval.is_zero() {
            self.tokens = (self.tokens_at(now) - 1.0).max(0.0);
            self.stamp = Some(now);
            self.fresh = Some(now);
        }
    }

    /// A send's echo came at `now`, with `in_flight` sends unacknowledged (this one among
    /// them): the window widens by one, up to `limit`. With the window full (writes waited for
    /// this acknowledgement) the pace stays fresh, however long the round trip was; otherwise
    /// a pace already stale is forgotten first, as by a write, and the acknowledgement does
    /// not bring it back.
    pub(crate) fn acknowledged(&mut self, now: Instant, in_flight: usize) {
        if in_flight < self.window {
            self.forget_stale(now);
        }
        self.window = (self.window + 1).min(self.limit);
        if !self.interval.is_zero() {
            self.fresh = Some(now);
        }
    }

    /// The server refused, at `now`, a send written at `written_at`: no token for
    /// `retry_after`.
    pub(crate) fn rate_limited(&mut self, now: Instant, retry_after: Duration, written_at: Option<Instant>) {
        self.window = 1;
        self.pause(now + retry_after);
        self.forget_stale(now);
        if retry_after.is_zero() {
            return;
        }
        let mut span = retry_after;
        if let Some(written_at) = written_at {
            // The writes up to the refused one, in order; the one before it. The gap since
            // then counts for at most one token's time as far as we know it (another
            // connection may have emptied the bucket in it).
            let mut earlier = self.writes.iter().filter(|t| **t <= written_at).rev();
            if let (Some(_), Some(before)) = (earlier.next(), earlier.next()) {
                let token = retry_after.max(self.interval.div_f64(PACE_MARGIN));
                span += written_at.saturating_duration_since(*before).min(token);
            }
        }
        self.interval = self.interval.max(span.mul_f64(PACE_MARGIN));
        // The server's bucket holds its next token at now + retry_after.
        self.tokens = (1.0 - retry_after.as_secs_f64() / self.interval.as_secs_f64()).max(0.0);
        self.stamp = Some(now);
        self.fresh = Some(now);
    }

    /// No send before `until` (the server cannot take one: `unavailable`).
    pub(crate) fn pause(&mut self, until: Instant) {
        self.paused_until = self.paused_until.max(Some(until));
    }

    /// Whether a pause lasts at `now`.
    pub(crate) fn paused(&self, now: Instant) -> bool {
        self.paused_until.is_some_and(|until| until > now)
    }

    /// A new connection: a full window, no pace; a pause not yet over stays.
    pub(crate) fn reset(&mut self) {
        self.window = self.limit;
        self.interval = Duration::ZERO;
        self.tokens = 0.0;
        self.stamp = None;
        self.fresh = None;
        self.writes.clear();
    }

    /// Whether the pace is too old at `now`: no write, no refusal and no acknowledgement
    /// (`fresh`, the latest) for `PACE_MEMORY` intervals.
    fn stale(&self, now: Instant) -> bool {
        self.fresh.is_none_or(|fresh| now.saturating_duration_since(fresh) >= self.interval * PACE_MEMORY)
    }

    fn forget_stale(&mut self, now: Instant) {
        if !self.interval.is_zero() && self.stale(now) {
            self.interval = Duration::ZERO;
            self.tokens = 0.0;
        }
    }

    fn tokens_at(&self, now: Instant) -> f64 {
        let refilled = self
            .stamp
            .map_or(0.0, |stamp| now.saturating_duration_since(stamp).as_secs_f64() / self.interval.as_secs_f64());
        (self.tokens + refilled).min(self.limit as f64)
    }
}

/// Joins on the wire at once, by default (the Python and JS clients keep the same number).
pub(crate) const JOIN_WINDOW: usize = 4;
/// The other requests (`ping`, `history`, `list_users`, `leave`, moderation) on the wire at
/// once, by default: they draw on the same request bucket, paced by a [`JoinPacer`] of their own.
pub(crate) const REQUEST_WINDOW: usize = 4;
/// A refused join written after a refusal doubles the pause, up to 2^(JOIN_PROBES_MAX - 1)
/// (32) times `retry_after_ms`, and the jitter.
const JOIN_PROBES_MAX: u32 = 6;
/// The shortest pause after a `rate_limited` join, whatever its `retry_after_ms` (the server's
/// is at least 1 ms; a 0 from a proxy or a buggy server would never grow by doubling, and the
/// refusals would come back to back). A missing `retry_after_ms` is a second, as for sends.
pub(crate) const JOIN_RETRY_FLOOR: Duration = Duration::from_millis(50);

/// When the next `join` may be written, as the Python (`JoinPacer`) and JS clients decide it.
/// A connection rejoining many rooms draws on the user's request bucket
/// (`RATE_LIMIT_REQUESTS_BURST`), which every connection of the user shares, and more than
/// 2 x `RATE_LIMIT_BURST` refusals in a row get the connection closed (4102). So:
///
/// - at most `limit` joins are unanswered (a [`Pacer`] window), so at most that many are
///   refused together once the bucket is empty;
/// - after a `rate_limited` join none is written before its `retry_after_ms` (at least
///   [`JOIN_RETRY_FLOOR`]), then one at a time and at the server's pace (the [`Pacer`] rules);
/// - a join written after a refusal and refused too (another connection of the user took the
///   tokens meanwhile) makes the pause grow: `retry_after` times 2^(n-1) (at most 32), from
///   once to twice that (jitter, so two tabs do not keep colliding), for the n-th refusal since
///   the latest `joined` (the first: `retry_after`). So a few refusals come in a row, not a flood.
///
/// A new connection starts with a clean join pacer: the pause and the count of refusals belong
/// to the connection they were learnt on (the next may be to another server, with other limits,
/// and what the user's bucket holds by then is the server's to say: at most a window of joins is
/// refused before the new connection learns it again).
///
/// No I/O and no clock, like [`Pacer`]. The key: the join's request id.
#[derive(Debug)]
pub(crate) struct JoinPacer {
    pacer: Pacer,
    /// Join request id -> when it was written.
    in_flight: std::collections::HashMap<u64, Instant>,
    /// Refused joins written after a refusal, since the latest `joined`.
    probes: u32,
    /// When the latest refusal came.
    refused_at: Option<Instant>,
}

impl JoinPacer {
    pub(crate) fn new(limit: usize) -> Self {
        JoinPacer { pacer: Pacer::new(limit), in_flight: Default::default(), probes: 0, refused_at: None }
    }

    /// When the next join may be written (`now`: at once); `None` while the window is full.
    pub(crate) fn next_at(&self, now: Instant) -> Option<Instant> {
        self.pacer.next_at(now, self.in_flight.len())
    }

    pub(crate) fn sent(&mut self, key: u64, now: Instant) {
        self.in_flight.insert(key, now);
        self.pacer.sent(now);
    }

    /// The join `key` was answered `joined`; false if it is none of ours.
    pub(crate) fn joined(&mut self, key: u64, now: Instant) -> bool {
        if !self.in_flight.contains_key(&key) {
            return false;
        }
        self.pacer.acknowledged(now, self.in_flight.len());
        self.in_flight.remove(&key);
        self.probes = 0;
        true
    }

    /// The join `key` was refused: `retry_after` for `rate_limited` (its `retry_after_ms`;
    /// `None` for another refusal), `random` in `[0, 1)` for the jitter. False if it is none
    /// of ours.
    pub(crate) fn refused(&mut self, key: u64, now: Instant, retry_after: Option<Duration>, random: f64) -> bool {
        let Some(written_at) = self.in_flight.remove(&key) else { return false };
        if let Some(retry_after) = retry_after {
            self.limited(now, retry_after, written_at, Some(written_at), random);
        }
        true
    }

    /// A request this pacer did not write (the `ping` behind a join; a join, for the request
    /// pacer; a request, for the join pacer) was written at `now`: the server charges it to the
    /// same bucket, so it spends a token of the learnt pace (and counts as a write) as one of the
    /// pacer's own does, but it takes no place in the window (its answer is none of the
    /// pacer's). Without a learnt pace there is no token to spend.
    pub(crate) fn sent_unpaced(&mut self, now: Instant) {
        self.pacer.sent(now);
    }

    /// A request this pacer did not write (the `ping` behind a join, written at once), written
    /// at `written_at`, was refused `rate_limited` at `now`: the bucket is the user's, so the
    /// same pause as for a refusal of one of its own ([`JoinPacer::refused`]), the refused ones
    /// in a row counted alike. It is none of the pacer's requests: the pace is learnt from
    /// `retry_after` alone.
    pub(crate) fn refused_unpaced(&mut self, now: Instant, retry_after: Duration, written_at: Instant, random: f64) {
        self.limited(now, retry_after, written_at, None, random);
    }

    /// `refused`'s pause; `pace_from`: the refused write among the pacer's, if it is one.
    fn limited(
        &mut self,
        now: Instant,
        retry_after: Duration,
        written_at: Instant,
        pace_from: Option<Instant>,
        random: f64,
    ) {
        // The pace is learnt from what the server said; the pause is at least the floor.
        self.pacer.rate_limited(now, retry_after, pace_from);
        let wait = retry_after.max(JOIN_RETRY_FLOOR);
        self.pacer.pause(now + wait);
        if self.refused_at.is_none_or(|at| written_at > at) {
            self.probes = (self.probes + 1).min(JOIN_PROBES_MAX);
            if self.probes > 1 {
                let factor = 2f64.powi(self.probes as i32 - 1) * (1.0 + random.clamp(0.0, 1.0));
                self.pacer.pause(now + wait.mul_f64(factor));
            }
        }
        self.refused_at = Some(now);
    }

    /// A new connection: nothing in flight, a full window, no pace, no pause, no refusal.
    pub(crate) fn reset(&mut self) {
        *self = JoinPacer::new(self.pacer.limit);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: f64) -> Duration {
        Duration::from_secs_f64(n / 1000.0)
    }

    /// Writes sends while the pacer allows at `now`; how many went.
    fn drain(pacer: &mut Pacer, now: Instant, waiting: usize) -> usize {
        let mut written = 0;
        while written < waiting && pacer.next_at(now, written) == Some(now) {
            pacer.sent(now);
            written += 1;
        }
        written
    }

    fn close(actual: Duration, expected: Duration) {
        let diff = actual.abs_diff(expected);
        assert!(diff < Duration::from_micros(1), "{actual:?} != {expected:?}");
    }

    #[test]
    fn only_the_window_holds_sends_back_before_any_refusal() {
        let t0 = Instant::now();
        let mut pacer = Pacer::new(16);
        assert_eq!(drain(&mut pacer, t0, 100), 16);
        assert_eq!(pacer.next_at(t0, 16), None);
        assert_eq!(pacer.next_at(t0, 15), Some(t0));
    }

    #[test]
    fn rate_limited_pauses_and_drops_the_window_to_one() {
        let t0 = Instant::now();
        let mut pacer = Pacer::new(4);
        pacer.rate_limited(t0, ms(100.0), None);
        assert!(pacer.paused(t0) && !pacer.paused(t0 + ms(100.0)));
        assert_eq!(pacer.next_at(t0, 0), Some(t0 + ms(100.0)));
        assert_eq!(drain(&mut pacer, t0 + ms(100.0), 5), 1);
        assert_eq!(pacer.next_at(t0 + ms(100.0), 1), None);
        pacer.acknowledged(t0 + ms(100.0), 1);
        assert_eq!(pacer.window, 2);
        for _ in 0..5 {
            pacer.acknowledged(t0 + ms(100.0), 0);
        }
        assert_eq!(pacer.window, 4);
    }

    #[test]
    fn after_rate_limited_a_long_queue_goes_one_send_per_interval() {
        let t0 = Instant::now();
        let mut pacer = Pacer::new(16);
        pacer.rate_limited(t0, ms(20.0), None);
        pacer.rate_limited(t0 + ms(1.0), ms(19.0), None); // the rest of the batch: the same token
        close(pacer.interval, ms(22.0));
        let mut now = t0;
        let mut times = Vec::new();
        for _ in 0..20 {
            now = pacer.next_at(now, 0).unwrap(); // each acknowledged before the next
            times.push(now);
            pacer.sent(now);
            pacer.acknowledged(now, 1);
        }
        close(times[0] - t0, ms(20.0));
        for pair in times.windows(2) {
            close(pair[1] - pair[0], ms(22.0));
        }
    }

    #[test]
    fn a_quiet_spell_refills_the_local_bucket_up_to_the_window() {
        let t0 = Instant::now();
        let mut pacer = Pacer::new(8);
        pacer.rate_limited(t0, ms(100.0), None);
        for _ in 0..8 {
            pacer.acknowledged(t0, 0);
        }
        let start = t0 + ms(100.0);
        assert_eq!(drain(&mut pacer, start, 100), 1);
        let later = start + pacer.interval * 4;
        assert_eq!(drain(&mut pacer, later, 100), 4);
        assert_eq!(drain(&mut pacer, t0 + Duration::from_secs(100), 100), 8);
    }

    #[test]
    fn reset_forgets_the_pace_but_not_a_pause() {
        let t0 = Instant::now();
        let mut pacer = Pacer::new(4);
        pacer.rate_limited(t0, ms(1000.0), None);
        pacer.reset();
        assert_eq!((pacer.window, pacer.interval), (4, Duration::ZERO));
        assert_eq!(pacer.next_at(t0 + ms(500.0), 0), Some(t0 + ms(1000.0)));
        assert_eq!(drain(&mut pacer, t0 + ms(1000.0), 100), 4);
    }

    #[test]
    fn a_pace_guessed_too_fast_is_corrected_by_the_next_refusal() {
        // The first refusal came when the bucket was half full again (10 ms of a 20 ms token).
        let t0 = Instant::now();
        let mut pacer = Pacer::new(16);
        pacer.sent(t0); // accepted: the bucket is empty from here
        pacer.sent(t0 + ms(10.0));
        pacer.rate_limited(t0 + ms(11.0), ms(10.0), Some(t0 + ms(10.0)));
        close(pacer.interval, ms(22.0)); // 10 ms since the write before + 10 ms, plus a tenth
        let mut fast = Pacer::new(16);
        fast.sent(t0 + ms(10.0));
        fast.rate_limited(t0 + ms(11.0), ms(10.0), Some(t0 + ms(10.0))); // no write before it known
        close(fast.interval, ms(11.0));
        let first = fast.next_at(t0 + ms(11.0), 0).unwrap();
        close(first - t0, ms(21.0));
        fast.sent(first); // accepted: the server's bucket is empty at 21 ms
        let second = fast.next_at(first, 0).unwrap();
        close(second - t0, ms(32.0));
        fast.sent(second); // 11 ms later: the server needs 9 more
        fast.rate_limited(second + ms(1.0), ms(9.0), Some(second));
        close(fast.interval, ms(20.9)); // 9 ms + the 10 ms the pace stood for, plus a tenth
        assert!(fast.interval > ms(20.0));
    }
    /// One write, a quiet minute, then a send refused for 100 ms because another connection
    /// of the same user (the bucket is the user's) emptied the bucket: the gap since the write
    /// before counts for at most retry_after, so the next sends go about 0.2 s apart.
    #[test]
    fn a_refusal_after_a_quiet_spell_does_not_make_the_quiet_spell_the_pace() {
        let t0 = Instant::now();
        let mut pacer = Pacer::new(16);
        pacer.sent(t0);
        let written = t0 + Duration::from_secs(60);
        pacer.sent(written);
        pacer.rate_limited(written + ms(5.0), ms(100.0), Some(written));
        close(pacer.interval, ms(220.0)); // (100 + min(60000, 100)) plus a tenth
        let mut now = pacer.next_at(written + ms(5.0), 0).unwrap();
        close(now - t0, Duration::from_secs(60) + ms(105.0)); // the retried send
        pacer.sent(now);
        pacer.acknowledged(now, 1);
        for i in 0..3 {
            let at = pacer.next_at(now, 0).unwrap();
            assert!(at - now <= ms(220.0) + Duration::from_micros(1), "send {i} waits {:?}", at - now);
            now = at;
            pacer.sent(now);
            pacer.acknowledged(now, 1);
        }
    }

    /// Ten intervals with no write and no refusal: a whole window goes at once (not only the
    /// ten tokens the local bucket saved); a new refusal learns the pace again. A connection
    /// that keeps writing keeps its pace.
    #[test]
    fn the_pace_is_forgotten_after_a_quiet_spell_and_learnt_again() {
        let t0 = Instant::now();
        let mut pacer = Pacer::new(16);
        pacer.rate_limited(t0, ms(100.0), None);
        let interval = pacer.interval;
        for _ in 0..16 {
            pacer.acknowledged(t0, 0);
        }
        let mut now = t0 + ms(100.0);
        for _ in 0..30 {
            now = pacer.next_at(now, 0).unwrap(); // a long paced queue: writes all along
            pacer.sent(now);
        }
        assert_eq!(pacer.interval, interval);
        assert_eq!(drain(&mut pacer, now + interval * 9, 100), 9, "nine intervals: still paced");
        let quiet = now + interval * 9 + interval.mul_f64(10.5);
        assert_eq!(drain(&mut pacer, quiet, 100), 16, "the pace is forgotten: the whole window");
        assert_eq!(pacer.interval, Duration::ZERO);
        pacer.rate_limited(quiet + ms(1.0), ms(50.0), None);
        close(pacer.interval, ms(55.0));
    }

    /// A round trip of twenty intervals, the window full: no write and no refusal for longer
    /// than ten intervals, but the acknowledgement shows the connection is still in the paced
    /// exchange, so the pace stays. Ten quiet intervals after the acknowledgement (no write, no
    /// refusal, no acknowledgement) forget it as before.
    #[test]
    fn an_acknowledgement_keeps_the_pace_across_a_long_round_trip() {
        let t0 = Instant::now();
        let mut pacer = Pacer::new(16);
        pacer.rate_limited(t0, ms(100.0), None);
        let interval = pacer.interval;
        let mut now = pacer.next_at(t0, 0).unwrap();
        pacer.sent(now);
        assert_eq!(pacer.next_at(now, 1), None, "the window (one) is full");
        now += interval * 20; // the round trip
        pacer.acknowledged(now, 1); // the window (one) was full
        assert_eq!(drain(&mut pacer, now, 100), 2, "the window (two); the local bucket saved them");
        assert_eq!(pacer.interval, interval, "still paced");
        pacer.acknowledged(now + interval * 5, 2);
        let quiet = now + interval.mul_f64(15.5); // ten and a half intervals after the acknowledgement
        assert_eq!(drain(&mut pacer, quiet, 100), 3);
        assert_eq!(pacer.interval, Duration::ZERO, "forgotten");
    }

    /// One send on the wire, the window (16) not full, then eleven intervals with no write, no
    /// refusal and no acknowledgement: nothing waited for an acknowledgement, so the pace is
    /// forgotten (the whole window may go), and the late acknowledgement of that send does not
    /// bring it back (the local bucket held eleven tokens then, not the whole window). A full
    /// window waiting for its acknowledgement keeps the pace (the test above).
    #[test]
    fn a_late_acknowledgement_does_not_bring_back_a_pace_forgotten_in_a_quiet_spell() {
        let t0 = Instant::now();
        let mut pacer = Pacer::new(16);
        pacer.rate_limited(t0, ms(100.0), None);
        let interval = pacer.interval;
        for _ in 0..15 {
            pacer.acknowledged(t0, 0); // the window back to 16
        }
        let now = pacer.next_at(t0, 0).unwrap();
        pacer.sent(now);
        let late = now + interval * 11;
        assert_eq!(pacer.next_at(late, 1), Some(late), "forgotten: no wait for a token");
        pacer.acknowledged(late, 1); // one on the wire: the window (16) was not full
        assert_eq!(pacer.interval, Duration::ZERO, "the late acknowledgement brought the pace back");
        assert_eq!(drain(&mut pacer, late, 100), 16);
    }

    /// What a simulated exchange has next.
    enum Step {
        Write,
        Arrive { written_at: Instant },
        Echo,
        Refused { written_at: Instant, retry_after: Duration },
    }

    /// `sends` queued at once, written when the pacer allows, to a server `latency` away each
    /// way whose bucket (`rate` per second, `burst`) answers as the server's `take`
    /// (wschat/ratelimit.py) does: an echo, or `rate_limited` with `retry_after_ms`; a refused
    /// send is written again. Returns the number of refusals.
    fn simulate(sends: usize, rate: f64, burst: f64, latency: Duration) -> usize {
        let t0 = Instant::now();
        let mut pacer = Pacer::new(16);
        let mut steps: Vec<(Instant, usize, Step)> = Vec::new(); // taken earliest first, then in order
        let mut order = 0;
        let mut push = |steps: &mut Vec<(Instant, usize, Step)>, at: Instant, step: Step| {
            order += 1;
            steps.push((at, order, step));
        };
        let (mut tokens, mut last) = (burst, t0);
        let (mut queued, mut in_flight, mut refusals) = (sends, 0, 0);
        let (mut now, mut write_due) = (t0, false);
        loop {
            while queued > 0 {
                let Some(at) = pacer.next_at(now, in_flight) else { break };
                if at > now {
                    if !write_due {
                        write_due = true;
                        push(&mut steps, at, Step::Write);
                    }
                    break;
                }
                pacer.sent(now);
                queued -= 1;
                in_flight += 1;
                push(&mut steps, now + latency, Step::Arrive { written_at: now });
            }
            let Some(first) = (0..steps.len()).min_by_key(|i| (steps[*i].0, steps[*i].1)) else { break };
            let (at, _, step) = steps.swap_remove(first);
            now = at;
            match step {
                Step::Write => write_due = false,
                Step::Arrive { written_at } => {
                    tokens = (tokens + (now - last).as_secs_f64() * rate).min(burst);
                    last = now;
                    if tokens >= 1.0 - EPSILON {
                        tokens = (tokens - 1.0).max(0.0);
                        push(&mut steps, now + latency, Step::Echo);
                    } else {
                        let retry_ms = ((1.0 - tokens) / rate * 1000.0).ceil().max(1.0);
                        let retry_after = Duration::from_millis(retry_ms as u64);
                        push(&mut steps, now + latency, Step::Refused { written_at, retry_after });
                    }
                }
                Step::Echo => {
                    pacer.acknowledged(now, in_flight);
                    in_flight -= 1;
                }
                Step::Refused { written_at, retry_after } => {
                    in_flight -= 1;
                    queued += 1;
                    refusals += 1;
                    pacer.rate_limited(now, retry_after, Some(written_at));
                }
            }
        }
        assert_eq!((queued, in_flight), (0, 0));
        refusals
    }

    /// 300 sends at a server of 20/s with a burst of 20, 0.3 s away each way (0.6 s, over ten
    /// of the pacer's 55 ms intervals): the window, not the pace, holds writes back between
    /// acknowledgements. Forgetting the pace in that wait learnt it again, with a window of
    /// refusals, every few round trips (24 refusals); kept fresh by the acknowledgements it is
    /// learnt once (4).
    #[test]
    fn a_round_trip_longer_than_ten_intervals_does_not_relearn_the_pace() {
        let long = simulate(300, 20.0, 20.0, ms(300.0));
        assert!(long <= 6, "{long} refusals");
        let short = simulate(300, 20.0, 20.0, ms(10.0));
        assert!(short <= 20, "a short round trip: about a window, not {short}");
    }

    // The join pacer (the same cases as the Python library's test_pacer.py).

    fn msi(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn joins_go_a_window_at_a_time() {
        let t0 = Instant::now();
        let mut joins = JoinPacer::new(JOIN_WINDOW);
        for key in 0..JOIN_WINDOW as u64 {
            assert_eq!(joins.next_at(t0), Some(t0));
            joins.sent(key, t0);
        }
        assert_eq!(joins.next_at(t0), None);
        let t = t0 + msi(10);
        assert!(joins.joined(0, t));
        assert!(!joins.joined(0, t), "answered already");
        assert_eq!(joins.next_at(t), Some(t));
    }

    #[test]
    fn a_rate_limited_join_holds_every_join_until_retry_after_then_one_at_a_time() {
        let t0 = Instant::now();
        let mut joins = JoinPacer::new(4);
        for key in 0..4 {
            joins.sent(key, t0);
        }
        assert!(joins.joined(0, t0 + msi(1)));
        for key in 1..4 {
            assert!(joins.refused(key, t0 + msi(2), Some(msi(100)), 0.5)); // the bucket is empty
        }
        assert_eq!(joins.next_at(t0 + msi(2)), Some(t0 + msi(102)), "not before retry_after");
        joins.sent(4, t0 + msi(102));
        assert_eq!(joins.next_at(t0 + msi(102)), None, "one at a time after a refusal");
        assert!(joins.joined(4, t0 + msi(103)));
        assert!(joins.next_at(t0 + msi(103)).unwrap() > t0 + msi(193), "paced at the server's rate");
    }

    #[test]
    fn a_join_refused_again_after_the_pause_doubles_it_with_jitter() {
        let t0 = Instant::now();
        let mut joins = JoinPacer::new(4);
        joins.sent(100, t0);
        joins.refused(100, t0, Some(msi(100)), 0.0);
        assert_eq!(joins.next_at(t0), Some(t0 + msi(100)), "the first refusal: retry_after");
        let mut now = t0 + msi(100);
        let mut waits = Vec::new();
        for n in 0..8 {
            joins.sent(n, now);
            joins.refused(n, now, Some(msi(100)), if n == 7 { 1.0 } else { 0.0 });
            let at = joins.next_at(now).unwrap();
            waits.push(((at - now).as_secs_f64() * 1000.0).round() as u64);
            now = at;
        }
        assert_eq!(waits, [200, 400, 800, 1600, 3200, 3200, 3200, 6400], "at most 32 x, then the jitter");
        joins.sent(200, now);
        assert!(joins.joined(200, now));
        joins.sent(201, now + msi(1000));
        joins.refused(201, now + msi(1000), Some(msi(100)), 0.0);
        assert_eq!(joins.next_at(now + msi(1000)), Some(now + msi(1100)), "a joined starts the doubling again");
    }

    /// The `ping` behind a join (written at once, not by the request pacer) refused
    /// `rate_limited`: the same pause as for a refusal of one of the pacer's own requests, and it
    /// counts in the refusals in a row by when it was written; the window drops to one.
    #[test]
    fn a_refused_request_the_pacer_did_not_write_pauses_as_one_of_its_own() {
        let t0 = Instant::now();
        let mut requests = JoinPacer::new(4);
        requests.refused_unpaced(t0 + msi(10), msi(100), t0 + msi(5), 0.0);
        assert_eq!(requests.next_at(t0 + msi(10)), Some(t0 + msi(110)), "not before retry_after");
        // Written with the first, refused with it: not doubled.
        requests.refused_unpaced(t0 + msi(12), msi(100), t0 + msi(6), 0.0);
        assert_eq!(requests.next_at(t0 + msi(12)), Some(t0 + msi(112)), "not doubled");
        // Written after a refusal, refused too: doubled.
        requests.refused_unpaced(t0 + msi(150), msi(100), t0 + msi(120), 0.0);
        assert_eq!(requests.next_at(t0 + msi(150)), Some(t0 + msi(350)), "doubled");
        requests.sent(1, t0 + msi(400));
        assert_eq!(requests.next_at(t0 + msi(400)), None, "one at a time after a refusal");
        assert!(requests.joined(1, t0 + msi(401)), "its own request is still its own");
        let mut floor = JoinPacer::new(4);
        floor.refused_unpaced(t0, Duration::ZERO, t0, 0.0);
        assert_eq!(floor.next_at(t0), Some(t0 + JOIN_RETRY_FLOOR), "retry_after_ms 0: the floor");
    }

    /// The `ping` behind a join (written at once, not by the request pacer) spends a token of the
    /// learnt pace, as one of the pacer's own requests does (the server charges it to the same
    /// bucket), and takes no place in the window; with no pace learnt, nothing waits.
    #[test]
    fn a_request_the_pacer_did_not_write_spends_a_token_of_the_pace_and_no_place() {
        let t0 = Instant::now();
        let mut requests = JoinPacer::new(2);
        requests.sent(1, t0);
        requests.refused(1, t0, Some(msi(100)), 0.0); // the pace: 110 ms a token
        requests.sent(2, t0 + msi(100));
        assert!(requests.joined(2, t0 + msi(100)));
        let now = t0 + msi(320);
        assert_eq!(requests.next_at(now), Some(now), "two tokens saved up (the window is two)");
        requests.sent_unpaced(now);
        assert_eq!(requests.next_at(now), Some(now), "one token left");
        requests.sent_unpaced(now);
        close(requests.next_at(now).unwrap() - t0, msi(430)); // none left: the next one's refill
        requests.sent(3, t0 + msi(430));
        requests.sent(4, t0 + msi(540));
        assert_eq!(requests.next_at(t0 + msi(540)), None, "the window: its own two, the pings none of it");
        assert!(requests.joined(3, t0 + msi(541)), "its own requests are still its own");
        let mut unpaced = JoinPacer::new(2);
        unpaced.sent_unpaced(t0);
        unpaced.sent_unpaced(t0);
        assert_eq!(unpaced.next_at(t0), Some(t0), "no pace learnt: no token to spend, nothing waits");
    }

    /// A `retry_after_ms` of 0 (never the server's, which says at least 1 ms) still pauses the
    /// joins, for the floor, and the pause grows from it. It used to let them go back to back.
    #[test]
    fn a_join_refused_with_no_wait_pauses_for_the_floor_and_grows_from_it() {
        let t0 = Instant::now();
        let mut joins = JoinPacer::new(4);
        joins.sent(1, t0);
        joins.refused(1, t0, Some(Duration::ZERO), 0.0);
        assert_eq!(joins.next_at(t0), Some(t0 + JOIN_RETRY_FLOOR));
        let now = t0 + JOIN_RETRY_FLOOR;
        joins.sent(2, now);
        joins.refused(2, now, Some(Duration::ZERO), 0.0);
        assert_eq!(joins.next_at(now), Some(now + JOIN_RETRY_FLOOR * 2), "doubled");
        let mut slow = JoinPacer::new(4);
        slow.sent(1, t0);
        slow.refused(1, t0, Some(msi(300)), 0.0);
        assert_eq!(slow.next_at(t0), Some(t0 + msi(300)), "a wait over the floor is the server's");
    }

    /// A new connection starts with no pause, no pace and no count of refusals: a join refused
    /// for 2 s on the old one no longer holds the new one's joins, and its first refusal pauses
    /// for its own `retry_after_ms`, not a doubled one.
    #[test]
    fn other_join_refusals_free_a_place_and_a_new_connection_starts_clean() {
        let t0 = Instant::now();
        let mut one = JoinPacer::new(1);
        one.sent(1, t0);
        assert_eq!(one.next_at(t0), None);
        assert!(one.refused(1, t0, None, 0.0)); // unavailable: retried after a backoff
        assert_eq!(one.next_at(t0), Some(t0));
        assert!(!one.refused(99, t0, Some(msi(100)), 0.0), "none of ours");
        let mut joins = JoinPacer::new(4);
        for key in 0..4 {
            joins.sent(key, t0);
        }
        joins.refused(0, t0, Some(msi(2000)), 0.0);
        joins.reset();
        let now = t0 + msi(1000);
        assert_eq!(joins.next_at(now), Some(now), "the old connection's pause is gone");
        assert!(!joins.joined(1, now));
        joins.sent(10, now);
        joins.refused(10, now, Some(msi(100)), 0.0);
        assert_eq!(joins.next_at(now), Some(now + msi(100)), "the new connection's own pause");
    }
}
