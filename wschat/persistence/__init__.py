"""The durable message log: SQLite (embedded default) or PostgreSQL, one interface.

This package owns the database (docs/persistence.md):

* :mod:`.jobs`: what callers hand the writer (keyword-only dataclasses) and the
  log fills in.
* :mod:`.schema`: the migrations and the SQL both dialects share.
* :mod:`.base`: :class:`MessageLog`, the interface, and :class:`DirectLog`, the
  write path both databases share: a room message gets its id **inside the
  transaction that stores it** (the room's ``sequences`` row is incremented, an
  upsert that locks the row until commit, and the message inserted in the same
  transaction). An aborted transaction gives its ids back, so committed ids
  have no gaps, and two workers or pods writing to one room are serialised by
  the row lock, so they can never pick the same id.
* :mod:`.sqlite`: SQLite in WAL mode with ``synchronous=FULL``; a worker's
  writes run in a writer process of its own (``python -m wschat.sqlite_log``)
  and its reads on a thread, never on the gevent hub.
* :mod:`.postgres`: PostgreSQL through psycopg 3 (default
  ``synchronous_commit=on``), imported only when a PostgreSQL URL is used.
* :mod:`.group_commit`: :class:`GroupCommitWriter`, one greenlet per worker
  that commits whatever queued while the previous commit ran; the caller learns
  its id only after COMMIT returned. A committed message survives a crash of
  the process and of the machine.

:func:`open_message_log` picks the backend from ``DATABASE_URL``.
"""

from __future__ import annotations

from .base import BatchRefused, DatabaseBusy, DatabaseUnavailable, DirectLog, MessageLog
from .group_commit import GroupCommitWriter
from .jobs import Arrival, DmPost, DmsDelivered, Job, Post, RoomPost, SequenceFloor, now_ms
from .postgres import PostgresLog
from .schema import DM_PAGE, MIGRATIONS, SCHEMA_VERSION, SchemaTooNew
from .sqlite import SQLiteFile, SQLiteLog

__all__ = [
    "DM_PAGE", "MIGRATIONS", "SCHEMA_VERSION", "Arrival", "BatchRefused", "DatabaseBusy",
    "DatabaseUnavailable",
    "DirectLog", "DmPost", "DmsDelivered", "GroupCommitWriter", "Job", "MessageLog", "Post",
    "PostgresLog", "RoomPost", "SQLiteFile", "SQLiteLog", "SchemaTooNew", "SequenceFloor",
    "now_ms", "open_message_log",
]


def open_message_log(url: str) -> MessageLog:
    """The log for ``DATABASE_URL`` (its default is :data:`wschat.config.DEFAULT_DATABASE_URL`)."""
    if url.startswith("sqlite:"):
        # sqlite:///wschat.db is relative to the working directory, sqlite:////var/x.db absolute.
        if not url.startswith("sqlite:///") or not url[len("sqlite:///"):]:
            raise ValueError("DATABASE_URL: expected sqlite:///PATH (PATH relative to the "
                             "working directory, or sqlite:////absolute/path)")
        return SQLiteLog(url[len("sqlite:///"):])
    if url.startswith(("postgres://", "postgresql://")):
        return PostgresLog(url)
    raise ValueError("DATABASE_URL: expected sqlite:///PATH or postgresql://...")

