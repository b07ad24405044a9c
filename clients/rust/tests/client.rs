//! Client behaviour beyond the shared scenarios, against the real server (and a fake one
//! where the real one cannot be made to answer on cue).

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{scaled, Harness, Recorder};
use serde_json::json;
use tokio_tungstenite::tungstenite::Message;
use wschat::{Client, ConnectionState, Error, Event, OutboxEntry, OutboxStore};

/// An outbox store in memory, shared by the two "runs" of the app below.
#[derive(Clone, Default)]
struct SharedStore(Arc<Mutex<Vec<OutboxEntry>>>);

impl OutboxStore for SharedStore {
    fn load(&self) -> Vec<OutboxEntry> {
        self.0.lock().unwrap().clone()
    }
    fn save(&self, entries: &[OutboxEntry]) {
        *self.0.lock().unwrap() = entries.to_vec();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outbox_survives_a_restart_of_the_app() {
    let h = Harness::start().await;
    let s = h.server("memory", 1, json!({})).await;
    let token = h.token("olga", 600.0).await;
    let store = SharedStore::default();
    let with_token = |builder: wschat::ClientBuilder| {
        let token = token.clone();
        builder
            .token(move || {
                let t = token.clone();
                async move { Ok(t) }
            })
            .backoff(Duration::from_millis(100), Duration::from_secs(1))
            .outbox_store(store.clone())
    };

    // First run: no server reachable; the sends wait in the (persisted) outbox.
    let (first, _) = with_token(wschat::ClientBuilder::new("ws://127.0.0.1:9/ws")).connect();
    let sender = first.clone();
    tokio::spawn(async move {
        // join_all polls in order: the sends enter the outbox in this order.
        let texts: Vec<String> = (0..3).map(|i| format!("kept {i}")).collect();
        futures_util::future::join_all(texts.iter().map(|t| sender.send("kept", t))).await
    });
    let saved = async {
        while store.load().len() < 3 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    tokio::time::timeout(scaled(10.0), saved).await.expect("three sends saved");
    first.close();

    // Second run: they go out once the app has joined their room again, in order, once.
    let (watcher, watcher_events) = Client::builder(format!("{}?username=wendy", s.url)).connect();
    let watched = Recorder::new(watcher_events);
    watcher.join("kept").await.unwrap();
    let (second, events) = with_token(wschat::ClientBuilder::new(s.url.clone())).connect();
    let rec = Recorder::new(events);
    second.wait_connected(scaled(20.0)).await.unwrap();
    assert_eq!(second.outbox_len(), 3, "loaded entries wait for their room's join");
    second.join("kept").await.unwrap();
    watched.wait("the kept messages", 20.0, |ev| common::message_ids(ev, "kept").len() >= 3).await;
    rec.wait("their echoes", 20.0, |ev| common::message_ids(ev, "kept").len() >= 3).await;
    let texts: Vec<String> = watched
        .events()
        .into_iter()
        .filter_map(|e| if let Event::Message(m) = e { Some(m.text) } else { None })
        .collect();
    assert_eq!(texts, ["kept 0", "kept 1", "kept 2"]);
    assert_eq!(watched.ids("kept"), [1, 2, 3]);
    let emptied = async {
        while !store.load().is_empty() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    tokio::time::timeout(scaled(10.0), emptied).await.expect("acknowledged entries leave the store");
    assert_eq!(
        rec.count(|e| matches!(e, Event::Ack(wschat::Acked::Message(_)))),
        3,
        "restored sends are acked as events"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_token_without_callback_is_terminal() {
    let h = Harness::start().await;
    let s = h.server("memory", 1, json!({})).await;
    let (c, events) = Client::builder(format!("{}?token=not-a-jwt", s.url)).connect();
    let rec = Recorder::new(events);
    // Waiting for the connection says why it will not come, as the calls after it do (they
    // said `Error::Closed`, the refused token's 401 (4001) told by the events only).
    let waited = c.wait_connected(scaled(20.0)).await;
    assert!(matches!(waited, Err(Error::Terminal { code: Some(4001), .. })), "{waited:?}");
    let shown = waited.unwrap_err().to_string();
    assert!(shown.starts_with("connection closed for good (4001): "), "{shown}");
    // The URL in the reasons keeps no token (`?token=` is one of the server's ways in), as the
    // server's logs blank it: an app that logs its errors would write the token down.
    assert!(shown.contains("token=***") && !shown.contains("not-a-jwt"), "{shown}");
    rec.wait("a terminal error", 20.0, |ev| ev.iter().any(|e| matches!(e, Event::Error(Error::Terminal { .. })))).await;
    let later = c.join("r").await;
    assert!(matches!(later, Err(Error::Terminal { code: Some(4001), .. })), "{later:?}");
    let last = rec.events().into_iter().rev().find(|e| matches!(e, Event::Disconnected { .. }));
    assert!(matches!(last, Some(Event::Disconnected { reconnect_in: None, .. })), "{last:?}");
}

/// A token callback that gives no token (an empty string) stops the client with 4001 and an
/// `Error::Token`, as the JS and Python clients stop: it connected with `Bearer `, was refused
/// 401, and did the same again after every backoff, for ever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_callback_giving_no_token_stops_the_client() {
    let h = Harness::start().await;
    let s = h.server("memory", 1, json!({})).await;
    let (c, events) = Client::builder(s.url.clone())
        .backoff(Duration::from_millis(50), Duration::from_millis(200))
        .token(|| async { Ok(String::new()) })
        .connect();
    let rec = Recorder::new(events);
    let waited = c.wait_connected(scaled(20.0)).await;
    assert!(matches!(waited, Err(Error::Terminal { code: Some(4001), .. })), "{waited:?}");
    let stopped = |e: &Event| matches!(e, Event::Disconnected { code: Some(4001), reconnect_in: None, .. });
    rec.wait("the stop", 20.0, |ev| ev.iter().any(stopped)).await;
    let events = rec.events();
    let told = events.iter().position(|e| matches!(e, Event::Error(Error::Token(_))));
    assert!(told.is_some_and(|i| i < events.iter().position(stopped).unwrap()), "{events:?}");
    assert_eq!(rec.count(|e| matches!(e, Event::Disconnected { .. })), 1, "{events:?}");
}

/// A refresh whose callback gives no token is an `Error::Token`, and the connection and its
/// token stay (the refresh tried again later), as in the JS and Python clients: an `auth`
/// with an empty token went out, and its refusal (`auth_failed`) was the app's to read.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refresh_giving_no_token_keeps_the_connection() {
    let h = Harness::start().await;
    let s = h.server("memory", 1, json!({})).await;
    let control = h.control.clone();
    let calls = Arc::new(AtomicUsize::new(0));
    let counted = calls.clone();
    let (c, events) = Client::builder(s.url.clone())
        .token(move || {
            let (control, first) = (control.clone(), counted.fetch_add(1, Ordering::SeqCst) == 0);
            async move {
                if !first {
                    return Ok(String::new()); // the refresh: no token
                }
                let reply = common::post(&control, "/token", json!({"sub": "nora", "ttl": 4})).await;
                Ok(reply["token"].as_str().unwrap().to_owned())
            }
        })
        .connect();
    let rec = Recorder::new(events);
    c.wait_connected(scaled(20.0)).await.unwrap();
    rec.wait("the refresh's token error", 20.0, |ev| ev.iter().any(|e| matches!(e, Event::Error(Error::Token(_)))))
        .await;
    c.ping().await.unwrap(); // an auth written before it would be answered before this pong
    let refused = rec.count(|e| matches!(e, Event::Error(Error::Server { .. })));
    assert_eq!(refused, 0, "{:?}", rec.events());
    assert!(disconnections(&rec).is_empty(), "{:?}", rec.events());
    assert_eq!(c.user_id().as_deref(), Some("nora"));
}

/// A token refresh the server cannot carry out now (its `auth` answered `rate_limited` here;
/// `unavailable` and `internal_error` are the same case) keeps the connection and its token,
/// and is tried again not before `retry_after_ms`: one refusal, then the fresh token's
/// `welcome`, and the session goes on. It was tried again after a fixed second, refused again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refresh_refused_for_now_waits_for_retry_after_ms() {
    let h = Harness::start().await;
    let env = json!({"RATE_LIMIT_REQUESTS": "1", "RATE_LIMIT_REQUESTS_BURST": "5"});
    let s = h.server("memory", 1, env).await;
    let control = h.control.clone();
    let (c, events) = Client::builder(s.url.clone())
        .backoff(Duration::from_millis(100), Duration::from_secs(2))
        .token(move || {
            let control = control.clone();
            async move {
                let reply = common::post(&control, "/token", json!({"sub": "rita", "ttl": 4})).await;
                Ok(reply["token"].as_str().unwrap().to_owned())
            }
        })
        .connect();
    let rec = Recorder::new(events);
    c.wait_connected(scaled(20.0)).await.unwrap();
    for _ in 0..5 {
        // The user's request bucket (5) spent: the refresh's auth (cost 5) must wait.
        c.ping().await.unwrap();
    }
    let welcomes = |ev: &[Event]| ev.iter().filter(|e| matches!(e, Event::Welcome { .. })).count();
    rec.wait("the refreshed token's welcome", 20.0, |ev| welcomes(ev) >= 2).await;
    let refused: Vec<_> = rec
        .events()
        .into_iter()
        .filter_map(|e| match e {
            Event::Error(Error::Server { code, retry_after_ms, .. }) => Some((code, retry_after_ms)),
            _ => None,
        })
        .collect();
    assert_eq!(refused.len(), 1, "{refused:?}");
    assert_eq!(refused[0].0, "rate_limited");
    assert!(refused[0].1.is_some_and(|ms| ms >= 500), "{refused:?}");
    assert!(disconnections(&rec).is_empty(), "{:?}", rec.events());
    c.join("refresh").await.unwrap();
    assert_eq!(c.send("refresh", "after the refresh").await.unwrap().user_id, "rita");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dms_are_acknowledged_and_delivered_once() {
    let h = Harness::start().await;
    let s = h.server("memory", 1, json!({})).await;
    let (a, _) = Client::builder(format!("{}?username=ann", s.url)).connect();
    let (b, b_events) = Client::builder(format!("{}?username=ben", s.url)).connect();
    let rec_b = Recorder::new(b_events);
    a.wait_connected(scaled(20.0)).await.unwrap();
    b.wait_connected(scaled(20.0)).await.unwrap();
    let to = b.user_id().unwrap();
    let dm = a.dm(&to, "psst").await.unwrap();
    assert_eq!((dm.to.as_str(), dm.text.as_str()), (to.as_str(), "psst"));
    rec_b.wait("the dm", 20.0, |ev| ev.iter().any(|e| matches!(e, Event::Dm(d) if d.text == "psst"))).await;
    assert_eq!(a.dm("nobody-here", "x").await.unwrap_err().code(), Some("user_not_found"));
    assert_eq!(rec_b.count(|e| matches!(e, Event::Dm(_))), 1);
}

/// A client signed in with `token` (always the same one).
fn signed_in(url: &str, token: String) -> (Client, Recorder) {
    let (c, events) = Client::builder(url)
        .token(move || {
            let t = token.clone();
            async move { Ok(t) }
        })
        .backoff(Duration::from_millis(100), Duration::from_secs(1))
        .connect();
    (c, Recorder::new(events))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn moderation_mute_and_kick() {
    let h = Harness::start().await;
    let s = h.server("memory", 1, json!({})).await;
    let (m, _) = signed_in(&s.url, h.moderator_token("mona", "modroom").await);
    let (u, rec_u) = signed_in(&s.url, h.token("ugo", 600.0).await);
    m.join("modroom").await.unwrap();
    u.join("modroom").await.unwrap();

    let until = m.mute("modroom", "ugo", Some(Duration::from_secs(60))).await.unwrap();
    assert!(until.is_some());
    rec_u
        .wait("muted", 20.0, |ev| ev.iter().any(|e| matches!(e, Event::Muted { room: Some(r), .. } if r == "modroom")))
        .await;
    let err = u.send("modroom", "can I?").await.unwrap_err();
    assert_eq!(err.code(), Some("muted"));
    assert!(matches!(&err, Error::Server { details, .. } if details.contains_key("until")), "{err:?}");
    assert_eq!(u.outbox_len(), 0, "a refused send leaves the outbox");
    m.unmute("modroom", "ugo").await.unwrap();
    rec_u.wait("unmuted", 20.0, |ev| ev.iter().any(|e| matches!(e, Event::Unmuted { .. }))).await;
    u.send("modroom", "thanks").await.unwrap();
    assert_eq!(u.kick("modroom", "mona", None).await.unwrap_err().code(), Some("forbidden"));

    m.kick("modroom", "ugo", Some("enough")).await.unwrap();
    rec_u
        .wait("removed", 20.0, |ev| {
            ev.iter().any(|e| {
                matches!(e, Event::Removed { room, reason: Some(r), by: Some(b), .. }
                if room == "modroom" && r == "enough" && b == "mona")
            })
        })
        .await;
    // Removed for good: a reconnect does not join it again.
    let joins = |ev: &[Event]| ev.iter().filter(|e| matches!(e, Event::Joined(_))).count();
    let before = joins(&rec_u.events());
    u.reconnect();
    rec_u.wait("reconnected", 20.0, |ev| ev.iter().filter(|e| matches!(e, Event::Welcome { .. })).count() >= 2).await;
    assert_eq!(u.list_users("general").await.unwrap().len(), 0, "a request round trip after the welcome");
    assert_eq!(joins(&rec_u.events()), before);
    assert_eq!(u.send("modroom", "back?").await.unwrap_err().code(), Some("not_in_room"));
}

/// Banned while away: the ban is written (through the other server's API) while the client's
/// server is down, so no `left` reaches it. Its re-join after the reconnect is refused
/// `forbidden`: the room is gone for good, and the app is told so with `Event::Removed` (reason
/// `banned`, the refusal's, as a ban while connected says; the ban's `until`) after the refusal's
/// `Event::Error`, as in the JS client. It
/// was an `Event::Error` only, which names no room the app had: nothing said it was removed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rejoin_refused_after_a_ban_while_away_is_removed() {
    let h = Harness::start().await;
    let env = json!({"API_KEY": "rust-client-api-key-0123"});
    let a = h.server("redis", 1, env.clone()).await;
    let b = h.server("redis", 1, env).await;
    let (u, rec) = signed_in(&a.url, h.token("bea", 600.0).await);
    u.join("banroom").await.unwrap();
    u.send("banroom", "before").await.unwrap();

    h.stop(&a).await;
    rec.wait("offline", 20.0, |ev| ev.iter().any(|e| matches!(e, Event::State(ConnectionState::Disconnected)))).await;
    let ban = common::api(
        &b,
        "rust-client-api-key-0123",
        "/api/ban",
        json!({"user_id": "bea", "room": "banroom", "duration": 600}),
    )
    .await;
    let until = ban["until"].as_i64().expect("the ban's until");
    h.restart(&a).await;

    rec.wait("removed", 30.0, |ev| ev.iter().any(|e| matches!(e, Event::Removed { .. }))).await;
    let events = rec.events();
    let removed = events.iter().position(|e| matches!(e, Event::Removed { .. })).unwrap();
    match &events[removed] {
        Event::Removed { room, reason, by, until: got, note } => {
            assert_eq!((room.as_str(), reason.as_deref()), ("banroom", Some("banned")));
            assert_eq!((*got, by, note), (Some(until), &None, &None));
        }
        _ => unreachable!(),
    }
    let refused = events.iter().position(|e| matches!(e, Event::Error(err) if err.code() == Some("forbidden")));
    assert!(refused.is_some_and(|i| i < removed), "the refusal's error, then removed: {events:#?}");
    assert_eq!(rec.count(|e| matches!(e, Event::Removed { .. })), 1);
    assert_eq!(u.position("banroom"), None, "not a room of ours any more");
    // A first join refused is the join's error only: the app never had the room.
    assert_eq!(u.join("banroom").await.unwrap_err().code(), Some("forbidden"));
    assert_eq!(rec.count(|e| matches!(e, Event::Removed { .. })), 1);
    assert_eq!(u.send("banroom", "back?").await.unwrap_err().code(), Some("not_in_room"));
}

/// The next frame of `kind` a raw connection reads (panics after 20 s, scaled).
async fn next_frame(
    ws: &mut tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>,
    kind: &str,
) -> serde_json::Value {
    use futures_util::StreamExt;
    let read = async {
        while let Some(Ok(message)) = ws.next().await {
            let Message::Text(text) = message else { continue };
            let frame: serde_json::Value = serde_json::from_str(text.as_str()).unwrap();
            if frame["type"] == kind {
                return frame;
            }
        }
        panic!("the connection ended before a {kind}");
    };
    tokio::time::timeout(scaled(20.0), read).await.unwrap_or_else(|_| panic!("no {kind} within 20 s"))
}

/// Against the real server: another user's message carrying the `client_msg_id` of our send
/// is not its echo (the server dedupes per user: his is his own message). Our client is away
/// (its server stopped) when the app sends; Mallory, on another server of the same Redis, posts
/// in the room with that send's id, read from our outbox store. Back, the client re-joins with
/// `since`: the replay brings Mallory's message before our send may go (it waits for the
/// replay). It took that message for the echo: the send resolved with Mallory's message and was
/// never written. Now it is written after the replay and resolves with its own echo.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_user_s_message_with_our_pending_send_s_id_acknowledges_nothing() {
    use futures_util::SinkExt;
    let h = Harness::start().await;
    let a = h.server("redis", 1, json!({})).await;
    let b = h.server("redis", 1, json!({})).await;
    let store = SharedStore::default();
    let token = h.token("olive", 600.0).await;
    let (u, events) = Client::builder(a.url.clone())
        .token(move || {
            let t = token.clone();
            async move { Ok(t) }
        })
        .backoff(Duration::from_millis(100), Duration::from_secs(1))
        .outbox_store(store.clone())
        .connect();
    let rec = Recorder::new(events);
    u.join("copied").await.unwrap();
    u.send("copied", "before").await.unwrap();

    // Mallory, by hand: the client library never lets an app choose a client_msg_id.
    let mallory_url = format!("{}?token={}", b.url, h.token("mallory", 600.0).await);
    let (mut mallory, _) = tokio_tungstenite::connect_async(mallory_url.as_str()).await.unwrap();
    next_frame(&mut mallory, "welcome").await;
    let join = json!({"type": "join", "room": "copied", "id": 1});
    mallory.send(Message::text(join.to_string())).await.unwrap();
    next_frame(&mut mallory, "joined").await;

    h.stop(&a).await;
    rec.wait("offline", 20.0, |ev| ev.iter().any(|e| matches!(e, Event::State(ConnectionState::Disconnected)))).await;
    let sending = tokio::spawn({
        let u = u.clone();
        async move { u.send("copied", "mine").await }
    });
    let saved = async {
        while store.load().is_empty() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    tokio::time::timeout(scaled(10.0), saved).await.expect("the send saved");
    let cmid = store.load()[0].client_msg_id.clone();
    let copy = json!({"type": "message", "room": "copied", "text": "copied", "client_msg_id": cmid, "id": 2});
    mallory.send(Message::text(copy.to_string())).await.unwrap();
    let echo = next_frame(&mut mallory, "message").await;
    assert_eq!((echo["user_id"].as_str(), echo["client_msg_id"].as_str()), (Some("mallory"), Some(cmid.as_str())));
    h.restart(&a).await;

    let mine = tokio::time::timeout(scaled(30.0), sending).await.expect("the send settles").unwrap().unwrap();
    assert_eq!((mine.user_id.as_str(), mine.text.as_str()), ("olive", "mine"), "{mine:?}");
    rec.wait("both messages", 20.0, |ev| common::message_ids(ev, "copied").len() >= 3).await;
    let texts: Vec<_> = common::messages(&rec.events(), "copied").into_iter().map(|(_, t)| t).collect();
    assert_eq!(texts, ["before", "copied", "mine"]);
    assert!(store.load().is_empty());
}

/// A kick or mute written when the connection drops may or may not have been done:
/// it fails with `disconnected` and is not written again on the next connection (a
/// resent mute reaches its target twice). A read in flight is simply asked again.
///
/// A fake server holds its answers to the first connection's mute, kick and `list_users`, so
/// the three are certainly in flight when the test reconnects: the real server answered the
/// mute at once, and now and then before the client's task read the `reconnect()`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn moderation_in_flight_at_a_disconnect_fails_and_is_not_resent() {
    let (held_tx, mut held) = tokio::sync::mpsc::unbounded_channel::<String>();
    let (url, frames, server) = scripted_server(move |cmd, n| match cmd["type"].as_str() {
        Some("join") => vec![raw_joined(cmd, Some("0"), None)],
        // The first connection's answers are held: it ends (the test reconnects) first.
        Some(kind @ ("mute" | "kick" | "list_users")) if n == 1 => {
            let _ = held_tx.send(kind.to_owned());
            vec![]
        }
        Some("list_users") => {
            vec![json!({"type": "users", "room": cmd["room"], "users": [], "id": cmd["id"]}).to_string()]
        }
        _ => vec![],
    })
    .await;
    let (m, events) = Client::builder(url).backoff(Duration::from_millis(50), Duration::from_millis(200)).connect();
    let rec_m = Recorder::new(events);
    m.join("modroom").await.unwrap();

    let mute = tokio::spawn({
        let m = m.clone();
        async move { m.mute("modroom", "ugo", Some(Duration::from_secs(60))).await }
    });
    let kick = tokio::spawn({
        let m = m.clone();
        async move { m.kick("modroom", "ugo", None).await }
    });
    let users = tokio::spawn({
        let m = m.clone();
        async move { m.list_users("modroom").await }
    });
    // All three reached the server, which answers none of them on this connection.
    let mut got = Vec::new();
    while got.len() < 3 {
        match tokio::time::timeout(scaled(10.0), held.recv()).await {
            Ok(Some(kind)) => got.push(kind),
            _ => panic!("the server got only {got:?}"),
        }
    }
    m.reconnect();
    let wait = scaled(20.0);
    let mute = tokio::time::timeout(wait, mute).await.expect("the mute settled").unwrap();
    assert_eq!(mute.as_ref().map_err(Error::code), Err(Some("disconnected")), "{mute:?}");
    let kick = tokio::time::timeout(wait, kick).await.expect("the kick settled").unwrap();
    assert_eq!(kick.as_ref().map_err(Error::code), Err(Some("disconnected")), "{kick:?}");
    tokio::time::timeout(wait, users).await.expect("list_users settled").unwrap().expect("list_users is asked again");

    // Whatever the new connection carried was written before this ping (the fake server
    // records each frame before it answers it, in order).
    rec_m.wait("reconnected", 20.0, |ev| ev.iter().filter(|e| matches!(e, Event::Welcome { .. })).count() >= 2).await;
    m.ping().await.unwrap();
    let again: Vec<String> = frames
        .lock()
        .unwrap()
        .iter()
        .filter(|(n, f)| *n > 1 && (f["type"] == "mute" || f["type"] == "kick"))
        .map(|(_, f)| f.to_string())
        .collect();
    assert!(again.is_empty(), "written again after the reconnect: {again:?}");
    m.close();
    server.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn typing_ends_by_itself() {
    let h = Harness::start().await;
    // The server would let `typing: true` stand for a minute: the `false` is the client's.
    let s = h.server("memory", 1, json!({"TYPING_TIMEOUT": "60"})).await;
    let (a, events) = Client::builder(format!("{}?username=tina", s.url)).connect();
    let rec_a = Recorder::new(events);
    let (b, _) = Client::builder(format!("{}?username=tom", s.url)).connect();
    a.join("keys").await.unwrap();
    b.join("keys").await.unwrap();
    for _ in 0..3 {
        b.typing("keys", true); // keystrokes: one `true` goes out
    }
    rec_a.wait("typing", 20.0, |ev| ev.iter().any(|e| matches!(e, Event::Typing(t) if t.status))).await;
    rec_a.wait("typing over", 20.0, |ev| ev.iter().any(|e| matches!(e, Event::Typing(t) if !t.status))).await;
    assert_eq!(rec_a.count(|e| matches!(e, Event::Typing(t) if t.status)), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recovery_failed_after_a_memory_server_restart() {
    let h = Harness::start().await;
    let s = h.server("memory", 1, json!({})).await;
    let (c, events) = Client::builder(format!("{}?username=rita", s.url))
        .backoff(Duration::from_millis(100), Duration::from_secs(1))
        .connect();
    let rec = Recorder::new(events);
    c.join("amnesia").await.unwrap();
    for i in 0..3 {
        c.send("amnesia", &format!("before {i}")).await.unwrap();
    }
    h.stop(&s).await;
    h.restart(&s).await; // a memory server forgets rooms, history and ids
    rec.wait("recovery failed", 30.0, |ev| {
        ev.iter().any(|e| matches!(e, Event::RecoveryFailed { room, since: 3, .. } if room == "amnesia"))
    })
    .await;
    // The room's ids started again: the client follows them.
    assert_eq!(c.send("amnesia", "after").await.unwrap().id, 1);
    rec.wait("the new message", 20.0, |ev| common::message_ids(ev, "amnesia") == [1, 2, 3, 1]).await;
}

/// The texts of the DMs a client surfaced, in order.
fn dm_texts(events: &[Event]) -> Vec<String> {
    events.iter().filter_map(|e| if let Event::Dm(dm) = e { Some(dm.text.clone()) } else { None }).collect()
}

/// Without persistence a restarted server numbers DMs from 1 again. The client kept the ids of
/// the DMs it had seen across connections and dropped the new 1 and 2 as doubles of them,
/// without a word; it keeps them across connections only with persistence (whose welcome has
/// `dm_backlog`), and a memory server's DMs after the restart are delivered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dms_of_a_restarted_memory_server_are_delivered() {
    let h = Harness::start().await;
    let s = h.server("memory", 1, json!({})).await;
    let (amy, rec) = signed_in(&s.url, h.token("dmamy", 600.0).await);
    let (ben, rec_ben) = signed_in(&s.url, h.token("dmben", 600.0).await);
    ben.wait_connected(scaled(20.0)).await.unwrap();
    amy.wait_connected(scaled(20.0)).await.unwrap();
    for text in ["before 0", "before 1"] {
        ben.dm("dmamy", text).await.unwrap();
    }
    rec.wait("amy's two DMs", 20.0, |ev| dm_texts(ev).len() == 2).await;
    h.stop(&s).await;
    h.restart(&s).await;
    let connects = |ev: &[Event]| ev.iter().filter(|e| matches!(e, Event::State(ConnectionState::Connected))).count();
    rec.wait("amy's reconnect", 30.0, |ev| connects(ev) == 2).await;
    rec_ben.wait("ben's reconnect", 30.0, |ev| connects(ev) == 2).await;
    let mut ids = Vec::new();
    for i in 0..3 {
        ids.push(ben.dm("dmamy", &format!("after {i}")).await.unwrap().id);
    }
    assert_eq!(ids, [1, 2, 3], "the restarted server numbers DMs from 1");
    rec.wait("amy's last DM", 20.0, |ev| dm_texts(ev).last().is_some_and(|t| t == "after 2")).await;
    assert_eq!(dm_texts(&rec.events()), ["before 0", "before 1", "after 0", "after 1", "after 2"]);
}

/// A server with persistence in a SQLite file of its own (removed before and after).
struct Database(std::path::PathBuf);

impl Database {
    fn new(name: &str) -> Database {
        let path = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("{name}-{}.db", std::process::id()));
        let db = Database(path);
        db.remove();
        db
    }

    fn url(&self) -> String {
        format!("sqlite:///{}", self.0.display())
    }

    fn remove(&self) {
        for suffix in ["", "-wal", "-shm", "-journal"] {
            let _ = std::fs::remove_file(format!("{}{suffix}", self.0.display()));
        }
    }
}

impl Drop for Database {
    fn drop(&mut self) {
        self.remove();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_send_goes_out_after_an_unrecovered_rejoin_without_replay() {
    let db = Database::new("unrecovered"); // dropped after the harness stopped the server
    let h = Harness::start().await;
    let s = h.server("memory", 1, json!({"ENABLE_PERSISTENCE": "1", "DATABASE_URL": db.url()})).await;
    let (a, rec_a, offline) = common::switchable(&s.url, h.token("vera", 600.0).await);
    let (b, _) = Client::builder(format!("{}?username=walt", s.url)).send_timeout(scaled(60.0)).connect();
    a.join("far").await.unwrap();
    b.join("far").await.unwrap();
    b.send("far", "before").await.unwrap();
    rec_a.wait("the first message", 20.0, |ev| common::message_ids(ev, "far") == [1]).await;

    // A is offline with a send waiting while the room moves on by more than the
    // server replays (1000): the re-join gets `recovered: false` and no replay.
    offline.store(true, Ordering::SeqCst);
    a.reconnect();
    rec_a.wait("disconnected", 20.0, |ev| ev.iter().any(|e| matches!(e, Event::Disconnected { .. }))).await;
    let pending = {
        let a = a.clone();
        tokio::spawn(async move { a.send("far", "from A while away").await })
    };
    for chunk in 0..6 {
        let n = if chunk < 5 { 200 } else { 1 };
        let sends = (0..n).map(|i| {
            let b = b.clone();
            async move { b.send("far", &format!("m{chunk}.{i}")).await }
        });
        for sent in futures_util::future::join_all(sends).await {
            sent.expect("B's send acknowledged");
        }
    }
    offline.store(false, Ordering::SeqCst);
    rec_a
        .wait("recovery failed", 30.0, |ev| {
            ev.iter().any(|e| {
                let lost = Event::RecoveryFailed { room: "far".into(), since: 1, last_id: 1002, epoch_changed: false };
                *e == lost
            })
        })
        .await;
    // Nothing else is posted: the send must go out after the `joined` alone.
    let sent = tokio::time::timeout(scaled(20.0), pending)
        .await
        .unwrap_or_else(|_| panic!("A's send still waits; outbox {}: {:#?}", a.outbox_len(), rec_a.events()))
        .unwrap()
        .expect("A's send acknowledged");
    assert_eq!((sent.id, sent.text.as_str()), (1003, "from A while away"));
    assert_eq!(a.outbox_len(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leave_keeps_the_sends_already_written() {
    let h = Harness::start().await;
    let s = h.server("memory", 1, json!({})).await;
    let (a, _) = signed_in(&s.url, h.token("lena", 600.0).await);
    let (b, rec_b) = signed_in(&s.url, h.token("lars", 600.0).await);
    a.join("exit").await.unwrap();
    b.join("exit").await.unwrap();
    // `join!` polls in order: the two sends are written, then the `leave`.
    let sends = (1..=2).map(|i| {
        let a = a.clone();
        async move { a.send("exit", &format!("m{i}")).await }
    });
    let (sent, left) = tokio::join!(futures_util::future::join_all(sends), a.leave("exit"));
    left.unwrap();
    // The server stored them: they are acknowledged, not failed (a retry by the
    // app would double them).
    let sent: Vec<_> = sent.into_iter().map(|r| r.map(|m| m.text).map_err(|e| e.code().map(str::to_owned))).collect();
    assert_eq!(sent, [Ok("m1".into()), Ok("m2".into())]);
    assert_eq!(a.outbox_len(), 0);
    rec_b.wait("the two messages", 20.0, |ev| common::message_ids(ev, "exit").len() >= 2).await;
    let texts: Vec<_> = common::messages(&rec_b.events(), "exit").into_iter().map(|(_, t)| t).collect();
    assert_eq!(texts, ["m1", "m2"]);
}

type FakeSocket = tokio_tungstenite::WebSocketStream<tokio::net::TcpStream>;

/// A fake server for one connection: `welcome`, then `serve` has the socket.
/// Returns its URL (later connection attempts are refused) and its task.
async fn fake_server<F, Fut>(serve: F) -> (String, tokio::task::JoinHandle<()>)
where
    F: FnOnce(FakeSocket) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send,
{
    let welcome = json!({"type": "welcome", "user_id": "u1", "username": "u1", "heartbeat_interval": 30.0});
    fake_server_greeting(welcome.to_string(), serve).await
}

/// [`fake_server`] greeting with `welcome`, raw JSON text (as a buggy server or a proxy could send it).
async fn fake_server_greeting<F, Fut>(welcome: String, serve: F) -> (String, tokio::task::JoinHandle<()>)
where
    F: FnOnce(FakeSocket) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send,
{
    use futures_util::SinkExt;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("ws://{}/ws", listener.local_addr().unwrap());
    let task = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.unwrap();
        drop(listener);
        let mut ws = tokio_tungstenite::accept_async(tcp).await.unwrap();
        ws.send(Message::text(welcome)).await.unwrap();
        serve(ws).await;
    });
    (url, task)
}

/// A fake server's loop answering every `join` (an empty room, `last_id` 0) and `ping`.
async fn answer_joins_and_pings(mut ws: FakeSocket) {
    use futures_util::{SinkExt, StreamExt};
    while let Some(Ok(Message::Text(text))) = ws.next().await {
        let cmd: serde_json::Value = serde_json::from_str(text.as_str()).unwrap();
        let id = cmd["id"].clone();
        let reply = match cmd["type"].as_str().unwrap() {
            "join" => json!({"type": "joined", "room": cmd["room"], "users": [], "last_id": 0, "id": id}),
            "ping" => json!({"type": "pong", "id": id}),
            _ => continue,
        };
        if ws.send(Message::text(reply.to_string())).await.is_err() {
            break;
        }
    }
}

/// A send written before the `leave` and refused after it (`rate_limited`) is not
/// kept for a retry the server would only answer with `not_in_room`: it fails with
/// the leave's `not_in_room`, as in the Python client (the JS client's `left`), not with
/// the refusal, which asks for a retry into a room the user left.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_written_send_refused_after_leave_fails_with_the_leave_s_error() {
    use futures_util::{SinkExt, StreamExt};
    let (url, server) = fake_server(|mut ws| async move {
        let mut held = None; // the first message: refused once the `leave` came
        while let Some(Ok(Message::Text(text))) = ws.next().await {
            let cmd: serde_json::Value = serde_json::from_str(text.as_str()).unwrap();
            let id = cmd["id"].clone();
            let replies = match cmd["type"].as_str().unwrap() {
                "join" => vec![json!({"type": "joined", "room": cmd["room"], "users": [], "last_id": 0, "id": id})],
                "ping" => vec![json!({"type": "pong", "id": id})],
                "message" if held.is_none() => {
                    held = Some(id);
                    vec![]
                }
                "message" => vec![json!({"type": "error", "code": "not_in_room", "message": "not in room", "id": id})],
                "leave" => vec![
                    json!({"type": "error", "code": "rate_limited", "message": "slow down", "retry_after_ms": 200,
                           "id": held.clone()}),
                    json!({"type": "left", "room": cmd["room"], "id": id}),
                ],
                _ => vec![],
            };
            for reply in replies {
                ws.send(Message::text(reply.to_string())).await.unwrap();
            }
        }
    })
    .await;
    let (c, _events) = Client::builder(url).send_timeout(scaled(20.0)).connect();
    c.join("exit").await.unwrap();
    // `join!` polls in order: the send is written, then the `leave`.
    let (sent, left) = tokio::join!(c.send("exit", "late"), c.leave("exit"));
    left.unwrap();
    let err = sent.unwrap_err();
    assert!(
        matches!(&err, Error::Server { code, message, .. } if code == "not_in_room" && message == "left exit"),
        "{err:?}"
    );
    assert_eq!(c.outbox_len(), 0);
    c.close();
    server.await.unwrap();
}

fn disconnections(rec: &Recorder) -> Vec<Event> {
    rec.events().into_iter().filter(|e| matches!(e, Event::Disconnected { .. })).collect()
}

/// `a` sends `m0` .. `m{n-1}` to `room` all at once; their acknowledgements, in the order
/// sent (a failure panics with the client's disconnections).
async fn send_at_once(a: &Client, rec: &Recorder, room: &str, n: usize) -> Vec<wschat::ChatMessage> {
    let sends = (0..n).map(|i| {
        let a = a.clone();
        let room = room.to_owned();
        async move { a.send(&room, &format!("m{i}")).await }
    });
    let sent = tokio::time::timeout(scaled(60.0), futures_util::future::join_all(sends)).await.expect("acknowledged");
    sent.into_iter().map(|r| r.unwrap_or_else(|e| panic!("{e}; {:#?}", disconnections(rec)))).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sends_faster_than_the_rate_limit_wait_for_retry_after() {
    let h = Harness::start().await;
    // One send at once, four a second; two refusals in a row more and the server closes (4102).
    let s = h.server("memory", 1, json!({"RATE_LIMIT": "4", "RATE_LIMIT_BURST": "1"})).await;
    let (a, rec_a) = signed_in(&s.url, h.token("rudi", 600.0).await);
    a.join("pace").await.unwrap();
    // The app sends every 50 ms, five times the limit.
    let mut tick = tokio::time::interval(Duration::from_millis(50));
    let mut sends = Vec::new();
    for i in 0..10 {
        tick.tick().await;
        let a = a.clone();
        sends.push(tokio::spawn(async move { a.send("pace", &format!("m{i}")).await }));
    }
    let mut ids = Vec::new();
    for (i, send) in sends.into_iter().enumerate() {
        let sent = send.await.unwrap().unwrap_or_else(|e| panic!("m{i}: {e}; {:#?}", disconnections(&rec_a)));
        ids.push(sent.id);
    }
    ids.sort();
    assert_eq!(ids, (1..=10).collect::<Vec<_>>());
    assert_eq!(disconnections(&rec_a), [], "the connection stayed up");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_sends_stays_within_the_rate_limit() {
    let h = Harness::start().await;
    // Ten at once, fifty a second: refused more than twenty times in a row, a client is closed (4102).
    let s = h.server("memory", 1, json!({"RATE_LIMIT": "50", "RATE_LIMIT_BURST": "10"})).await;
    let (a, rec_a) = signed_in(&s.url, h.token("bert", 600.0).await);
    a.join("burst").await.unwrap();
    let mut ids: Vec<u64> = send_at_once(&a, &rec_a, "burst", 100).await.iter().map(|m| m.id).collect();
    ids.sort();
    assert_eq!(ids, (1..=100).collect::<Vec<_>>());
    assert_eq!(disconnections(&rec_a), [], "the connection stayed up");
}

/// 100 sends at once, 20 over the server's burst then 50 a second: after the first
/// `rate_limited` the sends are paced, so the server refuses about a window of them, not
/// one or two per message (a window widened by each acknowledgement writes two sends
/// where one token is left); all arrive once, in id order, and the paced ones in the
/// order sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_past_the_rate_limit_draws_few_refusals() {
    let h = Harness::start().await;
    let s = h.server("memory", 1, json!({"RATE_LIMIT": "50", "RATE_LIMIT_BURST": "20"})).await;
    let (a, rec_a) = signed_in(&s.url, h.token("dora", 600.0).await);
    a.join("pace").await.unwrap();
    let before = common::refusals(&s).await;
    let sent = send_at_once(&a, &rec_a, "pace", 100).await;
    let refused = common::refusals(&s).await - before;
    assert!(refused <= 40, "{refused} rate_limited refusals for 100 sends");
    assert_eq!(disconnections(&rec_a), [], "the connection stayed up");
    let ids: Vec<u64> = sent.iter().map(|m| m.id).collect();
    let mut sorted = ids.clone();
    sorted.sort();
    assert_eq!(sorted, (1..=100).collect::<Vec<_>>(), "a send lost or stored twice");
    assert_eq!(ids, (1..=100).collect::<Vec<_>>(), "stored in another order than sent");
    rec_a.wait("every message delivered", 20.0, |ev| common::message_ids(ev, "pace").len() >= 100).await;
    let mut wanted: Vec<(u64, String)> = sent.into_iter().map(|m| (m.id, m.text)).collect();
    wanted.sort();
    assert_eq!(common::messages(&rec_a.events(), "pace"), wanted);
}

/// A full server (`MAX_CONNECTIONS`) answers the upgrade with 503 and `Retry-After: 5`:
/// the next attempt waits that long, not the 50 .. 200 ms of the client's own backoff,
/// even once a slot is free.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_server_s_retry_after_is_waited_before_reconnecting() {
    const RETRY_AFTER: Duration = Duration::from_secs(5);
    let h = Harness::start().await;
    let s = h.server("memory", 1, json!({"MAX_CONNECTIONS": "1"})).await;
    let (first, _) = signed_in(&s.url, h.token("ann", 600.0).await);
    first.wait_connected(scaled(20.0)).await.unwrap();
    let token = h.token("bea", 600.0).await;
    let (second, events) = Client::builder(&s.url)
        .token(move || {
            let t = token.clone();
            async move { Ok(t) }
        })
        .backoff(Duration::from_millis(50), Duration::from_millis(200))
        .connect();
    let rec = Recorder::new(events);
    rec.wait("the refused upgrade", 20.0, |ev| ev.iter().any(|e| matches!(e, Event::Disconnected { .. }))).await;
    let refused_at = tokio::time::Instant::now();
    let Event::Disconnected { reason, reconnect_in, .. } = disconnections(&rec).remove(0) else { unreachable!() };
    assert!(reason.contains("503"), "{reason}");
    assert!(reconnect_in.is_some_and(|d| d >= RETRY_AFTER), "reconnecting in {reconnect_in:?} after {reason}");
    first.close(); // a slot is free now: only Retry-After holds the second back
    second.wait_connected(RETRY_AFTER + scaled(20.0)).await.unwrap();
    let waited = refused_at.elapsed();
    assert!(waited >= RETRY_AFTER - Duration::from_millis(5), "reconnected {waited:?} after the 503");
    assert_eq!(disconnections(&rec).len(), 1, "one refusal, then connected");
    second.close();
}

/// A write that fails because the server's Close frame came first reports that
/// frame's code (a 4102 must make the client pause), not the write's error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_after_the_close_frame_reports_its_code() {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::protocol::{frame::coding::CloseCode, CloseFrame};

    // A fake server: Close 4102 on the first frame after `welcome`; the TCP
    // connection stays open until the test is over.
    let (closed_tx, closed_rx) = tokio::sync::oneshot::channel();
    let (done_tx, done_rx) = tokio::sync::oneshot::channel::<()>();
    let (url, server) = fake_server(|mut ws| async move {
        while !matches!(ws.next().await, Some(Ok(Message::Text(_))) | None) {}
        let close = CloseFrame { code: CloseCode::from(4102), reason: "flooding".into() };
        ws.send(Message::Close(Some(close))).await.unwrap();
        // The client's own Close frame: it has read ours.
        while !matches!(ws.next().await, Some(Ok(Message::Close(_))) | None) {}
        let _ = closed_tx.send(());
        let _ = done_rx.await;
    })
    .await;
    let (c, events) = Client::builder(url).backoff(Duration::from_millis(100), Duration::from_secs(1)).connect();
    let rec = Recorder::new(events);
    c.wait_connected(scaled(20.0)).await.unwrap();
    let dm = |text: &'static str| {
        let c = c.clone();
        tokio::spawn(async move { c.dm("someone", text).await })
    };
    let _first = dm("one");
    tokio::time::timeout(scaled(20.0), closed_rx).await.expect("the close handshake").unwrap();
    let _second = dm("two"); // written after the Close frame came: the write fails
    rec.wait("disconnected", 20.0, |ev| ev.iter().any(|e| matches!(e, Event::Disconnected { .. }))).await;
    let Event::Disconnected { code, reason, reconnect_in } = disconnections(&rec).remove(0) else { unreachable!() };
    assert_eq!((code, reason.as_str()), (Some(4102), "flooding"));
    assert!(reconnect_in.is_some(), "a 4102 pauses, then reconnects");
    c.close();
    let _ = done_tx.send(());
    server.await.unwrap();
}

/// The refusals of one client, waited for until it gives up, plus half a second in which
/// its 50 .. 200 ms backoff would have tried again twice.
async fn refused_for_good(url: String, status: u16) -> Client {
    let (c, events) = Client::builder(url).backoff(Duration::from_millis(50), Duration::from_millis(200)).connect();
    let rec = Recorder::new(events);
    // The wait for the connection ends with the refusal's status, not a bare `Error::Closed`.
    let waited = c.wait_connected(scaled(20.0)).await;
    assert!(matches!(waited, Err(Error::Terminal { code: Some(code), .. }) if code == status), "{waited:?}");
    rec.wait("a terminal error", 20.0, |ev| ev.iter().any(|e| matches!(e, Event::Error(Error::Terminal { .. })))).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let gone = disconnections(&rec);
    assert!(
        matches!(gone[..], [Event::Disconnected { code: Some(code), reconnect_in: None, .. }] if code == status),
        "one attempt, refused with {status}, then nothing: {gone:?}"
    );
    let errors: Vec<Event> = rec.events().into_iter().filter(|e| matches!(e, Event::Error(_))).collect();
    assert!(
        matches!(errors[..], [Event::Error(Error::Terminal { code: Some(code), .. })] if code == status),
        "{errors:?}"
    );
    // And so does every later call: the client is gone for good, and this is why.
    let later = c.join("r").await;
    assert!(matches!(&later, Err(Error::Terminal { code: Some(code), .. }) if *code == status), "{later:?}");
    c
}

/// An upgrade refused with a status retrying cannot change stops the client, as a terminal
/// close code does (and as the Python client does): the real server's 400 for a guest name
/// it refuses, and its 404 for a path that is not the WebSocket endpoint.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upgrade_refused_for_good_stops_the_client() {
    let h = Harness::start().await;
    let s = h.server("memory", 1, json!({})).await;
    refused_for_good(format!("{}?username=no/slashes", s.url), 400).await;
    refused_for_good(format!("{}/nowhere", s.url.trim_end_matches("/ws")), 404).await;
}

/// A 403 (the server's answer to an `Origin` not in `ALLOWED_ORIGINS`; this client sends
/// none, so a fake server answers it) is terminal too: one connection, not one per backoff.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upgrade_refused_with_403_is_not_retried() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("ws://{}/ws", listener.local_addr().unwrap());
    let attempts = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counted = attempts.clone();
    let server = tokio::spawn(async move {
        loop {
            let (mut tcp, _) = listener.accept().await.unwrap();
            counted.fetch_add(1, Ordering::SeqCst);
            let mut request = [0u8; 4096];
            let _ = tcp.read(&mut request).await;
            let body = "origin not allowed\n";
            let answer = format!(
                "HTTP/1.1 403 FORBIDDEN\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = tcp.write_all(answer.as_bytes()).await;
        }
    });
    refused_for_good(url, 403).await;
    assert_eq!(attempts.load(Ordering::SeqCst), 1, "connections to the refusing server");
    server.abort();
}

/// A 503 whose `Retry-After` is more seconds than a `Duration` holds (a misconfigured proxy)
/// is waited, capped at a day, like any other: it used to panic the driver task, and the app
/// saw no error, no event, and a client that never connected again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_huge_retry_after_is_capped_at_a_day() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("ws://{}/ws", listener.local_addr().unwrap());
    let server = tokio::spawn(async move {
        loop {
            let (mut tcp, _) = listener.accept().await.unwrap();
            let mut request = [0u8; 4096];
            let _ = tcp.read(&mut request).await;
            let answer = "HTTP/1.1 503 Service Unavailable\r\nRetry-After: 100000000000000000000\r\n\
                          Content-Length: 0\r\nConnection: close\r\n\r\n";
            let _ = tcp.write_all(answer.as_bytes()).await;
        }
    });
    let (c, events) = Client::builder(url).backoff(Duration::from_millis(50), Duration::from_millis(200)).connect();
    let rec = Recorder::new(events);
    rec.wait("the refused upgrade", 20.0, |ev| ev.iter().any(|e| matches!(e, Event::Disconnected { .. }))).await;
    let Event::Disconnected { code, reconnect_in, .. } = disconnections(&rec).remove(0) else { unreachable!() };
    assert_eq!(code, Some(503));
    assert_eq!(reconnect_in, Some(Duration::from_secs(86_400)), "a day, the cap");
    c.close();
    server.abort();
}

/// A fake server that joins, answers `history`, and refuses each `message` with a
/// `rate_limited` whose `retry_after_ms` is the next raw JSON text of `refusals` (as a buggy
/// server or a proxy could send it), then echoes the message.
async fn refusing_server(refusals: Vec<&'static str>) -> (String, tokio::task::JoinHandle<()>) {
    use futures_util::{SinkExt, StreamExt};
    fake_server(move |mut ws| async move {
        let mut refusals = refusals.into_iter();
        let mut seq = 0;
        while let Some(Ok(Message::Text(text))) = ws.next().await {
            let cmd: serde_json::Value = serde_json::from_str(text.as_str()).unwrap();
            let id = cmd["id"].clone();
            let reply = match cmd["type"].as_str().unwrap() {
                "join" => json!({"type": "joined", "room": cmd["room"], "users": [], "last_id": 0, "id": id}).to_string(),
                "ping" => json!({"type": "pong", "id": id}).to_string(),
                "history" => json!({"type": "history", "room": cmd["room"], "messages": [], "id": id}).to_string(),
                "message" => match refusals.next() {
                    Some(raw) => format!(
                        r#"{{"type": "error", "code": "rate_limited", "message": "slow down", "retry_after_ms": {raw}, "id": {id}}}"#
                    ),
                    None => {
                        seq += 1;
                        json!({"type": "message", "id": seq, "room": cmd["room"], "from": "u1", "user_id": "u1",
                               "text": cmd["text"], "timestamp": 0, "client_msg_id": cmd["client_msg_id"]})
                        .to_string()
                    }
                },
                _ => continue,
            };
            if ws.send(Message::text(reply)).await.is_err() {
                break;
            }
        }
    })
    .await
}

/// A `retry_after_ms` that is not a whole number (`120.5`, `1e400`) is read by the shared rule
/// (121 ms; none, so the default second): the refusal is handled and the send goes again. It
/// used to make the whole `error` unparsable: the refusal was dropped as `invalid_event`, and
/// the send waited for an answer that had already come.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_odd_retry_after_ms_still_refuses_and_the_send_goes_again() {
    let (url, server) = refusing_server(vec!["120.5", "1e400"]).await;
    let (c, events) = Client::builder(url).connect();
    let rec = Recorder::new(events);
    c.join("r").await.unwrap();
    let started = std::time::Instant::now();
    let sent =
        tokio::time::timeout(scaled(10.0), c.send("r", "hi")).await.expect("the send, refused twice, went again");
    assert_eq!(sent.unwrap().text, "hi");
    assert!(started.elapsed() >= Duration::from_millis(1100), "not before 121 ms, then the default second");
    let invalid: Vec<_> = rec
        .events()
        .into_iter()
        .filter(|e| matches!(e, Event::Error(e) if e.code() == Some("invalid_event")))
        .collect();
    assert!(invalid.is_empty(), "{invalid:?}");
    c.close();
    server.abort();
}

/// A server (or a proxy) that sends its Close frame and then keeps the TCP connection open ends
/// the connection within the close wait (3 s), with its close code: the client used to wait for
/// two heartbeats and 5 s (65 s here) before it noticed, "connected" all that time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_close_frame_ends_the_connection_even_if_the_server_keeps_the_socket() {
    use futures_util::SinkExt;
    use tokio_tungstenite::tungstenite::protocol::{frame::coding::CloseCode, CloseFrame};
    let (done_tx, done_rx) = tokio::sync::oneshot::channel::<()>();
    let (url, server) = fake_server(|mut ws| async move {
        let close = CloseFrame { code: CloseCode::from(4102), reason: "flooding".into() };
        ws.send(Message::Close(Some(close))).await.unwrap();
        let _ = done_rx.await; // the socket stays open, unread
    })
    .await;
    let (c, events) = Client::builder(url).connect();
    let rec = Recorder::new(events);
    rec.wait("disconnected", 15.0, |ev| ev.iter().any(|e| matches!(e, Event::Disconnected { .. }))).await;
    let ends: Vec<_> = rec
        .events()
        .into_iter()
        .filter_map(|e| match e {
            Event::Disconnected { code, reason, .. } => Some((code, reason)),
            _ => None,
        })
        .collect();
    assert_eq!(ends, [(Some(4102), "flooding".to_owned())]);
    c.close();
    let _ = done_tx.send(());
    server.abort();
}

/// A Close frame without a status code is reported as 1005 ("no status code present", RFC 6455
/// 7.1.5), as the JS (the `WebSocket` API) and Python clients report it; the connection is
/// reconnected with the usual backoff. It was reported as `None`, which also stands for a
/// connection dropped without any Close frame (1006).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_close_frame_without_a_status_code_is_reported_as_1005() {
    use futures_util::{SinkExt, StreamExt};
    let (url, server) = fake_server(|mut ws| async move {
        ws.send(Message::Close(None)).await.unwrap();
        while ws.next().await.is_some() {} // the client's answer, then the end
    })
    .await;
    let (c, events) = Client::builder(url).backoff(Duration::from_secs(60), Duration::from_secs(60)).connect();
    let rec = Recorder::new(events);
    rec.wait("disconnected", 15.0, |ev| ev.iter().any(|e| matches!(e, Event::Disconnected { .. }))).await;
    let ends: Vec<_> = rec
        .events()
        .into_iter()
        .filter_map(|e| match e {
            Event::Disconnected { code, reason, reconnect_in } => Some((code, reason, reconnect_in.is_some())),
            _ => None,
        })
        .collect();
    assert_eq!(ends, [(Some(1005), String::new(), true)]);
    c.close();
    server.abort();
}

/// Connects, writes a DM, and gets `error` (raw JSON) then a Close frame 4102 in answer, the
/// server keeping the socket open after it: the events up to the disconnect.
async fn error_then_4102(error: &'static str) -> Vec<Event> {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::protocol::{frame::coding::CloseCode, CloseFrame};
    let (done_tx, done_rx) = tokio::sync::oneshot::channel::<()>();
    let (url, server) = fake_server(move |mut ws| async move {
        while !matches!(ws.next().await, Some(Ok(Message::Text(_))) | None) {}
        ws.send(Message::text(error)).await.unwrap();
        let close = CloseFrame { code: CloseCode::from(4102), reason: "flooding".into() };
        ws.send(Message::Close(Some(close))).await.unwrap();
        let _ = done_rx.await;
    })
    .await;
    let (c, events) = Client::builder(url).connect();
    let rec = Recorder::new(events);
    c.wait_connected(scaled(20.0)).await.unwrap();
    let c2 = c.clone();
    let _dm = tokio::spawn(async move { c2.dm("someone", "one").await });
    rec.wait("disconnected", 20.0, |ev| ev.iter().any(|e| matches!(e, Event::Disconnected { .. }))).await;
    c.close();
    let _ = done_tx.send(());
    server.abort();
    rec.events()
}

/// Only a `rate_limited` error's wait is a floor for the next reconnect, as in the JS and Python
/// clients: a `forbidden` carrying a `retry_after_ms` (a day here) used to hold the reconnect after
/// a 4102 for that day.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_a_rate_limited_wait_holds_the_reconnect() {
    let events =
        error_then_4102(r#"{"type": "error", "code": "forbidden", "message": "no", "retry_after_ms": 86400000}"#).await;
    let waits: Vec<_> = events
        .into_iter()
        .filter_map(|e| match e {
            Event::Disconnected { reconnect_in, .. } => Some(reconnect_in),
            _ => None,
        })
        .collect();
    assert!(
        matches!(waits[..], [Some(wait)] if wait < Duration::from_secs(3600)),
        "a forbidden's wait held the reconnect: {waits:?}"
    );
}

/// `retry_after_ms: 18446744073709551615` (`u64::MAX`) is capped at a day where it is read: the
/// app's error says a day, and so does the reconnect after a 4102 (the wait is a floor for it).
/// It used to be `u64::MAX` ms, about 584 million years: no reconnect ever (and an `Instant`
/// near overflow for every computation that adds to it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_huge_retry_after_ms_is_capped_at_a_day() {
    let events = error_then_4102(
        r#"{"type": "error", "code": "rate_limited", "message": "flood", "retry_after_ms": 18446744073709551615}"#,
    )
    .await;
    let day = Duration::from_secs(86_400);
    let waits: Vec<_> = events
        .into_iter()
        .filter_map(|e| match e {
            Event::Error(Error::Server { retry_after_ms, .. }) => {
                Some(("error", retry_after_ms.map(Duration::from_millis)))
            }
            Event::Disconnected { reconnect_in, .. } => Some(("reconnect", reconnect_in)),
            _ => None,
        })
        .collect();
    assert_eq!(waits, [("error", Some(day)), ("reconnect", Some(day))]);
}

/// A welcome whose `heartbeat_interval` is `1e20`, a string or `1e400` still connects, and the
/// driver lives on (a join is answered). `1e20` went to `Duration::from_secs_f64`, which
/// panicked and killed the driver task; `"30"` and `1e400` made the welcome unparsable (dropped
/// as `invalid_event`: never connected). Now read by the shared rule: a day, or none (30 s).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_odd_heartbeat_interval_neither_kills_the_driver_nor_loses_the_welcome() {
    for raw in ["1e20", "-1", "\"30\"", "1e400", "1e-300", "18446744073709551616"] {
        let welcome = format!(
            r#"{{"type": "welcome", "user_id": "u1", "username": "u1", "authenticated": false, "auth_required": false, "heartbeat_interval": {raw}}}"#
        );
        let (url, server) = fake_server_greeting(welcome, answer_joins_and_pings).await;
        let (c, events) = Client::builder(url).connect();
        let rec = Recorder::new(events);
        let connected = c.wait_connected(scaled(5.0)).await;
        assert!(connected.is_ok(), "heartbeat_interval {raw}: not connected: {connected:?}, {:?}", rec.events());
        let joined = tokio::time::timeout(scaled(5.0), c.join("r")).await;
        assert!(matches!(joined, Ok(Ok(_))), "heartbeat_interval {raw}: the join: {joined:?}");
        c.close();
        server.abort();
    }
}

/// A JWT (unsigned: the fake server does not check it) whose payload is `{"sub":"u1","exp":<raw>}`.
fn jwt_with_exp(raw: &str) -> String {
    fn b64url(bytes: &[u8]) -> String {
        const ABC: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
        let mut out = String::new();
        for chunk in bytes.chunks(3) {
            let n = chunk.iter().enumerate().fold(0u32, |n, (i, b)| n | u32::from(*b) << (16 - 8 * i));
            for i in 0..=chunk.len() {
                out.push(ABC[(n >> (18 - 6 * i) & 63) as usize] as char);
            }
        }
        out
    }
    let payload = format!(r#"{{"sub":"u1","exp":{raw}}}"#);
    format!("{}.{}.c2ln", b64url(br#"{"alg":"HS256","typ":"JWT"}"#), b64url(payload.as_bytes()))
}

/// A token whose `exp` is further ahead than an `Instant` or a `Duration` reaches (`u64::MAX`,
/// `1e19`, `9.3e18` seconds) neither kills the driver nor ends the connection: the refresh is
/// looked at again after a day at most (as the JS client re-arms its timer), and the client
/// stays connected and answers. It used to panic in `schedule_refresh` right after the welcome
/// (`Instant + Duration` overflowed, or `Duration::from_secs_f64` did), killing the driver task.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_that_expires_past_an_instant_s_range_does_not_kill_the_driver() {
    let mut wrong = Vec::new();
    for raw in ["18446744073709551615", "1e19", "9.3e18", "9300000000000000000", "1e300"] {
        let token = jwt_with_exp(raw);
        assert!(token.split('.').nth(1).is_some_and(|p| !p.contains('=')));
        let (url, server) = fake_server(answer_joins_and_pings).await;
        let (c, rec) = signed_in(&url, token);
        let connected = c.wait_connected(scaled(5.0)).await;
        let joined = tokio::time::timeout(scaled(5.0), c.join("r")).await;
        tokio::time::sleep(Duration::from_millis(200)).await;
        let state = c.state();
        if connected.is_err() || !matches!(joined, Ok(Ok(_))) || state != wschat::ConnectionState::Connected {
            wrong.push(format!("exp {raw}: {connected:?}, the join {joined:?}, then {state:?}: {:?}", rec.events()));
        }
        c.close();
        server.abort();
    }
    assert!(wrong.is_empty(), "{wrong:#?}");
}

/// A client of a [`scripted_server`] that gives up on a request or a send after 2 s (scaled)
/// and reconnects within 200 ms, with its events recorded.
fn impatient_client(url: String) -> (Client, Recorder) {
    let (c, events) = Client::builder(url)
        .request_timeout(scaled(2.0))
        .send_timeout(scaled(2.0))
        .backoff(Duration::from_millis(50), Duration::from_millis(200))
        .connect();
    (c, Recorder::new(events))
}

/// The frames a client wrote to a [`scripted_server`], with the number of their connection (from 1).
type Frames = Arc<Mutex<Vec<(usize, serde_json::Value)>>>;

/// A fake server that refuses the first `join` with `unavailable` and answers every later one.
async fn server_refusing_the_first_join() -> (String, Frames, tokio::task::JoinHandle<()>) {
    let refused = Arc::new(std::sync::atomic::AtomicBool::new(false));
    scripted_server(move |cmd, _| match cmd["type"].as_str() {
        Some("join") if !refused.swap(true, Ordering::SeqCst) => {
            let refusal = json!({"type": "error", "code": "unavailable", "message": "later", "id": cmd["id"]});
            vec![refusal.to_string()]
        }
        Some("join") => vec![raw_joined(cmd, Some("0"), None)],
        _ => vec![],
    })
    .await
}

/// A fake server for every connection attempt: `welcome`, then each frame of the client goes to
/// `script` (with its connection's number, from 1), which returns the raw JSON texts to send
/// back (as a buggy server or a proxy could write them); a `ping` it leaves unanswered gets its
/// `pong`; a reply [`CLOSE`] closes the connection (1012) instead. Returns the URL, the frames
/// written so far, and the server's task.
async fn scripted_server(
    script: impl Fn(&serde_json::Value, usize) -> Vec<String> + Send + Sync + 'static,
) -> (String, Frames, tokio::task::JoinHandle<()>) {
    let welcome = json!({"type": "welcome", "user_id": "u1", "username": "u1", "heartbeat_interval": 30.0});
    scripted_server_greeting(welcome, script).await
}

/// A [`scripted_server`] greeting every connection with `welcome` (JSON, or raw JSON text as a
/// buggy server or a proxy could send it).
async fn scripted_server_greeting(
    welcome: impl std::fmt::Display,
    script: impl Fn(&serde_json::Value, usize) -> Vec<String> + Send + Sync + 'static,
) -> (String, Frames, tokio::task::JoinHandle<()>) {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::protocol::{frame::coding::CloseCode, CloseFrame};
    let (script, welcome) = (Arc::new(script), welcome.to_string());
    let frames = Frames::default();
    let seen = frames.clone();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("ws://{}/ws", listener.local_addr().unwrap());
    let task = tokio::spawn(async move {
        for n in 1.. {
            let Ok((tcp, _)) = listener.accept().await else { return };
            let (script, seen, welcome) = (script.clone(), seen.clone(), welcome.clone());
            tokio::spawn(async move {
                let Ok(mut ws) = tokio_tungstenite::accept_async(tcp).await else { return };
                let _ = ws.send(Message::text(welcome)).await;
                while let Some(Ok(Message::Text(text))) = ws.next().await {
                    let cmd: serde_json::Value = serde_json::from_str(text.as_str()).unwrap();
                    seen.lock().unwrap().push((n, cmd.clone()));
                    let mut replies = script(&cmd, n);
                    if replies.is_empty() && cmd["type"] == "ping" {
                        replies.push(json!({"type": "pong", "id": cmd["id"]}).to_string());
                    }
                    for reply in replies {
                        if reply == CLOSE {
                            let frame = CloseFrame { code: CloseCode::Restart, reason: "".into() };
                            let _ = ws.close(Some(frame)).await;
                            return;
                        }
                        if ws.send(Message::text(reply)).await.is_err() {
                            return;
                        }
                    }
                }
            });
        }
    });
    (url, frames, task)
}

/// A [`scripted_server`]'s reply closing the connection.
const CLOSE: &str = "close";

/// A `joined` answering `join`, with `last_id` as raw JSON text (`None`: absent).
fn raw_joined(join: &serde_json::Value, last_id: Option<&str>, recovered: Option<bool>) -> String {
    let mut joined = json!({"type": "joined", "room": join["room"], "users": [], "id": join["id"]});
    if let Some(recovered) = recovered {
        joined["recovered"] = json!(recovered);
    }
    let text = joined.to_string();
    match last_id {
        Some(raw) => format!(r#"{}, "last_id": {raw}}}"#, &text[..text.len() - 1]),
        None => text,
    }
}

/// A room message with `id` as raw JSON text: another member's, or, when `client_msg_id` is
/// given, an echo (from "u1", the user the fake servers greet: only an echo from a user the
/// client has been acknowledges a send).
fn raw_message(id: &str, room: &str, text: &str, client_msg_id: Option<&str>) -> String {
    let mut message =
        json!({"type": "message", "room": room, "from": "x", "user_id": "x", "text": text, "timestamp": 1});
    if let Some(cmid) = client_msg_id {
        message["client_msg_id"] = json!(cmid);
        message["from"] = json!("u1");
        message["user_id"] = json!("u1");
    }
    let body = message.to_string();
    format!(r#"{}, "id": {id}}}"#, &body[..body.len() - 1])
}

/// Waits up to `secs` (scaled) for `ok`, without failing: the test reports what it saw.
async fn eventually(secs: f64, ok: impl Fn() -> bool) {
    let _ = tokio::time::timeout(scaled(secs), async {
        while !ok() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
}

/// The `join` frames written on connection `n`.
fn joins_on(frames: &Frames, n: usize) -> Vec<serde_json::Value> {
    frames.lock().unwrap().iter().filter(|(c, f)| *c == n && f["type"] == "join").map(|(_, f)| f.clone()).collect()
}

fn invalid_events(rec: &Recorder) -> usize {
    rec.count(|e| matches!(e, Event::Error(e) if e.code() == Some("invalid_event")))
}

/// A first `joined` whose `last_id` is not a whole number >= 0 (at most 2^53 - 1) still answers
/// the `join` (its `last_id` 0), the room keeps no position, and the next messages set it: 4 and
/// 5 arrive, the send goes out and its echo 6 arrives, one join, and the re-join after a
/// reconnect says `since` 6. `"5"`, `null`, `1e400`, `-1`, `2.5`, `true`, `{}` and an absent
/// `last_id` made the whole `joined` unparsable (`invalid_event`): the `join` timed out, the room
/// stayed joining (its sends held) though its messages were delivered; `2^53 + 1` made 4 and 5
/// look seen; `u64::MAX` overflowed `last + 1` at the next message and killed the driver task.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_odd_last_id_on_a_first_join_still_joins_and_the_next_message_sets_the_position() {
    let mut wrong = Vec::new();
    for raw in
        [r#""5""#, "null", "1e400", "-1", "2.5", "true", "{}", "9007199254740993", "18446744073709551615", "absent"]
    {
        let (url, frames, server) = scripted_server(move |cmd, _| match cmd["type"].as_str() {
            Some("join") => vec![
                raw_joined(cmd, Some(raw).filter(|r| *r != "absent"), None),
                raw_message("4", "r", "4", None),
                raw_message("5", "r", "5", None),
            ],
            Some("message") => vec![raw_message("6", "r", "mine", cmd["client_msg_id"].as_str())],
            _ => vec![],
        })
        .await;
        let (c, rec) = impatient_client(url);
        let joined = c.join("r").await.map(|j| j.last_id);
        let sent = c.send("r", "mine").await.map(|m| m.id);
        eventually(1.0, || rec.ids("r").len() >= 3).await;
        let joins = joins_on(&frames, 1).len();
        c.reconnect();
        eventually(2.0, || !joins_on(&frames, 2).is_empty()).await;
        let since = joins_on(&frames, 2).first().map(|j| j["since"].clone());
        let got = format!(
            "joined {joined:?}, sent {sent:?}, messages {:?}, {joins} join(s), rejoin since {since:?}, {} invalid_event",
            rec.ids("r"),
            invalid_events(&rec)
        );
        let want =
            "joined Ok(0), sent Ok(6), messages [4, 5, 6], 1 join(s), rejoin since Some(Number(6)), 0 invalid_event";
        if got != want {
            wrong.push(format!("last_id {raw}: {got}"));
        }
        c.close();
        server.abort();
    }
    assert!(wrong.is_empty(), "{wrong:#?}");
}

/// A re-join's `joined` whose `last_id` is not a whole number >= 0 keeps the room's position
/// (`since`, 7): the `Joined` and the `RecoveryFailed` (with `recovered: false`) say 7, the
/// replay (8) is delivered, and the send made meanwhile goes out (its echo 9). It used to make
/// the whole `joined` unparsable: no `Joined`, the room stayed joining and the send held until
/// it timed out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_odd_last_id_on_a_rejoin_keeps_the_position() {
    let mut wrong = Vec::new();
    for raw in [r#""40""#, "null", "2.5", "-1", "1e400", "9007199254740992"] {
        for recovered in [false, true] {
            let (url, _frames, server) = scripted_server(move |cmd, n| match (cmd["type"].as_str(), n) {
                (Some("join"), 1) => vec![raw_joined(cmd, Some("6"), None), raw_message("7", "r", "7", None)],
                (Some("join"), _) => {
                    vec![raw_joined(cmd, Some(raw), Some(recovered)), raw_message("8", "r", "8", None)]
                }
                (Some("message"), _) => vec![raw_message("9", "r", "after", cmd["client_msg_id"].as_str())],
                _ => vec![],
            })
            .await;
            let (c, rec) = impatient_client(url);
            c.join("r").await.unwrap();
            eventually(2.0, || rec.ids("r") == [7]).await;
            c.reconnect();
            let sent = c.send("r", "after").await.map(|m| m.id);
            eventually(1.0, || rec.ids("r").len() >= 3).await;
            let events = rec.events();
            let joined: Vec<_> =
                events.iter().filter_map(|e| if let Event::Joined(j) = e { Some(j.last_id) } else { None }).collect();
            let lost: Vec<_> = events
                .iter()
                .filter_map(|e| {
                    if let Event::RecoveryFailed { since, last_id, .. } = e {
                        Some((*since, *last_id))
                    } else {
                        None
                    }
                })
                .collect();
            let got = format!("joined {joined:?}, lost {lost:?}, sent {sent:?}, messages {:?}", rec.ids("r"));
            let want_lost = if recovered { "[]" } else { "[(7, 7)]" };
            let want = format!("joined [6, 7], lost {want_lost}, sent Ok(9), messages [7, 8, 9]");
            if got != want {
                wrong.push(format!("last_id {raw}, recovered {recovered}: {got}"));
            }
            c.close();
            server.abort();
        }
    }
    assert!(wrong.is_empty(), "{wrong:#?}");
}

/// After `recovered: false` the next message sets the position whatever its id, but only an id
/// that is a whole number >= 0 and at most 2^53 - 1: `2^53 + 1` and `u64::MAX` are not
/// delivered (nor taken for a gap), `1e400`, `2.5`, `-1`, `"40"` and `null` still make the
/// message unparsable (`invalid_event`, as before: nothing waits for it), and 40 and 41 are
/// delivered, with no join again. `2^53 + 1` used to become the position (40 and 41 were then
/// dropped as seen, `u64::MAX` taken for a gap: a re-join).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn message_ids_after_recovered_false_only_a_whole_number_sets_the_position() {
    let ids = ["1e400", "2.5", "-1", r#""40""#, "null", "9007199254740993", "18446744073709551615", "40", "41"];
    let (url, frames, server) = scripted_server(move |cmd, n| match (cmd["type"].as_str(), n) {
        (Some("join"), 1) => vec![raw_joined(cmd, Some("6"), None), raw_message("7", "r", "7", None)],
        (Some("join"), _) if cmd["since"] == 7 => std::iter::once(raw_joined(cmd, Some("40"), Some(false)))
            .chain(ids.iter().map(|id| raw_message(id, "r", "t", None)))
            .collect(),
        (Some("join"), _) => vec![raw_joined(cmd, Some("41"), Some(true))],
        _ => vec![],
    })
    .await;
    let (c, events) = Client::builder(url).backoff(Duration::from_millis(50), Duration::from_millis(200)).connect();
    let rec = Recorder::new(events);
    c.join("r").await.unwrap();
    eventually(2.0, || rec.ids("r") == [7]).await;
    c.reconnect();
    eventually(2.0, || rec.ids("r").len() >= 3).await;
    c.ping().await.unwrap(); // everything before its pong is in
    let lost: Vec<_> = rec
        .events()
        .into_iter()
        .filter_map(
            |e| if let Event::RecoveryFailed { since, last_id, .. } = e { Some((since, last_id)) } else { None },
        )
        .collect();
    let got = format!(
        "messages {:?}, lost {lost:?}, joins {}, {} invalid_event",
        rec.ids("r"),
        joins_on(&frames, 2).len(),
        invalid_events(&rec)
    );
    assert_eq!(got, "messages [7, 40, 41], lost [(7, 40)], joins 1, 5 invalid_event");
    c.close();
    server.abort();
}

/// Every case of `clients/conformance/last-id.json` through the client: as a first `joined`'s
/// `last_id` (the `Joined` says the id, or 0, and the room's position is the id: message 1,
/// which follows, is delivered only after 0 or no position), and as the id of the first
/// message of a room joined without a `last_id` (delivered only when the id counts).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn last_id_off_the_wire_follows_the_shared_cases() {
    let shared: serde_json::Value = serde_json::from_str(include_str!("../../conformance/last-id.json")).unwrap();
    let cases: Vec<(String, Option<u64>)> = shared["cases"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| (c[0].as_str().unwrap().to_owned(), c[1].as_u64()))
        .collect();
    let texts: Vec<String> = cases.iter().map(|(t, _)| t.clone()).collect();
    let (url, _frames, server) = scripted_server(move |cmd, _| {
        let Some(room) = cmd["room"].as_str().filter(|_| cmd["type"] == "join") else { return vec![] };
        if room == "end" {
            return vec![raw_joined(cmd, Some("0"), None)];
        }
        let text = &texts[room[1..].parse::<usize>().unwrap()];
        if room.starts_with('j') {
            vec![raw_joined(cmd, Some(text), None), raw_message("1", room, "one", None)]
        } else {
            vec![raw_joined(cmd, Some("null"), None), raw_message(text, room, "first", None)]
        }
    })
    .await;
    let (c, events) = Client::builder(url).request_timeout(scaled(2.0)).connect();
    let rec = Recorder::new(events);
    let joins = (0..cases.len()).flat_map(|i| [format!("j{i}"), format!("m{i}")]).map(|room| {
        let c = c.clone();
        async move { c.join(&room).await.map(|j| j.last_id) }
    });
    let joined = futures_util::future::join_all(joins).await;
    // Events come in order: once the app has this join's, it has every event before it.
    let _ = c.join("end").await;
    eventually(5.0, || rec.count(|e| matches!(e, Event::Joined(j) if j.room == "end")) == 1).await;
    let mut wrong = Vec::new();
    for (i, (text, want)) in cases.iter().enumerate() {
        let label: String = text.chars().take(40).collect();
        let one = if want.is_none_or(|w| w == 0) { vec![1] } else { vec![] };
        let got = (&joined[2 * i], rec.ids(&format!("j{i}")));
        if got != (&Ok(want.unwrap_or(0)), one.clone()) {
            wrong.push(format!(
                "last_id {label}: joined {:?}, then message 1: {:?} (not {want:?}, {one:?})",
                got.0, got.1
            ));
        }
        let first = rec.ids(&format!("m{i}"));
        if first != want.map_or(vec![], |w| vec![w]) {
            wrong.push(format!("message id {label}: delivered {first:?}, not {want:?}"));
        }
    }
    assert!(wrong.is_empty(), "{wrong:#?}");
    c.close();
    server.abort();
}

/// The echo of a send whose `id` is no message id (`2.5`, `"7"`, `null`, `-1`, `1e400`, absent,
/// or a `u64` past 2^53 - 1) still acknowledges the send by its `client_msg_id`, as in the JS and
/// Python clients: the send resolves (its `id` `u64::MAX`, never a position: JS's and Python's
/// -1), written once, and the app gets no `Message` for it (it cannot be put in order). Such an
/// echo used to be unparsable: the send was written again every `resend_after` until
/// `send_timeout`; and one past 2^53 - 1 resolved the send with that `u64` as if it were an id.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_echo_with_an_odd_id_still_acknowledges_the_send() {
    let mut wrong = Vec::new();
    for raw in ["2.5", r#""7""#, "null", "-1", "1e400", "absent", "9007199254740992", "18446744073709551614"] {
        let (url, frames, server) = scripted_server(move |cmd, _| match cmd["type"].as_str() {
            Some("join") => vec![raw_joined(cmd, Some("6"), None)],
            Some("message") => {
                let echo = raw_message(raw, "r", "mine", cmd["client_msg_id"].as_str());
                vec![if raw == "absent" { echo.replace(r#", "id": absent"#, "") } else { echo }]
            }
            _ => vec![],
        })
        .await;
        let (c, events) = Client::builder(url)
            .send_timeout(scaled(3.0))
            .resend_after(Duration::from_millis(200))
            .backoff(Duration::from_millis(50), Duration::from_millis(200))
            .connect();
        let rec = Recorder::new(events);
        c.join("r").await.unwrap();
        let sent = c.send("r", "mine").await.map(|m| m.id);
        c.ping().await.unwrap(); // a resend would be written before the ping
        let writes = frames.lock().unwrap().iter().filter(|(_, f)| f["type"] == "message").count();
        eventually(1.0, || rec.count(|e| matches!(e, Event::Ack(_))) >= 1).await; // the events lag the calls
        let acks = rec.count(|e| matches!(e, Event::Ack(_)));
        let got = format!("sent {sent:?}, written {writes}, {acks} ack, messages {:?}", rec.ids("r"));
        let want = format!("sent Ok({}), written 1, 1 ack, messages []", u64::MAX);
        if got != want {
            wrong.push(format!("id {raw}: {got}"));
        }
        c.close();
        server.abort();
    }
    assert!(wrong.is_empty(), "{wrong:#?}");
}

/// `client.reconnect()` is the app asking for a fresh attempt now: a `rate_limited` wait the old
/// connection was told (a floor for the reconnect after a 4102 there) is not carried over to the
/// next one. Its upgrade refused with a 503 without `Retry-After`, the client retries with its
/// backoff (at most 200 ms here), as the Python client, which forgets that wait whenever a
/// connection ends, and the JS client after `disconnect()` and `connect()`. The 60 s the old
/// connection was told used to hold that retry.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconnect_forgets_the_old_connection_s_rate_limited_wait() {
    use futures_util::{SinkExt, StreamExt};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("ws://{}/ws", listener.local_addr().unwrap());
    let server = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.unwrap();
        let mut ws = tokio_tungstenite::accept_async(tcp).await.unwrap();
        let welcome = json!({"type": "welcome", "user_id": "u1", "username": "u1", "heartbeat_interval": 30.0});
        ws.send(Message::text(welcome.to_string())).await.unwrap();
        let refusal = json!({"type": "error", "code": "rate_limited", "message": "slow down", "retry_after_ms": 60000});
        ws.send(Message::text(refusal.to_string())).await.unwrap();
        while ws.next().await.is_some() {}
        loop {
            let (mut tcp, _) = listener.accept().await.unwrap();
            let mut request = [0u8; 4096];
            let _ = tcp.read(&mut request).await;
            let answer = "HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\nConnection: close\r\n\r\n";
            let _ = tcp.write_all(answer.as_bytes()).await;
        }
    });
    let (c, events) = Client::builder(url).backoff(Duration::from_millis(50), Duration::from_millis(200)).connect();
    let rec = Recorder::new(events);
    let told = |ev: &[Event]| ev.iter().any(|e| matches!(e, Event::Error(e) if e.code() == Some("rate_limited")));
    rec.wait("the rate_limited error", 10.0, told).await;
    c.reconnect();
    let refused = |ev: &[Event]| ev.iter().any(|e| matches!(e, Event::Disconnected { code: Some(503), .. }));
    rec.wait("the refused upgrade", 10.0, refused).await;
    let waits: Vec<_> = disconnections(&rec)
        .into_iter()
        .filter_map(|e| match e {
            Event::Disconnected { code: Some(503), reconnect_in, .. } => Some(reconnect_in),
            _ => None,
        })
        .collect();
    assert!(
        matches!(waits[..], [Some(wait), ..] if wait <= Duration::from_millis(200)),
        "the retry after the refused upgrade waited {waits:?}"
    );
    c.close();
    server.abort();
}

/// A direct message with `id` as raw JSON text (`None`: absent; an echo when `client_msg_id` is
/// given).
fn raw_dm(id: Option<&str>, client_msg_id: Option<&str>) -> String {
    let mut dm = json!({"type": "dm", "from": "u1", "user_id": "u1", "to": "u2", "text": "hi", "timestamp": 1});
    if let Some(cmid) = client_msg_id {
        dm["client_msg_id"] = json!(cmid);
    }
    let body = dm.to_string();
    match id {
        Some(id) => format!(r#"{}, "id": {id}}}"#, &body[..body.len() - 1]),
        None => body,
    }
}

/// As for a room message: the echo of a `dm` whose `id` is not a whole number >= 0 and at most
/// 2^53 - 1 (`2.5`, `"7"`, `null`, `-1`, `1e400`, past `u64`, 2^53, absent) still acknowledges
/// the send by its `client_msg_id` (its `id` `u64::MAX`, as JS's and Python's -1), written
/// once, but is no `Event::Dm` (its id could not tell it from another DM); the next DM, 2, is
/// one. Such an echo used to be unparsable (the send written again every `resend_after` until
/// `send_timeout`), 2^53 was delivered as a DM, and then resolved the send as its `id`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dm_echo_with_an_odd_id_still_acknowledges_the_send() {
    let mut wrong = Vec::new();
    for raw in ["2.5", r#""7""#, "null", "-1", "1e400", "18446744073709551616", "9007199254740992", "absent"] {
        let (url, frames, server) = scripted_server(move |cmd, _| match cmd["type"].as_str() {
            Some("dm") => {
                let id = Some(raw).filter(|raw| *raw != "absent");
                vec![raw_dm(id, cmd["client_msg_id"].as_str()), raw_dm(Some("2"), None)]
            }
            _ => vec![],
        })
        .await;
        let (c, events) = Client::builder(url)
            .send_timeout(scaled(3.0))
            .resend_after(Duration::from_millis(200))
            .backoff(Duration::from_millis(50), Duration::from_millis(200))
            .connect();
        let rec = Recorder::new(events);
        let sent = c.dm("u2", "mine").await.map(|m| m.id);
        c.ping().await.unwrap(); // a resend would be written before the ping
        let writes = frames.lock().unwrap().iter().filter(|(_, f)| f["type"] == "dm").count();
        let dm_ids = || -> Vec<u64> {
            let events = rec.events();
            events.iter().filter_map(|e| if let Event::Dm(dm) = e { Some(dm.id) } else { None }).collect()
        };
        eventually(1.0, || dm_ids().contains(&2)).await; // the events lag the calls
        let acks = rec.count(|e| matches!(e, Event::Ack(_)));
        let ids = dm_ids();
        let got = format!("sent {sent:?}, written {writes}, {acks} ack, dms {ids:?}");
        let want = format!("sent Ok({}), written 1, 1 ack, dms [2]", u64::MAX);
        if got != want {
            wrong.push(format!("id {raw}: {got}"));
        }
        c.close();
        server.abort();
    }
    assert!(wrong.is_empty(), "{wrong:#?}");
}

/// With persistence (the welcome has `dm_backlog`) a page of kept DMs may come again on the
/// next connection: a DM id seen before is a double, dropped. Without it no DM comes on two
/// connections, and a restarted memory server numbers DMs from 1 again: its new 1 was dropped
/// as a double of the 1 seen before the restart. The ids are forgotten on such a connection.
/// A welcome whose `heartbeat_interval` cannot be read at all (`1e400`) still tells persistence
/// by its `dm_backlog` (it was read without it: the ids were forgotten, and DM 1 doubled). A
/// `dm_backlog` of `2.0` is 2 (read as `last-id.json` reads ids, as the JS and Python clients
/// take it): it was taken for no persistence, and DM 1 doubled.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dm_ids_are_kept_across_connections_only_with_persistence() {
    let cases = [("0", "30.0"), ("", "30.0"), ("0", "1e400"), ("2.0", "30.0"), ("2.0", "1e400")];
    for (raw_backlog, interval) in cases {
        let persistence = !raw_backlog.is_empty();
        let backlog = if persistence { format!(r#", "dm_backlog": {raw_backlog}"#) } else { String::new() };
        let welcome = format!(
            r#"{{"type": "welcome", "user_id": "u2", "username": "u2", "heartbeat_interval": {interval}{backlog}}}"#
        );
        let dm = |id: u64, text: &str| {
            json!({"type": "dm", "id": id, "from": "u1", "user_id": "u1", "to": "u2", "text": text, "timestamp": 1})
                .to_string()
        };
        // The first connection: DM 1 at the first ping, then a close (1012). The second: DM
        // 1 again (with persistence the same DM, without it a restarted server's new first),
        // then DM 2.
        let again = if persistence { "first" } else { "new first" };
        let (url, _frames, server) = scripted_server_greeting(welcome, move |cmd, n| match (cmd["type"].as_str(), n) {
            (Some("ping"), 1) => vec![dm(1, "first"), CLOSE.to_owned()],
            (Some("ping"), _) => {
                vec![dm(1, again), dm(2, "second"), json!({"type": "pong", "id": cmd["id"]}).to_string()]
            }
            _ => vec![],
        })
        .await;
        let (c, events) = Client::builder(url)
            .backoff(Duration::from_millis(50), Duration::from_millis(200))
            .request_timeout(scaled(5.0))
            .connect();
        let rec = Recorder::new(events);
        c.wait_connected(scaled(20.0)).await.unwrap();
        let first = c.clone();
        let _closed = tokio::spawn(async move { first.ping().await }); // answered by DM 1 and a close
        rec.wait("the first DM", 20.0, |ev| dm_texts(ev) == ["first"]).await;
        let connects =
            |ev: &[Event]| ev.iter().filter(|e| matches!(e, Event::State(ConnectionState::Connected))).count();
        rec.wait("the reconnect", 20.0, |ev| connects(ev) == 2).await;
        c.ping().await.unwrap();
        rec.wait("the second DM", 20.0, |ev| dm_texts(ev).last().is_some_and(|t| t == "second")).await;
        let want: &[&str] = if persistence { &["first", "second"] } else { &["first", "new first", "second"] };
        assert_eq!(dm_texts(&rec.events()), want, "dm_backlog {raw_backlog:?}, heartbeat_interval {interval}");
        c.close();
        server.abort();
    }
}

/// A [`scripted_server`] answering each `ping` with the frames put in the returned list (then
/// its `pong`), so a test pushes them on cue, in order, and knows the client read them once the
/// `ping` resolves; `joined` (`last_id` 0) for a join; and, for a written `message` or `dm`
/// whose text is not in `held`, its echo from "u1", numbered from `first_id`.
async fn pushing_server(
    held: &'static [&'static str],
    first_id: usize,
) -> (String, Frames, Arc<Mutex<Vec<String>>>, tokio::task::JoinHandle<()>) {
    let pushed: Arc<Mutex<Vec<String>>> = Arc::default();
    let (later, next_id) = (pushed.clone(), Arc::new(AtomicUsize::new(first_id)));
    let (url, frames, server) = scripted_server(move |cmd, _| {
        let cmid = cmd["client_msg_id"].as_str();
        let text = cmd["text"].as_str().unwrap_or_default();
        match cmd["type"].as_str() {
            Some("join") => vec![raw_joined(cmd, Some("0"), None)],
            Some("ping") => {
                let mut out: Vec<String> = later.lock().unwrap().drain(..).collect();
                out.push(json!({"type": "pong", "id": cmd["id"]}).to_string());
                out
            }
            Some("message" | "dm") if held.contains(&text) => vec![],
            Some("message") => {
                vec![raw_message(&next_id.fetch_add(1, Ordering::SeqCst).to_string(), "r", text, cmid)]
            }
            Some("dm") => {
                let id = next_id.fetch_add(1, Ordering::SeqCst);
                vec![json!({"type": "dm", "id": id, "from": "u1", "user_id": "u1", "to": cmd["to"],
                            "text": text, "timestamp": 1, "client_msg_id": cmid})
                .to_string()]
            }
            _ => vec![],
        }
    })
    .await;
    (url, frames, pushed, server)
}

/// The frames written so far of `kind` carrying `cmid`.
fn written_with(frames: &Frames, kind: &str, cmid: &str) -> usize {
    frames.lock().unwrap().iter().filter(|(_, f)| f["type"] == kind && f["client_msg_id"] == cmid).count()
}

/// A `client_msg_id` is unique per sender only (the server dedupes per user), and every member
/// gets the sender's: another user's message or DM carrying the id of a send of ours is not its
/// echo, nor is one of ours of another kind or in another room, as in the JS client (`isEcho`)
/// and the Python client (`_is_echo`). With one send on the wire (its echo late) and two
/// waiting, Bob's DM naming the second one's id and his room message naming the third's
/// acknowledged them: the second's `send` panicked (`unreachable!`: a room send acknowledged by
/// a DM), the third resolved with Bob's message, and neither was ever written.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_user_s_message_or_dm_with_our_client_msg_id_acknowledges_nothing() {
    let (url, frames, pushed, server) = pushing_server(&["first"], 3).await;
    let store = SharedStore::default();
    let (c, events) = Client::builder(url)
        .max_in_flight(1)
        .outbox_store(store.clone())
        .send_timeout(scaled(10.0))
        .backoff(Duration::from_millis(50), Duration::from_millis(200))
        .connect();
    let rec = Recorder::new(events);
    c.join("r").await.unwrap();
    let send = |text: &'static str| {
        let c = c.clone();
        tokio::spawn(async move { c.send("r", text).await })
    };
    let first = send("first");
    eventually(10.0, || frames.lock().unwrap().iter().any(|(_, f)| f["text"] == "first")).await;
    let second = send("second");
    eventually(10.0, || store.load().len() == 2).await; // in the outbox in this order
    let third = send("third");
    eventually(10.0, || store.load().len() == 3).await;
    let ids: Vec<String> = store.load().into_iter().map(|e| e.client_msg_id).collect();
    let [c1, c2, c3] = &ids[..] else { panic!("three sends saved: {ids:?}") };
    let bob = json!({"from": "bob", "user_id": "bob", "timestamp": 1});
    let frame = |extra: serde_json::Value| {
        let mut f = bob.clone();
        f.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
        f.to_string()
    };
    *pushed.lock().unwrap() = vec![
        // Bob's own DM to us and his own message in the room, carrying our ids.
        frame(json!({"type": "dm", "id": 1, "to": "u1", "text": "bob's dm", "client_msg_id": c2})),
        frame(json!({"type": "message", "id": 1, "room": "r", "text": "bob's", "client_msg_id": c3})),
        // Ours, but of another kind or in another room.
        frame(json!({"type": "dm", "id": 2, "user_id": "u1", "to": "u2", "text": "x", "client_msg_id": c3})),
        frame(json!({"type": "message", "id": 1, "room": "elsewhere", "user_id": "u1", "text": "x",
                     "client_msg_id": c2})),
        // The first send's echo, late: the next one may go.
        raw_message("2", "r", "first", Some(c1)),
    ];
    c.ping().await.unwrap();
    let within = |task| async move { tokio::time::timeout(scaled(10.0), task).await.expect("the send settles") };
    let first = within(first).await.unwrap().unwrap();
    let second = within(second).await.expect("the second send does not panic").unwrap();
    let third = within(third).await.unwrap().unwrap();
    let got: Vec<_> = [first, second, third].into_iter().map(|m| (m.id, m.user_id, m.text)).collect();
    let mine = |id: u64, text: &str| (id, "u1".to_owned(), text.to_owned());
    assert_eq!(got, [mine(2, "first"), mine(3, "second"), mine(4, "third")]);
    assert_eq!((written_with(&frames, "message", c2), written_with(&frames, "message", c3)), (1, 1));
    assert_eq!(rec.ids("r"), [1, 2, 3, 4], "Bob's message delivered as his");
    assert!(store.load().is_empty());
    c.close();
    server.abort();
}

/// A DM restored from the store is acknowledged only by a copy from this client's user to its
/// reader, as in the JS and Python clients: no copy of a DM reaches a later (guest) id of its
/// sender, and no replay gives it back (any sender's copy is taken only for a restored room
/// message). Another user's DM to us naming its `client_msg_id` took it out of the outbox and
/// the store, never to be written again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_user_s_dm_with_the_id_of_a_restored_dm_acknowledges_nothing() {
    let (url, frames, pushed, server) = pushing_server(&["left by the last run"], 2).await;
    let restored = OutboxEntry {
        client_msg_id: "old-1".into(),
        target: wschat::Target::Dm("u9".into()),
        text: "left by the last run".into(),
    };
    let store = SharedStore::default();
    store.save(std::slice::from_ref(&restored));
    let (c, events) = Client::builder(url)
        .outbox_store(store.clone())
        .backoff(Duration::from_millis(50), Duration::from_millis(200))
        .connect();
    let rec = Recorder::new(events);
    eventually(10.0, || written_with(&frames, "dm", "old-1") == 1).await;
    let mallory = json!({"type": "dm", "id": 1, "from": "mallory", "user_id": "mallory", "to": "u1",
                         "text": "copied", "timestamp": 1, "client_msg_id": "old-1"});
    pushed.lock().unwrap().push(mallory.to_string());
    c.ping().await.unwrap();
    rec.wait("mallory's DM", 10.0, |ev| ev.iter().any(|e| matches!(e, Event::Dm(d) if d.user_id == "mallory"))).await;
    assert_eq!(rec.count(|e| matches!(e, Event::Ack(_))), 0, "mallory's DM acknowledges nothing");
    assert_eq!((c.outbox_len(), store.load()), (1, vec![restored]));
    let echo = json!({"type": "dm", "id": 2, "from": "u1", "user_id": "u1", "to": "u9",
                      "text": "left by the last run", "timestamp": 1, "client_msg_id": "old-1"});
    pushed.lock().unwrap().push(echo.to_string());
    c.ping().await.unwrap();
    let acked = |ev: &[Event]| ev.iter().any(|e| matches!(e, Event::Ack(wschat::Acked::Dm(d)) if d.id == 2));
    rec.wait("the echo acknowledging it", 10.0, acked).await;
    assert_eq!((rec.count(|e| matches!(e, Event::Ack(_))), c.outbox_len()), (1, 0));
    assert!(store.load().is_empty());
    c.close();
    server.abort();
}

/// A fake server for every connection attempt that greets and then holds each connection
/// `hold` before closing it with `code`; returns its URL and task.
async fn closing_server(code: u16, hold: Duration) -> (String, tokio::task::JoinHandle<()>) {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::protocol::{frame::coding::CloseCode, CloseFrame};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("ws://{}/ws", listener.local_addr().unwrap());
    let task = tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else { return };
            tokio::spawn(async move {
                let Ok(mut ws) = tokio_tungstenite::accept_async(tcp).await else { return };
                let welcome = json!({"type": "welcome", "user_id": "u1", "username": "u1", "heartbeat_interval": 30.0});
                let _ = ws.send(Message::text(welcome.to_string())).await;
                tokio::time::sleep(hold).await;
                let close = CloseFrame { code: CloseCode::from(code), reason: "not now".into() };
                let _ = ws.send(Message::Close(Some(close))).await;
                while let Some(Ok(_)) = ws.next().await {}
            });
        }
    });
    (url, task)
}

/// The `reconnect_in` of the first `n` disconnections of a client of `url`.
async fn reconnect_waits(url: String, stable_after: Duration, n: usize) -> Vec<Duration> {
    let (c, events) = Client::builder(url)
        .backoff(Duration::from_millis(5), Duration::from_secs(2))
        .stable_after(stable_after)
        .connect();
    let rec = Recorder::new(events);
    rec.wait("the disconnections", 30.0, |ev| {
        ev.iter().filter(|e| matches!(e, Event::Disconnected { .. })).count() >= n
    })
    .await;
    c.close();
    disconnections(&rec)
        .into_iter()
        .take(n)
        .map(|e| match e {
            Event::Disconnected { reconnect_in: Some(wait), .. } => wait,
            other => panic!("no reconnect: {other:?}"),
        })
        .collect()
}

/// Only a connection that stayed up `stable_after` resets the reconnect backoff, as in the JS
/// and Python clients: a server that greets and closes at once (1013 in an outage, a draining
/// pod's 1001) is retried with growing delays. It was retried at the shortest delay for ever
/// (every wait under 2 x `min`, 10 ms here), by every client together.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_closing_right_after_welcome_is_retried_with_growing_delays() {
    let min = Duration::from_millis(5);
    for code in [1013, 1001] {
        let (url, server) = closing_server(code, Duration::ZERO).await;
        let waits = reconnect_waits(url, Duration::from_secs(10), 7).await;
        server.abort();
        // Full jitter: the k-th wait is drawn from [min, min + min * 2^k] (1001's first from
        // [0, min)); all seven under 2 x min by chance: about one in 2^21.
        assert!(waits.iter().any(|w| *w > 2 * min), "{code}: {waits:?}");
    }
    // A connection that stayed up (200 ms here) starts the delays again from the first.
    let (url, server) = closing_server(1013, Duration::from_millis(300)).await;
    let waits = reconnect_waits(url, Duration::from_millis(200), 3).await;
    server.abort();
    assert!(waits.iter().all(|w| *w <= 2 * min), "{waits:?}");
}

/// A token already past its `exp` on the client's clock (the server's leeway still takes it)
/// is replaced after at least a second, then after growing waits: it was replaced at once, over
/// and over (hundreds of `auth` frames a second).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_token_is_not_refreshed_in_a_tight_loop() {
    let (url, frames, server) = scripted_server(|cmd, _| match cmd["type"].as_str() {
        Some("auth") => {
            vec![json!({"type": "welcome", "user_id": "u1", "username": "u1", "id": cmd["id"]}).to_string()]
        }
        _ => vec![],
    })
    .await;
    let expired = jwt_with_exp("1600000000");
    let (c, _rec) = signed_in(&url, expired);
    c.wait_connected(scaled(5.0)).await.unwrap();
    tokio::time::sleep(Duration::from_millis(1500)).await; // the count of what it wrote meanwhile
    let auths = frames.lock().unwrap().iter().filter(|(_, cmd)| cmd["type"] == "auth").count();
    c.close();
    server.abort();
    assert!(auths <= 3, "{auths} auth frames in 1.5 s");
}

/// 70 rooms joined, then re-joined after a cut, by two connections of one user at once: they
/// share the user's request bucket (`RATE_LIMIT_REQUESTS_BURST` 5 here). Every join was written
/// at once, a `ping` behind each: 5 answered, then over 2 x `RATE_LIMIT_BURST` (20) refusals in a
/// row and the server closed the connection with 4102, reconnected and did it again. Now at most
/// 4 joins are on the wire, a refused one holds them all back until its `retry_after_ms`, and a
/// `ping` goes only behind a `joined` whose replay has no known end: every room ends joined, on
/// both, and nothing is closed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_rooms_rejoined_by_two_tabs_are_paced_not_cut_off() {
    let h = Harness::start().await;
    let env = json!({"RATE_LIMIT_BURST": "10", "RATE_LIMIT_REQUESTS": "50", "RATE_LIMIT_REQUESTS_BURST": "5"});
    let s = h.server("memory", 1, env).await;
    let token = h.token("tabby", 600.0).await;
    let tabs = [signed_in(&s.url, token.clone()), signed_in(&s.url, token)];
    for (c, _) in &tabs {
        c.wait_connected(scaled(20.0)).await.unwrap();
    }
    let rooms: Vec<String> = (0..70).map(|i| format!("tabs-{i}")).collect();
    let joins = tabs.iter().flat_map(|(c, _)| rooms.iter().map(move |r| c.join(r)));
    let joined = tokio::time::timeout(scaled(60.0), futures_util::future::join_all(joins)).await.expect("the joins");
    assert!(joined.iter().all(|j| j.is_ok()), "{joined:?}");
    let refused = common::refusals(&s).await;
    assert!(refused > 0, "the bucket was never empty: the test tests nothing");
    for (c, _) in &tabs {
        c.reconnect();
    }
    let joined_events = |ev: &[Event]| ev.iter().filter(|e| matches!(e, Event::Joined(_))).count();
    for (_, rec) in &tabs {
        rec.wait("the re-joins", 60.0, |ev| joined_events(ev) >= 140).await;
    }
    assert!(common::refusals(&s).await > refused, "the re-joins met an empty bucket too");
    for (c, rec) in &tabs {
        let closes: Vec<_> =
            disconnections(rec).into_iter().filter(|e| !matches!(e, Event::Disconnected { code: None, .. })).collect();
        assert!(closes.is_empty(), "{closes:?}");
        assert_eq!(c.state(), wschat::ConnectionState::Connected);
        let mut last = std::collections::HashMap::new();
        for e in rec.events() {
            if let Event::Room { room, state } = e {
                last.insert(room, state);
            }
        }
        assert_eq!(last.len(), 70);
        assert!(last.values().all(|s| *s == wschat::RoomState::Joined), "{last:?}");
    }
}

/// `join`, `leave` and `join` again of one room, before the first `join` is answered: the
/// server sees join, leave, join, and the room ends joined there. The second `join` was
/// coalesced with the first (still unanswered, its request id still the room's), so it was
/// never written: the first one's `joined`, answered before the `left`, marked the room joined
/// while the server had the user out of it (no messages, every send `not_in_room`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_join_after_a_leave_is_written_though_the_first_join_is_unanswered() {
    let held = Arc::new(Mutex::new(None::<serde_json::Value>));
    let (url, frames, server) = scripted_server(move |cmd, _| match cmd["type"].as_str() {
        Some("join") if held.lock().unwrap().is_none() => {
            *held.lock().unwrap() = Some(cmd.clone());
            vec![]
        }
        Some("join") => vec![raw_joined(cmd, Some("0"), None)],
        Some("leave") => {
            let first = held.lock().unwrap().clone().unwrap();
            vec![
                raw_joined(&first, Some("0"), None),
                json!({"type": "left", "room": cmd["room"], "id": cmd["id"]}).to_string(),
            ]
        }
        _ => vec![],
    })
    .await;
    let (c, _rec) = impatient_client(url);
    c.wait_connected(scaled(10.0)).await.unwrap();
    let (first, left, again) = tokio::join!(c.join("flip"), c.leave("flip"), c.join("flip"));
    assert!(first.is_err(), "the leave ends the first join");
    left.unwrap();
    again.unwrap();
    eventually(2.0, || joins_on(&frames, 1).len() >= 2).await;
    let kinds: Vec<String> = frames
        .lock()
        .unwrap()
        .iter()
        .filter(|(_, f)| f["type"] != "ping")
        .map(|(_, f)| f["type"].as_str().unwrap_or("").to_owned())
        .collect();
    assert_eq!(kinds, ["join", "leave", "join"], "the server must see the last join");
    c.close();
    server.abort();
}

/// `leave` of a room whose `join` still waits for the join pacer (never written) succeeds and
/// writes no `leave`: the server does not have the user in it, and answered `not_in_room`,
/// which `leave` returned as its error (the JS and Python clients write no `leave` then either).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leave_of_a_room_whose_join_waits_for_the_pacer_writes_no_leave() {
    let (url, frames, server) = scripted_server(move |cmd, _| match cmd["type"].as_str() {
        Some("join") if cmd["room"] == "held" => vec![],
        Some("join") => vec![raw_joined(cmd, Some("0"), None)],
        Some("leave") => {
            vec![json!({"type": "error", "code": "not_in_room", "message": "not in room", "id": cmd["id"]}).to_string()]
        }
        _ => vec![],
    })
    .await;
    let (c, _events) = Client::builder(url).request_timeout(scaled(2.0)).max_joins_in_flight(1).connect();
    c.wait_connected(scaled(10.0)).await.unwrap();
    let (held, queued, left) = tokio::join!(
        tokio::time::timeout(Duration::from_millis(300), c.join("held")),
        c.join("queued"),
        c.leave("queued")
    );
    assert!(held.is_err(), "never answered");
    assert!(queued.is_err(), "ended by the leave");
    left.unwrap();
    let kinds: Vec<(String, String)> = frames
        .lock()
        .unwrap()
        .iter()
        .filter(|(_, f)| f["type"] != "ping")
        .map(|(_, f)| (f["type"].as_str().unwrap_or("").to_owned(), f["room"].as_str().unwrap_or("").to_owned()))
        .collect();
    assert_eq!(kinds, [("join".to_owned(), "held".to_owned())]);
    c.close();
    server.abort();
}

/// A `join` refused `unavailable` is tried again after a backoff; a `leave` of the room, and a
/// reconnect, cancel that retry. The retry held only the room's name: after a leave and a join
/// again (answered), it still wrote a join a backoff later (and the room's sends waited for its
/// answer); after a reconnect whose re-join was answered, it wrote one more on the new
/// connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_join_retry_is_cancelled_by_a_leave_and_by_a_reconnect() {
    let refused = Arc::new(Mutex::new(std::collections::HashSet::<String>::new()));
    let (url, frames, server) = scripted_server(move |cmd, _| match cmd["type"].as_str() {
        Some("join") if refused.lock().unwrap().insert(cmd["room"].as_str().unwrap_or("").to_owned()) => {
            let refusal = json!({"type": "error", "code": "unavailable", "message": "later", "id": cmd["id"]});
            vec![refusal.to_string()]
        }
        Some("join") => vec![raw_joined(cmd, Some("0"), None)],
        _ => vec![],
    })
    .await;
    // The retry of a refused join comes 0.3 to 0.6 s after the refusal.
    let (c, _events) = Client::builder(url)
        .request_timeout(scaled(2.0))
        .backoff(Duration::from_millis(300), Duration::from_millis(600))
        .connect();
    c.wait_connected(scaled(10.0)).await.unwrap();
    let refused_join = |room: &'static str| {
        let c = c.clone();
        async move {
            let _ = tokio::time::timeout(Duration::from_millis(100), c.join(room)).await;
            c.ping().await.unwrap(); // its pong comes after the refusal
        }
    };
    refused_join("left").await;
    c.leave("left").await.unwrap();
    c.join("left").await.unwrap();
    refused_join("cut").await;
    c.reconnect();
    eventually(5.0, || joins_on(&frames, 2).len() >= 2).await;
    let joins =
        |room: &str| frames.lock().unwrap().iter().filter(|(_, f)| f["type"] == "join" && f["room"] == room).count();
    // Past the retries' time: a join of either would have been written by then.
    eventually(1.5, || joins("left") > 3 || joins("cut") > 2).await;
    let written: Vec<(usize, String)> = frames
        .lock()
        .unwrap()
        .iter()
        .filter(|(_, f)| f["type"] == "join")
        .map(|(n, f)| (*n, f["room"].as_str().unwrap_or("").to_owned()))
        .collect();
    // Re-joined in the order the app joined them: "left" (joined again) before "cut".
    let expected = [(1, "left"), (1, "left"), (1, "cut"), (2, "left"), (2, "cut")];
    let expected: Vec<(usize, String)> = expected.iter().map(|(n, r)| (*n, r.to_string())).collect();
    assert_eq!(written, expected);
    c.close();
    server.abort();
}

/// A join refused `unavailable` again and again (the server's store is away) is tried again
/// after a backoff that grows with each refusal of the room, as in the JS client, not at the
/// shortest delay for ever: with a backoff of 50 ms to 2 s, some 7 joins in 3 s, not 40. Once
/// the room is joined, the next refusal starts again from the shortest delay.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_join_refused_unavailable_again_and_again_backs_off() {
    let down = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let serving = down.clone();
    let (url, frames, server) = scripted_server(move |cmd, _| match cmd["type"].as_str() {
        Some("join") if serving.load(Ordering::SeqCst) => {
            let refusal = json!({"type": "error", "code": "unavailable", "message": "later", "id": cmd["id"]});
            vec![refusal.to_string()]
        }
        Some("join") => vec![raw_joined(cmd, Some("0"), None)],
        _ => vec![],
    })
    .await;
    let (c, _events) = Client::builder(url)
        .request_timeout(scaled(30.0))
        .backoff(Duration::from_millis(50), Duration::from_secs(2))
        .connect();
    c.wait_connected(scaled(10.0)).await.unwrap();
    let joined = tokio::spawn({
        let c = c.clone();
        async move { c.join("down").await }
    });
    let joins = || frames.lock().unwrap().iter().filter(|(_, f)| f["type"] == "join").count();
    // At the shortest delay (50 to 100 ms) 30 joins go within 3 s; backing off, about 7.
    eventually(3.0, || joins() >= 30).await;
    let written = joins();
    assert!(written < 20, "{written} joins in 3 s: the retries did not back off");
    down.store(false, Ordering::SeqCst);
    let joined = tokio::time::timeout(scaled(10.0), joined).await.expect("joined once the store is back");
    assert!(joined.unwrap().is_ok());
    c.close();
    server.abort();
}

/// A join refused `unavailable` goes again within 5 s, whatever the reconnect backoff (as in the
/// JS and Python clients): here its shortest delay is 20 s, which a refused join waited before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_join_refused_unavailable_goes_again_within_five_seconds() {
    let (url, frames, server) = server_refusing_the_first_join().await;
    let (c, _events) = Client::builder(url)
        .request_timeout(scaled(60.0))
        .backoff(Duration::from_secs(20), Duration::from_secs(60))
        .connect();
    c.wait_connected(scaled(10.0)).await.unwrap();
    let joined = tokio::time::timeout(Duration::from_secs(15), c.join("down")).await;
    assert!(joined.expect("joined within 15 s: the retry waited the 20 s backoff").is_ok());
    let joins = frames.lock().unwrap().iter().filter(|(_, f)| f["type"] == "join").count();
    assert_eq!(joins, 2);
    c.close();
    server.abort();
}

/// A send written, its echo lost with the connection; the re-join's `joined` says
/// `recovered: true` and `last_id` 2, and the replay (message 2: that echo) comes a little
/// later. The send waits for the replay, which acknowledges it: it is not written again, and
/// no `ping` goes behind that `joined` (its `last_id` says where the replay ends), nor behind a
/// first one. Since the ping behind every join was dropped, a `joined` with no ping behind it
/// let the room's sends go at once: the send went again before the replay that held its echo.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_send_waits_for_the_replay_a_recovered_rejoin_announces() {
    let cmid = Arc::new(Mutex::new(None::<String>));
    let (url, frames, server) = scripted_server(move |cmd, n| match (cmd["type"].as_str(), n) {
        (Some("join"), 1) => vec![raw_joined(cmd, Some("0"), None), raw_message("1", "r", "one", None)],
        (Some("join"), _) => vec![raw_joined(cmd, Some("2"), Some(true))],
        (Some("message"), 1) => {
            *cmid.lock().unwrap() = cmd["client_msg_id"].as_str().map(str::to_owned);
            vec![] // the echo is lost with the connection
        }
        // The replay, held until the test asks with a ping.
        (Some("ping"), 2) => match cmid.lock().unwrap().clone() {
            Some(id) => {
                vec![raw_message("2", "r", "mine", Some(&id)), json!({"type": "pong", "id": cmd["id"]}).to_string()]
            }
            None => vec![],
        },
        _ => vec![],
    })
    .await;
    let (c, rec) = impatient_client(url);
    c.wait_connected(scaled(10.0)).await.unwrap();
    c.join("r").await.unwrap();
    let sending = tokio::spawn({
        let c = c.clone();
        async move { c.send("r", "mine").await.map(|m| m.id) }
    });
    let messages_on =
        |n: usize| frames.lock().unwrap().iter().filter(|(c, f)| *c == n && f["type"] == "message").count();
    eventually(5.0, || messages_on(1) == 1).await;
    c.reconnect();
    rec.wait("the re-join", 10.0, |ev| ev.iter().filter(|e| matches!(e, Event::Joined(_))).count() >= 2).await;
    c.ping().await.unwrap(); // the replay comes before its pong
    let sent = tokio::time::timeout(scaled(5.0), sending).await.expect("the send").unwrap();
    assert_eq!(sent.unwrap(), 2);
    assert_eq!(messages_on(2), 0, "written again before the replay");
    assert_eq!(rec.ids("r"), [1, 2]);
    let pings: Vec<usize> =
        frames.lock().unwrap().iter().filter(|(_, f)| f["type"] == "ping").map(|(n, _)| *n).collect();
    assert_eq!(pings, [2], "only the test's own ping");
    c.close();
    server.abort();
}

/// A join refused `rate_limited` for 5 s, then a reconnect: the new connection's join, refused
/// for 100 ms, goes again about 100 ms later. The new connection starts with a clean join
/// pacer, but the wake-up of the old one's pause still counted as scheduled: no wake-up was
/// set for the new pause, and the join waited for the old one, 5 s.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_connection_s_join_pause_is_not_held_by_the_old_connection_s_wake_up() {
    let refused_on = Arc::new(Mutex::new(std::collections::HashSet::<usize>::new()));
    let (url, frames, server) = scripted_server(move |cmd, n| match cmd["type"].as_str() {
        // The first join of each connection is refused.
        Some("join") if refused_on.lock().unwrap().insert(n) => {
            let wait = if n == 1 { 5000 } else { 100 };
            let refusal = json!({"type": "error", "code": "rate_limited", "message": "slow down",
                                 "retry_after_ms": wait, "id": cmd["id"]});
            vec![refusal.to_string()]
        }
        Some("join") => vec![raw_joined(cmd, Some("0"), None)],
        _ => vec![],
    })
    .await;
    let (c, _rec) = impatient_client(url);
    c.wait_connected(scaled(10.0)).await.unwrap();
    let _ = tokio::time::timeout(Duration::from_millis(100), c.join("r")).await;
    c.ping().await.unwrap(); // its pong comes after the refusal
    c.reconnect();
    eventually(5.0, || !joins_on(&frames, 2).is_empty()).await;
    let started = std::time::Instant::now();
    eventually(4.0, || joins_on(&frames, 2).len() >= 2).await;
    assert_eq!(joins_on(&frames, 2).len(), 2, "the re-join refused for 100 ms went again");
    assert!(started.elapsed() < Duration::from_secs(2), "it waited {:?}", started.elapsed());
    c.close();
    server.abort();
}

/// A re-join refused for good (`forbidden`: banned meanwhile) fails the room's sends waiting for
/// it with that refusal, as in the JS and Python clients, and writes none of them. They were
/// written to the room the server does not have the user in, and failed with its `not_in_room`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rejoin_refused_for_good_fails_the_room_s_waiting_sends_with_its_refusal() {
    let (url, frames, server) = scripted_server(move |cmd, n| match (cmd["type"].as_str(), n) {
        (Some("join"), 1) => vec![raw_joined(cmd, Some("0"), None)],
        (Some("join"), _) => {
            let refusal = json!({"type": "error", "code": "forbidden", "message": "banned", "id": cmd["id"]});
            vec![refusal.to_string()]
        }
        (Some("message"), _) => {
            let refusal = json!({"type": "error", "code": "not_in_room", "message": "no", "id": cmd["id"]});
            vec![refusal.to_string()]
        }
        _ => vec![],
    })
    .await;
    let (c, rec) = impatient_client(url);
    c.wait_connected(scaled(10.0)).await.unwrap();
    c.join("r").await.unwrap();
    c.reconnect();
    let sent = c.send("r", "held").await;
    rec.wait("the room left", 5.0, |ev| {
        ev.iter().any(|e| matches!(e, Event::Room { state: wschat::RoomState::Left, .. }))
    })
    .await;
    assert_eq!(sent.as_ref().err().and_then(|e| e.code()), Some("forbidden"), "{sent:?}");
    let messages = frames.lock().unwrap().iter().filter(|(_, f)| f["type"] == "message").count();
    assert_eq!(messages, 0);
    c.close();
    server.abort();
}

/// A send refused `rate_limited` for 3 s on the first connection: once it goes and is
/// acknowledged, the next send waits for the pace that refusal taught (about 3.3 s), and the
/// client reconnects. On the new connection (no pause, no pace) that send goes at once and is
/// refused for 100 ms: it goes again about 100 ms later. The wake-up due at the end of the old
/// connection's pace still counted as scheduled: none was set for the new pause, and the send
/// waited for the old one, over 3 s.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_connection_s_send_pause_is_not_held_by_the_old_connection_s_wake_up() {
    let writes = Arc::new(Mutex::new(std::collections::HashMap::<(usize, String), usize>::new()));
    let (url, frames, server) = scripted_server(move |cmd, n| match cmd["type"].as_str() {
        Some("join") if n == 1 => vec![raw_joined(cmd, Some("0"), None)],
        Some("join") => vec![raw_joined(cmd, Some("1"), Some(true))],
        Some("message") => {
            let text = cmd["text"].as_str().unwrap_or_default().to_owned();
            let mut writes = writes.lock().unwrap();
            let count = writes.entry((n, text.clone())).or_default();
            *count += 1;
            match (text.as_str(), n, *count) {
                ("A", 1, 1) | ("B", 2, 1) => {
                    let wait = if n == 1 { 3000 } else { 100 };
                    let refusal = json!({"type": "error", "code": "rate_limited", "message": "slow down",
                                         "retry_after_ms": wait, "id": cmd["id"]});
                    vec![refusal.to_string()]
                }
                (_, _, _) => {
                    let id = if text == "A" { "1" } else { "2" };
                    vec![raw_message(id, "r", &text, cmd["client_msg_id"].as_str())]
                }
            }
        }
        _ => vec![],
    })
    .await;
    let (c, _rec) = Client::builder(url)
        .send_timeout(scaled(10.0))
        .backoff(Duration::from_millis(50), Duration::from_millis(200))
        .connect();
    c.wait_connected(scaled(10.0)).await.unwrap();
    c.join("r").await.unwrap();
    // The connections a send was written on, one per write.
    let writes_of = |text: &str| -> Vec<usize> {
        let frames = frames.lock().unwrap();
        frames.iter().filter(|(_, f)| f["type"] == "message" && f["text"] == text).map(|(n, _)| *n).collect()
    };
    let sending_a = tokio::spawn({
        let c = c.clone();
        async move { c.send("r", "A").await.map(|m| m.id) }
    });
    eventually(5.0, || !writes_of("A").is_empty()).await;
    let sending_b = tokio::spawn({
        let c = c.clone();
        async move { c.send("r", "B").await.map(|m| m.id) }
    });
    let a = tokio::time::timeout(scaled(10.0), sending_a).await.expect("A acknowledged").unwrap();
    assert_eq!(a.unwrap(), 1);
    assert!(writes_of("B").is_empty(), "B waits for the pace of the first connection");
    c.reconnect();
    eventually(5.0, || !writes_of("B").is_empty()).await;
    let started = std::time::Instant::now();
    let b = tokio::time::timeout(scaled(10.0), sending_b).await.expect("B acknowledged").unwrap();
    assert_eq!(b.unwrap(), 2);
    assert_eq!(writes_of("B"), [2, 2]);
    assert!(started.elapsed() < Duration::from_millis(1500), "it waited {:?}", started.elapsed());
    c.close();
    server.abort();
}

/// `join` of a room already joined resolves at once with its latest `Joined` and writes
/// nothing, as in the JS and Python clients. It wrote a second `join`: a re-join with `since`
/// and its replay, drawing on the user's request bucket for nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn join_of_a_room_already_joined_writes_no_join() {
    let (url, frames, server) = scripted_server(move |cmd, _| match cmd["type"].as_str() {
        Some("join") if cmd.get("since").is_none() => vec![raw_joined(cmd, Some("0"), None)],
        Some("join") => vec![raw_joined(cmd, Some("0"), Some(true))],
        _ => vec![],
    })
    .await;
    let (c, _rec) = impatient_client(url);
    c.wait_connected(scaled(10.0)).await.unwrap();
    let first = c.join("r").await.unwrap();
    let again = c.join("r").await.unwrap();
    c.ping().await.unwrap(); // a join written before it would be in the frames by its pong
    assert_eq!(again, first);
    assert_eq!(joins_on(&frames, 1).len(), 1);
    c.close();
    server.abort();
}

/// A `leave` the server answers `not_in_room` (it had the user out of the room already: a
/// refresh to another user left every room, say) is done, as in the JS and Python clients: it
/// failed with the server's error though the room was left.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leave_answered_not_in_room_is_done() {
    let (url, _frames, server) = scripted_server(move |cmd, _| match cmd["type"].as_str() {
        Some("join") => vec![raw_joined(cmd, Some("0"), None)],
        Some("leave") => vec![json!({"type": "error", "id": cmd["id"], "code": "not_in_room",
            "message": "not in room"})
        .to_string()],
        Some("history") => vec![json!({"type": "error", "id": cmd["id"], "code": "not_in_room",
            "message": "not in room"})
        .to_string()],
        _ => vec![],
    })
    .await;
    let (c, rec) = impatient_client(url);
    c.wait_connected(scaled(10.0)).await.unwrap();
    c.join("r").await.unwrap();
    c.leave("r").await.unwrap();
    // The position follows the events the app has read: the recorder reads them on its task.
    rec.wait("the room left", 5.0, |ev| {
        ev.iter().any(|e| matches!(e, Event::Room { state: wschat::RoomState::Left, .. }))
    })
    .await;
    assert_eq!(c.position("r"), None);
    // Only a leave: another request refused so still fails.
    let err = c.history("r", None, None).await.unwrap_err();
    assert_eq!(err.code(), Some("not_in_room"));
    c.close();
    server.abort();
}

/// `leave` on a client closed by the app, or stopped for good by the server (a close code that
/// forbids reconnecting), resolves at once, as in the JS and Python clients: the client is in no
/// room any more (the memberships went with its connection), and a leave is cleanup code, often
/// run in a teardown after `close()`. It failed with `Error::Closed` (after a stop for good, with
/// its `Error::Terminal`). Only a leave: the other calls still fail so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leave_after_close_or_a_stop_for_good_resolves() {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::protocol::{frame::coding::CloseCode, CloseFrame};
    let wait = scaled(5.0);
    let (url, _frames, server) = scripted_server(|cmd, _| match cmd["type"].as_str() {
        Some("join") => vec![raw_joined(cmd, Some("0"), None)],
        _ => vec![],
    })
    .await;
    let (c, _events) = Client::builder(url).connect();
    c.join("r").await.unwrap();
    c.close();
    for room in ["r", "never joined"] {
        let left = tokio::time::timeout(wait, c.leave(room)).await;
        assert_eq!(left, Ok(Ok(())), "leave({room:?}) after close()");
    }
    let joined = tokio::time::timeout(wait, c.join("r")).await.map(|r| r.map(|_| ()));
    assert_eq!(joined, Ok(Err(Error::Closed)), "a join after close()");
    server.abort();

    // Stopped for good: the server closes with 4003 (banned everywhere) after the join.
    let (url, server) = fake_server(|mut ws| async move {
        while let Some(Ok(Message::Text(text))) = ws.next().await {
            let cmd: serde_json::Value = serde_json::from_str(text.as_str()).unwrap();
            if cmd["type"] == "join" {
                ws.send(Message::text(raw_joined(&cmd, Some("0"), None))).await.unwrap();
                let frame = CloseFrame { code: CloseCode::from(4003), reason: "banned".into() };
                let _ = ws.close(Some(frame)).await;
                while let Some(Ok(_)) = ws.next().await {}
                return;
            }
        }
    })
    .await;
    let (c, events) = Client::builder(url).connect();
    let rec = Recorder::new(events);
    c.join("r").await.unwrap();
    let terminal = |e: &Event| matches!(e, Event::Error(Error::Terminal { .. }));
    rec.wait("the stop for good", 10.0, |ev| ev.iter().any(terminal)).await;
    for room in ["r", "never joined"] {
        let left = tokio::time::timeout(wait, c.leave(room)).await;
        assert_eq!(left, Ok(Ok(())), "leave({room:?}) after a stop for good");
    }
    let history = tokio::time::timeout(wait, c.history("r", None, None)).await;
    assert!(
        matches!(&history, Ok(Err(Error::Terminal { code: Some(4003), .. }))),
        "a history after a stop for good: {history:?}"
    );
    server.abort();
}

/// After a reconnect the rooms are joined again in the order the app joined them (the room it
/// joined first, often the one on screen, is back first when the join pacer lets joins go a
/// few at a time), and go `Joining` in that order, as in the JS and Python clients. They were
/// re-joined in the order of their names, and went `Joining` in no order at all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rooms_are_joined_again_in_the_order_the_app_joined_them() {
    let (url, frames, server) = scripted_server(move |cmd, _| match cmd["type"].as_str() {
        Some("join") => vec![raw_joined(cmd, Some("0"), cmd.get("since").map(|_| true))],
        Some("leave") => vec![json!({"type": "left", "room": cmd["room"], "id": cmd["id"]}).to_string()],
        _ => vec![],
    })
    .await;
    let (c, rec) = impatient_client(url);
    c.wait_connected(scaled(10.0)).await.unwrap();
    let order = ["m", "c", "x", "a", "q"];
    for room in order {
        c.join(room).await.unwrap();
    }
    c.leave("c").await.unwrap();
    c.join("c").await.unwrap(); // joined again: now the last one
    let expected = ["m", "x", "a", "q", "c"];
    c.reconnect();
    // The first connection's joins: the five rooms, and "c" again.
    let count = |ev: &[Event], state: wschat::RoomState| {
        ev.iter().filter(|e| matches!(e, Event::Room { state: s, .. } if *s == state)).count()
    };
    rec.wait("every room joined again", 10.0, |ev| count(ev, wschat::RoomState::Joined) == 6 + order.len()).await;
    let rooms: Vec<String> = joins_on(&frames, 2).iter().map(|f| f["room"].as_str().unwrap().to_owned()).collect();
    assert_eq!(rooms, expected);
    let joining: Vec<String> = rec
        .events()
        .iter()
        .filter_map(|e| match e {
            Event::Room { room, state: wschat::RoomState::Joining } => Some(room.clone()),
            _ => None,
        })
        .skip(6)
        .collect();
    assert_eq!(joining, expected);
    c.close();
    server.abort();
}

/// Two sends refused `not_in_room` (the server lost the membership: a store restarted, say) have
/// the room joined again, once, with `since`, and go again once joined, in order, with the same
/// `client_msg_id`s, as in the JS and Python clients; the room is `Joining` meanwhile. They used
/// to fail with `not_in_room`, the room staying `Joined` for the client and not for the server.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sends_refused_not_in_room_rejoin_and_go_again_in_order() {
    let refusal = |cmd: &serde_json::Value| {
        json!({"type": "error", "code": "not_in_room", "message": "join first", "id": cmd["id"]}).to_string()
    };
    let writes = Arc::new(Mutex::new(std::collections::HashMap::<String, usize>::new()));
    let held = Arc::new(Mutex::new(None::<serde_json::Value>));
    let (url, frames, server) = scripted_server(move |cmd, _| {
        let text = cmd["text"].as_str().unwrap_or_default().to_owned();
        match cmd["type"].as_str() {
            Some("join") if cmd.get("since").is_none() => vec![raw_joined(cmd, Some("0"), None)],
            Some("join") => vec![raw_joined(cmd, Some("0"), Some(true))],
            Some("message") => {
                let mut writes = writes.lock().unwrap();
                let count = writes.entry(text.clone()).or_default();
                *count += 1;
                match (text.as_str(), *count) {
                    // Both on the wire before the first refusal comes.
                    ("a", 1) => {
                        *held.lock().unwrap() = Some(cmd.clone());
                        vec![]
                    }
                    ("b", 1) => {
                        let a = held.lock().unwrap().take().expect("a written first");
                        vec![refusal(&a), refusal(cmd)]
                    }
                    _ => {
                        let id = if text == "a" { "1" } else { "2" };
                        vec![raw_message(id, "r", &text, cmd["client_msg_id"].as_str())]
                    }
                }
            }
            _ => vec![],
        }
    })
    .await;
    let (c, rec) = impatient_client(url);
    c.wait_connected(scaled(10.0)).await.unwrap();
    c.join("r").await.unwrap();
    let (a, b) = tokio::join!(c.send("r", "a"), c.send("r", "b"));
    assert_eq!((a.map(|m| m.id), b.map(|m| m.id)), (Ok(1), Ok(2)));
    let frames = frames.lock().unwrap().iter().map(|(_, f)| f.clone()).collect::<Vec<_>>();
    let kinds: Vec<String> = frames.iter().map(|f| format!("{} {}", f["type"], f["text"]).replace('"', "")).collect();
    assert_eq!(kinds, ["join null", "message a", "message b", "join null", "message a", "message b"]);
    assert_eq!(frames[3]["since"], 0, "the re-join says where the room was");
    assert_eq!(frames[1]["client_msg_id"], frames[4]["client_msg_id"]);
    assert_eq!(frames[2]["client_msg_id"], frames[5]["client_msg_id"]);
    let room_states = |ev: &[Event]| -> Vec<wschat::RoomState> {
        ev.iter().filter_map(|e| if let Event::Room { state, .. } = e { Some(*state) } else { None }).collect()
    };
    rec.wait("the room joined again", 5.0, |ev| room_states(ev).len() >= 4).await;
    use wschat::RoomState::{Joined, Joining};
    assert_eq!(room_states(&rec.events()), [Joining, Joined, Joining, Joined]);
    c.close();
    server.abort();
}

/// The re-join a send refused `not_in_room` asks for is refused for good (`forbidden`: banned
/// meanwhile): the send fails with that refusal and the room is left, as in the JS and Python
/// clients; the send is not written again. It used to fail with `not_in_room`, and no re-join
/// was written.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_send_refused_not_in_room_whose_rejoin_is_refused_for_good_fails_with_that_refusal() {
    let (url, frames, server) = scripted_server(move |cmd, _| match cmd["type"].as_str() {
        Some("join") if cmd.get("since").is_none() => vec![raw_joined(cmd, Some("0"), None)],
        Some("join") => {
            let refusal = json!({"type": "error", "code": "forbidden", "message": "banned", "id": cmd["id"]});
            vec![refusal.to_string()]
        }
        Some("message") => {
            let refusal = json!({"type": "error", "code": "not_in_room", "message": "join first", "id": cmd["id"]});
            vec![refusal.to_string()]
        }
        _ => vec![],
    })
    .await;
    let (c, rec) = impatient_client(url);
    c.wait_connected(scaled(10.0)).await.unwrap();
    c.join("r").await.unwrap();
    let sent = c.send("r", "hi").await;
    assert_eq!(sent.as_ref().err().and_then(|e| e.code()), Some("forbidden"), "{sent:?}");
    rec.wait("the room left", 5.0, |ev| {
        ev.iter().any(|e| matches!(e, Event::Room { state: wschat::RoomState::Left, .. }))
    })
    .await;
    let kinds: Vec<String> =
        frames.lock().unwrap().iter().filter_map(|(_, f)| f["type"].as_str().map(str::to_owned)).collect();
    assert_eq!(kinds, ["join", "message", "join"]);
    c.close();
    server.abort();
}

/// `join` of a room whose join was refused `unavailable` and waits for its retry (after the
/// backoff, 2 s at least here) writes nothing: both calls resolve with the retry's answer, as in
/// the JS and Python clients. The second call wrote a join at once, cutting the backoff short.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn join_of_a_room_waiting_for_a_join_retry_writes_no_join() {
    let (url, frames, server) = server_refusing_the_first_join().await;
    let (c, _events) = Client::builder(url)
        .request_timeout(scaled(10.0))
        .backoff(Duration::from_secs(2), Duration::from_secs(4))
        .connect();
    c.wait_connected(scaled(10.0)).await.unwrap();
    let first = tokio::spawn({
        let c = c.clone();
        async move { c.join("r").await }
    });
    eventually(5.0, || joins_on(&frames, 1).len() == 1).await;
    c.ping().await.unwrap(); // its pong comes after the refusal
                             // `join!` polls in order: the second `join` goes to the client before the `ping`, so a join
                             // written for it is in the frames by the `pong`.
    let (again, ()) = tokio::join!(c.join("r"), async {
        c.ping().await.unwrap();
        assert_eq!(joins_on(&frames, 1).len(), 1, "the second join waits for the retry");
    });
    assert_eq!(first.await.unwrap().unwrap(), again.unwrap());
    assert_eq!(joins_on(&frames, 1).len(), 2);
    c.close();
    server.abort();
}

/// A send written before `leave` of its room whose answer comes only once the room is joined
/// again fails and is not written again, as in the JS and Python clients: the user left the room
/// it was for, and the new membership is not its. A refusal for now (`rate_limited`,
/// `unavailable`) fails it with the leave's `not_in_room` ("left r"), as would a connection lost
/// or no echo within `resend_after`; `not_in_room` with the server's refusal. It was written
/// again into the re-joined room (after the pause; after a re-join of its own for `not_in_room`;
/// on the next connection; after `resend_after`), and resolved with that copy's echo.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_send_of_a_room_left_and_joined_again_is_not_written_again() {
    let mut wrong = Vec::new();
    for way in ["rate_limited", "unavailable", "not_in_room", "closed", "silent"] {
        let (joins, messages) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
        let held = Arc::new(Mutex::new(None::<serde_json::Value>));
        let (url, frames, server) = scripted_server(move |cmd, _| match cmd["type"].as_str() {
            Some("join") => {
                let joined = raw_joined(cmd, Some("0"), cmd.get("since").map(|_| true));
                if joins.fetch_add(1, Ordering::SeqCst) != 1 {
                    return vec![joined];
                }
                // The join after the leave: the send's answer (if any) comes before its `joined`.
                let Some(message) = held.lock().unwrap().take() else { return vec![joined] };
                let mut refusal = json!({"type": "error", "code": way, "message": "refused", "id": message["id"]});
                if way == "rate_limited" {
                    refusal["retry_after_ms"] = json!(50);
                }
                match way {
                    "closed" => vec![joined, CLOSE.into()],
                    "silent" => vec![joined],
                    _ => vec![refusal.to_string(), joined],
                }
            }
            Some("message") if messages.fetch_add(1, Ordering::SeqCst) == 0 => {
                *held.lock().unwrap() = Some(cmd.clone());
                vec![]
            }
            // Written again: the server takes it.
            Some("message") => vec![raw_message("1", "r", "a", cmd["client_msg_id"].as_str())],
            Some("leave") => vec![json!({"type": "left", "room": cmd["room"], "id": cmd["id"]}).to_string()],
            _ => vec![],
        })
        .await;
        let resend_after = if way == "silent" { Duration::from_millis(300) } else { scaled(20.0) };
        let (c, _events) = Client::builder(url)
            .request_timeout(scaled(5.0))
            .send_timeout(scaled(5.0))
            .resend_after(resend_after)
            .backoff(Duration::from_millis(50), Duration::from_millis(200))
            .connect();
        c.join("r").await.unwrap();
        let send = tokio::spawn({
            let c = c.clone();
            async move { c.send("r", "a").await }
        });
        let written = || frames.lock().unwrap().iter().filter(|(_, f)| f["type"] == "message").count();
        eventually(5.0, || written() == 1).await;
        c.leave("r").await.unwrap();
        c.join("r").await.unwrap();
        let got = match send.await.unwrap() {
            Ok(m) => format!("resolved with {}", m.id),
            Err(Error::Server { code, message, .. }) => format!("{code}: {}", message.split(';').next().unwrap()),
            Err(e) => format!("{e:?}"),
        };
        let got = format!("{got}, written {}, outbox {}", written(), c.outbox_len());
        let why = if way == "not_in_room" { "refused" } else { "left r" };
        if got != format!("not_in_room: {why}, written 1, outbox 0") {
            wrong.push(format!("{way}: {got}"));
        }
        c.close();
        server.abort();
    }
    assert!(wrong.is_empty(), "{wrong:#?}");
}

/// The echo of a send written before `leave` of its room that comes once the room is joined
/// again (the server stored the send before the `leave`) resolves the send, with `Event::Ack`,
/// as in the JS and Python clients. It is no `Event::Message` of the room joined again, as
/// there: it came before that membership's `joined`, whose `last_id` counts it; the next
/// message (2) is that membership's first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_echo_of_a_send_of_a_room_left_and_joined_again_resolves_it() {
    let joins = Arc::new(AtomicUsize::new(0));
    let held = Arc::new(Mutex::new(None::<serde_json::Value>));
    let (url, frames, server) = scripted_server(move |cmd, _| match cmd["type"].as_str() {
        Some("join") if joins.fetch_add(1, Ordering::SeqCst) == 0 => vec![raw_joined(cmd, Some("0"), None)],
        Some("join") => {
            let message = held.lock().unwrap().take().expect("the send written before the leave");
            let echo = raw_message("1", "r", "a", message["client_msg_id"].as_str());
            vec![echo, raw_joined(cmd, Some("1"), None)]
        }
        Some("message") if cmd["text"] == "a" => {
            *held.lock().unwrap() = Some(cmd.clone());
            vec![]
        }
        Some("message") => vec![raw_message("2", "r", "b", cmd["client_msg_id"].as_str())],
        Some("leave") => vec![json!({"type": "left", "room": cmd["room"], "id": cmd["id"]}).to_string()],
        _ => vec![],
    })
    .await;
    let (c, rec) = impatient_client(url);
    c.join("r").await.unwrap();
    let send = tokio::spawn({
        let c = c.clone();
        async move { c.send("r", "a").await }
    });
    eventually(5.0, || frames.lock().unwrap().iter().any(|(_, f)| f["type"] == "message")).await;
    c.leave("r").await.unwrap();
    c.join("r").await.unwrap();
    assert_eq!(send.await.unwrap().map(|m| m.id), Ok(1));
    assert_eq!(c.send("r", "b").await.map(|m| m.id), Ok(2));
    rec.wait("two acks and message 2", 5.0, |ev| {
        common::message_ids(ev, "r").contains(&2) && ev.iter().filter(|e| matches!(e, Event::Ack(_))).count() >= 2
    })
    .await;
    assert_eq!(rec.ids("r"), [2]);
    c.close();
    server.abort();
}

/// A `joined` answering `join` (`last_id` and `recovered` as [`raw_joined`]) naming the room's
/// numbering `epoch` (`None`: none, as a server of the release before epochs answers).
fn joined_in(join: &serde_json::Value, last_id: &str, recovered: Option<bool>, epoch: Option<&str>) -> String {
    let mut joined: serde_json::Value = serde_json::from_str(&raw_joined(join, Some(last_id), recovered)).unwrap();
    if let Some(epoch) = epoch {
        joined["epoch"] = json!(epoch);
    }
    joined.to_string()
}

/// The `since` and `epoch` of each `join` of `room`, with its connection's number.
fn rejoins(frames: &Frames, room: &str) -> Vec<(usize, serde_json::Value, serde_json::Value)> {
    let frames = frames.lock().unwrap();
    let joins = frames.iter().filter(|(_, f)| f["type"] == "join" && f["room"] == room);
    joins.map(|(n, f)| (*n, f["since"].clone(), f["epoch"].clone())).collect()
}

/// A re-join sends the `epoch` of the room's latest `joined` with its `since`; answered
/// `recovered: false` in another epoch (the room's ids started again: 3 messages of a new
/// numbering), the room's position is the new numbering's `last_id`: the next re-join says
/// `since` 3 in the new epoch, and the new numbering's message 4 is delivered. Before epochs the
/// re-join sent no `epoch` (the server could not tell numberings apart and replayed the new one's
/// messages above our `since` as ours), and the position stayed the old `since`, 7, so the
/// re-join after asked for the new numbering's messages above 7. A room whose `joined` names no
/// epoch (a server of the release before) is re-joined with `since` alone, as before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rejoin_sends_the_epoch_and_a_new_epoch_is_a_new_baseline() {
    let (url, frames, server) = scripted_server(move |cmd, n| {
        let old = cmd["room"] == "old"; // a server of the release before: no epoch
        match (cmd["type"].as_str(), n) {
            (Some("join"), 1) if old => vec![joined_in(cmd, "6", None, None), raw_message("7", "old", "7", None)],
            (Some("join"), _) if old => vec![joined_in(cmd, "7", Some(true), None)],
            (Some("join"), 1) => vec![joined_in(cmd, "6", None, Some("E1")), raw_message("7", "r", "7", None)],
            // The room's ids started again, and 3 messages of the new numbering were posted.
            (Some("join"), 2) => vec![joined_in(cmd, "3", Some(false), Some("E2"))],
            (Some("join"), _) => vec![joined_in(cmd, "3", Some(true), Some("E2")), raw_message("4", "r", "4", None)],
            _ => vec![],
        }
    })
    .await;
    let (c, rec) = impatient_client(url);
    let first = c.join("r").await.unwrap();
    assert_eq!((first.last_id, first.epoch.as_deref()), (6, Some("E1")));
    assert_eq!(c.join("old").await.unwrap().epoch, None);
    eventually(2.0, || rec.ids("r") == [7] && rec.ids("old") == [7]).await;
    let joined = |ev: &[Event]| ev.iter().filter(|e| matches!(e, Event::Joined(j) if j.room == "r")).count();
    c.reconnect();
    rec.wait("the re-join in the new epoch", 10.0, |ev| joined(ev) >= 2).await;
    c.reconnect();
    rec.wait("the re-join after it", 10.0, |ev| joined(ev) >= 3).await;
    eventually(2.0, || rec.ids("r").len() >= 2).await;
    c.ping().await.unwrap(); // anything else of the room came before its pong
    let lost: Vec<Event> = rec.events().into_iter().filter(|e| matches!(e, Event::RecoveryFailed { .. })).collect();
    let got = format!(
        "r: joins {:?}, messages {:?}; old: joins {:?}, messages {:?}; {lost:?}; pings {:?}",
        rejoins(&frames, "r"),
        rec.ids("r"),
        rejoins(&frames, "old"),
        rec.ids("old"),
        frames.lock().unwrap().iter().filter(|(_, f)| f["type"] == "ping").map(|(n, _)| *n).collect::<Vec<_>>()
    );
    let lost = Event::RecoveryFailed { room: "r".into(), since: 7, last_id: 3, epoch_changed: true };
    let want = format!(
        "r: joins [(1, Null, Null), (2, Number(7), String(\"E1\")), (3, Number(3), String(\"E2\"))], \
         messages [7, 4]; old: joins [(1, Null, Null), (2, Number(7), Null), (3, Number(7), Null)], \
         messages [7]; [{lost:?}]; pings [3]"
    );
    assert_eq!(got, want);
    c.close();
    server.abort();
}

/// A memory server restarts (a deploy): every room's ids start again from 1, in a new epoch.
/// Another client posts 4 messages to the room before this one is back; its re-join (with
/// `since` 2 and the old epoch) gets `recovered: false` with `epoch_changed`, no message of the
/// new numbering is taken for one of ours, and the room's position is the new numbering's: after
/// one more reconnect (a re-join with `since` 4 in the new epoch) the next message, 5, is
/// delivered, and so is the echo of our send, 6. Before epochs the re-join was told
/// `recovered: true` and given the new numbering's 3 and 4 as the messages that followed our 2.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_memory_server_restart_the_new_numbering_is_followed() {
    let h = Harness::start().await;
    let s = h.server("memory", 1, json!({})).await;
    let (a, rec_a, offline) = common::switchable(&s.url, h.token("nina", 600.0).await);
    let first = a.join("renumbered").await.unwrap();
    assert!(first.epoch.is_some(), "{first:?}");
    for i in 0..2 {
        a.send("renumbered", &format!("old {i}")).await.unwrap();
    }
    rec_a.wait("the old messages", 20.0, |ev| common::message_ids(ev, "renumbered") == [1, 2]).await;
    offline.store(true, Ordering::SeqCst);
    h.stop(&s).await;
    h.restart(&s).await; // a memory server forgets rooms, history and ids
    let (b, _) = Client::builder(format!("{}?username=otto", s.url)).connect();
    b.join("renumbered").await.unwrap();
    for i in 0..4 {
        assert_eq!(b.send("renumbered", &format!("new {i}")).await.unwrap().id, i + 1);
    }
    offline.store(false, Ordering::SeqCst);
    rec_a.wait("recovery failed", 30.0, |ev| ev.iter().any(|e| matches!(e, Event::RecoveryFailed { .. }))).await;
    let joined: Vec<wschat::Joined> =
        rec_a.events().into_iter().filter_map(|e| if let Event::Joined(j) = e { Some(j) } else { None }).collect();
    let renumbered = &joined[1];
    assert_eq!((renumbered.recovered, renumbered.last_id), (Some(false), 4), "{joined:#?}");
    assert!(renumbered.epoch.is_some() && renumbered.epoch != first.epoch, "{joined:#?}");
    let lost = Event::RecoveryFailed { room: "renumbered".into(), since: 2, last_id: 4, epoch_changed: true };
    assert_eq!(rec_a.count(|e| *e == lost), 1, "{:#?}", rec_a.events());
    // Once more: the re-join's `since` is the new numbering's (4): nothing is replayed.
    a.reconnect();
    let joins = |ev: &[Event]| ev.iter().filter(|e| matches!(e, Event::Joined(_))).count();
    rec_a.wait("the second re-join", 20.0, |ev| joins(ev) >= 3).await;
    let again =
        rec_a.events().into_iter().filter_map(|e| if let Event::Joined(j) = e { Some(j) } else { None }).next_back();
    assert_eq!(again.map(|j| (j.recovered, j.last_id)), Some((Some(true), 4)));
    assert_eq!(b.send("renumbered", "new 4").await.unwrap().id, 5);
    assert_eq!(a.send("renumbered", "mine").await.unwrap().id, 6);
    rec_a.wait("the new messages", 20.0, |ev| common::message_ids(ev, "renumbered").len() >= 4).await;
    assert_eq!(rec_a.ids("renumbered"), [1, 2, 5, 6]);
}

/// `join_from` resumes a room from a position the app persisted: its `join` carries `since` and
/// `epoch` (`epoch` only with `since`), the server's replay is delivered from `since` + 1, and a
/// `since` in an epoch the room no longer has is answered `recovered: false` with
/// `epoch_changed`, the position then the new numbering's. A `since` past 2^53 - 1 or an `epoch`
/// the server would refuse fails at once with `invalid_message`, nothing written and nothing
/// kept; a room already joined answers with its latest `Joined`, nothing written (as the JS and
/// Python clients). Before, the Rust client had no way to pass `since` or `epoch` to a join.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn join_from_resumes_with_since_and_epoch_checked_first() {
    let (url, frames, server) = scripted_server(move |cmd, _| match (cmd["type"].as_str(), cmd["room"].as_str()) {
        (Some("join"), Some("r")) => vec![
            joined_in(cmd, "7", Some(true), Some("E1")),
            raw_message("6", "r", "6", None),
            raw_message("7", "r", "7", None),
        ],
        // The room's ids started again since: 2 messages of the new numbering, none replayed.
        (Some("join"), Some("stale")) => vec![joined_in(cmd, "2", Some(false), Some("E2"))],
        (Some("join"), _) => vec![joined_in(cmd, "3", None, Some("E1"))],
        _ => vec![],
    })
    .await;
    let (c, rec) = impatient_client(url);
    c.wait_connected(scaled(5.0)).await.unwrap();
    let long = "e".repeat(65);
    let refused = [
        c.join_from("r", Some(wschat::protocol::MAX_WIRE_ID + 1), Some("E1")).await,
        c.join_from("r", Some(u64::MAX), None).await,
        c.join_from("r", Some(5), Some("")).await,
        c.join_from("r", Some(5), Some(&long)).await,
        c.join_from("r", Some(5), Some("a\nb")).await,
        c.join_from("r", None, Some("a\u{7f}")).await,
    ];
    let codes: Vec<_> = refused.iter().map(|r| r.as_ref().map(|_| ()).map_err(Error::code)).collect();
    assert_eq!(codes, vec![Err(Some("invalid_message")); 6], "{refused:#?}");
    c.ping().await.unwrap(); // anything written before it came first
    assert!(joins_on(&frames, 1).is_empty(), "{:?}", joins_on(&frames, 1));
    assert_eq!(c.position("r"), None, "nothing kept");

    let joined = c.join_from("r", Some(5), Some("E1")).await.unwrap();
    assert_eq!((joined.recovered, joined.last_id, joined.epoch.as_deref()), (Some(true), 7, Some("E1")));
    rec.wait("the replay", 5.0, |ev| common::message_ids(ev, "r").len() >= 2).await;
    // Joined already: its latest answer, `since` and `epoch` unused, nothing written.
    assert_eq!(c.join_from("r", Some(1), Some("X")).await, Ok(joined));
    // `epoch` without `since`: a plain join. `since` without `epoch`: `since` alone.
    c.join_from("plain", None, Some("E9")).await.unwrap();
    c.join_from("bare", Some(3), None).await.unwrap();
    let stale = c.join_from("stale", Some(5), Some("E1")).await.unwrap();
    assert_eq!((stale.recovered, stale.last_id, stale.epoch.as_deref()), (Some(false), 2, Some("E2")));
    c.ping().await.unwrap();
    let lost = Event::RecoveryFailed { room: "stale".into(), since: 5, last_id: 2, epoch_changed: true };
    rec.wait("the recovery failed", 5.0, |ev| ev.contains(&lost)).await;
    let sent: Vec<_> =
        joins_on(&frames, 1).iter().map(|f| (f["room"].clone(), f["since"].clone(), f["epoch"].clone())).collect();
    let want = vec![
        (json!("r"), json!(5), json!("E1")),
        (json!("plain"), json!(null), json!(null)),
        (json!("bare"), json!(3), json!(null)),
        (json!("stale"), json!(5), json!("E1")),
    ];
    assert_eq!(sent, want);
    assert_eq!(rec.ids("r"), [6, 7]);
    assert_eq!(rec.ids("stale"), Vec::<u64>::new());
    let at = |last_id: Option<u64>, epoch: &str| Some(wschat::RoomPosition { last_id, epoch: Some(epoch.into()) });
    let positions = ["r", "plain", "bare", "stale"].map(|room| c.position(room));
    assert_eq!(positions, [at(Some(7), "E1"), at(Some(3), "E1"), at(Some(3), "E1"), at(Some(2), "E2")]);
    c.close();
    server.abort();
}

/// `Client::position` follows the events the app has read, not the client's task: messages
/// still queued for the app do not count (an app that persisted a position ahead of them and
/// stopped would never see them), and a room left is gone from it once its `Left` is read.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_position_follows_the_events_read() {
    use futures_util::StreamExt;
    let (url, _frames, server) = scripted_server(move |cmd, _| match cmd["type"].as_str() {
        Some("join") => vec![
            joined_in(cmd, "7", Some(true), Some("E1")),
            raw_message("6", "r", "6", None),
            raw_message("7", "r", "7", None),
        ],
        Some("leave") => vec![json!({"type": "left", "room": cmd["room"], "id": cmd["id"]}).to_string()],
        _ => vec![],
    })
    .await;
    let (c, mut events) = Client::builder(url).request_timeout(scaled(5.0)).connect();
    c.join_from("r", Some(5), Some("E1")).await.unwrap();
    c.ping().await.unwrap(); // the replay came before the pong: all of it is queued for the app
    assert_eq!(c.position("r"), None, "no event read yet");
    let mut seen = Vec::new();
    async fn next(events: &mut wschat::Events) -> Event {
        let event = tokio::time::timeout(scaled(5.0), events.next()).await;
        event.expect("an event in time").expect("the events go on")
    }
    loop {
        let event = next(&mut events).await;
        let position = c.position("r").map(|p| (p.last_id, p.epoch));
        let message = matches!(&event, Event::Message(m) if m.id == 7);
        seen.push((event, position));
        if message {
            break;
        }
    }
    let positions: Vec<_> = seen
        .iter()
        .filter_map(|(e, p)| match e {
            Event::Room { .. } | Event::Joined(_) | Event::Message(_) => Some(p.clone()),
            _ => None,
        })
        .collect();
    // Room `Joining`, room `Joined`, `Joined`, then messages 6 and 7.
    let want: Vec<_> = [5, 5, 5, 6, 7].map(|id| Some((Some(id), Some("E1".to_owned())))).into();
    assert_eq!(positions, want, "{seen:#?}");
    c.leave("r").await.unwrap();
    assert!(c.position("r").is_some(), "the Left not read yet");
    while !matches!(next(&mut events).await, Event::Room { state: wschat::RoomState::Left, .. }) {}
    assert_eq!(c.position("r"), None);
    c.close();
    server.abort();
}

/// An app that saved a room's position (`Client::position`: last id and epoch) and stopped
/// resumes it in a new client with `join_from` after others posted: it is given exactly the
/// messages it missed, in order, with `recovered: true`, and its position goes on from them. The
/// same position with an epoch the room does not have (say, saved before a memory server
/// restarted) is answered `recovered: false` with `epoch_changed`, nothing replayed, and the
/// room's next message is delivered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_app_resumes_a_room_from_its_saved_position() {
    let h = Harness::start().await;
    let s = h.server("memory", 1, json!({})).await;
    let guest = |name: &str| {
        let (c, events) = Client::builder(format!("{}?username={name}", s.url)).request_timeout(scaled(10.0)).connect();
        (c, Recorder::new(events))
    };
    let (first, rec) = guest("ada");
    let joined = first.join("resume").await.unwrap();
    assert!(joined.epoch.is_some(), "{joined:?}");
    for i in 0..2 {
        first.send("resume", &format!("seen {i}")).await.unwrap();
    }
    rec.wait("our messages", 20.0, |ev| common::message_ids(ev, "resume") == [1, 2]).await;
    let saved = first.position("resume").expect("a position");
    assert_eq!(saved, wschat::RoomPosition { last_id: Some(2), epoch: joined.epoch.clone() });
    first.close(); // the app stops

    let (other, _) = guest("bob");
    other.join("resume").await.unwrap();
    for i in 0..3 {
        assert_eq!(other.send("resume", &format!("missed {i}")).await.unwrap().id, i + 3);
    }

    let (again, rec) = guest("ada");
    let resumed = again.join_from("resume", saved.last_id, saved.epoch.as_deref()).await.unwrap();
    assert_eq!((resumed.recovered, resumed.last_id), (Some(true), 5), "{resumed:?}");
    assert_eq!(resumed.epoch, joined.epoch);
    rec.wait("the missed messages", 20.0, |ev| common::message_ids(ev, "resume").len() >= 3).await;
    again.ping().await.unwrap(); // anything more of the replay came before the pong
    let texts: Vec<_> = common::messages(&rec.events(), "resume");
    let want: Vec<_> = (0..3).map(|i| (i + 3, format!("missed {i}"))).collect();
    assert_eq!(texts, want);
    assert_eq!(rec.count(|e| matches!(e, Event::RecoveryFailed { .. })), 0);
    assert_eq!(again.position("resume"), Some(wschat::RoomPosition { last_id: Some(5), epoch: joined.epoch.clone() }));

    let (stale, rec) = guest("ada");
    let answer = stale.join_from("resume", Some(2), Some("not-the-room-s-epoch")).await.unwrap();
    assert_eq!((answer.recovered, answer.last_id, &answer.epoch), (Some(false), 5, &joined.epoch));
    let lost = Event::RecoveryFailed { room: "resume".into(), since: 2, last_id: 5, epoch_changed: true };
    rec.wait("the recovery failed", 20.0, |ev| ev.contains(&lost)).await;
    assert_eq!(other.send("resume", "next").await.unwrap().id, 6);
    rec.wait("the next message", 20.0, |ev| !common::message_ids(ev, "resume").is_empty()).await;
    stale.ping().await.unwrap();
    assert_eq!(rec.ids("resume"), [6], "nothing replayed, the next message delivered");
    assert_eq!(stale.position("resume"), Some(wschat::RoomPosition { last_id: Some(6), epoch: joined.epoch }));
}

/// Dropping every handle of a client (the `Client`s and the `Events`) ends everything it
/// started: the socket, the timers it set (here the wake-up of the outbox an hour ahead, after a
/// `rate_limited` of an hour; the look for echoes `resend_after` ahead) and a token refresh
/// under way (the callback's future, dropped: here one that never ends). The timers used to
/// sleep on, each a task, to the end of their wait (a day at most), and a refresh whose callback
/// hung stayed for good, with the callback and all it held.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_the_client_ends_every_task_it_started() {
    let (url, frames, server) = scripted_server(|cmd, _| match cmd["type"].as_str() {
        Some("join") => vec![raw_joined(cmd, Some("0"), None)],
        Some("message") => {
            let refusal = json!({"type": "error", "code": "rate_limited", "message": "slow down",
                                 "retry_after_ms": 3_600_000, "id": cmd["id"]});
            vec![refusal.to_string()]
        }
        _ => vec![],
    })
    .await;
    let alive = || tokio::runtime::Handle::current().metrics().num_alive_tasks();
    let before = alive(); // the fake server's (its connections' end with them)

    /// Tells when the future holding it is dropped.
    struct Held(Option<tokio::sync::oneshot::Sender<()>>);
    impl Drop for Held {
        fn drop(&mut self) {
            let _ = self.0.take().map(|tx| tx.send(()));
        }
    }
    let (refreshing_tx, refreshing) = tokio::sync::oneshot::channel::<()>();
    let (dropped_tx, dropped) = tokio::sync::oneshot::channel::<()>();
    let refresh = Arc::new(Mutex::new(Some((refreshing_tx, dropped_tx))));
    // Expires in 2 s: refreshed 1.5 s after the welcome, by a call that never ends.
    let exp = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() + 2;
    let token = jwt_with_exp(&exp.to_string());
    let calls = AtomicUsize::new(0);
    let (c, events) = Client::builder(url)
        .token(move || {
            let token = token.clone();
            let refresh = if calls.fetch_add(1, Ordering::SeqCst) == 0 { None } else { refresh.lock().unwrap().take() };
            async move {
                if let Some((refreshing, dropped)) = refresh {
                    let _held = Held(Some(dropped));
                    let _ = refreshing.send(());
                    std::future::pending::<()>().await;
                }
                Ok(token)
            }
        })
        .connect();
    c.join("r").await.unwrap();
    // The send stays in the outbox once its future is dropped (a spawned one would hold a handle).
    let written = eventually(5.0, || frames.lock().unwrap().iter().any(|(_, f)| f["type"] == "message"));
    tokio::select! {
        sent = c.send("r", "hi") => panic!("the send was refused for an hour: {sent:?}"),
        _ = written => {}
    }
    c.ping().await.unwrap(); // answered after the refusal: the outbox waits an hour now
    tokio::time::timeout(scaled(10.0), refreshing).await.expect("the refresh began").unwrap();

    drop((c, events));
    let held = tokio::time::timeout(scaled(5.0), dropped).await;
    assert!(held.is_ok(), "the token callback's future was not dropped");
    let mut left = alive();
    let _ = tokio::time::timeout(scaled(5.0), async {
        while left > before {
            tokio::task::yield_now().await;
            tokio::time::sleep(Duration::from_millis(10)).await;
            left = alive();
        }
    })
    .await;
    assert_eq!(left, before, "tasks alive after the client was dropped, beside the fake server's");
    server.abort();
}

/// A send whose future gave up (`send_timeout`: the send stays in the outbox) and that the
/// server then refuses for good (`muted` here) is told as an `Event::Error` with the refusal, as
/// a send restored from the store is: it is out of the outbox, never delivered. The refusal was
/// handed to the future no one awaited any more, and the app, told that a send past its
/// timeout is still delivered, never learnt it was not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_send_refused_after_its_timeout_is_told_as_an_error_event() {
    let written: Arc<Mutex<Option<serde_json::Value>>> = Arc::default();
    let held = written.clone();
    let (url, _frames, server) = scripted_server(move |cmd, _| match cmd["type"].as_str() {
        Some("join") => vec![raw_joined(cmd, Some("0"), None)],
        Some("message") => {
            *held.lock().unwrap() = Some(cmd["id"].clone()); // answered at the next ping
            vec![]
        }
        Some("ping") => {
            let id = held.lock().unwrap().take();
            let refusal = id.map(|id| {
                json!({"type": "error", "code": "muted", "message": "you are muted", "id": id, "room": "r"}).to_string()
            });
            refusal.into_iter().chain([json!({"type": "pong", "id": cmd["id"]}).to_string()]).collect()
        }
        _ => vec![],
    })
    .await;
    let (c, events) = Client::builder(url).send_timeout(Duration::from_millis(300)).connect();
    let rec = Recorder::new(events);
    c.join("r").await.unwrap();
    assert_eq!(c.send("r", "hi").await.map(|m| m.text), Err(Error::Timeout));
    assert!(written.lock().unwrap().is_some(), "the send was written");
    assert_eq!(c.outbox_len(), 1, "a send past its timeout stays in the outbox");
    c.ping().await.unwrap(); // the refusal came before the pong
    assert_eq!(c.outbox_len(), 0, "refused for good: out of the outbox");
    let muted = |e: &Event| matches!(e, Event::Error(e) if e.code() == Some("muted"));
    rec.wait("the refusal, told", 5.0, |ev| ev.iter().any(muted)).await;
    c.ping().await.unwrap();
    assert_eq!(rec.count(muted), 1, "once: {:#?}", rec.events());
    c.close();
    server.abort();
}

/// A URL no attempt can connect to, whatever the server does, stops the client at once with
/// why (`Error::Terminal`, `code` `None`), as a refused upgrade that retrying cannot change
/// does: a scheme other than `ws`/`wss`, no host, no URL at all (and `wss://` with no TLS
/// compiled into tokio-tungstenite, the reason saying how to add it: the tests build it with
/// native-tls, so the driver's unit test `wss_without_tls_compiled_in_is_an_unusable_url`
/// shows that one). Each was retried with the backoff for ever, `wait_connected` timing out and
/// the events telling a new failure at every attempt.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_url_no_attempt_can_connect_to_stops_the_client() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let mut wrong = Vec::new();
    for (url, says) in
        [(format!("http://{addr}/ws"), "scheme"), ("ws:///ws".to_owned(), ""), ("not a url".to_owned(), "")]
    {
        let (c, events) =
            Client::builder(url.clone()).backoff(Duration::from_millis(10), Duration::from_millis(20)).connect();
        let rec = Recorder::new(events);
        let waited = c.wait_connected(scaled(5.0)).await;
        let stopped = matches!(&waited, Err(Error::Terminal { code: None, reason }) if reason.contains(says));
        rec.wait("the end of the events", 5.0, |ev| matches!(ev.last(), Some(Event::Error(_)))).await;
        let gone = disconnections(&rec);
        let once = matches!(gone[..], [Event::Disconnected { code: None, reconnect_in: None, .. }]);
        if !stopped || !once {
            wrong.push(format!("{url}: {waited:?}, {gone:?}"));
        }
    }
    assert!(wrong.is_empty(), "{wrong:#?}");
}

/// A client of a [`scripted_server`] whose token callback gives a token expiring in 2 s, then,
/// for the refresh (held until the test adds a permit to the returned gate), ones of an hour.
fn refreshing_client(url: String) -> (Client, Recorder, Arc<tokio::sync::Semaphore>) {
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    let (calls, held) = (Arc::new(AtomicUsize::new(0)), gate.clone());
    let (c, events) = Client::builder(url)
        .request_timeout(scaled(5.0))
        .backoff(Duration::from_millis(50), Duration::from_millis(200))
        .token(move || {
            let (first, gate) = (calls.fetch_add(1, Ordering::SeqCst) == 0, held.clone());
            async move {
                let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs();
                if first {
                    return Ok(jwt_with_exp(&(now + 2).to_string()));
                }
                let _open = gate.acquire().await.map_err(|e| e.to_string())?;
                Ok(jwt_with_exp(&(now + 3600).to_string()))
            }
        })
        .connect();
    (c, Recorder::new(events), gate)
}

/// A token refresh whose `welcome` names another user (`u2`) than the connection's (`u1`): the
/// server has left every room without a `left` (README, `auth`). The client says so once
/// (`Event::UserChanged` with the new welcome; `user_id()` is u2's), and joins every room it
/// holds again with `since` (its position: 2 in "r", 0 in "s"), each once, as after a reconnect;
/// a room whose join went after the `auth` (the server joined it as u2 already: "t") is not
/// joined twice; the room's send waits for its `joined`, and its message 3 is delivered once.
/// A refresh that keeps the user (`u1`) joins nothing again. The client kept its rooms `Joined`
/// with no join: nothing of them came any more.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refresh_to_another_user_joins_every_room_again() {
    for (next, changed) in [("u2", true), ("u1", false)] {
        let auth_id = Arc::new(Mutex::new(None::<serde_json::Value>));
        let (url, frames, server) = scripted_server(move |cmd, _| {
            let welcome = |id: &serde_json::Value| {
                let w = json!({"type": "welcome", "user_id": next, "username": next, "authenticated": true, "id": id});
                w.to_string()
            };
            match (cmd["type"].as_str(), cmd["room"].as_str()) {
                // The welcome is held until the client's next frame (the test's join of "t"),
                // which the server then handles as the new user: after the welcome.
                (Some("auth"), _) => {
                    *auth_id.lock().unwrap() = Some(cmd["id"].clone());
                    vec![]
                }
                (Some("join"), Some("t")) => {
                    let held = auth_id.lock().unwrap().take();
                    let mut replies: Vec<String> = held.iter().map(welcome).collect();
                    replies.push(raw_joined(cmd, Some("0"), None));
                    replies
                }
                (Some("join"), Some("r")) if cmd.get("since").is_none() => vec![
                    raw_joined(cmd, Some("0"), None),
                    raw_message("1", "r", "one", None),
                    raw_message("2", "r", "two", None),
                ],
                (Some("join"), Some("r")) => {
                    vec![raw_joined(cmd, Some("2"), Some(true)), raw_message("3", "r", "3", None)]
                }
                (Some("join"), _) => vec![raw_joined(cmd, Some("0"), cmd.get("since").map(|_| true))],
                (Some("message"), _) => {
                    let id = if changed { "4" } else { "3" };
                    let mut echo: serde_json::Value =
                        serde_json::from_str(&raw_message(id, "r", "mine", cmd["client_msg_id"].as_str())).unwrap();
                    echo["user_id"] = json!(next);
                    vec![echo.to_string()]
                }
                _ => vec![],
            }
        })
        .await;
        let (c, rec, gate) = refreshing_client(url);
        c.wait_connected(scaled(10.0)).await.unwrap();
        c.join("r").await.unwrap();
        c.join("s").await.unwrap();
        rec.wait("messages 1 and 2", 10.0, |ev| common::message_ids(ev, "r").len() == 2).await;
        gate.add_permits(1);
        let authed = || frames.lock().unwrap().iter().any(|(_, f)| f["type"] == "auth");
        eventually(10.0, authed).await;
        assert!(authed(), "no refresh: {:?}", rec.events());
        c.join("t").await.unwrap();
        let sent = tokio::time::timeout(scaled(5.0), c.send("r", "mine")).await.expect("the send");
        assert_eq!(sent.unwrap().id, if changed { 4 } else { 3 });
        c.ping().await.unwrap();
        let delivered = if changed { 4 } else { 3 }; // the echo's Event::Message may trail the send
        rec.wait("the echo delivered", 10.0, |ev| common::message_ids(ev, "r").len() >= delivered).await;
        let frames_after_auth: Vec<serde_json::Value> = {
            let frames = frames.lock().unwrap();
            frames.iter().map(|(_, f)| f.clone()).skip_while(|f| f["type"] != "auth").collect()
        };
        let joins: Vec<(String, serde_json::Value)> = frames_after_auth
            .iter()
            .filter(|f| f["type"] == "join")
            .map(|f| (f["room"].as_str().unwrap().to_owned(), f["since"].clone()))
            .collect();
        let changes: Vec<Event> = rec.events().into_iter().filter(|e| matches!(e, Event::UserChanged(_))).collect();
        assert_eq!(c.user_id().as_deref(), Some(next));
        if changed {
            let welcome = wschat::Welcome { user_id: "u2".into(), username: "u2".into(), authenticated: true };
            assert_eq!(changes, [Event::UserChanged(welcome)]);
            assert_eq!(joins, [("t".to_owned(), json!(null)), ("r".into(), json!(2)), ("s".into(), json!(0))]);
            // The send went after the re-join of its room, and 3 (its replay) came once.
            let rejoin = frames_after_auth.iter().position(|f| f["type"] == "join" && f["room"] == "r");
            let send = frames_after_auth.iter().position(|f| f["type"] == "message");
            assert!(rejoin.is_some_and(|rejoin| send.is_some_and(|send| rejoin < send)), "{frames_after_auth:?}");
            assert_eq!(rec.ids("r"), [1, 2, 3, 4]);
        } else {
            assert_eq!(changes, []);
            assert_eq!(joins, [("t".to_owned(), json!(null))]);
            assert_eq!(rec.ids("r"), [1, 2, 3]);
        }
        assert!(disconnections(&rec).is_empty(), "{:?}", rec.events());
        c.close();
        server.abort();
    }
}

/// A `history` reply holding a message whose `id` is no message id (`"2"`, `2.5`, `-1`, `null`,
/// absent, past 2^53 - 1) answers the call at once, with that message's `id` `u64::MAX` and the
/// others as they are, as the Python client keeps such a message (its `id` -1) and the JS client
/// keeps it as it came. The whole reply did not parse (`invalid_event`): `history` waited for
/// its timeout and failed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_history_message_with_an_odd_id_still_answers_the_call() {
    let odd = ["\"2\"", "2.5", "-1", "null", "absent", "9007199254740993"];
    let (url, _frames, server) = scripted_server(move |cmd, _| match cmd["type"].as_str() {
        Some("history") => {
            let raw = odd[cmd["before"].as_u64().unwrap() as usize - 1];
            let two = raw_message(raw, "r", "two", None);
            let two = if raw == "absent" { two.replace(r#", "id": absent"#, "") } else { two };
            let messages = [raw_message("1", "r", "one", None), two, raw_message("3", "r", "three", None)];
            vec![format!(
                r#"{{"type": "history", "room": "r", "messages": [{}], "id": {}}}"#,
                messages.join(", "),
                cmd["id"]
            )]
        }
        _ => vec![],
    })
    .await;
    let (c, rec) = impatient_client(url);
    c.wait_connected(scaled(10.0)).await.unwrap();
    let mut wrong = Vec::new();
    for (i, raw) in odd.iter().enumerate() {
        match c.history("r", None, Some(i as u64 + 1)).await {
            Ok(page) => {
                let ids: Vec<u64> = page.iter().map(|m| m.id).collect();
                let texts: Vec<&str> = page.iter().map(|m| m.text.as_str()).collect();
                if ids != [1, u64::MAX, 3] || texts != ["one", "two", "three"] {
                    wrong.push(format!("id {raw}: {ids:?} {texts:?}"));
                }
            }
            Err(e) => wrong.push(format!("id {raw}: {e}")),
        }
    }
    assert!(wrong.is_empty(), "{wrong:#?}");
    assert_eq!(invalid_events(&rec), 0, "{:?}", rec.events());
    c.close();
    server.abort();
}

/// The codes of the client's closes, as its `Disconnected` events tell them.
fn close_codes(rec: &Recorder) -> Vec<Option<u16>> {
    disconnections(rec)
        .into_iter()
        .filter_map(|e| match e {
            Event::Disconnected { code, .. } => Some(code),
            _ => None,
        })
        .collect()
}

/// How many `type` commands the server has received so far.
async fn received(server: &common::Server, kind: &str) -> u64 {
    common::get(&server.metrics, "/metrics/json").await["messages"]["received"][kind].as_u64().unwrap_or(0)
}

/// 120 pings, histories and users reads at once against a request bucket of 25: each was
/// written at once, 25 answered, then 2 x `RATE_LIMIT_BURST` (20) refusals in a row and the
/// connection closed with 4102, the reads cut off by it written again at once on the next
/// connection, flooding again; the refused ones failed with `rate_limited`. Now at most a
/// window of them is on the wire, and a refused one holds the rest back until its
/// `retry_after_ms` and goes again first: every call is answered and nothing is closed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_requests_is_paced_not_cut_off() {
    let h = Harness::start().await;
    let env = json!({"RATE_LIMIT_BURST": "10", "RATE_LIMIT_REQUESTS": "50", "RATE_LIMIT_REQUESTS_BURST": "25"});
    let s = h.server("memory", 1, env).await;
    let (a, rec) = signed_in(&s.url, h.token("reader", 600.0).await);
    a.join("lobby").await.unwrap();
    let before = common::refusals(&s).await;
    let calls = (0..120).map(|i| {
        let a = a.clone();
        async move {
            match i % 3 {
                0 => a.ping().await,
                1 => a.history("lobby", Some(1), None).await.map(|_| ()),
                _ => a.list_users("lobby").await.map(|_| ()),
            }
        }
    });
    let results = tokio::time::timeout(scaled(60.0), futures_util::future::join_all(calls)).await.expect("answered");
    let failed: Vec<String> = results.iter().filter_map(|r| r.as_ref().err().map(|e| e.to_string())).collect();
    let closes = close_codes(&rec);
    assert_eq!((closes, failed.len(), failed.first()), (vec![], 0, None), "4102 closes and failed calls");
    assert!(common::refusals(&s).await > before, "the bucket was never empty: the test tests nothing");
}

/// 12 histories at once, with a 1 s request timeout, against a request bucket of 5 filled at
/// 2 a second: those the pacer cannot let go within the timeout fail with `Error::Timeout`
/// (they failed with `rate_limited`, the whole burst written at once) and are never written
/// afterwards: the server receives no history after them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_that_waits_too_long_in_the_queue_times_out_unsent() {
    let h = Harness::start().await;
    let env = json!({"RATE_LIMIT_BURST": "10", "RATE_LIMIT_REQUESTS": "2", "RATE_LIMIT_REQUESTS_BURST": "5"});
    let s = h.server("memory", 1, env).await;
    let token = h.token("waiter", 600.0).await;
    let (a, events) = Client::builder(&s.url)
        .token(move || {
            let t = token.clone();
            async move { Ok(t) }
        })
        .request_timeout(Duration::from_secs(1))
        .connect();
    let rec = Recorder::new(events);
    a.join("lobby").await.unwrap();
    let calls = (0..12u32).map(|i| {
        let a = a.clone();
        async move { a.history("lobby", Some(i + 1), None).await }
    });
    let results = tokio::time::timeout(scaled(30.0), futures_util::future::join_all(calls)).await.expect("ended");
    let written = received(&s, "history").await;
    let others: Vec<String> = results
        .iter()
        .filter_map(|r| r.as_ref().err())
        .filter(|e| **e != Error::Timeout)
        .map(|e| e.to_string())
        .collect();
    assert_eq!(others, Vec::<String>::new(), "failed otherwise than by the timeout");
    let timed_out = results.iter().filter(|r| r.is_err()).count();
    assert!(timed_out > 0 && timed_out < 12, "{timed_out} timed out");
    // A read asked after them goes out behind anything still queued: once it is answered, a
    // history left in the queue would have been written.
    let mut answered = false;
    for _ in 0..20 {
        if a.list_users("lobby").await.is_ok() {
            answered = true;
            break;
        }
    }
    assert!(answered, "list_users never answered");
    assert_eq!(received(&s, "history").await, written, "a history written after its timeout");
    assert_eq!(close_codes(&rec), vec![]);
}

/// A `leave` queued behind reads the request bucket cannot serve yet times out for its caller,
/// but the room is gone for the app already: the leave is written when its turn comes (the
/// reads whose callers gave up are not), so the server takes the user out of the room and the
/// others see her go.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leave_that_times_out_in_the_request_queue_is_still_written() {
    let h = Harness::start().await;
    let env = json!({"RATE_LIMIT_BURST": "10", "RATE_LIMIT_REQUESTS": "2", "RATE_LIMIT_REQUESTS_BURST": "5"});
    let s = h.server("memory", 1, env).await;
    let token = h.token("alice", 600.0).await;
    let (alice, events) = Client::builder(&s.url)
        .token(move || {
            let t = token.clone();
            async move { Ok(t) }
        })
        .request_timeout(Duration::from_millis(300))
        .connect();
    let rec_alice = Recorder::new(events);
    let _ = alice.join("lobby").await; // a slow join times out, and is joined all the same
    rec_alice.wait("her join", 20.0, |ev| ev.iter().any(|e| matches!(e, Event::Joined(_)))).await;
    let (bob, rec_bob) = signed_in(&s.url, h.token("bob", 600.0).await);
    bob.join("lobby").await.unwrap();
    // The reads go first (their calls are made first, in order), the leave behind them.
    let reads = futures_util::future::join_all((0..8u32).map(|i| alice.history("lobby", Some(i + 1), None)));
    let (_, left) = tokio::join!(reads, alice.leave("lobby"));
    assert!(matches!(left, Err(Error::Timeout)), "the leave: {left:?}");
    rec_bob
        .wait("her offline presence", 30.0, |ev| {
            ev.iter().any(|e| matches!(e, Event::Presence(p) if p.user_id == "alice" && p.status == "offline"))
        })
        .await;
}

/// Waits until `frames` holds `n` frames of `kind` (from any connection), or panics naming `what`.
async fn frames_of(frames: &Frames, kind: &str, n: usize, what: &str) -> Vec<(usize, serde_json::Value)> {
    let deadline = tokio::time::Instant::now() + scaled(10.0);
    loop {
        let got: Vec<_> = frames.lock().unwrap().iter().filter(|(_, f)| f["type"] == kind).cloned().collect();
        if got.len() >= n {
            return got;
        }
        assert!(tokio::time::Instant::now() < deadline, "{what}: {got:?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A `leave` whose caller gave up while it was on the wire, then refused `rate_limited` (not
/// carried out), goes again: the room is gone for the app, the server must hear of it, as in
/// the JS and Python clients.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leave_timed_out_on_the_wire_then_refused_rate_limited_is_written_again() {
    let held = Arc::new(Mutex::new(None::<serde_json::Value>));
    let (url, frames, server) = scripted_server({
        let held = held.clone();
        move |cmd, _| match cmd["type"].as_str() {
            Some("join") => vec![raw_joined(cmd, Some("0"), None)],
            Some("leave") if held.lock().unwrap().is_none() => {
                *held.lock().unwrap() = Some(cmd["id"].clone());
                vec![] // unanswered until its caller gave up
            }
            Some("leave") => vec![json!({"type": "left", "room": cmd["room"], "id": cmd["id"]}).to_string()],
            // The ping the test sends after the timeout: the refusal of the leave comes first.
            Some("ping") => match held.lock().unwrap().take() {
                Some(id) => vec![
                    json!({"type": "error", "code": "rate_limited", "message": "slow down", "retry_after_ms": 20, "id": id})
                        .to_string(),
                    json!({"type": "pong", "id": cmd["id"]}).to_string(),
                ],
                None => vec![],
            },
            _ => vec![],
        }
    })
    .await;
    let (c, _events) = Client::builder(url).request_timeout(Duration::from_millis(300)).connect();
    c.join("r").await.unwrap();
    assert!(matches!(c.leave("r").await, Err(Error::Timeout)));
    c.ping().await.unwrap();
    let leaves = frames_of(&frames, "leave", 2, "the refused leave written again").await;
    assert!(leaves.iter().all(|(n, f)| *n == 1 && f["room"] == "r"), "{leaves:?}");
    c.close();
    server.abort();
}

/// Polls each call once, which hands it to the client's task, and leaves it pending.
async fn poll_once<F: std::future::Future + Unpin>(calls: &mut [F]) {
    std::future::poll_fn(|cx| {
        for call in calls.iter_mut() {
            assert!(std::pin::Pin::new(call).poll(cx).is_pending());
        }
        std::task::Poll::Ready(())
    })
    .await
}

/// A read whose caller gave up while it was on the wire, its entry then dropped by the driver
/// (it keeps at most 64 waiting before it drops those whose callers gave up), refused
/// `rate_limited` afterwards: the refusal still pauses the request queue for its
/// `retry_after_ms` (the bucket is the user's), as in the JS and Python clients. It freed the
/// place and paused nothing: the next read went out at once, into an empty bucket. And it is
/// told to no one (it was an `error` event, unlike a late refusal of an entry still kept).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_rate_limited_for_a_dropped_request_still_pauses_the_queue() {
    use tokio::time::Instant;
    const RETRY_AFTER_MS: u64 = 500;
    let held = Arc::new(Mutex::new(None::<serde_json::Value>));
    // When the refusal went, and when the next read came after it.
    let refused_at = Arc::new(Mutex::new(None::<Instant>));
    let next_at = Arc::new(Mutex::new(None::<Instant>));
    let (url, frames, server) = scripted_server({
        let (held, refused_at, next_at) = (held.clone(), refused_at.clone(), next_at.clone());
        move |cmd, _| match cmd["type"].as_str() {
            Some("join") => vec![raw_joined(cmd, Some("0"), None)],
            Some("list_users") => {
                let mut held = held.lock().unwrap();
                if held.is_none() {
                    *held = Some(cmd["id"].clone());
                    return vec![]; // unanswered until the send
                }
                let mut next = next_at.lock().unwrap();
                if next.is_none() && refused_at.lock().unwrap().is_some() {
                    *next = Some(Instant::now());
                }
                let (room, id) = (&cmd["room"], &cmd["id"]);
                vec![json!({"type": "users", "room": room, "users": [], "id": id}).to_string()]
            }
            // The refusal of the first read, late, then the send's echo.
            Some("message") => {
                *refused_at.lock().unwrap() = Some(Instant::now());
                let id = held.lock().unwrap().clone();
                let refusal = json!({"type": "error", "code": "rate_limited", "message": "later",
                                     "retry_after_ms": RETRY_AFTER_MS, "id": id});
                let cmid = cmd["client_msg_id"].as_str();
                vec![refusal.to_string(), raw_message("1", "r", "go", cmid)]
            }
            _ => vec![],
        }
    })
    .await;
    let builder = Client::builder(url).max_requests_in_flight(1).request_timeout(scaled(20.0));
    let (c, events) = builder.connect();
    let rec = Recorder::new(events);
    c.join("r").await.unwrap();
    // The first read is written (the window, one, full), and its caller gives up.
    let mut first = vec![Box::pin(c.list_users("r"))];
    poll_once(&mut first).await;
    frames_of(&frames, "list_users", 1, "the first read").await;
    drop(first);
    // Handed to the client's task in order (one queue of calls): more than 64 reads wait
    // behind it, the driver dropping its entry.
    let mut waiting: Vec<_> = (0..70).map(|_| Box::pin(c.list_users("r"))).collect();
    poll_once(&mut waiting).await;
    c.send("r", "go").await.unwrap(); // the refusal came before the echo
    let next = tokio::time::timeout(scaled(10.0), waiting.remove(0)).await;
    next.expect("the next read answered in time").unwrap();
    let refused = refused_at.lock().unwrap().expect("refused");
    let gap = next_at.lock().unwrap().expect("the next read written") - refused;
    let paused = gap >= Duration::from_millis(RETRY_AFTER_MS);
    assert!(paused, "the next read went {gap:?} after the refusal");
    // Its caller was told by giving up: no `error` event, as for a kept entry's late refusal.
    assert_eq!(rec.count(|e| matches!(e, Event::Error(_))), 0);
    drop(waiting);
    c.close();
    server.abort();
}

/// The `ping` behind a `joined` refused `rate_limited` (the request bucket ran dry at this join)
/// still ends the replay, and holds the request queue back for its `retry_after_ms`, as a
/// refusal of a queued request does (the bucket is theirs), as in the JS and Python clients: the
/// next request went out at once, into the empty bucket. No `Event::Error`: the ping is the
/// client's own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_sync_ping_holds_the_request_queue_back_for_its_retry_after() {
    use tokio::time::Instant;
    const RETRY_AFTER_MS: u64 = 300;
    // When the ping was refused, and when the read came after it.
    let refused_at = Arc::new(Mutex::new(None::<Instant>));
    let read_at = Arc::new(Mutex::new(None::<Instant>));
    let (url, _frames, server) = scripted_server({
        let (refused_at, read_at) = (refused_at.clone(), read_at.clone());
        move |cmd, _| match cmd["type"].as_str() {
            // A replay whose end is not known (`recovered: false`): a `ping` goes behind it.
            Some("join") => vec![raw_joined(cmd, Some("10"), Some(false))],
            Some("ping") => {
                let mut refused = refused_at.lock().unwrap();
                if refused.is_some() {
                    return vec![]; // answered with its `pong`
                }
                *refused = Some(Instant::now());
                let refusal = json!({"type": "error", "code": "rate_limited", "message": "later",
                                     "retry_after_ms": RETRY_AFTER_MS, "id": cmd["id"]});
                vec![refusal.to_string()]
            }
            Some("message") => vec![raw_message("11", "r", "after", cmd["client_msg_id"].as_str())],
            Some("list_users") => {
                read_at.lock().unwrap().get_or_insert_with(Instant::now);
                let (room, id) = (&cmd["room"], &cmd["id"]);
                vec![json!({"type": "users", "room": room, "users": [], "id": id}).to_string()]
            }
            _ => vec![],
        }
    })
    .await;
    let (c, events) = Client::builder(url).request_timeout(scaled(20.0)).connect();
    let rec = Recorder::new(events);
    c.join_from("r", Some(5), None).await.unwrap();
    // The send waits for the end of the replay: the ping's answer, here its refusal.
    c.send("r", "after").await.unwrap();
    c.list_users("r").await.unwrap();
    let refused = refused_at.lock().unwrap().expect("the ping refused");
    let gap = read_at.lock().unwrap().expect("the read written") - refused;
    let paused = gap >= Duration::from_millis(RETRY_AFTER_MS);
    assert!(paused, "the read went {gap:?} after the refusal");
    assert_eq!(rec.count(|e| matches!(e, Event::Error(_))), 0, "{:?}", rec.events());
    c.close();
    server.abort();
}

/// A user's token bucket on a fake server, as the real server's: empty at the first charge, a
/// token per `token`, one at most. `refused`: the types of the commands it refused, in order.
struct OneTokenBucket {
    token: Duration,
    tokens: f64,
    stamp: Option<std::time::Instant>,
    refused: Vec<String>,
}

impl OneTokenBucket {
    fn new(token: Duration) -> Self {
        Self { token, tokens: 0.0, stamp: None, refused: Vec::new() }
    }

    /// Spends a token for `cmd`; without one, the `rate_limited` refusal to answer it with (the
    /// bucket's `retry_after_ms`).
    fn charge(&mut self, cmd: &serde_json::Value) -> Option<String> {
        let now = std::time::Instant::now();
        if let Some(stamp) = self.stamp {
            self.tokens = (self.tokens + (now - stamp).as_secs_f64() / self.token.as_secs_f64()).min(1.0);
        }
        self.stamp = Some(now);
        if self.tokens < 1.0 - 1e-9 {
            self.refused.push(cmd["type"].as_str().unwrap_or_default().to_owned());
            let retry_after_ms = ((1.0 - self.tokens) * self.token.as_secs_f64() * 1000.0).ceil() as u64;
            let refusal = json!({"type": "error", "code": "rate_limited", "message": "slow",
                                 "retry_after_ms": retry_after_ms, "id": cmd["id"]});
            return Some(refusal.to_string());
        }
        self.tokens -= 1.0;
        None
    }
}

/// The `ping` behind a `joined` is charged to the request bucket: once a refusal has taught the
/// request pacer the pace, it counts the ping's token (the ping still written at once), so the
/// next request waits for the refill, as in the JS and Python clients. Not counted, the pacer
/// reckoned one token more than the server had, and the read went at once, refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sync_ping_spends_a_token_of_the_pace_the_request_pacer_learnt() {
    // The user's request bucket: a token per TOKEN, one at most, empty at the first read. The
    // pings and the reads spend it, as on the real server (the joins too there, but they are
    // the join pacer's: not here).
    const TOKEN: Duration = Duration::from_millis(400);
    let bucket = Arc::new(Mutex::new(OneTokenBucket::new(TOKEN)));
    let (url, _frames, server) = scripted_server({
        let bucket = bucket.clone();
        move |cmd, _| {
            let kind = cmd["type"].as_str().unwrap_or_default();
            if kind == "join" {
                // A replay whose end is not known (`recovered: false`): a `ping` goes behind it.
                return vec![raw_joined(cmd, Some("10"), Some(false))];
            }
            if kind != "ping" && kind != "list_users" {
                return vec![];
            }
            if let Some(refusal) = bucket.lock().unwrap().charge(cmd) {
                return vec![refusal];
            }
            match kind {
                "ping" => vec![json!({"type": "pong", "id": cmd["id"]}).to_string()],
                _ => vec![json!({"type": "users", "room": cmd["room"], "users": [], "id": cmd["id"]}).to_string()],
            }
        }
    })
    .await;
    // A window, and a pacer, of one.
    let (c, _events) = Client::builder(url).request_timeout(scaled(20.0)).max_requests_in_flight(1).connect();
    c.list_users("r").await.unwrap();
    assert_eq!(bucket.lock().unwrap().refused, ["list_users"], "the refusal the pace is learnt from");
    tokio::time::sleep(TOKEN * 2).await; // both buckets fill up again: no event to await
    c.join_from("r", Some(5), None).await.unwrap(); // its ping, written at once, spends that token
    c.list_users("r").await.unwrap();
    assert_eq!(bucket.lock().unwrap().refused, ["list_users"], "the read after the ping waited for the refill");
    c.close();
    server.abort();
}

/// The server charges joins, pings and requests to one bucket per user: once refusals have taught
/// the two pacers the pace, each counts the other's writes (with no place in its window), so a
/// read right after a join, and a join right after a read, wait for the refill, as in the JS and
/// Python clients. Not counted, each pacer reckoned the token the other had spent as still there,
/// and the second write went at once, refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_join_and_request_pacers_count_each_others_writes_in_one_bucket() {
    // The user's one bucket: a token per TOKEN, one at most, empty at the first charge. Joins,
    // pings and reads spend it, as on the real server (RATE_LIMIT_REQUESTS).
    const TOKEN: Duration = Duration::from_millis(400);
    let bucket = Arc::new(Mutex::new(OneTokenBucket::new(TOKEN)));
    let (url, _frames, server) = scripted_server({
        let bucket = bucket.clone();
        move |cmd, _| {
            let kind = cmd["type"].as_str().unwrap_or_default();
            if kind != "join" && kind != "ping" && kind != "list_users" {
                return vec![];
            }
            if let Some(refusal) = bucket.lock().unwrap().charge(cmd) {
                return vec![refusal];
            }
            match kind {
                // A first join: no replay, no ping behind it.
                "join" => vec![raw_joined(cmd, Some("0"), None)],
                "ping" => vec![json!({"type": "pong", "id": cmd["id"]}).to_string()],
                _ => vec![json!({"type": "users", "room": cmd["room"], "users": [], "id": cmd["id"]}).to_string()],
            }
        }
    })
    .await;
    // Windows, and pacers' buckets, of one.
    let (c, _events) =
        Client::builder(url).request_timeout(scaled(20.0)).max_requests_in_flight(1).max_joins_in_flight(1).connect();
    // The refusals the two paces are learnt from: the read's (the bucket empty), then the join's,
    // written right behind the read written again (which took the token).
    c.list_users("a").await.unwrap();
    c.join("a").await.unwrap();
    let learnt = ["list_users", "join"];
    assert_eq!(bucket.lock().unwrap().refused, learnt, "the refusals the paces are learnt from");
    tokio::time::sleep(TOKEN * 2).await; // the buckets fill up again: no event to await
    c.join("b").await.unwrap();
    c.list_users("b").await.unwrap();
    assert_eq!(bucket.lock().unwrap().refused, learnt, "the read after the join waited for the refill");
    tokio::time::sleep(TOKEN * 2).await;
    c.list_users("b").await.unwrap();
    c.join("c").await.unwrap();
    assert_eq!(bucket.lock().unwrap().refused, learnt, "the join after the read waited for the refill");
    c.close();
    server.abort();
}

/// A kick still waiting its turn behind a read when the connection drops was never written
/// (so not done): it goes out on the next connection, after the read asked again, as in the
/// JS and Python clients (one written before the drop fails with `disconnected`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kick_queued_at_a_lost_connection_goes_out_on_the_next() {
    let (url, frames, server) = scripted_server(|cmd, n| match cmd["type"].as_str() {
        Some("join") => vec![raw_joined(cmd, Some("0"), None)],
        Some("list_users") if n == 1 => vec![], // unanswered on the first connection
        Some("list_users") => {
            vec![json!({"type": "users", "room": cmd["room"], "users": [], "id": cmd["id"]}).to_string()]
        }
        Some("kick") => {
            vec![json!({"type": "moderated", "action": "kick", "room": cmd["room"], "user_id": cmd["user_id"],
                                    "id": cmd["id"]})
            .to_string()]
        }
        _ => vec![],
    })
    .await;
    let (c, events) = Client::builder(url)
        .backoff(Duration::from_millis(50), Duration::from_millis(200))
        .max_requests_in_flight(1)
        .connect();
    let rec = Recorder::new(events);
    c.join("r").await.unwrap();
    let users = tokio::spawn({
        let c = c.clone();
        async move { c.list_users("r").await }
    });
    frames_of(&frames, "list_users", 1, "the read written").await;
    // Polled once, the kick's call is handed to the client's task before the reconnect
    // (one queue of calls, in order): it waits behind the read on the first connection.
    let mut kick = Box::pin(c.kick("r", "bob", None));
    std::future::poll_fn(|cx| {
        assert!(std::future::Future::poll(kick.as_mut(), cx).is_pending());
        std::task::Poll::Ready(())
    })
    .await;
    c.reconnect();
    let wait = scaled(20.0);
    tokio::time::timeout(wait, kick).await.expect("the kick settled").expect("the kick goes out");
    tokio::time::timeout(wait, users).await.expect("the read settled").unwrap().expect("the read asked again");
    let kicks = frames_of(&frames, "kick", 1, "the kick").await;
    assert_eq!(kicks.iter().map(|(n, _)| *n).collect::<Vec<_>>(), [2], "written once, on the new connection");
    drop(rec);
    c.close();
    server.abort();
}
