"""The fault suite: no acknowledged message is lost, doubled or stuck (issue 16).

Two servers share one private Redis (restarted by one of the tests), with and
without persistence (PostgreSQL, the multi-pod database). Clients
(:mod:`fleet`) behave as docs/delivery.md asks: they reconnect to the other
server when theirs goes away, join again with ``since``, and resend
unacknowledged messages with the same ``client_msg_id``. Each test then
asserts from the clients' side: every member received every id after its first
``joined`` exactly once, in order, and every acknowledged message among them.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from conftest import TIMEOUT, Server, own_redis, wait_until
from fleet import Member, Sender, check, settle
from services import PrivateRedis

API_KEY = "faults-api-key-0123456789abcdef"
COMMON = {"RATE_LIMIT": "1000", "RATE_LIMIT_BURST": "1000", "PRESENCE_TTL": "3",
          "HISTORY_SIZE": "1000", "GRACEFUL_TIMEOUT": "10", "LOG_LEVEL": "warning",
          "API_KEY": API_KEY}


def room() -> str:
    return f"f-{uuid.uuid4().hex[:10]}"


class Cluster:
    """Two servers (one worker each unless asked) on a private Redis."""

    def __init__(self, redis: PrivateRedis, persistence: bool) -> None:
        self.redis = redis
        env = {**COMMON, "REDIS_URL": redis.url}
        if persistence:
            from test_persistence import pg_url_or_skip

            env.update(ENABLE_PERSISTENCE="true", DATABASE_URL=pg_url_or_skip())
        self.env = env
        self.servers = [Server(env, workers=2), Server(env, workers=2)]

    def start(self) -> Cluster:
        for s in self.servers:
            s.start(wait=False)
        for s in self.servers:
            s.wait_healthy()
        return self

    def restart(self, i: int) -> None:
        """Server ``i`` again (after a stop or a kill), on new ports."""
        old = self.servers[i]
        old.kill()
        self.servers[i] = Server(self.env, workers=2).start()

    def urls(self, first: int) -> Any:
        """A member's server for each attempt: ``first``, then alternating (a client
        whose server went away tries the other)."""
        return lambda attempt: self.servers[(first + attempt) % 2].url

    def stop(self) -> None:
        for s in self.servers:
            s.terminate()  # both at once (services.stopped_together); each waited for below
        for s in self.servers:
            try:
                s.stop()
            finally:
                s.kill()


@pytest.fixture(scope="module")
def redis() -> Iterator[PrivateRedis]:
    with own_redis() as redis:
        yield redis


@pytest.fixture(scope="module", params=["redis", "redis+postgres"])
def cluster(request: Any, redis: PrivateRedis) -> Iterator[Cluster]:
    c = Cluster(redis, persistence=request.param == "redis+postgres").start()
    try:
        yield c
    finally:
        c.stop()


async def _traffic(members: list[Member], senders: list[Sender], fault: Any,
                   fault_after: float, settle_timeout: float) -> None:
    """Join everyone, let the senders write, apply ``fault`` part-way, settle."""
    stop = asyncio.Event()
    everyone = [*members, *senders]
    runners = [asyncio.ensure_future(m.run(stop)) for m in everyone]
    try:
        await asyncio.wait_for(asyncio.gather(*(m.joined.wait() for m in everyone)),
                               4 * TIMEOUT)
        writers = [asyncio.ensure_future(s.write()) for s in senders]
        await asyncio.sleep(fault_after)
        await asyncio.to_thread(fault)
        await asyncio.wait_for(asyncio.gather(*writers), settle_timeout)
        await settle(everyone, senders, settle_timeout)
    finally:
        stop.set()
        await asyncio.gather(*runners, return_exceptions=True)


def run_traffic(cluster: Cluster, fault: Any, members: int = 12, senders: int = 2,
                count: int = 40, rate: float = 4.0, on_first: int = 0) -> dict[str, int]:
    """``members`` readers and ``senders`` writers in one room; everyone starts on server
    ``on_first``; ``fault`` runs once the writing is under way."""
    r = room()
    ms = [Member(f"m{i}", r, cluster.urls(on_first)) for i in range(members)]
    ss = [Sender(f"s{i}", r, cluster.urls(on_first), count=count, rate=rate)
          for i in range(senders)]
    asyncio.run(_traffic(ms, ss, fault, fault_after=count / rate / 3,
                         settle_timeout=12 * TIMEOUT))
    return check([*ms, *ss], ss)


def test_join_storm_hundreds_of_clients_fresh_rooms_two_servers(cluster: Cluster) -> None:
    """200 clients over two servers (four workers) join 50 rooms nobody is in, all at
    once, as after a deploy: every join is answered ``joined`` (none ``unavailable``),
    and every message then reaches every member once."""
    ms: list[Member] = []
    ss: list[Sender] = []
    for k in range(50):
        r = room()
        ms += [Member(f"m{k}.{i}", r, cluster.urls(i % 2)) for i in range(3)]
        ss.append(Sender(f"s{k}", r, cluster.urls(k % 2), count=3, rate=5))
    started = time.monotonic()
    asyncio.run(_traffic(ms, ss, lambda: None, fault_after=0, settle_timeout=12 * TIMEOUT))
    errors = [(m.name, e) for m in [*ms, *ss] for e in m.join_errors]
    assert not errors, errors[:5]
    check([*ms, *ss], ss)
    assert time.monotonic() - started < 10 * TIMEOUT


def test_rolling_restart_clients_move_with_since(cluster: Cluster) -> None:
    """SIGTERM of the server every client is on, under traffic: they move to the other
    one with ``since``; nothing lost, nothing doubled (before: ``..., 17, 17, ...``)."""
    try:
        run_traffic(cluster, lambda: cluster.servers[0].stop(), members=30, senders=3,
                    count=60, rate=8)
    finally:
        cluster.restart(0)


def test_kill_9_of_a_worker_under_traffic(cluster: Cluster) -> None:
    """kill -9 of one worker of the server the clients are on: its clients reconnect (to
    either server) with ``since``, senders resend what was not acknowledged."""
    server = cluster.servers[0]
    victim = server.worker_pids()[0]
    run_traffic(cluster, lambda: os.kill(victim, signal.SIGKILL), members=20, senders=3,
                count=45, rate=6)
    wait_until(lambda: len(server.worker_pids()) == 2, 4 * TIMEOUT, 0.1,
               "gunicorn to replace the killed worker")


def test_redis_restart_under_traffic(cluster: Cluster) -> None:
    """Redis stops and comes back empty while members on both servers listen and senders
    write: requests in between are refused (``unavailable``) and resent; the servers
    register everyone again and ids go on from the highest delivered, none lost or
    doubled."""
    def restart_redis() -> None:
        cluster.redis.stop()
        time.sleep(1.0)  # an outage, not a blip
        cluster.redis.start()

    ms = run_traffic_on_both(cluster, restart_redis)
    assert ms["members"] == 20


def test_api_publish_refused_during_a_redis_outage(cluster: Cluster) -> None:
    """POST /api/publish meets the same store-layer guard as a WebSocket message: while
    Redis is away (and until the server has resynchronised) it gets 503 ``unavailable``
    and nothing is stored, with persistence too (the database takes no id for it);
    once the servers are back the next message is the room's first."""
    from test_api import call

    srv, r = cluster.servers[0], room()
    cluster.redis.stop()
    try:
        wait_until(lambda: srv.http("/ready")[0] == 503, message="the server to notice")
        for kind, body in (("publish", {"room": r, "text": "during"}),
                           ("dm", {"to": "nobody-online", "text": "during"})):
            status, reply = call(srv, "POST", f"/api/{kind}", body, key=API_KEY)
            assert status == 503 and reply["error"]["code"] == "unavailable", reply
    finally:
        cluster.redis.start()
    answers: list[tuple[int, Any]] = []  # refused (503) until this worker has resynced
    wait_until(lambda: answers.append(call(srv, "POST", "/api/publish",
                                           {"room": r, "text": "after"}, key=API_KEY))
               or answers[-1][0] == 200, timeout=4 * TIMEOUT, interval=0.1,
               message="the API to take messages again")
    assert all(reply["error"]["code"] == "unavailable" for _, reply in answers[:-1])
    assert answers[-1][1]["id"] == 1, answers[-1]


def run_traffic_on_both(cluster: Cluster, fault: Any) -> dict[str, int]:
    r = room()
    ms = [Member(f"m{i}", r, cluster.urls(i % 2)) for i in range(16)]
    ss = [Sender(f"s{i}", r, cluster.urls(i % 2), count=45, rate=6) for i in range(4)]
    asyncio.run(_traffic(ms, ss, fault, fault_after=2.0, settle_timeout=12 * TIMEOUT))
    return check([*ms, *ss], ss)
