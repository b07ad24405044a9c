//! Client behaviour beyond the shared scenarios, against the real server.

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{scaled, Harness, Recorder};
use serde_json::json;
use wschat::{Client, Error, Event, OutboxEntry, OutboxStore};

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
    rec.wait("a terminal error", 20.0, |ev| ev.iter().any(|e| matches!(e, Event::Error(Error::Terminal { .. })))).await;
    assert_eq!(c.join("r").await.unwrap_err(), Error::Closed);
    let last = rec.events().into_iter().rev().find(|e| matches!(e, Event::Disconnected { .. }));
    assert!(matches!(last, Some(Event::Disconnected { reconnect_in: None, .. })), "{last:?}");
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
