/**
 * Every rejected promise and every `error` event carries a ChatError whose `code` is the
 * server's error code (README "Error codes") or one of the library's own:
 * `timeout`, `disconnected`, `outbox_full`, `left`, `removed`, `closed` (terminal close code),
 * `token`, `storage`, `connect`, `tls_certificate` (a reconnect's server certificate failed
 * verification after the client had been connected: retried, `closeCode` 1015).
 */
export class ChatError extends Error {
  readonly code: string;
  /** For `rate_limited`: how long the server asked to wait. */
  readonly retryAfterMs?: number;
  /** For `closed`: the WebSocket close code (1015 also for `tls_certificate`). */
  readonly closeCode?: number;
  /** The server's whole `error` event (`room`, `until` for `forbidden`/`muted`, ...), or the `left` that removed a room; empty for local errors. */
  readonly details: Record<string, unknown>;

  constructor(
    code: string,
    message: string,
    extra: { retryAfterMs?: number; closeCode?: number; details?: Record<string, unknown> } = {},
  ) {
    super(message);
    this.name = "ChatError";
    this.code = code;
    if (extra.retryAfterMs !== undefined) this.retryAfterMs = extra.retryAfterMs;
    if (extra.closeCode !== undefined) this.closeCode = extra.closeCode;
    this.details = extra.details ?? {};
  }
}

/** Server error codes after which the same request is worth sending again. */
export const RETRYABLE_CODES: ReadonlySet<string> = new Set([
  "rate_limited",
  "unavailable",
  "internal_error",
  "auth_required",
]);
