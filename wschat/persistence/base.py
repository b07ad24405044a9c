"""The log's interface and the write path both databases share.

:class:`MessageLog` is what the durable store and the group-commit writer use.
:class:`DirectLog` is a log that runs its statements in this process
(:class:`~wschat.persistence.sqlite.SQLiteFile`,
:class:`~wschat.persistence.postgres.PostgresLog`): it numbers, dedupes and
inserts a batch of jobs in one transaction, with the SQL of
:mod:`wschat.persistence.schema` and a few statements per dialect.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any, TypeVar

import orjson

from ..protocol import GUEST_ID_PREFIX, stored_id_of
from ..stores.base import Unavailable, new_epoch
from .jobs import Arrival, DmPost, DmsDelivered, Job, Post, RoomPost, SequenceFloor, now_ms
from .schema import (
    AFTER_BYTES_SQL, AFTER_SQL, BEFORE_SQL, COUNT_KEPT_FROM_GUESTS_SQL, COUNT_KEPT_FROM_SQL,
    COUNT_KEPT_SQL, DEDUPE_DM_SQL, DEDUPE_ROOM_SQL,
    DM_PAGE, DM_SCOPE, DM_SEQ_SQL, EPOCH_INSERT_SQL, EPOCH_SQL, FLOOR_SQL, KEEP_AGAIN_SQL,
    KEPT_DMS_SQL, KNOWS_USER_SQL, LAST_ID_SQL, LOCK_DM_SEQ_PARAMS, MARK_DELIVERED_SQL,
    META_TABLE_SQL, MIGRATIONS, NEWEST_SQL, SCHEMA_VERSION, UPSERT_USER_SQL, VERSION_TABLE_SQL,
    Dialect, SchemaTooNew, room_scope,
)

log = logging.getLogger("wschat.persistence")

P = TypeVar("P", bound=Post)


class DatabaseUnavailable(Unavailable):
    """The database cannot be reached or refused the write; nothing was acknowledged."""


class DatabaseBusy(DatabaseUnavailable):
    """SQLite's write lock was held by another connection for longer than its busy
    wait: the file is there and usable, another process is writing (or holds a
    transaction open). Unavailable for now, like any outage, but never a reason to
    refuse to start (:meth:`~wschat.stores.durable.DurableMessageStore.start`)."""


class BatchRefused(Exception):
    """The database refused a value in a batch (one no statement parameter can carry, or
    one the database cannot hold): the transaction rolled back and nothing of the batch
    was written, and the database itself is fine. The group-commit writer then writes the
    batch again in halves (:meth:`GroupCommitWriter._write`), so that only the jobs it
    refuses alone fail. Not :class:`~wschat.stores.base.Unavailable`: a retry would be
    refused again, and a value the protocol let through that the database cannot hold is
    a bug, answered as an internal error."""


class MessageLog(ABC):
    """The durable log: writes (:meth:`migrate`, :meth:`ping`, :meth:`write`), which
    every log implements, and reads, which are shared SQL: a log that serves reads
    supplies :meth:`_read_call`, where a read statement runs, and its :attr:`dialect`
    (the group-commit writer needs only the writes)."""

    dialect: Dialect
    url_for_logs = ""

    def _read_call(self, fn: Callable[..., Any], *args: Any) -> Any:
        """``fn(connection, *args)`` on a connection for reads."""
        raise NotImplementedError(f"{type(self).__name__} serves no reads")

    @abstractmethod
    def migrate(self) -> int:
        """Apply the missing schema steps; return the schema version now in force."""

    @abstractmethod
    def ping(self) -> None:
        """Raise :class:`DatabaseUnavailable` unless a write could start now."""

    @abstractmethod
    def write(self, jobs: list[Job]) -> None:
        """Run ``jobs`` in one transaction, filling in their outcomes."""

    @abstractmethod
    def close(self) -> None: ...

    # -- reads -----------------------------------------------------------------------
    def last_id(self, room: str) -> int:
        return int(self._read_call(self._scalar, LAST_ID_SQL, (room_scope(room), room)) or 0)

    def before(self, room: str, before_id: int | None, limit: int) -> list[bytes]:
        """Up to ``limit`` messages with ids < ``before_id`` (None: the newest), oldest first."""
        if before_id is None:
            rows = self._read_call(self._rows, NEWEST_SQL, (room, limit))
        else:
            rows = self._read_call(self._rows, BEFORE_SQL, (room, before_id, limit))
        return [bytes(r[0]) for r in reversed(rows)]

    def after(self, room: str, after_id: int, limit: int, max_bytes: int | None = None
              ) -> list[bytes]:
        """Up to ``limit`` messages with ids > ``after_id``, oldest first; with
        ``max_bytes``, only those whose predecessors come to at most ``max_bytes``: if
        they come to more than ``max_bytes`` in all, some may have been left out (one
        message past the bound at most was read); if not, none was."""
        if max_bytes is None:
            rows = self._read_call(self._rows, AFTER_SQL, (room, after_id, limit))
        else:
            rows = self._read_call(self._rows, AFTER_BYTES_SQL,
                                   (room, after_id, limit, room, max_bytes))
        return [bytes(r[0]) for r in rows]

    def epoch(self) -> str | None:
        """The name of the log's numbering (every room's), made by :meth:`migrate`."""
        value = self._read_call(self._scalar, EPOCH_SQL, ())
        return None if value is None else str(value)

    def knows_user(self, user_id: str) -> bool:
        return bool(self._read_call(self._rows, KNOWS_USER_SQL, (user_id,)))

    def kept_dms(self, user_id: str, after_id: int, limit: int = DM_PAGE) -> list[bytes]:
        """DMs kept for ``user_id`` with ids > ``after_id`` (not yet delivered), oldest first."""
        return [bytes(r[0]) for r in self._read_call(self._rows, KEPT_DMS_SQL,
                                                     (user_id, after_id, limit))]

    def kept_count(self, user_id: str) -> int:
        return int(self._read_call(self._scalar, COUNT_KEPT_SQL, (user_id,)) or 0)

    def _scalar(self, conn: Any, sql: str, params: tuple[Any, ...]) -> Any:
        row = conn.execute(self.dialect.q(sql), params).fetchone()
        return row[0] if row else None

    def _rows(self, conn: Any, sql: str, params: tuple[Any, ...]) -> list[Any]:
        return list(conn.execute(self.dialect.q(sql), params).fetchall())


class DirectLog(MessageLog):
    """A log that runs its writes itself. Backends supply where statements run
    (:meth:`_write_call`), how a transaction is opened, and the batch statements of
    their dialect; the rest of the write path is here."""

    # -- supplied by the backends ----------------------------------------------------
    @abstractmethod
    def _write_call(self, fn: Callable[..., Any], *args: Any) -> Any: ...

    @abstractmethod
    def _transaction(self, conn: Any, fn: Callable[..., Any], *args: Any) -> Any: ...

    @abstractmethod
    def _take_room_ids(self, conn: Any, counts: dict[str, int]) -> dict[str, int]:
        """Take ``n`` ids in each room's sequence (locking its row until COMMIT); return
        each room's last id now taken."""

    @abstractmethod
    def _insert_messages(self, conn: Any, rows: list[tuple[Any, ...]]) -> None: ...

    @abstractmethod
    def _insert_dms(self, conn: Any, rows: list[tuple[Any, ...]]) -> None: ...

    @abstractmethod
    def _is_conflict(self, exc: BaseException) -> bool: ...

    @abstractmethod
    def _is_refusal(self, exc: BaseException) -> bool:
        """Did the database refuse a value of the statement (rolled back, still up)?"""

    def _migration_lock(self, conn: Any) -> None:
        """Held until the migration transaction ends (SQLite: BEGIN IMMEDIATE is enough)."""

    # -- the write operations ----------------------------------------------------------
    def migrate(self) -> int:
        return int(self._write_call(self._migrate))

    def ping(self) -> None:
        self._write_call(self._ping)

    def write(self, jobs: list[Job]) -> None:
        """Sequence floors first, each committed alone, then the rest in one transaction.

        A floor locks its room's sequence row. Inside the batch's transaction it would
        hold that row while the posts wait for other rows, which another writer may hold
        while waiting for this one: a deadlock PostgreSQL breaks by failing a batch.
        A floor committed alone holds one row and waits for none. It is only ever a lower
        bound, so one kept after a failed batch does no harm."""
        for job in jobs:
            if isinstance(job, SequenceFloor):
                self._write_call(self._transaction, self._raise_floor, job)
        rest = [job for job in jobs if not isinstance(job, SequenceFloor)]
        if not rest:
            return
        try:
            self._write_batch(rest)
        except DatabaseUnavailable as exc:
            if exc.__cause__ is None or not self._is_refusal(exc.__cause__):
                raise
            raise BatchRefused(str(exc)) from exc
        except (TypeError, ValueError) as exc:
            # A value no statement parameter can carry (orjson's or the driver's
            # encoder refused it): raised inside the transaction, which rolled back.
            raise BatchRefused(f"a value in the batch cannot be stored: {exc}") from exc

    def _write_batch(self, jobs: list[Job]) -> None:
        """A ``client_msg_id`` racing with another worker's insert of the same one
        fails the transaction on the unique index; the retry then finds it."""
        try:
            self._write_call(self._transaction, self._apply, jobs)
        except DatabaseUnavailable as exc:
            if not self._is_conflict(exc.__cause__ or exc):
                raise
            log.info("client_msg_id raced with another writer; retrying the batch")
            self._write_call(self._transaction, self._apply, jobs)

    # -- bodies (run where the backend runs statements) ------------------------------
    def _ping(self, conn: Any) -> None:
        self._transaction(conn, lambda c: c.execute("SELECT 1").fetchone())

    def _migrate(self, conn: Any) -> int:
        return int(self._transaction(conn, self._migrate_in_transaction))

    def _migrate_in_transaction(self, conn: Any) -> int:
        self._migration_lock(conn)
        conn.execute(VERSION_TABLE_SQL)
        conn.execute(META_TABLE_SQL)
        conn.execute(self.dialect.q(EPOCH_INSERT_SQL), (new_epoch(),))
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
                             " VALUES (?, ?, ?)"), (version, description, now_ms()))
            log.info("database schema migrated to version %d (%s)", version, description)
            current = version
        return int(current)

    def _raise_floor(self, conn: Any, floor: SequenceFloor) -> None:
        d = self.dialect
        scope = DM_SCOPE if floor.room is None else room_scope(floor.room)
        conn.execute(d.q(FLOOR_SQL.format(greatest=d.greatest)), (scope, floor.at_least))

    def _apply(self, conn: Any, jobs: list[Job]) -> None:
        d = self.dialect
        rooms = [j for j in jobs if isinstance(j, RoomPost)]
        dms = [j for j in jobs if isinstance(j, DmPost)]
        new_rooms, room_retries = self._dedupe(conn, rooms, DEDUPE_ROOM_SQL, room_key)
        new_dms, dm_retries = self._dedupe(conn, dms, DEDUPE_DM_SQL, dm_key)

        by_room = group_by_room(new_rooms)
        if by_room:
            taken = self._take_room_ids(conn, {room: len(posts) for room, posts in by_room.items()})
            self._insert_messages(conn, [(p.room, p.msg_id, p.user_id, p.client_msg_id,
                                          p.created_ms, p.event)
                                         for p in number_rooms(by_room, taken)])
        # After the rooms' rows: every writer locks the rooms' sequence rows, then the DMs'.
        new_dms = self._within_inbox_bound(conn, new_dms, dm_retries)
        if new_dms:
            last = conn.execute(d.q(DM_SEQ_SQL), (DM_SCOPE, len(new_dms), len(new_dms))
                                ).fetchone()[0]
            self._insert_dms(conn, [(p.msg_id, p.sender_id, p.recipient_id, p.client_msg_id,
                                     p.created_ms, p.delivered, p.event)
                                    for p in number(new_dms, int(last))])
        copy_originals(room_retries + dm_retries)
        if any(isinstance(j, (Arrival, DmsDelivered)) for j in jobs) or any(
                p.duplicate and not p.delivered for p in dms):
            # Users' and kept DMs' rows are locked below in job order, which two writers
            # may have in opposite orders (PostgreSQL: deadlock detected, a failed batch).
            # Under the DM sequence's row, taken after the rooms' as every writer takes
            # it, no two transactions lock them at once.
            conn.execute(d.q(DM_SEQ_SQL), LOCK_DM_SEQ_PARAMS).fetchone()
        for post in dms:
            if post.duplicate and not post.delivered:
                conn.execute(d.q(KEEP_AGAIN_SQL),
                             (post.sender_id, post.client_msg_id, post.recipient_id))
        for job in jobs:
            if isinstance(job, Arrival):
                conn.execute(d.q(UPSERT_USER_SQL),
                             (job.user_id, job.username, job.seen_ms, job.seen_ms))
                job.backlog = [bytes(r[0]) for r in conn.execute(
                    d.q(KEPT_DMS_SQL), (job.user_id, 0, DM_PAGE)).fetchall()]
                job.kept = int(conn.execute(d.q(COUNT_KEPT_SQL), (job.user_id,)).fetchone()[0])
            elif isinstance(job, DmsDelivered):
                conn.execute(d.q(MARK_DELIVERED_SQL), (job.user_id, job.up_to))

    def _within_inbox_bound(self, conn: Any, posts: list[DmPost],
                            retries: list[tuple[DmPost, DmPost]]) -> list[DmPost]:
        """The new DMs to store: a DM to keep whose recipient has ``keep_at_most`` kept
        already (counting those kept before it in this batch) is left out with
        ``inbox_full`` set, and so is a retry of it in this batch. Counted under the
        DM sequence's row lock, so that writers keeping DMs for one recipient at once
        cannot each find room for theirs. Retries of stored DMs are never counted."""
        bounded = {p.recipient_id for p in posts
                   if not p.delivered and p.keep_at_most is not None}
        if not bounded:
            return posts
        d = self.dialect
        conn.execute(d.q(DM_SEQ_SQL), LOCK_DM_SEQ_PARAMS).fetchone()
        kept = {r: int(conn.execute(d.q(COUNT_KEPT_SQL), (r,)).fetchone()[0])
                for r in sorted(bounded)}
        shares = {(p.recipient_id, p.sender_share) for p in posts
                  if not p.delivered and p.keep_at_most is not None
                  and p.keep_from_sender_at_most is not None}
        kept_from = {share: self._kept_from(conn, *share) for share in sorted(shares)}
        stored: list[DmPost] = []
        for post in posts:
            if not post.delivered and post.keep_at_most is not None:
                share = (post.recipient_id, post.sender_share)
                if kept[post.recipient_id] >= post.keep_at_most or (
                        post.keep_from_sender_at_most is not None
                        and kept_from[share] >= post.keep_from_sender_at_most):
                    post.inbox_full = True
                    continue
                kept[post.recipient_id] += 1
                if share in kept_from:
                    kept_from[share] += 1
            stored.append(post)
        for retry, original in retries:
            retry.inbox_full = original.inbox_full
        return stored

    def _kept_from(self, conn: Any, recipient_id: str, share: str) -> int:
        """The DMs kept for ``recipient_id`` in ``share`` (DmPost.sender_share)."""
        if share == GUEST_ID_PREFIX:
            row = conn.execute(self.dialect.q(COUNT_KEPT_FROM_GUESTS_SQL), (recipient_id,))
        else:
            row = conn.execute(self.dialect.q(COUNT_KEPT_FROM_SQL), (recipient_id, share))
        return int(row.fetchone()[0])

    def _dedupe(self, conn: Any, posts: list[Any], sql: str, key: Callable[[Any], tuple[str, ...]]
                ) -> tuple[list[Any], list[tuple[Any, Any]]]:
        """Split posts into those to store and retries of a stored one or of an earlier post
        in this batch (returned as (retry, original) pairs; the original's id is copied once
        it has one). Retries of stored ones get the stored event now."""
        keys = sorted({key(p) for p in posts if p.client_msg_id})
        stored: dict[tuple[str, ...], bytes] = {}
        if keys:
            d = self.dialect
            for *row_key, event in conn.execute(d.q(sql.format(keys=d.json_rows)),
                                                (to_json(keys),)).fetchall():
                stored[tuple(row_key)] = bytes(event)
        return split_retries(posts, stored, key)


# -- numbering and dedupe, shared with PostgresLog's one-statement path ------------------

def split_retries(posts: list[Any], stored: dict[tuple[str, ...], bytes],
                  key: Callable[[Any], tuple[str, ...]]
                  ) -> tuple[list[Any], list[tuple[Any, Any]]]:
    """:meth:`DirectLog._dedupe` once the stored events of the batch's keys are known."""
    fresh: list[Any] = []
    retries: list[tuple[Any, Any]] = []
    first: dict[tuple[str, ...], Any] = {}
    for post in posts:
        if post.client_msg_id:
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


def group_by_room(posts: list[RoomPost]) -> dict[str, list[RoomPost]]:
    """Posts grouped by room, each room's in batch order."""
    by_room: dict[str, list[RoomPost]] = {}
    for post in posts:
        by_room.setdefault(post.room, []).append(post)
    return by_room


def number(posts: list[P], last: int) -> list[P]:
    """The one way ids are given: ``posts`` (one sequence, in batch order) took the ids
    up to ``last``, so the k-th of n gets last - n + k. (PG_POST_ROOMS_SQL numbers the
    same way in SQL.) Returns the posts."""
    for msg_id, post in enumerate(posts, start=last - len(posts) + 1):
        post.number(msg_id)
    return posts


def number_rooms(by_room: dict[str, list[RoomPost]], taken: dict[str, int]) -> list[RoomPost]:
    """:func:`number` for each room's posts with the last id ``taken[room]``."""
    return [post for room, posts in by_room.items() for post in number(posts, taken[room])]


def copy_originals(retries: list[tuple[Any, Any]]) -> None:
    """A retry within the batch answers with its original's id and event."""
    for retry, original in retries:
        retry.msg_id, retry.event, retry.duplicate = original.msg_id, original.event, True


def room_key(post: RoomPost) -> tuple[str, ...]:
    assert post.client_msg_id is not None
    return (post.room, post.user_id, post.client_msg_id)


def dm_key(post: DmPost) -> tuple[str, ...]:
    assert post.client_msg_id is not None
    return (post.sender_id, post.client_msg_id)


def to_json(value: Any) -> str:
    """A statement's JSON parameter, as text: SQLite >= 3.45 would take bytes for JSONB."""
    return orjson.dumps(value).decode()


def json_rows(rows: list[tuple[Any, ...]]) -> str:
    """Rows as one JSON array of arrays; the event (the last column: bytes of JSON)
    travels as a string and is turned back into the identical bytes by the SQL."""
    return to_json([(*row[:-1], row[-1].decode()) for row in rows])


def first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [exc.__class__.__name__])[0]
