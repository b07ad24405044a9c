"""``Client.events()`` and ``SyncClient.events()``, the events as iterators, against the real
server: every message once and in order through a reconnect, the end on close and on a stop
for good, several iterators, a ``break`` that leaves nothing behind, the positions of the
events read."""

from __future__ import annotations

import asyncio
import json
import sys
import threading
import urllib.request
from typing import Any, get_args

import pytest
from conftest import TIMEOUT, Harness, Recorder, assert_exactly_once_in_order
from wschat_client import (
    Backoff,
    Client,
    ClientClosed,
    ConnectionState,
    Disconnect,
    Event,
    EventName,
    Events,
    Message,
    RoomPosition,
    SyncClient,
)
from wschat_client.client import EVENTS

BACKOFF = Backoff(min_delay=0.2, max_delay=3.0, pause=1.0)
LONG = 6 * TIMEOUT
FAST_ENV = {"RATE_LIMIT": "1000", "RATE_LIMIT_BURST": "1000", "HISTORY_SIZE": "2000"}


async def read_until(events: Events, done: Any, into: list[Event] | None = None,
                     timeout: float = TIMEOUT) -> list[Event]:
    """Read ``events`` until ``done(event)``; every event read, in order."""
    seen = [] if into is None else into

    async def read() -> None:
        async for event in events:
            seen.append(event)
            if done(event):
                return
        raise AssertionError(f"the events ended before {done}: {seen[-5:]}")
    try:
        await asyncio.wait_for(read(), timeout)
    except TimeoutError:
        raise AssertionError(f"timed out waiting for {done}: {seen[-5:]}") from None
    return seen


def messages(events: list[Event], room: str) -> list[Message]:
    return [e.payload for e in events
            if e.name == "message" and isinstance(e.payload, Message) and e.payload.room == room]


def test_the_event_names_are_the_on_names() -> None:
    assert set(get_args(EventName)) == EVENTS


async def test_every_message_once_in_order_through_a_reconnect(harness: Harness) -> None:
    """The iterator, read by a consumer that keeps up (each event awaited in turn), gets every
    message once and in id order across a server restart, the reconnect's replay (hundreds of
    messages handed on in a few turns of the loop) included, in the order the ``on()``
    handlers got them; and its ``disconnected`` and re-join's ``joined`` come in between."""
    s = await harness.server("redis", env=FAST_ENV)
    p = await harness.server("redis", env=FAST_ENV)
    reader = Client(s["url"], token=await harness.token("cara"), backoff=BACKOFF,
                    request_timeout=TIMEOUT)
    rec = Recorder(reader)
    events = reader.events()
    await reader.connect()
    await reader.join("news")
    pub = Client(p["url"], token=await harness.token("pete"), request_timeout=TIMEOUT)
    await pub.connect()
    await pub.join("news")
    seen: list[Event] = []
    consumer = asyncio.create_task(read_until(
        events, lambda e: e.name == "message" and e.payload.text == "after 4", seen, LONG))
    before = [await pub.send("news", f"before {i}") for i in range(50)]
    await rec.wait_for(lambda: len(rec.ids("news")) == 50, what="the first 50")
    await harness.call(f"/servers/{s['id']}/stop", {"signal": "TERM"})
    during = list(await asyncio.gather(*(pub.send("news", f"during {i}") for i in range(400))))
    await harness.call(f"/servers/{s['id']}/start")
    after = [await pub.send("news", f"after {i}") for i in range(5)]
    await consumer
    sent = before + during + after
    got = messages(seen, "news")
    assert [m.id for m in got] == [m.id for m in sorted(sent, key=lambda m: m.id)]
    assert [(m.id, m.text) for m in got] == [(m.id, m.text) for m in rec.messages["news"]]
    assert_exactly_once_in_order(rec, "news", sent)
    names = [e.name for e in seen]
    assert names.index("disconnected") < next(
        i for i, e in enumerate(seen) if e.name == "joined" and e.payload.rejoin)
    [rejoin] = [e.payload for e in seen if e.name == "joined" and e.payload.rejoin]
    assert rejoin.recovered is True
    # The iterator got what the handlers got, in their order (the Recorder's names).
    recorded = {name for name, _ in rec.events}
    got_all = [(e.name, e.payload) for e in seen if e.name in recorded]
    assert got_all == rec.events[:len(got_all)]
    await asyncio.gather(reader.close(), pub.close())
    rest = [event async for event in events]
    assert rest[-1].name == "disconnected" and not rest[-1].payload.reconnect_in


async def test_the_iteration_ends_after_the_events_before_close(harness: Harness) -> None:
    """close() while a task waits for the next event: the events queued before it are read,
    the last ones the ``state`` change and the ``disconnected`` (not reconnecting), then the
    ``async for`` ends without an exception. One made on the closed client ends at once; a
    ``connect()`` starts the client again, and an iterator made then gets its events, and
    ends on a close() while the client waits to reconnect."""
    server = await harness.server("memory")
    client = Client(server["url"], username="ann", request_timeout=TIMEOUT)
    events = client.events()  # before connect(): waits for it
    await client.connect()
    await client.join("hall")
    await client.send("hall", "one")
    seen = await read_until(events, lambda e: e.name == "message")
    rest: list[Event] = []

    async def read_rest() -> None:
        async for event in events:
            rest.append(event)
    reading = asyncio.create_task(read_rest())
    await client.send("hall", "two")
    await client.close()
    await asyncio.wait_for(reading, TIMEOUT)
    assert [e.payload.text for e in seen + rest if e.name == "message"] == ["one", "two"]
    assert [e.name for e in rest][-2:] == ["state", "disconnected"], rest
    assert rest[-2].payload.new is ConnectionState.DISCONNECTED
    assert isinstance(rest[-1].payload, Disconnect) and rest[-1].payload.reconnect_in is None
    assert not client._live_feeds()
    assert [e async for e in client.events()] == []
    await client.connect()
    again = client.events()
    await client.join("hall")
    await client.send("hall", "three")
    await read_until(again, lambda e: e.name == "message" and e.payload.text == "three")
    # Closed while waiting to reconnect: it ends too, the last event the state change.
    await harness.call(f"/servers/{server['id']}/stop")
    await read_until(again, lambda e: e.name == "disconnected")
    await client.close()
    tail = [e async for e in again]
    assert tail[-1].name == "state" and tail[-1].payload.new is ConnectionState.DISCONNECTED


async def test_a_stop_for_good_ends_the_iteration_with_its_client_closed(
        harness: Harness) -> None:
    """The server API disconnects the user (4003, not to be retried): the messages before it
    are read, then ``disconnected`` without a reconnect and, last, an ``error`` event
    carrying ``ClientClosed`` with ``close_code`` 4003; then the iteration ends."""
    api_key = "k" * 24
    server = await harness.server("memory", env={"API_KEY": api_key})
    client = Client(server["url"], token=await harness.token("ann"), backoff=BACKOFF,
                    request_timeout=TIMEOUT)
    await client.connect()
    await client.join("hall")
    events = client.events()
    await client.send("hall", "before")

    def disconnect() -> None:
        request = urllib.request.Request(
            server["metrics"] + "/api/disconnect", json.dumps({"user_id": "ann"}).encode(),
            {"Content-Type": "application/json", "Authorization": f"Bearer {api_key}"})
        with urllib.request.urlopen(request, timeout=TIMEOUT) as reply:
            assert json.loads(reply.read())["closed"] >= 1
    await asyncio.to_thread(disconnect)

    async def read_all() -> list[Event]:
        return [event async for event in events]
    seen = await asyncio.wait_for(read_all(), TIMEOUT)
    assert [m.text for m in messages(seen, "hall")] == ["before"]
    [stop] = [e.payload for e in seen if e.name == "error"]
    assert isinstance(stop, ClientClosed) and stop.close_code == 4003
    assert [e.name for e in seen][-3:] == ["state", "disconnected", "error"]
    assert seen[-2].payload.code == 4003 and seen[-2].payload.reconnect_in is None
    match seen[-1]:
        case Event("error", ClientClosed(close_code=code)):
            assert code == 4003
        case _:
            pytest.fail(f"not a ClientClosed: {seen[-1]}")
    with pytest.raises(ClientClosed):
        await client.send("hall", "after")
    await client.close()


async def test_two_iterators_each_get_every_event_from_their_creation(
        harness: Harness) -> None:
    """One iterator made before the join, one made by a ``message`` handler (at message 3):
    the first gets every message, the second those after 3 (the event being handled was
    queued before the handler ran), both in order and once, read at their own pace. One
    closed (``close()``, ``async with``) ends, and the others go on."""
    server = await harness.server("memory", env=FAST_ENV)
    client = Client(server["url"], username="ann", request_timeout=TIMEOUT)
    await client.connect()
    first = client.events()
    later: list[Events] = []
    client.on("message", lambda m: later.append(client.events()) if m.id == 3 else None)
    await client.join("hall")
    sent = [await client.send("hall", f"m{i}") for i in range(10)]
    got_first = messages(await read_until(first, lambda e: e.name == "message"
                                          and e.payload.id == 10), "hall")
    [second] = later
    got_second = messages(await read_until(second, lambda e: e.name == "message"
                                           and e.payload.id == 10), "hall")
    assert [m.id for m in got_first] == [m.id for m in sent] == list(range(1, 11))
    assert [m.id for m in got_second] == list(range(4, 11))
    assert first.qsize() == second.qsize() == 0
    # close() of one iterator: a task waiting on it ends, nothing more is queued in it; the
    # others go on.
    waiting = asyncio.create_task(anext(second, None))
    second.close()
    assert await asyncio.wait_for(waiting, TIMEOUT) is None
    async with client.events() as third:
        await client.send("hall", "m10")
        await read_until(third, lambda e: e.name == "message")
    await read_until(first, lambda e: e.name == "message" and e.payload.id == 11)
    assert second.qsize() == third.qsize() == 0 and await anext(third, None) is None
    await client.close()


async def test_positions_follow_the_events_read(harness: Harness) -> None:
    """``Events.position`` names the last message the iterator handed over, not the client's
    (``rooms``, ahead while events are queued): saved after handling message 2 of 5, it
    resumes another run's join with 3, 4, 5; a room left is no position."""
    server = await harness.server("memory")
    writer = Client(server["url"], username="bo", request_timeout=TIMEOUT)
    await writer.connect()
    await writer.join("hall")
    client = Client(server["url"], username="ann", request_timeout=TIMEOUT)
    rec = Recorder(client)
    await client.connect()
    events = client.events()
    assert events.position("hall") is None
    await client.join("hall")
    for i in range(5):
        await writer.send("hall", f"m{i}")
    await rec.wait_for(lambda: client.rooms["hall"].last_id == 5, what="the five messages")
    epoch = client.rooms["hall"].epoch
    assert epoch is not None
    assert events.position("hall") is None  # nothing of the room read yet
    await read_until(events, lambda e: e.name == "room_state")
    assert events.position("hall") == RoomPosition(None, None)  # joining
    await read_until(events, lambda e: e.name == "joined")
    assert events.position("hall") == RoomPosition(0, epoch)
    await read_until(events, lambda e: e.name == "message" and e.payload.id == 2)
    saved = events.position("hall")
    assert saved == RoomPosition(2, epoch) and events.qsize() >= 3  # 3, 4, 5 queued
    assert events.position("elsewhere") is None
    await client.leave("hall")
    await read_until(events, lambda e: e.name == "room_state" and e.payload.new == "left")
    assert events.position("hall") is None
    await client.close()

    again = Client(server["url"], username="ann", request_timeout=TIMEOUT)
    await again.connect()
    resumed = again.events()
    assert saved is not None
    await again.join("hall", since=saved.last_id, epoch=saved.epoch)
    got = messages(await read_until(resumed, lambda e: e.name == "message"
                                    and e.payload.id == 5), "hall")
    assert [m.text for m in got] == ["m2", "m3", "m4"]
    await asyncio.gather(again.close(), writer.close())


BREAK_PROGRAM = """
import asyncio, gc, sys
from wschat_client import Client

async def send(chat, prefix):
    for i in range(5):
        await chat.send("hall", f"{prefix}{i}")

async def main():
    async with Client(sys.argv[1], username="ann") as chat:
        await chat.join("hall")
        sending = asyncio.create_task(send(chat, "m"))  # runs once the loop below waits
        count = 0
        async for event in chat.events():
            if event.name == "message":
                count += 1
                if count == 2:
                    break
        gc.collect()
        assert not chat._live_feeds(), chat._live_feeds()
        kept = chat.events()
        await chat.send("hall", "kept")
        async for event in kept:
            break
        waiting = asyncio.create_task(anext(chat.events()))
        await asyncio.sleep(0)  # it waits for the next event
        waiting.cancel()
        await send(chat, "n")
        await sending
        assert waiting.cancelled() and kept in chat._live_feeds()
        del kept, waiting
        gc.collect()
        assert not chat._live_feeds(), chat._live_feeds()
    print("done", count)

asyncio.run(main())
"""


async def test_a_break_leaves_nothing_behind_and_warns_nothing(harness: Harness) -> None:
    """``break`` out of ``async for`` (and an iterator dropped while a task waited on it,
    cancelled): no iterator left in the client, nothing printed, under ``-W error``
    (``ResourceWarning`` and ``RuntimeWarning`` ``never awaited`` raise)."""
    server = await harness.server("memory")
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-W", "error", "-X", "tracemalloc", "-c", BREAK_PROGRAM, server["url"],
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    try:
        out, err = await asyncio.wait_for(proc.communicate(), LONG)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert (proc.returncode, out, err) == (0, b"done 2\n", b""), (out, err)


def test_a_sync_client_s_events_block_and_end_on_close(harness: Harness) -> None:
    """``SyncClient.events()``: a plain ``for`` on the app's thread gets every message, in
    order; ``close()`` from another thread ends it after the events before it; read in a
    handler (the client's thread) it raises ``RuntimeError`` rather than hang; made on the
    closed client it ends at once."""
    server = harness.call_sync("/servers", {"backend": "memory"})
    failures: list[BaseException] = []
    with SyncClient(server["url"], username="bo", request_timeout=TIMEOUT) as writer, \
            SyncClient(server["url"], username="ann", request_timeout=TIMEOUT) as chat:
        writer.join("general")
        events = chat.events()

        def in_handler(_: Any) -> None:
            try:
                next(events)
            except RuntimeError as exc:
                failures.append(exc)
        remove = chat.on("joined", in_handler)
        chat.join("general")
        remove()
        sent = [writer.send("general", f"m{i}") for i in range(5)]
        got: list[Message] = []
        for event in events:
            if event.name == "message":
                got.append(event.payload)
                if len(got) == 5:
                    break
        assert [m.id for m in got] == [m.id for m in sent]
        assert events.position("general") is not None
        assert events.position("general").last_id == 5  # type: ignore[union-attr]
        rest = chat.events()
        writer.send("general", "last")
        tail = []
        for event in rest:
            tail.append(event)
            if event.name == "message":
                break
        closer = threading.Thread(target=chat.close)  # while the loop below blocks
        closer.start()
        tail += [e for e in rest]
        closer.join(TIMEOUT)
        assert [e.payload.text for e in tail if e.name == "message"] == ["last"]
        assert tail[-1].name == "disconnected"
        assert list(chat.events()) == []
    assert len(failures) == 1 and "handler" in str(failures[0])
