/** Reconnect delays and the close-code policy (README "Close codes"). */

export interface BackoffOptions {
  /** Shortest delay, ms (default 500): attempt 0 waits between this and twice this. */
  minDelay?: number;
  /** Largest delay, ms (default 20000). */
  maxDelay?: number;
  /** Source of randomness in [0, 1) (default Math.random); inject for tests. */
  random?: () => number;
}

/**
 * Exponential backoff with full jitter, as centrifuge-js does and as the Python and Rust clients
 * compute it: `minDelay + rand(0, min(maxDelay, minDelay * 2^attempt))` ms, capped at `maxDelay`.
 * Never below `minDelay`: a retry is not sent back at ~0 ms (the jitter only spreads a fleet of
 * clients over the range). The one "at once" case, a 1001 after a connection that stayed up, is
 * `goingAwayDelay`.
 */
export function backoffDelay(attempt: number, opts: BackoffOptions = {}): number {
  const min = opts.minDelay ?? 500;
  const max = opts.maxDelay ?? 20_000;
  const random = opts.random ?? Math.random;
  const cap = Math.min(max, min * 2 ** Math.min(Math.max(attempt, 0), 30));
  return Math.floor(Math.min(max, min + random() * cap));
}

/**
 * The delay after the server said it is going away (1001, a deploy) on a connection that stayed
 * up: "at once", but spread over `[0, minDelay)` so a pod's clients do not all land in the same
 * millisecond (the Python `Backoff.after_close` and Rust `going_away_delay` alike).
 */
export function goingAwayDelay(opts: BackoffOptions = {}): number {
  return Math.floor((opts.random ?? Math.random)() * (opts.minDelay ?? 500));
}

export type ClosePolicy =
  /** Reconnect with backoff. */
  | "reconnect"
  /** Reconnect, but not before a pause (4101 slow consumer, 4102 flooding). */
  | "pause"
  /** Reconnect only with a fresh token (4001, 4002): needs `getToken`. */
  | "token"
  /** Do not reconnect: the client or its credentials must change. */
  | "terminal";

/** The least wait before reconnecting after 4101/4102, ms (Python's `Backoff.pause`). */
export const PAUSE_DELAY = 5_000;

/**
 * What a close code asks of the client. 1000 from the server (never sent by wschat
 * except as an answer), 1001, 1006, 1011-1014 and 41xx reconnect; 4001/4002 need a fresh
 * token; 1002/1003/1007/1008/1009/1010, 1015 (TLS), other 40xx and unknown 4xxx codes are
 * terminal.
 */
export function closePolicy(code: number): ClosePolicy {
  if (code === 4001 || code === 4002) return "token";
  if (code === 4101 || code === 4102) return "pause";
  if (code >= 4100 && code < 4200) return "reconnect";
  if (code >= 4000) return "terminal";
  // 1015: the TLS handshake failed, a server certificate that could not be verified (what a
  // WebSocket API may report; never sent on the wire), which the next attempt gets again.
  if ([1002, 1003, 1007, 1008, 1009, 1010, 1015].includes(code)) return "terminal";
  return "reconnect";
}

/**
 * The wait before reconnect attempt `attempt` after close `code` (or a refused upgrade's status)
 * whose `policy` reconnects, ms, as the Python client's `Backoff.after_close`/`after_refusal`
 * compute it: 1001 at attempt 0 (the connection stayed up) `goingAwayDelay`; otherwise
 * `backoffDelay`, at least `PAUSE_DELAY` for a `"pause"` (4101, 4102); and never less than
 * `retryAfter` (ms: the server's `retry_after_ms` or a refusal's `Retry-After` still to run).
 */
export function reconnectDelay(code: number, policy: ClosePolicy, attempt: number, opts: BackoffOptions = {}, retryAfter = 0): number {
  let delay = code === 1001 && attempt === 0 ? goingAwayDelay(opts) : backoffDelay(attempt, opts);
  if (policy === "pause") delay = Math.max(delay, PAUSE_DELAY);
  return Math.min(MAX_TIMER_DELAY, Math.max(delay, retryAfter));
}

/**
 * What the HTTP status of a refused upgrade asks of the client, as in the Python and Rust
 * clients: 401 needs a fresh token; 408, 429 and 5xx (busy, full, draining, Redis away)
 * reconnect, not before their `Retry-After`; any other answer (403: an `Origin` not in
 * `ALLOWED_ORIGINS`, 400: a malformed request or guest name, 404: not the WebSocket path, ...)
 * is terminal: retrying gets the same answer.
 */
export function refusalPolicy(status: number): ClosePolicy {
  if (status === 401) return "token";
  if (status === 408 || status === 429 || status >= 500) return "reconnect";
  return "terminal";
}

/**
 * A `Retry-After` header's wait in ms (RFC 9110), 0 when it asks for none (or is absent), with
 * the rule the three client libraries (JS, Python, Rust) share, tested by each against the same
 * cases (`clients/conformance/retry-after.json`; the rule: `clients/conformance/README.md`):
 *
 * - surrounding spaces and tabs are ignored; of several headers, the first counts;
 * - delta-seconds are ASCII digits only (`"2.5"`, `"1e20"`, `"0x10"`, `"inf"`, `"-5"`, `"+5"` are
 *   not); `"0"` is no wait;
 * - otherwise an HTTP-date (`httpDate`) counted from `now`; one not ahead is no wait;
 * - the wait is capped at a day (`RETRY_AFTER_CAP`), however many digits;
 * - anything else is no wait from the header: the normal backoff applies.
 */
export function retryAfterMs(value: string | string[] | null | undefined, now: number = Date.now()): number {
  const first = Array.isArray(value) ? value[0] : value;
  if (first === undefined || first === null) return 0;
  const v = first.replace(/^[ \t]+|[ \t]+$/g, "");
  if (/^[0-9]+$/.test(v)) return Math.min(RETRY_AFTER_CAP, Number(v) * 1000); // Infinity past 308 digits: capped
  const at = httpDate(v, now);
  return Number.isNaN(at) ? 0 : Math.min(RETRY_AFTER_CAP, Math.max(0, at - now));
}

/** The longest wait a `Retry-After` can ask for, ms: a day, as in the Python and Rust clients. */
export const RETRY_AFTER_CAP = 86_400_000;

/**
 * The wait an `error` event's `retry_after_ms` asks for, ms, or `undefined` for none, with the
 * rule the three client libraries (JS, Python, Rust) share, tested by each against the same
 * cases (`clients/conformance/retry-after-ms.json`; the rule: `clients/conformance/README.md`):
 * only a JSON number that is finite and >= 0 counts (a string, a boolean, `null`, a negative,
 * `1e400`, which `JSON.parse` reads as `Infinity`, are no wait: the default applies); a
 * fraction is rounded up to whole ms; the wait is capped at a day (`RETRY_AFTER_CAP`), so no
 * timer downstream gets a delay over 2^31-1 ms, which runs at once.
 */
export function serverRetryAfterMs(value: unknown): number | undefined {
  if (typeof value !== "number" || !Number.isFinite(value) || value < 0) return undefined;
  return Math.min(RETRY_AFTER_CAP, Math.ceil(value)) + 0; // + 0: -0 is 0
}

/** The shortest and longest heartbeat interval taken from a `welcome`, seconds, and the default. */
export const HEARTBEAT_MIN = 1;
export const HEARTBEAT_MAX = 86_400;
export const HEARTBEAT_DEFAULT = 30;

/**
 * The interval a `welcome` event's `heartbeat_interval` asks for, seconds, or `undefined` for
 * none (as if absent: the default 30 s applies), with the rule the three client libraries (JS,
 * Python, Rust) share, tested by each against the same cases
 * (`clients/conformance/heartbeat-interval.json`; the rule: `clients/conformance/README.md`):
 * only a JSON number that is finite and > 0 counts (a string, a boolean, `null`, an object,
 * `0`, a negative, `1e400`, which `JSON.parse` reads as `Infinity`, are none); it is floored
 * at a second (`HEARTBEAT_MIN`) and capped at a day (`HEARTBEAT_MAX`), so the ping timers
 * never get a NaN delay (runs after 1 ms, again and again) nor one over 2^31-1 ms.
 */
export function serverHeartbeatInterval(value: unknown): number | undefined {
  if (typeof value !== "number" || !Number.isFinite(value) || value <= 0) return undefined;
  return Math.min(HEARTBEAT_MAX, Math.max(HEARTBEAT_MIN, value));
}

/** The longest delay a timer holds, ms: Node and browsers run a longer `setTimeout` at once. */
export const MAX_TIMER_DELAY = 2 ** 31 - 1;

const MONTHS = ["Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"];
/** Fifty years: an RFC 850 date's two-digit year further ahead than this is of the century before. */
const FIFTY_YEARS = 50 * 365.2425 * 86_400_000;

/**
 * An HTTP-date in ms since the epoch, NaN when `value` is none, as the three client libraries read
 * it: IMF-fixdate (`Wed, 21 Oct 2015 07:28:00 GMT`), or the obsolete forms a recipient must
 * accept, RFC 850 (`Wednesday, 21-Oct-15 07:28:00 GMT`) and asctime (`Wed Oct 21 07:28:00 2015`).
 * Split at runs of spaces, commas and hyphens: a weekday of ASCII letters (not checked against
 * the date), day (1 or 2 digits), month (`Jan` .. `Dec`, case as written), year (4 digits, or 2),
 * `hh:mm:ss` (2 digits each), then `GMT` (no other zone: `UTC`, `+0000` are not HTTP-dates); or
 * asctime's weekday, month, day, time, year (GMT). Hour 00-23, minute 00-59, second 00-60 (60: a
 * leap second, read as the next minute's 00: the clock has none), a day the month has, year 1970
 * or later. A two-digit year is 20yy, or 19yy when 20yy is more than fifty years (of 365.2425
 * days) ahead of `now` (RFC 9110). Not `Date.parse`, which takes `"5"` for a date in 2001 and
 * asctime for local time.
 */
function httpDate(value: string, now: number): number {
  const t = value.split(/[ ,-]+/).filter((token) => token !== "");
  let day: string, month: string, year: string, clock: string;
  if (t.length === 6 && t[5] === "GMT") [, day, month, year, clock] = t as [string, string, string, string, string];
  else if (t.length === 5) [, month, day, clock, year] = t as [string, string, string, string, string];
  else return NaN;
  const m = MONTHS.indexOf(month);
  const hms = /^(\d\d):(\d\d):(\d\d)$/.exec(clock);
  if (!/^[A-Za-z]+$/.test(t[0]!) || m < 0 || !hms || !/^\d\d?$/.test(day) || !/^(\d\d|\d{4})$/.test(year)) return NaN;
  const [d, h, min, s] = [Number(day), Number(hms[1]), Number(hms[2]), Number(hms[3])];
  if (h > 23 || min > 59 || s > 60) return NaN;
  let y = Number(year);
  if (year.length === 2) y += Date.UTC(2000 + y, m, d, h, min, s) - now > FIFTY_YEARS ? 1900 : 2000;
  if (y < 1970) return NaN;
  const at = Date.UTC(y, m, d, h, min, s);
  return d >= 1 && new Date(Date.UTC(y, m, d)).getUTCDate() === d ? at : NaN; // no 31 Feb
}
