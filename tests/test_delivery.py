"""The delivery promise, defect by defect: an acknowledged message reaches every member
exactly once, in id order, whatever the moment (issue 16).

Each test here reproduced one defect before its fix; the fault suite
(``test_faults.py``) checks the promise end to end under deploys and faults.
"""

from __future__ import annotations

import contextlib
import json
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import jwt
import pytest
from websockets.exceptions import InvalidStatus

from conftest import (
    SCALE, TIMEOUT, Client, Server, first_start, free_port, listening, own_redis,
    redis_url_or_skip, stopped_together, wait_until,
)
from rawws import RawClient
from test_chat import Clock, FakeSession, make_chat
from wschat.hub import LocalHub
from wschat.protocol import draft_dm, draft_message
from wschat.stores.base import API_USER, InboxFull, Unavailable, User
from wschat.stores.memory import MemoryBroker

SECRET = "delivery-secret-0123456789abcdef0123"
COMMON = {"JWT_SECRET": SECRET, "RATE_LIMIT": "1000", "RATE_LIMIT_BURST": "1000"}
REDIS_DB = 6  # and 7, 8 (below 16: a stock Redis has databases 0-15)


def room() -> str:
    return f"r-{uuid.uuid4().hex[:10]}"


def token(sub: str, name: str = "") -> str:
    return jwt.encode({"sub": sub, "name": name or sub, "exp": int(time.time()) + 3600},
                      SECRET, algorithm="HS256")


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture(scope="module")
def redis_server() -> Iterator[Server]:
    """One worker on Redis: every connection of a test shares its pub/sub connection."""
    with Server({**COMMON, "REDIS_URL": redis_url_or_skip(REDIS_DB)}, workers=1) as srv:
        yield srv


# -- 1. join storm: every waiter of a pending subscription is released --------------------
def test_join_storm_on_one_worker_every_join_answered(redis_server: Server) -> None:
    """Many connections of one worker join a room nobody is in at the same moment: each
    gets ``joined`` at once (before: one did, the others got ``unavailable`` after 15 s)."""
    clients = [RawClient(redis_server.port) for _ in range(30)]
    try:
        r = room()
        for c in clients:
            c.send({"type": "join", "room": r})
        replies: list[dict[str, Any]] = []
        for c in clients:
            event = c.next_event(2 * TIMEOUT)
            while event["type"] == "presence":
                event = c.next_event(2 * TIMEOUT)
            replies.append(event)
        assert [e["type"] for e in replies] == ["joined"] * len(clients), replies
        # and every one of them is live: one message reaches all 30
        clients[0].send({"type": "message", "room": r, "text": "hello"})
        for c in clients:
            assert c.expect("message", 2 * TIMEOUT)["text"] == "hello"
    finally:
        for c in clients:
            c.close()


# -- 3. a join that fails part-way leaves no half-joined session ---------------------------
def _broken(*args: Any) -> Any:
    raise Unavailable("store down")


def test_failed_join_leaves_no_half_joined_session(clock: Clock) -> None:
    """A store call failing after the hub began holding the joiner's events: the join is
    undone (``unavailable``, not a member, nothing held), and a retry works."""
    chat = make_chat(clock, RATE_LIMIT="1000", RATE_LIMIT_BURST="1000")
    a, b = FakeSession("a", "Ann", True), FakeSession("b", "Bob", True)
    chat.open(a)
    chat.open(b)
    chat.receive(b, json.dumps({"type": "join", "room": "r"}))
    for method in ("last_id", "since"):
        a.clear()
        setattr(chat.stores.messages, method, _broken)
        try:
            chat.receive(a, json.dumps({"type": "join", "room": "r", "since": 0}
                                       if method == "since" else {"type": "join", "room": "r"}))
        finally:
            delattr(chat.stores.messages, method)
        assert [e["code"] for e in a.events("error")] == ["unavailable"]
        assert not a.events("joined")
        assert "r" not in a.rooms
        assert not chat.hub._recovering, "events still held for the failed joiner"
        assert [u.user_id for u in chat.stores.rooms.members("r")] == ["b"]
        chat.receive(b, json.dumps({"type": "message", "room": "r", "text": "while out"}))
        assert not a.events("message")
    chat.receive(a, json.dumps({"type": "join", "room": "r"}))
    assert a.events("joined")
    chat.receive(b, json.dumps({"type": "message", "room": "r", "text": "after"}))
    assert [m["text"] for m in a.events("message")] == ["after"]


def test_a_join_whose_reply_was_lost_leaves_no_member_behind(clock: Clock) -> None:
    """The store join ran but its reply never came (a Redis timeout): the joiner gets
    ``unavailable`` and is taken out of the store too, not only here (before: it stayed a
    member there for the worker's life, and its retry never announced it online)."""
    chat = make_chat(clock, RATE_LIMIT="1000", RATE_LIMIT_BURST="1000")
    a, b = FakeSession("a", "Ann", True), FakeSession("b", "Bob", True)
    chat.open(a)
    chat.open(b)
    chat.receive(b, json.dumps({"type": "join", "room": "r"}))
    rooms = chat.stores.rooms
    join = rooms.join

    def join_then_lose_the_reply(*args: Any) -> Any:
        join(*args)
        raise Unavailable("redis: TimeoutError")

    rooms.join = join_then_lose_the_reply  # type: ignore[method-assign]
    try:
        chat.receive(a, json.dumps({"type": "join", "room": "r"}))
    finally:
        del rooms.join
    assert [e["code"] for e in a.events("error")] == ["unavailable"]
    assert [u.user_id for u in rooms.members("r")] == ["b"]
    b.clear()
    chat.receive(a, json.dumps({"type": "join", "room": "r"}))
    assert [(p["user_id"], p["status"]) for p in b.events("presence")] == [("a", "online")]


def test_a_leave_the_store_refused_is_finished_once_it_is_back(clock: Clock) -> None:
    """A leave while the store is unreachable: the client is out of the room at once
    (``left``), and the store hears of it from the retries (before: ``unavailable``, a
    retry got ``not_in_room``, and the connection stayed a member in the store)."""
    chat = make_chat(clock, RATE_LIMIT="1000", RATE_LIMIT_BURST="1000")
    a, b = FakeSession("a", "Ann", True), FakeSession("b", "Bob", True)
    chat.open(a)
    chat.open(b)
    for session in (a, b):
        chat.receive(session, json.dumps({"type": "join", "room": "r"}))
    a.clear()
    rooms = chat.stores.rooms
    rooms.leave = _broken  # type: ignore[method-assign]
    try:
        chat.receive(b, json.dumps({"type": "leave", "room": "r", "id": 1}))
        assert b.events("left") and not b.events("error")
        chat.tick()  # still down: kept for the next tick
    finally:
        del rooms.leave
    assert [u.user_id for u in rooms.members("r")] == ["a", "b"]
    chat.tick()
    assert [u.user_id for u in rooms.members("r")] == ["a"]
    assert [(p["user_id"], p["status"]) for p in a.events("presence")] == [("b", "offline")]


def test_failed_rejoin_of_a_member_stays_live(clock: Clock) -> None:
    """A member's re-join (recovery) that fails keeps it a live member: what arrived
    while its events were held follows, and so does everything after."""
    chat = make_chat(clock, RATE_LIMIT="1000", RATE_LIMIT_BURST="1000")
    a, b = FakeSession("a", "Ann", True), FakeSession("b", "Bob", True)
    chat.open(a)
    chat.open(b)
    chat.receive(a, json.dumps({"type": "join", "room": "r"}))
    chat.receive(b, json.dumps({"type": "join", "room": "r"}))
    a.clear()

    def post_then_fail(room: str, after_id: int) -> Any:
        chat.receive(b, json.dumps({"type": "message", "room": "r", "text": "held"}))
        raise Unavailable("store down")

    chat.stores.messages.since = post_then_fail  # type: ignore[method-assign]
    try:
        chat.receive(a, json.dumps({"type": "join", "room": "r", "since": 0}))
    finally:
        del chat.stores.messages.since
    assert [e["code"] for e in a.events("error")] == ["unavailable"]
    assert "r" in a.rooms
    assert not chat.hub._recovering
    chat.receive(b, json.dumps({"type": "message", "room": "r", "text": "live"}))
    assert [m["text"] for m in a.events("message")] == ["held", "live"]


# -- 2. the live stream lagging behind a replay doubles nothing ----------------------------
def test_live_events_behind_the_replay_are_not_delivered_again() -> None:
    """The store's replay (or ``last_id``) may run ahead of this worker's pub/sub stream:
    the joiner went live with ids up to 3, then 2 and 3 arrive live. They must not reach
    it twice (before: a client moved to another server got ``..., 17, 17, ...``)."""
    hub = LocalHub(MemoryBroker())
    joiner, other = FakeSession("a", "Ann", True), FakeSession("b", "Bob", True)
    for s in (joiner, other):
        hub.add_user(s)
    hub.begin_recovery("r", other)
    hub.finish_recovery("r", other, 0, set())

    def event(i: int) -> bytes:
        return draft_message("r", "Bob", "b", f"t{i}", 0, None).with_id(i)

    hub.begin_recovery("r", joiner)
    hub.deliver_room("r", event(1))  # held, then dropped: the replay has it
    hub.finish_recovery("r", joiner, 3, {"a", "b"})  # the chat core sent 1..3 from the store
    for i in (2, 3, 4, 5):
        hub.deliver_room("r", event(i))
    assert [m["id"] for m in joiner.events("message")] == [4, 5]
    assert [m["id"] for m in other.events("message")] == [1, 2, 3, 4, 5]
    assert not hub._floors, "a floor outlived the ids it guards"


# -- 6. keys and payloads unambiguous for any sub ----------------------------------------
@pytest.fixture
def redis_stores() -> Iterator[Any]:
    from wschat.stores import redis as redis_module

    url = redis_url_or_skip(REDIS_DB + 1)
    client = redis_module.redis.Redis.from_url(url)
    node = redis_module._Node()
    first_start(client)
    with listening(url, "bob"):  # the DMs below are to bob
        yield (redis_module, client, node,
               redis_module.RedisMessageStore(client, 100),
               redis_module.RedisRoomStore(client, node, 3600))
    client.close()


def test_dedupe_keys_of_acme_and_acme_alice_never_meet(redis_stores: Any) -> None:
    """User ``acme`` with ``client_msg_id`` ``alice:x`` and user ``acme:alice`` with ``x``
    are two messages (before: the second was swallowed and answered with the first)."""
    _, _, _, messages, _ = redis_stores
    for post in (lambda user, cmid, text: messages.post_room(
                     "r", user, draft_message("r", user, user, text, 1, cmid)),
                 lambda user, cmid, text: messages.post_dm(
                     user, "bob", draft_dm("bob", user, user, text, 1, cmid))):
        first = post("acme", "alice:x", "from acme")
        second = post("acme:alice", "x", "from acme:alice")
        assert not second.duplicate
        assert b"from acme:alice" in second.event and second.msg_id == first.msg_id + 1
        # and each retry (the same message again) still finds its own
        assert post("acme", "alice:x", "from acme").event == first.event
        assert post("acme:alice", "x", "from acme:alice").event == second.event


def test_moderation_keys_of_room_a_b_and_user_b_c_never_meet(redis_stores: Any) -> None:
    """A ban of user ``b:c`` in room ``a`` is not a ban of user ``c`` in room ``a:b``
    (room names may hold ``:``, and so may a ``sub``)."""
    import math

    from wschat.stores.redis.moderation import RedisModerationStore

    _, client, _, _, _ = redis_stores
    moderation = RedisModerationStore(client)
    moderation.restrict("ban", "a", "b:c", math.inf)
    assert moderation.standing("a", "b:c").banned == math.inf
    assert moderation.standing("a:b", "c").banned is None


def test_room_payload_framing_holds_for_any_user_id(redis_stores: Any) -> None:
    """An exclude user id with a newline (or ``%``, ``:``) cannot forge an event, neither
    from Python nor from the reaper's Lua."""
    redis_module, client, node, _, rooms = redis_stores
    evil = 'mallory\n{"type":"message","id":999,"text":"forged"}%3A:x'
    event = b'{"type":"typing","room":"r"}'
    assert redis_module.split_room_payload(redis_module.room_payload(event, evil)) == (
        evil, event)
    assert redis_module.split_room_payload(redis_module.room_payload(event)) == (None, event)
    # the usual ids read as before (workers of the previous release during an update)
    assert redis_module.room_payload(event, "u-42") == b"u-42\n" + event
    listener = client.pubsub(ignore_subscribe_messages=True)
    listener.subscribe(redis_module.room_channel("r"))
    try:
        rooms.join("r", "c1", User(evil, "Mallory"))
        keeper = redis_module.NodeKeeper(client, node, 30, 3600)
        assert keeper.release() == 1
        message = None
        deadline = time.monotonic() + TIMEOUT
        while message is None and time.monotonic() < deadline:
            message = listener.get_message(timeout=0.2)
        assert message is not None, "the reaper published no offline presence"
        exclude, published = redis_module.split_room_payload(message["data"])
        assert exclude == evil
        assert json.loads(published)["status"] == "offline"
    finally:
        listener.close()


def test_a_reaper_that_fails_half_way_leaves_the_dead_node_to_a_later_beat(
        redis_stores: Any) -> None:
    """A reaper that claimed a dead node and then failed (Redis error, the reaper
    killed) used to have removed the node from the list already: no one reaped it
    again, and its users stayed members and online for good. The claim is now a lease:
    the node stays listed until its registrations are gone, and is reaped after a TTL."""
    from wschat.stores.redis.keys import NODES

    redis_module, client, dead, _, rooms = redis_stores
    r = room()
    rooms.join(r, "c-dead", User("ghost", "Ghost"))
    client.zadd(NODES, {dead.node_id: 1})  # silent since 1970
    reaper = redis_module.NodeKeeper(client, redis_module._Node(), 0.3, 3600)

    def fail_once(*args: Any) -> Any:
        del client.smembers
        raise redis_module.redis.ConnectionError("lost mid-reap")

    client.smembers = fail_once
    try:
        with pytest.raises(redis_module.redis.ConnectionError):
            reaper.beat_and_reap()
    finally:
        if "smembers" in vars(client):
            del client.smembers
    assert client.zscore(NODES, dead.node_id) is not None, "claimed and dropped"
    assert [u.user_id for u in rooms.members(r)] == ["ghost"]
    assert reaper.beat_and_reap() == 0  # leased to the failed reaper for one TTL
    time.sleep(0.4)
    assert reaper.beat_and_reap() == 1
    assert rooms.members(r) == []
    assert client.zscore(NODES, dead.node_id) is None


def test_redis_numbered_posts_wait_for_a_database_numbering_node_alive_not_a_dead_one(
        redis_stores: Any) -> None:
    """While a node that numbers messages in the database beats (persistence on, during
    a rolling update that turns it on or off), posts numbered in Redis are refused
    `unavailable`, even after an epoch check reopened the gate; a node that stops, or
    one that died and is silent past the TTL, no longer holds them."""
    from wschat.stores.redis.keys import NUMBERED_BY_DATABASE, READY

    redis_module, client, _, messages, _ = redis_stores
    r = room()

    def post() -> int:
        return messages.post_room(r, "u", draft_message(r, "u", "u", "hi", 1, None)).msg_id

    first = post()
    database = redis_module.NodeKeeper(client, redis_module._Node(), 0.3, 3600,
                                       numbers_in_database=True)
    database.beat_and_reap()
    with pytest.raises(Unavailable, match="numbered by the database"):
        post()
    epoch = redis_module.Epoch(client, "another", 1.0)
    epoch.begin()
    epoch.done()  # a worker's epoch check does not reopen the gate meanwhile
    with pytest.raises(Unavailable, match="numbered by the database"):
        post()
    database.stop()
    assert post() == first + 1
    client.zadd(NUMBERED_BY_DATABASE, {"died": 1})  # its beat, silent since 1970
    client.delete(READY)
    with pytest.raises(Unavailable, match="numbered by the database"):
        post()
    redis_module.NodeKeeper(client, redis_module._Node(), 0.3, 3600).beat_and_reap()
    assert post() == first + 2


def test_the_refusal_names_a_database_numbering_worker_that_holds_it(
        redis_stores: Any) -> None:
    """Posts numbered in Redis refused because a worker numbers in the database: the
    refusal (logged by the chat core, and the 503 of /api/publish) names one such worker,
    so that an operator whose posts stay refused can tell which pod holds them (another
    deployment with persistence on the same Redis holds them for as long as it runs)."""
    redis_module, client, _, messages, _ = redis_stores
    r = room()
    database = redis_module.NodeKeeper(client, redis_module._Node(), 30.0, 3600,
                                       numbers_in_database=True)
    database.beat_and_reap()
    try:
        with pytest.raises(Unavailable, match=f"numbered by the database.*{database.node_id}"):
            messages.post_room(r, "u", draft_message(r, "u", "u", "hi", 1, None))
    finally:
        database.stop()


def test_a_database_numbering_node_is_not_forgotten_by_a_node_with_a_shorter_ttl(
        redis_stores: Any) -> None:
    """A rolling update that changes PRESENCE_TTL with ENABLE_PERSISTENCE: a node without
    persistence and a PRESENCE_TTL shorter than the database-numbering node's beat interval
    must not forget that node between its beats (before: it pruned every listing older than
    its own TTL, and its posts numbered in Redis were taken until the next beat)."""
    redis_module, client, _, messages, _ = redis_stores
    r = room()
    database = redis_module.NodeKeeper(client, redis_module._Node(), 30.0, 3600,
                                       numbers_in_database=True)  # beats every 10 s
    database.beat_and_reap()
    hasty = redis_module.NodeKeeper(client, redis_module._Node(), 0.3, 3600)
    time.sleep(0.5)  # longer than hasty's TTL, well within the database node's
    hasty.beat_and_reap()
    with pytest.raises(Unavailable, match="numbered by the database"):
        messages.post_room(r, "u", draft_message(r, "u", "u", "hi", 1, None))
    database.stop()
    assert messages.post_room(r, "u", draft_message(r, "u", "u", "hi", 1, None)).msg_id == 1


def test_redis_numbered_posts_stay_refused_after_a_loss_of_redis_data_during_the_rollout(
        ) -> None:
    """A rolling update turns persistence on (or off); Redis loses its data meanwhile (a
    restart without persistence, a flush): the list of database-numbering workers goes with
    it. The workers' recovery (epoch.py) ends with the last one's epoch_done, well before the
    database-numbering worker's next heartbeat lists it again (PRESENCE_TTL / 3): posts
    numbered in Redis must stay refused, whichever worker is done last (before: the last
    one set `ready`, and for up to a heartbeat the two numberings issued ids twice; the
    database's copy of an id Redis had issued was published as stale, never delivered
    live, though its sender had its acknowledgement). Likewise a database-numbering worker
    that starts on a Redis without an epoch does not open the gate before it beats."""
    import redis as redis_py

    from wschat.config import Settings
    from wschat.stores.redis import create_redis_stores

    with own_redis() as redis_server:
        admin = redis_py.Redis.from_url(redis_server.url)
        redis_side = _redis_stores_of_a_worker(redis_server.url)
        database_side = create_redis_stores(Settings(redis_url=redis_server.url,
                                                     enable_persistence=True))
        try:
            # A database-numbering worker starts first on an empty Redis (RedisStores.start).
            if database_side.epoch.begin():
                database_side.epoch.done()
            assert not _post_taken(redis_side, "r")  # before its first heartbeat too
            if redis_side.epoch.begin():
                redis_side.epoch.done()
            for stores in (redis_side, database_side):
                stores.keeper.beat_and_reap()
            assert not _post_taken(redis_side, "r")
            for last in (database_side, redis_side):
                admin.flushall()
                assert not _post_taken(redis_side, "r")  # no epoch: recovering
                # Each worker's recovery (RedisStores._resync_in_epoch), no heartbeat between.
                for stores in (redis_side, database_side):
                    assert stores.epoch.begin(stores.keeper.peers)
                first = redis_side if last is database_side else database_side
                first.epoch.done()
                last.epoch.done()
                assert not _post_taken(redis_side, "r"), f"{last.keeper.node_id} done last"
                for stores in (redis_side, database_side):
                    stores.keeper.beat_and_reap()
            database_side.keeper.stop()  # the last database-numbering worker is gone
            assert _post_taken(redis_side, "r")
        finally:
            admin.close()
            for stores in (redis_side, database_side):
                stores.client.close()


def test_control_characters_in_sub_are_refused(redis_server: Server) -> None:
    """A token whose ``sub`` holds a control character is refused at the upgrade (401)
    and in ``auth``; a ``name`` with them is shown without them."""
    for sub in ("mallory\n{}", "nul\x00", "bell\x07", "c1\x85"):
        status, _ = http_upgrade(redis_server, f"token={token(sub)}")
        assert status == 401, sub
    with Client(redis_server.url) as c:
        reply = c.request({"type": "auth", "token": token("mallory\nx")}, "error")
        assert reply["code"] == "auth_failed"
    named = jwt.encode({"sub": "nice", "name": "Ni\nce\x00", "exp": int(time.time()) + 60},
                       SECRET, algorithm="HS256")
    with Client(redis_server.url, f"token={named}") as c:
        assert c.welcome is not None and c.welcome["username"] == "Nice"


def http_upgrade(server: Server, query: str) -> tuple[int, bytes]:
    """Status of an upgrade request (without completing a WebSocket)."""
    import socket

    with socket.create_connection(("127.0.0.1", server.port), timeout=TIMEOUT) as s:
        s.sendall((f"GET /ws?{query} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
                   "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                   "Sec-WebSocket-Version: 13\r\n\r\n").encode())
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = s.recv(4096)
            if not chunk:
                break
            head += chunk
    return int(head.split(b" ", 2)[1]), head


# -- 8. upgrades during a Redis outage get 503 before the upgrade -------------------------
def test_upgrade_during_redis_outage_is_refused_in_http() -> None:
    """Redis down: the upgrade is answered 503 with Retry-After (before: 101, then the
    connection was cut and a traceback logged per attempt); Redis back: accepted again."""
    with own_redis() as private, Server({**COMMON, "REDIS_URL": private.url}) as server:
        private.stop()
        wait_until(lambda: server.http("/ready")[0] == 503, 4 * TIMEOUT, 0.1,
                   "/ready to notice the outage")
        for _ in range(3):
            status, head = http_upgrade(server, "username=ann")
            assert status == 503, head
            assert b"retry-after:" in head.lower()
        private.start()
        wait_until(lambda: server.http("/ready")[0] == 200, 6 * TIMEOUT, 0.1,
                   "/ready after Redis is back")
        with Client(server.url) as c:
            assert c.join(room())["last_id"] == 0
        assert "Traceback" not in server.output()
        status, body = server.http("/metrics", metrics=True)
        assert b'wschat_handshakes_refused_total{reason="unavailable"} 3.0' in body


# -- 4 and 5. paced delivery: kept DMs and recovery replays -------------------------------
PACED = {**COMMON, "MAX_OUTBOUND_BYTES": "65536", "SOCKET_SEND_BUFFER": "16384"}
BIG_TEXT = "x" * 3900


def test_large_dm_backlog_arrives_whole_and_is_kept_until_handed_over(tmp_path: Any) -> None:
    """A prompt client's offline backlog far over MAX_OUTBOUND_BYTES arrives whole (before:
    4101 part-way, and every DM already marked delivered was gone for good). A connection
    that ends before it could have them loses none: they come with the next one."""
    bob = f"bob-{uuid.uuid4().hex[:6]}"
    env = {**PACED, "ENABLE_PERSISTENCE": "true", "DATABASE_URL": f"sqlite:///{tmp_path}/d.db"}
    with Server(env) as server:
        Client(server.url, f"token={token(bob)}").close()  # bob is known: DMs are kept
        with Client(server.url, f"token={token('alice')}", max_queue=None) as alice:
            for i in range(60):  # ~240 KB
                alice.send({"type": "dm", "to": bob, "text": f"{i} {BIG_TEXT}"})
            sent = [alice.expect("dm", 2 * TIMEOUT)["id"] for _ in range(60)]
        # a connection that reads nothing and goes away: nothing is lost
        quitter = RawClient(server.port, f"token={token(bob)}", rcvbuf=4096)
        assert quitter.welcome is not None and quitter.welcome["dm_backlog"] == 60
        quitter.close()
        with Client(server.url, f"token={token(bob)}", max_queue=None) as b:
            assert b.welcome is not None and b.welcome["dm_backlog"] > 0
            got = [b.expect("dm", 2 * TIMEOUT)["id"] for _ in range(b.welcome["dm_backlog"])]
            assert got == sent[-len(got):], "kept DMs out of order or doubled"
            assert set(sent) <= set(got) | set(range(sent[0], got[0]))
            b.send({"type": "ping", "id": "p"})
            assert b.expect("pong")["id"] == "p"  # still open: no 4101

        def kept() -> int:
            with Client(server.url, f"token={token(bob)}") as again:
                assert again.welcome is not None
                return int(again.welcome["dm_backlog"])

        wait_until(lambda: kept() == 0, message="the handed-over DMs to count as delivered")


def test_a_live_dm_arriving_during_a_kept_backlog_comes_after_all_of_it(tmp_path: Any
                                                                         ) -> None:
    """A DM sent to a user while the DMs kept for her are still being written (paced, a
    page of 50 at a time) comes after every one of them, in id order (before: after the
    page being written, ahead of the older kept DMs of the next pages)."""
    bob = f"bob-{uuid.uuid4().hex[:6]}"
    env = {**PACED, "ENABLE_PERSISTENCE": "true", "DATABASE_URL": f"sqlite:///{tmp_path}/d.db"}
    with Server(env) as server:
        Client(server.url, f"token={token(bob)}").close()  # bob is known: DMs are kept
        with Client(server.url, f"token={token('alice')}", max_queue=None) as alice:
            for i in range(60):  # two pages, ~240 KB
                alice.send({"type": "dm", "to": bob, "text": f"{i} {BIG_TEXT}"})
            kept = [alice.expect("dm", 2 * TIMEOUT)["id"] for _ in range(60)]
            # bob reads nothing yet: the first page waits for him
            reader = RawClient(server.port, f"token={token(bob)}", rcvbuf=4096)
            assert reader.welcome is not None and reader.welcome["dm_backlog"] == 60
            alice.send({"type": "dm", "to": bob, "text": "live", "client_msg_id": "live-1"})
            live = alice.expect("dm", 2 * TIMEOUT, client_msg_id="live-1")["id"]
        try:
            got = [reader.expect("dm", 2 * TIMEOUT)["id"] for _ in range(61)]
        finally:
            reader.close()
        assert got == [*kept, live]


def test_large_recovery_replay_is_paced_not_dropped() -> None:
    """A prompt client recovering ~1.5 MB (``since`` far back) gets every message and stays
    connected (before: ``recovered: true``, then 4101 part-way through the replay)."""
    with Server({**PACED, "HISTORY_SIZE": "1000"}) as server:
        r = room()
        with Client(server.url, max_queue=None) as writer:  # reads as fast as it can
            writer.join(r)
            for i in range(400):  # each after the last one's echo: no backlog forms here
                assert writer.say(r, f"{i} {BIG_TEXT}")["id"] == i + 1
            with Client(server.url, max_queue=None) as reader:
                joined = reader.join(r, since=0)
                assert joined["recovered"] is True and joined["last_id"] == 400
                writer.send({"type": "message", "room": r, "text": "live"})
                ids = [reader.expect("message", 4 * TIMEOUT)["id"] for _ in range(401)]
                assert ids == list(range(1, 402))
                reader.send({"type": "ping", "id": "p"})
                assert reader.expect("pong")["id"] == "p"


@contextlib.contextmanager
def durable_chat(tmp_path: Any, clock: Clock, **env: str) -> Iterator[tuple[Any, Any]]:
    """An in-process Chat on the memory backend with persistence in a SQLite file."""
    from wschat.auth import Authenticator
    from wschat.chat import Chat
    from wschat.config import Settings
    from wschat.persistence import open_message_log
    from wschat.ratelimit import MemoryRateLimiter
    from wschat.stores.durable import DurableMessageStore
    from wschat.stores.memory import create_memory_stores

    settings = Settings.from_env({"JWT_SECRET": SECRET, "ENABLE_PERSISTENCE": "true",
                                  "RATE_LIMIT": "1000", "RATE_LIMIT_BURST": "1000", **env})
    stores = create_memory_stores(100, 3600)
    durable = DurableMessageStore(stores.messages,
                                  open_message_log(f"sqlite:///{tmp_path}/b.db"))
    durable.start()
    stores.messages = durable
    try:
        yield Chat(settings, stores, Authenticator(settings, clock=clock),
                   MemoryRateLimiter(1000, 1000, clock), clock=clock, monotonic=clock), durable
    finally:
        durable.close()


def _away(chat: Any, user_id: str, username: str) -> None:
    """``user_id`` has connected once (so DMs to them are kept) and left."""
    once = FakeSession(user_id, username, True)
    chat.open(once)
    chat.close(once)


def _connects_during_the_dm_check(chat: Any, durable: Any, session: FakeSession) -> None:
    """The next DM's recipient connects (``session``) right after its check found her
    offline: her connection may read her kept DMs before that DM is committed."""
    knows = durable.keeps_dms_for

    def connects_meanwhile(user_id: str) -> bool:
        known = knows(user_id)
        chat.open(session)
        return known

    durable.keeps_dms_for = connects_meanwhile


def _alice_online_bob_away(chat: Any) -> FakeSession:
    """bob has connected once (so DMs to him are kept) and left; alice is online."""
    _away(chat, "bob", "Bob")
    alice = FakeSession("alice", "Alice", True)
    chat.open(alice)
    return alice


def test_offline_backlog_has_a_bound_and_the_sender_is_told(tmp_path: Any, clock: Clock
                                                            ) -> None:
    """Past MAX_KEPT_DMS kept DMs, a DM to that offline user is refused with ``inbox_full``
    (never accepted and dropped later); once they connected, DMs are accepted again."""
    with durable_chat(tmp_path, clock) as (chat, durable):
        durable.max_kept_dms = 3
        alice = _alice_online_bob_away(chat)
        for i in range(5):
            chat.receive(alice, json.dumps({"type": "dm", "to": "bob", "text": f"t{i}",
                                            "id": i}))
        assert [e["text"] for e in alice.events("dm")] == ["t0", "t1", "t2"]
        assert [(e["id"], e["code"]) for e in alice.events("error")] == [
            (3, "inbox_full"), (4, "inbox_full")]
        bob = FakeSession("bob", "Bob", True)
        chat.open(bob)
        assert bob.events("welcome")[0]["dm_backlog"] == 3
        assert [e["text"] for e in bob.events("dm")] == ["t0", "t1", "t2"]
        chat.close(bob)
        chat.receive(alice, json.dumps({"type": "dm", "to": "bob", "text": "later", "id": 9}))
        assert alice.events("dm")[-1]["text"] == "later"


def test_one_sender_cannot_fill_an_offline_users_inbox(tmp_path: Any, clock: Clock) -> None:
    """One sender may keep at most MAX_KEPT_DMS_PER_SENDER of an offline user's kept DMs,
    and all guests together as much (a guest is one connection: a new one is a new id);
    past it that sender gets ``inbox_full`` while the others' DMs are still kept, and the
    server API's are bounded only by the inbox. Before, one guest's 1,000 DMs to a user who
    was away refused everyone else's with ``inbox_full`` until the user came back."""
    with durable_chat(tmp_path, clock) as (chat, durable):
        durable.max_kept_dms = 10
        durable.max_kept_dms_per_sender = 2
        alice = _alice_online_bob_away(chat)
        carol = FakeSession("carol", "Carol", True)
        guests = [FakeSession(f"guest-00000000000{i}", f"g{i}", False) for i in range(2)]
        for session in (carol, *guests):
            chat.open(session)
        for sender in (alice, guests[0], guests[1], carol):
            for i in range(3):
                chat.receive(sender, json.dumps({"type": "dm", "to": "bob", "id": i,
                                                 "text": f"{sender.user_id} {i}"}))
        assert [(e["id"], e["code"]) for e in alice.events("error")] == [(2, "inbox_full")]
        guest_errors = guests[0].events("error") + guests[1].events("error")
        assert [e["code"] for e in guest_errors] == ["inbox_full"] * 4
        assert [e["id"] for e in carol.events("error")] == [2]
        for i in range(3):  # the API's: only the inbox's bound
            durable.post_dm(API_USER, "bob", draft_dm("bob", "system", API_USER, f"api {i}",
                                                      1, None), recipient_online=False)
        with pytest.raises(InboxFull):  # 2 + 2 (guests) + 2 + 3 + 1 = 10: full
            durable.post_dm("dave", "bob", draft_dm("bob", "Dave", "dave", "x", 1, None),
                            recipient_online=False)
            durable.post_dm("erin", "bob", draft_dm("bob", "Erin", "erin", "y", 1, None),
                            recipient_online=False)
        bob = FakeSession("bob", "Bob", True)
        chat.open(bob)
        assert bob.events("welcome")[0]["dm_backlog"] == 10
        assert [e["text"] for e in bob.events("dm")] == [
            "alice 0", "alice 1", "guest-000000000000 0", "guest-000000000000 1",
            "carol 0", "carol 1", "api 0", "api 1", "api 2", "x"]


def test_a_dm_arriving_while_the_backlog_is_read_comes_after_welcome_and_backlog(
        tmp_path: Any, clock: Clock) -> None:
    """A DM to a user whose connection is reading its kept DMs from the database (online
    already, so the DM goes out live) comes after ``welcome`` and the kept DMs (before:
    ahead of both, the connection's first frame)."""
    with durable_chat(tmp_path, clock) as (chat, durable):
        alice = _alice_online_bob_away(chat)
        chat.receive(alice, json.dumps({"type": "dm", "to": "bob", "text": "kept"}))
        arrived = durable.user_arrived

        def arrival_meanwhile_a_dm(user: User) -> Any:
            chat.receive(alice, json.dumps({"type": "dm", "to": "bob", "text": "live"}))
            return arrived(user)

        durable.user_arrived = arrival_meanwhile_a_dm
        bob = FakeSession("bob", "Bob", True)
        chat.open(bob)
        assert [(e["type"], e.get("text")) for e in bob.events()] == [
            ("welcome", None), ("dm", "kept"), ("dm", "live")]


@pytest.mark.parametrize("backlog", [False, True])
def test_a_dm_kept_for_a_user_who_connects_meanwhile_reaches_her_connection(
        tmp_path: Any, clock: Clock, backlog: bool) -> None:
    """A DM whose check found its recipient offline, committed as kept after her new
    connection had read her kept DMs, still reaches that connection, once (before: the
    sender had its echo and she got nothing until her next connection, maybe days
    later). With a backlog being written, the copy sent live is not sent a second time."""
    with durable_chat(tmp_path, clock) as (chat, durable):
        alice = _alice_online_bob_away(chat)
        if backlog:
            chat.receive(alice, json.dumps({"type": "dm", "to": "bob", "text": "kept"}))
        bob = _HeldSession("bob", "Bob", True)
        _connects_during_the_dm_check(chat, durable, bob)
        chat.receive(alice, json.dumps({"type": "dm", "to": "bob", "text": "race"}))
        assert alice.events("dm")[-1]["text"] == "race"  # acknowledged
        _read_all(bob)
        expected = ["kept", "race"] if backlog else ["race"]
        assert [e["text"] for e in bob.events("dm")] == expected


def test_a_kept_dm_its_backlog_wrote_is_not_written_again_by_its_live_copy(
        tmp_path: Any, clock: Clock) -> None:
    """bob's connection reads his kept DMs, the one just committed among them, and its
    backlog is done before that DM's live copy (Chat.deliver_if_arrived) reaches it:
    the copy is not written to it a second time (before: it got the DM twice)."""
    with durable_chat(tmp_path, clock) as (chat, _):
        alice = _alice_online_bob_away(chat)
        bob = FakeSession("bob", "Bob", True)  # reads at once
        presence = chat.stores.presence
        is_online = presence.is_online
        checks: list[str] = []

        def connects_after_the_commit(user_id: str) -> bool:
            checks.append(user_id)
            if user_id == "bob" and len(checks) == 2:  # deliver_if_arrived's check
                chat.open(bob)  # his backlog, this DM in it, is written and done
                assert [e["text"] for e in bob.events("dm")] == ["race"]
            return is_online(user_id)

        presence.is_online = connects_after_the_commit  # type: ignore[method-assign]
        _dm(chat, alice, "bob", "race")
        assert checks == ["bob", "bob"], "the DM was not checked twice"
        assert alice.events("dm")[-1]["text"] == "race"  # acknowledged
        assert [e["text"] for e in bob.events("dm")] == ["race"]
        _dm(chat, alice, "bob", "later")  # live DMs still reach him
        assert [e["text"] for e in bob.events("dm")] == ["race", "later"]
        # the backlog's ids are remembered for a grace period, not for the connection's life
        from wschat.hub import KEPT_IDS_GRACE
        chat.tick()
        clock.now += KEPT_IDS_GRACE - 1
        chat.tick()
        assert chat.hub._kept_sent, "forgotten before the grace period was over"
        clock.now += 2
        chat.tick()
        assert not chat.hub._kept_sent and not chat.hub._kept_forget_at


class _HeldSession(FakeSession):
    """A connection whose paced frames are not handed over yet (a client slow to read):
    ``on_sent`` waits in ``held``."""

    __slots__ = ("held",)

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.held: list[Any] = []

    def send_paced(self, frames: list[bytes], on_sent: Any = None) -> None:
        self.frames.extend(frames)
        self.held.append(on_sent)


def test_a_token_refresh_does_not_send_the_kept_dms_again(tmp_path: Any, clock: Clock) -> None:
    """``auth`` as the user the connection already is (a token refresh) is answered with a
    ``welcome`` of ``dm_backlog: 0``: the kept DMs came, or are coming, with the connection's
    first ``welcome`` (before: each refresh while that page was still going out queued the
    same page again, a duplicate of every kept DM per refresh)."""
    with durable_chat(tmp_path, clock) as (chat, _):
        alice = _alice_online_bob_away(chat)
        for i in range(3):
            chat.receive(alice, json.dumps({"type": "dm", "to": "bob", "text": f"t{i}"}))
        bob = _HeldSession("bob", "Bob", True)
        chat.open(bob)
        assert bob.events("welcome")[0]["dm_backlog"] == 3
        for n in range(3):
            chat.receive(bob, json.dumps({"type": "auth", "token": token("bob"), "id": n}))
        assert [w.get("dm_backlog") for w in bob.events("welcome")] == [3, 0, 0, 0]
        assert [e["text"] for e in bob.events("dm")] == ["t0", "t1", "t2"]
        for on_sent in bob.held:
            on_sent()
        chat.close(bob)
        again = FakeSession("bob", "Bob", True)
        chat.open(again)
        assert again.events("welcome")[0]["dm_backlog"] == 0


def _dm(chat: Any, sender: FakeSession, to: str, text: str) -> None:
    chat.receive(sender, json.dumps({"type": "dm", "to": to, "text": text}))


def _read_all(session: _HeldSession) -> None:
    """The client reads whatever is written to it, page after page."""
    while session.held:
        on_sent = session.held.pop(0)
        if on_sent is not None:
            on_sent()


def test_a_dm_arriving_while_a_guest_signs_in_comes_after_welcome_and_backlog(
        tmp_path: Any, clock: Clock) -> None:
    """A guest signing in as bob: a DM to bob arriving while the sign-in's store steps
    wait (bob's channel already subscribed, his kept DMs not read yet) comes after the
    ``welcome`` and the DMs kept for him (before: ahead of both, out of id order)."""
    with durable_chat(tmp_path, clock) as (chat, _):
        alice = _alice_online_bob_away(chat)
        _dm(chat, alice, "bob", "kept")
        guest = FakeSession("guest-1", "Guest", False)
        chat.open(guest)
        guest.clear()
        standing = chat.access.read_standing

        def a_dm_meanwhile(session: Any, room: Any) -> Any:
            chat.access.read_standing = standing  # once
            _dm(chat, alice, "bob", "live")
            return standing(session, room)

        chat.access.read_standing = a_dm_meanwhile  # type: ignore[method-assign]
        chat.receive(guest, json.dumps({"type": "auth", "token": token("bob")}))
        assert chat.access.read_standing == standing, "the sign-in read no standing"
        assert [(e["type"], e.get("text")) for e in guest.events()] == [
            ("welcome", None), ("dm", "kept"), ("dm", "live")]


def test_a_sign_in_as_another_user_during_a_kept_backlog_keeps_the_new_one_in_order(
        tmp_path: Any, clock: Clock) -> None:
    """ann's connection signs in as bob while ann's kept DMs are still being written:
    once ann's page has been read, bob's live DMs still wait behind bob's kept ones
    (before: the end of ann's backlog released bob's held DMs, and a live DM to bob
    went out ahead of his second kept page)."""
    with durable_chat(tmp_path, clock) as (chat, _):
        alice = _alice_online_bob_away(chat)
        _away(chat, "ann", "Ann")
        _dm(chat, alice, "ann", "for ann")
        for i in range(51):  # two pages
            _dm(chat, alice, "bob", f"k{i}")
        conn = _HeldSession("ann", "Ann", True)
        chat.open(conn)  # ann's page written, not read yet
        chat.receive(conn, json.dumps({"type": "auth", "token": token("bob")}))
        assert [w.get("dm_backlog") for w in conn.events("welcome")] == [1, 51]
        ann_read = conn.held.pop(0)
        ann_read()  # the client reads ann's page: the rest of bob's is still coming
        _dm(chat, alice, "bob", "live")
        _read_all(conn)
        assert [e["text"] for e in conn.events("dm")] == [
            "for ann", *(f"k{i}" for i in range(51)), "live"]


@pytest.mark.parametrize("sign_in", ["done", "unavailable"])
def test_live_dms_held_behind_a_backlog_survive_a_sign_in_as_another_user(
        tmp_path: Any, clock: Clock, sign_in: str) -> None:
    """A live DM to ann, held behind ann's kept DMs still being written, reaches the
    connection when it signs in as bob, or tries to and is answered ``unavailable``
    (before: the held DM was dropped with the hold, though the sender had its echo and
    it was never kept, since ann was online: ann never got it)."""
    with durable_chat(tmp_path, clock) as (chat, _):
        alice = _alice_online_bob_away(chat)
        _away(chat, "ann", "Ann")
        _dm(chat, alice, "ann", "kept")
        conn = _HeldSession("ann", "Ann", True)
        chat.open(conn)  # ann's page written, not read yet
        _dm(chat, alice, "ann", "live")  # held behind it
        assert alice.events("dm")[-1]["text"] == "live"  # acknowledged
        if sign_in == "unavailable":
            presence = chat.stores.presence
            connect = presence.connect

            def refused(conn_id: str, user: User) -> None:
                raise Unavailable("redis away")

            presence.connect = refused  # type: ignore[method-assign]
            chat.receive(conn, json.dumps({"type": "auth", "token": token("bob"), "id": 1}))
            presence.connect = connect  # type: ignore[method-assign]
            assert [e["code"] for e in conn.events("error")] == ["unavailable"]
            assert conn.user_id == "ann"
        else:
            chat.receive(conn, json.dumps({"type": "auth", "token": token("bob")}))
            assert conn.user_id == "bob"
        _read_all(conn)
        assert [e["text"] for e in conn.events("dm")] == ["kept", "live"]
        if sign_in == "unavailable":  # still ann's: what comes now comes live
            _dm(chat, alice, "ann", "after")
            assert [e["text"] for e in conn.events("dm")] == ["kept", "live", "after"]
        chat.close(conn)
        again = FakeSession("ann", "Ann", True)
        chat.open(again)
        assert again.events("welcome")[0]["dm_backlog"] == 0


def test_retry_of_a_kept_dm_to_a_full_inbox_gets_the_stored_one(tmp_path: Any,
                                                                clock: Clock) -> None:
    """The DM that filled bob's inbox, sent again with its client_msg_id (its echo was
    lost), is answered with the stored one: it was accepted and bob gets it once (before:
    ``inbox_full``, "not accepted, try later", and the user's later try was a second copy)."""
    with durable_chat(tmp_path, clock) as (chat, durable):
        durable.max_kept_dms = 2
        alice = _alice_online_bob_away(chat)
        for i in range(2):
            chat.receive(alice, json.dumps({"type": "dm", "to": "bob", "text": f"t{i}",
                                            "client_msg_id": f"k{i}"}))
        first = [(e["id"], e["client_msg_id"]) for e in alice.events("dm")]
        assert [cmid for _, cmid in first] == ["k0", "k1"]
        chat.receive(alice, json.dumps({"type": "dm", "to": "bob", "text": "t1",
                                        "client_msg_id": "k1", "id": "retry"}))
        assert alice.events("error") == []
        assert [(e["id"], e["client_msg_id"]) for e in alice.events("dm")] == [*first,
                                                                                first[1]]
        chat.receive(alice, json.dumps({"type": "dm", "to": "bob", "text": "t2",
                                        "client_msg_id": "k2", "id": "new"}))
        assert [(e["id"], e["code"]) for e in alice.events("error")] == [("new", "inbox_full")]
        bob = FakeSession("bob", "Bob", True)
        chat.open(bob)
        assert bob.events("welcome")[0]["dm_backlog"] == 2
        assert [e["text"] for e in bob.events("dm")] == ["t0", "t1"]


def _committed_never_published(durable: Any, text: str, cmid: str) -> int:
    """A DM from alice to bob that the log committed while its worker never learnt it
    (the commit's reply was lost) or never published it (Redis failed after COMMIT)."""
    from wschat.persistence import DmPost

    lost = DmPost(sender_id="alice", recipient_id="bob",
                  draft=draft_dm("bob", "Alice", "alice", text, 1, cmid))
    durable.log.write([lost])
    return lost.msg_id


def test_retry_of_a_dm_committed_but_never_published_reaches_the_online_recipient(
        tmp_path: Any, clock: Clock) -> None:
    """The retry of such a DM publishes it again: bob gets it, alice one echo (before: the
    retry was acknowledged as a duplicate and bob never got it)."""
    with durable_chat(tmp_path, clock) as (chat, durable):
        bob = FakeSession("bob", "Bob", True)
        chat.open(bob)
        alice = FakeSession("alice", "Alice", True)
        chat.open(alice)
        msg_id = _committed_never_published(durable, "lost reply", "c-1")
        chat.receive(alice, json.dumps({"type": "dm", "to": "bob", "text": "lost reply",
                                        "client_msg_id": "c-1"}))
        assert [(e["id"], e["text"]) for e in bob.events("dm")] == [(msg_id, "lost reply")]
        assert [(e["id"], e["client_msg_id"]) for e in alice.events("dm")] == [(msg_id, "c-1")]
        # addressed to someone else under the same client_msg_id: bob's DM is not sent
        carol = FakeSession("carol", "Carol", True)
        chat.open(carol)
        chat.receive(alice, json.dumps({"type": "dm", "to": "carol", "text": "lost reply",
                                        "client_msg_id": "c-1"}))
        assert carol.events("dm") == [] and len(bob.events("dm")) == 1
        assert [e["id"] for e in alice.events("dm")] == [msg_id, msg_id]


def test_retry_of_a_dm_committed_but_never_published_is_kept_for_the_offline_recipient(
        tmp_path: Any, clock: Clock) -> None:
    """With bob offline at the retry, the log keeps the DM for his next connection
    (before: it stayed marked delivered, and bob never got it)."""
    with durable_chat(tmp_path, clock) as (chat, durable):
        alice = _alice_online_bob_away(chat)
        msg_id = _committed_never_published(durable, "while away", "c-2")
        chat.receive(alice, json.dumps({"type": "dm", "to": "bob", "text": "while away",
                                        "client_msg_id": "c-2"}))
        assert [e["id"] for e in alice.events("dm")] == [msg_id]
        bob = FakeSession("bob", "Bob", True)
        chat.open(bob)
        assert bob.events("welcome")[0]["dm_backlog"] == 1
        assert [(e["id"], e["text"]) for e in bob.events("dm")] == [(msg_id, "while away")]


# -- 7. a stalled worker, reaped as dead, registers its users again ------------------------
def test_worker_paused_past_presence_ttl_registers_its_users_again() -> None:
    """A worker paused (SIGSTOP) longer than PRESENCE_TTL is reaped by the other server;
    when it resumes, its users are back in ``list_users`` and reachable by DM (before:
    missing and ``user_not_found``, though they still received room messages)."""
    import os
    import signal

    env = {**COMMON, "REDIS_URL": redis_url_or_skip(REDIS_DB + 2), "PRESENCE_TTL": "1.5"}
    with Server(env) as a, Server(env) as b, stopped_together(a, b):
        r = room()
        with Client(a.url, f"token={token('sleeper')}") as x, \
                Client(b.url, f"token={token('watcher')}") as y:
            x.join(r)
            y.join(r)
            worker = a.worker_pids()[0]
            os.kill(worker, signal.SIGSTOP)
            try:
                assert y.expect("presence", 4 * TIMEOUT, status="offline")["user_id"] == "sleeper"
            finally:
                os.kill(worker, signal.SIGCONT)
            assert y.expect("presence", 4 * TIMEOUT, status="online")["user_id"] == "sleeper"
            users = y.request({"type": "list_users", "room": r}, "users")["users"]
            assert sorted(u["user_id"] for u in users) == ["sleeper", "watcher"]
            y.send({"type": "dm", "to": "sleeper", "text": "awake?", "id": "d"})
            assert y.expect("dm")["text"] == "awake?"
            assert x.expect("dm")["text"] == "awake?"


# -- a retry of a message the connection already has is not echoed again -----------------
def test_retry_of_a_message_already_replayed_is_not_echoed_twice(clock: Clock) -> None:
    """A sender whose connection died before its echo rejoins with ``since`` (the replay
    holds its message, with its client_msg_id) and then resends it: it gets it once (in the
    fault suite's rolling restart: ``..., 49, 49, ...``). A connection that joined without
    ``since`` still gets the original echoed, as documented."""
    chat = make_chat(clock, RATE_LIMIT="1000", RATE_LIMIT_BURST="1000")
    a = FakeSession("a", "Ann", True)
    chat.open(a)
    chat.receive(a, json.dumps({"type": "join", "room": "r"}))
    chat.receive(a, json.dumps({"type": "message", "room": "r", "text": "hi",
                                "client_msg_id": "k1"}))
    chat.close(a)  # the echo was lost with the connection (in real life)
    again = FakeSession("a", "Ann", True)
    chat.open(again)
    chat.receive(again, json.dumps({"type": "join", "room": "r", "since": 0}))
    chat.receive(again, json.dumps({"type": "message", "room": "r", "text": "hi",
                                    "client_msg_id": "k1"}))
    assert [m["id"] for m in again.events("message")] == [1]
    fresh = FakeSession("a", "Ann", True)
    chat.open(fresh)
    chat.receive(fresh, json.dumps({"type": "join", "room": "r"}))
    chat.receive(fresh, json.dumps({"type": "message", "room": "r", "text": "hi",
                                    "client_msg_id": "k1"}))
    assert [(m["id"], m["client_msg_id"]) for m in fresh.events("message")] == [(1, "k1")]


def test_retry_of_a_message_not_yet_delivered_here_is_not_echoed_twice() -> None:
    """A retry answered while the original is still on its way to this worker (Redis
    restarting, a committed message published late): the echo would come, then the
    original from the room's stream. The stream's copy is the only one."""
    hub = LocalHub(MemoryBroker())
    s = FakeSession("a", "Ann", True)
    hub.add_user(s)
    hub.begin_recovery("r", s)
    hub.finish_recovery("r", s, 0, set())  # joined without since
    hub.deliver_room("r", draft_message("r", "Ann", "a", "one", 0, "k1").with_id(1))
    assert hub.gets_message("r", s, 2)  # on its way: the stream brings it
    assert not hub.gets_message("r", s, 1)  # it had it: a retry is echoed, as documented


def test_since_beyond_the_rooms_ids_reports_the_real_last_id_and_goes_live() -> None:
    """A client that saw ids a restarted memory server never issued (``since`` above the
    room's last id) gets ``recovered: false`` with the room's real ``last_id``, and the next
    messages reach it live (before: ``last_id`` echoed ``since`` and ids up to it were held
    back as already seen)."""
    with Server({"RATE_LIMIT": "1000", "RATE_LIMIT_BURST": "1000"}) as server:
        r = room()
        with Client(server.url) as writer, Client(server.url) as reader:
            writer.join(r)
            assert [writer.say(r, f"m{i}")["id"] for i in range(3)] == [1, 2, 3]
            joined = reader.join(r, since=50)
            assert joined["recovered"] is False and joined["last_id"] == 3
            writer.send({"type": "message", "room": r, "text": "after"})
            assert reader.expect("message", text="after")["id"] == 4


# -- 8. after a pub/sub outage, every room with local members catches up ------------------
def _kill_pubsub_of(redis_url: str, pid: int) -> None:
    """Close, on the Redis side, the pub/sub connection of the worker ``pid`` only."""
    import psutil
    import redis as redis_py

    ports = {c.laddr.port for c in psutil.Process(pid).net_connections("tcp") if c.raddr}
    admin = redis_py.Redis.from_url(redis_url)
    try:
        victims = [c["id"] for c in admin.client_list(_type="pubsub")
                   if int(c["addr"].rpartition(":")[2]) in ports]
        assert len(victims) == 1, victims
        admin.client_kill_filter(_id=victims[0])
    finally:
        admin.close()


def test_a_room_with_nothing_delivered_yet_is_caught_up_after_a_pubsub_outage() -> None:
    """Worker A loses its pub/sub connection while worker B accepts a message in a room
    where A's member has received nothing live yet: once A is back, the member gets it
    (before: A filled the gap only in rooms it had delivered a message in, so the
    acknowledged message never reached it)."""
    import os
    import signal

    with _alice_on_a_bob_on_b() as (redis_server, a, _, alice, bob):
        r = room()
        alice.join(r)
        bob.join(r)
        worker = a.worker_pids()[0]
        os.kill(worker, signal.SIGSTOP)  # so that it cannot resubscribe at once
        try:
            _kill_pubsub_of(redis_server.url, worker)
            during = bob.say(r, "sent while A was not subscribed")
        finally:
            os.kill(worker, signal.SIGCONT)
        wait_until(lambda: "re-registered" in a.output(),
                   timeout=10 * SCALE, message="A to resubscribe and resync")
        after = bob.say(r, "after")
        got = [alice.expect("message", 2 * TIMEOUT)["id"] for _ in range(2)]
        assert got == [during["id"], after["id"]] == [1, 2]


def test_sequences_resume_above_what_a_member_was_handed_at_its_join() -> None:
    """Redis restarts empty. Worker A's member joined a room at id 5 and has received
    nothing live since; the room's other member left it. The room's next message must
    be id 6, and reach A's member (before: A raised only the sequences of rooms it had
    delivered a message in, so the room restarted at id 1: an id issued twice, and the
    member, holding 5, never got it)."""
    with _alice_on_a_bob_on_b() as (redis_server, a, b, alice, bob):
        r = room()
        bob.join(r)
        for i in range(5):
            bob.say(r, f"m{i + 1}")
        assert alice.join(r)["last_id"] == 5
        bob.request({"type": "leave", "room": r}, "left")
        redis_server.stop()
        redis_server.start()
        for server in (a, b):
            wait_until(lambda s=server: "re-registered" in s.output(),
                       timeout=15 * SCALE, message="both workers to resync")
        wait_until(lambda: _joins_again(bob, r), timeout=10 * SCALE,
                   message="bob to join again")
        assert bob.post_until_taken({"type": "message", "room": r,
                                     "text": "after the restart"})["id"] == 6
        assert alice.expect("message", 2 * TIMEOUT)["id"] == 6


# -- 12. no id issued twice after Redis lost its data ---------------------------------------
def _three_messages_in_a_room(alice: Client, bob: Client) -> str:
    """A new room both joined, where bob said ids 1 to 3 and alice got them."""
    r = room()
    alice.join(r)
    bob.join(r)
    assert [bob.say(r, f"m{i}")["id"] for i in range(3)] == [1, 2, 3]
    assert [alice.expect("message")["id"] for _ in range(3)] == [1, 2, 3]
    return r


def _flush_all(redis_url: str) -> None:
    """FLUSHALL: every key gone, no connection dropped."""
    import redis as redis_py

    admin = redis_py.Redis.from_url(redis_url)
    try:
        admin.flushall()
    finally:
        admin.close()


def test_no_room_id_is_issued_twice_while_a_stalled_worker_catches_up() -> None:
    """Redis restarts empty while worker A is stalled (SIGSTOP): A's member alice has
    ids 1 to 3 of a room in which B has no member any more. A post through B must wait
    until A has raised the room's sequence: refused (``unavailable``) meanwhile, then
    id 4, which alice gets (before: B took it at once as id 1, an id alice already had,
    and she never saw the message)."""
    import os
    import signal

    with _alice_on_a_bob_on_b() as (redis_server, a, b, alice, bob):
        r = _three_messages_in_a_room(alice, bob)
        bob.request({"type": "leave", "room": r}, "left")
        worker = a.worker_pids()[0]
        os.kill(worker, signal.SIGSTOP)
        try:
            redis_server.stop()
            redis_server.start()
            wait_until(lambda: "re-registered" in b.output(), timeout=15 * SCALE,
                       message="B to resync")
            wait_until(lambda: _joins_again(bob, r), timeout=10 * SCALE,
                       message="bob to join again")
            bob.send({"type": "message", "room": r, "text": "while A is stalled", "id": "s"})
            refused = bob.expect("error", id="s")
            assert refused["code"] == "unavailable", refused
        finally:
            os.kill(worker, signal.SIGCONT)
        echo = bob.post_until_taken({"type": "message", "room": r, "text": "A is back"})
        assert echo["id"] == 4
        assert alice.expect("message", 2 * TIMEOUT, text="A is back")["id"] == 4
        alice.assert_silent("message")


def test_dm_ids_continue_above_those_delivered_after_redis_lost_its_data() -> None:
    """Redis restarts empty after bob sent alice DMs 1 to 3: the next DM is 4 (before:
    1 again, which a client that drops DM ids it has, as docs/delivery.md asks, drops)."""
    with _alice_on_a_bob_on_b() as (redis_server, a, b, alice, bob):
        for i in range(3):
            bob.request({"type": "dm", "to": "alice", "text": f"d{i}"}, "dm")
        assert [alice.expect("dm")["id"] for _ in range(3)] == [1, 2, 3]
        redis_server.stop()
        redis_server.start()
        for server in (a, b):
            wait_until(lambda s=server: "re-registered" in s.output(),
                       timeout=15 * SCALE, message="both workers to resync")
        echo = bob.post_until_taken({"type": "dm", "to": "alice", "text": "after"})
        assert echo["id"] == 4
        assert alice.expect("dm", 2 * TIMEOUT, text="after")["id"] == 4


def test_dms_reach_a_user_whose_connection_a_rolled_back_redis_still_lists() -> None:
    """Redis restarts from a snapshot taken while alice was connected to A (a failover to
    a replica that was behind does the same): A's registrations come back with a
    connection of hers that has closed since. Once the workers recovered, alice, now on B,
    must get DMs again (before: dm_heard.lua counted A among her workers for as long as A
    lived, A was not subscribed to her channel, and every DM to her was refused
    ``unavailable``)."""
    import redis as redis_py

    with _alice_on_a_bob_on_b() as (redis_server, a, b, alice, bob):
        admin = redis_py.Redis.from_url(redis_server.url)
        try:
            admin.save()  # the snapshot: alice connected to A
        finally:
            admin.close()
        alice.close()
        wait_until(lambda: not _online(redis_server.url, "alice"), timeout=10 * SCALE,
                   message="alice's connection to A to be gone from Redis")
        redis_server.stop()
        redis_server.start()  # loads the snapshot
        for server in (a, b):
            wait_until(lambda s=server: "re-registered" in s.output(),
                       timeout=15 * SCALE, message="both workers to resync")
        with Client(b.url, f"token={token('alice')}") as alice_on_b:
            echo = bob.post_until_taken({"type": "dm", "to": "alice", "text": "after"})
            assert alice_on_b.expect("dm", 2 * TIMEOUT, text="after")["id"] == echo["id"]


def _online(redis_url: str, user_id: str) -> bool:
    import redis as redis_py

    admin = redis_py.Redis.from_url(redis_url)
    try:
        return bool(admin.hget("wschat:presence", user_id))
    finally:
        admin.close()


def test_room_ids_continue_after_a_flush_no_connection_noticed() -> None:
    """FLUSHALL drops Redis's data and none of its connections: the next post is not
    taken until the worker has found the loss and raised its sequences, then it is
    id 4 (before: id 1, taken at once; the worker noticed at its next heartbeat)."""
    with own_redis() as redis_server, \
            Server({**COMMON, "REDIS_URL": redis_server.url}) as srv, \
            Client(srv.url, f"token={token('alice')}") as alice:
        r = room()
        alice.join(r)
        assert [alice.say(r, f"m{i}")["id"] for i in range(3)] == [1, 2, 3]
        _flush_all(redis_server.url)
        echo = alice.post_until_taken({"type": "message", "room": r, "text": "after"})
        assert echo["id"] == 4


def test_a_flush_is_recovered_by_every_worker_at_once_not_at_its_heartbeat() -> None:
    """FLUSHALL drops no connection. The worker that finds it (a refused post) tells the
    others on the control channel, so a worker it waits for raises its sequences at once,
    not at its next heartbeat (PRESENCE_TTL / 3: 100 s here): the post is taken within
    seconds, with the next id (before: refused until that heartbeat)."""
    with _alice_on_a_bob_on_b(PRESENCE_TTL="300") as (redis_server, a, _, alice, bob):
        r = _three_messages_in_a_room(alice, bob)
        _flush_all(redis_server.url)
        # bob's worker B started after A: it knew A at its first heartbeat, and waits for it
        echo = bob.post_until_taken({"type": "message", "room": r, "text": "after"})
        assert echo["id"] == 4
        assert alice.expect("message", 2 * TIMEOUT, text="after")["id"] == 4
        assert "redis lost its data" in a.output()


def _posts_taken(client: Any, room_name: str) -> Callable[[], bool]:
    """Asks whether a post to ``room_name``, through a message store on ``client``, is
    taken now (the epoch's gate open) or refused (``Unavailable``): the post is made."""
    from wschat.stores.base import Unavailable
    from wschat.stores.redis import RedisMessageStore

    store = RedisMessageStore(client, 100)
    draft = draft_message(room_name, "a", "u1", "x", 1, None)

    def taken() -> bool:
        try:
            store.post_room(room_name, "u1", draft)
        except Unavailable:
            return False
        return True

    return taken


def test_the_gate_waits_for_every_worker_that_knew_the_data_or_its_time_limit() -> None:
    """epoch.py step by step on a real Redis: a first start opens the posts at once;
    after the data is lost, they wait until every worker listed as recovering is done,
    and no longer than the list's time limit for one that never comes back."""
    import redis as redis_py

    from wschat.stores.redis.epoch import Epoch

    client = redis_py.Redis.from_url(redis_url_or_skip(28))  # no other module uses it
    taken = _posts_taken(client, "g")
    try:
        one, two = Epoch(client, "one", 30), Epoch(client, "two", 30)
        assert not taken()  # no epoch: nobody has looked at this data yet
        assert (one.begin(), two.begin()) == (False, False)  # a first start, then the same
        assert taken()
        client.flushdb()
        assert not taken()
        assert one.begin(["one", "two"]) is True  # lost: both listed
        assert not taken()
        assert one.done() is False and not taken()  # "two" still raising
        assert two.begin() is True
        assert two.done() is True and taken()
        client.flushdb()
        late = Epoch(client, "late", 0.3)
        late.seen = one.seen
        assert late.begin(["gone"]) is True and late.done() is False
        assert not taken()
        wait_until(taken, timeout=5 * SCALE, message="the time limit to open the gate")
    finally:
        client.close()


def test_a_redis_restart_that_kept_its_data_holds_posts_until_every_worker_caught_up() -> None:
    """Redis restarts with its data (here from its append-only file; a snapshot, or a
    failover to a replica, may hold older sequences than the workers delivered): its
    ``run_id`` is new, so the workers treat it as a loss, and posts wait for every worker
    the registry lists as alive (before the gate: taken at once, from what may be an
    older sequence). A reconnect to the same run of Redis holds nothing."""
    import redis as redis_py

    from wschat.stores.base import Unavailable
    from wschat.stores.redis import RedisMessageStore
    from wschat.stores.redis.epoch import Epoch
    from wschat.stores.redis.keys import NODES

    with own_redis("--appendonly", "yes", "--appendfsync", "always") as redis_server:
        client = redis_py.Redis.from_url(redis_server.url)
        store = RedisMessageStore(client, 100)
        draft = draft_message("k", "a", "u1", "x", 1, None)
        try:
            one, two = Epoch(client, "one", 30), Epoch(client, "two", 30)
            assert (one.begin(), two.begin()) == (False, False)
            assert store.post_room("k", "u1", draft).msg_id == 1
            assert one.begin(["two"]) is False  # the same run of Redis: nothing held
            client.zadd(NODES, {"two": time.time() * 1000})  # "two" beat: alive
            redis_server.stop()
            redis_server.start()
            assert client.get("wschat:{r:k}:seq") == b"1"  # the data was kept, but
            assert one.begin() is True  # Redis restarted: "two", in the registry, listed too
            with pytest.raises(Unavailable):
                store.post_room("k", "u1", draft)
            assert one.done() is False
            assert two.begin() is True and two.done() is True
            assert store.post_room("k", "u1", draft).msg_id == 2
        finally:
            client.close()


@contextlib.contextmanager
def _alice_on_a_bob_on_b(**extra_env: str) -> Iterator[tuple[Any, Server, Server, Client, Client]]:
    """A Redis of the test's own, servers A and B on it, alice connected to A, bob to B."""
    with own_redis() as redis_server:
        env = {**COMMON, "REDIS_URL": redis_server.url, **extra_env}
        with Server(env) as a, Server(env) as b, stopped_together(a, b), \
                Client(a.url, f"token={token('alice')}") as alice, \
                Client(b.url, f"token={token('bob')}") as bob:
            yield redis_server, a, b, alice, bob


def _joins_again(client: Client, r: str) -> bool:
    client.send({"type": "join", "room": r, "id": "again"})
    event = client.recv()
    while event.get("type") not in ("joined", "error"):
        event = client.recv()
    return event["type"] == "joined"


# -- 9. Redis refusing for now is `unavailable`, not an internal error ----------------------
def _busy(admin: Any) -> bool:
    import redis as redis_py

    try:
        admin.ping()
    except redis_py.ResponseError as exc:
        return str(exc).startswith("BUSY")
    return False


def test_a_redis_busy_or_read_only_is_unavailable_not_an_internal_error() -> None:
    """Redis runs a script past ``busy-reply-threshold``: it answers every command with
    ``-BUSY`` and runs none; then it is demoted to a replica (a failover), which answers
    writes with ``-READONLY``. Requests that need it get ``unavailable``, as
    docs/operations.md says, a ping its ``pong``, and the refused message goes through once Redis takes writes
    again (before: those replies were ResponseErrors, so a ping, a join or a message got
    ``internal_error``)."""
    import socket

    import redis as redis_py

    with own_redis("--busy-reply-threshold", "50") as redis_server, \
            Server({**COMMON, "REDIS_URL": redis_server.url}) as srv, \
            Client(srv.url, f"token={token('alice')}") as alice:
        r = room()
        alice.join(r)
        admin = redis_py.Redis.from_url(redis_server.url, socket_timeout=TIMEOUT)
        script = socket.create_connection(("127.0.0.1", redis_server.port))
        try:
            script.sendall(b"*3\r\n$4\r\nEVAL\r\n$17\r\nwhile true do end\r\n$1\r\n0\r\n")
            wait_until(lambda: _busy(admin), timeout=TIMEOUT, message="redis to be busy")
            # A ping needs no Redis: its rate limit falls back to the worker's own.
            assert alice.request({"type": "ping", "id": "p"}, "pong")["id"] == "p"
            for request in ({"type": "join", "room": room(), "id": "j"},
                            {"type": "message", "room": r, "text": "m", "client_msg_id": "c1",
                             "id": "m"}):
                alice.send(request)
                refused = alice.expect("error", id=request["id"])
                assert refused["code"] == "unavailable", refused
            admin.script_kill()
            wait_until(lambda: not _busy(admin), timeout=TIMEOUT, message="the script to end")
            admin.replicaof("127.0.0.1", str(free_port()))  # a master nobody runs
            alice.send({"type": "message", "room": r, "text": "m", "client_msg_id": "c1",
                        "id": "again"})
            refused = alice.expect("error", id="again")
            assert refused["code"] == "unavailable", refused
            admin.replicaof("NO", "ONE")
            wait_until(lambda: srv.http("/ready")[0] == 200, timeout=20 * SCALE,
                       message="the worker to be ready")
            echo = alice.say(r, "m", client_msg_id="c1")
            assert echo["id"] == 1
        finally:
            script.close()
            admin.close()


class _MovableAddress:
    """A TCP forwarder on a free port standing in for a failover's moving address (a DNS
    name, a virtual IP): connections made go on reaching the server they reached;
    new ones reach ``target`` (a port on 127.0.0.1), which the test may change."""

    def __init__(self, target: int) -> None:
        import socket
        import threading

        self.target = target
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._sockets: list[Any] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        import socket
        import threading

        while True:
            try:
                client, _ = self._listener.accept()
                server = socket.create_connection(("127.0.0.1", self.target), timeout=TIMEOUT)
                server.settimeout(None)
            except OSError:
                return
            self._sockets += [client, server]
            for a, b in ((client, server), (server, client)):
                threading.Thread(target=self._pump, args=(a, b, a is client),
                                 daemon=True).start()

    def hold(self, data: bytes) -> float:
        """Seconds to hold ``data`` (bytes a client sends) before it goes on."""
        return 0.0

    def _pump(self, source: Any, sink: Any, from_client: bool) -> None:
        import socket

        try:
            while data := source.recv(65536):
                if from_client and (seconds := self.hold(data)):
                    time.sleep(seconds)
                sink.sendall(data)
        except OSError:
            pass
        for end in (source, sink):  # shutdown: a close alone would not wake the other pump
            with contextlib.suppress(OSError):
                end.shutdown(socket.SHUT_RDWR)
            with contextlib.suppress(OSError):
                end.close()

    def close(self) -> None:
        self._listener.close()
        for sock in self._sockets:
            with contextlib.suppress(OSError):
                sock.close()


def test_a_failover_that_moves_redis_s_address_is_followed() -> None:
    """A failover: the primary is demoted (REPLICAOF the new one) and its address now
    leads to the new primary. The worker's connections, made before, still reach the
    demoted server, which answers writes with READONLY: they are made again through the
    address, and chat resumes on the new primary, ids going on above those delivered
    (before: every message got ``unavailable`` for as long as those connections lived;
    the demoted server answers the pub/sub connection's PINGs)."""
    import redis as redis_py

    with own_redis() as old, own_redis() as new:
        address = _MovableAddress(old.port)
        try:
            with Server({**COMMON, "REDIS_URL": f"redis://127.0.0.1:{address.port}/0"}) as srv, \
                    Client(srv.url, f"token={token('alice')}") as alice:
                r = room()
                alice.join(r)
                assert [alice.say(r, f"m{i}")["id"] for i in range(3)] == [1, 2, 3]
                address.target = new.port
                demoted = redis_py.Redis.from_url(old.url)
                try:
                    demoted.replicaof("127.0.0.1", str(new.port))
                finally:
                    demoted.close()
                echo = alice.post_until_taken({"type": "message", "room": r,
                                               "text": "after the failover"})
                assert echo["id"] == 4
                assert "redis answered READONLY" in srv.output()
        finally:
            address.close()


class _SlowResubscription(_MovableAddress):
    """Holds a worker's SUBSCRIBE of its room channels (the resubscription after its
    pub/sub connection was lost) for ``seconds``, once armed, and can cut the pub/sub
    connections it carries."""

    def __init__(self, target: int, seconds: float) -> None:
        super().__init__(target)
        self.seconds = seconds
        self.armed = False

    def hold(self, data: bytes) -> float:
        return self.seconds if self.armed and b"SUBSCRIBE" in data and b"wschat:room:" in data \
            else 0.0


def test_messages_posted_while_a_worker_resubscribes_reach_its_members() -> None:
    """Worker A's pub/sub connection is lost; when A connects again, Redis makes its room
    subscriptions late (here: held for 2 s on their way). A's recovery must not read the
    room's history before those subscriptions are made: a message posted between that
    read and the subscription would come neither from the history nor live (before: A
    read the history at once, and alice never got "during"; the recovery now waits for
    Redis to answer a PING sent after the SUBSCRIBE)."""
    import os

    with own_redis() as redis_server:
        # Under the listener's ANSWER_TIMEOUT (5 s), after which it would connect again.
        address = _SlowResubscription(redis_server.port, 2.0)
        env = {**COMMON, "REDIS_URL": redis_server.url}
        try:
            with Server({**env, "REDIS_URL": f"redis://127.0.0.1:{address.port}/0"}) as a, \
                    Server(env) as b, stopped_together(a, b), \
                    Client(a.url, f"token={token('alice')}") as alice, \
                    Client(b.url, f"token={token('bob')}") as bob:
                r = room()
                alice.join(r)
                bob.join(r)
                assert bob.say(r, "before")["id"] == 1
                assert alice.expect("message")["text"] == "before"
                address.armed = True
                _kill_pubsub_of(redis_server.url, os.getpid())  # A's, through the forwarder
                wait_until(lambda: "re-registered" in a.output(), timeout=10 * SCALE,
                           message="A to connect again and recover")
                assert bob.say(r, "during")["id"] == 2
                assert bob.say(r, "after")["id"] == 3
                got = [alice.expect("message", 4 * TIMEOUT)["text"] for _ in range(2)]
                assert got == ["during", "after"]
                alice.assert_silent("message")
        finally:
            address.close()


def test_a_redis_that_stays_read_only_is_an_outage_not_a_failing_listener() -> None:
    """REDIS_URL names a read-only replica (on purpose, or a failover's address not moved
    yet): each READONLY (the heartbeat's, every second here) makes the connections again,
    and the pub/sub connection's recovery is refused with READONLY too. That is an
    outage, retried with the listener's back-off, not a listener bug (before: "redis
    listener failed; restarting it" and a traceback, every second for as long as Redis
    stayed read-only)."""
    with own_redis() as primary, \
            own_redis("--replicaof", "127.0.0.1", str(primary.port)) as replica, \
            Server({**COMMON, "REDIS_URL": replica.url, "PRESENCE_TTL": "3"}) as srv:
        time.sleep(5 * SCALE)
        assert srv.http("/ready")[0] == 503  # no connection taken: posts would be refused
        output = srv.output()
        assert "redis answered READONLY" in output
        assert "redis listener failed" not in output, output[-3000:]
        assert "Traceback" not in output, output[-3000:]


_CONNECT_AGAIN_DURING_RECOVERY = """
from gevent import monkey; monkey.patch_all()
import logging, sys, time, gevent
logging.basicConfig(level=logging.WARNING, stream=sys.stdout, format="LOG %(message)s")
from wschat.config import Settings
from wschat.stores.redis import create_redis_stores
stores = create_redis_stores(Settings.from_env({"REDIS_URL": sys.argv[1]}))
broker = stores.broker
recoveries = []
def recover():  # a READONLY answered meanwhile (the pipeline's, the heartbeat's)
    recoveries.append(time.monotonic())
    if len(recoveries) == 1:
        stores._failed_over = 0.0
        gevent.spawn(stores.connect_again)
        gevent.sleep(0.1)
broker.recover = recover
stores.start()
broker.start(lambda *_: None, lambda *_: None)
broker.subscribe_room("r")
stores._failed_over = 0.0
started = time.monotonic()
stores.connect_again()  # the first READONLY
deadline = started + 10
while not (broker.healthy() and len(recoveries) >= 2) and time.monotonic() < deadline:
    gevent.sleep(0.02)
print("RESULT", broker.healthy(), len(recoveries), round(time.monotonic() - started, 2))
stores.close()
"""


def test_a_read_only_answer_during_the_recovery_reconnects_without_a_listener_failure(
) -> None:
    """A READONLY answered while the pub/sub connection's recovery runs drops that
    connection under it: the listener makes it again at once and recovers again (before:
    it went on to listen on the dropped connection, AttributeError on None, logged as
    "redis listener failed; restarting it" with a traceback, and a second's wait)."""
    import subprocess
    import sys

    with own_redis() as redis_server:
        out = subprocess.run([sys.executable, "-c", _CONNECT_AGAIN_DURING_RECOVERY,
                              redis_server.url], capture_output=True, text=True,
                             timeout=30 * SCALE, check=True).stdout
    assert "redis listener failed" not in out, out
    result = next(line for line in out.splitlines() if line.startswith("RESULT")).split()
    assert result[1:3] == ["True", "2"], out
    assert float(result[3]) < 0.9, out  # not the second a listener failure waits


_CONNECT_AGAIN_WHILE_A_COMMAND_RUNS = """
from gevent import monkey; monkey.patch_all()
import sys, gevent, redis
from wschat.config import Settings
from wschat.stores.redis import create_redis_stores
stores = create_redis_stores(Settings.from_env({"REDIS_URL": sys.argv[1]}))
pool = stores.client
admin = redis.Redis.from_url(sys.argv[1])
# A write, then 0.3 s of work: the reply is awaited when the READONLY comes.
SLOW = ("redis.call('INCR', KEYS[1]) local t = redis.call('TIME') "
        "repeat local u = redis.call('TIME') "
        "until (u[1] - t[1]) * 1000000 + u[2] - t[2] > 300000 return 1")
def slow():
    pipe = pool.pipeline(transaction=False)
    pipe.client_id()
    pipe.eval(SLOW, 1, "slow:k")
    try:
        return pipe.execute()
    except Exception as exc:
        return repr(exc)
job = gevent.spawn(slow)
gevent.sleep(0.1)
stores.connect_again()  # another greenlet got READONLY
job.join()
print("RESULT", repr(job.value if isinstance(job.value, str) else job.value[1]))
ids = {c["id"] for c in admin.client_list()}
print("REMADE", isinstance(job.value, list) and job.value[0] not in ids)
print("WRITES", int(admin.get("slow:k")))
"""


def test_a_read_only_answer_does_not_fail_commands_other_greenlets_await() -> None:
    """connect_again drops the pool's connections: one another greenlet is using (a
    moderation write, a join's pipeline, the heartbeat) is not closed under it, which
    failed a command Redis had carried out (ConnectionError; ValueError "Invalid file
    object: None" at other instants, an internal error past ``guarded``); it finishes,
    and is made again when it goes back to the pool."""
    import subprocess
    import sys

    with own_redis() as redis_server:
        out = subprocess.run([sys.executable, "-c", _CONNECT_AGAIN_WHILE_A_COMMAND_RUNS,
                              redis_server.url], capture_output=True, text=True,
                             timeout=30 * SCALE, check=True).stdout
    assert "RESULT 1" in out, out
    assert "REMADE True" in out, out
    assert "WRITES 1" in out, out


_CONTROL_DURING_A_RECOVERY = """
from gevent import monkey; monkey.patch_all()
import sys, gevent
from wschat.config import Settings
from wschat.stores.redis import create_redis_stores
stores = create_redis_stores(Settings.from_env({"REDIS_URL": sys.argv[1]}))
stores.start()
stores.broker.start(lambda *_: None, lambda *_: None)
gevent.sleep(0.2)
looked = []
resync = stores._resync_in_epoch
stores._resync_in_epoch = lambda always: (looked.append(always), resync(always))
if sys.argv[2] == "during":
    with stores._recovering:  # a recovery whose epoch_begin ran before the loss was named
        stores.broker.on_control(b"epoch")  # another worker names it, and says so
        gevent.sleep(0.2)
    gevent.sleep(0.5)
elif sys.argv[2] == "soon":  # this worker checked less than a second ago (a refused post)
    stores.check_epoch()
    gevent.sleep(0.2)
    stores.broker.on_control(b"epoch")
    gevent.sleep(1.5)
else:  # "released": shutting down, its memberships gone from Redis
    stores.release_local()
    stores.broker.on_control(b"epoch")
    gevent.sleep(0.5)
print("LOOKED", len(looked))
stores.close()
"""


@pytest.mark.parametrize("when", ["during", "soon", "released"])
def test_a_loss_told_on_the_control_channel_during_a_recovery_is_looked_at_after_it(
        when: str) -> None:
    """The control channel's "epoch" arriving while this worker's own recovery runs
    (its epoch was read before the other worker named the new one) is looked at once
    that recovery is over (before: dropped, so this worker, listed as recovering, kept
    every post refused until its next heartbeat, PRESENCE_TTL / 3). The same when it
    arrives less than a second after this worker's last check: it waits for the second
    to pass (before: dropped as well). Not once the worker released its memberships to
    shut down: a recovery would register its closing connections again, with nobody left
    to remove them."""
    import subprocess
    import sys

    with own_redis() as redis_server:
        out = subprocess.run([sys.executable, "-c", _CONTROL_DURING_A_RECOVERY,
                              redis_server.url, when], capture_output=True, text=True,
                             timeout=30 * SCALE, check=True).stdout
    assert f"LOOKED {({'during': 1, 'soon': 2, 'released': 0})[when]}" in out, out


# -- 10. a DM is not acknowledged while its recipient's worker cannot receive it ----------
def _refused_until_a_resubscribes(redis_url: str, a: Server, sender: Client,
                                  dm: dict[str, Any]) -> dict[str, Any]:
    """Server A's worker loses its pub/sub connection (stopped, so that it cannot make it
    again at once): ``dm`` from ``sender`` gets ``unavailable``; once A is back, its
    retry is taken. Returns the retry's echo."""
    import os
    import signal

    worker = a.worker_pids()[0]
    os.kill(worker, signal.SIGSTOP)
    try:
        _kill_pubsub_of(redis_url, worker)
        sender.send(dm)
        refused = sender.expect("error", id=dm["id"])
        assert refused["code"] == "unavailable", refused
    finally:
        os.kill(worker, signal.SIGCONT)
    wait_until(lambda: "re-registered" in a.output(),
               timeout=10 * SCALE, message="A to resubscribe and resync")
    return sender.request(dm, "dm")


@pytest.mark.parametrize("persistence", [False, True], ids=["redis", "redis-and-database"])
def test_a_dm_to_a_user_whose_worker_is_not_subscribed_is_refused_then_delivered(
        persistence: bool, tmp_path: Any) -> None:
    """Worker A has lost its pub/sub connection (Redis dropped it) and not made it again
    yet; alice, connected to A, still counts as online. Bob's DM to her must not be
    acknowledged: a DM has no history a resync could fill it from. It gets
    ``unavailable``, and the retry after A is back reaches her once (before: bob got his
    echo, and alice never the DM). With persistence the DM is committed before it is
    published, so it is stored, but bob still gets ``unavailable`` ("stored, but not
    delivered"; before: his echo, the DM stored as delivered, and alice never got it, in
    this connection or the next)."""
    env = ({"ENABLE_PERSISTENCE": "true", "DATABASE_URL": f"sqlite:///{tmp_path}/dm.db"}
           if persistence else {})
    with _alice_on_a_bob_on_b(**env) as (redis_server, a, _, alice, bob):
        dm = {"type": "dm", "to": "alice", "text": "hello", "client_msg_id": "d1", "id": "d"}
        echo = _refused_until_a_resubscribes(redis_server.url, a, bob, dm)
        got = alice.expect("dm", 2 * TIMEOUT)
        assert (got["id"], got["text"], got["client_msg_id"]) == (echo["id"], "hello", "d1")
        alice.assert_silent("dm")
        bob.assert_silent("dm")


@pytest.mark.parametrize("deaf", ["recipient", "sender"])
@pytest.mark.parametrize("persistence", [False, True], ids=["redis", "redis-and-database"])
def test_a_dm_whose_party_is_on_a_worker_not_subscribed_is_refused_then_delivered(
        persistence: bool, deaf: str, tmp_path: Any) -> None:
    """Alice is connected to workers A and B; A has lost its pub/sub connection and not
    made it again yet. A DM to her from bob (``recipient``), or from her connection to B
    to bob (``sender``: her other connections get a copy), reaches B's subscription
    only, so her connection to A would never get it: it is refused ``unavailable``, as
    when none of the recipient's workers is subscribed, and the retry after A is back
    reaches every connection of the two once (before: one subscriber was enough, the
    sender got the echo, and alice's connection to A never got the DM)."""
    env = ({"ENABLE_PERSISTENCE": "true", "DATABASE_URL": f"sqlite:///{tmp_path}/dm.db"}
           if persistence else {})
    with _alice_on_a_bob_on_b(**env) as (redis_server, a, b, alice, bob), \
            Client(b.url, f"token={token('alice')}") as alice_on_b:
        sender, to = (bob, "alice") if deaf == "recipient" else (alice_on_b, "bob")
        dm = {"type": "dm", "to": to, "text": "hello", "client_msg_id": "d2", "id": "d"}
        echo = _refused_until_a_resubscribes(redis_server.url, a, sender, dm)
        for connection in (alice, alice_on_b, bob):
            if connection is not sender:
                got = connection.expect("dm", 2 * TIMEOUT)
                assert (got["id"], got["text"]) == (echo["id"], "hello")
            connection.assert_silent("dm")


def test_a_kept_dm_whose_sender_is_on_a_worker_not_subscribed_is_refused_then_delivered(
        tmp_path: Any) -> None:
    """With persistence, a DM to a user offline (carol, known: it is kept for her) goes
    to the sender's other connections only. Alice is connected to A and B; A has lost
    its pub/sub connection and not made it again yet: her DM from B reaches B's
    subscription only, so her connection to A would never get its copy. It is refused
    ``unavailable`` (stored, not delivered), as a DM to a user online is, and the retry
    after A is back reaches her connection to A (before: acknowledged, and her connection
    to A never got it)."""
    import os
    import signal

    env = {"ENABLE_PERSISTENCE": "true", "DATABASE_URL": f"sqlite:///{tmp_path}/dm.db"}
    with _alice_on_a_bob_on_b(**env) as (redis_server, a, b, alice, _), \
            Client(b.url, f"token={token('alice')}") as alice_on_b:
        Client(b.url, f"token={token('carol')}").close()  # carol is known: DMs are kept
        worker = a.worker_pids()[0]
        dm = {"type": "dm", "to": "carol", "text": "hello", "client_msg_id": "k2", "id": "k"}
        os.kill(worker, signal.SIGSTOP)  # so that it cannot resubscribe at once
        try:
            _kill_pubsub_of(redis_server.url, worker)
            alice_on_b.send(dm)
            answer = alice_on_b.expect_any(("error", {"id": "k"}), ("dm", {"text": "hello"}))
            assert answer["type"] == "error" and answer["code"] == "unavailable", answer
        finally:
            os.kill(worker, signal.SIGCONT)
        wait_until(lambda: "re-registered" in a.output(),
                   timeout=10 * SCALE, message="A to resubscribe and resync")
        echo = alice_on_b.request(dm, "dm")
        got = alice.expect("dm", 2 * TIMEOUT)
        assert (got["id"], got["text"]) == (echo["id"], "hello")


# -- 11. members a pub/sub outage left behind the room's history are told -----------------
def test_members_a_pubsub_outage_left_behind_the_history_are_told() -> None:
    """Worker A loses its pub/sub connection while more messages are accepted in a room
    than its history holds: A can no longer bring its member every one of them, so it
    closes the member's connection (1013), whose join with ``since`` then says
    ``recovered: false`` (before: A delivered what the history still held, ids 4 to 8,
    and alice went on past 1 to 3 with nothing telling her)."""
    import os
    import signal

    with _alice_on_a_bob_on_b(HISTORY_SIZE="5") as (redis_server, a, _, alice, bob):
        r = room()
        alice.join(r)
        bob.join(r)
        worker = a.worker_pids()[0]
        os.kill(worker, signal.SIGSTOP)  # so that it cannot resubscribe at once
        try:
            _kill_pubsub_of(redis_server.url, worker)
            assert [bob.say(r, f"m{i}")["id"] for i in range(8)] == list(range(1, 9))
        finally:
            os.kill(worker, signal.SIGCONT)
        assert alice.close_code_when_closed(4 * TIMEOUT) == 1013
        with Client(a.url, f"token={token('alice')}") as again:
            joined = again.join(r, since=0)
            assert joined["recovered"] is False and joined["last_id"] == 8


@pytest.mark.parametrize("case", ["newcomer", "member-rejoining", "given-them-all"])
def test_a_session_joining_while_the_stream_lost_more_than_the_history_holds_is_told(
        clock: Clock, case: str) -> None:
    """A session is joining a room (given ids up to 1) when this worker finds that its
    pub/sub stream lost messages the room's history no longer holds (2 of 2..6, with
    HISTORY_SIZE 4). The recovery closes the live members it cannot bring them to
    (1013); the joining one is checked when its join is done and closed the same way,
    so that it joins again with ``since`` and hears ``recovered: false`` (before: it was
    not a live member when the recovery looked, and went on past id 2). A member whose
    re-join fails meanwhile is closed too: what it has is not known. One whose join
    read the room's last id after the loss (``given-them-all``) goes on."""
    chat = make_chat(clock, HISTORY_SIZE="4")
    chat.start()
    joiner = FakeSession("j", "Jo", True)
    chat.open(joiner)
    stores = chat.stores

    def post(text: str) -> None:
        stores.messages.post_room("r", "w", draft_message("r", "w", "w", text, 0, None), ())

    if case == "member-rejoining":
        chat.receive(joiner, json.dumps({"type": "join", "room": "r"}))
    post("one")  # delivered (live, or held for the joiner) before the stream is lost
    read_last_id = stores.messages.last_id

    def outage() -> None:
        on_room, stores.broker._on_room = stores.broker._on_room, None  # the stream lost
        for text in ("two", "three", "four", "five", "six"):
            post(text)
        stores.broker._on_room = on_room
        chat.resync()  # the worker's recovery, while the join waits on the store

    def last_id_and_an_outage(room: str) -> int:
        if case == "given-them-all":
            outage()
            return read_last_id(room)
        given = read_last_id(room)
        outage()
        if case == "member-rejoining":
            raise Unavailable("redis: the re-join's reply timed out")
        return given

    stores.messages.last_id = last_id_and_an_outage  # type: ignore[method-assign]
    chat.receive(joiner, json.dumps({"type": "join", "room": "r"}))
    if case == "given-them-all":
        assert joiner.closed_with is None
        assert joiner.events("joined")[-1]["last_id"] == 6
    else:
        assert joiner.closed_with == (1013, "missed messages; join again")


def _redis_stores_of_a_worker(url: str) -> Any:
    """A worker's Redis stores as the factory builds them (nothing started)."""
    from wschat.config import Settings
    from wschat.stores.redis import create_redis_stores

    stores = create_redis_stores(Settings(redis_url=url))
    stores.messages.delivering = lambda: True  # no broker started: its health aside
    stores.messages.on_gate_closed = lambda: None  # recoveries run by the test only
    return stores


def _post_taken(stores: Any, room_name: str) -> bool:
    try:
        stores.messages.post_room(room_name, "u1", draft_message(room_name, "a", "u1", "x", 1,
                                                                  None))
    except Unavailable:
        return False
    return True


@contextlib.contextmanager
def _two_workers_alice_heard_by_one() -> Iterator[tuple[Any, Any, Any, Any]]:
    """Two workers' Redis stores (``here``, ``there``) on a Redis of the test's own, the
    data's epoch named, alice connected to ``here``, and a pub/sub connection subscribed
    to her channel standing in for ``here``'s; also the admin client."""
    import redis as redis_py

    with own_redis() as redis_server:
        here, there = (_redis_stores_of_a_worker(redis_server.url) for _ in range(2))
        admin = redis_py.Redis.from_url(redis_server.url)
        hearing = admin.pubsub()
        try:
            here.epoch.begin()
            here.presence.connect("c1", User("alice", "alice"))
            hearing.subscribe("wschat:user:alice")
            assert hearing.get_message(timeout=5) is not None
            yield here, there, admin, hearing
        finally:
            hearing.close()
            admin.close()
            for stores in (here, there):
                stores.client.close()


def test_a_dm_waits_for_the_live_workers_of_its_recipient_only() -> None:
    """dm_heard.lua: a DM goes out only if every worker its recipient is connected at is
    subscribed to her channel, a worker counting while its last heartbeat is younger than
    two beats' time (live_window_ms). One that beats but is not subscribed (its pub/sub
    connection being made again) holds her DMs back; one killed with a connection of hers
    (no beat since) stops holding them then, not only once it is reaped."""
    from wschat.stores.redis.nodes import live_window_ms

    with _two_workers_alice_heard_by_one() as (here, there, admin, _):
        there.presence.connect("c2", User("alice", "alice"))  # not subscribed there
        seconds, micros = admin.time()
        now_ms = seconds * 1000 + micros // 1000

        def dm_taken(there_beat_ms: int) -> bool:
            admin.zadd("wschat:nodes", {here.node_id: now_ms, there.node_id: there_beat_ms})
            try:
                here.messages.post_dm("bob", "alice", draft_dm("alice", "bob", "bob", "hi",
                                                               1, None), None)
            except Unavailable:
                return False
            return True

        assert not dm_taken(now_ms)  # there: alive, not subscribed
        assert dm_taken(now_ms - live_window_ms(30.0) - 1000)  # there: dead
        other = admin.pubsub()
        other.subscribe("wschat:user:alice")  # there subscribed again
        assert other.get_message(timeout=5) is not None
        assert dm_taken(now_ms)
        other.close()


def test_a_connection_made_while_its_worker_is_reaped_does_not_hold_dms_back() -> None:
    """Worker ``there`` stalled and is reaped as dead by ``here``; it comes back during
    the reaping and registers a connection of alice's after the reaper read its
    connections. Then it finds itself reaped, registers its connections again, and
    alice's connection there closes: she is connected to ``here`` only (subscribed),
    and a DM to her must be taken (before: the reaper deleted ``there``'s connections
    hash with the new one in it, undone by no decrement of her ``nodes``, so ``there``
    counted among her workers for as long as it lived, and every DM to her was refused)."""
    from wschat.stores.redis.keys import node_conns

    with _two_workers_alice_heard_by_one() as (here, there, admin, _):
        reaper = here.keeper
        reaper.beat_and_reap()  # here beats
        admin.zadd("wschat:nodes", {there.node_id: 1})  # silent since 1970
        real_hgetall = reaper._client.hgetall

        def hgetall(key: str) -> Any:
            found = real_hgetall(key)
            if key == node_conns(there.node_id):  # there comes back meanwhile
                there.presence.connect("c2", User("alice", "alice"))
            return found

        reaper._client.hgetall = hgetall  # type: ignore[method-assign]
        try:
            reaper._reap_node(there.node_id, 1000)
        finally:
            del reaper._client.hgetall
        there.keeper.beat_and_reap()  # live again: registered anew
        there.presence.connect("c2", User("alice", "alice"))  # its resync
        there.presence.disconnect("c2", "alice")  # alice's connection there closes
        assert here.messages.post_dm("bob", "alice", draft_dm("alice", "bob", "bob", "hi",
                                                              1, None), None).msg_id == 1


# What a reaper of the release before 743b6a1 runs for each connection of a node it
# reaps (scripts/disconnect.lua then): the user's `nodes` hash is not touched.
_OLD_DISCONNECT = """
if redis.call('HDEL', KEYS[1], ARGV[1]) == 1 then
  if redis.call('HINCRBY', KEYS[2], ARGV[2], -1) <= 0 then redis.call('HDEL', KEYS[2], ARGV[2]) end
end
return 1
"""


def test_a_worker_reaped_by_a_previous_release_does_not_hold_dms_back() -> None:
    """During a rolling update, a worker of the previous release reaps worker A (stalled)
    with its own disconnect script, which leaves alice's ``nodes`` hash as it was. A
    finds itself reaped and registers alice's connection again; then that connection
    closes and alice is connected to B only. A DM to her must be taken (before: A's
    entry in her ``nodes`` was counted twice and taken off once, so A counted among her
    workers for as long as it lived, not subscribed to her channel: every DM refused)."""
    import redis as redis_py

    with _alice_on_a_bob_on_b(PRESENCE_TTL="3") as (redis_server, a, b, alice, bob):
        admin = redis_py.Redis.from_url(redis_server.url)
        try:
            a_node = next(n.decode() for n in admin.zrange("wschat:nodes", 0, -1)
                          if b"alice" in admin.hvals(f"wschat:node:{n.decode()}:conns"))
            conns = f"wschat:node:{a_node}:conns"
            old_disconnect = admin.register_script(_OLD_DISCONNECT)
            for conn_id, user_id in admin.hgetall(conns).items():
                old_disconnect(keys=[conns, "wschat:presence"], args=[conn_id, user_id])
            admin.delete(f"wschat:node:{a_node}:memberships", conns)
            admin.zrem("wschat:nodes", a_node)
        finally:
            admin.close()
        wait_until(lambda: "was reaped as dead" in a.output()
                   and "re-registered" in a.output(),
                   timeout=10 * SCALE, message="A to register its connections again")
        with Client(b.url, f"token={token('alice')}") as alice_on_b:
            alice.close()
            wait_until(lambda: _online_count(redis_server.url, "alice") == 1,
                       timeout=10 * SCALE, message="alice's connection to A to be gone")
            echo = bob.post_until_taken({"type": "dm", "to": "alice", "text": "after"})
            assert alice_on_b.expect("dm", 2 * TIMEOUT, text="after")["id"] == echo["id"]


def _online_count(redis_url: str, user_id: str) -> int:
    import redis as redis_py

    admin = redis_py.Redis.from_url(redis_url)
    try:
        return int(admin.hget("wschat:presence", user_id) or 0)
    finally:
        admin.close()


def test_a_recovery_that_failed_half_way_is_finished_by_its_retry() -> None:
    """Redis lost its data, and the worker's re-registration failed after it was listed
    as recovering (Redis gone again for a moment, or refusing): the broker (or the next
    heartbeat) runs the recovery again, and that one must take the worker off the list
    (before: the retry found the epoch it had already seen, "the same data", and never
    called done: every post on every worker refused for PRESENCE_TTL)."""
    import redis as redis_py

    with own_redis() as redis_server:
        stores = _redis_stores_of_a_worker(redis_server.url)
        admin = redis_py.Redis.from_url(redis_server.url)
        try:
            assert stores.epoch.begin() is False  # a first start: the gate open
            assert _post_taken(stores, "half")
            calls: list[int] = []

            def resync() -> None:
                calls.append(1)
                if len(calls) == 1:
                    raise Unavailable("redis: ConnectionError")

            stores.broker.on_reconnect = resync
            admin.flushall()
            with pytest.raises(Unavailable):
                stores.recover()
            assert not _post_taken(stores, "half")
            stores.recover()  # the broker's (or the heartbeat's) retry
            assert calls == [1, 1]
            assert _post_taken(stores, "half"), admin.smembers("wschat:recovering")
        finally:
            admin.close()
            stores.client.close()


def test_a_flush_found_by_a_heartbeat_waits_for_the_workers_known_before_it() -> None:
    """FLUSHALL while worker A is stalled; B's heartbeat is the first to find the loss
    (its node gone from the registry). B must list A, which it knew of at its heartbeat
    before the flush, and posts wait for A (before: the beat that found the loss had
    already replaced B's peers with the registry as the flush left it, B alone; B
    listed only itself and took bob's post at once, id 1, an id alice already had)."""
    import os
    import signal

    import redis as redis_py

    with _alice_on_a_bob_on_b(PRESENCE_TTL="6") as (redis_server, a, b, alice, bob):
        r = _three_messages_in_a_room(alice, bob)
        bob.request({"type": "leave", "room": r}, "left")
        worker = a.worker_pids()[0]
        admin = redis_py.Redis.from_url(redis_server.url)
        os.kill(worker, signal.SIGSTOP)
        try:
            admin.flushall()
            wait_until(lambda: "re-registered" in b.output(), timeout=15 * SCALE,
                       message="B's heartbeat to find the flush")
            assert _joins_again(bob, r)
            bob.send({"type": "message", "room": r, "text": "while A is stalled", "id": "s"})
            answer = bob.expect_any(("error", {"id": "s"}), ("message", {"text": "while A is stalled"}))
            assert answer.get("code") == "unavailable", answer
        finally:
            os.kill(worker, signal.SIGCONT)
            admin.close()
        echo = bob.post_until_taken({"type": "message", "room": r, "text": "A is back"})
        assert echo["id"] == 4
        assert alice.expect("message", 2 * TIMEOUT, text="A is back")["id"] == 4


def test_a_failed_recovery_started_by_a_refused_post_is_logged_not_raised(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The gate refused a post and the recovery it started failed with ``Unavailable``
    (the stores' word for Redis gone again): a warning, and the next refusal or
    heartbeat tries again (before: the exception escaped the greenlet, a traceback on
    stderr from gevent's hub)."""
    import gevent
    import redis as redis_py

    escaped: list[Any] = []
    hub = gevent.get_hub()
    monkeypatch.setattr(hub, "handle_error",
                        lambda context, kind, value, tb: escaped.append(value))
    with own_redis() as redis_server:
        stores = _redis_stores_of_a_worker(redis_server.url)
        admin = redis_py.Redis.from_url(redis_server.url)
        try:
            assert stores.epoch.begin() is False

            def resync() -> None:
                raise Unavailable("redis: ConnectionError")

            stores.broker.on_reconnect = resync
            admin.flushall()
            stores.check_epoch()
            gevent.sleep(0.5)
            assert escaped == []
        finally:
            admin.close()
            stores.client.close()


def test_a_recovery_done_after_redis_lost_its_data_again_does_not_open_the_gate() -> None:
    """Worker "one" raised its sequences into the data of one epoch; Redis lost its data
    again before it said done, and "two" listed it for the new epoch. Its done (for the
    old epoch) must not take it off the new list: its sequences are not raised in the new
    data (before: it did, the list emptied, and the gate opened)."""
    import redis as redis_py

    from wschat.stores.redis.epoch import Epoch

    with own_redis() as redis_server:
        client = redis_py.Redis.from_url(redis_server.url)
        taken = _posts_taken(client, "again")
        try:
            one, two = Epoch(client, "one", 30), Epoch(client, "two", 30)
            assert (one.begin(), two.begin()) == (False, False)
            client.flushall()
            assert one.begin(["two"]) is True  # one raises its sequences ...
            assert two.begin() is True and two.done() is False
            client.flushall()  # ... and Redis loses its data again meanwhile
            assert two.begin(["one"]) is True and two.done() is False
            assert one.done() is False  # done with the data lost before
            assert not taken()
            assert one.begin() is True and one.done() is True  # the new data's turn
            assert taken()
        finally:
            client.close()


# -- 13. a connection is registered whole, or refused with nothing of it left --------------
# One worker's chat core on a Redis of the test's own (argv[1]); kim connected at another
# worker ("there": its registration, and a pub/sub connection standing in for its
# subscription). A guest here signs in as kim while the subscription of kim's channel is
# not confirmed in time (the SUBSCRIBE goes out, Redis confirms it later: a timeout).
_SIGN_IN_WHILE_THE_SUBSCRIPTION_FAILS = """
from gevent import monkey; monkey.patch_all()
import json, sys, time
import gevent.event, jwt, redis
from wschat.auth import Authenticator, Identity
from wschat.chat import Chat
from wschat.config import Settings
from wschat.protocol import draft_dm
from wschat.session import Session
from wschat.stores.base import API_USER, InboxFull, Unavailable, User
from wschat.stores.redis import create_redis_stores

url, secret = sys.argv[1], sys.argv[2]
settings = Settings.from_env({"REDIS_URL": url, "JWT_SECRET": secret})
here = create_redis_stores(settings)
chat = Chat(settings, here, Authenticator(settings), here.rate_limiter, start=False)
here.start()
chat.start()
there = create_redis_stores(settings)
there.messages.delivering = lambda: True  # its broker is the stand-in below
admin = redis.Redis.from_url(url)
stand_in = admin.pubsub()
stand_in.subscribe("wschat:user:kim")
if stand_in.get_message(timeout=5) is None:
    raise SystemExit("the stand-in's subscription was not confirmed")
there.keeper.beat_and_reap()
there.presence.connect("c-there", User("kim", "Kim"))

class Conn(Session):
    def __init__(self, conn_id, user_id):
        super().__init__(conn_id, Identity(user_id, user_id, None), False, "10.0.0.1")
        self.events, self.arrived, self.closed_with = [], gevent.event.Event(), None
    def send_frame(self, frame):
        length = frame[1] & 0x7F
        offset = 2 if length < 126 else 4 if length == 126 else 10
        self.events.append(json.loads(frame[offset:]))
        self.arrived.set()
    def close(self, code, reason):
        self.closed_with = (int(code), reason)
    def reply(self, request_id, timeout=5.0):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for event in self.events:
                if event.get("id") == request_id:
                    return event
            self.arrived.clear()
            self.arrived.wait(deadline - time.monotonic())
        raise SystemExit(f"no reply to {request_id}")
    def heard(self, kind, text, timeout=5.0):
        deadline = time.monotonic() + timeout
        while True:
            if any(e["type"] == kind and e.get("text") == text for e in self.events):
                return True
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            self.arrived.clear()
            self.arrived.wait(left)

def online(user_id):
    return int(admin.hget("wschat:presence", user_id) or 0)

deadline = time.monotonic() + 10
while not here.broker.healthy():
    if time.monotonic() > deadline:
        raise SystemExit("the worker's pub/sub connection was not made")
    gevent.sleep(0.02)
guest = Conn("c-guest", "guest-1")
chat.open(guest)
token = jwt.encode({"sub": "kim", "name": "Kim", "exp": int(time.time()) + 600}, secret,
                   algorithm="HS256")
real_await = here.broker._await
def not_confirmed(waiter):
    here.broker._await = real_await
    raise Unavailable("redis: subscription not confirmed")
here.broker._await = not_confirmed
chat.receive(guest, json.dumps({"type": "auth", "token": token, "id": "a1"}))
print("first", guest.reply("a1").get("code"))
print("still", guest.user_id, guest.authenticated, sorted(chat.hub.users), online("kim"),
      online("guest-1"))
chat.receive(guest, json.dumps({"type": "auth", "token": token, "id": "a2"}))
welcome = guest.reply("a2")
print("second", welcome["type"], welcome.get("user_id"), welcome.get("authenticated"))
print("online", online("kim"), [len(s) for u, s in chat.hub.users.items() if u == "kim"])
draft = draft_dm("kim", "bob", "bob", "to every kim", int(time.time() * 1000), None)
there.messages.post_dm("bob", "kim", draft, None)
print("dm", guest.heard("dm", "to every kim"))
"""


def test_a_sign_in_whose_subscription_failed_leaves_the_connection_as_it_was() -> None:
    """A guest signs in as kim (connected at another worker too) while this worker's
    subscription of kim's channel is not confirmed in time. The sign-in is answered
    ``unavailable`` and the connection goes on as the guest, registered as before; its
    retry signs it in whole, and a DM to kim reaches it (before: the guest's identity was
    gone, kim's was half made, an empty set in the hub's users and no presence; the
    retry, "the same user" now, skipped the registration, so the connection was signed
    in as kim and got none of her DMs, which dm_heard.lua counted as heard: the channel
    was subscribed, by Redis's late confirmation)."""
    import subprocess
    import sys

    with own_redis() as redis_server:
        out = subprocess.run([sys.executable, "-c", _SIGN_IN_WHILE_THE_SUBSCRIPTION_FAILS,
                              redis_server.url, SECRET], capture_output=True, text=True,
                             timeout=60 * SCALE, check=False)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stdout.splitlines()
    assert "first unavailable" in lines, out.stdout
    assert "still guest-1 False ['guest-1'] 1 1" in lines, out.stdout
    assert "second welcome kim True" in lines, out.stdout
    assert "online 2 [1]" in lines, out.stdout
    assert "dm True" in lines, out.stdout


def sign_in_as_kim(chat: Any, guest: Any, clock: Any) -> str:
    """The guest sends ``auth`` (request id ``a1``) with a token for kim: the token."""
    from test_chat import SECRET as CHAT_SECRET

    kim = jwt.encode({"sub": "kim", "name": "Kim", "exp": int(clock.now) + 600}, CHAT_SECRET,
                     algorithm="HS256")
    chat.receive(guest, json.dumps({"type": "auth", "token": kim, "id": "a1"}))
    return kim


def test_a_registration_that_fails_half_way_leaves_nothing_registered(clock: Clock) -> None:
    """The presence step of a connection's registration fails after the store made it
    (its reply lost), once for a new connection and once for a guest signing in as kim:
    the first is refused with nothing of it left (before: its hub entry and channel
    stayed until the transport's close was done), the second is answered ``unavailable``
    and stays the guest, registered as before (before: it was kim in the hub, on no
    presence, and "the same user" for its retry, which never registered it)."""
    chat = make_chat(clock, RATE_LIMIT="1000", RATE_LIMIT_BURST="1000")
    wanted: set[str] = set()  # the user channels this worker is subscribed to
    chat.stores.broker.subscribe_user = wanted.add  # type: ignore[method-assign]
    chat.stores.broker.unsubscribe_user = wanted.discard  # type: ignore[method-assign]
    presence = chat.stores.presence
    connect = presence.connect

    def connect_then_lose_the_reply(conn_id: str, user: User) -> None:
        connect(conn_id, user)
        raise Unavailable("redis: TimeoutError")

    presence.connect = connect_then_lose_the_reply  # type: ignore[method-assign]
    with pytest.raises(Unavailable):
        chat.open(FakeSession("kim", "Kim", True))
    assert (chat.hub.users, wanted, presence.is_online("kim")) == ({}, set(), False)
    del presence.connect
    guest = FakeSession("guest-1", "guest-1")
    chat.open(guest)
    presence.connect = connect_then_lose_the_reply  # type: ignore[method-assign]
    kim = sign_in_as_kim(chat, guest, clock)
    assert [(e["code"], e["id"]) for e in guest.events("error")] == [("unavailable", "a1")]
    assert (guest.user_id, guest.authenticated) == ("guest-1", False)
    assert (set(chat.hub.users), wanted) == ({"guest-1"}, {"guest-1"})
    assert presence.is_online("guest-1") and not presence.is_online("kim")
    del presence.connect
    chat.receive(guest, json.dumps({"type": "auth", "token": kim, "id": "a2"}))
    assert guest.events("welcome")[-1]["user_id"] == "kim"
    assert (set(chat.hub.users), wanted) == ({"kim"}, {"kim"})
    assert presence.is_online("kim") and not presence.is_online("guest-1")


def test_a_recovery_during_a_sign_in_registers_the_connection_as_what_it_is_now(
        clock: Clock) -> None:
    """A recovery (Redis rolled back: every registration out, the live ones in again) runs
    while a guest signing in as kim waits for the store to take the guest out of its
    room. It must register the connection as kim, which it is by then (before: as the
    guest, whose registration the sign-in then took out, and kim's, made before the
    recovery wiped it, was never made again: kim's connection counted nowhere)."""
    chat = make_chat(clock, RATE_LIMIT="1000", RATE_LIMIT_BURST="1000")
    guest = FakeSession("guest-1", "guest-1")
    chat.open(guest)
    chat.receive(guest, json.dumps({"type": "join", "room": "r"}))
    rooms, presence = chat.stores.rooms, chat.stores.presence
    leave = rooms.leave

    def leave_during_a_recovery(*args: Any) -> Any:
        del rooms.leave
        presence._conns.clear()  # type: ignore[attr-defined]  # the rollback
        chat.resync()
        return leave(*args)

    rooms.leave = leave_during_a_recovery  # type: ignore[method-assign]
    sign_in_as_kim(chat, guest, clock)
    assert guest.events("welcome")[-1]["user_id"] == "kim"
    assert "leave" not in vars(rooms), "the guest's leave did not run"
    assert presence.is_online("kim") and not presence.is_online("guest-1")
    assert rooms.members("r") == []


# -- 14. room members a rolled-back Redis lists but that are gone are taken out --------------
def _room_members(redis_url: str, room_name: str) -> tuple[list[str], int]:
    """(the users listed in the room, its connections) as Redis holds them."""
    import redis as redis_py

    admin = redis_py.Redis.from_url(redis_url)
    try:
        users = sorted(u.decode() for u in admin.zrange(f"wschat:{{r:{room_name}}}:order", 0, -1))
        return users, int(admin.hlen(f"wschat:{{r:{room_name}}}:conns"))
    finally:
        admin.close()


def test_room_members_a_rolled_back_redis_lists_but_that_are_gone_are_taken_out() -> None:
    """Redis restarts from a snapshot taken while carol (on A, alive) and dave (on C) were
    in a room with alice and bob; carol has left since, and C was killed. Once the workers
    recovered, the room lists alice and bob only: carol is taken out by A (its own
    registrations, as the snapshot has them), dave by the reaper (C, dead, is in the
    snapshot's registry). Before: carol stayed in the room, its users list and counts,
    for as long as A lived (A registered its live connections again, and took the closed
    ones out of presence only, not out of their rooms). The snapshot is younger than
    PRESENCE_TTL: an older one has every worker's beat so old that the reaper takes the
    live workers for dead too, and they register themselves again."""
    import redis as redis_py

    with _alice_on_a_bob_on_b(PRESENCE_TTL="12") as (redis_server, a, b, alice, bob):
        r = room()
        alice.join(r)
        bob.join(r)
        env = {**COMMON, "REDIS_URL": redis_server.url, "PRESENCE_TTL": "12"}
        everyone = ["alice", "bob", "carol", "dave"]
        with Server(env) as c:
            carol = Client(a.url, f"token={token('carol')}")
            dave = Client(c.url, f"token={token('dave')}")
            carol.join(r)
            dave.join(r)
            assert _room_members(redis_server.url, r) == (everyone, 4)
            admin = redis_py.Redis.from_url(redis_server.url)
            try:
                admin.save()  # the snapshot: carol and dave in the room
            finally:
                admin.close()
            carol.close()
            wait_until(lambda: _room_members(redis_server.url, r)[0] == ["alice", "bob", "dave"],
                       message="carol to leave")
            c.kill()
            with contextlib.suppress(Exception):
                dave.close()
        redis_server.stop()
        redis_server.start()  # loads the snapshot
        assert _room_members(redis_server.url, r) == (everyone, 4)
        for server in (a, b):
            wait_until(lambda s=server: "re-registered" in s.output(),
                       timeout=15 * SCALE, message="both workers to resync")
        try:
            wait_until(lambda: _room_members(redis_server.url, r) == (["alice", "bob"], 2),
                       timeout=30 * SCALE, message="the room to list alice and bob only")
        finally:
            print("room members:", _room_members(redis_server.url, r))
        assert "was reaped as dead" not in a.output() + b.output()  # not why carol went
        users = bob.request({"type": "list_users", "room": r}, "users")["users"]
        assert sorted(u["user_id"] for u in users) == ["alice", "bob"]


def test_a_recovery_while_a_sign_in_registers_the_new_identity_registers_it_again(
        clock: Clock) -> None:
    """A recovery (Redis rolled back: every registration out, the live ones in again) runs
    while a guest signing in as kim waits for the reply to kim's presence step, which
    Redis carried out before the rollback's clean-up. The connection is still the guest
    then, so the recovery registers the guest, whom the sign-in then takes out: kim's
    registration must be made again (before: it was gone, and kim's connection counted
    nowhere, so dm_heard.lua took this worker for none of hers)."""
    chat = make_chat(clock, RATE_LIMIT="1000", RATE_LIMIT_BURST="1000")
    guest = FakeSession("guest-1", "guest-1")
    chat.open(guest)
    presence = chat.stores.presence
    connect = presence.connect

    def connect_then_a_recovery(conn_id: str, user: User) -> None:
        connect(conn_id, user)
        if user.user_id == "kim":
            del presence.connect
            presence._conns.clear()  # type: ignore[attr-defined]  # the rollback
            chat.resync()

    presence.connect = connect_then_a_recovery  # type: ignore[method-assign]
    sign_in_as_kim(chat, guest, clock)
    assert guest.events("welcome")[-1]["user_id"] == "kim"
    assert "connect" not in vars(presence), "no recovery ran"
    assert presence.is_online("kim") and not presence.is_online("guest-1")
    assert presence._conns == {"kim": {guest.conn_id}}  # type: ignore[attr-defined]


# -- 11. a worker's shutdown leaves nobody registered behind it ----------------------------
_JOIN_DURING_THE_RELEASE = """
from gevent import monkey; monkey.patch_all()
import json, sys, gevent, gevent.event
sys.path.insert(0, sys.argv[2])
from test_chat import FakeSession
from wschat.config import Settings
from wschat.factory import create_app
from wschat.runtime import of

settings = Settings.from_env({"REDIS_URL": sys.argv[1], "JWT_SECRET": "s" * 40})
runtime = of(create_app(settings))
runtime.start()
chat, stores = runtime.chat, runtime.stores
ann, bob = FakeSession("ann", "Ann", True), FakeSession("bob", "Bob", True)
chat.open(ann)
chat.receive(ann, json.dumps({"type": "join", "room": "lobby"}))
entered, go = gevent.event.Event(), gevent.event.Event()
join, connect = stores.rooms.join, stores.presence.connect
def held_join(*args, **kwargs):
    entered.set()
    go.wait(10)
    return join(*args, **kwargs)
def held_connect(*args, **kwargs):
    entered.set()
    go.wait(10)
    return connect(*args, **kwargs)
if sys.argv[3] == "join":  # ann's join of "hall" reaches Redis after the release
    stores.rooms.join = held_join
    late = gevent.spawn(chat.receive, ann, json.dumps({"type": "join", "room": "hall"}))
elif sys.argv[3] == "connect":  # bob's connection is registered after the release
    stores.presence.connect = held_connect
    late = gevent.spawn(chat.open, bob)
elif sys.argv[3] in ("resync", "resync-after-close"):  # a recovery under way
    chat.open(bob)  # (resync-after-close: both close before the recovery gets on)
    chat.receive(bob, json.dumps({"type": "join", "room": "lobby"}))
    stores.presence.connect = held_connect  # it registers ann again after the release
    late = gevent.spawn(stores.recover)
else:  # the pub/sub connection is made again during the drain (a Redis blip)
    late = None
    entered.set()
assert entered.wait(10)
chat.shutdown()  # SIGTERM: the worker releases what it registered, then closes 1001
if sys.argv[3] == "resync-after-close":  # their close handshakes were quick
    for session in (ann, bob):
        chat.close(session)
go.set()
if late is None:
    stores.recover()  # what the broker's listener runs once it is subscribed again
else:
    late.join(10)
for session in (ann, bob) if sys.argv[3] != "resync-after-close" else ():
    chat.close(session)  # each connection's end, once its close handshake is done
print("HALL", sorted(m.user_id for m in stores.rooms.members("hall")))
print("LOBBY", sorted(m.user_id for m in stores.rooms.members("lobby")))
print("ONLINE", [u for u in ("ann", "bob") if stores.presence.is_online(u)])
runtime.stop(timeout=1)
"""


@pytest.mark.parametrize("late", ["join", "connect", "reconnect", "resync",
                                  "resync-after-close"])
def test_what_registers_while_a_worker_releases_for_shutdown_is_removed_too(late: str
                                                                            ) -> None:
    """A join (or a new connection) whose store call reaches Redis while the worker
    releases its registrations for a shutdown is taken out when its connection closes
    (before: the release had marked every connection as done with, so nothing removed
    it, and the worker was no longer listed for the reaper: the user stayed in the
    room's users and online for good, and no offline was ever announced). A pub/sub
    reconnect during the drain registers nobody again, for the same reason, and what a
    recovery already under way registers is taken out as well, also when it registers
    a connection that has closed meanwhile (before: ann, whose registration the recovery
    was waiting for, and bob, whom it had not reached yet, stayed online and in lobby)."""
    import os
    import subprocess
    import sys

    with own_redis() as redis_server:
        out = subprocess.run([sys.executable, "-c", _JOIN_DURING_THE_RELEASE,
                              redis_server.url, os.path.dirname(__file__), late],
                             capture_output=True, text=True, timeout=30 * SCALE, check=False)
    assert out.returncode == 0, out.stderr
    assert "HALL []" in out.stdout, out.stdout
    assert "LOBBY []" in out.stdout, out.stdout
    assert "ONLINE []" in out.stdout, out.stdout


_TYPING_AT_SHUTDOWN = """
from gevent import monkey; monkey.patch_all()
import json, sys
import redis
sys.path.insert(0, sys.argv[2])
from test_chat import FakeSession
from wschat.config import Settings
from wschat.factory import create_app
from wschat.runtime import of

settings = Settings.from_env({"REDIS_URL": sys.argv[1], "JWT_SECRET": "s" * 40,
                              "TYPING_TIMEOUT": "60"})
runtime = of(create_app(settings))
runtime.start()
chat = runtime.chat
ann = FakeSession("ann", "Ann", True)
chat.open(ann)
chat.receive(ann, json.dumps({"type": "join", "room": "lobby"}))
listener = redis.Redis.from_url(sys.argv[1]).pubsub()
listener.subscribe("wschat:room:lobby")  # another server's members of the room
assert listener.get_message(timeout=5)["type"] == "subscribe"
chat.receive(ann, json.dumps({"type": "typing", "room": "lobby", "status": True}))
chat.shutdown()  # SIGTERM
heard = []
while True:
    message = listener.get_message(timeout=2)
    if message is None:
        break
    if message["type"] == "message":
        event = json.loads(message["data"].partition(b"\\n")[2])
        if event["type"] == "typing":
            heard.append(event["status"])
print("TYPING", heard)
runtime.stop(timeout=1)
"""


def test_a_typing_indicator_of_a_stopping_worker_is_turned_off() -> None:
    """A user typing on a worker told to stop (a deploy) is announced as no longer
    typing (before: the worker, whose timer would have expired the indicator, exited
    first, and the other servers' members kept seeing "typing" for good)."""
    import os
    import subprocess
    import sys

    with own_redis() as redis_server:
        out = subprocess.run([sys.executable, "-c", _TYPING_AT_SHUTDOWN, redis_server.url,
                              os.path.dirname(__file__)], capture_output=True, text=True,
                             timeout=30 * SCALE, check=False)
    assert out.returncode == 0, out.stderr
    assert "TYPING [True, False]" in out.stdout, out.stdout


# -- 15. a room used again after ROOM_TTL numbers on, and an old `since` is not recovered --
@pytest.mark.parametrize("backend", ["memory", "redis"])
def test_a_client_back_after_room_ttl_is_not_told_recovered_over_new_ids(backend: str) -> None:
    """A member leaves a room after 1 to 3; nobody is in it for longer than ROOM_TTL (its
    history expires), then others use it again. The room goes on from 4, and the member,
    back with ``since: 2``, gets ``recovered: false`` and finds the newer messages by
    ``history`` (before: the numbering began at 1 again, so the new room's 3 was replayed
    as what followed its 2, with ``recovered: true``: the new room's 1 and 2 were never
    shown, and its ids named other messages than the ones it had)."""
    env = {**COMMON, "ROOM_TTL": "1"}
    with contextlib.ExitStack() as stack:
        if backend == "redis":
            env["REDIS_URL"] = stack.enter_context(own_redis()).url
        server = stack.enter_context(Server(env))
        name = room()
        with Client(server.url, "username=ann") as ann:
            ann.join(name)
            assert [ann.say(name, f"old {i}")["id"] for i in range(3)] == [1, 2, 3]
        if backend == "redis":
            import redis

            from wschat.stores.redis.keys import room_keys

            client = redis.Redis.from_url(env["REDIS_URL"])
            stack.callback(client.close)
            wait_until(lambda: not client.exists(room_keys(name)[5]), 5 * SCALE, 0.05,
                       "the emptied room's history to expire")
        else:
            time.sleep(1.5)  # ROOM_TTL must pass: time, not an event
            # The memory store drops rooms past their ROOM_TTL when it is next used (here
            # a join of another room); a join of the room itself would keep it.
            with Client(server.url, "username=carl") as carl:
                carl.join(room())
        with Client(server.url, "username=bob") as bob:
            bob.join(name)
            assert [bob.say(name, f"new {i}")["id"] for i in range(3)] == [4, 5, 6]
            with Client(server.url, "username=ann") as ann:
                joined = ann.join(name, since=2)
                assert joined["recovered"] is False and joined["last_id"] == 6, joined
                page = ann.request({"type": "history", "room": name}, "history")
                assert [m["text"] for m in page["messages"]] == ["new 0", "new 1", "new 2"]


# -- 16. a `since` counted in another numbering of the room is not recovered (epoch) --
@pytest.mark.parametrize("backend", ["memory", "redis"])
def test_a_since_from_a_numbering_that_ended_is_not_recovered_over_the_new_one(
        backend: str) -> None:
    """Nobody uses a room for longer than ROOM_NUMBERING_TTL, so its ids start again from
    1; a member back with ``since: 2`` and the epoch its ids were counted in gets
    ``recovered: false``, no replay, and the new epoch (before, epochs did not exist:
    the new room's 3 and 4 were replayed as what followed its 2, ``recovered: true``,
    and the member never learned that the room's 1 and 2 were other messages)."""
    env = {**COMMON, "ROOM_TTL": "1", "ROOM_NUMBERING_TTL": "1"}
    with contextlib.ExitStack() as stack:
        if backend == "redis":
            env["REDIS_URL"] = stack.enter_context(own_redis()).url
        server = stack.enter_context(Server(env))
        name = room()
        with Client(server.url, "username=ann") as ann:
            first = ann.join(name)
            assert [ann.say(name, f"old {i}")["id"] for i in range(3)] == [1, 2, 3]
            rejoined = ann.join(name)  # a member asking again: the same numbering
            assert rejoined["epoch"] == first["epoch"] and rejoined["last_id"] == 3
        if backend == "redis":
            import redis

            from wschat.stores.redis.keys import room_epoch_key, room_keys

            client = redis.Redis.from_url(env["REDIS_URL"])
            stack.callback(client.close)
            # ann's leave runs when her server sees the close: its expiries are then set
            wait_until(lambda: client.pttl(room_keys(name)[4]) > 0, 5 * SCALE, 0.01,
                       "ann's leave to give the emptied room's sequence its expiry")
            # the epoch expires with the sequence (the same instant), never after it
            ends = [client.execute_command("PEXPIRETIME", key)
                    for key in (room_epoch_key(name), room_keys(name)[4])]
            assert 0 < ends[0] <= ends[1], ends
            wait_until(lambda: not client.exists(room_keys(name)[4]), 5 * SCALE, 0.05,
                       "the emptied room's sequence to expire")
            assert not client.exists(room_epoch_key(name))
        else:
            time.sleep(1.5)  # ROOM_NUMBERING_TTL must pass: time, not an event
            with Client(server.url, "username=carl") as carl:
                carl.join(room())  # the memory store drops what expired when next used
        with Client(server.url, "username=bob") as bob:
            bob.join(name)
            assert [bob.say(name, f"new {i}")["id"] for i in range(4)] == [1, 2, 3, 4]
            with Client(server.url, "username=ann") as ann:
                joined = ann.join(name, since=2, epoch=first["epoch"])
                assert joined["recovered"] is False and joined["last_id"] == 4, joined
                assert joined["epoch"] != first["epoch"]
                ann.assert_silent("message")
                # in the new epoch, the same `since` is recovered as before
                ann.send({"type": "leave", "room": name})
                ann.expect("left")
                again = ann.join(name, since=2, epoch=joined["epoch"])
                assert again["recovered"] is True and again["epoch"] == joined["epoch"]
                assert [ann.expect("message")["text"] for _ in range(2)] == ["new 2", "new 3"]


def test_a_since_from_before_a_memory_server_restarted_is_not_recovered() -> None:
    """The memory backend forgets every room when its server restarts (a deploy), and
    numbers from 1 again: a member back after others posted past its ``since`` gets
    ``recovered: false`` (before: the new messages above its ``since`` were replayed as
    the ones it missed, ``recovered: true``)."""
    name = room()
    with Server(COMMON) as server, Client(server.url, "username=ann") as ann:
        ann.join(name)
        assert [ann.say(name, f"old {i}")["id"] for i in range(2)] == [1, 2]
        seen = ann.join(name)
    with Server(COMMON) as server, Client(server.url, "username=bob") as bob:
        bob.join(name)
        assert [bob.say(name, f"new {i}")["id"] for i in range(4)] == [1, 2, 3, 4]
        with Client(server.url, "username=ann") as ann:
            joined = ann.join(name, since=2, epoch=seen["epoch"])
            assert joined["recovered"] is False and joined["last_id"] == 4, joined
            ann.assert_silent("message")
            # a client of the release before, without the epoch, is answered as it was
            ann.send({"type": "leave", "room": name})
            ann.expect("left")
            assert ann.join(name, since=2)["recovered"] is True


# -- 17. a full Redis (maxmemory) does not make the workers reap each other -----------------
@contextlib.contextmanager
def _redis_full(url: str) -> Iterator[Any]:
    """Redis at ``maxmemory`` (``noeviction``: every write that may grow memory refused
    with ``OOM``) for the block, and given room again after it; yields its admin client."""
    import redis as redis_py

    admin = redis_py.Redis.from_url(url)
    admin.config_set("maxmemory", "1")
    try:
        yield admin
    finally:
        admin.config_set("maxmemory", "0")


def _beats_after(admin: Any, since_ms: int, beats: int) -> Callable[[], bool]:
    """True once every node listed has beaten ``beats`` times after ``since_ms`` (Redis
    time): each call records the scores it sees, so a beat is counted once."""
    seen: dict[bytes, set[float]] = {}

    def done() -> bool:
        listed = admin.zrange("wschat:nodes", 0, -1, withscores=True)
        for node, score in listed:
            if score >= since_ms:
                seen.setdefault(node, set()).add(score)
        return len(listed) == 2 and all(len(seen.get(n, ())) >= beats for n, _ in listed)

    return done


def test_a_full_redis_for_longer_than_presence_ttl_reaps_no_live_worker() -> None:
    """Redis at ``maxmemory`` (``noeviction``) for longer than PRESENCE_TTL, then freed:
    nobody goes ``offline`` (before: the heartbeat script's first write, its ``ZADD``, was
    refused with ``OOM`` like any write that may grow memory, so every worker fell silent,
    and the first beat after the memory was freed reaped every other worker as dead: their
    users went ``offline`` in every room, left the rooms' ``users`` lists and got their DMs
    refused, until their workers registered them again). docs/operations.md: under OOM
    "history, typing and the delivery of what was posted go on"."""
    with _alice_on_a_bob_on_b(PRESENCE_TTL="1.5") as (redis_server, a, b, alice, bob):
        r = room()
        alice.join(r)
        bob.join(r)
        alice.expect("presence", status="online", user_id="bob")
        with _redis_full(redis_server.url) as admin:
            alice.send({"type": "message", "room": r, "text": "while full", "id": "full"})
            assert alice.expect("error", id="full")["code"] == "unavailable"
            time.sleep(3.0)  # PRESENCE_TTL must pass with Redis full: time, not an event
        seconds, micros = admin.time()
        freed_ms = seconds * 1000 + micros // 1000
        # Two beats of each worker after that: a reaper's work follows its own beat.
        wait_until(_beats_after(admin, freed_ms, 2), timeout=4 * TIMEOUT)
        assert alice.post_until_taken(
            {"type": "message", "room": r, "text": "after"})["text"] == "after"
        assert bob.expect("message", text="after")
        # Presence of a reaping would have come before it, on the room's channel.
        assert [e for e in alice.backlog + bob.backlog if e.get("type") == "presence"] == []
        users = bob.request({"type": "list_users", "room": r}, "users")["users"]
        assert sorted(u["user_id"] for u in users) == ["alice", "bob"]
        assert "reaped" not in a.output() + b.output()


def test_a_worker_killed_while_redis_is_full_is_reaped() -> None:
    """A worker dies (``kill -9``) while Redis is at ``maxmemory``: the reaper still takes
    its users out of their rooms (``offline``), as it does with room to spare (before: the
    claim's first write, a ``ZADD``, was refused with ``OOM``, so they stayed online, and
    a DM to them refused as unheard, for as long as Redis stayed full)."""
    import os
    import signal

    with _alice_on_a_bob_on_b(PRESENCE_TTL="1.5") as (redis_server, a, _, alice, bob):
        r = room()
        alice.join(r)
        bob.join(r)
        with _redis_full(redis_server.url):
            os.kill(a.worker_pids()[0], signal.SIGKILL)
            assert bob.expect("presence", 4 * TIMEOUT, status="offline")["user_id"] == "alice"



def test_a_worker_whose_pubsub_connection_drops_while_redis_is_full_recovers() -> None:
    """Redis at ``maxmemory`` drops a worker's pub/sub connection (a client output
    buffer limit, a network blip): the worker makes it again and is ready, and what is
    published reaches its members (typing), while Redis is still full (before: its
    recovery registered its live connections again with connect.lua, whose first write,
    an ``HSETNX`` of a connection Redis already held, was refused with ``OOM``; so the
    recovery failed, the connection was dropped and made again every few seconds, and the
    worker stayed not ready, ``/ready`` 503 and its members deaf to every event, until
    Redis had room again)."""
    with _alice_on_a_bob_on_b() as (redis_server, a, _, alice, bob):
        r = room()
        alice.join(r)
        bob.join(r)
        alice.expect("presence", status="online", user_id="bob")
        with _redis_full(redis_server.url):
            _kill_pubsub_of(redis_server.url, a.worker_pids()[0])
            wait_until(lambda: "re-registered" in a.output(), timeout=10 * SCALE,
                       message="A to resubscribe and resync while Redis is full")
            wait_until(lambda: a.http("/ready")[0] == 200, timeout=10 * SCALE,
                       message="A to be ready while Redis is full")
            bob.send({"type": "typing", "room": r, "status": True})
            assert alice.expect("typing", 2 * TIMEOUT)["user_id"] == "bob"
            # A new connection needs memory to be registered: refused, to come again.
            with Client(a.url, expect_welcome=False) as newcomer:
                assert newcomer.close_code_when_closed() == 1013
            # One signed in before the upgrade: its place among the user's connections
            # (MAX_CONNECTIONS_PER_USER, claim.lua) needs memory too.
            with pytest.raises(InvalidStatus) as refused:
                Client(a.url, f"token={token('carol')}")
            assert refused.value.response.status_code == 503


# -- 18. a recovery registers no connection or membership that ended while it ran ----------
def test_a_recovery_does_not_register_again_what_ended_while_it_ran() -> None:
    """A worker's recovery (Chat.resync, after its pub/sub connection was made again)
    registers its connections and memberships one by one, each a round trip, from a list
    taken when it began. A connection that closes meanwhile (carol) and a room a member
    leaves meanwhile (alice: the one not registered yet) stay out of Redis (before: the
    recovery registered them again after the close and the leave had taken them out, and
    nothing ever took them out again while the worker lived: carol online, and this worker
    among her nodes, so every DM to her was refused, ``unavailable``, even once she
    connected elsewhere; alice in the room's ``users`` for good)."""
    import redis as redis_py

    from wschat.auth import Authenticator
    from wschat.chat import Chat
    from wschat.config import Settings
    from wschat.stores.redis import create_redis_stores
    from wschat.stores.redis.keys import room_keys, user_nodes

    with own_redis() as redis_server:
        settings = Settings.from_env({**COMMON, "REDIS_URL": redis_server.url})
        stores = create_redis_stores(settings)
        stores.messages.delivering = lambda: True  # no broker started: its health aside
        admin = redis_py.Redis.from_url(redis_server.url)
        try:
            stores.epoch.begin()
            chat = Chat(settings, stores, Authenticator(settings), stores.rate_limiter,
                        start=False)
            alice, carol = FakeSession("alice", "Alice", True), FakeSession("carol", "Carol", True)
            chat.open(alice)
            chat.open(carol)
            for r in ("r1", "r2"):
                chat.receive(alice, json.dumps({"type": "join", "room": r}))
            assert len(alice.events("joined")) == 2
            join, connect = stores.rooms.join, stores.presence.connect

            def join_while_alice_leaves_one(room_name: str, conn_id: str, user: User) -> Any:
                if not alice.events("left"):  # her leave, while the recovery waits for Redis
                    other = "r2" if room_name == "r1" else "r1"
                    chat.receive(alice, json.dumps({"type": "leave", "room": other}))
                return join(room_name, conn_id, user)

            def connect_while_carol_closes(conn_id: str, user: User) -> None:
                if user.user_id == "alice":  # her close, while the recovery waits
                    chat.close(carol)
                connect(conn_id, user)

            stores.rooms.join = join_while_alice_leaves_one  # type: ignore[method-assign]
            stores.presence.connect = connect_while_carol_closes  # type: ignore[method-assign]
            chat.resync()
            left = alice.events("left")[0]["room"]
            kept = "r2" if left == "r1" else "r1"
            assert admin.hget("wschat:presence", "carol") is None
            assert admin.hlen(user_nodes("carol")) == 0
            assert not admin.hexists(room_keys(left)[0], alice.conn_id)
            assert admin.zrange(room_keys(left)[3], 0, -1) == []
            assert admin.hexists(room_keys(kept)[0], alice.conn_id)  # what lives stays
            assert admin.hget("wschat:presence", "alice") == b"1"
        finally:
            admin.close()
            stores.close()


# -- 19. a recovery registers a worker's connections some at once ---------------------------
_RECOVERY_AT_ONCE = """
from gevent import monkey; monkey.patch_all()
import json, sys
import redis
sys.path.insert(0, sys.argv[2])
from test_chat import FakeSession
from wschat.config import Settings
from wschat.factory import create_app
from wschat.runtime import of
from wschat.stores.base import Unavailable
from wschat.stores.redis.keys import PRESENCE, room_keys

settings = Settings.from_env({"REDIS_URL": sys.argv[1], "JWT_SECRET": "s" * 40,
                              "RATE_LIMIT": "1000", "RATE_LIMIT_BURST": "1000"})
runtime = of(create_app(settings))
runtime.start()
chat = runtime.chat
sessions = [FakeSession(f"u{i}", f"U{i}", True) for i in range(300)]
for session in sessions:
    chat.open(session)
    for r in range(4):
        chat.receive(session, json.dumps({"type": "join", "room": f"r{r}"}))
assert all(len(s.events("joined")) == 4 for s in sessions)
admin = redis.Redis.from_url(sys.argv[1])
admin.flushall()  # Redis lost the worker's registrations
pipeliner = chat.stores.pipelined.pipeliner
before = pipeliner.batches
chat.resync()
out = {"batches": pipeliner.batches - before, "presence": admin.hlen(PRESENCE),
       "members": [admin.hlen(room_keys(f"r{r}")[0]) for r in range(4)]}
calls = [0]
connect = chat.stores.presence.connect

def connect_until_redis_fails(conn_id, user):
    calls[0] += 1
    if calls[0] == 10:
        raise Unavailable("redis went away again")
    connect(conn_id, user)

chat.stores.presence.connect = connect_until_redis_fails
try:
    chat.resync()
    out["raised"] = False
except Unavailable:
    out["raised"] = True
out["connects"] = calls[0]
runtime.stop(timeout=1)
print("RESULT", json.dumps(out))
"""


def test_a_recovery_registers_many_connections_some_at_once() -> None:
    """A worker's recovery registers its connections and memberships again after Redis
    lost them (here: flushed) several connections at once, their round trips sharing the
    auto-pipeline's batches (before: one connection after another, each step a round
    trip: 1,000 connections in 10 rooms took ~3 s, the worker refusing every post
    meanwhile). Every connection and membership is back; a failure stops it: no
    connection starts after it, and it is raised (the recovery is then made again)."""
    import os
    import subprocess
    import sys

    with own_redis() as redis_server:
        out = subprocess.run([sys.executable, "-c", _RECOVERY_AT_ONCE, redis_server.url,
                              os.path.dirname(__file__)], capture_output=True, text=True,
                             timeout=60 * SCALE, check=False)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout.rpartition("RESULT ")[2])
    # one after another: at least 300 x (presence + 4 joins) = 1,500 round trips; at once,
    # ~90 on an idle machine, 440 once under a loaded CI run (the steps come around slower
    # than Redis answers, so fewer share a batch): half the sequential floor still tells them
    assert result["batches"] < 750, result
    assert (result["presence"], result["members"]) == (300, [300] * 4), result
    assert result["raised"] and result["connects"] < 10 + 64, result
