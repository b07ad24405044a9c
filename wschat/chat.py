"""The chat core: what each command does. No Flask, no sockets.

:class:`Chat` takes a :class:`Session` (one client connection, as far as chat
is concerned) and the text of a frame, talks to the stores, and answers through
``session.send``. Fan-out goes through the broker to every worker's
:class:`~wschat.hub.LocalHub`. :meth:`Chat.close` is the one place a session's
rooms and presence are cleaned up, whatever ended it.
"""

from __future__ import annotations

import contextlib
import heapq
from collections import deque
import itertools
import logging
import math
import time
from collections.abc import Callable, Iterable
from typing import Any

import orjson

from .access import AccessControl, forbidden, parse_control
from .auth import Authenticator, AuthError, Identity
from .config import Settings
from .hub import DmHold, LocalHub
from .protocol import (
    Auth, CloseCode, Command, ErrorCode, History, Join, Leave, Limits, ListUsers, Moderate, Ping,
    ProtocolError, RequestId, SendDm, SendMessage, Typing, draft_dm, draft_message, encode_history,
    encode_presence, encode_reply, encode_typing, message_id_of, parse_command, stored_id_of,
    text_frame,
)
from .ratelimit import Charge, RateLimited, RateLimiter, address_key
from .stores.base import (
    InboxFull, Posted, RecipientOffline, Replay, Stores, Unavailable, Unheard, User,
)
from .session import Session
from .stores.moderation import EVERYWHERE, MemoryModerationStore, until_ms, until_of
from .telemetry import Metrics, NoMetrics

log = logging.getLogger("wschat.chat")

RATE_LIMITED_KINDS = (SendMessage, SendDm, Typing)
PRE_AUTH_KINDS = (Auth, Ping)
# Every other command spends tokens of the user's request bucket
# (RATE_LIMIT_REQUESTS): these costs, and a history reply or a join's replay 1 more
# per 64 KiB it holds (charged once it is read: its size is what it costs the network,
# and a replay's what the worker holds until the client has read it).
# The requests whose replies pay for their size (Chat._pay_for_size).
SIZED_KINDS = (History, ListUsers, Join)
REQUEST_COSTS: dict[type, float] = {Join: 1.0, Leave: 1.0, ListUsers: 1.0, Ping: 1.0,
                                    Auth: 5.0, History: 1.0}
HISTORY_BYTES_PER_TOKEN = 65536
# Presence on the wire, per worker: a user's in a room changes at most
# PRESENCE_BURST times at once, then PRESENCE_RATE times per second, and a room's
# at most ROOM_PRESENCE_BURST / ROOM_PRESENCE_RATE (any users). Changes beyond
# that are held, and only the last one is sent (none if it ends where it started),
# so join/leave churn cannot multiply into one frame per member per action.
PRESENCE_RATE = 1.0
PRESENCE_BURST = 4.0
ROOM_PRESENCE_RATE = 20.0
ROOM_PRESENCE_BURST = 100.0
UNAVAILABLE_LOG_EVERY = 10.0  # seconds between "store unavailable" warnings
# After a message or DM with a client_msg_id is refused for now (rate_limited,
# unavailable, internal_error), the same connection's new ones are refused too until it
# comes again (its sender's order is the stored order), for at most this long past its
# token (rate_limited) or its refusal: a client that never sends it again is held back
# no longer than a slow round trip.
HOLD_GRACE = 2.0
POST_KINDS = (SendMessage, SendDm)
# client_msg_ids refused on a connection (to be sent again) it remembers, at most
REFUSED_SENDS_KEPT = 64
# Expired typing indicators are turned off in steps of at most about this many local
# deliveries (a step of the worker's timer; ~3 us each), the rest in the next step.
TYPING_STEP_DELIVERIES = 2000


class _Deadlines:
    """A heap of (when, session, key) with lazy invalidation by the caller."""

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, Session, str]] = []
        self._tie = itertools.count()

    def add(self, when: float, session: Session, key: str = "") -> None:
        heapq.heappush(self._heap, (when, next(self._tie), session, key))

    def __bool__(self) -> bool:
        return bool(self._heap)

    def due(self, now: float) -> list[tuple[Session, str]]:
        out = []
        while (entry := self.pop_due(now)) is not None:
            out.append(entry)
        return out

    def pop_due(self, now: float) -> tuple[Session, str] | None:
        """The earliest entry due by ``now`` (taken off), else None."""
        if self._heap and self._heap[0][0] <= now:
            _, _, session, key = heapq.heappop(self._heap)
            return session, key
        return None


class _Expiries:
    """At most one deadline per session (the latest set wins), forgotten when the
    session closes: a client re-authenticating in a loop, or gone long before its
    token expires, holds no entries."""

    def __init__(self) -> None:
        self._when: dict[Session, float] = {}
        self._heap: list[tuple[float, int, Session]] = []
        self._tie = itertools.count()

    def __len__(self) -> int:
        return len(self._heap)

    def set(self, session: Session, when: float) -> None:
        if self._when.get(session) == when:
            return
        self._when[session] = when
        heapq.heappush(self._heap, (when, next(self._tie), session))
        self._compact_if_stale()

    def discard(self, session: Session) -> None:
        if self._when.pop(session, None) is not None:
            self._compact_if_stale()

    def due(self, now: float) -> list[Session]:
        out = []
        while self._heap and self._heap[0][0] <= now:
            when, _, session = heapq.heappop(self._heap)
            if self._when.get(session) == when:
                del self._when[session]
                out.append(session)
        return out

    def _compact_if_stale(self) -> None:
        if len(self._heap) > 2 * len(self._when) + 64:
            self._heap = [(when, next(self._tie), s) for s, when in self._when.items()]
            heapq.heapify(self._heap)


class _Bucket:
    """A token bucket in a few floats (the chat core's own, per worker)."""

    __slots__ = ("tokens", "at")

    def __init__(self, burst: float, now: float) -> None:
        self.tokens, self.at = burst, now

    def level(self, now: float, rate: float, burst: float) -> float:
        self.tokens = min(burst, self.tokens + (now - self.at) * rate)
        self.at = now
        return self.tokens


class _PresenceGate:
    """Presence changes go out through two token buckets per worker: one per (room,
    user) (:data:`PRESENCE_BURST`, :data:`PRESENCE_RATE`) and one per room
    (:data:`ROOM_PRESENCE_BURST`, :data:`ROOM_PRESENCE_RATE`). A change neither
    allows is held; a later change of the same user replaces it, and one that
    brings it back to what was last sent cancels it. Held changes go out, oldest
    first in each room, as the buckets refill (:meth:`due`, from the timer)."""

    def __init__(self) -> None:
        # (room, user) -> (bucket, last status sent): the state it starts from is
        # the opposite of its first change (joining means it was offline).
        self._users: dict[tuple[str, str], tuple[_Bucket, str]] = {}
        self._rooms: dict[str, _Bucket] = {}
        # room -> user -> (status, name, guest), oldest first: due() looks at a room
        # only while its bucket has a token (the timer asks every 50 ms while any is
        # held, and a reconnect storm can hold thousands).
        self._held: dict[str, dict[str, tuple[str, str, bool]]] = {}
        self._held_count = 0
        # Released by due() and not published yet (the caller's publish can yield): a
        # change of theirs meanwhile is held, never published ahead of the released one.
        # -> what the room had heard before it (restored if the publish fails).
        self._sending: dict[tuple[str, str], str] = {}
        self._next_sweep = 0.0

    def __len__(self) -> int:
        return len(self._users) + len(self._rooms) + self._held_count

    @property
    def held(self) -> int:
        return self._held_count

    def _room_bucket(self, room: str, now: float) -> _Bucket:
        bucket = self._rooms.get(room)
        if bucket is None:
            bucket = self._rooms[room] = _Bucket(ROOM_PRESENCE_BURST, now)
        return bucket

    def _spend(self, key: tuple[str, str], now: float) -> bool:
        user = self._users[key][0]
        room = self._room_bucket(key[0], now)
        if (user.level(now, PRESENCE_RATE, PRESENCE_BURST) < 1.0
                or room.level(now, ROOM_PRESENCE_RATE, ROOM_PRESENCE_BURST) < 1.0):
            return False
        user.tokens -= 1.0
        room.tokens -= 1.0
        return True

    def _unhold(self, room: str, user_id: str) -> None:
        held = self._held.get(room)
        if held is not None and held.pop(user_id, None) is not None:
            self._held_count -= 1
            if not held:
                del self._held[room]

    def offer(self, room: str, user_id: str, username: str, status: str, guest: bool,
              now: float) -> bool:
        """True: publish this change now; False: held or cancelled."""
        key = (room, user_id)
        state = self._users.get(key)
        if state is None:
            state = self._users[key] = (_Bucket(PRESENCE_BURST, now),
                                        "offline" if status == "online" else "online")
        if status == state[1]:  # back to what the room last heard: nothing to say
            self._unhold(room, user_id)
            return False
        held = self._held.get(room)
        if ((held is None or user_id not in held) and key not in self._sending
                and self._spend(key, now)):
            self._users[key] = (state[0], status)
            return True
        if held is None:
            held = self._held[room] = {}
        if user_id not in held:
            self._held_count += 1
        held[user_id] = (status, username, guest)  # a replaced change keeps its place
        return False

    def forget(self, room: str, user_id: str, now: float) -> None:
        """What the room last heard of the user is not known here any more (the shared
        store lost it, or another worker announced the user offline): every change is
        news, and none cancels another, until one has been sent."""
        state = self._users.get((room, user_id))
        bucket = state[0] if state is not None else _Bucket(PRESENCE_BURST, now)
        self._users[(room, user_id)] = (bucket, "")

    def sent(self, room: str, user_id: str) -> None:
        """A change due() released has been published."""
        self._sending.pop((room, user_id), None)

    def unsent(self, room: str, user_id: str, change: tuple[str, str, bool]) -> None:
        """A change due() released could not be published (the store is away): the room
        heard what it had before, and the change is held again, unless the user made a
        newer one meanwhile (held: it wins, or cancels if it is what the room heard)."""
        key = (room, user_id)
        before = self._sending.pop(key, None)
        if before is None:
            return
        state = self._users.get(key)
        if state is not None:
            self._users[key] = (state[0], before)
        held = self._held.get(room)
        newer = held.get(user_id) if held is not None else None
        if newer is None:
            self._held_count += 1
            self._held.setdefault(room, {})[user_id] = change
        elif newer[0] == before:
            self._unhold(room, user_id)

    def due(self, now: float) -> list[tuple[str, str, str, str, bool]]:
        """Held changes the buckets now allow: (room, user_id, username, status, guest).
        Each counts as being published until :meth:`sent` says it was."""
        out = []
        for room, held in list(self._held.items()):
            bucket = self._room_bucket(room, now)
            allowed = []
            for user_id, change in held.items():
                if bucket.level(now, ROOM_PRESENCE_RATE, ROOM_PRESENCE_BURST) < 1.0:
                    break  # nothing more for this room until its bucket refills
                if (room, user_id) not in self._sending and self._spend((room, user_id), now):
                    allowed.append((user_id, change))
            for user_id, (status, username, guest) in allowed:
                self._unhold(room, user_id)
                key = (room, user_id)
                bucket, before = self._users[key]
                self._users[key] = (bucket, status)
                self._sending[key] = before
                out.append((room, user_id, username, status, guest))
        if now >= self._next_sweep:  # full buckets mean nothing: forget them
            self._next_sweep = now + 10.0
            self._users = {k: v for k, v in self._users.items()
                           if k[1] in self._held.get(k[0], ())
                           or v[0].level(now, PRESENCE_RATE, PRESENCE_BURST) < PRESENCE_BURST}
            self._rooms = {r: b for r, b in self._rooms.items()
                           if b.level(now, ROOM_PRESENCE_RATE, ROOM_PRESENCE_BURST)
                           < ROOM_PRESENCE_BURST}
        return out


def metric_kind(command: Command | None) -> str:
    """What :class:`Metrics` calls a command: its class name, or a moderation command's
    action (``kick``, ``mute``, ``unmute``: one class, three wire types); "" for a frame
    that is no command."""
    if command is None:
        return ""
    return command.action if isinstance(command, Moderate) else type(command).__name__


def _ban_terms(op: dict[str, Any]) -> dict[str, Any]:
    """What a ban's `left` or `error` says of it beside its reason: `until` always (Unix
    ms, null: until lifted, as a refused `join` says it), and the `note` given with it.
    Nothing for a kick: its event has no `until` (a moderator's reason may be "banned")."""
    if "until" not in op:
        return {}
    terms = {"until": op.get("until")}
    if op.get("note") is not None:
        terms["note"] = op["note"]
    return terms


def _one_after_another(step: Callable[[Any], None], items: Iterable[Any]) -> None:
    for item in items:
        step(item)


class Chat:
    def __init__(self, settings: Settings, stores: Stores, authenticator: Authenticator,
                 limiter: RateLimiter, metrics: Metrics | None = None,
                 clock: Callable[[], float] = time.time,
                 monotonic: Callable[[], float] = time.monotonic, start: bool = True) -> None:
        self.settings = settings
        self.stores = stores
        self.auth = authenticator
        self.limiter = limiter
        # Redis: a message or DM spends its tokens in the script that posts it.
        self._posts_charge = stores.messages.charges_posts and limiter is stores.rate_limiter
        self.metrics: Metrics = metrics or NoMetrics()
        self.clock = clock
        self.monotonic = monotonic
        self.limits = Limits(settings.max_text_chars, settings.history_size)
        self.hub = LocalHub(stores.broker, self.metrics.delivered)
        self._typing_deadlines = _Deadlines()
        # room -> user id -> the user's local sessions whose typing indicator is on there.
        # The events name the user, not the connection: the user types while any of them
        # does, and a message of the user, from whichever connection (or worker), ends
        # them all (_end_typing_of, _deliver_room).
        self._typists: dict[str, dict[str, set[Session]]] = {}
        self._auth_deadlines = _Deadlines()
        self._expiry_deadlines = _Expiries()
        self._presence = _PresenceGate()
        self._unavailable_logged_at = float("-inf")
        self._unheard_logged_at = float("-inf")
        # Store clean-ups that failed (Redis briefly unreachable, pool exhausted in a
        # disconnect storm): retried from tick() so no membership is left behind.
        self._unfinished: deque[tuple[Session, str | None]] = deque()
        self._renamed = itertools.count(1)  # see _become
        self._recoveries = 0  # resyncs begun: see _become
        self._early_kicks: list[tuple[Session, dict[str, Any]]] = []  # see _control_session
        # Shutdown: the store releases this worker's registrations in one step (shutdown).
        # What a connection registers in the store from then on (a join, a connection's
        # presence, whose call was on its way) the release may not see: each closing
        # connection takes its own out (room, or None for its presence; see close).
        self._releasing = False
        self._registered_late: dict[Session, set[str | None]] = {}
        # Connections whose close ran since the release began: what a recovery under way
        # registers for one of them afterwards is taken out at once (_registered).
        self._closed_late: set[Session] = set()
        #: Runs ``step(item)`` for each item, several at once where the runtime can (the
        #: factory gives a greenlet pool: their store round trips then share pipelines);
        #: after a failure none starts, and it is raised once those under way are done.
        #: By default one after another (the chat core itself waits only on its stores).
        self.each_concurrently: Callable[[Callable[[Any], None], Iterable[Any]], None] = \
            _one_after_another
        self.access = AccessControl(settings, stores.moderation or MemoryModerationStore(clock),
                                    stores.broker, clock)
        stores.broker.on_reconnect = self.resync
        self._handlers: dict[type, Callable[[Session, Any], None]] = {
            SendMessage: self._message, Typing: self._typing, Ping: self._ping,
            Join: self._join, Leave: self._leave, SendDm: self._dm,
            ListUsers: self._list_users, History: self._history, Auth: self._auth,
            Moderate: self._moderate,
        }
        if start:  # False: the app factory, whose app is built before it is started
            self.start()

    def start(self) -> None:
        """Receive what the broker delivers (with Redis: connect and subscribe)."""
        # Only another worker's room message needs _deliver_room's look at the typists:
        # one of this worker ends its author's typing itself (_end_typing_of).
        on_room = (self._deliver_room if self.stores.broker.spans_workers
                   else self.hub.deliver_room)
        self.stores.broker.start(on_room, self._deliver_user)

    # -- connection lifecycle ----------------------------------------------------------
    def open(self, session: Session, arriving: bool = False) -> None:
        """Register a new connection and greet it. If it cannot be registered whole
        (:meth:`_register`), it raises with nothing of it registered (the transport closes
        the connection: 1013). ``arriving``: the hub counts it among its user's
        connections on their way in (its admission did), until it is registered."""
        if self.settings.enable_persistence:
            # Live DMs wait behind the welcome and the DMs kept for the user (_greet).
            self.hub.hold_dms(session, self.settings.max_outbound_bytes)
        self._register(session, session.conn_id, session.user, arriving)
        self._watch_expiry(session)
        if self.settings.auth_required and not session.authenticated:
            self._auth_deadlines.add(self.monotonic() + self.settings.auth_timeout, session)
        if session.authenticated and self._banned_everywhere(session):
            return
        self._greet(session)

    def _banned_everywhere(self, session: Session, request_id: RequestId = None,
                           fail_closed: bool = True) -> bool:
        """Close a connection whose user is banned everywhere; note mutes everywhere.
        ``fail_closed``: a standing that cannot be read closes it too (1013, to connect
        again), as for a new identity (a connect, a sign-in) nothing else would check it:
        a user banned or muted everywhere could send DMs until the connection ended. A
        recheck of a user checked before (a fresh token of the user signed in, after a
        pub/sub outage) keeps the connection instead: the store's outage is no reason to
        drop it."""
        try:
            standing = self.access.read_standing(session, None)
        except Unavailable as exc:  # joins still check, and refuse while it is unreachable
            log.warning("moderation state of %s not available: %s", session.user_id, exc)
            if not fail_closed:
                return False
            session.close(CloseCode.TRY_AGAIN_LATER, "temporarily unavailable; retry")
            return True
        if standing.banned_everywhere is None:
            return False
        session.send(forbidden("you are banned from this server", request_id, reason="banned",
                               until=until_ms(standing.banned_everywhere)).to_event())
        self.metrics.disconnected("banned")
        session.close(CloseCode.DISCONNECTED, "banned")
        return True

    def _register(self, session: Session, conn_id: str, user: User,
                  arriving: bool = False) -> None:
        """``session`` hears ``user``'s events here (its channel subscribed, confirmed) and
        counts as ``user``'s connection ``conn_id`` (presence, and with Redis this worker
        among the user's: dm_heard.lua). All or nothing: if a step fails, what the others
        did is undone before the error goes on, so that no DM is counted as heard by a
        connection that cannot hear it, and a retry starts afresh.

        ``arriving``: counted by the hub as on its way in (MAX_CONNECTIONS_PER_USER), it
        passes to the hub's users the moment it is added there (or leaves the count if
        that fails): counted by both meanwhile, the presence step's wait would refuse
        another connection of the user's under the cap."""
        try:
            self.hub.add_user(session, user.user_id)
        finally:
            if arriving:
                self.hub.arriving.remove(user.user_id)
        try:
            self.stores.presence.connect(conn_id, user)
            self._registered(session, None)
        except BaseException:
            self.hub.remove_user(session, user.user_id)
            # Its reply may be what failed (a timeout): the connect may have been made.
            self._disconnect_in_store(Session(conn_id, Identity(user.user_id, user.username,
                                                                None), True))
            raise

    def _greet(self, session: Session, request_id: RequestId = None,
               refresh: bool = False) -> None:
        """``welcome`` (on connect, and after a successful ``auth``), then the DMs kept
        for the user while it was away (``refresh``: see :meth:`_dm_backlog`)."""
        hold = self.hub.dms_held(session)  # this greeting's (open, _auth)
        backlog = self._dm_backlog(session, refresh)
        session.send(self._welcome(session, backlog, request_id))
        if not refresh:  # a refresh: a backlog still on its way goes on, held DMs wait
            self._send_kept_dms(session, backlog[0] if backlog else [], hold)

    def _welcome(self, session: Session, backlog: tuple[list[bytes], int] | None = None,
                 request_id: RequestId = None) -> bytes:
        extra = {} if backlog is None else {"dm_backlog": backlog[1]}
        return encode_reply("welcome", request_id, user_id=session.user_id,
                            username=session.username,
                            authenticated=session.authenticated,
                            auth_required=self.settings.auth_required,
                            heartbeat_interval=self.settings.heartbeat_interval, **extra)

    def _dm_backlog(self, session: Session, refresh: bool = False
                    ) -> tuple[list[bytes], int] | None:
        """The first page of the DMs kept for this user while it was away, and how many
        are kept (None: persistence is off, so none are ever kept). Guests exist only
        while connected, so nothing is ever kept for them. ``refresh``: an ``auth`` as the
        user the connection already was; its kept DMs came (or are coming, paced) with its
        first ``welcome``, and DMs since then came live, so none are fetched again."""
        if not self.settings.enable_persistence:
            return None
        if not session.authenticated or refresh:
            return [], 0
        try:
            return self.stores.messages.user_arrived(session.user) or ([], 0)
        except Unavailable as exc:  # they stay kept and come with the next connection
            log.warning("DM backlog of %s not available: %s", session.user_id, exc)
            return [], 0

    def _send_kept_dms(self, session: Session, page: list[bytes],
                       hold: DmHold | None = None) -> None:
        """Kept DMs go out a page at a time, as the client reads; a page counts as
        delivered (no longer kept) only once it was handed to the connection's socket.
        ``hold``: the live DMs waiting for this backlog (:meth:`LocalHub.hold_dms`)."""
        if not page:  # all kept ones are queued: the live DMs held meanwhile follow
            self.hub.release_dms(session, hold)
            return
        self.hub.kept_dms_sent(session, [stored_id_of(event) for event in page])
        user_id, last = session.user_id, stored_id_of(page[-1])
        session.send_paced([text_frame(event) for event in page],
                           lambda: self._kept_dms_sent(session, user_id, last, hold))

    def _kept_dms_sent(self, session: Session, user_id: str, last: int,
                       hold: DmHold | None = None) -> None:
        try:
            self.stores.messages.dms_delivered(user_id, last)
            page = self.stores.messages.kept_dms(user_id, last)
        except Unavailable as exc:  # the rest stays kept, for the next connection
            log.warning("kept DMs of %s after %d not sent: %s", user_id, last, exc)
            self.hub.release_dms(session, hold)
            return
        if (not session.closed_by_chat and session.user_id == user_id
                and self.hub.dms_held(session) is hold):
            self._send_kept_dms(session, page, hold)
        else:  # closed, or signed in as another user since: whose backlog is another's
            self.hub.release_dms(session, hold)

    def close(self, session: Session) -> None:
        """Forget a connection: leave its rooms (presence offline) and its user entry.

        Idempotent; every exit path of the transport ends here.
        """
        if self._releasing:
            self._closed_late.add(session)
        if session.closed_by_chat:
            self._undo_late_registrations(session)
            return
        session.closed_by_chat = True
        self.hub.drop_held_dms(session)
        self._registered_late.pop(session, None)  # every room and its presence go below
        self._expiry_deadlines.discard(session)
        for room in list(session.rooms):
            self._leave_room(session, room)
        self._disconnect_in_store(session)
        self.hub.remove_user(session)

    def _disconnect_in_store(self, session: Session) -> None:
        """The connection no longer counts its user online: now or, if the store cannot
        be reached, from tick()."""
        try:
            self.stores.presence.disconnect(session.conn_id, session.user_id)
        except Exception as exc:
            log.warning("could not clear presence of %s (%s); will retry", session.conn_id, exc)
            self._unfinished.append((session, None))

    def shutdown(self) -> None:
        """The worker stops: take all its connections out of the shared store at once
        (one Redis script instead of a leave per connection and room). What a connection
        registers while or after that runs, its close takes out
        (:meth:`_undo_late_registrations`): the worker is no longer listed for a reaper,
        so nobody else ever would."""
        self.metrics.flush()
        self._releasing = True
        self._typing_off()
        if self.stores.release_local():
            for session in self.hub.sessions():
                session.closed_by_chat = True

    def _typing_off(self) -> None:
        """Shutdown: every typing indicator goes off now. The timer that would expire
        them stops with the worker, and the other servers' members would see "typing"
        for good. The first failure ends it (a store away: each would wait as long)."""
        for session in self.hub.sessions():
            for room in list(session.typing):
                if not self._typing_stopped(session, room):
                    continue  # another connection of the user types there: its turn comes
                try:
                    self._publish_typing(session, room, False)
                except Exception as exc:  # the clients expire the indicator anyway
                    log.warning("typing indicators not turned off at shutdown: %s", exc)
                    return

    def _registered(self, session: Session, room: str | None) -> bool:
        """The store registered ``session`` in ``room`` (None: its presence). False when
        the connection had closed meanwhile (a recovery's call on its way while the
        shutdown's release ran and the close was done): taken out again at once."""
        if not self._releasing:
            return True
        if session in self._closed_late:
            if room is None:
                self._disconnect_in_store(session)
            else:
                self._leave_in_store(session, room)
            return False
        self._registered_late.setdefault(session, set()).add(room)
        return True

    def _undo_late_registrations(self, session: Session) -> None:
        """A connection closing after the shutdown's release: take out of the store what
        it registered since the release began (the release may have missed it)."""
        late = self._registered_late.pop(session, None)
        if not late:
            return
        for room in late:
            if room is not None and room in session.rooms:
                self._leave_room(session, room)
        if None in late:
            self._disconnect_in_store(session)

    def _retry_unfinished(self, budget: int = 500) -> None:
        for _ in range(min(budget, len(self._unfinished))):
            session, room = self._unfinished[0]
            try:
                if room is not None and room in session.rooms:
                    pass  # it joined again since: that membership stays
                elif room is None:
                    self.stores.presence.disconnect(session.conn_id, session.user_id)
                else:
                    self._store_leave(session, room)
            except Unavailable:
                return  # the store is still out: try again on the next tick
            except Exception:
                # Not an outage (a bug, a refusal): the same call will fail again, and
                # the clean-ups queued behind it must not wait for it forever (with
                # Redis, a user's presence and DMs refused to her: dm_heard.lua).
                log.exception("giving up clearing %s of %s from the store",
                              "presence" if room is None else f"room {room}", session.conn_id)
            self._unfinished.popleft()

    def resync(self) -> None:
        """Re-register every local connection after the shared store came back.

        Each step is idempotent, so nothing changes if the store kept its data;
        if it lost it (or reaped this worker as dead), rooms and presence return,
        and room sequences resume above the highest id this worker knows of
        (:meth:`~wschat.hub.LocalHub.resume_points`: delivered here, or handed to a
        member at its join), the DM sequence above the highest DM delivered here.
        Bans, mutes and revoked memberships whose events were published meanwhile are
        read from the store and carried out.
        """
        self._recoveries += 1
        points = self.hub.resume_points()
        for room, (_, known) in points.items():
            if known:
                self.stores.messages.raise_sequence(room, known)
        if self.hub.max_dm_id:
            self.stores.messages.raise_dm_sequence(self.hub.max_dm_id)
        # Connections one after another, each step a round trip, took ~3 s for 1,000
        # connections in 10 rooms each (the worker refusing posts meanwhile): they go
        # some at once (each_concurrently), their round trips sharing pipelines.
        self.each_concurrently(self._register_again, self.hub.sessions())
        log.info("re-registered %d local connections", len(self.hub.sessions()))
        # What was published while this worker was not subscribed (the store came
        # back before its pub/sub connection did) comes from the history, for every
        # room with local members, also one whose stream had delivered nothing yet;
        # the hub drops whatever of it the live stream brings as well.
        filled = 0
        for room, (after, _) in points.items():
            replay = self.stores.messages.since(room, after)
            if not replay.complete:
                self._close_behind(room, replay)
            for event in replay.messages:
                self._deliver_room(room, event)  # as live: its author's typing ends here
                filled += 1
        if filled:
            log.warning("delivered %d room messages published while reconnecting", filled)

    def _register_again(self, session: Session) -> None:
        """One connection's part of :meth:`resync`: its standing, presence and rooms.

        Each step waits for the store, and the connections go on meanwhile: one that
        closed, or left a room, since the recovery began is not registered again (its
        close or leave took it out already, and nothing would again while the worker
        lives). One that ends while its step is on its way is taken out after it: the
        steps and its close's go to Redis in the order they were made."""
        if session in self._closed_late or session.closed_by_chat:
            return  # closed since the list was taken (or a shutdown's release began)
        if self._moderated_meanwhile(session) or session.closed_by_chat:
            return
        self.stores.presence.connect(session.conn_id, session.user)
        if not self._registered(session, None):  # a shutdown's release under way
            return
        for room in list(session.rooms):
            if room not in session.rooms or session.closed_by_chat:
                continue  # left (or closed) while an earlier step waited
            joined = self.stores.rooms.join(room, session.conn_id, session.user)
            if not self._registered(session, room):
                continue
            if joined.first_of_user and room in session.rooms:
                # The store had lost the user (or the reaper announced them offline):
                # the room hears "online" again, through its presence budget, as any
                # change. Published at once, every user of a 1,000-member room was
                # ~1,000 fan-outs to 1,000 in one go, on every worker.
                self._presence.forget(room, session.user_id, self.monotonic())
                self._publish_presence(session, room, "online")

    def _close_behind(self, room: str, replay: Replay) -> None:
        """After a pub/sub outage the room's history no longer holds every message this
        worker missed: its live members the fill cannot bring all of them to are closed
        (1013), so that they join again with ``since`` and hear ``recovered: false``,
        rather than go on past a gap nobody told them of."""
        first = (message_id_of(replay.messages[0]) if replay.messages else None
                 ) or self.stores.messages.last_id(room) + 1
        for session in list(self.hub.rooms.get(room, ())):
            if (self.hub.delivered_to(room, session) or 0) < first - 1:
                self._close_missed(session, room)
        # Sessions joining meanwhile are told when their join is done (_join): only
        # then is it known what they were given.
        self.hub.mark_joiners_behind(room, first)

    def _close_missed(self, session: Session, room: str) -> None:
        log.warning("closing %s: messages of %s it missed are no longer held",
                    session.conn_id, room)
        self.metrics.disconnected("missed_messages")
        session.close(CloseCode.TRY_AGAIN_LATER, "missed messages; join again")

    def _moderated_meanwhile(self, session: Session) -> bool:
        """After a pub/sub outage: what the moderation events this worker missed would
        have done, from the store (the events are not kept): closed if banned
        everywhere (True), out of each room it is banned from or no longer a member
        of, its mutes as stored."""
        if self._banned_everywhere(session, fail_closed=False):
            return True
        for room in list(session.rooms):
            try:
                self.access.admit(session, room)
            except ProtocolError as refused:
                self._leave_room(session, room)
                if refused.extra.get("reason") == "banned":
                    reason, extra = "banned", {"until": refused.extra.get("until")}
                else:
                    reason = "membership revoked" if self.access.is_private(room) else "forbidden"
                    extra = {}
                session.send(encode_reply("left", room=room, reason=reason, **extra))
        return False

    def receive(self, session: Session, text: str) -> None:
        """Handle one text frame; every failure becomes an ``error`` to this client only."""
        command: Command | None = None
        try:
            try:
                command = parse_command(text, self.limits)
            except ProtocolError as bad:
                # Not a command, but it cost us a parse and its error: a flood of
                # junk is refused and closed (4102) like a flood of commands.
                self._check_requests(session, None, request_id=bad.request_id)
                raise
            self.metrics.received(metric_kind(command))
            if (self.settings.auth_required and not session.authenticated
                    and not isinstance(command, PRE_AUTH_KINDS)):
                # Refused, but no more free than junk: else a client that never signs
                # in has its commands refused at any pace until its AUTH_TIMEOUT.
                self._check_requests(session, command, 1.0)
                raise ProtocolError(ErrorCode.AUTH_REQUIRED,
                                    "authenticate first with {type: auth, token}",
                                    command.request_id)
            if isinstance(command, RATE_LIMITED_KINDS):
                posting = isinstance(command, POST_KINDS)
                if posting and session.held_send is not None:
                    self._keep_send_order(session, command, session.held_send)
                if not (self._posts_charge and posting):
                    self._check_rate(session, command)
                else:  # the post spends its tokens in the store, unless refused here
                    self._refuse_before(session, command, session.posts_empty_until,
                                        self.monotonic())
            else:
                if isinstance(command, SIZED_KINDS) and session.sized_empty_until:
                    self._refuse_before(session, command, session.sized_empty_until,
                                        self.monotonic())
                    session.sized_empty_until = 0.0  # passed: no need to look again
                self._check_requests(session, command)
            self._handlers[type(command)](session, command)
        except ProtocolError as err:
            self.metrics.error(err.code.value)
            session.send(err.to_event())
        except Unavailable as exc:
            self._note_refused(session, command)
            # The cause (hosts, ports, driver messages) is for the log, not the client.
            self.log_unavailable(exc)
            self.metrics.error(ErrorCode.UNAVAILABLE.value)
            session.send(ProtocolError(ErrorCode.UNAVAILABLE, "temporarily unavailable; retry",
                                       command.request_id if command else None).to_event())
        except Exception:
            log.exception("error handling a frame from %s", session.conn_id)
            self._note_refused(session, command)
            self.metrics.error(ErrorCode.INTERNAL.value)
            session.send(ProtocolError(ErrorCode.INTERNAL, "internal error",
                                       command.request_id if command else None).to_event())

    def log_unavailable(self, exc: Unavailable) -> None:
        """A request refused because a store cannot take it (a WebSocket request, or an
        API call's 503): logged with its cause, at most once per
        :data:`UNAVAILABLE_LOG_EVERY` seconds for the worker."""
        now = self.monotonic()
        if isinstance(exc, Unheard):
            # The store is up: a DM came while a worker of its users was (un)subscribing,
            # and its sender retries. "store unavailable" sent operators after an outage.
            if now - self._unheard_logged_at >= UNAVAILABLE_LOG_EVERY:
                self._unheard_logged_at = now
                log.info("a DM was stored but reached no worker of its users (one was "
                         "subscribing or unsubscribing); its sender was told to retry")
            return
        if now - self._unavailable_logged_at >= UNAVAILABLE_LOG_EVERY:
            self._unavailable_logged_at = now
            log.warning("refusing requests: store unavailable (%s)", exc)

    def tick(self) -> None:
        """Expire typing indicators, tokens and auth deadlines, retry failed clean-ups
        (called about once a second)."""
        self.metrics.flush()  # per-message counts kept back since the last tick
        if self._unfinished:
            self._retry_unfinished()
        if self._early_kicks:
            self._retry_early_kicks()
        self.release_presence()
        self.expire_typing()
        now = self.monotonic()
        self.hub.forget_kept_ids(now)
        for session, _ in self._auth_deadlines.due(now):
            if not session.authenticated and not session.closed_by_chat:
                self.metrics.disconnected("auth_timeout")
                session.close(CloseCode.AUTH_TIMEOUT, "authentication timeout")
        wall = self.clock()
        for session in self._expiry_deadlines.due(now):
            if session.expires_at is None or session.closed_by_chat:
                continue
            if session.expires_at > wall:
                # The wall clock stepped back since the deadline was set: not over yet,
                # so watched again (the token's end is wall time, the deadline monotonic).
                self._watch_expiry(session)
                continue
            session.send(ProtocolError(ErrorCode.TOKEN_EXPIRED,
                                       "token expired; reconnect with a fresh one").to_event())
            self.metrics.disconnected("token_expired")
            session.close(CloseCode.TOKEN_EXPIRED, "token expired")

    @property
    def presence_held(self) -> bool:
        """Presence changes wait for their buckets to refill."""
        return self._presence.held > 0

    def release_presence(self) -> None:
        """Publish the held presence changes their buckets now allow. The worker's
        timer calls this every few tens of milliseconds while changes are held, so a
        room's budget goes out a change or two at a time, not a second's worth at once."""
        due = self._presence.due(self.monotonic())
        failed: Exception | None = None
        for room, user_id, username, status, guest in due:
            if failed is None:
                try:
                    self.stores.broker.publish_room(
                        room, encode_presence(room, user_id, username, status, guest),
                        exclude_user=user_id)
                except Exception as exc:  # the store is away: held again, tried later
                    failed = exc
                else:
                    # Only now: a change of the user's made while this publish waited
                    # (a Redis round trip) was held, and goes out after this one.
                    self._presence.sent(room, user_id)
                    continue
            self._presence.unsent(room, user_id, (status, username, guest))
        if failed is not None:
            log.debug("presence held again: %s", failed)

    @property
    def typing_pending(self) -> bool:
        """Typing indicators wait for their deadlines (stale entries included)."""
        return bool(self._typing_deadlines)

    def expire_typing(self, budget: int = TYPING_STEP_DELIVERIES) -> None:
        """Turn off the typing indicators whose deadline has passed, until their
        fan-outs reach ``budget`` local deliveries; the rest wait for the next call. The
        worker's timer calls this every few tens of milliseconds while indicators are
        on: a second's worth expiring at once (40 stops, each to every member) held a
        worker of a 1,000-member room for ~100 ms."""
        now = self.monotonic()
        spent = 0
        while spent < budget:
            due = self._typing_deadlines.pop_due(now)
            if due is None:
                return
            session, room = due
            deadline = session.typing.get(room)
            if deadline is not None and deadline <= now and not session.closed_by_chat:
                if not self._typing_stopped(session, room):
                    continue  # the user still types there, in another connection
                try:
                    self._publish_typing(session, room, False)
                except Exception:
                    return  # the store is away: the clients expire the indicator anyway
                spent += len(self.hub.rooms.get(room, ())) + 1

    def _watch_expiry(self, session: Session) -> None:
        if session.expires_at is not None:
            delay = max(0.0, session.expires_at - self.clock())
            self._expiry_deadlines.set(session, self.monotonic() + delay)

    # -- rate limiting -----------------------------------------------------------------
    def _check_rate(self, session: Session, command: Command) -> None:
        """One token from the user's bucket (a guest's is its connection's), and for a
        guest one from its IP address's larger bucket too (:meth:`_buckets`)."""
        asked = self.monotonic()
        self._refuse_before(session, command, session.posts_empty_until, asked)
        retry_ms = self.limiter.spend(self._buckets(session))
        if not retry_ms:
            session.flood_strikes = 0
            return
        self._posts_empty(session, asked, retry_ms)
        self._refuse(session, command, retry_ms)

    @staticmethod
    def _posts_empty(session: Session, asked: float, retry_ms: int) -> None:
        """A post bucket refused a request made at ``asked`` (monotonic) for ``retry_ms``:
        none of its buckets holds a token before then, as only time fills them (the
        user's other connections, and a guest's neighbours, only spend). Less the
        rounding up of ``retry_ms``, and counted from before the store was asked, it is
        never later than the bucket's own answer would be."""
        session.posts_empty_until = asked + (retry_ms - 1) / 1000

    def _refuse_before(self, session: Session, command: Command, until: float,
                       now: float) -> None:
        """Refuse (``rate_limited``, a flood strike as ever) a command that comes before
        ``until``, when a refusal said its buckets could pay for it, without asking
        them: a message, DM or typing before its post buckets hold a token
        (:meth:`_posts_empty`; with Redis each was a script, and a client making one
        request succeed after every 2 x burst refusals, never closed, had Redis run one
        for every post it sent), or a request whose reply pays for its size before they
        could pay for the one refused (:meth:`_pay_for_size`; each was read first)."""
        wait = until - now
        if wait > 0:
            self._refuse(session, command, max(1, math.ceil(wait * 1000)))

    def _buckets(self, session: Session) -> Charge:
        """The buckets a message or DM spends, in order (:meth:`_guest_charge`)."""
        return self._charges(session)[2]

    def _charges(self, session: Session) -> tuple[str, bool, Charge, Charge]:
        """The session's buckets for posts and for other requests, built once per
        identity (a guest that signs in, or becomes another user, gets new ones)."""
        charges = session.charges
        if (charges is None or charges[0] is not session.user_id
                or charges[1] is not session.authenticated):
            settings, limiter = self.settings, self.limiter
            session.posts_empty_until = session.sized_empty_until = 0.0  # another's buckets
            charges = session.charges = (
                session.user_id, session.authenticated,
                self._guest_charge(session, "", limiter.rate, limiter.burst,
                                   settings.guest_ip_rate, settings.guest_ip_burst),
                self._guest_charge(session, "req:", settings.request_rate,
                                   settings.request_burst, 10 * settings.request_rate,
                                   10 * settings.request_burst))
        return charges

    @staticmethod
    def _guest_charge(session: Session, scope: str, rate: float, burst: float,
                      ip_rate: float, ip_burst: float) -> Charge:
        """The user's bucket, and for a guest its address's after it. The user's comes
        first, so a flooding guest spends no more of its neighbours' shared IP tokens
        than its own rate allows."""
        buckets: Charge = ((f"{scope}u:{session.user_id}", float(rate), float(burst)),)
        if not session.authenticated and session.remote_addr:
            key = address_key(session.remote_addr)  # an IPv6 /64 is one client
            buckets += ((f"{scope}ip:{key}", float(ip_rate), float(ip_burst)),)
        return buckets

    def _charge(self, session: Session) -> Charge:
        """_check_rate's buckets, for a store that spends them in the post itself."""
        return self._charges(session)[2] if self._posts_charge else ()

    def _keep_send_order(self, session: Session, command: SendMessage | SendDm,
                         held: tuple[str, float, bool]) -> None:
        """While a refused send is held (:data:`HOLD_GRACE`), refuse the connection's
        new ones: a token that refilled meanwhile would otherwise store them before it.
        Its own return, or the end of the hold, lets them through again; sends refused
        before (:meth:`_note_refused`: sent earlier, resent first) pass meanwhile.
        They are refused as the held one was: ``rate_limited``, or ``unavailable``
        (``unavailable``, ``internal_error``) so that a client does not take an outage
        for its own pace."""
        held_id, token_at, unavailable = held
        client_msg_id = command.client_msg_id
        if client_msg_id == held_id:
            session.held_send = None
            return
        if client_msg_id is not None and client_msg_id in (session.refused_sends or ()):
            return
        now = self.monotonic()
        if now >= token_at + HOLD_GRACE:
            session.held_send = None
            return
        if unavailable:
            raise ProtocolError(ErrorCode.UNAVAILABLE, "temporarily unavailable; retry",
                                command.request_id)
        if now < token_at:  # the bucket would refuse it too: a flood strike as ever
            self._refuse(session, command, math.ceil((token_at - now) * 1000), held=True)
        # The token is there, kept for the refused send: no strike (a client that gave
        # it up is no flooder), and a wait of one token's time, what the clients'
        # pacers take a retry_after_ms for, but no longer than the hold lasts.
        retry_ms = min(1000 / self.limiter.rate, (token_at + HOLD_GRACE - now) * 1000)
        self._refuse(session, command, max(1, math.ceil(retry_ms)), held=True, strike=False)

    def _note_refused(self, session: Session, command: Command | None,
                      retry_ms: int | None = None) -> None:
        """A send refused for now (``rate_limited`` after ``retry_ms``; ``unavailable``
        or ``internal_error``, None): its client sends it again before any newer one,
        so it passes a hold, and it holds the newer ones (:meth:`_keep_send_order`)
        unless an earlier refusal does already."""
        if isinstance(command, POST_KINDS) and command.client_msg_id:
            refused = session.refused_sends
            if refused is None:
                refused = session.refused_sends = {}
            refused[command.client_msg_id] = None
            if len(refused) > REFUSED_SENDS_KEPT:
                del refused[next(iter(refused))]
            if session.held_send is None:
                session.held_send = (command.client_msg_id,
                                     self.monotonic() + (retry_ms or 0) / 1000,
                                     retry_ms is None)

    @staticmethod
    def _accepted(session: Session, command: SendMessage | SendDm) -> None:
        """A send stored (or found stored): the flood count starts again, and it is no
        longer one to wait for."""
        session.flood_strikes = 0
        refused = session.refused_sends
        if refused is not None and command.client_msg_id is not None:
            refused.pop(command.client_msg_id, None)
            if not refused:
                session.refused_sends = None

    def _refuse(self, session: Session, command: Command | None, retry_ms: int,
                held: bool = False, strike: bool = True,
                request_id: RequestId = None) -> None:
        """Raise ``rate_limited``; close a client that keeps going regardless (4102).
        ``held``: refused by :meth:`_keep_send_order`, not by a bucket; ``strike``:
        counts towards the 4102; ``request_id``: a frame's that is no command."""
        self.metrics.rate_limited(metric_kind(command), held=held)
        if strike:
            session.flood_strikes += 1
        if not held:
            self._note_refused(session, command, retry_ms)
        error = ProtocolError(ErrorCode.RATE_LIMITED, "rate limit exceeded",
                              command.request_id if command else request_id,
                              retry_after_ms=retry_ms)
        if session.flood_strikes > 2 * self.settings.rate_limit_burst:
            # The error goes out before the close frame so the client learns why;
            # receive() counts it (its own send after the close is a no-op).
            session.send(error.to_event())
            self.cut_off_flooder(session)
        raise error

    def cut_off_flooder(self, session: Session) -> None:
        """Close a client that keeps going over its limits (4102): commands here, pings
        and pongs in the transport."""
        self.metrics.disconnected("rate_limited")
        session.close(CloseCode.RATE_LIMITED, "flooding")

    def _check_requests(self, session: Session, command: Command | None,
                        cost: float | None = None, request_id: RequestId = None,
                        sized: bool = False) -> None:
        """The same for every other command, against the request buckets
        (``RATE_LIMIT_REQUESTS``), at the command's cost (:data:`REQUEST_COSTS`; 1 for
        a frame that is no command at all, ``None``, whose usable ``id`` is
        ``request_id``: its ``rate_limited`` echoes it, as its other errors do).
        ``sized``: the cost of a reply's size (:meth:`_pay_for_size`)."""
        if cost is None:
            cost = REQUEST_COSTS.get(type(command), 1.0) if command else 1.0
        asked = self.monotonic() if sized else 0.0
        buckets = self._charges(session)[3]
        retry_ms = self.limiter.spend(buckets, cost)
        if retry_ms:
            if sized:  # as _posts_empty, and one token more: the request's own, before its read
                own = max(1 / rate for _, rate, _ in buckets) if buckets else 0.0
                session.sized_empty_until = asked + (retry_ms - 1) / 1000 + own
            self._refuse(session, command, retry_ms, request_id=request_id)
        session.flood_strikes = 0

    def _pay_for_size(self, session: Session, command: Command, size: int) -> None:
        """A reply or replay of ``size`` bytes (a history, a big room's users) pays a
        request token more per :data:`HISTORY_BYTES_PER_TOKEN`; refused, it raises
        ``rate_limited`` before anything is sent.

        Refused, the connection's next `history`, `list_users` and `join` are refused
        before they read anything until the buckets could pay for it and for the
        request's own token (only time fills them): a client sending histories of a big
        room at the request rate had each one read (~1 MiB out of Redis) and refused,
        ~5-10 MB a second, where an honest reader gets a reply every second or two."""
        if size >= HISTORY_BYTES_PER_TOKEN:
            self._check_requests(session, command, size // HISTORY_BYTES_PER_TOKEN, sized=True)

    def _publish_presence(self, session: Session, room: str, status: str) -> None:
        guest = not session.authenticated
        if self._presence.offer(room, session.user_id, session.username, status, guest,
                                self.monotonic()):
            self.stores.broker.publish_room(
                room, encode_presence(room, session.user_id, session.username, status, guest),
                exclude_user=session.user_id)

    # -- commands ----------------------------------------------------------------------
    def _ping(self, session: Session, cmd: Ping) -> None:
        session.send(encode_reply("pong", cmd.request_id))

    def _auth(self, session: Session, cmd: Auth) -> None:
        try:
            identity = self.auth.verify(cmd.token)
        except AuthError as err:
            self.metrics.auth_failed(err.code.value)
            raise ProtocolError(err.code, err.message, cmd.request_id) from None
        same_user = identity.user_id == session.user_id
        refresh = same_user and session.authenticated
        conn_id = None if same_user else self._renamed_conn_id(session)
        claimed = conn_id is not None and self._claim_place(identity.user_id, conn_id,
                                                            cmd.request_id)
        hold = None
        if self.settings.enable_persistence and not refresh:
            # Live DMs held behind the backlog of what the connection was go out now
            # (they were delivered to it as that user, who has them nowhere else); those
            # of the user it becomes wait behind the welcome and that user's kept DMs
            # from the moment its channel is subscribed (_become), as open() does.
            self.hub.release_dms(session)
            hold = self.hub.hold_dms(session, self.settings.max_outbound_bytes)
        if conn_id is not None:
            try:
                self._become(session, identity, conn_id)  # counted against the cap from here
            except BaseException:  # it stays what it was: nothing waits any more
                self.hub.release_dms(session, hold)
                if claimed:
                    self.stores.presence.release_claim(conn_id, identity.user_id)
                raise
        session.username = identity.username
        session.authenticated = True
        session.expires_at = identity.expires_at
        session.access.regrant(identity, same_user)
        for room in list(session.rooms):  # a fresh token may grant fewer rooms
            if not self.access.allowed_by_grants(session, room) and not (
                    self.access.is_private(room) and self._stored_member(session, room)):
                self._leave_room(session, room)
                session.send(encode_reply("left", room=room, reason="forbidden"))
        # A fresh token of the user signed in (checked then) is not dropped for an
        # unreadable store; a new identity is.
        if self._banned_everywhere(session, cmd.request_id, fail_closed=not refresh):
            return
        self._watch_expiry(session)
        self._greet(session, cmd.request_id, refresh)

    def _stored_member(self, session: Session, room: str) -> bool:
        """A private room's membership, for a connection whose new grants no longer
        name the room: not a member while the store cannot say (the grants are
        swapped already; an error here would leave it in rooms the token does not
        open). It may join again once the store answers."""
        try:
            return self.access.store.standing(room, session.user_id).member
        except Unavailable as exc:
            log.warning("membership of %s in %s not available (%s); leaving it",
                        session.user_id, room, exc)
            return False

    def _claim_place(self, user_id: str, conn_id: str, request_id: RequestId) -> bool:
        """MAX_CONNECTIONS_PER_USER for a connection about to become ``user_id`` as
        ``conn_id`` (``auth``): the hub's count first (no wait), then the user's
        connections on every worker and pod (with Redis: a place claimed for ``conn_id``
        until it is registered). Whether a place was claimed (none without a cap)."""
        cap = self.settings.max_connections_per_user
        if not cap:
            return False
        if (self.hub.connections_of(user_id) >= cap
                or not self.stores.presence.claim(conn_id, user_id, cap)):
            raise ProtocolError(ErrorCode.TOO_MANY_CONNECTIONS,
                                f"at most {cap} connections per user", request_id)
        return True

    def _renamed_conn_id(self, session: Session) -> str:
        """The id a connection takes when it becomes another user (:meth:`_become`)."""
        return f"{session.conn_id.partition('~')[0]}~{next(self._renamed)}"

    def _become(self, session: Session, identity: Identity, conn_id: str) -> None:
        """The connection authenticates as another user (a guest signing in): the new
        identity is registered (:meth:`_register`), under a new ``conn_id``, then the old
        one leaves everything it was part of, as a closing connection does. If the new
        one cannot be registered, the connection stays what it was (the ``auth`` is
        answered ``unavailable``; its retry starts afresh). What the store could not do
        for the old one is retried from tick() as the old identity (``former``, a
        session nobody writes to), never as the new one: the store keys connections by
        ``conn_id``, and the new one's is another."""
        # Counted against MAX_CONNECTIONS_PER_USER (checked by _auth just before: with no
        # wait since, or with a place claimed in Redis) from here, while its registration
        # waits for the store.
        self.hub.arriving.add(identity.user_id)
        recoveries = self._recoveries
        self._register(session, conn_id, User(identity.user_id, identity.username),
                       arriving=True)
        former = Session(session.conn_id, Identity(session.user_id, session.username, None),
                         session.authenticated, session.remote_addr)
        for i, (who, room) in enumerate(self._unfinished):  # queued before, as the old identity
            if who is session:
                self._unfinished[i] = (former, room)
        rooms = list(session.rooms)
        for room in rooms:
            self._forget_locally(session, room)
        self.hub.remove_user(session)
        # The new identity from here on, before the old one's store steps: a recovery
        # (Chat.resync) running while they wait registers the connection as what it is
        # now; what it registered of the old one meanwhile, those steps take out.
        session.conn_id = conn_id
        session.user_id, session.username = identity.user_id, identity.username
        session.held_send = session.refused_sends = None  # the old user's sends
        session.posts_empty_until = session.sized_empty_until = 0.0  # and buckets
        if self._recoveries != recoveries:
            # A recovery began while the new identity was being registered: it may have
            # taken that registration out (Redis carried it out before the rollback's
            # clean-up) and registered the connection as the old identity, which it still
            # was (and which the steps below take out). Registered again, as it is now.
            try:
                self.stores.presence.connect(conn_id, session.user)
            except Exception as exc:
                log.warning("could not register %s again after a recovery (%s); closing "
                            "it with 1013", conn_id, exc)
                session.close(CloseCode.TRY_AGAIN_LATER, "temporarily unavailable; retry")
        for room in rooms:
            self._leave_in_store(former, room)
        self._disconnect_in_store(former)

    def _join(self, session: Session, cmd: Join) -> None:
        room = cmd.room
        member = room in session.rooms
        if not member and len(session.rooms) >= self.settings.max_rooms_per_connection:
            raise ProtocolError(ErrorCode.TOO_MANY_ROOMS,
                                f"at most {self.settings.max_rooms_per_connection} rooms "
                                "per connection", cmd.request_id)
        # From here a kick for the room is held until the join is done (see admit):
        # every way out below takes that mark away again.
        self.access.admit(session, room, cmd.request_id, joining=True)
        # The session listens (events held back) before it is added to the room, so
        # whatever happens after its store join reaches it: messages above `last_id`
        # and presence of anyone its `users` list does not show yet.
        self.hub.begin_recovery(room, session)
        try:
            up_to, members, base = self._join_and_replay(session, cmd, member)
        except BaseException:
            # Never half-joined: a member goes on live (with what was held meanwhile);
            # a newcomer is taken out again, so a retry starts afresh. Also from the
            # store, even if its join seemed to fail: a join whose reply timed out may
            # have run there (leaving is a no-op where it did not).
            if member:
                if not self.hub.abort_recovery(room, session):
                    self._close_missed(session, room)
            else:
                self._leave_room(session, room)
            session.access.joining.pop(room, None)
            raise
        caught_up = self.hub.finish_recovery(room, session, up_to,
                                             {m.user_id for m in members}, base)
        session.access.joining.pop(room, None)
        if not caught_up:  # a pub/sub outage meanwhile lost what it was not given
            self._close_missed(session, room)
            return
        self._carry_out_held_kicks(session, room)

    def _join_and_replay(self, session: Session, cmd: Join, member: bool
                         ) -> tuple[int, list[User], int | None]:
        """Store join (unless a member), ``joined`` and the replay: (replayed up to,
        members, with ``since``: the id above which the room's own stream, replay and
        live, brings the session every message, so a retry of one is not echoed)."""
        room = cmd.room
        if member:
            members = self.stores.rooms.members(room)
        else:
            result = self.stores.rooms.join(room, session.conn_id, session.user)
            session.rooms.add(room)
            self._registered(session, room)
            members = result.members
            if result.first_of_user:
                self.stores.messages.room_occupied(room)
                self._publish_presence(session, room, "online")
        reply: dict[str, Any] = {"room": room, "users": [m.as_json() for m in members]}
        epoch = self.stores.messages.epoch(room)
        if cmd.since is None:
            up_to = reply["last_id"] = self.stores.messages.last_id(room)
            reply["epoch"] = epoch
            joined = encode_reply("joined", cmd.request_id, **reply)
            self._pay_for_size(session, cmd, len(joined))  # a big room's users
            session.send(joined)
            return up_to, members, None  # retries are echoed, as they always were
        if cmd.since and cmd.epoch is not None and cmd.epoch != epoch:
            # Counted in another numbering (a memory server restarted, Redis lost its data,
            # the room unused past ROOM_NUMBERING_TTL): its ids name other messages, and
            # replaying ours above it would pass them off as what followed.
            replay = Replay([], False)
        else:
            replay = self.stores.messages.since(room, cmd.since)
        if replay.messages:
            up_to = message_id_of(replay.messages[-1]) or cmd.since
        elif replay.complete:
            up_to = cmd.since
        else:
            # Nothing to replay and not recovered: `since` may be beyond every id the
            # room has (a memory server that restarted numbers from 1 again). What is
            # live from here on starts above the room's real last id, not above `since`.
            up_to = self.stores.messages.last_id(room)
        reply["recovered"] = replay.complete
        reply["last_id"] = up_to
        reply["epoch"] = epoch
        joined = encode_reply("joined", cmd.request_id, **reply)
        # The replay goes out as the client reads, outside MAX_OUTBOUND_BYTES: like a
        # history reply it pays a request token more per 64 KiB, or a client that never
        # reads would have the worker hold a replay for every join it sends; so does
        # the users list of a big room in `joined`. Refused: the join is undone (see
        # _join) and nothing is sent; the client retries later.
        self._pay_for_size(session, cmd, len(joined) + sum(map(len, replay.messages)))
        session.send(joined)
        # Paced: a long replay is written as the client reads, never all at once,
        # and what arrives meanwhile waits behind it.
        session.send_paced([text_frame(event) for event in replay.messages])
        if replay.complete:
            return up_to, members, cmd.since
        first = message_id_of(replay.messages[0]) if replay.messages else None
        return up_to, members, up_to if first is None else first - 1

    def _leave(self, session: Session, cmd: Leave) -> None:
        if cmd.room not in session.rooms:
            raise ProtocolError(ErrorCode.NOT_IN_ROOM, f"not in room {cmd.room}",
                                cmd.request_id)
        delivered = self.hub.delivered_to(cmd.room, session)
        self._leave_room(session, cmd.room)
        if delivered is not None:
            self._send_in_flight(session, cmd.room, delivered)
        session.send(encode_reply("left", cmd.request_id, room=cmd.room))

    def _send_in_flight(self, session: Session, room: str, delivered: int) -> None:
        """A member leaving gets, before ``left``, the messages accepted before its leave
        that the stream has not brought it yet (with Redis they travel through pub/sub,
        behind the store's reply): its own echoes among them, or it would never learn
        that those were stored. Out of the room already, it cannot get them twice."""
        try:
            for event in self.stores.messages.since(room, delivered).messages:
                session.send(event)
        except Unavailable as exc:
            log.warning("messages in flight to %s leaving %s not sent: %s",
                        session.conn_id, room, exc)

    def _leave_room(self, session: Session, room: str) -> None:
        """Out of the room here at once, and in the store now or, if it cannot be
        reached, from tick(): a client told to retry would only hear not_in_room, and
        its connection would stay a member in the store for the worker's life."""
        self._forget_locally(session, room)
        self._leave_in_store(session, room)

    def _leave_in_store(self, session: Session, room: str) -> None:
        try:
            self._store_leave(session, room)
        except Exception as exc:
            log.warning("could not leave room %s for %s (%s); will retry", room,
                        session.conn_id, exc)
            self._unfinished.append((session, room))

    def _forget_locally(self, session: Session, room: str) -> None:
        session.rooms.discard(room)
        self.hub.remove_member(room, session)
        if self._typing_stopped(session, room):
            try:
                self._publish_typing(session, room, False)
            except Exception:
                pass  # best effort: the typing indicator expires on the clients anyway

    def _store_leave(self, session: Session, room: str) -> None:
        result = self.stores.rooms.leave(room, session.conn_id, session.user_id)
        if result.last_of_user:
            self._publish_presence(session, room, "offline")
        if result.room_empty:
            self.stores.messages.room_emptied(room)

    def _message(self, session: Session, cmd: SendMessage) -> None:
        try:
            if cmd.room not in session.rooms:
                self._refuse_outsider(session, cmd.room, cmd.request_id)
                raise ProtocolError(ErrorCode.NOT_IN_ROOM,
                                    f"join {cmd.room} before writing to it", cmd.request_id)
            self.access.check_not_muted(session, cmd.room, cmd.request_id)
        except ProtocolError:
            self._charge_refused_post(session, cmd)
            raise
        # While reconnecting the store refuses (MessageStore.check_delivering).
        started = self.monotonic()
        draft = draft_message(cmd.room, session.username, session.user_id, cmd.text,
                              int(self.clock() * 1000), cmd.client_msg_id,
                              not session.authenticated)
        try:
            posted = self.stores.messages.post_room(cmd.room, session.user_id, draft,
                                                    self._charge(session))
        except RateLimited as exc:
            self._posts_empty(session, started, exc.retry_after_ms)
            self._refuse(session, cmd, exc.retry_after_ms)
            raise
        self._accepted(session, cmd)
        if posted.duplicate:
            # A retry: echo the original, unless this connection has it (or will have
            # it) from the room itself, e.g. in the replay of its `join` with `since`.
            if not self.hub.gets_message(cmd.room, session, posted.msg_id):
                session.send(posted.event)
        else:
            self.metrics.fanout_seconds(self.monotonic() - started)
            self.metrics.posted("room")
        if self._typists:  # nobody types on this worker, as most of the time: nothing to end
            self._end_typing_of(session, cmd.room)

    def _refuse_outsider(self, session: Session, room: str, request_id: RequestId) -> None:
        """``forbidden`` rather than ``not_in_room`` for a room the grants do not open."""
        if not self.access.allowed_by_grants(session, room) and not self.access.is_private(room):
            raise forbidden(f"room {room} is not open to you", request_id, room=room)

    def _charge_refused_post(self, session: Session, cmd: SendMessage | SendDm) -> None:
        """A message or DM refused before it reached the store (not in the room, muted)
        spends its token all the same, as every post does on the memory backend, whose
        check comes before the command: with Redis the post script spends them
        (charge.lua), and such refusals cost nothing, never rate_limited nor closed
        (4102) however fast they came. An empty bucket answers ``rate_limited`` instead,
        as the memory backend does."""
        if self._posts_charge:
            self._check_rate(session, cmd)

    def _dm(self, session: Session, cmd: SendDm) -> None:
        try:
            self.access.check_not_muted(session, None, cmd.request_id)
        except ProtocolError:
            self._charge_refused_post(session, cmd)
            raise
        online: bool | None = None  # Redis: the post itself checks (RecipientOffline)
        if not self.stores.messages.checks_recipient:
            online = self.stores.presence.is_online(cmd.to)
            # With persistence a DM to an offline user who has connected before is kept.
            if not online and not self.stores.messages.keeps_dms_for(cmd.to):
                raise ProtocolError(ErrorCode.USER_NOT_FOUND, "no such user online",
                                    cmd.request_id)
        draft = draft_dm(cmd.to, session.username, session.user_id, cmd.text,
                         int(self.clock() * 1000), cmd.client_msg_id,
                         not session.authenticated)
        asked = self.monotonic()
        try:
            posted = self.stores.messages.post_dm(session.user_id, cmd.to, draft,
                                                  online, self._charge(session))
        except InboxFull as exc:
            raise ProtocolError(ErrorCode.INBOX_FULL, str(exc), cmd.request_id) from None
        except RecipientOffline:
            raise ProtocolError(ErrorCode.USER_NOT_FOUND, "no such user online",
                                cmd.request_id) from None
        except RateLimited as exc:
            self._posts_empty(session, asked, exc.retry_after_ms)
            self._refuse(session, cmd, exc.retry_after_ms)
            raise
        self._accepted(session, cmd)
        if not posted.duplicate:
            self.metrics.posted("dm")
            if online is False:
                self.deliver_if_arrived(cmd.to, posted)
        elif not posted.redelivered:
            session.send(posted.event)

    def deliver_if_arrived(self, user_id: str, posted: Posted) -> None:
        """A DM kept for a user offline at the check: if she has connected since, her
        connection may have read her kept DMs before this one was committed, and would
        not get it before her next connection. It goes to her connections now too (it
        stays kept: at least once, and DM ids are unique)."""
        try:
            if self.stores.presence.is_online(user_id):
                self.stores.messages.deliver_kept(user_id, posted)
        except Unavailable as exc:  # kept: it comes with her next connection
            log.warning("DM %d kept for %s, who connected meanwhile, not delivered live: %s",
                        posted.msg_id, user_id, exc)

    def _typing(self, session: Session, cmd: Typing) -> None:
        if cmd.room not in session.rooms:
            self._refuse_outsider(session, cmd.room, cmd.request_id)
            raise ProtocolError(ErrorCode.NOT_IN_ROOM, f"not in room {cmd.room}",
                                cmd.request_id)
        if cmd.status:
            self.access.check_not_muted(session, cmd.room, cmd.request_id)
        if cmd.status:
            typing_for = self.settings.typing_timeout
            first_here = self._typing_started(session, cmd.room, self.monotonic() + typing_for)
            # Every `true` goes to the broker, not only the first here: with Redis, how long
            # this worker holds the user's indicator on is what the other servers see.
            self._publish_typing(session, cmd.room, True, typing_for, first_here)
        elif self._typing_stopped(session, cmd.room):
            self._publish_typing(session, cmd.room, False)

    def _typing_started(self, session: Session, room: str, deadline: float) -> bool:
        """The session's indicator in ``room`` is on until ``deadline``. True when its
        user was typing there in none of its connections here (``typing: true`` is due)."""
        session.typing[room] = deadline
        self._typing_deadlines.add(deadline, session, room)
        typists = self._typists.setdefault(room, {}).setdefault(session.user_id, set())
        first = not typists
        typists.add(session)
        return first

    def _typing_stopped(self, session: Session, room: str) -> bool:
        """The session's indicator in ``room`` goes off. True when it was on and was its
        user's last one there on this worker (``typing: false`` is due)."""
        if session.typing.pop(room, None) is None:
            return False
        users = self._typists.get(room, {})
        typists = users.get(session.user_id)
        if typists is None:
            return True
        typists.discard(session)
        if typists:
            return False
        del users[session.user_id]
        if not users:
            del self._typists[room]
        return True

    def _end_typing_of(self, session: Session, room: str) -> None:
        """The session's user wrote in ``room``: its typing indicator ends there, whichever
        of its connections here set it (its connections on other workers: when the
        message reaches them, :meth:`_deliver_room`)."""
        users = self._typists.get(room)
        typists = users.get(session.user_id) if users else None
        if not typists:
            return
        for typist in list(typists):
            self._typing_stopped(typist, room)
        # Best effort, as at a leave: the message is stored and published, and must not be
        # answered `unavailable` (its client would count it refused and hold its next
        # sends behind it); the clients expire the indicator anyway.
        with contextlib.suppress(Unavailable):
            self._publish_typing(session, room, False)

    def _deliver_room(self, room: str, event: bytes, exclude_user: str | None = None) -> None:
        """What the broker brings for a room goes to its local members; a room message
        also ends its author's typing indicators here. With Redis the author may have
        written from a connection on another worker, whose message ends the indicator a
        connection of the same user set here: it falls due at once, and the timer turns it
        off (expire_typing) within a step (this runs in the pub/sub reader, which does not
        wait for a publish of its own)."""
        if room not in self._typists:  # as a rule: nobody types there
            self.hub.deliver_room(room, event, exclude_user)
            return
        msg_id = message_id_of(event)
        # One the hub delivered before (a recovery's fill met the stream) is no news: its
        # author's indicator now is one begun since.
        fresh = msg_id is not None and msg_id > self.hub.max_seen.get(room, 0)
        self.hub.deliver_room(room, event, exclude_user)
        users = self._typists.get(room)
        if fresh and users:
            try:
                author = orjson.loads(event).get("user_id")
            except orjson.JSONDecodeError:
                return
            typists = users.get(author) if isinstance(author, str) else None
            if typists:
                now = self.monotonic()
                for typist in typists:
                    typist.typing[room] = now
                    self._typing_deadlines.add(now, typist, room)

    def _publish_typing(self, session: Session, room: str, status: bool,
                        typing_for: float | None = None, first_here: bool = False) -> None:
        """The user's indicator in ``room`` on this worker: on (``status``) for
        ``typing_for`` seconds more (``first_here``: her first connection here typing
        there), or off (the last one here stopped); the broker tells the room when that
        changes it for every server (:meth:`Broker.publish_typing`)."""
        self.stores.broker.publish_typing(
            room, session.user_id,
            encode_typing(room, session.user_id, session.username, status,
                          not session.authenticated),
            typing_for, first_here)

    def _list_users(self, session: Session, cmd: ListUsers) -> None:
        if cmd.room not in session.rooms:
            self.access.admit(session, cmd.room, cmd.request_id)
        users = [m.as_json() for m in self.stores.rooms.members(cmd.room)]
        reply = encode_reply("users", cmd.request_id, room=cmd.room, users=users)
        self._pay_for_size(session, cmd, len(reply))  # a big room's
        session.send(reply)

    def _history(self, session: Session, cmd: History) -> None:
        if cmd.room not in session.rooms:
            self.access.admit(session, cmd.room, cmd.request_id)
        # At most HISTORY_MAX_BYTES (one frame, written at once): the newest that fit,
        # `truncated: true` when older ones within `limit` were left out (page back with
        # `before`, as for any older page).
        page = self.stores.messages.history_page(cmd.room, cmd.limit, cmd.before)
        extra = {"truncated": True} if page.truncated else {}
        reply = encode_history(cmd.room, page.messages, cmd.request_id, **extra)
        self._pay_for_size(session, cmd, len(reply))  # refused: not sent, retry later
        session.send(reply)

    # -- moderation --------------------------------------------------------------------
    def _moderate(self, session: Session, cmd: Moderate) -> None:
        """A moderator's kick, mute or unmute (``mod_rooms`` in its token names the room)."""
        if not self.access.may_moderate(session, cmd.room):
            raise forbidden(f"you do not moderate {cmd.room}", cmd.request_id, room=cmd.room)
        reply: dict[str, Any] = {"action": cmd.action, "room": cmd.room, "user_id": cmd.user_id}
        if cmd.action == "kick":
            self.access.kick(cmd.room, cmd.user_id, cmd.reason, by=session.user_id)
        elif cmd.action == "mute":
            until = until_of(cmd.duration, self.clock())
            self.access.mute(cmd.user_id, cmd.room, until, by=session.user_id)
            reply["until"] = until_ms(until)
        else:
            reply["lifted"] = self.access.unmute(cmd.user_id, cmd.room, by=session.user_id)
        session.send(encode_reply("moderated", cmd.request_id, **reply))

    def _deliver_user(self, user_id: str, event: bytes) -> None:
        control = parse_control(event)
        if control is None:
            self.hub.deliver_user(user_id, event)
        else:
            self.control(user_id, control)

    def control(self, user_id: str, op: dict[str, Any]) -> None:
        """Carry out a moderation step on this worker's connections of ``user_id``
        (wschat.access publishes it to the user's channel, so every worker holding
        one of them gets it)."""
        for session in list(self.hub.users.get(user_id, ())):
            if session.closed_by_chat:
                continue
            try:
                self._control_session(session, op)
            except Exception:
                log.exception("moderation step %s failed for %s", op.get("op"), session.conn_id)

    def _control_session(self, session: Session, op: dict[str, Any]) -> None:
        kind = op.get("op")
        if kind == "kick":
            room = op["room"]
            if self.access.kick_may_be_early(session, room):
                # Its join is under way (in the room already or not yet): carried out
                # as the join ends, so that the client hears `joined` before `left`.
                self._early_kicks.append((session, op))
                return
            if room not in session.rooms:
                return
            if op.get("keep_granted") and session.access.granted_exactly(room):
                return
            self._leave_room(session, room)
            session.send(encode_reply("left", room=room, reason=op.get("reason") or "kicked",
                                      by=op.get("by"), **_ban_terms(op)))
        elif kind == "mute":
            session.access.mute_events += 1
            until = op.get("until")
            session.access.muted[op["scope"]] = float("inf") if until is None else until
            session.send(encode_reply("muted", **self._scope(op["scope"]), by=op.get("by"),
                                      until=until_ms(until)))
        elif kind == "unmute":
            session.access.mute_events += 1
            if session.access.muted.pop(op["scope"], None) is not None:
                session.send(encode_reply("unmuted", **self._scope(op["scope"])))
        elif kind == "disconnect":
            reason = "banned" if op.get("reason") == "banned" else "disconnected"
            if reason == "banned":
                session.send(forbidden("you are banned from this server", reason=reason,
                                       **_ban_terms(op)).to_event())
            self.metrics.disconnected(reason)
            session.close(CloseCode.DISCONNECTED, reason)

    def _carry_out_held_kicks(self, session: Session, room: str) -> None:
        """Kicks held while this join was under way, carried out as it ends: before the
        connection's next command (a message pipelined behind the join), not a tick later."""
        if not self._early_kicks:
            return
        held = [op for s, op in self._early_kicks if s is session and op.get("room") == room]
        if held:
            self._early_kicks = [(s, op) for s, op in self._early_kicks
                                 if not (s is session and op.get("room") == room)]
            for op in held:
                self._control_session(session, op)

    def _retry_early_kicks(self) -> None:
        """Kicks that arrived while their room's join was under way: carried out once it is
        done, dropped when it failed or took longer than any join can."""
        waiting, self._early_kicks = self._early_kicks, []
        for session, op in waiting:
            if not session.closed_by_chat:
                self._control_session(session, op)  # in the room now, still joining, or gone

    @staticmethod
    def _scope(scope: str) -> dict[str, str]:
        return {} if scope == EVERYWHERE else {"room": scope}
