"""The blocking wrapper against the real server."""

from __future__ import annotations

import queue
import threading
from typing import Any

import pytest
from conftest import TIMEOUT, Harness
from wschat_client import (
    ChatError,
    ClientClosed,
    ConnectionState,
    HistoryPage,
    Message,
    Presence,
    Removed,
    RoomState,
    SyncClient,
)


def test_sync_client_round_trip(harness: Harness) -> None:
    """connect, join, send, receive through a handler, history, errors, close: all blocking."""
    server = harness.call_sync("/servers", {"backend": "memory"})
    token = harness.call_sync("/token", {"sub": "sam", "name": "Sam"})["token"]
    received: queue.Queue[Message] = queue.Queue()
    with SyncClient(server["url"], token=token, request_timeout=TIMEOUT) as chat:
        assert chat.state is ConnectionState.CONNECTED and chat.user_id == "sam"
        chat.on("message", received.put)
        joined = chat.join("plain")
        assert joined.room == "plain" and joined.last_id == 0
        sent = chat.send("plain", "no asyncio here")
        assert (sent.id, sent.text) == (1, "no asyncio here")
        assert received.get(timeout=TIMEOUT).id == 1
        assert [m.text for m in chat.history("plain")] == ["no asyncio here"]
        assert chat.history_page("plain", limit=5) == HistoryPage([sent], False)
        assert chat.rooms["plain"].last_id == 1
        chat.typing("plain")
        try:
            chat.send("not-joined", "x")
        except ChatError as err:
            assert err.code == "not_in_room"
        else:
            raise AssertionError("a send to a room not joined was accepted")
    assert chat.state is ConnectionState.DISCONNECTED


def test_a_sync_client_dropped_without_close_disconnects(harness: Harness) -> None:
    """A SyncClient the app drops without close() is closed when collected: its connection
    (the user online to the others, reconnecting for ever) and its thread lived as long as
    the process."""
    import gc

    server = harness.call_sync("/servers", {"backend": "memory"})
    token = harness.call_sync("/token", {"sub": "gone", "name": "Gone"})["token"]
    presence: queue.Queue[Presence] = queue.Queue()
    with SyncClient(server["url"], token=token, request_timeout=TIMEOUT) as watcher:
        watcher.on("presence", presence.put)
        watcher.join("lobby")
        chat = SyncClient(server["url"], username="dropped", request_timeout=TIMEOUT)
        chat.connect()
        chat.join("lobby")
        dropped = chat.user_id
        loop_thread, loop = chat._thread, chat._loop
        assert {u.user_id for u in watcher.list_users("lobby")} == {"gone", dropped}
        del chat
        gc.collect()
        loop_thread.join(TIMEOUT)
        assert not loop_thread.is_alive() and loop.is_closed()
        while (event := presence.get(timeout=TIMEOUT)).status != "offline":
            pass
        assert event.user_id == dropped
        assert [u.user_id for u in watcher.list_users("lobby")] == ["gone"]


def test_a_call_from_another_thread_while_close_ends_raises(harness: Harness) -> None:
    """A blocking call made from another thread while close() stops the client's thread
    raises ClientClosed: its coroutine went to a loop stopped for good (or one stopped
    before its answer came through), and the call waited for ever."""
    server = harness.call_sync("/servers", {"backend": "memory"})
    chat = SyncClient(server["url"], username="ann", request_timeout=TIMEOUT)
    chat.connect()
    loop_thread = chat._thread
    outcome: queue.Queue[BaseException | None] = queue.Queue()

    def other_thread() -> None:
        try:
            chat.ping()
        except BaseException as exc:  # noqa: BLE001 - the test reports what it got
            outcome.put(exc)
        else:
            outcome.put(None)

    def join_then_call(timeout: float | None = None) -> None:
        threading.Thread.join(loop_thread, timeout)  # the loop has stopped, not closed yet
        caller = threading.Thread(target=other_thread, daemon=True)
        caller.start()
        caller.join(TIMEOUT)

    loop_thread.join = join_then_call  # type: ignore[method-assign]
    chat.close()
    try:
        got = outcome.get(timeout=TIMEOUT)
    except queue.Empty:
        raise AssertionError("a call made while close() ended never returned") from None
    assert isinstance(got, ClientClosed), got
    with pytest.raises(ClientClosed):
        chat.ping()  # after close(): raises, as Client's calls do
    chat.close()  # again: nothing to do


def test_sync_client_moderates_and_shows_what_client_shows(harness: Harness) -> None:
    """SyncClient has Client's kick, mute and unmute, and its authenticated, pending and
    last_close: a moderation bot without asyncio could not kick (AttributeError)."""
    server = harness.call_sync("/servers", {"backend": "memory"})
    mod = harness.call_sync("/token", {"sub": "mia", "mod_rooms": ["hall"]})["token"]
    user = harness.call_sync("/token", {"sub": "ned"})["token"]
    removed: queue.Queue[Removed] = queue.Queue()
    with SyncClient(server["url"], token=mod, request_timeout=TIMEOUT) as moderator, \
            SyncClient(server["url"], token=user, request_timeout=TIMEOUT) as member:
        assert moderator.authenticated and moderator.pending == []
        assert moderator.last_close is None
        member.on("removed", removed.put)
        moderator.join("hall")
        member.join("hall")
        assert moderator.mute("hall", "ned", duration=60)["type"] == "moderated"
        with pytest.raises(ChatError) as err:
            member.send("hall", "muted?")
        assert err.value.code == "muted"
        assert moderator.unmute("hall", "ned")["type"] == "moderated"
        assert member.send("hall", "back").text == "back"
        assert moderator.kick("hall", "ned", reason="enough")["type"] == "moderated"
        assert removed.get(timeout=TIMEOUT).reason == "enough"
    assert moderator.last_close is not None and moderator.last_close.reconnect_in is None


def test_rooms_and_pending_are_read_after_close(harness: Harness) -> None:
    """rooms (and pending) after close() give what the client kept, as Client's do, so an app
    can persist each room's last_id and epoch at exit (README, Resuming): they raised
    ClientClosed, as they went through the stopped loop."""
    server = harness.call_sync("/servers", {"backend": "memory"})
    with SyncClient(server["url"], username="ann", request_timeout=TIMEOUT) as chat:
        chat.join("hall")
        sent = chat.send("hall", "kept")
        seen = chat.rooms["hall"]
    after = chat.rooms["hall"]
    assert (after.last_id, after.epoch) == (seen.last_id, seen.epoch) == (sent.id, seen.epoch)
    assert after.epoch is not None and chat.pending == []


def test_typing_after_close_does_nothing(harness: Harness) -> None:
    """SyncClient.typing() after close() does nothing, as Client.typing() then (a keystroke
    handler outliving the chat raised RuntimeError: Event loop is closed)."""
    server = harness.call_sync("/servers", {"backend": "memory"})
    with SyncClient(server["url"], username="ann", request_timeout=TIMEOUT) as chat:
        chat.join("hall")
        chat.typing("hall")
    chat.typing("hall")
    chat.typing("hall", False)


def test_a_sync_client_hears_user_changed(harness: Harness) -> None:
    """A token refresh to another user's token is the user_changed event on the SyncClient
    too (its handler on the client's thread), and the room is joined again as that user."""
    server = harness.call_sync("/servers", {"backend": "memory"})
    first = harness.call_sync("/token", {"sub": "sue", "name": "Sue", "ttl": 2})["token"]
    then = harness.call_sync("/token", {"sub": "sid", "name": "Sid"})["token"]
    tokens = iter([first])
    changed: queue.Queue[Any] = queue.Queue()
    with SyncClient(server["url"], get_token=lambda: next(tokens, then),
                    request_timeout=TIMEOUT) as chat:
        chat.on("user_changed", changed.put)
        assert chat.user_id == "sue"
        chat.join("swap")
        welcome = changed.get(timeout=3 * TIMEOUT)  # the refresh comes after 1.5 s
        assert (welcome.user_id, welcome.username, chat.user_id) == ("sid", "Sid", "sid")
        assert chat.send("swap", "as sid").user_id == "sid"
        assert chat.rooms["swap"].state is RoomState.JOINED
        assert changed.empty()
