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
//! one token's refill time, and exactly that when the bucket was left empty: the
//! longest such span seen, plus a tenth, is taken as the pace (`interval`). From then
//! on:
//!
//! - the window drops to one send and widens by one per acknowledgement;
//! - nothing is written before the `retry_after_ms` has passed;
//! - each send spends a token of a local bucket refilled one per `interval` and
//!   holding at most `limit`, so a long queue goes out at the server's rate instead
//!   of drawing a refusal for most sends, and after a quiet spell a whole window may
//!   go at once again.
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
    stamp: Option<Instant>,
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
        if !self.interval.is_zero() {
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
        if !self.interval.is_zero() {
            self.tokens = (self.tokens_at(now) - 1.0).max(0.0);
            self.stamp = Some(now);
        }
    }

    /// A send's echo came: the window widens by one, up to `limit`.
    pub(crate) fn acknowledged(&mut self) {
        self.window = (self.window + 1).min(self.limit);
    }

    /// The server refused, at `now`, a send written at `written_at`: no token for
    /// `retry_after`.
    pub(crate) fn rate_limited(&mut self, now: Instant, retry_after: Duration, written_at: Option<Instant>) {
        self.window = 1;
        self.pause(now + retry_after);
        if retry_after.is_zero() {
            return;
        }
        let mut span = retry_after;
        if let Some(written_at) = written_at {
            // The writes up to the refused one, in order; the one before it.
            let mut earlier = self.writes.iter().filter(|t| **t <= written_at).rev();
            if let (Some(_), Some(before)) = (earlier.next(), earlier.next()) {
                span += written_at.saturating_duration_since(*before);
            }
        }
        self.interval = self.interval.max(span.mul_f64(PACE_MARGIN));
        // The server's bucket holds its next token at now + retry_after.
        self.tokens = (1.0 - retry_after.as_secs_f64() / self.interval.as_secs_f64()).max(0.0);
        self.stamp = Some(now);
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
        self.writes.clear();
    }

    fn tokens_at(&self, now: Instant) -> f64 {
        let refilled = self
            .stamp
            .map_or(0.0, |stamp| now.saturating_duration_since(stamp).as_secs_f64() / self.interval.as_secs_f64());
        (self.tokens + refilled).min(self.limit as f64)
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
        pacer.acknowledged();
        assert_eq!(pacer.window, 2);
        for _ in 0..5 {
            pacer.acknowledged();
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
            pacer.acknowledged();
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
            pacer.acknowledged();
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
        close(fast.interval, ms(22.0));
    }
}
