"""The library as a demanding asyncio app uses it, against the real server: calls cut
short by ``asyncio.wait_for`` and TaskGroups, ``close()`` twice and while reconnecting,
``async with`` left by an exception, handlers that raise."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import time
import warnings
from typing import Any

import pytest
from conftest import TIMEOUT, Harness, Recorder, assert_exactly_once_in_order
from websockets.asyncio.client import ClientConnection
from wschat_client import (
    Client,
    ClientClosed,
    ConnectionState,
    Message,
    SyncClient,
)


async def test_a_cancel_as_the_echo_comes_is_not_swallowed(harness: Harness) -> None:
    """A task cancelled while its ``send(..., timeout=...)`` is answered in the same turn of
    the loop (here: a bot told to stop by its own message) stops: on Python 3.11
    ``asyncio.wait_for`` returned the result and swallowed the cancellation, so the bot
    went on sending and an app's shutdown (a TaskGroup, ``task.cancel()``) waited for it.
    The send itself is still delivered, once."""
    server = await harness.server("memory")
    client = Client(server["url"], username="ann", request_timeout=TIMEOUT)
    rec = Recorder(client)
    await client.connect()
    await client.join("hall")
    tasks: list[asyncio.Task[None]] = []

    async def bot() -> None:
        for i in range(3):
            await client.send("hall", f"m{i}", timeout=TIMEOUT)

    def on_message(message: Message) -> None:
        if message.text == "m0":
            tasks[0].cancel()  # the echo of m0 acknowledged its send a moment ago

    client.on("message", on_message)
    tasks.append(asyncio.create_task(bot()))
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(tasks[0], TIMEOUT)
    assert [m.text for m in await client.history("hall")] == ["m0"]
    assert [m.text for m in rec.of("ack")] == ["m0"] and not client.pending
    await client.close()


async def test_calls_cut_short_by_wait_for_leave_nothing_behind(harness: Harness) -> None:
    """send, history, ping, join and list_users cut short by ``asyncio.wait_for`` (cancelled
    before any answer) again and again: the next calls work, each cut send is delivered
    once, and no request, waiter or send future is left behind."""
    server = await harness.server("memory")
    client = Client(server["url"], username="ann", request_timeout=TIMEOUT)
    rec = Recorder(client)
    await client.connect()
    await client.join("hall")
    for _ in range(5):
        for call in (lambda: client.send("hall", "x"), lambda: client.history("hall"),
                     client.ping, lambda: client.join("lobby"),
                     lambda: client.list_users("hall")):
            with contextlib.suppress(TimeoutError):  # a quick answer may beat it
                await asyncio.wait_for(call(), 1e-4)  # after its first step
    assert (await client.send("hall", "after")).text == "after"
    await rec.wait_for(lambda: sum(1 for m in rec.of("message") if m.text == "x") == 5)
    texts = [m.text for m in await client.history("hall")]
    assert texts.count("x") == 5 and texts.count("after") == 1, texts
    assert not client._rooms["lobby"].waiters
    assert not client.pending and not client._requests and not client._send_waiters
    await client.close()


async def test_a_task_group_cancelling_its_calls_breaks_nothing(harness: Harness) -> None:
    """A TaskGroup whose task fails cancels its sends, history and join mid-way: the client
    goes on (the next calls work), and the cancelled sends are each delivered once."""
    server = await harness.server("memory")
    client = Client(server["url"], username="ann", request_timeout=TIMEOUT)
    await client.connect()
    await client.join("hall")

    async def boom() -> None:
        await asyncio.sleep(0)
        raise ValueError("boom")

    with pytest.raises(ExceptionGroup):
        async with asyncio.TaskGroup() as group:
            for i in range(20):
                group.create_task(client.send("hall", f"t{i}"))
            group.create_task(client.history("hall"))
            group.create_task(client.join("other"))
            group.create_task(boom())
    assert (await client.send("hall", "next")).text == "next"
    texts = [m.text for m in await client.history("hall")]
    assert sorted(texts) == sorted([f"t{i}" for i in range(20)] + ["next"]), texts
    await client.ping()
    assert not client.pending
    await client.close()


async def test_close_twice_and_while_reconnecting(harness: Harness) -> None:
    """close() twice at once and once more; close() while the server is gone and the client
    waits to reconnect returns at once, and the send queued meanwhile raises ClientClosed."""
    server = await harness.server("memory")
    client = Client(server["url"], username="ann", request_timeout=TIMEOUT)
    await client.connect()
    await client.join("hall")
    await asyncio.gather(client.close(), client.close())
    await client.close()
    assert client.state is ConnectionState.DISCONNECTED
    other = Client(server["url"], username="bo", request_timeout=TIMEOUT)
    rec = Recorder(other)
    await other.connect()
    await other.join("hall")
    await harness.call(f"/servers/{server['id']}/stop")
    await rec.wait_for(lambda: other.state is ConnectionState.CONNECTING
                       and bool(rec.of("disconnected")), what="the reconnect's wait")
    queued = asyncio.create_task(other.send("hall", "queued"))
    loop = asyncio.get_running_loop()
    started = loop.time()
    await other.close()
    assert loop.time() - started < TIMEOUT / 10
    with pytest.raises(ClientClosed):
        await asyncio.wait_for(queued, TIMEOUT)
    await other.close()
    assert other.state is ConnectionState.DISCONNECTED


async def test_async_with_left_by_an_exception_closes(harness: Harness) -> None:
    """``async with`` left by the app's exception closes the client and lets it through."""
    server = await harness.server("memory")
    with pytest.raises(KeyError):
        async with Client(server["url"], username="ann") as chat:
            await chat.join("hall")
            raise KeyError("the app's")
    assert chat.state is ConnectionState.DISCONNECTED and chat._run_task is not None
    assert chat._run_task.done()


async def test_handlers_raising_are_logged_and_the_client_goes_on(
        harness: Harness) -> None:
    """Plain and async handlers raising on every event: the client goes on."""
    server = await harness.server("memory")
    client = Client(server["url"], username="ann", request_timeout=TIMEOUT)
    rec = Recorder(client)

    def bad(_: object) -> None:
        raise RuntimeError("bad handler")

    async def bad_async(_: object) -> None:
        raise RuntimeError("bad async handler")

    client.on("message", bad)
    client.on("message", bad_async)
    client.on("joined", bad)
    client.on("state", bad)
    client.on("ack", bad)
    await client.connect()
    await client.join("hall")
    assert (await client.send("hall", "a")).text == "a"
    await rec.wait_for(lambda: rec.of("message"))
    await client.close()


async def test_a_handler_raising_cancelled_error_is_logged_and_the_client_goes_on(
        harness: Harness, caplog: pytest.LogCaptureFixture) -> None:
    """A plain handler that raises ``asyncio.CancelledError`` (a BaseException: here it reads
    the result of a cancelled future) is logged, and the client goes on, as for any other
    exception: it ended the client's task, silently, its socket left open and its state
    still ``connected``, and the next send raised ClientClosed ("call connect() first")."""
    server = await harness.server("memory")
    client = Client(server["url"], username="ann", request_timeout=TIMEOUT)
    rec = Recorder(client)
    cancelled = asyncio.get_running_loop().create_future()
    cancelled.cancel()

    def handler(message: Message) -> None:
        if message.text == "a":
            cancelled.result()  # the handler's bug: raises CancelledError

    client.on("message", handler)
    await client.connect()
    await client.join("hall")
    await client.send("hall", "a")
    await rec.wait_for(lambda: [m.text for m in rec.of("message")] == ["a"])
    assert (await client.send("hall", "b", timeout=TIMEOUT)).text == "b"
    await rec.wait_for(lambda: [m.text for m in rec.of("message")] == ["a", "b"])
    assert client.state is ConnectionState.CONNECTED and not rec.of("disconnected")
    assert "a 'message' handler failed" in caplog.text
    await client.close()


def test_a_client_left_open_at_the_loop_s_end_closes_its_socket(harness: Harness) -> None:
    """An app whose ``asyncio.run`` ends with a client it never closed (a CLI returning
    from main on an error path): asyncio.run cancels the client's task, which now aborts its
    socket. It was left open: "unclosed transport" and "unclosed socket" ResourceWarnings
    at exit, and, in a process that goes on, a connection nobody reads that the server kept
    (the user online to the room) until its heartbeat timed out."""
    server = harness.call_sync("/servers", {"backend": "memory"})
    clients: list[Client] = []

    async def app() -> None:
        client = Client(server["url"], username="ann", request_timeout=TIMEOUT)
        clients.append(client)
        await client.connect()
        await client.join("hall")

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ResourceWarning)
        asyncio.run(app())
        clients.clear()
        gc.collect()
    unclosed = [str(w.message) for w in caught if issubclass(w.category, ResourceWarning)]
    assert not unclosed, unclosed


async def test_a_consumer_too_slow_for_the_server_loses_nothing(harness: Harness) -> None:
    """A reader whose loop is stuck (a plain handler blocking it) while a room fills: its
    socket buffers fill, the server's backlog for it passes ``MAX_OUTBOUND_BYTES`` and it is
    closed as a slow consumer (4101); the client reconnects after the pause, the rejoin's
    replay brings what the server dropped, and every message is delivered once, in order."""
    server = await harness.server("memory", env={
        "MAX_OUTBOUND_BYTES": "65536", "RATE_LIMIT": "1000", "RATE_LIMIT_BURST": "1000",
        "MAX_TEXT_CHARS": "15000", "HISTORY_SIZE": "1000"})
    reader = Client(server["url"], username="ann", request_timeout=TIMEOUT,
                    connect_timeout=TIMEOUT)
    rec = Recorder(reader)
    stuck = [True]

    def slow(message: Message) -> None:
        if stuck[0]:
            stuck[0] = False
            time.sleep(3.0)  # the app's loop blocked: nothing is read meanwhile

    reader.on("message", slow)
    await reader.connect()
    await reader.join("hall")
    count = 200

    def write() -> list[Message]:  # on a thread and loop of its own: the reader's is stuck
        with SyncClient(server["url"], username="bo", request_timeout=TIMEOUT) as writer:
            writer.join("hall")
            return [writer.send("hall", f"{i:04d}" + "x" * 14_990) for i in range(count)]

    sent = await asyncio.to_thread(write)
    await rec.wait_for(lambda: len(rec.ids("hall")) >= count, timeout=6 * TIMEOUT,
                       what="every message")
    assert_exactly_once_in_order(rec, "hall", sent)
    assert [d.code for d in rec.of("disconnected")] == [4101]
    await reader.close()


async def test_close_as_the_welcome_comes_returns_at_once(harness: Harness) -> None:
    """close() called in the turn of the loop in which the ``welcome`` arrives (the client
    then in its handshake, with no socket to close yet: it cancels the connecting task)
    returns at once, and nothing connects once it has begun: on Python 3.11 ``asyncio.wait_for``
    around the welcome's read swallowed the cancellation, the client went on to
    ``connected``, and close() waited ``connect_timeout`` for a task that did not end."""
    server = await harness.server("memory")
    closing: list[asyncio.Task[None]] = []

    class CloseOnWelcome(ClientConnection):
        async def recv(self, *args: Any, **kwargs: Any) -> Any:
            frame = await super().recv(*args, **kwargs)
            if not closing:  # the welcome: close() starts before the client takes it
                asyncio.get_running_loop().call_soon(
                    lambda: closing.append(asyncio.create_task(client.close())))
            return frame

    client = Client(server["url"], username="ann", connect_timeout=TIMEOUT,
                    websocket_options={"create_connection": CloseOnWelcome})
    rec = Recorder(client)
    connected_after_close: list[bool] = []
    client.on("connected", lambda _: connected_after_close.append(bool(closing)))
    await client.connect(wait=False)
    await rec.wait_for(lambda: bool(closing), what="the welcome")
    loop = asyncio.get_running_loop()
    started = loop.time()
    await asyncio.wait_for(closing[0], 2 * TIMEOUT)
    assert loop.time() - started < TIMEOUT / 2
    assert client.state is ConnectionState.DISCONNECTED
    assert True not in connected_after_close
