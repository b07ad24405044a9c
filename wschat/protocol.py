"""The wire protocol, without I/O: JSON text in, typed commands out; events in, bytes out.

Every client frame is one JSON object with a ``type``. :func:`parse_command`
turns it into one of the command dataclasses below or raises
:class:`ProtocolError`, which carries the stable ``code`` the client sees in its
``error`` event. Event encoders return the UTF-8 JSON bytes of one server event;
:func:`text_frame` wraps such bytes into one unmasked WebSocket text frame, so
fan-out encodes an event once and writes the same bytes to every member.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass
from typing import Any, NewType

import orjson

from .errors import WschatError

UserId = NewType("UserId", str)
RoomName = NewType("RoomName", str)
RequestId = str | int | None


class ErrorCode(enum.StrEnum):
    """The ``code`` of an ``error`` event: stable strings clients may branch on."""

    INVALID_JSON = "invalid_json"
    INVALID_MESSAGE = "invalid_message"
    UNKNOWN_TYPE = "unknown_type"
    AUTH_REQUIRED = "auth_required"
    AUTH_FAILED = "auth_failed"
    TOKEN_EXPIRED = "token_expired"
    NOT_IN_ROOM = "not_in_room"
    INVALID_ROOM = "invalid_room"
    RATE_LIMITED = "rate_limited"
    MESSAGE_TOO_LARGE = "message_too_large"
    TOO_MANY_ROOMS = "too_many_rooms"
    TOO_MANY_CONNECTIONS = "too_many_connections"
    USER_NOT_FOUND = "user_not_found"
    INBOX_FULL = "inbox_full"
    UNAVAILABLE = "unavailable"
    INTERNAL = "internal_error"
    FORBIDDEN = "forbidden"  # the room is not open to this user (wschat.access)
    MUTED = "muted"  # muted in the room: may read, may not post or type


class CloseCode(enum.IntEnum):
    """WebSocket close codes the server sends (RFC 6455 section 7.4, and 4000-4999 ours).

    Codes below 4000 are the RFC's. In the 4000 range, 40xx means "do not
    reconnect with the same credentials" and 41xx "reconnect after a pause".
    """

    NORMAL = 1000
    GOING_AWAY = 1001  # server shutting down: reconnect (to another pod)
    PROTOCOL_ERROR = 1002
    UNSUPPORTED_DATA = 1003  # a binary frame: the protocol is JSON text
    INVALID_PAYLOAD = 1007  # invalid UTF-8 in a text frame
    MESSAGE_TOO_BIG = 1009  # frame or message over MAX_MESSAGE_BYTES
    INTERNAL_ERROR = 1011
    TRY_AGAIN_LATER = 1013
    AUTH_TIMEOUT = 4001  # did not authenticate in time (AUTH_REQUIRED)
    TOKEN_EXPIRED = 4002  # token expired and no fresh `auth` arrived
    DISCONNECTED = 4003  # closed by the server's API (disconnect, or a ban everywhere)
    HEARTBEAT_TIMEOUT = 4100  # silent for two heartbeat intervals
    SLOW_CONSUMER = 4101  # outbound backlog passed MAX_OUTBOUND_BYTES
    RATE_LIMITED = 4102  # kept flooding after rate_limited errors


class ProtocolError(WschatError):
    """A client request the server rejects; becomes one ``error`` event."""

    def __init__(self, code: ErrorCode, message: str, request_id: RequestId = None,
                 **extra: Any) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.request_id = request_id
        self.extra = extra

    def to_event(self) -> bytes:
        return encode_error(self.code, self.message, self.request_id, **self.extra)


@dataclass(frozen=True, slots=True)
class Limits:
    """Bounds the parser enforces (from Settings)."""

    max_text_chars: int = 4000
    history_size: int = 100


# Commands. `request_id` is the client's optional "id", echoed in the direct reply.
# Commands, drafts and Posted are made for every message and never changed: not
# frozen only because a frozen dataclass's __init__ sets each field through
# object.__setattr__ (twice the cost, ~0.5 us a message each).
@dataclass(slots=True)
class Auth:
    token: str
    request_id: RequestId = None


@dataclass(slots=True)
class Join:
    room: RoomName
    since: int | None = None
    request_id: RequestId = None
    # The room's epoch (``joined``'s) that ``since`` counts in: another epoch's ids name
    # other messages, so the join replays nothing and answers ``recovered: false``.
    epoch: str | None = None


@dataclass(slots=True)
class Leave:
    room: RoomName
    request_id: RequestId = None


@dataclass(slots=True)
class SendMessage:
    room: RoomName
    text: str
    client_msg_id: str | None = None
    request_id: RequestId = None


@dataclass(slots=True)
class SendDm:
    to: UserId
    text: str
    client_msg_id: str | None = None
    request_id: RequestId = None


@dataclass(slots=True)
class Typing:
    room: RoomName
    status: bool
    request_id: RequestId = None


@dataclass(slots=True)
class ListUsers:
    room: RoomName
    request_id: RequestId = None


@dataclass(slots=True)
class History:
    room: RoomName
    limit: int
    before: int | None = None
    request_id: RequestId = None


@dataclass(slots=True)
class Ping:
    request_id: RequestId = None


@dataclass(slots=True)
class Moderate:
    """A moderator's ``kick``, ``mute`` or ``unmute`` of a user in a room (wschat.access)."""

    action: str
    room: RoomName
    user_id: UserId
    duration: float | None = None  # mute: seconds; None until lifted
    reason: str | None = None
    request_id: RequestId = None


Command = (Auth | Join | Leave | SendMessage | SendDm | Typing | ListUsers | History | Ping
           | Moderate)

# \Z, not $: "$" also matches before a final newline, and "team-red\n" would be a room
# of its own that no pattern of PRIVATE_ROOMS or a token's claims covers.
ROOM_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:\-]{0,63}\Z")
PATTERN_RE = re.compile(r"[A-Za-z0-9_.:*\-]{1,64}\Z")  # a room name, or a glob of them
MAX_PATTERNS = 256
USERNAME_RE = re.compile(r"\w(?:[\w .\-]{0,30}[\w.\-])?\Z")
MAX_ID_CHARS = 64


def room_patterns(value: Any) -> tuple[str, ...] | None:
    """Validate a ``rooms``/``mod_rooms`` claim or setting: a list of room-name patterns.

    Raises:
        ValueError: not a list of at most 256 patterns of room-name characters and ``*``.
    """
    if value is None:
        return None
    if not isinstance(value, (list, tuple)) or len(value) > MAX_PATTERNS:
        raise ValueError(f"room patterns must be a list of at most {MAX_PATTERNS}")
    for pattern in value:
        if not isinstance(pattern, str) or not PATTERN_RE.match(pattern):
            raise ValueError(f"bad room pattern {str(pattern)[:70]!r}: 1-64 letters, digits, "
                             "_ . : - and *")
    return tuple(value)



def _field(obj: dict[str, Any], name: str, kind: type | tuple[type, ...], rid: RequestId,
           required: bool = True) -> Any:
    value = obj.get(name)
    if value is None:
        if required:
            raise ProtocolError(ErrorCode.INVALID_MESSAGE, f"missing field '{name}'", rid)
        return None
    # bool is an int in Python; a JSON true is never a valid number here.
    if not isinstance(value, kind) or (isinstance(value, bool) and bool not in _as_tuple(kind)):
        raise ProtocolError(ErrorCode.INVALID_MESSAGE,
                            f"field '{name}' has the wrong type", rid)
    return value


def _as_tuple(kind: type | tuple[type, ...]) -> tuple[type, ...]:
    return kind if isinstance(kind, tuple) else (kind,)


def _room(obj: dict[str, Any], rid: RequestId) -> RoomName:
    room = _field(obj, "room", str, rid)
    if not ROOM_NAME_RE.match(room):
        raise ProtocolError(
            ErrorCode.INVALID_ROOM,
            "room names are 1-64 characters: letters, digits and _ . : - "
            "(starting with a letter or digit)", rid)
    return RoomName(room)


def _text(obj: dict[str, Any], rid: RequestId, limits: Limits) -> str:
    text = _field(obj, "text", str, rid)
    if not text or text.isspace():  # what strip() would leave empty, without the copy
        raise ProtocolError(ErrorCode.INVALID_MESSAGE, "text is empty", rid)
    if len(text) > limits.max_text_chars:
        raise ProtocolError(ErrorCode.MESSAGE_TOO_LARGE,
                            f"text is longer than {limits.max_text_chars} characters", rid)
    return text


# Control characters in an id a client makes up: a database cannot hold every one of
# them as text (PostgreSQL refuses NUL; SQLite's JSON functions cut a string at it).
_CONTROL_CHARS = re.compile("[\x00-\x1f\x7f]")


def _short_id(obj: dict[str, Any], name: str, rid: RequestId) -> str | None:
    value = _field(obj, name, str, rid, required=False)
    if value is not None and (not 0 < len(value) <= MAX_ID_CHARS
                              or _CONTROL_CHARS.search(value)):
        raise ProtocolError(ErrorCode.INVALID_MESSAGE,
                            f"'{name}' must be 1-{MAX_ID_CHARS} characters, "
                            "none of them control characters", rid)
    return value


def _counter(obj: dict[str, Any], name: str, rid: RequestId, lo: int) -> int | None:
    value = _field(obj, name, int, rid, required=False)
    if value is not None and not (lo <= value < 2**53):
        raise ProtocolError(ErrorCode.INVALID_MESSAGE, f"'{name}' is out of range", rid)
    return value


def _request_id(obj: dict[str, Any]) -> RequestId:
    rid = obj.get("id")
    if rid is None:
        return None
    if isinstance(rid, bool) or not isinstance(rid, (str, int)):
        raise ProtocolError(ErrorCode.INVALID_MESSAGE, "'id' must be a string or an integer")
    if isinstance(rid, str) and len(rid) > MAX_ID_CHARS:
        raise ProtocolError(ErrorCode.INVALID_MESSAGE, f"'id' is longer than {MAX_ID_CHARS}")
    if isinstance(rid, int) and not (-(2**53) < rid < 2**53):
        raise ProtocolError(ErrorCode.INVALID_MESSAGE, "'id' is out of range")
    return rid


def parse_command(raw: str | bytes, limits: Limits = Limits()) -> Command:
    """Parse one client frame into a command.

    Raises:
        ProtocolError: malformed JSON, an unknown ``type``, or a missing,
            wrong-typed or out-of-range field. ``request_id`` is set when the
            frame carried a usable ``id``.
    """
    try:
        obj = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise ProtocolError(ErrorCode.INVALID_JSON, "frame is not valid JSON") from None
    if not isinstance(obj, dict):
        raise ProtocolError(ErrorCode.INVALID_MESSAGE, "frame must be a JSON object")
    rid = _request_id(obj)
    kind = obj.get("type")
    if not isinstance(kind, str):
        raise ProtocolError(ErrorCode.INVALID_MESSAGE, "missing field 'type'", rid)
    if kind == "message":
        return SendMessage(_room(obj, rid), _text(obj, rid, limits),
                           _short_id(obj, "client_msg_id", rid), rid)
    if kind == "typing":
        return Typing(_room(obj, rid), _field(obj, "status", bool, rid), rid)
    if kind == "ping":
        return Ping(rid)
    if kind == "join":
        return Join(_room(obj, rid), _counter(obj, "since", rid, 0), rid,
                    _short_id(obj, "epoch", rid))
    if kind == "leave":
        return Leave(_room(obj, rid), rid)
    if kind == "dm":
        to = _field(obj, "to", str, rid)
        if not valid_user_id(to):  # as kick's: one no user can have reaches nobody
            raise ProtocolError(ErrorCode.INVALID_MESSAGE, DM_TO_RULE, rid)
        return SendDm(UserId(to), _text(obj, rid, limits),
                      _short_id(obj, "client_msg_id", rid), rid)
    if kind == "list_users":
        return ListUsers(_room(obj, rid), rid)
    if kind == "history":
        limit = _counter(obj, "limit", rid, 1)
        limit = min(limit or 50, limits.history_size)
        return History(_room(obj, rid), limit, _counter(obj, "before", rid, 1), rid)
    if kind in ("kick", "mute", "unmute"):
        return _moderate(kind, obj, rid)
    if kind == "auth":
        token = _field(obj, "token", str, rid)
        if not 0 < len(token) <= 8192:
            raise ProtocolError(ErrorCode.INVALID_MESSAGE, "'token' is empty or too long", rid)
        return Auth(token, rid)
    raise ProtocolError(ErrorCode.UNKNOWN_TYPE, f"unknown message type {kind[:32]!r}", rid)


MAX_REASON_CHARS = 200
USER_ID_RULE = ("'user_id' must be a user's id: 1-128 characters without control characters, "
                "not 'system' or 'api', and one beginning with 'guest-' a guest's")

DM_TO_RULE = "'to'" + USER_ID_RULE.removeprefix("'user_id'")
LIFTED_USER_ID_RULE = "'user_id' must be a string of 1-128 characters"


def _moderate(kind: str, obj: dict[str, Any], rid: RequestId) -> Moderate:
    user_id = _field(obj, "user_id", str, rid)
    if kind == "unmute":
        # A lift stores nothing: it takes what an earlier release may have stored a
        # mute for (any id of 1-128 characters then), as /api/unmute does.
        if not valid_lifted_user_id(user_id):
            raise ProtocolError(ErrorCode.INVALID_MESSAGE, LIFTED_USER_ID_RULE, rid)
    elif not valid_user_id(user_id):
        raise ProtocolError(ErrorCode.INVALID_MESSAGE, USER_ID_RULE, rid)
    duration = _field(obj, "duration", (int, float), rid, required=False)
    if duration is not None and not 0 < duration <= 10 * 365 * 86400:
        raise ProtocolError(ErrorCode.INVALID_MESSAGE, "'duration' is out of range", rid)
    reason = _field(obj, "reason", str, rid, required=False)
    if reason is not None and len(reason) > MAX_REASON_CHARS:
        raise ProtocolError(ErrorCode.INVALID_MESSAGE,
                            f"'reason' is longer than {MAX_REASON_CHARS}", rid)
    if reason is not None and not reason.isprintable():
        # The kicked user's client shows it: no control characters (NUL, ESC) and no
        # bidi overrides or other format characters, as /api/kick's reason.
        raise ProtocolError(ErrorCode.INVALID_MESSAGE, "'reason' must be printable", rid)
    return Moderate(kind, _room(obj, rid), UserId(user_id),
                    float(duration) if duration is not None else None, reason, rid)


def valid_username(name: str) -> bool:
    """Usernames: 1-32 characters, letters/digits/_ . - and inner spaces."""
    return bool(USERNAME_RE.match(name))


# ---- events --------------------------------------------------------------------------

def encode(event: dict[str, Any]) -> bytes:
    """One server event as UTF-8 JSON bytes."""
    return orjson.dumps(event)


def _with_id(event: dict[str, Any], request_id: RequestId) -> dict[str, Any]:
    if request_id is not None:
        event["id"] = request_id
    return event


def encode_error(code: ErrorCode, message: str, request_id: RequestId = None,
                 **extra: Any) -> bytes:
    return encode(_with_id({"type": "error", "code": code.value, "message": message, **extra},
                           request_id))


def encode_reply(kind: str, request_id: RequestId = None, **fields: Any) -> bytes:
    """A direct reply to a request (``joined``, ``left``, ``users``, ``pong``, ...)."""
    return encode(_with_id({"type": kind, **fields}, request_id))


def encode_history(room: str, messages: list[bytes], request_id: RequestId = None,
                   **fields: Any) -> bytes:
    """``history`` reply embedding stored message JSON as-is (no decode/re-encode)."""
    return encode(_with_id({"type": "history", "room": room,
                            "messages": [orjson.Fragment(m) for m in messages], **fields},
                           request_id))


GUEST_ID_PREFIX = "guest-"


def is_guest_id(user_id: str) -> bool:
    """Whether ``user_id`` is one the server generated for a guest (no token)."""
    return user_id.startswith(GUEST_ID_PREFIX)


MAX_USER_ID_CHARS = 128  # a token's sub
# The server API's user_id (wschat.stores.base.API_USER), and the `by` of its moderation
# events (wschat.access): no user has either (wschat.auth refuses them as a token's sub).
RESERVED_USER_IDS = ("system", "api")
# A user id travels in keys, payloads and logs: no C0 or C1 control character, no DEL,
# and no lone surrogate (JSON's "\ud800"), which has no UTF-8 at all.
_UNSAFE_ID_CHARS = re.compile("[\x00-\x1f\x7f-\x9f\ud800-\udfff]")
# What the server gives a guest (wschat.admission): "guest-" and 12 hex digits.
_GUEST_ID = re.compile(f"{GUEST_ID_PREFIX}[0-9a-f]{{12}}\\Z")


def unsafe_id_chars(user_id: str) -> bool:
    """Whether ``user_id`` holds a control character or a lone surrogate."""
    return _UNSAFE_ID_CHARS.search(user_id) is not None


def valid_user_id(user_id: object) -> bool:
    """Whether ``user_id`` is one a user can have: a token's ``sub`` as wschat.auth takes
    it (1-128 characters, no control characters or lone surrogates, neither ``system``
    nor ``api``, not beginning with ``guest-``), or a guest's id as the server makes them.
    What names a user to moderate (``kick``, ``mute``, the server API) must be one."""
    if not isinstance(user_id, str):
        return False
    if is_guest_id(user_id):
        return _GUEST_ID.match(user_id) is not None
    return (0 < len(user_id) <= MAX_USER_ID_CHARS and user_id not in RESERVED_USER_IDS
            and not unsafe_id_chars(user_id))


def valid_lifted_user_id(user_id: object) -> bool:
    """Whether ``user_id`` may name whom a lift (``unmute``, the API's unban, unmute and
    a member's removal) is for: any id an earlier release may have stored a restriction
    or membership for (1-128 characters, its rule then), so that it can still be taken
    out. A lift stores nothing."""
    return isinstance(user_id, str) and 0 < len(user_id) <= MAX_USER_ID_CHARS


def _guest_mark(body: dict[str, Any], guest: bool) -> dict[str, Any]:
    # Guests pick their own names: events from them say so, so nobody can pass
    # for a signed-in user of the same name. Absent for signed-in users.
    if guest:
        body["guest"] = True
    return body


def encode_presence(room: str, user_id: str, username: str, status: str,
                    guest: bool = False) -> bytes:
    return encode(_guest_mark({"type": "presence", "room": room, "user": username,
                               "user_id": user_id, "status": status}, guest))


def encode_typing(room: str, user_id: str, username: str, status: bool,
                  guest: bool = False) -> bytes:
    return encode(_guest_mark({"type": "typing", "room": room, "user": username,
                               "user_id": user_id, "status": status}, guest))


@dataclass(slots=True)
class MessageDraft:
    """A room message or DM before the store gives it its id.

    The store splices the id between ``prefix`` and ``suffix`` (which makes it
    one string concatenation, in Python or in a Redis Lua script).
    """

    prefix: bytes
    suffix: bytes
    client_msg_id: str | None
    timestamp_ms: int = 0

    def with_id(self, msg_id: int) -> bytes:
        return self.prefix + str(msg_id).encode() + self.suffix

    def as_stored(self, msg_id: int, timestamp_ms: int) -> bytes:
        """The event as it was stored under ``msg_id`` at ``timestamp_ms``: a retry's
        echo rebuilt from its own draft, so a store need keep only those two numbers.
        (Quotes inside the text are escaped, so the key can only be the real one.)"""
        key = b',"timestamp":'
        suffix = self.suffix.replace(key + str(self.timestamp_ms).encode(),
                                     key + str(timestamp_ms).encode(), 1)
        return self.prefix + str(msg_id).encode() + suffix


def draft_message(room: str, username: str, user_id: str, text: str, timestamp_ms: int,
                  client_msg_id: str | None, guest: bool = False) -> MessageDraft:
    # One dict literal (a guest's with its mark): this runs for every message.
    body = ({"room": room, "from": username, "user_id": user_id, "guest": True,
             "text": text, "timestamp": timestamp_ms} if guest else
            {"room": room, "from": username, "user_id": user_id,
             "text": text, "timestamp": timestamp_ms})
    if client_msg_id is not None:
        body["client_msg_id"] = client_msg_id
    return MessageDraft(_MESSAGE_PREFIX, b"," + orjson.dumps(body)[1:],
                        client_msg_id, timestamp_ms)


def draft_dm(to: str, username: str, user_id: str, text: str, timestamp_ms: int,
             client_msg_id: str | None, guest: bool = False) -> MessageDraft:
    body = ({"from": username, "user_id": user_id, "guest": True, "to": to,
             "text": text, "timestamp": timestamp_ms} if guest else
            {"from": username, "user_id": user_id, "to": to,
             "text": text, "timestamp": timestamp_ms})
    if client_msg_id is not None:
        body["client_msg_id"] = client_msg_id
    return MessageDraft(DM_PREFIX, b"," + orjson.dumps(body)[1:], client_msg_id,
                        timestamp_ms)


def text_frame(payload: bytes) -> bytes:
    """One final, unmasked RFC 6455 text frame carrying ``payload``.

    Server-to-client frames are never masked, so the same bytes serve every
    member of a room.
    """
    n = len(payload)
    if n < 126:
        header = bytes((0x81, n))
    elif n < 65536:
        header = bytes((0x81, 126)) + n.to_bytes(2, "big")
    else:
        header = bytes((0x81, 127)) + n.to_bytes(8, "big")
    return header + payload


PING_FRAME = b"\x89\x00"


_TYPE_PREFIX = b'{"type":"'


def event_type(event: bytes) -> str | None:
    """The type of an event this module encoded (every encoder writes ``type`` first),
    read without parsing the JSON; None for anything else."""
    if not event.startswith(_TYPE_PREFIX):
        return None
    end = event.find(b'"', len(_TYPE_PREFIX))
    return event[len(_TYPE_PREFIX):end].decode() if end > 0 else None


_MESSAGE_PREFIX = b'{"type":"message","id":'


DM_PREFIX = b'{"type":"dm","id":'


def message_id_of(event: bytes) -> int | None:
    """The room sequence id of a stored ``message`` event, None for any other event."""
    if not event.startswith(_MESSAGE_PREFIX):
        return None
    end = event.index(b",", len(_MESSAGE_PREFIX))
    return int(event[len(_MESSAGE_PREFIX):end])


def stored_id_of(event: bytes) -> int:
    """The id a store gave a ``message`` or ``dm`` event (see :class:`MessageDraft`)."""
    prefix = _MESSAGE_PREFIX if event.startswith(_MESSAGE_PREFIX) else DM_PREFIX
    if not event.startswith(prefix):
        raise ValueError("not a stored message or dm")
    return int(event[len(prefix):event.index(b",", len(prefix))])


def addressed_to(event: bytes) -> str | None:
    """The recipient of a stored ``dm`` event, None for any other event."""
    if not event.startswith(DM_PREFIX):
        return None
    to = orjson.loads(event).get("to")
    return to if isinstance(to, str) else None
