//! The outbox: sends not yet acknowledged, each with its `client_msg_id`, in the
//! order the app made them. Bounded; resent after a reconnect (the server
//! dedupes by `client_msg_id` and answers a resend with the original message);
//! persistable through [`OutboxStore`], so sends survive a restart of the app.

use serde::{Deserialize, Serialize};
use std::collections::{HashSet, VecDeque};
use std::time::Instant;

use crate::error::Error;

/// Where a send goes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Target {
    Room(String),
    Dm(String),
}

/// One unacknowledged send.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OutboxEntry {
    pub client_msg_id: String,
    pub target: Target,
    pub text: String,
}

/// Where the outbox is kept between runs of the app (a file, a database, ...).
///
/// `save` is called with the whole outbox after every change, from the client's
/// task: keep it quick (or hand the write to another thread).
pub trait OutboxStore: Send + Sync + 'static {
    /// The entries kept by the last run, oldest first.
    fn load(&self) -> Vec<OutboxEntry>;
    /// Replaces what is kept.
    fn save(&self, entries: &[OutboxEntry]);
}

/// The outbox was full: the app is sending faster than the server acknowledges.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OutboxFull;

#[derive(Debug)]
pub(crate) struct Pending {
    pub entry: OutboxEntry,
    /// The connection generation this entry was last written on (None: not yet).
    pub sent_on: Option<u64>,
    /// When it was last written.
    pub sent_at: Option<Instant>,
    /// Its room was left (or the user removed from it) while it was on the wire: it is never
    /// written again, and fails with this error (the room's) unless its echo comes.
    pub left: Option<Error>,
    /// Loaded from the [`OutboxStore`]: written, if ever, by an earlier run of the app, perhaps
    /// as another (guest) user id ([`Pending::echoed_by`]).
    pub restored: bool,
}

/// A room message or a DM carrying a `client_msg_id`: what decides whether it is the echo of
/// the pending send with that id ([`Pending::echoed_by`]).
#[derive(Debug, Clone, Copy)]
pub(crate) enum Echo<'a> {
    Message { room: &'a str, user_id: &'a str },
    Dm { to: &'a str, user_id: &'a str },
}

impl Pending {
    /// Whether `echo` is this send's echo, `own_ids` being every user id a `welcome` gave this
    /// client (a guest gets a new one per connection), as the JS client's `isEcho` and the
    /// Python client's `_is_echo`. A `client_msg_id` is unique per sender only (the server
    /// dedupes per user), and every member gets the sender's: another member's message (or
    /// another user's DM) with the same one is not ours, and taking it for the echo would drop
    /// a send never written. So: a send of that kind, to that room or reader, from a user this
    /// client has been. A room message restored from the store was written, if at all, by an
    /// earlier run, perhaps as another guest id, and a re-join's replay may bring that copy:
    /// any sender's in its room is taken for it. A DM has no such copy (it reaches only its
    /// sender's and its reader's connections, and no replay gives it back to its sender): its
    /// echo is always from this client's user, restored or not.
    pub fn echoed_by(&self, echo: Echo<'_>, own_ids: &HashSet<String>) -> bool {
        match (&self.entry.target, echo) {
            (Target::Room(room), Echo::Message { room: r, user_id }) => {
                room == r && (self.restored || own_ids.contains(user_id))
            }
            (Target::Dm(to), Echo::Dm { to: t, user_id }) => to == t && own_ids.contains(user_id),
            _ => false,
        }
    }
}

/// A bounded queue of sends, oldest first.
#[derive(Debug)]
pub(crate) struct Outbox {
    entries: VecDeque<Pending>,
    capacity: usize,
}

impl Outbox {
    pub fn new(capacity: usize) -> Self {
        Outbox { entries: VecDeque::new(), capacity }
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// [`Outbox::push`] of an entry loaded from the [`OutboxStore`] ([`Pending::restored`]),
    /// past the bound too: the store holds it, and an entry left out would be gone from the store
    /// at its next save (a run whose `outbox_capacity` is smaller than the one that saved it).
    pub fn restore(&mut self, entry: OutboxEntry) {
        self.entries.push_back(Pending { entry, sent_on: None, sent_at: None, left: None, restored: true });
    }

    pub fn push(&mut self, entry: OutboxEntry) -> Result<(), OutboxFull> {
        if self.entries.len() >= self.capacity {
            return Err(OutboxFull);
        }
        self.entries.push_back(Pending { entry, sent_on: None, sent_at: None, left: None, restored: false });
        Ok(())
    }

    /// Removes the entry with this `client_msg_id` (acknowledged or failed).
    pub fn remove(&mut self, client_msg_id: &str) -> Option<OutboxEntry> {
        self.remove_pending(client_msg_id).map(|p| p.entry)
    }

    /// [`Outbox::remove`], with what is known of its writes.
    pub fn remove_pending(&mut self, client_msg_id: &str) -> Option<Pending> {
        let at = self.entries.iter().position(|p| p.entry.client_msg_id == client_msg_id)?;
        self.entries.remove(at)
    }

    pub fn get(&self, client_msg_id: &str) -> Option<&Pending> {
        self.entries.iter().find(|p| p.entry.client_msg_id == client_msg_id)
    }

    pub fn get_mut(&mut self, client_msg_id: &str) -> Option<&mut Pending> {
        self.entries.iter_mut().find(|p| p.entry.client_msg_id == client_msg_id)
    }

    /// Entries written on connection `generation` and not yet acknowledged.
    pub fn in_flight(&self, generation: u64) -> usize {
        self.entries.iter().filter(|p| p.sent_on == Some(generation)).count()
    }

    /// Entries not yet written on connection `generation` for which `ready`
    /// holds, oldest first, as long as at most `window` entries are then written
    /// and unacknowledged on it; they are marked as written.
    pub fn take_unsent(
        &mut self,
        generation: u64,
        now: Instant,
        window: usize,
        mut ready: impl FnMut(&OutboxEntry) -> bool,
    ) -> Vec<OutboxEntry> {
        let mut in_flight = self.in_flight(generation);
        let mut out = Vec::new();
        for pending in self.entries.iter_mut() {
            if in_flight >= window {
                break;
            }
            if pending.sent_on != Some(generation) && pending.left.is_none() && ready(&pending.entry) {
                pending.sent_on = Some(generation);
                pending.sent_at = Some(now);
                out.push(pending.entry.clone());
                in_flight += 1;
            }
        }
        out
    }

    /// Whether an entry not yet written on connection `generation` is `ready`.
    pub fn has_unsent(&self, generation: u64, ready: impl Fn(&OutboxEntry) -> bool) -> bool {
        self.entries.iter().any(|p| p.sent_on != Some(generation) && p.left.is_none() && ready(&p.entry))
    }

    /// Takes out the entries of a left room (`Pending::left`) written at or before `before`
    /// (`None`: all of them), each with its room's error.
    pub fn take_left(&mut self, before: Option<Instant>) -> Vec<(OutboxEntry, Error)> {
        let due = |p: &Pending| p.left.is_some() && before.is_none_or(|b| p.sent_at.is_some_and(|at| at <= b));
        let mut taken = Vec::new();
        let mut kept = VecDeque::with_capacity(self.entries.len());
        for pending in self.entries.drain(..) {
            if due(&pending) {
                let error = pending.left.clone().expect("a left entry");
                taken.push((pending.entry, error));
            } else {
                kept.push_back(pending);
            }
        }
        self.entries = kept;
        taken
    }

    /// Marks entries written at or before `before` and still unacknowledged as
    /// unsent (their echo may be lost: the server dedupes the resend); not those of a
    /// left room, never written again (`take_left`). Returns how many were marked, and
    /// how many others stay written, so still awaited (their echo, or a left room's
    /// `take_left`).
    pub fn expire_sent(&mut self, before: Instant) -> (usize, usize) {
        let (mut expired, mut waiting) = (0, 0);
        for pending in self.entries.iter_mut() {
            match pending.sent_at {
                Some(at) if pending.sent_on.is_some() && pending.left.is_none() && at <= before => {
                    pending.sent_on = None;
                    expired += 1;
                }
                Some(_) if pending.sent_on.is_some() => waiting += 1,
                _ => {}
            }
        }
        (expired, waiting)
    }

    pub fn snapshot(&self) -> Vec<OutboxEntry> {
        self.entries.iter().map(|p| p.entry.clone()).collect()
    }
}

/// A new `client_msg_id`: 128 random bits, so ids from different runs never collide.
pub(crate) fn new_client_msg_id() -> String {
    format!("{:016x}{:016x}", fastrand::u64(..), fastrand::u64(..))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(id: &str, room: &str) -> OutboxEntry {
        OutboxEntry { client_msg_id: id.into(), target: Target::Room(room.into()), text: "t".into() }
    }

    #[test]
    fn is_bounded() {
        let mut outbox = Outbox::new(2);
        outbox.push(entry("a", "r")).unwrap();
        outbox.push(entry("b", "r")).unwrap();
        assert_eq!(outbox.push(entry("c", "r")), Err(OutboxFull));
        assert_eq!(outbox.remove("a").unwrap().client_msg_id, "a");
        outbox.push(entry("c", "r")).unwrap();
        assert_eq!(outbox.len(), 2);
        assert!(outbox.remove("zz").is_none());
        // What the store kept is restored whole, past the bound (a run with a smaller
        // `outbox_capacity` than the one that saved it): those past it were dropped, and gone
        // from the store at its next save. The bound holds for new sends.
        let mut restored = Outbox::new(2);
        for id in ["x", "y", "z"] {
            restored.restore(entry(id, "r"));
        }
        assert_eq!(restored.len(), 3);
        assert_eq!(restored.push(entry("n", "r")), Err(OutboxFull));
    }

    #[test]
    fn unsent_entries_go_out_once_per_connection_in_order() {
        let mut outbox = Outbox::new(10);
        outbox.push(entry("a", "r1")).unwrap();
        outbox.push(entry("b", "r2")).unwrap();
        outbox.push(entry("c", "r1")).unwrap();
        let only_r1 = |e: &OutboxEntry| e.target == Target::Room("r1".into());
        let ids = |v: Vec<OutboxEntry>| v.into_iter().map(|e| e.client_msg_id).collect::<Vec<_>>();
        let t0 = Instant::now();
        assert_eq!(ids(outbox.take_unsent(1, t0, 10, only_r1)), ["a", "c"]);
        assert!(outbox.take_unsent(1, t0, 10, only_r1).is_empty());
        assert_eq!(ids(outbox.take_unsent(1, t0, 10, |_| true)), ["b"]);
        // A new connection resends everything still unacknowledged.
        outbox.remove("c");
        assert_eq!(ids(outbox.take_unsent(2, t0, 10, |_| true)), ["a", "b"]);
    }

    #[test]
    fn at_most_a_window_of_entries_is_in_flight() {
        let mut outbox = Outbox::new(10);
        for id in ["a", "b", "c", "d"] {
            outbox.push(entry(id, "r")).unwrap();
        }
        let ids = |v: Vec<OutboxEntry>| v.into_iter().map(|e| e.client_msg_id).collect::<Vec<_>>();
        let t0 = Instant::now();
        assert_eq!(ids(outbox.take_unsent(1, t0, 2, |_| true)), ["a", "b"]);
        assert!(outbox.take_unsent(1, t0, 2, |_| true).is_empty());
        assert_eq!(outbox.in_flight(1), 2);
        let on = |outbox: &mut Outbox, id: &str| outbox.get_mut(id).and_then(|p| p.sent_on);
        assert_eq!((on(&mut outbox, "a"), on(&mut outbox, "c")), (Some(1), None));
        // An acknowledgement frees a place; a wider window takes more.
        outbox.remove("a");
        assert_eq!(ids(outbox.take_unsent(1, t0, 2, |_| true)), ["c"]);
        assert_eq!(ids(outbox.take_unsent(1, t0, 4, |_| true)), ["d"]);
        // A new connection has nothing in flight.
        assert_eq!(ids(outbox.take_unsent(2, t0, 1, |_| true)), ["b"]);
        assert!(outbox.has_unsent(2, |_| true) && !outbox.has_unsent(2, |e| e.client_msg_id == "b"));
    }

    #[test]
    fn unacknowledged_entries_expire_for_a_resend() {
        let mut outbox = Outbox::new(10);
        outbox.push(entry("a", "r")).unwrap();
        outbox.push(entry("b", "r")).unwrap();
        let t0 = Instant::now();
        let t1 = t0 + std::time::Duration::from_secs(5);
        outbox.take_unsent(1, t0, 10, |_| true);
        outbox.push(entry("c", "r")).unwrap();
        outbox.take_unsent(1, t1, 10, |_| true);
        assert_eq!(outbox.expire_sent(t0), (2, 1));
        let again: Vec<_> = outbox.take_unsent(1, t1, 10, |_| true).into_iter().map(|e| e.client_msg_id).collect();
        assert_eq!(again, ["a", "b"]);
        assert_eq!(outbox.expire_sent(t0), (0, 3));
    }

    #[test]
    fn entries_of_a_left_room_are_never_written_again_and_are_taken_out_with_their_error() {
        let mut outbox = Outbox::new(10);
        for id in ["a", "b", "c"] {
            outbox.push(entry(id, "r")).unwrap();
        }
        let t0 = Instant::now();
        let t1 = t0 + std::time::Duration::from_secs(5);
        outbox.take_unsent(1, t0, 1, |_| true);
        outbox.take_unsent(1, t1, 2, |_| true);
        let left = Error::local("not_in_room", "left r".into());
        for id in ["a", "b"] {
            outbox.get_mut(id).unwrap().left = Some(left.clone());
        }
        // Neither expired for a resend (still awaited: their echo, or their time to fail)
        // nor written on a new connection.
        assert_eq!(outbox.expire_sent(t1), (0, 2));
        let ids = |v: Vec<OutboxEntry>| v.into_iter().map(|e| e.client_msg_id).collect::<Vec<_>>();
        assert_eq!(ids(outbox.take_unsent(2, t1, 10, |_| true)), ["c"]);
        assert!(!outbox.has_unsent(3, |e| e.client_msg_id != "c"));
        // Out once written long enough ago, or all of them.
        let taken = outbox.take_left(Some(t0));
        assert_eq!(taken, [(entry("a", "r"), left.clone())]);
        assert_eq!(outbox.take_left(None), [(entry("b", "r"), left)]);
        assert_eq!(ids(outbox.take_left(None).into_iter().map(|(e, _)| e).collect()), Vec::<String>::new());
        assert_eq!(outbox.snapshot(), [entry("c", "r")]);
    }

    /// As the JS client's `isEcho` and the Python client's `_is_echo`: a `client_msg_id` is
    /// unique per sender only, so a room message or DM carrying it is the echo of the pending
    /// send only if it is of that kind, in that room or to that reader, and from a user this
    /// client has been; a room send restored from the store takes any sender's copy in its room
    /// (an earlier run, as another guest id, may have written it), a restored DM does not.
    #[test]
    fn only_an_echo_of_the_send_s_kind_target_and_sender_is_its_echo() {
        let own: HashSet<String> = ["u1".to_owned(), "guest-old".to_owned()].into();
        let mut outbox = Outbox::new(10);
        outbox.push(entry("room", "r")).unwrap();
        outbox
            .push(OutboxEntry { client_msg_id: "dm".into(), target: Target::Dm("u9".into()), text: "t".into() })
            .unwrap();
        outbox.restore(entry("old-room", "r"));
        outbox.restore(OutboxEntry {
            client_msg_id: "old-dm".into(),
            target: Target::Dm("u9".into()),
            text: "t".into(),
        });
        let msg = |room, user_id| Echo::Message { room, user_id };
        let dm = |to, user_id| Echo::Dm { to, user_id };
        let cases = [
            ("room", msg("r", "u1"), true),
            ("room", msg("r", "guest-old"), true), // a user this client has been
            ("room", msg("r", "mallory"), false),  // another member's own send
            ("room", msg("elsewhere", "u1"), false),
            ("room", dm("u9", "u1"), false),
            ("dm", dm("u9", "u1"), true),
            ("dm", dm("u1", "mallory"), false), // another user's DM to us
            ("dm", dm("u1", "u1"), false),      // ours, to another reader
            ("dm", msg("r", "u1"), false),
            ("old-room", msg("r", "mallory"), true), // an earlier run's copy, any sender's
            ("old-room", msg("elsewhere", "u1"), false),
            ("old-room", dm("u9", "u1"), false),
            ("old-dm", dm("u9", "u1"), true),
            ("old-dm", dm("u1", "mallory"), false),
            ("old-dm", dm("u9", "mallory"), false),
        ];
        let wrong: Vec<_> =
            cases.iter().filter(|(id, echo, want)| outbox.get(id).unwrap().echoed_by(*echo, &own) != *want).collect();
        assert!(wrong.is_empty(), "{wrong:#?}");
        assert!(!outbox.get("room").unwrap().restored && outbox.get("old-dm").unwrap().restored);
    }

    #[test]
    fn entries_serialize_for_persistence() {
        let e = OutboxEntry { client_msg_id: "x".into(), target: Target::Dm("u".into()), text: "hi".into() };
        let json = serde_json::to_string(&e).unwrap();
        assert_eq!(json, r#"{"client_msg_id":"x","target":{"dm":"u"},"text":"hi"}"#);
        assert_eq!(serde_json::from_str::<OutboxEntry>(&json).unwrap(), e);
        assert_ne!(new_client_msg_id(), new_client_msg_id());
        assert_eq!(new_client_msg_id().len(), 32);
    }
}
