/**
 * Send pacing: how many sends may be on the wire, and when the next may go. No I/O and
 * no clock: every call takes `now` (ms), so the maths is unit-tested. The Python
 * (`pacer.py`) and Rust (`pacer.rs`) libraries hold the same rules.
 */

/** A bucket refilled for exactly one token's time must hold that token, whatever floating point makes of it. */
const EPSILON = 1e-9;
/**
 * Paced sends go this much slower than the server's rate: what its bucket saves up absorbs
 * the jitter of the way there (a send that arrives a little early is refused).
 */
export const PACE_MARGIN = 1.1;
/** The pace is forgotten after this many intervals with no write, no refusal and no acknowledgement. */
export const PACE_MEMORY = 10;
/** Write times kept to find the one before a refused send. */
const WRITES_KEPT = 64;

/**
 * A send window, and after the server's `rate_limited` a copy of its token bucket.
 *
 * Until the first `rate_limited` only the window holds sends back: `limit` written and not
 * yet acknowledged. The server's bucket is the user's; when it refuses a send it says how
 * long until the bucket holds a token again (`retry_after_ms`). The send written before the
 * refused one took a token (or was refused for the same one), so from that write to the
 * next token is at most one token's refill time, and exactly that when the bucket was left
 * empty. But the bucket is shared with the user's other connections (and `typing`, and for
 * guests the address's bucket): the write before may be long ago, and another connection
 * emptied the bucket since. So that gap counts for at most one token's time as far as it is
 * known: `retry_after` (never more than one token's time), or the token time the pace already
 * stands for (`interval` less its tenth) if longer. The first span is then between
 * `retry_after` and twice it (the pace at worst about half the server's rate), a later one
 * adds at most `retry_after` (and a tenth) to the pace, and a quiet spell is never taken for
 * the pace. The longest span seen, plus a tenth, is the pace (`interval`); a span too short
 * draws another refusal, whose gap (a paced one: the pace) lengthens it past the server's
 * token time. From then on:
 *
 * - the window drops to one send and widens by one per acknowledgement;
 * - nothing is written before the `retry_after_ms` has passed;
 * - each send spends a token of a local bucket refilled one per `interval` and holding at
 *   most `limit`, so a long queue goes out at the server's rate instead of drawing a
 *   refusal for most sends, and after a quiet spell a whole window may go at once again.
 *
 * The pace only grows while refusals come, so it is forgotten (`interval` back to 0, as before
 * any refusal) once the connection has neither written, nor been refused, nor had a send
 * acknowledged for `PACE_MEMORY` intervals: a connection that keeps writing keeps its pace (a
 * long queue draws no new window of refusals), and so does one whose writes wait for
 * acknowledgements (a round trip longer than `PACE_MEMORY` intervals, the window full: the
 * acknowledgement shows it is still in the paced exchange, and forgetting there would learn
 * the pace again with a window of refusals every round trip); a quiet one (the window not
 * full: nothing waited) forgets it, and the late acknowledgement of a send written before the
 * quiet spell does not bring it back; it starts afresh with its next refusal (at most a window
 * of them,
 * `limit`, within the server's burst), so a pace learnt from another connection's burst, or a
 * slower one, does not last.
 *
 * `reset` (a new connection, perhaps to a server with other limits) forgets the pace but
 * keeps a pause that has not ended (the bucket is the user's, not the connection's).
 */
export class Pacer {
  /** Sends on the wire at most (`maxInFlight`). */
  limit: number;
  /** Sends that may be on the wire now. */
  window: number;
  /** ms per token; 0 until a `rate_limited` told us. */
  interval = 0;
  pausedUntil = 0;
  private tokens = 0;
  /** When `tokens` was counted. */
  private stamp = 0;
  /** The latest write, refusal or acknowledgement while paced. */
  private fresh = 0;
  private writes: number[] = [];

  constructor(limit: number) {
    this.limit = Math.max(1, limit);
    this.window = this.limit;
  }

  /**
   * When the next send may be written (`now` if at once), with `inFlight` sends
   * unacknowledged; null while the window is full (an acknowledgement frees a place).
   */
  nextAt(now: number, inFlight: number): number | null {
    if (inFlight >= this.window) return null;
    let at = Math.max(now, this.pausedUntil);
    if (this.interval && !this.stale(at)) {
      const tokens = this.tokensAt(at);
      if (tokens < 1 - EPSILON) at += (1 - tokens) * this.interval;
    }
    return at;
  }

  /** A send was written at `now` (when `nextAt` allowed it). */
  sent(now: number): void {
    this.writes.push(now);
    if (this.writes.length > WRITES_KEPT) this.writes.shift();
    this.forgetStale(now);
    if (this.interval) {
      this.tokens = Math.max(0, this.tokensAt(now) - 1);
      this.stamp = this.fresh = now;
    }
  }

  /**
   * A send's echo came at `now`, with `inFlight` sends unacknowledged (this one among them):
   * the window widens by one, up to `limit`. With the window full (writes waited for this
   * acknowledgement) the pace stays fresh, however long the round trip was; otherwise a pace
   * already stale is forgotten first, as by a write, and the acknowledgement does not bring
   * it back.
   */
  acknowledged(now: number, inFlight: number): void {
    if (inFlight < this.window) this.forgetStale(now);
    this.window = Math.min(this.limit, this.window + 1);
    if (this.interval) this.fresh = now;
  }

  /** The server refused, at `now`, a send written at `writtenAt`: no token for `retryAfter` ms. */
  rateLimited(now: number, retryAfter: number, writtenAt?: number): void {
    this.window = 1;
    this.pause(now + retryAfter);
    this.forgetStale(now);
    if (retryAfter <= 0) return;
    let span = retryAfter;
    if (writtenAt !== undefined) {
      // The writes up to the refused one, in order; the one before it. The gap since then
      // counts for at most one token's time as far as we know it (another connection may have
      // emptied the bucket in it).
      const earlier = this.writes.filter((t) => t <= writtenAt);
      if (earlier.length >= 2) {
        const token = Math.max(retryAfter, this.interval / PACE_MARGIN);
        span += Math.min(writtenAt - earlier[earlier.length - 2]!, token);
      }
    }
    this.interval = Math.max(this.interval, span * PACE_MARGIN);
    // The server's bucket holds its next token at now + retryAfter.
    this.tokens = Math.max(0, 1 - retryAfter / this.interval);
    this.stamp = this.fresh = now;
  }

  /** No send before `until` (the server cannot take one: `unavailable`). */
  pause(until: number): void {
    this.pausedUntil = Math.max(this.pausedUntil, until);
  }

  /** A new connection: a full window, no pace; a pause not yet over stays. */
  reset(limit?: number): void {
    if (limit !== undefined) this.limit = Math.max(1, limit);
    this.window = this.limit;
    this.interval = this.tokens = this.stamp = this.fresh = 0;
    this.writes = [];
  }

  /**
   * Whether the pace is too old at `now`: no write, no refusal and no acknowledgement (`fresh`,
   * the latest) for `PACE_MEMORY` intervals.
   */
  private stale(now: number): boolean {
    return now - this.fresh >= PACE_MEMORY * this.interval;
  }

  private forgetStale(now: number): void {
    if (this.interval && this.stale(now)) this.interval = this.tokens = 0;
  }

  private tokensAt(now: number): number {
    return Math.min(this.limit, this.tokens + Math.max(0, now - this.stamp) / this.interval);
  }
}

/** Joins on the wire at once, by default (the Python and Rust clients keep the same number). */
export const JOIN_WINDOW = 4;
/**
 * The other requests (history, listUsers, leave, moderation) on the wire at once, by default:
 * they draw on the same request bucket, paced by a `JoinPacer` of their own.
 */
export const REQUEST_WINDOW = 4;

/** A `rate_limited` answer without `retry_after_ms` pauses a second (as in Python and Rust). */
export const RETRY_AFTER_DEFAULT_MS = 1000;
/** A refused join written after a refusal doubles the pause, up to 2^(JOIN_PROBES_MAX - 1) (32) times `retry_after_ms`, and the jitter. */
export const JOIN_PROBES_MAX = 6;
/**
 * The shortest pause after a `rate_limited` join, ms, whatever its `retry_after_ms` (the server's
 * is at least 1 ms; a 0 from a proxy or a buggy server would never grow by doubling, and the
 * refusals would come back to back). A missing `retry_after_ms` is a second, as for sends.
 */
export const JOIN_RETRY_FLOOR = 50;

/**
 * When the next `join` may be written, as the Python (`JoinPacer`) and Rust clients decide it.
 * A connection rejoining many rooms draws on the user's request bucket
 * (`RATE_LIMIT_REQUESTS_BURST`), which every connection of the user shares, and more than
 * 2 x `RATE_LIMIT_BURST` refusals in a row get the connection closed (4102). So:
 *
 * - at most `limit` joins are unanswered (a `Pacer` window), so at most that many are refused
 *   together once the bucket is empty;
 * - after a `rate_limited` join none is written before its `retry_after_ms` (at least
 *   `JOIN_RETRY_FLOOR`), then one at a time and at the server's pace (the `Pacer` rules);
 * - a join written after a refusal and refused too (another connection of the user took the
 *   tokens meanwhile) makes the pause grow: `retryAfter` times 2^(n-1) (at most 32), from once
 *   to twice that (jitter, so two tabs do not keep colliding), for the n-th refusal since the
 *   latest `joined` (the first: `retryAfter`). So a few refusals come in a row, not a flood.
 *
 * A new connection starts with a clean join pacer (`reset`): the pause and the count of refusals
 * belong to the connection they were learnt on (the next may be to another server, with other
 * limits, and what the user's bucket holds by then is the server's to say: at most a window of
 * joins is refused before the new connection learns it again).
 *
 * No I/O and no clock, like `Pacer` (times in ms). `key`: the join's request id.
 */
export class JoinPacer {
  readonly limit: number;
  private readonly random: () => number;
  private pacer: Pacer;
  /** Join request id -> when it was written. */
  private readonly inFlight = new Map<string, number>();
  /** Refused joins written after a refusal, since the latest `joined`. */
  private probes = 0;
  /** When the latest refusal came. */
  private refusedAt = -Infinity;

  constructor(limit: number = JOIN_WINDOW, random: () => number = Math.random) {
    this.limit = Math.max(1, limit);
    this.random = random;
    this.pacer = new Pacer(this.limit);
  }

  /** When the next join may be written (`now`: at once); null while the window is full. */
  nextAt(now: number): number | null {
    return this.pacer.nextAt(now, this.inFlight.size);
  }

  sent(key: string, now: number): void {
    this.inFlight.set(key, now);
    this.pacer.sent(now);
  }

  /** The join `key` was answered `joined`; false if it is none of ours. */
  joined(key: string, now: number): boolean {
    if (!this.inFlight.has(key)) return false;
    this.pacer.acknowledged(now, this.inFlight.size);
    this.inFlight.delete(key);
    this.probes = 0;
    return true;
  }

  /**
   * The join `key` was refused: `retryAfter` ms for `rate_limited` (its `retry_after_ms`; null
   * for another refusal). False if it is none of ours.
   */
  refused(key: string, now: number, retryAfter: number | null): boolean {
    const writtenAt = this.inFlight.get(key);
    if (writtenAt === undefined) return false;
    this.inFlight.delete(key);
    if (retryAfter !== null) this.limited(now, retryAfter, writtenAt, writtenAt);
    return true;
  }

  /**
   * A request this pacer did not write (the `ping` behind a join; a join, for the request
   * pacer; a request, for the join pacer) was written at `now`: the server charges it to the
   * same bucket, so it spends a token of the learnt pace (and counts as a write) as one of the
   * pacer's own does, but it takes no place in the window (its answer is none of the pacer's).
   * Without a learnt pace there is no token to spend.
   */
  sentUnpaced(now: number): void {
    this.pacer.sent(now);
  }

  /**
   * A request this pacer did not write (the `ping` behind a join, written at once), written
   * at `writtenAt`, was refused `rate_limited` at `now`: the bucket is the user's, so the same
   * pause as for a refusal of one of its own (`refused`), the refused ones in a row counted
   * alike. It is none of the pacer's requests: the pace is learnt from `retryAfter` alone.
   */
  refusedUnpaced(now: number, retryAfter: number, writtenAt: number): void {
    this.limited(now, retryAfter, writtenAt);
  }

  /** `refused`'s pause; `paceFrom`: the refused write among the pacer's, if it is one. */
  private limited(now: number, retryAfter: number, writtenAt: number, paceFrom?: number): void {
    // The pace is learnt from what the server said; the pause is at least the floor.
    this.pacer.rateLimited(now, retryAfter, paceFrom);
    const wait = Math.max(retryAfter, JOIN_RETRY_FLOOR);
    this.pacer.pause(now + wait);
    if (writtenAt > this.refusedAt) {
      this.probes = Math.min(this.probes + 1, JOIN_PROBES_MAX);
      if (this.probes > 1) this.pacer.pause(now + wait * 2 ** (this.probes - 1) * (1 + this.random()));
    }
    this.refusedAt = now;
  }

  /** A new connection: nothing in flight, a full window, no pace, no pause, no refusal. */
  reset(): void {
    this.inFlight.clear();
    this.pacer = new Pacer(this.limit);
    this.probes = 0;
    this.refusedAt = -Infinity;
  }
}
