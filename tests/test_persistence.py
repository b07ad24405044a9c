"""Durable messages against the real databases: SQLite files and PostgreSQL servers.

Every test runs the real gunicorn server. PostgreSQL is the session's (from
``DATABASE_URL_TEST``, or the private instance conftest starts; database
``wschat_test``, created if missing); the database-outage test starts a private
PostgreSQL of its own so it never stops the one the other tests share. Outside
CI an unreachable PostgreSQL skips those tests with the reason; under
``CI=true`` it fails them.
"""

from __future__ import annotations

import os
import signal
import sqlite3
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jwt
import pytest

from conftest import (
    SERVICES, TIMEOUT, Client, Server, redis_url, redis_url_or_skip,
    service_unavailable, wait_until,
)
from services import PrivatePostgres, ServiceMissing

SECRET = "persistence-secret-0123456789abcdef"
COMMON = {"ENABLE_PERSISTENCE": "true", "JWT_SECRET": SECRET, "HISTORY_SIZE": "5",
          "RATE_LIMIT": "100000", "RATE_LIMIT_BURST": "100000"}


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def token(sub: str, name: str | None = None) -> str:
    return jwt.encode({"sub": sub, "name": name or sub, "exp": int(time.time()) + 3600},
                      SECRET, algorithm="HS256")


def as_user(sub: str) -> str:
    return f"token={token(sub)}"


def pg_url_or_skip() -> str:
    """The session's PostgreSQL test database, created if missing; skip (fail under CI) if
    PostgreSQL cannot be had."""
    psycopg = pytest.importorskip("psycopg")
    url = SERVICES.postgres()
    base, _, dbname = url.rpartition("/")
    try:
        with psycopg.connect(f"{base}/postgres", autocommit=True, connect_timeout=3) as conn:
            if not conn.execute("SELECT 1 FROM pg_database WHERE datname = %s",
                                (dbname,)).fetchone():
                conn.execute(f'CREATE DATABASE "{dbname}"')
    except psycopg.Error as exc:
        service_unavailable(f"PostgreSQL not reachable at {url}: {exc}")
    return url


@pytest.fixture(params=["sqlite", "postgres"])
def database_url(request: Any, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/wschat.db"
    return pg_url_or_skip()


def persistent_server(database_url: str, **env: str) -> Server:
    return Server({**COMMON, "DATABASE_URL": database_url, **env})


def whole_room(client: Client, room: str, page: int = 5) -> list[dict[str, Any]]:
    """Every stored message of ``room``, paging back with ``history.before``."""
    messages: list[dict[str, Any]] = []
    before = None
    while before != 1:
        request: dict[str, Any] = {"type": "history", "room": room, "limit": page}
        if before is not None:
            request["before"] = before
        batch = client.request(request, "history")["messages"]
        if not batch:
            break
        first = batch[0]["id"]
        assert [m["id"] for m in batch] == list(range(first, first + len(batch)))
        messages = batch + messages
        before = batch[0]["id"]
    return messages


# -- restart, paging, recovery ----------------------------------------------------------

def test_history_and_ids_continue_after_restart(database_url: str) -> None:
    """After a restart, history pages back through the log, since reads it, and ids go on,
    in the same epoch (the database's: a `since` counted before the restart is recovered)."""
    room = unique("r")
    with persistent_server(database_url) as server, Client(server.url, as_user(unique("u"))) as c:
        epoch = c.join(room)["epoch"]
        acks = [c.say(room, f"m{i}")["id"] for i in range(12)]
        assert acks == list(range(1, 13))
    with persistent_server(database_url) as server, Client(server.url, as_user(unique("u"))) as c:
        rejoined = c.join(room)
        assert rejoined["last_id"] == 12 and rejoined["epoch"] == epoch
        newest = c.request({"type": "history", "room": room, "limit": 5}, "history")
        assert [m["id"] for m in newest["messages"]] == [8, 9, 10, 11, 12]
        page = c.request({"type": "history", "room": room, "limit": 5, "before": 3}, "history")
        assert [m["text"] for m in page["messages"]] == ["m0", "m1"]
        assert [m["id"] for m in whole_room(c, room)] == list(range(1, 13))
        with Client(server.url) as late:
            joined = late.join(room, since=2, epoch=epoch)
            assert joined["recovered"] is True and joined["last_id"] == 12
            assert [late.expect("message")["id"] for _ in range(10)] == list(range(3, 13))
            assert late.join(unique("r"), since=7)["recovered"] is False  # never issued
            assert c.say(room, "after restart")["id"] == 13
            assert late.expect("message")["id"] == 13


def test_schema_is_versioned_and_created_by_the_server(tmp_path: Path) -> None:
    """A fresh SQLite file gets WAL mode and schema_version 1 from the server itself."""
    path = tmp_path / "fresh.db"
    with persistent_server(f"sqlite:///{path}") as server:
        assert server.http("/ready")[0] == 200
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert db.execute("SELECT MAX(version) FROM schema_version").fetchone()[0] == 1
        tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    assert {"messages", "dms", "sequences", "users", "schema_version"} <= tables


def test_sqlite_wal_shrinks_back_after_a_burst(tmp_path: Path) -> None:
    """A burst of writes while a long read holds back the checkpoints grows the -wal file
    past SQLITE_WAL_SIZE_LIMIT; once the read ends and a checkpoint has emptied the log,
    the server's next write cuts the file back to the limit (SQLite reuses it otherwise,
    at its largest for good)."""
    from wschat.persistence.sqlite import SQLITE_WAL_SIZE_LIMIT

    path = tmp_path / "burst.db"
    wal = Path(f"{path}-wal")
    room = unique("r")
    text = "x" * 60_000
    with persistent_server(f"sqlite:///{path}", MAX_TEXT_CHARS="60000") as server, \
            Client(server.url, as_user(unique("w"))) as writer:
        writer.join(room)
        assert writer.say(room, "first")["id"] == 1
        reader = sqlite3.connect(path, isolation_level=None)
        try:
            reader.execute("BEGIN")  # a long read: no checkpoint may pass its snapshot
            reader.execute("SELECT COUNT(*) FROM messages").fetchone()
            count, window = SQLITE_WAL_SIZE_LIMIT // len(text) * 3 // 2, 8
            for first in range(0, count, window):  # within the connection's backlog limits
                for i in range(first, first + window):
                    writer.send({"type": "message", "room": room, "text": text,
                                 "client_msg_id": f"b{i}"})
                assert [writer.expect("message")["id"] for _ in range(window)] == list(
                    range(first + 2, first + window + 2))
            assert wal.stat().st_size > SQLITE_WAL_SIZE_LIMIT  # the burst
            reader.execute("COMMIT")
            busy, frames, done = reader.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
            assert (busy, frames) == (0, done)  # the log is in the database now
        finally:
            reader.close()
        writer.say(room, "after the burst")  # restarts the log from its beginning
        assert 0 < wal.stat().st_size <= SQLITE_WAL_SIZE_LIMIT


# -- crash safety ----------------------------------------------------------------------

# One connection's messages are handled one after the other, each acknowledged
# after its commit, so a single client's burst runs at about one commit per message.
BURST = 1000


def test_kill_9_mid_burst_keeps_every_acknowledged_message_once(database_url: str) -> None:
    """kill -9 during a burst: every acknowledged message is stored exactly once, ids gap-free,
    and resending everything with its client_msg_id stores each message exactly once."""
    room, user = unique("r"), unique("u")
    server = persistent_server(database_url).start()
    sent: list[str] = []
    acked: set[str] = set()
    try:
        c = Client(server.url, as_user(user))
        c.join(room)

        def burst() -> None:
            try:
                for i in range(BURST):
                    c.send({"type": "message", "room": room, "text": f"m{i}",
                            "client_msg_id": f"c{i}"})
                    sent.append(f"c{i}")
            except Exception:
                pass  # the server died under us: that is the point

        sender = threading.Thread(target=burst, daemon=True)
        sender.start()
        while len(acked) < 100:
            acked.add(c.expect("message")["client_msg_id"])
        server.kill()
        try:  # acknowledgements already on the wire count too
            while True:
                event = c.recv(TIMEOUT)
                if event.get("type") == "message":
                    acked.add(event["client_msg_id"])
        except Exception:
            pass
        sender.join(TIMEOUT)
    finally:
        server.kill()
        server.log.close()
    assert len(acked) < BURST, "the kill came too late to interrupt the burst"

    with persistent_server(database_url, HISTORY_SIZE="500") as server, \
            Client(server.url, as_user(user)) as c:
        c.join(room)
        stored = whole_room(c, room, page=500)
        cmids = [m["client_msg_id"] for m in stored]
        assert [m["id"] for m in stored] == list(range(1, len(stored) + 1))
        assert len(set(cmids)) == len(cmids)
        assert acked <= set(cmids)
        for cmid in sent:  # a client resends whatever it is unsure about
            c.send({"type": "message", "room": room, "text": "m" + cmid[1:],
                    "client_msg_id": cmid})
        for _ in sent:
            c.expect("message", timeout=TIMEOUT * 2)
        final = whole_room(c, room, page=500)
        assert sorted(m["client_msg_id"] for m in final) == sorted(sent)
        assert [m["id"] for m in final] == list(range(1, len(sent) + 1))
        assert all(m["text"] == "m" + m["client_msg_id"][1:] for m in final)


# -- offline DMs ------------------------------------------------------------------------

def test_dm_to_offline_user_is_kept_and_delivered_on_connect(database_url: str) -> None:
    """A DM to a known offline user survives a restart and arrives after welcome (dm_backlog)."""
    alice, bob = unique("alice"), unique("bob")
    with persistent_server(database_url) as server:
        with Client(server.url, as_user(bob)) as b:
            assert b.welcome is not None and b.welcome["dm_backlog"] == 0
        with Client(server.url, as_user(alice)) as a:
            a.send({"type": "dm", "to": bob, "text": "while you were out", "id": 1})
            echo = a.expect("dm")
            assert echo["to"] == bob and echo["text"] == "while you were out"
            a.send({"type": "dm", "to": unique("nobody"), "text": "hello?", "id": 2})
            assert a.expect("error", id=2)["code"] == "user_not_found"
            with Client(server.url, "username=guest") as g:
                guest_id = g.user_id
            a.send({"type": "dm", "to": guest_id, "text": "gone", "id": 3})
            assert a.expect("error", id=3)["code"] == "user_not_found"
    with persistent_server(database_url) as server:
        with Client(server.url, as_user(bob)) as b:
            assert b.welcome is not None and b.welcome["dm_backlog"] == 1
            kept = b.expect("dm")
            assert kept["id"] == echo["id"] and kept["user_id"] == alice

        def backlog_of_a_new_connection() -> int:
            with Client(server.url, as_user(bob)) as again:
                assert again.welcome is not None
                return int(again.welcome["dm_backlog"])

        # handed to the socket, it counts as delivered (marked right after): no longer kept
        wait_until(lambda: backlog_of_a_new_connection() == 0, message="the DM marked delivered")
        with Client(server.url, as_user(bob)) as b:
            b.assert_silent("dm")


def test_without_persistence_offline_dm_is_user_not_found() -> None:
    """With persistence off, a DM to a user who was connected before is user_not_found."""
    bob = unique("bob")
    with Server({"JWT_SECRET": SECRET}) as server:
        with Client(server.url, as_user(bob)) as b:
            assert b.welcome is not None and "dm_backlog" not in b.welcome
        with Client(server.url, as_user(unique("alice"))) as a:
            a.send({"type": "dm", "to": bob, "text": "hi", "id": "x"})
            assert a.expect("error", id="x")["code"] == "user_not_found"


# -- the database going away ------------------------------------------------------------

@pytest.fixture
def private_postgres() -> Iterator[PrivatePostgres]:
    """A PostgreSQL of this test's own, which it may stop and start."""
    try:
        pg = PrivatePostgres()
    except ServiceMissing as exc:
        service_unavailable(str(exc))
    try:
        pg.start()
        yield pg
    finally:
        pg.remove()


def assert_refused_then_recovers(server: Server, c: Client, room: str,
                                 outage: Any, recovery: Any) -> None:
    """During ``outage`` a message is refused with ``unavailable`` and /ready is 503; after
    ``recovery`` the server is ready again by itself and ids go on without a gap."""
    assert c.say(room, "before")["id"] == 1
    outage()
    refused = c.request({"type": "message", "room": room, "text": "during", "id": "d"},
                        "error", timeout=TIMEOUT * 2)
    assert refused["code"] == "unavailable" and refused["id"] == "d"
    status, body = wait_until(lambda: (r := server.http("/ready"))[0] == 503 and r,
                              message="/ready to fail")
    assert b"database unreachable" in body
    recovery()
    wait_until(lambda: server.http("/ready")[0] == 200, timeout=TIMEOUT * 2,
               message="/ready after the database returned")
    assert c.say(room, "after")["id"] == 2
    texts = [m["text"] for m in
             c.request({"type": "history", "room": room}, "history")["messages"]]
    assert texts == ["before", "after"]


def test_postgres_stopped_and_restarted(private_postgres: PrivatePostgres) -> None:
    """PostgreSQL stopped: messages get unavailable, /ready 503; started again: all recovers."""
    room = unique("r")
    with persistent_server(private_postgres.url) as server, \
            Client(server.url, as_user(unique("u"))) as c:
        c.join(room)
        assert_refused_then_recovers(server, c, room, private_postgres.stop,
                                     private_postgres.start)


def test_sqlite_locked_by_another_process_then_released(tmp_path: Path) -> None:
    """Another process holding SQLite's write lock: unavailable and not ready, until released."""
    path = tmp_path / "locked.db"
    room = unique("r")
    holder = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    try:
        with persistent_server(f"sqlite:///{path}") as server, \
                Client(server.url, as_user(unique("u"))) as c:
            c.join(room)
            assert_refused_then_recovers(server, c, room,
                                         lambda: holder.execute("BEGIN EXCLUSIVE"),
                                         lambda: holder.execute("ROLLBACK"))
    finally:
        holder.close()


def sqlite_writer_of(worker: int) -> int:
    """The pid of ``worker``'s SQLite writer process (python -m wschat.sqlite_log)."""
    def writer() -> int | None:
        for child in Path(f"/proc/{worker}/task/{worker}/children").read_text().split():
            if b"wschat.sqlite_log" in Path(f"/proc/{child}/cmdline").read_bytes():
                return int(child)
        return None

    return wait_until(writer, message=f"worker {worker}'s sqlite writer process")


def test_sqlite_writer_process_killed_is_replaced_and_dies_with_its_worker(
        tmp_path: Path) -> None:
    """kill -9 of the worker's SQLite writer: the message in flight is refused (never
    acknowledged and lost), the worker starts a new writer by itself and ids go on without
    a gap. kill -9 of the worker: its writer exits too (no orphan holding the file).

    The server is then stopped while the master's replacement worker boots, and must stop
    well before GRACEFUL_TIMEOUT: that worker's SIGTERM reaches it before its own handlers
    (wschat.worker.Worker.init_signals). Before, it was lost there, the worker served on
    until the master's SIGKILL 10 s later, and this test passed in 11.3 s instead of 1.8 s
    (7 runs of 8): nothing here bounded the stop."""
    room = unique("r")
    with persistent_server(f"sqlite:///{tmp_path}/w.db") as server, \
            Client(server.url, as_user(unique("u"))) as c:
        c.join(room)
        worker = server.worker_pids()[0]
        assert_refused_then_recovers(
            server, c, room, lambda: os.kill(sqlite_writer_of(worker), signal.SIGKILL),
            lambda: None)
        replacement = sqlite_writer_of(worker)
        os.kill(worker, signal.SIGKILL)
        wait_until(lambda: not Path(f"/proc/{replacement}").exists()
                   or b"Z" in Path(f"/proc/{replacement}/stat").read_bytes().split()[2],
                   message="the writer process to exit after its worker died")
        # Stopped as the master's replacement worker boots (forked as soon as the master
        # reaped the killed one); the master's SIGKILL would come at GRACEFUL_TIMEOUT.
        assert server.stop(timeout=float(server.env["GRACEFUL_TIMEOUT"]) - 1) == 0


class BusySibling:
    """Another worker's SQLite writer on the same file, under load: it takes its turn
    as every writer process does (``PATH-writers``, wschat.persistence.sqlite.WriterTurns),
    holds SQLite's write lock for a batch (5 ms: a big batch's statements and fsync),
    and takes it again half a millisecond after its commit (its reply and the next
    batch on their way through the pipe), for as long as it runs."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.commits = 0
        self.started = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        import fcntl

        db = sqlite3.connect(self.path, isolation_level=None, timeout=30)
        turns = os.open(f"{self.path}-writers", os.O_RDONLY | os.O_CREAT, 0o644)
        try:
            while not self._stop.is_set():
                fcntl.flock(turns, fcntl.LOCK_EX)
                try:
                    db.execute("BEGIN IMMEDIATE")
                    db.execute("INSERT INTO sequences VALUES ('sibling', 1) ON CONFLICT (scope)"
                               " DO UPDATE SET last_id = last_id + 1")
                    time.sleep(0.005)  # the batch's work, lock held
                    db.execute("COMMIT")
                finally:
                    fcntl.flock(turns, fcntl.LOCK_UN)
                self.commits += 1
                self.started.set()
                time.sleep(0.0005)  # its reply and next batch in the pipe
        finally:
            os.close(turns)
            db.close()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(TIMEOUT)


def test_sqlite_writers_of_one_file_take_turns(tmp_path: Path) -> None:
    """A worker whose sibling's writer (another worker of the server, or of a second
    server on the machine) commits batch after batch on the same file: this worker's
    messages are committed between them, each acknowledged. Before, SQLite's busy
    handler looked at the lock after 1, 2, 5 ... then every 100 ms, and the sibling,
    taking it again as soon as its commit returned, held it at nearly every look: after
    1 s the worker took the database for down, refused its clients' messages
    `unavailable` and turned /ready 503 (18 of 20 refused)."""
    path = tmp_path / "shared.db"
    room = unique("r")
    with persistent_server(f"sqlite:///{path}") as server, \
            Client(server.url, as_user(unique("u"))) as c:
        c.join(room)
        sibling = BusySibling(path)
        try:
            assert sibling.started.wait(TIMEOUT), "the sibling writer never committed"
            before = sibling.commits
            outcomes = []
            for i in range(20):
                c.send({"type": "message", "room": room, "text": f"m{i}", "id": i})
                outcomes.append(c.expect_any(("error", {"id": i}), ("message", {"text": f"m{i}"}),
                                             timeout=TIMEOUT * 2))
            assert sibling.commits > before, "the sibling stopped committing meanwhile"
        finally:
            sibling.stop()
        assert [o.get("code", o["type"]) for o in outcomes] == ["message"] * 20
        assert [o["id"] for o in outcomes] == list(range(1, 21))
        assert server.http("/ready")[0] == 200


# -- several pods: Redis and PostgreSQL -------------------------------------------------

@pytest.fixture(scope="module")
def pods() -> Iterator[tuple[Server, Server]]:
    env = {**COMMON, "DATABASE_URL": pg_url_or_skip(), "REDIS_URL": redis_url_or_skip(15),
           "PRESENCE_TTL": "2"}
    with Server(env, workers=2) as a, Server(env, workers=2) as b:
        yield a, b


def test_pods_share_one_log_without_duplicates(pods: tuple[Server, Server]) -> None:
    """Writers on two pods (four workers) get ids 1..n once each, all members see one order,
    and the log holds each message exactly once."""
    import psycopg

    a, b = pods
    room = unique("r")
    clients = [Client(s.url, as_user(unique("u"))) for s in (a, b, a, b)]
    try:
        for c in clients:
            c.join(room)
        for i in range(60):
            clients[i % 4].send({"type": "message", "room": room, "text": f"m{i}",
                                 "client_msg_id": f"c{i}"})
        seen = [[c.expect("message", timeout=TIMEOUT * 2) for _ in range(60)] for c in clients]
        assert [m["id"] for m in seen[0]] == list(range(1, 61))
        assert all(s == seen[0] for s in seen)
        retry = clients[1].request({"type": "message", "room": room, "text": "m1",
                                    "client_msg_id": "c1"}, "message")
        assert retry["id"] == next(m["id"] for m in seen[0] if m["client_msg_id"] == "c1")
        clients[0].assert_silent("message")
    finally:
        for c in clients:
            c.close()
    with psycopg.connect(pg_url_or_skip()) as db:
        ids = [r[0] for r in db.execute("SELECT id FROM messages WHERE room = %s ORDER BY id",
                                        (room,))]
    assert ids == list(range(1, 61))


def test_redis_losing_a_room_continues_ids_from_the_database(pods: tuple[Server, Server]
                                                             ) -> None:
    """If Redis loses a room's keys, its sequence is raised from the database: no id reused."""
    import redis

    a, _ = pods
    room = unique("r")
    with Client(a.url, as_user(unique("u"))) as c:
        c.join(room)
        assert [c.say(room, f"m{i}")["id"] for i in range(3)] == [1, 2, 3]
        c.request({"type": "leave", "room": room}, "left")
        client = redis.Redis.from_url(redis_url_or_skip_keep())
        client.delete(*client.keys(f"wschat:{{r:{room}}}:*"))
        assert c.join(room)["last_id"] == 3
        assert c.say(room, "after")["id"] == 4


def redis_url_or_skip_keep() -> str:
    """The Redis URL of the pods' database, without flushing it."""
    return redis_url(15)


# -- persistence turned on over a Redis that numbered messages already -------------------

API_KEY = "persistence-api-key-0123456789abcdef"


def api_post(server: Server, path: str, body: dict[str, Any]) -> dict[str, Any]:
    import json
    import urllib.request

    request = urllib.request.Request(
        f"http://127.0.0.1:{server.metrics_port}{path}", data=json.dumps(body).encode(),
        method="POST", headers={"Content-Type": "application/json",
                                "Authorization": f"Bearer {API_KEY}"})
    with urllib.request.urlopen(request, timeout=TIMEOUT) as resp:
        return dict(json.loads(resp.read()))


def test_turning_persistence_on_over_redis_reuses_no_room_or_dm_id(tmp_path: Path) -> None:
    """Redis numbered room messages and DMs before persistence was on; the database starts
    empty. The first ids the database gives are above Redis's, also for a post that no
    join came before (/api/publish) and for DMs, whose ids clients dedupe by. Turned off
    again, Redis's DM ids go on above the database's."""
    env = {"REDIS_URL": redis_url_or_skip(29), "JWT_SECRET": SECRET, "API_KEY": API_KEY,
           "RATE_LIMIT": "100000", "RATE_LIMIT_BURST": "100000"}
    room = unique("r")
    alice, bob = unique("alice"), unique("bob")
    with Server(env) as server, Client(server.url, as_user(alice)) as a, \
            Client(server.url, as_user(bob)) as b:
        a.join(room)
        assert [a.say(room, f"before {i}")["id"] for i in range(3)] == [1, 2, 3]
        for i in range(2):
            a.send({"type": "dm", "to": bob, "text": f"dm before {i}"})
        assert [b.expect("dm")["id"] for _ in range(2)] == [1, 2]
    with Server({**env, **COMMON, "DATABASE_URL": f"sqlite:///{tmp_path}/on.db"}) as server:
        published = api_post(server, "/api/publish", {"room": room, "text": "first stored"})
        assert published["id"] == 4, published
        with Client(server.url, as_user(alice)) as a, Client(server.url, as_user(bob)) as b:
            a.send({"type": "dm", "to": bob, "text": "first stored dm"})
            assert b.expect("dm", text="first stored dm")["id"] == 3
            joined = b.join(room, since=3)
            assert joined["recovered"] is True and joined["last_id"] == 4
            assert b.expect("message")["text"] == "first stored"
    # ... and turned off again: Redis numbers DMs once more, above the database's.
    with Server(env) as server, Client(server.url, as_user(alice)) as a, \
            Client(server.url, as_user(bob)) as b:
        a.send({"type": "dm", "to": bob, "text": "after persistence"})
        assert b.expect("dm", text="after persistence")["id"] == 4


def ids_until(client: Client, last: int) -> list[int]:
    """The ids of the room messages ``client`` gets, up to ``last``."""
    ids = [client.expect("message")["id"]]
    while ids[-1] < last:
        ids.append(client.expect("message")["id"])
    return ids


def test_more_than_a_thousand_committed_and_unpublished_messages_all_reach_the_room(
        tmp_path: Path) -> None:
    """1,500 messages committed that no worker published (its publishes failed: Redis
    refused them, or it died between its commits and its publishes). The room's next
    message is held behind them and they are published from the log: every one of them,
    in order, to the members, and the window holds no hole that `join` with `since` or
    `history` would skip (HISTORY_SIZE above them, so the window keeps them all)."""
    from wschat.persistence import RoomPost, SQLiteFile
    from wschat.protocol import draft_message

    path = tmp_path / "gap.db"
    room = unique("r")
    env = {**COMMON, "DATABASE_URL": f"sqlite:///{path}", "REDIS_URL": redis_url_or_skip(30),
           "HISTORY_SIZE": "2000"}
    with Server(env) as server, Client(server.url, as_user(unique("w"))) as writer, \
            Client(server.url, as_user(unique("m"))) as member:
        writer.join(room)
        member.join(room)
        assert writer.say(room, "before")["id"] == 1
        assert member.expect("message")["id"] == 1
        log = SQLiteFile(str(path))  # another worker's commits
        try:
            for first in range(0, 1500, 500):
                log.write([RoomPost(room=room, user_id="ghost", draft=draft_message(
                    room, "ghost", "ghost", f"unpublished {i}", 1, f"g{i}"))
                    for i in range(first, first + 500)])
        finally:
            log.close()
        assert writer.say(room, "after", client_msg_id="after")["id"] == 1502
        assert ids_until(member, 1502) == list(range(2, 1503))
        with Client(server.url) as late:
            joined = late.join(room, since=1)
            assert joined["recovered"] is True and joined["last_id"] == 1502
            assert ids_until(late, 1502) == list(range(2, 1503))
            page = late.request({"type": "history", "room": room, "limit": 100, "before": 600},
                                "history")
            assert [m["id"] for m in page["messages"]] == list(range(500, 600))


def peak_rss_kib(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(next(line for line in status.splitlines() if line.startswith("VmHWM:")).split()[1])


def test_a_replay_from_the_database_is_bounded_by_bytes(database_url: str) -> None:
    """1,000 messages of 60 KB after a joiner's `since` (each within the 64 KiB frame
    limit): the worker does not load them (60 MB) for one join. The joiner hears
    `recovered: false` and pages back with `history`; a `since` whose replay fits is
    replayed as ever."""
    from wschat.persistence import RoomPost, SQLiteFile, open_message_log
    from wschat.protocol import draft_message

    room = unique("r")
    text = "x" * 60_000
    sqlite_path = database_url.removeprefix("sqlite:///")
    log = SQLiteFile(sqlite_path) if sqlite_path != database_url else open_message_log(
        database_url)
    try:
        log.migrate()
        for first in range(0, 1000, 100):  # posted earlier, through a server
            log.write([RoomPost(room=room, user_id="u", draft=draft_message(
                room, "u", "u", f"{i} {text}", 1, None)) for i in range(first, first + 100)])
    finally:
        log.close()
    with persistent_server(database_url, MAX_TEXT_CHARS="60010") as server, \
            Client(server.url, as_user(unique("u"))) as c:
        worker = server.worker_pids()[0]
        near = c.join(room, since=990)
        assert near["recovered"] is True and near["last_id"] == 1000
        assert ids_until(c, 1000) == list(range(991, 1001))
        before = peak_rss_kib(worker)
        with Client(server.url, as_user(unique("u"))) as far:
            joined = far.join(room, since=0)
            assert joined["recovered"] is False and joined["last_id"] == 1000
            far.assert_silent("message")
            grown_mib = (peak_rss_kib(worker) - before) / 1024
            assert grown_mib < 24, f"the worker's peak grew by {grown_mib:.0f} MiB for one join"
            page = far.request({"type": "history", "room": room, "limit": 5}, "history")
            assert [m["id"] for m in page["messages"]] == [996, 997, 998, 999, 1000]


def test_a_client_msg_id_others_used_costs_a_post_no_more_than_a_fresh_one(
        database_url: str) -> None:
    """1,500 messages of 60 KB in as many rooms and by as many users, all with one
    `client_msg_id` (legal: it is unique per sender and room; a client numbering its
    messages from 1, or a hostile one joining room after room). A post under that id,
    and its retry, read their own row, if any: not every message anyone stored under it,
    forever, in the transaction every other sender waits on (before: each one read all
    90 MB of them, and the process that read them grew by as much)."""
    from wschat.persistence import RoomPost, SQLiteFile, open_message_log
    from wschat.protocol import draft_message

    cmid, text = unique("same"), "x" * 60_000
    sqlite_path = database_url.removeprefix("sqlite:///")
    log = SQLiteFile(sqlite_path) if sqlite_path != database_url else open_message_log(
        database_url)
    try:
        log.migrate()
        for first in range(0, 1500, 100):  # posted earlier, through a server
            log.write([RoomPost(room=f"{cmid}-{i}", user_id=f"u{i}", draft=draft_message(
                f"{cmid}-{i}", "u", f"u{i}", text, 1, cmid)) for i in range(first, first + 100)])
    finally:
        log.close()
    room, user = unique("r"), unique("u")
    with persistent_server(database_url) as server, Client(server.url, as_user(user)) as c:
        worker = server.worker_pids()[0]
        # SQLite's statements run in the worker's writer process, PostgreSQL's in the worker
        reader = sqlite_writer_of(worker) if sqlite_path != database_url else worker
        c.join(room)
        assert c.say(room, "warm-up")["id"] == 1
        before = peak_rss_kib(reader)
        assert c.say(room, "mine", client_msg_id=cmid)["id"] == 2
        retry = c.request({"type": "message", "room": room, "text": "mine again",
                           "client_msg_id": cmid}, "message")
        assert (retry["id"], retry["text"]) == (2, "mine")
        grown_mib = (peak_rss_kib(reader) - before) / 1024
        assert grown_mib < 24, f"a post and its retry grew its reader by {grown_mib:.0f} MiB"


def test_a_server_started_while_sqlite_is_locked_waits_for_the_lock(tmp_path: Path) -> None:
    """SQLite's write lock held longer than its 1 s busy wait while the server starts (a
    sibling server's worker on the same file, an operator's `sqlite3` session): a busy
    file is not one that cannot be opened. The worker starts not ready, and takes writes
    once the lock is released."""
    path = tmp_path / "busy.db"
    with persistent_server(f"sqlite:///{path}"):
        pass  # the file exists, in WAL mode, migrated
    room = unique("r")
    holder = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    server = persistent_server(f"sqlite:///{path}")
    try:
        holder.execute("BEGIN IMMEDIATE")
        server.start(wait=False)
        wait_until(lambda: "database is locked" in server.output(), timeout=TIMEOUT * 2,
                   message="the worker to find the file locked")
        holder.execute("ROLLBACK")
        server.wait_healthy()
        wait_until(lambda: server.http("/ready")[0] == 200, timeout=TIMEOUT * 2,
                   message="/ready once the lock was released")
        with Client(server.url, as_user(unique("u"))) as c:
            c.join(room)
            assert c.say(room, "after the lock")["id"] == 1
    finally:
        holder.close()
        server.stop()


def test_mixed_numbering_during_a_rollout_issues_no_id_twice(tmp_path: Path) -> None:
    """Persistence turned on (or off) by a rolling update: for a while, workers that number
    in the database and workers that number in Redis serve one room together. Posts must
    never take one id twice: the Redis-numbering side refuses them (`unavailable`) while a
    database-numbering worker lives, and takes them again once it is gone."""
    env = {"REDIS_URL": redis_url_or_skip(31), "JWT_SECRET": SECRET,
           "RATE_LIMIT": "100000", "RATE_LIMIT_BURST": "100000"}
    room = unique("r")
    with Server(env) as old, Client(old.url, as_user(unique("o"))) as o:
        o.join(room)
        assert [o.say(room, f"old {i}")["id"] for i in range(3)] == [1, 2, 3]
        with Server({**env, **COMMON, "DATABASE_URL": f"sqlite:///{tmp_path}/on.db"}) as new, \
                Client(new.url, as_user(unique("n"))) as n:
            n.join(room)
            ids = []
            for i in range(5):
                ids.append(n.say(room, f"new {i}")["id"])
                taken = _posted(o, room, f"old again {i}")
                if taken is not None:
                    ids.append(taken)
            assert len(ids) == len(set(ids)), ids
            assert [o.expect("message", text=f"new {i}")["id"] for i in range(5)] == ids[:5]
        # the database-numbering worker is gone: the Redis side posts again, above its ids
        after = o.post_until_taken({"type": "message", "room": room, "text": "after"})
        assert after["id"] > max(ids)


def _posted(client: Client, room: str, text: str) -> int | None:
    """The id ``text`` was posted with, or None if it was refused ``unavailable``."""
    tag = unique("post")
    client.send({"type": "message", "room": room, "text": text, "id": tag})
    reply = client.expect_any(("error", {"id": tag}), ("message", {"text": text}))
    if reply["type"] == "error":
        assert reply["code"] == "unavailable", reply
        return None
    return int(reply["id"])
