//! Per-room message-id bookkeeping, with no I/O: client-side dedupe (an id at or
//! below the last one seen is dropped) and gap detection (an id above last + 1
//! means something was missed: re-join with `since`). The ids are counted in the room's
//! numbering, its `epoch`, kept with them: a numbering begun again from 1 is a new baseline.

use crate::protocol::MAX_WIRE_ID;

/// What to do with an incoming room message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// The next message: surface it.
    Deliver,
    /// Already seen (or will come again in a replay): drop it.
    Drop,
    /// Messages are missing: drop this one and re-join with `since` = the given id.
    Gap { since: u64 },
}

/// The id bookkeeping of one room.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RoomSeq {
    last: Option<u64>,
    /// The `epoch` of the latest `joined` (`None`: not known, a server of the release before):
    /// the numbering `last` is counted in, sent with it as a re-join's `since`.
    epoch: Option<String>,
    /// A re-join with `since` is in flight: its replay will bring what is missing.
    recovering: bool,
    /// The server said `recovered: false`: accept the next id, whatever it is
    /// (even a lower one: a server that lost its state numbers from 1 again;
    /// frames from before the re-join all came before its `joined`). Also after a
    /// first `joined` without a `last_id` that counts: the next id sets the position.
    accept_jump: bool,
}

impl RoomSeq {
    /// A room the app resumes (`Client::join_from`): `since`, the last id it saw, counted in
    /// `epoch` (`None`: not known). Its first join is written as a re-join with both, and
    /// answered as one: the replay after `since`, or `recovered: false` (in another epoch, a new
    /// baseline: [`RoomSeq::joined_in`]).
    pub fn resuming(since: u64, epoch: Option<&str>) -> RoomSeq {
        RoomSeq { last: Some(since), epoch: epoch.map(str::to_owned), ..RoomSeq::default() }
    }

    /// The last message id seen (what a re-join sends as `since`).
    pub fn last(&self) -> Option<u64> {
        self.last
    }

    /// The `epoch` of the latest `joined`, in which [`RoomSeq::last`] is counted (what a
    /// re-join sends with `since`); `None` when not known.
    pub fn epoch(&self) -> Option<&str> {
        self.epoch.as_deref()
    }

    /// A re-join with `since` was sent (after a reconnect or a gap).
    pub fn rejoining(&mut self) {
        self.recovering = true;
    }

    /// The server answered `joined`, with its `last_id` if it counts (`protocol::wire_id`), from
    /// a server that names no numbering (the release before epochs): [`RoomSeq::joined_in`]
    /// without an `epoch`.
    pub fn joined(&mut self, last_id: Option<u64>, recovered: Option<bool>) {
        self.joined_in(last_id, recovered, None);
    }

    /// The server answered `joined`, with its `last_id` if it counts (`protocol::wire_id`) and
    /// its `epoch` if it has one (`protocol::epoch`). Returns whether the room's numbering
    /// began again: a re-join with `since` > 0, counted in a known epoch, answered
    /// `recovered: false` in another one. The server replays nothing then (its ids name other
    /// messages than ours), and the room's ids are taken afresh: the position is the `joined`'s
    /// `last_id` (the next message is `last_id + 1`; without a `last_id` that counts, the next
    /// message sets it), so that nothing of the new numbering is dropped as seen in the old
    /// one, nor taken for a gap, and a later re-join's `since` is one of the new numbering.
    pub fn joined_in(&mut self, last_id: Option<u64>, recovered: Option<bool>, epoch: Option<&str>) -> bool {
        self.recovering = false;
        let changed = recovered == Some(false)
            && self.last.is_some_and(|since| since > 0)
            && matches!((self.epoch.as_deref(), epoch), (Some(was), Some(now)) if was != now);
        self.epoch = epoch.map(str::to_owned);
        if changed {
            self.last = last_id.filter(|id| *id <= MAX_WIRE_ID);
            self.accept_jump = self.last.is_none();
            return true;
        }
        match (recovered, self.last) {
            // A fresh join: only messages above `last_id` follow. Without a `last_id` that
            // counts, a first join keeps no position (the next message sets it: the server's
            // messages after `joined` are the room's next ones), a re-join keeps its own.
            (None, _) | (_, None) => {
                self.last = last_id.filter(|id| *id <= MAX_WIRE_ID).or(self.last);
                self.accept_jump = self.last.is_none();
            }
            // Every message after `since` follows in order.
            (Some(true), Some(_)) => {}
            (Some(false), Some(_)) => self.accept_jump = true,
        }
        false
    }

    /// Decides about message `id`, and records it when delivered.
    pub fn message(&mut self, id: u64) -> Verdict {
        if id > MAX_WIRE_ID {
            // Never a position (`protocol::wire_id`): such a message cannot be put in order
            // (and `u64::MAX` would overflow `last + 1`).
            return Verdict::Drop;
        }
        let Some(last) = self.last else {
            if !self.accept_jump {
                // Before the room's first `joined`: a message of an earlier membership, left
                // since (the server sends a room's messages to its members only), say the echo
                // of a send written before the `leave`. The `joined`'s `last_id` counts it: it
                // is no message of this membership, as in the JS and Python clients.
                return Verdict::Drop;
            }
            // The first after a `joined` without a `last_id` that counts: it sets the position.
            self.last = Some(id);
            self.accept_jump = false;
            return Verdict::Deliver;
        };
        if id == last + 1 || self.accept_jump {
            self.last = Some(id);
            self.accept_jump = false;
            Verdict::Deliver
        } else if id <= last || self.recovering {
            // Seen already, or the re-join in flight will replay it.
            Verdict::Drop
        } else {
            self.recovering = true;
            Verdict::Gap { since: last }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delivers_in_order_and_drops_duplicates() {
        let mut seq = RoomSeq::default();
        seq.joined(Some(3), None);
        assert_eq!(seq.message(4), Verdict::Deliver);
        assert_eq!(seq.message(5), Verdict::Deliver);
        assert_eq!(seq.message(5), Verdict::Drop);
        assert_eq!(seq.message(2), Verdict::Drop);
        assert_eq!(seq.last(), Some(5));
    }

    #[test]
    fn a_gap_asks_for_one_rejoin_and_the_replay_fills_it() {
        let mut seq = RoomSeq::default();
        seq.joined(Some(0), None);
        assert_eq!(seq.message(1), Verdict::Deliver);
        assert_eq!(seq.message(3), Verdict::Gap { since: 1 });
        // Further messages while the re-join is in flight come again in the replay.
        assert_eq!(seq.message(4), Verdict::Drop);
        seq.joined(Some(4), Some(true));
        assert_eq!(seq.message(2), Verdict::Deliver);
        assert_eq!(seq.message(3), Verdict::Deliver);
        assert_eq!(seq.message(4), Verdict::Deliver);
        assert_eq!(seq.message(6), Verdict::Gap { since: 4 });
    }

    #[test]
    fn unrecovered_rejoin_accepts_the_next_id() {
        let mut seq = RoomSeq::default();
        seq.joined(Some(10), None);
        seq.rejoining();
        seq.joined(Some(50), Some(false));
        assert_eq!(seq.message(40), Verdict::Deliver);
        assert_eq!(seq.message(41), Verdict::Deliver);
        assert_eq!(seq.message(43), Verdict::Gap { since: 41 });
    }

    /// An id past 2^53 - 1 (the largest the JS client can add 1 to) is never a position: it
    /// used to become one, and `u64::MAX` then overflowed `last + 1` at the next message (a
    /// panic that killed the driver task).
    #[test]
    fn ids_past_2_53_are_never_a_position() {
        let mut seq = RoomSeq::default();
        seq.joined(None, None); // a first join without a position: the next id sets it
        assert_eq!(seq.message(u64::MAX), Verdict::Drop);
        assert_eq!(seq.message(9_007_199_254_740_992), Verdict::Drop);
        assert_eq!(seq.message(3), Verdict::Deliver);
        assert_eq!(seq.message(u64::MAX), Verdict::Drop);
        assert_eq!(seq.message(4), Verdict::Deliver);
        assert_eq!(seq.last(), Some(4));
    }

    /// A message before the first `joined` is one of an earlier membership of the room (the
    /// echo of a send written before a `leave`, say): the `joined`'s `last_id` counts it. It was
    /// delivered, and set the position, as if it were the new membership's first message.
    #[test]
    fn a_message_before_the_first_joined_is_dropped() {
        let mut seq = RoomSeq::default();
        assert_eq!(seq.message(1), Verdict::Drop);
        assert_eq!(seq.last(), None);
        seq.joined(Some(1), None);
        assert_eq!(seq.message(2), Verdict::Deliver);
        // Without a `last_id` that counts, the first message after the `joined` sets the position.
        let mut seq = RoomSeq::default();
        assert_eq!(seq.message(7), Verdict::Drop);
        seq.joined(None, None);
        assert_eq!(seq.message(8), Verdict::Deliver);
        assert_eq!(seq.message(10), Verdict::Gap { since: 8 });
    }

    /// A resumed room starts at the app's `since`, in its `epoch`: a replay in that epoch goes
    /// on from `since` (nothing at or below it delivered again), another epoch is a new baseline.
    #[test]
    fn a_resumed_room_goes_on_from_since_in_its_epoch() {
        let mut seq = RoomSeq::resuming(5, Some("e1"));
        assert_eq!((seq.last(), seq.epoch()), (Some(5), Some("e1")));
        seq.rejoining(); // the first join is written with `since`
        assert!(!seq.joined_in(Some(7), Some(true), Some("e1")));
        assert_eq!(seq.message(5), Verdict::Drop);
        assert_eq!(seq.message(6), Verdict::Deliver);
        assert_eq!(seq.message(7), Verdict::Deliver);
        // Saved in an epoch the room no longer has: nothing replayed, the new numbering's
        // `last_id` is the position.
        let mut seq = RoomSeq::resuming(5, Some("old"));
        seq.rejoining();
        assert!(seq.joined_in(Some(2), Some(false), Some("new")));
        assert_eq!((seq.last(), seq.epoch()), (Some(2), Some("new")));
        assert_eq!(seq.message(3), Verdict::Deliver);
        // Without an epoch: `since` alone, answered as before epochs.
        let mut seq = RoomSeq::resuming(5, None);
        seq.rejoining();
        assert!(!seq.joined_in(Some(9), Some(false), Some("new")));
        assert_eq!(seq.message(8), Verdict::Deliver);
    }

    #[test]
    fn ids_that_started_again_are_followed() {
        let mut seq = RoomSeq::default();
        seq.joined(Some(10), None);
        seq.rejoining();
        // A restarted memory server answers with `last_id` = since and numbers from 1.
        seq.joined(Some(10), Some(false));
        assert_eq!(seq.message(1), Verdict::Deliver);
        assert_eq!(seq.message(2), Verdict::Deliver);
        assert_eq!(seq.message(2), Verdict::Drop);
    }

    /// A re-join counted in an epoch the room's numbering no longer has (a memory server
    /// restarted; the room unused past `ROOM_NUMBERING_TTL`) is answered `recovered: false` in a
    /// new epoch: the position becomes the new numbering's `last_id`, so its next message (5) is
    /// delivered and a replayed-looking lower id is seen, not a jump. Before epochs the position
    /// stayed the old `since` (2) with "accept the next id": a re-join before that message asked
    /// for `since` 2 of the new numbering (its 3 and 4 replayed as ours), and ids of the old
    /// numbering above the new `last_id` were taken for duplicates.
    #[test]
    fn a_new_epoch_is_a_new_baseline() {
        let mut seq = RoomSeq::default();
        assert!(!seq.joined_in(Some(0), None, Some("old")));
        assert_eq!(seq.epoch(), Some("old"));
        assert_eq!(seq.message(1), Verdict::Deliver);
        assert_eq!(seq.message(2), Verdict::Deliver);
        seq.rejoining();
        assert!(seq.joined_in(Some(4), Some(false), Some("new")));
        assert_eq!((seq.last(), seq.epoch()), (Some(4), Some("new")));
        assert_eq!(seq.message(4), Verdict::Drop);
        assert_eq!(seq.message(5), Verdict::Deliver);
        assert_eq!(seq.message(7), Verdict::Gap { since: 5 });
        // A new numbering behind the old one (fewer ids than our `since`): its next id is 2.
        let mut seq = RoomSeq::default();
        seq.joined_in(Some(10), None, Some("old"));
        seq.rejoining();
        assert!(seq.joined_in(Some(1), Some(false), Some("new")));
        assert_eq!(seq.message(2), Verdict::Deliver);
        // No `last_id` that counts: the next message sets the position.
        let mut seq = RoomSeq::default();
        seq.joined_in(Some(10), None, Some("old"));
        seq.rejoining();
        assert!(seq.joined_in(None, Some(false), Some("new")));
        assert_eq!(seq.last(), None);
        assert_eq!(seq.message(3), Verdict::Deliver);
        assert_eq!(seq.message(4), Verdict::Deliver);
    }

    /// Only a re-join with a known epoch and `since` > 0, answered `recovered: false` in another
    /// epoch, is a numbering begun again. The same epoch with `recovered: false` (history lost),
    /// a server naming no epoch (the release before, or a rollback to it), and a `since` of 0 (the
    /// server replays the new numbering from its first id) keep the rules as before.
    #[test]
    fn only_another_epoch_after_recovered_false_is_a_new_numbering() {
        let mut seq = RoomSeq::default();
        seq.joined_in(Some(10), None, Some("e"));
        seq.rejoining();
        assert!(!seq.joined_in(Some(50), Some(false), Some("e")));
        // Accepted whatever it is, as before.
        assert_eq!(seq.message(40), Verdict::Deliver);
        // Without epochs: as before, and the epoch is forgotten (none is sent).
        let mut seq = RoomSeq::default();
        seq.joined_in(Some(10), None, Some("e"));
        seq.rejoining();
        assert!(!seq.joined_in(Some(10), Some(false), None));
        assert_eq!(seq.epoch(), None);
        assert_eq!(seq.message(1), Verdict::Deliver);
        let mut seq = RoomSeq::default();
        seq.joined(Some(10), None);
        seq.rejoining();
        assert!(!seq.joined_in(Some(3), Some(false), Some("first")));
        assert_eq!(seq.epoch(), Some("first"));
        assert_eq!(seq.message(1), Verdict::Deliver);
        // `since` 0: the replay of the new numbering is every message, from 1.
        let mut seq = RoomSeq::default();
        seq.joined_in(Some(0), None, Some("old"));
        seq.rejoining();
        assert!(!seq.joined_in(Some(2), Some(true), Some("new")));
        assert_eq!(seq.message(1), Verdict::Deliver);
        assert_eq!(seq.message(2), Verdict::Deliver);
    }
}
