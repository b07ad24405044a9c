//! The wire protocol as types, with no I/O: one enum for what a client sends
//! ([`ClientCommand`]), one for what the server sends ([`ServerEvent`]), and the
//! close-code table that says whether to reconnect. Field names follow the
//! README's "Protocol reference" exactly.

use serde::{Deserialize, Serialize};

use crate::backoff::RETRY_AFTER_CAP;

/// The optional `id` of a request, echoed by its direct reply or `error`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(untagged)]
pub enum RequestId {
    Int(u64),
    Str(String),
}

/// A command from client to server (`{"type": ..., ...}`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ClientCommand {
    Auth {
        token: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        id: Option<RequestId>,
    },
    Join {
        room: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        since: Option<u64>,
        /// The `epoch` of the `joined` in which `since` was counted: another epoch's ids name
        /// other messages, and the server then replays nothing (`recovered: false`).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        epoch: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        id: Option<RequestId>,
    },
    Leave {
        room: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        id: Option<RequestId>,
    },
    Message {
        room: String,
        text: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        client_msg_id: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        id: Option<RequestId>,
    },
    Dm {
        to: String,
        text: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        client_msg_id: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        id: Option<RequestId>,
    },
    Typing {
        room: String,
        status: bool,
    },
    ListUsers {
        room: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        id: Option<RequestId>,
    },
    History {
        room: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        limit: Option<u32>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        before: Option<u64>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        id: Option<RequestId>,
    },
    Ping {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        id: Option<RequestId>,
    },
    /// Moderators: remove `user_id` from `room`.
    Kick {
        room: String,
        user_id: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        reason: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        id: Option<RequestId>,
    },
    /// Moderators: `user_id` may read `room` but not post or type, for `duration` seconds (None: until lifted).
    Mute {
        room: String,
        user_id: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        duration: Option<f64>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        id: Option<RequestId>,
    },
    Unmute {
        room: String,
        user_id: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        id: Option<RequestId>,
    },
}

impl ClientCommand {
    /// The command with request id `id` (`typing` has none: it gets no reply).
    pub fn with_id(mut self, request_id: RequestId) -> Self {
        match &mut self {
            ClientCommand::Auth { id, .. }
            | ClientCommand::Join { id, .. }
            | ClientCommand::Leave { id, .. }
            | ClientCommand::Message { id, .. }
            | ClientCommand::Dm { id, .. }
            | ClientCommand::ListUsers { id, .. }
            | ClientCommand::History { id, .. }
            | ClientCommand::Ping { id }
            | ClientCommand::Kick { id, .. }
            | ClientCommand::Mute { id, .. }
            | ClientCommand::Unmute { id, .. } => *id = Some(request_id),
            ClientCommand::Typing { .. } => {}
        }
        self
    }

    /// `kick`, `mute` or `unmute`: moderation, which a resend could carry out twice
    /// (or lift a mute placed in between); `None` for any other command.
    pub(crate) fn moderation(&self) -> Option<&'static str> {
        match self {
            ClientCommand::Kick { .. } => Some("kick"),
            ClientCommand::Mute { .. } => Some("mute"),
            ClientCommand::Unmute { .. } => Some("unmute"),
            _ => None,
        }
    }

    /// The command as one JSON text frame.
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("commands always serialize")
    }
}

/// A member of a room, as `joined` and `users` list them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct User {
    pub user_id: String,
    pub username: String,
}

/// A room message: `id` is the room's gap-free sequence number.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChatMessage {
    /// Read by [`wire_id`] (`5.0` is 5); `u64::MAX` when the server's is no message id: a `u64`
    /// past [`MAX_WIRE_ID`] (never a room's position: `RoomSeq` drops it), or, through
    /// `ChatMessage::unordered` (crate-private), anything else (`"5"`, `2.5`, `-1`, absent: the
    /// event does not parse, but the echo of a send still acknowledges it). So a send's result
    /// never carries an id that is not one: `u64::MAX` is the JS and Python clients' -1. In a
    /// `history` reply, anything else is `u64::MAX` too (`ServerEvent::History`).
    #[serde(deserialize_with = "message_id")]
    pub id: u64,
    pub room: String,
    pub from: String,
    pub user_id: String,
    pub text: String,
    pub timestamp: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_msg_id: Option<String>,
}

/// A direct message.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DirectMessage {
    /// Tells this DM from the others (it comes once, whichever of your connections sent it).
    /// Read as a room message's [`ChatMessage::id`]: by [`wire_id`] (`5.0` is 5), else
    /// `u64::MAX` (never an `Event::Dm`; a `u64` past [`MAX_WIRE_ID`] parses as it, anything else
    /// does not parse, but the echo of a send still acknowledges it with that `id`).
    #[serde(deserialize_with = "message_id")]
    pub id: u64,
    pub from: String,
    pub user_id: String,
    pub to: String,
    pub text: String,
    pub timestamp: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_msg_id: Option<String>,
}

/// A user's first connection joined a room (`status` `online`) or the last left it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Presence {
    pub room: String,
    /// The username.
    pub user: String,
    pub user_id: String,
    pub status: String,
}

impl Presence {
    pub fn online(&self) -> bool {
        self.status == "online"
    }
}

/// A member started (`status: true`) or stopped typing.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Typing {
    pub room: String,
    /// The username.
    pub user: String,
    pub user_id: String,
    pub status: bool,
}

/// An event from the server (`{"type": ..., ...}`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ServerEvent {
    Welcome {
        user_id: String,
        username: String,
        #[serde(default)]
        authenticated: bool,
        #[serde(default)]
        auth_required: bool,
        /// Seconds between the server's pings, read by [`heartbeat_interval`] (a finite number
        /// > 0, at least 1, at most 86400; anything else is `None`, never a lost welcome).
        #[serde(default, deserialize_with = "lenient_heartbeat_interval")]
        heartbeat_interval: Option<f64>,
        /// How many kept DMs follow, read by [`wire_id`] (`2.0` is 2); anything but a whole number
        /// >= 0 (at most 2^53 - 1) is `None` (not a lost welcome).
        #[serde(default, deserialize_with = "lenient_count", skip_serializing_if = "Option::is_none")]
        dm_backlog: Option<u64>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        id: Option<RequestId>,
    },
    Joined {
        room: String,
        users: Vec<User>,
        /// The room's last message id, read by [`wire_id`] (a whole number >= 0, at most
        /// [`MAX_WIRE_ID`]); anything else, or absent, is `None`, never a lost `joined`.
        #[serde(default, deserialize_with = "lenient_last_id", skip_serializing_if = "Option::is_none")]
        last_id: Option<u64>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        recovered: Option<bool>,
        /// The name of the room's numbering, read by [`epoch`] (1-64 characters, none a
        /// control character); anything else, or absent (a server of the release before), is
        /// `None`: the epoch is not known, and none is sent back.
        #[serde(default, deserialize_with = "lenient_epoch", skip_serializing_if = "Option::is_none")]
        epoch: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        id: Option<RequestId>,
    },
    /// The reply to `leave`, or (with `reason`) the server removed this user from the room.
    Left {
        room: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        reason: Option<String>,
        /// The moderator's `user_id`, or `api`.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        by: Option<String>,
        /// A ban's end (Unix ms); absent or null: until lifted. Read by [`until_ms`]: an odd
        /// value is `None`, never a lost event.
        #[serde(default, deserialize_with = "lenient_until", skip_serializing_if = "Option::is_none")]
        until: Option<i64>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        note: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        id: Option<RequestId>,
    },
    /// Muted in `room` (absent: everywhere) until `until` (Unix ms; null: until lifted; read by
    /// [`until_ms`]: an odd value is `None`, never a lost event).
    Muted {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        room: Option<String>,
        #[serde(default, deserialize_with = "lenient_until", skip_serializing_if = "Option::is_none")]
        until: Option<i64>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        by: Option<String>,
    },
    Unmuted {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        room: Option<String>,
    },
    /// The reply to `kick`, `mute` or `unmute`.
    Moderated {
        action: String,
        room: String,
        user_id: String,
        /// The mute's end (Unix ms), read by [`until_ms`].
        #[serde(default, deserialize_with = "lenient_until", skip_serializing_if = "Option::is_none")]
        until: Option<i64>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        lifted: Option<bool>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        id: Option<RequestId>,
    },
    Message(ChatMessage),
    Dm(DirectMessage),
    Presence(Presence),
    Typing(Typing),
    Users {
        room: String,
        users: Vec<User>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        id: Option<RequestId>,
    },
    History {
        room: String,
        /// Each as a [`ChatMessage`], but one whose `id` is no message id (`"5"`, `2.5`, `-1`,
        /// `null`, absent: see [`wire_id`]) is kept with `id` `u64::MAX`, as the Python client
        /// keeps it with -1 and the JS client as it came: the reply still answers its request.
        #[serde(deserialize_with = "history_messages")]
        messages: Vec<ChatMessage>,
        /// Older messages within the `limit` were left out because the reply reached the server's
        /// byte bound (`HISTORY_MAX_BYTES`, 1 MiB). Read by [`json_true`]: only the JSON `true`
        /// is `true`; anything else, or absent, is `false`, never a lost reply.
        #[serde(default, deserialize_with = "lenient_true", skip_serializing_if = "std::ops::Not::not")]
        truncated: bool,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        id: Option<RequestId>,
    },
    Error {
        code: String,
        #[serde(default)]
        message: String,
        /// For `rate_limited`: the wait, read by [`retry_after_ms`] (a finite number >= 0,
        /// rounded up, at most a day; anything else is `None`, never a lost event).
        #[serde(default, deserialize_with = "lenient_retry_after_ms", skip_serializing_if = "Option::is_none")]
        retry_after_ms: Option<u64>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        id: Option<RequestId>,
        /// Anything else the error carries (`room`, `reason`, `until` for `forbidden` and `muted`).
        #[serde(flatten)]
        details: serde_json::Map<String, serde_json::Value>,
    },
    Pong {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        id: Option<RequestId>,
    },
    /// A type this library does not know yet (the protocol may grow).
    #[serde(other)]
    Unknown,
}

/// An `error` frame's essentials, for [`ServerEvent::parse`] when the whole event does not
/// parse: a plain struct skips the fields it does not name without reading their numbers.
#[derive(Deserialize)]
struct BareError {
    #[serde(rename = "type")]
    kind: String,
    code: String,
    #[serde(default)]
    message: String,
    #[serde(default)]
    id: Option<RequestId>,
}

/// A room message's fields but `id`, for [`ChatMessage::unordered`] when the whole event does
/// not parse because of its `id` (`2.5`, `"7"`, `null`, `-1`, `1e400`, absent): as [`BareError`].
#[derive(Deserialize)]
struct BareMessage {
    #[serde(rename = "type")]
    kind: String,
    room: String,
    from: String,
    user_id: String,
    text: String,
    timestamp: i64,
    #[serde(default)]
    client_msg_id: Option<String>,
}

impl ChatMessage {
    /// A `message` frame that does not parse because its `id` is not a message id (see
    /// [`wire_id`]), with `id` `u64::MAX`: never a position (`RoomSeq` drops it), as Python's
    /// -1. Only for the echo of a send: its `client_msg_id` still acknowledges the send, as in
    /// the JS and Python clients (the server stored it), instead of the send being written
    /// again until it times out. `None` for any other frame.
    pub(crate) fn unordered(text: &str) -> Option<ChatMessage> {
        let bare = serde_json::from_str::<BareMessage>(text).ok().filter(|b| b.kind == "message")?;
        let BareMessage { room, from, user_id, text, timestamp, client_msg_id, .. } = bare;
        Some(ChatMessage { id: u64::MAX, room, from, user_id, text, timestamp, client_msg_id })
    }
}

/// A direct message's fields but `id`, for [`DirectMessage::unordered`]: as [`BareMessage`].
#[derive(Deserialize)]
struct BareDm {
    #[serde(rename = "type")]
    kind: String,
    from: String,
    user_id: String,
    to: String,
    text: String,
    timestamp: i64,
    #[serde(default)]
    client_msg_id: Option<String>,
}

impl DirectMessage {
    /// A `dm` frame that does not parse because its `id` is not a message id (see [`wire_id`]),
    /// with `id` `u64::MAX`, as [`ChatMessage::unordered`]: never an `Event::Dm` (its id could
    /// not tell it from another DM), only the acknowledgement of the send it echoes. `None` for
    /// any other frame.
    pub(crate) fn unordered(text: &str) -> Option<DirectMessage> {
        let bare = serde_json::from_str::<BareDm>(text).ok().filter(|b| b.kind == "dm")?;
        let BareDm { from, user_id, to, text, timestamp, client_msg_id, .. } = bare;
        Some(DirectMessage { id: u64::MAX, from, user_id, to, text, timestamp, client_msg_id })
    }
}

/// A `welcome`'s essentials, for [`ServerEvent::parse`] when the whole event does not parse
/// (a number `serde_json` cannot hold, `"heartbeat_interval": 1e400`): as [`BareError`].
#[derive(Deserialize)]
struct BareWelcome {
    #[serde(rename = "type")]
    kind: String,
    user_id: String,
    username: String,
    #[serde(default)]
    authenticated: bool,
    #[serde(default)]
    auth_required: bool,
    #[serde(default)]
    id: Option<RequestId>,
}

/// A `welcome`'s `dm_backlog` alone, for [`ServerEvent::parse`] when the whole welcome does not
/// parse: the fields it does not name (the unreadable `heartbeat_interval`) are skipped without
/// reading their numbers, so the `dm_backlog` a server with persistence sent is kept (without
/// it the client forgets the DM ids it saw, and a page of kept DMs coming again is doubled).
#[derive(Deserialize)]
struct BareBacklog {
    #[serde(default, deserialize_with = "lenient_count")]
    dm_backlog: Option<u64>,
}

/// A `joined`'s fields but `last_id`, for [`ServerEvent::parse`] when the whole event does not
/// parse (a number `serde_json` cannot hold, `"last_id": 1e400`): as [`BareError`]; the event is
/// kept, with `last_id` `None`.
#[derive(Deserialize)]
struct BareJoined {
    #[serde(rename = "type")]
    kind: String,
    room: String,
    users: Vec<User>,
    #[serde(default)]
    recovered: Option<bool>,
    #[serde(default, deserialize_with = "lenient_epoch")]
    epoch: Option<String>,
    #[serde(default)]
    id: Option<RequestId>,
}

/// A `history`'s fields but `truncated`, for [`ServerEvent::parse`] when the whole event does not
/// parse (a number `serde_json` cannot hold, `"truncated": 1e400`): as [`BareError`]; the reply is
/// kept, with `truncated` `false` (only the JSON `true` is `true`).
#[derive(Deserialize)]
struct BareHistory {
    #[serde(rename = "type")]
    kind: String,
    room: String,
    #[serde(deserialize_with = "history_messages")]
    messages: Vec<ChatMessage>,
    #[serde(default)]
    id: Option<RequestId>,
}

/// A `left`, `muted` or `moderated` event's fields but `until`, for [`ServerEvent::parse`] when the
/// whole event does not parse (a number `serde_json` cannot hold, `"until": 1e400`): as
/// [`BareError`]; the event is kept, with `until` `None`.
#[derive(Deserialize)]
struct BareUntil {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    room: Option<String>,
    #[serde(default)]
    reason: Option<String>,
    #[serde(default)]
    by: Option<String>,
    #[serde(default)]
    note: Option<String>,
    #[serde(default)]
    action: Option<String>,
    #[serde(default)]
    user_id: Option<String>,
    #[serde(default)]
    lifted: Option<bool>,
    #[serde(default)]
    id: Option<RequestId>,
}

impl BareUntil {
    /// The event, with no `until`; `None` if it is not one of the three or lacks a required field.
    fn event(self) -> Option<ServerEvent> {
        let BareUntil { kind, room, reason, by, note, action, user_id, lifted, id } = self;
        match kind.as_str() {
            "left" => Some(ServerEvent::Left { room: room?, reason, by, until: None, note, id }),
            "muted" => Some(ServerEvent::Muted { room, until: None, by }),
            "moderated" => Some(ServerEvent::Moderated {
                action: action?,
                room: room?,
                user_id: user_id?,
                until: None,
                lifted,
                id,
            }),
            _ => None,
        }
    }
}

/// The shortest and longest `heartbeat_interval` taken from a `welcome`, seconds.
pub const HEARTBEAT_MIN: f64 = 1.0;
pub const HEARTBEAT_MAX: f64 = 86_400.0;

/// The interval a `welcome` event's `heartbeat_interval` asks for, in seconds, or `None` for
/// none (as if absent: the driver keeps its default, 30 s), with the rule the three client
/// libraries (Rust, JS, Python) share, tested by each against the same cases
/// (`clients/conformance/heartbeat-interval.json`; the rule: `clients/conformance/README.md`):
/// only a JSON number that is finite and > 0 counts (a string such as `"30"`, a boolean,
/// `null`, `0`, a negative are none); it is floored at a second (`HEARTBEAT_MIN`) and capped
/// at a day (`HEARTBEAT_MAX`), so `Duration::from_secs_f64` (which panics past `u64::MAX`
/// seconds, `1e20`) and `Instant + Duration` always get a value in range.
pub fn heartbeat_interval(value: &serde_json::Value) -> Option<f64> {
    let serde_json::Value::Number(n) = value else { return None };
    // serde_json reads an integer past u64 as a float too; a JSON number is never NaN or infinite.
    n.as_f64().filter(|s| s.is_finite() && *s > 0.0).map(|s| s.clamp(HEARTBEAT_MIN, HEARTBEAT_MAX))
}

/// `heartbeat_interval` as any JSON value, read by [`heartbeat_interval`]: an odd value is none,
/// never a failure of the whole `welcome`.
fn lenient_heartbeat_interval<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<f64>, D::Error> {
    Ok(heartbeat_interval(&serde_json::Value::deserialize(d)?))
}

/// A count (`dm_backlog`) as any JSON value, read by [`wire_id`] (the number's value counts:
/// `2.0` is 2, as in the JS and Python clients, which took it for persistence while this client
/// did not), else `None`.
fn lenient_count<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    Ok(wire_id(&serde_json::Value::deserialize(d)?))
}

/// The wait an `error` event's `retry_after_ms` asks for, in whole ms, or `None` for none, with
/// the rule the three client libraries (Rust, JS, Python) share, tested by each against the same
/// cases (`clients/conformance/retry-after-ms.json`; the rule: `clients/conformance/README.md`):
/// only a JSON number that is finite and >= 0 counts (a string such as `"5"`, a boolean, `null`,
/// a negative are none: the default wait applies); a fraction is rounded up (never shorter than
/// asked); the wait is capped at a day (`RETRY_AFTER_CAP`, as for `Retry-After`), so
/// `u64::MAX` never reaches `Instant + Duration` (which panics on overflow).
pub fn retry_after_ms(value: &serde_json::Value) -> Option<u64> {
    let cap = RETRY_AFTER_CAP.as_millis() as u64;
    let serde_json::Value::Number(n) = value else { return None };
    if let Some(ms) = n.as_u64() {
        return Some(ms.min(cap));
    }
    if let Some(ms) = n.as_i64() {
        return u64::try_from(ms).ok().map(|ms| ms.min(cap));
    }
    // A float (serde_json reads an integer past u64 as one too); never NaN or infinite.
    n.as_f64().filter(|ms| ms.is_finite() && *ms >= 0.0).map(|ms| ms.ceil().min(cap as f64) as u64)
}

/// `retry_after_ms` as any JSON value, read by [`retry_after_ms`]: an odd value is no wait,
/// never a failure of the whole `error` event.
fn lenient_retry_after_ms<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    Ok(retry_after_ms(&serde_json::Value::deserialize(d)?))
}

/// The largest message id taken from the wire: 2^53 - 1, JS's largest safe integer, so that a
/// room's position + 1 is exact in the three client libraries.
pub const MAX_WIRE_ID: u64 = (1 << 53) - 1;

/// A message id from the wire (a `joined`'s `last_id`, a `message`'s `id`), or `None` for none,
/// with the rule the three client libraries (Rust, JS, Python) share, tested by each against
/// the same cases (`clients/conformance/last-id.json`; the rule: `clients/conformance/README.md`):
/// only a JSON number that is a whole number >= 0 and at most [`MAX_WIRE_ID`] counts (`5.0` and
/// `1e2` are 5 and 100: JS cannot tell them apart); a string such as `"5"`, a boolean, `null`, a
/// negative, a fraction, `2^53` or `u64::MAX` are none (the last overflowed `last + 1`).
pub fn wire_id(value: &serde_json::Value) -> Option<u64> {
    let serde_json::Value::Number(n) = value else { return None };
    if let Some(id) = n.as_u64() {
        return Some(id).filter(|id| *id <= MAX_WIRE_ID);
    }
    if n.is_i64() {
        return None; // below 0
    }
    // A float (serde_json reads an integer past u64 as one too); never NaN or infinite. `-0.0` is 0.
    const RANGE: std::ops::RangeInclusive<f64> = 0.0..=(MAX_WIRE_ID as f64);
    n.as_f64().filter(|f| f.fract() == 0.0 && RANGE.contains(f)).map(|f| f as u64)
}

/// `last_id` as any JSON value, read by [`wire_id`]: an odd value is none, never a failure of the
/// whole `joined` (`1e400`, which `serde_json` cannot read at all, is handled by
/// [`ServerEvent::parse`]).
fn lenient_last_id<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    Ok(wire_id(&serde_json::Value::deserialize(d)?))
}

/// The longest `epoch` the server takes in a `join` (its `MAX_ID_CHARS`), in characters.
pub const MAX_EPOCH_CHARS: usize = 64;

/// A `joined`'s `epoch` (the name of the room's numbering), or `None` for none: only a string of
/// 1 to [`MAX_EPOCH_CHARS`] characters, none of them a control character (U+0000-U+001F,
/// U+007F), counts, the server's rule for the `epoch` of a `join`. Anything else is not sent back
/// with a re-join: the server would refuse that `join` (`invalid_message`), and the room with it.
pub fn epoch(value: &serde_json::Value) -> Option<String> {
    let serde_json::Value::String(s) = value else { return None };
    valid_epoch(s).then(|| s.clone())
}

/// Whether `s` is an `epoch` the server takes in a `join` (the rule of [`epoch`]): the check of
/// one an app passes to [`Client::join_from`](crate::Client::join_from), before anything is sent.
pub fn valid_epoch(s: &str) -> bool {
    let control = s.chars().any(|c| c <= '\u{1f}' || c == '\u{7f}');
    (1..=MAX_EPOCH_CHARS).contains(&s.chars().count()) && !control
}

/// `epoch` as any JSON value, read by [`epoch`]: an odd value is none, never a failure of the
/// whole `joined`.
fn lenient_epoch<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    Ok(epoch(&serde_json::Value::deserialize(d)?))
}

/// A message's `id`: an id by [`wire_id`] (`5.0`, `-0`), or `u64::MAX` for any `u64` past
/// [`MAX_WIRE_ID`] (it still parses, so the echo of a send acknowledges it; it never becomes a
/// position, and a send's result never carries it as if it were an id: the JS and Python
/// clients' -1). Anything else is an error: the message cannot be put in order.
fn message_id<'de, D: serde::Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
    let value = serde_json::Value::deserialize(d)?;
    wire_id(&value).or_else(|| value.as_u64().map(|_| u64::MAX)).ok_or_else(|| {
        serde::de::Error::custom(format_args!("a message id must be a whole number >= 0, not {value:.40}"))
    })
}

/// A message of a `history` reply: a [`ChatMessage`] whose `id` is read by [`wire_id`], anything
/// else (`"5"`, `2.5`, `-1`, `null`, absent, past 2^53 - 1) being `u64::MAX`, never a failure of
/// the whole reply (which left the `history` call waiting for its timeout).
#[derive(Deserialize)]
struct HistoryMessage {
    #[serde(default = "no_message_id", deserialize_with = "any_message_id")]
    id: u64,
    room: String,
    from: String,
    user_id: String,
    text: String,
    timestamp: i64,
    #[serde(default)]
    client_msg_id: Option<String>,
}

fn no_message_id() -> u64 {
    u64::MAX
}

fn any_message_id<'de, D: serde::Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
    Ok(wire_id(&serde_json::Value::deserialize(d)?).unwrap_or(u64::MAX))
}

/// A `history`'s `messages`, each read as a [`HistoryMessage`].
fn history_messages<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<ChatMessage>, D::Error> {
    let messages = Vec::<HistoryMessage>::deserialize(d)?;
    let message = |m: HistoryMessage| {
        let HistoryMessage { id, room, from, user_id, text, timestamp, client_msg_id } = m;
        ChatMessage { id, room, from, user_id, text, timestamp, client_msg_id }
    };
    Ok(messages.into_iter().map(message).collect())
}

/// An optional flag of the server's (`history`'s `truncated`), which it sends only as `true`:
/// only the JSON `true` counts, as the JS and Python clients read it (`=== true`, `is True`); a
/// string such as `"true"`, a number, `null` are `false`.
pub fn json_true(value: &serde_json::Value) -> bool {
    matches!(value, serde_json::Value::Bool(true))
}

/// A flag as any JSON value, read by [`json_true`]: an odd value is `false`, never a failure of
/// the whole event (`1e400`, which `serde_json` cannot read at all, is handled by
/// [`ServerEvent::parse`]).
fn lenient_true<'de, D: serde::Deserializer<'de>>(d: D) -> Result<bool, D::Error> {
    Ok(json_true(&serde_json::Value::deserialize(d)?))
}

/// A ban's or a mute's end (`until` of `left`, `muted`, `moderated`), Unix ms, or `None` (as if
/// null: until lifted), read tolerantly as `retry_after_ms` and `heartbeat_interval` are: a JSON
/// integer in `i64`'s range is itself; another finite number (`1.7e12`, `1700000000000.5`) is
/// rounded up to a whole ms (an end never earlier than the server's) if that is in `i64`'s range;
/// anything else (a string such as `"1700000000000"`, a boolean, `1e19`, an integer past
/// `i64::MAX`) is `None`, never a failure of the whole event (`1e400`, which `serde_json` cannot
/// read at all, is handled by [`ServerEvent::parse`]).
pub fn until_ms(value: &serde_json::Value) -> Option<i64> {
    let serde_json::Value::Number(n) = value else { return None };
    if let Some(ms) = n.as_i64() {
        return Some(ms);
    }
    if n.is_u64() {
        return None; // past i64::MAX
    }
    // A float (serde_json reads an integer past u64 as one too); never NaN or infinite.
    // `i64::MAX as f64` is 2^63, itself out of range.
    const RANGE: std::ops::Range<f64> = (i64::MIN as f64)..(i64::MAX as f64);
    n.as_f64().map(f64::ceil).filter(|ms| RANGE.contains(ms)).map(|ms| ms as i64)
}

/// `until` as any JSON value, read by [`until_ms`]: an odd value is none, never a failure of the
/// whole event.
fn lenient_until<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<i64>, D::Error> {
    Ok(until_ms(&serde_json::Value::deserialize(d)?))
}

impl ServerEvent {
    /// Parses one text frame.
    ///
    /// An `error` whose fields hold a number `serde_json` cannot read (`"retry_after_ms":
    /// 1e400`: out of a double's range) is still an error, with its `code`, `message` and
    /// `id` and no wait, so the refusal it answers is handled (a `rate_limited` send is
    /// retried) instead of the frame being dropped as unparsable.
    ///
    /// A `welcome` likewise (`"heartbeat_interval": 1e400`) is still the welcome, with its
    /// `user_id`, `username`, `authenticated`, `auth_required`, `dm_backlog` (if it can be read
    /// itself) and `id`, and no interval, so the connection comes up instead of waiting for a
    /// welcome it dropped, and a server with persistence is still known as one (the DM ids seen
    /// are kept across connections, as in the JS and Python clients, which read the frame whole).
    ///
    /// A `left`, `muted` or `moderated` likewise (`"until": 1e400`) is still that event, with
    /// no `until` (see [`until_ms`] for the values that are read).
    ///
    /// A `joined` likewise (`"last_id": 1e400`) is still the answer to its `join`, with no
    /// `last_id` (see [`wire_id`] for the values that are read).
    ///
    /// A `history` likewise (`"truncated": 1e400`) is still the answer to its request, with
    /// `truncated` `false` (see [`json_true`]).
    pub fn parse(text: &str) -> Result<ServerEvent, serde_json::Error> {
        serde_json::from_str(text)
            .or_else(|e| match serde_json::from_str::<BareError>(text) {
                Ok(bare) if bare.kind == "error" => Ok(ServerEvent::Error {
                    code: bare.code,
                    message: bare.message,
                    retry_after_ms: None,
                    id: bare.id,
                    details: Default::default(),
                }),
                _ => Err(e),
            })
            .or_else(|e| match serde_json::from_str::<BareWelcome>(text) {
                Ok(bare) if bare.kind == "welcome" => Ok(ServerEvent::Welcome {
                    user_id: bare.user_id,
                    username: bare.username,
                    authenticated: bare.authenticated,
                    auth_required: bare.auth_required,
                    heartbeat_interval: None,
                    // Read alone: unreadable itself (`1e400`), it is none, and the welcome stays.
                    dm_backlog: serde_json::from_str::<BareBacklog>(text).ok().and_then(|b| b.dm_backlog),
                    id: bare.id,
                }),
                _ => Err(e),
            })
            .or_else(|e| match serde_json::from_str::<BareJoined>(text) {
                Ok(bare) if bare.kind == "joined" => Ok(ServerEvent::Joined {
                    room: bare.room,
                    users: bare.users,
                    last_id: None,
                    recovered: bare.recovered,
                    epoch: bare.epoch,
                    id: bare.id,
                }),
                _ => Err(e),
            })
            .or_else(|e| match serde_json::from_str::<BareHistory>(text) {
                Ok(bare) if bare.kind == "history" => {
                    Ok(ServerEvent::History { room: bare.room, messages: bare.messages, truncated: false, id: bare.id })
                }
                _ => Err(e),
            })
            .or_else(|e| serde_json::from_str::<BareUntil>(text).ok().and_then(BareUntil::event).ok_or(e))
    }

    /// The request `id` this event answers, if it is a direct reply.
    pub fn request_id(&self) -> Option<&RequestId> {
        match self {
            ServerEvent::Welcome { id, .. }
            | ServerEvent::Joined { id, .. }
            | ServerEvent::Left { id, .. }
            | ServerEvent::Users { id, .. }
            | ServerEvent::History { id, .. }
            | ServerEvent::Error { id, .. }
            | ServerEvent::Moderated { id, .. }
            | ServerEvent::Pong { id } => id.as_ref(),
            _ => None,
        }
    }
}

/// What a close code tells the client to do next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloseAction {
    /// The server is going away (1001): reconnect at once (with a little jitter).
    ReconnectNow,
    /// Reconnect with the usual backoff (1006, 4100, unknown codes).
    Reconnect,
    /// Reconnect after a longer pause (4101 slow consumer, 4102 flooding).
    ReconnectAfterPause,
    /// 4001/4002: reconnect only with a fresh token (needs a token callback).
    NeedsFreshToken,
    /// 1002/1003/1007/1009: this client sent something invalid; retrying repeats it.
    /// 1008 (policy), 4003 (the server's API disconnected the user, or banned it
    /// everywhere) and other 40xx codes: not again with the same credentials.
    Terminal,
}

/// Classifies a close code (`None`: the connection dropped without a close frame, 1006).
pub fn close_action(code: Option<u16>) -> CloseAction {
    match code {
        Some(1001) => CloseAction::ReconnectNow,
        Some(4001 | 4002) => CloseAction::NeedsFreshToken,
        // 40xx: "not with the same credentials" (4003: the server's API disconnected the user).
        Some(1002 | 1003 | 1007 | 1008 | 1009 | 4000..=4099) => CloseAction::Terminal,
        Some(4101 | 4102) => CloseAction::ReconnectAfterPause,
        _ => CloseAction::Reconnect,
    }
}

/// Classifies the HTTP status of a refused upgrade, as the Python and TypeScript clients do:
/// 401 (the token) needs a fresh token; 408, 429 and 5xx (busy, full, draining, Redis away)
/// are retried, not before their `Retry-After`; any other answer (403: origin not allowed,
/// 400: a malformed request or username, 404: no such endpoint, ...) will not change by
/// retrying: terminal.
pub fn refusal_action(status: u16) -> CloseAction {
    match status {
        401 => CloseAction::NeedsFreshToken,
        408 | 429 | 500..=599 => CloseAction::Reconnect,
        _ => CloseAction::Terminal,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn round_trip_command(cmd: ClientCommand, wire: serde_json::Value) {
        let text = cmd.to_json();
        let value: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(value, wire);
        let back: ClientCommand = serde_json::from_value(wire).unwrap();
        assert_eq!(back, cmd);
    }

    #[test]
    fn commands_serialize_as_the_readme_says() {
        round_trip_command(
            ClientCommand::Join { room: "general".into(), since: Some(7), epoch: None, id: Some(RequestId::Int(3)) },
            json!({"type": "join", "room": "general", "since": 7, "id": 3}),
        );
        round_trip_command(
            ClientCommand::Join { room: "r".into(), since: Some(7), epoch: Some("e1".into()), id: None },
            json!({"type": "join", "room": "r", "since": 7, "epoch": "e1"}),
        );
        round_trip_command(
            ClientCommand::Join { room: "general".into(), since: None, epoch: None, id: None },
            json!({"type": "join", "room": "general"}),
        );
        round_trip_command(
            ClientCommand::Message {
                room: "r".into(),
                text: "hi".into(),
                client_msg_id: Some("c1".into()),
                id: Some(RequestId::Str("x".into())),
            },
            json!({"type": "message", "room": "r", "text": "hi", "client_msg_id": "c1", "id": "x"}),
        );
        round_trip_command(
            ClientCommand::Dm { to: "u1".into(), text: "yo".into(), client_msg_id: None, id: None },
            json!({"type": "dm", "to": "u1", "text": "yo"}),
        );
        round_trip_command(
            ClientCommand::ListUsers { room: "r".into(), id: Some(RequestId::Int(1)) },
            json!({"type": "list_users", "room": "r", "id": 1}),
        );
        round_trip_command(
            ClientCommand::History { room: "r".into(), limit: Some(10), before: Some(5), id: None },
            json!({"type": "history", "room": "r", "limit": 10, "before": 5}),
        );
        round_trip_command(
            ClientCommand::Typing { room: "r".into(), status: true },
            json!({"type": "typing", "room": "r", "status": true}),
        );
        round_trip_command(ClientCommand::Auth { token: "t".into(), id: None }, json!({"type": "auth", "token": "t"}));
        round_trip_command(ClientCommand::Leave { room: "r".into(), id: None }, json!({"type": "leave", "room": "r"}));
        round_trip_command(ClientCommand::Ping { id: None }, json!({"type": "ping"}));
        round_trip_command(
            ClientCommand::Kick { room: "r".into(), user_id: "u".into(), reason: Some("spam".into()), id: None },
            json!({"type": "kick", "room": "r", "user_id": "u", "reason": "spam"}),
        );
        round_trip_command(
            ClientCommand::Mute { room: "r".into(), user_id: "u".into(), duration: Some(60.0), id: None },
            json!({"type": "mute", "room": "r", "user_id": "u", "duration": 60.0}),
        );
        round_trip_command(
            ClientCommand::Unmute { room: "r".into(), user_id: "u".into(), id: Some(RequestId::Int(2)) },
            json!({"type": "unmute", "room": "r", "user_id": "u", "id": 2}),
        );
        round_trip_command(
            ClientCommand::ListUsers { room: "r".into(), id: None }.with_id(RequestId::Int(7)),
            json!({"type": "list_users", "room": "r", "id": 7}),
        );
    }

    #[test]
    fn server_events_parse_and_round_trip() {
        let cases = [
            json!({"type": "welcome", "user_id": "u", "username": "n", "authenticated": true,
                   "auth_required": false, "heartbeat_interval": 30.0}),
            json!({"type": "joined", "room": "r", "users": [{"user_id": "u", "username": "n"}],
                   "last_id": 4, "recovered": true, "id": 2}),
            json!({"type": "message", "id": 5, "room": "r", "from": "n", "user_id": "u",
                   "text": "hi", "timestamp": 1700000000000_i64, "client_msg_id": "c"}),
            json!({"type": "dm", "id": 1, "from": "n", "user_id": "u", "to": "v", "text": "x",
                   "timestamp": 1}),
            json!({"type": "presence", "room": "r", "user": "n", "user_id": "u", "status": "online"}),
            json!({"type": "typing", "room": "r", "user": "n", "user_id": "u", "status": false}),
            json!({"type": "users", "room": "r", "users": []}),
            json!({"type": "history", "room": "r", "messages": []}),
            json!({"type": "error", "code": "rate_limited", "message": "slow down",
                   "retry_after_ms": 120, "id": "a"}),
            json!({"type": "left", "room": "r"}),
            json!({"type": "left", "room": "r", "reason": "banned", "by": "api", "until": 5, "note": "n"}),
            json!({"type": "muted", "room": "r", "until": 1700000000000_i64, "by": "mod"}),
            json!({"type": "unmuted"}),
            json!({"type": "moderated", "action": "mute", "room": "r", "user_id": "u", "until": 9, "id": 4}),
            json!({"type": "error", "code": "forbidden", "message": "m", "room": "r", "reason": "banned",
                   "until": null}),
            json!({"type": "pong"}),
        ];
        for wire in cases {
            let event = ServerEvent::parse(&wire.to_string()).unwrap();
            assert_ne!(event, ServerEvent::Unknown, "{wire}");
            let back = serde_json::to_value(&event).unwrap();
            assert_eq!(back, wire);
        }
    }

    /// The three client libraries read an error's `retry_after_ms` by one rule (the shared
    /// cases, `clients/conformance/retry-after-ms.json`), and an odd value never loses the
    /// event: `120.5` or `1e20` made the whole frame unparsable (the refusal it answered was
    /// never handled), `u64::MAX` became a wait that overflows `Instant + Duration`.
    #[test]
    fn retry_after_ms_reads_as_in_the_js_and_python_clients() {
        let shared: serde_json::Value =
            serde_json::from_str(include_str!("../../conformance/retry-after-ms.json")).unwrap();
        assert_eq!(shared["cap"].as_u64(), Some(86_400_000));
        let mut wrong = Vec::new();
        for case in shared["cases"].as_array().unwrap() {
            let (text, wait) = (case[0].as_str().unwrap(), case[1].as_u64());
            let frame = format!(
                r#"{{"type": "error", "code": "rate_limited", "message": "slow down", "retry_after_ms": {text}, "id": 7}}"#
            );
            match ServerEvent::parse(&frame) {
                Ok(ServerEvent::Error { code, retry_after_ms, id: Some(RequestId::Int(7)), .. })
                    if code == "rate_limited" && retry_after_ms == wait => {}
                got => wrong.push(format!("{text:.40}: {got:?}, not {wait:?}")),
            }
        }
        assert!(wrong.is_empty(), "{wrong:#?}");
    }

    /// The three client libraries read a welcome's `heartbeat_interval` by one rule (the shared
    /// cases, `clients/conformance/heartbeat-interval.json`), and an odd value never loses the
    /// welcome: a string or `1e400` made the whole frame unparsable (never connected), `1e20`
    /// went to `Duration::from_secs_f64`, which panicked in the driver.
    #[test]
    fn heartbeat_interval_reads_as_in_the_js_and_python_clients() {
        let shared: serde_json::Value =
            serde_json::from_str(include_str!("../../conformance/heartbeat-interval.json")).unwrap();
        assert_eq!((shared["min"].as_f64(), shared["max"].as_f64()), (Some(1.0), Some(86_400.0)));
        let mut wrong = Vec::new();
        for case in shared["cases"].as_array().unwrap() {
            let (text, seconds) = (case[0].as_str().unwrap(), case[1].as_f64());
            let frame = format!(
                r#"{{"type": "welcome", "user_id": "u", "username": "n", "authenticated": true, "auth_required": false, "heartbeat_interval": {text}, "dm_backlog": 2, "id": 7}}"#
            );
            match ServerEvent::parse(&frame) {
                Ok(ServerEvent::Welcome {
                    user_id,
                    authenticated: true,
                    heartbeat_interval,
                    id: Some(RequestId::Int(7)),
                    dm_backlog: Some(2),
                    ..
                }) if user_id == "u" && heartbeat_interval == seconds => {}
                got => wrong.push(format!("{text:.40}: {got:?}, not {seconds:?} with dm_backlog 2")),
            }
        }
        assert!(wrong.is_empty(), "{wrong:#?}");
        // A `dm_backlog` that cannot be read itself (`1e400`) is none; the welcome still comes.
        let frame =
            r#"{"type": "welcome", "user_id": "u", "username": "n", "heartbeat_interval": 1e400, "dm_backlog": 1e400}"#;
        assert!(
            matches!(
                ServerEvent::parse(frame),
                Ok(ServerEvent::Welcome { heartbeat_interval: None, dm_backlog: None, .. })
            ),
            "{:?}",
            ServerEvent::parse(frame)
        );
    }

    /// A welcome's `dm_backlog` is read by the rule of ids (`clients/conformance/last-id.json`:
    /// the number's value counts, `2.0` is 2), whatever else the welcome holds: `2.0` was `None`,
    /// no persistence, while the JS and Python clients took it for persistence.
    #[test]
    fn dm_backlog_is_read_by_the_rule_of_ids() {
        let shared: serde_json::Value = serde_json::from_str(include_str!("../../conformance/last-id.json")).unwrap();
        let mut wrong = Vec::new();
        for case in shared["cases"].as_array().unwrap() {
            let (text, want) = (case[0].as_str().unwrap(), case[1].as_u64());
            for interval in ["30", "1e400"] {
                let frame = format!(
                    r#"{{"type": "welcome", "user_id": "u", "username": "n", "heartbeat_interval": {interval}, "dm_backlog": {text}}}"#
                );
                match ServerEvent::parse(&frame) {
                    Ok(ServerEvent::Welcome { dm_backlog, .. }) if dm_backlog == want => {}
                    got => wrong.push(format!("{text:.40} ({interval}): {got:?}, not {want:?}")),
                }
            }
        }
        assert!(wrong.is_empty(), "{wrong:#?}");
    }

    /// The three client libraries read a joined's `last_id` by one rule (the shared cases,
    /// `clients/conformance/last-id.json`: a whole number >= 0, at most 2^53 - 1), and an odd
    /// value never loses the event: `"5"`, `2.5`, `-1`, `null` or `1e400` made the whole
    /// `joined` unparsable (the join it answers timed out, the room stayed joining), and
    /// `2^53`, `u64::MAX` were taken (`last + 1` then overflowed: a panic in the driver).
    #[test]
    fn last_id_reads_as_in_the_js_and_python_clients() {
        let shared: serde_json::Value = serde_json::from_str(include_str!("../../conformance/last-id.json")).unwrap();
        assert_eq!(shared["max"].as_u64(), Some(9_007_199_254_740_991));
        let mut wrong = Vec::new();
        for case in shared["cases"].as_array().unwrap() {
            let (text, want) = (case[0].as_str().unwrap(), case[1].as_u64());
            let frame = format!(
                r#"{{"type": "joined", "room": "r", "users": [{{"user_id": "u", "username": "n"}}], "last_id": {text}, "recovered": false, "id": 7}}"#
            );
            match ServerEvent::parse(&frame) {
                Ok(event @ ServerEvent::Joined { recovered: Some(false), id: Some(RequestId::Int(7)), .. })
                    if serde_json::to_value(&event).unwrap()["last_id"].as_u64() == want
                        && serde_json::to_value(&event).unwrap()["users"][0]["user_id"] == "u" => {}
                got => wrong.push(format!("{text:.40}: {got:?}, not {want:?}")),
            }
        }
        // Absent: none too, and still the joined.
        match ServerEvent::parse(r#"{"type": "joined", "room": "r", "users": [], "id": 7}"#) {
            Ok(event @ ServerEvent::Joined { .. }) if serde_json::to_value(&event).unwrap()["last_id"].is_null() => {}
            got => wrong.push(format!("absent: {got:?}")),
        }
        assert!(wrong.is_empty(), "{wrong:#?}");
    }

    /// A joined's `epoch` is taken only as the server's rule for a join's `epoch` has it (a string
    /// of 1-64 characters, none a control character), so a re-join never sends one the server
    /// refuses (`invalid_message`, which would lose the room); anything else, or absent (a server
    /// of the release before), is `None` and never loses the `joined`, also with a `last_id`
    /// `serde_json` cannot read.
    #[test]
    fn epoch_reads_only_what_a_join_may_send_back() {
        let long = "e".repeat(64);
        let cases: &[(String, Option<&str>)] = &[
            (r#""Xy-9_ab""#.into(), Some("Xy-9_ab")),
            (format!(r#""{long}""#), Some(&long)),
            (r#""ééé""#.into(), Some("ééé")), // characters, not bytes
            (format!(r#""{long}e""#), None),
            (r#""""#.into(), None),
            (r#""a\nb""#.into(), None),
            (r#""a\u007fb""#.into(), None),
            (r#""\u0000""#.into(), None),
            ("5".into(), None),
            ("null".into(), None),
            ("true".into(), None),
            (r#"["e"]"#.into(), None),
        ];
        let mut wrong = Vec::new();
        for (raw, want) in cases {
            for last_id in ["3", "1e400"] {
                let frame = format!(
                    r#"{{"type": "joined", "room": "r", "users": [], "last_id": {last_id}, "recovered": false, "epoch": {raw}, "id": 7}}"#
                );
                match ServerEvent::parse(&frame) {
                    Ok(ServerEvent::Joined { epoch, recovered: Some(false), id: Some(RequestId::Int(7)), .. })
                        if epoch.as_deref() == *want => {}
                    got => wrong.push(format!("epoch {raw}, last_id {last_id}: {got:?}, not {want:?}")),
                }
            }
        }
        match ServerEvent::parse(r#"{"type": "joined", "room": "r", "users": [], "last_id": 3}"#) {
            Ok(ServerEvent::Joined { epoch: None, last_id: Some(3), .. }) => {}
            got => wrong.push(format!("absent: {got:?}")),
        }
        assert!(wrong.is_empty(), "{wrong:#?}");
    }

    /// A room message's `id` by the same rule: an id that counts is the message's, whatever its
    /// spelling (`5.0`, `1e2`, `-0` used to make the message unparsable); anything else is not a
    /// position: unparsable as before (`"5"`, `2.5`, `-1`, `1e400`), or a `u64` past 2^53 - 1,
    /// read as `u64::MAX` (the room's bookkeeping drops it, `RoomSeq::message`; it used to be
    /// that `u64`, which a send's result then carried as if it were an id).
    #[test]
    fn message_ids_read_as_in_the_js_and_python_clients() {
        let shared: serde_json::Value = serde_json::from_str(include_str!("../../conformance/last-id.json")).unwrap();
        let mut wrong = Vec::new();
        for case in shared["cases"].as_array().unwrap() {
            let (text, want) = (case[0].as_str().unwrap(), case[1].as_u64());
            let frame = format!(
                r#"{{"type": "message", "id": {text}, "room": "r", "from": "n", "user_id": "u", "text": "t", "timestamp": 1}}"#
            );
            match (ServerEvent::parse(&frame), want) {
                (Ok(ServerEvent::Message(m)), Some(want)) if m.id == want => {}
                (Ok(ServerEvent::Message(m)), None) if m.id == u64::MAX => {}
                (Err(_), None) => {}
                (got, _) => wrong.push(format!("{text:.40}: {got:?}, not {want:?}")),
            }
        }
        assert!(wrong.is_empty(), "{wrong:#?}");
    }

    /// A ban's or a mute's `until` (Unix ms) that is not a whole number in `i64`'s range never
    /// loses the event: a finite number is rounded up to a whole ms (never an earlier end than the
    /// server's) if that is in range, anything else (a string, a boolean, `1e19`, `1e400`) is
    /// `None`, and the rest of the `left`, `muted` or `moderated` is kept. `1.7e12` or
    /// `1700000000000.5` made the whole frame unparsable: the removal was dropped as
    /// `invalid_event` (the room stayed "joined"), and a `mute()` waited for a reply that had come.
    #[test]
    fn an_odd_until_is_none_or_rounded_and_the_event_is_kept() {
        let cases: &[(&str, Option<i64>)] = &[
            ("1700000000000", Some(1_700_000_000_000)),
            ("null", None),
            ("1.7e12", Some(1_700_000_000_000)),
            ("1700000000000.5", Some(1_700_000_000_001)),
            ("1700000000000.0", Some(1_700_000_000_000)),
            ("-1.5", Some(-1)),
            ("-5", Some(-5)),
            ("0", Some(0)),
            ("1e-300", Some(1)),
            ("9223372036854775807", Some(i64::MAX)),
            ("-9223372036854775808", Some(i64::MIN)),
            ("9223372036854775808", None),
            ("18446744073709551615", None),
            ("1e19", None),
            ("-1e19", None),
            ("1e300", None),
            ("1e400", None),
            ("-1e400", None),
            ("\"1700000000000\"", None),
            ("true", None),
            ("[1]", None),
            ("{\"ms\": 1}", None),
        ];
        let mut wrong = Vec::new();
        for &(raw, until) in cases {
            let left = format!(
                r#"{{"type": "left", "room": "r", "reason": "banned", "by": "api", "until": {raw}, "note": "n"}}"#
            );
            let want = ServerEvent::Left {
                room: "r".into(),
                reason: Some("banned".into()),
                by: Some("api".into()),
                until,
                note: Some("n".into()),
                id: None,
            };
            let muted = format!(r#"{{"type": "muted", "room": "r", "until": {raw}, "by": "mod"}}"#);
            let want_muted = ServerEvent::Muted { room: Some("r".into()), until, by: Some("mod".into()) };
            let moderated = format!(
                r#"{{"type": "moderated", "action": "mute", "room": "r", "user_id": "u", "until": {raw}, "lifted": false, "id": 4}}"#
            );
            let want_moderated = ServerEvent::Moderated {
                action: "mute".into(),
                room: "r".into(),
                user_id: "u".into(),
                until,
                lifted: Some(false),
                id: Some(RequestId::Int(4)),
            };
            for (frame, want) in [(left, want), (muted, want_muted), (moderated, want_moderated)] {
                match ServerEvent::parse(&frame) {
                    Ok(got) if got == want => {}
                    got => wrong.push(format!("{frame}: {got:?}, not until {until:?}")),
                }
            }
        }
        assert!(wrong.is_empty(), "{wrong:#?}");
    }

    /// A `history`'s `truncated` (older messages left out for the reply's byte bound) is read as
    /// the JS and Python clients read it: only the JSON `true` is `true`; anything else, or absent,
    /// is `false`, and the reply is kept (`1e400` too), never dropped as `invalid_event`, which
    /// would leave the request waiting for its timeout. It is written only when `true`.
    #[test]
    fn a_history_s_truncated_is_true_only_for_the_json_true() {
        let message = json!({"type": "message", "id": 7, "room": "r", "from": "n", "user_id": "u",
                             "text": "x", "timestamp": 1});
        let cases: &[(&str, bool)] = &[
            ("true", true),
            ("false", false),
            ("\"true\"", false),
            ("1", false),
            ("0", false),
            ("null", false),
            ("[true]", false),
            ("{\"truncated\": true}", false),
            ("1e400", false),
        ];
        let mut wrong = Vec::new();
        for &(raw, truncated) in cases {
            let frame =
                format!(r#"{{"type": "history", "room": "r", "messages": [{message}], "truncated": {raw}, "id": 3}}"#);
            match ServerEvent::parse(&frame) {
                Ok(ServerEvent::History { room, messages, truncated: got, id: Some(RequestId::Int(3)) })
                    if room == "r" && messages.len() == 1 && messages[0].id == 7 && got == truncated => {}
                got => wrong.push(format!("{raw}: {got:?}, not truncated {truncated}")),
            }
        }
        assert!(wrong.is_empty(), "{wrong:#?}");
        let absent = ServerEvent::parse(r#"{"type": "history", "room": "r", "messages": []}"#).unwrap();
        assert!(matches!(absent, ServerEvent::History { truncated: false, .. }), "{absent:?}");
        let cut = json!({"type": "history", "room": "r", "messages": [], "truncated": true});
        let event: ServerEvent = serde_json::from_value(cut.clone()).unwrap();
        assert_eq!(serde_json::to_value(&event).unwrap(), cut);
    }

    #[test]
    fn unknown_types_and_reply_ids() {
        assert_eq!(ServerEvent::parse(r#"{"type": "future_thing", "x": 1}"#).unwrap(), ServerEvent::Unknown);
        let err = ServerEvent::parse(r#"{"type": "error", "code": "not_in_room", "message": "m", "id": 9}"#).unwrap();
        assert_eq!(err.request_id(), Some(&RequestId::Int(9)));
        // A message's own `id` is its sequence number, never a request id.
        let msg = ServerEvent::parse(
            r#"{"type": "message", "id": 9, "room": "r", "from": "n", "user_id": "u", "text": "t", "timestamp": 1}"#,
        )
        .unwrap();
        assert_eq!(msg.request_id(), None);
    }

    #[test]
    fn close_codes_split_into_reconnect_and_terminal() {
        assert_eq!(close_action(Some(1001)), CloseAction::ReconnectNow);
        for code in [1002, 1003, 1007, 1008, 1009, 4003, 4000, 4099] {
            assert_eq!(close_action(Some(code)), CloseAction::Terminal);
        }
        for code in [4001, 4002] {
            assert_eq!(close_action(Some(code)), CloseAction::NeedsFreshToken);
        }
        assert_eq!(close_action(Some(4100)), CloseAction::Reconnect);
        assert_eq!(close_action(None), CloseAction::Reconnect);
        assert_eq!(close_action(Some(1006)), CloseAction::Reconnect);
        assert_eq!(close_action(Some(4101)), CloseAction::ReconnectAfterPause);
        assert_eq!(close_action(Some(4102)), CloseAction::ReconnectAfterPause);
    }

    #[test]
    fn refused_upgrades_retry_only_what_may_change() {
        assert_eq!(refusal_action(401), CloseAction::NeedsFreshToken);
        for status in [408, 429, 500, 502, 503, 504] {
            assert_eq!(refusal_action(status), CloseAction::Reconnect, "{status}");
        }
        for status in [200, 301, 400, 403, 404, 405, 426] {
            assert_eq!(refusal_action(status), CloseAction::Terminal, "{status}");
        }
    }
}
