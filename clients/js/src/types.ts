/** Wire types (README "Protocol reference") and the client's events. */
import type { ChatError } from "./errors.js";

export type ConnectionState = "disconnected" | "connecting" | "connected";
export type RoomState = "joining" | "joined" | "left";

export interface User {
  user_id: string;
  username: string;
  /** Present (true) for a guest (no token); absent for a signed-in user. */
  guest?: true;
}

/** A room message (`message` event); `id` is the room's gap-free sequence number. */
export interface ChatMessage {
  type: "message";
  /**
   * The room's sequence number; -1 (never an id) on a send's result or `ack` whose echo
   * carried no message id (missing, not a whole number, negative or past 2^53 - 1).
   */
  id: number;
  room: string;
  from: string;
  user_id: string;
  /** Present (true) when the sender is a guest (no token); absent for a signed-in user. */
  guest?: true;
  text: string;
  timestamp: number;
  client_msg_id?: string;
}

/** A direct message (`dm` event). */
export interface DirectMessage {
  type: "dm";
  /** Tells this DM from the others; -1 on a send's result or `ack`, as for `ChatMessage.id`. */
  id: number;
  from: string;
  user_id: string;
  /** Present (true) when the sender is a guest (no token); absent for a signed-in user. */
  guest?: true;
  to: string;
  text: string;
  timestamp: number;
  client_msg_id?: string;
}

export interface PresenceEvent {
  type: "presence";
  room: string;
  user: string;
  user_id: string;
  /** Present (true) when the user is a guest (no token). */
  guest?: true;
  status: "online" | "offline";
}

export interface TypingEvent {
  type: "typing";
  room: string;
  user: string;
  user_id: string;
  /** Present (true) when the user is a guest (no token). */
  guest?: true;
  status: boolean;
}

/** The server's `welcome`: who this connection is. */
export interface Welcome {
  user_id: string;
  username: string;
  authenticated: boolean;
  auth_required: boolean;
  /**
   * Seconds between the server's pings, as the client reads it (a finite number > 0, at least
   * 1, at most 86400; absent when the server sent none or anything else: the client then
   * assumes 30). Rule shared with the Python and Rust clients: `serverHeartbeatInterval`.
   */
  heartbeat_interval?: number;
  dm_backlog?: number;
}

/** The server's `joined` reply, as `join()` resolves and the `joined` event carries. */
export interface JoinResult {
  room: string;
  users: User[];
  last_id: number;
  /** Present when the join carried `since` (a rejoin): false means messages were lost. */
  recovered?: boolean;
  /**
   * The name of the room's numbering (the server's `joined.epoch`): the same while its ids go
   * on from one another, another once they start again from 1. Absent from a server of the
   * release before epochs (or one whose value is no string of 1-64 characters).
   */
  epoch?: string;
  /**
   * True when the join's `since` was counted in another epoch than the room's (a memory server
   * restarted, Redis lost its data, the room was unused past `ROOM_NUMBERING_TTL`): nothing
   * was replayed, `recovered` is false, and `last_id` is the new numbering's. Absent otherwise.
   */
  epochChanged?: true;
}

export interface JoinedEvent extends JoinResult {
  /** True when this was a rejoin with `since` (after a reconnect or a detected gap). */
  rejoin: boolean;
}

export interface RecoveryFailedEvent {
  room: string;
  /** The last id seen before the loss. */
  since: number;
  /** The server's latest id at the rejoin. Reload `history(room)` to fill the hole. */
  last_id: number;
  /**
   * True when the room's ids started again from 1 since `since` was seen (the `joined` named
   * another `epoch` than the one sent): `since` and the ids the app holds name other messages
   * of the new numbering; drop them and reload `history(room)`. Absent otherwise.
   */
  epochChanged?: true;
}

/** The server removed this client from a room (a `left` it did not ask for): kicked, banned, membership revoked, or a rejoin refused. */
export interface RemovedEvent {
  room: string;
  /** `kicked` or a moderator's reason, `banned`, `membership revoked`, `forbidden` (a fresh
   * token no longer grants the room, or a rejoin refused for a reason other than a ban). A
   * rejoin refused for a ban says `banned`, as a ban while connected does. */
  reason: string;
  /** The moderator's user_id, or `api`. */
  by?: string;
  /** For a ban: until when (Unix ms; null: until lifted). */
  until?: number | null;
  note?: string;
}

/** `muted`: this user may read but not post or type in `room` (absent: anywhere) until `until` (Unix ms; null: until lifted). */
export interface MutedEvent {
  type: "muted";
  room?: string;
  until: number | null;
  by?: string;
}

export interface UnmutedEvent {
  type: "unmuted";
  room?: string;
}

/**
 * A page of a room's history (`historyPage`): `messages` oldest first, and whether the server
 * left out older messages within the `limit` asked for because the reply reached its byte bound
 * (`HISTORY_MAX_BYTES`, 1 MiB): then page back with `before` = the oldest id here, whatever the
 * page's length. `truncated` is true only for the server's JSON `true`.
 */
export interface HistoryPage {
  messages: ChatMessage[];
  truncated: boolean;
}

/** The reply to `kick`, `mute` and `unmute`. */
export interface ModeratedResult {
  action: "kick" | "mute" | "unmute";
  room: string;
  user_id: string;
  until?: number | null;
  lifted?: boolean;
  [field: string]: unknown;
}

export interface StateEvent {
  state: ConnectionState;
  previous: ConnectionState;
}

export interface RoomStateEvent {
  room: string;
  state: RoomState;
  previous: RoomState;
}

/** Emitted when a (re)connection attempt is scheduled. */
export interface ConnectingEvent {
  /**
   * Which reconnect this is: 1 for the first after a connection that stayed up `stableAfter`
   * (or after `connect()`), then 2, 3, ... while attempts fail or connections close at once
   * (the `attempt` the `url` function is then asked with; `connect()` itself is attempt 0).
   */
  attempt: number;
  /** ms until the attempt starts. */
  delay: number;
  /** Why the previous connection ended (absent on the first connect). */
  code?: number;
  reason?: string;
}

export interface DisconnectedEvent {
  code: number;
  reason: string;
  /** Always false here: a disconnect with a reconnect ahead is a `connecting` event. */
  reconnect: false;
}

/** Sends are held back: the server's bucket for this user is empty. */
export interface RateLimitedEvent {
  /** The server's `retry_after_ms`. */
  retryAfterMs: number;
  /** `Date.now()` at which sends may go again. */
  until: number;
}

export interface ClientEvents {
  state: StateEvent;
  connecting: ConnectingEvent;
  connected: Welcome;
  /**
   * A token refresh signed the connection in as another user (its `welcome` names another
   * `user_id`): the server left every room, and the client joins them again as the new user.
   */
  userChanged: Welcome;
  disconnected: DisconnectedEvent;
  message: ChatMessage;
  dm: DirectMessage;
  presence: PresenceEvent;
  typing: TypingEvent;
  joined: JoinedEvent;
  roomState: RoomStateEvent;
  recoveryFailed: RecoveryFailedEvent;
  removed: RemovedEvent;
  muted: MutedEvent;
  unmuted: UnmutedEvent;
  /** A send the server acknowledged (also for sends restored from storage, which have no promise). */
  ack: ChatMessage | DirectMessage;
  /** The server refused a send with `rate_limited`: sends wait until `until`, then go at its pace. */
  rateLimited: RateLimitedEvent;
  error: ChatError;
}

/** The subset of the WebSocket API the client uses (browsers, Node 22+, `ws`). */
export interface WebSocketLike {
  readonly readyState: number;
  send(data: string): void;
  close(code?: number, reason?: string): void;
  onopen: ((ev: any) => void) | null;
  onmessage: ((ev: { data: any }) => void) | null;
  onclose: ((ev: { code: number; reason: string }) => void) | null;
  onerror: ((ev: any) => void) | null;
}

export type WebSocketConstructor = new (url: string) => WebSocketLike;
