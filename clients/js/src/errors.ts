/**
 * Every rejected promise and every `error` event carries a ChatError whose `code` is the
 * server's error code (README "Error codes") or one of the library's own:
 * `timeout`, `disconnected`, `outbox_full`, `left`, `closed` (terminal close code), `token`.
 */
export class ChatError extends Error {
  readonly code: string;
  /** For `rate_limited`: how long the server asked to wait. */
  readonly retryAfterMs?: number;
  /** For `closed`: the WebSocket close code. */
  readonly closeCode?: number;

  constructor(code: string, message: string, extra: { retryAfterMs?: number; closeCode?: number } = {}) {
    super(message);
    this.name = "ChatError";
    this.code = code;
    if (extra.retryAfterMs !== undefined) this.retryAfterMs = extra.retryAfterMs;
    if (extra.closeCode !== undefined) this.closeCode = extra.closeCode;
  }
}

/** Server error codes after which the same request is worth sending again. */
export const RETRYABLE_CODES: ReadonlySet<string> = new Set([
  "rate_limited",
  "unavailable",
  "internal_error",
  "auth_required",
]);
