/**
 * ChatClient: one WebSocket connection to a wschat server that reconnects, re-authenticates,
 * rejoins its rooms with `since`, and resends unacknowledged sends, so that the app sees
 * every message once and in order.
 */
import { backoffDelay, closePolicy, type ClosePolicy, HEARTBEAT_DEFAULT, MAX_TIMER_DELAY, reconnectDelay, refusalPolicy, retryAfterMs, serverHeartbeatInterval, serverRetryAfterMs } from "./backoff.js";
import { Emitter } from "./emitter.js";
import { ChatError, RETRYABLE_CODES } from "./errors.js";
import { Outbox, type OutboxEntry, type OutboxStorage } from "./outbox.js";
import { JOIN_WINDOW, JoinPacer, Pacer, REQUEST_WINDOW, RETRY_AFTER_DEFAULT_MS } from "./pacer.js";
import type {
  ChatMessage,
  ClientEvents,
  ConnectionState,
  DirectMessage,
  HistoryPage,
  JoinResult,
  ModeratedResult,
  RemovedEvent,
  RoomState,
  User,
  WebSocketConstructor,
  WebSocketLike,
  Welcome,
} from "./types.js";

export interface UrlInfo {
  /**
   * 0 at `connect()`; then the reconnect's number: 1 for the first after a connection that
   * stayed up `stableAfter`, then 2, 3, ... while attempts fail or connections close at once
   * (the `connecting` event's `attempt`).
   */
  attempt: number;
}

export interface ClientOptions {
  /** `ws://host/ws`, or a function returning the URL for each connection attempt. */
  url: string | ((info: UrlInfo) => string | Promise<string>);
  /**
   * Returns a JWT; called before every connection attempt and again before the token
   * expires (read from its `exp`). Return `null` (or an empty string) to stop connecting
   * (terminal); at a refresh, the current token is kept until it expires.
   */
  getToken?: () => string | null | Promise<string | null>;
  /** A fixed token (no refresh; an expired one ends the connection for good). */
  token?: string;
  /** A guest's display name (`?username=`) when there is no token. */
  username?: string;
  /** The WebSocket class. Default: the global one, else `ws` (Node 20). */
  WebSocket?: WebSocketConstructor;
  /** Reconnect backoff, ms (500 / 20000): `min + rand(0, min(max, min * 2^attempt))`, at most max (`backoffDelay`). */
  minReconnectDelay?: number;
  maxReconnectDelay?: number;
  /**
   * How long a connection must stay up before the reconnect backoff starts again from the
   * first delay, ms (default 10000). A `welcome` alone does not reset it: a server that
   * accepts and closes at once (1013 in an outage, 4102, a draining pod's 1001) is retried
   * with growing delays, not every `minReconnectDelay` by all its clients together.
   */
  stableAfter?: number;
  /** Timeout of join, leave, history and listUsers, ms (default 10000). */
  requestTimeout?: number;
  /**
   * Timeout of the promise of send and dm, ms (default 0: none). A timeout rejects the
   * promise with `timeout` but leaves the send in the outbox: it is still delivered once.
   */
  sendTimeout?: number;
  /** From opening a socket to `connected`, ms (default 15000); then the attempt is abandoned. */
  connectTimeout?: number;
  /** Most unacknowledged sends kept (default 1000); beyond it send rejects with `outbox_full`. */
  outboxLimit?: number;
  /** Keeps the outbox across page reloads or restarts (see `webStorageOutbox`). */
  outboxStorage?: OutboxStorage;
  /**
   * Most sends on the wire without their acknowledgement (default 16). Keep it within the
   * server's `RATE_LIMIT_BURST`. After a `rate_limited` refusal the window starts again at
   * one send and sends are paced at the server's rate (see `Pacer`).
   */
  maxInFlight?: number;
  /**
   * Joins on the wire at once (default 4); the rest, a reconnect's rejoins of many rooms too,
   * wait their turn. They draw on the user's request bucket (`RATE_LIMIT_REQUESTS_BURST`,
   * shared by all the user's connections): after a `rate_limited` join none is written before
   * its `retry_after_ms`, the refused ones go again first, one at a time and then at the
   * server's pace, with a growing pause while they are refused still (`JoinPacer`): a few
   * refusals come in a row, not the 2 x `RATE_LIMIT_BURST` the server closes with 4102.
   */
  maxJoinsInFlight?: number;
  /**
   * The other requests (`history`, `historyPage`, `listUsers`, `leave`, `kick`, `mute`,
   * `unmute`) on the wire at once (default 4); the rest wait their turn, in the order of the
   * calls. They draw on the same request bucket and are paced as joins are (a `JoinPacer` of
   * their own): after a `rate_limited` answer none is written before its `retry_after_ms`,
   * the refused one goes again first (the server did not carry it out; it is not rejected),
   * then one at a time at the server's pace. A call's timeout counts its wait in the queue:
   * one that waits too long rejects with `timeout` and is never written.
   */
  maxRequestsInFlight?: number;
  /**
   * Refresh the token this long before it expires, at most half its remaining life, ms (default
   * 30000); never sooner than 1 s, and a token already past its `exp` on this clock after a
   * growing wait (1 s .. 60 s, as a refused refresh).
   */
  tokenRefreshMargin?: number;
  /** After `typing(room)`, `status: false` is sent when no keystroke came for this long, ms (default 3000). */
  typingTimeout?: number;
  /**
   * A send whose echo has not come this long after it was written goes out again on the
   * same connection (the server deduplicates it), ms (default 10000): an echo lost on a
   * live connection never leaves a send hanging.
   */
  ackTimeout?: number;
  /** How long a JSON `ping` may wait for an answer before the socket is given up, ms (default 10000). */
  pongTimeout?: number;
  /**
   * In a browser: while the page is hidden, a due reconnect waits until it is visible again
   * (default false; mobile browsers throttle hidden pages anyway).
   */
  pauseWhenHidden?: boolean;
  /** Randomness for the jitter (tests). */
  random?: () => number;
}

type Waiter<T> = { resolve: (v: T) => void; reject: (e: ChatError) => void; timer?: ReturnType<typeof setTimeout> };

interface Room {
  name: string;
  state: RoomState;
  /**
   * The last message id surfaced to the app; null until the first `joined` (and after one
   * whose `last_id` was unreadable, until the next message). Only ever a `wireId`.
   */
  lastId: number | null;
  /**
   * The `epoch` of the room's latest `joined` (the name of its numbering), in which `lastId`
   * is counted; sent with `since` on every rejoin so that a server whose ids started again
   * from 1 says so (`recovered: false`) instead of replaying its new messages above `lastId`
   * as if they followed it. Null: not known (a server of the release before epochs), not sent.
   */
  epoch: string | null;
  /**
   * After `recovered: false`, or a first `joined` whose `last_id` was unreadable: the next
   * message is taken whatever its id (even a lower one).
   */
  acceptJump: boolean;
  /**
   * After a rejoin's `joined` with `recovered: true`: its `last_id`, where the replay that
   * follows ends (0: nothing to wait for). The outbox waits until `lastId` reaches it before
   * resending to this room (the replay may acknowledge the very messages).
   */
  catchUpTo: number;
  /**
   * The id of a `ping` sent behind a rejoin's `joined` whose replay has no known end
   * (`recovered: false`, which may come with a partial replay or none, or a `last_id` that
   * does not count): the server answers commands in order, so its `pong` (or its refusal)
   * comes after the whole replay. The outbox waits for it too. Only then: a ping per join
   * doubled the requests of a (re)connect, and with many rooms (70 of the server's 100) that
   * drew over 2 x RATE_LIMIT_BURST refusals in a row, closed with 4102 on every attempt.
   */
  syncReq: string | null;
  /** The pending `join` request's id. */
  joinReq: string | null;
  users: User[];
  waiters: Waiter<JoinResult>[];
  retryTimer?: ReturnType<typeof setTimeout>;
  /** Waits in the join queue for the join pacer. */
  joinQueued?: boolean;
}

/**
 * What a request does when its socket goes before the answer: sent again on the next
 * connection (reads), resolved (a `leave`: the membership went with the socket), or
 * rejected with `disconnected` (moderation: whether it was done is unknown).
 */
type OnLost = "resend" | "resolve" | "reject";

interface Request {
  frame: Record<string, unknown>;
  sent: boolean;
  onLost: OnLost;
  waiter: Waiter<any>;
}

/** Request ids are strings (never mistaken for a message id); these prefixes mark ids whose answers need no routing. */
const TYPING_PREFIX = "t";
/**
 * The answers to a new connection's `auth` that say "not now" rather than judge its token
 * (README "Error codes"): the server registered nothing of the sign-in, and the client
 * reconnects and signs in again. `forbidden` (banned everywhere; the server closes with 4003)
 * stops it; a refused token (`AUTH_TOKEN_REFUSED`) needs a fresh token (getToken), else
 * stops; anything else stops (1008): `invalid_message` (the token is no string, empty or
 * over 8192 characters: no retry reads better) and a code this client does not know.
 */
const AUTH_RETRY_LATER = new Set(["unavailable", "internal_error", "rate_limited", "too_many_connections"]);
/** The answers to a new connection's `auth` that refuse its token. */
const AUTH_TOKEN_REFUSED = new Set(["auth_failed", "token_expired"]);
const SYNC_PREFIX = "s";
/** The soonest a token is refreshed, ms, even one expiring sooner (a refresh at once could loop). */
const REFRESH_FLOOR = 1000;

export class ChatClient extends Emitter<ClientEvents> {
  private readonly opts: ClientOptions;
  private readonly outbox: Outbox;
  private _state: ConnectionState = "disconnected";
  private wanted = false;
  /**
   * Why the client stopped for good (` (connection closed for good: 4003 banned)`), or `""`
   * (`disconnect()`, or none yet): told to the requests made while it is stopped, as to those
   * that were waiting when it stopped.
   */
  private stoppedWhy = "";
  private ws: WebSocketLike | null = null;
  /** Incremented for every socket; callbacks of an older socket are ignored. */
  private conn = 0;
  private established = false;
  /**
   * A `welcome` came since the app's `connect()`: a certificate that fails verification is
   * then a server-side incident (expired, rotated wrongly), retried; before, a
   * misconfiguration that stops the client.
   */
  private connectedSinceStart = false;
  private attempt = 0;
  /** When the current connection got its `welcome` (ms): one up `stableAfter` resets `attempt`. */
  private establishedAt = 0;
  private welcome: Welcome | null = null;
  private token: string | null = null;
  private restored: Promise<unknown> | null = null;
  private counter = 0;
  private rooms = new Map<string, Room>();
  private requests = new Map<string, Request>();
  /** Joins on the wire: the room, and the `since` and `epoch` they carried. */
  private joins = new Map<string, { room: string; since: number | null; epoch: string | null }>();
  private auth: { id: string; purpose: "connect" | "refresh" } | null = null;
  /** client_msg_id -> request id of its latest write on this socket; request id -> client_msg_id for every write. */
  private inflight = new Map<string, string>();
  private inflightReq = new Map<string, string>();
  /** client_msg_id -> when it was last written (for `ackTimeout`). */
  private inflightAt = new Map<string, number>();
  /**
   * client_msg_id -> the error its room was dropped with (`left`, `removed`), for sends that
   * were on the wire when the room went: the server's answer decides them, they are never
   * written again.
   */
  private orphans = new Map<string, ChatError>();
  /** Who waits for each pending send: a send again with the same `clientMsgId` adds a waiter. */
  private sendWaiters = new Map<string, Waiter<ChatMessage | DirectMessage>[]>();
  /** The send window, pauses, and the pace after `rate_limited`. */
  private readonly pacer: Pacer;
  /** The joins on the wire, the pause after a `rate_limited` join, and the pace after it. */
  private readonly joinPacer: JoinPacer;
  /**
   * The other requests on the wire, the pause after a `rate_limited` one, and the pace after
   * it; they wait in `requests` (in the order of the calls) until it lets them go.
   */
  private readonly requestPacer: JoinPacer;
  /**
   * The `ping`s behind joins on the wire (`syncReq`s, of this connection): when each was
   * written, for the request pacer's pause should the server refuse it `rate_limited`.
   */
  private syncs = new Map<string, number>();
  /** Rooms whose join waits for the join pacer, in order (a refused one goes first). */
  private joinQueue: Room[] = [];
  private retryAttempt = 0;
  /** Token refreshes refused (or `getToken` failures) in a row on this connection: the next one backs off. */
  private refreshAttempt = 0;
  /**
   * Not before this time (ms), for the next reconnect: the server's last `retry_after_ms`,
   * or the `Retry-After` of a refused upgrade.
   */
  private retryAfterUntil = 0;
  /**
   * The ids of the DMs surfaced, the newest 2000: a DM id seen is a double. Kept across
   * connections only with persistence (`dm_backlog`), where a page of kept DMs may come again.
   */
  private seenDms = new Set<number>();
  /**
   * Every user_id a welcome gave this client (a guest gets a new one per connection): only an
   * echo from one of them acknowledges a send (`isEcho`).
   */
  private ownIds = new Set<string>();
  /** The client_msg_ids restored from `outboxStorage`: written, if ever, by an earlier run. */
  private restoredIds = new Set<string>();
  private typingState = new Map<string, { sentAt: number; timer: ReturnType<typeof setTimeout> }>();
  private lastReceived = 0;
  private pingSentAt = 0;
  private timers: Partial<Record<"reconnect" | "connect" | "ping" | "refresh" | "flush" | "ack" | "joins" | "requests", ReturnType<typeof setTimeout>>> = {};
  private onlineListener: (() => void) | null = null;
  private offlineListener: (() => void) | null = null;
  private visibleListener: (() => void) | null = null;

  constructor(options: ClientOptions) {
    super();
    if (!options || (typeof options.url !== "string" && typeof options.url !== "function")) {
      throw new TypeError("ChatClient: options.url (string or function) is required");
    }
    this.opts = options;
    this.pacer = new Pacer(options.maxInFlight ?? 16);
    this.joinPacer = new JoinPacer(options.maxJoinsInFlight ?? JOIN_WINDOW, options.random);
    this.requestPacer = new JoinPacer(options.maxRequestsInFlight ?? REQUEST_WINDOW, options.random);
    this.outbox = new Outbox(options.outboxLimit ?? 1000, options.outboxStorage, (err) =>
      this.emit("error", new ChatError("storage", `outbox storage failed: ${String(err)}`)),
    );
  }

  // -- public state ---------------------------------------------------------------------
  get state(): ConnectionState {
    return this._state;
  }
  /** The current identity, from the latest `welcome` (null before the first). */
  get userId(): string | null {
    return this.welcome?.user_id ?? null;
  }
  get username(): string | null {
    return this.welcome?.username ?? null;
  }
  get authenticated(): boolean {
    return this.welcome?.authenticated ?? false;
  }
  /** Sends not yet acknowledged, oldest first. */
  get pending(): readonly OutboxEntry[] {
    return this.outbox.entries.map((e) => ({ ...e }));
  }
  roomState(room: string): RoomState {
    return this.rooms.get(room)?.state ?? "left";
  }
  /**
   * The last message id delivered to the app for `room` (persist it, with `epoch(room)`, to
   * resume with `join(room, {since, epoch})`).
   */
  lastId(room: string): number | null {
    return this.rooms.get(room)?.lastId ?? null;
  }
  /**
   * The name of `room`'s numbering in which `lastId(room)` is counted (the latest `joined`'s
   * `epoch`); null before the first `joined`, or from a server of the release before epochs.
   * Persist it together with `lastId(room)`: the two belong together.
   */
  epoch(room: string): string | null {
    return this.rooms.get(room)?.epoch ?? null;
  }
  /** Rooms wanted (joining or joined). */
  get joinedRooms(): string[] {
    return [...this.rooms.keys()];
  }
  /** Resolves once every outbox change has reached the storage. */
  outboxSaved(): Promise<void> {
    return this.outbox.flushed();
  }

  // -- connection -------------------------------------------------------------------------
  /**
   * Starts connecting (and keeps reconnecting until `disconnect()`). Resolves at the
   * first `connected`; rejects if the client stops for good before that.
   */
  connect(): Promise<Welcome> {
    const settled = handled(new Promise<Welcome>((resolve, reject) => {
      if (this.established && this.welcome) return resolve(this.welcome);
      const offC = this.once("connected", (w) => {
        offD();
        resolve(w);
      });
      const offD = this.once("disconnected", (e) => {
        offC();
        reject(new ChatError("closed", `disconnected: ${e.code} ${e.reason}`, { closeCode: e.code }));
      });
    }));
    if (!this.wanted) {
      this.wanted = true;
      this.connectedSinceStart = false;
      this.attempt = 0;
      // A fresh start: a wait an earlier connection was told (`rate_limited`, a refusal's
      // `Retry-After`) does not hold this one's reconnects, as in the Python and Rust clients.
      this.retryAfterUntil = 0;
      this.stoppedWhy = "";
      this.listenOnline(true);
      this.restoreOutbox();
      void this.open();
    }
    return settled;
  }

  /**
   * Closes the connection (1000) and stops reconnecting. Rooms and the outbox are kept for
   * `connect()`; until then `history`, `historyPage`, `listUsers`, `kick`, `mute` and `unmute`
   * reject at once with `disconnected`.
   */
  disconnect(): void {
    if (!this.wanted && this._state === "disconnected") return;
    this.stop(1000, "client disconnect");
  }

  private async open(): Promise<void> {
    const conn = ++this.conn;
    this.setState("connecting");
    let url: string;
    let token: string | null = null;
    let Ctor: WebSocketConstructor;
    try {
      await this.restored;
      const u = this.opts.url;
      url = typeof u === "function" ? await u({ attempt: this.attempt }) : u;
      if (this.opts.getToken) {
        token = await this.opts.getToken();
        if (token === null || token === "") {
          // An empty token is no token: connecting as a guest instead would hand the app
          // a session it did not ask for.
          if (conn === this.conn) this.stop(4001, `getToken returned ${token === null ? "null" : "an empty token"}`, new ChatError("token", "no token"));
          return;
        }
      } else {
        token = this.opts.token ?? null;
      }
      Ctor = await resolveWebSocket(this.opts.WebSocket);
    } catch (err) {
      if (conn !== this.conn || !this.wanted) return;
      this.emit("error", toChatError(err, "connect"));
      this.scheduleReconnect(1006, `connect failed: ${String(err)}`, "reconnect");
      return;
    }
    if (conn !== this.conn || !this.wanted) return;
    this.token = token;
    let ws: WebSocketLike;
    try {
      ws = new Ctor(withUsername(url, token ? undefined : this.opts.username));
    } catch (err) {
      this.emit("error", toChatError(err, "connect"));
      this.scheduleReconnect(1006, `connect failed: ${String(err)}`, "reconnect");
      return;
    }
    this.ws = ws;
    this.timers.connect = setTimeout(() => this.abandon(conn, "connect timeout"), this.opts.connectTimeout ?? 15_000);
    const refusal = this.watchRefusal(ws, conn);
    let certificate: string | null = null;
    ws.onmessage = (ev) => {
      if (conn === this.conn) this.onFrame(ev.data);
    };
    ws.onclose = (ev) => {
      if (conn !== this.conn) return;
      // A refused upgrade (seen with `ws` only) is judged by its HTTP status, not the 1006.
      if (refusal.code) this.onClosed(refusal.code, refusal.status, refusalPolicy(refusal.code));
      else if (certificate) this.onCertificateProblem(certificate);
      else this.onClosed(ev.code, ev.reason || refusal.status);
    };
    ws.onerror = (ev) => {
      // A close event follows. `ws` (Node) tells why the socket failed; browsers never do.
      certificate = certificateProblem(ev) ?? certificate;
    };
  }

  /**
   * A server certificate that failed verification. Before any `welcome` since `connect()` it
   * is a misconfiguration (the next attempt gets the same certificate): the client stops,
   * 1015. Once connected it is a server-side incident (a certificate expired or rotated
   * wrongly, fixed by its operator): each attempt is an `error` (`tls_certificate`, closeCode
   * 1015) and a reconnect with the backoff (`connecting`, code 1015), rooms and outbox kept.
   */
  private onCertificateProblem(reason: string): void {
    if (!this.connectedSinceStart) return this.onClosed(TLS_CLOSE_CODE, reason, "terminal");
    this.emit("error", new ChatError("tls_certificate", reason, { closeCode: TLS_CLOSE_CODE }));
    if (this.wanted) this.onClosed(TLS_CLOSE_CODE, reason, "reconnect");
  }

  /**
   * A server that is full or draining refuses the upgrade with 503 (or 429) and a
   * `Retry-After`; the next attempt waits at least that long. Other refusals (403, 400, 404)
   * will not change by retrying: the client stops (`refusalPolicy`). Only Node's `ws` shows
   * the refused answer (its `unexpected-response` event); browsers and Node's own WebSocket
   * hide it, and their reconnect keeps to the backoff. The returned `code` (503) and `status`
   * (`HTTP 503`) name the refusal once the close event comes.
   */
  private watchRefusal(ws: WebSocketLike, conn: number): { code: number; status: string } {
    const refusal = { code: 0, status: "" };
    const node = ws as unknown as {
      once?: (event: string, listener: (req: unknown, res: { statusCode?: number; headers?: Record<string, string | string[] | undefined> }) => void) => unknown;
      terminate?: () => void;
    };
    if (typeof node.once !== "function" || typeof node.terminate !== "function") return refusal;
    node.once("unexpected-response", (_req, res) => {
      refusal.code = res.statusCode ?? 0;
      refusal.status = `HTTP ${res.statusCode}`;
      const wait = retryAfterMs(res.headers?.["retry-after"]);
      if (conn === this.conn && wait > 0) this.retryAfterUntil = Math.max(this.retryAfterUntil, Date.now() + wait);
      node.terminate!(); // with a listener, `ws` leaves ending the refused handshake to us (a close event follows)
    });
    return refusal;
  }

  /** Gives a socket up locally (no answer to a ping, connect timeout) and reconnects. */
  private abandon(conn: number, reason: string): void {
    if (conn !== this.conn || !this.ws) return;
    this.onClosed(1006, reason);
  }

  private detachSocket(code?: number, reason?: string): void {
    const ws = this.ws;
    this.ws = null;
    this.conn++;
    if (!ws) return;
    ws.onmessage = ws.onclose = ws.onopen = null;
    // `ws` throws an 'error' event nobody listens to (closing a socket still connecting
    // emits one), so a listener stays.
    ws.onerror = () => {};
    try {
      ws.close(code, (reason ?? "").slice(0, 60));
    } catch {
      /* already closing */
    }
  }

  private onClosed(code: number, reason: string, policy: ClosePolicy = closePolicy(code)): void {
    // Only a connection that stayed up resets the backoff (not its welcome): a server that
    // accepts and closes at once would otherwise be tried again at the shortest delay for ever.
    if (this.established && Date.now() - this.establishedAt >= (this.opts.stableAfter ?? 10_000)) this.attempt = 0;
    this.detachSocket(4000, reason);
    this.connectionLost();
    if (!this.wanted) return;
    if (policy === "terminal" || (policy === "token" && !this.opts.getToken)) {
      this.stop(code, reason, new ChatError("closed", `connection closed for good: ${code} ${reason}`, { closeCode: code }));
    } else {
      this.scheduleReconnect(code, reason, policy);
    }
  }

  /** Everything that belonged to the socket that went away. */
  private connectionLost(): void {
    this.established = false;
    this.auth = null;
    this.pingSentAt = 0;
    for (const t of ["connect", "ping", "refresh", "flush", "ack", "joins", "requests"] as const) this.clearTimer(t);
    this.joinPacer.reset();
    this.requestPacer.reset();
    this.joinQueue = [];
    this.inflight.clear();
    this.inflightReq.clear();
    this.inflightAt.clear();
    this.syncs.clear();
    // Sends of a left room whose answer went with the socket: they are not written again.
    for (const cmid of [...this.orphans.keys()]) this.dropOrphan(cmid);
    this.joins.clear();
    for (const t of this.typingState.values()) clearTimeout(t.timer);
    this.typingState.clear();
    for (const [id, req] of this.requests) {
      // A read goes again; so does a kick, mute or unmute still waiting its turn: it was
      // never written, so it was not done (as in the Python and Rust clients).
      if (req.onLost === "resend" || (req.onLost === "reject" && !req.sent)) {
        req.sent = false;
        continue;
      }
      this.requests.delete(id);
      clearTimeout(req.waiter.timer);
      if (req.onLost === "resolve") req.waiter.resolve(undefined);
      else req.waiter.reject(new ChatError("disconnected", `the connection went before ${String(req.frame.type)} was answered`));
    }
    for (const room of this.rooms.values()) {
      room.joinReq = null;
      room.joinQueued = false;
      room.syncReq = null;
      clearTimeout(room.retryTimer);
      if (room.state === "joined") this.setRoomState(room, "joining");
    }
  }

  private scheduleReconnect(code: number, reason: string, policy: ClosePolicy): void {
    const backoff = { minDelay: this.opts.minReconnectDelay, maxDelay: this.opts.maxReconnectDelay, random: this.opts.random };
    const delay = reconnectDelay(code, policy, this.attempt, backoff, this.retryAfterUntil - Date.now());
    this.attempt++;
    this.setState("connecting");
    this.emit("connecting", { attempt: this.attempt, delay, code, reason });
    this.clearTimer("reconnect");
    this.timers.reconnect = setTimeout(() => {
      delete this.timers.reconnect;
      if (!this.waitVisible()) void this.open();
    }, delay);
  }

  private stop(code: number, reason: string, error?: ChatError): void {
    this.wanted = false;
    this.listenOnline(false);
    this.stopWaitingVisible();
    this.clearTimer("reconnect");
    this.detachSocket(1000, reason);
    this.connectionLost();
    // Stopped for good (not by the app): what waits is told why.
    const why = error ? ` (${error.message})` : "";
    this.stoppedWhy = why;
    for (const [id, req] of this.requests) {
      this.requests.delete(id);
      clearTimeout(req.waiter.timer);
      req.waiter.reject(new ChatError("disconnected", `the client disconnected${why}`));
    }
    // Promises that would otherwise wait for their timeout (whose timer keeps Node alive):
    // the room stays wanted and the send stays in the outbox, as after a timeout.
    for (const room of this.rooms.values()) {
      for (const w of room.waiters.splice(0)) {
        clearTimeout(w.timer);
        w.reject(new ChatError("disconnected", `the client disconnected before ${room.name} was joined${why}`));
      }
    }
    for (const [cmid, waiters] of this.sendWaiters) {
      const timed = waiters.filter((w) => w.timer !== undefined);
      if (timed.length === waiters.length) this.sendWaiters.delete(cmid);
      else this.sendWaiters.set(cmid, waiters.filter((w) => w.timer === undefined));
      for (const w of timed) {
        clearTimeout(w.timer);
        w.reject(new ChatError("disconnected", `the client disconnected; the send stays in the outbox${why}`));
      }
    }
    if (error) this.emit("error", error);
    this.setState("disconnected");
    this.emit("disconnected", { code, reason, reconnect: false });
  }

  /** With `pauseWhenHidden` on a hidden page: reconnects once the page is visible; true if it waits. */
  private waitVisible(): boolean {
    const doc = (globalThis as { document?: { hidden?: boolean; addEventListener: Function; removeEventListener: Function } }).document;
    if (!this.opts.pauseWhenHidden || !doc || doc.hidden !== true) return false;
    if (this.visibleListener) return true;
    const listener = () => {
      if (doc.hidden) return;
      this.stopWaitingVisible();
      if (this.wanted && !this.ws) void this.open();
    };
    this.visibleListener = listener;
    doc.addEventListener("visibilitychange", listener);
    return true;
  }

  private stopWaitingVisible(): void {
    const doc = (globalThis as { document?: { removeEventListener: Function } }).document;
    if (this.visibleListener) doc?.removeEventListener("visibilitychange", this.visibleListener);
    this.visibleListener = null;
  }

  private listenOnline(on: boolean): void {
    const target = globalThis as { addEventListener?: Function; removeEventListener?: Function; window?: unknown };
    if (typeof target.window === "undefined" || typeof target.addEventListener !== "function") return;
    if (on && !this.onlineListener) {
      // Back online: do not sit out the backoff (with `pauseWhenHidden`, not on a hidden page).
      this.onlineListener = () => {
        if (this.timers.reconnect) {
          this.clearTimer("reconnect");
          if (!this.waitVisible()) void this.open();
        }
      };
      // Offline: the socket is dead, or soon will be, and nothing would tell for up to a
      // heartbeat interval and a pong timeout (40 s), while `online` found no reconnect
      // to hasten. Give it up now, as centrifuge-js does; sends wait in the outbox.
      this.offlineListener = () => {
        if (this.ws) this.abandon(this.conn, "offline");
      };
      target.addEventListener("online", this.onlineListener);
      target.addEventListener("offline", this.offlineListener);
    } else if (!on && this.onlineListener) {
      target.removeEventListener!("online", this.onlineListener);
      target.removeEventListener!("offline", this.offlineListener);
      this.onlineListener = this.offlineListener = null;
    }
  }

  // -- frames ------------------------------------------------------------------------------
  private onFrame(data: unknown): void {
    this.lastReceived = Date.now();
    this.pingSentAt = 0;
    let msg: any;
    try {
      msg = JSON.parse(typeof data === "string" ? data : String(data));
    } catch {
      this.emit("error", new ChatError("invalid_json", "the server sent a frame that is not JSON"));
      return;
    }
    if (typeof msg !== "object" || msg === null) return;
    switch (msg.type) {
      case "message":
        return this.onRoomMessage(msg as ChatMessage);
      case "dm":
        return this.onDm(msg as DirectMessage);
      case "presence":
      case "typing":
        if (this.rooms.get(msg.room)?.state === "joined") this.emit(msg.type, msg);
        return;
      case "welcome":
        return this.onWelcome(msg as Welcome & { id?: string });
      case "joined":
        return this.onJoined(msg);
      case "error":
        return this.onError(msg);
      case "left":
        // With an id it answers our `leave` (perhaps one that timed out); without, the server removed us.
        if (msg.id !== undefined) return this.settle(String(msg.id), msg);
        return this.onRemoved(msg);
      case "muted":
      case "unmuted":
        this.emit(msg.type, msg);
        return;
      case "pong":
        if (typeof msg.id === "string" && msg.id.startsWith(SYNC_PREFIX)) return this.onSynced(msg.id);
        return;
      default:
        if (msg.id !== undefined) this.settle(String(msg.id), msg);
    }
  }

  private send_(frame: Record<string, unknown>): boolean {
    if (!this.ws) return false;
    try {
      this.ws.send(JSON.stringify(frame));
      return true;
    } catch {
      return false; // the close event follows
    }
  }

  private nextId(prefix = "r"): string {
    return `${prefix}${++this.counter}`;
  }

  private onWelcome(w: Welcome & { id?: string }): void {
    if (w.id === undefined) {
      // The greeting of a new socket.
      if (this.established) return;
      if (this.token) {
        this.auth = { id: this.nextId(), purpose: "connect" };
        this.send_({ type: "auth", id: this.auth.id, token: this.token });
      } else {
        this.onEstablished(w);
      }
      return;
    }
    if (!this.auth || this.auth.id !== String(w.id)) return;
    const purpose = this.auth.purpose;
    this.auth = null;
    if (purpose === "connect") this.onEstablished(w);
    else {
      const before = this.welcome?.user_id;
      this.welcome = welcomeOf(w);
      this.ownIds.add(this.welcome.user_id);
      this.scheduleRefresh(); // resets refreshAttempt, unless this token is no better
      if (before !== undefined && this.welcome.user_id !== before) this.onUserChanged();
    }
  }

  /**
   * A refresh's `auth` signed the connection in as another user: the server left every room
   * the connection was in, without a `left` (README, `auth`), so each joined room is joined
   * again with `since`, as after a reconnect (its sends wait for it; a refusal removes it).
   * A join written after the `auth` is answered for the new user already (the server takes
   * commands in order), as is every join still queued: those are left as they are.
   */
  private onUserChanged(): void {
    const conn = this.conn;
    this.emit("userChanged", this.welcome!);
    if (conn !== this.conn || !this.established) return; // a listener disconnected
    for (const room of this.rooms.values()) {
      if (room.state !== "joined" || room.joinReq || room.joinQueued) continue;
      room.syncReq = null;
      this.setRoomState(room, "joining");
      this.sendJoin(room);
    }
  }

  private onEstablished(w: Welcome): void {
    this.clearTimer("connect");
    const welcome = (this.welcome = welcomeOf(w));
    this.ownIds.add(welcome.user_id);
    // Without persistence (no `dm_backlog`) a new connection brings no DM delivered before,
    // and a restarted memory server numbers DMs from 1 again: ids kept from an earlier
    // connection would drop its new DMs as doubles. With persistence the database numbers
    // them for good, and a page of kept DMs may come again: their ids are kept.
    if (welcome.dm_backlog === undefined) this.seenDms.clear();
    this.established = true;
    this.connectedSinceStart = true;
    this.establishedAt = Date.now();
    this.retryAttempt = 0;
    this.refreshAttempt = 0;
    this.lastReceived = Date.now();
    this.pacer.reset(this.opts.maxInFlight ?? 16);
    this.joinPacer.reset();
    this.requestPacer.reset();
    this.setState("connected");
    this.emit("connected", this.welcome);
    if (!this.established) return; // a listener disconnected
    this.scheduleRefresh();
    this.startPing(welcome.heartbeat_interval ?? HEARTBEAT_DEFAULT);
    for (const room of this.rooms.values()) this.sendJoin(room);
    this.flushRequests();
    this.flush();
  }

  private onError(msg: { id?: unknown; code: string; message: string; retry_after_ms?: unknown }): void {
    const err = errorFrom(msg);
    if (msg.code === "rate_limited" && err.retryAfterMs !== undefined) {
      this.retryAfterUntil = Math.max(this.retryAfterUntil, Date.now() + err.retryAfterMs);
    }
    const id = msg.id === undefined || msg.id === null ? null : String(msg.id);
    if (id !== null) {
      if (this.auth?.id === id) return this.onAuthError(err);
      if (this.joins.has(id)) return this.onJoinError(id, err);
      if (this.inflightReq.has(id)) return this.onSendError(id, err);
      if (id.startsWith(TYPING_PREFIX)) return; // typing is best effort
      // The ping behind a join refused (rate_limited: the request bucket ran dry at this
      // join): its answer comes after the joined and the replay all the same, as a pong would.
      // The bucket is the one of the other requests: they wait for its `retry_after_ms`, as
      // after a refusal of their own (as in the Python and Rust clients).
      if (id.startsWith(SYNC_PREFIX)) {
        const writtenAt = this.syncs.get(id);
        if (msg.code === "rate_limited" && writtenAt !== undefined) {
          const retryAfter = err.retryAfterMs ?? RETRY_AFTER_DEFAULT_MS;
          this.requestPacer.refusedUnpaced(Date.now(), retryAfter, writtenAt);
        }
        return this.onSynced(id);
      }
      if (this.requests.has(id)) return this.settle(id, msg);
      // Of a request that timed out on the wire: its caller had its `timeout` and is not told
      // again (no `error` event, as in the Python and Rust clients). Its place is free, and a
      // refusal's pause holds the next ones back all the same (the bucket is the user's).
      const limited = msg.code === "rate_limited";
      const retryAfter = limited ? (err.retryAfterMs ?? RETRY_AFTER_DEFAULT_MS) : null;
      if (this.requestAnswered(id, retryAfter)) return;
    }
    // An unmatched `token_expired` comes just before the server's close 4002, whose reconnect
    // asks `getToken` (a refresh now would ask it twice, as the Python and Rust clients do not).
    this.emit("error", err);
  }

  private settle(id: string, msg: any): void {
    const req = this.requests.get(id);
    if (!req) {
      this.requestAnswered(id, null);
      return;
    }
    if (msg.type === "error" && msg.code === "rate_limited" && req.sent) {
      // Not carried out: it goes again first (it is the oldest waiting), when the pacer lets it.
      req.sent = false;
      const err = errorFrom(msg);
      this.requestAnswered(id, err.retryAfterMs ?? RETRY_AFTER_DEFAULT_MS);
      return;
    }
    this.requests.delete(id);
    this.requestAnswered(id, null);
    clearTimeout(req.waiter.timer);
    if (msg.type === "error") {
      req.waiter.reject(errorFrom(msg));
    } else {
      req.waiter.resolve(msg);
    }
  }

  /**
   * Queues `frame` for the request pacer and waits for its answer. The client not started
   * (before `connect()`) or stopped (`disconnect()`, a stop for good) rejects at once with
   * `disconnected`, as those waiting when it stopped were: no connection would come before
   * the timeout (as in the Python and Rust clients, whose calls fail at once when closed).
   */
  private request<T>(frame: Record<string, unknown>, onLost: OnLost, timeout?: number): Promise<T> {
    if (!this.wanted) {
      const what = String(frame.type);
      const why = `${what}: the client is disconnected: call connect() first${this.stoppedWhy}`;
      return Promise.reject(new ChatError("disconnected", why));
    }
    return new Promise<T>((resolve, reject) => {
      const id = this.nextId();
      const waiter: Waiter<T> = { resolve, reject };
      const req: Request = { frame, sent: false, onLost, waiter };
      this.requests.set(id, req);
      waiter.timer = setTimeout(() => {
        // Still waiting its turn: gone from the queue, it is never written. A leave stays,
        // written when its turn comes and again if refused `rate_limited` on the wire (the
        // room is gone for the app already: the server must hear of it), unless the
        // connection goes first (the membership went with it).
        if (frame.type !== "leave") this.requests.delete(id);
        reject(new ChatError("timeout", `no answer to ${String(frame.type)} in time`));
      }, timeout ?? this.opts.requestTimeout ?? 10_000);
      this.flushRequests();
    });
  }

  /**
   * Writes the requests waiting in `requests` (in the order of the calls) that the request
   * pacer lets go now: at most `maxRequestsInFlight` unanswered; after `rate_limited` none
   * before its `retry_after_ms`, then at the server's pace. Wakes up when the next may go.
   */
  private flushRequests(): void {
    this.clearTimer("requests");
    if (!this.established) return;
    for (const [id, req] of this.requests) {
      if (req.sent) continue;
      if (req.frame.type === "leave" && this.rooms.has(String(req.frame.room))) {
        // Joined again while the leave waited its turn: the join wins (as in `leaveRoom`).
        this.requests.delete(id);
        clearTimeout(req.waiter.timer);
        req.waiter.resolve(undefined);
        continue;
      }
      const now = this.writeNow(this.requestPacer, "requests", () => this.flushRequests());
      if (now === null) return;
      req.sent = this.send_({ ...req.frame, id });
      if (!req.sent) return;
      this.requestPacer.sent(id, now);
      // One bucket on the server for joins and requests: the join pacer counts this token too.
      this.joinPacer.sentUnpaced(now);
    }
  }

  /**
   * A paced request's answer came (`retryAfter`: refused `rate_limited`, ms). False if `id`
   * is no request on the wire on this connection.
   */
  private requestAnswered(id: string, retryAfter: number | null): boolean {
    const now = Date.now();
    const freed = retryAfter === null ? this.requestPacer.joined(id, now) : this.requestPacer.refused(id, now, retryAfter);
    if (freed) this.flushRequests();
    return freed;
  }

  // -- authentication ----------------------------------------------------------------------
  private onAuthError(err: ChatError): void {
    const purpose = this.auth?.purpose;
    this.auth = null;
    this.emit("error", err);
    if (purpose === "refresh") {
      const conn = this.conn;
      this.timers.refresh = setTimeout(() => conn === this.conn && void this.refreshToken(), this.refreshRetryDelay(err));
      return;
    }
    if (AUTH_RETRY_LATER.has(err.code)) {
      // Not a verdict on the token: the server could not sign us in for now (`unavailable`:
      // its store away; `internal_error`; `rate_limited`, whose `retry_after_ms` onError
      // noted; `too_many_connections`), and registered nothing of it. A new connection
      // tries again after the backoff (not before `retry_after_ms`), with the same rooms
      // and outbox, as after a close with 1013 (try again later).
      this.onClosed(1013, `auth not carried out: ${err.code}`, "reconnect");
      return;
    }
    // Banned everywhere: the 4003 close that follows, at once (no fresh token changes it).
    if (err.code === "forbidden") return this.onClosed(4003, `auth refused: ${err.code}`);
    if (AUTH_TOKEN_REFUSED.has(err.code)) {
      // The token of a new connection was refused: a fresh one may do (getToken), else stop.
      if (this.opts.getToken) this.onClosed(4002, `auth refused: ${err.code}`);
      else this.onClosed(4001, `auth refused: ${err.code}`);
      return;
    }
    // `invalid_message`: the server could not read the auth, i.e. its token (not a string,
    // empty, over 8192 characters); the next token from the same source is no better, and
    // retrying would only loop. Any other code is one this client does not know (a newer
    // server's): it cannot tell "not now" from "never", and stops rather than loop, as
    // centrifuge-js does with a connect error not marked temporary. Either way the app is
    // told (the `error` above, then `disconnected` 1008, as a policy violation), and the
    // rooms and outbox are kept for its `connect()`.
    this.onClosed(1008, `auth refused: ${err.code}`);
  }

  private scheduleRefresh(): void {
    this.clearTimer("refresh");
    if (!this.opts.getToken || !this.token || !this.established) return;
    const exp = jwtExpiry(this.token);
    if (exp === null || !Number.isFinite(exp)) return;
    const remaining = exp - Date.now();
    let delay: number;
    if (remaining > 0) {
      this.refreshAttempt = 0;
      delay = Math.max(REFRESH_FLOOR, remaining - Math.min(this.opts.tokenRefreshMargin ?? 30_000, remaining / 2));
    } else {
      // Past its exp on this clock already (one ahead of the server's, whose leeway still takes
      // it): refreshing at once got such a token again, in a loop. The wait grows as after a
      // refused refresh while the fresh tokens are no better.
      delay = this.refreshRetryDelay();
    }
    if (delay > MAX_TIMER_DELAY) {
      // A timer longer than ~24.8 days runs at once: a 30-day token was refreshed in a loop.
      this.timers.refresh = setTimeout(() => this.scheduleRefresh(), MAX_TIMER_DELAY);
      return;
    }
    this.timers.refresh = setTimeout(() => void this.refreshToken(), delay);
  }

  /**
   * The wait before trying a refused refresh again: 1 s, then growing (jittered, up to a
   * minute) while refusals go on, and never before the server's `retry_after_ms`. The
   * current token stays good meanwhile; once it expires the server closes with 4002 and
   * the reconnect asks `getToken` again.
   */
  private refreshRetryDelay(err?: ChatError): number {
    const delay = backoffDelay(this.refreshAttempt++, { minDelay: 1000, maxDelay: 60_000, random: this.opts.random });
    return Math.max(1000, delay, err?.retryAfterMs ?? 0);
  }

  private async refreshToken(): Promise<void> {
    this.clearTimer("refresh");
    const conn = this.conn;
    if (!this.opts.getToken || !this.established || this.auth) return;
    let token: string | null;
    try {
      token = await this.opts.getToken();
    } catch (err) {
      if (conn !== this.conn) return;
      this.emit("error", toChatError(err, "token"));
      this.timers.refresh = setTimeout(() => void this.refreshToken(), this.refreshRetryDelay());
      return;
    }
    if (conn !== this.conn || !this.established || token === null || token === "") return;
    this.token = token;
    this.auth = { id: this.nextId(), purpose: "refresh" };
    this.send_({ type: "auth", id: this.auth.id, token });
  }

  // -- heartbeat ---------------------------------------------------------------------------
  /** `intervalSeconds`: the welcome's, as `serverHeartbeatInterval` read it (1 s to a day). */
  private startPing(intervalSeconds: number): void {
    const interval = intervalSeconds * 1000;
    const pongTimeout = Math.min(this.opts.pongTimeout ?? 10_000, interval);
    const conn = this.conn;
    const tick = () => {
      if (conn !== this.conn) return;
      const now = Date.now();
      if (this.pingSentAt && now - this.pingSentAt > pongTimeout) return this.abandon(conn, "no answer to ping");
      if (!this.pingSentAt && now - this.lastReceived >= interval) {
        this.pingSentAt = now;
        this.send_({ type: "ping", id: this.nextId(TYPING_PREFIX) });
      }
      this.timers.ping = setTimeout(tick, Math.min(interval / 2, pongTimeout / 2));
    };
    this.timers.ping = setTimeout(tick, interval / 2);
  }

  // -- rooms -------------------------------------------------------------------------------
  /**
   * Joins `room` and keeps it joined across reconnects until `leave`. `since`: resume
   * after this message id (e.g. one the app persisted from `lastId(room)`; undefined or null:
   * none). `epoch`: the `epoch(room)` that `since` was counted in, persisted with it (undefined
   * or null: not known; without `since` it is not used): the server then answers
   * `recovered: false` with `epochChanged` rather than replay the messages of a numbering that
   * began again as if they followed `since`. Resolves with the `joined` reply. A timeout rejects
   * the promise, but the room stays wanted: call `leave` to give up. A `since` that is not a
   * whole number >= 0 and at most 2^53 - 1 (the rule for ids off the wire, `wireId`), or an
   * `epoch` that is not a string of 1-64 characters without control characters (the server's
   * rule), rejects at once with `invalid_message`, the server's answer to it, and keeps nothing.
   */
  join(
    room: string,
    opts: { since?: number | null; epoch?: string | null; timeout?: number } = {},
  ): Promise<JoinResult> {
    const since = opts.since ?? null;
    if (since !== null && wireId(since) === null) {
      const why = `join ${room}: since must be a whole number >= 0 and at most 2^53 - 1, not ${shown(since)}`;
      return handled(Promise.reject(new ChatError("invalid_message", why)));
    }
    const epoch = opts.epoch ?? null;
    if (epoch !== null && wireEpoch(epoch) === null) {
      const why = `join ${room}: epoch must be a string of 1-64 characters, none a control `
        + `character, not ${shown(epoch)}`;
      return handled(Promise.reject(new ChatError("invalid_message", why)));
    }
    let r = this.rooms.get(room);
    if (r?.state === "joined") {
      const result: JoinResult = { room, users: r.users, last_id: r.lastId ?? 0 };
      if (r.epoch !== null) result.epoch = r.epoch;
      return Promise.resolve(result);
    }
    if (!validRoom(room)) {
      return handled(Promise.reject(new ChatError("invalid_room", `invalid room name: ${JSON.stringify(room)}`)));
    }
    if (!r) {
      r = {
        name: room,
        state: "left",
        lastId: since,
        epoch: since === null ? null : epoch,
        acceptJump: false,
        catchUpTo: 0,
        syncReq: null,
        joinReq: null,
        users: [],
        waiters: [],
      };
      this.rooms.set(room, r);
      this.setRoomState(r, "joining");
      if (this.established) this.sendJoin(r);
    }
    const rec = r;
    return handled(new Promise<JoinResult>((resolve, reject) => {
      const waiter: Waiter<JoinResult> = { resolve, reject };
      waiter.timer = setTimeout(() => {
        rec.waiters = rec.waiters.filter((w) => w !== waiter);
        reject(new ChatError("timeout", `join ${room}: no answer in time`));
      }, opts.timeout ?? this.opts.requestTimeout ?? 10_000);
      rec.waiters.push(waiter);
    }));
  }

  /**
   * Leaves `room`; its sends not yet on the wire are dropped (their promises reject with `left`).
   * Its promise never causes an unhandled-rejection crash when the app ignores it (a leave on
   * unmount, unanswered past `requestTimeout`), as those of `connect`, `join`, `send` and `dm`.
   */
  leave(room: string): Promise<void> {
    return handled(this.leaveRoom(room));
  }

  private async leaveRoom(room: string): Promise<void> {
    const r = this.rooms.get(room);
    if (!r) return;
    const onServer = this.established && (r.state === "joined" || r.joinReq !== null);
    this.clearTyping(room);
    this.dropRoom(r, new ChatError("left", `left ${room}`));
    if (onServer) {
      await this.request({ type: "leave", room }, "resolve").catch((err: ChatError) => {
        if (err.code !== "not_in_room") throw err;
      });
    }
  }

  /**
   * Has `room` joined as soon as the join pacer lets a join go (`first`: before the rooms
   * already waiting, for a join the server refused).
   */
  private sendJoin(room: Room, first = false): void {
    if (!this.established || room.joinReq || room.joinQueued || this.rooms.get(room.name) !== room) return;
    clearTimeout(room.retryTimer);
    room.joinQueued = true;
    if (first) this.joinQueue.unshift(room);
    else this.joinQueue.push(room);
    this.flushJoins();
  }

  /**
   * The time now if `pacer` lets the next join or request be written now, else null: the
   * window is full (an answer frees a place), or `flush` runs again when the next may go.
   */
  private writeNow(pacer: JoinPacer, timer: "joins" | "requests", flush: () => void): number | null {
    const now = Date.now();
    const at = pacer.nextAt(now);
    if (at === null) return null;
    if (at > now) {
      this.timers[timer] = setTimeout(() => {
        delete this.timers[timer];
        flush();
      }, Math.min(MAX_TIMER_DELAY, at - now));
      return null;
    }
    return now;
  }

  /**
   * Writes the queued joins the join pacer lets go now: at most `maxJoinsInFlight`
   * unanswered; after `rate_limited` none before its `retry_after_ms`, then at the server's
   * pace. Wakes up when the next may go.
   */
  private flushJoins(): void {
    this.clearTimer("joins");
    if (!this.established) return;
    while (this.joinQueue.length > 0) {
      const room = this.joinQueue[0]!;
      if (this.rooms.get(room.name) !== room || room.joinReq || !room.joinQueued) {
        this.joinQueue.shift(); // left, or joined some other way meanwhile
        room.joinQueued = false;
        continue;
      }
      const now = this.writeNow(this.joinPacer, "joins", () => this.flushJoins());
      if (now === null) return;
      this.joinQueue.shift();
      room.joinQueued = false;
      this.joinPacer.sent(this.writeJoin(room), now);
      // One bucket on the server for joins and requests: the request pacer counts this one too.
      this.requestPacer.sentUnpaced(now);
    }
  }

  private writeJoin(room: Room): string {
    const id = this.nextId();
    room.joinReq = id;
    const epoch = room.lastId === null ? null : room.epoch;
    this.joins.set(id, { room: room.name, since: room.lastId, epoch });
    const frame: Record<string, unknown> = { type: "join", id, room: room.name };
    if (room.lastId !== null) frame.since = room.lastId;
    if (epoch !== null) frame.epoch = epoch; // the numbering `since` is counted in
    room.syncReq = null; // a ping behind an earlier join no longer counts
    this.send_(frame);
    return id;
  }

  /**
   * A `ping` behind the `joined` just handled: its answer marks the end of the replay. It is
   * written at once, but the server charges it to the user's one bucket: the request pacer and
   * the join pacer count the token it spends (as in the Python and Rust clients), with no place
   * in their windows.
   */
  private sync(room: Room): void {
    const now = Date.now();
    room.syncReq = this.nextId(SYNC_PREFIX);
    this.syncs.set(room.syncReq, now);
    if (!this.send_({ type: "ping", id: room.syncReq })) return;
    this.requestPacer.sentUnpaced(now);
    this.joinPacer.sentUnpaced(now);
  }

  /** The room's replay is in (or there is none to wait for): its sends may go. */
  private caughtUp(room: Room): boolean {
    return room.catchUpTo === 0 || (room.lastId !== null && room.lastId >= room.catchUpTo);
  }

  private onJoined(msg: JoinResult & { id?: unknown }): void {
    const id = msg.id === undefined ? "" : String(msg.id);
    const pending = this.joins.get(id);
    if (!pending) return;
    this.joins.delete(id);
    if (this.joinPacer.joined(id, Date.now())) this.flushJoins();
    const room = this.rooms.get(pending.room);
    if (!room || room.joinReq !== id) return;
    room.joinReq = null;
    room.users = msg.users ?? [];
    const rejoin = pending.since !== null;
    // A `last_id` that is not a whole number >= 0 ("5", null, 2.5, -1, 1e400) is never stored:
    // it would poison every later `since` and the gap check.
    const lastId = wireId(msg.last_id);
    // Not a string of 1-64 characters: as if the server had sent none (never sent back).
    const epoch = wireEpoch(msg.epoch);
    // The room's ids started again from 1 since `since` was seen (the server replays nothing
    // then; with `since` 0 it ignores the epoch, and may replay).
    const epochChanged = rejoin && msg.recovered === false && pending.since! > 0
      && pending.epoch !== null && epoch !== null && epoch !== pending.epoch;
    room.epoch = epoch; // what lastId is counted in from now on (null: not known, not sent)
    room.catchUpTo = 0;
    if (epochChanged) {
      // `since`, and every id the room was checked against, name other messages of the new
      // numbering: its baseline is the new `last_id`, as at a first join (so the next live
      // message, last_id + 1, is delivered, and nothing is taken for a double or a gap of
      // the old numbering). Nothing is replayed: no ping needed to see the end of it.
      room.lastId = lastId;
      room.acceptJump = lastId === null;
      const since = pending.since!;
      const lost = { room: room.name, since, last_id: lastId ?? 0, epochChanged: true as const };
      this.emit("recoveryFailed", lost);
    } else if (!rejoin) {
      // Unreadable: no baseline; the next message sets it (nothing of this join is missed:
      // the server's messages after `joined` are the room's next ones). No replay follows.
      room.lastId = lastId;
      room.acceptJump = lastId === null;
    } else if (msg.recovered === false) {
      // Some messages after `since` are gone: the app must reload history. The replay that
      // follows starts wherever the server's history does, up to `last_id`, or there is none
      // (a `since` too far back): a ping tells. A `last_id` not above `since`: no replay (the
      // server may even have started afresh).
      room.acceptJump = true;
      if (lastId === null || lastId > pending.since!) this.sync(room);
      this.emit("recoveryFailed", { room: room.name, since: pending.since!, last_id: lastId ?? room.lastId ?? 0 });
    } else if (lastId === null) {
      this.sync(room); // the room keeps its position; the replay ends with the pong
    } else {
      room.catchUpTo = lastId; // recovered: the replay ends at last_id
    }
    // Reported to the app: the server's last_id, or (unreadable) the room's own, or 0.
    const result: JoinResult = { room: msg.room, users: room.users, last_id: lastId ?? room.lastId ?? 0 };
    if (msg.recovered !== undefined) result.recovered = msg.recovered;
    if (epoch !== null) result.epoch = epoch;
    if (epochChanged) result.epochChanged = true;
    this.setRoomState(room, "joined");
    this.emit("joined", { ...result, rejoin });
    for (const w of room.waiters.splice(0)) {
      clearTimeout(w.timer);
      w.resolve(result);
    }
    this.flush();
  }

  /** A `left` the client did not ask for: kicked, banned, membership revoked, token no longer grants it. */
  private onRemoved(msg: { room?: unknown; reason?: unknown; by?: unknown; until?: unknown; note?: unknown }): void {
    const room = typeof msg.room === "string" ? this.rooms.get(msg.room) : undefined;
    if (!room) return;
    const event: RemovedEvent = { room: room.name, reason: typeof msg.reason === "string" ? msg.reason : "removed" };
    if (typeof msg.by === "string") event.by = msg.by;
    if (msg.until !== undefined) event.until = msg.until as number | null;
    if (typeof msg.note === "string") event.note = msg.note;
    this.dropRoom(room, new ChatError("removed", `removed from ${room.name}: ${event.reason}`, { details: { ...msg } }));
    this.emit("removed", event);
  }

  /** The room is gone for good: its waiters and its sends not yet on the wire are rejected with `err`. */
  private dropRoom(room: Room, err: ChatError): void {
    this.rooms.delete(room.name);
    clearTimeout(room.retryTimer);
    // Its join on the wire, if any, stays in `joins`: its answer still frees a place in the
    // join pacer's window (onJoined/onJoinError see the room is gone and do no more).
    room.joinReq = room.syncReq = null;
    this.setRoomState(room, "left");
    for (const w of room.waiters.splice(0)) {
      clearTimeout(w.timer);
      w.reject(err);
    }
    this.clearTyping(room.name, false);
    for (const e of [...this.outbox.entries]) {
      if (e.kind !== "message" || e.room !== room.name) continue;
      if (this.inflight.has(e.client_msg_id)) {
        // On the wire: the server's answer (its echo, or a refusal) settles it.
        this.orphans.set(e.client_msg_id, err);
      } else {
        this.outbox.remove(e.client_msg_id);
        this.rejectSend(e.client_msg_id, err);
      }
    }
  }

  private onSynced(id: string): void {
    this.syncs.delete(id);
    for (const room of this.rooms.values()) {
      if (room.syncReq === id) {
        room.syncReq = null;
        this.flush();
      }
    }
  }

  private onJoinError(id: string, err: ChatError): void {
    const pending = this.joins.get(id)!;
    this.joins.delete(id);
    const limited = err.code === "rate_limited";
    this.joinPacer.refused(id, Date.now(), limited ? (err.retryAfterMs ?? RETRY_AFTER_DEFAULT_MS) : null);
    const room = this.rooms.get(pending.room);
    if (!room || room.joinReq !== id) return this.flushJoins();
    room.joinReq = null;
    if (limited) {
      // The request bucket is empty: the join pacer holds every join back until
      // retry_after_ms, and this one goes again first (the flush wakes up then).
      return this.sendJoin(room, true);
    }
    this.flushJoins();
    if (RETRYABLE_CODES.has(err.code)) {
      const delay = Math.max(err.retryAfterMs ?? 0, this.retryDelay());
      room.retryTimer = setTimeout(() => this.sendJoin(room), delay);
      return;
    }
    // invalid_room, too_many_rooms, forbidden (a ban, a revoked grant): the room cannot be joined.
    this.dropRoom(room, err);
    this.emit("error", err);
    if (pending.since !== null) {
      // A rejoin refused: the app had this room and lost it. The refusal's reason
      // (`banned`) where it gives one, as a live removal's `left` does, else its code.
      const reason = typeof err.details.reason === "string" ? err.details.reason : err.code;
      const event: RemovedEvent = { room: room.name, reason };
      if (err.details.until !== undefined) event.until = err.details.until as number | null;
      this.emit("removed", event);
    }
  }

  private setRoomState(room: Room, state: RoomState): void {
    const previous = room.state;
    if (previous === state) return;
    room.state = state;
    this.emit("roomState", { room: room.name, state, previous });
  }

  private onRoomMessage(m: ChatMessage): void {
    if (this.isEcho(m, "message")) this.acknowledge(m);
    const room = this.rooms.get(m.room);
    // An id that is not a whole number >= 0 (1e400, 2.5, "41") is never a room's lastId: such
    // a message cannot be put in order, and is not surfaced.
    const id = wireId(m.id);
    if (!room || id === null || (room.lastId === null && !room.acceptJump)) return;
    const last = room.lastId;
    // After `recovered: false` the next message sets the baseline, even below the last id:
    // a server that lost its ids (a restarted memory backend) numbers from 1 again.
    if (room.acceptJump || (last !== null && id === last + 1)) {
      const caughtUp = this.caughtUp(room);
      room.lastId = id;
      room.acceptJump = false;
      this.emit("message", m);
      if (!caughtUp && this.caughtUp(room)) this.flush(); // the replay is in: sends may go
      return;
    }
    if (last === null || id <= last) return; // seen: never surfaced twice
    // A gap: something between lastId and m.id was missed. Rejoin with `since`; the server
    // replays the missing messages, this one included, in order.
    if (room.joinReq === null && this.established) this.sendJoin(room);
  }

  private onDm(m: DirectMessage): void {
    if (this.isEcho(m, "dm")) this.acknowledge(m);
    // As for a room message: an id that is not a whole number >= 0 (2.5, -1, 1e400, one past
    // 2^53 - 1) cannot tell this DM from another one, so it is not surfaced.
    const id = wireId(m.id);
    if (id === null || this.seenDms.has(id)) return;
    this.seenDms.add(id);
    if (this.seenDms.size > 2000) {
      const oldest = this.seenDms.values().next().value as number;
      this.seenDms.delete(oldest);
    }
    this.emit("dm", m);
  }

  // -- sending -----------------------------------------------------------------------------
  /**
   * Sends `text` to `room` and resolves with the message as the server stored it (its
   * echo). Until then it is kept in the outbox and resent after a reconnect; the server
   * deduplicates by `client_msg_id`, so it is delivered once. A send again with the
   * `clientMsgId` of one still pending (an application retrying after a timeout) waits for
   * that same send, as in the Python client: nothing is written twice, and it resolves or
   * rejects with the first one's echo or refusal (the first one's room and text are sent).
   */
  send(room: string, text: string, opts: { clientMsgId?: string; timeout?: number } = {}): Promise<ChatMessage> {
    if (!this.rooms.has(room)) {
      return handled(Promise.reject(new ChatError("not_in_room", `join ${room} before sending to it`)));
    }
    this.clearTyping(room, false);
    return this.enqueue(
      { kind: "message", room, text, client_msg_id: opts.clientMsgId ?? randomId(), created: Date.now() },
      opts.timeout,
    ) as Promise<ChatMessage>;
  }

  /** Sends a direct message to a user id; resolves with the echo, like `send`. */
  dm(to: string, text: string, opts: { clientMsgId?: string; timeout?: number } = {}): Promise<DirectMessage> {
    return this.enqueue(
      { kind: "dm", to, text, client_msg_id: opts.clientMsgId ?? randomId(), created: Date.now() },
      opts.timeout,
    ) as Promise<DirectMessage>;
  }

  /**
   * Queues what `outboxStorage` kept from the previous page or run, once: at the first
   * `connect()` or the first send, whichever comes first (a send queued before `connect()`
   * saves the outbox, which would otherwise replace the stored one).
   */
  private restoreOutbox(): void {
    this.restored ??= this.outbox.restore().then((fresh) => {
      for (const e of fresh) this.restoredIds.add(e.client_msg_id);
    });
  }

  private enqueue(entry: OutboxEntry, timeout?: number): Promise<ChatMessage | DirectMessage> {
    this.restoreOutbox(); // before this send is saved over what the storage kept
    // The same clientMsgId still pending: wait for that send (Python's Outbox.add returns it).
    const pending = this.outbox.has(entry.client_msg_id);
    if (!pending && this.outbox.full) {
      return handled(Promise.reject(new ChatError("outbox_full", `${this.outbox.limit} sends are already waiting`)));
    }
    const cmid = entry.client_msg_id;
    return handled(new Promise((resolve, reject) => {
      const waiter: Waiter<ChatMessage | DirectMessage> = { resolve, reject };
      const ms = timeout ?? this.opts.sendTimeout ?? 0;
      if (ms > 0) {
        waiter.timer = setTimeout(() => {
          const rest = (this.sendWaiters.get(cmid) ?? []).filter((w) => w !== waiter);
          if (rest.length > 0) this.sendWaiters.set(cmid, rest);
          else this.sendWaiters.delete(cmid);
          reject(new ChatError("timeout", "not acknowledged in time; it stays in the outbox"));
        }, ms);
      }
      this.sendWaiters.set(cmid, [...(this.sendWaiters.get(cmid) ?? []), waiter]);
      if (pending) return;
      this.outbox.add(entry);
      this.flush();
    }));
  }

  /**
   * Puts what the outbox may send on the wire: in order, as many as the pacer lets go now
   * (at most `maxInFlight` unacknowledged; after `rate_limited`, one at a time at the
   * server's pace), and wakes up again when the next may go.
   */
  private flush(): void {
    if (!this.established || !this.ws || this.outbox.size === 0) return;
    const now = Date.now();
    const blocked = new Set<string>();
    for (const e of this.outbox.entries) {
      if (this.inflight.has(e.client_msg_id)) continue;
      if (e.kind === "message") {
        if (blocked.has(e.room)) continue;
        const room = this.rooms.get(e.room);
        // The room's rejoin and replay come first: the replay may hold this very message
        // (a rejoin waiting for the join pacer too).
        if (!room || room.state !== "joined" || room.joinReq || room.joinQueued || room.syncReq
            || !this.caughtUp(room)) {
          blocked.add(e.room);
          continue;
        }
      }
      const at = this.pacer.nextAt(now, this.inflight.size);
      if (at === null) return; // the window is full: an acknowledgement flushes again
      if (at > now) {
        this.clearTimer("flush");
        this.timers.flush = setTimeout(() => {
          delete this.timers.flush;
          this.flush();
        }, at - now);
        return;
      }
      const id = this.nextId();
      this.inflight.set(e.client_msg_id, id);
      this.inflightReq.set(id, e.client_msg_id);
      this.inflightAt.set(e.client_msg_id, now);
      this.watchAcks();
      const frame =
        e.kind === "message"
          ? { type: "message", id, room: e.room, text: e.text, client_msg_id: e.client_msg_id }
          : { type: "dm", id, to: e.to, text: e.text, client_msg_id: e.client_msg_id };
      if (!this.send_(frame)) return;
      this.pacer.sent(now);
    }
  }

  /** Sends written `ackTimeout` ago without an echo are written again (the server deduplicates). */
  private watchAcks(): void {
    if (this.timers.ack) return;
    const timeout = this.opts.ackTimeout ?? 10_000;
    let oldest = Infinity;
    for (const at of this.inflightAt.values()) oldest = Math.min(oldest, at);
    if (oldest === Infinity) return;
    this.timers.ack = setTimeout(() => {
      delete this.timers.ack;
      const now = Date.now();
      for (const [cmid, at] of this.inflightAt) {
        if (now - at >= timeout) {
          this.inflight.delete(cmid); // its request id stays known: a late answer to it is ignored
          this.inflightAt.delete(cmid);
          if (this.orphans.has(cmid)) this.dropOrphan(cmid); // its room is left: not written again
        }
      }
      this.flush();
      this.watchAcks();
    }, Math.max(0, oldest + timeout - Date.now()));
  }

  /**
   * Whether `m` is the echo of the pending send with its client_msg_id: a send of that kind
   * (and room), and from a user this client has been. A client_msg_id is unique per sender
   * only (the server dedupes per user), and every member gets the sender's: another member's
   * message with the same one is not ours, and taking it for the echo would drop a send never
   * written. A room message restored from storage was written, if at all, by an earlier run,
   * perhaps as another guest id, and a rejoin's replay may bring that copy: any sender's is
   * taken for it. A DM has no such copy (it reaches only its sender's and its reader's
   * connections, and no replay gives it back to its sender): its echo is always from this
   * client's user and to the send's reader, restored or not (another user's DM to us naming
   * the id of a restored DM took it out of the outbox unsent).
   */
  private isEcho(m: ChatMessage | DirectMessage, kind: "message" | "dm"): boolean {
    const cmid = m.client_msg_id;
    if (!cmid) return false;
    const entry = this.outbox.entries.find((e) => e.client_msg_id === cmid);
    if (!entry || entry.kind !== kind) return false;
    if (entry.kind === "dm") {
      return entry.to === (m as DirectMessage).to && this.ownIds.has(m.user_id);
    }
    if (entry.room !== (m as ChatMessage).room) return false;
    return this.ownIds.has(m.user_id) || this.restoredIds.has(cmid);
  }

  /**
   * The echo `m` (a room message or a DM naming a `client_msg_id`) acknowledges that send:
   * the server stored it. Its promise and the `ack` event get the message with `id` -1 when
   * the server's `id` is no message id (`wireId`: missing, not a whole number, negative or
   * past 2^53 - 1), as Python's -1 and Rust's `u64::MAX`: a number that is never an id,
   * not the frame's value passed on as one.
   */
  private acknowledge(echo: ChatMessage | DirectMessage): void {
    const cmid = echo.client_msg_id;
    if (!cmid || !this.outbox.remove(cmid)) return;
    this.restoredIds.delete(cmid);
    const m = wireId(echo.id) === null ? { ...echo, id: -1 } : echo;
    const inFlight = this.inflight.size; // this one among them, if written on this socket
    if (this.inflight.delete(cmid)) {
      for (const [req, c] of this.inflightReq) if (c === cmid) this.inflightReq.delete(req);
    }
    this.inflightAt.delete(cmid);
    this.orphans.delete(cmid);
    this.retryAttempt = 0;
    this.pacer.acknowledged(Date.now(), inFlight);
    for (const waiter of this.sendWaiters.get(cmid) ?? []) {
      clearTimeout(waiter.timer);
      waiter.resolve(m);
    }
    this.sendWaiters.delete(cmid);
    this.emit("ack", m);
    this.flush();
  }

  private onSendError(id: string, err: ChatError): void {
    const cmid = this.inflightReq.get(id)!;
    this.inflightReq.delete(id);
    if (this.inflight.get(cmid) !== id) return; // an answer to an earlier write of a send written again
    const writtenAt = this.inflightAt.get(cmid);
    this.inflight.delete(cmid);
    this.inflightAt.delete(cmid);
    const entry = this.outbox.entries.find((e) => e.client_msg_id === cmid);
    if (!entry) return;
    const orphan = this.orphans.get(cmid);
    if (orphan && RETRYABLE_CODES.has(err.code)) {
      // Its room was left after it was written: it is not tried again (nor on a later join).
      this.dropOrphan(cmid);
      if (err.code === "rate_limited") this.rateLimited(err, writtenAt);
    } else if (err.code === "rate_limited") {
      this.rateLimited(err, writtenAt);
    } else if (RETRYABLE_CODES.has(err.code)) {
      this.pause(this.retryDelay());
    } else if (err.code === "not_in_room" && entry.kind === "message" && this.rooms.has(entry.room) && !orphan) {
      // The server lost our membership: join again, then the entry goes out.
      const room = this.rooms.get(entry.room)!;
      this.setRoomState(room, "joining");
      this.sendJoin(room);
    } else {
      this.orphans.delete(cmid);
      this.outbox.remove(cmid);
      this.rejectSend(cmid, err);
      this.emit("error", err);
    }
  }

  /** A send of a left room that will not be written again: out of the outbox, rejected with the room's error. */
  private dropOrphan(cmid: string): void {
    const err = this.orphans.get(cmid);
    this.orphans.delete(cmid);
    if (!err || !this.outbox.remove(cmid)) return;
    this.rejectSend(cmid, err);
  }

  private pause(ms: number): void {
    this.pacer.pause(Date.now() + ms);
    this.clearTimer("flush");
    this.flush();
  }

  /**
   * The user's bucket is empty: every send waits for `retry_after_ms`, then they go one at
   * a time at the server's pace, or each pause would end in a window of refusals (and a
   * long run of them in a 4102).
   */
  private rateLimited(err: ChatError, writtenAt?: number): void {
    const now = Date.now();
    const retryAfterMs = err.retryAfterMs ?? RETRY_AFTER_DEFAULT_MS;
    this.pacer.rateLimited(now, retryAfterMs, writtenAt);
    this.emit("rateLimited", { retryAfterMs, until: now + retryAfterMs });
    this.clearTimer("flush");
    this.flush();
  }

  /** Backoff for requests the server could not serve (`unavailable`): 250 ms .. 5 s, jittered. */
  private retryDelay(): number {
    return backoffDelay(this.retryAttempt++, { minDelay: 250, maxDelay: 5000, random: this.opts.random });
  }

  private rejectSend(cmid: string, err: ChatError): void {
    const waiters = this.sendWaiters.get(cmid) ?? [];
    this.sendWaiters.delete(cmid);
    for (const waiter of waiters) {
      clearTimeout(waiter.timer);
      waiter.reject(err);
    }
  }

  // -- reads -------------------------------------------------------------------------------
  /**
   * The room's recent messages, oldest first (`before`: ids below it, for paging back;
   * undefined or null: none). A `before` that is not a whole number >= 1 and at most 2^53 - 1
   * (the server's rule: the rule for ids off the wire, `wireId`, without 0, as its ids start
   * at 1) rejects at once with `invalid_message`, the server's answer to it, and writes nothing. So
   * does a `limit` (how
   * many; undefined or null: the server's default, 50) that is not a whole number >= 1 and at
   * most 2^53 - 1, the server's rule (it serves at most `HISTORY_SIZE` whatever the limit).
   * The messages of `historyPage`, without its `truncated`: to page back, use that.
   */
  async history(room: string, opts: { limit?: number | null; before?: number | null; timeout?: number } = {}): Promise<ChatMessage[]> {
    return (await this.historyPage(room, opts)).messages;
  }

  /**
   * A page of the room's history, as `history` asks for it (same `limit`, `before` and their
   * rules), with the server's `truncated`: true when older messages within `limit` were left
   * out because the reply reached the server's byte bound (`HISTORY_MAX_BYTES`, 1 MiB; the
   * newest message always comes). Then the page may be shorter than `limit` although older
   * messages are held: ask again with `before` = the oldest id of the page. Only the JSON
   * boolean `true` counts; anything else (absent, `"true"`, 1) is false.
   */
  async historyPage(room: string, opts: { limit?: number | null; before?: number | null; timeout?: number } = {}): Promise<HistoryPage> {
    const before = opts.before ?? null;
    if (before !== null && !((wireId(before) ?? 0) >= 1)) {
      const why = `history ${room}: before must be a whole number >= 1 and at most 2^53 - 1, not ${shown(before)}`;
      throw new ChatError("invalid_message", why);
    }
    const limit = opts.limit ?? null;
    if (limit !== null && !((wireId(limit) ?? 0) >= 1)) {
      const why = `history ${room}: limit must be a whole number >= 1 and at most 2^53 - 1, not ${shown(limit)}`;
      throw new ChatError("invalid_message", why);
    }
    const frame: Record<string, unknown> = { type: "history", room };
    if (limit !== null) frame.limit = limit;
    if (before !== null) frame.before = before;
    const reply = await this.request<{ messages: ChatMessage[]; truncated?: unknown }>(frame, "resend", opts.timeout);
    return { messages: reply.messages, truncated: reply.truncated === true };
  }

  /** The users in a room. */
  async listUsers(room: string, opts: { timeout?: number } = {}): Promise<User[]> {
    const reply = await this.request<{ users: User[] }>({ type: "list_users", room }, "resend", opts.timeout);
    return reply.users;
  }

  // -- moderation (a token's `mod_rooms`) ---------------------------------------------------
  /** Removes every connection of `userId` from `room` now (they get `removed`); resolves with the `moderated` reply. */
  kick(room: string, userId: string, opts: { reason?: string; timeout?: number } = {}): Promise<ModeratedResult> {
    const frame: Record<string, unknown> = { type: "kick", room, user_id: userId };
    if (opts.reason !== undefined) frame.reason = opts.reason;
    return this.moderate(frame, opts.timeout);
  }

  /** Mutes `userId` in `room` for `duration` seconds (omitted: until lifted). */
  mute(room: string, userId: string, opts: { duration?: number; timeout?: number } = {}): Promise<ModeratedResult> {
    const frame: Record<string, unknown> = { type: "mute", room, user_id: userId };
    if (opts.duration !== undefined) frame.duration = opts.duration;
    return this.moderate(frame, opts.timeout);
  }

  unmute(room: string, userId: string, opts: { timeout?: number } = {}): Promise<ModeratedResult> {
    return this.moderate({ type: "unmute", room, user_id: userId }, opts.timeout);
  }

  private async moderate(frame: Record<string, unknown>, timeout?: number): Promise<ModeratedResult> {
    const { type: _type, id: _id, ...reply } = await this.request<Record<string, unknown>>(frame, "reject", timeout);
    return reply as ModeratedResult;
  }

  // -- typing ------------------------------------------------------------------------------
  /**
   * Call on every keystroke: sends `typing: true` (again every few seconds while typing goes
   * on, so the server's own expiry never cuts in), and `typing: false` once no keystroke came
   * for `typingTimeout`. `send` to the room ends it (the server clears it with the message).
   */
  typing(room: string): void {
    if (this.rooms.get(room)?.state !== "joined" || !this.established) return;
    const now = Date.now();
    const idle = this.opts.typingTimeout ?? 3000;
    const t = this.typingState.get(room);
    if (t) clearTimeout(t.timer);
    const again = !t || now - t.sentAt >= idle;
    if (again) this.send_({ type: "typing", id: this.nextId(TYPING_PREFIX), room, status: true });
    this.typingState.set(room, { sentAt: again ? now : t!.sentAt, timer: setTimeout(() => this.stopTyping(room), idle) });
  }

  /** Sends `typing: false` now if `typing(room)` was called and not yet ended. */
  stopTyping(room: string): void {
    this.clearTyping(room, true);
  }

  private clearTyping(room: string, tell = true): void {
    const t = this.typingState.get(room);
    if (!t) return;
    clearTimeout(t.timer);
    this.typingState.delete(room);
    if (tell && this.rooms.get(room)?.state === "joined") {
      this.send_({ type: "typing", id: this.nextId(TYPING_PREFIX), room, status: false });
    }
  }

  // -- helpers -----------------------------------------------------------------------------
  private setState(state: ConnectionState): void {
    const previous = this._state;
    if (previous === state) return;
    this._state = state;
    this.emit("state", { state, previous });
  }

  private clearTimer(name: keyof ChatClient["timers"]): void {
    const t = this.timers[name];
    if (t !== undefined) clearTimeout(t);
    delete this.timers[name];
  }
}

let cachedWebSocket: WebSocketConstructor | undefined;

/** The WebSocket class: the option, the global (browsers, Node 22+), else `ws` (Node 20). */
async function resolveWebSocket(given?: WebSocketConstructor): Promise<WebSocketConstructor> {
  if (given) return given;
  const global = (globalThis as { WebSocket?: WebSocketConstructor }).WebSocket;
  if (global) return global;
  if (!cachedWebSocket) {
    // A variable specifier: bundlers targeting browsers leave it alone, Node resolves it.
    const name = "ws";
    const mod: any = await import(/* webpackIgnore: true */ /* @vite-ignore */ name);
    cachedWebSocket = (mod.WebSocket ?? mod.default) as WebSocketConstructor;
  }
  return cachedWebSocket;
}

function withUsername(url: string, username?: string): string {
  if (!username) return url;
  const u = new URL(url);
  u.searchParams.set("username", username);
  return u.toString();
}

/**
 * A message id from the wire (`joined`'s `last_id`, a `message`'s `id`), or null: only a safe
 * integer >= 0 counts. Not `"5"` (string concatenation in `lastId + 1`), null, `true`, 2.5 or -1
 * (a `since` the server replays from, then a gap, again and again), `1e400` (Infinity, sent on
 * as `since: null`), nor one past 2^53 - 1 (`lastId + 1` cannot tell it from its neighbour).
 */
function wireId(value: unknown): number | null {
  return typeof value === "number" && Number.isSafeInteger(value) && value >= 0 ? value : null;
}

/**
 * A room's `epoch` (from `joined`, or the app's `join`), or null: a string of 1-64 characters
 * (code points, as the server counts them), none a control character (U+0000-U+001F, U+007F),
 * the server's rule for `join.epoch`: one that is not would be refused with `invalid_message`
 * at every rejoin.
 */
function wireEpoch(value: unknown): string | null {
  if (typeof value !== "string") return null;
  const length = [...value].length;
  return length >= 1 && length <= 64 && !/[\u0000-\u001f\u007f]/.test(value) ? value : null;
}

/** An app's argument as an error message shows it: strings quoted, `5n`, `NaN`, `{"a":1}`. */
function shown(value: unknown): string {
  if (typeof value === "bigint") return `${value}n`;
  if (typeof value !== "object" && typeof value !== "string") return String(value);
  try {
    return JSON.stringify(value) ?? String(value);
  } catch {
    return Object.prototype.toString.call(value);
  }
}

/** The `exp` of a JWT in ms, or null (not a JWT, no exp). The signature is the server's business. */
export function jwtExpiry(token: string): number | null {
  const part = token.split(".")[1];
  if (!part) return null;
  try {
    const json = atob(part.replace(/-/g, "+").replace(/_/g, "/").padEnd(Math.ceil(part.length / 4) * 4, "="));
    const exp = JSON.parse(json).exp;
    return typeof exp === "number" ? exp * 1000 : null;
  } catch {
    return null;
  }
}

/** A random UUID v4 (crypto.randomUUID needs a secure context in browsers). */
export function randomId(): string {
  const c = (globalThis as { crypto?: Crypto }).crypto;
  if (c?.randomUUID) {
    try {
      return c.randomUUID();
    } catch {
      /* not a secure context */
    }
  }
  const bytes = new Uint8Array(16);
  if (c?.getRandomValues) c.getRandomValues(bytes);
  else for (let i = 0; i < 16; i++) bytes[i] = Math.floor(Math.random() * 256);
  bytes[6] = (bytes[6]! & 0x0f) | 0x40;
  bytes[8] = (bytes[8]! & 0x3f) | 0x80;
  const hex = [...bytes].map((b) => b.toString(16).padStart(2, "0")).join("");
  return `${hex.slice(0, 8)}-${hex.slice(8, 12)}-${hex.slice(12, 16)}-${hex.slice(16, 20)}-${hex.slice(20)}`;
}

/**
 * Marks a promise as handled, so an app that fires `connect`, `join`, `send` or `dm` and
 * forgets the promise never dies of an unhandled rejection; failures are `error` events too.
 */
function handled<T>(p: Promise<T>): Promise<T> {
  p.catch(() => {});
  return p;
}

/** The server's room-name rule (README "Client -> server"), checked before a room is kept. */
function validRoom(room: string): boolean {
  return typeof room === "string" && /^[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}$/.test(room);
}

/**
 * An `error` event as a ChatError. `retry_after_ms` is read here, where it comes off the wire,
 * by `serverRetryAfterMs`: a finite number >= 0, rounded up, at most a day; anything else is
 * none. Every timer downstream (the pacer's flush, a join's retry, a refresh's retry, the
 * reconnect) then gets a sane delay, whatever a buggy server or a proxy sent.
 */
function errorFrom(msg: { code?: unknown; message?: unknown; retry_after_ms?: unknown }): ChatError {
  const { type: _type, id: _id, ...details } = msg as Record<string, unknown>;
  return new ChatError(String(msg.code), String(msg.message ?? msg.code), {
    retryAfterMs: serverRetryAfterMs(msg.retry_after_ms),
    details,
  });
}

/**
 * A `welcome` as the app sees it. `heartbeat_interval` is read here, where it comes off the
 * wire, by `serverHeartbeatInterval`: a finite number > 0, at least a second, at most a day;
 * anything else is dropped, as if the server had sent none (the ping timers use 30 s).
 */
function welcomeOf(w: Welcome & { id?: unknown; type?: unknown }): Welcome {
  const { id: _id, type: _type, heartbeat_interval: raw, ...rest } = w as Welcome & { id?: unknown; type?: unknown; heartbeat_interval?: unknown };
  const heartbeat_interval = serverHeartbeatInterval(raw);
  // `dm_backlog` (persistence on) counts only as a count, by the rule for ids off the wire,
  // as in the Python and Rust clients: a `null`, `"2"` or `2.5` is no persistence.
  if (rest.dm_backlog !== undefined && wireId(rest.dm_backlog) === null) delete rest.dm_backlog;
  return heartbeat_interval === undefined ? rest : { ...rest, heartbeat_interval };
}

/**
 * The close code of a client stopped by a server certificate that failed verification: RFC
 * 6455's 1015 (never sent on the wire; "the server certificate can't be verified"), as in the
 * Python and Rust clients.
 */
export const TLS_CLOSE_CODE = 1015;

/**
 * OpenSSL's verification failures as Node names them (`err.code`: `CERT_HAS_EXPIRED`,
 * `DEPTH_ZERO_SELF_SIGNED_CERT`, `UNABLE_TO_VERIFY_LEAF_SIGNATURE`, ...), and Node's own host
 * name check (`ERR_TLS_CERT_ALTNAME_INVALID`).
 */
const CERTIFICATE_ERROR =
  /^(?:ERR_TLS_CERT_ALTNAME_INVALID|HOSTNAME_MISMATCH|INVALID_CA|INVALID_PURPOSE|PATH_LENGTH_EXCEEDED|(?:ERROR_IN_)?CERT_\w+|(?:DEPTH_ZERO_)?SELF_SIGNED_CERT(?:_IN_CHAIN)?|UNABLE_TO_(?:GET_ISSUER_CERT(?:_LOCALLY)?|VERIFY_LEAF_SIGNATURE|DECRYPT_CERT_SIGNATURE|DECODE_ISSUER_PUBLIC_KEY))$/;

/**
 * The reason a socket's `error` event gives for a server certificate that failed verification
 * (`ws`'s event carries Node's error; its `cause`s are looked at too), else null: browsers
 * tell nothing, and other errors (a reset, a refused connection) are outages.
 */
export function certificateProblem(ev: unknown): string | null {
  let err = (ev as { error?: unknown } | null)?.error ?? ev;
  for (let depth = 0; depth < 4 && err && typeof err === "object"; depth++) {
    const { code, message, cause } = err as { code?: unknown; message?: unknown; cause?: unknown };
    if (typeof code === "string" && CERTIFICATE_ERROR.test(code)) {
      return `TLS certificate verification failed: ${code}: ${String(message)}`;
    }
    err = cause;
  }
  return null;
}

function toChatError(err: unknown, code: string): ChatError {
  return err instanceof ChatError ? err : new ChatError(code, err instanceof Error ? err.message : String(err));
}
