"""The blocking wrapper against the real server."""

from __future__ import annotations

import queue

from conftest import TIMEOUT, Harness
from wschat_client import ChatError, ConnectionState, Message, SyncClient


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
        assert chat.rooms["plain"].last_id == 1
        chat.typing("plain")
        try:
            chat.send("not-joined", "x")
        except ChatError as err:
            assert err.code == "not_in_room"
        else:
            raise AssertionError("a send to a room not joined was accepted")
    assert chat.state is ConnectionState.DISCONNECTED
