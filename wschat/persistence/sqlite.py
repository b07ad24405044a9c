"""SQLite: the file, and how a gevent worker uses it (writes in a writer process,
reads on a thread).

:class:`SQLiteFile` is SQLite in WAL mode with ``synchronous=FULL``: plain
blocking calls on one connection. A gevent worker never calls it on the hub.
A thread of the worker would share the worker's GIL, and that is what SQLite
cost when its writes ran on one: the writing thread needs the GIL back after
every statement, the worker's main thread holds it while it serves sockets,
and at full load the two spent half the writer's time waiting for each other
(docs/persistence.md). So :class:`SQLiteLog`, the worker's log, starts one
writer process, ``python -m wschat.sqlite_log PATH`` (:func:`main`), which owns
the write connection with a GIL of its own. The worker sends it a batch of jobs
and waits on the pipe cooperatively; the reply carries the ids and events. One
request is in flight at a time (the worker's group-commit writer sends one
batch per transaction anyway).

The pipe carries length-prefixed pickles between two processes of this same
installation: a request ``(op, payload)`` with ``op`` one of ``write`` (a list
of :class:`~wschat.persistence.jobs.Job`), ``migrate``, ``ping``; a reply
``("ok", result)``, ``("schema", message)`` (:class:`SchemaTooNew`) or
``("busy", message)`` (:class:`DatabaseBusy`: the write lock stayed taken) or
``("error", message)`` (:class:`DatabaseUnavailable`).

Writers of one file take turns (:class:`WriterTurns`): each request is answered
holding a lock on ``PATH-writers``, beside the database, which the writer
processes of every worker (of every server) on the machine wait for in the
kernel, woken when it is released. SQLite's own write lock is no queue.

The writer process ends when its stdin closes: the worker closed it on
shutdown, or died (even by ``kill -9``). It ignores SIGINT and SIGTERM, so a
signal sent to the whole process group cannot cut off the worker's last
commits; a transaction it was running when the worker died commits or rolls
back as a whole, and was never acknowledged to anyone.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import pickle
import signal
import sqlite3
import struct
import subprocess
import sys
from collections.abc import Callable
from typing import IO, Any

import gevent
import gevent.lock
import gevent.subprocess
import gevent.threadpool
import orjson

from ..db_wait import READ, wait_first
from .base import (
    BatchRefused, DatabaseBusy, DatabaseUnavailable, DirectLog, MessageLog, json_rows, to_json,
)
from .jobs import Arrival, DmPost, Job, Post
from .schema import SchemaTooNew, SQLiteDialect, room_scope

log = logging.getLogger("wschat.persistence")

SQLITE_BUSY_TIMEOUT_MS = 1000
# The size the write-ahead log is cut back to once a checkpoint emptied it (PRAGMA
# journal_size_limit): SQLite reuses the file without shrinking it, so a burst while a
# long read held back the checkpoints (its WAL grows by every commit meanwhile) left the
# file at its largest for good. Twice what the automatic checkpoint lets it reach between
# checkpoints (1,000 pages, about 4 MB): steady writing never meets the limit.
SQLITE_WAL_SIZE_LIMIT = 8 * 1024 * 1024
SQLITE_MIN_VERSION = (3, 38, 0)
WRITER_MODULE = "wschat.sqlite_log"  # python -m WRITER_MODULE PATH: the writer process

# The write lock (BEGIN IMMEDIATE) makes the read-then-write of the sequences safe.
ROOM_LAST_IDS_SQL = (
    "SELECT json_group_object(key, COALESCE("
    "(SELECT last_id FROM sequences WHERE scope = 'room:' || key),"
    " (SELECT MAX(id) FROM messages WHERE room = key), 0)) FROM json_each(?)")
SET_SEQUENCES_SQL = (
    "INSERT INTO sequences (scope, last_id) SELECT key, value FROM json_each(?) WHERE true"
    " ON CONFLICT (scope) DO UPDATE SET last_id = excluded.last_id")
# One statement for a batch's rows, not executemany (a step per row): every statement
# is a call from Python into sqlite3 (docs/persistence.md).
INSERT_MESSAGES_SQL = (
    "INSERT INTO messages (room, id, user_id, client_msg_id, created_ms, event)"
    " SELECT value ->> 0, value ->> 1, value ->> 2, value ->> 3, value ->> 4,"
    " CAST(value ->> 5 AS BLOB) FROM json_each(?)")
INSERT_DMS_SQL = (
    "INSERT INTO dms (id, sender_id, recipient_id, client_msg_id, created_ms, delivered, event)"
    " SELECT value ->> 0, value ->> 1, value ->> 2, value ->> 3, value ->> 4, value ->> 5,"
    " CAST(value ->> 6 AS BLOB) FROM json_each(?)")

_LENGTH = struct.Struct(">I")


class SQLiteFile(DirectLog):
    """SQLite in WAL mode with ``synchronous=FULL``: every COMMIT is fsynced.

    Plain blocking calls on one connection, from whichever thread owns it.
    Several processes on one machine may share the file (writers take turns
    through SQLite's write lock); several machines may not.
    """

    dialect = SQLiteDialect()

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
                # Applied by the connection whose write restarts the log after a
                # checkpoint that emptied it: the writer's.
                conn.execute(f"PRAGMA journal_size_limit = {SQLITE_WAL_SIZE_LIMIT}")
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
            if _is_busy(exc):
                raise DatabaseBusy(f"sqlite: {exc}") from exc
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
        last = orjson.loads(conn.execute(ROOM_LAST_IDS_SQL, (to_json(counts),)).fetchone()[0])
        taken = {room: int(last[room]) + n for room, n in counts.items()}
        conn.execute(SET_SEQUENCES_SQL,
                     (to_json({room_scope(room): n for room, n in taken.items()}),))
        return taken

    def _insert_messages(self, conn: Any, rows: list[tuple[Any, ...]]) -> None:
        conn.execute(INSERT_MESSAGES_SQL, (json_rows(rows),))

    def _insert_dms(self, conn: Any, rows: list[tuple[Any, ...]]) -> None:
        conn.execute(INSERT_DMS_SQL, (json_rows(rows),))

    def _is_conflict(self, exc: BaseException) -> bool:
        return isinstance(exc, sqlite3.IntegrityError)

    def _is_refusal(self, exc: BaseException) -> bool:
        return isinstance(exc, sqlite3.DataError)

    def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            try:
                conn.close()
            except sqlite3.Error:
                pass


def _is_busy(exc: sqlite3.Error) -> bool:
    """The write lock (or a table's lock) stayed taken past the busy wait."""
    code = getattr(exc, "sqlite_errorcode", None)
    if code is not None:
        return code & 0xFF in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED)
    return "database is locked" in str(exc)


class SQLiteLog(MessageLog):
    """The worker's SQLite log: :class:`SQLiteFile` writes in a writer process, reads on
    a one-thread pool of this process."""

    dialect = SQLiteFile.dialect

    def __init__(self, path: str) -> None:
        self._reader = SQLiteFile(path)  # refuses an SQLite that is too old
        self.path = path
        self.url_for_logs = self._reader.url_for_logs
        self._reader_thread = gevent.threadpool.ThreadPool(1)
        self._writer = WriterProcess(path)

    def _read_call(self, fn: Any, *args: Any) -> Any:
        return self._reader_thread.apply(self._reader.call, (fn, *args))

    def migrate(self) -> int:
        return int(self._writer.call("migrate"))

    def ping(self) -> None:
        self._writer.call("ping")

    def write(self, jobs: list[Job]) -> None:
        for job, outcome in zip(jobs, self._writer.call("write", jobs), strict=True):
            _fill_in(job, outcome)

    def close(self) -> None:
        try:
            self._writer.close()
            self._reader_thread.apply(self._reader.close)
        finally:
            self._reader_thread.kill()


class WriterProcess:
    """The worker's end of the pipe to its writer process, started on first use and
    again after it died or stopped answering."""

    CALL_TIMEOUT = 10.0  # SQLite's busy timeout is 1 s: a writer this slow is stuck
    CLOSE_TIMEOUT = 5.0

    def __init__(self, path: str) -> None:
        self.path = path
        self._process: gevent.subprocess.Popen | None = None
        self._turn = gevent.lock.Semaphore()  # one request on the pipe at a time

    def call(self, op: str, payload: Any = None) -> Any:
        with self._turn:
            process = self._process or self._start()
            assert process.stdin is not None and process.stdout is not None
            try:
                with gevent.Timeout(self.CALL_TIMEOUT, DatabaseUnavailable(
                        f"sqlite writer process did not answer within {self.CALL_TIMEOUT:.0f}s")):
                    _send(process.stdin, (op, payload))
                    wait_first(process.stdout.fileno(), READ)  # ahead of the clients (db_wait)
                    status, value = _receive(process.stdout)
            except BaseException as exc:
                # Half a request or reply may be on the pipe: start afresh next time.
                self._stop()
                if isinstance(exc, (OSError, EOFError, pickle.PickleError)):
                    raise DatabaseUnavailable(f"sqlite writer process: {exc!r}") from exc
                raise
        if status == "ok":
            return value
        if status == "schema":
            raise SchemaTooNew(value)
        if status == "refused":
            raise BatchRefused(value)
        if status == "busy":
            raise DatabaseBusy(value)
        raise DatabaseUnavailable(value)

    def _start(self) -> gevent.subprocess.Popen:
        # The writer imports what this worker imports (this very wschat, wherever it came
        # from): the worker's sys.path, in its order, ahead of the interpreter's defaults.
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
        try:
            self._process = gevent.subprocess.Popen(
                [sys.executable, "-m", WRITER_MODULE, self.path],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env)
        except OSError as exc:
            raise DatabaseUnavailable(f"cannot start the sqlite writer process: {exc}") from exc
        return self._process

    def _stop(self) -> None:
        process, self._process = self._process, None
        if process is not None:
            process.kill()
            process.wait()

    def close(self) -> None:
        """Let the writer finish its request and exit (its stdin closes), then reap it."""
        with self._turn:
            process, self._process = self._process, None
            if process is None:
                return
            assert process.stdin is not None
            try:
                process.stdin.close()
                process.wait(self.CLOSE_TIMEOUT)
            except (OSError, subprocess.TimeoutExpired):
                log.warning("the sqlite writer process did not exit; killing it")
                process.kill()
                process.wait()


def _fill_in(job: Job, outcome: Any) -> None:
    """Copy what the writer process filled in on its copy of ``job``."""
    if isinstance(job, DmPost):
        job.msg_id, job.event, job.duplicate, job.inbox_full = outcome
    elif isinstance(job, Post):
        job.msg_id, job.event, job.duplicate = outcome
    elif isinstance(job, Arrival):
        job.backlog, job.kept = outcome


def _outcome(job: Job) -> Any:
    if isinstance(job, DmPost):
        return job.msg_id, job.event, job.duplicate, job.inbox_full
    if isinstance(job, Post):
        return job.msg_id, job.event, job.duplicate
    if isinstance(job, Arrival):
        return job.backlog, job.kept
    return None


def _send(stream: IO[bytes], message: Any) -> None:
    data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    stream.write(_LENGTH.pack(len(data)) + data)
    stream.flush()


def _receive(stream: IO[bytes]) -> Any:
    """The next message; :class:`EOFError` if the other end closed the pipe."""
    header = stream.read(_LENGTH.size)
    if len(header) < _LENGTH.size:
        raise EOFError("the pipe closed")
    size = _LENGTH.unpack(header)[0]
    data = stream.read(size)
    if len(data) < size:
        raise EOFError("the pipe closed mid-message")
    return pickle.loads(data)


# -- the writer process ------------------------------------------------------------------

class _TurnTimedOut(Exception):
    pass


class WriterTurns:
    """Whose turn it is to write the file, among the writer processes of every worker
    (of every server) on the machine: a lock (flock) on ``PATH-writers``, beside the
    database, held while a request is answered.

    SQLite's write lock is no queue. A writer that finds it taken sleeps in its busy
    handler (1, 2, 5 ... then 100 ms at a time) and looks again; a worker under load
    has its next batch ready the moment its commit returns and takes the lock again at
    once. So the worker whose siblings were busy found it taken at nearly every look,
    and after :data:`SQLITE_BUSY_TIMEOUT_MS` took the database for down: its clients'
    messages refused ``unavailable``, /ready 503, while the others wrote. A writer
    waiting here is woken by the kernel when the lock is released, ahead of the
    holder's next batch (which has a reply and a request to travel first). SQLite's
    busy wait still covers other processes (an operator's ``sqlite3``), which do not
    take this lock. Only the writer process takes turns: it waits in its main thread,
    where SIGALRM can end the wait."""

    TIMEOUT = 5.0  # siblings each hold it for a request; the worker gives up after 10 s

    def __init__(self, path: str) -> None:
        try:
            self._fd: int | None = os.open(f"{path}-writers",
                                           os.O_RDONLY | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as exc:  # SQLite says what is wrong with the place, if anything
            log.warning("sqlite writers of %s cannot take turns (%s)", path, exc)
            self._fd = None

    def take(self) -> bool:
        """Wait for this writer's turn (False: not within :attr:`TIMEOUT`)."""
        if self._fd is None:
            return True
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except OSError as exc:
            if exc.errno not in (errno.EAGAIN, errno.EWOULDBLOCK):
                raise
        armed = True

        def expire(signum: int, frame: Any) -> None:
            if armed:  # one alarm, and none once the turn was had
                raise _TurnTimedOut

        previous = signal.signal(signal.SIGALRM, expire)
        signal.setitimer(signal.ITIMER_REAL, self.TIMEOUT)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX)
            armed = False
            return True
        except _TurnTimedOut:
            fcntl.flock(self._fd, fcntl.LOCK_UN)  # granted just before the alarm, maybe
            return False
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, previous)

    def give(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)

    def close(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)


def serve(path: str, requests: IO[bytes], replies: IO[bytes]) -> None:
    """Answer requests until ``requests`` closes, each in this writer's turn."""
    file = SQLiteFile(path)
    turns = WriterTurns(path)
    try:
        while True:
            try:
                op, payload = _receive(requests)
            except EOFError:
                return
            if not turns.take():
                _send(replies, ("busy", (f"sqlite: the other writers of {path} held it for "
                                         f"{turns.TIMEOUT:.0f}s")))
                continue
            try:
                answer = _answer(file, op, payload)
            finally:
                turns.give()
            _send(replies, answer)
    finally:
        turns.close()
        file.close()


def _answer(file: SQLiteFile, op: str, payload: Any) -> tuple[str, Any]:
    try:
        if op == "write":
            file.write(payload)
            return "ok", [_outcome(job) for job in payload]
        if op == "migrate":
            return "ok", file.migrate()
        if op == "ping":
            file.ping()
            return "ok", None
        return "error", f"unknown request {op!r}"
    except SchemaTooNew as exc:
        return "schema", str(exc)
    except BatchRefused as exc:
        return "refused", str(exc)
    except DatabaseBusy as exc:
        return "busy", str(exc)
    except DatabaseUnavailable as exc:
        return "error", str(exc)
    except Exception as exc:
        log.exception("sqlite writer: %s failed", op)
        return "error", f"sqlite writer: {op} failed ({exc.__class__.__name__}: {exc})"


def main(argv: list[str] | None = None) -> None:
    """The writer process: ``python -m wschat.sqlite_log PATH``."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    from ..config import ConfigError, Settings
    from ..logs import configure_logging

    try:
        settings = Settings.from_env()
        configure_logging(settings.log_format, settings.log_level)
    except ConfigError:
        configure_logging("text", "info")
    try:
        serve((argv or sys.argv)[1], sys.stdin.buffer, sys.stdout.buffer)
    except BrokenPipeError:
        pass  # the worker is gone; so is whoever wanted the reply
