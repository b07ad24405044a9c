"""Persistence around a message store: every room message and DM is committed first.

:class:`DurableMessageStore` wraps the memory or Redis message store. With it,
the database (``wschat.persistence``) is the authority for ids, and the inner
store keeps only the in-memory window and delivery:

1. ``post_room`` hands the message to the worker's group-commit writer and
   waits; the id is taken inside the committing transaction (no gap, no
   duplicate, across workers and pods);
2. after COMMIT, the writer greenlet publishes the batch in id order through
   the inner store (:meth:`~wschat.stores.base.MessageStore.publish_stored`);
   only then does the sender see its echo, the acknowledgement. So an
   acknowledged message is always in the database.

With Redis, two workers may commit ids 5 and 6 and reach Redis in the other
order: the publish script holds 6 until 5 is published. If 5's worker died
between its commit and its publish, :meth:`_release_held` fetches 5 from the
database after :attr:`HOLD_TIMEOUT` and publishes it.

Reads fall back to the database when the window does not reach far enough:
``history`` with ``before``, ``join`` with ``since``, and sequences after a
restart (or after Redis lost a room's keys) continue from the database.
"""

from __future__ import annotations

import logging

import gevent

from ..config import ConfigError
from ..persistence import (
    Arrival, DatabaseBusy, DatabaseUnavailable, DmPost, DmsDelivered, GroupCommitWriter, Job,
    MessageLog, RoomPost, SequenceFloor, SQLiteLog,
)
from ..protocol import MessageDraft, addressed_to, message_id_of
from ..ratelimit import Charge
from ..telemetry import Metrics
from .base import (
    API_USER, HELD, REPLAY_MAX_BYTES, STALE, UNHEARD, InboxFull, MessageStore, Posted, Replay,
    Stored, Unavailable, Unheard, User, run_to,
)

log = logging.getLogger("wschat.persistence")

REPLAY_LIMIT = 1000  # a `since` further behind than this gets recovered: false (reload)
# ... and one whose replay would come to more bytes than REPLAY_MAX_BYTES (what one join
# makes the worker read and hold until the client has read it): 1,000 messages at the
# 64 KiB frame limit would be 64 MB per joiner. The same bound as the memory and Redis
# stores' replays (wschat.stores.base), imported here under its old name too.
MAX_KEPT_DMS = 1000  # DMs kept for one offline user; past it the sender gets `inbox_full`
# ... of which one sender (all guests together) may have this many, so that no one sender
# can fill a user's inbox and have everyone else's DMs refused; the server API is bounded
# by MAX_KEPT_DMS only.
MAX_KEPT_DMS_PER_SENDER = 100
PRIMED_MAX = 100_000
UNHEARD_DM = ("stored, but not delivered (a worker of the recipient's or the sender's is not "
              "subscribed); retry")


class DurableMessageStore(MessageStore):
    HOLD_TIMEOUT = 1.0  # how long a held id waits for its predecessor before the log fills in
    # A room whose window lost its sequence gets at most this many missing messages
    # republished from the log (its members had the older ones live).
    FILL_LIMIT = 1000
    FILL_PAGE = 100  # missing messages are read from the log and published this many at a time
    # A window that knows nothing of a room the log has messages of continues from the log
    # with this many of its last ones published again (see _continue_from_log).
    REFILL = 100

    def __init__(self, inner: MessageStore, message_log: MessageLog, metrics: Metrics | None = None,
                 replay_limit: int = REPLAY_LIMIT,
                 replay_max_bytes: int = REPLAY_MAX_BYTES) -> None:
        self.inner = inner
        self.log = message_log
        self._metrics = metrics
        self._replay_limit = replay_limit
        self._replay_max_bytes = replay_max_bytes
        self.max_kept_dms = MAX_KEPT_DMS
        self.max_kept_dms_per_sender = MAX_KEPT_DMS_PER_SENDER
        self._primed: set[str] = set()
        self._dms_primed = False
        self._releasing: dict[str, int] = {}  # room -> highest held id a releaser waits for
        self._epoch: str | None = None  # the log's, read once
        self.writer = GroupCommitWriter(message_log, self._publish_committed, self._count_error,
                                        self._time_commit)

    def start(self) -> None:
        """Connect and migrate. A PostgreSQL server that is not up yet is waited for
        (the worker runs, not ready); a SQLite file that cannot be opened is a
        configuration error and stops start-up, but one whose write lock another
        process holds is waited for like a PostgreSQL that is not up yet."""
        self.writer.start()
        if (isinstance(self.log, SQLiteLog) and not self.writer.ready
                and not isinstance(self.writer.last_failure, DatabaseBusy)):
            self.close()
            raise ConfigError(f"DATABASE_URL: cannot use {self.log.url_for_logs}: "
                              f"{self.writer.last_error}")

    def _count_error(self) -> None:
        if self._metrics is not None:
            self._metrics.store_error("database")

    def _time_commit(self, seconds: float) -> None:
        if self._metrics is not None:
            self._metrics.store_seconds("database", seconds)

    # -- writes --------------------------------------------------------------------------
    def post_room(self, room: str, user_id: str, draft: MessageDraft,
                  charge: Charge = ()) -> Posted:  # charges_posts is False: never given
        self.check_delivering()
        if room not in self._primed or user_id == API_USER:
            # Not only a join: a post no join came before (/api/publish) must not take
            # an id the window's store issued before persistence was on. And the server
            # API's posts, the only ones to a room nobody is in, every time: the window
            # forgets such a room's ids ROOM_NUMBERING_TTL after its first post (no leave
            # unprimes it; the memory window sooner, over MEMORY_HISTORY_BYTES), and
            # its next post would be held behind the ids the window forgot (one lookup of
            # the window's sequence; the log is read only when the window lost it).
            self._last_id(room)
        job = RoomPost(room=room, user_id=user_id, draft=draft)
        self.writer.submit(job)
        if job.duplicate:
            self._publish_if_missing(room, job.msg_id)
        return Posted(job.msg_id, job.event, job.duplicate)

    def check_delivering(self) -> None:
        # Ids come from the database here, but a worker still resubscribing would
        # miss its own rooms' messages: the inner store's guard serves this path too.
        self.inner.check_delivering()

    def _publish_if_missing(self, room: str, msg_id: int) -> None:
        """A retry of a message committed but never published (Redis failed right after
        the commit, its worker died): publish it from the log now, not only when a
        later message of the room finds the gap. If the window cannot tell (Unavailable),
        the retry is refused as such: answered as stored, it would get no echo (the
        stream brings it, as far as the sender's connection can tell) while nothing
        published it, and its sender would not try again."""
        if self.inner.last_id(room) < msg_id:
            self._watch_held(room, msg_id)

    def post_dm(self, sender_id: str, recipient_id: str, draft: MessageDraft,
                recipient_online: bool | None = True, charge: Charge = ()) -> Posted:
        self.check_delivering()
        if not self._dms_primed:
            self._prime_dms()
        # The bound is counted in the transaction that would keep the DM, so concurrent
        # senders cannot take the inbox past it; a retry of a stored DM is not counted.
        job = DmPost(sender_id=sender_id, recipient_id=recipient_id, draft=draft,
                     delivered=bool(recipient_online),
                     keep_at_most=None if recipient_online else self.max_kept_dms,
                     keep_from_sender_at_most=None if sender_id == API_USER
                     else self.max_kept_dms_per_sender)
        self.writer.submit(job)
        if job.inbox_full:
            # Refused where the sender can see it, never dropped later.
            raise InboxFull(f"{recipient_id} has too many undelivered direct messages (at "
                            f"most {self.max_kept_dms}, {self.max_kept_dms_per_sender} of "
                            "them from one sender); try again once they have connected")
        if job.duplicate and addressed_to(job.event) == recipient_id:
            self._deliver_again(job, bool(recipient_online))
            return Posted(job.msg_id, job.event, True, redelivered=True)
        return Posted(job.msg_id, job.event, job.duplicate)

    def deliver_kept(self, recipient_id: str, posted: Posted) -> None:
        outcome, = self.inner.publish_stored([Stored(
            posted.msg_id, posted.event, None, recipient_id, recipient_id)])
        if outcome == UNHEARD:
            raise Unavailable("a worker of the recipient's is not subscribed")

    def _prime_dms(self) -> None:
        """DM ids the window's store issued before persistence was on (Redis keeps its
        DM sequence): the log continues above them, since clients drop a DM whose id
        they have. Once per worker; a floor is only a lower bound."""
        issued = self.inner.dm_last_id()
        if issued:
            self.writer.submit(SequenceFloor(room=None, at_least=issued))
        self._dms_primed = True

    def _deliver_again(self, job: DmPost, recipient_online: bool) -> None:
        """A retry of a stored DM: publish it again. Its first publish may never have
        happened (Redis failed after COMMIT, the commit's reply was lost, or a worker of
        the sender's was not subscribed: UNHEARD), and the log cannot tell; DM ids are
        unique, so a connection that had it drops the copy. Recipient offline: to the
        sender's connections only; the log keeps it for the recipient's next connection,
        in the retry's transaction."""
        outcome, = self.inner.publish_stored([Stored(
            job.msg_id, job.event, None, job.sender_id,
            job.recipient_id if recipient_online else "")])
        if outcome == UNHEARD:
            raise Unheard(UNHEARD_DM)

    def user_arrived(self, user: User) -> tuple[list[bytes], int] | None:
        job = Arrival(user_id=user.user_id, username=user.username)
        self.writer.submit(job)
        return job.backlog, job.kept

    def kept_dms(self, user_id: str, after_id: int) -> list[bytes]:
        return self.log.kept_dms(user_id, after_id)

    def dms_delivered(self, user_id: str, up_to: int) -> None:
        self.writer.submit(DmsDelivered(user_id=user_id, up_to=up_to))

    def keeps_dms_for(self, user_id: str) -> bool:
        return self.log.knows_user(user_id)

    def _publish_committed(self, batch: list[Job]) -> None:
        """Runs in the writer greenlet right after COMMIT, batches in commit order."""
        fresh: list[tuple[Job, Stored]] = []
        for job in batch:
            if isinstance(job, RoomPost) and not job.duplicate:
                fresh.append((job, Stored(job.msg_id, job.event, job.room, job.user_id)))
            elif isinstance(job, DmPost) and not job.duplicate and not job.inbox_full:
                fresh.append((job, Stored(job.msg_id, job.event, None, job.sender_id,
                                          job.recipient_id if job.delivered else "")))
        if not fresh:
            return
        try:
            outcomes = self.inner.publish_stored([s for _, s in fresh])
        except Unavailable as exc:
            # Stored but not delivered: the sender is told to retry (with its
            # client_msg_id it gets the stored message back); the room catches up
            # when the next message there releases the gap from the log.
            for job, _ in fresh:
                job.error = Unavailable(f"stored, but not delivered ({exc}); retry")
            return
        for (job, stored), outcome in zip(fresh, outcomes, strict=True):
            if outcome == UNHEARD:
                # Nobody got it, and a DM has no history to catch it up from: the
                # sender is told to retry (the retry publishes it again, _deliver_again).
                job.error = Unheard(UNHEARD_DM)
            elif outcome == HELD and stored.room is not None:
                self._watch_held(stored.room, stored.msg_id)
            elif outcome == STALE and stored.room is not None:
                log.warning("room %s: message %d committed after its window moved past it "
                            "(the shared store lost the room's keys?); it is in the database, "
                            "and was published from there unless %d or more came after it",
                            stored.room, stored.msg_id, self.REFILL)

    def _watch_held(self, room: str, msg_id: int) -> None:
        waiting = self._releasing.get(room)
        self._releasing[room] = max(waiting or 0, msg_id)
        if waiting is None:
            gevent.spawn_later(self.HOLD_TIMEOUT, self._release_held, room)

    def _release_held(self, room: str, once: bool = False) -> None:
        """Publish, from the log, what a dead or slow worker committed but never published:
        every message between the window's last id and the highest held one, in order,
        :attr:`FILL_PAGE` at a time (so that the worker holds one page, not the whole gap).
        None the log holds is skipped: the members get them all. Ids the log no longer
        holds were deleted (retention: ids are taken in the committing transaction, so a
        later id committed means this one was too) and are gone for good: the window's
        sequence moves past them, with one warning, rather than waiting for them forever.
        The window then has a hole there, which :meth:`since` does not call complete.
        ``once``: at shutdown, one pass that gives up rather than waits."""
        attempt = 0
        while True:
            try:
                published = self.inner.last_id(room)
                # The target read after that look, with no yield before the pop: an id held
                # during the look raised it (_watch_held starts no second releaser while
                # this one runs), and this one must not end without it.
                target = self._releasing.get(room, 0)
                if published >= target:
                    self._releasing.pop(room, None)
                    return
                if published == 0 and target - 1 > self.FILL_LIMIT:
                    # The window knows nothing of the room (the shared store lost its keys):
                    # it has no hole to leave, and its members had the older ones live.
                    self.inner.raise_sequence(room, target - 1 - self.FILL_LIMIT)
                    published = target - 1 - self.FILL_LIMIT
                # up to the target itself: it may have been committed and never published
                stored = [e for e in self.log.after(room, published,
                                                    min(target - published, self.FILL_PAGE))
                          if (message_id_of(e) or 0) <= target]
                first = (message_id_of(stored[0]) or 0) if stored else target + 1
                if first > published + 1:
                    log.warning("room %s: messages %d to %d were committed and never published, "
                                "and the database no longer holds them (deleted by retention?); "
                                "moving past them (`since` below %d answers recovered: false)",
                                room, published + 1, first - 1, first)
                    self.inner.raise_sequence(room, first - 1)
                if stored:
                    log.warning("room %s: publishing %d messages committed by a worker that "
                                "did not publish them", room, len(stored))
                    self.inner.publish_stored([Stored(message_id_of(e) or 0, e, room)
                                               for e in stored])
                if self.inner.last_id(room) > published:
                    attempt = 0
                    gevent.sleep(0)  # the next page at once, after the other greenlets
                    continue
            except Unavailable as exc:
                log.warning("room %s: cannot release held messages yet (%s)", room, exc)
            if once:
                return
            attempt += 1
            gevent.sleep(min(self.HOLD_TIMEOUT * attempt, 10.0))

    # -- reads ---------------------------------------------------------------------------
    def _last_id(self, room: str) -> int:
        """The room's last id, reconciling the window's sequence with the log's once."""
        last = self.inner.last_id(room)
        if last and room in self._primed:
            return last
        logged = self.log.last_id(room)
        if last == 0 and logged:
            self._continue_from_log(room, logged)
            last = logged
        elif last > logged:
            # ids issued before persistence was on: the log must continue above them
            self.writer.submit(SequenceFloor(room=room, at_least=last))
        if len(self._primed) >= PRIMED_MAX:
            self._primed.clear()
        self._primed.add(room)
        return max(last, logged)

    def _continue_from_log(self, room: str, logged: int) -> None:
        """The window knows nothing of a room the log has messages of, up to ``logged``:
        its sequence expired (``ROOM_NUMBERING_TTL``: a window that lost only the history,
        ``ROOM_TTL``, still knows the last id, and reads go to the log), Redis lost it, the
        memory window gave it up to its bound, or a worker committed the room's
        first messages and died before publishing them. The window continues from the
        log's last :attr:`REFILL` messages, published again (a member's worker drops
        those it delivered already, the hub; with Redis, another worker doing the same
        finds them published), not from ``logged`` alone: raised past them, a message
        committed and never published was published by nobody (its held successors
        neither), and its sender's retry was acknowledged with it while no member got it.
        The refilled window serves ``since`` and ``history`` again, too."""
        floor = max(0, logged - self.REFILL)
        self.inner.raise_sequence(room, floor)
        tail = [e for e in self.log.after(room, floor, self.REFILL)
                if (message_id_of(e) or 0) <= logged]
        # Rows retention deleted leave a hole: only the run up to `logged` after it.
        tail, _ = run_to(tail, floor, logged)
        first = (message_id_of(tail[0]) or 0) if tail else logged + 1
        if first - 1 > floor:
            self.inner.raise_sequence(room, first - 1)
        if tail:
            self.inner.publish_stored([Stored(message_id_of(e) or 0, e, room) for e in tail])

    def last_id(self, room: str) -> int:
        try:
            return self._last_id(room)
        except DatabaseUnavailable as exc:
            log.warning("room %s: last id from memory only (%s)", room, exc)
            return self.inner.last_id(room)

    def recent(self, room: str, limit: int, before: int | None = None) -> list[bytes]:
        held = self.inner.recent(room, limit, before)
        if len(held) >= limit:
            return held
        oldest = message_id_of(held[0]) if held else before
        if oldest == 1:
            return held
        return self.log.before(room, oldest, limit - len(held)) + held

    def since(self, room: str, after_id: int) -> Replay:
        """From the window if it holds everything after ``after_id``, else from the log:
        at most :data:`REPLAY_LIMIT` messages and :data:`REPLAY_MAX_BYTES`, read a page
        bounded by both; further behind is ``recovered: false`` (the client pages back
        with ``history``). Also from the log while this worker holds messages of the
        room committed and not yet published (:meth:`_watch_held`): a member leaving
        is sent what was accepted before its leave from here (Chat._send_in_flight),
        its own held message among them, whose echo it would never get otherwise."""
        try:
            last = self._last_id(room)
            replay = self.inner.since(room, after_id)
            # every id from after_id + 1 to the window's last (run_to), none held here
            if replay.complete and room not in self._releasing:
                return replay
            if after_id > last:
                return Replay([], False)  # ids this server never issued
            stored = self.log.after(room, after_id, self._replay_limit + 1,
                                    self._replay_max_bytes)
        except DatabaseUnavailable as exc:
            log.warning("room %s: recovery from memory only (%s)", room, exc)
            return self.inner.since(room, after_id)
        if len(stored) > self._replay_limit or sum(map(len, stored)) > self._replay_max_bytes:
            return Replay([], False)
        # Rows deleted by retention (or ids the log never had: issued before persistence
        # was on) leave a hole: not recovered, never a gap the client is not told of.
        return Replay(stored, _unbroken(stored, after_id) and after_id + len(stored) >= last)

    def epoch(self, room: str) -> str:
        """The database's, every room's: its ids never start again while it lives (nor
        after Redis lost its data, as the window's would)."""
        if self._epoch is None:
            epoch = self.log.epoch()  # DatabaseUnavailable: the join answers unavailable
            if epoch is None:  # not migrated yet: the worker is not ready either
                raise Unavailable("the database has no epoch yet")
            self._epoch = epoch
        return self._epoch

    def raise_sequence(self, room: str, at_least: int) -> None:
        self.inner.raise_sequence(room, at_least)

    def sequences_moved(self) -> None:
        # Each room's next post, and the next DM, read the window's sequence again (and
        # floor the log's above it): the ids Redis issued meanwhile are not issued again.
        self._primed.clear()
        self._dms_primed = False

    def room_emptied(self, room: str) -> None:
        self.inner.room_emptied(room)
        self._primed.discard(room)

    def room_occupied(self, room: str) -> None:
        self.inner.room_occupied(room)

    # -- lifecycle -----------------------------------------------------------------------
    def healthy(self) -> bool:
        return self.writer.healthy and self.inner.healthy()

    def close(self) -> None:
        self.writer.close()
        # Messages held behind an unpublished predecessor were acknowledged; their
        # releaser may not have run yet (HOLD_TIMEOUT). Released now, before this worker
        # stops numbering (RedisStores.close: NodeKeeper.stop next): if it was the last
        # one that numbers in the database, workers numbering in Redis go on from Redis's
        # sequence, and would issue those ids again, the acknowledged messages never
        # published.
        for room in list(self._releasing):
            try:
                self._release_held(room, once=True)
            except Exception as exc:  # the shutdown goes on
                log.warning("room %s: held messages not released at shutdown (%s)", room, exc)
        self.log.close()
        self.inner.close()


def _unbroken(events: list[bytes], after_id: int) -> bool:
    """Whether ``events`` (oldest first) are every id from ``after_id + 1`` to the last
    one's, with no hole (ids only rise, so the ends and the count tell)."""
    if not events:
        return True
    return (message_id_of(events[0]) == after_id + 1
            and message_id_of(events[-1]) == after_id + len(events))
