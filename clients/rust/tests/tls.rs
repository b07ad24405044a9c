//! The client over `wss://` against the real server behind the harness's TLS front (its
//! certificate signed by a CA the harness made at run time), built as an app with native-tls
//! is (this crate's dev-dependencies turn tokio-tungstenite's `native-tls` on).
//!
//! A certificate the client cannot verify (signed by a CA it does not trust, or made for
//! another host name) is no outage: the next attempt gets the same certificate. The client
//! stops at the first one with `Error::Terminal { code: Some(1015), reason }`, the reason
//! naming the problem, as the JS and Python clients do; it used to reconnect with the backoff
//! for ever, a `join` ending in `Error::Timeout` and nothing saying why. A private CA is
//! trusted by one client through its `ClientBuilder::tls_connector` (this crate's `native-tls`
//! feature: `cargo test --features native-tls`, as CI runs it), or process-wide through
//! `SSL_CERT_FILE` (native-tls on Linux, OpenSSL), the README's two ways.
//!
//! That stop holds until the client's first `welcome`: once connected, such a failure on a
//! reconnect is a server-side incident (a certificate expired or rotated wrongly), retried with
//! the backoff (the front's certificate swapped: `POST /fronts/<front>/certificate`).
//!
//! A binary of its own: `SSL_CERT_FILE` is the process's, set after the cases that must not
//! trust the CA through it (the connector's first: it must trust it on its own). The other test
//! trusts the CA through its connector and meets a CA no one trusts, whatever `SSL_CERT_FILE`.

mod common;

use std::time::Duration;

use common::{scaled, Harness, Recorder};
use serde_json::json;
use wschat::{Client, ClientBuilder, Error, Event};

/// A memory server behind a TLS front whose certificate names `hostname`: its URL and CA file.
async fn tls_front(harness: &Harness, hostname: &str) -> (String, String) {
    let server = harness.server("memory", 1, json!({})).await;
    let front = harness.post(&format!("/servers/{}/tls", server.id), json!({"hostname": hostname})).await;
    (front["url"].as_str().unwrap().to_owned(), front["ca"].as_str().unwrap().to_owned())
}

/// What is wrong with how a client of `url` stops, or `None` when it stops as it should: a
/// `join` made while it connects fails with `Error::Terminal` 1015 whose reason names `cause`
/// (not `Error::Timeout`), the events tell one `Disconnected` (1015, no reconnect) and then
/// that error, and half a second more brings no second attempt (the backoff, 10 .. 20 ms,
/// would have made many). `configure` sets the rest of the client (its TLS connector).
async fn stops_with(url: &str, cause: &str, configure: impl FnOnce(ClientBuilder) -> ClientBuilder) -> Option<String> {
    let builder = Client::builder(format!("{url}?username=ann"))
        .backoff(Duration::from_millis(10), Duration::from_millis(20))
        .request_timeout(scaled(5.0));
    let (c, events) = configure(builder).connect();
    let rec = Recorder::new(events);
    let joined = c.join("general").await;
    let named = |reason: &str| reason.contains("TLS certificate verification failed") && reason.contains(cause);
    let mut wrong = Vec::new();
    if !matches!(&joined, Err(Error::Terminal { code: Some(1015), reason }) if named(reason)) {
        wrong.push(format!("join: {joined:?}"));
    }
    let waited = c.wait_connected(scaled(1.0)).await;
    if !matches!(&waited, Err(Error::Terminal { code: Some(1015), .. })) {
        wrong.push(format!("wait_connected: {waited:?}"));
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let told: Vec<Event> =
        rec.events().into_iter().filter(|e| matches!(e, Event::Disconnected { .. } | Event::Error(_))).collect();
    let once = match &told[..] {
        [Event::Disconnected { code: Some(1015), reason, reconnect_in: None }, Event::Error(Error::Terminal { code: Some(1015), .. })] => {
            named(reason)
        }
        _ => false,
    };
    if !once {
        let first: Vec<_> = told.iter().take(3).collect();
        wrong.push(format!("{} events, the first: {first:#?}", told.len()));
    }
    c.close();
    (!wrong.is_empty()).then(|| format!("{url}: {wrong:#?}"))
}

/// A client of `url` (`?username=` `who`) connects, joins, has a send echoed, and does all
/// that again after a reconnect (the connector, if any, is used for every attempt).
async fn chats(url: &str, who: &str, configure: impl FnOnce(ClientBuilder) -> ClientBuilder) {
    let builder = Client::builder(format!("{url}?username={who}")).request_timeout(scaled(10.0));
    let (c, events) = configure(builder).connect();
    let rec = Recorder::new(events);
    c.wait_connected(scaled(10.0)).await.expect("connected over wss://");
    c.join("general").await.expect("joined");
    let sent = c.send("general", "over TLS").await.expect("sent");
    assert_eq!(sent.text, "over TLS");
    c.reconnect();
    let welcomed = |events: &[Event]| events.iter().filter(|e| matches!(e, Event::Welcome { .. })).count() >= 2;
    rec.wait("a second welcome after the reconnect", 10.0, welcomed).await;
    // (`wait` also returns when the events end: a client stopped.)
    assert!(welcomed(&rec.events()), "no second welcome: {:#?}", rec.events());
    let sent = c.send("general", "again").await.expect("sent after the reconnect");
    assert_eq!(sent.text, "again");
    c.close();
}

/// Through `ClientBuilder::tls_connector`, with `SSL_CERT_FILE` not (yet) naming the CA: a
/// connector trusting it connects (and reconnects); one without it, or the right CA for a
/// certificate of another host name, stops the client with 1015 and the cause, as the
/// default roots do.
#[cfg(feature = "native-tls")]
async fn through_a_connector(url: &str, other_url: &str, ca: &str) {
    use wschat::native_tls::{Certificate, TlsConnector};
    use wschat::Connector;
    let pem = std::fs::read(ca).expect("the harness's CA file");
    let trusting = || {
        let ca = Certificate::from_pem(&pem).expect("a PEM certificate");
        Connector::NativeTls(TlsConnector::builder().add_root_certificate(ca).build().expect("a TLS connector"))
    };
    let untrusting = Connector::NativeTls(TlsConnector::new().expect("a TLS connector"));
    let untrusting = move |b: ClientBuilder| b.tls_connector(untrusting);
    assert_eq!(stops_with(url, "unable to get local issuer certificate", untrusting).await, None);
    assert_eq!(stops_with(other_url, "hostname mismatch", |b| b.tls_connector(trusting())).await, None);
    chats(url, "cat", |b| b.tls_connector(trusting())).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_that_fails_verification_stops_the_client_and_a_private_ca_is_trusted() {
    let harness = Harness::start().await;
    let (url, ca) = tls_front(&harness, "localhost").await;
    let (other_url, _) = tls_front(&harness, "wrong.invalid").await;
    #[cfg(feature = "native-tls")]
    through_a_connector(&url, &other_url, &ca).await;
    // CI runs the connector's cases; there a build without them is a failure, not a skip.
    #[cfg(not(feature = "native-tls"))]
    assert!(
        std::env::var("CI").as_deref() != Ok("true"),
        "tests/tls.rs's tls_connector cases need `cargo test --features native-tls`"
    );
    // The system's CAs only: the harness's CA is none of them.
    assert_eq!(stops_with(&url, "unable to get local issuer certificate", |b| b).await, None);
    // The CA trusted (the README's way for native-tls on Linux), the name wrong.
    std::env::set_var("SSL_CERT_FILE", &ca);
    assert_eq!(stops_with(&other_url, "hostname mismatch", |b| b).await, None);
    // The CA trusted, the name right: connected, joined, a send echoed.
    chats(&url, "bob", |b| b).await;
}

/// Once connected, a certificate that fails verification on a reconnect is a server-side
/// incident (a certificate expired or rotated wrongly), not a misconfiguration: each attempt is
/// an `Event::Error` (`tls_certificate`) and an `Event::Disconnected` 1015 with the cause and
/// `reconnect_in` set; the rooms and the outbox are kept, and once the front's certificate is
/// trusted again the client is back by itself, re-joined with `since`, a send made during the
/// failure delivered exactly once. It used to stop for good (`Error::Terminal` 1015) at the
/// first failure, the send waiting for a restart of the app. A new client (the app's next
/// start) has never connected: the same failure stops it.
#[cfg(feature = "native-tls")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn once_connected_a_certificate_failure_is_retried_and_the_client_comes_back() {
    use wschat::native_tls::{Certificate, TlsConnector};
    use wschat::{ConnectionState, Connector};
    let harness = Harness::start().await;
    let server = harness.server("memory", 1, json!({})).await;
    let front = harness.post(&format!("/servers/{}/tls", server.id), json!({})).await;
    let (url, ca) = (front["url"].as_str().unwrap().to_owned(), front["ca"].as_str().unwrap().to_owned());
    let swap = format!("/fronts/{}/certificate", front["front"].as_str().unwrap());
    let pem = std::fs::read(&ca).expect("the harness's CA file");
    let trusting = || {
        let ca = Certificate::from_pem(&pem).expect("a PEM certificate");
        Connector::NativeTls(TlsConnector::builder().add_root_certificate(ca).build().expect("a TLS connector"))
    };
    let builder = || {
        Client::builder(format!("{url}?username=ann"))
            .backoff(Duration::from_millis(50), Duration::from_millis(200))
            .request_timeout(scaled(10.0))
            .send_timeout(scaled(30.0))
            .tls_connector(trusting())
    };
    let (bob, bob_events) =
        Client::builder(format!("{}?username=bob", server.url)).request_timeout(scaled(10.0)).connect();
    let seen = Recorder::new(bob_events);
    bob.join("general").await.expect("bob joined");
    let (c, events) = builder().connect();
    let rec = Recorder::new(events);
    c.wait_connected(scaled(10.0)).await.expect("connected over wss://");
    c.join("general").await.expect("joined");
    let before = c.send("general", "before").await.expect("sent");

    harness.post(&swap, json!({"issuer": "unknown", "drop": true})).await;
    let failures = |events: &[Event]| {
        events.iter().filter(|e| matches!(e, Event::Disconnected { code: Some(1015), .. })).cloned().collect::<Vec<_>>()
    };
    rec.wait("two failed attempts", 10.0, |events| failures(events).len() >= 2).await;
    for failure in failures(&rec.events()) {
        let Event::Disconnected { reason, reconnect_in, .. } = &failure else { unreachable!() };
        assert!(reconnect_in.is_some(), "{failure:?}");
        assert!(reason.contains("TLS certificate verification failed"), "{failure:?}");
        assert!(reason.contains("unable to get local issuer certificate"), "{failure:?}");
    }
    let errors: Vec<Error> =
        rec.events().into_iter().filter_map(|e| if let Event::Error(e) = e { Some(e) } else { None }).collect();
    assert!(!errors.is_empty(), "no Event::Error");
    for error in &errors {
        assert_eq!(error.code(), Some("tls_certificate"), "{errors:?}");
        assert!(error.to_string().contains("local issuer"), "{error}");
    }
    // Between attempts, as in any outage (`Disconnected` while it waits); not stopped.
    let waited = c.wait_connected(Duration::from_millis(100)).await;
    assert!(matches!(waited, Err(Error::Timeout)), "{waited:?}");
    let during = tokio::spawn({
        let c = c.clone();
        async move { c.send("general", "during").await }
    });
    tokio::time::timeout(scaled(10.0), async {
        while c.outbox_len() != 1 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("the send queued in the outbox");

    harness.post(&swap, json!({"issuer": "ca"})).await;
    let sent = tokio::time::timeout(scaled(30.0), during).await.expect("in time").expect("the task").expect("sent");
    assert_eq!((sent.id, sent.text.as_str()), (before.id + 1, "during"));
    seen.wait("during at bob", 10.0, |events| common::message_ids(events, "general").contains(&sent.id)).await;
    assert_eq!(c.state(), ConnectionState::Connected);
    let joins: Vec<Option<bool>> = rec
        .events()
        .into_iter()
        .filter_map(|e| if let Event::Joined(j) = e { Some(j.recovered) } else { None })
        .collect();
    assert_eq!(joins, [None, Some(true)]);
    let history = bob.history("general", None, None).await.expect("history");
    let history: Vec<(u64, &str)> = history.iter().map(|m| (m.id, m.text.as_str())).collect();
    assert_eq!(history, [(before.id, "before"), (sent.id, "during")]);
    assert_eq!(
        common::messages(&seen.events(), "general"),
        [(before.id, "before".to_owned()), (sent.id, "during".to_owned())]
    );
    c.close();

    // The app's next start: never connected, so the failure stops it (1015) at once.
    harness.post(&swap, json!({"issuer": "unknown"})).await;
    let (c, _events) = builder().connect();
    let waited = c.wait_connected(scaled(10.0)).await;
    assert!(matches!(&waited, Err(Error::Terminal { code: Some(1015), .. })), "{waited:?}");
    bob.close();
}
