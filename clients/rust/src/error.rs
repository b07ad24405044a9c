//! The one error type of the library.

use std::fmt;

/// What went wrong with a request or the connection. `#[non_exhaustive]`: a later release
/// may add a kind of error without breaking a `match` that has a `_` arm.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The server answered with an `error` event; `code` is its wire code
    /// (`not_in_room`, `rate_limited`, `unavailable`, ... see the README).
    #[error("server error {code}: {message}")]
    Server {
        code: String,
        message: String,
        retry_after_ms: Option<u64>,
        /// What else the error carried (`room`, `reason`, `until` for `forbidden` and `muted`).
        details: serde_json::Map<String, serde_json::Value>,
    },
    /// No answer within the configured timeout. A `send`/`dm` that times out
    /// stays in the outbox and is still delivered (its echo arrives as an `Event::Ack`), or,
    /// refused for good later on (`muted`, `forbidden`, a room left), told by an `Event::Error`.
    #[error("no reply within the timeout")]
    Timeout,
    /// The outbox holds `outbox_capacity` unacknowledged sends already.
    #[error("the outbox is full")]
    OutboxFull,
    /// The token callback failed.
    #[error("token callback failed: {0}")]
    Token(String),
    /// The server closed with a code that forbids reconnecting (1002, 1003, 1007,
    /// 1009, 40xx, or 4001/4002 without a token callback), or refused the upgrade with
    /// an HTTP status retrying cannot change (`code` 403: origin not allowed, 400: a
    /// malformed request or username, 404: no such endpoint, ...; not 401, 408, 429, 5xx), or
    /// the URL is one no attempt can connect to (`code` `None`: `wss://` without TLS compiled
    /// in, a scheme other than `ws`/`wss`, no host, not a URL), or the server's TLS certificate
    /// failed verification before the client's first `welcome` (`code` 1015: a CA not trusted,
    /// another host name; the reason says which; once connected it is retried, told by an
    /// `Event::Error` with code `tls_certificate`).
    /// Every call waiting then, and every later one (`wait_connected` too), fails with it, but
    /// for [`Client::leave`](crate::Client::leave), which resolves (the client is in no room).
    /// Also when the client's task panicked (a bug of this library): `code` `None`, `reason`
    /// "the client's task panicked (a bug in wschat): " and the panic's message.
    #[error("connection closed for good ({}): {reason}", close_code(.code))]
    Terminal { code: Option<u16>, reason: String },
    /// The client was closed by the app (or its last handle dropped; after a close that forbids
    /// reconnecting, or a panic of the task: [`Error::Terminal`]). Not for
    /// [`Client::leave`](crate::Client::leave), which resolves then (the client is in no room).
    #[error("the client is closed")]
    Closed,
    /// The room was left (by the app, or the server removed this user) before
    /// the join completed.
    #[error("left the room before joining completed")]
    Left,
}

/// `Error::Terminal`'s code as the message shows it: `4001`, or `no code` (not `Some(4001)`).
fn close_code(code: &Option<u16>) -> String {
    code.map_or_else(|| "no code".to_owned(), |code| code.to_string())
}

impl Error {
    /// An error of this library's own (not from the server) in the server's shape.
    pub(crate) fn local(code: &str, message: String) -> Error {
        Error::Server { code: code.into(), message, retry_after_ms: None, details: Default::default() }
    }

    /// The server's error `code`, if the server refused the request.
    pub fn code(&self) -> Option<&str> {
        match self {
            Error::Server { code, .. } => Some(code),
            _ => None,
        }
    }
}

/// Connection states, in the order a connection goes through them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ConnectionState {
    Disconnected,
    Connecting,
    /// The server's `welcome` arrived on the current socket.
    Connected,
}

impl fmt::Display for ConnectionState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ConnectionState::Disconnected => "disconnected",
            ConnectionState::Connecting => "connecting",
            ConnectionState::Connected => "connected",
        })
    }
}

/// A room's state on this client.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RoomState {
    /// A `join` is on its way (first join, or re-join after a reconnect).
    Joining,
    /// The server answered `joined` on the current connection.
    Joined,
    /// Left by the app, or the server refused the join.
    Left,
}
