export { certificateProblem, ChatClient, jwtExpiry, randomId, TLS_CLOSE_CODE } from "./client.js";
export type { ClientOptions, UrlInfo } from "./client.js";
export { ChatError, RETRYABLE_CODES } from "./errors.js";
export { backoffDelay, closePolicy, goingAwayDelay, PAUSE_DELAY, reconnectDelay, refusalPolicy, retryAfterMs, serverHeartbeatInterval, serverRetryAfterMs } from "./backoff.js";
export type { BackoffOptions, ClosePolicy } from "./backoff.js";
export { Outbox, memoryOutbox, webStorageOutbox } from "./outbox.js";
export { JOIN_RETRY_FLOOR, JOIN_WINDOW, JoinPacer, Pacer, PACE_MARGIN, REQUEST_WINDOW } from "./pacer.js";
export type { OutboxEntry, OutboxStorage, WebStorageLike } from "./outbox.js";
export { Emitter } from "./emitter.js";
export type { Listener } from "./emitter.js";
export type * from "./types.js";
declare const __WSCHAT_VERSION__: string;
/** The library's version (package.json's, set by the build). */
export const VERSION: string = typeof __WSCHAT_VERSION__ === "string" ? __WSCHAT_VERSION__ : "dev";
