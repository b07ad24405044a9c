"""The client over ``wss://`` against the real server behind a TLS front (the harness's
``POST /servers/<id>/tls``, its certificate signed by a CA made at run time).

A certificate the client cannot verify (signed by a CA it does not trust, or made for
another host name) is no outage: trying again gets the same certificate. The client stops
at the first such refusal with ``ClientClosed`` (``close_code`` 1015, RFC 6455's code for a
TLS handshake that failed), its message naming the certificate problem, as the JS and Rust
clients do; it used to retry with the backoff for ever, ``connect()`` and ``join()`` ending
in a bare timeout. A CA passed in an ``ssl`` context (``websocket_options``) is trusted.
That holds until the client's first ``welcome`` since ``connect()``: once connected, such a
failure on a reconnect is a server-side incident (a certificate expired or rotated wrongly),
retried with the backoff (the front's certificate swapped: ``POST /fronts/<front>/certificate``).
"""

from __future__ import annotations

import asyncio
import ssl
from typing import Any

import pytest

from conftest import TIMEOUT, Harness, Recorder
from wschat_client import Backoff, Client, ClientClosed, ConnectionState

FAST = Backoff(min_delay=0.05, max_delay=0.2, pause=0.2)


async def tls_front(harness: Harness, hostname: str = "localhost") -> dict[str, Any]:
    server = await harness.server("memory")
    return await harness.call(f"/servers/{server['id']}/tls", {"hostname": hostname})


@pytest.mark.parametrize("case", ["untrusted", "wrong_host"])
async def test_a_certificate_that_fails_verification_stops_the_client(
        harness: Harness, case: str) -> None:
    """One attempt, then ``ClientClosed`` (1015) with the cause, for ``connect()`` and for
    a ``join`` waiting for the connection; half a second more shows no second attempt (the
    backoff would have made a few)."""
    if case == "untrusted":
        front = await tls_front(harness)
        options: dict[str, Any] = {}  # the system's CAs only: the harness's is not one
        cause = "unable to get local issuer certificate"
    else:
        front = await tls_front(harness, "wrong.invalid")  # the CA trusted, the name wrong
        options = {"ssl": ssl.create_default_context(cafile=front["ca"])}
        cause = "mismatch"
    client = Client(front["url"], username="ann", backoff=FAST, request_timeout=TIMEOUT,
                    websocket_options=options)
    rec = Recorder(client)
    await client.connect(wait=False)
    join = asyncio.create_task(client.join("general"))  # waits for the connection
    with pytest.raises(ClientClosed) as connected:
        await asyncio.wait_for(client.connect(), TIMEOUT)  # the same attempts: none is new
    with pytest.raises(ClientClosed) as joined:
        await asyncio.wait_for(join, TIMEOUT)
    for err in (joined.value, connected.value):
        assert err.close_code == 1015, err
        assert "TLS certificate verification failed" in str(err), err
        assert cause in str(err).lower(), err
    await asyncio.sleep(0.5)
    assert [(d.code, d.reconnect_in) for d in rec.of("disconnected")] == [(1015, None)]
    assert cause in rec.of("disconnected")[0].reason.lower()
    assert [e.close_code for e in rec.of("error")] == [1015]
    assert client.state is ConnectionState.DISCONNECTED
    await client.close()


async def test_a_private_ca_is_trusted_through_an_ssl_context(harness: Harness) -> None:
    """The README's way to trust a private CA: an ``ssl`` context in ``websocket_options``."""
    front = await tls_front(harness)
    context = ssl.create_default_context(cafile=front["ca"])
    async with Client(front["url"], username="ann", request_timeout=TIMEOUT,
                      websocket_options={"ssl": context}) as client:
        await asyncio.wait_for(client.connect(), TIMEOUT)
        joined = await client.join("general")
        assert joined.room == "general"
        assert (await client.send("general", "over TLS")).text == "over TLS"


async def test_after_a_connection_a_certificate_failure_is_an_outage_and_retried(
        harness: Harness) -> None:
    """Connected once since ``connect()``, the client takes a certificate failure on a
    reconnect for a server-side incident (a certificate expired or rotated wrongly): each
    attempt is a ``disconnected`` 1015 with the cause and ``reconnect_in`` set, and an
    ``error`` event (``tls_certificate``); the rooms and the outbox are kept, and once the
    front's certificate is trusted again the client is back by itself, re-joined with
    ``since``, a send queued during the failure delivered exactly once. It used to stop for
    good at the first failure, the queued send waiting for a restart of the app. A
    ``connect()`` after ``close()`` is a first connection again: a failure stops it."""
    server = await harness.server("memory")
    front = await harness.call(f"/servers/{server['id']}/tls")
    swap = f"/fronts/{front['front']}/certificate"
    context = ssl.create_default_context(cafile=front["ca"])
    client = Client(front["url"], username="ann", backoff=FAST, request_timeout=TIMEOUT,
                    websocket_options={"ssl": context})
    rec = Recorder(client)
    async with Client(server["url"], username="bob", request_timeout=TIMEOUT) as bob:
        seen = Recorder(bob)
        await bob.join("general")
        await asyncio.wait_for(client.connect(), TIMEOUT)
        await client.join("general")
        before = await client.send("general", "before")

        await harness.call(swap, {"issuer": "unknown", "drop": True})

        def failures() -> list[Any]:
            return [d for d in rec.of("disconnected") if d.code == 1015]

        await rec.wait_for(lambda: len(failures()) >= 2, what="two failed attempts")
        assert all(d.reconnect_in is not None for d in failures()), failures()
        assert "TLS certificate verification failed" in failures()[0].reason
        assert "unable to get local issuer certificate" in failures()[0].reason.lower()
        errors = [e for e in rec.of("error") if e.code == "tls_certificate"]
        assert errors and "local issuer" in errors[0].message.lower(), rec.of("error")
        assert not any(isinstance(e, ClientClosed) for e in rec.of("error")), rec.of("error")
        assert client.state is ConnectionState.CONNECTING
        during = asyncio.create_task(client.send("general", "during"))
        await asyncio.sleep(0)
        assert [p.text for p in client.pending] == ["during"]

        await harness.call(swap, {"issuer": "ca"})
        sent = await asyncio.wait_for(during, 3 * TIMEOUT)
        assert sent.text == "during" and sent.id == before.id + 1
        await seen.wait_for(lambda: len(seen.messages["general"]) >= 2, what="during at bob")
        assert client.state is ConnectionState.CONNECTED
        assert [j.rejoin for j in rec.of("joined")] == [False, True]
        assert client.rooms["general"].last_id == sent.id
        history = await bob.history("general")
        assert [(m.id, m.text) for m in history] == [(before.id, "before"), (sent.id, "during")]
        assert [(m.id, m.text) for m in seen.messages["general"]] == [
            (before.id, "before"), (sent.id, "during")]
        await client.close()

        # A new start: never connected since this connect(), so the failure stops it again.
        await harness.call(swap, {"issuer": "unknown"})
        with pytest.raises(ClientClosed) as stopped:
            await asyncio.wait_for(client.connect(), TIMEOUT)
        assert stopped.value.close_code == 1015, stopped.value
        assert rec.of("disconnected")[-1].reconnect_in is None
