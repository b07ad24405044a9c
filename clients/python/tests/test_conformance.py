"""The shared conformance scenarios (clients/conformance/README.md) against the real server.

Each test drives real gunicorn servers (and Redis) through the harness and
asserts, from the app's side (the client's events), that every acknowledged
message reaches every member exactly once and in id order.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import pytest
from conftest import TIMEOUT, Harness, Recorder, assert_exactly_once_in_order, delivered
from wschat_client import (
    Backoff,
    ChatError,
    Client,
    ConnectionState,
    HistoryPage,
    Message,
    Removed,
    RequestTimeout,
    RoomState,
)

# Real timing, a little tighter at the top so the suite does not wait 20 s for a restart.
BACKOFF = Backoff(min_delay=0.2, max_delay=3.0, pause=1.0)
LONG = 6 * TIMEOUT  # server restarts, Redis coming back, under a loaded machine


def make_client(url: str | Callable[[], str], **options: Any) -> tuple[Client, Recorder]:
    client = Client(url, backoff=BACKOFF, request_timeout=TIMEOUT, **options)
    return client, Recorder(client)


async def connected(harness: Harness, url: str | Callable[[], str], sub: str,
                    room: str | None = None, **options: Any) -> tuple[Client, Recorder]:
    """A client signed in as ``sub``, connected, and joined to ``room`` if given."""
    token = await harness.token(sub)
    client, rec = make_client(url, token=token, **options)
    await client.connect()
    if room is not None:
        await client.join(room)
    return client, rec


def failover(first: str, then: str) -> Callable[[], str]:
    """A URL function: ``first`` for the first attempt, ``then`` for every later one."""
    attempts = iter([first])
    return lambda: next(attempts, then)


def cut(client: Client) -> None:
    """Drop the client's TCP connection without a close frame (its echoes in flight are lost)."""
    assert client._ws is not None, "the client is not connected"
    client._ws.transport.abort()


async def publish(client: Client, room: str, count: int, prefix: str) -> list[Message]:
    """Send ``count`` messages one after the other (each awaited), as acknowledged."""
    return [await client.send(room, f"{prefix}{i}") for i in range(count)]


def ids(messages: list[Message]) -> list[int]:
    return [m.id for m in messages]


class Publisher:
    """Sends to ``room`` one message after another (each awaited) until stopped."""

    def __init__(self, client: Client, room: str, prefix: str, pace: float = 0.02) -> None:
        self.client, self.room, self.prefix, self.pace = client, room, prefix, pace
        self.sent: list[Message] = []
        self._stop = asyncio.Event()
        self._task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        while not self._stop.is_set():
            self.sent.append(await self.client.send(self.room, f"{self.prefix}{len(self.sent)}"))
            await asyncio.sleep(self.pace)  # a steady sender, not a synchronisation

    async def sent_more(self, count: int) -> None:
        """Wait until ``count`` more messages were acknowledged."""
        target = len(self.sent) + count
        await eventually(lambda: len(self.sent) >= target, f"{count} more sends", LONG)

    async def stop(self) -> list[Message]:
        self._stop.set()
        await asyncio.wait_for(self._task, LONG)
        return self.sent


async def eventually(predicate: Callable[[], bool], what: str, timeout: float = TIMEOUT) -> None:
    """Poll a condition no event announces (e.g. the outbox's retry counters)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.05)


async def all_delivered(recorders: list[Recorder], room: str, sent: list[Message]) -> None:
    """Every acknowledged message reaches every recorder's app once, in id order."""
    wanted = {(m.id, m.text) for m in sent}
    for rec in recorders:
        await rec.wait_for(lambda rec=rec: wanted <= delivered(rec, room), LONG,
                           f"{sorted(wanted - delivered(rec, room))} at {rec.client.username}")
    for rec in recorders:
        assert_exactly_once_in_order(rec, room, sent)


async def close_all(*clients: Client) -> None:
    await asyncio.gather(*(c.close() for c in clients))


async def test_connect_and_welcome(harness: Harness) -> None:
    """A token client and a guest reach connected and expose user_id/username."""
    server = await harness.server("memory")
    alice, rec = await connected(harness, server["url"], "alice")
    assert alice.state is ConnectionState.CONNECTED
    assert (alice.user_id, alice.username, alice.authenticated) == ("alice", "Alice", True)
    assert [(c.old.value, c.new.value) for c in rec.of("state")] == [
        ("disconnected", "connecting"), ("connecting", "connected")]
    (welcome,) = rec.of("connected")
    assert welcome.user_id == "alice" and welcome.heartbeat_interval
    guest, _ = make_client(server["url"], username="bob")
    await guest.connect()
    assert (guest.user_id or "").startswith("guest-") and guest.username == "bob"
    await guest.ping()
    await close_all(alice, guest)
    assert alice.state is ConnectionState.DISCONNECTED


async def test_join_send_ack(harness: Harness) -> None:
    """send resolves with ids 1, 2, ...; the other member gets each once, in order."""
    server = await harness.server("memory")
    a, rec_a = await connected(harness, server["url"], "ann", "lobby")
    b, rec_b = await connected(harness, server["url"], "ben", "lobby")
    sent = await publish(a, "lobby", 20, "hello ")
    assert ids(sent) == list(range(1, 21))
    await all_delivered([rec_a, rec_b], "lobby", sent)
    assert [m.text for m in rec_b.messages["lobby"]] == [f"hello {i}" for i in range(20)]
    history = await b.history("lobby", limit=5)
    assert [m.id for m in history] == [16, 17, 18, 19, 20]
    assert {u.user_id for u in await a.list_users("lobby")} == {"ann", "ben"}
    dm = await a.dm("ben", "psst")
    await rec_b.wait_for(lambda: rec_b.of("dm"), what="the dm")
    assert [d.id for d in rec_b.of("dm")] == [dm.id] and rec_b.of("dm")[0].text == "psst"
    await close_all(a, b)


async def test_recovery_after_server_close(harness: Harness) -> None:
    """S stops and starts; P's messages meanwhile are replayed to S's client, once, in order."""
    s = await harness.server("redis")
    p = await harness.server("redis")
    client, rec = await connected(harness, s["url"], "cara", "news")
    pub, _ = await connected(harness, p["url"], "pete", "news")
    before = await publish(pub, "news", 5, "before ")
    await rec.wait_for(lambda: rec.ids("news") == ids(before))
    await harness.call(f"/servers/{s['id']}/stop", {"signal": "TERM"})
    assert rec.of("disconnected")[0].code == 1001
    during = await publish(pub, "news", 20, "during ")
    await harness.call(f"/servers/{s['id']}/start")
    await all_delivered([rec], "news", before + during)
    rejoins = [j for j in rec.of("joined") if j.rejoin]
    assert rejoins and rejoins[-1].recovered is True
    assert not rec.of("recovery_failed")
    after = await publish(pub, "news", 3, "after ")
    await all_delivered([rec], "news", before + during + after)
    await close_all(client, pub)


async def test_rolling_restart(harness: Harness) -> None:
    """A gets TERM mid-stream; its clients move to B; every acknowledged message arrives once."""
    a = await harness.server("redis")
    b = await harness.server("redis")
    c1, rec1 = await connected(harness, failover(a["url"], b["url"]), "cleo", "deploy")
    c2, rec2 = await connected(harness, failover(a["url"], b["url"]), "carl", "deploy")
    pub, rec_pub = await connected(harness, b["url"], "pia", "deploy")
    steady = Publisher(pub, "deploy", "steady ")
    await steady.sent_more(10)
    from_c1 = asyncio.create_task(publish(c1, "deploy", 10, "moving "))  # sends across the move
    await harness.call(f"/servers/{a['id']}/stop", {"signal": "TERM"})
    for rec in (rec1, rec2):
        await rec.wait_for(lambda rec=rec: len(rec.of("joined")) >= 2, LONG, "the move to B")
    await steady.sent_more(10)
    acked = await steady.stop() + await from_c1
    await all_delivered([rec1, rec2, rec_pub], "deploy", acked)
    for rec in (rec1, rec2):
        assert [d.code for d in rec.of("disconnected")] == [1001]
    await close_all(c1, c2, pub)


async def test_redis_restart(harness: Harness) -> None:
    """Sends during a Redis outage wait and retry; afterwards all arrive once; ids never go back."""
    server = await harness.server("redis")
    a, rec_a = await connected(harness, server["url"], "ada", "store")
    b, rec_b = await connected(harness, server["url"], "bea", "store")
    first = await publish(a, "store", 5, "before ")
    await harness.call("/redis/stop")
    during = [asyncio.create_task(a.send("store", f"during {i}")) for i in range(5)]
    # Each meets the outage (unavailable) and waits in the outbox for its retry.
    await eventually(lambda: len(a.pending) == 5 and all(p.failures for p in a.pending),
                     "every send refused with unavailable")
    assert not any(t.done() for t in during), "a send was acknowledged without Redis"
    await harness.call("/redis/start")
    later = list(await asyncio.wait_for(asyncio.gather(*during), LONG))
    assert ids(later) == sorted(ids(later)) and later[0].id > first[-1].id, (
        f"ids went back: {ids(first)} then {ids(later)}")
    after = await publish(a, "store", 3, "after ")
    assert after[0].id > later[-1].id
    await all_delivered([rec_a, rec_b], "store", first + later + after)
    await close_all(a, b)


async def test_kill_worker(harness: Harness) -> None:
    """kill -9 of a worker: its clients reconnect and recover; nothing lost or doubled."""
    server = await harness.server("redis", workers=2)
    p = await harness.server("redis")
    pub, _ = await connected(harness, p["url"], "paul", "crash")
    members = [await connected(harness, server["url"], f"m{i}", "crash") for i in range(6)]
    recs = [rec for _, rec in members]
    steady = Publisher(pub, "crash", "steady ")
    await steady.sent_more(5)
    hit: list[Recorder] = []
    for _ in range(2):  # the first victim may have held none of our clients
        await harness.call(f"/servers/{server['id']}/kill-worker")
        try:  # a killed worker's sockets are reset at once
            await eventually(lambda: any(rec.of("disconnected") for rec in recs),
                             "a client on the killed worker", 2.0)
        except AssertionError:
            continue
        hit = [rec for rec in recs if rec.of("disconnected")]
        break
    assert hit, "no client was on a killed worker"
    for rec in hit:
        await rec.wait_for(lambda rec=rec: len(rec.of("joined")) >= 2, LONG, "the re-join")
        assert rec.of("disconnected")[0].code == 1006
    await steady.sent_more(10)
    acked = await steady.stop()
    await all_delivered(recs, "crash", acked)
    await close_all(pub, *(c for c, _ in members))


async def test_token_refresh(harness: Harness) -> None:
    """get_token runs before expiry; the session outlives the first token; reconnects use it."""
    server = await harness.server("memory")
    issued: list[tuple[float, str]] = []

    async def get_token() -> str:
        token = await harness.token("tom", ttl=2)
        issued.append((time.time(), token))
        return token

    client, rec = make_client(server["url"], get_token=get_token)
    await client.connect()
    await client.join("auth")
    first_expiry = issued[0][0] + 2 + 5  # exp + the server's JWT_LEEWAY
    await eventually(lambda: len(issued) >= 4, "three refreshes", 4 * TIMEOUT)
    while time.time() < first_expiry + 1:
        await client.ping()  # the connection outlives its first token
        await asyncio.sleep(0.5)
    assert client.state is ConnectionState.CONNECTED and client.authenticated
    assert not rec.of("disconnected") and not rec.of("error")
    assert [j.rejoin for j in rec.of("joined")] == [False]  # the same user: no rejoin
    assert (await client.send("auth", "still here")).user_id == "tom"
    calls = len(issued)
    cut(client)
    await rec.wait_for(lambda: len(rec.of("connected")) == 2, LONG, "the reconnect")
    assert len(issued) > calls  # the reconnect asked for a fresh token
    assert (await client.send("auth", "after reconnect")).user_id == "tom"
    await client.close()


async def test_user_changed_on_refresh(harness: Harness) -> None:
    """Scenario 11: the refresh's token is another user's (ben, whose rooms claim is
    ["open"]). The server left every room of the connection, with no left: the client
    says so once (user_changed, ben's welcome) and joins each room again with since, as
    after a reconnect. open is joined again as ben, and what was posted there from the
    refresh on arrives once, in order; closed is refused (forbidden), so it is removed.
    Before, both stayed joined for the app, and nothing of them arrived."""
    server = await harness.server("memory")
    setup_done = asyncio.Event()
    issued: list[str] = []

    async def get_token() -> str:
        issued.append("ann" if not issued else "ben")
        if len(issued) == 1:
            return await harness.token("ann", ttl=3)  # refreshed after 2.25 s
        await asyncio.wait_for(setup_done.wait(), LONG)  # ann has seen 1..3 of each room
        return await harness.token("ben", rooms=["open"])

    client, rec = make_client(server["url"], get_token=get_token)
    changed: list[Any] = []
    removed: list[Removed] = []
    client.on("user_changed", changed.append)
    client.on("removed", removed.append)
    await client.connect()
    assert client.user_id == "ann"
    pub, _ = await connected(harness, server["url"], "pat")
    for room in ("open", "closed"):
        await client.join(room)
        await pub.join(room)
    before = {room: await publish(pub, room, 3, f"{room} before ") for room in ("open", "closed")}
    await rec.wait_for(lambda: rec.ids("open") == rec.ids("closed") == [1, 2, 3], LONG,
                       "1..3 of each room at ann")
    steady = Publisher(pub, "open", "across the refresh ")  # from the refresh on, and after
    setup_done.set()
    await rec.wait_for(lambda: bool(removed) and any(
        j.room == "open" and j.rejoin for j in rec.of("joined")), LONG, "the rejoins")
    assert [(w.user_id, w.username, w.authenticated) for w in changed] == [("ben", "Ben", True)]
    assert (client.user_id, client.username, client.authenticated) == ("ben", "Ben", True)
    assert [(r.room, r.reason) for r in removed] == [("closed", "forbidden")]
    assert "closed" not in client.rooms
    assert client.rooms["open"].state is RoomState.JOINED
    assert "ben" in {u.user_id for u in await client.list_users("open")}
    assert "ann" not in {u.user_id for u in await client.list_users("open")}
    await steady.sent_more(5)  # posted after ben is in open again
    mine = await client.send("open", "as ben")
    assert mine.user_id == "ben"
    acked = await steady.stop()
    await all_delivered([rec], "open", before["open"] + acked + [mine])
    got = rec.ids("open")
    assert got == list(range(1, len(got) + 1)), f"lost, doubled or out of order: {got}"
    assert rec.ids("closed") == [1, 2, 3]
    assert [e.code for e in rec.of("error")] == ["forbidden"]
    assert not rec.of("disconnected") and len(changed) == 1
    await close_all(client, pub)


async def test_a_refresh_refused_for_now_waits_for_retry_after_ms(harness: Harness) -> None:
    """A token refresh the server cannot carry out now (its `auth` answered `rate_limited`
    here; `unavailable` and `internal_error` are the same case) keeps the connection and
    its token, and is tried again after the backoff, never before `retry_after_ms`: one
    refusal, then the fresh token is in use and the session goes on."""
    server = await harness.server("memory", env={"RATE_LIMIT_REQUESTS": "1",
                                                 "RATE_LIMIT_REQUESTS_BURST": "5"})
    issued: list[str] = []

    async def get_token() -> str:
        issued.append(await harness.token("rita", ttl=4))
        return issued[-1]

    client, rec = make_client(server["url"], get_token=get_token)
    await client.connect()
    for _ in range(5):  # the user's request bucket spent: the refresh's auth (5) must wait
        await client.ping()
    await eventually(lambda: len(issued) >= 2 and client._token == issued[-1],
                     "the refreshed token in use", 4 * TIMEOUT)
    refused = [e for e in rec.of("error") if e.code == "rate_limited"]
    assert len(refused) == 1, [(e.code, e.retry_after_ms) for e in refused]
    assert refused[0].retry_after_ms and refused[0].retry_after_ms >= 500
    assert [e.code for e in rec.of("error")] == ["rate_limited"]
    assert not rec.of("disconnected") and client.state is ConnectionState.CONNECTED
    await client.join("refresh")
    assert (await client.send("refresh", "after the refresh")).user_id == "rita"
    await client.close()


async def test_outbox_resend(harness: Harness) -> None:
    """Sends pending when the socket is cut, and sends made while disconnected, arrive once, in order."""
    server = await harness.server("memory")
    a, rec_a = await connected(harness, server["url"], "otto", "box")
    b, rec_b = await connected(harness, server["url"], "olga", "box")
    # Cut at the first acknowledgement: the other sends are written, some already
    # stored by the server, their echoes still on the way (and lost with the socket).
    def cut_once(_: Message) -> None:
        stop_cutting()
        cut(a)

    stop_cutting = a.on("ack", cut_once)
    pending = [asyncio.create_task(a.send("box", f"pending {i}")) for i in range(30)]
    dms = [asyncio.create_task(a.dm("olga", f"dm {i}")) for i in range(10)]
    await rec_a.wait_for(lambda: rec_a.of("disconnected"), what="the cut")
    offline = [asyncio.create_task(a.send("box", f"offline {i}")) for i in range(10)]
    await asyncio.sleep(0)
    assert a.state is ConnectionState.CONNECTING and len(a.pending) > 10
    sent: list[Message] = await asyncio.wait_for(asyncio.gather(*pending, *offline), LONG)
    texts = [m.text for m in sent]
    assert texts == [f"pending {i}" for i in range(30)] + [f"offline {i}" for i in range(10)]
    assert ids(sent[30:]) == sorted(ids(sent[30:])), "offline sends went out of order"
    assert sorted(ids(sent)) == list(range(1, 41)), f"stored twice or lost: {ids(sent)}"
    await all_delivered([rec_a, rec_b], "box", sent)
    assert len(rec_b.ids("box")) == 40
    # DMs have no replay: a resent one is deduplicated by the server (the original returns).
    dm_ids = [d.id for d in await asyncio.wait_for(asyncio.gather(*dms), LONG)]
    await rec_b.wait_for(lambda: len(rec_b.of("dm")) >= 10, what="the DMs")
    got = rec_b.of("dm")
    assert sorted(d.text for d in got) == sorted(f"dm {i}" for i in range(10))
    assert sorted(d.id for d in got) == sorted(dm_ids) and len(set(dm_ids)) == 10
    await close_all(a, b)


async def test_history_truncated(harness: Harness) -> None:
    """A history page cut at the server's 1 MiB bound says ``truncated``; paging back with
    ``before`` until a page is neither truncated nor full gets every message once."""
    # 20 messages of ~60 kB: 1.2 MB, past the 1 MiB a history reply holds (HISTORY_MAX_BYTES).
    server = await harness.server("memory", env={"MAX_TEXT_CHARS": "60000"})
    client, _ = await connected(harness, server["url"], "paula", "big")
    texts = [f"{i:02d} " + "x" * 59_990 for i in range(1, 21)]
    sent = [await client.send("big", text) for text in texts]
    assert ids(sent) == list(range(1, 21))

    newest = await client.history_page("big", limit=20)
    got = ids(newest.messages)
    assert newest.truncated is True, len(got)
    assert 1 <= len(got) < 20 and got == list(range(21 - len(got), 21)), got
    assert [m.text for m in newest.messages] == texts[20 - len(got):]
    assert await client.history("big", limit=20) == newest.messages
    assert await client.history_page("big", limit=2) == HistoryPage(newest.messages[-2:], False)

    pages = [newest]
    while pages[-1].truncated or len(pages[-1].messages) == 20:
        before = pages[-1].messages[0].id
        pages.append(await client.history_page("big", limit=20, before=before))
    assert [m.id for page in reversed(pages) for m in page.messages] == list(range(1, 21))
    assert pages[-1].truncated is False
    await close_all(client)


def assert_refused_but_never_flooded(seen: list[str]) -> None:
    """The server's answers in order ("refused": a rate_limited): the bucket was emptied
    (else the test tests nothing), and fewer refusals came in a row than the 20 (2 x
    RATE_LIMIT_BURST, 10 in these tests) after which the server closes with 4102."""
    run = longest = 0
    for what in seen:
        run = run + 1 if what == "refused" else 0
        longest = max(longest, run)
    assert "refused" in seen, "the bucket was never empty: the test tests nothing"
    assert longest < 20, f"{longest} refusals in a row: {''.join(w[0] for w in seen)}"


async def test_many_rooms_rejoined_by_two_tabs_are_paced_not_cut_off(harness: Harness) -> None:
    """70 rooms joined, then rejoined after a cut, by two connections of one user at once:
    they share the user's request bucket (RATE_LIMIT_REQUESTS_BURST 5 here). Every join
    was written at once: 5 joined, then 2 x RATE_LIMIT_BURST (20) refusals in a row and the
    connection closed with 4102, reconnected and did it again. Now at most 4 joins are on
    the wire and a refused one holds them all back until its retry_after_ms: every room
    ends joined, on both, and nothing is closed. The refusals in a row: the window's 4,
    and a few more when the other tab keeps taking the tokens (each doubles the pause)."""
    server = await harness.server("memory", env={
        "RATE_LIMIT_BURST": "10", "RATE_LIMIT_REQUESTS": "50", "RATE_LIMIT_REQUESTS_BURST": "5"})
    rooms = [f"many-{i}" for i in range(70)]
    tabs = [await connected(harness, server["url"], "tab") for _ in range(2)]
    refusals: list[list[str]] = [[], []]
    for n, (client, _) in enumerate(tabs):
        original = client._dispatch

        def dispatch(raw: Any, original: Any = original, seen: list[str] = refusals[n]) -> None:
            if '"rate_limited"' in str(raw):
                seen.append("refused")
            elif '"joined"' in str(raw):
                seen.append("joined")
            original(raw)
        client._dispatch = dispatch  # type: ignore[method-assign]
    joined = await asyncio.wait_for(asyncio.gather(
        *(client.join(room, timeout=LONG) for client, _ in tabs for room in rooms)), LONG)
    assert len(joined) == 140
    for client, rec in tabs:
        cut(client)
    for client, rec in tabs:
        await rec.wait_for(lambda rec=rec: len(rec.of("connected")) >= 2, LONG, "the reconnect")
        await rec.wait_for(lambda rec=rec: len(rec.of("joined")) >= 140, LONG, "the rejoins")
    for client, rec in tabs:
        assert [d.code for d in rec.of("disconnected") if d.code != 1006] == [], refusals
        assert all(r.state.value == "joined" for r in client.rooms.values()), client.rooms
        assert len(client.rooms) == 70
    for seen in refusals:
        assert_refused_but_never_flooded(seen)
    await close_all(*(client for client, _ in tabs))


async def test_a_memory_server_restart_is_told_apart_by_the_epoch(harness: Harness) -> None:
    """A memory server restarts: the room numbers from 1 again under a new epoch, and pete
    posts past cara's last id before she is back. Her re-join carries since 3 and the old
    epoch: recovered: false, nothing replayed (the new 4 and 5 are not what followed her 3),
    recovery_failed with epoch_changed, and her position is the new numbering's 5, so the
    next live message, 6, is delivered. Without the epoch the server replayed the new 4 and
    5 as recovered."""
    server = await harness.server("memory")
    back = asyncio.Event()
    attempts = 0

    async def url() -> str:  # cara stays away until pete has posted in the new numbering
        nonlocal attempts
        attempts += 1
        if attempts > 1:
            await back.wait()
        return server["url"]

    cara, rec = await connected(harness, url, "cara", "lobby")
    pete, rec_pub = await connected(harness, server["url"], "pete", "lobby")
    before = await publish(pete, "lobby", 3, "before ")
    await rec.wait_for(lambda: rec.ids("lobby") == [1, 2, 3])
    epoch = cara.rooms["lobby"].epoch
    assert epoch and rec.of("joined")[0].epoch == epoch
    await harness.call(f"/servers/{server['id']}/stop", {"signal": "TERM"})
    await harness.call(f"/servers/{server['id']}/start")
    await rec_pub.wait_for(lambda: len(rec_pub.of("joined")) >= 2, LONG, "pete's re-join")
    during = await publish(pete, "lobby", 5, "new numbering ")
    assert ids(during) == [1, 2, 3, 4, 5], f"not a new numbering: {ids(during)}"
    back.set()
    await rec.wait_for(lambda: len(rec.of("joined")) >= 2, LONG, "cara's re-join")
    rejoin = rec.of("joined")[-1]
    assert (rejoin.rejoin, rejoin.recovered, rejoin.last_id) == (True, False, 5)
    assert rejoin.epoch and rejoin.epoch != epoch
    assert [(f.since, f.last_id, f.epoch_changed) for f in rec.of("recovery_failed")] == [
        (3, 5, True)]
    assert (cara.rooms["lobby"].last_id, cara.rooms["lobby"].epoch) == (5, rejoin.epoch)
    after = await publish(pete, "lobby", 1, "after ")
    mine = await cara.send("lobby", "cara is back")
    assert (ids(after), mine.id) == ([6], 7)
    await rec.wait_for(lambda: rec.ids("lobby")[-1:] == [7], LONG, "6 and 7 at cara")
    assert [(m.id, m.text) for m in rec.messages["lobby"]] == [
        (m.id, m.text) for m in before + after + [mine]]
    await close_all(cara, pete)


async def test_a_memory_server_restart_numbers_dms_from_1_and_they_are_delivered(
        harness: Harness) -> None:
    """Without persistence a restarted server numbers DMs from 1 again. The client kept the
    ids of the DMs it had seen across connections and dropped the new 1 and 2 as doubles of
    them, without a word; it keeps them across connections only with persistence (whose
    welcome has dm_backlog), and a memory server's DMs after the restart are delivered."""
    server = await harness.server("memory")
    amy, rec = await connected(harness, server["url"], "dmamy")
    ben, rec_ben = await connected(harness, server["url"], "dmben")
    for text in ("before 0", "before 1"):
        await ben.dm("dmamy", text)
    await rec.wait_for(lambda: len(rec.of("dm")) == 2, what="amy's two DMs")
    await harness.call(f"/servers/{server['id']}/stop", {"signal": "TERM"})
    await harness.call(f"/servers/{server['id']}/start")
    for r in (rec, rec_ben):
        await r.wait_for(lambda r=r: len(r.of("connected")) == 2, LONG, "the reconnect")
    after = [await ben.dm("dmamy", f"after {i}") for i in range(3)]
    assert [d.id for d in after] == [1, 2, 3], "the restarted server numbers DMs from 1"
    await rec.wait_for(lambda: rec.of("dm")[-1].text == "after 2", LONG, "amy's last DM")
    assert [d.text for d in rec.of("dm")] == [
        "before 0", "before 1", "after 0", "after 1", "after 2"]
    await close_all(amy, ben)


async def test_a_burst_of_requests_is_paced_not_cut_off(harness: Harness) -> None:
    """120 pings, histories and users reads at once against a request bucket of 25: each
    was written at once, 25 answered, then 2 x RATE_LIMIT_BURST (20) refusals in a row and
    the connection closed with 4102, the reads cut off by it asked again at once on the next
    connection, flooding again; the refused ones failed with rate_limited. Now at most a
    window of them is on the wire, a refused one holds the rest back until its
    retry_after_ms and goes again first: every call is answered, nothing is closed, and a
    few refusals come in a row, not a flood."""
    server = await harness.server("memory", env={
        "RATE_LIMIT_BURST": "10", "RATE_LIMIT_REQUESTS": "50", "RATE_LIMIT_REQUESTS_BURST": "25"})
    client, rec = await connected(harness, server["url"], "reader", "lobby")
    seen: list[str] = []
    original = client._dispatch

    def dispatch(raw: Any) -> None:
        seen.append("refused" if '"rate_limited"' in str(raw) else "answer")
        original(raw)
    client._dispatch = dispatch  # type: ignore[method-assign]
    calls = [client.ping(timeout=LONG) if i % 3 == 0 else
             client.history("lobby", limit=1, timeout=LONG) if i % 3 == 1 else
             client.list_users("lobby", timeout=LONG) for i in range(120)]
    results = await asyncio.wait_for(asyncio.gather(*calls, return_exceptions=True), 2 * LONG)
    closes = [d.code for d in rec.of("disconnected")]
    failed = [repr(r) for r in results if isinstance(r, BaseException)]
    assert closes.count(4102) == 0, f"closed 4102 {closes.count(4102)} times; {failed[:3]}"
    assert failed == [], f"{len(failed)} failed: {failed[:3]}"
    assert_refused_but_never_flooded(seen)
    await close_all(client)


async def test_a_request_that_waits_too_long_in_the_queue_times_out_unsent(
        harness: Harness) -> None:
    """12 histories at once, each with a 1 s timeout, against a request bucket of 5 filled
    at 2 a second: those the pacer cannot let go within their timeout raise RequestTimeout
    (they raised rate_limited, the whole burst written at once) and are never written
    afterwards: the list_users asked next is the only request written after them."""
    server = await harness.server("memory", env={
        "RATE_LIMIT_BURST": "10", "RATE_LIMIT_REQUESTS": "2", "RATE_LIMIT_REQUESTS_BURST": "5"})
    client, rec = await connected(harness, server["url"], "waiter", "lobby")
    written: list[tuple[float, str]] = []
    original = client._write

    def write(frame: dict[str, Any]) -> None:
        written.append((time.monotonic(), frame["type"]))
        original(frame)
    client._write = write  # type: ignore[method-assign]
    results = await asyncio.wait_for(asyncio.gather(
        *(client.history("lobby", limit=i + 1, timeout=1.0) for i in range(12)),
        return_exceptions=True), LONG)
    gave_up = time.monotonic()
    others = [repr(r) for r in results
              if isinstance(r, BaseException) and not isinstance(r, RequestTimeout)]
    assert others == [], others
    timed_out = sum(isinstance(r, RequestTimeout) for r in results)
    assert 0 < timed_out < 12, results
    assert await client.list_users("lobby", timeout=LONG)
    assert {kind for at, kind in written if at > gave_up} == {"list_users"}, written
    assert [d.code for d in rec.of("disconnected")] == []
    await close_all(client)


async def test_a_leave_that_times_out_in_the_request_queue_is_still_written(
        harness: Harness) -> None:
    """A leave queued behind reads the request bucket cannot serve yet times out for its
    caller, but the room is gone for the app already: the leave is written when its turn
    comes (a read is not), so the server takes the user out of the room and the others see
    her go."""
    server = await harness.server("memory", env={
        "RATE_LIMIT_BURST": "10", "RATE_LIMIT_REQUESTS": "2", "RATE_LIMIT_REQUESTS_BURST": "5"})
    alice, _ = await connected(harness, server["url"], "alice", "lobby")
    bob, _ = await connected(harness, server["url"], "bob", "lobby")
    gone = asyncio.Event()
    bob.on("presence", lambda p: gone.set() if (p.user_id, p.status) == ("alice", "offline")
           else None)
    reads = [asyncio.ensure_future(alice.history("lobby", limit=i + 1, timeout=LONG))
             for i in range(8)]
    try:
        with pytest.raises(RequestTimeout):
            await alice.leave("lobby", timeout=0.05)
        await asyncio.wait_for(gone.wait(), LONG)
    finally:
        for read in reads:
            read.cancel()
    await close_all(alice, bob)


async def test_a_leave_of_a_room_whose_join_waits_for_the_pacer_is_not_written(
        harness: Harness) -> None:
    """A room left while its join waits for the join pacer (one join on the wire at a
    time): that join is never written, and neither is the leave (the server, which does not
    have the user in the room, answered it not_in_room, for a token of the request bucket).
    The user is not in the room for the others."""
    server = await harness.server("memory")
    bob, _ = await connected(harness, server["url"], "bob", "quiet")
    alice, rec = await connected(harness, server["url"], "alice", max_joins_in_flight=1)
    written: list[tuple[str, str | None]] = []
    original = alice._write

    def write(frame: dict[str, Any]) -> None:
        written.append((frame["type"], frame.get("room")))
        original(frame)
    alice._write = write  # type: ignore[method-assign]
    first = asyncio.ensure_future(alice.join("open"))
    queued = asyncio.ensure_future(alice.join("quiet"))
    await asyncio.sleep(0)  # both calls made: "open" written, "quiet" queued behind it
    assert alice._rooms["quiet"].join_queued, "the test needs the join queued"
    await asyncio.wait_for(alice.leave("quiet"), TIMEOUT)
    with pytest.raises(ChatError) as err:
        await asyncio.wait_for(queued, TIMEOUT)
    assert err.value.code == "not_in_room"
    await asyncio.wait_for(first, TIMEOUT)
    await alice.ping()  # answered after whatever alice wrote before it
    assert [w for w in written if w[0] != "ping"] == [("join", "open")]
    assert "alice" not in {u.user_id for u in await bob.list_users("quiet")}
    assert rec.of("error") == []
    await close_all(alice, bob)
