"""The delivery promise, defect by defect: an acknowledged message reaches every member
exactly once, in id order, whatever the moment (issue 16).

Each test here reproduced one defect before its fix; the fault suite
(``test_faults.py``) checks the promise end to end under deploys and faults.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from typing import Any

import jwt
import pytest

from conftest import TIMEOUT, Client, Server, redis_url_or_skip
from rawws import RawClient
from test_chat import Clock, FakeSession, make_chat
from wschat.hub import LocalHub
from wschat.protocol import draft_message
from wschat.stores.base import Unavailable
from wschat.stores.memory import MemoryBroker

SECRET = "delivery-secret-0123456789abcdef0123"
COMMON = {"JWT_SECRET": SECRET, "RATE_LIMIT": "1000", "RATE_LIMIT_BURST": "1000"}
REDIS_DB = 21


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
