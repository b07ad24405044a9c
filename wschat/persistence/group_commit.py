"""The group-commit writer: one greenlet commits every write of a worker.

Whatever queued up while the previous commit ran goes into the next
transaction (group commit, no artificial delay), and only after COMMIT returns
does the caller learn its id (docs/persistence.md, "The durability rule").
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable

import gevent
import gevent.event

from ..stores.base import Unavailable
from .base import BatchRefused, DatabaseUnavailable, MessageLog, first_line
from .jobs import Job
from .schema import SCHEMA_VERSION

log = logging.getLogger("wschat.persistence")


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
    PROBE_HEALTHY = 2.0  # readiness is checked this often while nothing fails
    PROBE_DOWN = 0.5  # after a failure (a write's or a probe's), again this often

    def __init__(self, log_: MessageLog, after_commit: Callable[[list[Job]], None],
                 on_error: Callable[[], None] = lambda: None,
                 on_written: Callable[[float], None] = lambda seconds: None) -> None:
        self._log = log_
        self._after_commit = after_commit
        self._on_error = on_error
        self._on_written = on_written  # seconds each committed batch took
        self._queue: deque[Job] = deque()
        # One event per batch, not per job: set when the batch that takes the jobs queued
        # now has committed, or when the writer goes idle. A waiter woken with its job
        # unfinished (left for a later batch, MAX_BATCH) waits on the next one.
        self._gathering = gevent.event.Event()
        self._wake = gevent.event.Event()
        self._stop = gevent.event.Event()
        self._closing = False
        self._probe_now = gevent.event.Event()  # a write failed: the prober's wait ends
        self.ready = False  # migrated and answering
        self.last_error = "not connected yet"
        self.last_failure: BaseException | None = None  # what last_error says
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
        if not self.ready:
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
        started = time.perf_counter()
        written: list[Job] = []
        try:
            self._write(batch, written)
        except Exception as exc:
            self._failed(exc)
            error = exc if isinstance(exc, DatabaseUnavailable) else DatabaseUnavailable(
                f"database write failed ({exc.__class__.__name__})")
            stored = set(map(id, written))
            for job in batch:
                if id(job) not in stored:
                    job.error = job.error or error
        if written:
            self._on_written(time.perf_counter() - started)
            try:
                self._after_commit(written)
            except Exception:
                log.exception("publishing committed messages failed")
                for job in written:
                    job.error = job.error or Unavailable("stored, but delivery failed")
        for job in batch:
            job.finished = True

    def _write(self, jobs: list[Job], written: list[Job]) -> None:
        """Commit ``jobs``, adding them to ``written``. A batch the database refused for
        a value in it (rolled back: nothing written) is written again in halves, in
        order, down to the jobs it refuses alone: those fail, the others are stored as
        if nothing had happened, and the database is not marked down for them. Jobs the
        watchdog has failed meanwhile (their senders were told it timed out) are left
        out of the halves, as queued ones are never written once failed."""
        try:
            self._log.write(jobs)
        except BatchRefused as exc:
            if len(jobs) > 1:
                half = len(jobs) // 2
                for part in (jobs[:half], jobs[half:]):
                    part = [job for job in part if not job.cancelled]
                    if part:
                        self._write(part, written)
                return
            self._on_error()
            log.error("database refused a %s: %s", type(jobs[0]).__name__, first_line(exc))
            jobs[0].error = exc
            return
        for job in jobs:
            job.committed = True
        written.extend(jobs)

    def _expire_forever(self) -> None:
        while not self._stop.wait(self.WATCH_EVERY):
            self._expire(time.monotonic() - self.SUBMIT_TIMEOUT)

    def _expire(self, submitted_before: float) -> None:
        """Fail the jobs submitted before ``submitted_before``: queued ones are dropped (never
        written); a batch still in the database may yet commit, like any timed-out request.
        Jobs already committed (a refused batch written in parts) keep their outcome."""
        expired: list[Job] = []
        while self._queue and self._queue[0].submitted < submitted_before:
            expired.append(self._queue.popleft())
        in_flight = self._in_flight
        if in_flight is not None and in_flight[0][0].submitted < submitted_before:
            expired += in_flight[0]
        if not expired:
            return
        for job in expired:
            if not job.finished and not job.committed:
                job.cancelled, job.finished = True, True
                job.error = DatabaseUnavailable("database write timed out")
        if in_flight is not None and any(job.finished for job in in_flight[0]):
            in_flight[1].set()  # wakes its failed senders; a committed one waits on
        # Queued jobs' senders wait on the batch being gathered: wake them (the others wait
        # again on a fresh event).
        waiting, self._gathering = self._gathering, gevent.event.Event()
        waiting.set()

    def _failed(self, exc: BaseException) -> None:
        self._on_error()
        message = first_line(exc)
        if self.ready or message != self.last_error:
            if isinstance(exc, DatabaseUnavailable):
                log.warning("database %s unavailable: %s", self._log.url_for_logs, message)
            else:
                log.error("database write failed", exc_info=exc)
        self.last_error, self.last_failure = message, exc
        self.ready = False
        self._probe_now.set()

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
        self.last_error, self.last_failure = "", None

    def _probe_forever(self) -> None:
        """Every PROBE_HEALTHY while the database answers, every PROBE_DOWN once anything
        failed: writes are refused from a failure until the next probe that succeeds,
        PROBE_DOWN later at the soonest (not queued behind a dead connection)."""
        while True:
            if self.ready:
                self._probe_now.wait(self.PROBE_HEALTHY)
            self._probe_now.clear()
            if self._stop.wait(0 if self.ready else self.PROBE_DOWN):
                return
            self._check()

    def close(self, timeout: float = 5.0) -> None:
        """Refuse new writes, commit what is queued (bounded by ``timeout``), stop."""
        self._closing = True
        self._wake.set()
        self._stop.set()
        self._probe_now.set()
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
