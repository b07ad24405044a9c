"""The client against the real server's refused upgrades.

A server that is full (``MAX_CONNECTIONS``) or draining answers the upgrade with 503
and ``Retry-After``; the client must not knock again before that, however short its
own backoff. A refusal retrying cannot change (403, 400, 404) stops the client.
"""

from __future__ import annotations

import asyncio
import email.utils
import time

import pytest

from conftest import TIMEOUT, Harness, Recorder
from wschat_client import Backoff, Client, ClientClosed, ConnectionState

FAST = Backoff(min_delay=0.05, max_delay=0.2, pause=0.2)
RETRY_AFTER = 5.0  # what the server sends with a 503 for MAX_CONNECTIONS
TIMER_SLACK = 0.05  # an event loop's timer may fire this much early


async def test_a_full_server_s_retry_after_is_waited_before_reconnecting(
        harness: Harness) -> None:
    """503 + Retry-After: 5 (MAX_CONNECTIONS reached): the next attempt waits 5 s,
    not the 0.05-0.2 s of the client's own backoff, even once a slot is free."""
    server = await harness.server("memory", env={"MAX_CONNECTIONS": "1"})
    first = Client(server["url"], token=await harness.token("ann"), backoff=FAST,
                   request_timeout=TIMEOUT)
    await first.connect()
    second = Client(server["url"], token=await harness.token("bea"), backoff=FAST,
                    request_timeout=TIMEOUT)
    rec = Recorder(second)
    await second.connect(wait=False)
    await rec.wait_for(lambda: rec.of("disconnected"), what="the refused upgrade")
    loop = asyncio.get_running_loop()
    refused_at = loop.time()
    refusal = rec.of("disconnected")[0]
    assert refusal.code == 503, refusal
    assert refusal.reconnect_in is not None and refusal.reconnect_in >= RETRY_AFTER, refusal
    await first.close()  # a slot is free now: only Retry-After holds the second back
    await rec.wait_for(lambda: second.state is ConnectionState.CONNECTED,
                       RETRY_AFTER + TIMEOUT, "the reconnect")
    waited = loop.time() - refused_at
    assert waited >= RETRY_AFTER - TIMER_SLACK, f"reconnected {waited:.2f} s after the 503"
    assert [d.code for d in rec.of("disconnected")] == [503], "one refusal, then connected"
    await second.close()


async def test_an_upgrade_refused_for_good_stops_the_client(harness: Harness) -> None:
    """403 (an Origin not in ALLOWED_ORIGINS), 400 (a guest name the server refuses) and
    404 (not the WebSocket path) will not change by retrying: one attempt, then
    ``ClientClosed`` with the status as ``close_code``, as the JS and Rust clients do.
    Half a second more shows no second attempt (the backoff would have made a few)."""
    server = await harness.server("memory", env={"ALLOWED_ORIGINS": "http://chat.example"})
    cases = [
        (403, server["url"], "ann", {"origin": "http://elsewhere.example"}),
        (400, server["url"], "no/slashes", {}),
        (404, server["url"].removesuffix("/ws") + "/nowhere", "ann", {}),
    ]
    for status, url, name, options in cases:
        client = Client(url, username=name, backoff=FAST, request_timeout=TIMEOUT,
                        websocket_options=options)
        rec = Recorder(client)
        with pytest.raises(ClientClosed) as refused:
            await asyncio.wait_for(client.connect(), TIMEOUT)
        assert refused.value.close_code == status, refused.value
        await asyncio.sleep(0.5)
        assert [(d.code, d.reconnect_in) for d in rec.of("disconnected")] == [(status, None)]
        assert [e.close_code for e in rec.of("error")] == [status]
        assert client.state is ConnectionState.DISCONNECTED
        await client.close()


async def fake_503(retry_after: str) -> tuple[asyncio.Server, str, list[int]]:
    """A server answering every upgrade with 503 and ``Retry-After: retry_after``."""
    attempts: list[int] = []

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        attempts.append(1)
        await reader.readuntil(b"\r\n\r\n")
        writer.write(f"HTTP/1.1 503 Service Unavailable\r\nRetry-After: {retry_after}\r\n"
                     "Content-Length: 0\r\nConnection: close\r\n\r\n".encode())
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(answer, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    return server, f"ws://127.0.0.1:{port}/ws", attempts


@pytest.mark.parametrize("header", [
    "inf",
    "1e400",
    "3000000",
    email.utils.formatdate(time.time() + 3 * 365 * 86400, usegmt=True),
])
async def test_a_refusal_s_retry_after_is_capped_at_a_day(header: str) -> None:
    """A Retry-After far ahead (a proxy's mistake) waits a day at most, as in the JS and
    Rust clients: "inf" and "1e400" used to mean never reconnecting, a date three years
    ahead waiting three years."""
    server, url, attempts = await fake_503(header)
    client = Client(url, backoff=FAST)
    rec = Recorder(client)
    await client.connect(wait=False)
    await rec.wait_for(lambda: rec.of("disconnected"), what="the refused upgrade")
    refusal = rec.of("disconnected")[0]
    await client.close()
    server.close()
    assert refusal.code == 503, refusal
    assert refusal.reconnect_in is not None and refusal.reconnect_in <= 86_400, refusal
    assert attempts == [1]
