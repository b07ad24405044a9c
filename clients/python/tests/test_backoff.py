"""Reconnect timing and close-code policy, with the random source injected."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from wschat_client import Backoff
from wschat_client.client import _retry_after_header, refresh_delay, token_expiry


def test_delay_grows_exponentially_then_caps() -> None:
    """With the jitter at its top the delay doubles per attempt until max_delay."""
    b = Backoff(min_delay=0.5, max_delay=20.0, random=lambda: 1.0)
    assert [b.delay(n) for n in range(7)] == [1.0, 1.5, 2.5, 4.5, 8.5, 16.5, 20.0]
    assert b.delay(1000) == 20.0


def test_full_jitter_spans_min_to_ceiling() -> None:
    """The jitter picks anywhere between min_delay and min_delay + the ceiling."""
    assert Backoff(random=lambda: 0.0).delay(5) == 0.5
    assert Backoff(random=lambda: 0.5).delay(3) == 0.5 + 0.5 * 4.0


@pytest.mark.parametrize("code", [1002, 1003, 1007, 1008, 1009, 4000, 4003, 4099])
def test_fix_the_client_codes_are_terminal(code: int) -> None:
    """Protocol errors and 40xx codes are not retried."""
    assert Backoff().after_close(code, 0, has_token=True, can_refresh=True) is None


def test_token_codes_need_a_token() -> None:
    """4001 reconnects with any token; 4002 only with a get_token callback."""
    b = Backoff(random=lambda: 0.0)
    assert b.after_close(4001, 0, has_token=False, can_refresh=False) is None
    assert b.after_close(4001, 0, has_token=True, can_refresh=False) == 0.5
    assert b.after_close(4002, 0, has_token=True, can_refresh=False) is None
    assert b.after_close(4002, 0, has_token=True, can_refresh=True) == 0.5


def test_going_away_reconnects_at_once_with_spread() -> None:
    """1001 (deploy) after a connection that stayed up: within min_delay. After one that did
    not (attempt > 0: a server closing with 1001 as soon as it accepts) the backoff grows as
    for any other code, or such a server was tried again every min_delay for ever."""
    b = Backoff(random=lambda: 0.5)
    assert b.after_close(1001, 0, has_token=False, can_refresh=False) == 0.25
    assert b.after_close(1001, 3, has_token=False, can_refresh=False) == b.delay(3) == 2.5


@pytest.mark.parametrize("code", [1000, 1006, 1011, 1012, 4100])
def test_transient_codes_back_off(code: int) -> None:
    """Dropped connections and heartbeat timeouts reconnect after the backoff."""
    b = Backoff(random=lambda: 1.0)
    assert b.after_close(code, 2, has_token=False, can_refresh=False) == 2.5


@pytest.mark.parametrize("code", [4101, 4102])
def test_slow_consumer_and_flood_pause_first(code: int) -> None:
    """4101/4102 wait at least the pause, and at least the server's retry_after."""
    b = Backoff(random=lambda: 0.0, pause=5.0)
    assert b.after_close(code, 0, has_token=False, can_refresh=False) == 5.0
    assert b.after_close(code, 0, has_token=False, can_refresh=False, retry_after=7.5) == 7.5


def test_refused_handshakes() -> None:
    """401 retries only with get_token; 503 honours Retry-After; 403 and 400 are terminal."""
    b = Backoff(random=lambda: 0.0)
    assert b.after_refusal(401, 0, can_refresh=False) is None
    assert b.after_refusal(401, 0, can_refresh=True) == 0.5
    assert b.after_refusal(503, 0, can_refresh=False, retry_after=3.0) == 3.0
    assert b.after_refusal(403, 0, can_refresh=True) is None
    assert b.after_refusal(400, 0, can_refresh=True) is None


def test_token_expiry_and_refresh_point() -> None:
    """exp is read from the JWT payload; the refresh comes a quarter of the life early."""
    import base64
    import json
    body = base64.urlsafe_b64encode(json.dumps({"exp": 1234}).encode()).rstrip(b"=").decode()
    assert token_expiry(f"h.{body}.s") == 1234.0
    assert token_expiry("not a jwt") is None
    assert token_expiry(None) is None
    assert refresh_delay(4.0) == 3.0
    assert refresh_delay(3600.0) == 3540.0
    assert refresh_delay(-1.0) == refresh_delay(0.5) == 1.0  # the floor: never at once


def test_retry_after_is_delta_seconds_or_an_http_date() -> None:
    """RFC 9110: Retry-After is delta-seconds or an HTTP-date (IMF-fixdate, or the
    obsolete RFC 850 and asctime forms a recipient must accept); a date is counted from
    now, one in the past is 0, and so is anything else."""
    now = 1445412450.0  # Wed, 21 Oct 2015 07:27:30 GMT
    assert _retry_after_header("5", now) == 5.0
    for date in ("Wed, 21 Oct 2015 07:28:00 GMT", "Wednesday, 21-Oct-15 07:28:00 GMT",
                 "Wed Oct 21 07:28:00 2015"):
        assert _retry_after_header(date, now) == pytest.approx(30.0), date
    assert _retry_after_header("Wed, 21 Oct 2015 07:27:00 GMT", now) == 0.0  # past
    for bad in (None, "", "0", "-1", "soon", "Wed, 32 Oct 2015 07:28:00 GMT"):
        assert _retry_after_header(bad, now) == 0.0, bad


RETRY_AFTER_CASES = json.loads(
    (Path(__file__).parents[2] / "conformance" / "retry-after.json").read_text())


@pytest.mark.parametrize(("value", "wait"), RETRY_AFTER_CASES["cases"])
def test_retry_after_reads_as_in_the_js_and_rust_clients(value: str, wait: int | None) -> None:
    """The three client libraries read the shared cases (clients/conformance/
    retry-after.json) alike: delta-seconds are digits only, an HTTP-date is GMT,
    a two-digit year follows RFC 9110, second 60 is a leap second, the cap a day."""
    got = _retry_after_header(value, RETRY_AFTER_CASES["now"])
    assert got == (wait or 0.0), (value, got)


def test_retry_after_is_capped_at_a_day() -> None:
    """A wait far ahead is a day at most (as in the JS and Rust clients), and one that
    is not a number of seconds at all ("inf", "1e400", "nan") is no wait: they used to
    mean never reconnecting."""
    now = 1445412450.0  # Wed, 21 Oct 2015 07:27:30 GMT
    assert _retry_after_header("3000000", now) == 86_400.0
    assert _retry_after_header("Sun, 29 Feb 2032 00:00:00 GMT", now) == 86_400.0
    for bad in ("inf", "Infinity", "-inf", "1e400", "nan"):
        assert _retry_after_header(bad, now) == 0.0, bad


REFUSALS = ("Refused upgrades, the same in the Python, JS and Rust clients: 401 with a token "
            "callback, 408, 429 and 5xx retry; other statuses stop.")


@pytest.mark.parametrize("library", ["python", "js", "rust"])
def test_the_readmes_say_which_refusals_are_retried_as_the_code_does(library: str) -> None:
    """Each library's README says the same about refused upgrades, and says what
    ``after_refusal`` does (the Python README said "429/5xx retry ... other 4xx stop",
    while 408 is retried too)."""
    readme = (Path(__file__).parents[2] / library / "README.md").read_text()
    assert REFUSALS in " ".join(readme.split()), library
    assert "other 4xx stop" not in readme
    b = Backoff(random=lambda: 0.0)
    assert b.after_refusal(401, 0, can_refresh=True) is not None
    assert b.after_refusal(401, 0, can_refresh=False) is None
    for status in (408, 429, 500, 502, 503, 504):
        assert b.after_refusal(status, 0, can_refresh=False) is not None, status
    for status in (400, 403, 404, 405, 426):
        assert b.after_refusal(status, 0, can_refresh=True) is None, status
