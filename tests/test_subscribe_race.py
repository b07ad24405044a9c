"""Many connections of one worker joining the same new room at once (a reconnect storm:
a worker or pod went away and its clients all rejoin on the same replacement).

The first join subscribes the worker to the room's channel and waits for Redis to
confirm; joins arriving meanwhile must share that confirmation, not wait for one that
never comes (they used to get ``unavailable`` after SUBSCRIBE_TIMEOUT, 15 s).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator

import pytest

from conftest import TIMEOUT, Client, Server, redis_url_or_skip


@pytest.fixture(scope="module")
def server() -> Iterator[Server]:
    url = redis_url_or_skip(13)
    with Server({"REDIS_URL": url, "RATE_LIMIT": "1000", "RATE_LIMIT_BURST": "1000"}) as srv:
        yield srv


def test_simultaneous_first_joins_share_one_subscription(server: Server) -> None:
    room = f"storm-{uuid.uuid4().hex[:8]}"
    clients = [Client(server.url, query=f"username=u{i}") for i in range(30)]
    try:
        started = time.monotonic()
        for c in clients:
            c.send({"type": "join", "room": room})
        for c in clients:
            c.expect("joined", room=room, timeout=TIMEOUT)
        assert time.monotonic() - started < 5, "a join waited for a lost confirmation"
        for c in clients:
            assert not [e for e in c.backlog if e.get("type") == "error"], c.backlog
        clients[0].send({"type": "message", "room": room, "text": "all here"})
        for c in clients:
            c.expect("message", text="all here")
    finally:
        for c in clients:
            c.close()
