"""The library as an app uses it, against the real server: what an app's code meets when a
call times out, when the client is closed, when connecting fails, when a token source has
no token."""

from __future__ import annotations

import asyncio
import threading

import pytest
from conftest import TIMEOUT, Harness, Recorder

from wschat_client import (
    ChatError,
    Client,
    ClientClosed,
    ConnectionState,
    RequestTimeout,
    SyncClient,
)


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


async def test_async_with_whose_connect_fails_leaves_no_task_running(harness: Harness) -> None:
    """``async with Client(...)`` whose connect() raised (a full server's 503 until the
    timeout) is closed: its reconnect loop went on in the background for as long as the
    app's loop ran, since __aexit__ is not called when __aenter__ raises (an app retrying
    so piled up clients knocking at the server)."""
    server = await harness.server("memory", env={"MAX_CONNECTIONS": "1"})
    first = Client(server["url"], username="ann", request_timeout=TIMEOUT)
    await first.connect()
    second = Client(server["url"], username="bea", connect_timeout=0.3)
    with pytest.raises(RequestTimeout):
        async with second:
            raise AssertionError("connected to a full server")
    assert second.state is ConnectionState.DISCONNECTED
    assert second._run_task is not None and second._run_task.done()
    await first.close()


def _client_threads() -> int:
    return sum(1 for t in threading.enumerate() if t.name == "wschat-client")


def test_sync_client_whose_connect_fails_leaves_no_thread(harness: Harness) -> None:
    """``with SyncClient(...)`` whose connect raised (a 404: not the WebSocket path) stops
    its thread, as does a SyncClient given an option Client does not take: each left a
    thread running an event loop for as long as the process lived."""
    server = harness.call_sync("/servers", {"backend": "memory"})
    before = _client_threads()
    for _ in range(3):
        nowhere = server["url"].removesuffix("/ws") + "/nowhere"
        with pytest.raises(ClientClosed), SyncClient(nowhere, username="ann"):
            raise AssertionError("connected to a path that is not the WebSocket's")
    with pytest.raises(TypeError):
        SyncClient(server["url"], no_such_option=1)
    assert _client_threads() == before


@pytest.mark.parametrize("no_token", [None, ""])
async def test_a_token_source_without_a_token_stops_rather_than_connect_as_a_guest(
        harness: Harness, no_token: str | None) -> None:
    """get_token returning None or "" (the user signed out, a session gone) stops the client
    (ClientClosed, close_code 4001), as the JS client does: it connected without a token, as
    a guest, and the outbox's sends went out under a guest's name."""
    server = await harness.server("memory")
    tokens = iter([await harness.token("ann"), no_token])

    async def get_token() -> str | None:
        return next(tokens)

    client = Client(server["url"], get_token=get_token,  # type: ignore[arg-type]
                    request_timeout=TIMEOUT)
    rec = Recorder(client)
    await client.connect()
    assert client.user_id == "ann"
    await client.join("hall")
    assert client._ws is not None
    client._ws.transport.abort()  # the connection drops: the reconnect asks get_token
    await rec.wait_for(lambda: any(isinstance(e, ClientClosed) for e in rec.of("error")),
                       what="the stop")
    assert client.state is ConnectionState.DISCONNECTED and client.user_id == "ann"
    assert [w.user_id for w in rec.of("connected")] == ["ann"]
    [closed] = [e for e in rec.of("error") if isinstance(e, ClientClosed)]
    assert closed.close_code == 4001 and rec.of("disconnected")[-1].reconnect_in is None
    with pytest.raises(ClientClosed):
        await client.send("hall", "not as a guest")
    await client.close()


async def test_a_token_source_that_raises_is_an_error_event(harness: Harness) -> None:
    """get_token raising on a connection attempt is an error event with code ``token``
    (then the backoff and another attempt), as in the JS and Rust clients: it was only the
    reason of a ``disconnected`` event, which looked like a network failure."""
    server = await harness.server("memory")
    calls = 0

    async def get_token() -> str:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RuntimeError("the identity provider is down")
        return await harness.token("ann")

    client = Client(server["url"], get_token=get_token, request_timeout=TIMEOUT)
    rec = Recorder(client)
    await client.connect()
    assert client.user_id == "ann"
    [err] = rec.of("error")
    assert err.code == "token" and "identity provider is down" in err.message
    await client.close()


@pytest.mark.parametrize("url", ["localhost:8080/ws", "http://localhost:8080/ws", ""])
def test_a_url_that_is_no_websocket_url_raises_at_once(url: str) -> None:
    """Client("localhost:8080/ws") (no ws:// or wss://) raises ValueError when made: the
    client tried it again and again, each a disconnected event with websockets' InvalidURI as
    the reason, and connect() raised RequestTimeout ("no connection") after 30 s."""
    with pytest.raises(ValueError, match="ws:// or wss://"):
        Client(url)
    with pytest.raises(ValueError, match="ws:// or wss://"):
        SyncClient(url)


async def test_a_url_function_failing_is_an_error_event(harness: Harness) -> None:
    """A url function that raises, or returns no WebSocket URL, is an error event with code
    ``connect`` (then the backoff and another attempt), as in the JS client: it was only the
    reason of a disconnected event, like a network failure."""
    server = await harness.server("memory")
    answers: list[object] = [RuntimeError("no server known yet"), "http://nowhere.example/ws",
                             server["url"]]

    def url() -> str:
        answer = answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return str(answer)

    client = Client(url, username="ann", request_timeout=TIMEOUT)
    rec = Recorder(client)
    await client.connect()
    errors = rec.of("error")
    assert [e.code for e in errors] == ["connect", "connect"], errors
    assert "no server known yet" in errors[0].message and "ws://" in errors[1].message
    await client.close()
