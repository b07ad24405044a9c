"""Many workers and many servers on one Redis behave as one server.

Two separate gunicorn servers, two workers each, share a real Redis; clients
on different servers must not notice.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import jwt
import pytest
from websockets.exceptions import InvalidStatus

from conftest import (
    SCALE, TIMEOUT, Client, Server, own_redis, redis_url_or_skip, stopped_together, wait_until,
)

SECRET = "scaleout-secret-0123456789abcdef0123"
COMMON = {"JWT_SECRET": SECRET, "TYPING_TIMEOUT": "0.5", "PRESENCE_TTL": "2",
          "RATE_LIMIT": "1000", "RATE_LIMIT_BURST": "1000"}


def room() -> str:
    return f"r-{uuid.uuid4().hex[:10]}"


def token(sub: str, name: str) -> str:
    return jwt.encode({"sub": sub, "name": name, "exp": int(time.time()) + 3600}, SECRET,
                      algorithm="HS256")


@pytest.fixture(scope="module")
def pair() -> Iterator[tuple[Server, Server]]:
    url = redis_url_or_skip(14)
    with Server({**COMMON, "REDIS_URL": url}, workers=2) as a, \
            Server({**COMMON, "REDIS_URL": url}, workers=2) as b:
        yield a, b


@pytest.fixture
def third(pair: tuple[Server, Server]) -> Iterator[Server]:
    """One more server on the pair's Redis, for a test to kill or stop; killed afterwards."""
    server = Server({**COMMON, "REDIS_URL": pair[0].env["REDIS_URL"]}, workers=2).start()
    try:
        yield server
    finally:
        server.kill()


def assert_alone_in(watcher: Client, r: str) -> None:
    users = watcher.request({"type": "list_users", "room": r}, "users")["users"]
    assert [u["user_id"] for u in users] == [watcher.user_id]


def test_messages_same_ids_in_order_across_servers(pair: tuple[Server, Server]) -> None:
    """Members on two servers see every message once, in the same order, with ids 1..n."""
    a, b = pair
    r = room()
    clients = [Client(s.url) for s in (a, b, a, b)]
    for c in clients:
        c.join(r)
    for i in range(20):
        clients[i % 4].send({"type": "message", "room": r, "text": f"m{i}"})
    seen = [[c.expect("message") for _ in range(20)] for c in clients]
    ids = [[m["id"] for m in s] for s in seen]
    assert ids[0] == list(range(1, 21))
    assert all(s == seen[0] for s in seen)
    # each sender's own messages arrive in the order it sent them
    for k in range(4):
        mine = [m["text"] for m in seen[0] if m["user_id"] == clients[k].user_id]
        assert mine == [f"m{i}" for i in range(k, 20, 4)]
    for c in clients:
        c.close()


def test_presence_and_users_across_servers(pair: tuple[Server, Server]) -> None:
    """Joining on one server shows online on the other; list_users sees everyone."""
    a, b = pair
    r = room()
    with Client(a.url, "username=ann") as ann, Client(b.url, "username=bob") as bob:
        ann.join(r)
        joined = bob.join(r)
        assert [u["username"] for u in joined["users"]] == ["ann", "bob"]
        assert ann.expect("presence", status="online")["user_id"] == bob.user_id
        users = ann.request({"type": "list_users", "room": r}, "users")["users"]
        assert sorted(u["username"] for u in users) == ["ann", "bob"]
        bob.close()
        assert ann.expect("presence", status="offline")["user_id"] == bob.user_id


def test_two_tabs_on_two_servers(pair: tuple[Server, Server]) -> None:
    """A user connected to both servers goes offline only when the last tab leaves."""
    a, b = pair
    r = room()
    t = token("gina", "Gina")
    with Client(a.url) as watcher:
        watcher.join(r)
        tab_a, tab_b = Client(a.url, f"token={t}"), Client(b.url, f"token={t}")
        tab_a.join(r)
        watcher.expect("presence", status="online")
        tab_b.join(r)
        tab_a.close()
        watcher.assert_silent("presence", within=0.5)
        tab_b.close()
        assert watcher.expect("presence", status="offline")["user_id"] == "gina"


def test_typing_across_servers(pair: tuple[Server, Server]) -> None:
    """typing crosses servers and expires there too."""
    a, b = pair
    r = room()
    with Client(a.url) as x, Client(b.url) as y:
        x.join(r)
        y.join(r)
        y.send({"type": "typing", "room": r, "status": True})
        assert x.expect("typing", status=True)["user_id"] == y.user_id
        assert x.expect("typing", status=False)["user_id"] == y.user_id


@contextmanager
def watcher_and_two_tabs(watcher_at: Server, tabs_at: tuple[Server, Server], sub: str
                         ) -> Iterator[tuple[str, Client, Client, Client]]:
    """A new room joined by a guest and by two connections (tabs) of user ``sub``, on the
    servers given."""
    r, t = room(), token(sub, sub.title())
    with Client(watcher_at.url) as watcher, Client(tabs_at[0].url, f"token={t}") as one, \
            Client(tabs_at[1].url, f"token={t}") as two:
        for client in (watcher, one, two):
            client.join(r)
        yield r, watcher, one, two


def test_two_tabs_typing_on_two_servers_are_one_typist(pair: tuple[Server, Server]) -> None:
    """A user typing in two tabs on two servers is one typist, as two tabs on one worker
    are: the room hears `typing: true` once, and `false` once, when the last tab stops or
    expires (before: each server told its own, `true` twice and `false` as soon as the
    first tab stopped, while the other still typed)."""
    a, b = pair
    with watcher_and_two_tabs(a, (a, b), "ines") as (r, watcher, tab_a, tab_b):
        tab_a.send({"type": "typing", "room": r, "status": True})
        assert watcher.expect("typing", status=True)["user_id"] == "ines"
        for tab, status in ((tab_b, True), (tab_a, False), (tab_b, False)):
            tab.send({"type": "typing", "room": r, "status": status})
            tab.request({"type": "ping", "id": "after-typing"}, "pong")  # taken in order
        # The next is the `false` of the last tab (or of its expiry, TYPING_TIMEOUT 0.5 s,
        # on a slow machine): one either way, and nothing after it.
        off = watcher.expect("typing")
        assert (off["user_id"], off["status"]) == ("ines", False)
        watcher.assert_silent("typing", within=0.7)


def test_message_from_a_tab_on_another_server_ends_typing(pair: tuple[Server, Server]
                                                           ) -> None:
    """One tab of a user types on one server, the other tab sends the message from the
    other server: the typing indicator ends with the message, not at its expiry."""
    a, b = pair
    with watcher_and_two_tabs(b, (a, b), "hana") as (r, watcher, typist, writer):
        sent = time.monotonic()  # its expiry: TYPING_TIMEOUT (0.5 s) after this at the earliest
        typist.send({"type": "typing", "room": r, "status": True})
        assert watcher.expect("typing", status=True)["user_id"] == "hana"
        writer.send({"type": "message", "room": r, "text": "from the other tab"})
        watcher.expect("message", text="from the other tab")
        off = watcher.expect("typing", status=False, timeout=sent + 0.49 - time.monotonic())
        assert off["user_id"] == "hana"
        watcher.assert_silent("typing", within=0.6)  # and once: no expiry after it


def test_history_and_recovery_across_servers(pair: tuple[Server, Server]) -> None:
    """History written through one server is read and recovered through the other."""
    a, b = pair
    r = room()
    with Client(a.url) as writer:
        writer.join(r)
        for i in range(5):
            writer.say(r, f"h{i}")
        with Client(b.url) as reader:
            hist = reader.request({"type": "history", "room": r, "limit": 3}, "history")
            assert [m["id"] for m in hist["messages"]] == [3, 4, 5]
            joined = reader.join(r, since=2)
            assert joined["recovered"] is True
            assert [reader.expect("message")["id"] for _ in range(3)] == [3, 4, 5]


def test_dm_across_servers(pair: tuple[Server, Server]) -> None:
    """A DM reaches the recipient's connections on both servers and echoes to the sender."""
    a, b = pair
    t = token("hank", "Hank")
    with Client(a.url, f"token={t}") as h1, Client(b.url, f"token={t}") as h2, \
            Client(b.url, "username=ivy") as ivy:
        ivy.send({"type": "dm", "to": "hank", "text": "over there?", "client_msg_id": "q"})
        echo = ivy.expect("dm")
        assert h1.expect("dm") == echo == h2.expect("dm")
        ivy.send({"type": "dm", "to": "hank", "text": "over there?", "client_msg_id": "q"})
        assert ivy.expect("dm") == echo
        h1.assert_silent("dm")


def test_dedupe_across_servers(pair: tuple[Server, Server]) -> None:
    """A retry through the other server with the same client_msg_id is not broadcast."""
    a, b = pair
    r = room()
    t = token("jo", "Jo")
    with Client(a.url, f"token={t}") as first, Client(b.url, f"token={t}") as retry, \
            Client(a.url) as other:
        for c in (first, retry, other):
            c.join(r)
        original = first.say(r, "hello", client_msg_id="same")
        other.expect("message")
        retry.expect("message")
        retry.send({"type": "message", "room": r, "text": "hello", "client_msg_id": "same"})
        assert retry.expect("message") == original
        other.assert_silent("message")


def test_killed_server_users_go_offline(pair: tuple[Server, Server], third: Server) -> None:
    """kill -9 of a whole server: its users go offline elsewhere within PRESENCE_TTL."""
    r = room()
    with Client(pair[0].url) as watcher:
        watcher.join(r)
        victim = Client(third.url, "username=victim")
        victim.join(r)
        watcher.expect("presence", status="online")
        third.kill()
        started = time.monotonic()
        offline = watcher.expect("presence", status="offline", timeout=10 * SCALE)
        assert offline["user_id"] == victim.user_id
        assert time.monotonic() - started < 2 * 2 + 3  # PRESENCE_TTL 2 s, beat every TTL/3
        assert_alone_in(watcher, r)
        watcher.send({"type": "dm", "to": victim.user_id, "text": "there?"})
        assert watcher.expect("error")["code"] == "user_not_found"


@pytest.fixture
def private_redis() -> Iterator[tuple[str, tuple[Callable[[], Any], Callable[[], None]]]]:
    """A redis-server of our own on a free port, which the test may stop and restart."""
    with own_redis() as redis:
        yield redis.url, (redis.start, redis.stop)


def test_redis_restart_mid_conversation(private_redis) -> None:
    """Redis restarts (losing its data): sockets stay, requests get `unavailable`,
    readiness flips, and after it returns chat resumes with ids that never go back."""
    url, (start_redis, stop_redis) = private_redis
    r = room()
    with Server({**COMMON, "REDIS_URL": url}, workers=2) as a, \
            Server({**COMMON, "REDIS_URL": url}, workers=2) as b, stopped_together(a, b):
        x, y = Client(a.url, "username=xena"), Client(b.url, "username=yuri")
        x.join(r)
        y.join(r)
        for i in range(3):
            x.say(r, f"before{i}")
            y.expect("message")
        stop_redis()
        wait_until(lambda: a.http("/ready", metrics=True)[0] == 503, timeout=10 * SCALE,
                   message="readiness to fail while Redis is down")
        x.send({"type": "message", "room": r, "text": "during"})
        assert x.expect("error", timeout=10 * SCALE)["code"] == "unavailable"
        start_redis()
        wait_until(lambda: a.http("/ready")[0] == 200 and b.http("/ready")[0] == 200,
                   timeout=15 * SCALE, message="readiness to recover")

        def delivered() -> bool:
            x.send({"type": "message", "room": r, "text": "after"})
            try:
                return x.expect("message", text="after", timeout=1.0)["id"] > 3
            except AssertionError:
                return False

        wait_until(delivered, timeout=15 * SCALE, interval=0.2, message="chat to resume")
        after = y.expect("message", text="after", timeout=TIMEOUT)
        assert after["id"] >= 4  # never reuses ids 1..3 although Redis lost them
        users = y.request({"type": "list_users", "room": r}, "users")["users"]
        assert sorted(u["username"] for u in users) == ["xena", "yuri"]
        # b's /ready answered for one of its workers; the other may still be reconnecting
        # and refuse the upgrade with 503 (Retry-After) for a moment, as a client expects.
        late = wait_until(lambda: _admitted(b), timeout=15 * SCALE, interval=0.2,
                          message="b to admit an upgrade")
        joined = late.join(r, since=1)
        late.close()
        assert joined["recovered"] is False  # history was lost: the client must reload
        for server in (a, b):
            assert "redis pub/sub lost" in server.output()
            assert "redis pub/sub reconnected" in server.output()
        x.close()
        y.close()


def test_sigterm_releases_memberships_at_once(pair: tuple[Server, Server],
                                              third: Server) -> None:
    """A server stopping (SIGTERM) takes its users out of Redis in one step: the other
    server sees them offline at once, and nothing of them is left behind."""
    r = room()
    with Client(pair[0].url) as watcher:
        watcher.join(r)
        clients = [Client(third.url, f"username=bye{i}") for i in range(20)]
        for c in clients:
            c.join(r)
        ids = {c.user_id for c in clients}
        for _ in clients:
            watcher.expect("presence", status="online")
        assert third.stop() == 0
        gone = {watcher.expect("presence", status="offline")["user_id"] for _ in clients}
        assert gone == ids
        assert_alone_in(watcher, r)
        assert "released" in third.output()
        for c in clients:
            assert c.close_code_when_closed() == 1001


def test_posts_after_a_redis_restart_wait_for_the_resync(private_redis) -> None:
    """Right after Redis comes back (empty), before this worker has resubscribed and
    raised its room sequences, a post is refused with `unavailable`, never accepted
    unanswered or under an id already used."""
    url, (start_redis, stop_redis) = private_redis
    r = room()
    with Server({**COMMON, "REDIS_URL": url}) as srv:
        x = Client(srv.url, "username=xena")
        x.join(r)
        for i in range(3):
            x.say(r, f"before{i}")
        stop_redis()
        wait_until(lambda: srv.http("/ready", metrics=True)[0] == 503, timeout=10 * SCALE,
                   message="readiness to fail while Redis is down")
        start_redis()
        after = x.post_until_taken({"type": "message", "room": r, "text": "after"})
        assert after["id"] == 4, after  # ids 1..3 are never issued again
        x.close()


def test_worker_boots_while_redis_is_down(private_redis) -> None:
    """A server started while Redis is down boots, is not ready, and becomes ready
    by itself once Redis is back (gunicorn would stop if a worker failed to boot)."""
    url, (start_redis, stop_redis) = private_redis
    stop_redis()
    srv = Server({**COMMON, "REDIS_URL": url}, workers=2)
    srv.start(wait=False)
    try:
        wait_until(lambda: _status(srv, "/health") == 200, timeout=20 * SCALE,
                   message="the server to boot without Redis")
        assert _status(srv, "/ready") == 503
        start_redis()
        wait_until(lambda: _status(srv, "/ready") == 200, timeout=15 * SCALE,
                   message="readiness once Redis is back")
        # /ready answered for one worker; the other may still be reconnecting and refuse
        # an upgrade with 503 for a moment: both must come to serve joins by themselves.
        wait_until(lambda: all(_joins(srv) for _ in range(6)), timeout=15 * SCALE,
                   message="joins on every worker once Redis is back")
    finally:
        srv.stop()
        srv.kill()


def _joins(server: Server) -> bool:
    """A new connection joins a room (False: the upgrade was refused with 503, not ready)."""
    client = _admitted(server)
    if client is None:
        return False
    with client:
        return client.join(room())["users"][0]["user_id"] == client.user_id


def _admitted(server: Server) -> Client | None:
    """A new connection (None: the upgrade was refused with 503, its worker not ready)."""
    try:
        return Client(server.url)
    except InvalidStatus as exc:
        assert exc.response.status_code == 503
        return None


def _status(server: Server, path: str) -> int | None:
    try:
        return server.http(path)[0]
    except OSError:
        return None
