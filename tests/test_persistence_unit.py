"""The message log and the durable store in-process, against real SQLite, PostgreSQL, Redis.

No server here: these drive :mod:`wschat.persistence` and
:class:`~wschat.stores.durable.DurableMessageStore` directly, for the cases a
client cannot provoke on demand (a worker dying between its commit and its
publish, retries racing inside one batch, a schema newer than the server).
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import gevent
import gevent.event
import orjson
import pytest

from conftest import TIMEOUT, first_start, own_redis, redis_url_or_skip, wait_until
from test_persistence import pg_url_or_skip
from wschat.config import DEFAULT_DATABASE_URL, ConfigError, Settings
from wschat.persistence import (
    SCHEMA_VERSION, Arrival, BatchRefused, DatabaseUnavailable, DmPost, DmsDelivered, GroupCommitWriter,
    MessageLog, PostgresLog, RoomPost, SchemaTooNew, SequenceFloor, SQLiteFile,
    open_message_log,
)
from wschat.protocol import draft_dm, draft_message, message_id_of
from wschat.stores.base import InboxFull, Unavailable, User
from wschat.stores.durable import DurableMessageStore
from wschat.stores.memory import create_memory_stores
from wschat.telemetry import NoMetrics


@pytest.fixture(scope="module")
def fresh_pg_url() -> Iterator[str]:
    """A brand-new PostgreSQL database for this module, dropped afterwards."""
    psycopg = pytest.importorskip("psycopg")
    base = pg_url_or_skip().rpartition("/")[0]
    name = f"wschat_unit_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(f"{base}/postgres", autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    yield f"{base}/{name}"
    with psycopg.connect(f"{base}/postgres", autocommit=True) as conn:
        conn.execute(f'DROP DATABASE "{name}" WITH (FORCE)')


@pytest.fixture(params=["sqlite", "postgres"])
def url(request: Any, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/unit.db"
    return str(request.getfixturevalue("fresh_pg_url"))


@pytest.fixture
def message_log(url: str) -> Iterator[MessageLog]:
    log = open_message_log(url)
    log.migrate()
    yield log
    log.close()


def room_post(room: str, text: str, cmid: str | None = None, user: str = "u1") -> RoomPost:
    return RoomPost(room=room, user_id=user, draft=draft_message(room, user, user, text, 1, cmid),
                    created_ms=1)


def test_migrations_are_recorded_and_idempotent(url: str) -> None:
    """Migrating twice applies each step once and records the version in schema_version."""
    log = open_message_log(url)
    try:
        assert log.migrate() == SCHEMA_VERSION
        assert log.migrate() == SCHEMA_VERSION
        rows = log._read_call(log._rows, "SELECT version FROM schema_version", ())
        assert [r[0] for r in rows] == list(range(1, SCHEMA_VERSION + 1))
    finally:
        log.close()


def test_a_newer_schema_is_refused(tmp_path: Path) -> None:
    """A database migrated by a newer server is not written to."""
    log = open_message_log(f"sqlite:///{tmp_path}/newer.db")
    try:
        log.migrate()
        with sqlite3.connect(tmp_path / "newer.db") as newer_server:
            newer_server.execute("INSERT INTO schema_version VALUES (?, 'from the future', 0)",
                                 (SCHEMA_VERSION + 1,))
        with pytest.raises(SchemaTooNew, match="upgrade the server"):
            log.migrate()
    finally:
        log.close()


def test_an_sqlite_without_the_json_operators_is_refused(monkeypatch: pytest.MonkeyPatch,
                                                        tmp_path: Path) -> None:
    """Batches are written through JSON functions and ->> (SQLite 3.38): an older library
    is refused when the log is opened, naming the versions, not at the first message."""
    monkeypatch.setattr(sqlite3, "sqlite_version_info", (3, 37, 2))
    monkeypatch.setattr(sqlite3, "sqlite_version", "3.37.2")
    with pytest.raises(ImportError, match=r"SQLite 3\.37\.2 is too old.*3\.38\.0 or newer"):
        open_message_log(f"sqlite:///{tmp_path}/old.db")


def test_ids_are_gap_free_per_room_and_retries_return_the_original(
        message_log: MessageLog) -> None:
    """One batch numbers each room from 1; a client_msg_id seen in the batch or stored before
    gets the original's id and event, and takes no id."""
    a, b = f"a-{uuid.uuid4().hex[:6]}", f"b-{uuid.uuid4().hex[:6]}"
    batch = [room_post(a, "x", "k1"), room_post(b, "y"), room_post(a, "x again", "k1"),
             room_post(a, "z")]
    message_log.write(batch)  # type: ignore[arg-type]
    assert [(p.msg_id, p.duplicate) for p in batch] == [(1, False), (1, False), (1, True),
                                                        (2, False)]
    assert batch[2].event == batch[0].event
    later = [room_post(a, "retry", "k1"), room_post(a, "w"), room_post(a, "other user", "k1",
                                                                    user="u2")]
    message_log.write(later)  # type: ignore[arg-type]
    assert [(p.msg_id, p.duplicate) for p in later] == [(1, True), (3, False), (4, False)]
    assert [message_id_of(e) for e in message_log.before(a, None, 10)] == [1, 2, 3, 4]
    assert message_log.last_id(a) == 4 and message_log.last_id(b) == 1


HOSTILE_TEXTS = ['quote " backslash \\ slash / \\" \\\\u0041', "\\u0000 and \x01\x1f\n\t\r",
                 "ünïcödé 漢字 😀 \u2028\u2029 \ufeff", "' OR 1=1; -- ", "]}{[\",", ""]


def test_hostile_text_is_stored_byte_for_byte(message_log: MessageLog) -> None:
    """A batch's rows travel to the database as one JSON parameter: whatever a message holds
    (quotes, backslashes, escapes, control characters, emoji, SQL), the stored event is the
    exact bytes every client was sent, and so is a kept DM."""
    room = f'r-{uuid.uuid4().hex[:6]}'
    user = 'u"\\ü'
    posts = [room_post(room, text, cmid=f'k"{i}\\', user=user)
             for i, text in enumerate(HOSTILE_TEXTS)]
    bob = f"bob-{uuid.uuid4().hex[:6]}"
    kept = DmPost(sender_id=user, recipient_id=bob, created_ms=1, delivered=False,
                  draft=draft_dm(bob, user, user, HOSTILE_TEXTS[0] + HOSTILE_TEXTS[2], 1, None))
    message_log.write([Arrival(user_id=bob, username="bob", seen_ms=1)])
    message_log.write([*posts, kept])  # type: ignore[list-item]
    assert message_log.before(room, None, 100) == [p.event for p in posts]
    assert [json.loads(p.event)["text"] for p in posts] == HOSTILE_TEXTS
    arrival = Arrival(user_id=bob, username="bob", seen_ms=2)
    message_log.write([arrival])
    assert arrival.backlog == [kept.event]
    retries = [room_post(room, "again", cmid=f'k"{i}\\', user=user) for i in range(2)]
    message_log.write(retries)  # type: ignore[arg-type]
    assert [(r.msg_id, r.event) for r in retries] == [(p.msg_id, p.event) for p in posts[:2]]


def migrated_writers(url: str, writers: int) -> list[MessageLog]:
    """``writers`` logs of one database, as many workers' writers (SQLite: SQLiteFiles,
    run on threads as the workers' writer processes would run them)."""
    logs = [SQLiteFile(url.removeprefix("sqlite:///")) if url.startswith("sqlite:")
            else open_message_log(url) for _ in range(writers)]
    for log in logs:
        log.migrate()
    return logs


def write_until_taken(url: str, log: MessageLog, jobs: list[Any]) -> None:
    """SQLite gives up on its write lock after 1 s (busy_timeout), which six threads can
    exceed on a loaded machine: that batch rolled back whole, so it is written again (and
    the ids must still be gap-free). A real deadlock would fail every try."""
    for _ in range(20):
        try:
            return log.write(jobs)
        except DatabaseUnavailable as exc:
            if not (url.startswith("sqlite:") and "locked" in str(exc)):
                raise
    raise AssertionError("the SQLite write lock was never taken")


def write_side_by_side(logs: list[MessageLog], write_batches: Callable[[MessageLog, int], None],
                       errors: list[BaseException]) -> None:
    """``write_batches(log, i)`` for every log at once, one thread each (the writers of
    several workers); none may fail or hang."""
    threads = [threading.Thread(target=write_batches, args=(log, i)) for i, log in enumerate(logs)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(TIMEOUT * 4)
    assert not any(t.is_alive() for t in threads) and errors == [], errors[:3]


def test_postgres_room_batch_in_one_statement_takes_no_id_for_a_retry(
        fresh_pg_url: str) -> None:
    """PostgreSQL stores a batch of room messages in one statement; a batch holding a retry
    of a stored client_msg_id makes that statement write nothing (no id taken, so no gap)
    and goes through the general transaction, which answers the retry with the original."""
    log = open_message_log(fresh_pg_url)
    assert isinstance(log, PostgresLog)
    log.migrate()
    room = f"one-{uuid.uuid4().hex[:6]}"
    try:
        first = [room_post(room, "a", "k1"), room_post(room, "b"), room_post(room, "a", "k1")]
        assert log._write_call(log._post_rooms, first) is True
        assert [(p.msg_id, p.duplicate) for p in first] == [(1, False), (2, False), (1, True)]
        batch = [room_post(room, "c"), room_post(room, "a again", "k1")]
        assert log._write_call(log._post_rooms, batch) is False
        assert log.last_id(room) == 2 and len(log.before(room, None, 10)) == 2
        log.write(batch)  # type: ignore[arg-type]
        assert [(p.msg_id, p.duplicate) for p in batch] == [(3, False), (1, True)]
        assert batch[1].event == first[0].event
        assert log.before(room, None, 10) == [first[0].event, first[1].event, batch[0].event]
    finally:
        log.close()


@pytest.mark.parametrize("floors", [False, True], ids=["posts", "posts-and-floors"])
def test_concurrent_writers_on_shared_rooms_neither_deadlock_nor_repeat_ids(
        url: str, floors: bool) -> None:
    """Six writers (six connections; on PostgreSQL the one-statement batches) write batches
    over the same rooms, each batch naming them in its own order: the sequence rows are
    locked in one order, so no writer deadlocks, and every room holds ids 1..n once.
    With ``floors``, every batch also raises three rooms' sequence floors first (a join
    finding memory ahead of the log), in its own order too: a floor must not hold its
    row while the batch's posts wait for another writer's.
    (SQLite: six SQLiteFiles on threads, as six workers' writer processes would run them.)"""
    import random

    rooms = [f"shared-{uuid.uuid4().hex[:6]}-{i}" for i in range(30)]
    writers, batches = 6, 25
    logs = migrated_writers(url, writers)
    errors: list[BaseException] = []

    def write_batches(log: MessageLog, seed: int) -> None:
        shuffle = random.Random(seed).shuffle
        order = list(rooms)
        try:
            for n in range(batches):
                shuffle(order)
                jobs: list[Any] = [SequenceFloor(room=room, at_least=0)
                                   for room in order[:3]] if floors else []
                jobs += [room_post(room, f"w{seed}-{n}") for room in order
                         for _ in range(1 + (n + seed) % 3)]
                write_until_taken(url, log, jobs)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    try:
        write_side_by_side(logs, write_batches, errors)
        for room in rooms:
            ids = [message_id_of(e) for e in logs[0].before(room, None, 10_000)]
            assert ids == list(range(1, len(ids) + 1)) and logs[0].last_id(room) == len(ids)
        expected = sum(1 + (n + seed) % 3 for seed in range(writers) for n in range(batches))
        assert sum(logs[0].last_id(room) for room in rooms) == expected * len(rooms)
    finally:
        for log in logs:
            log.close()


def test_a_failed_postgresql_read_leaves_no_connection_open(fresh_pg_url: str) -> None:
    """A read that fails on its pooled connection and again on the fresh one closes both
    (before: the fresh one stayed open for as long as anything held the exception)."""
    import psycopg

    def backends() -> int:
        with psycopg.connect(fresh_pg_url, autocommit=True) as admin:
            return int(admin.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'wschat'"
                " AND datname = current_database()").fetchone()[0])

    log = open_message_log(fresh_pg_url)
    try:
        log.migrate()
        log.last_id("r")  # one pooled reader (and the migrating writer)
        assert backends() == 2
        with pytest.raises(DatabaseUnavailable) as failed:
            log._read_call(log._rows, "SELECT * FROM no_such_table", ())
        assert backends() == 1, failed.value
        assert log.last_id("r") == 0 and backends() == 2  # a fresh reader, pooled again
    finally:
        log.close()


def test_a_postgresql_that_stops_answering_fails_the_write_instead_of_hanging(
        fresh_pg_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The writer's backend frozen (SIGSTOP: a frozen host or a cut network looks the
    same to the client, and the server's statement_timeout cannot end it): the write
    fails after the answer timeout and its connection is dropped, and the next write,
    once the server answers again, goes through (before: the writer waited forever,
    and /ready stayed green)."""
    import os
    import signal

    import psycopg

    from wschat.persistence import postgres

    monkeypatch.setattr(postgres, "PG_ANSWER_TIMEOUT_S", 0.5)
    log = open_message_log(fresh_pg_url)
    room = f"frozen-{uuid.uuid4().hex[:6]}"
    frozen: list[int] = []
    try:
        log.migrate()
        log.write([room_post(room, "before")])
        with psycopg.connect(fresh_pg_url, autocommit=True) as admin:
            frozen = [row[0] for row in admin.execute(
                "SELECT pid FROM pg_stat_activity WHERE application_name = 'wschat'"
                " AND datname = current_database()")]
        assert len(frozen) == 1, frozen
        os.kill(frozen[0], signal.SIGSTOP)
        started = time.monotonic()
        with gevent.Timeout(TIMEOUT, AssertionError("the write hung")), \
                pytest.raises(DatabaseUnavailable, match="no answer"):
            log.write([room_post(room, "while frozen")])
        assert time.monotonic() - started < 3
        os.kill(frozen.pop(), signal.SIGCONT)
        log.write([room_post(room, "after")])
        texts = [json.loads(e)["text"] for e in log.before(room, None, 10)]
        assert texts[0] == "before" and texts[-1] == "after"
    finally:
        for pid in frozen:
            os.kill(pid, signal.SIGCONT)
        log.close()


def test_concurrent_writers_on_shared_users_do_not_deadlock(url: str) -> None:
    """Six writers write batches of kept DMs, then of arrivals, deliveries and retries of
    delivered DMs (kept again) for the same users, each batch in its own order: the
    users' rows and the DMs' rows are never locked by two transactions at once, so no
    writer deadlocks (PostgreSQL used to fail batches with 'deadlock detected', whose
    users got ``unavailable``), and the DM ids are taken once each."""
    import random

    tag = f"member-{uuid.uuid4().hex[:6]}"
    users = [f"{tag}-{i}" for i in range(10)]
    writers, batches = 6, 20
    logs = migrated_writers(url, writers)
    errors: list[BaseException] = []

    def dm(sender: str, to: str, cmid: str, delivered: bool) -> DmPost:
        return DmPost(sender_id=sender, recipient_id=to, created_ms=1, delivered=delivered,
                      draft=draft_dm(to, sender, sender, cmid, 1, cmid))

    def write_batches(log: MessageLog, seed: int) -> None:
        rng = random.Random(seed)
        sender = f"sender-{seed}"
        try:
            for n in range(batches):
                # New DMs take the DM sequence's row, so their batches are written one at
                # a time; batches without any are the ones that ran side by side.
                write_until_taken(url, log,
                                  [dm(sender, u, f"{seed}-{n}-{u}", False) for u in users])
                jobs: list[Any] = [Arrival(user_id=u, username=u, seen_ms=n) for u in users]
                jobs += [DmsDelivered(user_id=u, up_to=10**12) for u in users]
                if n:  # the last batch's DMs again, delivered by now: kept again
                    jobs += [dm(sender, u, f"{seed}-{n - 1}-{u}", False) for u in users]
                rng.shuffle(jobs)
                write_until_taken(url, log, jobs)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    try:
        write_side_by_side(logs, write_batches, errors)
        ids = [r[0] for r in logs[0]._read_call(
            logs[0]._rows, "SELECT id FROM dms WHERE recipient_id LIKE ?", (f"{tag}-%",))]
        assert len(ids) == len(set(ids)) == writers * batches * len(users)
    finally:
        for log in logs:
            log.close()


def test_kept_dms_stay_kept_until_delivered(message_log: MessageLog) -> None:
    """DMs kept for an offline user are read a page at a time, oldest first, and stay kept
    until marked delivered (a connection that died before it could have them loses none)."""
    bob = f"bob-{uuid.uuid4().hex[:6]}"
    assert not message_log.knows_user(bob)
    arrival = Arrival(user_id=bob, username="bob", seen_ms=1)
    message_log.write([arrival])
    assert arrival.backlog == [] and arrival.kept == 0 and message_log.knows_user(bob)
    dms = [DmPost(sender_id="al", recipient_id=bob, draft=draft_dm(bob, "al", "al", t, 1, None),
                  created_ms=1, delivered=False) for t in ("one", "two")]
    online = DmPost(sender_id="al", recipient_id=bob, draft=draft_dm(bob, "al", "al", "live", 1,
                                                                     None), created_ms=1)
    message_log.write([*dms, online])  # type: ignore[list-item]
    first, second = (Arrival(user_id=bob, username="bob", seen_ms=2) for _ in range(2))
    message_log.write([first, second])
    assert first.backlog == second.backlog == [dms[0].event, dms[1].event]
    assert first.kept == 2 and message_log.kept_count(bob) == 2
    assert message_log.kept_dms(bob, dms[0].msg_id, 10) == [dms[1].event]
    message_log.write([DmsDelivered(user_id=bob, up_to=dms[0].msg_id)])
    assert message_log.kept_dms(bob, 0, 10) == [dms[1].event]
    message_log.write([DmsDelivered(user_id=bob, up_to=dms[1].msg_id)])
    assert message_log.kept_dms(bob, 0, 10) == [] and message_log.kept_count(bob) == 0


def test_a_dm_retried_while_its_recipient_is_offline_is_kept_again(
        message_log: MessageLog) -> None:
    """A DM stored as delivered (its recipient was online) whose retry finds the recipient
    offline is kept for them: its first publish may never have happened. A retry in the
    same batch as its original does the same; one addressed to someone else keeps nothing."""
    bob = f"bob-{uuid.uuid4().hex[:6]}"

    def dm(cmid: str, delivered: bool, to: str = bob) -> DmPost:
        return DmPost(sender_id="al", recipient_id=to, created_ms=1, delivered=delivered,
                      draft=draft_dm(to, "al", "al", cmid, 1, cmid))

    online = dm(f"{bob}-1", True)
    message_log.write([online])
    assert message_log.kept_count(bob) == 0
    retry, elsewhere = dm(f"{bob}-1", False), dm(f"{bob}-1", False, to="carol")
    message_log.write([elsewhere, retry])
    assert retry.duplicate and retry.msg_id == online.msg_id
    assert message_log.kept_dms(bob, 0, 10) == [online.event]
    pair = [dm(f"{bob}-2", True), dm(f"{bob}-2", False)]
    message_log.write(pair)  # type: ignore[arg-type]
    assert pair[1].duplicate and message_log.kept_dms(bob, online.msg_id, 10) == [pair[0].event]
    assert message_log.kept_count("carol") == 0


def _worker_on(url: str) -> DurableMessageStore:
    """One worker's durable store on the database at ``url`` (its deliveries go nowhere),
    started; the caller closes it."""
    stores = create_memory_stores(history_size=3, room_ttl=3600)
    stores.broker.start(lambda *a: None, lambda *a: None)
    durable = DurableMessageStore(stores.messages, open_message_log(url))
    durable.start()
    return durable


def test_the_kept_dm_bound_holds_for_concurrent_senders(url: str) -> None:
    """Two workers (two durable stores on one database), three senders on each, DM one
    offline user at once with room for two kept DMs: two are kept, four get InboxFull,
    and the kept ones' ids come with no gap (before: the bound was read outside the
    transaction, every sender saw it free, and all six were kept)."""
    bob = f"bob-{uuid.uuid4().hex[:6]}"
    workers = []
    for _ in range(2):
        durable = _worker_on(url)
        durable.max_kept_dms = 2
        workers.append(durable)

    def send(durable: DurableMessageStore, sender: str) -> int | None:
        draft = draft_dm(bob, sender, sender, "hi", 1, f"{bob}-{sender}")
        try:
            return durable.post_dm(sender, bob, draft, recipient_online=False).msg_id
        except InboxFull:
            return None

    try:
        workers[0].log.write([Arrival(user_id=bob, username="bob", seen_ms=1)])
        sends = [gevent.spawn(send, durable, f"s{w}{i}")
                 for w, durable in enumerate(workers) for i in range(3)]
        gevent.joinall(sends, timeout=TIMEOUT, raise_error=True)
        kept = sorted(g.value for g in sends if g.value is not None)
        assert len(kept) == 2 and workers[0].log.kept_count(bob) == 2, kept
        assert kept[1] == kept[0] + 1
    finally:
        for durable in workers:
            durable.close()


@pytest.fixture
def durable_on_memory(tmp_path: Path) -> Iterator[tuple[DurableMessageStore, list[bytes]]]:
    stores = create_memory_stores(history_size=3, room_ttl=3600)
    delivered: list[bytes] = []
    stores.broker.start(lambda room, event, exclude: delivered.append(event),
                        lambda user, event: delivered.append(event))
    durable = DurableMessageStore(stores.messages, open_message_log(f"sqlite:///{tmp_path}/d.db"))
    durable.start()
    yield durable, delivered
    durable.close()


def test_reads_beyond_the_window_come_from_the_log(
        durable_on_memory: tuple[DurableMessageStore, list[bytes]]) -> None:
    """With a 3-message window, history pages and since-replays reach back through the log."""
    durable, delivered = durable_on_memory
    posts = [gevent.spawn(durable.post_room, "r", "u1", draft_message("r", "a", "u1", f"m{i}", 1,
                                                                      None)) for i in range(10)]
    gevent.joinall(posts, raise_error=True)
    assert [message_id_of(e) for e in delivered] == list(range(1, 11))
    assert [message_id_of(e) for e in durable.recent("r", 3)] == [8, 9, 10]
    assert [message_id_of(e) for e in durable.recent("r", 5, before=9)] == [4, 5, 6, 7, 8]
    assert [message_id_of(e) for e in durable.recent("r", 5)] == [6, 7, 8, 9, 10]
    replay = durable.since("r", 2)
    assert replay.complete and [message_id_of(e) for e in replay.messages] == list(range(3, 11))
    assert durable.since("r", 11).complete is False


def test_a_queue_longer_than_a_batch_is_committed_in_order_over_several_batches(
        durable_on_memory: tuple[DurableMessageStore, list[bytes]],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Jobs left over when a batch is full wait for a later batch: every sender gets its own
    id, none is woken with its job unwritten, and delivery stays in id order."""
    durable, delivered = durable_on_memory
    monkeypatch.setattr(durable.writer, "MAX_BATCH", 3)
    commits: list[int] = []
    write = durable.log.write
    monkeypatch.setattr(durable.log, "write", lambda jobs: (commits.append(len(jobs)),
                                                            write(jobs))[1])
    posts = [gevent.spawn(durable.post_room, "r", "u1", draft_message("r", "a", "u1", f"m{i}", 1,
                                                                      None)) for i in range(10)]
    gevent.joinall(posts, raise_error=True)
    assert sorted(p.value.msg_id for p in posts) == list(range(1, 11))
    assert [message_id_of(e) for e in delivered] == list(range(1, 11))
    assert max(commits) == 3 and sum(commits) == 10


def test_each_commit_is_timed_and_a_failed_one_is_counted_instead(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The durable store reports one ``store_seconds("database", ...)`` per committed batch
    (wschat_store_seconds), and a failed write as a store error, not as a time."""
    class Recorder(NoMetrics):
        def __init__(self) -> None:
            self.times: list[tuple[str, float]] = []
            self.errors: list[str] = []

        def store_seconds(self, backend: str, seconds: float) -> None:
            self.times.append((backend, seconds))

        def store_error(self, backend: str) -> None:
            self.errors.append(backend)

    metrics = Recorder()
    stores = create_memory_stores(history_size=3, room_ttl=3600)
    stores.broker.start(lambda room, event, exclude: None, lambda user, event: None)
    durable = DurableMessageStore(stores.messages, open_message_log(f"sqlite:///{tmp_path}/t.db"),
                                  metrics)
    durable.start()
    try:
        monkeypatch.setattr(durable.writer, "MAX_BATCH", 3)
        commits: list[int] = []
        write = durable.log.write
        monkeypatch.setattr(durable.log, "write", lambda jobs: (commits.append(len(jobs)),
                                                                write(jobs))[1])
        posts = [gevent.spawn(durable.post_room, "r", "u1",
                              draft_message("r", "a", "u1", f"m{i}", 1, None)) for i in range(7)]
        gevent.joinall(posts, raise_error=True)
        assert len(commits) >= 3 and sum(commits) == 7
        assert [backend for backend, _ in metrics.times] == ["database"] * len(commits)
        assert all(0 <= seconds < TIMEOUT for _, seconds in metrics.times)

        def broken(jobs: list[Any]) -> None:
            raise sqlite3.OperationalError("disk I/O error")

        monkeypatch.setattr(durable.log, "write", broken)
        with pytest.raises(DatabaseUnavailable):
            durable.post_room("r", "u1", draft_message("r", "a", "u1", "lost", 1, None))
        assert metrics.errors == ["database"]
        assert len(metrics.times) == len(commits)
    finally:
        durable.close()


def test_a_stuck_write_times_out_its_senders_and_the_queue_behind_it(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A write that never returns: its sender and the one queued behind it get 'timed out'
    after SUBMIT_TIMEOUT (from the writer's watchdog, not a timer per message), and the
    queued one is never written."""
    class StuckLog(MessageLog):
        def __init__(self) -> None:
            self.release = gevent.event.Event()
            self.written: list[list[Any]] = []

        def migrate(self) -> int:
            return SCHEMA_VERSION

        def ping(self) -> None:
            pass

        def write(self, jobs: list[Any]) -> None:
            self.written.append(jobs)
            self.release.wait()

        def close(self) -> None:
            pass

    stuck = StuckLog()
    writer = GroupCommitWriter(stuck, lambda batch: None)
    monkeypatch.setattr(writer, "SUBMIT_TIMEOUT", 0.3)
    monkeypatch.setattr(writer, "WATCH_EVERY", 0.05)
    writer.start()
    try:
        first = gevent.spawn(writer.submit, room_post("r", "first"))
        gevent.sleep(0.1)  # first is in the database now
        second = gevent.spawn(writer.submit, room_post("r", "second"))
        started = time.monotonic()
        gevent.joinall([first, second], timeout=TIMEOUT)
        assert all(isinstance(g.exception, DatabaseUnavailable) and "timed out" in
                   str(g.exception) for g in (first, second))
        assert time.monotonic() - started < 2
        stuck.release.set()
        gevent.sleep(0.1)
        assert len(stuck.written) == 1  # the expired queued job never reached the database
    finally:
        stuck.release.set()
        writer.close()


def test_writes_are_refused_after_a_failure_until_the_next_quick_probe(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A failed write makes the worker refuse writes (not queue them behind a dead
    connection) until a probe finds the database answering: the prober's next check
    comes PROBE_DOWN after the failure, not at the end of its healthy-time wait (before:
    up to PROBE_HEALTHY, 2 s, while the docs said a second)."""
    class FlakyLog(MessageLog):
        def __init__(self) -> None:
            self.writes = 0

        def migrate(self) -> int:
            return SCHEMA_VERSION

        def ping(self) -> None:
            pass

        def write(self, jobs: list[Any]) -> None:
            self.writes += 1
            if self.writes == 2:
                raise DatabaseUnavailable("connection reset")
            for job in jobs:
                job.msg_id = 1

        def close(self) -> None:
            pass

    writer = GroupCommitWriter(FlakyLog(), lambda batch: None)
    monkeypatch.setattr(writer, "PROBE_HEALTHY", 30.0)
    monkeypatch.setattr(writer, "PROBE_DOWN", 0.1)
    writer.start()
    try:
        writer.submit(room_post("r", "first"))  # and the prober waits its healthy 30 s
        with pytest.raises(DatabaseUnavailable, match="connection reset"):
            writer.submit(room_post("r", "fails"))
        assert not writer.healthy
        with pytest.raises(DatabaseUnavailable, match="unavailable"):
            writer.submit(room_post("r", "refused at once"))

        def accepted() -> bool:
            try:
                return writer.submit(room_post("r", "again")).msg_id == 1
            except DatabaseUnavailable:
                gevent.sleep(0.02)
                return False

        wait_until(accepted, timeout=TIMEOUT, message="writes to be accepted again")
        assert writer.healthy
    finally:
        started = time.monotonic()
        writer.close()
        assert time.monotonic() - started < 1  # the prober's 30 s wait ends at close


def test_a_value_the_database_refuses_fails_its_own_job_not_its_batch(
        url: str, message_log: MessageLog, monkeypatch: pytest.MonkeyPatch) -> None:
    """One job in a batch carries a value the database cannot take (a lone surrogate no
    statement parameter can encode; on PostgreSQL also a NUL, which it refuses as a data
    error). Before: the whole batch failed and the database was marked down, so everyone
    was refused until the next probe. Now the batch is written again in halves: only the
    refused jobs fail (an internal error, not 'unavailable'), the others are stored in
    their order, and the database stays ready."""
    commits: list[int] = []
    write = message_log.write
    monkeypatch.setattr(message_log, "write", lambda jobs: (commits.append(len(jobs)),
                                                            write(jobs))[1])
    writer = GroupCommitWriter(message_log, lambda batch: None)
    writer.start()

    def post(text: str, user: str = "u1") -> RoomPost:
        return RoomPost(room="r", user_id=user,
                        draft=draft_message("r", "u1", "u1", text, 1, None), created_ms=1)

    refused = [post("surrogate", "\ud800")] + ([post("nul", "u\x00")] if "postgres" in url
                                               else [])
    jobs = [post("a"), refused[0], post("b"), *refused[1:], post("c")]
    try:
        sent = [gevent.spawn(writer.submit, job) for job in jobs]
        gevent.joinall(sent, timeout=TIMEOUT)
        assert commits[0] == len(jobs)  # they went out as one batch
        by_job = dict(zip(map(id, jobs), sent, strict=True))
        assert [by_job[id(j)].value.msg_id for j in jobs if j not in refused] == [1, 2, 3]
        for job in refused:
            error = by_job[id(job)].exception
            assert isinstance(error, BatchRefused) and not isinstance(error, Unavailable), error
        assert writer.healthy
        assert [orjson.loads(e)["text"] for e in message_log.after("r", 0, 10)] == ["a", "b", "c"]
        assert writer.submit(post("d")).msg_id == 4
    finally:
        writer.close()


class SlowSplit:
    """A group-commit writer over the real ``message_log`` whose ``slow_write``-th write
    (1-based) takes 1.5 s while the watchdog answers after 1 s, and a batch of four in a
    fresh room (PostgreSQL's database is the module's): a, a refused one (a lone
    surrogate), b, c. ``writes`` holds each write's size, ``published`` what was."""

    def __init__(self, message_log: MessageLog, monkeypatch: pytest.MonkeyPatch,
                 slow_write: int) -> None:
        write = message_log.write
        self.writes: list[int] = []

        def counted(jobs: list[Any]) -> None:
            self.writes.append(len(jobs))
            if len(self.writes) == slow_write:
                gevent.sleep(1.5)
            write(jobs)

        monkeypatch.setattr(message_log, "write", counted)
        self.published: list[RoomPost] = []
        self.writer = GroupCommitWriter(message_log, self.published.extend)
        monkeypatch.setattr(self.writer, "SUBMIT_TIMEOUT", 1.0)
        monkeypatch.setattr(self.writer, "WATCH_EVERY", 0.1)
        self.room = f"split-{uuid.uuid4().hex[:8]}"

    def post(self, text: str, user: str = "u1") -> RoomPost:
        return RoomPost(room=self.room, user_id=user, created_ms=1,
                        draft=draft_message(self.room, "u1", "u1", text, 1, None))

    def send_batch(self) -> list[gevent.Greenlet]:
        self.writer.start()
        sent = [gevent.spawn(self.writer.submit, job) for job in (
            self.post("a"), self.post("surrogate", "\ud800"), self.post("b"), self.post("c"))]
        gevent.joinall(sent, timeout=TIMEOUT)
        return sent

    def published_texts(self) -> list[str]:
        return [orjson.loads(j.event)["text"] for j in self.published]


def test_jobs_the_watchdog_failed_are_not_written_when_their_refused_batch_is_split(
        message_log: MessageLog, monkeypatch: pytest.MonkeyPatch) -> None:
    """A refused batch whose senders were already told 'database write timed out' (the
    watchdog, SUBMIT_TIMEOUT) is not split and written afterwards: those senders would
    retry a message that is stored and published (a second copy without a
    client_msg_id), as a timed-out job still queued is never written. (Found by review:
    'a', 'b', 'c' were stored and published after their senders had the error.)"""
    split = SlowSplit(message_log, monkeypatch, slow_write=1)
    try:
        sent = split.send_batch()
        assert all("timed out" in str(g.exception) for g in sent), [g.exception for g in sent]
        # The writer takes jobs in order: once this one is written, the batch before it
        # is done with.
        assert split.writer.submit(split.post("d")).msg_id == 1
        assert [orjson.loads(e)["text"] for e in message_log.after(split.room, 0, 10)] == ["d"]
        assert split.published_texts() == ["d"]
        assert split.writes == [4, 1]
    finally:
        split.writer.close()


def test_a_job_committed_in_an_earlier_half_is_acknowledged_not_timed_out(
        message_log: MessageLog, monkeypatch: pytest.MonkeyPatch) -> None:
    """The other side of the test above: [a, surrogate, b, c] is refused, [a, surrogate]
    too, [a] commits, then [surrogate] alone is slow and the watchdog fires. 'a' is
    stored and published: its sender gets its id, not 'database write timed out' (which
    it got, found by a second review); only the jobs not yet written time out."""
    split = SlowSplit(message_log, monkeypatch, slow_write=4)  # [surrogate], after [a]
    try:
        sent = split.send_batch()
        assert sent[0].exception is None and sent[0].value.msg_id == 1, sent[0].exception
        assert all("timed out" in str(g.exception) for g in sent[1:]), [g.exception for g in sent]
        assert [orjson.loads(e)["text"] for e in message_log.after(split.room, 0, 10)] == ["a"]
        assert split.published_texts() == ["a"]
        assert split.writes == [4, 2, 1, 1]
    finally:
        split.writer.close()


def test_ids_issued_before_persistence_are_never_reused(
        durable_on_memory: tuple[DurableMessageStore, list[bytes]]) -> None:
    """A window that already issued ids (e.g. Redis before persistence) lifts the log's sequence."""
    durable, _ = durable_on_memory
    durable.inner.raise_sequence("old", 41)
    assert durable.last_id("old") == 41
    posted = durable.post_room("old", "u1", draft_message("old", "a", "u1", "next", 1, None))
    assert posted.msg_id == 42


def test_a_restart_continues_room_and_dm_ids(tmp_path: Path) -> None:
    """A new store on the same file continues the room and DM sequences."""
    url = f"sqlite:///{tmp_path}/restart.db"
    ids = []
    for _ in range(2):
        durable = _worker_on(url)
        try:
            durable.last_id("r")
            room = durable.post_room("r", "u1", draft_message("r", "a", "u1", "hi", 1, None))
            dm = durable.post_dm("u1", "u2", draft_dm("u2", "a", "u1", "hi", 1, None))
            ids.append((room.msg_id, dm.msg_id))
        finally:
            durable.close()
    assert ids == [(1, 1), (2, 2)]


def test_a_commit_whose_reply_was_lost_is_published_before_the_next_message(
        durable_on_memory: tuple[DurableMessageStore, list[bytes]]) -> None:
    """Memory window: id 1 was committed but its worker never learnt it (the commit's reply
    was lost, the SQLite writer died after COMMIT), so it was never published. Id 2 is held
    behind the gap, both come in order once 1 is read from the log, and the window holds
    both (before: 2 was published over the gap; 1, acknowledged to its sender's retry,
    never reached anyone, and `since` called the window complete without it)."""
    durable, delivered = durable_on_memory
    durable.HOLD_TIMEOUT = 0.05
    room = f"lost-{uuid.uuid4().hex[:6]}"
    durable.last_id(room)
    lost = room_post(room, "committed, reply lost", cmid="c-1")
    durable.log.write([lost])
    posted = durable.post_room(room, "u2", draft_message(room, "b", "u2", "next", 1, None))
    assert (lost.msg_id, posted.msg_id) == (1, 2)
    wait_until(lambda: gevent.sleep(0.02) or len(delivered) == 2,
               message="the held message to be released")
    assert [message_id_of(e) for e in delivered] == [1, 2]
    retry = durable.post_room(room, "u1", lost.draft)
    assert retry.duplicate and retry.msg_id == 1
    replay = durable.inner.since(room, 0)
    assert replay.complete and [message_id_of(e) for e in replay.messages] == [1, 2]
    assert len(delivered) == 2


def test_a_retry_of_an_unpublished_message_the_window_cannot_be_read_for_is_refused(
        durable_on_memory: tuple[DurableMessageStore, list[bytes]]) -> None:
    """A retry of a message committed and never published, while the window's last id
    cannot be read (Redis failing that instant): the retry gets ``unavailable``, so its
    sender tries again, and that retry publishes it (before: it was answered as a
    duplicate, and nothing published it until the room's next message, perhaps never:
    the sender, told nothing, waited for an echo no stream brought)."""
    durable, delivered = durable_on_memory
    durable.HOLD_TIMEOUT = 0.05
    room = f"unread-{uuid.uuid4().hex[:6]}"
    durable.last_id(room)
    lost = room_post(room, "committed, never published", cmid="c-1")
    durable.log.write([lost])
    last_id = durable.inner.last_id

    def failing(name: str) -> int:
        raise Unavailable("redis: connection reset")

    durable.inner.last_id = failing  # type: ignore[method-assign]
    try:
        with pytest.raises(Unavailable):
            durable.post_room(room, "u1", lost.draft)
    finally:
        durable.inner.last_id = last_id  # type: ignore[method-assign]
    retry = durable.post_room(room, "u1", lost.draft)
    assert retry.duplicate and retry.msg_id == 1
    wait_until(lambda: gevent.sleep(0.02) or len(delivered) == 1,
               message="the retried message to be published")
    assert [message_id_of(e) for e in delivered] == [1]


def test_a_replay_holds_the_messages_held_behind_one_a_dead_worker_committed(
        durable_on_memory: tuple[DurableMessageStore, list[bytes]]) -> None:
    """A member's message (3) is committed and held behind 2, which a dead worker committed
    and never published, until the releaser publishes both (HOLD_TIMEOUT). Meanwhile the
    member leaves: what it is sent before ``left`` (Chat._send_in_flight: every message
    accepted before the leave that the stream has not brought it) is read with `since`,
    and holds 2 and 3, from the log (before: the window's, which said it was complete
    without them: ``left`` came first, and the member never got the echo of its message,
    which the room got)."""
    durable, delivered = durable_on_memory
    durable.HOLD_TIMEOUT = 30  # the releaser does not run during the test
    room = f"leaving-{uuid.uuid4().hex[:6]}"
    durable.last_id(room)
    durable.post_room(room, "u2", draft_message(room, "b", "u2", "1", 1, None))
    durable.log.write([room_post(room, "2: committed, its worker died")])
    posted = durable.post_room(room, "u1", draft_message(room, "a", "u1", "3", 1, "c-3"))
    assert posted.msg_id == 3 and [message_id_of(e) for e in delivered] == [1]  # 3 held
    replay = durable.since(room, 1)
    assert replay.complete and [message_id_of(e) for e in replay.messages] == [2, 3]


def test_the_releaser_moves_past_messages_retention_deleted(
        durable_on_memory: tuple[DurableMessageStore, list[bytes]], tmp_path: Path,
        caplog: pytest.LogCaptureFixture) -> None:
    """A dead worker committed 2 and 3 and never published them; retention then deleted 2
    (docs/persistence.md: prune with SQL). 4 is held behind the gap. 2 is gone for good:
    the releaser publishes 3 and 4 and says so once, and a `since` below 3 is not
    recovered, from the window (1, 3, 4) or the log (before: the releaser read 3 and 4,
    found them held behind 2, and tried again every 10 s forever, a warning each time;
    members never got 3 or 4)."""
    durable, delivered = durable_on_memory
    durable.HOLD_TIMEOUT = 0.05
    room = f"pruned-{uuid.uuid4().hex[:6]}"
    durable.last_id(room)
    assert durable.post_room(room, "u1", draft_message(room, "a", "u1", "1", 1, None)).msg_id == 1
    durable.log.write([room_post(room, "2: committed, never published"),
                       room_post(room, "3: committed, never published")])
    with sqlite3.connect(tmp_path / "d.db", timeout=5) as db:  # retention, by hand
        db.execute("DELETE FROM messages WHERE room = ? AND id = 2", (room,))
    db.close()
    caplog.set_level("WARNING", logger="wschat.persistence")
    posted = durable.post_room(room, "u2", draft_message(room, "b", "u2", "4", 1, None))
    assert posted.msg_id == 4
    wait_until(lambda: gevent.sleep(0.02) or len(delivered) == 3, timeout=5,
               message="3 and 4 to be released past the deleted 2")
    assert [message_id_of(e) for e in delivered] == [1, 3, 4]
    gevent.sleep(0.3)  # a releaser still retrying would warn again meanwhile
    skipped = [r for r in caplog.records if "no longer holds them" in r.getMessage()]
    assert len(skipped) == 1 and "messages 2 to 2" in skipped[0].getMessage()
    assert room not in durable._releasing
    for since in (0, 1):  # the window holds 1, 3, 4: a hole, not a replay
        replay = durable.since(room, since)
        assert not replay.complete, (since, [message_id_of(e) for e in replay.messages])
    whole = durable.since(room, 2)
    assert whole.complete and [message_id_of(e) for e in whole.messages] == [3, 4]


def test_a_replay_from_the_log_over_deleted_rows_is_not_recovered(
        durable_on_memory: tuple[DurableMessageStore, list[bytes]], tmp_path: Path) -> None:
    """Rows retention deleted leave a hole in the log: a `since` below it is answered
    `recovered: false` (before: the log's rows after the hole came back as complete, a
    gap the client was never told of)."""
    durable, _ = durable_on_memory
    room = f"holed-{uuid.uuid4().hex[:6]}"
    durable.last_id(room)
    for i in range(6):  # the window (3) holds 4..6
        durable.post_room(room, "u1", draft_message(room, "a", "u1", f"m{i}", 1, None))
    with sqlite3.connect(tmp_path / "d.db", timeout=5) as db:
        db.execute("DELETE FROM messages WHERE room = ? AND id <= 2", (room,))
    db.close()
    assert not durable.since(room, 0).complete
    assert not durable.since(room, 1).complete
    replay = durable.since(room, 2)
    assert replay.complete and [message_id_of(e) for e in replay.messages] == [3, 4, 5, 6]


def test_held_message_is_released_from_the_log_when_its_predecessor_never_comes(
        tmp_path: Path) -> None:
    """Redis: id 2 waits for id 1; when 1's worker died after committing, 1 comes from the log,
    and members get 1 then 2."""
    from wschat.stores import redis as redis_stores

    client = redis_stores.redis.Redis.from_url(redis_url_or_skip(15))
    room = f"held-{uuid.uuid4().hex[:6]}"
    listener = client.pubsub()
    listener.subscribe(redis_stores.room_channel(room))
    inner = redis_stores.RedisMessageStore(client, history_size=10)
    first_start(client)
    durable = DurableMessageStore(inner, open_message_log(f"sqlite:///{tmp_path}/held.db"))
    durable.HOLD_TIMEOUT = 0.1
    durable.start()
    try:
        durable.last_id(room)
        dead_workers = room_post(room, "committed, never published")
        durable.log.write([dead_workers])  # as another worker would, then it died
        posted = durable.post_room(room, "u1", draft_message(room, "a", "u1", "second", 1, None))
        assert (dead_workers.msg_id, posted.msg_id) == (1, 2)
        assert inner.last_id(room) == 0  # 2 is held: 1 is not published yet
        wait_until(lambda: gevent.sleep(0.05) or inner.last_id(room) == 2,
                   message="the held message to be released")
        published = []
        while len(published) < 2:
            message = listener.get_message(timeout=TIMEOUT)
            assert message is not None
            if message["type"] == "message":
                published.append(message_id_of(message["data"].partition(b"\n")[2]))
        assert published == [1, 2]
        assert [message_id_of(e) for e in inner.recent(room, 10)] == [1, 2]
    finally:
        durable.close()
        listener.close()
        client.close()


def test_a_rooms_first_message_a_dead_worker_committed_reaches_its_members(
        tmp_path: Path) -> None:
    """Redis, two workers: Carol is in a new room (her worker read its last id, 0); Alice's
    worker commits the room's first message and dies before publishing it. Bob joins on a
    third worker, the first to read the room there: the window knows nothing of the room,
    and the log has 1. Members get 1 all the same, before Alice's retry is echoed (before:
    the window's sequence was raised to 1 without publishing it, so the retry was answered
    with the stored message, acknowledged, and nobody ever published it to the room: Carol
    never got it)."""
    from wschat.stores import redis as redis_stores
    from wschat.stores.redis.keys import room_keys

    client = redis_stores.redis.Redis.from_url(redis_url_or_skip(15))
    room = f"first-{uuid.uuid4().hex[:6]}"
    listener = client.pubsub()
    listener.subscribe(redis_stores.room_channel(room))
    first_start(client)
    url = f"sqlite:///{tmp_path}/first.db"
    carols, bobs = (DurableMessageStore(redis_stores.RedisMessageStore(client, 10),
                                        open_message_log(url)) for _ in range(2))
    for durable in (carols, bobs):
        durable.HOLD_TIMEOUT = 0.05
        durable.start()
    try:
        assert carols.last_id(room) == 0  # Carol's join
        alices = room_post(room, "1: committed, its worker died", cmid="a-1")
        carols.log.write([alices])  # as Alice's worker did
        assert bobs.last_id(room) == 1  # Bob's join: he is a member from 1 on
        retry = carols.post_room(room, "u1", alices.draft)  # Alice, reconnected
        assert retry.duplicate and retry.msg_id == 1
        published = None
        while published is None:
            message = listener.get_message(timeout=TIMEOUT)
            assert message is not None, "1 was never published to the room"
            if message["type"] == "message":
                published = message_id_of(message["data"].partition(b"\n")[2])
        assert published == 1
        assert [message_id_of(e) for e in carols.inner.recent(room, 10)] == [1]
    finally:
        for durable in (carols, bobs):
            durable.close()
        listener.close()
        client.delete(*room_keys(room)[4:], f"wschat:{{r:{room}}}:held")
        client.close()


def test_a_held_message_is_released_when_its_worker_stops_before_its_releaser(
        tmp_path: Path) -> None:
    """Persistence turned off by a rolling update: the last worker that numbers in the
    database holds an acknowledged message behind one whose publish failed, and stops
    before its releaser ran (HOLD_TIMEOUT). Its close releases it, before its node leaves
    the list of database-numbering workers (RedisStores.close); before, workers numbering
    in Redis went on from the room's sequence below it: they issued its id (and the one
    before) again, and the acknowledged message was never published."""
    from wschat.stores import redis as redis_stores

    client = redis_stores.redis.Redis.from_url(redis_url_or_skip(15))
    room = f"held-{uuid.uuid4().hex[:6]}"
    first_start(client)
    inner = redis_stores.RedisMessageStore(client, history_size=10)
    keeper = redis_stores.NodeKeeper(client, redis_stores._Node(), 30, 3600,
                                     numbers_in_database=True)
    keeper.beat_and_reap()
    durable = DurableMessageStore(inner, open_message_log(f"sqlite:///{tmp_path}/stop.db"))
    durable.HOLD_TIMEOUT = 30  # the stop comes first
    durable.start()
    without_persistence = redis_stores.RedisMessageStore(client, history_size=10)
    try:
        durable.last_id(room)
        failed = room_post(room, "committed, its publish failed")
        durable.log.write([failed])
        acked = durable.post_room(room, "u1", draft_message(room, "a", "u1", "acked", 1, None))
        assert (failed.msg_id, acked.msg_id) == (1, 2) and inner.last_id(room) == 0  # held
        durable.close()
        keeper.stop()  # as RedisStores.close, after the message store
        assert [message_id_of(e) for e in inner.recent(room, 10)] == [1, 2]
        assert without_persistence.post_room(room, "u2", draft_message(
            room, "b", "u2", "next", 1, None)).msg_id == 3
    finally:
        client.delete(*(f"wschat:{{r:{room}}}:{k}" for k in ("seq", "hist", "held")))
        client.close()


def test_a_room_published_to_from_the_log_without_members_expires_in_redis() -> None:
    """Redis with persistence: a committed message of a room nobody is in (``/api/publish``)
    leaves the room's history to expire ``ROOM_TTL`` from then and its sequence
    ``ROOM_NUMBERING_TTL``, as a post without persistence does (before: never joined,
    they stayed in Redis for good)."""
    from wschat.stores import redis as redis_stores
    from wschat.stores.base import Stored
    from wschat.stores.redis.keys import room_keys

    client = redis_stores.redis.Redis.from_url(redis_url_or_skip(15))
    room = f"api-only-{uuid.uuid4().hex[:6]}"
    inner = redis_stores.RedisMessageStore(client, history_size=10, room_ttl=600,
                                           numbering_ttl=900)
    first_start(client)
    seq, hist = room_keys(room)[4:]
    try:
        event = draft_message(room, "api", "system", "x", 1, None).with_id(1)
        assert inner.publish_stored([Stored(1, event, room, "system")]) == [1]
        assert 600 < client.ttl(seq) <= 900 and 0 < client.ttl(hist) <= 600
    finally:
        client.delete(seq, hist)
        client.close()



def _durable_on_redis(tmp_path: Path) -> tuple[Any, Any, DurableMessageStore]:
    """A started durable store over a Redis message store (history 10, ``ROOM_TTL`` 600 s,
    ``ROOM_NUMBERING_TTL`` 900 s) on the test Redis, its log in ``tmp_path``, releasing held
    messages after 0.05 s: (Redis client, inner store, durable store)."""
    from wschat.stores import redis as redis_stores

    client = redis_stores.redis.Redis.from_url(redis_url_or_skip(15))
    inner = redis_stores.RedisMessageStore(client, history_size=10, room_ttl=600,
                                           numbering_ttl=900)
    first_start(client)
    durable = DurableMessageStore(inner, open_message_log(f"sqlite:///{tmp_path}/log.db"))
    durable.HOLD_TIMEOUT = 0.05
    durable.start()
    return client, inner, durable

def test_a_room_only_the_api_posts_to_continues_from_the_log_once_its_keys_expired(
        tmp_path: Path) -> None:
    """Redis with persistence: a room only ``/api/publish`` writes to gets ``ROOM_TTL`` on
    its keys; once they expired, the API's next post to it (through a worker that has read
    the room's last id before) is published at once, and the keys get their TTL again
    (before: the worker's window read the room's id once, so the post was held behind the
    ids the keys had lost and published HOLD_TIMEOUT later by the releaser, which filled the
    history again from the log, with a warning meant for a dead worker's messages, and left
    the room's keys with no expiry: kept in Redis for good)."""
    from wschat.stores.base import API_USER
    from wschat.stores.redis.keys import room_keys

    room = f"api-only-{uuid.uuid4().hex[:6]}"
    client, inner, durable = _durable_on_redis(tmp_path)
    seq, hist = room_keys(room)[4:]

    def publish(text: str) -> int:
        return durable.post_room(room, API_USER, draft_message(room, "api", API_USER, text,
                                                               1, None)).msg_id

    try:
        assert [publish(f"m{i}") for i in range(3)] == [1, 2, 3]
        assert 600 < client.ttl(seq) <= 900
        client.delete(seq, hist)  # ROOM_TTL passed
        assert publish("later") == 4
        assert inner.last_id(room) == 4, "held behind the ids the expired keys had"
        gevent.sleep(0.2)  # a releaser, if one was started (HOLD_TIMEOUT 0.05 s), has run
        assert 600 < client.ttl(seq) <= 900 and 0 < client.ttl(hist) <= 600
    finally:
        durable.close()
        client.delete(seq, hist)
        client.close()


def test_messages_the_releaser_publishes_to_a_room_nobody_is_in_expire_in_redis(
        tmp_path: Path) -> None:
    """Redis with persistence: a worker committed a room's first message (an ``/api/publish``)
    and died before publishing it; a member's post (2) is held behind it, and the member
    leaves before the releaser publishes both from the log (its leave found no keys to give
    ``ROOM_TTL``). The keys the releaser creates expire ``ROOM_TTL`` from then, as after the
    API's own posts to a room nobody is in (before: the releaser published as nobody, the
    script skipped the TTL, and the room's sequence and history stayed in Redis for good)."""
    from wschat.stores.base import API_USER
    from wschat.stores.redis.keys import room_keys

    room = f"api-held-{uuid.uuid4().hex[:6]}"
    client, inner, durable = _durable_on_redis(tmp_path)
    seq, hist = room_keys(room)[4:]
    try:
        durable.last_id(room)  # the member's join
        durable.log.write([room_post(room, "1: committed, never published", user=API_USER)])
        posted = durable.post_room(room, "u1", draft_message(room, "a", "u1", "2", 1, None))
        assert posted.msg_id == 2 and inner.last_id(room) == 0  # held behind 1
        wait_until(lambda: gevent.sleep(0.02) or inner.last_id(room) == 2,
                   message="the held message to be released")
        assert [message_id_of(e) for e in inner.recent(room, 10)] == [1, 2]
        assert 600 < client.ttl(seq) <= 900 and 0 < client.ttl(hist) <= 600
    finally:
        durable.close()
        client.delete(seq, hist, f"wschat:{{r:{room}}}:held")
        client.close()


def test_a_room_only_the_api_posts_to_continues_from_the_log_in_memory_too(
        tmp_path: Path) -> None:
    """The memory store as Redis above: a room only ``/api/publish`` writes to is dropped
    from the window ``ROOM_TTL`` after its first post (its expiry runs when the store is
    next written to); the API's next post continues from the log and is published at once,
    not held behind the ids the window dropped."""
    from wschat.stores.base import API_USER
    from wschat.stores.memory import MemoryBroker, MemoryMessageStore

    now = [0.0]
    delivered: list[bytes] = []
    broker = MemoryBroker()
    broker.start(lambda room, event, exclude: delivered.append(event),
                 lambda user, event: delivered.append(event))
    inner = MemoryMessageStore(broker, 10, room_ttl=10, clock=lambda: now[0])
    durable = DurableMessageStore(inner, open_message_log(f"sqlite:///{tmp_path}/mem.db"))
    durable.HOLD_TIMEOUT = 30  # a releaser would not run during the test
    durable.start()

    def publish(text: str) -> int:
        return durable.post_room("news", API_USER, draft_message(
            "news", "api", API_USER, text, 1, None)).msg_id

    try:
        assert [publish(f"m{i}") for i in range(3)] == [1, 2, 3]
        now[0] = 11  # ROOM_TTL passed
        assert publish("later") == 4
        assert message_id_of(delivered[-1]) == 4, "held behind the ids the window dropped"
        assert inner.last_id("news") == 4
    finally:
        durable.close()


def test_an_id_held_while_the_releaser_ends_is_released_too(tmp_path: Path) -> None:
    """Redis: the releaser of a room finds everything it waited for published and ends,
    while (during its look at Redis) another message of the room is held behind one a
    dead worker committed. _watch_held starts no second releaser for it (one runs), so
    the ending one must wait for it too: members get 3 and 4 from the log (before: the
    releaser dropped the new target with its own, and 3 and 4 waited, held, for a later
    message of the room or the senders' retries)."""
    from wschat.stores import redis as redis_stores

    client = redis_stores.redis.Redis.from_url(redis_url_or_skip(15))
    room = f"held-late-{uuid.uuid4().hex[:6]}"
    inner = redis_stores.RedisMessageStore(client, history_size=10)
    first_start(client)
    durable = DurableMessageStore(inner, open_message_log(f"sqlite:///{tmp_path}/late.db"))
    durable.HOLD_TIMEOUT = 0.05
    durable.start()
    looks_at_2 = 0
    last_id = inner.last_id

    def last_id_meanwhile(name: str) -> int:
        # The releaser's second look that finds 2 published: the one it ends on. Meanwhile
        # a dead worker commits 3, and 4 is posted here and held behind it.
        nonlocal looks_at_2
        value = last_id(name)
        if name == room and value == 2:
            looks_at_2 += 1
            if looks_at_2 == 2:
                durable.log.write([room_post(room, "3: committed, never published")])
                posted = durable.post_room(room, "u1", draft_message(room, "a", "u1", "4", 1,
                                                                     None))
                assert posted.msg_id == 4 and last_id(room) == 2  # 4 is held
        return value

    inner.last_id = last_id_meanwhile  # type: ignore[method-assign]
    try:
        durable.last_id(room)
        durable.log.write([room_post(room, "1: committed, never published")])
        posted = durable.post_room(room, "u1", draft_message(room, "a", "u1", "2", 1, None))
        assert posted.msg_id == 2
        wait_until(lambda: gevent.sleep(0.05) or looks_at_2 >= 2,
                   message="the releaser to publish 1 and 2")
        wait_until(lambda: gevent.sleep(0.05) or last_id(room) == 4, timeout=TIMEOUT,
                   message="3 and 4 to be released from the log")
        assert [message_id_of(e) for e in inner.recent(room, 10)] == [1, 2, 3, 4]
    finally:
        durable.close()
        client.close()


def test_memory_since_with_raised_sequence_and_no_messages() -> None:
    """A window whose sequence was raised from the log but holds nothing says 'incomplete'."""
    stores = create_memory_stores(history_size=3, room_ttl=3600)
    stores.messages.raise_sequence("r", 7)
    assert stores.messages.last_id("r") == 7
    replay = stores.messages.since("r", 3)
    assert replay.messages == [] and replay.complete is False


def test_database_url_default_and_validation() -> None:
    """DATABASE_URL defaults to wschat.db in the working directory; bad values name the variable."""
    assert Settings.from_env({}).database_url == DEFAULT_DATABASE_URL == "sqlite:///wschat.db"
    pg_url = "postgresql://postgres@127.0.0.1:5432/wschat_test"
    assert Settings.from_env({"DATABASE_URL": pg_url}).database_url == pg_url
    for bad in ("sqlite:wschat.db", "sqlite:///", "mysql://x/y"):
        with pytest.raises(ConfigError, match="DATABASE_URL"):
            Settings.from_env({"DATABASE_URL": bad})
    assert open_message_log("sqlite:////var/lib/wschat/x.db").path == "/var/lib/wschat/x.db"  # type: ignore[attr-defined]
    assert open_message_log("sqlite:///rel/x.db").path == "rel/x.db"  # type: ignore[attr-defined]


def test_user_arrival_is_a_no_op_without_persistence() -> None:
    """The plain stores keep no DMs: no backlog, no offline delivery."""
    stores = create_memory_stores(history_size=3, room_ttl=3600)
    assert stores.messages.user_arrived(User("u", "u")) is None
    assert stores.messages.keeps_dms_for("u") is False


@pytest.mark.parametrize("persistence", [False, True], ids=["redis", "redis+sqlite"])
def test_posts_refused_while_the_broker_resynchronises(tmp_path: Path, persistence: bool
                                                       ) -> None:
    """One guard in the store layer (MessageStore.check_delivering) for every caller:
    while the broker is resubscribing after an outage, room messages and DMs are refused
    as ``Unavailable`` before anything is stored, with and without persistence (the
    durable store does not go through the Redis store's post); afterwards they pass."""
    from wschat.stores import redis as redis_stores
    from wschat.stores.base import Unavailable

    client = redis_stores.redis.Redis.from_url(redis_url_or_skip(15))
    room = f"resync-{uuid.uuid4().hex[:6]}"
    inner = redis_stores.RedisMessageStore(client, history_size=10)
    first_start(client)
    store: Any = inner
    if persistence:
        store = DurableMessageStore(inner, open_message_log(f"sqlite:///{tmp_path}/g.db"))
        store.start()
    resynced = False
    inner.delivering = lambda: resynced
    try:
        with pytest.raises(Unavailable):
            store.post_room(room, "u1", draft_message(room, "a", "u1", "early", 1, None))
        with pytest.raises(Unavailable):
            store.post_dm("u1", "u2", draft_dm("u2", "a", "u1", "early", 1, None))
        resynced = True
        posted = store.post_room(room, "u1", draft_message(room, "a", "u1", "now", 1, None))
        assert posted.msg_id == 1  # the refused one took no id, in Redis or the database
        assert [message_id_of(e) for e in store.recent(room, 10)] == [1]
    finally:
        store.close()
        client.close()


def test_a_read_bounded_by_bytes_says_when_it_left_messages_out(message_log: MessageLog) -> None:
    """log.after with max_bytes: what it returns comes to more than the bound exactly when
    it left messages out, also when the messages it kept end exactly at the bound."""
    room = f"bytes-{uuid.uuid4().hex[:6]}"
    posts = [room_post(room, "x" * n) for n in (100, 200, 300)]
    message_log.write(posts)
    sizes = [len(p.event) for p in posts]

    def read(max_bytes: int) -> list[int]:
        return [message_id_of(e) or 0 for e in message_log.after(room, 0, 10, max_bytes)]

    assert read(sum(sizes)) == [1, 2, 3]  # all of them, at the bound: nothing left out
    assert read(sizes[0] + sizes[1]) == [1, 2, 3]  # the third starts at the bound: over it
    assert read(sizes[0] + sizes[1] - 1) == [1, 2]  # over the bound; the third left out
    assert read(0) == [1]
    assert read(10_000) == [1, 2, 3] and message_log.after(room, 1, 1, 10_000) == [posts[1].event]


def test_a_database_numbering_worker_listed_again_reads_the_room_sequences_again(
        tmp_path: Path) -> None:
    """Persistence turned on (or off) by a rolling update; a worker that numbers in the
    database stalls (or loses Redis) past its PRESENCE_TTL: another node's heartbeat forgets
    its listing, and posts numbered in Redis are taken again meanwhile. When it is listed
    again (its heartbeat, or the recovery at its reconnect), its next posts must go on above
    what Redis issued meanwhile (before: it had read each room's and the DMs' sequence once,
    numbered from the database's, issued those ids again, and its copies were published as
    stale: acknowledged, never delivered live)."""
    from wschat.config import Settings
    from wschat.stores import create_stores
    from wschat.stores.redis import user_channel
    from wschat.stores.redis.keys import NUMBERED_BY_DATABASE

    with own_redis() as redis_server:
        database_side = create_stores(Settings(
            redis_url=redis_server.url, enable_persistence=True,
            database_url=f"sqlite:///{tmp_path}/relisted.db"))
        redis_side = create_stores(Settings(redis_url=redis_server.url))
        durable = database_side.messages
        for stores in (database_side, redis_side):
            inner = getattr(stores.messages, "inner", stores.messages)
            inner.delivering = lambda: True  # no broker started: its health aside
            inner.on_gate_closed = lambda: None
        durable.start()
        # the DMs' users are heard (dm_heard.lua): a pub/sub connection stands in for theirs
        listener = database_side.client.pubsub()
        listener.subscribe(user_channel("u1"), user_channel("u2"))
        wait_until(lambda: database_side.client.pubsub_numsub(user_channel("u2"))[0][1] == 1,
                   message="the DMs' recipient to be heard")
        try:
            database_side.epoch.begin()
            redis_side.epoch.begin()
            for stores in (database_side, redis_side):
                stores.keeper.beat_and_reap()

            def post(stores: Any, text: str) -> int:
                return stores.messages.post_room("r", "u1", draft_message(
                    "r", "a", "u1", text, 1, None)).msg_id

            def dm(stores: Any, text: str) -> int:
                return stores.messages.post_dm("u1", "u2", draft_dm(
                    "u2", "a", "u1", text, 1, None)).msg_id

            assert (post(database_side, "first"), dm(database_side, "first")) == (1, 1)
            with pytest.raises(Unavailable):
                post(redis_side, "refused")
            for listed_again in (lambda: database_side.keeper.beat_and_reap(),
                                 lambda: database_side.epoch.begin()):
                # its listing ran out (a stall): another node's heartbeat pruned it
                database_side.client.zrem(NUMBERED_BY_DATABASE, database_side.keeper.node_id)
                taken = post(redis_side, "meanwhile"), dm(redis_side, "meanwhile")
                listed_again()
                with pytest.raises(Unavailable):
                    post(redis_side, "refused again")
                assert post(database_side, "after") == taken[0] + 1
                assert dm(database_side, "after") == taken[1] + 1
        finally:
            listener.close()
            durable.close()
            for stores in (database_side, redis_side):
                stores.client.close()
