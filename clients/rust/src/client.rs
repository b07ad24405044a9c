//! The app's side of the client: the builder, a cheap-to-clone handle
//! ([`Client`]) that talks over a channel to the client's task
//! (`driver.rs`), and the events that task sends back ([`Events`],
//! a `Stream`).

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use futures_util::Stream;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::timeout;

use crate::backoff::Backoff;
use crate::driver::Driver;
use crate::error::{ConnectionState, Error, RoomState};
use crate::outbox::{Outbox, OutboxStore, Target};
use crate::protocol::{
    valid_epoch, ChatMessage, ClientCommand, DirectMessage, Presence, ServerEvent, Typing, User, MAX_WIRE_ID,
};

/// What the token callback returns.
pub type TokenFuture = Pin<Box<dyn Future<Output = Result<String, String>> + Send>>;
pub(crate) type TokenFn = Arc<dyn Fn() -> TokenFuture + Send + Sync>;
pub(crate) type UrlFn = Arc<dyn Fn() -> String + Send + Sync>;

/// The answer to a `join`.
#[derive(Debug, Clone, PartialEq)]
pub struct Joined {
    pub room: String,
    pub users: Vec<User>,
    /// The server's `last_id` when it counts (a whole number >= 0, at most 2^53 - 1:
    /// `protocol::wire_id`), else the room's position (the `since` of a re-join), else 0.
    pub last_id: u64,
    /// `None` for a fresh join; `Some(false)` after a re-join with `since` whose
    /// messages the server no longer holds (some are lost: fetch `history`), or whose `since`
    /// was counted in another `epoch`.
    pub recovered: Option<bool>,
    /// The name of the room's numbering (the server's `epoch`): the same while its ids go on
    /// from one another, another once they start again from 1 (a memory server restarted,
    /// Redis lost its data, the room unused past `ROOM_NUMBERING_TTL`). `last_id` and the ids
    /// of the messages that follow are counted in it. `None` from a server of the release
    /// before epochs (or one whose `epoch` is not 1-64 characters without control characters).
    pub epoch: Option<String>,
}

/// Who a connection is, as the server's `welcome` says: [`Event::UserChanged`] carries it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Welcome {
    pub user_id: String,
    pub username: String,
    /// Signed in with a token (`false`: a guest).
    pub authenticated: bool,
}

/// A page of a room's history, read with [`Client::history_page`]: the messages, oldest first,
/// and whether the server left older ones out.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct HistoryPage {
    /// Oldest first.
    pub messages: Vec<ChatMessage>,
    /// The server left out older messages within the `limit` asked for because the reply reached
    /// its byte bound (`HISTORY_MAX_BYTES`, 1 MiB; the newest message always comes): the page may
    /// be far shorter than `limit` although older ones are held, so page back with `before` = the
    /// oldest id here. `true` only for the server's JSON `true` (absent, `"true"`, `1`: `false`).
    pub truncated: bool,
}

/// Where the app is in a room: what to persist to resume it in a later run of the app, with
/// [`Client::join_from`]`(room, last_id, epoch)`. Read with [`Client::position`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RoomPosition {
    /// The id of the room's last message handed to the app (`None`: none yet, and the room's
    /// `joined` gave no `last_id` that counts).
    pub last_id: Option<u64>,
    /// The numbering `last_id` is counted in: the `epoch` of the room's latest `joined` (or the
    /// one the app resumed with, until the `joined`); `None` when not known (a server of the
    /// release before epochs). Persist it with `last_id`: a `since` alone cannot tell the
    /// server that the room's ids started again since.
    pub epoch: Option<String>,
}

/// The rooms' positions as of the events handed to the app, shared by [`Events`] (which records
/// them) and the [`Client`] handles (which read them).
pub(crate) type Positions = Arc<Mutex<HashMap<String, RoomPosition>>>;

/// An event on its way to the app, with the position of the room it is about, as the client's
/// task had it when it sent the event (`None` inside: the room is no longer ours). [`Events`]
/// records it as it hands the event over, so that [`Client::position`] is never ahead of the
/// events the app has read: a position taken from the task itself could name messages still
/// queued for the app, and an app that persisted it and stopped would never see them.
pub(crate) struct Delivery {
    pub(crate) event: Event,
    pub(crate) position: Option<(String, Option<RoomPosition>)>,
}

impl From<Event> for Delivery {
    fn from(event: Event) -> Delivery {
        Delivery { event, position: None }
    }
}

/// What the app hears, in the order it happened. `#[non_exhaustive]`: a later release may
/// add an event (as `UserChanged` was) without breaking a `match` that has a `_` arm.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum Event {
    /// The connection state changed.
    State(ConnectionState),
    /// The server's `welcome`: who this connection is (after every connect).
    Welcome { user_id: String, username: String, authenticated: bool },
    /// A token refresh (the token callback's fresh token, sent as `auth` on the open
    /// connection) made the connection another user (its `welcome` names another `user_id`
    /// than the one before: another `sub`, or a guest signing in): the new welcome, once, after
    /// its `Event::Welcome`. `client.user_id()` and `client.username()` say the new user from
    /// then on. The server has left every room of the connection (without a `left`): the
    /// client joins each room it holds again with `since`, as after a reconnect (`Event::Room`
    /// `Joining`, then `Joined`; a room the new user may not join is `Event::Removed` with the
    /// refusal's reason), and the room's sends wait for that. A refresh that keeps the user
    /// is no `UserChanged` and re-joins nothing.
    UserChanged(Welcome),
    /// The socket ended, or the attempt failed; `code` is the close code (1005 for a Close
    /// frame without one, RFC 6455 7.1.5; `None` when the connection dropped without a Close
    /// frame, or the attempt failed without an answer), or the HTTP status of a refused
    /// upgrade (below 1000; a 401 is reported as 4001). `reconnect_in` is `None` when the
    /// client gives up.
    Disconnected { code: Option<u16>, reason: String, reconnect_in: Option<Duration> },
    /// A room's state changed.
    Room { room: String, state: RoomState },
    /// Every `joined`, first joins and re-joins; `recovered: Some(false)` says
    /// messages were lost across a reconnect or gap.
    Joined(Joined),
    /// A re-join could not replay everything after `since` (the server no longer
    /// holds it): reload `history`. Follows its `Joined`. `last_id` is the server's when it
    /// counts (`protocol::wire_id`), else `since` (0 when `epoch_changed`).
    ///
    /// `epoch_changed`: the room's numbering began again from 1 since `since` was counted (the
    /// `Joined`'s `epoch` is another one than the re-join sent): nothing was replayed, `since`
    /// names no message of the room now, and its ids go on from `last_id` in the new epoch;
    /// reload the room's `history`, which holds only the new numbering's messages.
    RecoveryFailed { room: String, since: u64, last_id: u64, epoch_changed: bool },
    /// One of this client's sends was acknowledged (also one restored from the
    /// outbox store, which has no future waiting for it).
    Ack(Acked),
    /// A room message, each exactly once and in id order per room.
    Message(ChatMessage),
    /// A direct message (also the echo of this user's own DMs), each once.
    Dm(DirectMessage),
    /// Someone came online in a room or left it (`presence.online()`).
    Presence(Presence),
    /// Someone started or stopped typing (an uncleared start expires on the server).
    Typing(Typing),
    /// The server removed this user from a room (kicked, banned, membership
    /// revoked): the room is left for good and not re-joined. Also a re-join (a join with
    /// `since`: after a reconnect, say) refused for good, after its `Event::Error`: `reason` is
    /// the refusal's code (`forbidden`, `invalid_room`, `too_many_rooms`), `until` its `until`.
    Removed { room: String, reason: Option<String>, by: Option<String>, until: Option<i64>, note: Option<String> },
    /// Muted in `room` (`None`: everywhere) until `until` (Unix ms; `None`: until lifted).
    Muted { room: Option<String>, until: Option<i64>, by: Option<String> },
    /// A mute was lifted.
    Unmuted { room: Option<String> },
    /// An error not tied to a request (a server `error` without `id`, a failed
    /// token refresh, a send that could not be delivered, a reconnect of a client once
    /// connected meeting a server certificate that fails verification: code
    /// `tls_certificate`, retried; a terminal close, a panic of the client's task:
    /// [`Error::Terminal`], the last event).
    Error(Error),
}

/// The events of one client, as a `Stream` (or with [`Events::recv`]). Read them, or drop
/// them: kept and unread, they queue without bound (the client's task never waits for the app).
pub struct Events {
    rx: mpsc::UnboundedReceiver<Delivery>,
    positions: Positions,
}

impl Events {
    /// The next event; `None` once the client is closed and every event was read.
    pub async fn recv(&mut self) -> Option<Event> {
        std::future::poll_fn(|cx| self.poll_event(cx)).await
    }

    /// The next delivery, its room's position recorded as the event is handed over.
    fn poll_event(&mut self, cx: &mut Context<'_>) -> Poll<Option<Event>> {
        self.rx.poll_recv(cx).map(|delivery| {
            let Delivery { event, position } = delivery?;
            if let Some((room, position)) = position {
                let mut positions = self.positions.lock().unwrap_or_else(|e| e.into_inner());
                match position {
                    Some(position) => positions.insert(room, position),
                    None => positions.remove(&room),
                };
            }
            Some(event)
        })
    }
}

impl std::fmt::Debug for Events {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Events").field("queued", &self.rx.len()).finish_non_exhaustive()
    }
}

impl Stream for Events {
    type Item = Event;
    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Event>> {
        self.poll_event(cx)
    }
}

#[derive(Debug, Clone)]
pub(crate) struct Snapshot {
    pub(crate) state: ConnectionState,
    pub(crate) user_id: Option<String>,
    pub(crate) username: Option<String>,
    pub(crate) outbox_len: usize,
    /// Why the client's task ended, if not by [`Client::close`] or the last handle going: a close
    /// (or refused upgrade) that forbids reconnecting, or its panic (`Error::Terminal` either
    /// way), which calls made after it fail with.
    pub(crate) ended: Option<Error>,
}

/// Configures and starts a [`Client`]. Each setting returns the builder, to be used (a setting
/// whose result is dropped is lost: `#[must_use]`).
#[must_use = "a builder does nothing until connect() is called"]
pub struct ClientBuilder {
    pub(crate) url: UrlFn,
    pub(crate) token: Option<TokenFn>,
    pub(crate) backoff: Backoff,
    pub(crate) stable_after: Duration,
    pub(crate) request_timeout: Duration,
    pub(crate) send_timeout: Duration,
    pub(crate) connect_timeout: Duration,
    pub(crate) resend_after: Duration,
    pub(crate) outbox_capacity: usize,
    pub(crate) max_in_flight: usize,
    pub(crate) max_joins_in_flight: usize,
    pub(crate) max_requests_in_flight: usize,
    pub(crate) outbox_store: Option<Arc<dyn OutboxStore>>,
    /// The app's TLS configuration for every connection attempt; `None`: tokio-tungstenite's
    /// default (the TLS stack's default roots).
    #[cfg(feature = "__tls")]
    pub(crate) tls_connector: Option<crate::Connector>,
}

/// Which kind of connector it is, for `Debug` (tokio-tungstenite's has no `Debug`; a TLS
/// configuration is no secret, but its certificates are noise).
#[cfg(feature = "__tls")]
fn connector_kind(connector: &crate::Connector) -> &'static str {
    use crate::Connector;
    match connector {
        Connector::Plain => "Plain",
        #[cfg(feature = "native-tls")]
        Connector::NativeTls(_) => "NativeTls",
        #[cfg(any(feature = "rustls-tls-native-roots", feature = "rustls-tls-webpki-roots"))]
        Connector::Rustls(_) => "Rustls",
        // A variant turned on by the app's own tokio-tungstenite features, or a later one.
        _ => "<connector>",
    }
}

/// The settings, not the URL (a `?token=` may be in it) nor the callbacks.
impl std::fmt::Debug for ClientBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut d = f.debug_struct("ClientBuilder");
        d.field("token", &self.token.as_ref().map(|_| "<callback>"))
            .field("backoff", &self.backoff)
            .field("stable_after", &self.stable_after)
            .field("request_timeout", &self.request_timeout)
            .field("send_timeout", &self.send_timeout)
            .field("connect_timeout", &self.connect_timeout)
            .field("resend_after", &self.resend_after)
            .field("outbox_capacity", &self.outbox_capacity)
            .field("max_in_flight", &self.max_in_flight)
            .field("max_joins_in_flight", &self.max_joins_in_flight)
            .field("max_requests_in_flight", &self.max_requests_in_flight)
            .field("outbox_store", &self.outbox_store.as_ref().map(|_| "<store>"));
        #[cfg(feature = "__tls")]
        d.field("tls_connector", &self.tls_connector.as_ref().map(connector_kind));
        d.finish_non_exhaustive()
    }
}

impl ClientBuilder {
    /// A client of the server at `url` (`ws://host:port/ws`, with `?username=` for a guest).
    pub fn new(url: impl Into<String>) -> Self {
        let url = url.into();
        Self::with_url_fn(move || url.clone())
    }

    /// A client that asks `url` for the URL before every connection attempt (to
    /// move to another server during a rolling restart, for instance).
    pub fn with_url_fn(url: impl Fn() -> String + Send + Sync + 'static) -> Self {
        ClientBuilder {
            url: Arc::new(url),
            token: None,
            backoff: Backoff::default(),
            stable_after: Duration::from_secs(10),
            request_timeout: Duration::from_secs(10),
            send_timeout: Duration::from_secs(30),
            connect_timeout: Duration::from_secs(10),
            resend_after: Duration::from_secs(5),
            outbox_capacity: 1000,
            max_in_flight: 16,
            max_joins_in_flight: crate::pacer::JOIN_WINDOW,
            max_requests_in_flight: crate::pacer::REQUEST_WINDOW,
            outbox_store: None,
            #[cfg(feature = "__tls")]
            tls_connector: None,
        }
    }

    /// A callback that returns a JWT: called before every connection attempt and
    /// again before the current token expires (the fresh one is sent as `auth`).
    ///
    /// The client keeps the callback as long as it runs: a [`Client`] of this same client
    /// held inside it (to read `user_id()`, say) is a handle that never goes, and the client
    /// never stops when the app drops its own ones; call [`Client::close`], or keep no handle
    /// in it. (So for [`ClientBuilder::with_url_fn`].)
    pub fn token<F, Fut>(mut self, get_token: F) -> Self
    where
        F: Fn() -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<String, String>> + Send + 'static,
    {
        self.token = Some(Arc::new(move || Box::pin(get_token()) as TokenFuture));
        self
    }

    /// Reconnect delays (default 0.5 s .. 20 s, full jitter).
    pub fn backoff(mut self, min: Duration, max: Duration) -> Self {
        self.backoff = Backoff { min, max };
        self
    }

    /// How long a connection must stay up before the reconnect delays start again from the
    /// shortest (default 10 s). A server that accepts and closes at once (1013 in an outage,
    /// 4102, a draining pod's 1001) is retried with growing delays, not every `min` by all of
    /// its clients together (as the JS client's `stableAfter` and the Python client's
    /// `Backoff.stable_after`).
    pub fn stable_after(mut self, t: Duration) -> Self {
        self.stable_after = t;
        self
    }

    /// How long `join`, `leave`, `history` and `list_users` wait (default 10 s),
    /// including any wait for a connection.
    pub fn request_timeout(mut self, t: Duration) -> Self {
        self.request_timeout = t;
        self
    }

    /// How long `send` and `dm` wait for their acknowledgement (default 30 s);
    /// after it the message stays in the outbox (its echo comes as `Event::Ack`, a refusal
    /// for good as `Event::Error`).
    pub fn send_timeout(mut self, t: Duration) -> Self {
        self.send_timeout = t;
        self
    }

    /// How long one connection attempt (token, TCP, handshake) may take (default 10 s).
    pub fn connect_timeout(mut self, t: Duration) -> Self {
        self.connect_timeout = t;
        self
    }

    /// How long a written send waits for its echo before it is written again
    /// on the same connection (default 5 s; the server dedupes the resend).
    pub fn resend_after(mut self, t: Duration) -> Self {
        self.resend_after = t.max(Duration::from_millis(100));
        self
    }

    /// How many unacknowledged sends the outbox holds (default 1000): a send past it fails with
    /// [`Error::OutboxFull`]. What the `outbox_store` kept is restored whole, past it too.
    pub fn outbox_capacity(mut self, n: usize) -> Self {
        self.outbox_capacity = n.max(1);
        self
    }

    /// How many sends may be written and not yet acknowledged at a time (default
    /// 16); the rest wait in the outbox, so a burst of sends does not run into the
    /// server's rate limit all at once.
    pub fn max_in_flight(mut self, n: usize) -> Self {
        self.max_in_flight = n.max(1);
        self
    }

    /// How many joins may be written and not yet answered at a time (default 4); the rest,
    /// a reconnect's re-joins of many rooms too, wait their turn. They draw on the user's
    /// request bucket (`RATE_LIMIT_REQUESTS_BURST`, shared by all the user's connections):
    /// after a `rate_limited` join none is written before its `retry_after_ms`, the refused
    /// ones go again first, one at a time and then at the server's pace, with a growing,
    /// jittered pause while they are refused still, as in the Python and JS clients: a few
    /// refusals come in a row, not the 2 x `RATE_LIMIT_BURST` the server closes with 4102.
    pub fn max_joins_in_flight(mut self, n: usize) -> Self {
        self.max_joins_in_flight = n.max(1);
        self
    }

    /// How many of the other requests ([`Client::ping`], [`Client::history`],
    /// [`Client::history_page`], [`Client::list_users`], [`Client::leave`], [`Client::kick`],
    /// [`Client::mute`], [`Client::unmute`]) may be written and not yet answered at a time
    /// (default 4); the rest wait their turn, in the order of the calls. They draw on the same
    /// request bucket as joins and are paced the same way, as in the Python and JS clients:
    /// after a `rate_limited` answer none is written before its `retry_after_ms`, the refused
    /// one goes again first (the server did not carry it out; it does not fail), then one at a
    /// time at the server's pace. The request timeout counts the wait in the queue: a call that
    /// waits too long fails with [`Error::Timeout`](crate::Error::Timeout) and is never written.
    pub fn max_requests_in_flight(mut self, n: usize) -> Self {
        self.max_requests_in_flight = n.max(1);
        self
    }

    /// Keeps the outbox in `store`; entries it holds now are resent after connecting.
    pub fn outbox_store(mut self, store: impl OutboxStore) -> Self {
        self.outbox_store = Some(Arc::new(store));
        self
    }

    /// Connects to a `wss://` URL with this TLS configuration, on every attempt (the first and
    /// each reconnect), instead of tokio-tungstenite's default (the TLS stack's default roots):
    /// a private CA (a test cluster's, a company's) trusted by this client only, where
    /// `SSL_CERT_FILE` would trust it process-wide; a client certificate; rustls settings. A
    /// certificate it refuses stops the client with 1015, as one the default roots refuse.
    /// `Connector::Plain` has no TLS: a `wss://` URL then stops the client (`code: None`).
    /// Needs a TLS feature of this crate (`native-tls`, `rustls-tls-native-roots`,
    /// `rustls-tls-webpki-roots`).
    ///
    /// ```no_run
    /// # #[cfg(feature = "native-tls")]
    /// # fn demo(ca_pem: &[u8]) -> Result<(), wschat::native_tls::Error> {
    /// use wschat::native_tls::{Certificate, TlsConnector};
    /// let tls = TlsConnector::builder().add_root_certificate(Certificate::from_pem(ca_pem)?).build()?;
    /// let builder = wschat::Client::builder("wss://chat.internal/ws").tls_connector(wschat::Connector::NativeTls(tls));
    /// # drop(builder);
    /// # Ok(())
    /// # }
    /// ```
    #[cfg(feature = "__tls")]
    pub fn tls_connector(mut self, connector: crate::Connector) -> Self {
        self.tls_connector = Some(connector);
        self
    }

    /// Starts the client's task on the current Tokio runtime and connects (outside a Tokio
    /// runtime it panics, as `tokio::spawn` does).
    ///
    /// The client runs while a [`Client`] handle is kept: dropping what this returns stops it
    /// at once, which the compiler points out (`#[must_use]`):
    ///
    /// ```compile_fail
    /// #![deny(unused_must_use)]
    /// # async fn demo() {
    /// wschat::Client::builder("ws://localhost:8080/ws?username=alice").connect(); // stopped at once
    /// # }
    /// ```
    #[must_use = "the client stops as soon as its last Client handle is dropped"]
    pub fn connect(self) -> (Client, Events) {
        let (ops_tx, ops_rx) = mpsc::unbounded_channel();
        let (events_tx, events_rx) = mpsc::unbounded_channel();
        let mut outbox = Outbox::new(self.outbox_capacity);
        if let Some(store) = &self.outbox_store {
            for entry in store.load() {
                outbox.restore(entry);
            }
        }
        let (snap_tx, snap_rx) = watch::channel(Snapshot {
            state: ConnectionState::Disconnected,
            user_id: None,
            username: None,
            outbox_len: outbox.len(),
            ended: None,
        });
        let positions = Positions::default();
        let client = Client {
            ops: ops_tx,
            snapshot: snap_rx,
            positions: positions.clone(),
            request_timeout: self.request_timeout,
            send_timeout: self.send_timeout,
        };
        Driver::spawn(self, ops_rx, events_tx, snap_tx, outbox);
        (client, Events { rx: events_rx, positions })
    }
}

pub(crate) type Reply<T> = oneshot::Sender<Result<T, Error>>;

/// An acknowledged send: the stored message, as the server echoed it.
#[derive(Debug, Clone, PartialEq)]
pub enum Acked {
    Message(ChatMessage),
    Dm(DirectMessage),
}

/// What a [`Client`] asks of the driver. (`Panic`, tests only: the driver panics with its message
/// where it handles an op, a stand-in for a bug of the library that neither an app nor a server
/// can trigger in a build.)
pub(crate) enum Op {
    Join {
        room: String,
        /// `since` and its `epoch` (`Client::join_from`), for a room not ours yet.
        from: Option<(u64, Option<String>)>,
        reply: Reply<Joined>,
    },
    Leave {
        room: String,
        reply: Reply<ServerEvent>,
    },
    Send {
        target: Target,
        text: String,
        reply: Reply<Acked>,
    },
    Request {
        cmd: ClientCommand,
        reply: Reply<ServerEvent>,
    },
    Typing {
        room: String,
        status: bool,
    },
    Reconnect,
    Close,
    #[cfg(test)]
    Panic(String),
}

/// A handle to a running client; clone it freely. The client stops when the
/// last handle is dropped or [`Client::close`] is called, and with it every task it started
/// (its timers, a token callback under way). A call still waiting (a `send` spawned on a task,
/// say) holds a handle until it resolves.
#[derive(Clone)]
pub struct Client {
    ops: mpsc::UnboundedSender<Op>,
    snapshot: watch::Receiver<Snapshot>,
    positions: Positions,
    request_timeout: Duration,
    send_timeout: Duration,
}

/// What tells this client from another: its state, who it is, its outbox.
impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let s = self.snapshot.borrow();
        f.debug_struct("Client")
            .field("state", &s.state)
            .field("user_id", &s.user_id)
            .field("username", &s.username)
            .field("outbox_len", &s.outbox_len)
            .field("ended", &s.ended)
            .finish_non_exhaustive()
    }
}

impl Client {
    /// Starts configuring a client of `url`.
    pub fn builder(url: impl Into<String>) -> ClientBuilder {
        ClientBuilder::new(url)
    }

    pub fn state(&self) -> ConnectionState {
        self.snapshot.borrow().state
    }

    /// The `user_id` of the last `welcome`.
    pub fn user_id(&self) -> Option<String> {
        self.snapshot.borrow().user_id.clone()
    }

    /// The `username` of the last `welcome`.
    pub fn username(&self) -> Option<String> {
        self.snapshot.borrow().username.clone()
    }

    /// Sends not yet acknowledged.
    pub fn outbox_len(&self) -> usize {
        self.snapshot.borrow().outbox_len
    }

    /// Where the app is in `room`: the id of its last message the [`Events`] handed over and the
    /// epoch it is counted in, to persist for [`Client::join_from`] in a later run; `None` for
    /// a room not ours (never joined, or left, or removed, as far as the events read tell).
    /// It follows the events the app has read, not the client's task: messages still queued for
    /// the app are not counted, so a position persisted after handling an event never skips
    /// one. (With the events dropped, nothing is handed over and it stays as it was.)
    pub fn position(&self, room: &str) -> Option<RoomPosition> {
        self.positions.lock().unwrap_or_else(|e| e.into_inner()).get(room).cloned()
    }

    /// Waits until the client is `connected` (or `wait` passes: `Error::Timeout`). A client that
    /// stopped for good fails it with why ([`Error::Terminal`]: a close code or a refused
    /// upgrade that forbids reconnecting, 4001 for a refused token without a callback), one
    /// closed by the app with [`Error::Closed`].
    pub async fn wait_connected(&self, wait: Duration) -> Result<(), Error> {
        let mut rx = self.snapshot.clone();
        let result = timeout(wait, rx.wait_for(|s| s.state == ConnectionState::Connected || s.ended.is_some())).await;
        match result.map(|r| r.map(|s| s.ended.is_none())) {
            Ok(Ok(true)) => Ok(()),
            Ok(_) => Err(self.ended().await),
            Err(_) => Err(Error::Timeout),
        }
    }

    async fn call<T>(&self, wait: Duration, make: impl FnOnce(Reply<T>) -> Op) -> Result<T, Error> {
        let (tx, rx) = oneshot::channel();
        if self.ops.send(make(tx)).is_err() {
            return Err(self.ended().await);
        }
        match timeout(wait, rx).await {
            Ok(Ok(result)) => result,
            Ok(Err(_)) => Err(self.ended().await),
            Err(_) => Err(Error::Timeout),
        }
    }

    /// What a call fails with once the client's task has dropped it: why the task ended for good
    /// (`Error::Terminal`, as the events tell it: a terminal close or the task's panic), else
    /// `Error::Closed`. A task that unwinds
    /// drops the calls it held before its supervisor records the panic, so once the task is
    /// gone (its `ops` closed) this waits for that record, or for the supervisor to end
    /// without one (the snapshot's sender dropped): at once either way.
    async fn ended(&self) -> Error {
        if let Some(ended) = self.snapshot.borrow().ended.clone() {
            return ended; // told before the task is gone (a terminal close), or after (a panic)
        }
        if !self.ops.is_closed() {
            return Error::Closed; // the task is running (a reply dropped unanswered)
        }
        let mut rx = self.snapshot.clone();
        let ended = rx.wait_for(|s| s.ended.is_some()).await.map(|s| s.ended.clone());
        ended.ok().flatten().unwrap_or(Error::Closed)
    }

    /// Joins `room` (and re-joins it with `since` after every reconnect until left). A room
    /// already joined resolves at once with its latest `Joined` and writes nothing; one joining
    /// resolves with the answer to the join under way (as in the JS and Python clients). To
    /// resume from a position saved in an earlier run, [`Client::join_from`].
    pub async fn join(&self, room: &str) -> Result<Joined, Error> {
        let room = room.to_owned();
        self.call(self.request_timeout, |reply| Op::Join { room, from: None, reply }).await
    }

    /// Joins `room` resuming after message `since` (`None`: a plain [`Client::join`]), counted in
    /// `epoch`: both as [`Client::position`] gave them in an earlier run of the app, persisted
    /// together. The server replays what came after `since`, in order (`recovered: Some(true)`),
    /// or answers `recovered: Some(false)` and [`Event::RecoveryFailed`] follows: the messages
    /// are no longer held (reload `history`), or the room's ids started again since `since` was
    /// counted (another `epoch`, `epoch_changed`: nothing is replayed, the room goes on from the
    /// new numbering's `last_id`). Without `epoch` the server cannot tell a numbering that began
    /// again (it would replay its ids above `since` as if they followed); `epoch` counts only
    /// with `since`. A room already joined or joining is not joined again: the call answers as
    /// [`Client::join`] does, `since` and `epoch` unused (as in the JS and Python clients).
    ///
    /// A `since` past 2^53 - 1 ([`MAX_WIRE_ID`]), or an `epoch` that is not 1-64 characters
    /// without control characters (the server's rules), fails at once with `invalid_message`,
    /// the server's answer to it: nothing is written and nothing kept.
    pub async fn join_from(&self, room: &str, since: Option<u64>, epoch: Option<&str>) -> Result<Joined, Error> {
        if let Some(since) = since.filter(|s| *s > MAX_WIRE_ID) {
            let why = format!("join {room}: since must be a whole number >= 0 and at most 2^53 - 1, not {since}");
            return Err(Error::local("invalid_message", why));
        }
        if let Some(epoch) = epoch.filter(|e| !valid_epoch(e)) {
            let shown: String = epoch.chars().take(80).collect();
            let why = format!("join {room}: epoch must be 1-64 characters, none a control character, not {shown:?}");
            return Err(Error::local("invalid_message", why));
        }
        let (room, from) = (room.to_owned(), since.map(|s| (s, epoch.map(str::to_owned))));
        self.call(self.request_timeout, |reply| Op::Join { room, from, reply }).await
    }

    /// Leaves `room`. Its sends not yet written fail with `not_in_room`; those
    /// already written reached the server first and resolve with their echo.
    ///
    /// On a client closed ([`Client::close`]) or stopped for good ([`Error::Terminal`]) it
    /// resolves at once, as in the JS and Python clients: the client is in no room any more (the
    /// memberships went with its connection), and a leave is cleanup code, often run in a
    /// teardown after `close()`. The other calls fail then, with `Error::Closed` or that
    /// `Error::Terminal`.
    pub async fn leave(&self, room: &str) -> Result<(), Error> {
        let room = room.to_owned();
        match self.call(self.request_timeout, |reply| Op::Leave { room, reply }).await {
            Ok(_) | Err(Error::Closed | Error::Terminal { .. }) => Ok(()),
            Err(error) => Err(error),
        }
    }

    /// Sends `text` to `room`; resolves with the message once the server's echo (its
    /// acknowledgement: the room's message from this client's user carrying the send's
    /// `client_msg_id`, never another member's with the same id) arrives. Kept in the outbox,
    /// and resent after a reconnect, until then; refused `not_in_room` in a room of ours (the
    /// server lost the membership), resent once the room is joined again.
    pub async fn send(&self, room: &str, text: &str) -> Result<ChatMessage, Error> {
        let (target, text) = (Target::Room(room.to_owned()), text.to_owned());
        match self.call(self.send_timeout, |reply| Op::Send { target, text, reply }).await? {
            Acked::Message(m) => Ok(m),
            Acked::Dm(_) => unreachable!("a room send is acknowledged by a room message"),
        }
    }

    /// Sends a direct message to `user_id`, with the same guarantees as [`Client::send`].
    pub async fn dm(&self, user_id: &str, text: &str) -> Result<DirectMessage, Error> {
        let (target, text) = (Target::Dm(user_id.to_owned()), text.to_owned());
        match self.call(self.send_timeout, |reply| Op::Send { target, text, reply }).await? {
            Acked::Dm(m) => Ok(m),
            Acked::Message(_) => unreachable!("a DM is acknowledged by a dm"),
        }
    }

    /// The room's recent messages, oldest first (`limit` default 50; `before` an id). A `before`
    /// of 0 or past 2^53 - 1 ([`MAX_WIRE_ID`](crate::protocol::MAX_WIRE_ID); the server's rule, a
    /// whole number >= 1, as in the JS and Python clients) fails at once with `invalid_message`,
    /// the server's answer to it, and nothing is written; so does a `limit` of 0 (the server's
    /// rule: a whole number >= 1; it serves at most `HISTORY_SIZE` whatever the limit). The
    /// messages of [`Client::history_page`], without its `truncated`: to page back, use that.
    pub async fn history(
        &self,
        room: &str,
        limit: Option<u32>,
        before: Option<u64>,
    ) -> Result<Vec<ChatMessage>, Error> {
        Ok(self.history_page(room, limit, before).await?.messages)
    }

    /// A page of the room's history, as [`Client::history`] asks for it (the same `limit`,
    /// `before`, rules and errors), with the server's `truncated` ([`HistoryPage::truncated`]):
    /// `true` when older messages within `limit` were left out because the reply reached the
    /// server's byte bound (1 MiB), so the page may be shorter than `limit` although older ones
    /// are held: ask again with `before` = its oldest id.
    pub async fn history_page(
        &self,
        room: &str,
        limit: Option<u32>,
        before: Option<u64>,
    ) -> Result<HistoryPage, Error> {
        if let Some(before) = before.filter(|b| !(1..=MAX_WIRE_ID).contains(b)) {
            let why = format!("history {room}: before must be at least 1 and at most 2^53 - 1, not {before}");
            return Err(Error::local("invalid_message", why));
        }
        if limit == Some(0) {
            let why = format!("history {room}: limit must be a whole number >= 1, not 0");
            return Err(Error::local("invalid_message", why));
        }
        let cmd = ClientCommand::History { room: room.to_owned(), limit, before, id: None };
        match self.call(self.request_timeout, |reply| Op::Request { cmd, reply }).await? {
            ServerEvent::History { messages, truncated, .. } => Ok(HistoryPage { messages, truncated }),
            other => Err(unexpected(other)),
        }
    }

    /// Who is in `room`.
    pub async fn list_users(&self, room: &str) -> Result<Vec<User>, Error> {
        let cmd = ClientCommand::ListUsers { room: room.to_owned(), id: None };
        match self.call(self.request_timeout, |reply| Op::Request { cmd, reply }).await? {
            ServerEvent::Users { users, .. } => Ok(users),
            other => Err(unexpected(other)),
        }
    }

    /// Moderators: removes `user_id` from `room`.
    pub async fn kick(&self, room: &str, user_id: &str, reason: Option<&str>) -> Result<(), Error> {
        let cmd = ClientCommand::Kick {
            room: room.to_owned(),
            user_id: user_id.to_owned(),
            reason: reason.map(str::to_owned),
            id: None,
        };
        self.call(self.request_timeout, |reply| Op::Request { cmd, reply }).await.map(|_| ())
    }

    /// Moderators: `user_id` may read `room` but not post or type, for `duration`
    /// (`None`: until lifted). Returns the mute's end (Unix ms), if any.
    pub async fn mute(&self, room: &str, user_id: &str, duration: Option<Duration>) -> Result<Option<i64>, Error> {
        let cmd = ClientCommand::Mute {
            room: room.to_owned(),
            user_id: user_id.to_owned(),
            duration: duration.map(|d| d.as_secs_f64()),
            id: None,
        };
        match self.call(self.request_timeout, |reply| Op::Request { cmd, reply }).await? {
            ServerEvent::Moderated { until, .. } => Ok(until),
            other => Err(unexpected(other)),
        }
    }

    /// Moderators: lifts a mute.
    pub async fn unmute(&self, room: &str, user_id: &str) -> Result<(), Error> {
        let cmd = ClientCommand::Unmute { room: room.to_owned(), user_id: user_id.to_owned(), id: None };
        self.call(self.request_timeout, |reply| Op::Request { cmd, reply }).await.map(|_| ())
    }

    /// A round trip to the server (`ping` / `pong`).
    pub async fn ping(&self) -> Result<(), Error> {
        let cmd = ClientCommand::Ping { id: None };
        self.call(self.request_timeout, |reply| Op::Request { cmd, reply }).await.map(|_| ())
    }

    /// The typing helper: call it with `true` on every keystroke. It sends at most
    /// one `typing: true` a second, and `false` by itself 3 s after the last call
    /// (or at once when called with `false`); a `send` to the room ends it.
    pub fn typing(&self, room: &str, status: bool) {
        let _ = self.ops.send(Op::Typing { room: room.to_owned(), status });
    }

    /// Drops the current connection at once, without a close handshake, and
    /// reconnects (for a network change; tests use it to cut the socket).
    pub fn reconnect(&self) {
        let _ = self.ops.send(Op::Reconnect);
    }

    /// Closes the connection (1000) and stops the client; pending requests fail
    /// with [`Error::Closed`]; the outbox stays in its store.
    pub fn close(&self) {
        let _ = self.ops.send(Op::Close);
    }

    /// Tests only: makes the client's task panic, as a bug of the library would.
    #[cfg(test)]
    pub(crate) fn panic_driver(&self, message: &str) {
        let _ = self.ops.send(Op::Panic(message.to_owned()));
    }
}

fn unexpected(event: ServerEvent) -> Error {
    Error::local("unexpected_reply", format!("{event:?}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;

    /// A server that greets one connection with a `welcome` and then answers nothing.
    async fn silent_server() -> String {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("ws://{}/ws", listener.local_addr().unwrap());
        tokio::spawn(async move {
            let (tcp, _) = listener.accept().await.unwrap();
            let mut ws = tokio_tungstenite::accept_async(tcp).await.unwrap();
            let welcome = r#"{"type": "welcome", "user_id": "u1", "username": "u1", "heartbeat_interval": 30.0}"#;
            ws.send(Message::text(welcome)).await.unwrap();
            while let Some(Ok(_)) = ws.next().await {}
        });
        url
    }

    /// A server that greets one connection with a `welcome` and answers its `history` requests in
    /// turn, each with message 7 and the next of `truncated` (raw JSON; `None`: absent); each
    /// request it read goes to the channel.
    async fn history_server(
        truncated: Vec<Option<&'static str>>,
    ) -> (String, mpsc::UnboundedReceiver<serde_json::Value>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("ws://{}/ws", listener.local_addr().unwrap());
        let (asked, requests) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            let (tcp, _) = listener.accept().await.unwrap();
            let mut ws = tokio_tungstenite::accept_async(tcp).await.unwrap();
            let welcome = r#"{"type": "welcome", "user_id": "u1", "username": "u1", "heartbeat_interval": 30.0}"#;
            ws.send(Message::text(welcome)).await.unwrap();
            let mut answers = truncated.into_iter();
            while let Some(Ok(frame)) = ws.next().await {
                let Ok(request) = serde_json::from_str::<serde_json::Value>(frame.to_text().unwrap_or("")) else {
                    continue;
                };
                if request["type"] != "history" {
                    continue;
                }
                let message = r#"{"type": "message", "id": 7, "room": "r", "from": "n", "user_id": "u", "text": "x", "timestamp": 1}"#;
                let flag = answers.next().flatten().map(|raw| format!(r#", "truncated": {raw}"#)).unwrap_or_default();
                let reply = format!(
                    r#"{{"type": "history", "room": "r", "messages": [{message}]{flag}, "id": {}}}"#,
                    request["id"]
                );
                let _ = asked.send(request);
                ws.send(Message::text(reply)).await.unwrap();
            }
        });
        (url, requests)
    }

    /// `history_page` carries the server's `truncated` (older messages left out for the reply's
    /// byte bound), `true` only for the JSON `true`, as the JS and Python clients read it;
    /// `history` is the page's messages.
    #[tokio::test]
    async fn history_page_carries_the_server_s_truncated() {
        let answers = vec![Some("true"), None, Some("\"true\""), Some("1"), Some("false"), Some("true")];
        let (url, mut requests) = history_server(answers).await;
        let (c, _events) = Client::builder(url).request_timeout(Duration::from_secs(5)).connect();
        c.wait_connected(Duration::from_secs(5)).await.unwrap();
        let page = c.history_page("r", Some(3), Some(8)).await.unwrap();
        assert!(page.truncated, "{page:?}");
        assert_eq!(page.messages.iter().map(|m| m.id).collect::<Vec<_>>(), [7]);
        let asked = requests.recv().await.unwrap();
        assert_eq!(
            (&asked["room"], &asked["limit"], &asked["before"]),
            (&serde_json::json!("r"), &3.into(), &8.into())
        );
        for raw in ["absent", "\"true\"", "1", "false"] {
            let page = c.history_page("r", None, None).await.unwrap();
            assert!(!page.truncated, "truncated {raw}: {page:?}");
            assert_eq!(page.messages.len(), 1, "truncated {raw}");
        }
        let messages = c.history("r", Some(3), None).await.unwrap();
        assert_eq!(messages.iter().map(|m| m.id).collect::<Vec<_>>(), [7]);
        // The same rules as history's: nothing written.
        let got = c.history_page("r", Some(0), None).await;
        assert_eq!(got.as_ref().map_err(Error::code), Err(Some("invalid_message")), "{got:?}");
    }

    /// `history`'s `before` is held to the server's rule (at least 1 and at most 2^53 - 1, as in
    /// the JS and Python clients): 0 or past 2^53 - 1 the call fails at once with
    /// `invalid_message`, which the server would answer, instead of being written. (A `u64`
    /// cannot be negative or a fraction.)
    #[tokio::test]
    async fn a_history_before_of_0_or_past_the_largest_id_fails_at_once() {
        let url = silent_server().await;
        let (c, _events) = Client::builder(url).request_timeout(Duration::from_millis(300)).connect();
        c.wait_connected(Duration::from_secs(5)).await.unwrap();
        for before in [0, MAX_WIRE_ID + 1, u64::MAX] {
            let got = c.history("r", None, Some(before)).await;
            assert_eq!(got.as_ref().map_err(Error::code), Err(Some("invalid_message")), "before {before}: {got:?}");
        }
        // 1 and the largest id are written (the silent server never answers them).
        for before in [1, MAX_WIRE_ID] {
            assert_eq!(c.history("r", None, Some(before)).await, Err(Error::Timeout), "before {before}");
        }
    }

    /// `history`'s `limit` is held to the server's rule (a whole number >= 1, as in the JS and
    /// Python clients): 0 fails at once with `invalid_message`, which the server would answer,
    /// instead of being written. (A `u32` cannot be negative, a fraction or past 2^53 - 1.)
    #[tokio::test]
    async fn a_history_limit_of_0_fails_at_once() {
        let url = silent_server().await;
        let (c, _events) = Client::builder(url).request_timeout(Duration::from_millis(300)).connect();
        c.wait_connected(Duration::from_secs(5)).await.unwrap();
        let got = c.history("r", Some(0), None).await;
        assert_eq!(got.as_ref().map_err(Error::code), Err(Some("invalid_message")), "limit 0: {got:?}");
        // 1 and the largest are written (the silent server never answers them).
        for limit in [1, u32::MAX] {
            assert_eq!(c.history("r", Some(limit), None).await, Err(Error::Timeout), "limit {limit}");
        }
    }

    /// The public handles print with `{:?}` (an app's `#[derive(Debug)]` struct holding a
    /// `Client` did not compile), showing what tells one client from another, and no token.
    #[tokio::test]
    async fn the_handles_are_debug() {
        let builder = Client::builder("ws://127.0.0.1:1/ws").token(|| async { Ok("secret-jwt".to_owned()) });
        let shown = format!("{builder:?}");
        assert!(shown.contains("ClientBuilder") && shown.contains("request_timeout"), "{shown}");
        let (c, events) = builder.connect();
        let shown = format!("{c:?} {events:?}");
        assert!(shown.contains("Client {") && shown.contains("Events"), "{shown}");
        assert!(!format!("{shown} {:?}", Client::builder("ws://x/ws")).contains("secret-jwt"));
        c.close();
    }

    /// With a TLS feature, the builder shows which kind of connector it was given (not its
    /// certificates); `Connector::Plain` for a `wss://` URL stops the client at once, saying
    /// that the connector has no TLS (not that TLS is not compiled in, which it is).
    #[cfg(feature = "__tls")]
    #[tokio::test]
    async fn a_plain_connector_is_shown_and_stops_a_wss_url() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("wss://{}/ws", listener.local_addr().unwrap());
        let builder = Client::builder(url).tls_connector(crate::Connector::Plain);
        let shown = format!("{builder:?}");
        assert!(shown.contains(r#"tls_connector: Some("Plain")"#), "{shown}");
        let (c, _events) = builder.connect();
        match c.wait_connected(Duration::from_secs(5)).await {
            Err(Error::Terminal { code: None, reason }) => assert!(reason.contains("`Connector::Plain`"), "{reason}"),
            other => panic!("{other:?}"),
        }
        drop(listener);
    }

    /// A panic of the client's task (a bug: an `Instant + Duration` overflow did it once) is
    /// final and told: the state is `Disconnected`, the events end with `Disconnected`
    /// (`reconnect_in: None`) and `Error::Terminal` carrying the panic's message, a call
    /// waiting for an answer fails at once (not after its timeout) and later calls fail, each
    /// with that `Error::Terminal` (they failed with a plain `Error::Closed`, which said nothing
    /// of the panic).
    #[tokio::test]
    async fn a_panic_of_the_driver_is_final_and_told() {
        let wait = Duration::from_secs(5);
        let url = silent_server().await;
        let (c, mut events) = Client::builder(url).request_timeout(Duration::from_secs(60)).connect();
        c.wait_connected(wait).await.unwrap();
        // A ping the server never answers, handed to the driver (polled once) before the panic.
        let ping = c.ping();
        tokio::pin!(ping);
        assert!(timeout(Duration::from_millis(50), &mut ping).await.is_err());
        c.panic_driver("boom: a test asked for it");

        let failed = timeout(wait, &mut ping).await;
        let state = c.state();
        let reason = "the client's task panicked (a bug in wschat): boom: a test asked for it".to_owned();
        let terminal = Error::Terminal { code: None, reason: reason.clone() };
        assert_eq!(failed, Ok(Err(terminal.clone())), "the pending ping");
        assert_eq!(state, ConnectionState::Disconnected, "the state once the pending ping failed");

        let mut seen = Vec::new();
        let ended = timeout(wait, async {
            while let Some(event) = events.recv().await {
                seen.push(event);
            }
        })
        .await;
        assert!(ended.is_ok(), "the events did not end: {seen:?}");
        let tail = [
            Event::State(ConnectionState::Disconnected),
            Event::Disconnected { code: None, reason, reconnect_in: None },
            Event::Error(terminal.clone()),
        ];
        assert!(seen.ends_with(&tail), "the events ended with {seen:#?}");

        let later = (c.join("r").await.map(|_| ()), c.send("r", "hi").await.map(|_| ()), c.wait_connected(wait).await);
        let want = Err(terminal);
        assert_eq!(later, (want.clone(), want.clone(), want), "later calls");
    }
}
