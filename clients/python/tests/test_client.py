"""The client against a scripted in-process server: states, close codes, gaps, the outbox.

The fake server speaks just enough of the protocol for each test, on a real
socket (port 0), so the timing and the faults are the test's to choose.
"""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import itertools
import json
import logging
import math
import queue
import weakref
from pathlib import Path
from typing import Any

import pytest
from websockets.asyncio.server import ServerConnection, serve
from websockets.exceptions import ConnectionClosed

from conftest import TIMEOUT, Recorder
from wschat_client import (Backoff, ChatError, Client, ClientClosed, ConnectionState, Disconnected,
                           FileOutboxStore, HistoryPage, Message, OutboxFull, Removed,
                           RequestTimeout, RoomState, SyncClient, Welcome)

FAST = Backoff(min_delay=0.01, max_delay=0.05, pause=0.05)


class Peer:
    """One connection to the fake server, seen from the server."""

    def __init__(self, ws: ServerConnection, user_id: str) -> None:
        self.ws = ws
        self.user_id = user_id  # the welcome's
        self.closed = asyncio.Event()

    async def recv(self, kind: str | None = None) -> dict[str, Any]:
        """The next frame from the client (of ``kind``, skipping others)."""
        while True:
            frame = json.loads(await asyncio.wait_for(self.ws.recv(), TIMEOUT))
            if kind is None or frame["type"] == kind:
                return frame

    async def send(self, **event: Any) -> None:
        await self.ws.send(json.dumps(event))

    async def recv_answering_pings(self, kind: str, what: str) -> dict[str, Any]:
        """The next ``kind`` frame, answering each ping on the way as the server does
        (in order: its pong goes after whatever it sent before)."""
        try:
            while True:
                frame = await self.recv()
                if frame["type"] == "ping":
                    await self.send(type="pong", id=frame["id"])
                elif frame["type"] == kind:
                    return frame
        except TimeoutError:
            raise AssertionError(f"no {kind} frame: {what}") from None

    async def joined(self, room: str = "r", last_id: int = 0, **extra: Any) -> dict[str, Any]:
        """Answer the client's next join; returns the join frame."""
        join = await self.recv("join")
        assert join["room"] == room
        await self.send(type="joined", id=join["id"], room=room, users=[], last_id=last_id,
                        **extra)
        return join

    async def refuse(self, kind: str, code: str, request: Any) -> None:
        """Answer the client's next ``kind`` frame with error ``code``; ``request`` raises it."""
        frame = await self.recv(kind)
        await self.send(type="error", id=frame["id"], code=code, message="refused")
        with pytest.raises(ChatError) as err:
            await request
        assert err.value.code == code

    async def message(self, mid: int, room: str = "r", user_id: str = "u", **extra: Any) -> None:
        await self.send(type="message", id=mid, room=room, text=f"m{mid}", user_id=user_id,
                        timestamp=0, **{"from": "x"}, **extra)

    async def echo(self, frame: dict[str, Any], mid: int) -> None:
        """The server's echo of ``frame``: it carries the sender's user_id (this connection's)."""
        await self.message(mid, frame["room"], user_id=self.user_id,
                           client_msg_id=frame["client_msg_id"])


class FakeServer:
    """Accepts connections, greets each with ``welcome``, hands it to the test."""

    def __init__(self, process_request: Any = None) -> None:
        self.peers: asyncio.Queue[Peer] = asyncio.Queue()
        self.count = 0
        self.process_request = process_request
        self.heartbeat_interval = "30"  # the welcome's, as raw JSON text (a test may set "1e400")
        self.welcome_extra: dict[str, Any] = {}  # {"dm_backlog": 0}: persistence on

    async def __aenter__(self) -> FakeServer:
        self.server = await serve(self._handle, "127.0.0.1", 0,
                                  process_request=self.process_request)
        port = self.server.sockets[0].getsockname()[1]
        self.url = f"ws://127.0.0.1:{port}/ws"
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.server.close()
        await self.server.wait_closed()

    async def _handle(self, ws: ServerConnection) -> None:
        self.count += 1
        peer = Peer(ws, f"u{self.count}")
        welcome = json.dumps({"type": "welcome", "user_id": f"u{self.count}",
                              "username": "alice", "authenticated": False,
                              "auth_required": False, **self.welcome_extra})
        await ws.send(f'{welcome[:-1]}, "heartbeat_interval": {self.heartbeat_interval}}}')
        await self.peers.put(peer)
        await ws.wait_closed()

    async def accept(self) -> Peer:
        return await asyncio.wait_for(self.peers.get(), TIMEOUT)

    async def drop(self, peer: Peer) -> Peer:
        """Cut ``peer``'s TCP connection (no close frame); the client's next connection."""
        peer.ws.transport.abort()
        return await self.accept()


def client_for(fake: FakeServer, **options: Any) -> Client:
    return Client(fake.url, backoff=FAST, request_timeout=TIMEOUT, **options)


async def joined_client(fake: FakeServer, last_id: int = 0,
                        **options: Any) -> tuple[Client, Recorder, Peer]:
    client = client_for(fake, **options)
    rec = Recorder(client)
    await client.connect()
    peer = await fake.accept()
    join = asyncio.create_task(client.join("r"))
    await peer.joined(last_id=last_id)
    await join
    return client, rec, peer


async def dropped_after_one(fake: FakeServer, last_id: int) -> tuple[Client, Recorder, Peer]:
    """A client joined at ``last_id`` that got message last_id + 1, then lost its connection."""
    client, rec, peer = await joined_client(fake, last_id=last_id)
    await peer.message(last_id + 1)
    await rec.wait_for(lambda: rec.ids("r") == [last_id + 1])
    return client, rec, await fake.drop(peer)


async def sent_then_dropped(fake: FakeServer) -> tuple[Client, Recorder, Peer, Any, dict[str, Any]]:
    """A joined client whose send reached the server, then the connection dropped (no echo)."""
    client, rec, peer = await joined_client(fake, last_id=0)
    sending = asyncio.create_task(client.send("r", "hello"))
    frame = await peer.recv("message")
    return client, rec, await fake.drop(peer), sending, frame


async def test_state_machine_connects_reconnects_and_closes() -> None:
    """disconnected -> connecting -> connected; a 1001 goes back through connecting; close ends."""
    async with FakeServer() as fake:
        client = client_for(fake)
        rec = Recorder(client)
        assert client.state is ConnectionState.DISCONNECTED
        await client.connect()
        first = await fake.accept()
        assert client.state is ConnectionState.CONNECTED and client.user_id == "u1"
        await first.ws.close(1001, "going away")
        await fake.accept()
        await rec.wait_for(lambda: client.user_id == "u2", what="the second welcome")
        await client.close()
        states = [(c.old.value, c.new.value) for c in rec.of("state")]
        assert states == [("disconnected", "connecting"), ("connecting", "connected"),
                          ("connected", "connecting"), ("connecting", "connected"),
                          ("connected", "disconnected")]
        assert rec.of("disconnected")[0].code == 1001
        assert rec.of("disconnected")[0].reconnect_in is not None


async def _closed_at_once(fake: FakeServer, client: Client, rec: Recorder, code: int,
                          times: int) -> list[float]:
    """Close the client's next ``times`` connections with ``code`` right after the welcome;
    the reconnect delays the client chose."""
    before = len(rec.of("disconnected"))
    for _ in range(times):
        peer = await fake.accept()
        await peer.ws.close(code, "at once")
    await rec.wait_for(lambda: len(rec.of("disconnected")) >= before + times,
                       what=f"{times} closes")
    return [d.reconnect_in for d in rec.of("disconnected")[before:before + times]]


@pytest.mark.parametrize("code", [1013, 1001, 1011, 4100])
async def test_a_server_closing_right_after_welcome_is_retried_with_growing_delays(
        code: int) -> None:
    """The backoff was reset by every welcome: a server that accepts and then closes at once
    (1013 in an outage, a draining pod's 1001) was tried again at the shortest delay for
    ever, by every client together. Only a connection that stayed up ``stable_after``
    resets it now."""
    async with FakeServer() as fake:
        backoff = Backoff(min_delay=0.01, max_delay=0.2, random=lambda: 0.5, stable_after=0.3)
        client = Client(fake.url, backoff=backoff, request_timeout=TIMEOUT)
        rec = Recorder(client)
        await client.connect(wait=False)
        delays = await _closed_at_once(fake, client, rec, code, 4)
        assert delays == sorted(delays) and delays[-1] > 2 * delays[0], delays
        stable = await fake.accept()
        await asyncio.sleep(0.35)  # up longer than stable_after
        await stable.ws.close(code, "after a while")
        await rec.wait_for(lambda: len(rec.of("disconnected")) == 5, what="the fifth close")
        assert rec.of("disconnected")[-1].reconnect_in <= delays[0], "not reset"
        await fake.accept()
        await client.close()


@pytest.mark.parametrize("code", [4002, 1003, 4001])
async def test_terminal_close_codes_stop_reconnecting(code: int) -> None:
    """Without a token source, 4001/4002 and 'fix the client' codes end the client."""
    async with FakeServer() as fake:
        client = client_for(fake)
        rec = Recorder(client)
        await client.connect()
        peer = await fake.accept()
        await peer.ws.close(code, "bye")
        await rec.wait_for(lambda: client.state is ConnectionState.DISCONNECTED
                           and rec.of("error"), what="the terminal close")
        assert rec.of("disconnected")[-1].reconnect_in is None
        assert rec.of("error")[-1].code == "closed"
        assert rec.of("error")[-1].close_code == code
        assert fake.count == 1
        with pytest.raises(ChatError):
            await client.history("r")
        with pytest.raises(ClientClosed):
            await client.dm("u2", "nobody will carry this")
        await client.close()


async def test_gap_triggers_rejoin_with_since_and_no_doubles() -> None:
    """An id that is not last+1 re-joins with since; the replay fills the gap; repeats drop."""
    async with FakeServer() as fake:
        client, rec, peer = await joined_client(fake, last_id=5)
        await peer.message(6)
        await peer.message(8)  # 7 is missing
        rejoin = await peer.recv("join")
        assert rejoin["since"] == 6
        await peer.send(type="joined", id=rejoin["id"], room="r", users=[], last_id=8,
                        recovered=True)
        for mid in (7, 8, 7, 6, 9):
            await peer.message(mid)
        await rec.wait_for(lambda: rec.ids("r")[-1:] == [9], what="message 9")
        assert rec.ids("r") == [6, 7, 8, 9]
        assert rec.of("joined")[-1].rejoin and rec.of("joined")[-1].recovered
        await client.close()


async def test_a_rooms_sends_wait_for_its_gap_rejoin() -> None:
    """A send to a room whose gap re-join is on the wire goes after the re-join's answer
    and replay, as the JS and Rust clients do: the replay may hold the very message a
    send would repeat (before, it went at once, ahead of the re-join)."""
    async with FakeServer() as fake:
        client, rec, peer = await joined_client(fake, last_id=5)
        await peer.message(6)
        await peer.message(8)  # 7 is missing
        rejoin = await peer.recv("join")
        sending = asyncio.ensure_future(client.send("r", "during the rejoin"))
        with pytest.raises(TimeoutError):  # nothing else is written meanwhile
            await asyncio.wait_for(peer.ws.recv(), 0.3)
        await peer.send(type="joined", id=rejoin["id"], room="r", users=[], last_id=8,
                        recovered=True)
        await peer.message(7)
        await peer.message(8)
        frame = await peer.recv_answering_pings("message", "the send after the replay")
        assert frame["text"] == "during the rejoin"
        await peer.echo(frame, 9)
        assert (await asyncio.wait_for(sending, TIMEOUT)).id == 9
        assert rec.ids("r") == [6, 7, 8, 9]
        await client.close()


async def test_reconnect_rejoins_with_since_and_reports_recovery_failed() -> None:
    """After a drop every room is joined again with since; recovered: false is an event."""
    async with FakeServer() as fake:
        client, rec, peer = await dropped_after_one(fake, last_id=3)
        assert client.rooms["r"].state is RoomState.JOINING
        join = await peer.joined(last_id=12, recovered=False)
        assert join["since"] == 4
        await peer.message(10)  # 5..9 are gone; the replay starts at 10
        await peer.message(11)
        await rec.wait_for(lambda: rec.ids("r")[-1:] == [11])
        assert rec.ids("r") == [4, 10, 11]
        (lost,) = rec.of("recovery_failed")
        assert (lost.room, lost.since, lost.last_id) == ("r", 4, 12)
        assert client.rooms["r"].state is RoomState.JOINED
        await client.close()


async def test_send_is_resent_after_reconnect_and_acked_once() -> None:
    """An unacknowledged send goes out again, with the same client_msg_id, after a drop."""
    async with FakeServer() as fake:
        client, rec, peer, sending, first = await sent_then_dropped(fake)
        await peer.joined(last_id=0, recovered=True)
        again = await peer.recv("message")
        assert again["client_msg_id"] == first["client_msg_id"] and again["text"] == "hello"
        await peer.echo(again, 1)
        await peer.echo(again, 1)  # the server's dedupe answer: the original again
        message = await sending
        assert message.id == 1 and message.client_msg_id == first["client_msg_id"]
        await rec.wait_for(lambda: rec.ids("r") == [1])
        assert client.pending == []
        await client.close()


async def test_send_found_in_the_replay_is_not_resent() -> None:
    """A send whose echo was lost but which the rejoin replays is acknowledged by the replay."""
    async with FakeServer() as fake:
        client, rec, peer, sending, frame = await sent_then_dropped(fake)
        await peer.joined(last_id=1, recovered=True)
        await peer.echo(frame, 1)  # the replay
        assert (await sending).id == 1
        probe = asyncio.create_task(client.ping())
        assert (await peer.recv())["type"] == "ping"  # the next frame: no resent message
        probe.cancel()
        await client.close()


async def test_sends_wait_while_disconnected_and_go_out_in_order() -> None:
    """Sends made while the server is unreachable queue, then go out in order once joined."""
    async with FakeServer() as fake:
        client, rec, peer = await joined_client(fake, last_id=0)
        await fake.__aexit__()  # stop listening, then drop the connection
        peer.ws.transport.abort()
        await rec.wait_for(lambda: client.state is not ConnectionState.CONNECTED)
        sends = [asyncio.create_task(client.send("r", f"t{i}")) for i in range(5)]
        await asyncio.sleep(0)
        assert [p.text for p in client.pending] == [f"t{i}" for i in range(5)]
        fake.server = await serve(fake._handle, "127.0.0.1", int(fake.url.split(":")[2][:-3]))
        peer = await fake.accept()
        await peer.joined(last_id=0, recovered=True)
        for i in range(5):
            frame = await peer.recv("message")
            assert frame["text"] == f"t{i}"
            await peer.echo(frame, i + 1)
        assert [m.id for m in await asyncio.gather(*sends)] == [1, 2, 3, 4, 5]
        await client.close()


async def test_outbox_is_bounded() -> None:
    """Past max_outbox a send raises OutboxFull at once; within it, max_in_flight are on the wire."""
    async with FakeServer() as fake:
        client, rec, peer = await joined_client(fake, max_outbox=3, max_in_flight=2)
        sends = [asyncio.create_task(client.send("r", f"t{i}")) for i in range(3)]
        await asyncio.sleep(0)
        with pytest.raises(OutboxFull):
            await client.send("r", "one too many")
        first, second = await peer.recv("message"), await peer.recv("message")
        await peer.echo(first, 1)
        third = await peer.recv("message")  # only once the first was acknowledged
        assert third["text"] == "t2"
        await peer.echo(second, 2)
        await peer.echo(third, 3)
        assert [m.id for m in await asyncio.gather(*sends)] == [1, 2, 3]
        await client.close()


async def test_retryable_refusals_are_retried_and_others_fail_with_the_code() -> None:
    """rate_limited waits retry_after_ms then resends; message_too_large fails the send."""
    async with FakeServer() as fake:
        client, rec, peer = await joined_client(fake)
        sending = asyncio.create_task(client.send("r", "hi"))
        frame = await peer.recv("message")
        await peer.send(type="error", id=frame["id"], code="rate_limited", message="slow down",
                        retry_after_ms=50)
        again = await peer.recv("message")
        assert again["client_msg_id"] == frame["client_msg_id"]
        await peer.echo(again, 1)
        assert (await sending).id == 1
        await peer.refuse("message", "message_too_large",
                          asyncio.create_task(client.send("r", "x" * 10)))
        assert client.pending == []
        await client.close()


async def test_a_timeout_of_0_does_not_wait() -> None:
    """``timeout=0`` is "do not wait" (asyncio's meaning), not "the default": ``timeout or
    default`` took it for the client's 10 s (requests) or for ever (sends). A send so given
    up stays in the outbox, as after any send timeout."""
    async with FakeServer() as fake:
        client, rec, peer = await joined_client(fake, send_timeout=30)  # requests: TIMEOUT
        with pytest.raises(RequestTimeout):
            await asyncio.wait_for(client.list_users("r", timeout=0), 5)
        with pytest.raises(RequestTimeout):
            await asyncio.wait_for(client.send("r", "later", timeout=0), 5)
        assert [p.text for p in client.pending] == ["later"]
        await client.close()


async def test_request_errors_carry_the_server_code_and_time_out() -> None:
    """history/list_users reject with the server's code, or RequestTimeout when unanswered."""
    async with FakeServer() as fake:
        client, rec, peer = await joined_client(fake)
        await peer.refuse("history", "invalid_room",
                          asyncio.create_task(client.history("bad room")))
        with pytest.raises(RequestTimeout):
            await client.list_users("r", timeout=0.2)
        with pytest.raises(ChatError) as err:
            await client.send("never-joined", "hi")
        assert err.value.code == "not_in_room"
        await client.close()


async def test_typing_sends_false_by_itself_and_send_ends_it() -> None:
    """typing() sends true once per burst, false after typing_idle; a send clears it."""
    async with FakeServer() as fake:
        client, rec, peer = await joined_client(fake, typing_idle=0.2)
        client.typing("r")
        client.typing("r")  # within the burst: no second frame
        assert (await peer.recv())["status"] is True
        assert (await peer.recv())["status"] is False  # after typing_idle
        client.typing("r")
        assert (await peer.recv())["status"] is True
        sending = asyncio.create_task(client.send("r", "done"))
        frame = await peer.recv()
        assert frame["type"] == "message"  # no typing false: the message clears it
        await peer.echo(frame, 1)
        await sending
        await client.close()


async def test_persisted_outbox_is_sent_by_the_next_run(tmp_path: Path) -> None:
    """A send the first run never saw acknowledged goes out from the second run's outbox."""
    store = FileOutboxStore(tmp_path / "outbox.json")
    async with FakeServer() as fake:
        client, rec, peer = await joined_client(fake, outbox_store=store)
        sending = asyncio.create_task(client.send("r", "survives"))
        frame = await peer.recv("message")
        await client.close()  # the app quits before the echo
        with pytest.raises(ChatError):
            await sending
        second, _, peer = await joined_client(fake, outbox_store=store)
        again = await peer.recv("message")
        assert again["client_msg_id"] == frame["client_msg_id"]
        await peer.echo(again, 1)
        await Recorder(second).wait_for(lambda: not second.pending, what="the acknowledgement")
        assert store.load() == []
        await second.close()


class FailingStore:
    """An outbox store whose save raises once ``broken`` (a full disk, a lost mount)."""

    def __init__(self) -> None:
        self.broken = False

    def load(self) -> list[dict[str, str]]:
        return []

    def save(self, entries: list[dict[str, str]]) -> None:
        if self.broken:
            raise OSError(28, "No space left on device")


async def test_a_failing_outbox_store_is_an_error_event_not_a_lost_echo() -> None:
    """The store fails when an echo removes the send from the outbox: the send still
    resolves and the message is delivered; the failure is an error event (code storage),
    as in the JS client. A send queued while it fails is written and acknowledged too."""
    store = FailingStore()
    async with FakeServer() as fake:
        client, rec, peer = await joined_client(fake, outbox_store=store)
        sending = asyncio.create_task(client.send("r", "first"))
        frame = await peer.recv("message")
        store.broken = True
        await peer.echo(frame, 1)
        assert (await asyncio.wait_for(sending, TIMEOUT)).id == 1
        await rec.wait_for(lambda: rec.ids("r") == [1], what="the echo as a message")
        second = asyncio.create_task(client.send("r", "second"))
        frame = await peer.recv("message")
        await peer.echo(frame, 2)
        assert (await asyncio.wait_for(second, TIMEOUT)).id == 2 and client.pending == []
        assert {e.code for e in rec.of("error")} == {"storage"}
        await client.close()


async def test_a_cancelled_close_still_ends_what_waits() -> None:
    """close() cancelled while it closes the socket (wait_for(close(), t), a second Ctrl-C):
    the client is closed all the same, and a send waiting for its echo raises ClientClosed
    (it waited for ever: no reconnect was coming to write it again)."""
    async with FakeServer() as fake:
        client, rec, peer = await joined_client(fake)
        sending = asyncio.create_task(client.send("r", "no echo"))
        await peer.recv("message")
        closing = asyncio.create_task(client.close())
        await asyncio.sleep(0)
        closing.cancel()
        with pytest.raises(ClientClosed):
            await asyncio.wait_for(sending, TIMEOUT)
        await asyncio.wait_for(peer.ws.wait_closed(), TIMEOUT)
        await rec.wait_for(lambda: client.state is ConnectionState.DISCONNECTED,
                           what="the disconnected state")
        assert [e.text for e in client.pending] == ["no echo"]  # kept for the next connect
        assert fake.count == 1  # not reconnected


async def test_url_function_is_called_per_attempt() -> None:
    """A URL function picks the server for each connection attempt."""
    async with FakeServer() as a, FakeServer() as b:
        urls = iter([a.url, b.url])
        client = Client(lambda: next(urls), backoff=FAST)
        await client.connect()
        peer = await a.accept()
        await peer.ws.close(1001)
        await b.accept()
        rec = Recorder(client)
        await rec.wait_for(lambda: client.state is ConnectionState.CONNECTED)
        await client.close()


async def test_refused_sends_are_retried_in_order_one_probe_first() -> None:
    """After unavailable, one send probes; the rest follow in their order once it got through."""
    async with FakeServer() as fake:
        client, rec, peer = await joined_client(fake)
        sends = [asyncio.create_task(client.send("r", f"t{i}")) for i in range(3)]
        frames = [await peer.recv("message") for _ in range(3)]
        for frame in frames:
            await peer.send(type="error", id=frame["id"], code="unavailable", message="redis")
        probe = await peer.recv("message")
        assert probe["text"] == "t0"
        assert [p.wire_generation is not None for p in client.pending] == [True, False, False]
        await peer.echo(probe, 1)
        rest = [await peer.recv("message") for _ in range(2)]
        assert [f["text"] for f in rest] == ["t1", "t2"]
        await peer.echo(rest[0], 2)
        await peer.echo(rest[1], 3)
        assert [m.id for m in await asyncio.gather(*sends)] == [1, 2, 3]
        await client.close()


async def test_a_join_refused_unavailable_again_and_again_backs_off() -> None:
    """A store outage refuses a room's joins ``unavailable`` one after another: each retry
    waits longer (the backoff of the refusals in a row, as JS and Rust), and a ``joined``
    starts the count again (before: every retry waited the shortest delay, so every room
    of every client kept asking for as long as the outage lasted)."""
    backoff = Backoff(min_delay=0.02, max_delay=1.0, random=lambda: 1.0)
    expected = [backoff.delay(n) for n in range(5)]  # 0.04, 0.06, 0.1, 0.18, 0.34
    async with FakeServer() as fake:
        client = Client(fake.url, backoff=backoff, request_timeout=TIMEOUT)
        await client.connect()
        peer = await fake.accept()
        loop = asyncio.get_running_loop()
        joining = asyncio.create_task(client.join("r"))
        sent = []
        for _ in range(len(expected)):
            frame = await peer.recv("join")
            sent.append(loop.time())
            await peer.send(type="error", id=frame["id"], code="unavailable", message="redis")
        await peer.joined()
        sent.append(loop.time())
        await asyncio.wait_for(joining, TIMEOUT)
        gaps = [b - a for a, b in itertools.pairwise(sent)]
        # A wait is never shorter than its delay (a loaded machine only makes it longer).
        assert all(gap >= want - 0.005 for gap, want in zip(gaps, expected, strict=True)), (
            gaps, expected)
        assert client._rooms["r"].join_refusals == 0
        await client.close()


async def test_a_server_that_started_afresh_is_followed_after_recovery_failed() -> None:
    """A restarted memory server numbers from 1 again: after recovered: false, 1 is delivered."""
    async with FakeServer() as fake:
        client, rec, peer = await dropped_after_one(fake, last_id=41)
        # What the server answers for a since it never issued:
        assert (await peer.joined(last_id=42, recovered=False))["since"] == 42
        sending = asyncio.create_task(client.send("r", "after the restart"))
        frame = await peer.recv("message")  # not held back: nothing is being replayed
        await peer.echo(frame, 1)
        await peer.message(2)
        await rec.wait_for(lambda: rec.ids("r")[-1:] == [2])
        assert rec.ids("r") == [42, 1, 2] and (await sending).id == 1
        assert len(rec.of("recovery_failed")) == 1
        await client.close()


async def test_refused_token_retries_only_with_get_token() -> None:
    """HTTP 401 on the upgrade stops a static-token client; get_token is asked again instead."""
    tokens: list[str] = []

    def refuse_first(ws: ServerConnection, request: Any) -> Any:
        auth = request.headers.get("Authorization", "")
        tokens.append(auth)
        return ws.respond(401, "bad token\n") if auth.endswith("t1") or auth.endswith("old") else None

    async with FakeServer(refuse_first) as fake:
        static = client_for(fake, token="old")
        with pytest.raises(ClientClosed) as err:
            await static.connect()
        assert err.value.close_code == 401 and static.state is ConnectionState.DISCONNECTED
        counter = iter(range(1, 10))
        refreshing = client_for(fake, get_token=lambda: f"t{next(counter)}")
        await refreshing.connect()
        assert tokens[-2:] == ["Bearer t1", "Bearer t2"]
        await refreshing.close()


def _jwt(exp: float) -> str:
    import base64
    body = base64.urlsafe_b64encode(json.dumps({"sub": "a", "exp": exp}).encode())
    return f"h.{body.rstrip(b'=').decode()}.s"


async def test_a_token_already_expired_on_our_clock_is_not_refreshed_in_a_loop() -> None:
    """get_token gives a token whose exp is past on the client's clock (a clock ahead of the
    server's, whose leeway still takes it): the refresh delay was 0, and each refresh got
    such a token again, so auth went out in a tight loop. It is at least a second now, and
    grows while the fresh tokens are no better."""
    import time
    async with FakeServer() as fake:
        client = client_for(fake, get_token=lambda: _jwt(time.time() - 30))
        await client.connect()
        peer = await fake.accept()
        auths = 0

        async def answer() -> None:
            nonlocal auths
            while True:
                frame = await peer.recv("auth")
                auths += 1
                await peer.send(type="welcome", id=frame["id"], user_id="u1",
                                username="alice", authenticated=True)

        answering = asyncio.create_task(answer())
        await asyncio.sleep(1.5)
        answering.cancel()
        assert 0 < auths <= 2, f"{auths} auth requests in 1.5 s"
        await client.close()


async def test_join_refused_and_leave_fail_what_waits_with_a_code() -> None:
    """A refused join raises the server's code; leave fails the room's queued sends."""
    async with FakeServer() as fake:
        client, rec, peer = await joined_client(fake)
        await peer.refuse("join", "too_many_rooms", asyncio.create_task(client.join("bad")))
        assert "bad" not in client.rooms
        await peer.ws.close(1001)
        peer = await fake.accept()
        await peer.recv("join")  # the re-join, left unanswered: sends to "r" wait
        waiting = asyncio.create_task(client.send("r", "never sent"))
        await asyncio.sleep(0)
        leaving = asyncio.create_task(client.leave("r"))
        with pytest.raises(ChatError) as err:
            await waiting
        assert err.value.code == "not_in_room" and client.pending == []
        left = await peer.recv("leave")
        await peer.send(type="left", id=left["id"], room="r")
        await leaving
        assert [c.new for c in rec.of("room_state")][-1] is RoomState.LEFT
        await client.close()


async def test_a_join_refused_rate_limited_with_no_wait_goes_again_after_the_floor() -> None:
    """retry_after_ms 0 (a proxy's, never the server's) holds the join for JOIN_RETRY_FLOOR
    (50 ms), as in the JS and Rust clients; it was taken for none, and the join waited 1 s."""
    async with FakeServer() as fake:
        client, rec, peer = await joined_client(fake)
        joining = asyncio.create_task(client.join("b"))
        join = await peer.recv("join")
        loop = asyncio.get_running_loop()
        refused_at = loop.time()
        await peer.send(type="error", id=join["id"], code="rate_limited", message="slow down",
                        retry_after_ms=0)
        again = await peer.recv("join")
        assert again["room"] == "b"
        assert loop.time() - refused_at < 0.5
        await peer.send(type="joined", id=again["id"], room="b", users=[], last_id=0)
        await joining
        await client.close()


async def test_a_send_without_echo_is_written_again_on_the_same_connection() -> None:
    """No echo within ack_timeout: the same client_msg_id goes out again; one echo resolves it."""
    async with FakeServer() as fake:
        client, rec, peer = await joined_client(fake, ack_timeout=0.2)
        sending = asyncio.create_task(client.send("r", "lost echo"))
        first = await peer.recv("message")  # stored, but its echo never comes
        again = await peer.recv("message")
        assert again["client_msg_id"] == first["client_msg_id"] and again["id"] != first["id"]
        await peer.echo(again, 1)
        assert (await sending).id == 1 and fake.count == 1
        await client.close()


async def test_a_late_refusal_of_a_send_written_again_is_no_error_event() -> None:
    """No echo within ack_timeout: the send is written again; the server's late answer to
    the first write (here rate_limited) is not news, as in the JS client: the second write
    is answered on its own, and the app gets no error event for a send that went through."""
    async with FakeServer() as fake:
        client, rec, peer = await joined_client(fake, ack_timeout=0.2)
        sending = asyncio.create_task(client.send("r", "slow"))
        first = await peer.recv("message")
        again = await peer.recv("message")
        await peer.send(type="error", id=first["id"], code="rate_limited", message="slow down",
                        retry_after_ms=10)
        await peer.echo(again, 1)
        assert (await sending).id == 1
        await peer.message(2)
        await rec.wait_for(lambda: rec.ids("r") == [1, 2], what="the next message")
        assert rec.of("error") == []
        await client.close()


async def test_a_kick_removes_the_room_for_good_and_mutes_are_events() -> None:
    """A server-sent left (kick) drops the room: its sends fail, no re-join after a reconnect."""
    async with FakeServer() as fake:
        client, rec, peer = await joined_client(fake)
        removed: list[Any] = []
        client.on("removed", removed.append)
        client.on("muted", removed.append)
        await peer.send(type="muted", room="r", until=None, by="mod")
        sending = asyncio.create_task(client.send("r", "muted?"))
        frame = await peer.recv("message")
        await peer.send(type="error", id=frame["id"], code="muted", message="muted", until=None)
        with pytest.raises(ChatError) as err:
            await sending
        assert err.value.code == "muted" and "until" in err.value.details
        await peer.send(type="left", room="r", reason="kicked", by="mod")
        await Recorder(client).wait_for(lambda: len(removed) == 2, what="the kick")
        assert [type(e).__name__ for e in removed] == ["Muted", "Removed"]
        assert (removed[1].room, removed[1].reason, removed[1].by) == ("r", "kicked", "mod")
        assert "r" not in client.rooms
        with pytest.raises(ChatError):
            await client.send("r", "after the kick")
        peer = await fake.drop(peer)
        probe = asyncio.create_task(client.history("other"))
        assert (await peer.recv())["type"] == "history"  # no join for "r" came first
        probe.cancel()
        await client.close()


async def test_a_kick_settles_the_sends_on_the_wire_by_their_answer() -> None:
    """left (kicked) while sends are on the wire: the server's answer settles each, as in
    the JS and Rust clients: an echo after the left resolves the send (the server stored
    it), a refusal fails it; one not yet written fails at once with the reason."""
    async with FakeServer() as fake:
        client, rec, peer = await joined_client(fake, max_in_flight=2)
        sends = [asyncio.create_task(client.send("r", f"t{i}")) for i in range(3)]
        first, second = await peer.recv("message"), await peer.recv("message")
        await peer.send(type="left", room="r", reason="kicked", by="mod")
        with pytest.raises(ChatError) as err:
            await sends[2]  # never written
        assert err.value.code == "kicked"
        await peer.echo(first, 1)
        await peer.send(type="error", id=second["id"], code="not_in_room", message="no")
        results = await asyncio.gather(sends[0], sends[1], return_exceptions=True)
        assert getattr(results[0], "id", results[0]) == 1, "a send the server stored failed"
        assert getattr(results[1], "code", results[1]) == "not_in_room"
        assert client.pending == [] and [m.id for m in rec.of("ack")] == [1]
        await client.close()


async def test_a_kicked_rooms_send_without_an_answer_fails_after_ack_timeout() -> None:
    """A send on the wire when the room was removed gets no answer: it is not written
    again (the room is not ours), and fails with the removal's reason after ack_timeout."""
    async with FakeServer() as fake:
        client, rec, peer = await joined_client(fake, ack_timeout=0.2)
        sending = asyncio.create_task(client.send("r", "unanswered"))
        await peer.recv("message")
        await peer.send(type="left", room="r", reason="banned", by="mod")
        with pytest.raises(ChatError) as err:
            await asyncio.wait_for(sending, TIMEOUT)
        assert err.value.code == "banned" and "may have been stored" in err.value.message
        assert client.pending == []
        probe = asyncio.create_task(client.ping())
        assert (await peer.recv())["type"] == "ping", "the send was written again"
        probe.cancel()
        await client.close()


async def test_sends_go_out_after_recovered_false_without_a_replay() -> None:
    """recovered: false and nothing replayed (a since too far back): the held send goes out
    once the server answered the ping behind the joined, without a new message."""
    async with FakeServer() as fake:
        client, rec, peer = await dropped_after_one(fake, last_id=3)
        sending = asyncio.create_task(client.send("r", "after the outage"))
        await peer.joined(last_id=2000, recovered=False)  # no replay follows
        frame = await peer.recv_answering_pings(
            "message", "the send stayed in the outbox after recovered: false")
        await peer.echo(frame, 2001)
        assert (await sending).id == 2001 and client.pending == []
        assert rec.ids("r") == [4, 2001] and len(rec.of("recovery_failed")) == 1
        await client.close()


async def test_sends_wait_for_a_partial_replay_after_recovered_false() -> None:
    """recovered: false with what the server still holds replayed: sends wait for its end."""
    async with FakeServer() as fake:
        client, rec, peer = await dropped_after_one(fake, last_id=3)
        sending = asyncio.create_task(client.send("r", "after the replay"))
        await peer.joined(last_id=12, recovered=False)
        sync = await peer.recv()
        assert sync["type"] == "ping"  # left unanswered: the replay itself ends the wait
        await peer.message(11)
        probe = asyncio.create_task(client.ping())
        assert (await peer.recv())["type"] == "ping", "a send went out in the middle of the replay"
        probe.cancel()
        await peer.message(12)
        frame = await peer.recv("message")
        await peer.echo(frame, 13)
        assert (await sending).id == 13 and rec.ids("r") == [4, 11, 12, 13]
        await client.close()


async def test_a_live_message_past_the_replay_releases_the_sends() -> None:
    """After recovered: false a live id above the joined's last_id means nothing more is
    replayed: the held sends go, even if the ping behind the joined is not answered yet."""
    async with FakeServer() as fake:
        client, rec, peer = await dropped_after_one(fake, last_id=3)
        sending = asyncio.create_task(client.send("r", "after the outage"))
        await peer.joined(last_id=2000, recovered=False)
        await peer.message(2001)  # live, from someone else
        try:
            frame = await peer.recv("message")  # the ping behind the joined is skipped
        except TimeoutError:
            raise AssertionError("message 2001 did not release the held send") from None
        await peer.echo(frame, 2002)
        assert (await sending).id == 2002 and rec.ids("r") == [4, 2001, 2002]
        await client.close()


async def test_a_refused_sync_ping_holds_the_other_requests_back_for_its_retry_after() -> None:
    """The ping behind a joined refused rate_limited (the request bucket ran dry at this
    join) still ends the replay, and holds the other requests back for its retry_after_ms,
    as a refusal of one of them does (the bucket is theirs), as in the JS and Rust clients:
    the next request went out at once, into the empty bucket."""
    async with FakeServer() as fake:
        client = client_for(fake)
        rec = Recorder(client)
        await client.connect()
        peer = await fake.accept()
        joining = asyncio.create_task(client.join("r", since=5))
        await peer.joined(last_id=10, recovered=False)  # the replay's end is not known
        await joining
        sending = asyncio.create_task(client.send("r", "after the replay"))
        sync = await peer.recv()
        assert sync["type"] == "ping", sync
        loop = asyncio.get_running_loop()
        refused_at = loop.time()
        await peer.send(type="error", id=sync["id"], code="rate_limited", message="slow",
                        retry_after_ms=300)
        frame = await peer.recv("message")  # the refusal ended the replay: the send goes
        await peer.echo(frame, 11)
        await sending
        reading = asyncio.create_task(client.list_users("r"))
        read = await peer.recv("list_users")
        waited = loop.time() - refused_at
        assert waited >= 0.29, f"the read went {waited:.3f} s after the refusal"
        await peer.send(type="users", id=read["id"], room="r", users=[])
        assert await reading == []
        assert not rec.of("error"), "the ping's refusal is the client's own business"
        await client.close()


class OneTokenBucket:
    """A user's token bucket on a fake server, as the real server's: empty at the first
    charge, one token per ``token`` seconds, holding one at most. ``refused``: the types of
    the frames it refused, in order."""

    def __init__(self, token: float) -> None:
        self.token = token
        self.tokens = 0.0
        self.stamp: float | None = None
        self.refused: list[str] = []

    async def charge(self, peer: Peer, frame: dict[str, Any]) -> bool:
        """Spend a token for ``frame``; without one, refuse it ``rate_limited`` with the
        bucket's ``retry_after_ms`` and return False."""
        now = asyncio.get_running_loop().time()
        if self.stamp is not None:
            self.tokens = min(1.0, self.tokens + (now - self.stamp) / self.token)
        self.stamp = now
        if self.tokens < 1 - 1e-9:
            self.refused.append(frame["type"])
            retry = math.ceil((1 - self.tokens) * self.token * 1000)
            await peer.send(type="error", id=frame["id"], code="rate_limited",
                            message="slow", retry_after_ms=retry)
            return False
        self.tokens -= 1
        return True


async def test_the_sync_ping_spends_a_token_of_the_pace_the_request_pacer_learnt() -> None:
    """The ping behind a joined is charged to the request bucket: once a refusal has taught
    the request pacer the pace, it counts the ping's token (the ping still written at once),
    so the next request waits for the refill, as in the JS and Rust clients. Not counted, the
    pacer reckoned one token more than the server had, and the read went at once, refused."""
    token = 0.4  # seconds a token of the server's request bucket, which holds one at most
    bucket = OneTokenBucket(token)
    refused = bucket.refused

    async def serve(peer: Peer) -> None:
        """The user's request bucket, empty at the first read: the pings and the reads spend
        it, as on the real server (the joins too there, but they are the join pacer's: not
        here). A join's replay has no known end (recovered false): a ping goes behind it."""
        while True:
            frame = await peer.recv()
            if frame["type"] == "join":
                await peer.send(type="joined", id=frame["id"], room=frame["room"], users=[],
                                last_id=frame["since"] + 5, recovered=False)
                continue
            if not await bucket.charge(peer, frame):
                continue
            if frame["type"] == "ping":
                await peer.send(type="pong", id=frame["id"])
            else:
                await peer.send(type="users", id=frame["id"], room=frame["room"], users=[])

    async with FakeServer() as fake:
        client = client_for(fake, max_requests_in_flight=1)  # a window, and a pacer, of one
        await client.connect()
        server = asyncio.create_task(serve(await fake.accept()))
        try:
            assert await asyncio.wait_for(client.list_users("r"), TIMEOUT) == []
            assert refused == ["list_users"], "the refusal the pace is learnt from"
            await asyncio.sleep(2 * token)  # both buckets fill up again: no event to await
            await client.join("r", since=5)  # its ping, written at once, spends that token
            assert await asyncio.wait_for(client.list_users("r"), TIMEOUT) == []
            assert refused == ["list_users"], "the read after the ping waited for the refill"
        finally:
            server.cancel()
            await client.close()


async def test_the_join_and_request_pacers_count_each_others_writes_in_one_bucket() -> None:
    """The server charges joins, pings and requests to one bucket per user: once refusals have
    taught the two pacers the pace, each counts the other's writes (with no place in its
    window), so a read right after a join, and a join right after a read, wait for the refill,
    as in the JS and Rust clients. Not counted, each pacer reckoned the token the other had
    spent as still there, and the second write went at once, refused."""
    token = 0.4  # seconds a token of the user's one bucket, which holds one at most
    bucket = OneTokenBucket(token)
    refused = bucket.refused

    async def serve(peer: Peer) -> None:
        """The user's bucket, empty at the first charge: joins, pings and reads spend it, as
        on the real server (RATE_LIMIT_REQUESTS)."""
        while True:
            frame = await peer.recv()
            if not await bucket.charge(peer, frame):
                continue
            if frame["type"] == "join":  # a first join: no replay, no ping behind it
                await peer.send(type="joined", id=frame["id"], room=frame["room"], users=[],
                                last_id=0)
            elif frame["type"] == "ping":
                await peer.send(type="pong", id=frame["id"])
            else:
                await peer.send(type="users", id=frame["id"], room=frame["room"], users=[])

    async with FakeServer() as fake:
        # Windows, and pacers' buckets, of one.
        client = client_for(fake, max_requests_in_flight=1, max_joins_in_flight=1)
        await client.connect()
        server = asyncio.create_task(serve(await fake.accept()))
        try:
            # The refusals the two paces are learnt from: the read's (the bucket empty), then
            # the join's, written right behind the read written again (which took the token).
            assert await asyncio.wait_for(client.list_users("a"), TIMEOUT) == []
            await asyncio.wait_for(client.join("a"), TIMEOUT)
            learnt = ["list_users", "join"]
            assert refused == learnt, "the refusals the paces are learnt from"
            await asyncio.sleep(2 * token)  # the buckets fill up again: no event to await
            await asyncio.wait_for(client.join("b"), TIMEOUT)
            assert await asyncio.wait_for(client.list_users("b"), TIMEOUT) == []
            assert refused == learnt, "the read after the join waited for the refill"
            await asyncio.sleep(2 * token)
            assert await asyncio.wait_for(client.list_users("b"), TIMEOUT) == []
            await asyncio.wait_for(client.join("c"), TIMEOUT)
            assert refused == learnt, "the join after the read waited for the refill"
        finally:
            server.cancel()
            await client.close()


async def test_leave_settles_the_sends_on_the_wire_before_leaving() -> None:
    """leave(): a send on the wire resolves with its echo, and the leave goes after it; a
    retryable refusal fails it with not_in_room (no retry); one not yet written fails at once."""
    async with FakeServer() as fake:
        client, rec, peer = await joined_client(fake, max_in_flight=2)
        sends = [asyncio.create_task(client.send("r", f"t{i}")) for i in range(3)]
        first, second = await peer.recv("message"), await peer.recv("message")
        leaving = asyncio.create_task(client.leave("r"))
        with pytest.raises(ChatError) as err:
            await sends[2]  # never written
        assert err.value.code == "not_in_room"
        probe = asyncio.create_task(client.ping())
        assert (await peer.recv())["type"] == "ping", "the leave went out before the echoes"
        probe.cancel()
        await peer.echo(first, 1)
        await peer.send(type="error", id=second["id"], code="rate_limited", message="slow down",
                        retry_after_ms=50)
        results = await asyncio.gather(sends[0], sends[1], return_exceptions=True)
        assert getattr(results[0], "id", results[0]) == 1, "a send the server stored failed"
        assert getattr(results[1], "code", results[1]) == "not_in_room"
        left = await peer.recv("leave")
        await peer.send(type="left", id=left["id"], room="r")
        await leaving
        assert client.pending == [] and [m.id for m in rec.of("ack")] == [1]
        await client.close()


async def test_a_cancelled_leave_still_leaves_on_the_server() -> None:
    """leave() cancelled while it waits for the room's send on the wire: the room is gone
    for the app, so the leave still goes to the server after the echo (the server kept
    the user in the room, its member count and presence, and sent it every message)."""
    async with FakeServer() as fake:
        client, rec, peer = await joined_client(fake)
        sending = asyncio.create_task(client.send("r", "on the wire"))
        frame = await peer.recv("message")
        leaving = asyncio.create_task(client.leave("r"))
        await asyncio.sleep(0)
        leaving.cancel()
        await peer.echo(frame, 1)
        assert (await sending).id == 1
        probe = asyncio.create_task(client.ping())
        after = await peer.recv()
        assert after["type"] == "leave", "the cancelled leave was never written"
        await peer.send(type="left", id=after["id"], room="r")
        probe.cancel()
        assert "r" not in client.rooms
        await client.close()


async def test_a_join_while_leaving_keeps_the_room_joined_on_the_server() -> None:
    """join() again while leave() waits for the room's sends on the wire: the leave was
    written after them, so the server got join then leave and the room, joined for the
    app, got nothing more. The leave is not written once the room is wanted again."""
    async with FakeServer() as fake:
        client, rec, peer = await joined_client(fake)
        sending = asyncio.create_task(client.send("r", "on the wire"))
        frame = await peer.recv("message")
        leaving = asyncio.create_task(client.leave("r"))
        await asyncio.sleep(0)
        joining = asyncio.create_task(client.join("r"))
        await peer.joined(last_id=0)
        await joining
        await peer.echo(frame, 1)
        assert (await sending).id == 1
        probe = asyncio.create_task(client.ping())
        after = await peer.recv()
        assert after["type"] == "ping", f"{after['type']} written after the re-join"
        await peer.send(type="pong", id=after["id"])
        await probe
        await asyncio.wait_for(leaving, TIMEOUT)
        assert client.rooms["r"].state is RoomState.JOINED
        await peer.message(2)
        await rec.wait_for(lambda: 2 in rec.ids("r"), what="a message after the re-join")
        await client.close()


@pytest.mark.parametrize("waits", ["window", "rate_limited", "unavailable"])
async def test_a_leave_of_a_room_whose_join_is_not_written_writes_no_leave(waits: str) -> None:
    """leave() of a room whose join still waits for the join pacer (its window full, or
    paused after rate_limited) or for its retry (unavailable): that join is never written,
    the join() awaiting it raises not_in_room, and the leave completes without a frame, as
    in the JS and Rust clients. A leave was written: the server, which never had the user in
    the room, answered not_in_room, for a token of the request bucket and a round trip."""
    async with FakeServer() as fake:
        client, rec, peer = await joined_client(fake, max_joins_in_flight=1)
        if waits == "window":
            held = asyncio.create_task(client.join("a"))
            held_join = await peer.recv("join")  # on the wire, unanswered: the window is full
        joining = asyncio.create_task(client.join("b"))
        if waits != "window":
            refused = await peer.recv("join")
            await peer.send(type="error", id=refused["id"], code=waits, message="later",
                            retry_after_ms=60_000)
        assert await _round_trip(client, peer) == []  # b's join waits (refusal taken)
        leaving = asyncio.create_task(client.leave("b"))
        with pytest.raises(ChatError) as err:
            await asyncio.wait_for(joining, TIMEOUT)
        assert err.value.code == "not_in_room"
        assert await _round_trip(client, peer) == [], "a leave of a room never joined"
        await asyncio.wait_for(leaving, TIMEOUT)
        assert "b" not in client.rooms and rec.of("error") == []
        assert [c.new for c in rec.of("room_state") if c.room == "b"] == [
            RoomState.JOINING, RoomState.LEFT]
        if waits == "window":
            # Joined again: one join of b, when the window frees a place, never the old one.
            again = asyncio.create_task(client.join("b"))
            await peer.send(type="joined", id=held_join["id"], room="a", users=[], last_id=0)
            await asyncio.wait_for(held, TIMEOUT)
            await peer.joined("b")
            await asyncio.wait_for(again, TIMEOUT)
            assert await _round_trip(client, peer) == [], "b's first join written after all"
        await client.close()


async def test_a_late_answer_to_a_leave_that_timed_out_is_no_removal() -> None:
    """leave() timed out, then join() again: the server's left answering that leave (it has
    the leave's id) comes before the joined. It is no kick: the room stays joined."""
    async with FakeServer() as fake:
        client, rec, peer = await joined_client(fake)
        removed: list[Any] = []
        client.on("removed", removed.append)
        with pytest.raises(RequestTimeout):
            await client.leave("r", timeout=0.1)
        leave = await peer.recv("leave")
        joining = asyncio.create_task(client.join("r"))
        join = await peer.recv("join")
        await peer.send(type="left", id=leave["id"], room="r")
        await peer.send(type="joined", id=join["id"], room="r", users=[], last_id=0)
        await asyncio.wait_for(joining, TIMEOUT)
        assert removed == [] and client.rooms["r"].state is RoomState.JOINED
        await peer.message(1)
        await rec.wait_for(lambda: rec.ids("r") == [1], what="a message after the re-join")
        await client.close()


async def test_rate_limited_pauses_every_send() -> None:
    """The rate limit is the user's: after rate_limited no send goes out, to any target,
    before retry_after_ms; then the refused one goes first."""
    async with FakeServer() as fake:
        client, rec, peer = await joined_client(fake, max_in_flight=1)
        sending = asyncio.create_task(client.send("r", "refused"))
        dm = asyncio.create_task(client.dm("u2", "to someone else"))
        frame = await peer.recv("message")
        loop = asyncio.get_running_loop()
        refused_at = loop.time()
        await peer.send(type="error", id=frame["id"], code="rate_limited", message="slow down",
                        retry_after_ms=300)
        again = await peer.recv()
        waited = loop.time() - refused_at
        assert again.get("client_msg_id") == frame["client_msg_id"], (
            f"{again['type']} {again.get('text')!r} went out {waited:.3f} s after rate_limited")
        assert waited >= 0.3
        await peer.echo(again, 1)
        direct = await peer.recv("dm")
        await peer.send(type="dm", id=1, to="u2", text=direct["text"], user_id="u1",
                        timestamp=0, client_msg_id=direct["client_msg_id"], **{"from": "alice"})
        assert (await sending).id == 1 and (await dm).id == 1
        await client.close()


async def test_leave_says_a_send_written_before_a_lost_connection_may_be_stored() -> None:
    """leave() while a send written on a lost connection awaits its resend: it fails with
    not_in_room, saying the server may have stored it (its echo was lost with the socket)."""
    async with FakeServer() as fake:
        client, rec, peer, sending, frame = await sent_then_dropped(fake)
        await peer.recv("join")  # the re-join, left unanswered: the send waits
        leaving = asyncio.create_task(client.leave("r"))
        with pytest.raises(ChatError) as err:
            await sending
        assert err.value.code == "not_in_room" and "may have been stored" in str(err.value)
        left = await peer.recv("leave")
        await peer.send(type="left", id=left["id"], room="r")
        await leaving
        assert client.pending == []
        await client.close()


async def test_history_before_is_held_to_the_servers_rule() -> None:
    """``before`` counts only as a whole number >= 1 and at most 2**53 - 1 (the server's rule:
    ``wire_id``, the rule for ids off the wire, without 0; 5.0 is 5, written as 5): anything
    else raises ``ChatError("invalid_message")`` at once and writes nothing; None is no
    ``before``."""
    await _history_argument_is_held_to_the_servers_rule(
        "before",
        [0, -0.0, 0.0, "5", "", -1, -0.5, 2.5, float("nan"), float("inf"), 2**53, 10**30,
         True, False, [5], {}],
        [(1, 1), (7, 7), (2**53 - 1, 2**53 - 1), (5.0, 5), (None, None)])


async def test_history_limit_is_held_to_the_servers_rule() -> None:
    """``limit`` counts only as a whole number >= 1 and at most 2**53 - 1, the server's rule
    (5.0 is 5, written as 5; the server serves at most HISTORY_SIZE whatever the limit):
    anything else raises ``ChatError("invalid_message")`` at once and writes nothing; None is
    no ``limit`` (the server's default, 50)."""
    await _history_argument_is_held_to_the_servers_rule(
        "limit",
        ["5", "", 0, -0.0, -1, 0.5, 2.5, float("nan"), float("inf"), 2**53, 10**30,
         True, False, [5], {}],
        [(1, 1), (50, 50), (1000, 1000), (2**53 - 1, 2**53 - 1), (5.0, 5), (None, None)])


async def _history_argument_is_held_to_the_servers_rule(
        name: str, refused: list[Any], written: list[tuple[Any, Any]]) -> None:
    """``history(room, **{name: value})``: each of ``refused`` raises ``invalid_message``
    naming the argument and writes nothing; each ``(value, want)`` of ``written`` goes out
    as ``want`` (None: no such field)."""
    async with FakeServer() as fake:
        client, _, peer = await joined_client(fake)
        wrong = []
        for value in refused:
            try:
                await client.history("r", timeout=0.2, **{name: value})
                wrong.append(f"{value!r}: answered")
            except ChatError as exc:
                if exc.code != "invalid_message" or name not in str(exc):
                    wrong.append(f"{value!r}: {type(exc).__name__} {exc.code} {exc}")
        assert wrong == []
        for value, want in written:
            reading = asyncio.create_task(client.history("r", **{name: value}))
            frame = await peer.recv()  # the first frame written since: nothing of the above
            assert frame["type"] == "history" and frame.get(name) == want, (value, frame)
            assert type(frame.get(name)) is type(want), (value, frame)
            assert (name in frame) == (want is not None), (value, frame)
            await peer.send(type="history", id=frame["id"], room="r", messages=[])
            assert await asyncio.wait_for(reading, TIMEOUT) == []
        await client.close()


async def test_history_page_carries_the_servers_truncated_only_the_json_true() -> None:
    """``history_page`` answers the messages with the server's ``truncated`` (older messages
    left out for the reply's byte bound), True only for the JSON ``true``, as ``recovered``
    is read; ``history`` is the page's messages."""
    message = {"type": "message", "id": 7, "room": "r", "from": "ann", "user_id": "ann",
               "text": "big", "timestamp": 1}
    async with FakeServer() as fake:
        client, _, peer = await joined_client(fake)

        async def answered(call: Any, **extra: Any) -> Any:
            reading = asyncio.create_task(call)
            frame = await peer.recv("history")
            await peer.send(type="history", id=frame["id"], room="r", messages=[message],
                            **extra)
            return await asyncio.wait_for(reading, TIMEOUT), frame

        page, frame = await answered(client.history_page("r", limit=3, before=8), truncated=True)
        assert frame["limit"] == 3 and frame["before"] == 8
        assert page == HistoryPage([Message.from_wire(message)], True)
        page, _ = await answered(client.history_page("r"))
        assert page.truncated is False and [m.id for m in page.messages] == [7]
        for odd in ("true", 1, "yes", None, False, {}, [True]):
            page, _ = await answered(client.history_page("r"), truncated=odd)
            assert page.truncated is False, odd
        messages, _ = await answered(client.history("r", limit=3), truncated=True)
        assert messages == [Message.from_wire(message)]
        with pytest.raises(ChatError) as err:
            await client.history_page("r", before=0)
        assert err.value.code == "invalid_message"
        with pytest.raises(dataclasses.FrozenInstanceError):
            page.truncated = True  # type: ignore[misc]
        await client.close()


async def test_reads_cut_off_by_a_disconnect_are_asked_again() -> None:
    """history, list_users and ping written when the connection drops change nothing on
    the server: each is asked again on the next connection and answered there."""
    async with FakeServer() as fake:
        client, _, peer = await joined_client(fake)
        reading = asyncio.gather(client.history("r", limit=5), client.list_users("r"),
                                 client.ping())
        for kind in ("history", "list_users", "ping"):
            await peer.recv(kind)
        peer = await fake.drop(peer)
        await peer.joined()
        asked = {}
        while len(asked) < 3:
            frame = await peer.recv()
            if frame["type"] in ("history", "list_users", "ping"):
                asked[frame["type"]] = frame["id"]
        await peer.send(type="history", id=asked["history"], room="r", messages=[])
        await peer.send(type="users", id=asked["list_users"], room="r", users=[])
        await peer.send(type="pong", id=asked["ping"])
        history, users, _ = await asyncio.wait_for(reading, TIMEOUT)
        assert history == [] and users == []
        await client.close()


async def test_a_moderation_request_cut_off_by_a_disconnect_fails_and_is_not_resent() -> None:
    """A mute written when the connection drops may or may not have been done: it fails
    with Disconnected and is not written again on the next connection."""
    async with FakeServer() as fake:
        client, _, peer = await joined_client(fake)
        muting = asyncio.create_task(client.mute("r", "u2", duration=60))
        await peer.recv("mute")
        peer = await fake.drop(peer)
        with pytest.raises(Disconnected):
            await asyncio.wait_for(muting, TIMEOUT)
        probe = asyncio.create_task(client.ping())
        kinds = []
        while not kinds or kinds[-1] != "ping":
            kinds.append((await peer.recv())["type"])
        assert "mute" not in kinds, f"written again after the reconnect: {kinds}"
        probe.cancel()
        await client.close()


RETRY_AFTER_MS_CASES = json.loads(
    (Path(__file__).parents[2] / "conformance" / "retry-after-ms.json").read_text())


@pytest.mark.parametrize(("text", "wait"), RETRY_AFTER_MS_CASES["cases"],
                         ids=[text[:24] for text, _ in RETRY_AFTER_MS_CASES["cases"]])
def test_retry_after_ms_reads_as_in_the_js_and_rust_clients(text: str, wait: int | None) -> None:
    """The three client libraries read an error's retry_after_ms by one rule (the shared
    cases, clients/conformance/retry-after-ms.json): a finite JSON number >= 0, rounded up
    to whole ms, capped at a day; anything else ("5", true, -5, 1e400) is none."""
    # here: a library without them fails this test
    from wschat_client.client import _loads, _retry_after_ms
    got = _retry_after_ms(_loads(text))
    assert got == wait and type(got) is type(wait), (text[:40], got)


def _error_frame(rid: Any, code: str, retry_after_ms: str) -> str:
    """An error event with ``retry_after_ms`` as raw JSON text (``1e400``, ``"5"``), as a
    buggy server or a proxy could send it."""
    return (f'{{"type": "error", "id": {json.dumps(rid)}, "code": "{code}", '
            f'"message": "slow down", "retry_after_ms": {retry_after_ms}}}')


async def test_retry_after_ms_off_the_wire_follows_the_shared_cases() -> None:
    """Every shared case, sent by the server: the ChatError's retry_after_ms is the rule's."""
    async with FakeServer() as fake:
        client, rec, peer = await joined_client(fake)
        wrong = []
        for text, wait in RETRY_AFTER_MS_CASES["cases"]:
            request = asyncio.create_task(client.history("r"))
            frame = await peer.recv("history")
            await peer.ws.send(_error_frame(frame["id"], "invalid_room", text))
            try:
                await request
            except ChatError as err:
                if err.code != "invalid_room" or err.retry_after_ms != wait:
                    wrong.append((text[:40], err.code, err.retry_after_ms, wait))
        assert wrong == []
        await client.close()


async def test_a_hostile_retry_after_ms_is_no_wait_and_the_reader_survives() -> None:
    """rate_limited with a retry_after_ms that is not a finite number >= 0 is taken as
    none: the send backs off and goes again on the same connection. A string ("5") used
    to raise TypeError in the reader (`/ 1000`); 1e400 and Infinity (json.loads reads
    both as inf) paused every send for ever."""
    async with FakeServer() as fake:
        client, rec, peer = await joined_client(fake)
        sending = asyncio.create_task(client.send("r", "hi"))
        frame = await peer.recv("message")
        for raw in ('"5"', "1e400", "Infinity", "-5", "true"):
            await peer.ws.send(_error_frame(frame["id"], "rate_limited", raw))
            try:
                again = await peer.recv("message")
            except TimeoutError:
                raise AssertionError(f"not resent after retry_after_ms {raw}") from None
            assert again["client_msg_id"] == frame["client_msg_id"], raw
            frame = again
        await peer.echo(frame, 1)
        assert (await asyncio.wait_for(sending, TIMEOUT)).id == 1
        assert fake.count == 1, "the connection was lost"
        await client.close()


HEARTBEAT_INTERVAL_CASES = json.loads(
    (Path(__file__).parents[2] / "conformance" / "heartbeat-interval.json").read_text())


@pytest.mark.parametrize(("text", "seconds"), HEARTBEAT_INTERVAL_CASES["cases"],
                         ids=[text[:24] for text, _ in HEARTBEAT_INTERVAL_CASES["cases"]])
def test_heartbeat_interval_reads_as_in_the_js_and_rust_clients(
        text: str, seconds: float | None) -> None:
    """The three client libraries read a welcome's heartbeat_interval by one rule (the shared
    cases, clients/conformance/heartbeat-interval.json): a finite JSON number > 0, floored at
    a second, capped at a day; anything else ("30", true, 0, -1, 1e400) is none."""
    # here: a library without them fails this test
    from wschat_client.client import _heartbeat_interval, _loads
    got = _heartbeat_interval(_loads(text))
    assert got == seconds and type(got) is (float if seconds is not None else type(None)), \
        (text[:40], got)


async def test_heartbeat_interval_off_the_wire_follows_the_shared_cases() -> None:
    """Every shared case in the server's welcome: the connected event's Welcome carries the
    rule's interval (None when none), and the client reads on: a join still completes. The
    value used to be handed to the app as it came (a string, inf, -1, 1e20)."""
    async with FakeServer() as fake:
        wrong = []
        for text, seconds in HEARTBEAT_INTERVAL_CASES["cases"]:
            fake.heartbeat_interval = text
            client = client_for(fake)
            rec = Recorder(client)
            await client.connect()
            peer = await fake.accept()
            join = asyncio.create_task(client.join("r"))
            await peer.joined()
            await asyncio.wait_for(join, TIMEOUT)
            got = rec.of("connected")[0].heartbeat_interval
            if got != seconds or type(got) is not (float if seconds is not None else type(None)):
                wrong.append((text[:40], got, seconds))
            await client.close()
        assert wrong == []


LAST_ID_CASES = json.loads(
    (Path(__file__).parents[2] / "conformance" / "last-id.json").read_text())
SHORT = TIMEOUT / 5  # for what comes at once when it comes at all (a failure's wait stays short)


@pytest.mark.parametrize(("text", "want"), LAST_ID_CASES["cases"],
                         ids=[text[:24] for text, _ in LAST_ID_CASES["cases"]])
def test_last_id_reads_as_in_the_js_and_rust_clients(text: str, want: int | None) -> None:
    """The three client libraries read a joined's last_id and a message's id by one rule (the
    shared cases, clients/conformance/last-id.json): a JSON number that is a whole number
    >= 0 and at most 2^53 - 1; anything else ("5", null, true, -1, 2.5, 1e400, 2^53) is none."""
    # here: a library without them fails this test
    from wschat_client.client import _loads, wire_id
    got = wire_id(_loads(text))
    assert got == want and type(got) is type(want), (text[:40], got)


def _raw_joined(rid: Any, room: str, last_id: str | None, **extra: Any) -> str:
    """A joined event with ``last_id`` as raw JSON text (None: absent)."""
    fields = {"type": "joined", "id": rid, "room": room, "users": [], **extra}
    text = json.dumps(fields)
    return text if last_id is None else f'{text[:-1]}, "last_id": {last_id}}}'


def _raw_message(mid: str, room: str = "r", **extra: Any) -> str:
    """A room message with ``id`` as raw JSON text."""
    text = json.dumps({"type": "message", "room": room, "text": f"m{mid[:20]}", "user_id": "u",
                       "timestamp": 0, "from": "x", **extra})
    return f'{text[:-1]}, "id": {mid}}}'


async def _round_trip(client: Client, peer: Peer) -> list[str]:
    """The kinds of the frames the client wrote so far (pings answered): a ``history``
    request written now marks their end, and its answer comes after whatever the server
    sent before."""
    probe = asyncio.create_task(client.history("probe"))
    kinds = []
    while (frame := await peer.recv())["type"] != "history":
        if frame["type"] == "ping":
            await peer.send(type="pong", id=frame["id"])
        kinds.append(frame["type"])
    await peer.send(type="history", id=frame["id"], room="probe", messages=[])
    await probe
    return kinds


async def _join_of(peer: Peer, room: str) -> dict[str, Any]:
    """The client's next join of ``room`` (answering pings, skipping other rooms' joins)."""
    while True:
        frame = await peer.recv_answering_pings("join", f"a join of {room}")
        if frame["room"] == room:
            return frame


async def test_last_id_off_the_wire_follows_the_shared_cases() -> None:
    """Every shared case, sent by the server: as a joined's last_id (the Joined's last_id is
    the id, or 0; the room's position the id, or None), and as the id of the first message
    in a room joined without a last_id (delivered, and the room's position, only when the id
    counts)."""
    async with FakeServer() as fake:
        client = client_for(fake)
        rec = Recorder(client)
        await client.connect()
        peer = await fake.accept()
        wrong = []
        for i, (text, want) in enumerate(LAST_ID_CASES["cases"]):
            label = text[:40]
            joining = asyncio.create_task(client.join(f"j{i}", timeout=SHORT))
            frame = await _join_of(peer, f"j{i}")
            await peer.ws.send(_raw_joined(frame["id"], f"j{i}", text))
            try:
                joined = await joining
                if joined.last_id != (want or 0) or client.rooms[f"j{i}"].last_id != want:
                    wrong.append(f"last_id {label}: Joined {joined.last_id!r}, position "
                                 f"{client.rooms[f'j{i}'].last_id!r}, not {want}")
            except ChatError as err:
                wrong.append(f"last_id {label}: the join failed ({err.code})")
            joining = asyncio.create_task(client.join(f"m{i}", timeout=SHORT))
            frame = await _join_of(peer, f"m{i}")
            await peer.ws.send(_raw_joined(frame["id"], f"m{i}", None))
            await peer.ws.send(_raw_message(text, f"m{i}"))
            await joining
            await _round_trip(client, peer)  # the message came before the history
            got = rec.ids(f"m{i}")
            if got != ([] if want is None else [want]) or client.rooms[f"m{i}"].last_id != want:
                wrong.append(f"message id {label}: delivered {got}, position "
                             f"{client.rooms[f'm{i}'].last_id!r}, not {want}")
        assert not wrong, "\n".join(wrong)
        await client.close()


HOSTILE_LAST_IDS = ['"5"', "null", "1e400", "-1", "2.5", "true", "{}", "9007199254740993",
                    "1" + "0" * 4400, None]  # None: absent


async def test_last_id_unreadable_on_a_first_join_the_next_message_sets_the_position() -> None:
    """A first joined whose last_id is not a whole number >= 0 still completes the join
    (Joined.last_id 0), the room keeps no position, a send goes out at once (nothing to
    replay), and the next messages set the position: 4 and 5 are delivered, one join, and
    the re-join after a drop says since 5. null, 1e400 and {} raised in the reader (the join
    timed out, the room stayed joining); "5" and 2^53+1 made 4 and 5 look seen; -1, 2.5, true
    and an absent last_id (0) took 4 for a gap and joined again."""
    wrong = []
    for raw in HOSTILE_LAST_IDS:
        label = "absent" if raw is None else raw[:20]
        async with FakeServer() as fake:
            client = client_for(fake)
            rec = Recorder(client)
            await client.connect()
            peer = await fake.accept()
            joining = asyncio.create_task(client.join("r", timeout=SHORT))
            frame = await peer.recv("join")
            await peer.ws.send(_raw_joined(frame["id"], "r", raw))
            got: dict[str, Any] = {}
            try:
                got["joined"] = (await joining).last_id
            except ChatError as err:
                got["joined"] = err.code
            sending = asyncio.create_task(client.send("r", "mine"))
            try:
                mine = await asyncio.wait_for(peer.recv("message"), SHORT)
                await peer.echo(mine, 4)
                await peer.message(5)
                await asyncio.wait_for(sending, SHORT)
                await rec.wait_for(lambda r=rec: len(r.ids("r")) >= 2, SHORT)
            except (TimeoutError, AssertionError):
                pass
            joins = 1 + (await _round_trip(client, peer)).count("join")
            got.update(messages=rec.ids("r"), position=client.rooms["r"].last_id, joins=joins)
            peer = await fake.drop(peer)
            got["since"] = (await peer.recv("join")).get("since")
            want = {"joined": 0, "messages": [4, 5], "position": 5, "joins": 1, "since": 5}
            if got != want:
                wrong.append(f"last_id {label}: {got}")
            sending.cancel()
            await client.close()
    assert not wrong, "\n".join(wrong)


async def test_message_ids_after_recovered_false_only_a_whole_number_sets_the_position() -> None:
    """After recovered: false the next message sets the position whatever its id, but only an
    id that is a whole number >= 0 (at most 2^53 - 1): 1e400, 2.5, -1, "40", null and 2^53+1
    are not delivered and change nothing; 40 and 41 are delivered. 2.5 used to become the
    position 2 (delivered), "40" then looked like a gap (a join again), 1e400 and null raised
    in the reader."""
    async with FakeServer() as fake:
        client, rec, peer = await dropped_after_one(fake, last_id=6)
        join = await peer.recv("join")
        assert join["since"] == 7
        await peer.ws.send(_raw_joined(join["id"], "r", "40", recovered=False))
        for raw in ("1e400", "2.5", "-1", '"40"', "null", "9007199254740993", "40", "41"):
            await peer.ws.send(_raw_message(raw))
        await rec.wait_for(lambda: rec.ids("r")[-1:] == [41], SHORT, "message 41")
        assert rec.ids("r") == [7, 40, 41]
        assert client.rooms["r"].last_id == 41
        assert [(f.room, f.since, f.last_id) for f in rec.of("recovery_failed")] == [("r", 7, 40)]
        kinds = await _round_trip(client, peer)
        assert "join" not in kinds, f"joined again: {kinds}"
        await client.close()


async def test_last_id_unreadable_on_a_rejoin_keeps_the_position() -> None:
    """A re-join's joined whose last_id is not a whole number >= 0 keeps the room's position
    (since, 7): Joined.last_id and recovery_failed's last_id say 7, the replay ends with the
    answer to a ping written behind the join (its end is unknown), then the send made while
    disconnected goes out, and 8 and its echo 9 are delivered. "40" used to be taken (Joined
    and recovery_failed said 40; with recovered: true the send waited for message 40, no ping
    being written), null and 1e400 raised in the reader (no joined: the room stayed joining)."""
    wrong = []
    for raw in ('"40"', "null", "2.5", "1e400"):
        for recovered in (False, True):
            label = f"last_id {raw}, recovered {recovered}"
            async with FakeServer() as fake:
                client, rec, peer = await dropped_after_one(fake, last_id=6)
                sending = asyncio.create_task(client.send("r", "after"))
                join = await peer.recv("join")
                await peer.ws.send(_raw_joined(join["id"], "r", raw, recovered=recovered))
                got: dict[str, Any] = {}
                try:
                    await rec.wait_for(lambda r=rec: len(r.of("joined")) == 2, SHORT)
                    got["joined"] = rec.of("joined")[-1].last_id
                    got["lost"] = [(f.since, f.last_id) for f in rec.of("recovery_failed")]
                    await peer.message(8)  # the replay
                    ping = await asyncio.wait_for(peer.recv(), SHORT)
                    got["then"] = ping["type"]  # the ping behind the join, not the send
                    if ping["type"] == "ping":
                        await peer.send(type="pong", id=ping["id"])
                        frame = await asyncio.wait_for(peer.recv("message"), SHORT)
                        await peer.echo(frame, 9)
                        got["sent"] = (await asyncio.wait_for(sending, SHORT)).id
                except (TimeoutError, AssertionError) as exc:
                    got["stuck"] = type(exc).__name__
                got.update(messages=rec.ids("r"), position=client.rooms["r"].last_id)
                want = {"joined": 7, "lost": [(7, 7)] if recovered is False else [],
                        "then": "ping", "sent": 9, "messages": [7, 8, 9], "position": 9}
                if got != want:
                    wrong.append(f"{label}: {got}")
                sending.cancel()
                await client.close()
    assert not wrong, "\n".join(wrong)


async def _sent_id(sending: asyncio.Task[Any]) -> Any:
    """The id a send resolved with, or "not acknowledged" if it did not within SHORT."""
    try:
        return (await asyncio.wait_for(sending, SHORT)).id
    except TimeoutError:
        return "not acknowledged"


async def test_message_id_unreadable_acknowledges_the_send_but_is_not_delivered() -> None:
    """An echo whose id is no message id (not a whole number >= 0 and at most 2**53 - 1, or
    absent) still acknowledges the send (its Message has id -1, as in JS; Rust's u64::MAX) but
    is not delivered and changes no position: the next message, 1, is. "1" and 1.5 used to be
    delivered as 1 (then the real 1 was dropped as seen), null and 1e400 raised in the reader:
    the send stayed unacknowledged."""
    wrong = []
    for raw in ('"1"', "1.5", "null", "1e400", "-1", "true", "9007199254740992",
                "18446744073709551616", None):
        async with FakeServer() as fake:
            client, rec, peer = await joined_client(fake, last_id=0)
            sending = asyncio.create_task(client.send("r", "mine"))
            frame = await peer.recv("message")
            echo = _raw_message(raw or "0", client_msg_id=frame["client_msg_id"],
                                user_id=peer.user_id)
            await peer.ws.send(echo if raw is not None else echo.replace(', "id": 0}', "}"))
            await peer.message(1)
            got: dict[str, Any] = {"sent": await _sent_id(sending)}
            await _round_trip(client, peer)
            got.update(messages=rec.ids("r"), position=client.rooms["r"].last_id,
                       acks=[a.id for a in rec.of("ack")])
            want = {"sent": -1, "messages": [1], "position": 1, "acks": [-1]}
            if got != want:
                wrong.append(f"id {raw}: {got}")
            sending.cancel()
            await client.close()
    assert not wrong, "\n".join(wrong)


def _raw_dm(mid: str | None, **extra: Any) -> str:
    """A direct message with ``id`` as raw JSON text (None: absent)."""
    text = json.dumps({"type": "dm", "to": "u2", "text": "hi", "user_id": "u1", "timestamp": 0,
                       "from": "alice", **extra})
    return text if mid is None else f'{text[:-1]}, "id": {mid}}}'


async def test_dm_id_unreadable_acknowledges_the_send_but_is_not_delivered() -> None:
    """As for a room message: the echo of a dm whose id is not a whole number >= 0 and at most
    2**53 - 1 (wire_id) still acknowledges the send by its client_msg_id (its DirectMessage has
    id -1), but is no ``dm`` event (its id cannot tell it from another DM); the
    next DM, 2, is one. int() made 2.5 a 2 (then the real DM 2 was dropped as seen) and "7" a 7;
    null, 1e400 and an absent id raised in the reader: the send stayed unacknowledged."""
    wrong = []
    for raw in ("2.5", '"7"', "null", "-1", "1e400", "18446744073709551616", "9007199254740992",
                None):
        async with FakeServer() as fake:
            client = client_for(fake, send_timeout=TIMEOUT)
            rec = Recorder(client)
            await client.connect()
            peer = await fake.accept()
            sending = asyncio.create_task(client.dm("u2", "mine"))
            frame = await peer.recv("dm")
            await peer.ws.send(_raw_dm(raw, client_msg_id=frame["client_msg_id"]))
            await peer.ws.send(_raw_dm("2"))
            got: dict[str, Any] = {"sent": await _sent_id(sending)}
            await _round_trip(client, peer)
            got.update(dms=[d.id for d in rec.of("dm")], acks=[a.id for a in rec.of("ack")])
            want = {"sent": -1, "dms": [2], "acks": [-1]}
            if got != want:
                wrong.append(f"id {raw}: {got}")
            sending.cancel()
            await client.close()
    assert not wrong, "\n".join(wrong)


async def test_dm_ids_are_kept_across_connections_only_with_persistence() -> None:
    """With persistence (the welcome has dm_backlog) a page of kept DMs may come again on the
    next connection: a DM id seen before is a double, dropped. Without it no DM comes on two
    connections, and a restarted memory server numbers DMs from 1 again: its new 1 was dropped
    as a double of the 1 seen before the restart. The ids are forgotten on such a connection."""
    # dm_backlog counts by the rule for ids off the wire, as in the JS and Rust clients.
    for backlog in (0, 2.0, 100):
        assert await _dms_over_a_reconnect(True, backlog) == ["first", "second"], backlog
    for backlog in (None, "2", 2.5, -1, True):
        assert await _dms_over_a_reconnect(False, backlog) == [
            "first", "new first", "second"], backlog
    assert await _dms_over_a_reconnect(False) == ["first", "new first", "second"]


async def _dms_over_a_reconnect(persistence: bool, *backlog: Any) -> list[str]:
    """The texts of the dm events: DM 1, a reconnect, then DM 1 again and DM 2 (the welcome's
    dm_backlog is ``backlog`` if given)."""
    async with FakeServer() as fake:
        if backlog:
            fake.welcome_extra = {"dm_backlog": backlog[0]}
        client = client_for(fake)
        rec = Recorder(client)
        await client.connect()
        peer = await fake.accept()
        await peer.ws.send(_raw_dm("1", text="first"))
        await rec.wait_for(lambda: len(rec.of("dm")) == 1, what="the first DM")
        peer = await fake.drop(peer)
        await rec.wait_for(lambda: len(rec.of("connected")) == 2, what="the reconnect")
        # With persistence: the same DM again. Without: a restarted server's first DM.
        await peer.ws.send(_raw_dm("1", text="first" if persistence else "new first"))
        await peer.ws.send(_raw_dm("2", text="second"))
        await rec.wait_for(lambda: rec.of("dm")[-1].text == "second", what="the second DM")
        await client.close()
        return [d.text for d in rec.of("dm")]


async def test_another_members_message_with_my_client_msg_id_acknowledges_nothing() -> None:
    """client_msg_id is unique per sender (the server dedupes per user), and every member gets
    the sender's: another member's message carrying the id of a send of ours is not its echo.
    It resolved that send with the other member's message and took it out of the outbox, so a
    send still waiting its turn was never written: lost. Only the echo of a user this client
    has been acknowledges; the send then goes out and its own echo resolves it."""
    async with FakeServer() as fake:
        client, rec, peer = await joined_client(fake, last_id=0, max_in_flight=1)
        first = asyncio.create_task(client.send("r", "first", client_msg_id="c1"))
        written = await peer.recv("message")
        second = asyncio.create_task(client.send("r", "second", client_msg_id="c2"))
        # Bob's own send, his client_msg_id "c2" too, stored as 1; dm "c2" from him as well.
        await peer.message(1, user_id="bob", client_msg_id="c2")
        await peer.send(type="dm", id=1, to="u1", text="hi", user_id="bob", timestamp=0,
                        client_msg_id="c2", **{"from": "bob"})
        await peer.echo(written, 2)
        assert (await first).id == 2
        again = await peer.recv("message")
        assert again["client_msg_id"] == "c2" and again["text"] == "second"
        await peer.echo(again, 3)
        mine = await asyncio.wait_for(second, TIMEOUT)
        assert (mine.id, mine.user_id, mine.client_msg_id) == (3, "u1", "c2")
        assert rec.ids("r") == [1, 2, 3]
        await client.close()


async def test_sends_keep_their_order_when_the_server_lost_our_membership() -> None:
    """Sends on the wire refused with not_in_room (the server lost the membership) are sent
    again after the re-join, in order: a send queued meanwhile does not overtake the ones
    still waiting for their refusal. The rejoin left the room joined and caught up, so the
    first refused one went out again at once behind the join, and a send made then went with
    it, ahead of the two refused after it: stored as m1, m4, m2, m3."""
    async with FakeServer() as fake:
        client, rec, peer = await joined_client(fake, last_id=0)
        sends = [asyncio.create_task(client.send("r", f"m{i}")) for i in (1, 2, 3)]
        frames = [await peer.recv("message") for _ in range(3)]
        await peer.send(type="error", id=frames[0]["id"], code="not_in_room", message="no")
        join = await peer.recv("join")
        assert join["since"] == 0
        sends.append(asyncio.create_task(client.send("r", "m4")))
        await asyncio.sleep(0)  # one step: the send is queued (and written, if it may go)
        for frame in frames[1:]:
            await peer.send(type="error", id=frame["id"], code="not_in_room", message="no")
        await peer.send(type="joined", id=join["id"], room="r", users=[], last_id=0,
                        recovered=True)
        written = []
        while len(written) < 4:
            frame = await peer.recv_answering_pings("message", f"after {written}")
            written.append(frame["text"])
            await peer.echo(frame, len(written))
        assert written == ["m1", "m2", "m3", "m4"]
        assert [(await s).text for s in sends] == ["m1", "m2", "m3", "m4"]
        await client.close()


async def test_a_send_before_connect_keeps_the_previous_runs_outbox(tmp_path: Path) -> None:
    """A send queued before connect() (sends queue until then) saved the outbox with that
    send alone, over what the previous run had left in the store, before connect() restored
    it: the previous run's unacknowledged sends were gone. They are restored first now, and
    go out before the new one."""
    store = FileOutboxStore(tmp_path / "outbox.json")
    store.save([{"kind": "dm", "target": "u9", "text": "left by the last run",
                 "client_msg_id": "old-1"}])
    async with FakeServer() as fake:
        client = client_for(fake, outbox_store=store)
        sending = asyncio.create_task(client.dm("u9", "new"))
        await asyncio.sleep(0)  # one step: the dm is queued (and the store saved)
        assert [e["client_msg_id"] for e in store.load()][0] == "old-1"
        await client.connect()
        peer = await fake.accept()
        first, second = await peer.recv("dm"), await peer.recv("dm")
        assert (first["client_msg_id"], second["text"]) == ("old-1", "new")
        for i, frame in enumerate((first, second), 1):
            await peer.send(type="dm", id=i, to="u9", text=frame["text"], user_id=peer.user_id,
                            timestamp=0, client_msg_id=frame["client_msg_id"], **{"from": "a"})
        assert (await sending).text == "new"
        await Recorder(client).wait_for(lambda: not client.pending, what="both acknowledged")
        assert store.load() == []
        await client.close()


async def test_another_users_dm_with_the_id_of_a_restored_dm_acknowledges_nothing(
        tmp_path: Path) -> None:
    """A DM restored from the store is acknowledged only by a copy from this client's user
    to its reader (no copy of a DM reaches a later guest id of its sender: any sender's
    copy is taken only for a restored room message). Another user's DM to us naming its
    client_msg_id took it out of the outbox and the store, never to be written again."""
    store = FileOutboxStore(tmp_path / "outbox.json")
    store.save([{"kind": "dm", "target": "u9", "text": "left by the last run",
                 "client_msg_id": "old-1"}])
    async with FakeServer() as fake:
        client = client_for(fake, outbox_store=store)
        rec = Recorder(client)
        await client.connect()
        peer = await fake.accept()
        written = await peer.recv("dm")
        assert written["client_msg_id"] == "old-1"
        await peer.send(type="dm", id=1, to=peer.user_id, text="copied", user_id="mallory",
                        timestamp=0, client_msg_id="old-1", **{"from": "mallory"})
        await rec.wait_for(lambda: rec.of("dm"), what="mallory's DM")
        assert rec.of("ack") == []
        assert [e.client_msg_id for e in client.pending] == ["old-1"]
        assert [e["client_msg_id"] for e in store.load()] == ["old-1"]
        await peer.send(type="dm", id=2, to="u9", text=written["text"], user_id=peer.user_id,
                        timestamp=0, client_msg_id="old-1", **{"from": "a"})
        await rec.wait_for(lambda: not client.pending, what="the echo acknowledging it")
        assert [m.id for m in rec.of("ack")] == [2]
        assert store.load() == []
        await client.close()


async def test_a_sync_client_call_from_its_handler_raises_instead_of_hanging() -> None:
    """SyncClient handlers run on the client's thread: a blocking call from one (a bot
    replying with chat.send in its message handler) waited for that very thread, and the
    client hung for good. It raises RuntimeError; the client goes on."""
    async with FakeServer() as fake:
        chat = SyncClient(fake.url, backoff=FAST, request_timeout=TIMEOUT)
        outcome: queue.Queue[Exception | None] = queue.Queue()

        def reply(message: Any) -> None:
            try:
                chat.send("r", f"re: {message.text}")
            except Exception as exc:
                outcome.put(exc)
            else:
                outcome.put(None)

        chat.on("message", reply)
        await asyncio.to_thread(chat.connect)
        peer = await fake.accept()
        joining = asyncio.create_task(asyncio.to_thread(chat.join, "r"))
        await peer.joined()
        await joining
        await peer.message(1)
        try:
            result = await asyncio.to_thread(outcome.get, True, TIMEOUT)
        except queue.Empty:
            raise AssertionError("the handler's send never returned") from None
        assert isinstance(result, RuntimeError), result
        sending = asyncio.create_task(asyncio.to_thread(chat.send, "r", "from the app"))
        frame = await peer.recv("message")
        await peer.echo(frame, 2)
        assert (await sending).id == 2
        await asyncio.to_thread(chat.close)


# -- epochs: the name of a room's numbering ---------------------------------------------------
async def joined_in_epoch(fake: FakeServer, epoch: str | None,
                          last_id: int = 0) -> tuple[Client, Recorder, Peer]:
    """A client joined to r, whose joined said ``last_id`` and ``epoch`` (None: no epoch,
    a server of the release before)."""
    client = client_for(fake)
    rec = Recorder(client)
    await client.connect()
    peer = await fake.accept()
    join = asyncio.create_task(client.join("r"))
    await peer.joined(last_id=last_id, **({} if epoch is None else {"epoch": epoch}))
    await join
    return client, rec, peer


async def test_a_rejoin_sends_the_epoch_of_the_latest_joined() -> None:
    """The room's epoch (the latest joined's) goes with since on every re-join, a gap's and
    a reconnect's, so that the server can tell ids of a numbering that began again; the app
    reads it next to last_id (rooms[...].epoch, Joined.epoch), to persist the two together.
    The client sent since alone, and a numbering that had started again from 1 was replayed
    as what followed it."""
    async with FakeServer() as fake:
        client, rec, peer = await joined_in_epoch(fake, "E1", last_id=5)
        assert rec.of("joined")[0].epoch == "E1"
        assert (client.rooms["r"].last_id, client.rooms["r"].epoch) == (5, "E1")
        await peer.message(6)
        await peer.message(8)  # 7 is missing
        gap = await peer.recv("join")
        assert (gap.get("since"), gap.get("epoch")) == (6, "E1")
        await peer.send(type="joined", id=gap["id"], room="r", users=[], last_id=8,
                        recovered=True, epoch="E1")
        await peer.message(7)
        await peer.message(8)
        await rec.wait_for(lambda: rec.ids("r")[-1:] == [8], what="the gap's replay")
        peer = await fake.drop(peer)
        again = await peer.recv("join")
        assert (again.get("since"), again.get("epoch")) == (8, "E1")
        await client.close()


@pytest.mark.parametrize("new_last", [6, 2], ids=["above-since", "below-since"])
async def test_a_numbering_that_began_again_is_followed_from_its_last_id(new_last: int) -> None:
    """The room's ids started again from 1 while the client was away (a memory server
    restarted): the re-join's joined has another epoch, recovered: false, the new last_id.
    recovery_failed says epoch_changed; the position becomes that last_id in the new epoch
    at once, so a reconnect before the next message resumes from it (since 4 of the old
    numbering would have the new ids above 4 replayed as what followed ours), the send
    made while away goes out, and the next live ids are delivered, not taken for
    duplicates or a gap."""
    async with FakeServer() as fake:
        client, rec, peer = await joined_in_epoch(fake, "E1", last_id=3)
        await peer.message(4)
        await rec.wait_for(lambda: rec.ids("r") == [4])
        peer = await fake.drop(peer)
        sending = asyncio.create_task(client.send("r", "after the restart"))
        join = await peer.joined(last_id=new_last, recovered=False, epoch="E2")
        assert (join.get("since"), join.get("epoch")) == (4, "E1")
        await rec.wait_for(lambda: len(rec.of("joined")) == 2, what="the re-join")
        lost = rec.of("recovery_failed")
        assert [(f.since, f.last_id, f.epoch_changed) for f in lost] == [(4, new_last, True)]
        joined = rec.of("joined")[-1]
        assert (joined.recovered, joined.epoch, joined.last_id) == (False, "E2", new_last)
        assert (client.rooms["r"].last_id, client.rooms["r"].epoch) == (new_last, "E2")
        peer = await fake.drop(peer)  # before any message of the new numbering
        join = await peer.joined(last_id=new_last, recovered=True, epoch="E2")
        assert (join.get("since"), join.get("epoch")) == (new_last, "E2")
        frame = await peer.recv_answering_pings("message", "the send made while away")
        await peer.echo(frame, new_last + 1)
        await peer.message(new_last + 2)
        await rec.wait_for(lambda: rec.ids("r")[-1:] == [new_last + 2], what="the live ids")
        assert rec.ids("r") == [4, new_last + 1, new_last + 2]
        assert (await sending).id == new_last + 1
        assert len(rec.of("recovery_failed")) == 1
        await client.close()


async def test_since_0_in_another_epoch_is_a_replay_from_1_not_a_lost_numbering() -> None:
    """since 0 names no message, in any numbering: the server replays the new one from 1,
    recovered: true; the client delivers it and reports nothing lost."""
    async with FakeServer() as fake:
        client, rec, peer = await joined_in_epoch(fake, "E1", last_id=0)
        peer = await fake.drop(peer)
        join = await peer.joined(last_id=2, recovered=True, epoch="E2")
        assert (join.get("since"), join.get("epoch")) == (0, "E1")
        await peer.message(1)
        await peer.message(2)
        await rec.wait_for(lambda: rec.ids("r") == [1, 2], what="the replay")
        assert not rec.of("recovery_failed")
        assert (client.rooms["r"].last_id, client.rooms["r"].epoch) == (2, "E2")
        await client.close()


@pytest.mark.parametrize("epoch", [None, "", "x" * 65, 5, "a\nb", "tab\there", "del\x7f"],
                         ids=["absent", "empty", "too-long", "number", "newline", "tab", "del"])
async def test_a_joined_without_an_epoch_is_followed_as_before(epoch: Any) -> None:
    """A server of the release before sends no epoch: the room has none and its re-joins
    carry since alone, answered as before. So does an epoch the server would refuse back
    in a join (not a string of 1-64 characters without control characters): sent again,
    it would have every re-join refused with invalid_message."""
    async with FakeServer() as fake:
        client = client_for(fake)
        rec = Recorder(client)
        await client.connect()
        peer = await fake.accept()
        join = asyncio.create_task(client.join("r"))
        await peer.joined(last_id=3, **({} if epoch is None else {"epoch": epoch}))
        assert (await join).epoch is None and client.rooms["r"].epoch is None
        await peer.message(4)
        await rec.wait_for(lambda: rec.ids("r") == [4])
        peer = await fake.drop(peer)
        again = await peer.joined(last_id=5, recovered=True)
        assert again.get("since") == 4 and "epoch" not in again
        await peer.message(5)
        await rec.wait_for(lambda: rec.ids("r") == [4, 5], what="the replay")
        assert not rec.of("recovery_failed")
        await client.close()


async def test_a_server_that_stops_naming_the_epoch_is_sent_none() -> None:
    """A joined without epoch after one with (a rollback to the release before): the
    epoch is unknown from then on, not the old one kept (the ids go on in a numbering
    nobody named)."""
    async with FakeServer() as fake:
        client, rec, peer = await joined_in_epoch(fake, "E1", last_id=3)
        peer = await fake.drop(peer)
        join = await peer.joined(last_id=3, recovered=True)
        await rec.wait_for(lambda: len(rec.of("joined")) == 2, what="the re-join")
        assert join.get("epoch") == "E1" and client.rooms["r"].epoch is None
        peer = await fake.drop(peer)
        join = await peer.joined(last_id=3, recovered=True)
        assert join.get("since") == 3 and "epoch" not in join
        await client.close()


async def test_join_resumes_from_a_persisted_since_and_epoch() -> None:
    """join(room, since=, epoch=) resumes where an earlier run stopped: both go on the join,
    the replay follows, and Joined says a re-join; a numbering that began again since is
    told as for a reconnect (epoch_changed). Without the parameters an app could not resume
    at all."""
    async with FakeServer() as fake:
        client = client_for(fake)
        rec = Recorder(client)
        await client.connect()
        peer = await fake.accept()
        joining = asyncio.create_task(client.join("r", since=9, epoch="E1"))
        join = await peer.joined(last_id=11, recovered=True, epoch="E1")
        assert (join.get("since"), join.get("epoch")) == (9, "E1")
        joined = await joining
        assert (joined.rejoin, joined.recovered, joined.epoch) == (True, True, "E1")
        await peer.message(10)
        await peer.message(11)
        await rec.wait_for(lambda: rec.ids("r") == [10, 11], what="the replay")
        resuming = asyncio.create_task(client.join("s", since=7, epoch="E1"))
        join = await peer.joined("s", last_id=2, recovered=False, epoch="E2")
        assert (join.get("since"), join.get("epoch")) == (7, "E1")
        assert (await resuming).recovered is False
        (lost,) = rec.of("recovery_failed")
        assert (lost.room, lost.since, lost.last_id, lost.epoch_changed) == ("s", 7, 2, True)
        assert (client.rooms["s"].last_id, client.rooms["s"].epoch) == (2, "E2")
        fresh = asyncio.create_task(client.join("t", epoch="E1"))  # no since: no epoch
        join = await peer.joined("t", last_id=4, epoch="E3")
        assert "since" not in join and "epoch" not in join
        assert (await fresh).rejoin is False
        await client.close()


@pytest.mark.parametrize(("since", "epoch"), [
    ("5", None), (-1, None), (2.5, None), (True, None), (2**53, None),
    (5, ""), (5, "x" * 65), (5, "a\x00b"), (5, 7)])
async def test_join_refuses_a_since_or_epoch_the_server_would(since: Any, epoch: Any) -> None:
    """A since or epoch the server refuses raises invalid_message at once, nothing written
    and no room kept (the room would otherwise be joined again and refused for ever)."""
    async with FakeServer() as fake:
        client = client_for(fake)
        await client.connect()
        peer = await fake.accept()
        with pytest.raises(ChatError) as err:
            await client.join("r", since=since, epoch=epoch)
        assert err.value.code == "invalid_message" and "r" not in client.rooms
        assert await _round_trip(client, peer) == []
        await client.close()


async def test_a_sync_client_resumes_with_since_and_epoch() -> None:
    """SyncClient.join passes since and epoch on, as Client.join does; rooms shows the epoch."""
    async with FakeServer() as fake:
        chat = SyncClient(fake.url, backoff=FAST, request_timeout=TIMEOUT)
        await asyncio.to_thread(chat.connect)
        peer = await fake.accept()
        joining = asyncio.create_task(asyncio.to_thread(chat.join, "r", since=4, epoch="E1"))
        join = await peer.joined(last_id=4, recovered=True, epoch="E1")
        assert (join.get("since"), join.get("epoch")) == (4, "E1")
        assert (await joining).epoch == "E1"
        room = await asyncio.to_thread(lambda: chat.rooms["r"])
        assert (room.last_id, room.epoch) == (4, "E1")
        await asyncio.to_thread(chat.close)


async def test_a_coroutine_handler_is_kept_until_it_ends_and_its_failure_logged(
        caplog: pytest.LogCaptureFixture) -> None:
    """A coroutine handler runs as a task the client keeps until it ends: asyncio holds
    only a weak reference to a task, so one awaiting what nothing else refers to was
    collected mid-way (its ``finally`` run by the garbage collector). Its exception is
    logged as a plain handler's is (it was "Task exception was never retrieved", if ever)."""
    async with FakeServer() as fake:
        client, rec, peer = await joined_client(fake)
        pending: list[weakref.ref[asyncio.Future[None]]] = []
        ended: list[str] = []
        started = asyncio.Event()  # set by the handler, never awaited by it

        async def held(message: Any) -> None:
            waiting = asyncio.get_running_loop().create_future()  # only this task has it
            pending.append(weakref.ref(waiting))
            started.set()
            try:
                await waiting
            finally:
                ended.append("held")

        async def failing(message: Any) -> None:
            await asyncio.sleep(0)
            raise RuntimeError(f"boom {message.id}")

        client.on("message", held)
        client.on("message", failing)
        caplog.set_level(logging.ERROR, logger="wschat_client")
        await peer.message(1)
        await asyncio.wait_for(started.wait(), TIMEOUT)

        def failed() -> list[logging.LogRecord]:
            return [r for r in caplog.records
                    if r.name == "wschat_client" and r.exc_info is not None]

        for _ in range(3):
            gc.collect()
            await asyncio.sleep(0)  # the failing handler's turns
        assert ended == [], "a coroutine handler's task was collected before its end"
        waiting = pending[0]()
        assert waiting is not None
        waiting.set_result(None)
        await rec.wait_for(lambda: ended == ["held"] and bool(failed()), what="both ends")
        record = failed()[0]
        assert record.getMessage() == "a 'message' handler failed"
        assert record.exc_info is not None and str(record.exc_info[1]) == "boom 1"
        await client.close()


async def test_close_lets_coroutine_handlers_finish() -> None:
    """close() neither cancels the coroutine handlers still running (a message handed to
    one counts as delivered: cancelling it could lose it) nor returns before they end, as
    their loop may end with it (asyncio.run cancels what is left); handlers that close
    the client themselves are not waited for by a close() (their own, or each other's)."""
    async with FakeServer() as fake:
        client, rec, peer = await joined_client(fake)
        release = asyncio.Event()
        ended: list[str] = []

        async def slow(message: Any) -> None:
            try:
                await release.wait()
                ended.append("finished")
            except asyncio.CancelledError:
                ended.append("cancelled")
                raise

        client.on("message", slow)
        await peer.message(1)
        await rec.wait_for(lambda: rec.ids("r") == [1], what="message 1")
        closing = asyncio.create_task(client.close())
        await rec.wait_for(lambda: client.state is ConnectionState.DISCONNECTED
                           and rec.of("state")[-1].new is ConnectionState.DISCONNECTED,
                           what="the close")
        assert not closing.done(), "close() returned while a handler still ran"
        release.set()
        await asyncio.wait_for(closing, TIMEOUT)
        assert ended == ["finished"]

        other, _, peer = await joined_client(fake)
        closed: list[int] = []
        both = asyncio.Event()

        async def closing_handler(message: Any) -> None:
            await other.close()  # two of them: neither waits for the other
            closed.append(message.id)
            if len(closed) == 2:
                both.set()

        other.on("message", closing_handler)
        other.on("message", closing_handler)
        await peer.message(1)
        await asyncio.wait_for(both.wait(), TIMEOUT)
        assert other.state is ConnectionState.DISCONNECTED


async def test_close_cancels_handlers_still_running_after_connect_timeout(
        caplog: pytest.LogCaptureFixture) -> None:
    """A coroutine handler waiting for what never comes holds close() for
    ``connect_timeout`` at most: it is then cancelled, with a warning (before, close()
    waited for it for ever)."""
    async with FakeServer() as fake:
        client, rec, peer = await joined_client(fake, connect_timeout=0.5)
        ended: list[str] = []

        async def stuck(message: Any) -> None:
            try:
                await asyncio.Event().wait()  # nothing will set it
            except asyncio.CancelledError:
                ended.append("cancelled")
                raise

        client.on("message", stuck)
        await peer.message(1)
        await rec.wait_for(lambda: rec.ids("r") == [1], what="message 1")
        with caplog.at_level(logging.WARNING, logger="wschat_client"):
            await asyncio.wait_for(client.close(), TIMEOUT)
        await asyncio.sleep(0)  # the cancelled task runs its except clause
        assert ended == ["cancelled"]
        assert "1 handler task(s) still running" in caplog.text



@pytest.mark.parametrize("how", ["wait_for", "shield", "task"])
async def test_a_handler_closing_through_another_task_is_not_waited_for(how: str) -> None:
    """A coroutine handler may await close() in a task of its own: ``asyncio.wait_for``
    makes one on Python 3.11, ``asyncio.shield`` and ``create_task`` on any. That close()
    waited for the handler, which waited for it: both hung for ``connect_timeout``, and then
    the handler was cancelled (a warning said so) instead of going on after its close."""
    async with FakeServer() as fake:
        client, _, peer = await joined_client(fake, connect_timeout=3 * TIMEOUT)
        ended: list[str] = []
        done = asyncio.Event()

        async def closing(message: Any) -> None:
            try:
                if how == "wait_for":
                    await asyncio.wait_for(client.close(), 6 * TIMEOUT)
                elif how == "shield":
                    await asyncio.shield(client.close())
                else:
                    await asyncio.create_task(client.close())
                ended.append("closed")
            except asyncio.CancelledError:
                ended.append("cancelled")
                raise
            finally:
                done.set()

        client.on("message", closing)
        await peer.message(1)
        await asyncio.wait_for(done.wait(), TIMEOUT)
        assert ended == ["closed"]
        assert client.state is ConnectionState.DISCONNECTED


async def test_a_refused_send_that_then_fails_leaves_no_probe_behind() -> None:
    """After a retryable refusal a target's sends go one at a time until one gets through
    (``_probing``). When the refused send fails instead (its DM's recipient is gone, its
    room left), nothing of it stays: the set grew with every such target, and the room's
    sends went one per acknowledgement after it was joined again."""
    async with FakeServer() as fake:
        client, _, peer = await joined_client(fake)
        dm = asyncio.create_task(client.dm("gone", "hello?"))
        frame = await peer.recv("dm")
        await peer.send(type="error", id=frame["id"], code="unavailable", message="redis",
                        retry_after_ms=10)
        await peer.refuse("dm", "user_not_found", dm)
        assert client._probing == set(), "a DM that failed left its recipient probing"

        sending = asyncio.create_task(client.send("r", "refused"))
        frame = await peer.recv("message")
        await peer.send(type="error", id=frame["id"], code="unavailable", message="redis",
                        retry_after_ms=60_000)  # still waiting for its retry at the leave
        probe = asyncio.create_task(client.ping())  # its pong comes after the refusal
        await peer.send(type="pong", id=(await peer.recv("ping"))["id"])
        await probe
        assert client.pending[0].failures == 1 and "message:r" in client._probing
        leaving = asyncio.create_task(client.leave("r"))
        with pytest.raises(ChatError) as err:
            await sending
        assert err.value.code == "not_in_room"
        left = await peer.recv("leave")
        await peer.send(type="left", id=left["id"], room="r")
        await leaving
        assert client._probing == set(), "a send failed by leave left its room probing"

        joining = asyncio.create_task(client.join("r"))
        await peer.joined()
        await joining
        sends = [asyncio.create_task(client.send("r", f"t{i}")) for i in range(2)]
        frames = [await peer.recv("message") for _ in range(2)]  # both before any echo
        for mid, written in enumerate(frames, 1):
            await peer.echo(written, mid)
        assert [m.id for m in await asyncio.gather(*sends)] == [1, 2]
        await client.close()


@pytest.mark.parametrize("code", ["forbidden", "invalid_room", "too_many_rooms"])
async def test_a_rejoin_refused_for_good_is_a_removed_event(code: str) -> None:
    """A rejoin (a join with since: the app had the room) refused for good drops the room,
    with an error event and then removed (reason: the refusal's, banned for a ban, else the
    code; until: the ban's), as in the JS client; it was an error event alone. A first join
    refused raises, and is no removal."""
    async with FakeServer() as fake:
        client, rec, peer = await joined_client(fake)
        removed: list[Removed] = []
        client.on("removed", removed.append)
        await peer.refuse("join", code, asyncio.create_task(client.join("other")))
        assert removed == [] and [e.code for e in rec.of("error")] == [code]
        peer = await fake.drop(peer)
        join = await peer.recv("join")
        assert join["since"] == 0
        await peer.send(type="error", id=join["id"], code=code, message="no", room="r",
                        **({"reason": "banned", "until": 123} if code == "forbidden" else {}))
        await rec.wait_for(lambda: bool(removed), what="the removal")
        assert removed == [Removed("r", "banned", None, 123) if code == "forbidden"
                           else Removed("r", code, None, None)]
        assert [e.code for e in rec.of("error")] == [code, code]
        assert "r" not in client.rooms and rec.of("room_state")[-1].new is RoomState.LEFT
        await client.close()


@pytest.mark.parametrize("code", ["forbidden", "invalid_room", "too_many_rooms"])
async def test_a_join_refused_for_good_is_an_error_event_also_when_a_join_awaits_it(
        code: str) -> None:
    """A join refused for good raises in the join() awaiting it and is an error event too,
    as in the JS and Rust clients. It was an error event only when no join() waited: a
    join() whose timeout had passed still counted as waiting (its future stayed among the
    room's), so a refusal coming after that timeout dropped the room without a word to
    anyone, and asyncio logged "Future exception was never retrieved" for it."""
    async with FakeServer() as fake:
        client, rec, peer = await joined_client(fake)
        await peer.refuse("join", code, asyncio.create_task(client.join("awaited")))
        assert [e.code for e in rec.of("error")] == [code]
        with pytest.raises(RequestTimeout):
            await client.join("late", timeout=0.01)  # the room stays wanted
        assert "late" in client.rooms
        join = await peer.recv("join")
        await peer.send(type="error", id=join["id"], code=code, message="no", room="late")
        await rec.wait_for(lambda: len(rec.of("error")) == 2, what="the late refusal's error")
        assert [e.code for e in rec.of("error")] == [code, code]
        assert "late" not in client.rooms and client._rooms == {"r": client._rooms["r"]}
        await client.close()


async def test_a_join_that_timed_out_leaves_no_future_behind(
        caplog: pytest.LogCaptureFixture) -> None:
    """join()'s timeout (or cancellation) takes its future away from the room's: it stayed
    there, one per call, and the refusal or the close that failed it later was logged by
    asyncio as "Future exception was never retrieved"."""
    async with FakeServer() as fake:
        client, rec, peer = await joined_client(fake)
        for _ in range(3):
            with pytest.raises(RequestTimeout):
                await client.join("slow", timeout=0.01)
        assert client._rooms["slow"].waiters == []
        await client.close()
        del client, rec, peer
        gc.collect()
    assert "never retrieved" not in caplog.text


def test_the_function_on_returns_may_be_called_twice() -> None:
    """on()'s remover called a second time does nothing, as the JS client's (a cleanup run
    twice raised ValueError); each registration of one handler has a remover of its own."""
    client = Client("ws://127.0.0.1:9/ws")
    seen: list[Any] = []
    first = client.on("error", seen.append)
    second = client.on("error", seen.append)
    first()
    first()  # raised ValueError
    client._emit("error", "once")
    assert seen == ["once"]
    second()
    client._emit("error", "none")
    assert seen == ["once"]


def test_the_context_managers_are_typed_to_give_the_subclass() -> None:
    """``async with MyClient(...) as chat`` is a MyClient to a type checker: __aenter__ and
    SyncClient's __enter__ return Self (they said Client and SyncClient)."""
    import typing
    assert typing.get_type_hints(Client.__aenter__)["return"] is typing.Self
    assert typing.get_type_hints(SyncClient.__enter__)["return"] is typing.Self


async def test_a_send_refused_after_its_timeout_is_an_error_event() -> None:
    """send() timed out (the send stays in the outbox, to be delivered once), then the server
    refused it for good (muted meanwhile): that is an error event, as in the JS client. Its
    future still counted as awaited, and the refusal reached nobody: the app, told the send
    would still go, never heard it did not. A refusal the caller awaits is raised only."""
    async with FakeServer() as fake:
        client, rec, peer = await joined_client(fake)
        with pytest.raises(RequestTimeout):
            await client.send("r", "held", timeout=0.01)
        frame = await peer.recv("message")
        await peer.send(type="error", id=frame["id"], code="muted", message="muted", until=None)
        await rec.wait_for(lambda: bool(rec.of("error")), what="the refusal's error event")
        [err] = rec.of("error")
        assert err.code == "muted" and client.pending == []
        awaited = asyncio.create_task(client.dm("u9", "awaited"))
        frame = await peer.recv("dm")
        await peer.send(type="error", id=frame["id"], code="user_not_found", message="no")
        with pytest.raises(ChatError):
            await awaited  # the refusal was handled, error event or not, before this
        assert [e.code for e in rec.of("error")] == ["muted"]
        await client.close()


@pytest.mark.parametrize("failure", [RuntimeError("idp down"), Disconnected("idp gone"),
                                     None, ""])
async def test_a_token_refresh_whose_get_token_fails_is_one_error_event_and_tried_again(
        failure: Exception | str | None) -> None:
    """get_token failing at a refresh (raising, even a ChatError such as Disconnected, or
    giving no token) is one error event with code ``token``, the current token kept and the
    refresh tried again after the backoff: no auth with a null token goes out."""
    import time
    calls = 0

    def get_token() -> str | None:
        nonlocal calls
        calls += 1
        if calls == 2:  # the first refresh
            if isinstance(failure, Exception):
                raise failure
            return failure
        return _jwt(time.time() + 0.5)  # due for a refresh after REFRESH_FLOOR, 1 s

    async with FakeServer() as fake:
        client = client_for(fake, get_token=get_token)
        rec = Recorder(client)
        await client.connect()
        peer = await fake.accept()
        frame = await peer.recv()  # the second refresh's auth: the first wrote nothing
        assert frame["type"] == "auth" and isinstance(frame["token"], str) and calls == 3
        assert [e.code for e in rec.of("error")] == ["token"]
        await client.close()


async def _refreshing_client(fake: FakeServer,
                             rooms: dict[str, int]) -> tuple[Client, Recorder, Peer]:
    """A client whose token is refreshed a second after connecting (REFRESH_FLOOR), joined
    to each room at its last_id."""
    import time
    client = client_for(fake, get_token=lambda: _jwt(time.time() + 0.5))
    rec = Recorder(client)
    await client.connect()
    peer = await fake.accept()
    for room, last_id in rooms.items():
        joining = asyncio.create_task(client.join(room))
        await peer.joined(room, last_id=last_id)
        await joining
    return client, rec, peer


async def test_a_refresh_that_signs_in_another_user_rejoins_every_room_with_since() -> None:
    """The welcome answering a refresh's auth names another user: the server left every room
    of the connection, without a left (README, auth). The client kept them joined, and
    nothing of them came. Now it takes the new identity, says so once (user_changed, with
    the welcome), and joins every room again with since, as after a reconnect: the room's
    sends wait for the rejoin and its replay. A join written after the auth is the new
    user's already: it is not written again, nor anything of it doubled."""
    async with FakeServer() as fake:
        client, rec, peer = await _refreshing_client(fake, {"r": 5, "s": 7})
        changed: list[Welcome] = []
        client.on("user_changed", changed.append)
        auth = await peer.recv("auth")
        joining = asyncio.create_task(client.join("t"))
        late = await peer.recv("join")  # written after the auth: joined as the new user
        assert late["room"] == "t" and "since" not in late
        await peer.send(type="welcome", id=auth["id"], user_id="ben", username="Ben",
                        authenticated=True)
        rejoins = [await peer.recv("join") for _ in range(2)]
        assert {j["room"]: j.get("since") for j in rejoins} == {"r": 5, "s": 7}
        assert changed == [Welcome("ben", "Ben", True, None)]
        assert (client.user_id, client.username, client.authenticated) == ("ben", "Ben", True)
        assert client.rooms["r"].state is RoomState.JOINING
        sending = asyncio.ensure_future(client.send("r", "as ben"))
        await peer.send(type="joined", id=late["id"], room="t", users=[], last_id=2)
        assert (await asyncio.wait_for(joining, TIMEOUT)).last_id == 2
        by_room = {j["room"]: j for j in rejoins}
        await peer.send(type="joined", id=by_room["r"]["id"], room="r", users=[], last_id=6,
                        recovered=True)
        await peer.message(6, "r")  # the replay: posted after the server left the room
        await peer.send(type="joined", id=by_room["s"]["id"], room="s", users=[], last_id=7,
                        recovered=True)
        frame = await peer.recv_answering_pings("message", "the send after the rejoin")
        assert frame["text"] == "as ben"
        peer.user_id = "ben"
        await peer.echo(frame, 7)
        assert (await asyncio.wait_for(sending, TIMEOUT)).user_id == "ben"
        probe = asyncio.create_task(client.ping())
        assert (await peer.recv())["type"] == "ping"  # the next frame: no other join of t
        probe.cancel()
        assert rec.ids("r") == [6, 7]
        assert {name: info.state for name, info in client.rooms.items()} == {
            "r": RoomState.JOINED, "s": RoomState.JOINED, "t": RoomState.JOINED}
        assert [j.rejoin for j in rec.of("joined")] == [False, False, False, True, True]
        assert len(changed) == 1 and not rec.of("error")
        await client.close()


async def test_a_refresh_that_keeps_the_user_rejoins_nothing() -> None:
    """The welcome answering a refresh's auth names the same user: the rooms stay joined on
    the server, and nothing is joined again; no user_changed."""
    async with FakeServer() as fake:
        client, rec, peer = await _refreshing_client(fake, {"r": 5})
        changed: list[Welcome] = []
        client.on("user_changed", changed.append)
        auth = await peer.recv("auth")
        await peer.send(type="welcome", id=auth["id"], user_id="u1", username="alice",
                        authenticated=True)
        probe = asyncio.create_task(client.ping())
        frame = await peer.recv()
        assert frame["type"] == "ping", frame  # the next frame: no join
        await peer.send(type="pong", id=frame["id"])
        await asyncio.wait_for(probe, TIMEOUT)
        assert changed == [] and client.rooms["r"].state is RoomState.JOINED
        assert len(rec.of("joined")) == 1 and client.authenticated
        await client.close()


async def test_a_leave_timed_out_on_the_wire_then_refused_rate_limited_is_written_again() -> None:
    """The leave's caller gave up while it was on the wire; the server then refused it
    ``rate_limited`` (not carried out): it goes again (the room is gone for the app, the
    server must hear of it), as in the JS and Rust clients."""
    async with FakeServer() as fake:
        client, _, peer = await joined_client(fake)
        leaving = asyncio.create_task(client.leave("r", timeout=0.1))
        first = await peer.recv("leave")
        with pytest.raises(RequestTimeout):
            await leaving
        await peer.send(type="error", id=first["id"], code="rate_limited", message="slow",
                        retry_after_ms=20)
        again = await peer.recv("leave")
        assert again["room"] == "r" and again["id"] != first["id"]
        await client.close()


async def test_a_kick_queued_at_a_lost_connection_goes_out_on_the_next() -> None:
    """A kick still waiting its turn behind a read when the connection drops was never
    written (so not done): it goes out on the next connection, after the read asked
    again, in the order of the calls; one written before the drop would raise
    Disconnected instead."""
    async with FakeServer() as fake:
        client, _, peer = await joined_client(fake, max_requests_in_flight=1)
        reading = asyncio.create_task(client.list_users("r"))
        kicking = asyncio.create_task(client.kick("r", "bob"))
        await peer.recv("list_users")
        peer = await fake.drop(peer)
        await peer.joined()
        read = await peer.recv_answering_pings("list_users", "the read asked again")
        await peer.send(type="users", id=read["id"], room="r", users=[])
        kick = await peer.recv_answering_pings("kick", "the queued kick")
        await peer.send(type="moderated", id=kick["id"], action="kick", room="r",
                        user_id="bob")
        assert (await kicking)["action"] == "kick"
        assert await reading == []
        await client.close()


async def test_close_settles_queued_and_written_requests_at_once() -> None:
    """close() with reads on the wire and more waiting their turn: every call raises
    ClientClosed at once (none waits for its timeout), and nothing is written after."""
    async with FakeServer() as fake:
        client, _, peer = await joined_client(fake, max_requests_in_flight=2)
        calls = [asyncio.create_task(client.history("r")) for _ in range(5)]
        calls.append(asyncio.create_task(client.kick("r", "bob")))
        await peer.recv("history")
        await peer.recv("history")
        loop = asyncio.get_running_loop()
        started = loop.time()
        await client.close()
        results = await asyncio.wait_for(asyncio.gather(*calls, return_exceptions=True),
                                         TIMEOUT)
        assert loop.time() - started < TIMEOUT / 2
        assert all(isinstance(r, ClientClosed) for r in results), results
        with pytest.raises(ConnectionClosed):  # the socket closed: no frame after close
            while True:
                frame = await peer.recv()
                assert frame["type"] not in ("history", "kick"), frame


async def test_a_leave_after_close_or_a_stop_for_good_returns_at_once() -> None:
    """leave() on a client closed (close(), or a close code that stops it for good) returns
    at once, as in the JS and Rust clients: the client is in no room any more (the
    memberships went with its connection), and a leave is cleanup code, often run in a
    teardown after close(). Only a leave: the other calls raise ClientClosed."""
    async with FakeServer() as fake:
        client, _, _ = await joined_client(fake)
        await client.close()
        for room in ("r", "never joined"):
            await asyncio.wait_for(client.leave(room), TIMEOUT / 2)
        with pytest.raises(ClientClosed):
            await asyncio.wait_for(client.join("r"), TIMEOUT / 2)

        client, rec, peer = await joined_client(fake)
        await peer.ws.close(4003, "banned")
        await rec.wait_for(lambda: client.state is ConnectionState.DISCONNECTED
                           and rec.of("error"), what="the stop for good")
        for room in ("r", "never joined"):
            await asyncio.wait_for(client.leave(room), TIMEOUT / 2)
        with pytest.raises(ClientClosed):
            await asyncio.wait_for(client.history("r"), TIMEOUT / 2)
        await client.close()


@pytest.mark.parametrize("retry_after", [0, None, "5", 1e12])
async def test_a_read_refused_rate_limited_waits_a_sane_time(retry_after: Any) -> None:
    """retry_after_ms 0 (the floor, 50 ms), missing or not a number (1 s, as JS and Rust),
    or far too long (a day's cap): no busy loop of writes, and the call's own timeout still
    ends it (RequestTimeout, never written afterwards)."""
    async with FakeServer() as fake:
        client, _, peer = await joined_client(fake)
        loop = asyncio.get_running_loop()
        reading = asyncio.create_task(client.list_users("r", timeout=1.5))
        first = await peer.recv("list_users")
        refused_at = loop.time()
        extra = {} if retry_after is None else {"retry_after_ms": retry_after}
        await peer.send(type="error", id=first["id"], code="rate_limited", message="slow",
                        **extra)
        if retry_after in (0, None, "5"):
            again = await peer.recv("list_users")
            waited = loop.time() - refused_at
            assert waited >= (0.045 if retry_after == 0 else 0.95), waited
            await peer.send(type="users", id=again["id"], room="r", users=[])
            assert await reading == []
        else:
            with pytest.raises(RequestTimeout):
                await asyncio.wait_for(reading, 5)
            assert loop.time() - refused_at < 2.5
        await client.close()
