"""Auto-pipelining: the Redis commands greenlets issue within one loop iteration go out
together, as one write, and their replies are read back in order.

Why: at a few thousand messages per second, redis-py's per-command path cost a
worker more CPU than the chat itself (loadtest/RESULTS.md, issue 24): every
command checks a connection out of the ``BlockingConnectionPool`` (a timed lock
and queue, a pid check), polls the socket (``can_read``: is there stale data?),
goes through the retry and observability wrappers, and makes its own write and
read system calls. :class:`Pipelined` wraps the worker's ``redis.Redis``: the
commands of the hot path (every script, ``PUBLISH``, ``HGET``) go through one
:class:`Pipeliner`, everything else (pipelines, pub/sub, reads of history) to
the client unchanged.

A :class:`Pipeliner` owns one connection (made by the client's own pool, so
address, TLS, auth, database and timeouts are the same; redis-py connects and
greets). Each command is packed by hiredis in its caller's greenlet, and a batch is
written together in one ``send``; replies are
read by :class:`~.replies.ReplyReader`, without redis-py's per-reply path.
A caller queues its command; when nothing is in flight it sends the batch
itself, otherwise the commands queued while a batch's replies are awaited go
out together as the next batch (one write, one non-transactional pipeline),
sent by a flusher greenlet that hands each reply back. Failures are what redis-py raises for one command:

* an argument no command takes fails its caller at once (``TypeError``,
  ``UnicodeEncodeError``, as hiredis raises them); nothing is sent for it;
* an error reply (``ResponseError``, ``NoScriptError`` after a Redis restart or
  ``SCRIPT FLUSH``) goes to its own caller only; a script is then loaded and
  called again by :class:`PipelinedScript`, as ``redis.commands.core.Script`` does;
* a connection error or timeout fails every command of the batch that has no
  reply yet (``ConnectionError``/``TimeoutError``, which the stores turn into
  ``unavailable``); nothing is retried, since a script may have run. The next
  batch connects again;
* before each batch, a socket that is readable while no reply is owed (EOF after
  a Redis restart, stray data) is reconnected first: the check redis-py's pool
  makes for every command, here once per batch and one non-blocking peek;
* a ``READONLY`` reply (a failover demoted the server this connection reached: the
  address now names another) goes to its caller as any error reply, and the
  connection is made again after the batch, through a new address lookup, and
  ``on_read_only`` is told (the factory reconnects the worker's other connections).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

import gevent
import gevent.event
import redis
from hiredis import pack_command
from redis.exceptions import NoScriptError

from ...telemetry import Metrics
from .keys import is_read_only
from .replies import ReplyReader

log = logging.getLogger("wschat.redis")

CONNECTION_ERRORS = (redis.ConnectionError, redis.TimeoutError, OSError)


class Pipeliner:
    """One connection and one flusher greenlet; :meth:`execute` from any greenlet."""

    MAX_BATCH = 512  # commands per write; a longer queue goes out in several

    def __init__(self, client: redis.Redis, metrics: Metrics | None = None) -> None:
        self._metrics = metrics
        pool = client.connection_pool
        kwargs = dict(pool.connection_kwargs)
        kwargs["health_check_interval"] = 0  # the readable-socket check below instead
        self._conn: Any = pool.connection_class(**kwargs)
        self._replies: ReplyReader | None = None  # reads self._conn's replies once connected
        self._queue: list[tuple[bytes, gevent.event.AsyncResult]] = []  # packed commands
        self._busy = False  # a batch is being sent or its replies read
        self._flusher: gevent.Greenlet | None = None
        self._closed = False
        #: Told when Redis answered ``READONLY`` (see the module's docstring).
        self.on_read_only: Callable[[], None] | None = None
        #: Writes made and commands sent (their ratio is the mean batch).
        self.batches = 0
        self.commands = 0

    def execute(self, *args: Any) -> Any:
        """Send one command with the next batch; its reply, or its error raised here.

        Packed here, by its caller: an argument no command takes (``TypeError``,
        ``UnicodeEncodeError``) is this caller's error, not its batch's."""
        if self._closed:
            raise redis.ConnectionError("redis pipeline closed")
        packed = pack_command(args)
        result = gevent.event.AsyncResult()
        self._queue.append((packed, result))
        if not self._busy:
            # Nothing in flight: this greenlet sends the batch itself (no hop through
            # another greenlet); what others queue meanwhile goes in the next batch,
            # sent by a flusher greenlet so that this caller is not kept waiting.
            self._busy = True
            try:
                self._send_next()
            finally:
                if self._queue and not self._closed:
                    self._flusher = gevent.spawn(self._drain)
                else:
                    self._busy = False
        return result.get()

    def close(self) -> None:
        self._closed = True
        if self._flusher is not None:
            self._flusher.kill(block=False)
        self._fail(self._queue, redis.ConnectionError("redis pipeline closed"))
        self._queue = []
        self._disconnect()

    def _send_next(self) -> None:
        batch = self._queue[:self.MAX_BATCH]
        del self._queue[:self.MAX_BATCH]
        self._send(batch)

    def _drain(self) -> None:
        try:
            while self._queue and not self._closed:
                self._send_next()
        except BaseException as exc:
            # Killed (close) or a bug: nobody may wait forever.
            self._fail(self._queue, redis.ConnectionError(f"redis pipeline stopped: {exc!r}"))
            self._queue = []
            if not isinstance(exc, gevent.GreenletExit):
                log.exception("redis pipeline failed")
            raise
        finally:
            self._busy = False

    def _send(self, batch: list[tuple[bytes, gevent.event.AsyncResult]]) -> None:
        conn = self._conn
        done = 0
        demoted = False
        try:
            replies = self._replies
            if replies is None or replies.stale():
                conn.disconnect()
                conn.connect()  # redis-py greets: HELLO, AUTH, SELECT as configured
                replies = self._replies = ReplyReader(conn)
            sent = time.perf_counter()
            replies.send(b"".join([packed for packed, _ in batch]))
            self.batches += 1
            self.commands += len(batch)
            for _, result in batch:
                reply = replies.read()
                if isinstance(reply, Exception):  # an error reply: its caller's alone
                    result.set_exception(reply)
                    demoted = demoted or is_read_only(reply)
                else:
                    result.set(reply)
                done += 1
        except CONNECTION_ERRORS as exc:
            self._disconnect()
            self._fail(batch[done:], exc)
            return
        except BaseException as exc:
            self._disconnect()
            self._fail(batch[done:], redis.ConnectionError(f"redis pipeline: {exc!r}"))
            raise
        if self._metrics is not None:  # the batch's round trip, as its callers waited
            self._metrics.store_seconds("redis", time.perf_counter() - sent)
        if demoted:
            self._disconnect()  # the next batch looks the address up again
            if self.on_read_only is not None:
                self.on_read_only()

    def reconnect(self) -> None:
        """Drop the connection; the next batch makes it again (a failover)."""
        if not self._busy:
            self._disconnect()

    def _disconnect(self) -> None:
        replies, self._replies = self._replies, None
        if replies is not None:
            replies.close()
        self._conn.disconnect()

    @staticmethod
    def _fail(items: list[tuple[bytes, gevent.event.AsyncResult]],
              exc: BaseException) -> None:
        for _, result in items:
            if not result.ready():
                result.set_exception(exc)


class PipelinedScript:
    """A registered Lua script called through the pipeline (``EVALSHA``; on ``NOSCRIPT``
    ``SCRIPT LOAD`` and ``EVALSHA`` again). ``client=`` (a redis-py pipeline) goes the
    ordinary way."""

    def __init__(self, pipeliner: Pipeliner, script: Any) -> None:
        self._pipeliner = pipeliner
        self._script = script

    def __call__(self, keys: Sequence[Any] = (), args: Sequence[Any] = (),
                 client: Any = None) -> Any:
        if client is not None:
            return self._script(keys=keys, args=args, client=client)
        script, execute = self._script, self._pipeliner.execute
        try:
            return execute("EVALSHA", script.sha, len(keys), *keys, *args)
        except NoScriptError:
            execute("SCRIPT", "LOAD", script.script)
            return execute("EVALSHA", script.sha, len(keys), *keys, *args)


class Pipelined:
    """A ``redis.Redis`` whose scripts, ``PUBLISH`` and ``HGET`` go through a
    :class:`Pipeliner`; every other attribute is the client's own."""

    def __init__(self, client: redis.Redis, metrics: Metrics | None = None) -> None:
        self.client = client
        self.pipeliner = Pipeliner(client, metrics)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.client, name)

    def register_script(self, script: str) -> PipelinedScript:
        return PipelinedScript(self.pipeliner, self.client.register_script(script))

    def publish(self, channel: Any, message: Any) -> int:
        return int(self.pipeliner.execute("PUBLISH", channel, message))

    def hget(self, name: Any, key: Any) -> Any:
        return self.pipeliner.execute("HGET", name, key)

    def close(self) -> None:
        self.pipeliner.close()
        self.client.close()
