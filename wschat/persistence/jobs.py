"""What callers hand the group-commit writer; the log fills in the outcome.

Every job is a keyword-only dataclass: what the caller must supply has no
default, what the log fills in (``msg_id``, ``event``, ``backlog`` ...) has one.
Jobs are pickled to the SQLite writer process and back (``wschat.persistence.sqlite``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from ..protocol import GUEST_ID_PREFIX, MessageDraft, is_guest_id


def now_ms() -> int:
    """Wall-clock milliseconds, as stored in ``created_ms``, ``seen_ms``, ``applied_ms``."""
    return int(time.time() * 1000)


@dataclass(slots=True, eq=False, kw_only=True)
class Job:
    finished: bool = field(default=False, init=False)  # the outcome (or error) is filled in
    submitted: float = field(default=0.0, init=False)  # time.monotonic()
    cancelled: bool = field(default=False, init=False)
    # In a transaction that committed (the batch may still be writing other parts of
    # itself): the watchdog leaves it to its outcome.
    committed: bool = field(default=False, init=False)
    error: Exception | None = field(default=None, init=False)


@dataclass(slots=True, eq=False, kw_only=True)
class Post(Job):
    """A message that gets an id: filled in with ``msg_id``, ``event``, ``duplicate``."""

    draft: MessageDraft
    created_ms: int = field(default_factory=now_ms)
    msg_id: int = 0
    event: bytes = b""
    duplicate: bool = False

    @property
    def client_msg_id(self) -> str | None:
        return self.draft.client_msg_id

    def number(self, msg_id: int) -> None:
        """Give this post its id, and so its event."""
        self.msg_id, self.event = msg_id, self.draft.with_id(msg_id)


@dataclass(slots=True, eq=False, kw_only=True)
class RoomPost(Post):
    room: str
    user_id: str

    def draft_parts(self) -> tuple[str, str]:
        """The event before and after its id, for SQL that splices the id in itself."""
        return self.draft.prefix.decode(), self.draft.suffix.decode()


@dataclass(slots=True, eq=False, kw_only=True)
class DmPost(Post):
    sender_id: str
    recipient_id: str
    delivered: bool = True  # False: kept for the recipient's next connection
    # Kept only while the recipient has fewer than this many kept (None: no bound),
    # counted in the transaction that would keep it; past it ``inbox_full`` is set
    # and nothing is stored.
    keep_at_most: int | None = None
    # ... and while its sender (all guests together: see sender_share) has fewer than this
    # many of them (None: no bound of its own, the server API's).
    keep_from_sender_at_most: int | None = None
    inbox_full: bool = False

    @property
    def sender_share(self) -> str:
        """Whose share of the recipient's kept DMs this one takes: its sender's, or for a
        guest (a new connection is a new id) every guest's, ``guest-``."""
        return GUEST_ID_PREFIX if is_guest_id(self.sender_id) else self.sender_id


@dataclass(slots=True, eq=False, kw_only=True)
class Arrival(Job):
    """A user connected: remember them, and read the first page of the DMs kept while
    they were away. Those stay kept until :class:`DmsDelivered` says the client has them."""

    user_id: str
    username: str
    seen_ms: int = field(default_factory=now_ms)
    backlog: list[bytes] = field(default_factory=list)  # oldest first, at most DM_PAGE
    kept: int = 0  # how many are kept in all


@dataclass(slots=True, eq=False, kw_only=True)
class DmsDelivered(Job):
    """The user's connection was handed its kept DMs up to ``up_to``: no longer kept."""

    user_id: str
    up_to: int


@dataclass(slots=True, eq=False, kw_only=True)
class SequenceFloor(Job):
    """Never issue an id <= ``at_least`` in ``room`` (None: the DMs' sequence): ids
    another store issued before the log."""

    room: str | None
    at_least: int
