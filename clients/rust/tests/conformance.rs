//! The shared conformance scenarios (clients/conformance/README.md), against the
//! real server started by the harness. Each asserts, from the app's side (the
//! client's events), that every acknowledged message reaches every member exactly
//! once and in id order.

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::{has_all_once_in_order, scaled, Harness, Publisher, Recorder};
use futures_util::future::join_all;
use serde_json::json;
use wschat::{Client, ConnectionState, Event};

const ROOM: &str = "conformance";

/// A client with short backoff (the servers here restart in seconds).
fn client(url: impl Fn() -> String + Send + Sync + 'static) -> (Client, Recorder) {
    let (client, events) = wschat::ClientBuilder::with_url_fn(url)
        .backoff(Duration::from_millis(100), Duration::from_secs(2))
        .request_timeout(scaled(20.0))
        .send_timeout(scaled(60.0))
        .connect();
    (client, Recorder::new(events))
}

fn guest(url: &str, name: &str) -> (Client, Recorder) {
    let url = format!("{url}?username={name}");
    client(move || url.clone())
}

async fn connected(c: &Client) {
    c.wait_connected(scaled(20.0)).await.expect("connected in time");
}

/// Sends `n` messages one after the other, each awaited; returns them as stored.
async fn send_messages(c: &Client, room: &str, n: usize, tag: &str) -> Vec<wschat::ChatMessage> {
    let mut sent = Vec::new();
    for i in 0..n {
        sent.push(c.send(room, &format!("{tag} {i}")).await.unwrap_or_else(|e| panic!("send {tag} {i}: {e}")));
    }
    sent
}

/// Sends `n` messages one after the other, each awaited; returns their ids.
async fn send_all(c: &Client, room: &str, n: usize, tag: &str) -> Vec<u64> {
    send_messages(c, room, n, tag).await.into_iter().map(|m| m.id).collect()
}

/// A send whose future owns its inputs (for `join_all`, which polls them in order).
fn send_owned(
    c: &Client,
    text: String,
) -> impl std::future::Future<Output = Result<wschat::ChatMessage, wschat::Error>> {
    let c = c.clone();
    async move { c.send(ROOM, &text).await }
}

fn connects(events: &[Event]) -> usize {
    events.iter().filter(|e| matches!(e, Event::State(ConnectionState::Connected))).count()
}

fn disconnects(r: &Recorder) -> usize {
    r.count(|e| matches!(e, Event::Disconnected { .. }))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_and_welcome() {
    let h = Harness::start().await;
    let s = h.server("memory", 1, json!({})).await;
    let (c, rec) = guest(&s.url, "alice");
    connected(&c).await;
    assert_eq!(c.state(), ConnectionState::Connected);
    assert_eq!(c.username().as_deref(), Some("alice"));
    assert!(c.user_id().unwrap().starts_with("guest-"), "{:?}", c.user_id());
    rec.wait("welcome", 10.0, |ev| {
        ev.iter().any(|e| matches!(e, Event::Welcome { username, .. } if username == "alice"))
    })
    .await;
    let states: Vec<_> =
        rec.events().into_iter().filter_map(|e| if let Event::State(s) = e { Some(s) } else { None }).collect();
    assert_eq!(states, [ConnectionState::Connecting, ConnectionState::Connected]);

    // With a token the identity is the token's.
    let token = h.token("bob", 600.0).await;
    let url = s.url.clone();
    let (tc, _trec) = wschat::ClientBuilder::new(url)
        .token(move || {
            let t = token.clone();
            async move { Ok(t) }
        })
        .connect();
    connected(&tc).await;
    assert_eq!(tc.user_id().as_deref(), Some("bob"));
    c.close();
    rec.wait("disconnected after close", 10.0, |ev| ev.last() == Some(&Event::State(ConnectionState::Disconnected)))
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn join_send_ack() {
    let h = Harness::start().await;
    let s = h.server("memory", 1, json!({})).await;
    let (a, rec_a) = guest(&s.url, "alice");
    let (b, rec_b) = guest(&s.url, "bob");
    let joined = a.join(ROOM).await.unwrap();
    assert_eq!(joined.last_id, 0);
    b.join(ROOM).await.unwrap();

    let ids = send_all(&a, ROOM, 20, "hello").await;
    assert_eq!(ids, (1..=20).collect::<Vec<_>>());
    rec_b.wait("b has 20 messages", 20.0, |ev| common::message_ids(ev, ROOM).len() >= 20).await;
    rec_a.wait("a's echoes", 20.0, |ev| common::message_ids(ev, ROOM).len() >= 20).await;
    assert_eq!(rec_b.ids(ROOM), ids);
    assert_eq!(rec_a.ids(ROOM), ids);

    let history = b.history(ROOM, Some(50), None).await.unwrap();
    assert_eq!(history.iter().map(|m| m.id).collect::<Vec<_>>(), ids);
    assert_eq!(history[0].text, "hello 0");
    let older = b.history(ROOM, Some(5), Some(10)).await.unwrap();
    assert_eq!(older.iter().map(|m| m.id).collect::<Vec<_>>(), [5, 6, 7, 8, 9]);
    let mut users: Vec<_> = b.list_users(ROOM).await.unwrap().into_iter().map(|u| u.username).collect();
    users.sort();
    assert_eq!(users, ["alice", "bob"]);

    // Errors carry the server's code.
    let err = a.send("elsewhere", "x").await.unwrap_err();
    assert_eq!(err.code(), Some("not_in_room"));
    let err = a.join("bad room!").await.unwrap_err();
    assert_eq!(err.code(), Some("invalid_room"));
    assert_eq!(a.outbox_len(), 0);

    // Presence and typing reach the other member.
    b.typing(ROOM, true);
    rec_a
        .wait("typing", 10.0, |ev| ev.iter().any(|e| matches!(e, Event::Typing(t) if t.user == "bob" && t.status)))
        .await;
    b.leave(ROOM).await.unwrap();
    rec_a
        .wait("offline presence", 10.0, |ev| {
            ev.iter().any(|e| matches!(e, Event::Presence(p) if p.user == "bob" && !p.online()))
        })
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recovery_after_server_close() {
    let h = Harness::start().await;
    let s = h.server("redis", 1, json!({})).await;
    let p = h.server("redis", 1, json!({})).await;
    let (c, rec) = guest(&s.url, "carol");
    let (publisher, _prec) = guest(&p.url, "pub");
    c.join(ROOM).await.unwrap();
    publisher.join(ROOM).await.unwrap();
    let mut acked = send_all(&publisher, ROOM, 5, "before").await;
    rec.wait("first messages", 20.0, |ev| common::message_ids(ev, ROOM).len() >= 5).await;

    h.stop(&s).await;
    rec.wait("close 1001", 20.0, |ev| ev.iter().any(|e| matches!(e, Event::Disconnected { code: Some(1001), .. })))
        .await;
    acked.extend(send_all(&publisher, ROOM, 10, "during").await);
    h.restart(&s).await;
    rec.wait("recovered re-join", 30.0, |ev| {
        ev.iter().any(|e| matches!(e, Event::Joined(j) if j.recovered == Some(true)))
    })
    .await;
    acked.extend(send_all(&publisher, ROOM, 5, "after").await);
    rec.wait("every message", 30.0, |ev| common::message_ids(ev, ROOM).len() >= acked.len()).await;
    assert_eq!(rec.ids(ROOM), acked);
    assert_eq!(rec.count(|e| matches!(e, Event::Joined(j) if j.recovered == Some(false))), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rolling_restart() {
    let h = Harness::start().await;
    let a = h.server("redis", 1, json!({})).await;
    let b = h.server("redis", 1, json!({})).await;
    let mut clients = Vec::new();
    for i in 0..3 {
        // A first, then B: the URL function is asked before every attempt.
        let attempts = Arc::new(AtomicUsize::new(0));
        let (url_a, url_b) = (format!("{}?username=c{i}", a.url), format!("{}?username=c{i}", b.url));
        let (c, rec) =
            client(move || if attempts.fetch_add(1, Ordering::SeqCst) == 0 { url_a.clone() } else { url_b.clone() });
        c.join(ROOM).await.unwrap();
        clients.push((c, rec));
    }
    let (publisher, _prec) = guest(&b.url, "pub");
    publisher.join(ROOM).await.unwrap();

    let publisher = Publisher::start(publisher, ROOM);
    publisher.sent_more(10).await;
    h.stop(&a).await;
    for (_, rec) in &clients {
        rec.wait("the re-join on B", 30.0, |ev| ev.iter().filter(|e| matches!(e, Event::Joined(_))).count() >= 2).await;
    }
    publisher.sent_more(10).await;
    let acked = publisher.stop().await;
    for (c, rec) in &clients {
        rec.wait("every message at every client", 30.0, |ev| common::message_ids(ev, ROOM).len() >= acked.len()).await;
        assert_eq!(rec.ids(ROOM), acked, "client {:?}", c.username());
        assert!(disconnects(rec) >= 1, "the client moved servers");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_restart() {
    let h = Harness::start().await;
    let s = h.server("redis", 1, json!({})).await;
    let (a, rec_a) = guest(&s.url, "alice");
    let (b, rec_b) = guest(&s.url, "bob");
    a.join(ROOM).await.unwrap();
    b.join(ROOM).await.unwrap();
    let mut acked = send_messages(&a, ROOM, 5, "before").await;

    h.post("/redis/stop", json!({})).await;
    let outage = {
        let a = a.clone();
        tokio::spawn(async move {
            let sends = (0..5).map(|i| {
                let a = a.clone();
                async move { a.send(ROOM, &format!("outage {i}")).await }
            });
            join_all(sends).await
        })
    };
    // The sends are refused (`unavailable`) and wait in the outbox.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(a.outbox_len() > 0, "sends during the outage wait in the outbox");
    h.post("/redis/start", json!({})).await;
    for result in outage.await.unwrap() {
        let m = result
            .unwrap_or_else(|e| panic!("an outage send is delivered after Redis is back: {e}; {:#?}", rec_a.events()));
        acked.push(m);
    }
    acked.extend(send_messages(&a, ROOM, 5, "after").await);
    let ids: Vec<u64> = acked.iter().map(|m| m.id).collect();
    assert!(ids[5..].iter().all(|id| *id > ids[4]), "ids never go back: {ids:?}");
    acked.sort_by_key(|m| m.id);
    let mut ids: Vec<u64> = acked.iter().map(|m| m.id).collect();
    ids.dedup();
    assert_eq!(ids.len(), acked.len(), "an id acknowledged twice: {acked:#?}");
    rec_b
        .wait("every acknowledged message", 40.0, |ev| has_all_once_in_order(&common::message_ids(ev, ROOM), &ids))
        .await;
    // Delivered means the same id with the same text (a reused id would count as lost).
    let got = common::messages(&rec_b.events(), ROOM);
    let want: Vec<(u64, String)> = acked.into_iter().map(|m| (m.id, m.text)).collect();
    assert_eq!(got, want, "B has every acknowledged message once, in order");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_worker() {
    let h = Harness::start().await;
    let s = h.server("redis", 2, json!({})).await;
    let p = h.server("redis", 1, json!({})).await;
    let mut clients = Vec::new();
    for i in 0..6 {
        let (c, rec) = guest(&s.url, &format!("k{i}"));
        c.join(ROOM).await.unwrap();
        clients.push((c, rec));
    }
    let (publisher, _prec) = guest(&p.url, "pub");
    publisher.join(ROOM).await.unwrap();
    let publisher = Publisher::start(publisher, ROOM);
    publisher.sent_more(5).await;
    // The first victim may have held none of our clients: then kill the other one.
    for _ in 0..2 {
        h.post(&format!("/servers/{}/kill-worker", s.id), json!({})).await;
        let hit = tokio::time::timeout(scaled(3.0), async {
            while !clients.iter().any(|(_, rec)| disconnects(rec) > 0) {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        });
        if hit.await.is_ok() {
            break;
        }
    }
    for (_, rec) in clients.iter().filter(|(_, rec)| disconnects(rec) > 0) {
        rec.wait("the re-join", 30.0, |ev| ev.iter().filter(|e| matches!(e, Event::Joined(_))).count() >= 2).await;
    }
    publisher.sent_more(10).await;
    let acked = publisher.stop().await;
    let mut moved = 0;
    for (_, rec) in &clients {
        rec.wait("every message at every client", 40.0, |ev| common::message_ids(ev, ROOM).len() >= acked.len()).await;
        assert_eq!(rec.ids(ROOM), acked);
        moved += disconnects(rec);
    }
    assert!(moved >= 1, "no client was on the killed worker");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_refresh() {
    let h = Arc::new(Harness::start().await);
    let s = h.server("memory", 1, json!({"JWT_LEEWAY": "1"})).await;
    let calls = Arc::new(AtomicUsize::new(0));
    let (control, calls_in) = (h.control.clone(), calls.clone());
    let url = s.url.clone();
    let (c, events) = wschat::ClientBuilder::new(url)
        .backoff(Duration::from_millis(100), Duration::from_secs(2))
        .token(move || {
            calls_in.fetch_add(1, Ordering::SeqCst);
            let control = control.clone();
            async move {
                let reply = common::post(&control, "/token", json!({"sub": "alice", "ttl": 4})).await;
                Ok(reply["token"].as_str().unwrap().to_owned())
            }
        })
        .connect();
    let rec = Recorder::new(events);
    connected(&c).await;
    assert_eq!(c.user_id().as_deref(), Some("alice"));
    c.join(ROOM).await.unwrap();
    // Three lifetimes of the token: it must be refreshed before each expiry.
    tokio::time::sleep(Duration::from_secs(12)).await;
    assert!(calls.load(Ordering::SeqCst) >= 3, "callback called {} times", calls.load(Ordering::SeqCst));
    assert_eq!(disconnects(&rec), 0, "the session stayed up: {:?}", rec.events());
    let expired = rec.count(|e| matches!(e, Event::Error(err) if err.code() == Some("token_expired")));
    assert_eq!(expired, 0);
    assert_eq!(c.send(ROOM, "still here").await.unwrap().user_id, "alice");
    // The same user: no `UserChanged`, and the room is not joined again.
    assert_eq!(rec.count(|e| matches!(e, Event::UserChanged(_))), 0);
    assert_eq!(rec.count(|e| matches!(e, Event::Joined(_))), 1);

    let before = calls.load(Ordering::SeqCst);
    c.reconnect();
    rec.wait("reconnected", 20.0, |ev| {
        ev.iter().filter(|e| matches!(e, Event::State(ConnectionState::Connected))).count() >= 2
    })
    .await;
    assert!(calls.load(Ordering::SeqCst) > before, "a reconnect asks for a token");
    connected(&c).await;
    assert_eq!(c.user_id().as_deref(), Some("alice"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outbox_resend() {
    let h = Harness::start().await;
    let s = h.server("memory", 1, json!({})).await;
    // While `offline` is set, connection attempts go nowhere.
    let (a, rec_a, offline) = common::switchable(&s.url, h.token("alice", 600.0).await);
    let (b, rec_b) = guest(&s.url, "bob");
    a.join(ROOM).await.unwrap();
    b.join(ROOM).await.unwrap();

    // Part 1: cut the socket while 30 sends are in flight.
    // `join!` polls in order: the 30 sends reach the client's task, then the cut.
    let (burst, ()) =
        tokio::join!(join_all((0..30).map(|i| send_owned(&a, format!("burst {i}")))), async { a.reconnect() });
    let mut acked: Vec<u64> = burst.into_iter().map(|r| r.expect("burst send acknowledged").id).collect();
    rec_a.wait("the cut", 10.0, |ev| ev.iter().any(|e| matches!(e, Event::Disconnected { .. }))).await;
    let mut unique = acked.clone();
    unique.sort();
    unique.dedup();
    assert_eq!(unique.len(), 30, "each send is its own message: {acked:?}");

    // DMs pending across a cut are resent and deduplicated the same way.
    rec_a.wait("connected again", 20.0, |ev| connects(ev) >= 2).await;
    let to = b.user_id().unwrap();
    let dm = |i: usize| {
        let (a, to) = (a.clone(), to.clone());
        async move { a.dm(&to, &format!("dm {i}")).await }
    };
    let (dms, ()) = tokio::join!(join_all((0..5).map(dm)), async { a.reconnect() });
    let mut dm_ids: Vec<u64> = dms.into_iter().map(|r| r.expect("dm acknowledged").id).collect();
    dm_ids.sort();
    dm_ids.dedup();
    assert_eq!(dm_ids.len(), 5);
    let dms_at_b = |ev: &[Event]| {
        let mut ids: Vec<u64> =
            ev.iter().filter_map(|e| if let Event::Dm(d) = e { Some(d.id) } else { None }).collect();
        ids.sort();
        ids
    };
    rec_b.wait("the dms", 20.0, |ev| dms_at_b(ev).len() >= 5).await;
    assert_eq!(dms_at_b(&rec_b.events()), dm_ids, "each DM once");
    rec_a.wait("connected again", 20.0, |ev| connects(ev) >= 3).await;

    // Part 2: sends made while disconnected wait, then go out in order.
    offline.store(true, Ordering::SeqCst);
    a.reconnect();
    rec_a.wait("disconnected", 20.0, |ev| ev.last() == Some(&Event::State(ConnectionState::Disconnected))).await;
    let queued = {
        let a = a.clone();
        tokio::spawn(async move { join_all((0..5).map(|i| send_owned(&a, format!("queued {i}")))).await })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(a.outbox_len(), 5);
    offline.store(false, Ordering::SeqCst);
    let queued: Vec<_> = queued.await.unwrap().into_iter().map(|r| r.expect("queued send acknowledged")).collect();
    let queued_ids: Vec<u64> = queued.iter().map(|m| m.id).collect();
    assert!(queued_ids.windows(2).all(|w| w[0] < w[1]), "in order: {queued_ids:?}");
    assert_eq!(
        queued.iter().map(|m| m.text.as_str()).collect::<Vec<_>>(),
        ["queued 0", "queued 1", "queued 2", "queued 3", "queued 4"]
    );
    acked.extend(queued_ids);
    acked.sort();
    assert_eq!(acked, (1..=35).collect::<Vec<_>>());
    for rec in [&rec_a, &rec_b] {
        rec.wait("all 35, once each", 20.0, |ev| common::message_ids(ev, ROOM).len() >= 35).await;
        assert_eq!(rec.ids(ROOM), acked);
    }
    assert_eq!(a.outbox_len(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn history_truncated() {
    // 20 messages of ~60 kB: 1.2 MB, past the 1 MiB a history reply holds (HISTORY_MAX_BYTES).
    let h = Harness::start().await;
    let s = h.server("memory", 1, json!({"MAX_TEXT_CHARS": "60000"})).await;
    let (c, _rec) = guest(&s.url, "paula");
    c.join("big").await.unwrap();
    let texts: Vec<String> = (1..=20).map(|i| format!("{i:02} {}", "x".repeat(59_990))).collect();
    let mut ids = Vec::new();
    for text in &texts {
        ids.push(c.send("big", text).await.unwrap().id);
    }
    assert_eq!(ids, (1..=20).collect::<Vec<u64>>());

    let newest = c.history_page("big", Some(20), None).await.unwrap();
    let got: Vec<u64> = newest.messages.iter().map(|m| m.id).collect();
    assert!(newest.truncated, "{} messages", got.len());
    assert!(!got.is_empty() && got.len() < 20, "{} messages", got.len());
    assert_eq!(got, (21 - got.len() as u64..=20).collect::<Vec<_>>(), "the newest that fit");
    let got_texts: Vec<&String> = newest.messages.iter().map(|m| &m.text).collect();
    assert_eq!(got_texts, texts[20 - got.len()..].iter().collect::<Vec<_>>());
    assert_eq!(c.history("big", Some(20), None).await.unwrap(), newest.messages, "history: the same messages");
    let two = c.history_page("big", Some(2), None).await.unwrap();
    assert_eq!(two, wschat::HistoryPage { messages: newest.messages[got.len() - 2..].to_vec(), truncated: false });

    // Paging back until a page is short of the limit without `truncated` gets every message.
    let mut pages = vec![newest];
    while pages.last().is_some_and(|p| p.truncated || p.messages.len() == 20) {
        let before = pages.last().unwrap().messages[0].id;
        pages.push(c.history_page("big", Some(20), Some(before)).await.unwrap());
    }
    let all: Vec<u64> = pages.iter().rev().flat_map(|p| p.messages.iter().map(|m| m.id)).collect();
    assert_eq!(all, ids);
    assert!(!pages.last().unwrap().truncated);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn user_changed_on_refresh() {
    // The token callback gives ann's token (8 s), then, for the refresh (held until the test is
    // ready), ben's, whose grants open "open" only.
    let h = Harness::start().await;
    let s = h.server("memory", 1, json!({"JWT_LEEWAY": "1"})).await;
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    let (control, calls, held) = (h.control.clone(), Arc::new(AtomicUsize::new(0)), gate.clone());
    let (c, events) = wschat::ClientBuilder::new(s.url.clone())
        .backoff(Duration::from_millis(100), Duration::from_secs(2))
        .request_timeout(scaled(20.0))
        .send_timeout(scaled(60.0))
        .token(move || {
            let (first, control, gate) = (calls.fetch_add(1, Ordering::SeqCst) == 0, control.clone(), held.clone());
            async move {
                let body = if first {
                    json!({"sub": "ann", "name": "Ann", "ttl": 8})
                } else {
                    let _open = gate.acquire().await.map_err(|e| e.to_string())?;
                    json!({"sub": "ben", "name": "Ben", "ttl": 3600, "rooms": ["open"]})
                };
                Ok(common::post(&control, "/token", body).await["token"].as_str().unwrap().to_owned())
            }
        })
        .connect();
    let rec = Recorder::new(events);
    connected(&c).await;
    assert_eq!(c.user_id().as_deref(), Some("ann"));
    let (poster, _prec) = guest(&s.url, "poster");
    for room in ["open", "closed"] {
        c.join(room).await.unwrap();
        poster.join(room).await.unwrap();
    }
    let mut acked = send_all(&poster, "open", 3, "before").await;
    send_all(&poster, "closed", 3, "before").await;
    rec.wait("1..3 in both rooms", 20.0, |ev| {
        common::message_ids(ev, "open").len() == 3 && common::message_ids(ev, "closed").len() == 3
    })
    .await;

    // The poster goes on posting in "open" across the refresh.
    let publisher = Publisher::start(poster, "open");
    publisher.sent_more(3).await;
    gate.add_permits(1);
    rec.wait("the user change", 20.0, |ev| ev.iter().any(|e| matches!(e, Event::UserChanged(_)))).await;
    rec.wait("open joined again", 20.0, |ev| {
        ev.iter().filter(|e| matches!(e, Event::Joined(j) if j.room == "open")).count() >= 2
    })
    .await;
    publisher.sent_more(5).await;
    acked.extend(publisher.stop().await);
    let mine = c.send("open", "as ben").await.unwrap();
    assert_eq!(mine.user_id, "ben");
    acked.push(mine.id);

    rec.wait("every message of open", 20.0, |ev| common::message_ids(ev, "open").len() >= acked.len()).await;
    assert_eq!(rec.ids("open"), acked, "every message once, in order, none of 1..3 again");
    rec.wait("closed removed", 20.0, |ev| {
        ev.iter().any(|e| matches!(e, Event::Removed { room, .. } if room == "closed"))
    })
    .await;
    let removed: Vec<Event> = rec.events().into_iter().filter(|e| matches!(e, Event::Removed { .. })).collect();
    assert!(
        matches!(&removed[..], [Event::Removed { room, reason: Some(reason), .. }] if room == "closed" && reason == "forbidden"),
        "{removed:?}"
    );
    assert_eq!(rec.ids("closed"), [1, 2, 3]);
    let changes: Vec<Event> = rec.events().into_iter().filter(|e| matches!(e, Event::UserChanged(_))).collect();
    let welcome = wschat::Welcome { user_id: "ben".into(), username: "Ben".into(), authenticated: true };
    assert_eq!(changes, [Event::UserChanged(welcome)]);
    assert_eq!((c.user_id().as_deref(), c.username().as_deref()), (Some("ben"), Some("Ben")));
    let users: Vec<String> = c.list_users("open").await.unwrap().into_iter().map(|u| u.user_id).collect();
    assert!(users.contains(&"ben".to_owned()) && !users.contains(&"ann".to_owned()), "{users:?}");
    assert_eq!(disconnects(&rec), 0, "a refresh, not a reconnect: {:?}", rec.events());
}
