"""The delivery promise, defect by defect: an acknowledged message reaches every member
exactly once, in id order, whatever the moment (issue 16).

Each test here reproduced one defect before its fix; the fault suite
(``test_faults.py``) checks the promise end to end under deploys and faults.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from typing import Any

import jwt
import pytest

from conftest import TIMEOUT, Client, Server, redis_url_or_skip
from rawws import RawClient

SECRET = "delivery-secret-0123456789abcdef0123"
COMMON = {"JWT_SECRET": SECRET, "RATE_LIMIT": "1000", "RATE_LIMIT_BURST": "1000"}
REDIS_DB = 21


def room() -> str:
    return f"r-{uuid.uuid4().hex[:10]}"


def token(sub: str, name: str = "") -> str:
    return jwt.encode({"sub": sub, "name": name or sub, "exp": int(time.time()) + 3600},
                      SECRET, algorithm="HS256")


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
