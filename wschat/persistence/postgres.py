"""PostgreSQL through psycopg 3, cooperative under gevent.

psycopg is imported only when a PostgreSQL URL is used, after gevent patched
the worker, and then waits on its sockets cooperatively (``wschat.db_wait``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import gevent.lock
import gevent.queue

from ..db_wait import psycopg_connection_class
from .base import (
    DatabaseUnavailable, DirectLog, copy_originals, first_line, group_by_room, json_rows,
    number_rooms, room_key, split_retries, to_json,
)
from .jobs import Job, RoomPost
from .schema import PostgresDialect

PG_CONNECT_TIMEOUT_S = 3
PG_STATEMENT_TIMEOUT_MS = 5000
# A server that sends nothing for this long is not answering (frozen, cut off): the
# wait gives up and the connection is closed. The server's statement_timeout ends
# every statement before this, so a live server is never cut off.
PG_ANSWER_TIMEOUT_S = PG_STATEMENT_TIMEOUT_MS / 1000 + 3
PG_READ_POOL = 4

# A batch is a fixed handful of statements whatever its size, its rows passed as one
# JSON parameter (see base.json_rows): every statement costs a wait on the socket, and
# psycopg adapts a JSON string in C where it adapts arrays element by element in Python.
# (Measured: docs/persistence.md, "Cost: measured".)
#
# Every room of a batch in one statement. Sequence rows are locked in room order, so
# two writers cannot deadlock. A conflicting row finds its count by a key lookup in the
# jsonb object (a scan of the batch there is quadratic in the batch's rooms).
ROOM_SEQS_SQL = (
    "WITH batch (room, n) AS (SELECT key, value::bigint FROM jsonb_each_text(%(counts)s::jsonb))"
    " INSERT INTO sequences AS s (scope, last_id)"
    " SELECT 'room:' || room,"
    " COALESCE((SELECT MAX(id) FROM messages m WHERE m.room = batch.room), 0) + n"
    " FROM batch ORDER BY room"
    " ON CONFLICT (scope) DO UPDATE"
    " SET last_id = s.last_id + (%(counts)s::jsonb ->> substr(excluded.scope, 6))::bigint"
    " RETURNING s.scope, s.last_id")
# Rows are read with jsonb_array_elements: json_array_elements hands out json values that
# every ->> parses again (six times a row); jsonb is parsed once.
INSERT_MESSAGES_SQL = (
    "INSERT INTO messages (room, id, user_id, client_msg_id, created_ms, event)"
    " SELECT r ->> 0, (r ->> 1)::bigint, r ->> 2, r ->> 3, (r ->> 4)::bigint,"
    " convert_to(r ->> 5, 'UTF8') FROM jsonb_array_elements(%s::jsonb) AS r")
INSERT_DMS_SQL = (
    "INSERT INTO dms (id, sender_id, recipient_id, client_msg_id, created_ms, delivered, event)"
    " SELECT (r ->> 0)::bigint, r ->> 1, r ->> 2, r ->> 3, (r ->> 4)::bigint,"
    " (r ->> 5)::boolean, convert_to(r ->> 6, 'UTF8') FROM jsonb_array_elements(%s::jsonb) AS r")
# A batch of room messages only (the usual batch): one statement, so one round trip and
# an implicit transaction instead of four (BEGIN, ids, rows, COMMIT); at moderate rates
# a batch holds only a few messages, so round trips are most of its cost. The ids are numbered in SQL exactly as number()
# numbers them (the k-th message of a room in batch order gets last - n + k) and
# the event is spliced the same way (prefix, id, suffix). If a client_msg_id of the
# batch is stored already (a retry), the statement takes no id and writes nothing,
# and returns no rows: the caller then runs the batch through DirectLog._apply.
POST_ROOMS_SQL = (
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


class PostgresLog(DirectLog):
    """PostgreSQL through psycopg 3: one connection for the writer greenlet, a few for reads.

    Connections are made lazily and dropped on any connection error, so the log
    recovers by itself when the server comes back.
    """

    dialect = PostgresDialect()

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
        self.url_for_logs = without_password(url)
        self._writer: Any = None
        self._writer_lock = gevent.lock.Semaphore()
        self._readers: gevent.queue.LifoQueue[Any] = gevent.queue.LifoQueue()
        self._reader_slots = gevent.lock.BoundedSemaphore(PG_READ_POOL)

    def _connect(self) -> Any:
        try:
            conn = self._connection_class.connect(
                self.url, autocommit=True, connect_timeout=PG_CONNECT_TIMEOUT_S,
                application_name="wschat",
                options=f"-c statement_timeout={PG_STATEMENT_TIMEOUT_MS}")
        except self._psycopg.Error as exc:
            raise DatabaseUnavailable(f"postgresql: {first_line(exc)}") from exc
        conn.answer_timeout = PG_ANSWER_TIMEOUT_S
        return conn

    def _run(self, conn: Any, fn: Callable[..., Any], args: tuple[Any, ...]) -> Any:
        try:
            return fn(conn, *args)
        except self._psycopg.Error as exc:
            raise DatabaseUnavailable(f"postgresql: {first_line(exc)}") from exc

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
            try:
                return self._read_on(self._readers.get() if pooled else self._connect(), fn,
                                     args)
            except DatabaseUnavailable:
                if not pooled:
                    raise
            # A pooled connection may predate a server restart: one fresh try.
            self._drain_readers()
            return self._read_on(self._connect(), fn, args)

    def _read_on(self, conn: Any, fn: Callable[..., Any], args: tuple[Any, ...]) -> Any:
        """One read; the connection goes back to the pool if it is still usable and is
        closed otherwise, also when the read failed or its greenlet was killed."""
        try:
            result = self._run(conn, fn, args)
        except BaseException:
            self._close_quietly(conn)
            raise
        if self._usable(conn):
            self._readers.put(conn)
        else:
            self._close_quietly(conn)
        return result

    def _drain_readers(self) -> None:
        while not self._readers.empty():
            self._close_quietly(self._readers.get())

    def _transaction(self, conn: Any, fn: Callable[..., Any], *args: Any) -> Any:
        with conn.transaction():
            return fn(conn, *args)

    def _migration_lock(self, conn: Any) -> None:
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (0x77736368,))  # "wsch"

    def _write_batch(self, jobs: list[Job]) -> None:
        if all(isinstance(job, RoomPost) for job in jobs):
            try:
                if self._write_call(self._post_rooms, jobs):
                    return
            except DatabaseUnavailable as exc:
                if not self._is_conflict(exc.__cause__ or exc):
                    raise
            # a retry of a stored client_msg_id, or one racing another writer's insert
        super()._write_batch(jobs)

    def _post_rooms(self, conn: Any, posts: list[RoomPost]) -> bool:
        """Store a batch of room messages in one statement (see POST_ROOMS_SQL); False
        if nothing was written because a client_msg_id in it is stored already."""
        fresh, retries = split_retries(posts, {}, room_key)
        rows = [(p.room, p.user_id, p.client_msg_id, p.created_ms, *p.draft_parts())
                for p in fresh]
        by_room = group_by_room(fresh)
        counts = {room: len(room_posts) for room, room_posts in by_room.items()}
        taken = {room: int(last) for room, last in conn.execute(
            POST_ROOMS_SQL, {"rows": to_json(rows), "counts": to_json(counts)}).fetchall()}
        if len(taken) != len(counts):
            return False
        number_rooms(by_room, taken)
        copy_originals(retries)
        return True

    def _take_room_ids(self, conn: Any, counts: dict[str, int]) -> dict[str, int]:
        return {scope[len("room:"):]: int(last)
                for scope, last in conn.execute(ROOM_SEQS_SQL, {"counts": to_json(counts)})}

    def _insert_messages(self, conn: Any, rows: list[tuple[Any, ...]]) -> None:
        conn.execute(INSERT_MESSAGES_SQL, (json_rows(rows),))

    def _insert_dms(self, conn: Any, rows: list[tuple[Any, ...]]) -> None:
        conn.execute(INSERT_DMS_SQL, (json_rows(rows),))

    def _is_conflict(self, exc: BaseException) -> bool:
        return isinstance(exc, self._psycopg.errors.UniqueViolation)

    def _is_refusal(self, exc: BaseException) -> bool:
        # SQLSTATE class 22 (a NUL in text, an escape jsonb cannot hold, ...) and
        # constraint violations other than the client_msg_id race, retried above
        psycopg = self._psycopg
        return isinstance(exc, psycopg.DataError) or (
            isinstance(exc, psycopg.IntegrityError) and not self._is_conflict(exc))

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


def without_password(url: str) -> str:
    scheme, sep, rest = url.partition("://")
    userinfo, at, host = rest.rpartition("@")
    if not at or ":" not in userinfo:
        return url
    return f"{scheme}{sep}{userinfo.split(':', 1)[0]}:***@{host}"
