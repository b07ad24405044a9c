"""The library as an app uses it, against the real server: what an app's code meets when a
call times out, when the client is closed, when connecting fails, when a token source has
no token."""

from __future__ import annotations

import pytest
from conftest import TIMEOUT, Harness, Recorder

from wschat_client import ChatError, Client, RequestTimeout


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
