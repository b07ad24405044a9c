//! A client for the wschat WebSocket chat server, with the same guarantees as
//! the TypeScript and Python libraries: a connection state machine, reconnects
//! with jittered backoff that honour the server's close codes, re-joins with
//! `since` after every reconnect, gap detection and dedupe by message id, and an
//! outbox of sends (each with a `client_msg_id`) that survives reconnects.
//!
//! ```no_run
//! # async fn demo() -> Result<(), wschat::Error> {
//! use futures_util::StreamExt;
//! let (client, mut events) = wschat::Client::builder("ws://localhost:8080/ws?username=alice").connect();
//! client.join("general").await?;
//! client.send("general", "Hello!").await?;
//! while let Some(event) = events.next().await {
//!     if let wschat::Event::Message(m) = event {
//!         println!("[{}] {}: {}", m.room, m.from, m.text);
//!     }
//! }
//! # Ok(()) }
//! ```

#![warn(missing_debug_implementations)] // an app's `#[derive(Debug)]` may hold any public type

/// The README's Rust examples, compiled by `cargo test` as doc-tests so they keep up with the
/// API (`rust,no_run`: built, not run; `rust,ignore`: a fragment, neither).
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;

mod backoff;
mod client;
mod driver;
mod error;
mod outbox;
mod pacer;
pub mod protocol;
mod rooms;
mod token;

pub use backoff::Backoff;
pub use client::{
    Acked, Client, ClientBuilder, Event, Events, HistoryPage, Joined, RoomPosition, TokenFuture, Welcome,
};
pub use error::{ConnectionState, Error, RoomState};
pub use outbox::{OutboxEntry, OutboxStore, Target};
pub use protocol::{ChatMessage, DirectMessage, Presence, Typing, User};
pub use rooms::{RoomSeq, Verdict};

/// The TLS configuration [`ClientBuilder::tls_connector`] takes: `Connector::NativeTls` (a
/// `native_tls::TlsConnector`, crate feature `native-tls`) or `Connector::Rustls` (an
/// `Arc<rustls::ClientConfig>`, a `rustls-tls-*` feature); both crates are re-exported here.
/// tokio-tungstenite's own type, re-exported so that an app needs not name its version.
#[cfg(feature = "__tls")]
pub use tokio_tungstenite::Connector;

/// The native-tls crate tokio-tungstenite connects with (crate feature `native-tls`), to build a
/// [`Connector::NativeTls`]: `native_tls::TlsConnector::builder().add_root_certificate(..)`.
#[cfg(feature = "native-tls")]
pub use native_tls;

/// The rustls crate tokio-tungstenite connects with (a `rustls-tls-*` feature), to build a
/// [`Connector::Rustls`] (rustls wants a crypto provider: its `ring` or `aws-lc-rs` feature,
/// turned on in the app's `Cargo.toml`, or one installed as the process's default).
#[cfg(any(feature = "rustls-tls-native-roots", feature = "rustls-tls-webpki-roots"))]
pub use rustls;
