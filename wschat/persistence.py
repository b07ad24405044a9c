"""The durable message log: SQLite (embedded default) or PostgreSQL, one interface.

This module owns the database: its schema and migrations, the SQL, and the
group-commit writer. The rule it implements (docs/persistence.md):

* A room message gets its id **inside the transaction that stores it**: the
  ``sequences`` row of the room is incremented (an upsert that locks the row
  until commit) and the message inserted in the same transaction. An aborted
  transaction gives its ids back, so committed ids have no gaps, and two
  workers or pods writing to one room are serialised by the row lock, so they
  can never pick the same id.
* :class:`GroupCommitWriter` runs every write of a worker in one greenlet:
  whatever queued up while the previous commit ran goes into the next
  transaction (group commit, no artificial delay), and only after COMMIT
  returns does the caller learn its id. SQLite commits with
  ``synchronous=FULL`` in WAL mode, PostgreSQL with its default
  ``synchronous_commit=on``: a committed message survives a crash of the
  process and of the machine.
* SQLite never runs on the gevent hub: a worker's writes run in a writer
  process of its own and its reads on a thread (:mod:`wschat.sqlite_log`).
  psycopg 3 is imported only when a PostgreSQL URL is used, after gevent
  patched the worker, and then waits on its sockets cooperatively.

Schema changes are ordered steps in :data:`MIGRATIONS`; the server applies the
missing ones at start (under a lock, so workers and pods starting together are
safe) and records each in ``schema_version``. A database newer than the server
is refused.
"""

from __future__ import annotations

import logging
import sqlite3
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import gevent
import gevent.event
import gevent.lock
import gevent.queue
import orjson

from .db_wait import psycopg_connection_class
from .protocol import MessageDraft, stored_id_of
from .stores.base import Unavailable

log = logging.getLogger("wschat.persistence")

DEFAULT_DATABASE_URL = "sqlite:///wschat.db"
DM_SCOPE = "dm"
SQLITE_BUSY_TIMEOUT_MS = 1000
SQLITE_MIN_VERSION = (3, 38, 0)
PG_CONNECT_TIMEOUT_S = 3
PG_STATEMENT_TIMEOUT_MS = 5000
PG_READ_POOL = 4


def room_scope(room: str) -> str:
    return "room:" + room


# (version, description, statements). {blob} and {without_rowid} are filled per dialect.
# Append new steps; never edit one that has shipped.
MIGRATIONS: list[tuple[int, str, tuple[str, ...]]] = [
    (1, "room messages, direct messages, sequences, users", (
        "CREATE TABLE sequences (scope TEXT PRIMARY KEY, last_id BIGINT NOT NULL)",
        "CREATE TABLE messages (room TEXT NOT NULL, id BIGINT NOT NULL, user_id TEXT NOT NULL,"
        " client_msg_id TEXT, created_ms BIGINT NOT NULL, event {blob} NOT NULL,"
        " PRIMARY KEY (room, id)){without_rowid}",
        "CREATE UNIQUE INDEX messages_client_msg_id ON messages (client_msg_id, room, user_id)"
        " WHERE client_msg_id IS NOT NULL",
        "CREATE TABLE dms (id BIGINT PRIMARY KEY, sender_id TEXT NOT NULL,"
        " recipient_id TEXT NOT NULL, client_msg_id TEXT, created_ms BIGINT NOT NULL,"
        " delivered BOOLEAN NOT NULL, event {blob} NOT NULL)",
        "CREATE UNIQUE INDEX dms_client_msg_id ON dms (client_msg_id, sender_id)"
        " WHERE client_msg_id IS NOT NULL",
        "CREATE INDEX dms_undelivered ON dms (recipient_id, id) WHERE NOT delivered",
        "CREATE TABLE users (user_id TEXT PRIMARY KEY, username TEXT NOT NULL,"
        " first_seen_ms BIGINT NOT NULL, last_seen_ms BIGINT NOT NULL)",
    )),
]
SCHEMA_VERSION = MIGRATIONS[-1][0]


class DatabaseUnavailable(Unavailable):
    """The database cannot be reached or refused the write; nothing was acknowledged."""


# -- jobs: what callers hand the writer; the log fills in the outcome -------------------

@dataclass(slots=True, eq=False)
class Job:
    finished: bool = field(default=False, init=False)  # the outcome (or error) is filled in
    submitted: float = field(default=0.0, init=False)  # time.monotonic()
    cancelled: bool = field(default=False, init=False)
    error: Exception | None = field(default=None, init=False)


@dataclass(slots=True, eq=False)
class RoomPost(Job):
    room: str = ""
    user_id: str = ""
    draft: MessageDraft | None = None
    created_ms: int = 0
    msg_id: int = 0
    event: bytes = b""
    duplicate: bool = False

    @property
    def client_msg_id(self) -> str | None:
        assert self.draft is not None
        return self.draft.client_msg_id

    def draft_parts(self) -> tuple[str, str]:
        """The event before and after its id, for SQL that splices the id in itself."""
        assert self.draft is not None
        return self.draft.prefix.decode(), self.draft.suffix.decode()


@dataclass(slots=True, eq=False)
class DmPost(Job):
    sender_id: str = ""
    recipient_id: str = ""
    draft: MessageDraft | None = None
    created_ms: int = 0
    delivered: bool = True  # False: kept for the recipient's next connection
    msg_id: int = 0
    event: bytes = b""
    duplicate: bool = False


@dataclass(slots=True, eq=False)
class Arrival(Job):
    """A user connected: remember them, and read the first page of the DMs kept while
    they were away. Those stay kept until :class:`DmsDelivered` says the client has them."""

    user_id: str = ""
    username: str = ""
    seen_ms: int = 0
    backlog: list[bytes] = field(default_factory=list)  # oldest first, at most DM_PAGE
    kept: int = 0  # how many are kept in all


@dataclass(slots=True, eq=False)
class DmsDelivered(Job):
    """The user's connection was handed its kept DMs up to ``up_to``: no longer kept."""

    user_id: str = ""
    up_to: int = 0


@dataclass(slots=True, eq=False)
class SequenceFloor(Job):
    """Never issue a room id <= ``at_least`` (ids another store issued before the log)."""

    room: str = ""
    at_least: int = 0


# -- the SQL, shared by both dialects ---------------------------------------------------

class _Dialect:
    name = ""
    blob = ""
    without_rowid = ""
    greatest = ""

    def q(self, sql: str) -> str:
        return sql

    def any_of(self, column: str, values: Sequence[Any]) -> tuple[str, list[Any]]:
        raise NotImplementedError


class _SQLiteDialect(_Dialect):
    name = "sqlite"
    blob = "BLOB"
    without_rowid = " WITHOUT ROWID"
    greatest = "max"

    def any_of(self, column: str, values: Sequence[Any]) -> tuple[str, list[Any]]:
        return f"{column} IN ({','.join('?' * len(values))})", list(values)


class _PostgresDialect(_Dialect):
    name = "postgresql"
    blob = "BYTEA"
    greatest = "GREATEST"

    def q(self, sql: str) -> str:
        return sql.replace("?", "%s")

    def any_of(self, column: str, values: Sequence[Any]) -> tuple[str, list[Any]]:
        return f"{column} = ANY(%s)", [list(values)]


DM_SEQ_SQL = (
    "INSERT INTO sequences (scope, last_id) VALUES (?, (SELECT COALESCE(MAX(id), 0) FROM dms) + ?)"
    " ON CONFLICT (scope) DO UPDATE SET last_id = sequences.last_id + ? RETURNING last_id")
FLOOR_SQL = (
    "INSERT INTO sequences (scope, last_id) VALUES (?, ?) ON CONFLICT (scope)"
    " DO UPDATE SET last_id = {greatest}(sequences.last_id, excluded.last_id)")
UPSERT_USER_SQL = (
    "INSERT INTO users (user_id, username, first_seen_ms, last_seen_ms) VALUES (?, ?, ?, ?)"
    " ON CONFLICT (user_id) DO UPDATE SET username = excluded.username,"
    " last_seen_ms = excluded.last_seen_ms")
DM_PAGE = 50  # kept DMs are read, sent and marked delivered this many at a time
KEPT_DMS_SQL = (
    "SELECT event FROM dms WHERE recipient_id = ? AND NOT delivered AND id > ?"
    " ORDER BY id LIMIT ?")
COUNT_KEPT_SQL = "SELECT COUNT(*) FROM dms WHERE recipient_id = ? AND NOT delivered"
MARK_DELIVERED_SQL = (
    "UPDATE dms SET delivered = TRUE WHERE recipient_id = ? AND NOT delivered AND id <= ?")
LAST_ID_SQL = (
    "SELECT COALESCE((SELECT last_id FROM sequences WHERE scope = ?),"
    " (SELECT MAX(id) FROM messages WHERE room = ?), 0)")
BEFORE_SQL = "SELECT event FROM messages WHERE room = ? AND id < ? ORDER BY id DESC LIMIT ?"
NEWEST_SQL = "SELECT event FROM messages WHERE room = ? ORDER BY id DESC LIMIT ?"
AFTER_SQL = "SELECT event FROM messages WHERE room = ? AND id > ? ORDER BY id LIMIT ?"
KNOWS_USER_SQL = "SELECT 1 FROM users WHERE user_id = ?"
# A batch is a fixed handful of statements whatever its size, its rows passed as one
# JSON parameter (see _json_rows). PostgreSQL: every statement costs a wait on the
# socket, and psycopg adapts a JSON string in C where it adapts arrays element by
# element in Python. SQLite: every statement is a call from Python into sqlite3 (and
# when the writer was a thread of the worker, a wait for the GIL after each step);
# one statement per room, or executemany (a step per row), made a batch cost
# milliseconds per message under load.
#
# PostgreSQL: every room of a batch in one statement. Sequence rows are locked in
# room order, so two writers cannot deadlock. A conflicting row finds its count by a
# key lookup in the jsonb object (a scan of the batch there made a 500-room batch
# quadratic: 62 ms instead of 13).
PG_ROOM_SEQS_SQL = (
    "WITH batch (room, n) AS (SELECT key, value::bigint FROM jsonb_each_text(%(counts)s::jsonb))"
    " INSERT INTO sequences AS s (scope, last_id)"
    " SELECT 'room:' || room,"
    " COALESCE((SELECT MAX(id) FROM messages m WHERE m.room = batch.room), 0) + n"
    " FROM batch ORDER BY room"
    " ON CONFLICT (scope) DO UPDATE"
    " SET last_id = s.last_id + (%(counts)s::jsonb ->> substr(excluded.scope, 6))::bigint"
    " RETURNING s.scope, s.last_id")
# Rows are read with jsonb_array_elements: json_array_elements hands out json values that
# every ->> parses again (six times a row); jsonb is parsed once. A 500-message batch:
# 9.8 ms -> 8.4 (500 rooms), 4.8 -> 3.2 (one room) inside PostgreSQL.
PG_INSERT_MESSAGES_SQL = (
    "INSERT INTO messages (room, id, user_id, client_msg_id, created_ms, event)"
    " SELECT r ->> 0, (r ->> 1)::bigint, r ->> 2, r ->> 3, (r ->> 4)::bigint,"
    " convert_to(r ->> 5, 'UTF8') FROM jsonb_array_elements(%s::jsonb) AS r")
PG_INSERT_DMS_SQL = (
    "INSERT INTO dms (id, sender_id, recipient_id, client_msg_id, created_ms, delivered, event)"
    " SELECT (r ->> 0)::bigint, r ->> 1, r ->> 2, r ->> 3, (r ->> 4)::bigint,"
    " (r ->> 5)::boolean, convert_to(r ->> 6, 'UTF8') FROM jsonb_array_elements(%s::jsonb) AS r")
# PostgreSQL, a batch of room messages only (the usual batch): one statement, so one
# round trip and an implicit transaction instead of four (BEGIN, ids, rows, COMMIT).
# Each round trip costs this worker about 0.15 ms of CPU, and at moderate rates a
# batch holds only a few messages. The ids are numbered in SQL exactly as _apply
# numbers them (the k-th message of a room in batch order gets last - n + k) and
# the event is spliced the same way (prefix, id, suffix). If a client_msg_id of the
# batch is stored already (a retry), the statement takes no id and writes nothing,
# and returns no rows: the caller then runs the batch through _apply.
PG_POST_ROOMS_SQL = (
    "WITH b AS (SELECT r ->> 0 AS room, r ->> 1 AS user_id, r ->> 2 AS cmid,"
    " (r ->> 3)::bigint AS created_ms, r ->> 4 AS prefix, r ->> 5 AS suffix, ord"
    " FROM jsonb_array_elements(%(rows)s::jsonb) WITH ORDINALITY AS t (r, ord)),"
    " retried AS (SELECT 1 FROM b JOIN messages m ON m.client_msg_id = b.cmid"
    " AND m.room = b.room AND m.user_id = b.user_id LIMIT 1),"
    " seq AS (INSERT INTO sequences AS s (scope, last_id)"
    " SELECT 'room:' || key, COALESCE((SELECT MAX(id) FROM messages m WHERE m.room = key), 0)"
    " + value::bigint FROM jsonb_each_text(%(counts)s::jsonb)"
    " WHERE NOT EXISTS (SELECT 1 FROM retried) ORDER BY key"
    " ON CONFLICT (scope) DO UPDATE"
    " SET last_id = s.last_id + (%(counts)s::jsonb ->> substr(excluded.scope, 6))::bigint"
    " RETURNING substr(s.scope, 6) AS room, s.last_id),"
    " numbered AS (SELECT b.*, seq.last_id - count(*) OVER w + row_number() OVER (w ORDER BY ord)"
    " AS id FROM b JOIN seq USING (room) WINDOW w AS (PARTITION BY b.room)),"
    " inserted AS (INSERT INTO messages (room, id, user_id, client_msg_id, created_ms, event)"
    " SELECT room, id, user_id, cmid, created_ms, convert_to(prefix || id || suffix, 'UTF8')"
    " FROM numbered)"
    " SELECT room, last_id FROM seq")
# SQLite: the write lock (BEGIN IMMEDIATE) makes the read-then-write of the sequences safe.
SQLITE_ROOM_LAST_IDS_SQL = (
    "SELECT json_group_object(key, COALESCE("
    "(SELECT last_id FROM sequences WHERE scope = 'room:' || key),"
    " (SELECT MAX(id) FROM messages WHERE room = key), 0)) FROM json_each(?)")
SQLITE_SET_SEQUENCES_SQL = (
    "INSERT INTO sequences (scope, last_id) SELECT key, value FROM json_each(?) WHERE true"
    " ON CONFLICT (scope) DO UPDATE SET last_id = excluded.last_id")
SQLITE_INSERT_MESSAGES_SQL = (
    "INSERT INTO messages (room, id, user_id, client_msg_id, created_ms, event)"
    " SELECT value ->> 0, value ->> 1, value ->> 2, value ->> 3, value ->> 4,"
    " CAST(value ->> 5 AS BLOB) FROM json_each(?)")
SQLITE_INSERT_DMS_SQL = (
    "INSERT INTO dms (id, sender_id, recipient_id, client_msg_id, created_ms, delivered, event)"
    " SELECT value ->> 0, value ->> 1, value ->> 2, value ->> 3, value ->> 4, value ->> 5,"
    " CAST(value ->> 6 AS BLOB) FROM json_each(?)")
VERSION_TABLE_SQL = (
    "CREATE TABLE IF NOT EXISTS schema_version (version INTEGER PRIMARY KEY,"
    " description TEXT NOT NULL, applied_ms BIGINT NOT NULL)")


class MessageLog:
    """The durable log. Subclasses supply where statements run (:meth:`_write_call`,
    :meth:`_read_call`) and how a transaction is opened; the SQL is shared."""

    dialect: _Dialect
    url_for_logs = ""

    # -- where statements run: implemented by the backends ---------------------------
    def _write_call(self, fn: Callable[..., Any], *args: Any) -> Any:
        raise NotImplementedError

    def _read_call(self, fn: Callable[..., Any], *args: Any) -> Any:
        raise NotImplementedError

    def _transaction(self, conn: Any, fn: Callable[..., Any], *args: Any) -> Any:
        raise NotImplementedError

    def _take_room_ids(self, conn: Any, counts: dict[str, int]) -> dict[str, int]:
        """Take ``n`` ids in each room's sequence (locking its row until COMMIT); return
        each room's last id now taken."""
        raise NotImplementedError

    def _insert_messages(self, conn: Any, rows: list[tuple[Any, ...]]) -> None:
        raise NotImplementedError

    def _insert_dms(self, conn: Any, rows: list[tuple[Any, ...]]) -> None:
        raise NotImplementedError

    def _is_conflict(self, exc: BaseException) -> bool:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    # -- the public operations -------------------------------------------------------
    def migrate(self) -> int:
        """Apply the missing schema steps; return the schema version now in force."""
        return int(self._write_call(self._migrate))

    def ping(self) -> None:
        """Raise :class:`DatabaseUnavailable` unless a write could start now."""
        self._write_call(self._ping)

    def write(self, jobs: list[Job]) -> None:
        """Run ``jobs`` in one transaction, filling in their outcomes.

        A ``client_msg_id`` racing with another worker's insert of the same one
        fails the transaction on the unique index; the retry then finds it.
        """
        try:
            self._write_call(self._transaction, self._apply, jobs)
        except DatabaseUnavailable as exc:
            if not self._is_conflict(exc.__cause__ or exc):
                raise
            log.info("client_msg_id raced with another writer; retrying the batch")
            self._write_call(self._transaction, self._apply, jobs)

    def last_id(self, room: str) -> int:
        return int(self._read_call(self._scalar, LAST_ID_SQL, (room_scope(room), room)) or 0)

    def before(self, room: str, before_id: int | None, limit: int) -> list[bytes]:
        """Up to ``limit`` messages with ids < ``before_id`` (None: the newest), oldest first."""
        if before_id is None:
            rows = self._read_call(self._rows, NEWEST_SQL, (room, limit))
        else:
            rows = self._read_call(self._rows, BEFORE_SQL, (room, before_id, limit))
        return [bytes(r[0]) for r in reversed(rows)]

    def after(self, room: str, after_id: int, limit: int) -> list[bytes]:
        """Up to ``limit`` messages with ids > ``after_id``, oldest first."""
        return [bytes(r[0]) for r in self._read_call(self._rows, AFTER_SQL,
                                                     (room, after_id, limit))]

    def knows_user(self, user_id: str) -> bool:
        return bool(self._read_call(self._rows, KNOWS_USER_SQL, (user_id,)))

    def kept_dms(self, user_id: str, after_id: int, limit: int = DM_PAGE) -> list[bytes]:
        """DMs kept for ``user_id`` with ids > ``after_id`` (not yet delivered), oldest first."""
        return [bytes(r[0]) for r in self._read_call(self._rows, KEPT_DMS_SQL,
                                                     (user_id, after_id, limit))]

    def kept_count(self, user_id: str) -> int:
        return int(self._read_call(self._scalar, COUNT_KEPT_SQL, (user_id,)) or 0)

    # -- bodies (run where the backend runs statements) ------------------------------
    def _scalar(self, conn: Any, sql: str, params: tuple[Any, ...]) -> Any:
        row = conn.execute(self.dialect.q(sql), params).fetchone()
        return row[0] if row else None

    def _rows(self, conn: Any, sql: str, params: tuple[Any, ...]) -> list[Any]:
        return list(conn.execute(self.dialect.q(sql), params).fetchall())

    def _ping(self, conn: Any) -> None:
        self._transaction(conn, lambda c: c.execute("SELECT 1").fetchone())

    def _migrate(self, conn: Any) -> int:
        return int(self._transaction(conn, self._migrate_in_transaction))

    def _migration_lock(self, conn: Any) -> None:
        """Held until the migration transaction ends (SQLite: BEGIN IMMEDIATE is enough)."""

    def _migrate_in_transaction(self, conn: Any) -> int:
        self._migration_lock(conn)
        conn.execute(VERSION_TABLE_SQL)
        current = conn.execute("SELECT COALESCE(MAX(version), 0) FROM schema_version"
                               ).fetchone()[0]
        if current > SCHEMA_VERSION:
            raise SchemaTooNew(f"the database schema is version {current}; this server knows "
                               f"up to {SCHEMA_VERSION}: upgrade the server")
        d = self.dialect
        for version, description, statements in MIGRATIONS:
            if version <= current:
                continue
            for statement in statements:
                conn.execute(statement.format(blob=d.blob, without_rowid=d.without_rowid))
            conn.execute(d.q("INSERT INTO schema_version (version, description, applied_ms)"
                             " VALUES (?, ?, ?)"), (version, description, _now_ms()))
            log.info("database schema migrated to version %d (%s)", version, description)
            current = version
        return int(current)

    def _apply(self, conn: Any, jobs: list[Job]) -> None:
        d = self.dialect
        rooms = [j for j in jobs if isinstance(j, RoomPost)]
        dms = [j for j in jobs if isinstance(j, DmPost)]
        for job in jobs:
            if isinstance(job, SequenceFloor):
                conn.execute(d.q(FLOOR_SQL.format(greatest=d.greatest)),
                             (room_scope(job.room), job.at_least))
        new_rooms, room_retries = self._dedupe(conn, rooms, DEDUPE_ROOM_SQL, _room_key)
        new_dms, dm_retries = self._dedupe(conn, dms, DEDUPE_DM_SQL, _dm_key)

        by_room = _by_room(new_rooms)
        if by_room:
            taken = self._take_room_ids(conn, {room: len(posts) for room, posts in by_room.items()})
            self._insert_messages(conn, [(p.room, p.msg_id, p.user_id, p.client_msg_id,
                                          p.created_ms, p.event) for p in _number(by_room, taken)])
        if new_dms:
            last = conn.execute(d.q(DM_SEQ_SQL), (DM_SCOPE, len(new_dms), len(new_dms))
                                ).fetchone()[0]
            first_id = int(last) - len(new_dms) + 1
            dm_rows = []
            for msg_id, dm in enumerate(new_dms, start=first_id):
                assert dm.draft is not None
                dm.msg_id, dm.event = msg_id, dm.draft.with_id(msg_id)
                dm_rows.append((msg_id, dm.sender_id, dm.recipient_id, dm.draft.client_msg_id,
                                dm.created_ms, dm.delivered, dm.event))
            self._insert_dms(conn, dm_rows)
        _copy_originals(room_retries + dm_retries)
        for job in jobs:
            if isinstance(job, Arrival):
                conn.execute(d.q(UPSERT_USER_SQL),
                             (job.user_id, job.username, job.seen_ms, job.seen_ms))
                job.backlog = [bytes(r[0]) for r in conn.execute(
                    d.q(KEPT_DMS_SQL), (job.user_id, 0, DM_PAGE)).fetchall()]
                job.kept = int(conn.execute(d.q(COUNT_KEPT_SQL), (job.user_id,)).fetchone()[0])
            elif isinstance(job, DmsDelivered):
                conn.execute(d.q(MARK_DELIVERED_SQL), (job.user_id, job.up_to))

    def _dedupe(self, conn: Any, posts: list[Any], sql: str, key: Callable[[Any], tuple[str, ...]]
                ) -> tuple[list[Any], list[tuple[Any, Any]]]:
        """Split posts into those to store and retries of a stored one or of an earlier post
        in this batch (returned as (retry, original) pairs; the original's id is copied once
        it has one). Retries of stored ones get the stored event now."""
        cmids = sorted({p.draft.client_msg_id for p in posts if p.draft.client_msg_id})
        stored: dict[tuple[str, ...], bytes] = {}
        for chunk in _chunks(cmids, 500):
            clause, params = self.dialect.any_of("client_msg_id", chunk)
            for *row_key, event in conn.execute(sql + clause, params).fetchall():
                stored[tuple(row_key)] = bytes(event)
        return _split_retries(posts, stored, key)


def _split_retries(posts: list[Any], stored: dict[tuple[str, ...], bytes],
                   key: Callable[[Any], tuple[str, ...]]
                   ) -> tuple[list[Any], list[tuple[Any, Any]]]:
    """:meth:`MessageLog._dedupe` once the stored events of the batch's keys are known."""
    fresh: list[Any] = []
    retries: list[tuple[Any, Any]] = []
    first: dict[tuple[str, ...], Any] = {}
    for post in posts:
        if post.draft.client_msg_id:
            k = key(post)
            if k in stored:
                post.event = stored[k]
                post.msg_id, post.duplicate = stored_id_of(post.event), True
                continue
            if k in first:
                retries.append((post, first[k]))
                continue
            first[k] = post
        post.duplicate = False
        fresh.append(post)
    return fresh, retries


def _by_room(posts: list[RoomPost]) -> dict[str, list[RoomPost]]:
    """Posts grouped by room, each room's in batch order."""
    by_room: dict[str, list[RoomPost]] = {}
    for post in posts:
        by_room.setdefault(post.room, []).append(post)
    return by_room


def _number(by_room: dict[str, list[RoomPost]], taken: dict[str, int]) -> list[RoomPost]:
    """Give each room's posts the ids up to ``taken[room]`` in batch order (the k-th of n
    gets taken - n + k) and their events; return the posts."""
    numbered: list[RoomPost] = []
    for room, posts in by_room.items():
        for msg_id, post in enumerate(posts, start=taken[room] - len(posts) + 1):
            assert post.draft is not None
            post.msg_id, post.event = msg_id, post.draft.with_id(msg_id)
            numbered.append(post)
    return numbered


def _copy_originals(retries: list[tuple[Any, Any]]) -> None:
    """A retry within the batch answers with its original's id and event."""
    for retry, original in retries:
        retry.msg_id, retry.event, retry.duplicate = original.msg_id, original.event, True


def _room_key(post: RoomPost) -> tuple[str, ...]:
    assert post.draft is not None and post.draft.client_msg_id is not None
    return (post.room, post.user_id, post.draft.client_msg_id)


def _dm_key(post: DmPost) -> tuple[str, ...]:
    assert post.draft is not None and post.draft.client_msg_id is not None
    return (post.sender_id, post.draft.client_msg_id)


DEDUPE_ROOM_SQL = "SELECT room, user_id, client_msg_id, event FROM messages WHERE "
DEDUPE_DM_SQL = "SELECT sender_id, client_msg_id, event FROM dms WHERE "


class SchemaTooNew(RuntimeError):
    """The database was migrated by a newer server; this one must not write to it."""


def _json(value: Any) -> str:
    """A statement's JSON parameter, as text: SQLite >= 3.45 would take bytes for JSONB."""
    return orjson.dumps(value).decode()


def _json_rows(rows: list[tuple[Any, ...]]) -> str:
    """Rows as one JSON array of arrays; the event (the last column: bytes of JSON)
    travels as a string and is turned back into the identical bytes by the SQL."""
    return _json([(*row[:-1], row[-1].decode()) for row in rows])


def _chunks(items: Sequence[Any], size: int) -> Iterable[Sequence[Any]]:
    for i in range(0, len(items), size):
        yield items[i:i + size]


def _now_ms() -> int:
    return int(time.time() * 1000)


# -- SQLite: one connection, used by one thread at a time --------------------------------

class SQLiteFile(MessageLog):
    """SQLite in WAL mode with ``synchronous=FULL``: every COMMIT is fsynced.

    Plain blocking calls on one connection, from whichever thread owns it. A
    gevent worker never calls it on the hub: :class:`wschat.sqlite_log.SQLiteLog`
    runs the writes in a writer process and the reads on a thread. Several
    processes on one machine may share the file (writers take turns through
    SQLite's write lock); several machines may not.
    """

    dialect = _SQLiteDialect()

    def __init__(self, path: str) -> None:
        if sqlite3.sqlite_version_info < SQLITE_MIN_VERSION:
            raise ImportError(f"SQLite {sqlite3.sqlite_version} is too old for persistence: "
                              f"it needs {'.'.join(map(str, SQLITE_MIN_VERSION))} or newer "
                              "(JSON functions and the ->> operator)")
        self.path = path
        self.url_for_logs = f"sqlite:///{path}"
        self._conn: sqlite3.Connection | None = None

    def _connect(self) -> sqlite3.Connection:
        if self._conn is None:
            conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False,
                                   timeout=SQLITE_BUSY_TIMEOUT_MS / 1000)
            try:
                conn.execute(f"PRAGMA busy_timeout = {SQLITE_BUSY_TIMEOUT_MS}")
                mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
                if str(mode).lower() != "wal":
                    raise sqlite3.OperationalError(f"could not switch {self.path} to WAL ({mode})")
                conn.execute("PRAGMA synchronous = FULL")
            except BaseException:
                conn.close()
                raise
            self._conn = conn
        return self._conn

    def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        """``fn(connection, *args)``; a database error becomes :class:`DatabaseUnavailable`."""
        try:
            return fn(self._connect(), *args)
        except sqlite3.Error as exc:
            if not isinstance(exc, sqlite3.IntegrityError):
                # Disk or file trouble: reopen next time rather than keep a bad handle.
                self.close()
            raise DatabaseUnavailable(f"sqlite: {exc}") from exc

    _write_call = _read_call = call

    def _transaction(self, conn: Any, fn: Callable[..., Any], *args: Any) -> Any:
        # IMMEDIATE takes the write lock up front: no deadlock-prone lock upgrade later.
        conn.execute("BEGIN IMMEDIATE")
        try:
            result = fn(conn, *args)
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")
        return result

    def _take_room_ids(self, conn: Any, counts: dict[str, int]) -> dict[str, int]:
        last = orjson.loads(conn.execute(SQLITE_ROOM_LAST_IDS_SQL, (_json(counts),)).fetchone()[0])
        taken = {room: int(last[room]) + n for room, n in counts.items()}
        conn.execute(SQLITE_SET_SEQUENCES_SQL,
                     (_json({room_scope(room): n for room, n in taken.items()}),))
        return taken

    def _insert_messages(self, conn: Any, rows: list[tuple[Any, ...]]) -> None:
        conn.execute(SQLITE_INSERT_MESSAGES_SQL, (_json_rows(rows),))

    def _insert_dms(self, conn: Any, rows: list[tuple[Any, ...]]) -> None:
        conn.execute(SQLITE_INSERT_DMS_SQL, (_json_rows(rows),))

    def _is_conflict(self, exc: BaseException) -> bool:
        return isinstance(exc, sqlite3.IntegrityError)

    def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            try:
                conn.close()
            except sqlite3.Error:
                pass


# -- PostgreSQL: psycopg 3, cooperative under gevent ---------------------------------------

class PostgresLog(MessageLog):
    """PostgreSQL through psycopg 3: one connection for the writer greenlet, a few for reads.

    Connections are made lazily and dropped on any connection error, so the log
    recovers by itself when the server comes back.
    """

    dialect = _PostgresDialect()

    def __init__(self, url: str) -> None:
        try:
            import psycopg
        except ImportError as exc:  # pragma: no cover - depends on the install
            raise ImportError("a postgresql:// DATABASE_URL needs the postgres extra: "
                              "pip install 'wschat[postgres]'") from exc
        # psycopg waits cooperatively under gevent only from 3.1.14 on; earlier
        # versions would block the whole worker on every query.
        if tuple(int(p) for p in psycopg.__version__.split(".")[:3] if p.isdigit()) < (3, 1, 14):
            raise ImportError(f"psycopg {psycopg.__version__} blocks gevent; "
                              "pip install 'psycopg[binary]>=3.1.14'")
        self._psycopg = psycopg
        self._connection_class = psycopg_connection_class(psycopg)
        self.url = url
        self.url_for_logs = _without_password(url)
        self._writer: Any = None
        self._writer_lock = gevent.lock.Semaphore()
        self._readers: gevent.queue.LifoQueue[Any] = gevent.queue.LifoQueue()
        self._reader_slots = gevent.lock.BoundedSemaphore(PG_READ_POOL)

    def _connect(self) -> Any:
        try:
            return self._connection_class.connect(
                self.url, autocommit=True, connect_timeout=PG_CONNECT_TIMEOUT_S,
                application_name="wschat",
                options=f"-c statement_timeout={PG_STATEMENT_TIMEOUT_MS}")
        except self._psycopg.Error as exc:
            raise DatabaseUnavailable(f"postgresql: {_first_line(exc)}") from exc

    def _run(self, conn: Any, fn: Callable[..., Any], args: tuple[Any, ...]) -> Any:
        try:
            return fn(conn, *args)
        except self._psycopg.Error as exc:
            raise DatabaseUnavailable(f"postgresql: {_first_line(exc)}") from exc

    def _usable(self, conn: Any) -> bool:
        return conn is not None and not conn.closed and not conn.broken

    def _write_call(self, fn: Callable[..., Any], *args: Any) -> Any:
        with self._writer_lock:
            if not self._usable(self._writer):
                self._close_quietly(self._writer)
                self._writer = self._connect()
            try:
                return self._run(self._writer, fn, args)
            finally:
                if not self._usable(self._writer):
                    self._close_quietly(self._writer)
                    self._writer = None

    def _read_call(self, fn: Callable[..., Any], *args: Any) -> Any:
        with self._reader_slots:
            pooled = not self._readers.empty()
            conn = self._readers.get() if pooled else self._connect()
            try:
                result = self._run(conn, fn, args)
            except DatabaseUnavailable:
                self._close_quietly(conn)
                if not pooled:
                    raise
                # A pooled connection may predate a server restart: one fresh try.
                self._drain_readers()
                conn = self._connect()
                result = self._run(conn, fn, args)
            if self._usable(conn):
                self._readers.put(conn)
            return result

    def _drain_readers(self) -> None:
        while not self._readers.empty():
            self._close_quietly(self._readers.get())

    def _transaction(self, conn: Any, fn: Callable[..., Any], *args: Any) -> Any:
        with conn.transaction():
            return fn(conn, *args)

    def _migration_lock(self, conn: Any) -> None:
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (0x77736368,))  # "wsch"

    def write(self, jobs: list[Job]) -> None:
        if all(isinstance(job, RoomPost) for job in jobs):
            try:
                if self._write_call(self._post_rooms, jobs):
                    return
            except DatabaseUnavailable as exc:
                if not self._is_conflict(exc.__cause__ or exc):
                    raise
            # a retry of a stored client_msg_id, or one racing another writer's insert
        super().write(jobs)

    def _post_rooms(self, conn: Any, posts: list[RoomPost]) -> bool:
        """Store a batch of room messages in one statement (see PG_POST_ROOMS_SQL); False
        if nothing was written because a client_msg_id in it is stored already."""
        fresh, retries = _split_retries(posts, {}, _room_key)
        rows = [(p.room, p.user_id, p.client_msg_id, p.created_ms, *p.draft_parts())
                for p in fresh]
        by_room = _by_room(fresh)
        counts = {room: len(room_posts) for room, room_posts in by_room.items()}
        taken = {room: int(last) for room, last in conn.execute(
            PG_POST_ROOMS_SQL, {"rows": _json(rows), "counts": _json(counts)}).fetchall()}
        if len(taken) != len(counts):
            return False
        _number(by_room, taken)
        _copy_originals(retries)
        return True

    def _take_room_ids(self, conn: Any, counts: dict[str, int]) -> dict[str, int]:
        return {scope[len("room:"):]: int(last)
                for scope, last in conn.execute(PG_ROOM_SEQS_SQL, {"counts": _json(counts)})}

    def _insert_messages(self, conn: Any, rows: list[tuple[Any, ...]]) -> None:
        conn.execute(PG_INSERT_MESSAGES_SQL, (_json_rows(rows),))

    def _insert_dms(self, conn: Any, rows: list[tuple[Any, ...]]) -> None:
        conn.execute(PG_INSERT_DMS_SQL, (_json_rows(rows),))

    def _is_conflict(self, exc: BaseException) -> bool:
        return isinstance(exc, self._psycopg.errors.UniqueViolation)

    @staticmethod
    def _close_quietly(conn: Any) -> None:
        if conn is not None:
            try:
                conn.close()
            except Exception:
                pass

    def close(self) -> None:
        with self._writer_lock:
            self._close_quietly(self._writer)
            self._writer = None
        self._drain_readers()


def open_message_log(url: str | None) -> MessageLog:
    """The log for ``DATABASE_URL`` (default: ``wschat.db`` in the working directory)."""
    url = url or DEFAULT_DATABASE_URL
    if url.startswith("sqlite:"):
        # sqlite:///wschat.db is relative to the working directory, sqlite:////var/x.db absolute.
        if not url.startswith("sqlite:///") or not url[len("sqlite:///"):]:
            raise ValueError("DATABASE_URL: expected sqlite:///PATH (PATH relative to the "
                             "working directory, or sqlite:////absolute/path)")
        from .sqlite_log import SQLiteLog  # imports this module

        return SQLiteLog(url[len("sqlite:///"):])
    if url.startswith(("postgres://", "postgresql://")):
        return PostgresLog(url)
    raise ValueError("DATABASE_URL: expected sqlite:///PATH or postgresql://...")


def _without_password(url: str) -> str:
    scheme, sep, rest = url.partition("://")
    userinfo, at, host = rest.rpartition("@")
    if not at or ":" not in userinfo:
        return url
    return f"{scheme}{sep}{userinfo.split(':', 1)[0]}:***@{host}"


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [exc.__class__.__name__])[0]


# -- group commit ------------------------------------------------------------------------

class GroupCommitWriter:
    """One greenlet commits every write of this worker, a batch per transaction.

    Callers block (cooperatively) in :meth:`submit` until their batch has
    committed and ``after_commit`` has run for it; ``after_commit`` publishes
    in commit order, which is id order. While the database is down, submits
    fail fast with :class:`DatabaseUnavailable`; a prober greenlet keeps
    checking it (also when nothing is written, for readiness) and connects and
    migrates as soon as it answers. A watchdog greenlet fails whatever has
    waited longer than :attr:`SUBMIT_TIMEOUT` (one timer for all waiters, not
    one per message).
    """

    MAX_BATCH = 512
    SUBMIT_TIMEOUT = 10.0
    WATCH_EVERY = 1.0  # so a caller waits at most SUBMIT_TIMEOUT + WATCH_EVERY
    RETRY_AFTER = 1.0  # after a failure, fail fast this long before trying the database again
    PROBE_HEALTHY = 2.0
    PROBE_DOWN = 0.5

    def __init__(self, log_: MessageLog, after_commit: Callable[[list[Job]], None],
                 on_error: Callable[[], None] = lambda: None) -> None:
        self._log = log_
        self._after_commit = after_commit
        self._on_error = on_error
        self._queue: deque[Job] = deque()
        # One event per batch, not per job: set when the batch that takes the jobs queued
        # now has committed, or when the writer goes idle. A waiter woken with its job
        # unfinished (left for a later batch, MAX_BATCH) waits on the next one.
        self._gathering = gevent.event.Event()
        self._wake = gevent.event.Event()
        self._stop = gevent.event.Event()
        self._closing = False
        self._failed_at = float("-inf")
        self.ready = False  # migrated and answering
        self.last_error = "not connected yet"
        self._greenlet: gevent.Greenlet | None = None
        self._prober: gevent.Greenlet | None = None
        self._watchdog: gevent.Greenlet | None = None
        self._in_flight: tuple[list[Job], gevent.event.Event] | None = None

    def start(self) -> None:
        """Connect and migrate now if the database answers; serve either way."""
        self._check()
        self._greenlet = gevent.spawn(self._run)
        self._prober = gevent.spawn(self._probe_forever)
        self._watchdog = gevent.spawn(self._expire_forever)

    @property
    def healthy(self) -> bool:
        return self.ready and not self._closing

    def submit(self, job: Job) -> Job:
        if self._closing:
            raise DatabaseUnavailable("shutting down")
        job.submitted = time.monotonic()
        if not self.ready or job.submitted - self._failed_at < self.RETRY_AFTER:
            raise DatabaseUnavailable(f"database unavailable ({self.last_error})")
        self._queue.append(job)
        self._wake.set()
        while not job.finished:  # the watchdog finishes it if nothing else does
            self._gathering.wait()
        if job.error is not None:
            raise job.error
        return job

    def _run(self) -> None:
        while True:
            if not self._queue:
                # Nothing in flight: whoever is waiting on the next batch has its outcome.
                idle, self._gathering = self._gathering, gevent.event.Event()
                idle.set()
                if self._closing:
                    return
                self._wake.clear()
                self._wake.wait()
                continue
            batch: list[Job] = []
            while self._queue and len(batch) < self.MAX_BATCH:
                job = self._queue.popleft()
                if not job.cancelled:
                    batch.append(job)
            finished, self._gathering = self._gathering, gevent.event.Event()
            if batch:
                self._in_flight = batch, finished
                self._commit(batch)
                self._in_flight = None
            finished.set()

    def _commit(self, batch: list[Job]) -> None:
        try:
            self._log.write(batch)
        except Exception as exc:
            self._failed(exc)
            error = exc if isinstance(exc, DatabaseUnavailable) else DatabaseUnavailable(
                f"database write failed ({exc.__class__.__name__})")
            for job in batch:
                job.error = error
        else:
            try:
                self._after_commit(batch)
            except Exception:
                log.exception("publishing committed messages failed")
                for job in batch:
                    job.error = job.error or Unavailable("stored, but delivery failed")
        for job in batch:
            job.finished = True

    def _expire_forever(self) -> None:
        while not self._stop.wait(self.WATCH_EVERY):
            self._expire(time.monotonic() - self.SUBMIT_TIMEOUT)

    def _expire(self, submitted_before: float) -> None:
        """Fail the jobs submitted before ``submitted_before``: queued ones are dropped (never
        written); a batch still in the database may yet commit, like any timed-out request."""
        expired: list[Job] = []
        while self._queue and self._queue[0].submitted < submitted_before:
            expired.append(self._queue.popleft())
        in_flight = self._in_flight
        if in_flight is not None and in_flight[0][0].submitted < submitted_before:
            expired += in_flight[0]
        if not expired:
            return
        for job in expired:
            if not job.finished:
                job.cancelled, job.finished = True, True
                job.error = DatabaseUnavailable("database write timed out")
        if in_flight is not None and in_flight[0][0].finished:
            in_flight[1].set()
        # Queued jobs' senders wait on the batch being gathered: wake them (the others wait
        # again on a fresh event).
        waiting, self._gathering = self._gathering, gevent.event.Event()
        waiting.set()

    def _failed(self, exc: BaseException) -> None:
        self._on_error()
        self._failed_at = time.monotonic()
        message = _first_line(exc)
        if self.ready or message != self.last_error:
            if isinstance(exc, DatabaseUnavailable):
                log.warning("database %s unavailable: %s", self._log.url_for_logs, message)
            else:
                log.error("database write failed", exc_info=exc)
        self.last_error = message
        self.ready = False

    def _check(self) -> None:
        was_ready = self.ready
        try:
            version = SCHEMA_VERSION if was_ready else self._log.migrate()
            self._log.ping()
        except Exception as exc:
            self._failed(exc)
            return
        if not was_ready:
            log.info("database %s ready (schema version %d)", self._log.url_for_logs, version)
        self.ready = True
        self.last_error = ""
        self._failed_at = float("-inf")

    def _probe_forever(self) -> None:
        while not self._stop.wait(self.PROBE_HEALTHY if self.ready else self.PROBE_DOWN):
            self._check()

    def close(self, timeout: float = 5.0) -> None:
        """Refuse new writes, commit what is queued (bounded by ``timeout``), stop."""
        self._closing = True
        self._wake.set()
        self._stop.set()
        if self._prober is not None:
            # Not killed: a kill inside a database call would leave its connection mid-statement.
            self._prober.join(timeout)
        if self._greenlet is not None:
            self._greenlet.join(timeout)
            if not self._greenlet.dead:
                log.warning("database writer did not finish within %.1fs", timeout)
                self._greenlet.kill(block=False)
        if self._watchdog is not None:
            self._watchdog.join(timeout)
        self._expire(float("inf"))  # whatever is still waiting gets its answer
