//! The client's task (the driver): it owns the socket and every piece of state —
//! connection state, rooms and their last ids, the outbox, pending requests —
//! and talks to the [`Client`](crate::Client) handles over a channel.
//!
//! Its life: connect (URL and token fetched per attempt) -> `welcome` -> re-join
//! every room with `since` -> resend the outbox -> serve until the socket ends ->
//! decide from the close code whether and when to reconnect. Handlers never
//! block: they update state and queue frames in `outgoing`, which the serving
//! loop writes after each one.

use std::any::Any;
use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::panic::AssertUnwindSafe;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures_util::{FutureExt, SinkExt, StreamExt};
use tokio::sync::{mpsc, watch};
use tokio::time::{sleep, sleep_until, timeout, Instant};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::error::UrlError;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::Message;

use crate::backoff::{retry_after_header, RETRY_AFTER_CAP};
use crate::client::{Acked, ClientBuilder, Delivery, Event, Joined, Op, Reply, RoomPosition, Snapshot, Welcome};
use crate::error::{ConnectionState, Error, RoomState};
use crate::outbox::{new_client_msg_id, Echo, Outbox, OutboxEntry, Target};
use crate::pacer::{JoinPacer, Pacer};
use crate::protocol::{
    close_action, refusal_action, until_ms, ChatMessage, ClientCommand, CloseAction, DirectMessage, RequestId,
    ServerEvent, MAX_WIRE_ID,
};
use crate::rooms::{RoomSeq, Verdict};
use crate::token::{expiry_of, refresh_wait, RefreshDue};

/// The longest wait before a join refused for now (`unavailable`) goes again, whatever the
/// reconnect backoff's `max` (5 s, as in the JS and Python clients).
const JOIN_RETRY_MAX: Duration = Duration::from_secs(5);

/// Runs the driver and, should it panic (a bug of this library), tells the app that the client
/// is gone for good, as a close that forbids reconnecting is told: the state `Disconnected`,
/// `Event::Disconnected` with `reconnect_in: None` and `Event::Error(Error::Terminal)`, both
/// with the panic's message. Only then is the driver dropped, and with it its pending replies
/// (their calls fail with `Closed` at once) and its end of the events, which then end. Without
/// this, Tokio dropped the task quietly: `state()` still said `Connected` and the events ended
/// with no word. (With `panic = "abort"` the process ends instead: nothing to tell.)
async fn supervise(
    run: impl std::future::Future<Output = ()>,
    events: mpsc::UnboundedSender<Delivery>,
    snapshot: watch::Sender<Snapshot>,
) {
    // Unwind safe enough: after a panic the driver's state is never used again, only dropped.
    let run = AssertUnwindSafe(run).catch_unwind();
    tokio::pin!(run);
    if let Err(panic) = run.as_mut().await {
        let reason = format!("the client's task panicked (a bug in wschat): {}", panic_message(&*panic));
        let terminal = Error::Terminal { code: None, reason: reason.clone() };
        let disconnected = ConnectionState::Disconnected;
        let mut was = disconnected;
        // With the state, the error calls fail with from now on (`Client::call`).
        snapshot.send_modify(|s| {
            was = std::mem::replace(&mut s.state, disconnected);
            s.ended = Some(terminal.clone());
        });
        if was != disconnected {
            let _ = events.send(Event::State(disconnected).into());
        }
        let _ = events.send(Event::Disconnected { code: None, reason, reconnect_in: None }.into());
        let _ = events.send(Event::Error(terminal).into());
    }
}

/// The message a panic was given (`panic!("...")` carries a `&str` or a `String`).
fn panic_message(panic: &(dyn Any + Send)) -> &str {
    match (panic.downcast_ref::<&str>(), panic.downcast_ref::<String>()) {
        (Some(message), _) => message,
        (_, Some(message)) => message,
        _ => "(no message)",
    }
}

enum Internal {
    Token(Result<String, String>),
    Flush,
    ResendStale,
    /// The retry of a room's refused join: its room and the retry's number (`Room::retry`).
    RetryJoin(String, u64),
    FlushJoins,
    FlushRequests,
    TypingIdle(String),
}

struct Room {
    /// When the app joined it (`Driver::rooms_joined` then): after a reconnect the rooms are
    /// joined again in this order, the app's, as in the JS and Python clients (the room it
    /// joined first is back first when the join pacer lets joins go a few at a time).
    order: u64,
    state: RoomState,
    seq: RoomSeq,
    /// The connection generation on which `joined` arrived.
    joined_on: Option<u64>,
    /// The `last_id` of a re-join's `joined`: the replay ends there (0: no replay to wait
    /// for). Sends wait for it, since the replay may hold the lost echo of a send (its
    /// acknowledgement): see [`Room::replayed`].
    replay_until: u64,
    /// The request id of the `ping` written behind a `joined` whose replay has no known end,
    /// until its answer: the server answers a connection's frames in order, so it comes
    /// after the `joined` and its whole replay, if any (a `recovered: false` may have none,
    /// and then no message reaches `replay_until`), and ends the replay.
    sync_rid: Option<u64>,
    waiters: Vec<Reply<Joined>>,
    /// The answer to the latest join (on any connection): a `join` of the room while it is
    /// `Joined` resolves with it at once.
    joined: Option<Joined>,
    /// Waits in the join queue for the join pacer.
    join_queued: bool,
    /// The request id of this room's `join` on the wire, until its answer. An answer to
    /// another join of the room's name (one written before a `leave`) is not this room's.
    join_rid: Option<u64>,
    /// The join on the wire carried `since`: a re-join of a room the app had (after a
    /// reconnect, a gap, a `not_in_room`, or `Client::join_from`). Refused for good, the room is
    /// [`Event::Removed`].
    join_since: bool,
    /// The joins of the room refused for now (`unavailable`) in a row on this connection: the
    /// next retry waits the backoff of this attempt. A `joined`, and a new connection, reset it.
    join_refusals: u32,
    /// The number of the retry due for a join refused for now (`unavailable`): a retry
    /// whose number is not the room's (the room was left, the connection lost, or a join
    /// went meanwhile) is cancelled.
    retry: Option<u64>,
}

impl Room {
    /// Whether the replay of the latest `joined` is in: none was due, the messages up to its
    /// `last_id` came, or the answer to the `ping` behind it did.
    fn replayed(&self) -> bool {
        self.replay_until == 0 || self.seq.last().is_some_and(|last| last >= self.replay_until)
    }
}

struct PendingRequest {
    cmd: ClientCommand,
    reply: Reply<ServerEvent>,
    sent_on: Option<u64>,
}

/// What a token callback that answered an empty token is told as (`Error::Token`).
const NO_TOKEN: &str = "the callback returned an empty token";

/// Why a connection attempt failed.
struct Refused {
    reason: String,
    /// The HTTP status of a refused upgrade (401: the token was refused).
    status: Option<u16>,
    /// The refusal's `Retry-After` (a full or draining server's 503, a 429).
    retry_after: Option<Duration>,
    /// No attempt can connect, whatever the server does: the URL (`unusable_url`), a token
    /// callback that gives no token, or a server certificate that fails verification
    /// (`certificate_problem`).
    for_good: bool,
    /// The close code the client stops with when `for_good` (4001 for no token, as the JS and
    /// Python clients stop with it; 1015 for a certificate; `None` for an unusable URL).
    stop_code: Option<u16>,
}

/// `url` with the value of a `token` query parameter (the server takes a JWT there too) shown as
/// `***`, for the reasons the app may log, as the server's logs blank it.
fn redacted(url: &str) -> String {
    let Some((base, query)) = url.split_once('?') else { return url.to_owned() };
    let (query, fragment) = query.split_once('#').map_or((query, None), |(q, f)| (q, Some(f)));
    let params: Vec<&str> = query.split('&').map(|p| if p.starts_with("token=") { "token=***" } else { p }).collect();
    let fragment = fragment.map(|f| format!("#{f}")).unwrap_or_default();
    format!("{base}?{}{fragment}", params.join("&"))
}

/// Why no attempt can connect to the URL, whatever the server does, or `None` when a later one
/// may (the TCP connection refused, say): `wss://` without TLS compiled in, a scheme other than
/// `ws` or `wss`, no host. Retried, each such attempt failed the same, with the backoff, for ever.
fn unusable_url(error: &tokio_tungstenite::tungstenite::Error) -> Option<&'static str> {
    use tokio_tungstenite::tungstenite::error::Error;
    match error {
        Error::Url(UrlError::TlsFeatureNotEnabled) => Some(
            "wss:// needs TLS, not compiled into tokio-tungstenite: enable the `native-tls` feature \
             (or a `rustls-tls-*` one) of wschat or of tokio-tungstenite in the app's Cargo.toml \
             (see the wschat client's README)",
        ),
        Error::Url(UrlError::UnableToConnect(_)) => None,
        Error::Url(_) => Some("the URL must be ws:// or wss:// with a host"),
        _ => None,
    }
}

/// The close code a client stops with when the server's TLS certificate fails verification:
/// RFC 6455's 1015 (never sent on the wire: "the server certificate can't be verified"), as the
/// JS and Python clients report it.
pub(crate) const TLS_CLOSE_CODE: u16 = 1015;

/// Words of a certificate that failed verification, as the TLS stacks word it: OpenSSL
/// (native-tls on Linux: "certificate verify failed ... (unable to get local issuer
/// certificate)", "(hostname mismatch)"), rustls ("invalid peer certificate: UnknownIssuer"),
/// Apple's Security framework and Windows' SChannel ("... not trusted", "The target principal
/// name is incorrect").
const CERTIFICATE_FAILURES: &[&str] =
    &["certificate verify failed", "invalid peer certificate", "not trusted", "target principal name is incorrect"];

/// Why the server's TLS certificate failed verification (untrusted, self-signed, for another
/// host, expired), or `None` for any other failure. Such a certificate is a configuration
/// problem: the next attempt gets the same one (a handshake cut short, by a reset or a timeout,
/// is an outage, and retried). Read from the error's text: the TLS stack is the app's choice
/// (tokio-tungstenite's features), whose error types this crate cannot name.
fn certificate_problem(error: &tokio_tungstenite::tungstenite::Error) -> Option<String> {
    use tokio_tungstenite::tungstenite::Error;
    let text = match error {
        Error::Tls(tls) => tls.to_string(),
        Error::Io(io) => io.to_string(), // rustls's errors come as `Io`
        _ => return None,
    };
    let lower = text.to_lowercase();
    CERTIFICATE_FAILURES.iter().any(|words| lower.contains(words)).then(|| {
        format!("TLS certificate verification failed: {text} (trust its CA: see the wschat client's README, TLS)")
    })
}

/// How one connection ended.
struct Ended {
    code: Option<u16>,
    reason: String,
    /// The app asked for it: `Reconnect` (at once) or `Close` (stop).
    by_app: Option<bool>,
}

type Socket = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

pub(crate) struct Driver {
    cfg: ClientBuilder,
    ops: mpsc::UnboundedReceiver<Op>,
    events: mpsc::UnboundedSender<Delivery>,
    internal_tx: mpsc::UnboundedSender<Internal>,
    internal_rx: mpsc::UnboundedReceiver<Internal>,
    snapshot: watch::Sender<Snapshot>,
    rooms: HashMap<String, Room>,
    outbox: Outbox,
    acks: HashMap<String, Reply<Acked>>,
    /// Requests by id, in the order of the calls (ids grow): those not written on this
    /// connection wait for the request pacer (`flush_requests`).
    requests: BTreeMap<u64, PendingRequest>,
    /// How many requests may be unanswered now, the pause after a `rate_limited` one, and the
    /// pace after it (`pacer::JoinPacer`, the rules of joins).
    request_pacer: JoinPacer,
    /// When the earliest wake-up of the request queue is due.
    request_flush_at: Option<std::time::Instant>,
    /// Request id of a written send -> its `client_msg_id`.
    send_rids: HashMap<u64, String>,
    /// Request id of a written join -> its room.
    join_rids: HashMap<u64, String>,
    /// Request id of a `ping` written behind a `joined` (a room's `sync_rid`, or one a newer
    /// join of its room replaced) -> when it was written: a `rate_limited` answer pauses the
    /// request pacer as a refusal of one of its own requests does (the bucket is theirs).
    sync_pings: HashMap<u64, std::time::Instant>,
    /// Rooms whose join waits for the join pacer, in order (a refused one goes first).
    join_queue: VecDeque<String>,
    /// How many joins may be unanswered now, the pause after a `rate_limited` join, and
    /// the pace after it (`pacer::JoinPacer`).
    join_pacer: JoinPacer,
    /// When the earliest wake-up of the join queue is due. One due later (an earlier pause
    /// of the join pacer, or another connection's) gets an earlier one beside it.
    join_flush_at: Option<std::time::Instant>,
    /// The ids of the DMs surfaced, the newest `SEEN_DMS`: a DM id seen is a double. Kept
    /// across connections only with persistence (the welcome has `dm_backlog`), where a page of
    /// kept DMs may come again.
    seen_dms: VecDeque<u64>,
    seen_dm_set: HashSet<u64>,
    /// Every user id a `welcome` gave this client (a guest gets a new one per connection; a
    /// refreshed token may name another): only an echo from one of them acknowledges a send
    /// (`Pending::echoed_by`), as in the JS and Python clients.
    own_ids: HashSet<String>,
    /// When `typing: true` last went out, per room (cleared by `false`, a send, a new socket).
    typing_sent: HashMap<String, Instant>,
    /// When the app last called `typing(room, true)`.
    typing_calls: HashMap<String, Instant>,
    /// Frames to write after the current handler.
    outgoing: Vec<String>,
    next_rid: u64,
    /// Rooms the app has joined so far (`Room::order`).
    rooms_joined: u64,
    generation: u64,
    /// `welcome` arrived on the current socket.
    online: bool,
    /// A `welcome` arrived since the client was started: a server certificate that fails
    /// verification is then a server-side incident, retried (before, a misconfiguration).
    connected_once: bool,
    attempt: u32,
    retry_after: Option<Duration>,
    token: Option<String>,
    /// When the refresh timer fires, and what is due then (a wait past a day is capped:
    /// `token::refresh_wait`).
    refresh_at: Option<(Instant, RefreshDue)>,
    refresh_rid: Option<u64>,
    /// Token refreshes refused (or token callback failures) in a row: the next waits longer.
    refresh_failures: u32,
    /// When the current connection got its `welcome` (see `went_offline`).
    online_since: Option<Instant>,
    heartbeat: Duration,
    /// When the earliest wake-up of the outbox is due (the end of a pause, or the pace's next
    /// token; one timer for all the sends). One due later (an earlier pause or pace, or another
    /// connection's) gets an earlier one beside it.
    flush_at: Option<std::time::Instant>,
    /// How many sends may be written and unacknowledged now (`max_in_flight`, down
    /// to 1 after `rate_limited`, one wider again per acknowledgement), the pause
    /// after a refusal (`rate_limited` until its `retry_after_ms`, `unavailable` for
    /// a backoff), and after `rate_limited` the server's pace (`pacer.rs`).
    pacer: Pacer,
    /// A look for sends written long ago and still unacknowledged is due.
    resend_check_scheduled: bool,
    /// Refusals in a row (`unavailable`), for the retry backoff; reset by an ack.
    send_retries: u32,
    /// `WSCHAT_CLIENT_DEBUG=1`: every frame in and out on stderr.
    debug: bool,
}

const SEEN_DMS: usize = 1024;
/// Pending requests kept before those whose callers gave up are dropped (a `leave` stays).
const REQUESTS_KEPT: usize = 64;
/// `typing: true` goes out at most this often while the app keeps calling.
const TYPING_REPEAT: Duration = Duration::from_secs(1);
/// `typing: false` goes out by itself this long after the app's last call.
const TYPING_IDLE: Duration = Duration::from_secs(3);
/// After the server's Close frame, how long to wait for it to close the TCP connection before
/// the client ends it (the server waits as long for a client's answer, `CLOSE_HANDSHAKE_TIMEOUT`).
const CLOSE_WAIT: Duration = Duration::from_secs(3);

/// What a `leave` resolves with when no reply is needed (offline, or the socket
/// is gone and the membership with it); `Client::leave` returns `()` anyway.
const LEFT: Result<ServerEvent, Error> = Ok(ServerEvent::Unknown);

impl Driver {
    /// Starts the task on the current Tokio runtime.
    pub(crate) fn spawn(
        cfg: ClientBuilder,
        ops: mpsc::UnboundedReceiver<Op>,
        events: mpsc::UnboundedSender<Delivery>,
        snapshot: watch::Sender<Snapshot>,
        outbox: Outbox,
    ) {
        let (internal_tx, internal_rx) = mpsc::unbounded_channel();
        let pacer = Pacer::new(cfg.max_in_flight);
        let join_pacer = JoinPacer::new(cfg.max_joins_in_flight);
        let request_pacer = JoinPacer::new(cfg.max_requests_in_flight);
        let driver = Driver {
            cfg,
            ops,
            events,
            internal_tx,
            internal_rx,
            snapshot,
            rooms: HashMap::new(),
            outbox,
            acks: HashMap::new(),
            requests: BTreeMap::new(),
            request_pacer,
            request_flush_at: None,
            send_rids: HashMap::new(),
            join_rids: HashMap::new(),
            sync_pings: HashMap::new(),
            join_queue: VecDeque::new(),
            join_pacer,
            join_flush_at: None,
            seen_dms: VecDeque::new(),
            seen_dm_set: HashSet::new(),
            own_ids: HashSet::new(),
            typing_sent: HashMap::new(),
            typing_calls: HashMap::new(),
            outgoing: Vec::new(),
            next_rid: 0,
            rooms_joined: 0,
            generation: 0,
            online: false,
            connected_once: false,
            attempt: 0,
            retry_after: None,
            token: None,
            refresh_at: None,
            refresh_rid: None,
            refresh_failures: 0,
            online_since: None,
            heartbeat: Duration::from_secs(30),
            flush_at: None,
            pacer,
            resend_check_scheduled: false,
            send_retries: 0,
            debug: std::env::var_os("WSCHAT_CLIENT_DEBUG").is_some_and(|v| v == "1"),
        };
        let (events, snapshot) = (driver.events.clone(), driver.snapshot.clone());
        tokio::spawn(supervise(driver.run(), events, snapshot));
    }

    async fn run(mut self) {
        let mut wait = Duration::ZERO;
        loop {
            if !wait.is_zero() && !self.idle(wait).await {
                return self.shut_down(Error::Closed);
            }
            self.set_state(ConnectionState::Connecting);
            let ended = match self.connect().await {
                Ok(Some(socket)) => self.serve(socket).await,
                Ok(None) => return self.shut_down(Error::Closed),
                // A certificate that fails verification after the client has been connected:
                // the server's certificate expired or was rotated wrongly, an incident its
                // operator fixes. Retried with the backoff (1015 reconnects), rooms and
                // outbox kept, each attempt told (`Event::Error`, then `Disconnected`).
                Err(Refused { reason, stop_code: Some(TLS_CLOSE_CODE), .. }) if self.connected_once => {
                    self.emit(Event::Error(Error::local("tls_certificate", reason.clone())));
                    Ended { code: Some(TLS_CLOSE_CODE), reason, by_app: None }
                }
                // Not a URL any attempt can connect to, or a certificate failure before any
                // `welcome` (a misconfiguration): stop, as after a terminal refusal.
                Err(Refused { reason, for_good: true, stop_code: code, .. }) => {
                    self.went_offline();
                    self.emit(Event::Disconnected { code, reason: reason.clone(), reconnect_in: None });
                    return self.shut_down(Error::Terminal { code, reason });
                }
                // A token refused at the upgrade (401) is what 4001/4002 are on an open socket.
                Err(Refused { reason, status: Some(401), .. }) => Ended { code: Some(4001), reason, by_app: None },
                Err(Refused { reason, status, retry_after, .. }) => {
                    // A full or draining server says when to come back: not sooner.
                    self.retry_after = self.retry_after.max(retry_after);
                    // The HTTP status (never a close code: those start at 1000) decides.
                    Ended { code: status, reason, by_app: None }
                }
            };
            self.went_offline();
            match ended.by_app {
                Some(false) => return self.shut_down(Error::Closed),
                Some(true) => {
                    // The app asks for a fresh attempt now: a `rate_limited` wait this connection
                    // was told (a floor for the reconnect after a 4102 here) is not carried over
                    // to a refusal of the next one (as in the JS and Python clients).
                    self.retry_after = None;
                    wait = Duration::ZERO;
                    self.emit(Event::Disconnected { code: ended.code, reason: ended.reason, reconnect_in: Some(wait) });
                    continue;
                }
                None => {}
            }
            let next = self.next_delay(ended.code);
            self.emit(Event::Disconnected { code: ended.code, reason: ended.reason.clone(), reconnect_in: next });
            match next {
                Some(delay) => wait = delay,
                None => return self.shut_down(Error::Terminal { code: ended.code, reason: ended.reason }),
            }
        }
    }

    /// The delay before the next attempt, or `None` when the close code (or the HTTP
    /// status of a refused upgrade: 403, 400, 404, ... cannot change by retrying) forbids one.
    fn next_delay(&mut self, code: Option<u16>) -> Option<Duration> {
        let r = fastrand::f64();
        let b = self.cfg.backoff;
        let action = match code {
            Some(status @ ..1000) => refusal_action(status),
            code => close_action(code),
        };
        let delay = match action {
            // "At once" after a connection that stayed up; after one that did not (a pod
            // draining as soon as it greets), the backoff grows as for any other close.
            CloseAction::ReconnectNow if self.attempt == 0 => b.going_away_delay(r),
            CloseAction::ReconnectNow => b.delay(self.attempt, r),
            CloseAction::Reconnect => b.delay(self.attempt, r),
            CloseAction::ReconnectAfterPause => b.pause_delay(self.attempt, r),
            CloseAction::NeedsFreshToken if self.cfg.token.is_some() => b.delay(self.attempt, r),
            CloseAction::NeedsFreshToken | CloseAction::Terminal => return None,
        };
        self.attempt = self.attempt.saturating_add(1);
        Some(delay.max(self.retry_after.take().unwrap_or_default()))
    }

    /// Waits `delay` while serving the app offline; false when the client must stop.
    async fn idle(&mut self, delay: Duration) -> bool {
        let deadline = sleep(delay);
        tokio::pin!(deadline);
        loop {
            tokio::select! {
                _ = &mut deadline => return true,
                op = self.ops.recv() => match op {
                    None | Some(Op::Close) => return false,
                    Some(Op::Reconnect) => return true,
                    Some(op) => self.handle_op(op),
                },
                Some(internal) = self.internal_rx.recv() => self.handle_internal(internal),
            }
        }
    }

    /// One connection attempt: token, URL, handshake. `Ok(None)`: the app closed the client.
    async fn connect(&mut self) -> Result<Option<Socket>, Refused> {
        let url = (self.cfg.url)();
        let shown = redacted(&url); // the URL as the reasons (events, errors) show it
        let token_fn = self.cfg.token.clone();
        #[cfg(feature = "__tls")]
        let tls_connector = self.cfg.tls_connector.clone();
        // `Connector::Plain` fails a `wss://` URL as TLS not compiled in would: say which it is.
        #[cfg(feature = "__tls")]
        let plain_connector = matches!(tls_connector, Some(crate::Connector::Plain));
        #[cfg(not(feature = "__tls"))]
        let plain_connector = false;
        let attempt = async move {
            let refused =
                |reason: String| Refused { reason, status: None, retry_after: None, for_good: false, stop_code: None };
            let token = match token_fn {
                Some(get) => Some(get().await.map_err(|e| refused(format!("token callback: {e}")))?),
                None => None,
            };
            if token.as_deref() == Some("") {
                // No token: stop (4001), as the JS and Python clients do; connecting with
                // `Bearer ` was a 401, then the same again after each backoff, for ever.
                let why = format!("token callback: {NO_TOKEN}");
                return Err(Refused { for_good: true, stop_code: Some(4001), ..refused(why) });
            }
            // A URL that does not parse cannot connect: no later attempt is better.
            let mut request = url
                .as_str()
                .into_client_request()
                .map_err(|e| Refused { for_good: true, ..refused(format!("{shown}: {e}")) })?;
            if let Some(token) = &token {
                let value = HeaderValue::from_str(&format!("Bearer {token}")).map_err(|e| refused(e.to_string()))?;
                request.headers_mut().insert("authorization", value);
            }
            // The app's connector, if any (`None`: tokio-tungstenite's default, as `connect_async`).
            #[cfg(feature = "__tls")]
            let connected = tokio_tungstenite::connect_async_tls_with_config(request, None, false, tls_connector).await;
            #[cfg(not(feature = "__tls"))]
            let connected = tokio_tungstenite::connect_async(request).await;
            let (socket, _) = connected.map_err(|e| {
                let (status, retry_after) = match &e {
                    tokio_tungstenite::tungstenite::Error::Http(response) => {
                        let header = response.headers().get("retry-after").and_then(|v| v.to_str().ok());
                        (Some(response.status().as_u16()), header.and_then(retry_after_header))
                    }
                    _ => (None, None),
                };
                if let Some(why) = unusable_url(&e) {
                    let why = match &e {
                        tokio_tungstenite::tungstenite::Error::Url(UrlError::TlsFeatureNotEnabled)
                            if plain_connector =>
                        {
                            "wss:// with the `tls_connector` `Connector::Plain`, which has no TLS"
                        }
                        _ => why,
                    };
                    return Refused { for_good: true, ..refused(format!("{shown}: {e}: {why}")) };
                }
                match certificate_problem(&e) {
                    // Stop (1015), as the JS and Python clients do: it was retried for ever.
                    // (`run` retries it instead once the client has been connected.)
                    Some(why) => Refused {
                        for_good: true,
                        stop_code: Some(TLS_CLOSE_CODE),
                        ..refused(format!("{shown}: {why}"))
                    },
                    None => Refused { status, retry_after, ..refused(format!("{shown}: {e}")) },
                }
            })?;
            Ok::<_, Refused>((socket, token))
        };
        let attempt = timeout(self.cfg.connect_timeout, attempt);
        tokio::pin!(attempt);
        loop {
            tokio::select! {
                result = &mut attempt => {
                    return match result {
                        Ok(Ok((socket, token))) => {
                            self.token = token;
                            Ok(Some(socket))
                        }
                        Ok(Err(refused)) => {
                            if refused.reason.starts_with("token callback") {
                                self.emit(Event::Error(Error::Token(refused.reason.clone())));
                            }
                            Err(refused)
                        }
                        Err(_) => Err(Refused {
                            reason: "connection attempt timed out".into(),
                            status: None,
                            retry_after: None,
                            for_good: false,
                            stop_code: None,
                        }),
                    };
                }
                op = self.ops.recv() => match op {
                    None | Some(Op::Close) => return Ok(None),
                    Some(Op::Reconnect) => {}
                    Some(op) => self.handle_op(op),
                },
                Some(internal) = self.internal_rx.recv() => self.handle_internal(internal),
            }
        }
    }

    /// Serves one socket until it ends.
    async fn serve(&mut self, socket: Socket) -> Ended {
        self.generation += 1;
        self.online = false;
        self.heartbeat = Duration::from_secs(30);
        let (mut sink, mut stream) = socket.split();
        let mut last_frame = Instant::now();
        let mut close: Option<(u16, String)> = None;
        let mut closed_at: Option<Instant> = None;
        let far = Duration::from_secs(86400 * 365);
        let ended = loop {
            // The server pings every heartbeat interval; silence for two means the path is dead.
            // After its Close frame (answered by tungstenite), the server closes the TCP
            // connection: wait for that only CLOSE_WAIT (RFC 6455 7.1.1), not two heartbeats.
            let liveness = sleep_until(match closed_at {
                Some(at) => at + CLOSE_WAIT,
                None => last_frame + self.heartbeat * 2 + Duration::from_secs(5),
            });
            let refresh = sleep_until(self.refresh_at.map_or_else(|| Instant::now() + far, |(at, _)| at));
            tokio::select! {
                frame = stream.next() => match frame {
                    Some(Ok(message)) => {
                        last_frame = Instant::now();
                        match message {
                            Message::Text(text) => {
                                if self.debug {
                                    eprintln!("wschat < {text}");
                                }
                                self.handle_text(text.as_str())
                            }
                            Message::Close(frame) => {
                                // No status code in the frame is 1005 (RFC 6455 7.1.5), as the JS
                                // and Python clients report it; `None` stays a drop without a Close.
                                close = Some(frame.map_or((1005, String::new()), |f| {
                                    (u16::from(f.code), f.reason.as_str().to_owned())
                                }));
                                closed_at.get_or_insert_with(Instant::now);
                            }
                            _ => {}
                        }
                    }
                    Some(Err(e)) => break Ended { code: close.as_ref().map(|c| c.0), reason: e.to_string(), by_app: None },
                    None => {
                        let (code, reason) = close.clone().map_or((None, "connection closed".to_owned()), |(c, r)| (Some(c), r));
                        break Ended { code, reason, by_app: None };
                    }
                },
                op = self.ops.recv() => match op {
                    None | Some(Op::Close) => {
                        let frame = CloseFrame { code: CloseCode::Normal, reason: "".into() };
                        let _ = timeout(Duration::from_secs(1), sink.send(Message::Close(Some(frame)))).await;
                        break Ended { code: Some(1000), reason: "closed by the app".into(), by_app: Some(false) };
                    }
                    Some(Op::Reconnect) => break Ended { code: None, reason: "reconnect asked by the app".into(), by_app: Some(true) },
                    Some(op) => self.handle_op(op),
                },
                Some(internal) = self.internal_rx.recv() => self.handle_internal(internal),
                _ = liveness => break match (closed_at, close.clone()) {
                    (Some(_), Some((code, reason))) => Ended { code: Some(code), reason, by_app: None },
                    (Some(_), None) => Ended { code: None, reason: "connection closed".into(), by_app: None },
                    (None, _) => Ended { code: None, reason: "no frame from the server for two heartbeats".into(), by_app: None },
                },
                _ = refresh, if self.refresh_at.is_some() => match self.refresh_at.take() {
                    Some((_, RefreshDue::LookAgain)) => self.schedule_refresh(),
                    _ => self.fetch_token(),
                },
            }
            if !self.outgoing.is_empty() {
                let mut failed = None;
                for text in self.outgoing.drain(..) {
                    if self.debug {
                        eprintln!("wschat > {text}");
                    }
                    if let Err(e) = sink.feed(Message::text(text)).await {
                        failed = Some(e);
                        break;
                    }
                }
                let failed = match failed {
                    Some(e) => Some(e),
                    None => sink.flush().await.err(),
                };
                if let Some(e) = failed {
                    // After the server's Close frame a write fails ("Sending after closing"):
                    // the close code is what ended the connection (4102 must pause).
                    let (code, reason) = close.clone().map_or((None, e.to_string()), |(c, r)| (Some(c), r));
                    break Ended { code, reason, by_app: None };
                }
            }
        };
        self.outgoing.clear();
        ended
    }

    /// The socket ended: rooms go back to joining, requests wait for the next one.
    fn went_offline(&mut self) {
        self.online = false;
        if self.online_since.take().is_some_and(|since| since.elapsed() >= self.cfg.stable_after) {
            self.attempt = 0;
        }
        self.refresh_at = None;
        self.refresh_rid = None;
        self.send_rids.clear();
        self.join_rids.clear();
        self.sync_pings.clear();
        self.join_queue.clear();
        self.join_pacer.reset();
        self.join_flush_at = None; // the new connection's pacer has no pause to wake up from
        self.request_pacer.reset();
        self.request_flush_at = None;
        self.flush_at = None; // the new connection's flush sets its own wake-up (its pacer's)
        self.typing_sent.clear();
        // The answers to the sends of a left room went with the socket: they fail, and are not
        // written again (`drop_room_sends`).
        self.fail_left(None, "the connection closed before its answer");
        let mut changed = Vec::new();
        for (name, room) in self.rooms.iter_mut() {
            room.joined_on = None;
            room.sync_rid = None;
            room.join_queued = false;
            room.join_rid = None;
            room.retry = None;
            room.join_refusals = 0;
            if room.state == RoomState::Joined {
                room.state = RoomState::Joining;
                changed.push((room.order, name.clone()));
            }
        }
        changed.sort();
        for (_, room) in changed {
            self.emit(Event::Room { room, state: RoomState::Joining });
        }
        // A leave in flight is done: the server dropped the membership with the socket.
        // A kick, mute or unmute written on it may or may not have been carried out:
        // it fails (`disconnected`) rather than being done twice by a resend. Reads
        // (`history`, `list_users`, `ping`) wait for the next connection and go again.
        let generation = self.generation;
        let settled: Vec<u64> = self
            .requests
            .iter()
            .filter(|(_, r)| {
                matches!(r.cmd, ClientCommand::Leave { .. })
                    || (r.cmd.moderation().is_some() && r.sent_on == Some(generation))
            })
            .map(|(id, _)| *id)
            .collect();
        for rid in settled {
            if let Some(req) = self.requests.remove(&rid) {
                let result = match req.cmd.moderation() {
                    Some(what) => Err(Error::local(
                        "disconnected",
                        format!("the connection closed before the {what} was answered: it may have been done"),
                    )),
                    None => LEFT,
                };
                let _ = req.reply.send(result);
            }
        }
        self.set_state(ConnectionState::Disconnected);
    }

    /// The client stops: by the app (`Error::Closed`), or for good (`Error::Terminal`: a close
    /// code or a refused upgrade that forbids reconnecting), which everything waiting fails
    /// with, and every later call too (`Client::call`, `Client::wait_connected`), as after a
    /// panic of the task: the app learns why (the code) where it waits, not only from the events.
    fn shut_down(mut self, error: Error) {
        self.online = false;
        if error != Error::Closed {
            self.snapshot.send_modify(|s| s.ended = Some(error.clone()));
            self.emit(Event::Error(error.clone()));
        }
        for (_, room) in self.rooms.drain() {
            for w in room.waiters {
                let _ = w.send(Err(error.clone()));
            }
        }
        for (_, reply) in self.acks.drain() {
            let _ = reply.send(Err(error.clone()));
        }
        for (_, req) in std::mem::take(&mut self.requests) {
            let _ = req.reply.send(Err(error.clone()));
        }
        self.set_state(ConnectionState::Disconnected);
        // Requests still queued in the channel get `Closed` (or the terminal error) from their
        // handles once the receiver is dropped with `self`.
    }

    /// Hands `event` to the app, with the position of the room it is about (`None`: not ours
    /// any more) when it may have moved it: every change of a room's position (a message
    /// delivered, a `joined`, the room joined or gone) is followed by one of these events, which
    /// [`Events`](crate::Events) records as it hands them over (`Client::position`).
    fn emit(&self, event: Event) {
        let room = match &event {
            Event::Message(ChatMessage { room, .. })
            | Event::Joined(Joined { room, .. })
            | Event::RecoveryFailed { room, .. }
            | Event::Room { room, .. }
            | Event::Removed { room, .. } => Some(room),
            _ => None,
        };
        let position = room.map(|room| {
            let seq = self.rooms.get(room).map(|r| &r.seq);
            let at = seq.map(|seq| RoomPosition { last_id: seq.last(), epoch: seq.epoch().map(str::to_owned) });
            (room.clone(), at)
        });
        let _ = self.events.send(Delivery { event, position });
    }

    fn set_state(&mut self, state: ConnectionState) {
        let changed = self.snapshot.borrow().state != state;
        if changed {
            self.snapshot.send_modify(|s| s.state = state);
            self.emit(Event::State(state));
        }
    }

    fn rid(&mut self) -> u64 {
        self.next_rid += 1;
        self.next_rid
    }

    fn write(&mut self, cmd: &ClientCommand) {
        self.outgoing.push(cmd.to_json());
    }

    fn save_outbox(&mut self) {
        if let Some(store) = &self.cfg.outbox_store {
            store.save(&self.outbox.snapshot());
        }
        let len = self.outbox.len();
        self.snapshot.send_modify(|s| s.outbox_len = len);
    }

    fn handle_op(&mut self, op: Op) {
        match op {
            Op::Join { room, from, reply } => {
                let order = self.rooms_joined;
                let entry = self.rooms.entry(room.clone()).or_insert_with(|| Room {
                    order,
                    state: RoomState::Left,
                    // Resumed (`Client::join_from`): its first join goes with `since` and `epoch`.
                    seq: from
                        .map_or_else(RoomSeq::default, |(since, epoch)| RoomSeq::resuming(since, epoch.as_deref())),
                    joined_on: None,
                    replay_until: 0,
                    sync_rid: None,
                    waiters: Vec::new(),
                    joined: None,
                    join_queued: false,
                    join_rid: None,
                    join_since: false,
                    join_refusals: 0,
                    retry: None,
                });
                // Joined: its latest answer, at once; joining: the answer of the join (or retry)
                // under way; only a new room writes a join, as in the JS and Python clients.
                // (Writing one for a joined room re-joined it with `since`: a replay and a
                // request token for nothing.)
                match (entry.state, &entry.joined) {
                    (RoomState::Joined, Some(joined)) => {
                        let _ = reply.send(Ok(joined.clone()));
                    }
                    (RoomState::Left, _) => {
                        self.rooms_joined += 1;
                        entry.waiters.push(reply);
                        entry.state = RoomState::Joining;
                        self.emit(Event::Room { room: room.clone(), state: RoomState::Joining });
                        if self.online {
                            self.send_join(&room, false);
                        }
                    }
                    _ => entry.waiters.push(reply),
                }
            }
            Op::Leave { room, reply } => {
                let Some(left) = self.rooms.remove(&room) else {
                    let _ = reply.send(LEFT);
                    return;
                };
                for w in left.waiters {
                    let _ = w.send(Err(Error::Left));
                }
                self.emit(Event::Room { room: room.clone(), state: RoomState::Left });
                // Sends already written go ahead of the `leave`: the server stores them
                // and their echoes come before the `left`.
                self.drop_room_sends(&room, &Error::local("not_in_room", format!("left {room}")));
                // Only a room the server has the user in: one whose join still waits for the
                // join pacer (or a retry) was never joined on this connection, and the server
                // would answer `not_in_room` (as the JS client, which writes no `leave` then).
                if self.online && (left.state == RoomState::Joined || left.join_rid.is_some()) {
                    // Its turn in the request queue (`flush_requests`), as the other requests.
                    let id = self.rid();
                    let cmd = ClientCommand::Leave { room, id: None };
                    self.requests.insert(id, PendingRequest { cmd, reply, sent_on: None });
                    self.flush_requests();
                } else {
                    let _ = reply.send(LEFT);
                }
            }
            Op::Send { target, text, reply } => {
                if let Target::Room(room) = &target {
                    self.typing_sent.remove(room); // the server ends typing on a message
                }
                let client_msg_id = new_client_msg_id();
                if self.outbox.push(OutboxEntry { client_msg_id: client_msg_id.clone(), target, text }).is_err() {
                    let _ = reply.send(Err(Error::OutboxFull));
                    return;
                }
                self.acks.insert(client_msg_id, reply);
                self.save_outbox();
                self.flush_outbox();
            }
            Op::Request { cmd, reply } => {
                if self.requests.len() >= REQUESTS_KEPT {
                    // Callers that timed out leave their entries behind (a `leave` stays: it is
                    // written all the same, `flush_requests`).
                    self.requests.retain(|_, r| !r.reply.is_closed() || matches!(r.cmd, ClientCommand::Leave { .. }));
                }
                let id = self.rid();
                self.requests.insert(id, PendingRequest { cmd, reply, sent_on: None });
                self.flush_requests();
            }
            Op::Typing { room, status } => {
                if !self.online {
                    return;
                }
                let now = Instant::now();
                if status {
                    self.typing_calls.insert(room.clone(), now);
                    if self.typing_sent.get(&room).is_some_and(|at| now.duration_since(*at) < TYPING_REPEAT) {
                        return;
                    }
                    if self.typing_sent.insert(room.clone(), now).is_none() {
                        self.later(TYPING_IDLE, Internal::TypingIdle(room.clone()));
                    }
                } else if self.typing_sent.remove(&room).is_none() {
                    return;
                }
                self.write(&ClientCommand::Typing { room, status });
            }
            // Handled by the loops that own the socket.
            Op::Reconnect | Op::Close => {}
            #[cfg(test)]
            Op::Panic(message) => panic!("{message}"),
        }
    }

    fn handle_internal(&mut self, internal: Internal) {
        match internal {
            Internal::Token(Ok(token)) => {
                if self.online {
                    let id = self.rid();
                    self.refresh_rid = Some(id);
                    self.write(&ClientCommand::Auth { token: token.clone(), id: Some(RequestId::Int(id)) });
                }
                self.token = Some(token);
            }
            Internal::Token(Err(e)) => {
                self.emit(Event::Error(Error::Token(e)));
                if self.online {
                    self.retry_refresh(None);
                }
            }
            Internal::Flush => {
                // Only the wake-up due (a later one may still come: it finds nothing to do).
                if self.flush_at.is_some_and(|at| at <= Instant::now().into_std()) {
                    self.flush_at = None;
                }
                self.flush_outbox();
            }
            Internal::ResendStale => {
                self.resend_check_scheduled = false;
                if !self.online {
                    return;
                }
                // Echoes that never came (a server can lose one, e.g. while it
                // resubscribes to Redis): write those sends again; the server
                // answers a resend with the original message.
                let stale = Instant::now() - self.cfg.resend_after;
                // Those of a left room are not: they fail (`drop_room_sends`).
                self.fail_left(Some(stale.into_std()), "no echo came within resend_after");
                let (expired, waiting) = self.outbox.expire_sent(stale.into_std());
                if expired > 0 {
                    self.flush_outbox();
                } else if waiting > 0 {
                    self.resend_check_scheduled = true;
                    self.later(self.cfg.resend_after / 2, Internal::ResendStale);
                }
            }
            Internal::TypingIdle(room) => {
                let Some(last) = self.typing_calls.get(&room).copied() else { return };
                if !self.online || !self.typing_sent.contains_key(&room) {
                    return;
                }
                let idle = Instant::now().duration_since(last);
                if idle >= TYPING_IDLE {
                    self.typing_sent.remove(&room);
                    self.write(&ClientCommand::Typing { room, status: false });
                } else {
                    self.later(TYPING_IDLE - idle, Internal::TypingIdle(room));
                }
            }
            Internal::RetryJoin(room, retry) => {
                // A first join, a re-join after a reconnect, or one after a gap: still wanted
                // unless the room was left (a room of that name joined again is another
                // room), the connection lost (the new one re-joins every room), or a join
                // of the room went meanwhile.
                if self.rooms.get(&room).is_some_and(|r| r.retry == Some(retry)) {
                    self.send_join(&room, false);
                }
            }
            Internal::FlushRequests => {
                if self.request_flush_at.is_some_and(|at| at <= Instant::now().into_std()) {
                    self.request_flush_at = None;
                }
                self.flush_requests();
            }
            Internal::FlushJoins => {
                // Only the wake-up due (a later one may still come: it finds nothing to do).
                if self.join_flush_at.is_some_and(|at| at <= Instant::now().into_std()) {
                    self.join_flush_at = None;
                }
                self.flush_joins();
            }
        }
    }

    /// Asks the token callback for a fresh token, on a task of its own; a client that ends
    /// meanwhile drops the callback's future (`until_ended`).
    fn fetch_token(&mut self) {
        if let Some(get) = self.cfg.token.clone() {
            let tx = self.internal_tx.clone();
            tokio::spawn(until_ended(tx.clone(), async move {
                // No token is the callback's failure: the current token stays, and the refresh
                // is tried again (an `auth` with an empty token was refused, as in JS and Python).
                let token = get().await.and_then(|t| if t.is_empty() { Err(NO_TOKEN.to_owned()) } else { Ok(t) });
                let _ = tx.send(Internal::Token(token));
            }));
        }
    }

    /// A refresh refused by the server (any code: a token refusal asks the callback again;
    /// `unavailable`, `internal_error`, `rate_limited`: the server cannot now), or a token
    /// callback that failed: the connection and its current token stay, and the refresh is
    /// tried again after 1 s, then the backoff growing while refusals go on, never before
    /// the server's `retry_after_ms` (as the JS and Python clients do).
    fn retry_refresh(&mut self, retry_after_ms: Option<u64>) {
        let backoff = self.cfg.backoff.delay(self.refresh_failures, fastrand::f64());
        self.refresh_failures = self.refresh_failures.saturating_add(1);
        let wait = backoff.max(Duration::from_secs(1)).max(Duration::from_millis(retry_after_ms.unwrap_or(0)));
        self.refresh_at = Some((Instant::now() + wait, RefreshDue::Fetch));
    }

    fn schedule_refresh(&mut self) {
        self.refresh_at = None;
        if self.cfg.token.is_none() {
            return;
        }
        let Some(exp) = self.token.as_deref().and_then(expiry_of) else { return };
        let now = unix_now();
        // A quarter of the lifetime before expiry, at most a minute before; a wait over a day
        // (a long-lived token, or an `exp` past an `Instant`'s range) is a day, then look again.
        let (mut wait, due) = refresh_wait(exp, now);
        if (exp as f64) <= now {
            // Past its `exp` on this clock already (a clock ahead of the server's, whose
            // leeway still takes it, or a token source that caches): another one at once
            // would be no better. The wait grows as after a refused refresh.
            wait = wait.max(self.cfg.backoff.delay(self.refresh_failures, fastrand::f64()));
            self.refresh_failures = self.refresh_failures.saturating_add(1);
        }
        self.refresh_at = Some((Instant::now() + wait, due));
    }

    /// Has `room` joined as soon as the join pacer lets a join go (`first`: before the rooms
    /// already waiting, for a join the server refused). Its sends wait for the `joined`.
    fn send_join(&mut self, room: &str, first: bool) {
        if !self.online {
            return;
        }
        let Some(r) = self.rooms.get_mut(room) else { return };
        r.retry = None; // this join serves a retry due
        if r.join_rid.is_some() {
            return; // its join is on the wire: its answer (and replay) serves this one too
        }
        r.joined_on = None;
        if r.join_queued {
            return;
        }
        r.join_queued = true;
        if first {
            self.join_queue.push_front(room.to_owned());
        } else {
            self.join_queue.push_back(room.to_owned());
        }
        self.flush_joins();
    }

    /// The server says the user is not in `room` (a send refused `not_in_room`): the room is
    /// `Joining` until a join, queued now (or already under way), is answered.
    fn rejoin(&mut self, room: &str) {
        let Some(r) = self.rooms.get_mut(room) else { return };
        if r.state == RoomState::Joined {
            r.state = RoomState::Joining;
            self.emit(Event::Room { room: room.to_owned(), state: RoomState::Joining });
        }
        // (A join on the wire, the server's answer to which comes after this refusal, is the
        // one its sends wait for: `send_join` leaves it.)
        self.send_join(room, false);
    }

    /// Writes the queued joins the join pacer lets go now: at most `max_joins_in_flight`
    /// unanswered; after `rate_limited` none before its `retry_after_ms`, then at the
    /// server's pace. Wakes up when the next may go.
    fn flush_joins(&mut self) {
        if !self.online {
            return;
        }
        while let Some(room) = self.join_queue.front().cloned() {
            if !self.rooms.get(&room).is_some_and(|r| r.join_queued) {
                self.join_queue.pop_front(); // left meanwhile
                continue;
            }
            let Some(now) = self.write_now(Internal::FlushJoins) else { return };
            self.join_queue.pop_front();
            if let Some(r) = self.rooms.get_mut(&room) {
                r.join_queued = false;
            }
            let id = self.write_join(&room);
            self.join_pacer.sent(id, now);
            // One bucket on the server for joins and requests: the request pacer counts this too.
            self.request_pacer.sent_unpaced(now);
        }
    }

    /// Writes the requests not yet written on this connection, in the order of the calls, that
    /// the request pacer lets go now: at most `max_requests_in_flight` unanswered; after
    /// `rate_limited` none before its `retry_after_ms`, then at the server's pace. Wakes up
    /// when the next may go. One whose caller gave up (its timeout) is dropped, never written,
    /// but for a `leave` (the room is gone for the app already: the server must hear of it;
    /// `went_offline` settles one the connection took with it); a `leave` of a room joined
    /// again meanwhile is not written (the join wins).
    fn flush_requests(&mut self) {
        if !self.online {
            return;
        }
        let generation = self.generation;
        let waiting: Vec<u64> =
            self.requests.iter().filter(|(_, r)| r.sent_on != Some(generation)).map(|(id, _)| *id).collect();
        for id in waiting {
            let Some(req) = self.requests.get(&id) else { continue };
            let leave = matches!(&req.cmd, ClientCommand::Leave { .. });
            let joined_again = matches!(&req.cmd, ClientCommand::Leave { room, .. } if self.rooms.contains_key(room));
            if (req.reply.is_closed() && !leave) || joined_again {
                if let Some(req) = self.requests.remove(&id) {
                    let _ = req.reply.send(LEFT);
                }
                continue;
            }
            let Some(now) = self.write_now(Internal::FlushRequests) else { return };
            let Some(req) = self.requests.get_mut(&id) else { continue };
            req.sent_on = Some(generation);
            let cmd = req.cmd.clone().with_id(RequestId::Int(id));
            self.write(&cmd);
            self.request_pacer.sent(id, now);
            // One bucket on the server for joins and requests: the join pacer counts this too.
            self.join_pacer.sent_unpaced(now);
        }
    }

    /// The time now if the join pacer (`flush`: `Internal::FlushJoins`) or the request pacer
    /// (`Internal::FlushRequests`) lets the next one be written now; `None`: the window is full
    /// (an answer frees a place), or `flush` is due when the next may go.
    fn write_now(&mut self, flush: Internal) -> Option<std::time::Instant> {
        let now = Instant::now().into_std();
        let (pacer, flush_at) = match flush {
            Internal::FlushRequests => (&self.request_pacer, &mut self.request_flush_at),
            _ => (&self.join_pacer, &mut self.join_flush_at),
        };
        let at = pacer.next_at(now)?;
        if at <= now {
            return Some(now);
        }
        if flush_at.is_none_or(|due| due > at) {
            *flush_at = Some(at);
            self.later(at - now, flush);
        }
        None
    }

    /// A request's answer came (`retry_after`: refused `rate_limited`): its place in the
    /// request pacer's window is free.
    fn request_answered(&mut self, rid: u64, retry_after: Option<Duration>) {
        let now = Instant::now().into_std();
        let freed = match retry_after {
            None => self.request_pacer.joined(rid, now),
            Some(_) => self.request_pacer.refused(rid, now, retry_after, fastrand::f64()),
        };
        if freed {
            self.flush_requests();
        }
    }

    /// Writes the `join` (with `since`: the last id delivered, and the `epoch` it was counted
    /// in, when the server named one), and returns its request id. A `ping` goes behind it
    /// only once the `joined` shows a replay with no known end.
    fn write_join(&mut self, room: &str) -> u64 {
        let id = self.rid();
        if let Some(r) = self.rooms.get_mut(room) {
            let since = r.seq.last();
            let epoch = since.and(r.seq.epoch()).map(str::to_owned);
            if since.is_some() {
                r.seq.rejoining();
            }
            r.sync_rid = None;
            r.join_rid = Some(id);
            r.join_since = since.is_some();
            self.join_rids.insert(id, room.to_owned());
            self.write(&ClientCommand::Join { room: room.to_owned(), since, epoch, id: Some(RequestId::Int(id)) });
        }
        id
    }

    /// Writes the outbox entries whose target is ready on this connection, oldest
    /// first, as long as the pacer lets them go now (the window, a pause, the pace
    /// after `rate_limited`); wakes up again when the next may go.
    fn flush_outbox(&mut self) {
        if !self.online {
            return;
        }
        let generation = self.generation;
        let rooms = &self.rooms;
        let acks = &self.acks;
        let ready = |entry: &OutboxEntry| match &entry.target {
            Target::Dm(_) => true,
            Target::Room(room) => match rooms.get(room) {
                // Joined here, and its replay is over (caught up with it, or the `pong`
                // behind it came).
                Some(r) => r.joined_on == Some(generation) && r.replayed(),
                // Not a room of ours: a send the app makes now gets the server's
                // `not_in_room`; one loaded from the store waits for the app to join.
                None => acks.contains_key(&entry.client_msg_id),
            },
        };
        // One at a time, as long as the pacer lets them go now.
        let now = Instant::now().into_std();
        let mut in_flight = self.outbox.in_flight(generation);
        let mut written = Vec::new();
        while let Some(at) = self.pacer.next_at(now, in_flight) {
            if at > now {
                let sooner = self.flush_at.is_none_or(|due| due > at);
                if sooner && self.outbox.has_unsent(generation, ready) {
                    self.flush_at = Some(at);
                    self.later(at - now, Internal::Flush);
                }
                break;
            }
            let one = self.outbox.take_unsent(generation, now, in_flight + 1, ready);
            if one.is_empty() {
                break;
            }
            self.pacer.sent(now);
            in_flight += 1;
            written.extend(one);
        }
        if !written.is_empty() && !self.resend_check_scheduled {
            self.resend_check_scheduled = true;
            self.later(self.cfg.resend_after, Internal::ResendStale);
        }
        for entry in written {
            self.next_rid += 1;
            let id = Some(RequestId::Int(self.next_rid));
            self.send_rids.insert(self.next_rid, entry.client_msg_id.clone());
            let client_msg_id = Some(entry.client_msg_id);
            let cmd = match entry.target {
                Target::Room(room) => ClientCommand::Message { room, text: entry.text, client_msg_id, id },
                Target::Dm(to) => ClientCommand::Dm { to, text: entry.text, client_msg_id, id },
            };
            self.write(&cmd);
        }
    }

    /// Hands `internal` to the driver after `delay`, from a task of its own that ends with the
    /// client should the client end first (`until_ended`).
    fn later(&self, delay: Duration, internal: Internal) {
        let tx = self.internal_tx.clone();
        tokio::spawn(until_ended(tx.clone(), async move {
            sleep(delay).await;
            let _ = tx.send(internal);
        }));
    }

    fn handle_text(&mut self, text: &str) {
        let event = match ServerEvent::parse(text) {
            Ok(event) => event,
            Err(e) => {
                // A room message whose `id` is not a message id cannot be put in order (nor
                // delivered), but if it echoes a send, the send is acknowledged, as in the JS
                // and Python clients: the server stored it (written again, it would only be
                // answered with the same echo, until `send_timeout`).
                // The same for a direct message (as for a room message, it is not delivered:
                // its id could not tell it from another DM).
                if let Some(echo) = ChatMessage::unordered(text) {
                    self.acknowledge_message(&echo);
                } else if let Some(echo) = DirectMessage::unordered(text) {
                    self.acknowledge_dm(&echo);
                }
                let message = format!("unparsable event ({e}): {text:.200}");
                self.emit(Event::Error(Error::local("invalid_event", message)));
                return;
            }
        };
        match event {
            ServerEvent::Welcome { user_id, username, authenticated, heartbeat_interval, dm_backlog, id, .. } => {
                // Read by protocol::heartbeat_interval (1 s to a day, or none: the default
                // stays), so from_secs_f64 cannot panic; try_ all the same, for a hand-built event.
                if let Some(hb) = heartbeat_interval.and_then(|hb| Duration::try_from_secs_f64(hb).ok()) {
                    self.heartbeat = hb;
                }
                let refresh = matches!(id, Some(RequestId::Int(rid)) if Some(rid) == self.refresh_rid);
                // A refresh's welcome naming another user than the connection's (another `sub`,
                // a guest signing in): the server has left every room of the connection.
                let changed = refresh && self.snapshot.borrow().user_id.as_deref() != Some(user_id.as_str());
                self.snapshot.send_modify(|s| {
                    s.user_id = Some(user_id.clone());
                    s.username = Some(username.clone());
                });
                if refresh || !self.online {
                    self.own_ids.insert(user_id.clone());
                }
                let new_user = Welcome { user_id: user_id.clone(), username: username.clone(), authenticated };
                let welcome = Event::Welcome { user_id, username, authenticated };
                if refresh {
                    self.emit(welcome);
                    if changed {
                        self.emit(Event::UserChanged(new_user));
                        self.rejoin_all();
                    }
                    self.refresh_rid = None;
                    if self.token.as_deref().and_then(expiry_of).is_none_or(|exp| exp as f64 > unix_now()) {
                        self.refresh_failures = 0; // (an expired one keeps the count: see schedule_refresh)
                    }
                    self.schedule_refresh();
                } else if !self.online {
                    if dm_backlog.is_none() {
                        // Without persistence a new connection brings no DM delivered before,
                        // and a restarted memory server numbers DMs from 1 again: ids kept from
                        // an earlier connection would drop its new DMs as doubles. With
                        // persistence the database numbers them for good, and a page of kept
                        // DMs may come again: their ids are kept.
                        self.seen_dms.clear();
                        self.seen_dm_set.clear();
                    }
                    self.set_state(ConnectionState::Connected);
                    self.emit(welcome);
                    self.came_online();
                }
            }
            ServerEvent::Joined { room, users, last_id, recovered, epoch, id } => {
                if let Some(RequestId::Int(rid)) = id {
                    self.join_rids.remove(&rid);
                    if self.join_pacer.joined(rid, Instant::now().into_std()) {
                        self.flush_joins();
                    }
                }
                let generation = self.generation;
                let Some(r) = self.rooms.get_mut(&room) else { return };
                if let Some(RequestId::Int(rid)) = id {
                    if r.join_rid != Some(rid) {
                        return; // a join written before a `leave` of the room: not this room's
                    }
                    r.join_rid = None;
                }
                r.join_refusals = 0;
                let since = r.seq.last();
                // Another epoch than our `since`'s: the room's ids started again from 1, and
                // the position is the new numbering's (`RoomSeq::joined_in`).
                let epoch_changed = r.seq.joined_in(last_id, recovered, epoch.as_deref());
                r.joined_on = Some(generation);
                // A re-join's replay ends at `last_id`; a first join has none, nor has a
                // `recovered: false` with nothing above `since` (the server may even have
                // started afresh), nor one in another epoch (the server replays nothing: our
                // ids name other messages there). Without a `last_id` (none of `"5"`, `null`,
                // `2.5`, `1e400` counts: protocol::wire_id) the answer to a `ping` ends it: no
                // id reaches u64::MAX. The room's sends wait for it (`Room::replayed`).
                let no_replay = since.is_none()
                    || epoch_changed
                    || recovered == Some(false)
                        && matches!((since, last_id), (Some(since), Some(last_id)) if last_id <= since);
                r.replay_until = if no_replay { 0 } else { last_id.unwrap_or(u64::MAX) };
                // A `ping` written now is answered after the replay: only where the replay's
                // end is not known (no `last_id` that counts, or `recovered: false`, whose
                // replay may stop short of `last_id` or not come at all). One request per
                // room otherwise, as in the JS and Python clients: a join and a ping per room
                // doubled what a reconnect with many rooms drew from the request bucket.
                let ping = !no_replay && (last_id.is_none() || recovered == Some(false));
                let newly = r.state != RoomState::Joined;
                r.state = RoomState::Joined;
                // The app is shown the server's `last_id`, else the room's position, else 0.
                let shown = last_id.or(r.seq.last()).unwrap_or(0);
                let joined = Joined { room: room.clone(), users, last_id: shown, recovered, epoch };
                r.joined = Some(joined.clone());
                for w in r.waiters.drain(..) {
                    let _ = w.send(Ok(joined.clone()));
                }
                let room_name = room.clone();
                if newly {
                    self.emit(Event::Room { room, state: RoomState::Joined });
                }
                self.emit(Event::Joined(joined));
                if let (Some(false), Some(since)) = (recovered, since) {
                    // (`since` is of the old numbering after a new epoch: not a position now.)
                    let fallback = if epoch_changed { 0 } else { since };
                    self.emit(Event::RecoveryFailed {
                        room: room_name.clone(),
                        since,
                        last_id: last_id.unwrap_or(fallback),
                        epoch_changed,
                    });
                }
                if ping {
                    let sync = self.rid();
                    if let Some(r) = self.rooms.get_mut(&room_name) {
                        r.sync_rid = Some(sync);
                    }
                    let now = Instant::now().into_std();
                    self.sync_pings.insert(sync, now);
                    self.write(&ClientCommand::Ping { id: Some(RequestId::Int(sync)) });
                    // Written at once, with no place in the pacers' windows, but charged to the
                    // user's one bucket: the request pacer and the join pacer count its token (as
                    // in the JS and Python clients).
                    self.request_pacer.sent_unpaced(now);
                    self.join_pacer.sent_unpaced(now);
                }
                self.flush_outbox();
            }
            ServerEvent::Message(message) => self.on_message(message),
            ServerEvent::Dm(dm) => self.on_dm(dm),
            ServerEvent::Presence(presence) => self.emit(Event::Presence(presence)),
            ServerEvent::Typing(typing) => self.emit(Event::Typing(typing)),
            ServerEvent::Error { code, message, retry_after_ms, id, details } => {
                if let (Some(ms), "rate_limited") = (retry_after_ms, code.as_str()) {
                    // A floor for the next reconnect, should the server close (4102); only a
                    // refusal for pace is one, as in the JS and Python clients. The latest: an
                    // earlier, longer wait may have run out already (this one is relative).
                    self.retry_after = Some(Duration::from_millis(ms));
                }
                let error = Error::Server { code, message, retry_after_ms, details };
                match id {
                    Some(RequestId::Int(rid)) => self.on_error(rid, error),
                    _ => self.emit(Event::Error(error)),
                }
            }
            ServerEvent::Left { room, reason, by, until, note, id } if !self.is_request(id.as_ref()) => {
                // Not the answer to our `leave`: the server removed us, for good.
                if let Some(r) = self.rooms.remove(&room) {
                    for w in r.waiters {
                        let _ = w.send(Err(Error::Left));
                    }
                    self.emit(Event::Room { room: room.clone(), state: RoomState::Left });
                }
                let why = reason.clone().unwrap_or_else(|| "removed".into());
                self.drop_room_sends(&room, &Error::local("removed", format!("removed from {room}: {why}")));
                self.emit(Event::Removed { room, reason, by, until, note });
            }
            ServerEvent::Muted { room, until, by } => self.emit(Event::Muted { room, until, by }),
            ServerEvent::Unmuted { room } => self.emit(Event::Unmuted { room }),
            ServerEvent::Pong { id: Some(RequestId::Int(rid)) } if self.sync_pings.remove(&rid).is_some() => {
                if self.synced(rid) {
                    self.flush_outbox();
                }
            }
            reply @ (ServerEvent::Left { .. }
            | ServerEvent::Moderated { .. }
            | ServerEvent::Users { .. }
            | ServerEvent::History { .. }
            | ServerEvent::Pong { .. }) => {
                if let Some(&RequestId::Int(rid)) = reply.request_id() {
                    if let Some(req) = self.requests.remove(&rid) {
                        let _ = req.reply.send(Ok(reply));
                    }
                    self.request_answered(rid, None);
                }
            }
            ServerEvent::Unknown => {}
        }
    }

    /// Whether `rid` is the `ping` behind a room's join (now answered: that room's
    /// replay is over).
    fn synced(&mut self, rid: u64) -> bool {
        match self.rooms.values_mut().find(|r| r.sync_rid == Some(rid)) {
            Some(r) => {
                r.sync_rid = None;
                r.replay_until = 0;
                true
            }
            None => false,
        }
    }

    /// Whether `id` names a request of ours still waiting for its reply.
    fn is_request(&self, id: Option<&RequestId>) -> bool {
        matches!(id, Some(RequestId::Int(rid)) if self.requests.contains_key(rid))
    }

    /// A refresh made the connection another user: the server left every room of the connection
    /// (without a `left`), so each room the app holds is joined again with `since`, in the order
    /// the app joined them, through the path a reconnect takes (`send_join`: the join pacer, a
    /// refusal for good is `Event::Removed`, the replay deduplicated by `RoomSeq`, the room's
    /// sends held until its `joined` and replay). A room whose join is on the wire was written
    /// after the `auth` (the server answers a connection's frames in order: one written before
    /// was answered before this `welcome`), so the server joins it as the new user: its answer
    /// serves, and no second join is written. The sends written after the `auth` are refused
    /// `not_in_room` and go again after the re-join (`on_error`).
    fn rejoin_all(&mut self) {
        self.typing_sent.clear(); // the old user's typing ended with its rooms
        for room in self.rooms_in_join_order() {
            let Some(r) = self.rooms.get_mut(&room) else { continue };
            if r.join_rid.is_some() {
                continue;
            }
            // A `ping` behind a join of the old membership no longer ends a replay of this one.
            r.sync_rid = None;
            if r.state == RoomState::Joined {
                r.state = RoomState::Joining;
                self.emit(Event::Room { room: room.clone(), state: RoomState::Joining });
            }
            self.send_join(&room, false);
        }
    }

    /// The rooms held, in the order the app joined them: the order they are joined again in
    /// (after a reconnect, or a refresh to another user).
    fn rooms_in_join_order(&self) -> Vec<String> {
        let mut rooms: Vec<(u64, &String)> = self.rooms.iter().map(|(name, r)| (r.order, name)).collect();
        rooms.sort();
        rooms.into_iter().map(|(_, name)| name.clone()).collect()
    }

    /// `welcome` on a new socket: re-join rooms with `since`, resend what waits.
    fn came_online(&mut self) {
        self.online = true;
        self.connected_once = true;
        // The attempts start again from 0 only once this connection has stayed up
        // `stable_after` (went_offline): one closed at once keeps the backoff growing.
        self.online_since = Some(Instant::now());
        self.refresh_failures = 0;
        self.retry_after = None;
        self.pacer.reset();
        // The join and request pacers start afresh, no wake-up due (`went_offline` cleared both:
        // nothing sets one offline; a stale one would cost no more than a needless wake-up).
        self.join_pacer.reset();
        self.join_flush_at = None;
        self.request_pacer.reset();
        self.request_flush_at = None;
        self.set_state(ConnectionState::Connected);
        self.schedule_refresh();
        for room in self.rooms_in_join_order() {
            self.send_join(&room, false);
        }
        // Those waiting (reads cut off by the old socket among them) go through the request
        // pacer, in the order of the calls: a reconnect does not write them all at once.
        // (No `leave` is left: `went_offline` settled them.)
        self.requests.retain(|_, r| !r.reply.is_closed());
        self.flush_requests();
        self.flush_outbox();
    }

    /// A room message carrying the `client_msg_id` of a pending send acknowledges it if it is
    /// its echo: in its room, from this client's user (or any sender's copy of a send restored
    /// from the store), as [`Pending::echoed_by`](crate::outbox::Pending::echoed_by) decides.
    fn acknowledge_message(&mut self, message: &ChatMessage) {
        let Some(cmid) = &message.client_msg_id else { return };
        let echo = Echo::Message { room: &message.room, user_id: &message.user_id };
        if self.outbox.get(cmid).is_some_and(|p| p.echoed_by(echo, &self.own_ids)) {
            self.acknowledge(cmid, Acked::Message(message.clone()));
        }
    }

    /// A DM carrying the `client_msg_id` of a pending DM acknowledges it if it is its echo: to
    /// the same reader, from this client's user, restored or not (`Pending::echoed_by`).
    fn acknowledge_dm(&mut self, dm: &DirectMessage) {
        let Some(cmid) = &dm.client_msg_id else { return };
        let echo = Echo::Dm { to: &dm.to, user_id: &dm.user_id };
        if self.outbox.get(cmid).is_some_and(|p| p.echoed_by(echo, &self.own_ids)) {
            self.acknowledge(cmid, Acked::Dm(dm.clone()));
        }
    }

    /// The echo `ack` (checked by `acknowledge_message` or `acknowledge_dm`) acknowledges the
    /// outbox entry `cmid`.
    fn acknowledge(&mut self, cmid: &str, ack: Acked) {
        let in_flight = self.outbox.in_flight(self.generation); // this one among them
        if self.outbox.remove(cmid).is_some() {
            self.send_retries = 0;
            self.pacer.acknowledged(Instant::now().into_std(), in_flight);
            self.save_outbox();
            if let Some(reply) = self.acks.remove(cmid) {
                let _ = reply.send(Ok(ack.clone()));
            }
            self.emit(Event::Ack(ack));
            self.flush_outbox(); // its place in the window is free
        }
    }

    /// The room is no longer ours: its sends not written on this connection fail
    /// with `error`. Those written went to the server before the `leave` (or the
    /// removal): their echo or their error, which come first, settles them. They are
    /// marked left (`Pending::left`), as the JS client's `orphans` and the Python
    /// client's `entry.left`: never written again, not even into the room joined again
    /// (a new membership, not theirs), a refusal for now (`rate_limited`, `unavailable`)
    /// fails them with `error`, and so do a lost connection and `resend_after` without
    /// their echo (`fail_left`).
    fn drop_room_sends(&mut self, room: &str, error: &Error) {
        let mut doomed = Vec::new();
        for entry in self.outbox.snapshot() {
            let Target::Room(r) = &entry.target else { continue };
            match self.outbox.get_mut(&entry.client_msg_id) {
                Some(p) if r == room && self.online && p.sent_on == Some(self.generation) => {
                    p.left.get_or_insert_with(|| error.clone());
                }
                _ if r == room => doomed.push(entry.client_msg_id),
                _ => {}
            }
        }
        if doomed.is_empty() {
            return;
        }
        for cmid in doomed {
            self.outbox.remove(&cmid);
            self.fail_send(&cmid, error.clone());
        }
        self.save_outbox();
    }

    /// The send `cmid`, out of the outbox, fails with `error`: its future, or (nobody waits
    /// for it: restored from the store, or its future gone, past `send_timeout` say) an
    /// `Event::Error`, so that a send the app was told stays in the outbox is never dropped
    /// without a word.
    fn fail_send(&mut self, cmid: &str, error: Error) {
        let unheard = match self.acks.remove(cmid) {
            Some(reply) => match reply.send(Err(error)) {
                Err(Err(error)) => error, // its future is gone
                _ => return,
            },
            None => error,
        };
        self.emit(Event::Error(unheard));
    }

    /// Sends of a left room written at or before `before` (`None`: all, their answers lost
    /// with the connection) and still without an echo: they fail with their room's error,
    /// noting `why` (the server may have stored them), and are not written again.
    fn fail_left(&mut self, before: Option<std::time::Instant>, why: &str) {
        let failed = self.outbox.take_left(before);
        if failed.is_empty() {
            return;
        }
        for (entry, error) in failed {
            let error = match error {
                Error::Server { code, message, retry_after_ms, details } => {
                    let message = format!("{message}; {why}: it may have been stored");
                    Error::Server { code, message, retry_after_ms, details }
                }
                error => error,
            };
            self.fail_send(&entry.client_msg_id, error);
        }
        self.save_outbox();
    }

    fn on_message(&mut self, message: ChatMessage) {
        self.acknowledge_message(&message);
        let Some(room) = self.rooms.get_mut(&message.room) else { return };
        match room.seq.message(message.id) {
            Verdict::Deliver => {
                let caught_up = room.replayed();
                self.emit(Event::Message(message));
                if caught_up {
                    self.flush_outbox();
                }
            }
            Verdict::Drop => {}
            // A re-join with `since` = the last id delivered: its replay fills the gap.
            Verdict::Gap { .. } => self.send_join(&message.room, false),
        }
    }

    fn on_dm(&mut self, dm: DirectMessage) {
        self.acknowledge_dm(&dm);
        // A `u64` past 2^53 - 1 is not an id (the rule for ids off the wire, as for a room
        // message): it could not tell this DM from another one.
        if dm.id > MAX_WIRE_ID || !self.seen_dm_set.insert(dm.id) {
            return;
        }
        self.seen_dms.push_back(dm.id);
        if self.seen_dms.len() > SEEN_DMS {
            if let Some(old) = self.seen_dms.pop_front() {
                self.seen_dm_set.remove(&old);
            }
        }
        self.emit(Event::Dm(dm));
    }

    /// An `error` answering request `rid`.
    fn on_error(&mut self, rid: u64, error: Error) {
        let rate_limited = error.code() == Some("rate_limited");
        let retry = match &error {
            Error::Server { retry_after_ms, .. } if rate_limited => {
                Some(Duration::from_millis(retry_after_ms.unwrap_or(1000)))
            }
            Error::Server { code, .. } if code == "unavailable" || code == "internal_error" => {
                Some(self.cfg.backoff.delay(0, fastrand::f64()))
            }
            _ => None,
        };
        if let Some(cmid) = self.send_rids.remove(&rid) {
            // A send whose room was left after it was written is not tried again, not even
            // in the room joined again since (a new membership: the send was for the one
            // left), as in the JS and Python clients: a refusal for now fails it with its
            // room's error (`drop_room_sends`), any other with the refusal. Nor is one to a
            // room not ours (the app never joined it): the server would only answer
            // `not_in_room`.
            let rooms = &self.rooms;
            let (left, left_error) = match self.outbox.get_mut(&cmid) {
                Some(p) => (
                    p.left.is_some() || matches!(&p.entry.target, Target::Room(r) if !rooms.contains_key(r)),
                    p.left.clone(),
                ),
                None => (false, None),
            };
            // The server lost the membership (its store restarted, say): the room is joined
            // again (with `since`) and the send goes again once joined (its replay in), with
            // the same `client_msg_id`, as in the JS and Python clients. The room's sends still
            // on the wire, refused in turn, wait for that same join and go in order. A re-join
            // refused for good fails them with its refusal (`on_error` for a join).
            let room = match self.outbox.get_mut(&cmid) {
                Some(p) if error.code() == Some("not_in_room") && !left => match &p.entry.target {
                    Target::Room(room) => {
                        p.sent_on = None;
                        Some(room.clone())
                    }
                    Target::Dm(_) => None,
                },
                _ => None,
            };
            if let Some(room) = room {
                self.rejoin(&room);
                return self.flush_outbox(); // its place in the window is free
            }
            match retry.filter(|_| !left) {
                Some(delay) => {
                    // Not acknowledged: it goes out again (same client_msg_id) once the
                    // whole outbox has waited: `retry_after_ms` for `rate_limited` (then
                    // one send at a time, at the server's pace, the window widening again
                    // with each acknowledgement: `pacer.rs`), a pause that grows while
                    // the server keeps refusing otherwise.
                    let mut written_at = None;
                    if let Some(pending) = self.outbox.get_mut(&cmid) {
                        pending.sent_on = None;
                        written_at = pending.sent_at;
                    }
                    let now = Instant::now().into_std();
                    if rate_limited {
                        self.pacer.rate_limited(now, delay, written_at);
                    } else if !self.pacer.paused(now) {
                        // (One refusal of a batch written together counts once.)
                        let backoff = self.cfg.backoff.delay(self.send_retries, fastrand::f64());
                        self.send_retries = self.send_retries.saturating_add(1);
                        self.pacer.pause(now + delay.max(backoff));
                    }
                    self.flush_outbox();
                }
                None => {
                    let written_at = self.outbox.remove_pending(&cmid).and_then(|p| p.sent_at);
                    if let (Some(delay), true) = (retry, rate_limited) {
                        // Not retried (its room left), but the bucket is the user's: the
                        // other sends wait all the same.
                        self.pacer.rate_limited(Instant::now().into_std(), delay, written_at);
                    }
                    self.save_outbox();
                    let error = match left_error {
                        Some(left_error) if retry.is_some() => left_error,
                        _ => error,
                    };
                    self.fail_send(&cmid, error);
                    self.flush_outbox();
                }
            }
        } else if let Some(room) = self.join_rids.remove(&rid) {
            let limited = retry.filter(|_| rate_limited);
            self.join_pacer.refused(rid, Instant::now().into_std(), limited, fastrand::f64());
            let rejoin = match self.rooms.get_mut(&room) {
                Some(r) if r.join_rid == Some(rid) => {
                    r.join_rid = None;
                    r.join_since
                }
                // A join written before a `leave` of the room: the room (left, or joined
                // again with a join of its own) is not this refusal's.
                _ => return self.flush_joins(),
            };
            match retry {
                // The request bucket is empty: the join pacer holds every join back until
                // `retry_after_ms`, and this one goes again first (the flush wakes up then).
                Some(_) if rate_limited => self.send_join(&room, true),
                Some(_) => {
                    // Refused for now (`unavailable`, `internal_error`: the server's store is
                    // away, say): again after a backoff that grows with the room's refusals in a
                    // row, as in the JS client (at the shortest delay for ever, every room of
                    // every client would keep asking through a whole outage), and not before the
                    // refusal's `retry_after_ms`, should it carry one. The backoff is held to
                    // JOIN_RETRY_MAX (5 s, as JS and Python): a room back within seconds of the
                    // store, not the reconnect backoff's 20 s.
                    let retry = self.rid();
                    let asked = match &error {
                        Error::Server { retry_after_ms: Some(ms), .. } => Duration::from_millis(*ms),
                        _ => Duration::ZERO,
                    };
                    let mut delay = asked;
                    if let Some(r) = self.rooms.get_mut(&room) {
                        r.retry = Some(retry);
                        let backoff = self.cfg.backoff.delay(r.join_refusals, fastrand::f64());
                        delay = delay.max(backoff.min(JOIN_RETRY_MAX));
                        r.join_refusals = r.join_refusals.saturating_add(1);
                    }
                    self.later(delay.min(RETRY_AFTER_CAP), Internal::RetryJoin(room, retry));
                    self.flush_joins();
                }
                None => {
                    // `invalid_room`, `too_many_rooms`, `forbidden` (a ban, a grant revoked): the
                    // room cannot be joined. Its sends waiting for the join fail with the refusal,
                    // as in the JS and Python clients (nothing else would have written them).
                    if let Some(r) = self.rooms.remove(&room) {
                        for w in r.waiters {
                            let _ = w.send(Err(error.clone()));
                        }
                        self.emit(Event::Room { room: room.clone(), state: RoomState::Left });
                    }
                    self.drop_room_sends(&room, &error);
                    // A re-join refused (the app had this room and lost it: banned while away,
                    // say): after the error, the room's removal, as in the JS client, with the
                    // refusal's reason (`banned`, as a ban while connected says) where it gives
                    // one, else its code, and its `until` (a ban's).
                    let removed = match (&error, rejoin) {
                        (Error::Server { code, details, .. }, true) => Some(Event::Removed {
                            room: room.clone(),
                            reason: Some(details.get("reason").and_then(|r| r.as_str()).unwrap_or(code).to_owned()),
                            by: None,
                            until: details.get("until").and_then(until_ms),
                            note: None,
                        }),
                        _ => None,
                    };
                    self.emit(Event::Error(error));
                    if let Some(removed) = removed {
                        self.emit(removed);
                    }
                    self.flush_joins();
                }
            }
        } else if rate_limited && self.requests.get(&rid).is_some_and(|r| r.sent_on == Some(self.generation)) {
            // Not carried out: it goes again first (the oldest waiting), when the pacer lets it.
            if let Some(req) = self.requests.get_mut(&rid) {
                req.sent_on = None;
            }
            self.request_answered(rid, retry);
        } else if let Some(req) = self.requests.remove(&rid) {
            self.request_answered(rid, None);
            // A `leave` answered `not_in_room`: the server had the user out of the room
            // already (a refresh to another user left every room, say), which is what the
            // app asked for, as in the JS and Python clients.
            let left = matches!(req.cmd, ClientCommand::Leave { .. }) && error.code() == Some("not_in_room");
            let _ = req.reply.send(if left { LEFT } else { Err(error) });
        } else if Some(rid) == self.refresh_rid {
            self.refresh_rid = None;
            let retry_after_ms = match &error {
                Error::Server { retry_after_ms, .. } => *retry_after_ms,
                _ => None,
            };
            self.emit(Event::Error(error));
            self.retry_refresh(retry_after_ms);
        } else if let Some(written_at) = self.sync_pings.remove(&rid) {
            // The `ping` behind a join was refused: its answer still comes after the replay.
            // Refused `rate_limited`, by the request bucket: the request queue waits for its
            // `retry_after_ms`, as after a refusal of one of its own (as in the JS and Python
            // clients).
            if let Some(retry) = retry.filter(|_| rate_limited) {
                let now = Instant::now().into_std();
                self.request_pacer.refused_unpaced(now, retry, written_at, fastrand::f64());
            }
            if self.synced(rid) {
                self.flush_outbox();
            }
        } else {
            // Of a request whose caller gave up, its entry gone (dropped past REQUESTS_KEPT):
            // its place is free, and a refusal's pause holds the next ones back all the same
            // (the bucket is the user's), as in the JS and Python clients. No event: the
            // caller was told by its timeout, and an entry still kept says nothing either.
            self.request_answered(rid, retry.filter(|_| rate_limited));
        }
    }
}

/// Runs `work` (a timer of the driver, a token callback) until it ends or the driver does (its
/// `internal` receiver dropped with it), whichever comes first. A client dropped or closed
/// leaves no task behind: a timer slept on to its end (up to a day, after a `rate_limited` or a
/// `Retry-After` of a day), and a token callback that never answered was kept for good, with
/// whatever it held.
async fn until_ended(internal: mpsc::UnboundedSender<Internal>, work: impl std::future::Future<Output = ()>) {
    tokio::select! {
        () = work => {}
        () = internal.closed() => {}
    }
}

/// Seconds since the Unix epoch, by this machine's clock (a token's `exp` counts so).
fn unix_now() -> f64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default().as_secs_f64()
}

#[cfg(test)]
mod tests {
    use super::{certificate_problem, unusable_url};
    use std::io;
    use tokio_tungstenite::tungstenite::error::{Error, UrlError};

    /// `wss://` without TLS compiled into tokio-tungstenite stops the client, the reason saying
    /// how to add it. (The tests build it with native-tls, so `tests/client.rs` cannot show it
    /// end to end: this is the rule it applies.)
    #[test]
    fn wss_without_tls_compiled_in_is_an_unusable_url() {
        let why = unusable_url(&Error::Url(UrlError::TlsFeatureNotEnabled)).expect("unusable");
        assert!(why.contains("native-tls"), "{why}");
        assert!(unusable_url(&Error::Url(UrlError::UnableToConnect("x".into()))).is_none());
        assert!(unusable_url(&Error::Url(UrlError::NoHostName)).is_some());
    }

    /// A certificate that failed verification, as OpenSSL (native-tls) and rustls word it, is
    /// told apart from an outage (a reset, a refused connection, a timeout), which is retried.
    #[test]
    fn a_certificate_that_failed_verification_is_told_from_an_outage() {
        let io_error = |text: &str| Error::Io(io::Error::other(text.to_owned()));
        for text in [
            "error:0A000086:SSL routines:tls_post_process_server_certificate:certificate verify failed:\
             ../ssl/statem/statem_clnt.c:1889: (unable to get local issuer certificate)",
            "invalid peer certificate: UnknownIssuer",
            "invalid peer certificate: NotValidForName",
            "The certificate chain was issued by an authority that is not trusted.",
        ] {
            let why = certificate_problem(&io_error(text)).unwrap_or_else(|| panic!("not seen: {text}"));
            assert!(why.starts_with("TLS certificate verification failed: ") && why.contains(text), "{why}");
        }
        for error in [
            io_error("Connection reset by peer (os error 104)"),
            io_error("Connection refused (os error 111)"),
            io_error("error:0A00010B:SSL routines:ssl3_get_record:wrong version number"),
            Error::ConnectionClosed,
            Error::Url(UrlError::UnableToConnect("certificate verify failed".into())),
        ] {
            assert!(certificate_problem(&error).is_none(), "{error}");
        }
    }
}
