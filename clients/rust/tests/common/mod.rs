//! Test support: the shared conformance harness (a child process speaking JSON
//! over HTTP), and a recorder that keeps a client's events for assertions.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::watch;
use wschat::{Client, Event, Events};

/// Every wait is this many seconds times `WSCHAT_TEST_TIMEOUT_SCALE` (as in the Python tests).
pub fn scaled(secs: f64) -> Duration {
    let scale = std::env::var("WSCHAT_TEST_TIMEOUT_SCALE").ok().and_then(|s| s.parse::<f64>().ok()).unwrap_or(1.0);
    Duration::from_secs_f64(secs * scale)
}

/// The conformance harness (`clients/conformance/harness.py`), one per test so a
/// test that stops Redis disturbs no other. It exits when its stdin closes.
pub struct Harness {
    pub control: String,
    pub secret: String,
    child: Child,
}

/// A server the harness started.
#[derive(Debug, Clone)]
pub struct Server {
    pub id: String,
    pub url: String,
    /// `http://127.0.0.1:<METRICS_PORT>` (`/metrics/json`, `/api/`).
    pub metrics: String,
}

impl Harness {
    pub async fn start() -> Harness {
        tokio::task::spawn_blocking(|| {
            let python = std::env::var("WSCHAT_PYTHON").unwrap_or_else(|_| "python3".into());
            let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../conformance/harness.py");
            let mut child = Command::new(&python)
                .arg(script)
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::inherit())
                .spawn()
                .unwrap_or_else(|e| panic!("cannot start {python} {script}: {e} (set WSCHAT_PYTHON)"));
            let mut line = String::new();
            BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
            let hello: Value = serde_json::from_str(&line)
                .unwrap_or_else(|e| panic!("harness said {line:?} ({e}); is wschat installed for {python}?"));
            Harness {
                control: hello["control"].as_str().unwrap().to_owned(),
                secret: hello["secret"].as_str().unwrap().to_owned(),
                child,
            }
        })
        .await
        .unwrap()
    }

    /// One harness call; panics on an HTTP error with the harness's message.
    pub async fn post(&self, path: &str, body: Value) -> Value {
        post(&self.control, path, body).await
    }

    pub async fn server(&self, backend: &str, workers: u32, env: Value) -> Server {
        let reply = self.post("/servers", json!({"backend": backend, "workers": workers, "env": env})).await;
        Server {
            id: reply["id"].as_str().unwrap().into(),
            url: reply["url"].as_str().unwrap().into(),
            metrics: reply["metrics"].as_str().unwrap().into(),
        }
    }

    pub async fn stop(&self, server: &Server) {
        self.post(&format!("/servers/{}/stop", server.id), json!({"signal": "TERM"})).await;
    }

    pub async fn restart(&self, server: &Server) {
        self.post(&format!("/servers/{}/start", server.id), json!({})).await;
    }

    /// A token that makes `sub` a moderator of `mod_rooms` (minted by `python -m wschat token`).
    pub async fn moderator_token(&self, sub: &str, mod_rooms: &str) -> String {
        let python = std::env::var("WSCHAT_PYTHON").unwrap_or_else(|_| "python3".into());
        let out = tokio::process::Command::new(&python)
            .args(["-m", "wschat", "token", "--sub", sub, "--secret", &self.secret, "--mod-rooms", mod_rooms])
            .output()
            .await
            .unwrap_or_else(|e| panic!("{python} -m wschat token: {e}"));
        assert!(out.status.success(), "wschat token: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).unwrap().trim().to_owned()
    }

    pub async fn token(&self, sub: &str, ttl: f64) -> String {
        let reply = self.post("/token", json!({"sub": sub, "name": sub, "ttl": ttl})).await;
        reply["token"].as_str().unwrap().to_owned()
    }
}

impl Drop for Harness {
    fn drop(&mut self) {
        // EOF on its stdin: the harness stops its servers and Redis, then exits.
        drop(self.child.stdin.take());
        let _ = self.child.wait();
    }
}

/// A minimal HTTP/1.1 POST (the harness closes each connection after its reply).
pub async fn post(control: &str, path: &str, body: Value) -> Value {
    exchange(control, "POST", path, Some(body), "").await
}

/// A call of a server's admin API (`/api/...` on its metrics port), with the `API_KEY` it runs with.
pub async fn api(server: &Server, key: &str, path: &str, body: Value) -> Value {
    exchange(&server.metrics, "POST", path, Some(body), &format!("Authorization: Bearer {key}\r\n")).await
}

/// A minimal HTTP/1.1 GET of a JSON document (the server's `/metrics/json`).
pub async fn get(base: &str, path: &str) -> Value {
    exchange(base, "GET", path, None, "").await
}

/// The server's count of `rate_limited` refusals so far.
pub async fn refusals(server: &Server) -> u64 {
    get(&server.metrics, "/metrics/json").await["rate_limited"].as_u64().expect("rate_limited in /metrics/json")
}

async fn exchange(base: &str, method: &str, path: &str, body: Option<Value>, headers: &str) -> Value {
    let addr = base.trim_start_matches("http://").trim_end_matches('/').to_owned();
    let body = body.map(|b| b.to_string()).unwrap_or_default();
    let exchange = async {
        let mut stream = TcpStream::connect(&addr).await?;
        let request = format!(
            "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\n\
             {headers}Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
        stream.write_all(request.as_bytes()).await?;
        let mut reply = Vec::new();
        stream.read_to_end(&mut reply).await?;
        Ok::<_, std::io::Error>(reply)
    };
    let reply = tokio::time::timeout(scaled(120.0), exchange)
        .await
        .unwrap_or_else(|_| panic!("{method} {base}{path}: no reply"))
        .unwrap_or_else(|e| panic!("{method} {base}{path}: {e}"));
    let reply = String::from_utf8_lossy(&reply);
    let (head, json_body) = reply.split_once("\r\n\r\n").unwrap_or_else(|| panic!("{method} {base}{path}: {reply}"));
    let status: u16 = head.split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    assert_eq!(status, 200, "{method} {base}{path} answered {status}: {json_body}");
    serde_json::from_str(json_body).unwrap()
}

/// Keeps every event of one client, and lets a test wait for a condition on them.
#[derive(Clone)]
pub struct Recorder {
    events: Arc<Mutex<Vec<Event>>>,
    count: watch::Receiver<usize>,
}

impl Recorder {
    pub fn new(mut events: Events) -> Recorder {
        let log = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = watch::channel(0);
        let sink = log.clone();
        tokio::spawn(async move {
            while let Some(event) = events.recv().await {
                let n = {
                    let mut log = sink.lock().unwrap();
                    log.push(event);
                    log.len()
                };
                let _ = tx.send(n);
            }
        });
        Recorder { events: log, count: rx }
    }

    pub fn events(&self) -> Vec<Event> {
        self.events.lock().unwrap().clone()
    }

    /// Waits until `ok` holds for the events so far; panics with `what` after `secs` (scaled).
    pub async fn wait(&self, what: &str, secs: f64, ok: impl Fn(&[Event]) -> bool) {
        let mut count = self.count.clone();
        let events = self.events.clone();
        let result = tokio::time::timeout(scaled(secs), count.wait_for(|_| ok(&events.lock().unwrap()))).await;
        if result.is_err() {
            let log = self.events();
            let tail: Vec<_> = log.iter().rev().take(15).collect();
            panic!("timed out waiting for {what}; last events (newest first): {tail:#?}");
        }
    }

    /// The ids of the room messages this client surfaced, in order.
    pub fn ids(&self, room: &str) -> Vec<u64> {
        message_ids(&self.events.lock().unwrap(), room)
    }

    pub fn count(&self, pred: impl Fn(&Event) -> bool) -> usize {
        self.events.lock().unwrap().iter().filter(|e| pred(e)).count()
    }
}

pub fn message_ids(events: &[Event], room: &str) -> Vec<u64> {
    events
        .iter()
        .filter_map(|e| match e {
            Event::Message(m) if m.room == room => Some(m.id),
            _ => None,
        })
        .collect()
}

/// The (id, text) of the room messages surfaced, in order.
pub fn messages(events: &[Event], room: &str) -> Vec<(u64, String)> {
    events
        .iter()
        .filter_map(|e| match e {
            Event::Message(m) if m.room == room => Some((m.id, m.text.clone())),
            _ => None,
        })
        .collect()
}

/// True when `got` holds every id of `acked` exactly once, in increasing order.
pub fn has_all_once_in_order(got: &[u64], acked: &[u64]) -> bool {
    let strictly_increasing = got.windows(2).all(|w| w[0] < w[1]);
    strictly_increasing && acked.iter().all(|id| got.binary_search(id).is_ok())
}

/// Sends to `room` steadily (each send awaited, then a short pause) until stopped.
pub struct Publisher {
    stop: Arc<std::sync::atomic::AtomicBool>,
    sent: Arc<Mutex<Vec<u64>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Publisher {
    pub fn start(client: wschat::Client, room: &'static str) -> Publisher {
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let sent = Arc::new(Mutex::new(Vec::new()));
        let (stop_in, sent_in) = (stop.clone(), sent.clone());
        let task = tokio::spawn(async move {
            let mut i = 0;
            while !stop_in.load(std::sync::atomic::Ordering::SeqCst) {
                let m = client.send(room, &format!("steady {i}")).await.unwrap_or_else(|e| panic!("steady {i}: {e}"));
                sent_in.lock().unwrap().push(m.id);
                i += 1;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        });
        Publisher { stop, sent, task }
    }

    pub fn count(&self) -> usize {
        self.sent.lock().unwrap().len()
    }

    /// Waits until `n` more sends were acknowledged.
    pub async fn sent_more(&self, n: usize) {
        let target = self.count() + n;
        let wait = async {
            while self.count() < target {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        };
        tokio::time::timeout(scaled(30.0), wait).await.expect("the publisher kept sending");
    }

    /// Stops and returns the ids of every acknowledged send.
    pub async fn stop(self) -> Vec<u64> {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        self.task.await.expect("the publisher's sends all succeeded");
        let sent = self.sent.lock().unwrap().clone();
        sent
    }
}

/// A signed-in client (the server dedupes by user and `client_msg_id`; a guest gets a
/// new user_id per connection) whose connection attempts go to a port nobody listens
/// on while the returned flag is set.
pub fn switchable(url: &str, token: String) -> (Client, Recorder, Arc<AtomicBool>) {
    let offline = Arc::new(AtomicBool::new(false));
    let (flag, url) = (offline.clone(), url.to_owned());
    let (client, events) = wschat::ClientBuilder::with_url_fn(move || {
        if flag.load(Ordering::SeqCst) {
            "ws://127.0.0.1:9/ws".into()
        } else {
            url.clone()
        }
    })
    .token(move || {
        let t = token.clone();
        async move { Ok(t) }
    })
    .backoff(Duration::from_millis(100), Duration::from_secs(1))
    .send_timeout(scaled(60.0))
    .connect();
    (client, Recorder::new(events), offline)
}
