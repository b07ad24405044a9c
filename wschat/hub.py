"""This worker's share of the rooms: which local sessions to write an event to.

The broker hands every event for a room or a user to :meth:`LocalHub.deliver_room`
or :meth:`LocalHub.deliver_user`; the hub builds the WebSocket frame once and
gives the same bytes to each local session, whose ``send_frame`` never blocks.
Who is in a room *server-wide* is the room store's business, never this dict's.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import orjson

from .protocol import (
    DM_PREFIX, event_type, message_id_of, stored_id_of, text_frame,
)
from .stores.base import Broker

if TYPE_CHECKING:
    from .session import Session


class _Recovery:
    """A session catching up on a room: live events wait here until the replay is sent.
    ``behind``: the first id this worker could still bring it after its stream was lost
    (:meth:`LocalHub.mark_joiners_behind`; 0: none lost)."""

    __slots__ = ("behind", "pending")

    def __init__(self) -> None:
        self.pending: list[bytes] = []
        self.behind = 0


#: Seconds after a connection's kept-DM backlog ended that the hub still recognises
#: the live copy of one of those DMs (LocalHub.kept_dms_sent) and does not write it again.
KEPT_IDS_GRACE = 60.0


class DmHold:
    """Live DMs to one connection waiting behind the DMs kept for its user
    (:meth:`LocalHub.hold_dms`). The object itself identifies the hold: the backlog it
    waits for releases this one only."""

    __slots__ = ("frames", "held_bytes", "limit")

    def __init__(self, limit: int) -> None:
        self.held_bytes = 0
        self.limit = limit  # more held: a slow consumer
        self.frames: list[tuple[int | None, bytes]] = []  # (DM id, frame), in arrival order


def _dm_id(event: bytes) -> int | None:
    try:
        return stored_id_of(event)
    except ValueError:  # no whole-number id: not one a store issued
        return None


class Tally(dict[str, int]):
    """How many of each key are held: a count per key, a key at 0 not kept (so an empty
    tally is ``{}``). The per-user and per-address counts of connections use it."""

    def add(self, key: str) -> None:
        self[key] = self.get(key, 0) + 1

    def remove(self, key: str) -> None:
        held = self.get(key, 0)
        if held <= 1:
            self.pop(key, None)
        else:
            self[key] = held - 1


class LocalHub:
    def __init__(self, broker: Broker,
                 on_delivered: Callable[[int, bytes, str | None], None] | None = None
                 ) -> None:
        self._broker = broker
        # (deliveries, event, its type if known): the delivery counts (Metrics.delivered)
        self._on_delivered = on_delivered or (lambda n, event, kind: None)
        # room -> live local members (ordered), each with the id above which the room's
        # stream brings it every message (a join with `since`; else None)
        self.rooms: dict[str, dict[Session, int | None]] = {}
        self.users: dict[str, set[Session]] = {}
        # user id -> sessions waiting for the user's channel to be subscribed (add_user)
        self._subscribing = Tally()
        # Signed-in users' connections on their way into ``users``: an upgrade admitted
        # but not yet opened, an ``auth`` whose store calls run before it is added.
        # MAX_CONNECTIONS_PER_USER counts them (:meth:`connections_of`).
        self.arriving = Tally()
        self._recovering: dict[str, dict[Session, _Recovery]] = {}
        # room -> {session: id}: sessions that went live with ids up to `id` from the
        # store while this worker's pub/sub stream had not delivered them yet (it lags
        # behind the store). Those ids are not written to them a second time; an entry
        # goes once the stream passes its id.
        self._floors: dict[str, dict[Session, int]] = {}
        # Highest message id delivered here per room: if the shared store loses its
        # data, sequences restart above it, so no id is ever issued twice.
        self.max_seen: dict[str, int] = {}
        # The same for DMs (one sequence for all of them).
        self.max_dm_id = 0
        # Live DMs that wait until the DMs kept for the session's user while it was away
        # have all been queued (hold_dms).
        self._held_dms: dict[Session, DmHold] = {}
        # The ids of the kept DMs queued for a session by its backlogs, until
        # KEPT_IDS_GRACE after its backlog ended: a live copy of one
        # (Chat.deliver_if_arrived, a retry) is not written to it a second time, whether
        # it comes while the backlog is written or after (DM ids are unique: the
        # connection has that event). A live copy follows its commit by a round trip, so
        # a minute is ample, and a connection does not hold up to MAX_KEPT_DMS ids for
        # its whole life.
        self._kept_sent: dict[Session, set[int]] = {}
        # Sessions whose backlog ended: when their ids go (None: stamped at the next
        # forget_kept_ids, from the chat's tick).
        self._kept_forget_at: dict[Session, float | None] = {}

    # -- membership --------------------------------------------------------------------
    def _ensure_room(self, room: str) -> None:
        if room not in self.rooms and room not in self._recovering:
            self._broker.subscribe_room(room)
        else:  # another local member's subscription may still be on its way
            self._broker.await_room(room)

    def _maybe_drop_room(self, room: str) -> None:
        if room not in self.rooms and room not in self._recovering:
            self._broker.unsubscribe_room(room)
            self.max_seen.pop(room, None)

    def begin_recovery(self, room: str, session: Session) -> None:
        """Subscribe ``session`` to ``room`` but hold its live events (see finish_recovery)."""
        self._ensure_room(room)
        self._recovering.setdefault(room, {})[session] = _Recovery()
        self._drop_floor(room, session)
        members = self.rooms.get(room)
        if members is not None and session in members:  # re-join of a member: pause it
            del members[session]
            if not members:
                del self.rooms[room]

    def mark_joiners_behind(self, room: str, first: int) -> None:
        """This worker's stream of ``room`` lost messages the history no longer holds:
        it can bring the sessions joining it every message from ``first`` on only.
        :meth:`finish_recovery` tells whether one was given less than that at its join."""
        for recovery in self._recovering.get(room, {}).values():
            recovery.behind = max(recovery.behind, first)

    def finish_recovery(self, room: str, session: Session, replayed_up_to: int,
                        present: set[str], base: int | None = None) -> bool:
        """Send what arrived while the session joined, then go live. False when it
        missed messages nobody can bring it any more (:meth:`mark_joiners_behind`:
        it was given ids up to ``replayed_up_to`` only, and the stream lost the next).

        Held events may predate the state the session was just given (a publish
        reaches this worker through the broker after the store changed), so
        messages it already has (id <= ``replayed_up_to``) and presence changes its
        ``users`` list (``present``: user ids) already shows are dropped.
        """
        waiting = self._recovering.get(room)
        recovery = waiting.pop(session, None) if waiting else None
        if waiting is not None and not waiting:
            del self._recovering[room]
        if recovery is None:
            return True
        present = set(present)
        for event in recovery.pending:
            msg_id = message_id_of(event)
            if msg_id is not None:
                if msg_id <= replayed_up_to:
                    continue
            elif event_type(event) == "presence":
                change = orjson.loads(event)
                user_id, online = change.get("user_id"), change.get("status") == "online"
                if (user_id in present) == online:
                    continue  # already reflected in the users list it got
                if online:
                    present.add(user_id)
                else:
                    present.discard(user_id)
            session.send_frame(text_frame(event))
        if replayed_up_to > self.max_seen.get(room, 0):
            self._floors.setdefault(room, {})[session] = replayed_up_to
        self.rooms.setdefault(room, {})[session] = base
        return replayed_up_to >= recovery.behind - 1

    def resume_points(self) -> dict[str, tuple[int, int]]:
        """For every room with local members, live or joining: ``(after, known)``.

        ``after``: the stream resumes after this id, the highest delivered here, else (a
        room whose stream has delivered nothing since its members joined) the lowest id
        a live member was given up to at its join (0 for one given none, and for a room
        whose members are all still joining). ``known``: the highest id this worker
        knows the room issued, delivered or handed to a member at its join. Ids at or
        below a member's floor are never written to it twice, so ``after`` may be low."""
        points: dict[str, tuple[int, int]] = {}
        for room in set(self.rooms) | set(self._recovering):
            floors = self._floors.get(room, {})
            seen = self.max_seen.get(room)
            after = seen if seen is not None else min(
                (floors.get(session, 0) for session in self.rooms.get(room, ())), default=0)
            points[room] = (after, max(seen or 0, max(floors.values(), default=0)))
        return points

    def delivered_to(self, room: str, session: Session) -> int | None:
        """The id up to which the room's stream has brought this live member its
        messages (None: not a live member)."""
        members = self.rooms.get(room)
        if members is None or session not in members:
            return None
        floors = self._floors.get(room)
        return max(self.max_seen.get(room, 0), floors.get(session, 0) if floors else 0)

    def gets_message(self, room: str, session: Session, msg_id: int) -> bool:
        """Whether message ``msg_id`` of ``room`` was, or will be, written to this live
        member by the room's own stream (replay and live): then a retry of it must not
        be echoed a second time."""
        delivered = self.delivered_to(room, session)
        if delivered is None:
            return False
        if msg_id > delivered:
            return True  # not here yet: the stream brings it to every live member
        base = self.rooms[room][session]
        return base is not None and msg_id > base

    def abort_recovery(self, room: str, session: Session) -> bool:
        """A member's re-join failed: it goes on live, with every event held meanwhile.
        False when the stream lost messages meanwhile that the history no longer holds
        (:meth:`mark_joiners_behind`): what the member has is then not known."""
        waiting = self._recovering.get(room)
        recovery = waiting.pop(session, None) if waiting else None
        if waiting is not None and not waiting:
            del self._recovering[room]
        for event in recovery.pending if recovery is not None else ():
            session.send_frame(text_frame(event))
        self.rooms.setdefault(room, {})[session] = None
        return recovery is None or not recovery.behind

    def _drop_floor(self, room: str, session: Session) -> None:
        floors = self._floors.get(room)
        if floors is not None and floors.pop(session, None) is not None and not floors:
            del self._floors[room]

    def remove_member(self, room: str, session: Session) -> None:
        self._drop_floor(room, session)
        members = self.rooms.get(room)
        if members is not None:
            members.pop(session, None)
            if not members:
                del self.rooms[room]
        waiting = self._recovering.get(room)
        if waiting is not None:
            waiting.pop(session, None)
            if not waiting:
                del self._recovering[room]
        self._maybe_drop_room(room)

    def connections_of(self, user_id: str) -> int:
        """The user's connections here, those on their way in included: checks of
        MAX_CONNECTIONS_PER_USER that run while others wait (an upgrade's handshake, a
        store call) would each see none of them otherwise."""
        return len(self.users.get(user_id, ())) + self.arriving.get(user_id, 0)

    def add_user(self, session: Session, user_id: str | None = None) -> None:
        """Deliver the events of ``user_id`` (the session's user unless given) to
        ``session``. A user's first session here subscribes this worker to the user's
        channel and waits for Redis to confirm it. If that fails, nothing of it is left:
        the session is in no ``users`` set, and the channel is wanted no longer unless
        another session of the user is here or on its way (a set left behind would make
        the user's next session here skip the subscription, and a session missing from
        its set would hear none of the DMs dm_heard.lua counted as heard here)."""
        user_id = session.user_id if user_id is None else user_id
        sessions = self.users.get(user_id)
        if sessions is None:
            self._subscribing.add(user_id)
            try:
                self._broker.subscribe_user(user_id)
            except BaseException:
                self._subscribing.remove(user_id)
                if user_id not in self.users and user_id not in self._subscribing:
                    self._broker.unsubscribe_user(user_id)
                raise
            self._subscribing.remove(user_id)
            sessions = self.users.setdefault(user_id, set())
        sessions.add(session)

    def hold_dms(self, session: Session, limit: int) -> DmHold:
        """Live DMs to ``session`` wait (:meth:`release_dms`) behind the welcome and the
        DMs kept for its user (written a page at a time as the client reads), so that it
        gets them all in id order. More than ``limit`` bytes held: a slow consumer.
        Returns the hold: the backlog it waits for releases that one only."""
        hold = self._held_dms[session] = DmHold(limit)
        return hold

    def dms_held(self, session: Session) -> DmHold | None:
        """The session's hold (:meth:`hold_dms`) while its live DMs wait, else None."""
        return self._held_dms.get(session)

    def kept_dms_sent(self, session: Session, ids: list[int]) -> None:
        """Kept DMs queued for ``session`` by its backlog: a live copy of one
        (Chat.deliver_if_arrived), held or arriving later, is not sent a second time."""
        if not session.closed_by_chat:  # its close dropped them (drop_held_dms)
            self._kept_sent.setdefault(session, set()).update(ids)
            self._kept_forget_at.pop(session, None)  # a backlog again: kept until it ends

    def release_dms(self, session: Session, hold: DmHold | None = None) -> None:
        """Send the live DMs held for ``session`` (after the last kept page) and stop
        holding them. ``hold``: only if that is still the session's hold (the backlog of
        a user the connection no longer is ends after a hold of its new user began)."""
        held = self._held_dms.get(session)
        if held is None or (hold is not None and held is not hold):
            return
        del self._held_dms[session]
        kept = self._kept_sent.get(session, ())
        if kept:
            self._kept_forget_at[session] = None
        for dm_id, frame in held.frames:
            if dm_id not in kept:
                session.send_frame(frame)

    def forget_kept_ids(self, now: float) -> None:
        """The chat's tick (``now``: its monotonic clock): forget the kept-DM ids of the
        sessions whose backlog ended at least :data:`KEPT_IDS_GRACE` seconds ago."""
        for session, at in list(self._kept_forget_at.items()):
            if at is None:
                self._kept_forget_at[session] = now + KEPT_IDS_GRACE
            elif at <= now:
                del self._kept_forget_at[session]
                self._kept_sent.pop(session, None)

    def drop_held_dms(self, session: Session) -> None:
        """The connection is gone: what was held for it goes with it."""
        self._held_dms.pop(session, None)
        self._kept_sent.pop(session, None)
        self._kept_forget_at.pop(session, None)

    def remove_user(self, session: Session, user_id: str | None = None) -> None:
        # The session's held DMs are not dropped here: a sign-in as another user (or its
        # rollback) removes a user of a connection that goes on (Chat._auth releases them).
        user_id = session.user_id if user_id is None else user_id
        sessions = self.users.get(user_id)
        if sessions is None:
            return
        sessions.discard(session)
        if not sessions:
            del self.users[user_id]
            if user_id not in self._subscribing:  # the one on its way keeps it (or drops it)
                self._broker.unsubscribe_user(user_id)

    # -- delivery (called by the broker) -----------------------------------------------
    def deliver_room(self, room: str, event: bytes, exclude_user: str | None = None) -> None:
        msg_id = message_id_of(event)
        if msg_id is not None:
            if msg_id <= self.max_seen.get(room, 0):
                return  # delivered here already: a gap filled from history met the stream
            self.max_seen[room] = msg_id
        members = self.rooms.get(room)
        floors = self._floors.get(room) if msg_id is not None else None
        if members:
            frame = text_frame(event)
            if exclude_user is None and not floors:  # a room message, as a rule
                targets = list(members)
                for session in targets:
                    session.send_frame(frame)
                sent = len(targets)
            else:
                sent = 0
                for session in list(members):
                    if session.user_id != exclude_user:
                        if floors and floors.get(session, 0) >= msg_id:  # type: ignore[operator]
                            continue  # it has this one already, from the store
                        session.send_frame(frame)
                        sent += 1
            self._on_delivered(sent, event, "message" if msg_id is not None else None)
        if floors:
            for session in [s for s, floor in floors.items() if floor <= msg_id]:  # type: ignore[operator]
                del floors[session]
            if not floors:
                del self._floors[room]
        waiting = self._recovering.get(room)
        if waiting:
            for session, recovery in waiting.items():
                if session.user_id != exclude_user:
                    recovery.pending.append(event)

    def deliver_user(self, user_id: str, event: bytes) -> None:
        sessions = self.users.get(user_id)
        if sessions:
            frame = text_frame(event)
            is_dm = event.startswith(DM_PREFIX)
            dm_id = _dm_id(event) if is_dm and self._kept_sent else None
            for session in list(sessions):
                if dm_id is not None and dm_id in self._kept_sent.get(session, ()):
                    continue  # its backlog queued this one (kept_dms_sent)
                held = self._held_dms.get(session) if is_dm and self._held_dms else None
                if held is None:
                    session.send_frame(frame)
                    continue
                held.held_bytes += len(frame)
                if held.held_bytes > held.limit:  # as a backlog behind paced frames counts
                    del self._held_dms[session]
                    session.drop_slow_consumer()
                else:
                    held.frames.append((_dm_id(event), frame))
            if is_dm:
                self._dm_delivered(event)
                self._on_delivered(len(sessions), event, "dm")
            else:
                self._on_delivered(len(sessions), event, None)

    def _dm_delivered(self, event: bytes) -> None:
        dm_id = _dm_id(event)
        if dm_id is not None:
            self.max_dm_id = max(self.max_dm_id, dm_id)

    # -- figures -----------------------------------------------------------------------
    def sessions(self) -> list[Session]:
        """Every local session, once (one signing in as another user is listed under
        both for a moment: Chat._become)."""
        return list({s: None for group in self.users.values() for s in group})
