//! Reads a JWT's `exp` (without verifying it: the server does that) to know
//! when to ask the token callback for a fresh one.

use std::time::Duration;

/// The `exp` claim (Unix seconds) of a JWT, if it has a readable one.
pub fn expiry_of(token: &str) -> Option<u64> {
    let payload = token.split('.').nth(1)?;
    let bytes = base64url_decode(payload)?;
    let claims: serde_json::Value = serde_json::from_slice(&bytes).ok()?;
    let exp = claims.get("exp")?;
    exp.as_u64().or_else(|| exp.as_f64().filter(|e| *e >= 0.0).map(|e| e as u64))
}

/// The longest the driver waits for a token's refresh before it looks at the `exp` again: a day.
/// A token that lives longer (or whose `exp` is past what an `Instant` or a `Duration` holds,
/// `u64::MAX` seconds) is looked at again after a day, and refreshed once its refresh time is
/// less than a day away, as the JS client re-arms its timer at `MAX_TIMER_DELAY` (about 24.8 days).
pub(crate) const REFRESH_LOOK_AGAIN: Duration = Duration::from_secs(86_400);

/// The soonest a token is replaced, even one already past its `exp` (as the JS and Python
/// clients: `REFRESH_FLOOR`).
pub(crate) const REFRESH_FLOOR: Duration = Duration::from_secs(1);

/// What the driver does when its refresh timer fires.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum RefreshDue {
    /// Ask the token callback for a fresh token.
    Fetch,
    /// Nothing yet: work out the wait again from the token's `exp` (the wait was capped).
    LookAgain,
}

/// How long until a token that expires at `exp` (Unix seconds) is to be refreshed, `now` being
/// the time in Unix seconds: a quarter of its remaining life before expiry, at most a minute
/// before (the Python client's rule); at once for an expired one. A wait over
/// [`REFRESH_LOOK_AGAIN`] is that cap, with [`RefreshDue::LookAgain`]: never a `Duration` or an
/// `Instant` out of range (an `exp` of `1e19` used to panic the driver in `Instant + Duration`).
pub(crate) fn refresh_wait(exp: u64, now: f64) -> (Duration, RefreshDue) {
    let lifetime = (exp as f64 - now).max(0.0);
    // Never sooner than REFRESH_FLOOR: a token already past its `exp` on this clock (one
    // ahead of the server's, whose leeway still takes it) was replaced at once, over and over.
    let wait = (lifetime - (lifetime / 4.0).min(60.0)).max(REFRESH_FLOOR.as_secs_f64());
    if wait <= REFRESH_LOOK_AGAIN.as_secs_f64() {
        (Duration::from_secs_f64(wait), RefreshDue::Fetch)
    } else {
        (REFRESH_LOOK_AGAIN, RefreshDue::LookAgain)
    }
}

fn base64url_decode(text: &str) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(text.len() * 3 / 4);
    let (mut acc, mut bits) = (0u32, 0u32);
    for c in text.bytes().take_while(|c| *c != b'=') {
        let v = match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'-' | b'+' => 62,
            b'_' | b'/' => 63,
            _ => return None,
        };
        acc = (acc << 6) | u32::from(v);
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
            acc &= (1 << bits) - 1;
        }
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_exp_from_a_jwt() {
        // {"alg":"HS256","typ":"JWT"} . {"sub":"alice","exp":1700000000} . signature
        let token = "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJzdWIiOiJhbGljZSIsImV4cCI6MTcwMDAwMDAwMH0.c2ln";
        assert_eq!(expiry_of(token), Some(1_700_000_000));
        assert_eq!(expiry_of("not a token"), None);
        assert_eq!(expiry_of("a.!!!.c"), None);
        assert_eq!(base64url_decode("aGk").unwrap(), b"hi");
        assert_eq!(base64url_decode("aGVsbG8_").unwrap(), b"hello?");
    }

    #[test]
    fn refresh_waits_at_most_a_day_then_looks_again() {
        let now = 1_700_000_000.0;
        let day = REFRESH_LOOK_AGAIN;
        // A quarter of the remaining life before expiry, at most a minute before; at once if expired.
        assert_eq!(refresh_wait(1_700_000_100, now), (Duration::from_secs(75), RefreshDue::Fetch));
        assert_eq!(refresh_wait(1_700_003_600, now), (Duration::from_secs(3540), RefreshDue::Fetch));
        assert_eq!(refresh_wait(1_600_000_000, now), (REFRESH_FLOOR, RefreshDue::Fetch));
        assert_eq!(refresh_wait(1_700_000_001, now), (REFRESH_FLOOR, RefreshDue::Fetch));
        assert_eq!(refresh_wait(1_700_086_460, now), (day, RefreshDue::Fetch));
        assert_eq!(refresh_wait(1_700_086_461, now), (day, RefreshDue::LookAgain));
        // Past an `Instant`'s or a `Duration`'s range: a day, then look again.
        for exp in [30 * 86_400 + 1_700_000_000, 9_300_000_000_000_000_000, 10_000_000_000_000_000_000, u64::MAX] {
            assert_eq!(refresh_wait(exp, now), (day, RefreshDue::LookAgain), "{exp}");
        }
        assert_eq!(refresh_wait(u64::MAX, 0.0), (day, RefreshDue::LookAgain));
    }
}
