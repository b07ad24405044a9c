"""Typed events and states: what the client hands to the app.

Event names for :meth:`Client.on <wschat_client.Client.on>` (and :attr:`Event.name` of
:meth:`Client.events <wschat_client.Client.events>`), the payload each handler receives
(:attr:`Event.payload`), and when:

- ``state`` (:class:`StateChange`): the connection state changed.
- ``connected`` (:class:`Welcome`): connected and greeted (also after each reconnect).
- ``user_changed`` (:class:`Welcome`): a token refresh (``get_token``) signed the open
  connection in as another user (``user_id``): the new identity is taken, and every room
  is being joined again with ``since`` (the server left them all, with no ``left``).
- ``disconnected`` (:class:`Disconnect`): the socket closed; ``reconnect_in`` says what next.
- ``message`` (:class:`Message`): a room message, once, in id order per room.
- ``dm`` (:class:`DirectMessage`): a direct message, received or sent from any of your
  connections, once.
- ``presence`` (:class:`Presence`): someone came online in, or left, a joined room.
- ``typing`` (:class:`TypingEvent`): someone started or stopped typing in a joined room.
- ``joined`` (:class:`Joined`): a room was joined (the first time, or again after a
  reconnect or a gap).
- ``recovery_failed`` (:class:`RecoveryFailed`): after a re-join the server no longer had
  every missed message: reload ``history`` if you need them.
- ``room_state`` (:class:`RoomStateChange`): a room went joining / joined / left.
- ``removed`` (:class:`Removed`): the server took you out of a room (kicked, banned, membership
  revoked, no longer granted by a fresh token), or refused a rejoin (a join with ``since``) for
  good, after the ``error`` event; the room is not joined again by itself.
- ``muted`` / ``unmuted`` (:class:`Muted` / :class:`Unmuted`): you may read but not post or
  type in ``room`` (None: everywhere) until ``until``; or that was lifted.
- ``ack`` (:class:`Message` or :class:`DirectMessage`): the server acknowledged one of
  your sends (also those restored from an outbox store, which no one awaits).
- ``error`` (:class:`~wschat_client.ChatError`): an error no request was waiting for
  (a refused token refresh, a terminal close code, ...), and a join refused for good
  (also raised by the :meth:`join` awaiting it, as in the JS and Rust clients).
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass, field
from typing import Any, Literal, TypeAlias

from .errors import ChatError


class ConnectionState(enum.StrEnum):
    """``disconnected`` -> ``connecting`` -> ``connected`` (and back on a close)."""

    DISCONNECTED = "disconnected"
    CONNECTING = "connecting"
    CONNECTED = "connected"


class RoomState(enum.StrEnum):
    """A room the app joined: ``joining`` until the server's ``joined``, then ``joined``;
    back to ``joining`` while disconnected or re-joining; ``left`` after :meth:`leave`."""

    JOINING = "joining"
    JOINED = "joined"
    LEFT = "left"


@dataclass(frozen=True, slots=True)
class User:
    user_id: str
    username: str

    @classmethod
    def from_wire(cls, obj: dict[str, Any]) -> User:
        return cls(str(obj.get("user_id", "")), str(obj.get("username", "")))


WIRE_ID_MAX = 2**53 - 1
"""The largest message id taken from the wire (JS's largest safe integer, as in the JS and
Rust clients: position + 1 is exact in all three)."""


def wire_id(value: Any) -> int | None:
    """A message id from the wire (a ``joined``'s ``last_id``, a ``message``'s ``id``), or
    None for none, with the rule the three client libraries (Python, JS, Rust) share, tested
    by each against the same cases (``clients/conformance/last-id.json``; the rule:
    ``clients/conformance/README.md``): only a JSON number that is a whole number >= 0 and at
    most ``WIRE_ID_MAX`` counts (``5.0`` is 5, as JS cannot tell them apart); a string such as
    ``"5"``, a bool, None, a negative, a fraction, and ``1e400``, which ``json.loads`` reads
    as ``inf``, are none. ``int()`` took ``"5"`` and ``True``, truncated 2.5, and raised on
    None or ``inf`` in the reader."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    if isinstance(value, float):
        if not value.is_integer():  # a fraction, inf or nan
            return None
        value = int(value)
    return value if 0 <= value <= WIRE_ID_MAX else None


EPOCH_MAX_CHARS = 64
_CONTROL_CHARS = re.compile("[\x00-\x1f\x7f]")


def wire_epoch(value: Any) -> str | None:
    """A room numbering's name from the wire (a ``joined``'s ``epoch``), or None for none:
    only what the server takes back in a ``join`` counts, a string of 1 to 64 characters
    none of which is a control character. Anything else (a number, ``""``, a longer one,
    absent: a server of the release before) is no epoch: keeping it would have every
    later re-join refused with ``invalid_message``, so the rooms would never rejoin."""
    if (not isinstance(value, str) or not 0 < len(value) <= EPOCH_MAX_CHARS
            or _CONTROL_CHARS.search(value)):
        return None
    return value


@dataclass(frozen=True, slots=True)
class Message:
    """A room message. ``id`` is the room's gap-free sequence number; -1 when the server's is
    not a whole number >= 0 (:func:`wire_id`): such a message is never a ``message`` event,
    only a send's acknowledgement or an entry of ``history`` can carry it."""

    id: int
    room: str
    from_: str
    user_id: str
    text: str
    timestamp: int
    client_msg_id: str | None = None

    @classmethod
    def from_wire(cls, obj: dict[str, Any]) -> Message:
        mid = wire_id(obj.get("id"))
        return cls(-1 if mid is None else mid, str(obj["room"]), str(obj.get("from", "")),
                   str(obj.get("user_id", "")), str(obj.get("text", "")),
                   int(obj.get("timestamp", 0)), obj.get("client_msg_id"))


@dataclass(frozen=True, slots=True)
class HistoryPage:
    """A page of a room's history (:meth:`Client.history_page
    <wschat_client.Client.history_page>`).

    Attributes:
        messages: oldest first.
        truncated: the server left out older messages within the ``limit`` asked for, because
            the reply reached its byte bound (``HISTORY_MAX_BYTES``, 1 MiB; the newest message
            always comes): page back with ``before`` = the oldest id here, whatever the page's
            length. True only for the server's JSON ``true``.
    """

    messages: list[Message]
    truncated: bool


@dataclass(frozen=True, slots=True)
class DirectMessage:
    """A direct message. ``id`` tells it from the others (a DM comes once, whichever of your
    connections sent it); -1 when the server's is not a whole number >= 0 (:func:`wire_id`,
    as for a room message): such a DM is never a ``dm`` event, only a send's acknowledgement
    can carry it."""

    id: int
    from_: str
    user_id: str
    to: str
    text: str
    timestamp: int
    client_msg_id: str | None = None

    @classmethod
    def from_wire(cls, obj: dict[str, Any]) -> DirectMessage:
        mid = wire_id(obj.get("id"))
        return cls(-1 if mid is None else mid, str(obj.get("from", "")), str(obj.get("user_id", "")),
                   str(obj.get("to", "")), str(obj.get("text", "")),
                   int(obj.get("timestamp", 0)), obj.get("client_msg_id"))


@dataclass(frozen=True, slots=True)
class Presence:
    room: str
    user: str
    user_id: str
    status: str  # "online" | "offline"


@dataclass(frozen=True, slots=True)
class TypingEvent:
    room: str
    user: str
    user_id: str
    status: bool


@dataclass(frozen=True, slots=True)
class Welcome:
    user_id: str
    username: str
    authenticated: bool
    # Seconds between the server's pings, read by the rule the three libraries share (a finite
    # number > 0, at least 1, at most 86400; None when absent or anything else).
    heartbeat_interval: float | None = None


@dataclass(frozen=True, slots=True)
class StateChange:
    old: ConnectionState
    new: ConnectionState


@dataclass(frozen=True, slots=True)
class Disconnect:
    """The socket closed.

    Attributes:
        code: the close code (1006 when the connection dropped without one), or
            the HTTP status of a refused handshake.
        reason: the close reason or what went wrong.
        reconnect_in: seconds until the next attempt, or None when the client
            will not reconnect (a terminal code, or :meth:`close`).
    """

    code: int
    reason: str
    reconnect_in: float | None


@dataclass(frozen=True, slots=True)
class Joined:
    """The server's ``joined``.

    Attributes:
        rejoin: True when this is a re-join (after a reconnect or a gap) with ``since``.
        recovered: with ``since``: True when every missed message follows; None on a first join.
            False too when the room's numbering changed (``epoch``), whatever the server said.
        epoch: the name of the room's numbering, in which ``last_id`` counts (None: a server
            of the release before, which names none).
    """

    room: str
    users: list[User]
    last_id: int  # the server's if it counts (a whole number >= 0), else the room's position, or 0
    rejoin: bool
    recovered: bool | None
    epoch: str | None = None


@dataclass(frozen=True, slots=True)
class RecoveryFailed:
    """Messages after ``since`` may be missing in ``room``: reload ``history``.

    Attributes:
        epoch_changed: the room's ids started again from 1 (a memory server restarted, Redis
            lost its data, the room unused past the server's ``ROOM_NUMBERING_TTL``): ``since``
            counted in a numbering that is gone, its ids name other messages now, and
            ``last_id`` is the new numbering's (the room goes on from there). Reload
            ``history`` whole: nothing held under the old ids matches the new ones.
    """

    room: str
    since: int
    # the server's if it counts (a whole number >= 0), else ``since`` (0 after epoch_changed)
    last_id: int
    epoch_changed: bool = False


@dataclass(frozen=True, slots=True)
class Removed:
    """The server removed you from ``room``.

    Attributes:
        reason: ``kicked`` (or the moderator's reason), ``banned``, ``membership revoked``,
            ``forbidden``; for a rejoin refused, the refusal's code: ``forbidden`` (a ban, a
            grant revoked), ``invalid_room``, ``too_many_rooms``.
        by: the moderator's ``user_id``, or ``api``; None for a rejoin refused.
        until: for a ban, Unix ms (None: until lifted).
    """

    room: str
    reason: str
    by: str | None = None
    until: int | None = None


@dataclass(frozen=True, slots=True)
class Muted:
    room: str | None  # None: everywhere
    until: int | None  # Unix ms; None: until lifted
    by: str | None = None


@dataclass(frozen=True, slots=True)
class Unmuted:
    room: str | None  # None: everywhere


@dataclass(frozen=True, slots=True)
class RoomStateChange:
    room: str
    old: RoomState
    new: RoomState


@dataclass(slots=True)
class RoomInfo:
    """What the client knows of a joined room (read-only for the app)."""

    name: str
    state: RoomState = RoomState.JOINING
    last_id: int | None = None  # the last message id delivered to the app
    users: list[User] = field(default_factory=list)
    # The room's numbering (the latest joined's epoch), in which last_id counts: persist the
    # two together to resume with join(room, since=last_id, epoch=epoch). None: unknown.
    epoch: str | None = None


@dataclass(frozen=True, slots=True)
class RoomPosition:
    """Where the app is in a room, as of the events an iterator handed over
    (:meth:`Events.position <wschat_client.Events.position>`): persist the two together and
    resume with ``join(room, since=last_id, epoch=epoch)``.

    Attributes:
        last_id: the id of the room's last message handed over (None: none yet, and the
            room's ``joined`` gave no position; or the position it was resumed from).
        epoch: the numbering ``last_id`` counts in (None: not known).
    """

    last_id: int | None
    epoch: str | None


EventName: TypeAlias = Literal[
    "state", "connected", "user_changed", "disconnected", "message", "dm", "presence", "typing",
    "joined", "recovery_failed", "room_state", "removed", "muted", "unmuted", "ack", "error"]
"""The names :meth:`Client.on <wschat_client.Client.on>` takes, and :attr:`Event.name`."""

Payload: TypeAlias = (StateChange | Welcome | Disconnect | Message | DirectMessage | Presence
                      | TypingEvent | Joined | RecoveryFailed | RoomStateChange | Removed | Muted
                      | Unmuted | ChatError)
"""What an ``on()`` handler receives, and :attr:`Event.payload`."""


@dataclass(frozen=True, slots=True)
class Event:
    """One event of :meth:`Client.events <wschat_client.Client.events>`: its ``name`` (the
    name :meth:`~wschat_client.Client.on` takes) and its ``payload`` (what that event's
    handler receives: the same object). Made for ``match``::

        match event:
            case Event("message", Message(room="general", from_=who, text=text)):
                print(who, text)
            case Event("recovery_failed", RecoveryFailed(room=room)):
                reload(room)
            case Event("error", ClientClosed(close_code=code)):
                print("stopped for good:", code)

    The name tells apart events whose payloads share a class: ``message`` and ``ack``
    (:class:`Message`), ``dm`` and ``ack`` (:class:`DirectMessage`), ``connected`` and
    ``user_changed`` (:class:`Welcome`).
    """

    name: EventName
    payload: Payload
