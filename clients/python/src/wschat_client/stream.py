"""The events as iterators: :meth:`Client.events` (``async for``) and
:meth:`SyncClient.events` (a plain ``for``).

Each iterator holds its own queue, unbounded: the client pushes every event into every
iterator as it happens (before the ``on()`` handlers are called), and never waits for
the app. One read of the socket hands on a few hundred events in one turn of the loop
(more in a reconnect's replay), before the consumer runs again: a bounded queue would
have to drop messages the client counts as delivered, even for a consumer that keeps up.
Read the events, or drop the iterator (``break`` out of the loop): the client keeps only a
weak reference to it, so one nothing refers to any more is gone at once, with its queue.

Each iterator records the room's position (:class:`~wschat_client.events.RoomPosition`)
carried by each event as it hands the event over, so that :meth:`position` names only
messages the app has read: a position persisted after handling an event never skips one.
"""

from __future__ import annotations

import asyncio
import threading
from collections import deque
from types import TracebackType
from typing import Self

from .events import Event, RoomPosition

# An event, and the position of the room it is about as the client had it when it pushed
# the event (the room's name; None inside: the room is no longer ours), or no room (None).
_Item = tuple[Event, str | None, RoomPosition | None]


class _Feed:
    """What the client pushes into (:meth:`Client._emit`); one per iterator."""

    __slots__ = ("__weakref__", "_ended", "_items", "_positions")

    def __init__(self) -> None:
        self._items: deque[_Item] = deque()
        self._ended = False
        self._positions: dict[str, RoomPosition] = {}

    def _start(self, positions: dict[str, RoomPosition], ended: bool) -> None:
        """Subscribed (on the client's loop): the rooms' positions now, and whether the
        client is closed already (the iterator then ends at once)."""
        self._positions = positions
        if ended:
            self._end()

    def _push(self, event: Event, room: str | None, position: RoomPosition | None) -> None:
        if not self._ended:
            self._items.append((event, room, position))
            self._wake()

    def _end(self) -> None:
        """The client closed (or stopped for good): the iterator ends once its queue is
        read."""
        self._ended = True
        self._wake()

    def _wake(self) -> None:
        raise NotImplementedError

    def _take(self) -> Event | None:
        """The next event, its room's position recorded; None when none is queued."""
        if not self._items:
            return None
        event, room, position = self._items.popleft()
        if room is not None:
            if position is None:
                self._positions.pop(room, None)
            else:
                self._positions[room] = position
        return event

    def _stop(self) -> None:
        self._items.clear()
        self._end()

    def position(self, room: str) -> RoomPosition | None:
        """Where this iterator's reader is in ``room``: the id of the room's last message it
        handed over and the epoch it counts in, to persist together for ``join(room,
        since=..., epoch=...)`` in a later run; None for a room not the client's as far as
        the events handed over tell (never joined, left, removed). At the iterator's creation,
        the client's positions then (``rooms``); a room resumed with ``join(room, since=...,
        epoch=...)`` has that position from its ``room_state`` event (``joining``) on.
        Messages still queued in the iterator are not counted: ``Client.rooms`` may be
        ahead of it."""
        return self._positions.get(room)

    def qsize(self) -> int:
        """The events queued, not read yet (watch it: the queue is unbounded), as
        ``asyncio.Queue.qsize``."""
        return len(self._items)


class Events(_Feed):
    """``async for event in client.events():`` every event (an :class:`Event`) from the
    iterator's creation on, in the order the ``on()`` handlers get them. It ends (no
    exception) once the events queued before the client was closed are read: after
    :meth:`Client.close` (connected: the last event its ``disconnected``), or a stop for good,
    whose ``error`` event (a :class:`~wschat_client.ClientClosed` with its ``close_code``)
    comes last. ``break`` leaves nothing behind; :meth:`close` (or ``async with``)
    ends one kept by a name. Several tasks may wait on one iterator: each event goes to
    one of them."""

    __slots__ = ("_waiters",)

    def __init__(self) -> None:
        super().__init__()
        self._waiters: list[asyncio.Future[None]] = []

    def _wake(self) -> None:
        for waiter in self._waiters:
            if not waiter.done():
                waiter.set_result(None)

    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> Event:
        while True:
            event = self._take()
            if event is not None:
                return event
            if self._ended:
                raise StopAsyncIteration
            waiter = asyncio.get_running_loop().create_future()
            self._waiters.append(waiter)
            try:
                await waiter
            finally:
                self._waiters.remove(waiter)

    def close(self) -> None:
        """Stop: the events queued are dropped, no more come, and the iteration ends (a
        task waiting for the next event gets ``StopAsyncIteration``). The client goes on."""
        self._stop()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        self.close()


class SyncEvents(_Feed):
    """:class:`Events` for :class:`~wschat_client.SyncClient`: ``for event in
    chat.events():`` blocks for the next event (on the app's thread; the client's thread
    pushes them). It cannot be read on the client's thread (a handler: ``RuntimeError``),
    which it would wait for."""

    __slots__ = ("_cond", "_thread")

    def __init__(self, thread: threading.Thread) -> None:
        super().__init__()
        self._cond = threading.Condition()  # an RLock: _stop and _start call _end
        self._thread = thread

    def _start(self, positions: dict[str, RoomPosition], ended: bool) -> None:
        with self._cond:
            super()._start(positions, ended)

    def _push(self, event: Event, room: str | None, position: RoomPosition | None) -> None:
        with self._cond:
            super()._push(event, room, position)

    def _end(self) -> None:
        with self._cond:
            super()._end()

    def _wake(self) -> None:
        self._cond.notify_all()  # with the lock held: _push and _end take it

    def __iter__(self) -> Self:
        return self

    def __next__(self) -> Event:
        if threading.current_thread() is self._thread:
            raise RuntimeError("SyncClient.events() was read from an event handler, on the "
                               "client's thread, which it would wait for: read it on another "
                               "thread")
        with self._cond:
            while True:
                event = self._take()
                if event is not None:
                    return event
                if self._ended:
                    raise StopIteration
                self._cond.wait()

    def position(self, room: str) -> RoomPosition | None:
        with self._cond:
            return super().position(room)

    def close(self) -> None:
        """As :meth:`Events.close`: a thread blocked on the next event gets
        ``StopIteration``."""
        with self._cond:
            self._stop()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type: type[BaseException] | None,
                 exc: BaseException | None, tb: TracebackType | None) -> None:
        self.close()
