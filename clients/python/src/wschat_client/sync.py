"""A blocking wrapper: the asyncio :class:`Client` on an event loop in a thread of its own.

Every method blocks until the coroutine it runs is done; event handlers are called
on the client's thread, so keep them short (or hand the work to a queue). A handler
cannot call the blocking methods (they raise ``RuntimeError``: they would wait for
the very thread the handler holds); ``typing``, ``on`` and the attributes do not
block and may be used. ``close`` may be called from any other thread (:meth:`SyncClient.close`).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
import weakref
from collections.abc import Callable, Coroutine
from typing import Any, Self, TypeVar, Unpack

from .client import Client, ClientOptions, EventHandlers, Handler, Remove, UrlSource
from .errors import ClientClosed
from .events import (
    ConnectionState,
    DirectMessage,
    Disconnect,
    HistoryPage,
    Joined,
    Message,
    RoomInfo,
    User,
)
from .outbox import PendingSend
from .stream import SyncEvents

T = TypeVar("T")


class SyncClient(EventHandlers):
    """``SyncClient(url, **options)`` takes the options of :class:`Client`.

    ::

        with SyncClient("ws://localhost:8080/ws", username="alice") as chat:
            chat.on("message", print)
            chat.join("general")
            chat.send("general", "Hello!")
    """

    def __init__(self, url: UrlSource, **options: Unpack[ClientOptions]) -> None:
        self.client = Client(url, **options)  # first: an option it refuses starts no thread
        self._loop = asyncio.new_event_loop()
        given_up = threading.Event()  # set by _abandon: the thread then closes the loop
        self._thread = threading.Thread(target=_serve, args=(self._loop, given_up),
                                        name="wschat-client", daemon=True)
        self._thread.start()
        # The calls under way (their coroutines on the loop), and whether close() has begun to
        # stop the loop: a call then raises ClientClosed rather than wait for a loop that
        # will not run its coroutine (it waited for ever).
        self._lock = threading.Lock()
        self._calls: set[concurrent.futures.Future[Any]] = set()
        self._stopping = False
        self._close_lock = threading.Lock()  # a second close() waits for the first
        # Dropped without close(): its connection (reconnecting for ever, the user online to
        # the others) and its thread lived as long as the process.
        self._abandoned = weakref.finalize(self, _abandon, self._loop, self.client, given_up)
        self._abandoned.atexit = False

    def _run(self, coro: Coroutine[Any, Any, T]) -> T:
        if threading.current_thread() is self._thread:
            # A handler (it runs on the client's thread) would wait for its own thread: the
            # client would hang for good.
            coro.close()
            raise RuntimeError("a SyncClient method was called from an event handler, on the "
                               "client's thread, which it would wait for: hand the work to "
                               "another thread (a queue.Queue), or use the asyncio Client")
        with self._lock:
            if self._stopping:
                coro.close()
                raise ClientClosed("the SyncClient is closed")
            call = asyncio.run_coroutine_threadsafe(coro, self._loop)
            self._calls.add(call)
        try:
            return call.result()
        except concurrent.futures.CancelledError:
            if self._stopping:  # cut short by close(): its loop stopped
                raise ClientClosed("the SyncClient is closed") from None
            raise
        finally:
            with self._lock:
                self._calls.discard(call)

    @property
    def state(self) -> ConnectionState:
        return self.client.state

    @property
    def user_id(self) -> str | None:
        return self.client.user_id

    @property
    def username(self) -> str | None:
        return self.client.username

    @property
    def authenticated(self) -> bool:
        return self.client.authenticated

    @property
    def last_close(self) -> Disconnect | None:
        return self.client.last_close

    @property
    def pending(self) -> list[PendingSend]:
        """As :attr:`Client.pending`: the sends not yet acknowledged, oldest first; also
        after :meth:`close` (what the outbox kept)."""
        return self._read(lambda: self.client.pending)

    @property
    def rooms(self) -> dict[str, RoomInfo]:
        """As :attr:`Client.rooms`; also after :meth:`close`, to persist each room's
        ``last_id`` and ``epoch`` at exit."""
        return self._read(lambda: self.client.rooms)

    def _read(self, get: Callable[[], T]) -> T:
        """``get()`` on the client's thread while it runs; read at once from a handler
        (already there), and once closed (no thread runs the client any more: it raised
        ``ClientClosed``, so an app could not save its rooms' positions at exit)."""
        if threading.current_thread() is self._thread or self._stopping:
            return get()
        try:
            return self._run(_value(get))
        except ClientClosed:
            if not self._stopping:
                raise
            return get()  # close() stopped the thread meanwhile

    def _add_handler(self, event: str, handler: Handler) -> Remove:  # on(), for the app
        return self.client._add_handler(event, handler)

    def events(self) -> SyncEvents:
        """As :meth:`Client.events`, for a plain ``for``: every event from now on, each
        :meth:`~wschat_client.SyncEvents.__next__` blocking until the next one (on the app's
        thread; reading it on the client's thread, in a handler, raises ``RuntimeError``).
        It ends once the events from before :meth:`close` (from any thread), or a stop for
        good, are read; made on a closed client, at once."""
        feed = SyncEvents(self._thread)
        if threading.current_thread() is self._thread:
            return self.client._subscribe(feed)  # a handler: on the client's loop already
        try:
            return self._run(_value(lambda: self.client._subscribe(feed)))
        except ClientClosed:
            feed._end()  # closed meanwhile: nothing will come
            return feed

    def connect(self, *, timeout: float | None = None) -> None:
        self._run(self.client.connect(timeout=timeout))

    def close(self) -> None:
        """Close the client and stop its thread. The calls other threads made meanwhile end
        first (what they wait for fails with ``ClientClosed``; one still running after
        ``connect_timeout`` raises it); calls made after it raise ``ClientClosed``, and a
        second ``close()`` returns once the first is done."""
        if threading.current_thread() is self._thread:
            self._run(self.client.close())  # raises: a handler would wait for its own thread
        self._abandoned.detach()
        with self._close_lock:
            if self._loop.is_closed():
                return
            self._run(self.client.close())
            with self._lock:
                self._stopping = True
                calls = set(self._calls)
            # Everything they wait for of the client failed: their coroutines end in a few
            # turns of the loop, which must not stop before (their callers would wait for ever).
            concurrent.futures.wait(calls, timeout=self.client.connect_timeout)
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join()
            for call in calls:
                call.cancel()  # still running: its caller raises ClientClosed
            self._loop.close()

    def __enter__(self) -> Self:
        try:
            self.connect()
        except BaseException:
            # __exit__ is not called when this raises: the thread and its reconnect loop
            # would run for as long as the process lives.
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def join(self, room: str, *, since: int | None = None, epoch: str | None = None,
             timeout: float | None = None) -> Joined:
        """As :meth:`Client.join`: ``since`` and ``epoch`` resume from a persisted
        ``rooms[room]`` (``last_id`` and ``epoch``, kept together)."""
        return self._run(self.client.join(room, since=since, epoch=epoch, timeout=timeout))

    def leave(self, room: str, *, timeout: float | None = None) -> None:
        self._run(self.client.leave(room, timeout=timeout))

    def send(self, room: str, text: str, *, client_msg_id: str | None = None,
             timeout: float | None = None) -> Message:
        return self._run(self.client.send(room, text, client_msg_id=client_msg_id,
                                          timeout=timeout))

    def dm(self, to: str, text: str, *, client_msg_id: str | None = None,
           timeout: float | None = None) -> DirectMessage:
        return self._run(self.client.dm(to, text, client_msg_id=client_msg_id, timeout=timeout))

    def history(self, room: str, *, limit: int | None = None, before: int | None = None,
                timeout: float | None = None) -> list[Message]:
        return self._run(self.client.history(room, limit=limit, before=before, timeout=timeout))

    def history_page(self, room: str, *, limit: int | None = None, before: int | None = None,
                     timeout: float | None = None) -> HistoryPage:
        """As :meth:`Client.history_page`: the messages and the server's ``truncated``."""
        return self._run(self.client.history_page(room, limit=limit, before=before,
                                                  timeout=timeout))

    def list_users(self, room: str, *, timeout: float | None = None) -> list[User]:
        return self._run(self.client.list_users(room, timeout=timeout))

    def kick(self, room: str, user_id: str, *, reason: str | None = None,
             timeout: float | None = None) -> dict[str, Any]:
        """As :meth:`Client.kick` (moderators)."""
        return self._run(self.client.kick(room, user_id, reason=reason, timeout=timeout))

    def mute(self, room: str, user_id: str, *, duration: float | None = None,
             timeout: float | None = None) -> dict[str, Any]:
        """As :meth:`Client.mute` (moderators)."""
        return self._run(self.client.mute(room, user_id, duration=duration, timeout=timeout))

    def unmute(self, room: str, user_id: str, *,
               timeout: float | None = None) -> dict[str, Any]:
        """As :meth:`Client.unmute` (moderators)."""
        return self._run(self.client.unmute(room, user_id, timeout=timeout))

    def ping(self, *, timeout: float | None = None) -> None:
        self._run(self.client.ping(timeout=timeout))

    def typing(self, room: str, status: bool = True) -> None:
        """As :meth:`Client.typing`, without blocking; after :meth:`close` it does nothing,
        as Client's (it raised ``RuntimeError``: the loop was closed)."""
        with self._lock:
            if not self._stopping:
                self._loop.call_soon_threadsafe(self.client.typing, room, status)


async def _value(get: Callable[[], T]) -> T:
    return get()


def _abandon(loop: asyncio.AbstractEventLoop, client: Client, given_up: threading.Event
             ) -> None:
    """A :class:`SyncClient` collected without :meth:`~SyncClient.close`: its client is
    closed and its thread ends, unwaited (a finalizer runs on whichever thread collected
    it, perhaps the client's own)."""
    given_up.set()
    try:
        closing = asyncio.run_coroutine_threadsafe(client.close(), loop)
    except RuntimeError:  # the loop was closed meanwhile
        return
    closing.add_done_callback(lambda _: loop.call_soon_threadsafe(loop.stop))


def _serve(loop: asyncio.AbstractEventLoop, given_up: threading.Event) -> None:
    """The client's thread: its loop, until stopped; closed here when :func:`_abandon`
    stopped it (close() closes it itself, once its callers' calls are cancelled)."""
    loop.run_forever()
    if given_up.is_set():
        loop.close()
