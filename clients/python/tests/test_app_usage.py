"""The library as an app uses it, against the real server: what an app's code meets when a
call times out, when the client is closed, when connecting fails, when a token source has
no token."""

from __future__ import annotations

import asyncio

import pytest
from conftest import TIMEOUT, Harness, Recorder

from wschat_client import ChatError, Client, ClientClosed, RequestTimeout


async def test_a_join_refused_after_its_timeout_is_an_error_event(harness: Harness) -> None:
    """join() timed out before the server's refusal came (the room stays wanted): the
    refusal, coming later, dropped the room with no error event (the timed-out call still
    counted as waiting), and asyncio logged "Future exception was never retrieved". It is
    an error event now, as in the JS and Rust clients."""
    server = await harness.server("memory")
    client = Client(server["url"], username="ann", request_timeout=TIMEOUT)
    rec = Recorder(client)
    await client.connect()
    with pytest.raises(RequestTimeout):
        await client.join("not a room name!", timeout=1e-6)  # before any answer can come
    await rec.wait_for(lambda: bool(rec.of("error")), what="the refusal's error event")
    [err] = rec.of("error")
    assert isinstance(err, ChatError) and err.code == "invalid_room"
    assert "not a room name!" not in client.rooms
    with pytest.raises(ChatError) as raised:
        await client.join("still not one!")  # awaited: raised, and an error event too
    assert raised.value.code == "invalid_room"
    await rec.wait_for(lambda: len(rec.of("error")) == 2, what="the second error event")
    await client.close()


async def test_a_join_after_close_raises_client_closed_at_once(harness: Harness) -> None:
    """join() on a closed client raises ClientClosed at once, as send() and the requests do:
    it waited its whole timeout for a connection that would never come, then raised
    RequestTimeout (the room kept as wanted)."""
    server = await harness.server("memory")
    client = Client(server["url"], username="ann", request_timeout=TIMEOUT)
    await client.connect()
    await client.join("hall")
    await client.close()
    loop = asyncio.get_running_loop()
    started = loop.time()
    with pytest.raises(ClientClosed):
        await client.join("lobby")
    assert loop.time() - started < TIMEOUT / 2
    assert "lobby" not in client.rooms
    await client.connect()  # open again: the rooms it kept are joined again
    assert (await client.join("hall")).room == "hall"
    await client.close()
