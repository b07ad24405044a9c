"""The outbox against the real server: a rejoin it cannot replay, leave, its rate limit.

Each test reproduces, through the harness, a case where the outbox and the server's
rules met badly: a send stuck after ``recovered: false`` with no replay, sends failed by
``leave`` although stored, a send window wider than the server's flood limit, and a
window refilled at once after each ``rate_limited`` pause (a refusal per send in it).
"""

from __future__ import annotations

import asyncio
import json
import socket
import urllib.request
from pathlib import Path
from typing import Any

from conftest import TIMEOUT, Harness, Recorder
from wschat.config import Settings
from wschat_client import Backoff, ChatError, Client, Message

BACKOFF = Backoff(min_delay=0.2, max_delay=1.0, pause=1.0)
LONG = 6 * TIMEOUT


async def connected(harness: Harness, url: Any, sub: str, room: str,
                    **options: Any) -> tuple[Client, Recorder]:
    client = Client(url, token=await harness.token(sub), backoff=BACKOFF,
                    request_timeout=TIMEOUT, **options)
    rec = Recorder(client)
    await client.connect()
    await client.join(room)
    return client, rec


def closed_port() -> int:
    """A port nobody listens on (connections to it are refused)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def test_send_goes_out_after_a_rejoin_the_server_cannot_replay(harness: Harness,
                                                                     tmp_path: Path) -> None:
    """More than 1000 messages missed (persistence): joined says recovered: false and
    replays nothing; the send queued meanwhile still goes out, with no new message."""
    server = await harness.server("memory", env={
        "ENABLE_PERSISTENCE": "1", "DATABASE_URL": f"sqlite:///{tmp_path / 'wschat.db'}"})
    offline = f"ws://127.0.0.1:{closed_port()}/ws"
    reachable = True
    alice, rec_a = await connected(harness, lambda: server["url"] if reachable else offline,
                                   "alice", "deep")
    bob, _ = await connected(harness, server["url"], "bob", "deep")
    first = await bob.send("deep", "before")
    await rec_a.wait_for(lambda: rec_a.ids("deep") == [first.id], what="the first message")
    reachable = False
    assert alice._ws is not None
    alice._ws.transport.abort()
    await rec_a.wait_for(lambda: rec_a.of("disconnected"), what="the cut")
    sending = asyncio.create_task(alice.send("deep", "written while offline"))
    missed: list[Message] = []
    for start in range(0, 1001, 250):  # one more than the server replays
        missed += await asyncio.wait_for(asyncio.gather(
            *(bob.send("deep", f"m{i}") for i in range(start, min(start + 250, 1001)))), LONG)
    reachable = True
    await rec_a.wait_for(lambda: rec_a.of("recovery_failed"), LONG, "the rejoin")
    try:
        sent = await asyncio.wait_for(asyncio.shield(sending), 2 * TIMEOUT)
    except TimeoutError:
        raise AssertionError(f"the send stayed in the outbox after {rec_a.of('joined')[-1]}: "
                             f"{[p.text for p in alice.pending]}") from None
    assert sent.id == missed[-1].id + 1 and alice.pending == []
    await asyncio.gather(alice.close(), bob.close())


async def test_leave_right_after_sends_resolves_them_with_their_echo(harness: Harness) -> None:
    """Sends on the wire when leave() is called resolve (the server stored them), even where
    the echo comes through Redis pub/sub and could come after the leave; none is doubled."""
    server = await harness.server("redis", workers=2)
    alice, _ = await connected(harness, server["url"], "alice", "exit")
    bob, rec_b = await connected(harness, server["url"], "bob", "exit")
    sent: list[Message] = []
    for round_ in range(20):
        sends = [asyncio.create_task(alice.send("exit", f"{round_}.{i}")) for i in range(3)]
        await asyncio.sleep(0)  # let each send reach the outbox and be written
        assert [p.wire_generation is not None for p in alice.pending] == [True] * 3
        await alice.leave("exit")
        results = await asyncio.gather(*sends, return_exceptions=True)
        failed = [r for r in results if not isinstance(r, Message)]
        assert not failed, f"round {round_}: sends the server stored failed: {failed}"
        sent += results
        await alice.join("exit")
    wanted = sorted((m.id, m.text) for m in sent)
    await rec_b.wait_for(lambda: sorted((m.id, m.text) for m in rec_b.messages["exit"]) == wanted,
                         LONG, "every message at bob")
    await asyncio.gather(alice.close(), bob.close())


async def test_a_burst_within_the_server_default_rate_limit_is_never_closed(
        harness: Harness) -> None:
    """100 sends at once with the server's default RATE_LIMIT and RATE_LIMIT_BURST: the
    default window and the pause on rate_limited deliver all without a 4102 (flooding)."""
    defaults = Settings()
    server = await harness.server("memory", env={
        "RATE_LIMIT": str(defaults.rate_limit), "RATE_LIMIT_BURST": str(defaults.rate_limit_burst)})
    carol, rec = await connected(harness, server["url"], "carol", "burst")
    sent = await asyncio.wait_for(
        asyncio.gather(*(carol.send("burst", f"m{i}") for i in range(100))), LONG)
    closes = [(d.code, d.reason) for d in rec.of("disconnected")]
    assert not closes, f"the burst got the connection closed: {closes}"
    assert [m.id for m in sent] == list(range(1, 101))
    await carol.close()


def refusals(server: dict[str, Any]) -> int:
    """The server's count of ``rate_limited`` refusals so far (``/metrics/json``)."""
    with urllib.request.urlopen(f"{server['metrics']}/metrics/json", timeout=TIMEOUT) as reply:
        return int(json.loads(reply.read())["rate_limited"])


async def test_a_burst_past_the_rate_limit_draws_few_refusals(harness: Harness) -> None:
    """100 sends at once, 20 over the server's burst then 50 a second: past the first
    rate_limited the sends are paced, so the server refuses about a window of them, not
    ~15 per message (a whole window after every pause); all arrive once, in id order, and
    are stored in the order sent."""
    server = await harness.server("memory", env={"RATE_LIMIT": "50", "RATE_LIMIT_BURST": "20"})
    dora, rec = await connected(harness, server["url"], "dora", "pace")
    before = await asyncio.to_thread(refusals, server)
    sent = await asyncio.wait_for(
        asyncio.gather(*(dora.send("pace", f"m{i}") for i in range(100))), LONG)
    refused = await asyncio.to_thread(refusals, server) - before
    assert refused <= 40, f"{refused} rate_limited refusals for 100 sends"
    assert not rec.of("disconnected")
    ids = [m.id for m in sent]
    assert sorted(ids) == list(range(1, 101)), "a send lost or stored twice"
    assert ids == list(range(1, 101)), f"stored in another order than sent: {ids}"
    await rec.wait_for(lambda: len(rec.ids("pace")) >= 100, what="every message delivered")
    assert [(m.id, m.text) for m in rec.messages["pace"]] == sorted(
        (m.id, m.text) for m in sent)
    await dora.close()


async def test_a_refusal_another_connection_caused_does_not_slow_this_one(
        harness: Harness) -> None:
    """The bucket is the user's: a phone writes once and is quiet, a laptop of the same
    user empties the bucket, the phone's next send is refused (retry_after 0.1 s). The
    phone's quiet spell is not the server's pace: its 4 sends go out at about the
    server's rate (10 a second), not one per quiet spell."""
    server = await harness.server("memory", env={"RATE_LIMIT": "10", "RATE_LIMIT_BURST": "5"})
    phone, _ = await connected(harness, server["url"], "ann", "r")
    laptop, _ = await connected(harness, server["url"], "ann", "r")
    await phone.send("r", "hello")  # the phone's write before the refused one
    await asyncio.sleep(1.5)  # the scenario: a quiet spell on the phone (no event to await)
    before = await asyncio.to_thread(refusals, server)
    await asyncio.wait_for(
        asyncio.gather(*(laptop.send("r", f"laptop {i}") for i in range(5))), TIMEOUT)
    loop = asyncio.get_running_loop()
    started = loop.time()
    for i in range(4):
        await asyncio.wait_for(phone.send("r", f"phone {i}"), LONG)
    took = loop.time() - started
    assert await asyncio.to_thread(refusals, server) > before, "the phone was never refused"
    assert took < 1.2, f"4 sends took {took:.1f} s (pacer interval {phone._pacer.interval:.2f} s)"
    await asyncio.gather(phone.close(), laptop.close())


async def test_a_refused_send_of_a_left_room_does_not_hold_the_others_for_long(
        harness: Harness) -> None:
    """A send to room a is refused rate_limited, and a is left before it is sent again:
    the client fails it, so it never comes again. The sends to room b written with it,
    held back by the server until then (it keeps a sender's order), go out within the
    hold's 2 s, and the connection is not closed as a flooder (it was, 4102, when each
    held refusal asked for 1 ms and counted as a strike)."""
    server = await harness.server("memory", env={"RATE_LIMIT": "10", "RATE_LIMIT_BURST": "20"})
    alice, rec = await connected(harness, server["url"], "alice", "a")
    await alice.join("b")
    await asyncio.gather(*(alice.send("b", f"burst{i}") for i in range(20)))  # the bucket's
    dropped = asyncio.create_task(alice.send("a", "dropped"))
    later = [asyncio.create_task(alice.send("b", f"n{i}")) for i in range(3)]
    await asyncio.sleep(0)  # all four written
    await alice.leave("a")
    assert isinstance((await asyncio.gather(dropped, return_exceptions=True))[0], ChatError)
    sent = await asyncio.wait_for(asyncio.gather(*later), LONG)
    assert [m.text for m in sent] == ["n0", "n1", "n2"]
    assert not rec.of("disconnected"), rec.of("disconnected")
    await alice.close()
