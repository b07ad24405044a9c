//! Reconnect delays: exponential backoff with full jitter, as centrifuge-js does
//! (`min + rand(0, min(max, min * 2^attempt))`), so a fleet of clients that lost
//! the same server spreads its reconnects instead of arriving together.

use std::time::Duration;

/// Backoff bounds (defaults 0.5 s .. 20 s).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Backoff {
    pub min: Duration,
    pub max: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff { min: Duration::from_millis(500), max: Duration::from_secs(20) }
    }
}

impl Backoff {
    /// The delay before reconnect attempt `attempt` (0 = the first retry), with
    /// `random` in `[0, 1)` supplied by the caller (tests inject it).
    pub fn delay(&self, attempt: u32, random: f64) -> Duration {
        let min = self.min.as_secs_f64();
        let max = self.max.as_secs_f64();
        let ceiling = (min * 2f64.powi(attempt.min(30) as i32)).min(max);
        let secs = (min + random.clamp(0.0, 1.0) * ceiling).min(max.max(min));
        Duration::from_secs_f64(secs)
    }

    /// The delay after the server said it is going away (1001): "at once", but
    /// spread over `[0, min)` so a deploy's clients do not all arrive in one instant.
    pub fn going_away_delay(&self, random: f64) -> Duration {
        self.min.mul_f64(random.clamp(0.0, 1.0))
    }
}

/// A `Retry-After` header's wait (delta-seconds, as wschat sends it with a 503 or 429
/// refusing the upgrade); `None` when it is not a number of seconds.
pub(crate) fn retry_after_header(value: &str) -> Option<Duration> {
    let secs: f64 = value.trim().parse().ok()?;
    (secs.is_finite() && secs > 0.0).then(|| Duration::from_secs_f64(secs.min(86_400.0)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_headers_are_seconds() {
        assert_eq!(retry_after_header("5"), Some(Duration::from_secs(5)));
        assert_eq!(retry_after_header(" 2.5 "), Some(Duration::from_millis(2500)));
        for bad in ["", "0", "-1", "soon", "Wed, 21 Oct 2015 07:28:00 GMT", "NaN", "inf"] {
            assert_eq!(retry_after_header(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn grows_exponentially_within_bounds() {
        let b = Backoff::default();
        assert_eq!(b.delay(0, 0.0), Duration::from_millis(500));
        assert_eq!(b.delay(0, 1.0), Duration::from_millis(1000));
        assert_eq!(b.delay(1, 1.0), Duration::from_millis(1500));
        assert_eq!(b.delay(3, 1.0), Duration::from_millis(4500));
        assert_eq!(b.delay(3, 0.5), Duration::from_millis(2500));
        // Never above max, however many attempts.
        assert_eq!(b.delay(10, 1.0), Duration::from_secs(20));
        assert_eq!(b.delay(u32::MAX, 0.999), Duration::from_secs(20));
    }

    #[test]
    fn jitter_is_full_range() {
        let b = Backoff { min: Duration::from_secs(1), max: Duration::from_secs(60) };
        let low = b.delay(4, 0.0);
        let high = b.delay(4, 0.99);
        assert_eq!(low, Duration::from_secs(1));
        assert!(high > Duration::from_secs(16) && high < Duration::from_secs(17), "{high:?}");
        assert!(b.going_away_delay(0.5) == Duration::from_millis(500));
        assert!(b.going_away_delay(0.0).is_zero());
    }
}
