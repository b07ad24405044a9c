"""The asyncio client: one connection kept alive, rooms kept joined, sends kept until acknowledged.

What it promises the app, and how:

- **Nothing lost.** Every joined room remembers the id of the last message handed to
  the app, and the ``epoch`` (the name of the room's numbering) it counts in; after a
  reconnect, or when an id is not last + 1 (a gap), the room is joined again with
  ``since`` and ``epoch``, and the server replays what was missed. When it no longer
  can (``recovered: false``; or the room's ids started again from 1, another epoch) the
  ``recovery_failed`` event says so.
- **Nothing doubled.** A room message whose id is not above the last one delivered is
  dropped; a DM id seen before is dropped.
- **Sends survive disconnections.** Each send gets a ``client_msg_id`` and waits in the
  bounded outbox until the server's echo; after a reconnect the unacknowledged ones go
  out again once their room has caught up (its replay may already hold them; after
  ``recovered: false``, with or without a replay, the answer to a ping sent behind the
  ``joined`` says it is over), and the server answers a copy it already has with the
  original.

Everything runs on one event loop; handlers are called on it, in order (a coroutine
handler's run then goes on as a task of its own, not waited for: :meth:`Client.on`).
"""

from __future__ import annotations

import asyncio
import base64
import calendar
import contextvars
import functools
import inspect
import json
import logging
import math
import re
import ssl
import sys
import time
import uuid
import weakref
from collections import OrderedDict, deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Literal, Self, TypedDict, TypeVar, cast, overload
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus, InvalidURI
from websockets.uri import parse_uri

from .backoff import Backoff
from .errors import (RETRYABLE_CODES, ChatError, ClientClosed, Disconnected, RequestTimeout)
from .events import (ConnectionState, DirectMessage, Disconnect, Event, EventName, HistoryPage,
                     Joined, Message, Muted, Payload, Presence, RecoveryFailed, Removed,
                     RoomInfo, RoomPosition, RoomState, RoomStateChange, StateChange,
                     TypingEvent, Unmuted, User, Welcome, WIRE_ID_MAX, wire_epoch, wire_id)
from .outbox import Outbox, OutboxStore, PendingSend
from .pacer import JOIN_RETRY_DEFAULT, JOIN_WINDOW, REQUEST_WINDOW, JoinPacer, Pacer
from .stream import Events, _Feed

log = logging.getLogger("wschat_client")
T = TypeVar("T")
FeedT = TypeVar("FeedT", bound=_Feed)

Handler = Callable[[Any], Any]
"""A handler as the client keeps it; :meth:`Client.on` types each event's (its overloads)."""
Remove = Callable[[], None]
"""What :meth:`Client.on` returns: removes the handler."""
UrlSource = str | Callable[[], str | Awaitable[str]]
TokenSource = Callable[[], str | Awaitable[str]]

EVENTS = frozenset({"state", "connected", "disconnected", "message", "dm", "presence", "typing",
                    "joined", "recovery_failed", "room_state", "removed", "muted", "unmuted",
                    "ack", "error", "user_changed"})
REPLY_TYPES = frozenset({"welcome", "left", "users", "history", "pong", "moderated"})
DM_IDS_KEPT = 10_000
JOIN_RETRY_MAX = 5.0  # seconds: the longest wait of a join refused unavailable (as JS)
REPLAY_END_UNKNOWN = WIRE_ID_MAX + 1  # above every id taken: only the ping's answer ends it
# In a coroutine handler's task, and in every task it starts (they copy its context): that
# handler's task. A close() called there does not wait for that handler, which waits for it
# (asyncio.wait_for on Python 3.11, asyncio.shield, create_task: a task of their own, not the
# handler's).
_HANDLER_TASK: contextvars.ContextVar[asyncio.Future[Any] | None] = contextvars.ContextVar(
    "wschat_client_handler_task", default=None)


@dataclass(slots=True, eq=False)
class _Room:
    info: RoomInfo
    waiters: list[asyncio.Future[Joined]] = field(default_factory=list)
    join_rid: str | None = None  # the join request in flight
    join_epoch: str | None = None  # the epoch that join carried with its since
    catch_up_to: int = 0  # the server's last_id at the latest joined: the replay ends there
    # after recovered: false, or a first joined whose last_id does not count, the next id
    # starts afresh
    accept_next: bool = False
    sync_rid: str | None = None  # a ping behind a replay that may be empty: its answer ends it
    retry: asyncio.TimerHandle | None = None
    join_refusals: int = 0  # retryable refusals of its joins in a row (their backoff)
    joined: Joined | None = None
    join_queued: bool = False  # waits in the join queue for the join pacer

    @property
    def caught_up(self) -> bool:
        # Nothing to wait for (a first join without a position too), or the replay came.
        return self.catch_up_to == 0 or (
            self.info.last_id is not None and self.info.last_id >= self.catch_up_to)


@dataclass(slots=True)
class _Request:
    kind: str
    future: asyncio.Future[dict[str, Any]] | None = None
    room: str | None = None
    since: int | None = None  # a join's: the position it resumed from (a rejoin)
    queued: _Queued | None = None  # a paced request's place in the queue (written: requeued)
    written_at: float = 0.0  # a sync ping's: when it was written (loop time)


@dataclass(slots=True, eq=False)
class _Queued:
    """A request waiting for the request pacer (:meth:`Client._flush_requests`), in the
    order of the calls (``seq``); ``read``: asked again on the next connection if this
    one drops before its answer. A ``leave`` is written even once its caller gave up (the
    room is gone for the app already: the server must hear of it), unless the connection
    goes first (the membership went with it) or the room is joined again."""
    seq: int
    frame: dict[str, Any]
    future: asyncio.Future[dict[str, Any]]
    read: bool

    @property
    def kept(self) -> bool:
        kind: str = self.frame["type"]  # the frame's own type: the client wrote it
        return kind == "leave"


@dataclass(slots=True)
class _PacedLine:
    """The gate a queue of joins, or of the other requests, passes through: its pacer, and
    the timer of the flush that waits for the pacer."""
    pacer: JoinPacer
    timer: asyncio.TimerHandle | None = None

    def write_now(self, flush: Callable[[], None]) -> float | None:
        """The loop's time now if the pacer lets the next one be written now, else None:
        the window is full (an answer frees a place), or ``flush`` runs when the next may
        go."""
        loop = asyncio.get_running_loop()
        now = loop.time()
        at = self.pacer.next_at(now)
        if at is None:
            return None
        if at > now:
            self.timer = loop.call_at(at, flush)
            return None
        return now

    def stop(self) -> None:
        """The flush waiting for the pacer is not run."""
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def reset(self) -> None:
        """A new connection, or none: the pacer starts afresh, no flush waits."""
        self.pacer.reset()
        self.stop()


class _NoToken(Exception):
    """``get_token`` gave no token (None, ``""``)."""


def token_expiry(token: str | None) -> float | None:
    """The ``exp`` claim of a JWT (Unix seconds), read without verifying; None if absent."""
    if token is None:
        return None
    try:
        payload = token.split(".")[1]
        claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
        exp = claims.get("exp")
        return float(exp) if isinstance(exp, (int, float)) else None
    except Exception:
        return None


REFRESH_FLOOR = 1.0  # seconds: the soonest a token is replaced, even one already expired


def refresh_delay(remaining: float) -> float:
    """Seconds until a token with ``remaining`` seconds of life should be replaced:
    a quarter of its life before expiry, at most a minute before, and never sooner than
    ``REFRESH_FLOOR``: a token already past its ``exp`` on this clock (one ahead of the
    server's, whose leeway still takes it) was replaced at once, again and again."""
    return max(REFRESH_FLOOR, remaining - min(60.0, remaining / 4))


async def _handler_run(result: Awaitable[Any]) -> Any:
    """A coroutine handler's run, in a task whose context (copied by every task it starts)
    names that task: :meth:`Client.close` called there does not wait for it."""
    _HANDLER_TASK.set(asyncio.current_task())
    return await result


async def _maybe_await(value: Any) -> Any:
    return await value if inspect.isawaitable(value) else value


class ClientOptions(TypedDict, total=False):
    """The keyword options of :class:`Client`, for ``SyncClient(url, **options)``: a type
    checker holds each to its type there too (a misspelt one is an error). The same names
    and types as ``Client.__init__``'s (``tests/test_typing.py`` compares them)."""

    token: str | None
    get_token: TokenSource | None
    username: str | None
    request_timeout: float
    send_timeout: float | None
    connect_timeout: float
    backoff: Backoff | None
    max_outbox: int
    max_in_flight: int
    max_joins_in_flight: int
    max_requests_in_flight: int
    outbox_store: OutboxStore | None
    ack_timeout: float
    typing_idle: float
    websocket_options: dict[str, Any] | None


class EventHandlers:
    """``on()``, shared by :class:`Client` and :class:`~wschat_client.SyncClient`: its
    overloads hold each event's handler to that event's payload for a type checker."""

    # One overload per event name, so that a type checker holds an app's handler to the
    # payload of its event (the table in events.py): `on("message", h)` takes an `h` that
    # accepts a Message. The last one is for a name the app holds in an EventName variable.
    # A handler returns anything (an awaitable is run as a task): `object`.
    @overload
    def on(self, event: Literal["state"], handler: Callable[[StateChange], object]) -> Remove:
        ...

    @overload
    def on(self, event: Literal["connected", "user_changed"],
           handler: Callable[[Welcome], object]) -> Remove:
        ...

    @overload
    def on(self, event: Literal["disconnected"],
           handler: Callable[[Disconnect], object]) -> Remove:
        ...

    @overload
    def on(self, event: Literal["message"], handler: Callable[[Message], object]) -> Remove:
        ...

    @overload
    def on(self, event: Literal["dm"], handler: Callable[[DirectMessage], object]) -> Remove:
        ...

    @overload
    def on(self, event: Literal["presence"], handler: Callable[[Presence], object]) -> Remove:
        ...

    @overload
    def on(self, event: Literal["typing"], handler: Callable[[TypingEvent], object]) -> Remove:
        ...

    @overload
    def on(self, event: Literal["joined"], handler: Callable[[Joined], object]) -> Remove:
        ...

    @overload
    def on(self, event: Literal["recovery_failed"],
           handler: Callable[[RecoveryFailed], object]) -> Remove:
        ...

    @overload
    def on(self, event: Literal["room_state"],
           handler: Callable[[RoomStateChange], object]) -> Remove:
        ...

    @overload
    def on(self, event: Literal["removed"], handler: Callable[[Removed], object]) -> Remove:
        ...

    @overload
    def on(self, event: Literal["muted"], handler: Callable[[Muted], object]) -> Remove:
        ...

    @overload
    def on(self, event: Literal["unmuted"], handler: Callable[[Unmuted], object]) -> Remove:
        ...

    @overload
    def on(self, event: Literal["ack"],
           handler: Callable[[Message | DirectMessage], object]) -> Remove:
        ...

    @overload
    def on(self, event: Literal["error"], handler: Callable[[ChatError], object]) -> Remove:
        ...

    @overload
    def on(self, event: EventName, handler: Callable[[Payload], object]) -> Remove:
        ...

    def on(self, event: str, handler: Handler) -> Remove:
        """Call ``handler(payload)`` for each ``event`` (names and payloads: :mod:`.events`;
        an overload per name holds ``handler`` to its payload's type for a type checker).

        A handler may be a coroutine function: each call then runs as a task of its own,
        which the client keeps until it ends and whose exception it logs, as a plain
        handler's. The client does not wait for it: the next event is handed on at once,
        so a slow coroutine handler holds nothing back and its tasks may pile up (for
        one event at a time, queue the events in a plain handler and work the queue in
        one task). :meth:`close` waits for the ones still running, ``connect_timeout``
        at most (then cancels them). Returns a function that removes the handler (once:
        calling it again does nothing). On a :class:`~wschat_client.SyncClient` the
        handlers run on the client's thread.
        """
        return self._add_handler(event, handler)

    def _add_handler(self, event: str, handler: Handler) -> Remove:
        raise NotImplementedError


class Client(EventHandlers):
    """A wschat client that reconnects, recovers and resends by itself.

    Args:
        url: ``ws://host:port/ws``, or a function (plain or async) returning the URL
            for each connection attempt (to move to another server). One that is no
            ``ws://`` or ``wss://`` URL raises ``ValueError`` here; the function's, or
            the function raising, is an ``error`` event (code ``connect``) and another
            attempt after the backoff.
        token: a JWT sent on the upgrade (``Authorization: Bearer``).
        get_token: a function (plain or async) returning a fresh JWT; called before
            each connection attempt and again before the token expires (the new one is
            sent with ``auth`` on the open connection; another user's token signs it in
            as that user: the ``user_changed`` event, and every room joined again with
            ``since``). Takes precedence over ``token``.
            One that raises is an ``error`` event (code ``token``); one that returns no
            token (None, ``""``) before a connection attempt stops the client (4001).
        username: a guest name (``?username=``) when no token is used.
        request_timeout: seconds ``join``, ``leave``, ``history`` and ``list_users``
            wait (including for a connection) before raising :class:`RequestTimeout`.
        send_timeout: default seconds ``send`` and ``dm`` wait for their
            acknowledgement; None (the default) waits as long as it takes. A send that
            times out stays in the outbox and is still delivered, once.
        connect_timeout: seconds for the TCP + WebSocket handshake and the ``welcome``.
        backoff: reconnect timing (defaults: 0.5 s .. 20 s with full jitter).
        max_outbox: unacknowledged sends kept at most; past it ``send`` raises
            :class:`OutboxFull`.
        max_in_flight: sends on the wire at once; the rest wait their turn, so a long
            outbox does not flood the server after a reconnect. Keep it within the
            server's ``RATE_LIMIT_BURST`` (20 by default): once a burst is spent each
            send on the wire can be refused, and more than twice the burst refused in
            a row gets the connection closed (4102). After a ``rate_limited`` refusal
            the window starts again at one send and sends are paced at the server's
            rate (see :class:`~wschat_client.pacer.Pacer`).
        max_joins_in_flight: joins on the wire at once (4); the rest, a reconnect's
            rejoins of many rooms too, wait their turn. They draw on the user's request
            bucket (``RATE_LIMIT_REQUESTS_BURST``, shared by all the user's connections):
            after a ``rate_limited`` join no join is written before its
            ``retry_after_ms``, the refused ones go again first, one at a time and then
            at the server's pace, with a growing pause while they are refused still
            (:class:`~wschat_client.pacer.JoinPacer`): a few refusals come in a row, not
            the 2 x ``RATE_LIMIT_BURST`` the server closes with 4102.
        max_requests_in_flight: the other requests (:meth:`ping`, :meth:`history`,
            :meth:`list_users`, :meth:`leave`, :meth:`kick`, :meth:`mute`,
            :meth:`unmute`) on the wire at once (4); the rest wait their turn, in the
            order of the calls. They draw on the same request bucket, and are paced as
            joins are (a pacer of their own): after a ``rate_limited`` answer none is
            written before its ``retry_after_ms``, the refused one goes again first (the
            server did not carry it out), then one at a time at the server's pace. A
            call's ``timeout`` counts its wait in the queue: one that waits too long
            raises :class:`RequestTimeout` and is never written. Reads cut off by a lost
            connection are asked again on the next one, through the same queue.
        outbox_store: persists the outbox across runs of the app (see
            :class:`FileOutboxStore`).
        ack_timeout: seconds without an echo after which a send is written again on
            the same connection (the server's dedupe makes that harmless).
        typing_idle: seconds after the last :meth:`typing` call before ``status:
            false`` is sent by itself.
        websocket_options: extra keyword arguments for ``websockets.connect``.
    """

    def __init__(self, url: UrlSource, *, token: str | None = None,
                 get_token: TokenSource | None = None, username: str | None = None,
                 request_timeout: float = 10.0, send_timeout: float | None = None,
                 connect_timeout: float = 10.0, backoff: Backoff | None = None,
                 max_outbox: int = 1000, max_in_flight: int = 16,
                 max_joins_in_flight: int = JOIN_WINDOW,
                 max_requests_in_flight: int = REQUEST_WINDOW,
                 outbox_store: OutboxStore | None = None, ack_timeout: float = 10.0,
                 typing_idle: float = 3.0,
                 websocket_options: dict[str, Any] | None = None) -> None:
        self._url = url if callable(url) else _websocket_url(url)  # a typo raises here
        self._token = token
        self._get_token = get_token
        self._guest_name = username
        self.request_timeout = request_timeout
        self.send_timeout = send_timeout
        self.connect_timeout = connect_timeout
        self.backoff = backoff or Backoff()
        self.max_in_flight = max_in_flight
        self.ack_timeout = ack_timeout
        self.typing_idle = typing_idle
        self._ws_options = dict(websocket_options or {})
        self._outbox = Outbox(max_outbox, outbox_store, self._store_failed)
        self._restored = False

        self.state = ConnectionState.DISCONNECTED
        self.user_id: str | None = None
        self.username: str | None = None
        self.authenticated = False

        self._handlers: dict[str, list[Handler]] = {name: [] for name in EVENTS}
        self._rooms: dict[str, _Room] = {}
        self._requests: dict[str, _Request] = {}
        self._sent: dict[str, PendingSend] = {}  # request id -> send on the wire
        # Request ids of earlier writes of sends written again (ack_timeout): their late
        # answers are no news (the latest write is answered on its own), as in JS.
        self._stale: dict[str, PendingSend] = {}
        # Targets (PendingSend.key) whose send was refused with a retryable code: one send
        # at a time there until one gets through. Only while the outbox holds one of theirs
        # (_unprobe): a send that fails instead leaves nothing behind.
        self._probing: set[str] = set()
        # The ids of the DMs delivered, the newest DM_IDS_KEPT: a DM id seen is a double.
        # Kept across connections only with persistence (the welcome has dm_backlog), where a
        # page of kept DMs may come again (_serve).
        self._dm_seen: OrderedDict[int, None] = OrderedDict()
        # Every user_id a welcome gave this client (a guest gets a new one per connection):
        # only an echo from one of them acknowledges a send (_is_echo).
        self._own_ids: set[str] = set()
        self._typing: dict[str, tuple[float, asyncio.TimerHandle]] = {}
        self._ready: list[asyncio.Future[None]] = []

        self._ws: ClientConnection | None = None
        self._out: asyncio.Queue[str] | None = None
        self._generation = 0
        self._next_rid = 0
        self._run_task: asyncio.Task[None] | None = None
        self._refresh_task: asyncio.Task[None] | None = None
        self._wake: asyncio.Event | None = None
        self._flush_timer: asyncio.TimerHandle | None = None
        self._closing = False
        self._retry_after = 0.0  # from the latest rate_limited error, for a 4102
        self._pacer = Pacer(max_in_flight)  # the window, and the pace after rate_limited
        # Joins wait their turn: at most max_joins_in_flight on the wire, and after a
        # rate_limited join none before its retry_after_ms, then at the server's pace
        # (the request bucket is not the sends' bucket: a pacer of their own).
        self._join_line = _PacedLine(JoinPacer(max_joins_in_flight, self.backoff.random))
        self._join_queue: deque[_Room] = deque()
        # The other requests wait their turn too, in the order of the calls (a refused or
        # cut-off one goes back to its place): the same rules, a pacer of their own.
        self._request_line = _PacedLine(JoinPacer(max_requests_in_flight, self.backoff.random))
        self._request_queue: list[_Queued] = []
        self._next_seq = 0
        self.last_close: Disconnect | None = None
        self._leaving: set[asyncio.Future[None]] = set()  # leaves their callers may not await
        # Sends' futures -> their send()/dm() calls still waiting (_fail: none, an error event)
        self._send_waiters: dict[asyncio.Future[Any], int] = {}
        # Coroutine handlers running: asyncio keeps only a weak reference to a task, and one
        # awaiting what nothing else refers to would be collected before its end.
        self._handling: set[asyncio.Future[Any]] = set()
        # Tasks inside close(), and the handlers that started them (_HANDLER_TASK): one entry
        # per close() call, so one that returns takes away its own only.
        self._closers: list[asyncio.Future[Any] | None] = []
        # The iterators of events(), weakly: one the app dropped (after a break) is gone with
        # its queue at once, its reference pruned by the next event. Not a WeakSet: a
        # SyncEvents dropped on the app's thread would change the set there, under this loop's
        # iteration of it. And whether the client is closed or stopped for good (a new one
        # then ends at once; connect() starts the client again).
        self._feeds: list[weakref.ref[_Feed]] = []
        self._feeds_ended = False

    # -- events --------------------------------------------------------------------------
    def _add_handler(self, event: str, handler: Handler) -> Remove:
        if event not in EVENTS:
            raise ValueError(f"unknown event {event!r}; one of {sorted(EVENTS)}")
        self._handlers[event].append(handler)
        added = True

        def remove() -> None:  # a second call does nothing (it raised ValueError), as in JS
            nonlocal added
            if added:
                added = False
                self._handlers[event].remove(handler)
        return remove

    def events(self) -> Events:
        """Every event from now on, for ``async for``: an :class:`~wschat_client.Event` (its
        ``name``, as :meth:`on` takes, and its ``payload``, what that event's handler gets),
        in the order the handlers get them (each event is queued in every iterator before
        the handlers are called). The queue is unbounded, as the Rust client's ``Events``
        (the client never waits for the app; one read of the socket hands on hundreds of
        events at once): read it, or drop the iterator (``break``: the client keeps only a
        weak reference, so nothing is left behind), or :meth:`Events.close
        <wschat_client.Events.close>` it. Several may run at once, each with every event.

        The iteration ends, without an exception, once the events from before the client was
        closed are read: after :meth:`close`, and after a stop for good (its ``error`` event,
        a :class:`ClientClosed` with the ``close_code``, is the last, as for ``on``).
        Made on a closed client, it ends at once; before :meth:`connect`, it waits for it.
        :meth:`Events.position <wschat_client.Events.position>` follows the events read
        from it: persist that, not :attr:`rooms`, which may be ahead of them."""
        return self._subscribe(Events())

    def _subscribe(self, feed: FeedT) -> FeedT:
        """Have ``feed`` get every event from now on (on the client's loop)."""
        feed._start({name: RoomPosition(r.info.last_id, r.info.epoch)
                     for name, r in self._rooms.items()}, self._feeds_ended)
        if not self._feeds_ended:
            self._feeds.append(weakref.ref(feed))
        return feed

    def _live_feeds(self) -> list[_Feed]:
        """The iterators the app still holds; the references of the others dropped."""
        feeds = [feed for ref in self._feeds if (feed := ref()) is not None]
        if len(feeds) < len(self._feeds):
            self._feeds = [ref for ref in self._feeds if ref() is not None]
        return feeds

    def _end_feeds(self) -> None:
        """Closed or stopped for good: the iterators end once what they hold is read."""
        self._feeds_ended = True
        for feed in self._live_feeds():
            feed._end()
        self._feeds = []

    def _emit(self, event: str, payload: Any) -> None:
        if self._feeds:
            # Queued before the handlers run: an event a handler causes (nested) comes after
            # this one, and an iterator a handler makes starts after it. The room's position
            # goes with it, for the iterator to record as it hands it over.
            room = getattr(payload, "room", None)
            position = None
            if isinstance(room, str):
                if (r := self._rooms.get(room)) is not None:
                    position = RoomPosition(r.info.last_id, r.info.epoch)
            else:
                room = None
            item = Event(cast(Any, event), payload)
            for feed in self._live_feeds():
                feed._push(item, room, position)
        for handler in list(self._handlers[event]):
            try:
                result = handler(payload)
                if inspect.isawaitable(result):
                    task = asyncio.ensure_future(_handler_run(result))
                    self._handling.add(task)
                    task.add_done_callback(functools.partial(self._handled, event))
            except (Exception, asyncio.CancelledError):
                # CancelledError too: a plain call cannot be where a cancellation lands (that
                # is an await), so it is the handler's own (the result of a cancelled future),
                # and it ended the client's task, the socket left open, the state connected.
                log.exception("a %r handler failed", event)

    def _handled(self, event: str, task: asyncio.Future[Any]) -> None:
        """A coroutine handler's task ended: forgotten, and its exception logged."""
        self._handling.discard(task)
        if not task.cancelled() and (exc := task.exception()) is not None:
            log.error("a %r handler failed", event, exc_info=exc)

    def _store_failed(self, exc: Exception) -> None:
        log.warning("the outbox store failed: %s", exc)
        self._emit("error", ChatError("storage", f"the outbox store failed: {exc}"))

    def _set_state(self, new: ConnectionState) -> None:
        old, self.state = self.state, new
        if old is not new:
            self._emit("state", StateChange(old, new))

    def _set_room_state(self, room: _Room, new: RoomState) -> None:
        old, room.info.state = room.info.state, new
        if old is not new:
            self._emit("room_state", RoomStateChange(room.info.name, old, new))

    # -- public API ------------------------------------------------------------------------
    @property
    def rooms(self) -> dict[str, RoomInfo]:
        """The rooms the app joined (state, last id delivered, users at the last join, and
        the epoch the last id counts in: persist it with the id, for :meth:`join`)."""
        return {name: RoomInfo(r.info.name, r.info.state, r.info.last_id, list(r.info.users),
                               r.info.epoch)
                for name, r in self._rooms.items()}

    @property
    def pending(self) -> list[PendingSend]:
        """Sends not yet acknowledged, oldest first."""
        return list(self._outbox)

    async def connect(self, *, wait: bool = True, timeout: float | None = None) -> None:
        """Start connecting (and keep the connection up until :meth:`close`).

        Args:
            wait: wait until connected (or a terminal refusal: :class:`ClientClosed`).
            timeout: seconds to wait; default ``connect_timeout`` x 3.
        """
        if self._run_task is None or self._run_task.done():
            self._closing = False
            self._feeds_ended = False  # iterators made from now on get the new run's events
            self._restore_outbox()
            self._run_task = asyncio.create_task(self._run(), name="wschat-client")
        if wait:
            await self._wait_connected(self._deadline(_given(timeout, 3 * self.connect_timeout)))

    async def close(self) -> None:
        """Close the connection and stop reconnecting. Unacknowledged sends stay in the
        outbox (and its store); their awaitables raise :class:`ClientClosed`, also when
        this call is cancelled while it closes the socket (the client is closed all the
        same: nothing waits for a reconnect that will not come).

        Then it waits for the coroutine handlers still running, and the rest of the
        leaves not awaited (:meth:`leave` cancelled), to end by themselves (a message
        handed to a handler counts as delivered: cutting its handler short could lose
        it), and the app's loop may end after this call (``asyncio.run`` cancels what
        is left). What they await of the client fails with :class:`ClientClosed`. It
        waits ``connect_timeout`` at most: those still running then are cancelled (a
        warning says how many), so a handler that waits for something that never
        comes cannot hold ``close()`` for ever. A handler that calls ``close()`` is not
        waited for by a ``close()`` call (its own, or another handler's: each would
        wait for the other), also when it awaits it in a task it started
        (``asyncio.wait_for`` on Python 3.11, ``asyncio.shield``, ``create_task``).
        Cancelling this call stops the wait, not them."""
        # This task, and the handler it runs for, even in a task of its own (_HANDLER_TASK)
        ours = [asyncio.current_task(), _HANDLER_TASK.get()]
        self._closers.extend(ours)
        try:
            await self._close()
            await self._wait_for_handlers(asyncio.get_running_loop().time()
                                          + self.connect_timeout)
        finally:
            for task in ours:
                self._closers.remove(task)

    async def _wait_for_handlers(self, deadline: float) -> None:
        """Until no handler task is left (handlers may start more: the events of what
        they do), or ``deadline``; those left then are cancelled."""
        loop = asyncio.get_running_loop()
        while running := (self._handling | self._leaving) - set(self._closers):
            left = deadline - loop.time()
            if left <= 0:
                log.warning("close(): %d handler task(s) still running after %.1f s "
                            "(connect_timeout) cancelled", len(running), self.connect_timeout)
                for task in running:
                    task.cancel()
                return
            await asyncio.wait(running, timeout=left)

    async def _close(self) -> None:
        self._closing = True
        if self._wake is not None:
            self._wake.set()
        ws, task = self._ws, self._run_task
        try:
            if ws is not None:
                await ws.close()
            if task is not None and not task.done():
                if ws is None:
                    task.cancel()  # between attempts, or in a handshake
                done, _ = await asyncio.wait([task], timeout=self.connect_timeout)
                if not done:
                    task.cancel()
        finally:
            self._shut_down(ClientClosed())
            self._set_state(ConnectionState.DISCONNECTED)
            self._end_feeds()

    async def __aenter__(self) -> Self:
        try:
            await self.connect()
        except BaseException:
            # __aexit__ is not called when this raises: the reconnect loop would go on,
            # unseen, for as long as the app's loop runs.
            await self.close()
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def join(self, room: str, *, since: int | None = None, epoch: str | None = None,
                   timeout: float | None = None) -> Joined:
        """Join ``room`` (kept joined across reconnects until :meth:`leave`).

        ``since`` resumes after that message id, and ``epoch`` names the numbering it was
        counted in: both from ``rooms[room]`` (``last_id``, ``epoch``) of an earlier run,
        persisted together. The server then replays what came after (``recovered``), or,
        when the room's ids started again since (another epoch), replays nothing and the
        ``recovery_failed`` event says so (``epoch_changed``). Without ``epoch`` the server
        cannot tell a numbering that began again. ``epoch`` counts only with ``since``;
        both are ignored for a room already wanted.

        Raises:
            ChatError: ``invalid_message`` at once, with nothing kept, for a ``since`` that
                is not a whole number >= 0 and at most 2**53 - 1, or an ``epoch`` that is
                not a string of 1 to 64 characters without control characters (the
                server's rules); the server refused (``invalid_room``, ``too_many_rooms``,
                ``forbidden``, ...): an ``error`` event tells it too (as in the JS and
                Rust clients), and with ``since`` a ``removed`` event after it, as for a
                rejoin refused.
            ClientClosed: the client is closed (:meth:`close`, or a terminal close code),
                at once, nothing kept; before :meth:`connect` the join waits for it.
            RequestTimeout: no ``joined`` in time; the room stays wanted and is
                joined as soon as the server answers (a refusal coming later is an
                ``error`` event, the room dropped).
        """
        position = None if since is None else wire_id(since)
        if since is not None and position is None:
            raise ChatError("invalid_message", f"join {room}: since must be a whole number "
                            f">= 0 and at most 2**53 - 1, not {since!r:.40}")
        if epoch is not None and wire_epoch(epoch) is None:
            raise ChatError("invalid_message", f"join {room}: epoch must be 1-64 characters, "
                            f"none of them control characters, not {epoch!r:.80}")
        if self._closing or (self._run_task is not None and self._run_task.done()):
            # As a send: no connection will come (it waited its whole timeout for one).
            raise ClientClosed("the client is closed: call connect() first",
                               self.last_close.code if self.last_close else None)
        r = self._rooms.get(room)
        if r is None:
            r = self._rooms[room] = _Room(RoomInfo(
                room, RoomState.LEFT, position, epoch=epoch if position is not None else None))
            self._set_room_state(r, RoomState.JOINING)
            if self.state is ConnectionState.CONNECTED:
                self._queue_join(r)
        elif r.info.state is RoomState.JOINED and r.joined is not None:
            return r.joined
        waiter = asyncio.get_running_loop().create_future()
        r.waiters.append(waiter)
        try:
            return await self._await(waiter, _given(timeout, self.request_timeout), "joined")
        finally:
            # Timed out or cancelled: nobody awaits it any more (it stayed, one per call, and
            # the refusal or close that failed it later was "never retrieved").
            if waiter in r.waiters:
                r.waiters.remove(waiter)

    async def leave(self, room: str, *, timeout: float | None = None) -> None:
        """Leave ``room``: no more events from it.

        Its sends not yet written fail with ``not_in_room``. Those already on the wire
        are settled first, by their echo (they resolve: the server stored them) or by
        the server's refusal (they fail; a retryable one with ``not_in_room``), and only
        then is the server told: its echo comes through the room, so leaving first
        could lose it. One still unanswered when ``timeout`` or ``ack_timeout`` ends,
        or when the connection closes, fails with ``not_in_room``: it may have been stored.
        A :meth:`join` of the room meanwhile wins: the leave is then not written (it
        would reach the server after that join, and the room would go silent). Nor is it
        for a room not joined on this connection, whose join still waits for the join
        pacer or for its retry: that join is never written (a :meth:`join` awaiting it
        raises ``not_in_room``), and the server, which does not have the user in the room,
        would only answer ``not_in_room``, for a token of the user's request bucket.
        Cancelling the call does not stop the leave (the room is already gone for the
        app): its sends are settled and the server is told all the same, as for a
        cancelled :meth:`send`, which is still delivered.
        """
        r = self._rooms.pop(room, None)
        if r is None:
            return
        deadline = self._deadline(_given(timeout, self.request_timeout))
        # The server has the user in the room, or may (its join on the wire): as in the JS
        # and Rust clients, only then is it told.
        on_server = self.state is ConnectionState.CONNECTED and (
            r.info.state is RoomState.JOINED or r.join_rid is not None)
        self._set_room_state(r, RoomState.LEFT)
        written = self._drop_room(r, ChatError("not_in_room", f"left {room}"))
        leaving = asyncio.ensure_future(self._leave(room, written, deadline, on_server))
        self._leaving.add(leaving)  # a task the loop alone refers to may be collected
        leaving.add_done_callback(self._left)
        await asyncio.shield(leaving)

    def _left(self, leaving: asyncio.Future[None]) -> None:
        self._leaving.discard(leaving)
        if not leaving.cancelled():
            leaving.exception()  # nobody may await it any more (a cancelled leave): no warning

    async def _leave(self, room: str, written: list[asyncio.Future[Any]],
                     deadline: float, on_server: bool) -> None:
        """The rest of :meth:`leave`, which its cancellation does not stop; ``on_server``:
        the server has the user in the room (or may), and is told."""
        loop = asyncio.get_running_loop()
        try:
            if written:
                await asyncio.wait(written, timeout=max(0.0, deadline - loop.time()))
            if (on_server and self.state is ConnectionState.CONNECTED
                    and room not in self._rooms):
                try:
                    await self._request({"type": "leave", "room": room},
                                        max(0.001, deadline - loop.time()))
                except ChatError as err:
                    if err.code not in ("not_in_room", "disconnected"):
                        raise
        finally:
            self._fail_left(room, "no answer before the leave")

    async def send(self, room: str, text: str, *, client_msg_id: str | None = None,
                   timeout: float | None = None) -> Message:
        """Send ``text`` to a joined room; returns the message once the server stored it.

        The send waits in the outbox while disconnected and is resent after a
        reconnect; ``client_msg_id`` (generated if not given) makes resends harmless.
        Sending again with the same ``client_msg_id`` waits for the same send.

        Raises:
            ChatError: the room is not joined (``not_in_room``) or the server refused
                the message (``message_too_large``, ...).
            OutboxFull: too many sends wait for their acknowledgement.
            ClientClosed: the client was closed (before :meth:`connect`, sends queue).
            RequestTimeout: ``timeout`` passed; the send stays queued (delivered: an
                ``ack`` event; refused later: an ``error`` event).
        """
        r = self._rooms.get(room)
        if r is None:
            raise ChatError("not_in_room", f"join {room} before sending to it")
        self._typing_cleared(room)
        future = self._queue(PendingSend("message", room, text,
                                         client_msg_id or uuid.uuid4().hex))
        return cast(Message, await self._await_send(future, _given(timeout, self.send_timeout)))

    async def dm(self, to: str, text: str, *, client_msg_id: str | None = None,
                 timeout: float | None = None) -> DirectMessage:
        """Send a direct message to the user ``to`` (a ``user_id``); outbox as :meth:`send`."""
        future = self._queue(PendingSend("dm", to, text, client_msg_id or uuid.uuid4().hex))
        sent = await self._await_send(future, _given(timeout, self.send_timeout))
        return cast(DirectMessage, sent)

    async def _await_send(self, future: asyncio.Future[Any], timeout: float | None) -> Any:
        """A send's result, counting its callers still waiting (:meth:`_fail`: a refusal
        none of them hears is an ``error`` event)."""
        self._send_waiters[future] = self._send_waiters.get(future, 0) + 1
        try:
            return await self._await(future, timeout, "echo")
        finally:
            if left := self._send_waiters.pop(future) - 1:
                self._send_waiters[future] = left

    async def history(self, room: str, *, limit: int | None = None, before: int | None = None,
                      timeout: float | None = None) -> list[Message]:
        """The latest messages of ``room`` (oldest first), or those before id ``before``.

        ``limit``: how many (None: the server's default, 50; it serves at most HISTORY_SIZE).
        The messages of :meth:`history_page`, without its ``truncated``: to page back, use
        that.

        Raises:
            ChatError: ``invalid_message`` at once, with nothing written, for a ``before``
                that is not a whole number >= 1 and at most 2**53 - 1 (the server's rule:
                ``wire_id``, the rule for ids off the wire, without 0, as the server's ids
                start at 1; ``5.0`` is 5): ``0``, ``"5"``, ``2.5``, ``-1``, ``True``, nan;
                and for a ``limit`` that is not a whole number >= 1 and at most 2**53 - 1 (the
                server's rule; ``5.0`` is 5): ``0``, ``2.5``, ``"5"``, ``True``; else the
                server's refusal (``not_in_room``, ...).
            RequestTimeout: no answer in time.
        """
        page = await self.history_page(room, limit=limit, before=before, timeout=timeout)
        return page.messages

    async def history_page(self, room: str, *, limit: int | None = None,
                           before: int | None = None,
                           timeout: float | None = None) -> HistoryPage:
        """A page of ``room``'s history, as :meth:`history` asks for it (the same ``limit``,
        ``before``, rules and errors), with the server's ``truncated``: True when older
        messages within ``limit`` were left out because the reply reached the server's byte
        bound (``HISTORY_MAX_BYTES``, 1 MiB; the newest message always comes). Then the page
        may be shorter than ``limit`` although older messages are held: ask again with
        ``before`` = its oldest id. Only the JSON ``true`` counts (absent, ``"true"``, 1:
        False), as ``joined``'s ``recovered`` is read."""
        frame: dict[str, Any] = {"type": "history", "room": room}
        if limit is not None:
            count = wire_id(limit)
            if count is None or count < 1:
                raise ChatError("invalid_message", f"history {room}: limit must be a whole "
                                f"number >= 1 and at most 2**53 - 1, not {limit!r:.40}")
            frame["limit"] = count
        if before is not None:
            before_id = wire_id(before)
            if before_id is None or before_id < 1:
                raise ChatError("invalid_message", f"history {room}: before must be a whole "
                                f"number >= 1 and at most 2**53 - 1, not {before!r:.40}")
            frame["before"] = before_id
        reply = await self._request(frame, timeout, read=True)
        return HistoryPage([Message.from_wire(m) for m in reply.get("messages", [])],
                           reply.get("truncated") is True)

    async def list_users(self, room: str, *, timeout: float | None = None) -> list[User]:
        """Who is in ``room`` now, across every worker and server."""
        reply = await self._request({"type": "list_users", "room": room}, timeout, read=True)
        return [User.from_wire(u) for u in reply.get("users", [])]

    async def kick(self, room: str, user_id: str, *, reason: str | None = None,
                   timeout: float | None = None) -> dict[str, Any]:
        """Moderators: remove ``user_id`` from ``room`` now; the server's ``moderated`` reply."""
        frame = {"type": "kick", "room": room, "user_id": user_id}
        return await self._request(frame if reason is None else {**frame, "reason": reason},
                                   timeout)

    async def mute(self, room: str, user_id: str, *, duration: float | None = None,
                   timeout: float | None = None) -> dict[str, Any]:
        """Moderators: ``user_id`` may read but not post in ``room`` (for ``duration`` s)."""
        frame: dict[str, Any] = {"type": "mute", "room": room, "user_id": user_id}
        if duration is not None:
            frame["duration"] = duration
        return await self._request(frame, timeout)

    async def unmute(self, room: str, user_id: str, *,
                     timeout: float | None = None) -> dict[str, Any]:
        """Moderators: lift ``user_id``'s mute in ``room``."""
        return await self._request({"type": "unmute", "room": room, "user_id": user_id},
                                   timeout)

    async def ping(self, *, timeout: float | None = None) -> None:
        """A round trip through the server."""
        await self._request({"type": "ping"}, timeout, read=True)

    def typing(self, room: str, status: bool = True) -> None:
        """Say the user is typing in ``room``: call it on each keystroke.

        ``status: true`` goes out at most every ``typing_idle`` / 2 seconds;
        ``status: false`` goes out by itself ``typing_idle`` seconds after the last
        call, or when called with ``status=False``. A :meth:`send` to the room ends
        it too (the server clears the indicator when the message arrives).
        """
        loop = asyncio.get_running_loop()
        now = loop.time()
        previous = self._typing.pop(room, None)
        if previous is not None:
            previous[1].cancel()
        if not status:
            if previous is not None:
                self._write({"type": "typing", "room": room, "status": False})
            return
        last_true = previous[0] if previous is not None else -1e9
        if now - last_true >= self.typing_idle / 2:
            self._write({"type": "typing", "room": room, "status": True})
            last_true = now
        timer = loop.call_later(self.typing_idle, self.typing, room, False)
        self._typing[room] = (last_true, timer)

    # -- requests ----------------------------------------------------------------------------
    def _deadline(self, timeout: float) -> float:
        return asyncio.get_running_loop().time() + timeout

    async def _await(self, future: asyncio.Future[T], timeout: float | None, what: str) -> T:
        """``future``'s result within ``timeout`` (None: no limit), else RequestTimeout; the
        future itself is never cancelled (a send stays in the outbox). ``asyncio.timeout``,
        not ``asyncio.wait_for``: on Python 3.11 that returned the result of a future done in
        the same turn of the loop as the caller's cancellation, and swallowed it (a task
        cancelled by its TaskGroup or the app's shutdown went on)."""
        deadline = asyncio.timeout(timeout)
        try:
            async with deadline:
                return await asyncio.shield(future)
        except TimeoutError:
            if not deadline.expired():
                raise  # the future's own (never a local one today), not this wait's end
            raise RequestTimeout(f"no {what} within {timeout} s") from None

    async def _wait_connected(self, deadline: float) -> None:
        if self.state is ConnectionState.CONNECTED:
            return
        if self._run_task is None or self._run_task.done():
            raise ClientClosed("not connected: call connect()",
                               self.last_close.code if self.last_close else None)
        ready = asyncio.get_running_loop().create_future()
        self._ready.append(ready)
        remaining = deadline - asyncio.get_running_loop().time()
        try:
            await self._await(ready, max(0.0, remaining), "connection")
        finally:
            if ready in self._ready:
                self._ready.remove(ready)

    async def _request(self, frame: dict[str, Any], timeout: float | None,
                       read: bool = False, paced: bool = True) -> dict[str, Any]:
        """Write ``frame`` and wait for its reply. A ``read`` (it changes nothing on the
        server) whose connection drops first is asked again on the next one, within the
        same timeout; anything else fails with :class:`Disconnected`. ``paced``: it waits
        its turn in the request queue (:meth:`_flush_requests`); the timeout counts that
        wait, and one that times out there is never written."""
        deadline = self._deadline(_given(timeout, self.request_timeout))
        if not paced:
            return await self._request_now(frame, deadline, read)
        if self._run_task is None or self._run_task.done():
            raise ClientClosed("not connected: call connect()",
                               self.last_close.code if self.last_close else None)
        self._next_seq += 1
        entry = _Queued(self._next_seq, frame, asyncio.get_running_loop().create_future(), read)
        self._enqueue(entry)
        self._flush_requests()
        try:
            left = max(0.0, deadline - asyncio.get_running_loop().time())
            return await self._await(entry.future, left, f"reply to {frame['type']}")
        finally:
            # Timed out or cancelled while waiting its turn: it is never written (a leave
            # is, when its turn comes: see _Queued).
            if entry in self._request_queue and not entry.kept:
                self._request_queue.remove(entry)
            if not entry.future.done():
                entry.future.cancel()  # a late answer or requeue finds nobody waiting

    async def _request_now(self, frame: dict[str, Any], deadline: float,
                           read: bool) -> dict[str, Any]:
        """:meth:`_request` without the queue (``auth``: a token refresh waits for nobody)."""
        while True:
            await self._wait_connected(deadline)
            rid = self._rid()
            future = asyncio.get_running_loop().create_future()
            self._requests[rid] = _Request(frame["type"], future)
            self._write({**frame, "id": rid})
            try:
                left = max(0.0, deadline - asyncio.get_running_loop().time())
                return await self._await(future, left, f"reply to {frame['type']}")
            except Disconnected:
                if not read:
                    raise
            finally:
                self._requests.pop(rid, None)

    def _enqueue(self, entry: _Queued) -> None:
        """Into the request queue at its call's place (one refused or cut off goes back
        before the later calls)."""
        if entry.future.done() and not entry.kept:
            return
        queue = self._request_queue
        at = len(queue)
        while at and queue[at - 1].seq > entry.seq:
            at -= 1
        queue.insert(at, entry)

    def _flush_requests(self) -> None:
        """Write the queued requests the request pacer lets go now: at most
        ``max_requests_in_flight`` unanswered; after ``rate_limited`` none before its
        ``retry_after_ms``, then at the server's pace. Wakes up when the next may go."""
        self._request_line.stop()
        if self._out is None or self.state is not ConnectionState.CONNECTED:
            return
        while self._request_queue:
            entry = self._request_queue[0]
            if entry.future.done() and not entry.kept:  # its caller gave up
                self._request_queue.pop(0)
                continue
            if entry.kept and entry.frame["room"] in self._rooms:
                # Joined again while the leave waited its turn: the join wins (as in _leave).
                self._request_queue.pop(0)
                if not entry.future.done():
                    entry.future.set_result({"type": "left", "room": entry.frame["room"]})
                continue
            now = self._request_line.write_now(self._flush_requests)
            if now is None:
                return
            self._request_queue.pop(0)
            rid = self._rid()
            self._requests[rid] = _Request(entry.frame["type"], entry.future, queued=entry)
            self._write({**entry.frame, "id": rid})
            self._request_line.pacer.sent(rid, now)
            # One bucket on the server for joins and requests: the join pacer counts this too.
            self._join_line.pacer.sent_unpaced(now)

    def _request_answered(self, rid: Any, retry_after: float | None = None) -> None:
        """A paced request's answer came (``retry_after``: refused ``rate_limited``)."""
        now = asyncio.get_running_loop().time()
        pacer = self._request_line.pacer
        if retry_after is None:
            freed = pacer.joined(str(rid), now)
        else:
            freed = pacer.refused(str(rid), now, retry_after)
        if freed:
            self._flush_requests()

    def _rid(self) -> str:
        self._next_rid += 1
        return f"r{self._next_rid}"

    def _write(self, frame: dict[str, Any]) -> None:
        if self._out is not None:
            self._out.put_nowait(json.dumps(frame, separators=(",", ":"), ensure_ascii=False))

    # -- the outbox --------------------------------------------------------------------------
    def _queue(self, entry: PendingSend) -> asyncio.Future[Any]:
        if self._closing or (self._run_task is not None and self._run_task.done()):
            raise ClientClosed("the client is closed: call connect() first",
                               self.last_close.code if self.last_close else None)
        self._restore_outbox()  # before this send is saved over what the store kept
        entry = self._outbox.add(entry)
        future = self._future_of(entry)
        self._flush()
        return future

    def _restore_outbox(self) -> None:
        """Queue what ``outbox_store`` kept from the previous run, once: at the first
        :meth:`connect` or the first send, whichever comes first (a send queued before
        :meth:`connect` saves the outbox, which would otherwise replace the stored one)."""
        if not self._restored:
            self._restored = True
            self._outbox.restore()

    @staticmethod
    def _future_of(entry: PendingSend) -> asyncio.Future[Any]:
        if entry.future is None:
            entry.future = asyncio.get_running_loop().create_future()
            # A send nobody awaits any more (timed out) must not warn when it fails.
            entry.future.add_done_callback(lambda f: f.cancelled() or f.exception())
        return entry.future

    def _flush(self) -> None:
        """Write the sends that may go now, at most ``max_in_flight`` on the wire.

        Sends to one room (or one DM recipient) keep their order: one that must
        wait (its room is re-joining or replaying, or a refusal's retry time has
        not come) holds back the later ones. After a retryable refusal only one
        send of that target is on the wire until one gets through, so a retry
        cannot overtake the sends queued after it; after ``rate_limited`` nothing
        is written, to any target, until ``retry_after_ms`` (the bucket is the
        user's), and then the pacer lets one send go at a time, at the server's
        pace (:class:`~wschat_client.pacer.Pacer`). A send whose echo has not come
        within ``ack_timeout`` on a live connection is written again: the server
        answers a copy it already stored with the original.
        """
        if self._flush_timer is not None:
            self._flush_timer.cancel()
            self._flush_timer = None
        if self._out is None or self.state is not ConnectionState.CONNECTED:
            return
        loop = asyncio.get_running_loop()
        now, wake = loop.time(), None
        for entry in list(self._outbox):
            if entry.wire_generation == self._generation:
                due = entry.sent_at + self.ack_timeout
                if due <= now and entry.left:
                    # Its room is not ours any more: it is not written again.
                    self._fail_left_entry(entry, f"no echo within {self.ack_timeout} s")
                elif due <= now:
                    log.info("no echo for %s after %.1f s; sending it again",
                             entry.client_msg_id, self.ack_timeout)
                    self._sent.pop(entry.request_id or "", None)
                    self._stale[entry.request_id or ""] = entry
                    entry.wire_generation = None
                else:
                    wake = min(wake or due, due)
        entries = list(self._outbox)
        on_wire = {e.key for e in entries if e.wire_generation == self._generation}
        in_flight = sum(1 for e in entries if e.wire_generation == self._generation)
        held: set[str] = set()
        for entry in entries:
            key = entry.key
            if entry.wire_generation == self._generation or key in held:
                continue
            if key in self._probing and key in on_wire:
                held.add(key)
                continue
            if entry.not_before > now:
                wake = min(wake or entry.not_before, entry.not_before)
                held.add(key)
                continue
            if entry.kind == "message":
                room = self._rooms.get(entry.target)
                # A re-join (on the wire, or waiting for the join pacer) and its replay come
                # first: the replay may hold the very message this send would repeat.
                if (room is None or room.info.state is not RoomState.JOINED
                        or room.join_rid is not None or room.join_queued or not room.caught_up):
                    held.add(key)
                    continue
            at = self._pacer.next_at(now, in_flight)
            if at is None:
                break  # the window is full: an acknowledgement flushes again
            if at > now:
                wake = min(wake or at, at)
                break
            entry.request_id = self._rid()
            entry.wire_generation = self._generation
            entry.sent_at = now
            wake = min(wake or now + self.ack_timeout, now + self.ack_timeout)
            self._sent[entry.request_id] = entry
            self._write(entry.frame(entry.request_id))
            self._pacer.sent(now)
            on_wire.add(key)
            in_flight += 1
        if wake is not None:
            self._flush_timer = loop.call_at(wake, self._flush)

    def _acknowledged(self, entry: PendingSend, result: Message | DirectMessage) -> None:
        in_flight = sum(1 for e in self._outbox if e.wire_generation == self._generation)
        self._pacer.acknowledged(asyncio.get_running_loop().time(), in_flight)
        self._outbox.remove(entry)
        self._forget_stale(entry)
        self._probing.discard(entry.key)
        if entry.request_id is not None:
            self._sent.pop(entry.request_id, None)
        if entry.future is not None and not entry.future.done():
            entry.future.set_result(result)
        self._emit("ack", result)
        self._flush()

    def _refused(self, entry: PendingSend, err: ChatError) -> None:
        self._sent.pop(entry.request_id or "", None)
        entry.wire_generation = None
        room = self._rooms.get(entry.target) if entry.kind == "message" else None
        now, wait = asyncio.get_running_loop().time(), 0.0
        if err.code in RETRYABLE_CODES:
            # rate_limited says how long; unavailable (Redis, the database) backs off.
            wait = (err.retry_after_ms or 0) / 1000 or self.backoff.delay(entry.failures)
        if err.code == "rate_limited":
            # The bucket is the user's, not the room's: every send waits, and then
            # goes at the server's pace, or each pause would end in a window of
            # refusals (and a long run of them in a 4102).
            self._pacer.rate_limited(now, wait, entry.sent_at)
        if entry.left:
            # Its room was left or removed: never resent, so a retryable refusal ends it too,
            # with the room's error (not_in_room after leave, the reason after a removal).
            self._fail(entry, ChatError(entry.left.code, entry.left.message, details=err.details)
                       if err.code in RETRYABLE_CODES else err)
        elif err.code in RETRYABLE_CODES:
            self._probing.add(entry.key)
            entry.failures += 1
            entry.not_before = now + wait
        elif err.code == "not_in_room" and room is not None:
            # The server lost our membership: join again, then resend. The room's sends
            # wait for that joined (and its replay), so the ones still on the wire, refused
            # in turn, go again in order, not behind one queued meanwhile (as in JS).
            self._set_room_state(room, RoomState.JOINING)
            self._rejoin(room)
        else:
            self._fail(entry, err)
        self._flush()

    def _forget_stale(self, entry: PendingSend) -> None:
        for rid in [rid for rid, stale in self._stale.items() if stale is entry]:
            del self._stale[rid]

    def _unprobe(self, key: str) -> None:
        """A send of ``key`` left the outbox unacknowledged: with none of its sends left,
        the target probes no more (the next ones, after a leave and a join of the room,
        or to a DM recipient written to again, go together as usual)."""
        if key in self._probing and not any(e.key == key for e in self._outbox):
            self._probing.discard(key)

    def _fail(self, entry: PendingSend, err: ChatError) -> None:
        self._outbox.remove(entry)
        self._unprobe(entry.key)
        self._forget_stale(entry)
        self._sent.pop(entry.request_id or "", None)
        # Nobody hears it through the future (restored from a store, or its callers timed
        # out or were cancelled: the send stayed to be delivered): an error event, as in JS.
        unheard = entry.future is None or not self._send_waiters.get(entry.future)
        if entry.future is not None and not entry.future.done():
            entry.future.set_exception(err)
        if unheard:
            self._emit("error", err)

    def _fail_left(self, room: str | None, why: str) -> None:
        """Sends of a left room (``None``: of every one) still unanswered: they may
        have been stored, and cannot be sent again (the room is not joined)."""
        for entry in self._outbox:
            if entry.left and room in (None, entry.target):
                self._fail_left_entry(entry, why)

    def _fail_left_entry(self, entry: PendingSend, why: str) -> None:
        left = cast(ChatError, entry.left)
        self._fail(entry, ChatError(left.code, f"{left.message}; {why}: it may have been stored",
                                    details=left.details))

    def _drop_room(self, room: _Room, err: ChatError) -> list[asyncio.Future[Any]]:
        """Fail what waits for ``room`` with ``err``. Its sends on the wire of this
        connection stay until their echo or refusal settles them (their futures are
        returned), as in the JS and Rust clients: the server may have stored them before
        the leave, kick or ban, and failing one whose echo then comes would report a
        delivered message as lost. One without an answer fails with ``err`` after
        ``ack_timeout`` (it is never written again), or when the connection closes."""
        for waiter in room.waiters:
            if not waiter.done():
                waiter.set_exception(err)
        room.waiters.clear()
        if room.retry is not None:
            room.retry.cancel()
        written = []
        for entry in self._outbox:
            if entry.kind != "message" or entry.target != room.info.name:
                continue
            on_wire = self._out is not None and entry.wire_generation == self._generation
            if on_wire:
                entry.left = err
                written.append(self._future_of(entry))
                continue
            self._outbox.remove(entry)
            self._unprobe(entry.key)
            self._sent.pop(entry.request_id or "", None)  # its refusal is no news
            if entry.future is not None and not entry.future.done():
                lost = entry.wire_generation is not None
                entry.future.set_exception(ChatError(
                    err.code, f"{err.message}; written on a connection lost since: it may have "
                              "been stored") if lost else err)
        return written

    # -- rooms -------------------------------------------------------------------------------
    def _queue_join(self, room: _Room, *, first: bool = False) -> None:
        """Have ``room`` joined as soon as the join pacer lets a join go (``first``: before
        the rooms already waiting, for a join the server refused)."""
        room.retry = None
        if room.join_queued or self._rooms.get(room.info.name) is not room:
            return
        room.join_queued = True
        if first:
            self._join_queue.appendleft(room)
        else:
            self._join_queue.append(room)
        self._flush_joins()

    def _flush_joins(self) -> None:
        """Write the queued joins the join pacer lets go now: at most
        ``max_joins_in_flight`` unanswered; after ``rate_limited`` none before its
        ``retry_after_ms``, then at the server's pace. Wakes up when the next may go."""
        self._join_line.stop()
        if self._out is None:
            return
        while self._join_queue:
            room = self._join_queue[0]
            if (self._rooms.get(room.info.name) is not room or room.join_rid is not None
                    or not room.join_queued):
                self._join_queue.popleft()  # left, or joined some other way meanwhile
                room.join_queued = False
                continue
            now = self._join_line.write_now(self._flush_joins)
            if now is None:
                return
            self._join_queue.popleft()
            room.join_queued = False
            self._send_join(room)
            self._join_line.pacer.sent(room.join_rid, now)
            # One bucket on the server for joins and requests: the request pacer counts this too.
            self._request_line.pacer.sent_unpaced(now)

    def _send_join(self, room: _Room) -> None:
        room.retry = room.sync_rid = None
        rid = room.join_rid = self._rid()
        frame: dict[str, Any] = {"type": "join", "room": room.info.name, "id": rid}
        room.join_epoch = None
        if room.info.last_id is not None:
            frame["since"] = room.info.last_id
            if room.info.epoch is not None:
                # The numbering since counts in: if the room's ids started again from 1
                # since, the server replays nothing rather than the new ids above ours.
                frame["epoch"] = room.join_epoch = room.info.epoch
        self._requests[rid] = _Request("join", room=room.info.name, since=room.info.last_id)
        self._write(frame)

    def _rejoin(self, room: _Room) -> None:
        """Join again with ``since`` (a gap, or the server forgot us); one at a time."""
        if room.join_rid is None and room.retry is None and self._out is not None:
            self._queue_join(room)

    def _on_joined(self, room: _Room, obj: dict[str, Any]) -> None:
        room.join_rid = None
        room.join_refusals = 0
        since = room.info.last_id
        # Only a whole number >= 0 is ever a position (wire_id): "5", null, 2.5, -1, 1e400
        # would poison every later since and gap check, or raise here (a lost joined).
        last_id = wire_id(obj.get("last_id"))
        recovered = obj.get("recovered") if since is not None else None
        # A server of the release before names no numbering: then none is sent again.
        epoch = room.info.epoch = wire_epoch(obj.get("epoch"))
        # Only with since > 0 (since 0 names no message, in any numbering: the server
        # replays the new one from 1), and only when both epochs are known.
        epoch_changed = bool(since and room.join_epoch is not None and epoch is not None
                             and epoch != room.join_epoch)
        room.join_epoch = None
        # The replay (if any) ends at last_id; on a re-join without one that counts, the
        # answer to a ping behind the join tells (no message id reaches REPLAY_END_UNKNOWN).
        room.catch_up_to = (last_id if last_id is not None
                            else 0 if since is None else REPLAY_END_UNKNOWN)
        if since is None:
            # Without a last_id that counts, no position: the next message sets it (nothing
            # of the join is missed: the server's messages after joined are the room's next).
            room.info.last_id = last_id
            room.accept_next = last_id is None
        elif epoch_changed:
            # The room's ids started again from 1: ours name other messages now. The server
            # replays nothing; the position is its last_id in the new numbering (the next
            # live message is last_id + 1, and a reconnect resumes from there), never our
            # since, which would take the new ids up to it for duplicates, or have the next
            # re-join replay the new ones above it as what followed ours.
            recovered = False
            room.catch_up_to = 0
            room.info.last_id = last_id
            room.accept_next = last_id is None  # no position: the next message sets it
            self._emit("recovery_failed", RecoveryFailed(
                room.info.name, since, last_id or 0, epoch_changed=True))
        elif recovered is False:
            room.accept_next = True
            if last_id is not None and last_id <= since:
                room.catch_up_to = 0  # no replay; the server may even have started afresh
            else:
                # What the server still holds is replayed up to last_id, or nothing is
                # (a since too far back for it): a ping tells, its answer comes after.
                self._sync(room)
            self._emit("recovery_failed", RecoveryFailed(
                room.info.name, since, since if last_id is None else last_id))
        elif last_id is None:
            self._sync(room)  # the room keeps its position; the replay ends with the pong
        room.info.users = [User.from_wire(u) for u in obj.get("users", [])]
        shown = last_id if last_id is not None else room.info.last_id or 0
        room.joined = Joined(room.info.name, list(room.info.users), shown,
                             since is not None, recovered, epoch)
        self._set_room_state(room, RoomState.JOINED)
        self._emit("joined", room.joined)
        for waiter in room.waiters:
            if not waiter.done():
                waiter.set_result(room.joined)
        room.waiters.clear()
        self._flush()

    def _sync(self, room: _Room) -> None:
        """A ``ping`` behind the ``joined`` just handled: its answer marks the end of the
        replay. It is written at once, but the server charges it to the user's one bucket: the
        request pacer and the join pacer count the token it spends (as in the JS and Rust
        clients), with no place in their windows."""
        rid = room.sync_rid = self._rid()
        now = asyncio.get_running_loop().time()
        self._requests[rid] = _Request("sync", room=room.info.name, written_at=now)
        self._write({"type": "ping", "id": rid})
        self._request_line.pacer.sent_unpaced(now)
        self._join_line.pacer.sent_unpaced(now)

    def _synced(self, request: _Request, rid: Any) -> None:
        """The answer to the ping behind a ``joined`` (a pong, or an error: either comes
        after the replay): the room has caught up, its sends may go."""
        room = self._rooms.get(request.room or "")
        if room is not None and room.sync_rid == rid:
            room.sync_rid = None
            room.catch_up_to = 0
            self._flush()

    def _join_refused(self, room: _Room, err: ChatError, *, rejoin: bool = False) -> None:
        """A join refused: tried again later (rate_limited, unavailable, ...), or the room
        is dropped (invalid_room, too_many_rooms, forbidden: a ban, a grant revoked).
        A refusal for good is an ``error`` event, also when a :meth:`join` awaits it (it
        raises there too), as in the JS and Rust clients. ``rejoin``: the join carried
        ``since`` (the app had the room and lost it): as in the JS client, ``removed``
        follows the ``error`` (reason: the refusal's, ``banned`` for a ban, else its code)."""
        room.join_rid = None
        if err.code == "rate_limited":
            # The request bucket is empty: the join pacer holds every join back until
            # retry_after_ms, and this one goes again first (its flush wakes up then).
            self._queue_join(room, first=True)
            return
        if err.code in RETRYABLE_CODES:
            # unavailable again and again (a store outage): each retry waits longer, as
            # JS's and Rust's do, up to JOIN_RETRY_MAX (every room asked at the shortest
            # delay for as long as the outage lasted)
            wait = max(min(self.backoff.delay(room.join_refusals), JOIN_RETRY_MAX),
                       (err.retry_after_ms or 0) / 1000)
            room.join_refusals += 1
            room.retry = asyncio.get_running_loop().call_later(wait, self._queue_join, room)
            return
        self._rooms.pop(room.info.name, None)
        self._set_room_state(room, RoomState.LEFT)
        self._drop_room(room, err)
        # Also when a join() awaits it (it raises there too), as in the JS and Rust clients:
        # the app's error handler hears of every room it lost.
        self._emit("error", err)
        if rejoin:
            # The refusal's reason ("banned") where it gives one, as a live removal's left
            # does, else its code; until: a ban's end (Unix ms; None: until lifted), as a
            # left's is taken.
            reason = err.details.get("reason")
            self._emit("removed", Removed(room.info.name,
                                          reason if isinstance(reason, str) else err.code,
                                          until=err.details.get("until")))

    # -- incoming frames -------------------------------------------------------------------
    def _dispatch(self, raw: str | bytes) -> None:
        obj = _loads(raw)
        kind = obj.get("type")
        if kind == "message":
            self._on_message(obj)
        elif kind == "dm":
            self._on_dm(obj)
        elif kind == "presence":
            self._emit("presence", Presence(obj.get("room", ""), obj.get("user", ""),
                                            obj.get("user_id", ""), obj.get("status", "")))
        elif kind == "typing":
            self._emit("typing", TypingEvent(obj.get("room", ""), obj.get("user", ""),
                                             obj.get("user_id", ""), bool(obj.get("status"))))
        elif kind == "joined":
            request = self._requests.pop(str(obj.get("id")), None)
            room = self._rooms.get(request.room or "") if request else None
            if self._join_line.pacer.joined(str(obj.get("id")), asyncio.get_running_loop().time()):
                self._flush_joins()
            if room is not None and room.join_rid == obj.get("id"):
                self._on_joined(room, obj)
        elif kind == "error":
            self._on_error(obj)
        elif kind == "left" and obj.get("id") is None:
            # Without an id the server removed us; with one it answers our leave, perhaps
            # one that timed out (as in JS): not a removal of the room joined again since.
            self._removed(obj)
        elif kind == "muted":
            self._emit("muted", Muted(obj.get("room"), obj.get("until"), obj.get("by")))
        elif kind == "unmuted":
            self._emit("unmuted", Unmuted(obj.get("room")))
        elif kind in REPLY_TYPES:
            if kind == "welcome":
                # The answer to an auth (a connection's first welcome is read by _open),
                # also one whose request timed out: the server changed the identity all the
                # same.
                before = self.user_id
                welcome = self._welcomed(obj)
                if welcome.user_id != before:
                    self._user_changed(welcome)
            request = self._requests.pop(str(obj.get("id")), None)
            self._request_answered(obj.get("id"))
            if request is not None and request.kind == "sync":
                self._synced(request, obj.get("id"))
            elif request is not None and request.future is not None and not request.future.done():
                request.future.set_result(obj)

    def _on_message(self, obj: dict[str, Any]) -> None:
        message = Message.from_wire(obj)
        entry = self._outbox.get(message.client_msg_id)
        if (entry is not None and entry.kind == "message" and entry.target == message.room
                and self._is_echo(entry, message.user_id)):
            self._acknowledged(entry, message)  # our echo, or the original of a resend
        room = self._rooms.get(message.room)
        if room is None or message.id < 0:
            # Not a room of ours (any more); or an id that is not a whole number >= 0
            # (Message.from_wire made it -1): it cannot be put in order, nor be a position.
            return
        if room.accept_next:
            # After recovered: false the next message starts afresh, even below the
            # last id: a server that lost its state (a memory backend restarted)
            # numbers from 1 again. Frames from before the re-join came before it.
            # After a first joined without a last_id that counts, it sets the position.
            room.accept_next = False
        elif room.info.last_id is None:
            return  # not joined yet
        elif message.id <= room.info.last_id:
            return  # already delivered
        elif message.id != room.info.last_id + 1:
            log.info("gap in %s: %d after %d; joining again", message.room, message.id,
                     room.info.last_id)
            self._rejoin(room)
            return  # the rejoin replays it, after the ones missing
        caught_up = room.caught_up
        room.info.last_id = message.id
        self._emit("message", message)
        if room.caught_up and not caught_up:
            self._flush()  # the replay is complete (or a live id overtook it): sends may go

    def _on_dm(self, obj: dict[str, Any]) -> None:
        dm = DirectMessage.from_wire(obj)
        entry = self._outbox.get(dm.client_msg_id)
        # A DM has no copy from an earlier run's guest id (it reaches only its sender's and
        # its reader's connections, and no replay gives it back to its sender): its echo is
        # from a user this client has been, to the send's reader, restored or not.
        if (entry is not None and entry.kind == "dm" and dm.to == entry.target
                and dm.user_id in self._own_ids):
            self._acknowledged(entry, dm)  # whatever its id: the server stored it
        if dm.id < 0:
            # An id that is not a whole number >= 0 (DirectMessage.from_wire made it -1), as
            # for a room message: it cannot tell this DM from another one, so it is not one.
            return
        if dm.id in self._dm_seen:
            return
        self._dm_seen[dm.id] = None
        if len(self._dm_seen) > DM_IDS_KEPT:
            self._dm_seen.popitem(last=False)
        self._emit("dm", dm)

    def _is_echo(self, entry: PendingSend, sender: str) -> bool:
        """Whether a message or DM from ``sender`` carrying ``entry``'s client_msg_id is its
        echo. A client_msg_id is unique per sender only (the server dedupes per user), and
        every member gets the sender's: another member's message with the same one is not
        ours, and taking it for the echo would drop a send never written. A room message
        restored from the store was written, if at all, by an earlier run, perhaps as another
        guest id, and a rejoin's replay may bring that copy: any sender's is taken for it, as
        before (a DM's echo is checked in _on_dm)."""
        return sender in self._own_ids or entry.restored

    def _on_error(self, obj: dict[str, Any]) -> None:
        # retry_after_ms is read here, off the wire, by one rule (_retry_after_ms), so
        # every wait downstream (a refused send's, a join's, a reconnect's after 4102)
        # is a sane number whatever a buggy server or a proxy sent.
        err = ChatError(str(obj.get("code", "")), str(obj.get("message", "")),
                        _retry_after_ms(obj.get("retry_after_ms")), obj)
        if err.code == "rate_limited" and err.retry_after_ms:
            self._retry_after = err.retry_after_ms / 1000
        rid = obj.get("id")
        if rid is not None and self._stale.pop(str(rid), None) is not None:
            return  # the answer to an earlier write of a send written again since
        entry = self._sent.get(str(rid)) if rid is not None else None
        if entry is not None:
            self._refused(entry, err)
            return
        request = self._requests.pop(str(rid), None) if rid is not None else None
        if request is None:
            self._emit("error", err)
        elif request.kind == "join":
            self._join_line.pacer.refused(
                str(rid), asyncio.get_running_loop().time(),
                (JOIN_RETRY_DEFAULT if err.retry_after_ms is None else err.retry_after_ms / 1000)
                if err.code == "rate_limited" else None)
            room = self._rooms.get(request.room or "")
            if room is not None and room.join_rid == rid:
                self._join_refused(room, err, rejoin=request.since is not None)
            self._flush_joins()
        elif request.kind == "sync":
            if err.code == "rate_limited":
                # The request bucket refused it: the other requests wait for its
                # retry_after_ms, as after a refusal of their own (as in the JS and Rust
                # clients). Its answer still ends the replay, as a pong would.
                self._request_line.pacer.refused_unpaced(
                    asyncio.get_running_loop().time(),
                    JOIN_RETRY_DEFAULT if err.retry_after_ms is None
                    else err.retry_after_ms / 1000, request.written_at)
            self._synced(request, rid)
        elif request.queued is not None and err.code == "rate_limited":
            # Not carried out: it goes again first, when the request pacer lets it.
            self._enqueue(request.queued)
            self._request_answered(rid, JOIN_RETRY_DEFAULT if err.retry_after_ms is None
                                   else err.retry_after_ms / 1000)
        else:
            self._request_answered(rid)
            if request.future is not None and not request.future.done():
                request.future.set_exception(err)

    def _removed(self, obj: dict[str, Any]) -> None:
        """The server took us out of a room (kick, ban, revoked): do not join it again."""
        room = self._rooms.pop(str(obj.get("room")), None)
        if room is None:
            return
        removed = Removed(room.info.name, str(obj.get("reason") or "removed"), obj.get("by"),
                          obj.get("until"))
        self._set_room_state(room, RoomState.LEFT)
        self._drop_room(room, ChatError(removed.reason, f"removed from {room.info.name}",
                                        details=obj))
        self._emit("removed", removed)

    def _welcomed(self, obj: dict[str, Any]) -> Welcome:
        self.user_id = str(obj.get("user_id", ""))
        self._own_ids.add(self.user_id)
        self.username = str(obj.get("username", ""))
        self.authenticated = bool(obj.get("authenticated"))
        # heartbeat_interval is read here, off the wire, by one rule (_heartbeat_interval),
        # so the app never gets a string, inf, 0 or 1e20 to time anything by.
        return Welcome(self.user_id, self.username, self.authenticated,
                       _heartbeat_interval(obj.get("heartbeat_interval")))

    def _user_changed(self, welcome: Welcome) -> None:
        """A refresh's ``auth`` signed in as another user (``welcome``, taken already): the
        server has left every room of the connection, with no ``left`` for them (README,
        ``auth``). Each room the app holds is joined again with ``since``, as after a
        reconnect (the join pacer, a refusal for good a ``removed`` event, the replay's
        dedupe, the room's sends held until it has caught up), so that nothing posted from
        the refresh on is lost or doubled; then ``user_changed`` tells the app. A join on the
        wire now, or still to be written (queued, or waiting to be tried again), was written
        after the ``auth`` (the server answers in order: one written before was answered
        before this welcome): the server joins it as the new user, and it is left alone.
        Rooms being left are no longer held: they stay left."""
        self._all_typing_cleared()  # the indicators went with the rooms
        for room in list(self._rooms.values()):
            if room.join_rid is not None or room.join_queued or room.retry is not None:
                continue
            if self._rooms.get(room.info.name) is not room:
                continue  # left by a room_state handler meanwhile
            room.accept_next = False
            self._set_room_state(room, RoomState.JOINING)
            self._queue_join(room)
        self._emit("user_changed", welcome)
        self._flush()

    # -- the connection ----------------------------------------------------------------------
    async def _run(self) -> None:
        attempt = 0
        # A welcome came since connect(): a certificate failure is then an outage, retried.
        connected = False
        while not self._closing:
            self._set_state(ConnectionState.CONNECTING)
            reconnect_in: float | None
            try:
                ws, welcome = await self._open()
            except InvalidStatus as exc:
                status = exc.response.status_code
                code, reason = status, f"HTTP {status}"
                retry_after = _retry_after_header(exc.response.headers.get("Retry-After"))
                reconnect_in = self.backoff.after_refusal(
                    status, attempt, can_refresh=self._get_token is not None,
                    retry_after=retry_after)
            except asyncio.CancelledError:
                raise
            except _NoToken as exc:
                code, reason, reconnect_in = 4001, str(exc), None  # no token: stop, as JS
            except ssl.SSLCertVerificationError as exc:
                code, reason = TLS_CLOSE_CODE, _tls_reason(exc)  # 1015: RFC 6455's code
                if not connected:
                    # Never connected since connect(): a misconfiguration (the next attempt
                    # gets the same certificate). Stop with the cause, as JS and Rust do.
                    reconnect_in = None
                else:
                    # Connected before: the server's certificate changed (expired, rotated
                    # wrongly), an incident its operator fixes. Retry with the backoff,
                    # the rooms and the outbox kept, and tell the app at each attempt.
                    reconnect_in = self.backoff.delay(attempt)
                    self._emit("error", ChatError("tls_certificate", reason))
            except Exception as exc:
                code, reason = 1006, f"{type(exc).__name__}: {exc}"
                reconnect_in = self.backoff.delay(attempt)
            else:
                connected = True
                # Only a connection that stayed up resets the backoff: a server that
                # accepts and closes at once (1013, 4102, 1001) would otherwise be tried
                # again every min_delay, by all its clients together.
                opened_at = time.monotonic()
                code, reason = await self._serve(ws, welcome)
                if time.monotonic() - opened_at >= self.backoff.stable_after:
                    attempt = 0
                reconnect_in = self.backoff.after_close(
                    code, attempt, has_token=bool(self._token or self._get_token),
                    can_refresh=self._get_token is not None, retry_after=self._retry_after)
            self._retry_after = 0.0
            attempt += 1
            if self._closing:
                reconnect_in = None
            self.last_close = Disconnect(code, reason, reconnect_in)
            self._set_state(ConnectionState.DISCONNECTED if reconnect_in is None
                            else ConnectionState.CONNECTING)
            self._emit("disconnected", self.last_close)
            if reconnect_in is None:
                break
            log.info("reconnecting in %.2f s after %s %s", reconnect_in, code, reason)
            self._wake = asyncio.Event()
            try:
                await asyncio.wait_for(self._wake.wait(), reconnect_in)
            except TimeoutError:
                pass
        if not self._closing and self.last_close is not None:
            err = ClientClosed(f"not reconnecting after {self.last_close.code} "
                               f"{self.last_close.reason}", self.last_close.code)
            self._emit("error", err)
            self._shut_down(err)
            self._set_state(ConnectionState.DISCONNECTED)
            self._end_feeds()
        self._set_state(ConnectionState.DISCONNECTED)

    async def _open(self) -> tuple[ClientConnection, dict[str, Any]]:
        try:
            url = _websocket_url(await _maybe_await(
                self._url() if callable(self._url) else self._url))
        except Exception as exc:
            # The url function's: an error event (code connect), as in JS; then the backoff.
            self._emit("error", ChatError("connect", f"no URL to connect to: {exc}"))
            raise
        if self._get_token is not None:
            self._token = await self._fetch_token()
        headers = {"Authorization": f"Bearer {self._token}"} if self._token else {}
        if self._guest_name and not self._token:
            url = _with_query(url, username=self._guest_name)
        options = {"open_timeout": self.connect_timeout, "max_size": 2**24, **self._ws_options}
        ws = await connect(url, additional_headers=headers, **options)
        try:
            # asyncio.timeout, not wait_for: on Python 3.11 that swallowed a close()'s
            # cancellation coming as the welcome arrived (the client went on to connected,
            # and close() waited connect_timeout for this task).
            async with asyncio.timeout(self.connect_timeout):
                raw = await ws.recv()
            first = _loads(raw)
            if first.get("type") != "welcome":
                raise ChatError("invalid_message", f"expected welcome, got {first.get('type')}")
        except BaseException:
            await ws.close()
            raise
        return ws, first

    async def _serve(self, ws: ClientConnection, welcome: dict[str, Any]) -> tuple[int, str]:
        self._ws = ws
        self._generation += 1
        self._pacer.reset(self.max_in_flight)
        self._join_line.reset()
        self._request_line.reset()
        self._out = queue = asyncio.Queue[str]()
        writer = asyncio.create_task(self._writer(ws, queue))
        info = self._welcomed(welcome)
        # dm_backlog counts only as a count, by the rule for ids off the wire (as JS, Rust).
        if wire_id(welcome.get("dm_backlog")) is None:
            # Without persistence a new connection brings no DM delivered before, and a
            # restarted memory server numbers DMs from 1 again: ids kept from an earlier
            # connection would drop its new DMs as doubles. With persistence the database
            # numbers them for good, and a page of kept DMs may come again: they are kept.
            self._dm_seen.clear()
        self._set_state(ConnectionState.CONNECTED)
        for ready in self._ready:
            if not ready.done():
                ready.set_result(None)
        self._emit("connected", info)
        self._schedule_refresh()
        for room in list(self._rooms.values()):
            room.accept_next = False
            self._queue_join(room)
        self._flush_requests()
        self._flush()
        code, reason = 1006, ""
        try:
            while True:
                raw = await ws.recv()
                try:
                    self._dispatch(raw)
                except Exception:
                    log.exception("could not handle a frame: %.200r", raw)
        except ConnectionClosed as closed:
            # The server's close frame (ws.close_code needs websockets 14.1; this works on 13).
            if closed.rcvd is not None:
                code, reason = closed.rcvd.code, closed.rcvd.reason
        except BaseException:
            # Cancelled with the socket open (asyncio.run ending with a client never closed,
            # or close() done waiting): it is ours to close, at once (it was left open).
            ws.transport.abort()
            raise
        finally:
            writer.cancel()
            self._connection_lost()
        return code, reason

    async def _writer(self, ws: ClientConnection, queue: asyncio.Queue[str]) -> None:
        try:
            while True:
                await ws.send(await queue.get())
        except ConnectionClosed:
            pass

    def _connection_lost(self) -> None:
        """The socket is gone: requests fail, rooms wait to be joined again, sends wait."""
        self._ws = self._out = None
        if self._refresh_task is not None:
            self._refresh_task.cancel()
            self._refresh_task = None
        for request in self._requests.values():
            if request.queued is not None and request.queued.read:
                self._enqueue(request.queued)  # asked again on the next connection, paced
            elif request.future is not None and not request.future.done():
                request.future.set_exception(Disconnected())
        self._requests.clear()
        for queued in [q for q in self._request_queue if q.kept]:
            # A leave not yet written: the membership went with the socket.
            self._request_queue.remove(queued)
            if not queued.future.done():
                queued.future.set_result({"type": "left", "room": queued.frame["room"]})
        self._request_line.reset()
        self._fail_left(None, "the connection closed before its echo")
        self._sent.clear()
        self._stale.clear()
        self._join_line.reset()
        self._join_queue.clear()
        for room in self._rooms.values():
            room.join_rid = None
            room.join_queued = False
            room.join_refusals = 0
            if room.retry is not None:
                room.retry.cancel()
                room.retry = None
            self._set_room_state(room, RoomState.JOINING)
        self._all_typing_cleared()

    def _shut_down(self, err: ClientClosed) -> None:
        """Closed for good: everything still waiting raises ``err`` (sends stay queued)."""
        for ready in self._ready:
            if not ready.done():
                ready.set_exception(err)
        for room in self._rooms.values():
            for waiter in room.waiters:
                if not waiter.done():
                    waiter.set_exception(err)
            room.waiters.clear()
        for entry in self._outbox:
            if entry.future is not None and not entry.future.done():
                entry.future.set_exception(err)
            entry.future = None
        for queued in self._request_queue:
            if not queued.future.done():
                queued.future.set_exception(err)
        self._request_queue.clear()
        if self._flush_timer is not None:
            self._flush_timer.cancel()

    def _typing_cleared(self, room: str) -> None:
        previous = self._typing.pop(room, None)
        if previous is not None:
            previous[1].cancel()

    def _all_typing_cleared(self) -> None:
        """Every room's typing indicator ends with the connection's memberships: its timer
        (the ``typing: false`` it would write) is cancelled."""
        for _, timer in self._typing.values():
            timer.cancel()
        self._typing.clear()

    # -- tokens ------------------------------------------------------------------------------
    def _schedule_refresh(self) -> None:
        expiry = token_expiry(self._token)
        if self._get_token is None or expiry is None:
            return
        delay = refresh_delay(expiry - time.time())
        self._refresh_task = asyncio.create_task(self._refresh_after(delay))

    async def _fetch_token(self) -> str:
        """A token from ``get_token``. One that raises is an ``error`` event (code
        ``token``), as in the JS and Rust clients, and raises ``RuntimeError``; one that
        gives no token (None, ``""``) raises :class:`_NoToken`: connecting without one
        would be a guest's session the app did not ask for (as in the JS client)."""
        try:
            token = await _maybe_await(self._get_token())  # type: ignore[misc]
        except Exception as exc:
            log.warning("get_token failed: %s", exc)
            self._emit("error", ChatError("token", f"get_token failed: {exc}"))
            # Not a ChatError it may have raised: that would be taken for the server's
            # answer to the refresh (told twice, or a Disconnected ending the refreshes).
            raise RuntimeError(f"get_token failed: {exc}") from exc
        if not token:
            raise _NoToken(f"get_token returned {token!r}: no token")
        return cast(str, token)

    async def _refresh_after(self, delay: float) -> None:
        failures = 0
        while True:
            await asyncio.sleep(delay)
            try:
                token = await self._fetch_token()
                reply = await self._request({"type": "auth", "token": token}, None,
                                            paced=False)
            except _NoToken as exc:
                # Nothing to send (the server would refuse it): the current token stays
                # until it expires (then 4002, and the reconnect stops without a token).
                self._emit("error", ChatError("token", str(exc)))
                delay, failures = self.backoff.delay(failures), failures + 1
                continue
            except ChatError as err:
                if isinstance(err, Disconnected):
                    return
                # Refused (a token refusal: get_token is asked again; unavailable,
                # internal_error, rate_limited: the server cannot now): the connection
                # and its current token stay; tried again after the backoff, and never
                # before the server's retry_after_ms (as the JS and Rust clients do).
                self._emit("error", err)
                delay = max(self.backoff.delay(failures), (err.retry_after_ms or 0) / 1000)
                failures += 1
                continue
            except Exception:  # get_token raised: told by _fetch_token
                delay, failures = self.backoff.delay(failures), failures + 1
                continue
            self._token = token
            log.debug("token refreshed for %s", reply.get("user_id"))
            expiry = token_expiry(token)
            if expiry is None:
                return
            remaining = expiry - time.time()
            if remaining > 0:
                delay, failures = refresh_delay(remaining), 0
            else:
                # Past its exp on this clock already, like the one it replaced: another
                # one at once would be no better (a clock ahead, or a token source that
                # caches): the wait grows as after a refusal.
                delay = max(refresh_delay(remaining), self.backoff.delay(failures))
                failures += 1


def _websocket_url(url: Any) -> str:
    """``url`` if it is a WebSocket URL (``ws://`` or ``wss://``), else ``ValueError``: a
    typo does not change by trying again (it was tried again and again, and ``connect()``
    said no more than that no connection came)."""
    try:
        parse_uri(url)
    except (InvalidURI, TypeError, ValueError) as exc:
        raise ValueError(f"not a ws:// or wss:// URL: {url!r:.200} ({exc})") from None
    return cast(str, url)


TLS_CLOSE_CODE = 1015
"""The ``close_code`` of a client stopped by a server certificate it could not verify (RFC
6455 7.4.1: never sent on the wire, "the server certificate can't be verified")."""


def _tls_reason(exc: ssl.SSLCertVerificationError) -> str:
    """Why the certificate was refused, in the words the JS and Rust clients use too (the
    reason of the ``disconnected`` event, and the message of the stop or of the ``error``
    event of a retried attempt)."""
    cause = exc.verify_message or exc.reason or str(exc)
    return (f"TLS certificate verification failed: {cause} (trust the server's CA with an ssl "
            "context in websocket_options, or fix the URL's host name)")


def _with_query(url: str, **params: str) -> str:
    parts = urlsplit(url)
    query = dict(parse_qsl(parts.query))
    query.update(params)
    return urlunsplit(parts._replace(query=urlencode(query)))


def _loads(raw: str | bytes) -> Any:
    """A frame's JSON. An integer longer than ``int()`` converts (4,300 digits by default,
    CPython's guard against slow conversions) is read as a float, i.e. as JS and Rust read it (a
    hostile ``retry_after_ms`` then counts as none instead of losing the whole event)."""
    try:
        return json.loads(raw)
    except ValueError as exc:
        if isinstance(exc, json.JSONDecodeError):
            raise
        return json.loads(raw, parse_int=_int_or_float)


def _int_or_float(digits: str) -> int | float:
    limit = sys.get_int_max_str_digits()  # 0: no limit
    return int(digits) if not limit or len(digits.lstrip("-")) <= limit else float(digits)


RETRY_AFTER_CAP = 86_400.0
"""The longest wait a ``Retry-After`` can ask for, seconds (a day, as in the JS and Rust
clients): one further ahead is a proxy's mistake, not a reason to never reconnect."""

def _retry_after_ms(value: Any) -> int | None:
    """The wait an ``error`` event's ``retry_after_ms`` asks for, whole ms, or None for
    none, with the rule the three client libraries (Python, JS, Rust) share, tested by
    each against the same cases (``clients/conformance/retry-after-ms.json``; the rule:
    ``clients/conformance/README.md``): only a JSON number that is finite and >= 0
    counts (a string such as ``"5"``, a bool, None, a negative, and ``1e400`` or
    ``Infinity``, which ``json.loads`` reads as ``inf``, or an integer past a double's
    range, are none: the default wait applies); a fraction is rounded up (never shorter than asked); the wait is capped at
    a day (``RETRY_AFTER_CAP``)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    try:
        finite = math.isfinite(value)
    except OverflowError:  # an int past a double's range: Infinity to JS, none here too
        return None
    if not finite or value < 0:
        return None
    return min(math.ceil(value), int(RETRY_AFTER_CAP * 1000))


def _given(timeout: float | None, default: T) -> float | T:
    """A call's ``timeout``, or the client's ``default`` when none is given: only None is
    none (``timeout or default`` took 0, "do not wait", for the default, 10 s or for ever)."""
    return default if timeout is None else timeout


HEARTBEAT_MIN = 1.0
HEARTBEAT_MAX = 86_400.0
"""The shortest and longest ``heartbeat_interval`` taken from a ``welcome``, seconds."""


def _heartbeat_interval(value: Any) -> float | None:
    """The interval a ``welcome`` event's ``heartbeat_interval`` asks for, seconds, or None
    for none (as if absent), with the rule the three client libraries (Python, JS, Rust)
    share, tested by each against the same cases (``clients/conformance/heartbeat-interval.json``;
    the rule: ``clients/conformance/README.md``): only a JSON number that is finite and > 0
    counts (a string such as ``"30"``, a bool, None, 0, a negative, and ``1e400`` or
    ``Infinity``, which ``json.loads`` reads as ``inf``, or an integer past a double's range,
    are none: the JS and Rust clients then assume 30 s); it is floored at a second
    (``HEARTBEAT_MIN``) and capped at a day (``HEARTBEAT_MAX``)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    try:
        seconds = float(value)
    except OverflowError:  # an int past a double's range: Infinity to JS, none here too
        return None
    if not math.isfinite(seconds) or seconds <= 0:
        return None
    return min(HEARTBEAT_MAX, max(HEARTBEAT_MIN, seconds))


_DIGITS = re.compile(r"[0-9]+")
_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")
_FIFTY_YEARS = 50 * 31_556_952  # seconds, of 365.2425 days each


def _retry_after_header(value: str | None, now: float | None = None) -> float:
    """Seconds a ``Retry-After`` header asks to wait (RFC 9110), counted from ``now``
    (``time.time()`` by default), 0 when none, with the rule the three client libraries
    (Python, JS, Rust) share, tested by each against the same cases
    (``clients/conformance/retry-after.json``; the rule: ``clients/conformance/README.md``):

    - surrounding spaces and tabs are ignored;
    - delta-seconds are ASCII digits only (``"2.5"``, ``"1e20"``, ``"0x10"``, ``"inf"``,
      ``"-5"``, ``"+5"`` are not); ``"0"`` is no wait;
    - otherwise an HTTP-date (``_http_date``); one not ahead is no wait;
    - the wait is capped at a day (``RETRY_AFTER_CAP``), however many digits;
    - anything else is no wait from the header: the normal backoff applies.
    """
    if value is None:
        return 0.0
    value = value.strip(" \t")
    if _DIGITS.fullmatch(value):
        # int() refuses over 4300 digits; nine are already far above the cap.
        return min(RETRY_AFTER_CAP, float(int(value))) if len(value) <= 9 else RETRY_AFTER_CAP
    now = time.time() if now is None else now
    at = _http_date(value, now)
    return 0.0 if at is None else min(RETRY_AFTER_CAP, max(0.0, at - now))


def _http_date(value: str, now: float) -> int | None:
    """An HTTP-date in seconds since the epoch, None when ``value`` is none, as the three
    client libraries read it (not ``email.utils``, which takes other zones, no seconds,
    and two-digit years by another rule): IMF-fixdate (``Wed, 21 Oct 2015 07:28:00 GMT``),
    or the obsolete forms a recipient must accept, RFC 850 (``Wednesday, 21-Oct-15
    07:28:00 GMT``) and asctime (``Wed Oct 21 07:28:00 2015``). Split at runs of spaces,
    commas and hyphens: a weekday of ASCII letters (not checked against the date), day (1
    or 2 digits), month (``Jan`` .. ``Dec``, case as written), year (4 digits, or 2),
    ``hh:mm:ss`` (2 digits each), then ``GMT`` (no other zone: ``UTC``, ``+0000`` are not
    HTTP-dates); or asctime's weekday, month, day, time, year (GMT). Hour 00-23, minute
    00-59, second 00-60 (60: a leap second, read as the next minute's 00: the clock has
    none), a day the month has, year 1970 or later. A two-digit year is 20yy, or 19yy when
    20yy is more than fifty years (of 365.2425 days) ahead of ``now`` (RFC 9110)."""
    t = [token for token in re.split(r"[ ,-]+", value) if token]
    if len(t) == 6 and t[5] == "GMT":
        _, day, month, year, clock, _ = t
    elif len(t) == 5:
        _, month, day, clock, year = t
    else:
        return None
    hms = re.fullmatch(r"([0-9]{2}):([0-9]{2}):([0-9]{2})", clock)
    if (not re.fullmatch(r"[A-Za-z]+", t[0]) or month not in _MONTHS or hms is None
            or not re.fullmatch(r"[0-9]{1,2}", day) or not re.fullmatch(r"[0-9]{2}|[0-9]{4}", year)):
        return None
    m, d, y = _MONTHS.index(month) + 1, int(day), int(year)
    h, mi, s = (int(part) for part in hms.groups())
    if h > 23 or mi > 59 or s > 60:
        return None

    def at(y: int) -> int:  # arithmetic: second 60 is the next minute's 00
        return calendar.timegm((y, m, d, h, mi, s))

    if len(year) == 2:
        y += 1900 if at(2000 + y) - now > _FIFTY_YEARS else 2000
    if y < 1970 or not 1 <= d <= calendar.monthrange(y, m)[1]:
        return None
    return at(y)
