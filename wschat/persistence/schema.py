"""The schema, its migrations, and the SQL both dialects share.

Schema changes are ordered steps in :data:`MIGRATIONS`; the server applies the
missing ones at start (under a lock, so workers and pods starting together are
safe) and records each in ``schema_version``. A database newer than the server
is refused (:class:`SchemaTooNew`).
"""

from __future__ import annotations

from ..errors import WschatError
from ..protocol import GUEST_ID_PREFIX

DM_SCOPE = "dm"
DM_PAGE = 50  # kept DMs are read, sent and marked delivered this many at a time


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


class SchemaTooNew(WschatError, RuntimeError):
    """The database was migrated by a newer server; this one must not write to it."""


class Dialect:
    """What differs between the two dialects in the shared SQL."""

    name = ""
    blob = ""
    without_rowid = ""
    greatest = ""
    # One JSON parameter as a table of rows ``k``, each a JSON array read with ``k.value ->> i``
    json_rows = ""

    def q(self, sql: str) -> str:
        return sql


class SQLiteDialect(Dialect):
    name = "sqlite"
    blob = "BLOB"
    without_rowid = " WITHOUT ROWID"
    greatest = "max"
    json_rows = "json_each(?) AS k"


class PostgresDialect(Dialect):
    name = "postgresql"
    blob = "BYTEA"
    greatest = "GREATEST"
    json_rows = "jsonb_array_elements(?::jsonb) AS k (value)"

    def q(self, sql: str) -> str:
        return sql.replace("?", "%s")


VERSION_TABLE_SQL = (
    "CREATE TABLE IF NOT EXISTS schema_version (version INTEGER PRIMARY KEY,"
    " description TEXT NOT NULL, applied_ms BIGINT NOT NULL)")
# Outside MIGRATIONS on purpose, as schema_version: a server of the release before neither
# needs nor refuses it, so a rolling update or a rollback across it needs no step.
META_TABLE_SQL = "CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value TEXT NOT NULL)"
# The database's epoch (every room's: its ids never start again while it lives), made once.
EPOCH_INSERT_SQL = ("INSERT INTO meta (name, value) VALUES ('epoch', ?)"
                    " ON CONFLICT (name) DO NOTHING")
EPOCH_SQL = "SELECT value FROM meta WHERE name = 'epoch'"
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
KEPT_DMS_SQL = (
    "SELECT event FROM dms WHERE recipient_id = ? AND NOT delivered AND id > ?"
    " ORDER BY id LIMIT ?")
COUNT_KEPT_SQL = "SELECT COUNT(*) FROM dms WHERE recipient_id = ? AND NOT delivered"
# Those of one sender, and of every guest (is_guest_id's prefix; substr, not LIKE:
# SQLite's is case-insensitive, and a token's sub may begin with "Guest-").
COUNT_KEPT_FROM_SQL = COUNT_KEPT_SQL + " AND sender_id = ?"
COUNT_KEPT_FROM_GUESTS_SQL = (COUNT_KEPT_SQL + f" AND substr(sender_id, 1, {len(GUEST_ID_PREFIX)})"
                              f" = '{GUEST_ID_PREFIX}'")
# DM_SEQ_SQL with n = 0: locks the DM sequence's row until COMMIT and changes nothing, so
# that the kept DMs counted next are final (another writer keeping one for the same
# recipient waits for this transaction, and counts after it).
LOCK_DM_SEQ_PARAMS = (DM_SCOPE, 0, 0)
MARK_DELIVERED_SQL = (
    "UPDATE dms SET delivered = TRUE WHERE recipient_id = ? AND NOT delivered AND id <= ?")
# A retry of a stored DM while its recipient is offline: its first publish may never
# have happened (see DurableMessageStore._deliver_again), so it is kept for them again.
KEEP_AGAIN_SQL = (
    "UPDATE dms SET delivered = FALSE"
    " WHERE sender_id = ? AND client_msg_id = ? AND recipient_id = ? AND delivered")
LAST_ID_SQL = (
    "SELECT COALESCE((SELECT last_id FROM sequences WHERE scope = ?),"
    " (SELECT MAX(id) FROM messages WHERE room = ?), 0)")
BEFORE_SQL = "SELECT event FROM messages WHERE room = ? AND id < ? ORDER BY id DESC LIMIT ?"
NEWEST_SQL = "SELECT event FROM messages WHERE room = ? ORDER BY id DESC LIMIT ?"
AFTER_SQL = "SELECT event FROM messages WHERE room = ? AND id > ? ORDER BY id LIMIT ?"
# AFTER_SQL up to a number of bytes: the rows whose predecessors (in the page) come to
# at most the bound, so at most the bound and one message leave the database, and a
# caller sees that rows were left out when those it got come to more (the first one
# left out starts past the bound). length() counts a blob's (a bytea's) bytes in both
# dialects, and reads only its size (SQLite from the record header, PostgreSQL from the
# TOAST pointer): the page's running total is counted over sizes alone, and only the
# events that are kept are read (counted over the events themselves, SQLite copied the
# whole page, 64 MB at the frame limit, into a temporary table: ~4x the time).
# Parameters: room, after_id, limit, room, max_bytes.
AFTER_BYTES_SQL = (
    "SELECT m.event FROM messages AS m JOIN (SELECT id, SUM(size) OVER (ORDER BY id) - size"
    " AS ahead FROM (SELECT id, length(event) AS size FROM messages WHERE room = ? AND id > ?"
    " ORDER BY id LIMIT ?) AS page) AS counted ON m.id = counted.id"
    " WHERE m.room = ? AND counted.ahead <= ? ORDER BY m.id")
KNOWS_USER_SQL = "SELECT 1 FROM users WHERE user_id = ?"
# The stored posts of a batch's keys (one JSON parameter: [[room, user_id, client_msg_id],
# ...], or [[sender_id, client_msg_id], ...]), each looked up by its whole key in the
# unique index. Not by client_msg_id alone: it is unique per sender (and room) only, and
# every message anyone ever stored under it was read, in the transaction every writer
# waits on (a hostile client could make that tens of thousands of events per post).
DEDUPE_ROOM_SQL = (
    "SELECT m.room, m.user_id, m.client_msg_id, m.event FROM {keys} CROSS JOIN messages AS m"
    " WHERE m.client_msg_id = k.value ->> 2 AND m.room = k.value ->> 0"
    " AND m.user_id = k.value ->> 1")
DEDUPE_DM_SQL = (
    "SELECT d.sender_id, d.client_msg_id, d.event FROM {keys} CROSS JOIN dms AS d"
    " WHERE d.client_msg_id = k.value ->> 1 AND d.sender_id = k.value ->> 0")
# A batch is a fixed handful of statements whatever its size, its rows passed as one
# JSON parameter (see base.json_rows); the dialect modules hold those statements.
