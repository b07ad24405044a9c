"""A client connection as the chat core sees it (:class:`Session`).

Its own module so that the core (:mod:`wschat.chat`), the local hub
(:mod:`wschat.hub`) and access control can all name it without importing
each other; the transport subclasses it.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from .auth import Identity
from .protocol import CloseCode, text_frame
from .ratelimit import Charge
from .stores.base import User


class SessionAccess:
    """One connection's grants (from its token) and the mutes it is under."""

    __slots__ = ("rooms", "mod_rooms", "muted", "joining", "mute_events")

    def __init__(self, identity: Identity) -> None:
        self.rooms = identity.rooms
        self.mod_rooms = identity.mod_rooms
        self.muted: dict[str, float] = {}  # room or EVERYWHERE -> end (Unix s, inf)
        self.joining: dict[str, float] = {}  # room -> when a join was admitted (Unix s)
        # mute and unmute events received: a store read that one overlapped is older
        # than what it says (see AccessControl.read_standing)
        self.mute_events = 0

    def regrant(self, identity: Identity, same_user: bool) -> None:
        """A fresh token: its grants; a user's mutes stay with that user only."""
        self.rooms, self.mod_rooms = identity.rooms, identity.mod_rooms
        if not same_user:
            self.muted.clear()
            self.joining.clear()

    def granted_exactly(self, room: str) -> bool:
        return self.rooms is not None and room in self.rooms



class Session:
    """One client connection as the chat core sees it.

    The transport subclasses it and supplies :meth:`send_frame` (never blocks:
    it queues) and :meth:`close`.
    """

    __slots__ = ("conn_id", "user_id", "username", "authenticated", "expires_at", "rooms",
                 "typing", "remote_addr", "opened_at", "flood_strikes", "held_send",
                 "refused_sends", "closed_by_chat", "access", "charges", "posts_empty_until",
                 "sized_empty_until", "__weakref__")

    def __init__(self, conn_id: str, identity: Identity, authenticated: bool,
                 remote_addr: str = "") -> None:
        self.conn_id = conn_id
        self.user_id = identity.user_id
        self.username = identity.username
        self.authenticated = authenticated
        self.expires_at = identity.expires_at
        self.rooms: set[str] = set()
        self.typing: dict[str, float] = {}  # room -> monotonic deadline
        self.remote_addr = remote_addr
        self.opened_at = time.monotonic()
        self.flood_strikes = 0
        # (client_msg_id, monotonic time of its token, refused as unavailable): a send
        # refused for now, which this connection's newer sends wait for
        # (Chat._keep_send_order)
        self.held_send: tuple[str, float, bool] | None = None
        # client_msg_ids refused for now, oldest first (Chat._note_refused); None if none
        self.refused_sends: dict[str, None] | None = None
        self.closed_by_chat = False
        self.access = SessionAccess(identity)
        # (user_id, authenticated, post buckets, request buckets): the rate-limit
        # buckets of the identity it was built for (Chat._charges), None until needed
        self.charges: tuple[str, bool, Charge, Charge] | None = None
        # Monotonic time before which its post buckets cannot hold a token again (a
        # refusal said so): its messages, DMs and typing are refused here until then
        # (Chat._refuse_before), not by a store round trip each.
        self.posts_empty_until = 0.0
        # The same for its requests whose replies pay for their size (a history, a big
        # room's users, a join's replay): Chat._pay_for_size, Chat._refuse_before.
        self.sized_empty_until = 0.0

    @property
    def user(self) -> User:
        return User(self.user_id, self.username)

    def send(self, event: bytes) -> None:
        self.send_frame(text_frame(event))

    def send_frame(self, frame: bytes) -> None:
        raise NotImplementedError

    def send_paced(self, frames: list[bytes], on_sent: Callable[[], None] | None = None
                   ) -> None:
        """Send ``frames`` as the client reads them (the transport paces them, outside the
        slow-consumer budget); ``on_sent`` once all were handed over. Here: at once."""
        for frame in frames:
            self.send_frame(frame)
        if on_sent is not None:
            on_sent()

    def close(self, code: CloseCode, reason: str) -> None:
        raise NotImplementedError

    def drop_slow_consumer(self) -> None:
        """Close with 4101: more is waiting for the client than it may (the transport
        also counts it, ``wschat_disconnects_total{reason="slow_consumer"}``)."""
        self.close(CloseCode.SLOW_CONSUMER, "slow consumer")
