"""Who may use which room, and moderation: the policy the chat core and the server API share.

**Rooms a user may join.** A JWT's ``rooms`` claim lists room-name patterns
(``*`` matches any run of characters); without the claim a signed-in user may
join any room that is not private. Guests may join the rooms matching
``GUEST_ROOMS`` (default ``*``). A room matching ``PRIVATE_ROOMS`` admits only
its members: users the server API granted membership, or whose token's
``rooms`` names it exactly (a pattern is not enough). A ban (one room or
everywhere) overrides all of that. ``mod_rooms`` patterns name the rooms a
user moderates (kick, mute and unmute over the WebSocket).

**Across workers and pods.** The state lives in a
:class:`~wschat.stores.moderation.ModerationStore` (Redis with ``REDIS_URL``),
read on every join. What must happen to live connections at once (a kick, a
ban, a mute, a disconnect) is a *control event* published to the user's
channel, which reaches exactly the workers holding that user's connections;
:meth:`wschat.chat.Chat.control` carries it out there.
"""

from __future__ import annotations

import functools
import re
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import orjson

from .protocol import ErrorCode, ProtocolError, RequestId, room_patterns
from .session import Session, SessionAccess
from .stores.moderation import EVERYWHERE, ModerationStore, Standing, until_ms

if TYPE_CHECKING:
    from .config import Settings
    from .stores.base import Broker

__all__ = ["AccessControl", "SessionAccess", "control_event", "forbidden", "matches",
           "parse_control", "room_patterns"]

# Control events travel on user channels with the chat events; JSON events never
# start with a NUL byte, so the hub never mistakes one for the other.
CONTROL_PREFIX = b"\x00wschat-control\n"
JOIN_WINDOW = 30.0  # seconds a join may take (redis SUBSCRIBE_TIMEOUT is 15)


def _glob(pattern: str) -> str:
    """One pattern as a regex that never backtracks into its stars: each run between two
    stars is found at its first place after the previous one, in an atomic group (a later
    place would only leave less room for the rest), so a match costs about the room's
    length times the pattern's. ``.*`` for each star took time exponential in the number
    of stars: '*a*a*a*a*a*a*a*a*b' (a token's claim may hold it) against a room of 64
    'a's held the worker for 93 s."""
    if "*" not in pattern:
        return re.escape(pattern)
    first, *middle, last = pattern.split("*")
    runs = "".join(f"(?>.*?{re.escape(run)})" for run in middle if run)
    return f"{re.escape(first)}{runs}.*{re.escape(last)}"


@functools.lru_cache(maxsize=4096)
def _compiled(patterns: tuple[str, ...]) -> re.Pattern[str]:
    alternatives = "|".join(f"(?:{_glob(p)})\\Z" for p in patterns)
    return re.compile(alternatives if patterns else "(?!)")


def matches(patterns: tuple[str, ...], room: str) -> bool:
    """Whether ``room`` matches any of ``patterns`` (``*`` globs, case-sensitive)."""
    return bool(patterns) and _compiled(patterns).match(room) is not None


def control_event(op: str, **fields: Any) -> bytes:
    return CONTROL_PREFIX + orjson.dumps({"op": op, **fields})


def parse_control(event: bytes) -> dict[str, Any] | None:
    """The control event in ``event``, or None for an ordinary chat event."""
    if not event.startswith(CONTROL_PREFIX):
        return None
    control: dict[str, Any] = orjson.loads(event[len(CONTROL_PREFIX):])
    return control


def forbidden(message: str, request_id: RequestId = None, **extra: Any) -> ProtocolError:
    return ProtocolError(ErrorCode.FORBIDDEN, message, request_id, **extra)


class AccessControl:
    """Room permissions and moderation actions over one store and the broker."""

    def __init__(self, settings: Settings, store: ModerationStore, broker: Broker,
                 clock: Callable[[], float] = time.time) -> None:
        self.guest_rooms = settings.guest_rooms
        self.private_rooms = settings.private_rooms
        self.store = store
        self.broker = broker
        self.clock = clock

    # -- permissions -------------------------------------------------------------------
    def is_private(self, room: str) -> bool:
        return matches(self.private_rooms, room)

    def allowed_by_grants(self, session: Session, room: str) -> bool:
        """What the connection's identity alone allows (no store read)."""
        if self.is_private(room):
            return session.access.granted_exactly(room)
        if not session.authenticated:
            return matches(self.guest_rooms, room)
        return session.access.rooms is None or matches(session.access.rooms, room)

    def admit(self, session: Session, room: str, request_id: RequestId = None,
              joining: bool = False) -> Standing:
        """Check that the connection may use ``room``; its standing there (mutes).

        ``joining``: the check of a ``join``; a kick that arrives before the join
        has finished is then held until it has (:meth:`kick_may_be_early`).

        Raises:
            ProtocolError: ``forbidden`` (not granted, not a member, or banned).
        """
        private = self.is_private(room)
        if not private and not self.allowed_by_grants(session, room):
            raise forbidden(f"room {room} is not open to you", request_id, room=room)
        if joining:
            # Stamped before the read: a ban written while it is under way may find
            # the connection neither in the room nor joining, and be dropped, while
            # the read still says "not banned".
            now = self.clock()
            for old in [r for r, at in session.access.joining.items() if at < now - JOIN_WINDOW]:
                del session.access.joining[old]
            session.access.joining[room] = now
        try:
            standing = self.read_standing(session, room)
            banned = standing.banned
            if banned is not None:
                raise forbidden(f"you are banned from {room}", request_id, room=room,
                                reason="banned", until=until_ms(banned))
            if private and not (standing.member or session.access.granted_exactly(room)):
                raise forbidden(f"room {room} is private: members only", request_id, room=room)
        except BaseException:
            if joining:
                session.access.joining.pop(room, None)
            raise
        return standing

    def read_standing(self, session: Session, room: str | None) -> Standing:
        """The user's standing in ``room`` (None: everywhere only), its mutes noted on
        the connection, unless a mute or unmute event reached the connection while the
        store was read: the event is newer than the read, which would undo it."""
        events = session.access.mute_events
        standing = self.store.standing(room, session.user_id)
        if session.access.mute_events == events:
            self.note_mutes(session, room, standing)
        return standing

    def kick_may_be_early(self, session: Session, room: str) -> bool:
        """A kick (or ban) for a room the connection is not in yet, but was admitted to
        moments ago: its join may still be under way (waiting for the store), having
        read the user's standing before the ban was written."""
        at = session.access.joining.get(room)
        return at is not None and at >= self.clock() - JOIN_WINDOW

    def note_mutes(self, session: Session, room: str | None, standing: Standing) -> None:
        muted = session.access.muted
        for scope, until in ((room, standing.muted_room),
                             (EVERYWHERE, standing.muted_everywhere)):
            if scope is None:
                continue
            if until is None:
                muted.pop(scope, None)
            else:
                muted[scope] = until

    def check_not_muted(self, session: Session, room: str | None,
                        request_id: RequestId = None) -> None:
        """Raises ``muted`` while a mute in ``room`` (or everywhere) lasts."""
        muted = session.access.muted
        if not muted:
            return
        now = self.clock()
        for scope in (room, EVERYWHERE) if room else (EVERYWHERE,):
            until = muted.get(scope)
            if until is None:
                continue
            if until <= now:
                del muted[scope]
                continue
            where = "everywhere" if scope == EVERYWHERE else f"in {room}"
            extra = {"room": room} if room else {}
            raise ProtocolError(ErrorCode.MUTED, f"you are muted {where}", request_id,
                                until=until_ms(until), **extra)

    def may_moderate(self, session: Session, room: str) -> bool:
        return session.authenticated and matches(session.access.mod_rooms, room)

    # -- moderation (the API and moderators) -------------------------------------------
    def kick(self, room: str, user_id: str, reason: str | None = None, by: str = "api",
             keep_granted: bool = False) -> None:
        """Remove the user's connections from ``room`` now, wherever they are."""
        self.broker.publish_user(user_id, control_event(
            "kick", room=room, reason=reason or "kicked", by=by, keep_granted=keep_granted))

    def ban(self, user_id: str, room: str | None, until: float, reason: str | None = None,
            by: str = "api") -> None:
        self.store.restrict("ban", room or EVERYWHERE, user_id, until)
        if room:
            self.broker.publish_user(user_id, control_event(
                "kick", room=room, reason="banned", by=by, note=reason, until=until_ms(until)))
        else:
            self.broker.publish_user(user_id, control_event(
                "disconnect", reason="banned", note=reason, until=until_ms(until)))

    def unban(self, user_id: str, room: str | None) -> bool:
        return self.store.lift("ban", room or EVERYWHERE, user_id)

    def mute(self, user_id: str, room: str | None, until: float, by: str = "api") -> None:
        scope = room or EVERYWHERE
        self.store.restrict("mute", scope, user_id, until)
        self.broker.publish_user(user_id, control_event(
            "mute", scope=scope, until=None if until == float("inf") else until, by=by))

    def unmute(self, user_id: str, room: str | None, by: str = "api") -> bool:
        scope = room or EVERYWHERE
        lifted = self.store.lift("mute", scope, user_id)
        self.broker.publish_user(user_id, control_event("unmute", scope=scope, by=by))
        return lifted

    def set_member(self, room: str, user_id: str, member: bool) -> bool:
        changed = self.store.set_member(room, user_id, member)
        if not member and self.is_private(room):
            # Out at once, unless the token itself names the room.
            self.kick(room, user_id, "membership revoked", keep_granted=True)
        return changed

    def disconnect(self, user_id: str, reason: str = "disconnected") -> None:
        self.broker.publish_user(user_id, control_event("disconnect", reason=reason))
