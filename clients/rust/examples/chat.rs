//! A terminal chat: joins a room, prints what happens in it, sends each stdin line.
//!
//!     cargo run --example chat -- ws://localhost:8080/ws?username=alice general
//!
//! Set `WSCHAT_TOKEN` to a JWT to sign in instead of joining as a guest.

use futures_util::StreamExt;
use tokio::io::{AsyncBufReadExt, BufReader};
use wschat::{Client, Event};

#[tokio::main]
async fn main() {
    let mut args = std::env::args().skip(1);
    let (Some(url), Some(room)) = (args.next(), args.next()) else {
        eprintln!("usage: chat <ws://host:port/ws[?username=name]> <room>");
        std::process::exit(2);
    };
    let mut builder = Client::builder(url);
    if let Ok(token) = std::env::var("WSCHAT_TOKEN") {
        builder = builder.token(move || {
            let token = token.clone();
            async move { Ok(token) }
        });
    }
    let (client, mut events) = builder.connect();

    let printer = tokio::spawn(async move {
        while let Some(event) = events.next().await {
            match event {
                Event::Message(m) => println!("[{}] {}: {}", m.room, m.from, m.text),
                Event::Dm(m) => println!("(dm) {}: {}", m.from, m.text),
                Event::Presence(p) => {
                    println!("* {} is {} in {}", p.user, if p.online() { "online" } else { "offline" }, p.room)
                }
                Event::Joined(j) if j.recovered == Some(false) => println!("* some messages in {} were lost", j.room),
                Event::Welcome { username, .. } => println!("* connected as {username}"),
                Event::UserChanged(w) => println!("* now {} (the rooms are joined again)", w.username),
                Event::Disconnected { code, reason, reconnect_in } => match reconnect_in {
                    Some(delay) => println!("* disconnected ({code:?} {reason}); reconnecting in {delay:.1?}"),
                    None => println!("* disconnected for good ({code:?} {reason})"),
                },
                Event::Error(e) => println!("* error: {e}"),
                _ => {}
            }
        }
    });

    match client.join(&room).await {
        Ok(joined) => {
            let names: Vec<_> = joined.users.iter().map(|u| u.username.as_str()).collect();
            println!("* joined {room} with {}", names.join(", "));
        }
        Err(e) => {
            eprintln!("cannot join {room}: {e}");
            std::process::exit(1);
        }
    }
    let mut lines = BufReader::new(tokio::io::stdin()).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        if line.trim().is_empty() {
            continue;
        }
        if let Err(e) = client.send(&room, &line).await {
            println!("* not sent ({}): {line}", e.code().unwrap_or("client"));
        }
    }
    client.close();
    let _ = printer.await;
}
