"""Store interfaces: the state every worker and pod must agree on.

One interface per concern, each with a memory implementation (one process) and
a Redis implementation (any number of workers and pods). Every operation is a
single atomic step in both (one Lua script or one pipeline in Redis), so no
global lock is ever needed.

Delivery is part of the contract: :class:`Broker` carries already-encoded
event bytes to the workers that have local members of a room or local
connections of a user; each worker then writes them to its own sockets
(:class:`wschat.hub.LocalHub`).
"""

from __future__ import annotations

import os
import secrets
import socket
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import orjson

from ..errors import WschatError
from ..protocol import MessageDraft, is_guest_id, message_id_of
from ..ratelimit import Charge


@dataclass(frozen=True, slots=True)
class User:
    user_id: str
    username: str

    def as_json(self) -> dict[str, Any]:
        if is_guest_id(self.user_id):
            return {"user_id": self.user_id, "username": self.username, "guest": True}
        return {"user_id": self.user_id, "username": self.username}


@dataclass(frozen=True, slots=True)
class JoinResult:
    first_of_user: bool  # the user's first connection in the room: announce "online"
    members: list[User]


@dataclass(frozen=True, slots=True)
class LeaveResult:
    # The user has no connection left in the room: announce "offline". Also when this
    # connection was gone already: a retried leave whose first reply was lost.
    last_of_user: bool
    room_empty: bool  # nobody is left: the room is dropped


@dataclass(slots=True)
class Posted:
    """A stored room message or DM: its id and the exact event JSON members receive
    (not frozen, for speed: see the commands in :mod:`wschat.protocol`)."""

    msg_id: int
    event: bytes
    duplicate: bool  # a retry with a known client_msg_id: nothing new was stored
    # A duplicate DM published to its parties again (with persistence, where its first
    # publish may have failed after COMMIT): the retrying connection's echo comes with it.
    redelivered: bool = False


# What one `join` with `since` may replay, in bytes (the events' JSON): the worker holds
# the replay until the client has read it, so without a bound a full history of messages
# at the frame limit (HISTORY_SIZE x MAX_MESSAGE_BYTES, 6.4 MB by default) would be held
# per joiner. Further behind: `recovered: false`, from every store (with persistence the
# database's replay has the same bound, see wschat.stores.durable).
REPLAY_MAX_BYTES = 4 * 1024 * 1024
# How long an empty room's last id outlives its history (ROOM_TTL) by default
# (ROOM_NUMBERING_TTL): a room used again within it goes on numbering from there, so a
# client that was away longer than ROOM_TTL is told `recovered: false`, never handed the
# new messages under ids it took for ones it had.
ROOM_NUMBERING_TTL = 7 * 24 * 3600.0
# What one `history` reply may hold, in bytes: it is one frame, written at once (not
# paced), so it is kept to the default outbound budget (MAX_OUTBOUND_BYTES, 1 MiB). The
# newest messages that fit are sent (always at least one), with `truncated: true`; the
# client pages back for the rest with `before`.
HISTORY_MAX_BYTES = 1024 * 1024


@dataclass(frozen=True, slots=True)
class Replay:
    messages: list[bytes]  # event JSON, oldest first
    # False: the store no longer holds every message after `since`, or they come to more
    # than REPLAY_MAX_BYTES (then `messages` are the newest that fit, possibly none)
    complete: bool


@dataclass(frozen=True, slots=True)
class HistoryPage:
    messages: list[bytes]  # event JSON, oldest first
    truncated: bool  # older messages within `limit` were left out for the byte bound


def run_to(events: list[bytes], after_id: int, last_id: int) -> tuple[list[bytes], bool]:
    """The newest of ``events`` (oldest first, ids above ``after_id``) whose ids run
    without a hole up to ``last_id``, and whether they are every id from ``after_id + 1``
    on. A history may hold fewer ids than its sequence issued (Redis came back from an
    older snapshot and the resync raised the sequence; the durable releaser moved past
    deleted rows): what comes before such a hole is never replayed as if complete, and
    not at all, so that the replay's first id tells where the session's gap ends."""
    expected = last_id
    i = len(events)
    while i > 0 and message_id_of(events[i - 1]) == expected:
        i -= 1
        expected -= 1
    return events[i:], expected == after_id


def newest_within(events: list[bytes], max_bytes: int, at_least_one: bool = False
                  ) -> tuple[list[bytes], bool]:
    """The newest of ``events`` (oldest first) whose bytes together come to at most
    ``max_bytes`` (``at_least_one``: the newest one even if it alone is over), oldest
    first, and whether any was left out."""
    total = 0
    for i in range(len(events) - 1, -1, -1):
        total += len(events[i])
        if total > max_bytes and not (at_least_one and i == len(events) - 1):
            return events[i + 1:], True
    return events, False


#: The user_id of everything the server API posts (``/api/publish``: reserved, see
#: auth). Its posts are the only ones into a room nobody is in, so only they start
#: that room's ``ROOM_TTL`` and ``ROOM_NUMBERING_TTL`` (every other sender is a member).
API_USER = "system"


@dataclass(frozen=True, slots=True)
class Stored:
    """A message the durable log has numbered and committed, ready to be published."""

    msg_id: int
    event: bytes
    room: str | None  # None: a DM
    # A room message's "": read back from the log (the durable store's releaser), its room
    # perhaps empty by now
    sender_id: str = ""
    recipient_id: str = ""  # DMs only; "" when the recipient was offline (kept for later)

    def dm_parties(self) -> list[str]:
        return dm_parties(self.sender_id, self.recipient_id)


def dm_parties(sender_id: str, recipient_id: str) -> list[str]:
    """The user channels a DM is published to, once each: the recipient's (none when
    ``recipient_id`` is "": kept for later) and the sender's, for their other connections.
    (post_dm.lua does the same in Redis.)"""
    parties = [recipient_id] if recipient_id else []
    if sender_id != recipient_id:
        parties.append(sender_id)
    return parties


# What :meth:`MessageStore.publish_stored` did with each message.
PUBLISHED = 1  # delivered (and everything held behind it)
HELD = 0  # an earlier id is not published yet: held until it is (or fetched from the log)
STALE = -1  # the room's window is already past this id: not published again
# A DM: a live worker of the recipient's (online) or of the sender's is not subscribed to
# their channel (Redis: its pub/sub connection is being made again), so nothing was
# published (publish_dm.lua; publish_kept.lua for a DM kept for a recipient offline)
UNHEARD = 2


def retry_echo(draft: MessageDraft, msg_id: int, timestamp_ms: int,
               held: Iterable[bytes] = ()) -> Posted:
    """What a retry of a stored post (its dedupe entry: ``msg_id``, ``timestamp_ms``) is
    answered with: the room's own copy among ``held`` (its history, newest first) while
    it is there, else the retry's draft under the original id and time.

    The copy must carry the same timestamp and ``client_msg_id`` too: a room whose
    numbering restarted after it expired (``ROOM_NUMBERING_TTL``) holds other messages
    under old ids."""
    for event in held:
        if message_id_of(event) == msg_id:
            stored = orjson.loads(event)
            if (stored.get("timestamp") == timestamp_ms
                    and stored.get("client_msg_id") == draft.client_msg_id):
                return Posted(msg_id, event, True)
            break
    return Posted(msg_id, draft.as_stored(msg_id, timestamp_ms), True)


class Unavailable(WschatError):
    """The shared store cannot be reached; the request is refused, not half-done."""


class Unheard(Unavailable):
    """A DM stored but heard by no worker it was for (the recipient's, or the sender's, was
    between its subscriptions: a connection coming or going): the sender is told to retry
    (its ``client_msg_id`` gets the stored DM delivered). The store itself is up."""


class RecipientOffline(WschatError):
    """A DM refused by the store itself: its recipient has no connection (``user_not_found``)."""


class InboxFull(WschatError):
    """A DM to an offline user who already has the most DMs kept that a user may have."""


class RoomStore(ABC):
    """Room membership, counted per connection so a user with two tabs stays present."""

    @abstractmethod
    def join(self, room: str, conn_id: str, user: User) -> JoinResult:
        """Add a connection to a room (creating it); return whether the user is new there."""

    @abstractmethod
    def leave(self, room: str, conn_id: str, user_id: str) -> LeaveResult:
        """Remove a connection from a room (dropping the room when it empties)."""

    @abstractmethod
    def members(self, room: str) -> list[User]:
        """Distinct users present in the room, in join order."""

    @abstractmethod
    def totals(self) -> tuple[int, int]:
        """(rooms with members, user memberships) for the whole server."""


class PresenceStore(ABC):
    """Which users are connected anywhere (DM routing and ``user_not_found``)."""

    @abstractmethod
    def connect(self, conn_id: str, user: User) -> None: ...

    @abstractmethod
    def disconnect(self, conn_id: str, user_id: str) -> None: ...

    @abstractmethod
    def is_online(self, user_id: str) -> bool: ...

    def claim(self, conn_id: str, user_id: str, cap: int) -> bool:
        """A place for the connection ``conn_id`` of ``user_id`` about to be registered
        (:meth:`connect`), if the user holds fewer than ``cap`` connections with the
        places claimed so far (MAX_CONNECTIONS_PER_USER across every worker sharing the
        store); False: none. A place ends at the connection's :meth:`connect`, at
        :meth:`release_claim`, or by itself after a while (a worker that died holding it).
        Here: always one, since a store of one worker has the hub's count to go by
        (:meth:`wschat.hub.LocalHub.connections_of`), which the chat checks first."""
        return True

    def release_claim(self, conn_id: str, user_id: str) -> None:
        """The place :meth:`claim` gave ``conn_id`` is not needed (its handshake failed).
        Never raises: a place the store cannot give back now ends by itself."""


class MessageStore(ABC):
    """Room history, per-room sequence numbers, DMs and ``client_msg_id`` dedupe.

    ``post_*`` assign the id, store the message and publish it, in one step: a
    message is either delivered with its id or not stored at all. Every caller
    (WebSocket, HTTP API, with or without persistence) goes through
    :meth:`check_delivering` there: the one guard against posting while the shared
    store is being resynchronised.
    """

    #: Whether ``post_*`` spend a ``charge`` (rate-limit buckets) in the same step
    #: (Redis: inside the posting script, one round trip); the chat passes one only then.
    charges_posts = False
    #: Whether ``post_dm(recipient_online=None)`` checks the recipient's presence in the
    #: same step (raising :class:`RecipientOffline`) instead of the caller asking first.
    checks_recipient = False

    @abstractmethod
    def post_room(self, room: str, user_id: str, draft: MessageDraft,
                  charge: Charge = ()) -> Posted:
        """``charge``: buckets spent first (only if :attr:`charges_posts`); when one is
        empty, nothing is posted and :class:`wschat.ratelimit.RateLimited` is raised."""

    @abstractmethod
    def post_dm(self, sender_id: str, recipient_id: str, draft: MessageDraft,
                recipient_online: bool | None = True, charge: Charge = ()) -> Posted:
        """``recipient_online=False`` only with persistence: the DM is kept for later;
        ``None`` only if :attr:`checks_recipient`; ``charge`` as for :meth:`post_room`."""

    def check_delivering(self) -> None:
        """Raise :class:`Unavailable` while a post must be refused: with Redis, from an
        outage until the resync (connections re-registered, sequences raised again,
        subscriptions back), since an id taken before could repeat one delivered
        earlier and subscribers could miss the message."""

    @abstractmethod
    def recent(self, room: str, limit: int, before: int | None = None) -> list[bytes]:
        """Up to ``limit`` messages (ids < ``before`` if given), oldest first."""

    def history_page(self, room: str, limit: int, before: int | None = None,
                     max_bytes: int = HISTORY_MAX_BYTES) -> HistoryPage:
        """What a ``history`` reply holds: :meth:`recent`, its oldest messages left out
        (``truncated``) while they come to more than ``max_bytes`` (the newest is always
        kept)."""
        messages, truncated = newest_within(self.recent(room, limit, before), max_bytes,
                                            at_least_one=True)
        return HistoryPage(messages, truncated)

    @abstractmethod
    def since(self, room: str, after_id: int) -> Replay:
        """Every message with id > ``after_id``, or ``complete=False`` if some are gone
        or they come to more than the store's replay bound (:data:`REPLAY_MAX_BYTES`):
        then the newest of them that fit, oldest first."""

    @abstractmethod
    def last_id(self, room: str) -> int: ...

    @abstractmethod
    def epoch(self, room: str) -> str:
        """The name of the room's numbering (``joined``'s ``epoch``), asked by a member
        (after its store join): the same for as long as the room's ids go on from one
        another, another one once they may start again from 1 (a memory server restarted,
        Redis lost its data, the room unused past ``ROOM_NUMBERING_TTL``). A ``since``
        counted in another epoch names other messages."""

    @abstractmethod
    def room_emptied(self, room: str) -> None:
        """The room has no members left: let its history expire after ROOM_TTL."""

    @abstractmethod
    def room_occupied(self, room: str) -> None:
        """Someone joined: keep the room's history."""

    def raise_sequence(self, room: str, at_least: int) -> None:
        """Never issue ids <= ``at_least`` again (after the store lost its data)."""

    def sequences_moved(self) -> None:
        """Another numbering may have issued ids since this store last read the shared
        sequences (with Redis: this worker numbers in the database, and its listing had run
        out, so workers numbering in Redis took posts): read them again before the next
        post of each room and DM. Nothing to do for a store that reads them every time."""

    def dm_last_id(self) -> int:
        """The highest DM id this store issued (0: none; with persistence the database
        issues them, and this is what the store issued before it was turned on)."""
        return 0

    def raise_dm_sequence(self, at_least: int) -> None:
        """Never issue DM ids <= ``at_least`` again (after the store lost its data; with
        persistence the database issues them)."""

    # -- persistence (wschat.stores.durable wraps a store and uses these) ---------------
    def publish_stored(self, messages: list[Stored]) -> list[int]:
        """Add committed messages to the window and deliver them, room messages in id order.

        Returns PUBLISHED, HELD, STALE or UNHEARD for each (see those constants).
        """
        raise NotImplementedError(f"{type(self).__name__} cannot publish stored messages")

    def user_arrived(self, user: User) -> tuple[list[bytes], int] | None:
        """An authenticated user connected: the first page of the DMs kept for them (oldest
        first) and how many are kept in all (None: none are ever kept). They stay kept
        until :meth:`dms_delivered`."""
        return None

    def kept_dms(self, user_id: str, after_id: int) -> list[bytes]:
        """The next page of DMs kept for ``user_id``: ids > ``after_id``, oldest first."""
        return []

    def dms_delivered(self, user_id: str, up_to: int) -> None:
        """The user's connection was handed its kept DMs up to id ``up_to``."""

    def keeps_dms_for(self, user_id: str) -> bool:
        """Whether a DM to this offline user is kept for later (else ``user_not_found``)."""
        return False

    def deliver_kept(self, recipient_id: str, posted: Posted) -> None:
        """Publish a DM just kept for ``recipient_id`` to her connections (not the
        sender's: they had it) and leave it kept: she connected after the DM's check
        found her offline, and her connection may have read her kept DMs before it was
        committed. Raises :class:`Unavailable` if it could not be published."""

    def healthy(self) -> bool:
        return True

    def start(self) -> None:
        """Begin background work (persistence: connect, migrate, start the writer)."""
        return None

    def close(self) -> None:
        """Flush what is held for durability (shutdown)."""
        return None


RoomHandler = Callable[[str, bytes, "str | None"], None]  # (room, event, exclude_user)
UserHandler = Callable[[str, bytes], None]  # (user_id, event)


class Broker(ABC):
    """Delivers event bytes to the workers holding a room's members or a user's sockets."""

    #: Called (in the broker's greenlet) after a lost connection to the shared
    #: store is back, so the chat core can re-register its live connections.
    on_reconnect: Callable[[], None] | None = None
    #: Whether what it delivers may come from other workers (a room message of a user
    #: whose connection on another worker posted it), not only from this one.
    spans_workers: bool = True

    @abstractmethod
    def start(self, on_room: RoomHandler, on_user: UserHandler) -> None:
        """Begin delivering to the local handlers."""

    @abstractmethod
    def publish_room(self, room: str, event: bytes, exclude_user: str | None = None) -> None: ...

    @abstractmethod
    def publish_user(self, user_id: str, event: bytes) -> None: ...

    def publish_typing(self, room: str, user_id: str, event: bytes, typing_for: float | None,
                       first_here: bool) -> bool:
        """A change of the user's typing indicator in ``room`` on this worker, whose chat
        core counts her connections here as one typist: ``typing_for`` seconds more of it
        (``event`` is ``typing: true``; ``first_here`` when none of her connections here
        typed there before), or None when the last of them stopped (``event`` is
        ``typing: false``). ``event`` goes to the room's other members when the indicator
        changes for all the servers (True: it went out); here, one worker is all of them."""
        if typing_for is None or first_here:
            self.publish_room(room, event, exclude_user=user_id)
            return True
        return False

    @abstractmethod
    def subscribe_room(self, room: str) -> None:
        """This worker now has members in ``room`` (called on 0 -> 1 local members)."""

    @abstractmethod
    def unsubscribe_room(self, room: str) -> None: ...

    def await_room(self, room: str) -> None:
        """Return once this worker's subscription to ``room`` is active (it may be pending)."""

    @abstractmethod
    def subscribe_user(self, user_id: str) -> None: ...

    @abstractmethod
    def unsubscribe_user(self, user_id: str) -> None: ...

    def healthy(self) -> bool:
        return True

    def close(self) -> None:
        return None


def new_epoch() -> str:
    """A room numbering's name (:meth:`MessageStore.epoch`): 72 random bits, so that two
    numberings of one room never share one."""
    return secrets.token_urlsafe(9)


def new_node_id() -> str:
    """A worker's id, ``<hostname>-<pid>-<random>``: its node in Redis and the prefix of
    its connection ids (the hostname is the pod's)."""
    return f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(4)}"


@dataclass
class Stores:
    """The backend chosen once from configuration and handed to the chat core."""

    rooms: RoomStore
    presence: PresenceStore
    messages: MessageStore
    broker: Broker
    name: str = "memory"
    rate_limiter: Any = None  # shared buckets (Redis); None: the factory uses memory ones
    moderation: Any = None  # shared bans, mutes, members (Redis); None: the core uses memory
    persistence: str = "off"  # the database log's URL (password hidden) when persistence is on
    node_id: str = field(default_factory=new_node_id)  # this worker

    def problems(self) -> list[str]:
        """Why this worker is not ready; empty when it is."""
        problems = []
        if not self.broker.healthy():
            problems.append(f"{self.name} unreachable")
        if not self.messages.healthy():
            problems.append("database unreachable")
        return problems

    def healthy(self) -> bool:
        return not self.problems()

    def start(self) -> None:
        """Connect and start background work; building the stores opened nothing."""
        self.messages.start()

    def close(self) -> None:
        self.messages.close()
        self.broker.close()

    def release_local(self) -> bool:
        """Shutdown: remove this worker's memberships and presence from the shared store
        in one step. False means each connection must leave by itself (memory)."""
        return False

    def memory_bytes(self) -> tuple[int, int] | None:
        """The shared store's memory in use and its limit (0: none), for the metrics; None
        where there is no shared store (memory) or it cannot say."""
        return None
