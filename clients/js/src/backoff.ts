/** Reconnect delays and the close-code policy (README "Close codes"). */

export interface BackoffOptions {
  /** First delay's upper bound, ms (default 500). */
  minDelay?: number;
  /** Largest delay, ms (default 20000). */
  maxDelay?: number;
  /** Source of randomness in [0, 1) (default Math.random); inject for tests. */
  random?: () => number;
}

/**
 * "Full jitter": a uniformly random delay in [0, min(maxDelay, minDelay * 2^attempt)).
 * Attempt 0 waits at most `minDelay`, so a server's 1001 sends its clients back at once
 * but spread over half a second instead of all in the same millisecond.
 */
export function backoffDelay(attempt: number, opts: BackoffOptions = {}): number {
  const min = opts.minDelay ?? 500;
  const max = opts.maxDelay ?? 20_000;
  const random = opts.random ?? Math.random;
  const cap = Math.min(max, min * 2 ** Math.min(attempt, 30));
  return Math.floor(random() * cap);
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

/** The pause before reconnecting after 4101/4102, ms. */
export const PAUSE_DELAY = 5_000;

/**
 * What a close code asks of the client. 1000 from the server (never sent by wschat
 * except as an answer), 1001, 1006, 1011-1014 and 41xx reconnect; 4001/4002 need a fresh
 * token; 1002/1003/1007/1008/1009/1010, other 40xx and unknown 4xxx codes are terminal.
 */
export function closePolicy(code: number): ClosePolicy {
  if (code === 4001 || code === 4002) return "token";
  if (code === 4101 || code === 4102) return "pause";
  if (code >= 4100 && code < 4200) return "reconnect";
  if (code >= 4000) return "terminal";
  if ([1002, 1003, 1007, 1008, 1009, 1010].includes(code)) return "terminal";
  return "reconnect";
}

/**
 * A `Retry-After` header's wait in ms (delta-seconds, as wschat sends it with a 503 or 429
 * refusing the upgrade); 0 when absent or not a number.
 */
export function retryAfterMs(value: string | string[] | null | undefined): number {
  const first = Array.isArray(value) ? value[0] : value;
  const seconds = first === undefined || first === null || first.trim() === "" ? NaN : Number(first);
  return Number.isFinite(seconds) && seconds > 0 ? Math.ceil(seconds * 1000) : 0;
}
