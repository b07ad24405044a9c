//! Reconnect delays: exponential backoff with full jitter, as centrifuge-js does
//! (`min + rand(0, min(max, min * 2^attempt))`), so a fleet of clients that lost
//! the same server spreads its reconnects instead of arriving together.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

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

    /// The delay after the server closed for a client's own behaviour (4101 slow consumer,
    /// 4102 flooding): the backoff, but at least 5 s, as the Python and JS clients
    /// wait, so a client that is cut off for reading too slowly or sending too much does
    /// not come straight back to do it again.
    pub fn pause_delay(&self, attempt: u32, random: f64) -> Duration {
        self.delay(attempt, random).max(PAUSE)
    }

    /// The delay after the server said it is going away (1001): "at once", but
    /// spread over `[0, min)` so a deploy's clients do not all arrive in one instant.
    pub fn going_away_delay(&self, random: f64) -> Duration {
        self.min.mul_f64(random.clamp(0.0, 1.0))
    }
}

/// The least wait after 4101 or 4102 ([`Backoff::pause_delay`]).
pub(crate) const PAUSE: Duration = Duration::from_secs(5);

/// The longest wait a `Retry-After` can ask for: a day, as in the JS and Python clients.
pub(crate) const RETRY_AFTER_CAP: Duration = Duration::from_secs(86_400);

/// A `Retry-After` header's wait (RFC 9110), `None` when it asks for none, with the rule the
/// three client libraries (Rust, JS, Python) share, tested by each against the same cases
/// (`clients/conformance/retry-after.json`; the rule: `clients/conformance/README.md`):
///
/// - surrounding spaces and tabs are ignored;
/// - delta-seconds are ASCII digits only (`"2.5"`, `"1e20"`, `"0x10"`, `"inf"`, `"-5"`, `"+5"`
///   are not); `"0"` is no wait;
/// - otherwise an HTTP-date (see [`http_date`]) counted from now; one not ahead is no wait;
/// - the wait is capped at a day ([`RETRY_AFTER_CAP`]), whatever the number of digits;
/// - anything else is no wait from the header: the normal backoff applies.
pub(crate) fn retry_after_header(value: &str) -> Option<Duration> {
    retry_after_at(value, SystemTime::now())
}

/// [`retry_after_header`] with the time given (tests).
fn retry_after_at(value: &str, now: SystemTime) -> Option<Duration> {
    let value = value.trim_matches([' ', '\t']);
    let wait = if !value.is_empty() && value.bytes().all(|b| b.is_ascii_digit()) {
        // Only too many digits for a u64 fail to parse: far above the cap.
        value.parse::<u64>().map_or(RETRY_AFTER_CAP, Duration::from_secs)
    } else {
        http_date(value, now)?.duration_since(now).ok()?
    };
    (!wait.is_zero()).then(|| wait.min(RETRY_AFTER_CAP))
}

const MONTHS: [&str; 12] = ["Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"];

/// An HTTP-date, as the three client libraries read it: IMF-fixdate (`Wed, 21 Oct 2015 07:28:00
/// GMT`), or the obsolete forms a recipient must accept, RFC 850 (`Wednesday, 21-Oct-15 07:28:00
/// GMT`) and asctime (`Wed Oct 21 07:28:00 2015`). Split at runs of spaces, commas and hyphens:
/// a weekday of ASCII letters (not checked against the date), day (1 or 2 digits), month (`Jan` ..
/// `Dec`, case as written), year (4 digits, or 2), `hh:mm:ss` (2 digits each), then `GMT` (no
/// other zone: `UTC`, `+0000` are not HTTP-dates); or asctime's weekday, month, day, time, year
/// (GMT). Hour 00-23, minute 00-59, second 00-60 (60: a leap second, read as the next minute's
/// 00: the clock has none), a day the month has, year 1970 or later. A two-digit year is 20yy,
/// or 19yy when 20yy is more than fifty years (of 365.2425 days) ahead of `now` (RFC 9110).
fn http_date(value: &str, now: SystemTime) -> Option<SystemTime> {
    let t: Vec<&str> = value.split([' ', ',', '-']).filter(|s| !s.is_empty()).collect();
    let (day, month, year, clock) = match t[..] {
        [_, day, month, year, clock, "GMT"] => (day, month, year, clock),
        [_, month, day, clock, year] => (day, month, year, clock),
        _ => return None,
    };
    let digits = |s: &str, lengths: &[usize]| {
        (lengths.contains(&s.len()) && s.bytes().all(|b| b.is_ascii_digit())).then(|| s.parse::<u64>().ok()).flatten()
    };
    if !t[0].bytes().all(|b| b.is_ascii_alphabetic()) {
        return None;
    }
    let m = MONTHS.iter().position(|name| *name == month)? as u64 + 1;
    let d = digits(day, &[1, 2])?;
    let mut y = digits(year, &[2, 4])?;
    let hms: Vec<u64> = clock.split(':').map(|part| digits(part, &[2])).collect::<Option<_>>()?;
    let [h, min, s] = hms[..] else { return None };
    let at =
        |y: u64| Some(UNIX_EPOCH + Duration::from_secs(days_since_epoch(y, m, d)? * 86_400 + h * 3600 + min * 60 + s));
    if year.len() == 2 {
        let fifty_years = Duration::from_secs(50 * 31_556_952); // 365.2425 days each
        y += if at(2000 + y)?.duration_since(now).is_ok_and(|ahead| ahead > fifty_years) { 1900 } else { 2000 };
    }
    if d < 1 || d > days_in_month(y, m) || h > 23 || min > 59 || s > 60 {
        return None;
    }
    at(y)
}

fn days_in_month(y: u64, m: u64) -> u64 {
    match m {
        2 if y % 4 == 0 && (y % 100 != 0 || y % 400 == 0) => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

/// Days from 1970-01-01 to the date (proleptic Gregorian; Howard Hinnant's `days_from_civil`),
/// `None` before 1970.
fn days_since_epoch(y: u64, m: u64, d: u64) -> Option<u64> {
    let y = if m <= 2 { y.checked_sub(1)? } else { y };
    let era = y / 400;
    let yoe = y % 400;
    let doy = (153 * ((m + 9) % 12) + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    (era * 146_097 + doe).checked_sub(719_468)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// RFC 9110: Retry-After is delta-seconds or an HTTP-date (IMF-fixdate, or the obsolete
    /// RFC 850 and asctime forms a recipient must accept); a date is counted from now, one in
    /// the past is no wait, and so is anything else.
    #[test]
    fn retry_after_headers_are_seconds_or_http_dates() {
        let now = UNIX_EPOCH + Duration::from_secs(1_445_412_450); // Wed, 21 Oct 2015 07:27:30 GMT
        assert_eq!(retry_after_at("5", now), Some(Duration::from_secs(5)));
        for date in ["Wed, 21 Oct 2015 07:28:00 GMT", "Wednesday, 21-Oct-15 07:28:00 GMT", "Wed Oct 21 07:28:00 2015"] {
            assert_eq!(retry_after_at(date, now), Some(Duration::from_secs(30)), "{date:?}");
        }
        assert_eq!(retry_after_at("Wed, 21 Oct 2015 07:27:00 GMT", now), None, "a date in the past");
        assert_eq!(retry_after_at("Sun, 29 Feb 2032 00:00:00 GMT", now), Some(Duration::from_secs(86_400)), "capped");
        assert_eq!(http_date("Thu, 01 Jan 1970 00:00:00 GMT", now), Some(UNIX_EPOCH));
        assert_eq!(
            http_date("Sunday, 06-Nov-94 08:49:37 GMT", now),
            Some(UNIX_EPOCH + Duration::from_secs(784_111_777))
        );
        assert_eq!(http_date("Sun Nov  6 08:49:37 1994", now), Some(UNIX_EPOCH + Duration::from_secs(784_111_777)));
        assert_eq!(
            http_date("Thu, 29 Feb 2024 00:00:00 GMT", now),
            Some(UNIX_EPOCH + Duration::from_secs(1_709_164_800))
        );
        let bad =
            ["", "0", "-1", "soon", "NaN", "inf", "Wed, 32 Oct 2015 07:28:00 GMT", "Sat, 29 Feb 2015 07:28:00 GMT"];
        for bad in bad {
            assert_eq!(retry_after_at(bad, now), None, "{bad:?}");
        }
        assert!(retry_after_header("5").is_some(), "now by default");
    }

    /// The three client libraries read the shared cases (`clients/conformance/retry-after.json`)
    /// alike: delta-seconds are digits only, an HTTP-date is GMT, a two-digit year follows
    /// RFC 9110, second 60 is a leap second, the cap a day.
    #[test]
    fn retry_after_reads_as_in_the_js_and_python_clients() {
        let shared: serde_json::Value =
            serde_json::from_str(include_str!("../../conformance/retry-after.json")).unwrap();
        let now = UNIX_EPOCH + Duration::from_secs(shared["now"].as_u64().unwrap());
        let mut wrong = Vec::new();
        for case in shared["cases"].as_array().unwrap() {
            let (value, wait) = (case[0].as_str().unwrap(), case[1].as_u64().map(Duration::from_secs));
            let got = std::panic::catch_unwind(|| retry_after_at(value, now));
            if !matches!(got, Ok(w) if w == wait) {
                wrong.push(format!("{value:?}: {got:?}, not {wait:?}"));
            }
        }
        assert!(wrong.is_empty(), "{wrong:#?}");
    }

    /// A delta-seconds too large for a `Duration` (`from_secs_f64` panics above about
    /// 1.8e19 s) is capped at a day, not a panic that kills the driver task.
    #[test]
    fn a_huge_retry_after_is_capped_not_a_panic() {
        let now = UNIX_EPOCH + Duration::from_secs(1_445_412_450);
        for v in ["100000000000000000000", "18446744073709551616"] {
            let got = std::panic::catch_unwind(|| retry_after_at(v, now));
            assert!(matches!(got, Ok(Some(d)) if d == Duration::from_secs(86_400)), "{v}: {got:?}");
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

    #[test]
    fn a_pause_after_4101_or_4102_is_at_least_five_seconds_then_the_backoff() {
        let b = Backoff::default();
        assert_eq!(b.pause_delay(0, 0.0), PAUSE);
        assert_eq!(b.pause_delay(0, 0.99), PAUSE); // 0.5 + 0.99 * 0.5 s: below the pause
        assert_eq!(b.pause_delay(10, 0.99), Duration::from_secs(20)); // the backoff's cap
    }
}
