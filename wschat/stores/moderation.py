"""Moderation state every worker and pod must agree on: bans, mutes, private-room members.

A ban or a mute is held per (scope, user): the scope is a room name or
:data:`EVERYWHERE`. Each has an end (Unix seconds, ``math.inf`` until lifted)
and is gone once it has passed. Private-room membership is a set of user ids
per room, granted and revoked by the server API.

The memory implementation serves one process; the Redis one
(:mod:`wschat.stores.redis.moderation`) keeps the same state in keys every
worker reads, so a ban made through one pod holds on every other.
"""

from __future__ import annotations

import math
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

EVERYWHERE = "*"  # never a room name (those start with a letter or digit)
KINDS = ("ban", "mute")


@dataclass(frozen=True, slots=True)
class Standing:
    """A user's restrictions in one room, each an end time (None: not restricted)."""

    banned_room: float | None = None
    banned_everywhere: float | None = None
    muted_room: float | None = None
    muted_everywhere: float | None = None
    member: bool = False  # granted membership of the (private) room

    @property
    def banned(self) -> float | None:
        ends = [t for t in (self.banned_room, self.banned_everywhere) if t is not None]
        return max(ends) if ends else None


class ModerationStore(ABC):
    @abstractmethod
    def standing(self, room: str | None, user_id: str) -> Standing:
        """The user's bans, mutes and membership for ``room`` (None: the everywhere ones only)."""

    @abstractmethod
    def restrict(self, kind: str, scope: str, user_id: str, until: float) -> None:
        """Ban or mute (``kind``) the user in ``scope`` until ``until`` (``math.inf``: lifted by hand)."""

    @abstractmethod
    def lift(self, kind: str, scope: str, user_id: str) -> bool:
        """Lift a ban or mute; False when there was none."""

    @abstractmethod
    def set_member(self, room: str, user_id: str, member: bool) -> bool:
        """Grant or revoke membership of a private room; True when that changed anything."""

    @abstractmethod
    def members(self, room: str) -> list[str]:
        """User ids granted membership of ``room``, sorted."""

    # -- server-wide figures for the API (None: this process is the whole server) -------
    def connections(self, user_id: str) -> int | None:
        return None

    def rooms(self) -> list[tuple[str, int]] | None:
        """(room, distinct users) for every room with members."""
        return None

    def workers(self) -> list[dict[str, Any]] | None:
        """Every live worker (``node``), its pod (``host``) and connection count."""
        return None


class MemoryModerationStore(ModerationStore):
    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._until: dict[tuple[str, str, str], float] = {}  # (kind, scope, user) -> end
        self._members: dict[str, set[str]] = {}

    def _active(self, kind: str, scope: str, user_id: str) -> float | None:
        key = (kind, scope, user_id)
        until = self._until.get(key)
        if until is not None and until <= self._clock():
            del self._until[key]
            return None
        return until

    def standing(self, room: str | None, user_id: str) -> Standing:
        return Standing(
            self._active("ban", room, user_id) if room else None,
            self._active("ban", EVERYWHERE, user_id),
            self._active("mute", room, user_id) if room else None,
            self._active("mute", EVERYWHERE, user_id),
            bool(room) and user_id in self._members.get(room or "", ()))

    def restrict(self, kind: str, scope: str, user_id: str, until: float) -> None:
        self._until[(kind, scope, user_id)] = until

    def lift(self, kind: str, scope: str, user_id: str) -> bool:
        active = self._active(kind, scope, user_id) is not None
        self._until.pop((kind, scope, user_id), None)
        return active

    def set_member(self, room: str, user_id: str, member: bool) -> bool:
        members = self._members.setdefault(room, set())
        changed = (user_id in members) != member
        if member:
            members.add(user_id)
        else:
            members.discard(user_id)
            if not members:
                del self._members[room]
        return changed

    def members(self, room: str) -> list[str]:
        return sorted(self._members.get(room, ()))


def until_of(duration: float | None, now: float) -> float:
    """The end of a restriction lasting ``duration`` seconds from ``now`` (None: until lifted)."""
    return math.inf if duration is None else now + duration


def until_ms(until: float | None) -> int | None:
    """An end time as clients see it: Unix milliseconds, null when it lasts until lifted."""
    return None if until is None or until == math.inf else int(until * 1000)
