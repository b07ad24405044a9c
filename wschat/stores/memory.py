"""In-process stores: the embedded default, for exactly one gunicorn worker.

Everything lives in this process's dicts; under gevent no operation here
yields, so each is atomic without a lock. Several workers would each hold their
own rooms, which is why start-up refuses ``WEB_CONCURRENCY > 1`` without Redis.
"""

from __future__ import annotations

import time
from collections import OrderedDict, deque
from collections.abc import Callable

from ..protocol import MessageDraft
from ..ratelimit import Charge
from .base import (
    HELD, PUBLISHED, REPLAY_MAX_BYTES, ROOM_NUMBERING_TTL, STALE, Broker, JoinResult,
    LeaveResult, MessageStore, Posted, PresenceStore, Replay, RoomHandler, RoomStore, Stored,
    Stores, User, UserHandler, dm_parties, new_epoch, newest_within, retry_echo, run_to,
)

DEDUPE_TTL = 3600.0
DEDUPE_MAX = 100_000  # entries: ids, not events (~0.3 KiB each at the longest names)
# What the history bound (MEMORY_HISTORY_BYTES) charges beyond each event's bytes:
# Python's per-object and per-entry overhead, so that many tiny messages, or many
# rooms holding nothing but a sequence number, cannot slip under it.
MESSAGE_OVERHEAD = 100
ROOM_OVERHEAD = 400
RETIRED_OVERHEAD = 250  # a dropped room's last id and epoch, kept for ROOM_NUMBERING_TTL


class MemoryRoomStore(RoomStore):
    def __init__(self) -> None:
        # room -> user_id -> (User, set of conn_ids); dicts keep join order.
        self._rooms: dict[str, dict[str, tuple[User, set[str]]]] = {}
        self._memberships = 0

    def join(self, room: str, conn_id: str, user: User) -> JoinResult:
        users = self._rooms.setdefault(room, {})
        entry = users.get(user.user_id)
        first = entry is None
        if first:
            entry = users[user.user_id] = (user, set())
            self._memberships += 1
        entry[1].add(conn_id)
        return JoinResult(first, [u for u, _ in users.values()])

    def leave(self, room: str, conn_id: str, user_id: str) -> LeaveResult:
        users = self._rooms.get(room)
        entry = users.get(user_id) if users else None
        if entry is None:  # no connection of the user is left (as leave.lua says)
            return LeaveResult(True, not users)
        entry[1].discard(conn_id)
        if entry[1]:
            return LeaveResult(False, False)
        del users[user_id]
        self._memberships -= 1
        if not users:
            del self._rooms[room]
        return LeaveResult(True, not users)

    def members(self, room: str) -> list[User]:
        return [u for u, _ in self._rooms.get(room, {}).values()]

    def totals(self) -> tuple[int, int]:
        return len(self._rooms), self._memberships


class MemoryPresenceStore(PresenceStore):
    def __init__(self) -> None:
        self._conns: dict[str, set[str]] = {}

    def connect(self, conn_id: str, user: User) -> None:
        self._conns.setdefault(user.user_id, set()).add(conn_id)

    def disconnect(self, conn_id: str, user_id: str) -> None:
        conns = self._conns.get(user_id)
        if conns is not None:
            conns.discard(conn_id)
            if not conns:
                del self._conns[user_id]

    def is_online(self, user_id: str) -> bool:
        return user_id in self._conns


class _RoomLog:
    __slots__ = ("epoch", "last_id", "messages")

    def __init__(self, size: int, epoch: str) -> None:
        self.last_id = 0
        self.messages: deque[tuple[int, bytes]] = deque(maxlen=size)
        self.epoch = epoch  # this numbering's name; its last id retired keeps it


class MemoryMessageStore(MessageStore):
    """History and ids per room, bounded twice: ``HISTORY_SIZE`` messages per room and
    ``max_bytes`` (``MEMORY_HISTORY_BYTES``) for all rooms together. Over the latter,
    emptied rooms go first (oldest first, as if their ``ROOM_TTL`` had passed), then
    the last ids kept of dropped rooms, then the oldest messages of the rooms written to
    least recently; a room's sequence number stays while it has members. A room without
    members (emptied, or never joined: ``/api/publish``) keeps its history for
    ``ROOM_TTL`` after it emptied or, if it had none, after the first message posted to
    it since; a post does not extend that, as in Redis. Its last id outlives its
    history: a room used again within ``numbering_ttl`` (``ROOM_NUMBERING_TTL``, counted
    from the same moment) goes on from it, so a ``since`` from before is never taken for
    an id of the new messages (those last ids are dropped from the bound after the
    emptied rooms, before any history of the rooms in use; a room joined again is one in
    use). A replay (``since``) is at most ``replay_max_bytes``."""

    def __init__(self, broker: Broker, history_size: int, room_ttl: float,
                 clock: Callable[[], float] = time.monotonic,
                 max_bytes: int = 128 * 1024 * 1024,
                 replay_max_bytes: int = REPLAY_MAX_BYTES,
                 numbering_ttl: float = ROOM_NUMBERING_TTL) -> None:
        self._broker = broker
        self._replay_max_bytes = replay_max_bytes
        self._size = history_size
        self._room_ttl = room_ttl
        self._numbering_ttl = max(room_ttl, numbering_ttl)
        self._clock = clock
        self._max_bytes = max_bytes
        self._bytes = 0  # charged to the bound: events plus overheads
        self._logs: OrderedDict[str, _RoomLog] = OrderedDict()  # least recently written first
        self._idle: OrderedDict[str, float] = OrderedDict()  # emptied room -> when
        # dropped room -> (when it emptied, its last id, its epoch): used again, it goes on
        # from there, in the same epoch
        self._retired: OrderedDict[str, tuple[float, int, str]] = OrderedDict()
        self._occupied: set[str] = set()  # rooms with members (room_occupied)
        # The epochs members of rooms without a log were told (nothing posted yet): no log
        # is made for them (a join must not cost a room's share of the bound), and the
        # room's first post numbers in it.
        self._epochs: dict[str, str] = {}
        # (room or "", user, client_msg_id) -> (when, message id, its timestamp): a
        # retry's echo is the room's copy while the history holds it, else rebuilt from
        # the retry's own draft, so no event is kept twice.
        self._dedupe: OrderedDict[tuple[str, str, str], tuple[float, int, int]] = OrderedDict()
        self._dm_last_id = 0

    @property
    def held_bytes(self) -> int:
        """What the history holds, as charged against ``max_bytes``."""
        return self._bytes

    def _seen(self, key: tuple[str, str, str], draft: MessageDraft) -> Posted | None:
        now = self._clock()
        while self._dedupe:
            oldest_key, (at, _, _) = next(iter(self._dedupe.items()))
            if now - at < DEDUPE_TTL and len(self._dedupe) <= DEDUPE_MAX:
                break
            del self._dedupe[oldest_key]
        hit = self._dedupe.get(key)
        if hit is None:
            return None
        log = self._logs.get(key[0]) if key[0] else None
        return retry_echo(draft, hit[1], hit[2],
                          (event for _, event in reversed(log.messages)) if log else ())

    def _remember(self, key: tuple[str, str, str], msg_id: int, draft: MessageDraft) -> None:
        self._dedupe[key] = (self._clock(), msg_id, draft.timestamp_ms)

    def _log_for(self, room: str) -> _RoomLog:
        log = self._logs.get(room)
        if log is None:
            retired = self._retired.pop(room, None)
            if retired is None:  # a numbering from 1, in the epoch its members were told
                log = _RoomLog(self._size, self._epochs.pop(room, None) or new_epoch())
            else:  # going on from the last id kept, in its epoch
                log = _RoomLog(self._size, retired[2])
                log.last_id = retired[1]
                self._bytes -= RETIRED_OVERHEAD
            self._logs[room] = log
            self._bytes += ROOM_OVERHEAD
        return log

    def _append(self, room: str, log: _RoomLog, msg_id: int, event: bytes) -> None:
        if len(log.messages) == log.messages.maxlen:
            self._bytes -= len(log.messages[0][1]) + MESSAGE_OVERHEAD
        log.messages.append((msg_id, event))
        self._bytes += len(event) + MESSAGE_OVERHEAD
        self._logs.move_to_end(room)
        if self._bytes > self._max_bytes:
            self._shrink()

    def _drop_log(self, room: str, emptied_at: float) -> None:
        """The room's history goes; its last id stays (``_retired``) for
        ``numbering_ttl`` from ``emptied_at``."""
        log = self._logs.pop(room, None)
        if log is not None:
            self._bytes -= ROOM_OVERHEAD + sum(len(e) + MESSAGE_OVERHEAD
                                               for _, e in log.messages)
            if log.last_id:  # a numbering without ids has nothing a `since` could name
                self._retired[room] = (emptied_at, log.last_id, log.epoch)
                self._bytes += RETIRED_OVERHEAD

    def _last_id_kept(self, room: str) -> int:
        retired = self._retired.get(room)
        return retired[1] if retired else 0

    def _shrink(self) -> None:
        while self._bytes > self._max_bytes and self._idle:
            room, at = self._idle.popitem(last=False)
            self._drop_log(room, at)
        while self._bytes > self._max_bytes and self._retired:
            self._retired.popitem(last=False)
            self._bytes -= RETIRED_OVERHEAD
        for log in self._logs.values():  # least recently written first
            while log.messages and self._bytes > self._max_bytes:
                _, event = log.messages.popleft()
                self._bytes -= len(event) + MESSAGE_OVERHEAD
            if self._bytes <= self._max_bytes:
                return

    def post_room(self, room: str, user_id: str, draft: MessageDraft,
                  charge: Charge = ()) -> Posted:  # charges_posts is False: never given
        key = (room, user_id, draft.client_msg_id) if draft.client_msg_id else None
        if key and (hit := self._seen(key, draft)):
            return hit
        self._expire_idle()
        log = self._log_for(room)
        self._posted_to(room)
        log.last_id += 1
        event = draft.with_id(log.last_id)
        self._append(room, log, log.last_id, event)
        posted = Posted(log.last_id, event, False)
        if key:
            self._remember(key, posted.msg_id, draft)
        self._broker.publish_room(room, event)
        return posted

    def post_dm(self, sender_id: str, recipient_id: str, draft: MessageDraft,
                recipient_online: bool | None = True, charge: Charge = ()) -> Posted:
        key = ("", sender_id, draft.client_msg_id) if draft.client_msg_id else None
        if key and (hit := self._seen(key, draft)):
            return hit
        self._dm_last_id += 1
        posted = Posted(self._dm_last_id, draft.with_id(self._dm_last_id), False)
        if key:
            self._remember(key, posted.msg_id, draft)
        for user_id in dm_parties(sender_id, recipient_id):
            self._broker.publish_user(user_id, posted.event)
        return posted

    def recent(self, room: str, limit: int, before: int | None = None) -> list[bytes]:
        log = self._logs.get(room)
        if log is None:
            return []
        picked: list[bytes] = []
        for msg_id, event in reversed(log.messages):
            if before is not None and msg_id >= before:
                continue
            picked.append(event)
            if len(picked) >= limit:
                break
        picked.reverse()
        return picked

    def since(self, room: str, after_id: int) -> Replay:
        log = self._logs.get(room)
        last = log.last_id if log else self._last_id_kept(room)
        if after_id > last:
            return Replay([], False)  # the client saw ids this store never issued
        if after_id == last:
            return Replay([], True)
        # history dropped (ROOM_TTL), or ids raised from the durable log, messages not loaded
        if log is None or not log.messages:
            return Replay([], False)
        newer, cut = newest_within([e for i, e in log.messages if i > after_id],
                                   self._replay_max_bytes)
        newer, unbroken = run_to(newer, after_id, last)  # the sequence may have been raised
        return Replay(newer, unbroken and not cut)

    def last_id(self, room: str) -> int:
        # Rooms past their ROOM_TTL go first, as the next post would drop them: the
        # durable store reads this before a post to decide whether the window lost the
        # room (and continues it from the log), and must not read a sequence that the
        # post's publish then drops (the post would be held behind the ids gone).
        self._expire_idle()
        log = self._logs.get(room)
        return log.last_id if log else self._last_id_kept(room)

    def epoch(self, room: str) -> str:
        # A new log is a new numbering, from 1 (a restarted server's every room's); one
        # dropped keeps its epoch with its last id. A member asks: the room is occupied.
        self._expire_idle()
        log = self._logs.get(room)
        if log is not None:
            return log.epoch
        retired = self._retired.get(room)
        if retired is not None:
            return retired[2]
        if room not in self._occupied:
            return new_epoch()  # nobody to keep it for: no id could be counted in it
        return self._epochs.setdefault(room, new_epoch())

    def dm_last_id(self) -> int:
        return self._dm_last_id

    def raise_sequence(self, room: str, at_least: int) -> None:
        log = self._log_for(room)
        log.last_id = max(log.last_id, at_least)

    def publish_stored(self, messages: list[Stored]) -> list[int]:
        """One writer publishes in commit order, which is id order. A gap before an id
        is a message committed and never published (its commit's reply was lost, or
        the writer died after COMMIT): the id is held, not published over the gap,
        and the durable store publishes both from the log (``_release_held``). An id
        the window is past already is not published (or kept) a second time (STALE),
        as in Redis."""
        outcomes: list[int] = []
        for message in messages:
            if message.room is None:
                for user_id in message.dm_parties():
                    self._broker.publish_user(user_id, message.event)
                outcomes.append(PUBLISHED)
                continue
            self._expire_idle()
            log = self._log_for(message.room)
            if message.msg_id > log.last_id + 1:
                outcomes.append(HELD)
                continue
            if message.msg_id <= log.last_id:  # published already: not a second time
                outcomes.append(STALE)
                continue
            self._posted_to(message.room)
            log.last_id = max(log.last_id, message.msg_id)
            self._append(message.room, log, message.msg_id, message.event)
            self._broker.publish_room(message.room, message.event)
            outcomes.append(PUBLISHED)
        return outcomes

    def _posted_to(self, room: str) -> None:
        """A message was added to ``room``'s history: one without members (a publish
        through the server API) starts its ``ROOM_TTL`` now, unless it is running already
        (as a Redis room's keys keep the TTL its last leave set). Before, such a room's
        history was kept for good, and so was each of many rooms published to."""
        if room not in self._occupied and room not in self._idle:
            self._idle[room] = self._clock()

    def _expire_idle(self) -> None:
        now = self._clock()
        while self._idle:
            oldest, at = next(iter(self._idle.items()))
            if now - at < self._room_ttl:
                break
            del self._idle[oldest]
            self._drop_log(oldest, at)
        while self._retired:
            oldest, (at, _, _) = next(iter(self._retired.items()))
            if now - at < self._numbering_ttl:
                break
            del self._retired[oldest]
            self._bytes -= RETIRED_OVERHEAD

    def room_emptied(self, room: str) -> None:
        self._occupied.discard(room)
        self._epochs.pop(room, None)
        if room in self._logs:
            self._idle[room] = self._clock()
            self._idle.move_to_end(room)
        self._expire_idle()

    def room_occupied(self, room: str) -> None:
        self._occupied.add(room)
        self._idle.pop(room, None)
        if room in self._retired:
            # Its last id is a room's in use again (as join.lua takes the expiry off a
            # Redis sequence): kept while members are in, never given up to the bound,
            # and counted anew from its next emptying. Left among the dropped rooms' ids,
            # it expired with members in, and the next message was 1 again: the hub drops
            # ids at or below a member's join point, so they never got it.
            self._log_for(room)


class MemoryBroker(Broker):
    """Delivery within this process: publishing is calling the local hub."""

    spans_workers = False

    def __init__(self) -> None:
        self._on_room: RoomHandler | None = None
        self._on_user: UserHandler | None = None

    def start(self, on_room: RoomHandler, on_user: UserHandler) -> None:
        self._on_room, self._on_user = on_room, on_user

    def publish_room(self, room: str, event: bytes, exclude_user: str | None = None) -> None:
        if self._on_room is not None:
            self._on_room(room, event, exclude_user)

    def publish_user(self, user_id: str, event: bytes) -> None:
        if self._on_user is not None:
            self._on_user(user_id, event)

    def subscribe_room(self, room: str) -> None:
        pass

    def unsubscribe_room(self, room: str) -> None:
        pass

    def subscribe_user(self, user_id: str) -> None:
        pass

    def unsubscribe_user(self, user_id: str) -> None:
        pass


def create_memory_stores(history_size: int, room_ttl: float,
                         max_history_bytes: int = 128 * 1024 * 1024,
                         numbering_ttl: float = ROOM_NUMBERING_TTL) -> Stores:
    broker = MemoryBroker()
    return Stores(MemoryRoomStore(), MemoryPresenceStore(),
                  MemoryMessageStore(broker, history_size, room_ttl,
                                     max_bytes=max_history_bytes,
                                     numbering_ttl=numbering_ttl), broker, "memory")
