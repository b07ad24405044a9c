"""Probe tests (scratch)."""

from __future__ import annotations

import asyncio

import pytest
from conftest import TIMEOUT, Harness, Recorder

from wschat_client import ChatError, Client, ClientClosed, ConnectionState, Message, RequestTimeout


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


async def test_probe_timeouts_then_next_call(harness: Harness) -> None:
    server = await harness.server("memory")
    client = Client(server["url"], username="ann", request_timeout=TIMEOUT)
    rec = Recorder(client)
    await client.connect()
    await client.join("hall")
    for _ in range(5):
        for coro in (client.send("hall", "x"), client.history("hall"), client.ping(),
                     client.join("lobby"), client.list_users("hall")):
            try:
                await asyncio.wait_for(coro, 0.0001)
            except TimeoutError:
                pass
    m = await client.send("hall", "after")
    assert m.text == "after"
    await rec.wait_for(lambda: sum(1 for x in rec.of("message") if x.text == "x") == 5)
    h = await client.history("hall")
    texts = [x.text for x in h]
    assert texts.count("x") == 5 and texts.count("after") == 1, texts
    print("pending", client.pending, client._requests, client._send_waiters, client._rooms["lobby"].waiters)
    assert not client.pending and not client._requests and not client._send_waiters
    await client.close()


async def test_probe_taskgroup(harness: Harness) -> None:
    server = await harness.server("memory")
    client = Client(server["url"], username="ann", request_timeout=TIMEOUT)
    await client.connect()
    await client.join("hall")

    async def boom() -> None:
        await asyncio.sleep(0)
        raise ValueError("boom")

    with pytest.raises(ExceptionGroup):
        async with asyncio.TaskGroup() as tg:
            for i in range(20):
                tg.create_task(client.send("hall", f"t{i}"))
            tg.create_task(client.history("hall"))
            tg.create_task(client.join("other"))
            tg.create_task(boom())
    assert (await client.send("hall", "next")).text == "next"
    assert await client.history("hall")
    await client.ping()
    await client.close()


async def test_probe_close_twice_and_while_reconnecting(harness: Harness) -> None:
    server = await harness.server("memory")
    client = Client(server["url"], username="ann", request_timeout=TIMEOUT)
    rec = Recorder(client)
    await client.connect()
    await client.join("hall")
    await asyncio.gather(client.close(), client.close())
    await client.close()
    client2 = Client(server["url"], username="bo", request_timeout=TIMEOUT)
    rec = Recorder(client2)
    await client2.connect()
    await client2.join("hall")
    await harness.call(f"/servers/{server['id']}/stop")
    await rec.wait_for(lambda: client2.state is ConnectionState.CONNECTING and rec.of("disconnected"))
    s = asyncio.create_task(client2.send("hall", "queued"))
    await asyncio.sleep(0.3)
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    await client2.close()
    assert loop.time() - t0 < 1
    with pytest.raises(ClientClosed):
        await s
    await client2.close()


async def test_probe_async_with_exception(harness: Harness) -> None:
    server = await harness.server("memory")
    with pytest.raises(KeyError):
        async with Client(server["url"], username="ann") as c:
            await c.join("hall")
            raise KeyError("x")
    assert c.state is ConnectionState.DISCONNECTED


async def test_probe_handler_raising(harness: Harness) -> None:
    server = await harness.server("memory")
    client = Client(server["url"], username="ann", request_timeout=TIMEOUT)
    rec = Recorder(client)

    def bad(m):  # type: ignore[no-untyped-def]
        raise RuntimeError("bad handler")

    async def bad_async(m):  # type: ignore[no-untyped-def]
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
