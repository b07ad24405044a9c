"""The client against the real server's refused upgrades.

A server that is full (``MAX_CONNECTIONS``) or draining answers the upgrade with 503
and ``Retry-After``; the client must not knock again before that, however short its
own backoff.
"""

from __future__ import annotations

import asyncio

from conftest import TIMEOUT, Harness, Recorder
from wschat_client import Backoff, Client, ConnectionState

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
