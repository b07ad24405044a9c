"""SQLite for a gevent worker: writes in a writer process, reads on a thread.

A thread of the worker would share the worker's GIL, and that is what SQLite
cost when its writes ran on one: the writing thread needs the GIL back after
every statement, the worker's main thread holds it while it serves sockets,
and at full load the two spent half the writer's time waiting for each other
(measured with py-spy; docs/persistence.md). So each worker starts one writer
process, ``python -m wschat.sqlite_log PATH``, which owns the write
connection with a GIL of its own. The worker sends it a batch of jobs and
waits on the pipe cooperatively; the reply carries the ids and events. One
request is in flight at a time (the worker's group-commit writer sends one
batch per transaction anyway).

The pipe carries length-prefixed pickles between two processes of this same
installation: a request ``(op, payload)`` with ``op`` one of ``write`` (a list
of :class:`~wschat.persistence.Job`), ``migrate``, ``ping``; a reply
``("ok", result)``, ``("schema", message)`` (:class:`SchemaTooNew`) or
``("error", message)`` (:class:`DatabaseUnavailable`).

The writer process ends when its stdin closes: the worker closed it on
shutdown, or died (even by ``kill -9``). It ignores SIGINT and SIGTERM, so a
signal sent to the whole process group cannot cut off the worker's last
commits; a transaction it was running when the worker died commits or rolls
back as a whole, and was never acknowledged to anyone.
"""

from __future__ import annotations

import logging
import os
import pickle
import signal
import struct
import subprocess
import sys
from typing import IO, Any

import gevent
import gevent.lock
import gevent.subprocess
import gevent.threadpool

from .db_wait import READ, wait_first
from .persistence import (
    Arrival, DatabaseUnavailable, DmPost, Job, MessageLog, RoomPost, SchemaTooNew, SQLiteFile,
)

log = logging.getLogger("wschat.persistence")

_LENGTH = struct.Struct(">I")


class SQLiteLog(MessageLog):
    """The worker's SQLite log: :class:`~wschat.persistence.SQLiteFile` writes in a
    writer process, reads on a one-thread pool of this process."""

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
        raise DatabaseUnavailable(value)

    def _start(self) -> gevent.subprocess.Popen:
        # The writer imports what this worker imports (this very wschat, wherever it came
        # from): the worker's sys.path, in its order, ahead of the interpreter's defaults.
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
        try:
            self._process = gevent.subprocess.Popen(
                [sys.executable, "-m", "wschat.sqlite_log", self.path],
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
    if isinstance(job, (RoomPost, DmPost)):
        job.msg_id, job.event, job.duplicate = outcome
    elif isinstance(job, Arrival):
        job.backlog, job.kept = outcome


def _outcome(job: Job) -> Any:
    if isinstance(job, (RoomPost, DmPost)):
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

def serve(path: str, requests: IO[bytes], replies: IO[bytes]) -> None:
    """Answer requests until ``requests`` closes."""
    file = SQLiteFile(path)
    try:
        while True:
            try:
                op, payload = _receive(requests)
            except EOFError:
                return
            _send(replies, _answer(file, op, payload))
    finally:
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
    except DatabaseUnavailable as exc:
        return "error", str(exc)
    except Exception as exc:
        log.exception("sqlite writer: %s failed", op)
        return "error", f"sqlite writer: {op} failed ({exc.__class__.__name__}: {exc})"


def main() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    from .config import ConfigError, Settings
    from .logs import configure_logging

    try:
        settings = Settings.from_env()
        configure_logging(settings.log_format, settings.log_level)
    except ConfigError:
        configure_logging("text", "info")
    try:
        serve(sys.argv[1], sys.stdin.buffer, sys.stdout.buffer)
    except BrokenPipeError:
        pass  # the worker is gone; so is whoever wanted the reply


if __name__ == "__main__":
    main()
